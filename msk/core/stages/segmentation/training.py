"""Lesion segmentation: a registered segmenter (U-Net, U-Net++) trained on lesion masks,
cross-validated by patient, and evaluated by IoU and Dice.

* **data** (:func:`load_segmentation_data`): the images of an ingest output with a mask each,
  from a masks table ``image_id,mask_path[,label]`` (:mod:`msk.core.io.masks`; PNG masks or LabelMe
  JSON) or from a synthetic export's ``ground_truth.csv`` (its ``mask`` column, label = entity).
  Masks are in source-image pixels and are mapped into the ingest's square images exactly as
  :func:`msk.core.data.squaring.square_image` mapped the image (:func:`msk.core.io.masks.mask_to_square`);
* **splits**: :func:`msk.core.data.splits.plan_splits`: a fixed, patient-level test set
  (``test_size``) and ``folds``-fold patient-level cross-validation over the other patients,
  stratified by label (entity);
* **training** (:func:`train_segmenter`): one :func:`msk.core.models.train.fit` run per fold in
  ``out/fold-k/``, the training loop of every msk model (in this process or on Ray Train
  workers, a checkpoint per epoch, resume, early stopping on the validation loss), with the
  loss ``BCE + Dice`` on the lesion logit; the history's ``val_accuracy`` is the mean Dice at
  ``threshold``. A rerun skips finished folds and resumes an interrupted one;
* **prediction** (:class:`SegmenterEnsemble`): the mean lesion probability of the fold models,
  thresholded; **evaluation** in :mod:`msk.core.stages.segmentation.evaluation`;
* **region of interest** (:func:`predicted_rois`): the largest predicted lesion region -> its
  bounding box + 15 %, square -> a grey crop, the ROI the classifiers and the recommender take;
  no lesion at the threshold is a :class:`NoLesionFound` error that names the threshold.

A segmenter checkpoint is an msk checkpoint whose ``arch`` is ``<segmenter>:<encoder>``
(``unet:resnet34``) and whose ``extra["architecture"]`` says how to rebuild it. See
``docs/segmentation.md``.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from msk.core.models.metrics import overlap_scores
from msk.core.models.segmenter import INFO_FILE, MaskPairs, SegmentationError, predict_probabilities, segmentation_model
from msk.core.models.train import TrainConfig

__all__ = ["DiceBCELoss", "SegmentationData", "SegmenterConfig", "dice_hits", "load_segmentation_data",
           "train_segmenter"]

SPLITS_FILE = "splits.csv"
CONFIG_FILE = "segmenter.yaml"
NO_LABEL = "lesion"


class SegmenterConfig(TrainConfig):
    """Options of ``msk train segmenter``: the training options of :class:`TrainConfig` (``encoder``
    is the segmenter's encoder: an smp name such as ``resnet34`` or ``tu-<timm name>``) plus the
    segmenter and the evaluation design. ``augment`` flips, rotates (10 degrees), shifts and
    scales image and mask together (the classifiers' ``augmentation`` options do not apply)."""

    segmenter: str = Field("unet", description="segmenter registry name (`msk plugins segmenter`)")
    encoder: str = Field("resnet34", description="encoder of the segmenter: smp name or tu-<timm name>")
    segmenter_options: dict[str, Any] = Field(
        default_factory=dict, description="further options of the segmenter, e.g. encoder_depth, decoder_channels")
    folds: int = Field(5, ge=2, description="patient-level cross-validation folds")
    test_size: float = Field(0.2, gt=0, lt=1, description="share of patients in the fixed test set")
    threshold: float = Field(0.5, gt=0, lt=1, description="lesion probability at and above which a pixel is lesion")
    num_workers: int = Field(1, ge=0, description="Ray Train workers per fold; 0 runs in this process")

    @field_validator("encoder")
    @classmethod
    def _registered_encoder(cls, name: str) -> str:
        """An smp encoder name (``resnet34``, ``tu-<timm name>``), not an msk encoder: smp checks
        it when the segmenter is built (the contract test builds every registered segmenter)."""
        return name

    @model_validator(mode="after")
    def _segmenter_options(self):
        if self.init != "random":
            raise ValueError("init: segmenters start from random weights (init must be 'random')")
        if self.sobel or self.class_weighting != "none":
            raise ValueError("sobel and class_weighting are classifier options; a segmenter takes neither")
        stride = 2 ** int(self.segmenter_options.get("encoder_depth", 5))
        if self.image_size % stride:
            raise ValueError(f"image_size {self.image_size} must be a multiple of {stride} "
                             f"(2**encoder_depth) for a segmenter")
        return self

    @property
    def arch(self) -> str:
        return f"{self.segmenter}:{self.encoder}"

    def train_config(self) -> TrainConfig:
        """The :class:`TrainConfig` part each fold's run is given (``encoder`` = :attr:`arch`)."""
        fields = self.model_dump(include=set(TrainConfig.model_fields))
        return TrainConfig.model_validate({**fields, "encoder": self.arch, "encoder_options": {}})


# -- the model ---------------------------------------------------------------------------------


# -- data ----------------------------------------------------------------------------------------


class DiceBCELoss(nn.Module):
    """``BCE + Dice`` on lesion logits ``[B, 1, H, W]`` against masks in {0, 1} (smp's Dice)."""

    def __init__(self) -> None:
        super().__init__()
        from segmentation_models_pytorch.losses import DiceLoss

        self.bce = nn.BCEWithLogitsLoss()
        self.dice = DiceLoss(mode="binary", from_logits=True)

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.bce(logits, masks) + self.dice(logits, masks)


def dice_hits(logits: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5) -> float:
    """Sum over the batch of each image's Dice at ``threshold`` (``fit``'s ``hits``)."""
    pred = (torch.sigmoid(logits) >= threshold).cpu().numpy()[:, 0]
    return float(overlap_scores(pred, masks.cpu().numpy()[:, 0] > 0.5)[1].sum())


@dataclass
class SegmentationData:
    """Images of an ingest with their lesion masks in the images' square pixels.

    :param images: ``uint8 [N, S, S]``; :param masks: ``bool [N, S, S]``.
    :param labels: entity (or ``lesion``) per image, for stratified splits and per-entity scores.
    """

    images: np.ndarray
    masks: np.ndarray
    labels: list[str]
    patient_ids: list[str]
    image_ids: list[str]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index) -> SegmentationData:
        index = np.asarray(index, dtype=np.int64)
        return SegmentationData(self.images[index], self.masks[index], [self.labels[i] for i in index],
                                [self.patient_ids[i] for i in index], [self.image_ids[i] for i in index],
                                self.source, list(self.notes))


def _synthetic_truth(masks: Path) -> Path | None:
    """The synth output folder when ``masks`` is one (or its ``ground_truth.csv``)."""
    if masks.is_dir() and (masks / "ground_truth.csv").is_file():
        return masks
    if masks.is_file() and masks.name == "ground_truth.csv":
        return masks.parent
    return None


def _mask_rows(ingest: Path, masks: Path) -> list[tuple[str, Path, str | None, str]]:
    """``(image_id, mask file, label, where)`` per masked image."""
    from msk.core.io.masks import read_mask_table

    synth = _synthetic_truth(masks)
    if synth is None:
        return [(r.image_id, r.mask_path, r.label, r.where) for r in read_mask_table(masks)]
    from msk.core.synth.truth import ground_truth_for_ingest

    try:
        truth = ground_truth_for_ingest(synth, ingest)
    except ValueError as exc:
        raise SegmentationError(str(exc)) from None
    if "mask" not in truth.columns:
        raise SegmentationError(f"{synth}/ground_truth.csv has no mask column; rerun `msk synth` (masks are "
                                "written since the segmentation release)")
    truth = truth[truth["mask"].notna() & (truth["mask"].astype(str) != "")]
    return [(str(r.image_id), synth / str(r.mask), str(r.entity) if isinstance(r.entity, str) else None,
             f"{synth}/ground_truth.csv ({r.path})") for r in truth.itertuples()]


def load_segmentation_data(ingest: str | os.PathLike, masks: str | os.PathLike) -> SegmentationData:
    """The masked images of the ingest output ``ingest``.

    :param masks: a masks table ``image_id,mask_path[,label]`` or a synthetic export folder
        (``ground_truth.csv`` with its ``mask`` column; ``ingest`` must be the ingest of its
        ``export/``). Every listed image must be in the ingest; every mask must have its source
        image's size and mark at least one pixel (:func:`msk.core.io.masks.load_mask`). An image
        whose lesion vanishes at the ingest's size is left out, with a note.
    """
    import pyarrow.compute as pc

    from msk.core.io.dataset import images_from_table, read_shards
    from msk.core.io.manifest import ingest_resize
    from msk.core.io.masks import MaskError, load_mask, mask_to_square

    ingest, masks = Path(ingest), Path(masks)
    if not masks.exists():
        raise SegmentationError(f"{masks}: no such masks table or synthetic export")
    rows = _mask_rows(ingest, masks)
    if not rows:
        raise SegmentationError(f"{masks}: no image has a lesion mask")
    by_id = {r[0]: r for r in rows}
    known = set(read_shards(ingest, columns=["image_id"]).column("image_id").to_pylist())
    missing = [r for r in rows if r[0] not in known]
    if missing:
        raise SegmentationError(f"{missing[0][3]}: image {missing[0][0]} is not in the ingest output {ingest} "
                                f"({len(missing)} of {len(rows)} masked images are not); were the masks "
                                "made for another ingest?")
    table = read_shards(ingest, columns=["image_id", "image", "height", "width", "source_height",
                                         "source_width", "patient_id"],
                        filter=pc.field("image_id").isin(sorted(by_id)))
    images = images_from_table(table)
    image_ids = table.column("image_id").to_pylist()
    resize = ingest_resize(ingest)
    square = np.zeros(images.shape, bool)
    for k, (image_id, sh, sw) in enumerate(zip(image_ids, table.column("source_height").to_pylist(),
                                               table.column("source_width").to_pylist())):
        _, path, _, where = by_id[image_id]
        try:
            source = load_mask(path, (sh, sw))
        except MaskError as exc:
            raise SegmentationError(f"{exc} (mask of image {image_id}, {where})") from None
        square[k] = mask_to_square(source, images.shape[1], resize)
    patients = table.column("patient_id").to_pylist()
    notes = []
    vanished = [k for k in range(len(image_ids)) if not square[k].any()]
    if len(vanished) == len(image_ids):
        raise SegmentationError(f"{masks}: every lesion vanishes when its mask is scaled to the ingest's "
                                f"{images.shape[1]} px images; ingest at a larger image_size")
    if vanished:  # too small for the working resolution: not a bad mask, but nothing to learn
        notes.append(f"{len(vanished)} masked image(s) whose lesion covers less than half a pixel at "
                     f"{images.shape[1]} px were left out (e.g. {image_ids[vanished[0]]})")
        keep = np.setdiff1d(np.arange(len(image_ids)), vanished)
        images, square = images[keep], square[keep]
        image_ids, patients = [image_ids[k] for k in keep], [patients[k] for k in keep]
    anonymous = sum(1 for p in patients if not p)
    if anonymous:
        notes.append(f"{anonymous} image(s) have no patient id; each counts as a patient of its own")
    patients = [p if p else f"image:{i}" for p, i in zip(patients, image_ids)]
    labels = [by_id[i][2] or NO_LABEL for i in image_ids]
    return SegmentationData(images, square, labels, patients, image_ids, str(ingest), notes)


# -- training ----------------------------------------------------------------------------------


@dataclass
class FoldResult:
    fold: int
    out: Path
    best_epoch: int
    val_dice: float
    n_train: int
    n_val: int
    skipped: bool = False


@dataclass
class SegmenterResult:
    """Outcome of :func:`train_segmenter`."""

    out: Path
    folds: list[FoldResult]
    n_images: int
    n_test: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        dice = ", ".join(f"fold {f.fold} {f.val_dice:.3f}" for f in self.folds)
        return (f"{len(self.folds)} folds trained on {self.n_images - self.n_test} images "
                f"({self.n_test} held out as the test set); validation Dice: {dice}")


def _strata(data: SegmentationData, folds: int) -> list[str]:
    """Labels for stratification: a label with fewer than ``folds + 1`` patients joins ``(other)``."""
    patients: dict[str, set[str]] = {}
    for p, label in zip(data.patient_ids, data.labels):
        patients.setdefault(label, set()).add(p)
    return [label if len(patients[label]) > folds else "(other)" for label in data.labels]


def _write_splits(out: Path, data: SegmentationData, part: list[str], fold: list[int | None]) -> None:
    """``out/splits.csv``, or a check that an earlier run's is the same."""
    header = ["image_id", "patient_id", "label", "part", "val_fold"]
    rows = [[data.image_ids[i], data.patient_ids[i], data.labels[i], part[i],
             "" if fold[i] is None else str(fold[i])] for i in range(len(data))]
    path = out / SPLITS_FILE
    if path.is_file():
        with path.open(newline="") as f:
            if list(csv.reader(f)) != [header, *rows]:
                raise SegmentationError(f"{path} was written for other images or masks than this run's; "
                                        "use a new output folder for new data")
        return
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def read_splits(run: str | os.PathLike) -> dict[str, str]:
    """``image_id -> part`` (``test`` or ``dev``) of a segmenter run."""
    path = Path(run) / SPLITS_FILE
    if not path.is_file():
        raise SegmentationError(f"{path}: not found; is {run} a run folder of `msk train segmenter`?")
    with path.open(newline="") as f:
        return {r["image_id"]: r["part"] for r in csv.DictReader(f)}


def _check_resumable(out: Path, config: SegmenterConfig) -> None:
    import yaml

    path = out / CONFIG_FILE
    if not path.is_file():
        return
    saved = yaml.safe_load(path.read_text()) or {}
    free = {"epochs", "patience", "num_workers", "use_gpu", "max_failures", "keep_checkpoints", "threshold"}
    now = config.model_dump(mode="json")
    changed = sorted(k for k, v in now.items() if k not in free and k in saved and saved[k] != v)
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise SegmentationError(f"{out} holds a segmenter run with other options ({details}); use a new output "
                                f"folder, or the same options (only {', '.join(sorted(free))} may change)")


def _train_fold(k: int, data: SegmentationData, train: np.ndarray, val: np.ndarray,
                config: SegmenterConfig, out: Path) -> FoldResult:
    from msk.core.io.checkpoint import CheckpointError
    from msk.core.models.train import TrainError, fit

    fold_out = out / f"fold-{k}"
    marker = fold_out / "fold.json"
    budget = {"epochs": config.epochs, "patience": config.patience}
    if marker.is_file() and (fold_out / "best.pt").is_file():
        done = json.loads(marker.read_text())
        if done.get("budget") == budget:
            return FoldResult(k, fold_out, done["best_epoch"], done["val_dice"], len(train), len(val), skipped=True)
    build = functools.partial(segmentation_model, config.segmenter, config.encoder, dict(config.segmenter_options))
    try:
        result = fit(build, data.images[train], data.masks[train].astype(np.uint8), 1, config.train_config(),
                     out=fold_out, val=(data.images[val], data.masks[val].astype(np.uint8)),
                     dataset=MaskPairs, loss=DiceBCELoss(),
                     hits=functools.partial(dice_hits, threshold=config.threshold),
                     record={"task": "segmenter", "classes": ["lesion"]})
    except (TrainError, CheckpointError) as exc:
        raise SegmentationError(f"fold {k} ({fold_out}): {exc}") from exc
    probs = predict_probabilities([result.model], data.images[val])
    val_dice = round(float(overlap_scores(probs >= config.threshold, data.masks[val])[1].mean()), 4)
    marker.write_text(json.dumps({"fold": k, "best_epoch": result.best_epoch, "val_dice": val_dice,
                                  "n_train": len(train), "n_val": len(val), "budget": budget}))
    return FoldResult(k, fold_out, result.best_epoch, val_dice, len(train), len(val))


def train_segmenter(data: SegmentationData, config: SegmenterConfig | None = None, *,
                    out: str | os.PathLike) -> SegmenterResult:
    """Plan the patient-level splits, train one segmenter per fold and write ``out/segmenter.json``."""
    from msk.core.data.labelled import ingest_info
    from msk.core.data.splits import plan_splits
    from msk.core.errors import TrainingDataError

    config = config or SegmenterConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_resumable(out, config)
    try:
        plan = plan_splits(data.patient_ids, _strata(data, config.folds), folds=config.folds,
                           test_size=config.test_size, seed=config.seed)
    except TrainingDataError as exc:
        raise SegmentationError(str(exc).replace("label more images", "mask more images")) from None
    part, fold = plan.parts(len(data))
    _write_splits(out, data, part, fold)
    (out / CONFIG_FILE).write_text(config.to_yaml())
    folds = [_train_fold(k, data, train, val, config, out) for k, (train, val) in enumerate(plan.folds, 1)]
    info = {"segmenter": config.segmenter, "encoder": config.encoder, "image_size": int(data.images.shape[1]),
            "threshold": config.threshold, "source": data.source,
            "ingest": ingest_info(data, out),  # how `msk segment` squares new images: like these
            "folds": [{"fold": f.fold, "best_epoch": f.best_epoch, "val_dice": f.val_dice, "n_train": f.n_train,
                       "n_val": f.n_val} for f in folds],
            "n_images": len(data), "n_test": len(plan.test),
            "labels": dict(sorted(Counter(data.labels).items()))}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return SegmenterResult(out, folds, len(data), len(plan.test), list(data.notes))


# -- prediction --------------------------------------------------------------------------------


# -- the region of interest from a predicted mask -------------------------------------------------


