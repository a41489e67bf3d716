"""``/v1/sort``: the anatomical sorter as a Ray Serve deployment (top-k regions, Grad-CAM).

The model is what ``msk train sorter`` wrote: a run folder (``sorter.json`` + ``fold-k/best.pt``)
is served as its fold ensemble (mean of the fold models' softmax, as the sorter evaluates it:
:class:`msk.core.models.sorter.SorterEnsemble`); a single classifier checkpoint is served alone, with
its class names from the config, the checkpoint (``extra["classes"]``) or, for 28 outputs, the
``samx-regions`` entity set.

A run folder's ``sorter.json`` also holds the calibrated ``unknown`` threshold
(:mod:`msk.core.models.ood`): every answer says whether the image scored below it (``unknown``), with
its score and the threshold. A single checkpoint and a run from before calibration have no
threshold and never answer ``unknown``.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from msk.core.errors import ConfigError
from msk.serve.config import SortConfig
from msk.serve.replica import ModelReplica, gradcam_png

__all__ = ["SorterDeployment", "inspect_sorter", "load_sorter_model"]

REGION_SET = "samx-regions"


def _classes_of(checkpoint: Path, num_classes: int, configured: list[str] | None,
                saved: list[str] | None) -> list[str]:
    from msk.core.registry import entity_set

    classes = configured or saved
    if classes is None:
        regions = entity_set(REGION_SET).names
        if len(regions) != num_classes:
            raise ConfigError(f"sorter.checkpoint {checkpoint}: {num_classes} outputs and no class names; "
                              f"list them in sorter.classes (in output order)")
        classes = regions
    if len(classes) != num_classes:
        raise ConfigError(f"sorter: {checkpoint} has {num_classes} outputs but {len(classes)} class names are given")
    return [str(c) for c in classes]


def inspect_sorter(config: SortConfig) -> dict[str, Any]:
    """The sorter's class names, input size, checkpoint files and ``unknown`` calibration
    (None without one), checked without building it.

    Raises :class:`ConfigError` naming the file for anything that would fail in a replica.
    """
    from msk.core.io.checkpoint import CheckpointError, load_checkpoint

    path = Path(config.checkpoint)
    if path.is_dir():
        summary = path / "sorter.json"
        if not summary.is_file():
            raise ConfigError(f"sorter.checkpoint: {path} is a folder without sorter.json (not a finished "
                              "`msk train sorter` run); name a run folder or a .pt checkpoint")
        from msk.core.errors import MskError
        from msk.core.models.ood import FEATURE_SCORES
        from msk.core.models.sorter import DENSITY_FILE, read_sorter_info

        try:
            info = read_sorter_info(path)  # the one reader of sorter.json
        except MskError as exc:
            raise ConfigError(f"sorter.checkpoint: {exc}") from None
        folds, classes, image_size = int(info["folds"]), list(info["classes"]), int(info["image_size"])
        unknown = info["unknown"]
        files = [path / f"fold-{k}" / "best.pt" for k in range(1, folds + 1)]
        if unknown is not None and unknown.score in FEATURE_SCORES:  # per-fold feature densities
            files_needed = files + [path / f"fold-{k}" / DENSITY_FILE for k in range(1, folds + 1)]
        else:
            files_needed = files
        missing = [str(f) for f in files_needed if not f.is_file()]
        if missing:
            raise ConfigError(f"sorter.checkpoint: the run {path} lacks {', '.join(missing)}")
        if config.classes is not None and list(config.classes) != classes:
            raise ConfigError(f"sorter.classes contradicts {summary} ({classes}); leave it out for a run folder")
        return {"classes": classes, "image_size": image_size, "checkpoints": files, "unknown": unknown}
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        raise ConfigError(f"sorter.checkpoint: {exc}") from None
    if "head" not in ckpt.extra or "image_size" not in ckpt.config:
        raise ConfigError(f"sorter.checkpoint: {path} is not a trained classifier (no head or image_size); "
                          "a DeepCluster encoder must be fine-tuned first (`msk train sorter`)")
    classes = _classes_of(path, int(ckpt.extra["num_classes"]), config.classes, ckpt.extra.get("classes"))
    return {"classes": classes, "image_size": int(ckpt.config["image_size"]), "checkpoints": [path],
            "unknown": None}


def load_sorter_model(config: SortConfig):
    """The :class:`~msk.core.models.sorter.SorterEnsemble` the config names (CPU, eval mode)."""
    from msk.core.models.sorter import SorterEnsemble
    from msk.core.models.train import load_model

    info = inspect_sorter(config)
    models = [load_model(path)[0] for path in info["checkpoints"]]
    densities = None
    if info["unknown"] is not None:  # a run folder (checked above): a feature score's densities
        from msk.core.models.sorter import load_densities

        densities = load_densities(Path(config.checkpoint), len(models), info["unknown"])
    return SorterEnsemble(models, info["classes"], info["image_size"], info["unknown"], densities)


@serve.deployment(name="sorter")
class SorterDeployment(ModelReplica):
    """One replica of the sorter; concurrent requests share forward passes (``@serve.batch``)."""

    batched = "_probabilities"

    def __init__(self, config: dict[str, Any], debug: bool = False):
        self.config = SortConfig.model_validate(config)
        self.ensemble = load_sorter_model(self.config)
        self.configure(self.config, debug=debug)
        self.ensemble.models = [m.to(self.device) for m in self.ensemble.models]
        self.lock = threading.Lock()  # Grad-CAM hooks must not see another request's forward pass

    def _predict(self, images: np.ndarray) -> list[tuple[np.ndarray, float]]:
        with self.lock:
            probs, scores = self.ensemble.predict_scores(images)
        return list(zip(probs, scores.tolist()))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _probabilities(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        return await asyncio.to_thread(self._predict, np.stack(images))

    def _gradcam(self, image: np.ndarray, target: int) -> str:
        from msk.core.models.gradcam import mean_cam

        with self.lock:
            cam = mean_cam(self.ensemble.models, image[None], [target], image_size=self.ensemble.image_size)[0]
        return gradcam_png(image, cam)

    async def sort(self, image: np.ndarray, k: int | None = None, gradcam: bool = False) -> dict[str, Any]:
        """The ``k`` most probable regions of a square ``uint8`` image, most probable first, and
        whether it scores below the ``unknown`` threshold (:func:`msk.core.models.sorter.sort_answer`)."""
        from msk.core.models.sorter import sort_answer

        probs, score = await self._probabilities(image)
        result = sort_answer(probs, score, self.ensemble, k or self.config.top_k)
        if gradcam:
            top = self.ensemble.classes.index(result["regions"][0]["name"])
            result["gradcam_png"] = await asyncio.to_thread(self._gradcam, image, top)
        return result

    async def describe(self) -> dict[str, Any]:
        return {"classes": list(self.ensemble.classes), "image_size": self.ensemble.image_size,
                "models": len(self.ensemble.models), "top_k": self.config.top_k,
                "unknown": None if self.ensemble.unknown is None else self.ensemble.unknown.to_json()}
