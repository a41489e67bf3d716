"""Patient-level splits: all images of a patient fall on the same side.

Images of one patient look alike (same anatomy, same lesion, often the same day), so a patient
with images on both sides of a split lets a retriever or classifier "recognise" the patient
instead of the disease and inflates every metric. The functions here split *patients*, with the
classes stratified over patients, and return indices of *images*; :func:`assert_disjoint_patients`
is the check the recommender runs before evaluating.

A patient's class for stratification is the most frequent label among its images (ties: the
label that sorts first).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from msk.core.errors import MskError, TrainingDataError


class PatientOverlapError(MskError, ValueError):
    """The same patient appears in the training and the test set."""


def patient_split(patient_ids: Sequence[Any] | np.ndarray, labels: Sequence[Any] | np.ndarray,
                  test_size: float | int = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split images into train and test by patient, stratified by label.

    Each class's patients are shuffled (``seed``) and the first ones go to the test set; the
    number per class is the class's share of ``test_size`` patients, rounded so that the totals
    add up (largest remainders first). A class with a single patient can end up on either side.

    :param patient_ids: per image, its (pseudonymised) patient id.
    :param labels: per image, its label.
    :param test_size: fraction of patients in ``(0, 1)``, or a number of patients.
    :return: ``(train_idx, test_idx)``: sorted int64 image indices.
    """
    pids, patients, patient_labels = _patients(patient_ids, labels)
    n = len(patients)
    if isinstance(test_size, (int, np.integer)) and not isinstance(test_size, bool) and test_size >= 1:
        n_test = int(test_size)
    elif isinstance(test_size, float) and 0 < test_size < 1:
        n_test = round(test_size * n)
    else:
        raise ValueError(f"test_size must be a fraction in (0, 1) or a number of patients; got {test_size!r}")
    if not 1 <= n_test < n:
        raise ValueError(
            f"test_size={test_size!r} puts {n_test} of {n} patients in the test set; "
            f"both sets need at least one patient"
        )
    rng = np.random.default_rng(seed)
    classes = sorted(set(patient_labels))
    members = {c: [p for p, lab in zip(patients, patient_labels) if lab == c] for c in classes}
    quotas = np.array([n_test * len(members[c]) / n for c in classes])
    per_class = np.floor(quotas).astype(int)
    remainder = quotas - per_class
    for i in sorted(range(len(classes)), key=lambda i: (-remainder[i], i))[: n_test - per_class.sum()]:
        per_class[i] += 1
    test_patients: set[Any] = set()
    for c, take in zip(classes, per_class):
        order = rng.permutation(len(members[c]))
        test_patients.update(members[c][j] for j in order[:take])
    in_test = np.array([p in test_patients for p in pids])
    train_idx, test_idx = np.flatnonzero(~in_test), np.flatnonzero(in_test)
    assert_disjoint_patients(pids[train_idx], pids[test_idx])
    return train_idx.astype(np.int64), test_idx.astype(np.int64)


def patient_kfold(patient_ids: Sequence[Any] | np.ndarray, labels: Sequence[Any] | np.ndarray, n_splits: int = 5,
                  seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``n_splits`` ``(train_idx, test_idx)`` folds of image indices; every patient is in
    exactly one test fold, and classes are balanced over folds (scikit-learn's
    ``StratifiedGroupKFold``, shuffled with ``seed``)."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = [str(v) for v in labels]
    pids, patients, _ = _patients(patient_ids, labels)
    if not 2 <= n_splits <= len(patients):
        raise ValueError(f"n_splits={n_splits} folds need 2 <= n_splits <= {len(patients)} patients")
    y = np.asarray(labels)
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for train_idx, test_idx in folds.split(np.zeros(len(pids)), y, groups=pids):
        assert_disjoint_patients(pids[train_idx], pids[test_idx])
        yield np.sort(train_idx).astype(np.int64), np.sort(test_idx).astype(np.int64)


def assert_disjoint_patients(train_ids: Iterable[Any], test_ids: Iterable[Any]) -> None:
    """Raise :class:`PatientOverlapError`, naming some of them, if a patient id is in both sets."""
    overlap = sorted(set(train_ids) & set(test_ids), key=str)
    if overlap:
        shown = ", ".join(map(str, overlap[:10]))
        more = f" and {len(overlap) - 10} more" if len(overlap) > 10 else ""
        raise PatientOverlapError(
            f"{len(overlap)} patient(s) are in both the training and the test set: {shown}{more}; "
            f"split by patient (msk.core.data.splits.patient_split) so that no patient is seen in "
            f"training and evaluated in test"
        )


def _patients(patient_ids: Sequence[Any] | np.ndarray, labels: Sequence[Any] | np.ndarray):
    """``(pids per image, patients in first-seen order, each patient's majority label)``."""
    pids = np.asarray(list(patient_ids), dtype=object)
    labels = [str(v) for v in labels]
    if len(pids) != len(labels):
        raise ValueError(f"{len(pids)} patient ids but {len(labels)} labels")
    if not len(pids):
        raise ValueError("cannot split zero images")
    missing = [i for i, p in enumerate(pids) if p is None or (isinstance(p, str) and not p.strip())]
    if missing:
        raise ValueError(f"{len(missing)} image(s) have no patient id (first: image {missing[0]})")
    counts: dict[Any, Counter] = {}
    for p, label in zip(pids, labels):
        counts.setdefault(p, Counter())[label] += 1
    patients = list(counts)
    majority = [min(c, key=lambda lab: (-c[lab], lab)) for c in counts.values()]
    return pids, patients, majority


@dataclass
class CrossValidation:
    """A fixed test set and ``(train, val)`` image indices per fold; see :func:`plan_splits`."""

    test: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]]

    def parts(self, n: int) -> tuple[list[str], list[int | None]]:
        """Per image: ``"test"`` or ``"dev"``, and the fold it validates (``None`` for test)."""
        part: list[str] = ["dev"] * n
        fold: list[int | None] = [None] * n
        for i in self.test:
            part[i] = "test"
        for k, (_, val) in enumerate(self.folds, 1):
            for i in val:
                fold[i] = k
        return part, fold


def plan_from_parts(patient_ids: Sequence[str], parts: Sequence[tuple[str, int | None]],
                    folds: int) -> CrossValidation:
    """The :class:`CrossValidation` that ``parts`` (per image: ``"test"`` or ``"dev"``, and the
    fold it validates) describe, as an earlier run's ``splits.csv`` records them; each fold trains
    on the other folds' validation images. Raises :class:`TrainingDataError` when a fold or the test set
    is empty, a fold number is outside ``1..folds``, or a patient is in two parts."""
    if not any(part == "test" for part, _ in parts):
        raise TrainingDataError("the splits name no test image")
    numbers = {fold for part, fold in parts if part != "test"}
    if None in numbers or not numbers <= set(range(1, folds + 1)):
        raise TrainingDataError(f"the splits' validation folds are {sorted(numbers, key=str)}, not 1..{folds}")
    fold_of = np.array([0 if part == "test" else fold for part, fold in parts], dtype=np.int64)  # 0: test
    test = np.flatnonzero(fold_of == 0)
    pids = np.asarray(patient_ids, dtype=object)
    plan = []
    for k in range(1, folds + 1):
        val, train = np.flatnonzero(fold_of == k), np.flatnonzero((fold_of != 0) & (fold_of != k))
        if not len(val) or not len(train):
            raise TrainingDataError(f"fold {k} of the splits has no validation or no training image")
        for a, b in ((train, val), (train, test), (val, test)):
            assert_disjoint_patients(pids[a], pids[b])
        plan.append((train, val))
    return CrossValidation(test, plan)


def patients_per_class(patient_ids: Sequence[str], labels: Sequence[str]) -> dict[str, int]:
    members: dict[str, set[str]] = defaultdict(set)
    for p, label in zip(patient_ids, labels):
        members[label].add(p)
    return {label: len(p) for label, p in members.items()}


def _min_patients(folds: int, test_size: float) -> int:
    """Fewest patients for which a ``test_size`` test set leaves ``folds`` for the folds."""
    n = folds + 1
    while n - max(1, round(test_size * n)) < folds:
        n += 1
    return n


def plan_splits(patient_ids: Sequence[str], labels: Sequence[str], *, folds: int = 5,
                test_size: float = 0.2, seed: int = 0) -> CrossValidation:
    """Patient-level test set plus ``folds``-fold cross-validation over the other patients.

    :func:`msk.core.data.splits.patient_split` takes ``test_size`` of the patients, stratified by
    class, as the test set; :func:`msk.core.data.splits.patient_kfold` (stratified group k-fold)
    cuts the rest into ``folds`` validation folds, each fold training on the others. With the
    defaults that is 20 % test and, per fold, 64 % train and 16 % validation.
    """
    pids = np.asarray(patient_ids, dtype=object)
    labels = [str(v) for v in labels]
    n_patients = len(set(patient_ids))
    need = _min_patients(folds, test_size)
    if n_patients < need:
        raise TrainingDataError(f"{n_patients} patient(s) ({len(labels)} images) are too few for a "
                          f"{test_size:.0%} test set and {folds} folds: at least {need} are needed; "
                          "label more images or lower folds")
    dev, test = patient_split(pids, labels, test_size, seed=seed)
    dev_labels = [labels[i] for i in dev]
    plan = []
    for train, val in patient_kfold(pids[dev], dev_labels, folds, seed=seed):
        train, val = dev[train], dev[val]
        for a, b in ((train, val), (train, test), (val, test)):
            assert_disjoint_patients(pids[a], pids[b])
        plan.append((train, val))
    return CrossValidation(test, plan)
