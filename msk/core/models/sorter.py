"""A trained sorter as serving and evaluation use it: the fold ensemble of a run folder.

:func:`load_sorter` reads a finished ``msk train sorter`` run (``sorter.json`` and each
``fold-k/best.pt``) into a :class:`SorterEnsemble`, which predicts the mean of the fold models'
softmax outputs and says ``unknown`` below the calibrated threshold (:mod:`msk.core.models.ood`);
:func:`sort_answer` is the answer per image that ``msk sort`` prints and ``/v1/sort`` returns.
Training lives in :mod:`msk.core.stages.sorter.training`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msk.core.errors import MskError
from msk.core.io.paths import resolve_stored
from msk.core.models.metrics import softmax
from msk.core.models.ood import FEATURE_SCORES, UNKNOWN, FeatureDensity, UnknownCalibration, ood_score
from msk.core.models.train import load_model, predict_logits

__all__ = ["DENSITY_FILE", "SorterEnsemble", "SorterError", "load_densities", "load_sorter", "logits_and_features",
           "read_sorter_info", "sort_answer"]


class SorterError(MskError):
    """Sorter input that cannot be trained on, or a run folder that cannot be continued."""


@dataclass
class SorterEnsemble:
    """The fold models of a sorter run; predicts the mean of their softmax outputs.

    With ``unknown`` (the calibration of :mod:`msk.core.models.ood`), an image whose score is below
    its threshold is ``"unknown"``; without it (runs from before calibration, a single
    checkpoint) every image is known, as before.
    """

    models: list
    classes: list[str]
    image_size: int
    unknown: UnknownCalibration | None = None
    densities: list[FeatureDensity] | None = None  # per fold model, for feature scores

    @property
    def threshold(self) -> float | None:
        """The calibrated threshold (None: never unknown)."""
        return None if self.unknown is None else self.unknown.threshold

    @property
    def score_name(self) -> str:
        """The score the threshold applies to (``msp`` when uncalibrated)."""
        return "msp" if self.unknown is None else self.unknown.score

    def fold_logits(self, images: np.ndarray) -> np.ndarray:
        """``float32 [folds, N, C]``: each fold model's logits."""
        return np.stack([predict_logits(m, images, image_size=self.image_size)
                         for m in self.models]).astype(np.float32)

    def fold_outputs(self, images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """``(logits [folds, N, C], features)``: features (per fold ``[N, D]``) only when the
        score needs them, else None; one forward pass per fold model."""
        if self.score_name not in FEATURE_SCORES:
            return self.fold_logits(images), None
        pairs = [logits_and_features(m, images, self.image_size) for m in self.models]
        return np.stack([p[0] for p in pairs]).astype(np.float32), [p[1] for p in pairs]

    def fold_probabilities(self, images: np.ndarray) -> np.ndarray:
        """``float32 [folds, N, C]``: each fold model's class probabilities."""
        return softmax(self.fold_logits(images)).astype(np.float32)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """``float32 [N, C]``: the ensemble's class probabilities (columns: :attr:`classes`)."""
        return self.fold_probabilities(images).mean(axis=0)

    def scores_of(self, fold_logits: np.ndarray,
                  fold_features: list[np.ndarray] | None = None) -> np.ndarray:
        """``float64 [N]``: the score (:attr:`score_name`) of :meth:`fold_outputs`' output."""
        return ood_score(fold_logits, self.score_name, fold_features=fold_features,
                         densities=self.densities)

    def known(self, scores: np.ndarray) -> np.ndarray:
        """``bool [N]``: scores at or above the threshold (all True without one)."""
        scores = np.asarray(scores)
        return np.ones(len(scores), bool) if self.unknown is None else self.unknown.known(scores)

    def predict_scores(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(probabilities [N, C], scores [N])`` from one forward pass of every fold model."""
        logits, features = self.fold_outputs(images)
        return softmax(logits).mean(axis=0).astype(np.float32), self.scores_of(logits, features)

    def is_known(self, images: np.ndarray) -> np.ndarray:
        """``bool [N]``: which images score at or above the threshold."""
        return self.known(self.predict_scores(images)[1])

    def predict(self, images: np.ndarray) -> list[str]:
        """The most probable region of each image, or ``"unknown"`` below the threshold."""
        probs, scores = self.predict_scores(images)
        return [self.classes[i] if ok else UNKNOWN
                for i, ok in zip(probs.argmax(axis=1), self.known(scores))]


def logits_and_features(model, images: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(logits [N, C], features [N, D])`` of a classifier: the features are what its linear
    head is given (captured by a hook), through exactly :func:`predict_logits`' input path."""
    captured: list = []
    hook = model.head.register_forward_hook(
        lambda _module, inputs, _output: captured.append(inputs[0].detach().float().cpu()))
    try:
        logits = predict_logits(model, images, image_size=image_size)
    finally:
        hook.remove()
    features = (np.concatenate([c.numpy() for c in captured]) if captured
                else np.zeros((0, 0), np.float32))
    return logits, features


DENSITY_FILE = "ood_density.npz"


def load_densities(out: str | os.PathLike, folds: int, unknown: UnknownCalibration | None):
    """The per-fold :class:`FeatureDensity` files a feature score needs (None otherwise)."""
    if unknown is None or unknown.score not in FEATURE_SCORES:
        return None
    paths = [Path(out) / f"fold-{k}" / DENSITY_FILE for k in range(1, folds + 1)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SorterError(f"{out}: the {unknown.score} score needs {', '.join(missing)}; rerun "
                          "`msk train sorter` on the run folder to calibrate it again")
    return [FeatureDensity.load(p) for p in paths]


def read_sorter_info(out: str | os.PathLike) -> dict[str, Any]:
    """``out/sorter.json`` of a finished run, with ``"unknown"`` parsed to an
    :class:`UnknownCalibration` (None for a run from before calibration)."""
    out = Path(out)
    summary = out / "sorter.json"
    if not summary.is_file():
        raise SorterError(f"{out} holds no finished sorter run (no sorter.json); run "
                          "`msk train sorter` first")
    try:
        info = json.loads(summary.read_text())
        int(info["folds"]), list(info["classes"]), int(info["image_size"])
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise SorterError(f"{summary} is unreadable ({exc!r}); rerun `msk train sorter`") from None
    raw = info.get("unknown")
    info["unknown"] = None if raw is None else UnknownCalibration.from_json(raw, str(summary))
    if isinstance(info.get("ingest"), dict) and info["ingest"].get("path"):  # stored relative to the run
        info["ingest"]["path"] = str(resolve_stored(info["ingest"]["path"], out))
    return info


def load_sorter(out: str | os.PathLike) -> SorterEnsemble:
    """The fold models (``out/fold-k/best.pt``), classes and ``unknown`` threshold of a
    finished sorter run."""
    out = Path(out)
    info = read_sorter_info(out)
    models = [load_model(out / f"fold-{k}" / "best.pt")[0] for k in range(1, info["folds"] + 1)]
    densities = load_densities(out, int(info["folds"]), info["unknown"])
    return SorterEnsemble(models, list(info["classes"]), int(info["image_size"]), info["unknown"],
                          densities)


def sort_answer(probabilities: np.ndarray, score: float, ensemble, k: int) -> dict[str, Any]:
    """One image's answer: ``regions`` (the ``k`` most probable, most probable first, as
    ``{name, probability}``), ``unknown``, ``score`` (named ``score_name``) and ``threshold``
    (None when the sorter has no calibration: never unknown)."""
    order = np.argsort(-np.asarray(probabilities), kind="stable")[:min(k, len(ensemble.classes))]
    known = bool(ensemble.known(np.array([score]))[0])
    return {"regions": [{"name": ensemble.classes[i], "probability": float(probabilities[i])}
                        for i in order],
            "unknown": not known, "score": float(score), "score_name": ensemble.score_name,
            "threshold": ensemble.threshold}
