"""A trained lesion segmenter as serving, ``msk segment`` and evaluation use it.

:class:`SegmentationModel` wraps a registered segmenter (``msk_segmenters`` hook: U-Net, U-Net++)
for msk's training loop; :func:`load_ensemble` reads a finished ``msk train segmenter`` run
(``segmenter.json`` and each ``fold-k/best.pt``) into a :class:`SegmenterEnsemble` (the mean
lesion probability of the fold models, thresholded); :func:`lesion_mask` keeps the largest
region above the threshold and raises :class:`NoLesionFound` where there is none;
:func:`predicted_rois` turns the masks into the region-of-interest crops the classifiers take.
Training lives in :mod:`msk.core.stages.segmentation.training`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from msk.core.errors import MskError

__all__ = ["INFO_FILE", "MaskPairs", "NoLesionFound", "SegmentationError", "SegmentationModel", "SegmenterEnsemble",
           "lesion_mask", "load_ensemble", "load_segmenter", "predict_probabilities", "predicted_rois",
           "read_segmenter_info", "segmentation_model"]


INFO_FILE = "segmenter.json"


class SegmentationError(MskError):
    """Segmentation input that cannot be used, or a run folder that cannot be continued."""


class SegmentationModel(nn.Module):
    """A registered segmenter shaped for :func:`msk.core.models.train.fit`: ``encoder`` is the whole
    network (saved as the checkpoint's weights), ``head`` is empty."""

    sobel = False
    num_classes = 1

    def __init__(self, segmenter: str, encoder: str, options: dict[str, Any] | None = None):
        super().__init__()
        from msk.core.registry import build_segmenter

        options = dict(options or {})
        self.encoder = build_segmenter(segmenter, in_chans=1, encoder=encoder, **options)
        self.encoder_name = f"{segmenter}:{encoder}"
        self.head = nn.Identity()
        self.architecture = {"segmenter": segmenter, "encoder": encoder, "options": options}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)


def segmentation_model(segmenter: str, encoder: str, options: dict[str, Any]) -> SegmentationModel:
    return SegmentationModel(segmenter, encoder, options)


def load_segmenter(path: str | os.PathLike) -> SegmentationModel:
    """A trained segmenter from its checkpoint (CPU, eval mode), with its ``input_config``."""
    from msk.core.io.checkpoint import CheckpointError, load_checkpoint
    from msk.core.models.train import load_model

    arch = load_checkpoint(path).extra.get("architecture")
    if not isinstance(arch, dict) or "segmenter" not in arch:
        raise CheckpointError(f"{path} is not a segmenter checkpoint (no extra.architecture.segmenter); "
                              "give a best.pt of `msk train segmenter`")
    build = functools.partial(segmentation_model, arch["segmenter"], arch["encoder"], dict(arch.get("options") or {}))
    model, _ = load_model(path, build)
    return model


class MaskPairs(Dataset):
    """``((image,), mask)`` items for :func:`msk.core.models.train.fit`: image as the classifiers see it
    (``[1, S, S]``, preprocessed and normalised), mask ``float32 [1, S, S]`` in {0, 1}. With
    ``augment``, a share ``aug_prob`` of the items gets the same random flip and affine
    transform on image and mask (nearest-neighbour for the mask)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, meta, image_size: int, augment: bool,
                 aug_prob: float, seed: int, *, preprocess=None, augmentation=None):
        from torchvision.transforms import v2

        from msk.core.data.augment import eval_transform

        self.images, self.masks, self.image_size = images, masks, image_size
        self.plain = eval_transform(image_size, preprocess) if preprocess is not None else eval_transform(image_size)
        self.geometric = v2.Compose([
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1)),
        ]) if augment else None
        self.aug_prob = aug_prob
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        from msk.core.data.augment import to_tensor

        image = to_tensor(self.images[i])
        mask = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(self.masks[i] > 0))[None].to(torch.uint8))
        if self.geometric is not None and self.rng.random() < self.aug_prob:
            image, mask = self.geometric(image, mask)
        if mask.shape[-1] != self.image_size or mask.shape[-2] != self.image_size:
            mask = F.resize(mask, [self.image_size, self.image_size])  # nearest for masks
        return (self.plain(image),), mask.as_subclass(torch.Tensor).float()


def predict_probabilities(models: list[nn.Module], images: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """Mean lesion probability ``float32 [N, S, S]`` of ``models`` on ``uint8 [N, S, S]`` images
    (each model's input size and preprocessing, probabilities resized back to ``S``)."""
    from torch.nn import functional as F

    total = np.zeros(images.shape, np.float32)
    for model in models:
        known = getattr(model, "input_config", None)  # image size and preprocessing as trained
        size = known.image_size if known is not None else images.shape[1]
        data = MaskPairs(images, np.zeros(images.shape, np.uint8), None, size, False, 0.0, 0,
                         preprocess=known.preprocess if known is not None else None)
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = torch.stack([data[i][0][0] for i in range(start, min(start + batch_size, len(images)))])
                p = torch.sigmoid(model(x.to(device))).float().cpu()
                if p.shape[-1] != images.shape[-1]:
                    p = F.interpolate(p, size=images.shape[1:], mode="bilinear", align_corners=False)
                total[start:start + len(x)] += p[:, 0].numpy()
    return total / max(len(models), 1)


@dataclass
class SegmenterEnsemble:
    """The fold models of a segmenter run: mean probability, thresholded at ``threshold``."""

    models: list[nn.Module]
    threshold: float
    info: dict[str, Any]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return predict_probabilities(self.models, images)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """``bool [N, S, S]`` lesion masks."""
        return self.probabilities(images) >= self.threshold


def read_segmenter_info(run: str | os.PathLike) -> dict[str, Any]:
    """``RUN/segmenter.json`` of a finished ``msk train segmenter`` run, checked (image size,
    threshold, fold numbers): the one reader of it. :class:`SegmentationError` names the file."""
    run = Path(run)
    path = run / INFO_FILE
    try:
        info = json.loads(path.read_text())
        int(info["image_size"]), float(info["threshold"]), [int(f["fold"]) for f in info["folds"]]
    except FileNotFoundError:
        raise SegmentationError(f"{path}: not found; is {run} a finished `msk train segmenter` run?") from None
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise SegmentationError(f"{path} is unreadable ({exc!r}); rerun `msk train segmenter` on {run}") from None
    return info


def load_ensemble(run: str | os.PathLike) -> SegmenterEnsemble:
    """The fold models (``fold-k/best.pt``) of a ``msk train segmenter`` run."""
    run = Path(run)
    info = read_segmenter_info(run)
    models: list[nn.Module] = [load_segmenter(run / f"fold-{f['fold']}" / "best.pt") for f in info["folds"]]
    return SegmenterEnsemble(models, float(info["threshold"]), info)


class NoLesionFound(SegmentationError):
    """The segmenter marks no pixel at its threshold (the serving layer answers 422
    ``no_lesion_found`` with :attr:`threshold`)."""

    def __init__(self, message: str, threshold: float):
        super().__init__(message)
        self.threshold = threshold


def lesion_mask(probabilities: np.ndarray, threshold: float, *, where: str = "image") -> np.ndarray:
    """The predicted lesion: the largest connected region (8-neighbourhood) of pixels at or above
    ``threshold`` in ``float [H, W]`` probabilities, so that a stray false-positive speck does not
    stretch the region of interest. Raises :class:`NoLesionFound` when no pixel reaches it."""
    from scipy.ndimage import label

    above = np.asarray(probabilities) >= threshold
    regions, count = label(above, structure=np.ones((3, 3), bool))
    if count == 0:
        peak = float(np.max(probabilities)) if np.size(probabilities) else 0.0
        raise NoLesionFound(f"{where}: no lesion found: no pixel reaches the segmenter's threshold {threshold:g} "
                            f"(highest lesion probability {peak:.3g})", threshold)
    sizes = np.bincount(regions.ravel())[1:]
    return regions == int(np.argmax(sizes)) + 1


def predicted_rois(ensemble: SegmenterEnsemble, images: np.ndarray, *, size: int = 224, margin: float = 0.15,
                   ids: list[str] | None = None) -> tuple[np.ndarray, list[tuple[int, int, int, int]], np.ndarray]:
    """Segment ``uint8 [N, S, S]`` images and crop each one's region of interest the fusion way:
    the predicted lesion's bounding box plus ``margin`` on each side, square, resized to ``size``
    grey (:func:`msk.core.data.roi.lesion_crop`, the crop of every msk model).

    :return: ``(crops uint8 [N, size, size], boxes (x0, y0, x1, y1) of the square crops in the
        images' pixels, masks bool [N, S, S])``. An image without a lesion raises
        :class:`NoLesionFound` naming it (``ids[i]`` or its index) and the threshold; never an
        empty crop.
    """
    from msk.core.data.roi import lesion_crop, roi_box

    probabilities = ensemble.probabilities(images)
    masks = np.zeros(images.shape, bool)
    crops = np.zeros((len(images), size, size), np.uint8)
    boxes = []
    for i, p in enumerate(probabilities):
        masks[i] = lesion_mask(p, ensemble.threshold, where=ids[i] if ids else f"image {i}")
        boxes.append(roi_box(masks[i], margin=margin))
        crops[i] = lesion_crop(images[i], masks[i], size, margin=margin)
    return crops, boxes, masks
