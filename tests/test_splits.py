"""Patient-level splits: no patient on both sides, classes stratified, deterministic by seed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from msk.core.data.splits import PatientOverlapError, assert_disjoint_patients, patient_kfold, patient_split


@pytest.fixture(scope="module")
def archive():
    """300 patients with 1-4 images each; classes of 50 %, 30 % and 20 % of the patients."""
    rng = np.random.default_rng(7)
    patient_class = np.repeat(["OS", "ES", "GCT"], [150, 90, 60])
    pids, labels = [], []
    for p, c in enumerate(patient_class):
        n = rng.integers(1, 5)
        pids += [f"P{p:04d}"] * n
        labels += [c] * n
    order = rng.permutation(len(pids))  # images are not grouped by patient in an archive
    return np.array(pids)[order], np.array(labels)[order]


def _patients(pids, idx):
    return set(pids[idx])


def test_patient_split_is_disjoint_and_complete(archive):
    pids, labels = archive
    train, test = patient_split(pids, labels, test_size=0.2, seed=0)
    assert not _patients(pids, train) & _patients(pids, test)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(pids)))
    assert len(_patients(pids, test)) == 60


def test_patient_split_is_stratified(archive):
    pids, labels = archive
    _, test = patient_split(pids, labels, test_size=0.2, seed=3)
    test_patient_class = dict(zip(pids[test], labels[test]))
    assert Counter(test_patient_class.values()) == {"OS": 30, "ES": 18, "GCT": 12}


def test_patient_split_is_deterministic_by_seed(archive):
    pids, labels = archive
    a = patient_split(pids, labels, seed=1)
    b = patient_split(pids, labels, seed=1)
    c = patient_split(pids, labels, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_patient_split_by_count_and_rounding():
    pids = [f"p{i}" for i in range(10)]
    labels = ["a"] * 5 + ["b"] * 3 + ["c"] * 2
    _, test = patient_split(pids, labels, test_size=3, seed=0)
    # quotas 1.5, 0.9, 0.6 -> floors 1, 0, 0 -> the two largest remainders (b, c) get one more
    assert sorted(np.array(labels)[test]) == ["a", "b", "c"]


def test_patient_split_refuses_bad_input():
    with pytest.raises(ValueError, match="both sets need at least one patient"):
        patient_split(["a", "b"], ["x", "y"], test_size=0.1)
    with pytest.raises(ValueError, match="fraction in \\(0, 1\\)"):
        patient_split(["a", "b"], ["x", "y"], test_size=1.5)
    with pytest.raises(ValueError, match="3 patient ids but 2 labels"):
        patient_split(["a", "b", "c"], ["x", "y"])
    with pytest.raises(ValueError, match="1 image\\(s\\) have no patient id \\(first: image 1\\)"):
        patient_split(["a", "", "c"], ["x", "y", "z"])


def test_majority_label_decides_a_patients_stratum():
    # patient q has two "b" images and one "a": it is a "b" patient
    pids = ["p", "q", "q", "q", "r", "s"]
    labels = ["a", "b", "b", "a", "a", "b"]
    train, test = patient_split(pids, labels, test_size=2, seed=0)
    strata = {"p": "a", "q": "b", "r": "a", "s": "b"}
    assert sorted(strata[p] for p in set(np.array(pids)[test])) == ["a", "b"]


def test_kfold_covers_every_patient_once(archive):
    pids, labels = archive
    folds = list(patient_kfold(pids, labels, n_splits=5, seed=0))
    assert len(folds) == 5
    seen = []
    for train, test in folds:
        assert not _patients(pids, train) & _patients(pids, test)
        assert len(train) + len(test) == len(pids)
        seen += sorted(_patients(pids, test))
        shares = Counter(dict(zip(pids[test], labels[test])).values())
        assert abs(shares["OS"] / sum(shares.values()) - 0.5) < 0.1
    assert sorted(seen) == sorted(set(pids))
    again = list(patient_kfold(pids, labels, n_splits=5, seed=0))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))


def test_kfold_needs_enough_patients():
    with pytest.raises(ValueError, match="n_splits=5 folds need 2 <= n_splits <= 3 patients"):
        list(patient_kfold(["a", "b", "c"], ["x", "y", "x"], n_splits=5))


def test_assert_disjoint_patients():
    assert_disjoint_patients(["a", "b"], ["c"])
    with pytest.raises(PatientOverlapError, match=r"2 patient\(s\) are in both .*: b, c;"):
        assert_disjoint_patients(["a", "b", "c"], ["c", "b", "d"])
    many = [f"p{i:02d}" for i in range(15)]
    with pytest.raises(PatientOverlapError, match="p09 and 5 more"):
        assert_disjoint_patients(many, many)
