"""Majority vote: the tumour entity of a query image from the labels of its nearest neighbours.

Each of the ``k`` nearest neighbours votes for its label with a weight:

* ``"none"``: 1 per neighbour; ``k`` must be odd, so that two classes cannot tie.
* ``"distance"``: ``1 / (distance + 1e-6)``, so nearer neighbours count more (an identical
  image outvotes everything else); needs the distances of :class:`msk.core.models.retrieval.SearchResult`.
* ``"inverse_frequency"``: ``1 / frequency(label)`` with the label's frequency (count or share)
  among the stored images, so that common entities do not win merely by being common; needs
  ``class_frequencies``.

The predicted label is the one with the largest total weight. Ties (possible with weights, or
with three or more classes, e.g. 1-1-1 at ``k=3``) go to the class of the nearest neighbour
among the tied classes. Neighbours are taken in the order given, which must be nearest first
(as :meth:`msk.core.models.retrieval.Retriever.search` returns them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Weighting = Literal["none", "distance", "inverse_frequency"]
WEIGHTINGS: tuple[str, ...] = ("none", "distance", "inverse_frequency")
DISTANCE_EPS = 1e-6


@dataclass(frozen=True)
class VoteResult:
    """Outcome of :func:`vote` for ``M`` queries.

    :param labels: the predicted label of each query.
    :param shares: per query, each voted label's share of the total weight (they sum to 1),
        largest first.
    """

    labels: list[str]
    shares: list[dict[str, float]]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def confidence(self) -> np.ndarray:
        """float ``[M]``: the winning label's share per query."""
        return np.array([s[label] for label, s in zip(self.labels, self.shares)], dtype=np.float64)


def vote(neighbour_labels: Sequence[Sequence[str]] | np.ndarray,
         distances: np.ndarray | Sequence[Sequence[float]] | None = None, *, k: int,
         weighting: Weighting = "none",
         class_frequencies: Mapping[str, float] | None = None) -> VoteResult:
    """Classify each query by a vote of its ``k`` nearest neighbours' labels.

    :param neighbour_labels: per query, the labels of its neighbours, nearest first; the first
        ``k`` vote (a query with fewer than ``k`` is an error).
    :param distances: ``[M, >=k]`` distances matching ``neighbour_labels`` (``"distance"`` only).
    :param k: number of voting neighbours; odd for ``weighting="none"``.
    :param weighting: ``"none"``, ``"distance"`` or ``"inverse_frequency"`` (module docstring).
    :param class_frequencies: ``label -> count or share`` among the stored images
        (``"inverse_frequency"`` only).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if weighting == "none" and k % 2 == 0:
        raise ValueError(
            f"an unweighted vote needs an odd k so that two classes cannot tie; got k={k}"
        )
    rows = _rows(neighbour_labels, k)
    weights = _weights(rows, distances, k, weighting, class_frequencies)
    labels, shares = [], []
    for row, w in zip(rows, weights):
        totals: dict[str, float] = {}
        for label, weight in zip(row, w):
            totals[label] = totals.get(label, 0.0) + float(weight)
        best = max(totals.values())
        tied = {c for c, t in totals.items() if math.isclose(t, best, rel_tol=1e-9)}
        labels.append(next(c for c in row if c in tied))  # nearest neighbour among the tied
        total = sum(totals.values())
        shares.append({c: t / total for c, t in sorted(totals.items(), key=lambda ct: -ct[1])})
    return VoteResult(labels, shares)


def _rows(neighbour_labels: Sequence[Sequence[str]] | np.ndarray, k: int) -> list[list[str]]:
    if isinstance(neighbour_labels, (str, bytes)):
        raise ValueError("neighbour_labels must hold one list of labels per query, not a string")
    rows = []
    for i, row in enumerate(neighbour_labels):
        if isinstance(row, (str, bytes)):
            raise ValueError(
                f"neighbour_labels must hold one list of labels per query; query {i} is the "
                f"string {row!r}"
            )
        row = list(row)
        if len(row) < k:
            raise ValueError(
                f"query {i} has {len(row)} neighbour labels, fewer than k={k} (an approximate "
                f"index may find fewer than k: raise its nprobe or ef_search)"
            )
        rows.append([str(label) for label in row[:k]])
    return rows


def _weights(rows: list[list[str]], distances, k: int, weighting: str,
             class_frequencies: Mapping[str, float] | None) -> np.ndarray:
    if weighting == "none":
        return np.ones((len(rows), k))
    if weighting == "distance":
        if distances is None:
            raise ValueError("weighting='distance' needs the neighbours' distances")
        d = np.asarray(distances, dtype=np.float64)
        if d.ndim != 2 or d.shape[0] != len(rows) or d.shape[1] < k:
            raise ValueError(f"distances must have shape [{len(rows)}, >={k}], got {d.shape}")
        d = d[:, :k]
        if not np.isfinite(d).all() or (d < 0).any():
            raise ValueError("distances of voting neighbours must be finite and non-negative")
        return 1.0 / (d + DISTANCE_EPS)
    if not class_frequencies:
        raise ValueError("weighting='inverse_frequency' needs class_frequencies (label -> count)")
    missing = sorted({c for row in rows for c in row} - set(class_frequencies))
    if missing:
        raise ValueError(f"class_frequencies has no entry for {', '.join(map(repr, missing))}")
    bad = [c for c, f in class_frequencies.items() if not (f > 0 and math.isfinite(f))]
    if bad:
        raise ValueError(f"class frequencies must be positive and finite; {bad[0]!r} is "
                         f"{class_frequencies[bad[0]]!r}")
    return np.array([[1.0 / class_frequencies[c] for c in row] for row in rows])
