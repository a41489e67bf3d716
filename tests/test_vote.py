"""Majority vote over neighbours' labels: hand-made cases for each weighting and the tie rule."""

from __future__ import annotations

import numpy as np
import pytest

from msk.core.models.vote import vote


def test_plain_majority():
    result = vote([["ES", "OS", "ES"], ["OS", "OS", "GCT"]], k=3)
    assert result.labels == ["ES", "OS"]
    assert result.shares[0] == pytest.approx({"ES": 2 / 3, "OS": 1 / 3})
    assert list(result.shares[1]) == ["OS", "GCT"], "shares are listed largest first"
    np.testing.assert_allclose(result.confidence, [2 / 3, 2 / 3])


def test_only_the_first_k_neighbours_vote():
    assert vote([["ES", "OS", "OS", "ES", "ES"]], k=1).labels == ["ES"]
    assert vote([["ES", "OS", "OS", "ES", "ES"]], k=3).labels == ["OS"]
    assert vote([["ES", "OS", "OS", "ES", "ES"]], k=5).labels == ["ES"]


def test_three_way_tie_goes_to_the_nearest_neighbour():
    assert vote([["GCT", "ES", "OS"]], k=3).labels == ["GCT"]
    assert vote([["OS", "GCT", "ES"]], k=3).labels == ["OS"]


def test_tie_between_some_classes_ignores_nearer_losers():
    # ES 2, OS 2, GCT 1: GCT is nearest but not tied for the lead; OS is the nearest of the tied
    assert vote([["GCT", "OS", "ES", "ES", "OS"]], k=5).labels == ["OS"]


def test_even_k_is_refused_without_weights():
    with pytest.raises(ValueError, match="odd k .* got k=4"):
        vote([["a", "b", "a", "b"]], k=4)


def test_distance_weighting():
    labels = [["OS", "ES", "ES"]]
    assert vote(labels, k=3).labels == ["ES"]
    # one very close OS outweighs two far ES
    weighted = vote(labels, np.array([[0.01, 0.5, 0.6]]), k=3, weighting="distance")
    assert weighted.labels == ["OS"]
    expected_os = 1 / 0.010001 / (1 / 0.010001 + 1 / 0.500001 + 1 / 0.600001)
    assert weighted.shares[0]["OS"] == pytest.approx(expected_os)
    # equal distances: weighting changes nothing
    assert vote(labels, [[0.2, 0.2, 0.2]], k=3, weighting="distance").labels == ["ES"]


def test_distance_weighting_allows_even_k_and_breaks_exact_ties_by_nearest():
    # weights 1/1 and 1/1 for a, 1/1 and 1/1 for b: exact tie, nearest is b
    assert vote([["b", "a", "a", "b"]], [[1.0, 1.0, 1.0, 1.0]], k=4, weighting="distance").labels == ["b"]


def test_inverse_frequency_weighting():
    labels = [["common", "common", "rare"]]
    freq = {"common": 900, "rare": 100}
    assert vote(labels, k=3).labels == ["common"]
    result = vote(labels, k=3, weighting="inverse_frequency", class_frequencies=freq)
    assert result.labels == ["rare"]
    assert result.shares[0]["rare"] == pytest.approx((1 / 100) / (2 / 900 + 1 / 100))


def test_bad_inputs():
    with pytest.raises(ValueError, match="needs the neighbours' distances"):
        vote([["a"]], k=1, weighting="distance")
    with pytest.raises(ValueError, match=r"shape \[1, >=3\]"):
        vote([["a", "b", "a"]], [[0.1, 0.2]], k=3, weighting="distance")
    with pytest.raises(ValueError, match="finite and non-negative"):
        vote([["a"]], [[np.inf]], k=1, weighting="distance")
    with pytest.raises(ValueError, match="needs class_frequencies"):
        vote([["a"]], k=1, weighting="inverse_frequency")
    with pytest.raises(ValueError, match="no entry for 'b'"):
        vote([["a", "b", "a"]], k=3, weighting="inverse_frequency", class_frequencies={"a": 3})
    with pytest.raises(ValueError, match="positive and finite; 'a' is 0"):
        vote([["a"]], k=1, weighting="inverse_frequency", class_frequencies={"a": 0})
    with pytest.raises(ValueError, match="weighting must be one of"):
        vote([["a"]], k=1, weighting="rank")
    with pytest.raises(ValueError, match="query 1 has 2 neighbour labels, fewer than k=3"):
        vote([["a", "a", "b"], ["a", "b"]], k=3)
    with pytest.raises(ValueError, match="query 0 is the string 'abc'"):
        vote(["abc"], k=3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        vote([["a"]], k=0)


def test_accepts_a_label_array():
    labels = np.array([["a", "b", "b"], ["c", "c", "a"]])
    assert vote(labels, k=3).labels == ["b", "c"]
