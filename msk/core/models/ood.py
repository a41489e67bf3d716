"""Unknown inputs: does an image look like the images a sorter was trained on?

A sorter always names one of its regions, whatever it is shown: a CT slice, an ultrasound
frame or a holiday photo comes back as "femur, 0.61". This module gives the sorter a way to
say ``unknown`` instead:

* a **score** per image from the fold models' logits ``[folds, N, C]`` (higher: more like the
  training images), :func:`ood_score`:

  - ``msp``: the maximum softmax probability of the ensemble (mean of the fold models'
    softmax outputs), Hendrycks & Gimpel 2017;
  - ``energy``: the negative free energy ``logsumexp(logits)``, averaged over the fold
    models, Liu et al. 2020 (temperature 1);
  - ``mahalanobis``: minus the smallest Mahalanobis distance from the image's encoder
    features (what the linear head sees) to a class mean, under one shared covariance
    (Ledoit-Wolf shrinkage) fitted on each fold model's training images (Lee et al. 2018;
    :class:`FeatureDensity`), averaged over the fold models;

* a **threshold** calibrated on in-distribution images the models did not train on
  (:func:`calibrate`): each fold model scores its own validation fold (out-of-fold, so no
  image scores itself), and the threshold is the quantile that keeps ``keep`` (default 95 %)
  of those images. :class:`UnknownCalibration` records it; ``msk train sorter`` writes it to
  ``sorter.json`` under ``"unknown"``.

An image scored below the threshold is ``unknown`` (:data:`UNKNOWN`). The calibration sees
only in-distribution images: nothing is tuned on the kinds of input it should refuse. Which
score separates real radiographs from other images better was measured with ``bench/ood.py``
(``docs/sorter.md``, "Unknown inputs").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msk.core.errors import MskError

__all__ = ["FEATURE_SCORES", "OOD_SCORES", "UNKNOWN", "FeatureDensity", "UnknownCalibration",
           "calibrate", "calibrate_threshold", "ood_score"]

#: The scores :func:`ood_score` knows.
OOD_SCORES = ("msp", "energy", "mahalanobis")

#: Scores computed on encoder features (they need a :class:`FeatureDensity` per fold model).
FEATURE_SCORES = frozenset({"mahalanobis"})

#: What a sorter answers for an image scored below its threshold.
UNKNOWN = "unknown"


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    top = z.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis=-1, keepdims=True)))[..., 0]


@dataclass(frozen=True)
class FeatureDensity:
    """Class means and a shared precision matrix of one fold model's training features."""

    means: np.ndarray  # [C, D]
    precision: np.ndarray  # [D, D]

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray) -> FeatureDensity:
        """Fit on ``features [N, D]`` of training images with class indices ``labels [N]``."""
        from sklearn.covariance import LedoitWolf

        features = np.asarray(features, np.float64)
        labels = np.asarray(labels)
        classes = np.unique(labels)
        means = np.stack([features[labels == c].mean(axis=0) for c in classes])
        centred = features - means[np.searchsorted(classes, labels)]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        return cls(means.astype(np.float32), precision.astype(np.float32))

    def score(self, features: np.ndarray) -> np.ndarray:
        """``float64 [N]``: minus the squared Mahalanobis distance to the nearest class mean."""
        f = np.asarray(features, np.float64)
        precision = self.precision.astype(np.float64)
        nearest = np.full(len(f), np.inf)
        for mean in self.means.astype(np.float64):  # one class at a time: memory [N, D]
            d = f - mean
            nearest = np.minimum(nearest, np.einsum("nd,de,ne->n", d, precision, d))
        return -nearest

    def save(self, path: str | os.PathLike) -> Path:
        np.savez_compressed(path, means=self.means, precision=self.precision)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureDensity:
        with np.load(path) as saved:
            return cls(saved["means"], saved["precision"])


def ood_score(fold_logits: np.ndarray | None, score: str = "msp", *,
              fold_features: Sequence[np.ndarray] | None = None,
              densities: Sequence[FeatureDensity] | None = None) -> np.ndarray:
    """``float64 [N]``: how much each image looks like the training images (higher: more).

    :param fold_logits: ``[folds, N, C]`` logits of the fold models (``[N, C]`` for one model);
        ``None`` for ``mahalanobis``, which reads only the features.
    :param score: ``msp`` (max of the mean softmax), ``energy`` (mean ``logsumexp``) or
        ``mahalanobis`` (mean over the fold models of :meth:`FeatureDensity.score`).
    :param fold_features: ``mahalanobis`` only: per fold model, the features ``[N, D]``.
    :param densities: ``mahalanobis`` only: per fold model, its :class:`FeatureDensity`.
    """
    if score == "mahalanobis":
        if fold_features is None or densities is None or len(fold_features) != len(densities):
            raise ValueError("the mahalanobis score needs the features and density of every fold model")
        return np.mean([d.score(f) for d, f in zip(densities, fold_features)], axis=0)
    if fold_logits is None:
        raise ValueError(f"the {score} score needs the fold models' logits")
    logits = np.asarray(fold_logits, np.float64)
    if logits.ndim == 2:
        logits = logits[None]
    if logits.ndim != 3:
        raise ValueError(f"expected logits [folds, N, C]; got shape {logits.shape}")
    if score == "msp":
        probs = np.exp(logits - _logsumexp(logits)[..., None])
        return probs.mean(axis=0).max(axis=-1)
    if score == "energy":
        return _logsumexp(logits).mean(axis=0)
    raise ValueError(f"unknown score {score!r}; choose one of {', '.join(OOD_SCORES)}")


def calibrate_threshold(scores: np.ndarray, keep: float) -> float:
    """The largest threshold that keeps at least ``keep`` of ``scores`` (``score >= threshold``)."""
    scores = np.asarray(scores, np.float64)
    if not len(scores):
        raise ValueError("no scores to calibrate on")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must lie in (0, 1]; got {keep}")
    return float(np.quantile(scores, 1 - keep, method="lower"))


@dataclass(frozen=True)
class UnknownCalibration:
    """How a sorter tells ``unknown`` inputs: score name, threshold and what it was fitted on.

    :param score: ``msp`` or ``energy`` (:func:`ood_score`).
    :param threshold: images scored below it are ``unknown``.
    :param keep: the share of calibration images the threshold was chosen to keep.
    :param n_images: number of calibration images (out-of-fold validation images).
    :param kept: the share of them actually scored at or above the threshold (ties: >= keep).
    """

    score: str
    threshold: float
    keep: float
    n_images: int
    kept: float

    def known(self, scores: np.ndarray) -> np.ndarray:
        """``bool [N]``: which scores are at or above the threshold."""
        return np.asarray(scores) >= self.threshold

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, info: dict[str, Any], where: str) -> UnknownCalibration:
        """Read what :meth:`to_json` wrote; ``where`` names the file in the error."""
        try:
            calibration = cls(str(info["score"]), float(info["threshold"]), float(info["keep"]),
                              int(info["n_images"]), float(info["kept"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MskError(f"{where}: the 'unknown' calibration is unreadable ({exc!r}); rerun "
                           "`msk train sorter` on the run folder to calibrate it again") from None
        if calibration.score not in OOD_SCORES or not np.isfinite(calibration.threshold):
            raise MskError(f"{where}: the 'unknown' calibration names score {calibration.score!r} "
                           f"with threshold {calibration.threshold}; expected one of "
                           f"{', '.join(OOD_SCORES)} and a finite threshold")
        return calibration


def calibrate(val_logits: Sequence[np.ndarray], *, score: str = "msp", keep: float = 0.95,
              val_features: Sequence[np.ndarray] | None = None,
              densities: Sequence[FeatureDensity] | None = None) -> UnknownCalibration:
    """Fit the threshold on out-of-fold validation logits (and features).

    :param val_logits: per fold, ``[n_k, C]`` logits of fold model ``k`` on its own validation
        images (no model scores an image it trained on).
    :param score: see :func:`ood_score`; each image is scored by its one fold model.
    :param keep: share of these images to keep (``score >= threshold``).
    :param val_features: ``mahalanobis``: per fold, ``[n_k, D]`` features of the same images.
    :param densities: ``mahalanobis``: per fold, the :class:`FeatureDensity` of fold model
        ``k`` (fitted on its training images).
    """
    if score in FEATURE_SCORES:
        if val_features is None or densities is None:
            raise ValueError(f"the {score} score needs val_features and densities")
        scores = np.concatenate([ood_score(None, score, fold_features=[f], densities=[d])
                                 for f, d in zip(val_features, densities)])
    else:
        scores = np.concatenate([ood_score(np.asarray(v)[None], score) for v in val_logits])
    threshold = calibrate_threshold(scores, keep)
    return UnknownCalibration(score, threshold, float(keep), int(len(scores)),
                              round(float((scores >= threshold).mean()), 4))
