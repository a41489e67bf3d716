"""``/v1/segment``: the lesion segmenter as a Ray Serve deployment, and the lesion box of box-less
``/v1/classify`` and ``/v1/recommend`` requests.

The model is what ``msk train segmenter`` wrote: a run folder (``segmenter.json`` +
``fold-k/best.pt``), served as its fold ensemble (:class:`msk.core.models.segmenter.SegmenterEnsemble`:
mean lesion probability of the fold models, thresholded). The lesion is the largest connected
region above the threshold (:func:`msk.core.models.segmenter.lesion_mask`); an image where no pixel
reaches it is refused (422 ``no_lesion_found``, with the threshold), never answered with an empty
mask or a crop of nothing. Boxes and masks leave the replica in the square image's pixels; the
gateway maps them onto the uploaded image.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from msk.core.errors import ConfigError
from msk.serve.config import SegmentConfig
from msk.serve.replica import ModelReplica, Rejection

if TYPE_CHECKING:
    from torch import nn

__all__ = ["SegmenterDeployment", "inspect_segmenter"]


def inspect_segmenter(config: SegmentConfig) -> dict[str, Any]:
    """The segmenter run's description (architecture, input size, threshold, fold checkpoints),
    checked without loading the models. Raises :class:`ConfigError` naming the file."""
    from msk.core.models.segmenter import INFO_FILE, SegmentationError, read_segmenter_info

    run = Path(config.run)
    if not (run / INFO_FILE).is_file():
        raise ConfigError(
            f"segmenter.run: {run} is not a finished `msk train segmenter` run (no {INFO_FILE})")
    try:
        info = read_segmenter_info(run)  # the one reader of segmenter.json
    except SegmentationError as exc:
        raise ConfigError(f"segmenter.run: {exc}") from None
    folds = [run / f"fold-{int(f['fold'])}" / "best.pt" for f in info["folds"]]
    threshold = float(config.threshold if config.threshold is not None else info["threshold"])
    missing = [str(p) for p in folds if not p.is_file()]
    if not folds or missing:
        raise ConfigError(f"segmenter.run: {run} lacks its fold models ({', '.join(missing) or 'none listed'}); "
                          "rerun `msk train segmenter` on it to finish")
    return {"segmenter": info.get("segmenter"), "encoder": info.get("encoder"), "image_size": info.get("image_size"),
            "threshold": threshold, "folds": len(folds), "checkpoints": folds}


@serve.deployment(name="segmenter")
class SegmenterDeployment(ModelReplica):
    """One replica: the fold ensemble, with concurrent requests sharing forward passes."""

    batched = "_probabilities"

    def __init__(self, config: dict[str, Any], debug: bool = False):
        from msk.core.models.segmenter import SegmenterEnsemble, load_segmenter

        self.config = SegmentConfig.model_validate(config)
        self.info = inspect_segmenter(self.config)
        self.configure(self.config, debug=debug)
        models: list[nn.Module] = [load_segmenter(p).to(self.device) for p in self.info["checkpoints"]]
        self.ensemble = SegmenterEnsemble(models, self.info["threshold"], {})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _probabilities(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return list(await asyncio.to_thread(self.ensemble.probabilities, np.stack(images)))

    async def segment(self, pixels: np.ndarray) -> dict[str, Any] | Rejection:
        """The lesion of a square ``uint8`` image: ``mask`` (``bool``, the image's size), its tight
        ``box`` ``(x0, y0, x1, y1)`` (exclusive ends) and the ``threshold``; or 422 ``no_lesion_found``."""
        from msk.core.data.roi import mask_box
        from msk.core.models.segmenter import NoLesionFound, lesion_mask

        probabilities = await self._probabilities(pixels)
        try:
            mask = lesion_mask(probabilities, self.ensemble.threshold, where="the image")
        except NoLesionFound as exc:
            return Rejection(422, "no_lesion_found", str(exc))
        return {"mask": mask, "box": [float(v) for v in mask_box(mask)], "threshold": self.ensemble.threshold}

    async def describe(self) -> dict[str, Any]:
        return {key: self.info[key] for key in ("segmenter", "encoder", "image_size", "threshold", "folds")}
