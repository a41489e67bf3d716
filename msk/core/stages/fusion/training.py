"""Image + clinical metadata fusion: models trained end to end, and the comparison protocol.

A fusion model is an :class:`~msk.core.models.train.ImageClassifier` whose head is a registered fusion
head (:mod:`msk.plugins.fusion_models`): ``encoder(image) -> features``, then
``head(features, encoded metadata) -> logits``, trained jointly by :func:`msk.core.models.train.fit`
(in this process or on Ray Train). The same code gives the two single-branch models the fused
ones are judged against: ``meta_dim=0`` is the image-only model, ``use_image=False`` the
metadata-only MLP (``image_dim=0``; the encoder is kept for the checkpoint format but frozen and
never run).

:func:`evaluate_fusion` is ``msk eval fusion``: on labelled lesion images with clinical metadata
it holds out a patient-level test split, runs patient-level k-fold cross-validation on the rest
for every model of :class:`FusionConfig` (image only, metadata only, one row per fusion head,
XGBoost on the metadata, optionally an image-only vision transformer), sums the fold models'
logits into an ensemble for the held-out split, and explains the fused model: GradientShap per
metadata feature (:mod:`msk.core.models.explain`) and Grad-CAM of its image branch
(:mod:`msk.core.models.gradcam`).

Every split is by patient (:mod:`msk.core.data.splits`). Each training fold keeps a patient-disjoint
``val_fraction`` for early stopping (``train.patience``) and fits its own
:class:`~msk.core.data.metadata.MetadataEncoder` on its training rows only; all models of a fold see
the same rows. Before anything is trained, every fold's encoder is fitted and applied to every
row it will meet, so bad metadata (an age of -1 or 200, a sex outside M/F, a site or view the
fold never saw, with ``metadata.unknown="error"``) fails in seconds with the
:class:`~msk.core.io.clinical.MetadataError` of :mod:`msk.core.data.metadata`, naming the fold and rows.

Input images are ROI crops when the metadata carries lesion boxes (``x0, y0, x1, y1`` in the
pixel coordinates of the original image, end exclusive): boxes are mapped into the letterboxed
ingest image (:func:`letterbox_box`), widened to a square with a margin (:func:`msk.core.data.roi.roi_box`)
and resized to ``roi_size`` (:func:`msk.core.data.roi.crop_roi`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import nn

from msk.core.config import MskConfig
from msk.core.data.augment import eval_transform, to_tensor
from msk.core.data.metadata import MetadataEncoder, MetadataSchema, join_images
from msk.core.data.splits import patient_kfold, patient_split
from msk.core.data.squaring import map_box_to_square
from msk.core.errors import ConfigError, MskError
from msk.core.io.clinical import DICOM_VIEWS, MetadataError
from msk.core.models.baselines import METRICS, XgbConfig, classification_metrics, fit_xgboost
from msk.core.models.fusion import FusionClassifier, build_fusion_model
from msk.core.models.train import (
    FitResult,
    ImageClassifier,
    TrainConfig,
    fit,
    load_model,
    predict_logits,
)
from msk.core.registry import entity_set
from msk.core.specs import FUSION_DROPOUT, FUSION_HIDDEN

__all__ = [
    "BOX_COLUMNS", "FusionConfig", "FusionData", "FusionResult",
    "TransformerConfig", "evaluate_fusion", "fit_fusion", "image_features",
    "letterbox_box", "load_fusion_data", "read_synth_truth",
]

#: Lesion box columns of a metadata frame: original-image pixels, ``x1``/``y1`` exclusive.
BOX_COLUMNS: tuple[str, ...] = ("x0", "y0", "x1", "y1")


# -- configuration ------------------------------------------------------------------------------


def _default_train() -> TrainConfig:
    return TrainConfig(encoder="tiny-cnn", image_size=64, epochs=20, batch_size=32, lr=2e-3,
                       patience=4)


class TransformerConfig(MskConfig):
    """The image-only vision-transformer baseline (a timm model trained from scratch).

    ``options`` go to ``timm.create_model`` (``img_size`` is set to ``image_size``); the
    default is a 4-block ViT over 8 x 8 patches, small enough for a CPU.
    """

    encoder: str = Field("timm/vit_tiny_patch16_224", description="a timm/<name> encoder")
    options: dict[str, Any] = Field(
        default_factory=lambda: {"patch_size": 8, "depth": 4, "embed_dim": 96, "num_heads": 3},
        description="timm.create_model keyword arguments")
    image_size: int = Field(32, ge=8, description="network input side (the ROI is resized)")
    lr: float = Field(5e-4, gt=0, description="AdamW learning rate")


class FusionConfig(MskConfig):
    """Options of ``msk eval fusion`` (YAML keys of ``--config``)."""

    train: TrainConfig = Field(default_factory=_default_train, description="training of every "
                               "torch model: encoder, init, epochs, patience, Ray Train workers")
    metadata: MetadataSchema = Field(default_factory=MetadataSchema,
                                     description="metadata features and their encoding")
    entity_set: str | None = Field(None, description="class list (registry entity set); "
                                   "default: the sorted entities present")
    heads: list[str] = Field(["concat", "gated"], min_length=1, description="fusion heads to "
                             "compare; the first also builds the single-branch models")
    hidden: list[int] = Field(list(FUSION_HIDDEN), min_length=1, description="metadata MLP widths")
    dropout: float = Field(FUSION_DROPOUT, ge=0, lt=1, description="dropout of the fusion head")
    image_only: bool = Field(True, description="also report the image-only model (no metadata)")
    metadata_only: bool = Field(True, description="also report the metadata-only MLP (no image)")
    xgboost: XgbConfig | None = Field(default_factory=XgbConfig, description="null: no XGBoost row")
    transformer: TransformerConfig | None = Field(None, description="image-only ViT baseline; null: none")
    folds: int = Field(5, ge=2, description="patient-level cross-validation folds")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="patients held out for the fold ensemble")
    val_fraction: float = Field(0.15, gt=0, lt=1,
                                description="patients of a training fold kept for early stopping")
    roi: bool = Field(True, description="crop around the lesion box (metadata columns x0, y0, x1, y1)")
    roi_margin: float = Field(0.15, ge=0, description="margin on each side of the box, a fraction of its longer side")
    roi_size: int = Field(64, ge=8, description="side of the cropped grey image")
    explain: bool = Field(True, description="GradientShap table + plot and Grad-CAM overlays")
    explain_samples: int = Field(50, ge=1, description="GradientShap samples per row")
    gradcam_images: int = Field(8, ge=0, description="held-out images drawn with Grad-CAM")
    seed: int = Field(0, description="seed of the patient splits and of training")


# -- models -------------------------------------------------------------------------------------


def fit_fusion(images: np.ndarray, labels: Sequence[int] | np.ndarray, meta: np.ndarray | None,
               num_classes: int, config: TrainConfig, *, out: str | os.PathLike,
               head: str = "concat", use_image: bool = True, hidden: Sequence[int] = FUSION_HIDDEN,
               dropout: float = FUSION_DROPOUT, encoder_options: dict[str, Any] | None = None,
               val: tuple | None = None, classes: Sequence[str] | None = None) -> FitResult:
    """Train a :class:`FusionClassifier` end to end with :func:`msk.core.models.train.fit`.

    :param images: ``uint8 [N, S, S]``; also required by the metadata-only model (the loader
        is shared), which then trains without augmentation.
    :param meta: ``float32 [N, D]`` encoded metadata, or ``None`` for the image-only model.
    :param val: ``(images, labels)`` or ``(images, labels, meta)`` for early stopping.
    :param classes: class names in label order (saved in the checkpoints for serving).
    """
    if not use_image and meta is None:
        raise ValueError("a model without the image branch needs metadata (meta is None)")
    if not use_image:
        config = config.model_copy(update={"augment": False})
    build = functools.partial(build_fusion_model, config.model_dump(mode="json"), num_classes,
                              head=head, meta_dim=0 if meta is None else int(meta.shape[1]),
                              use_image=use_image, hidden=tuple(hidden), dropout=dropout,
                              encoder_options=encoder_options)
    return fit(build, images, labels, num_classes, config, out=out, meta=meta, val=val, classes=classes)


def image_features(model: ImageClassifier, images: np.ndarray, *, image_size: int,
                   batch_size: int = 64) -> np.ndarray:
    """Encoder features ``float32 [N, feature_dim]`` of ``images`` (deterministic view, with
    the model's preprocessing when it carries an input config)."""
    from msk.core.data.preprocess import input_config_of

    known = input_config_of(model)
    view = eval_transform(image_size, None if known is None else known.preprocess)
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.stack([view(to_tensor(im)) for im in images[start:start + batch_size]])
            out.append(model.features(x).float())
    return torch.cat(out).numpy() if out else np.zeros((0, model.encoder.feature_dim), np.float32)


class _BoundMeta(nn.Module):
    """``images -> logits`` of a fusion model with the metadata of those images bound in
    advance, so that image-only tools (Grad-CAM) can drive it. A call must pass the bound
    rows' images in order; a shorter batch (a blank-image trace) takes the first rows."""

    def __init__(self, model: FusionClassifier, meta: np.ndarray | None):
        super().__init__()
        self.model, self.encoder = model, model.encoder
        self.input_config = getattr(model, "input_config", None)  # Grad-CAM preprocesses as trained
        self.meta = None if meta is None else torch.from_numpy(np.asarray(meta, np.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, None if self.meta is None else self.meta[: len(images)])


# -- data ---------------------------------------------------------------------------------------


@dataclass
class FusionData:
    """Images with their canonical metadata rows (:mod:`msk.core.data.metadata`), aligned."""

    images: np.ndarray  # uint8 [N, S, S]: network inputs (ROI crops when boxes are given)
    meta: pd.DataFrame  # canonical frame, one row per image
    labels: np.ndarray  # int64 [N]: class index of meta["entity"]
    classes: list[str]

    @property
    def groups(self) -> np.ndarray:
        return self.meta["patient_group"].astype(str).to_numpy()

    def fingerprint(self) -> str:
        """Hash of the image ids, labels and pixels: a re-run must see the same data."""
        h = hashlib.sha256()
        h.update("\n".join(self.meta["image_id"].astype(str)).encode())
        h.update(self.labels.tobytes())
        h.update(np.ascontiguousarray(self.images).tobytes())
        return h.hexdigest()[:16]


#: Lesion boxes in source pixels -> ingest image pixels (see :func:`msk.core.data.squaring.map_box_to_square`).
letterbox_box = map_box_to_square


def _read_metadata(metadata: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    if isinstance(metadata, pd.DataFrame):
        return metadata.reset_index(drop=True)
    path = Path(metadata)
    if not path.is_file():
        raise MetadataError(f"{path}: no such metadata file")
    df = pd.read_csv(path, dtype={"image_id": str, "patient_group": str, "patient_id": str})
    if "patient_group" not in df.columns and "patient_id" in df.columns:  # `msk import` labels
        df["patient_group"] = df["patient_id"]
    if "sites" in df.columns:  # a CSV holds several sites as "tibia|fibula"
        df["sites"] = [tuple(s for s in str(v).split("|") if s) if isinstance(v, str) else ()
                       for v in df["sites"]]
    return df


def _ingest_images(ingest_dir: Path, meta: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """The shard rows of the images in ``meta`` and ``meta`` joined to them (same order)."""
    import pyarrow.compute as pc

    from msk.core.io.dataset import images_from_table, read_shards

    ids = read_shards(ingest_dir, columns=["image_id"]).column("image_id").to_pylist()
    with warnings.catch_warnings():  # images without a metadata row: normal (non-lesion) images
        warnings.filterwarnings("ignore", message=".*images have no metadata row")
        joined = join_images(meta, ids)  # a metadata row that matches no image is refused
    table = read_shards(ingest_dir, columns=["image_id", "image", "height", "width",
                                             "source_height", "source_width"],
                        filter=pc.field("image_id").isin(list(joined["image_id"])))
    position = {v: i for i, v in enumerate(table.column("image_id").to_pylist())}
    order = [position[i] for i in joined["image_id"]]
    table = table.take(order)
    shapes = table.select(["source_height", "source_width", "height", "width"]).to_pandas()
    return joined, images_from_table(table), shapes


def _resize_mode(ingest_dir: Path) -> str:
    from msk.core.io.manifest import ingest_squaring

    return ingest_squaring(ingest_dir)["resize"]


def _roi_crops(images: np.ndarray, meta: pd.DataFrame, shapes: pd.DataFrame | None,
               config: FusionConfig, resize: str, source: str) -> np.ndarray:
    from msk.core.data.roi import lesion_crop

    absent = [c for c in BOX_COLUMNS if c not in meta.columns]
    if absent:
        raise ConfigError(f"{source}: roi is on but the metadata has no box columns {absent}; "
                          "add the lesion boxes or set roi: false")
    boxes = meta[list(BOX_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    missing = meta.loc[boxes.isna().any(axis=1), "image_id"].tolist()
    if missing:
        raise MetadataError(f"{source}: {len(missing)} rows have no lesion box: "
                            f"{', '.join(map(str, missing[:5]))}; set roi: false to use whole images")
    crops = np.empty((len(images), config.roi_size, config.roi_size), np.uint8)
    for i, (image, box) in enumerate(zip(images, boxes.to_numpy(dtype=float))):
        if shapes is not None:
            row = shapes.iloc[i]
            box = letterbox_box(box, (row["source_height"], row["source_width"]),
                                int(row["height"]), resize)
        try:
            crops[i] = lesion_crop(image, box, config.roi_size, margin=config.roi_margin)
        except MskError as exc:
            raise MetadataError(f"{source}: image {meta['image_id'].iloc[i]}: {exc}") from None
    return crops


def load_fusion_data(source: str | os.PathLike | np.ndarray,
                     metadata: pd.DataFrame | str | os.PathLike,
                     config: FusionConfig | None = None) -> FusionData:
    """Images and canonical metadata (a frame or a CSV file), joined, cropped and checked.

    :param source: an ingest output folder (images joined by ``image_id``; a metadata row that
        matches no image is a :class:`MetadataError`; images without a row are skipped), or a
        ``uint8 [N, S, S]`` array with one image per metadata row, in order.
    :param metadata: canonical columns (``image_id``, ``patient_group`` (in a CSV, ``patient_id``
        stands in for it, as ``msk import`` writes), ``age``, ``sex``,
        ``site``/``sites``, ``view``, ``entity``; ``position`` with ``metadata.positions``;
        ``x0, y0, x1, y1`` with ``roi``). In a CSV, several sites are written ``tibia|fibula``.

    Every row needs an entity; the metadata is encoded once here so that unusable values
    (ages outside the schema's ``age_bins``, a sex other than M/F, a site outside the vocabulary) are
    reported before any training.
    """
    config = config or FusionConfig()
    meta = _read_metadata(metadata)
    shapes = None
    resize = "pad"
    if isinstance(source, np.ndarray):
        where = "image array"
        if source.dtype != np.uint8 or source.ndim != 3:
            raise ValueError(f"images must be uint8 [N, S, S]; got {source.dtype} {source.shape}")
        if len(source) != len(meta):
            raise MetadataError(f"{len(source)} images but {len(meta)} metadata rows; the array "
                                "needs one image per row, in order")
        images = source
    else:
        ingest_dir = Path(source)
        where = str(ingest_dir)
        meta, images, shapes = _ingest_images(ingest_dir, meta)
        resize = _resize_mode(ingest_dir)
    if not len(meta):
        raise MetadataError(f"{where}: no image has a metadata row")
    for column in ("image_id", "patient_group", "entity"):
        if column not in meta.columns:
            raise MetadataError(f"metadata has no {column!r} column; columns: {list(meta.columns)}")
    unlabelled = meta.loc[meta["entity"].isna(), "image_id"].tolist()
    if unlabelled:
        raise MetadataError(f"{len(unlabelled)} metadata rows have no entity (fusion models "
                            f"learn from labelled lesions): {', '.join(map(str, unlabelled[:5]))}")
    if config.entity_set:
        entities = entity_set(config.entity_set)
        classes = list(entities.names)
        labels, unknown = [], []
        for image_id, entity in zip(meta["image_id"], meta["entity"]):
            try:
                labels.append(entities.index(str(entity)))
            except KeyError:
                unknown.append(f"{image_id}={entity!r}")
        if unknown:
            raise MetadataError(f"{len(unknown)} rows name an entity outside entity set "
                                f"{config.entity_set!r} ({', '.join(classes)}): "
                                f"{', '.join(unknown[:5])}")
        labels = np.array(labels, np.int64)
    else:
        classes = sorted(meta["entity"].astype(str).unique())
        labels = meta["entity"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    MetadataEncoder(config.metadata).fit_transform(meta)  # raises MetadataError naming bad rows
    if config.roi:
        images = _roi_crops(images, meta, shapes, config, resize, where)
    return FusionData(images, meta, labels, classes)


def read_synth_truth(synth_dir: str | os.PathLike, ingest_dir: str | os.PathLike, *,
                     lesions_only: bool = True) -> pd.DataFrame:
    """The canonical metadata of an ``msk synth`` export, keyed by the ingest's ``image_id``.

    ``ground_truth.csv`` paths (relative to ``synth_dir``) are joined to the ingest manifest's
    paths (relative to the ingest source, ``synth_dir`` or ``synth_dir/export``). ``site`` is
    the lesion's region, ``view`` the DICOM view mapped by
    :data:`msk.core.io.clinical.DICOM_VIEWS`, ``patient_group`` the patient id; ``position`` and
    the lesion box (``x0, y0, x1, y1``, pixels of the written image) are kept. Files the
    ingest quarantined are left out.
    """
    from msk.core.io.manifest import read_manifest

    synth_dir = Path(synth_dir)
    truth_csv = synth_dir / "ground_truth.csv"
    if not truth_csv.is_file():
        raise MetadataError(f"{truth_csv}: no such file (not an `msk synth` output folder?)")
    truth = pd.read_csv(truth_csv, dtype={"patient_id": str, "path": str})
    manifest = read_manifest(ingest_dir, columns=["path", "image_id", "status"]).to_pandas()
    manifest = manifest[manifest["status"] == "ok"]
    by_path = dict(zip(manifest["path"], manifest["image_id"]))
    best = None
    for prefix in ("", "export/"):
        ids = truth["path"].map(lambda p, pre=prefix: by_path.get(p.removeprefix(pre)))
        if best is None or ids.notna().sum() > best.notna().sum():
            best = ids
    if best is None or best.notna().sum() == 0:
        raise MetadataError(f"no path of {truth_csv} is in the manifest of {ingest_dir}; was "
                            f"{synth_dir} (or its export/ folder) the ingest source?")
    truth = truth.assign(image_id=best)[best.notna()]
    if lesions_only:
        truth = truth[truth["entity"].notna()]
    return pd.DataFrame({
        "image_id": truth["image_id"].astype(str),
        "patient_group": truth["patient_id"].astype(str),
        "age": pd.to_numeric(truth["age"], errors="coerce").astype(float),
        "sex": truth["sex"],
        "site": truth["site"].fillna(truth["region"]),  # a lesion's site is its image's region
        "entity": truth["entity"],
        "view": [None if pd.isna(v) else DICOM_VIEWS.get(str(v).strip().upper()) for v in truth["view"]],
        "center": None,
        "position": truth["position"],
        **{c: pd.to_numeric(truth[c], errors="coerce") for c in BOX_COLUMNS},
    }).reset_index(drop=True)


# -- the protocol -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Model:
    """One model of the comparison: a :class:`FusionClassifier` or XGBoost on the metadata."""

    key: str  # folder and file name
    name: str  # table label
    kind: Literal["torch", "xgboost"]
    head: str = "concat"
    use_image: bool = True
    use_meta: bool = True
    train: TrainConfig | None = None
    convolutional: bool = True  # Grad-CAM applies


def _models(config: FusionConfig) -> list[_Model]:
    first, enc = config.heads[0], config.train.encoder
    models = []
    if config.image_only:
        models.append(_Model("image", f"image only ({enc})", "torch", first, True, False, config.train))
    if config.transformer is not None:
        t = config.transformer
        train = config.train.model_copy(update={"encoder": t.encoder, "image_size": t.image_size,
                                                "encoder_options": {**t.options, "img_size": t.image_size},
                                                "lr": t.lr, "init": "random", "sobel": None})
        models.append(_Model("transformer", f"image only ({t.encoder.removeprefix('timm/')})",
                             "torch", first, True, False, train, convolutional=False))
    if config.metadata_only:
        models.append(_Model("metadata", f"metadata only (MLP, {first} head)", "torch", first,
                             False, True, config.train))
    if config.xgboost is not None:
        models.append(_Model("xgboost", "metadata only (XGBoost)", "xgboost"))
    for head in config.heads:
        models.append(_Model(f"fusion-{head}", f"fusion: {head} ({enc})", "torch", head, True,
                             True, config.train))
    if len(set(config.heads)) != len(config.heads):
        raise ConfigError(f"heads names a head twice: {config.heads}")
    return models


@dataclass
class _Fold:
    """One training fold: positions in the development rows, and its metadata encoder."""

    k: int
    fit: np.ndarray  # the training fold: train + val
    train: np.ndarray  # fitted on
    val: np.ndarray  # early stopping
    test: np.ndarray  # scored
    encoder: MetadataEncoder


def _plan(data: FusionData, dev: np.ndarray, test: np.ndarray, config: FusionConfig) -> list[_Fold]:
    """Patient-level folds of ``dev``, each with its encoder fitted on the training rows and
    tried on every row it will encode, so that bad metadata fails before any training."""
    y, groups = data.labels[dev], data.groups[dev]
    folds = []
    for k, (tr, te) in enumerate(patient_kfold(groups, y, n_splits=config.folds, seed=config.seed)):
        # the split fit_xgboost makes of the same rows: every model early-stops on the same patients
        inner_tr, inner_va = patient_split(groups[tr], y[tr], test_size=config.val_fraction,
                                           seed=config.seed)
        encoder = MetadataEncoder(config.metadata)
        try:
            encoder.fit(data.meta.iloc[dev[tr[inner_tr]]])
            for rows in (dev[tr[inner_va]], dev[te], test):
                encoder.transform(data.meta.iloc[rows])
        except MetadataError as exc:
            raise MetadataError(f"fold {k}: {exc}") from None
        folds.append(_Fold(k, tr, tr[inner_tr], tr[inner_va], te, encoder))
    return folds


def plan_folds(data: FusionData, config: FusionConfig) -> tuple[np.ndarray, np.ndarray, list[_Fold]]:
    """``(dev, test, folds)``: the patient-level held-out split and the folds of the development
    rows that :func:`evaluate_fusion` trains on (tuning uses ``folds[0]``)."""
    dev, test = patient_split(data.groups, data.labels, test_size=config.test_fraction,
                              seed=config.seed)
    return dev, test, _plan(data, dev, test, config)


@dataclass
class _Trained:
    """A fold model: ``logits(rows)`` for any rows of the data, and how its training went."""

    logits: Callable[[np.ndarray], np.ndarray]
    net: FusionClassifier | None  # None for XGBoost
    epochs: int
    best_epoch: int
    seconds: float  # training wall time (torch: the epochs in history.csv, also when resumed)


def _train_fold(model: _Model, data: FusionData, dev: np.ndarray, fold: _Fold,
                config: FusionConfig, run: Path) -> _Trained:
    """Train ``model`` on ``fold``, or load it when ``run`` holds the finished run."""
    num_classes = len(data.classes)

    if model.kind == "xgboost":
        rows = dev[fold.fit]
        xgb_config = config.xgboost.model_copy(update={"val_fraction": config.val_fraction,
                                                       "seed": config.seed})
        began = time.perf_counter()
        xgb = fit_xgboost(data.meta.iloc[rows], data.labels[rows], data.groups[rows], num_classes,
                          config.metadata, xgb_config)
        return _Trained(lambda r: xgb.logits(data.meta.iloc[r]), None,
                        int(xgb.booster.num_boosted_rounds()), xgb.best_iteration + 1,
                        time.perf_counter() - began)

    def meta_of(rows: np.ndarray) -> np.ndarray | None:
        return fold.encoder.transform(data.meta.iloc[rows]) if model.use_meta else None

    options = dict(head=model.head, use_image=model.use_image, hidden=tuple(config.hidden),
                   dropout=config.dropout)
    done = run / "done.json"
    if done.is_file() and (run / "best.pt").is_file():
        build = functools.partial(build_fusion_model, model.train.model_dump(mode="json"),
                                  num_classes, meta_dim=fold.encoder.dim if model.use_meta else 0,
                                  **options)
        net, _ = load_model(run / "best.pt", build)
        info = json.loads(done.read_text())
    else:
        train, val = dev[fold.train], dev[fold.val]
        val_set = (data.images[val], data.labels[val], *([meta_of(val)] if model.use_meta else []))
        result = fit_fusion(data.images[train], data.labels[train], meta_of(train), num_classes,
                            model.train, out=run, val=val_set, classes=data.classes, **options)
        net = result.model
        info = {"epochs": len(result.history), "best_epoch": result.best_epoch}
        fold.encoder.save(run / "metadata_encoder.json")
        done.write_text(json.dumps(info))

    def logits(rows: np.ndarray) -> np.ndarray:
        return predict_logits(net, data.images[rows], image_size=model.train.image_size,
                              meta=meta_of(rows))

    seconds = float(pd.read_csv(run / "history.csv")["seconds"].sum())
    return _Trained(logits, net, info["epochs"], info["best_epoch"], seconds)


@dataclass
class FusionResult:
    """What :func:`evaluate_fusion` measured (also written to ``out``).

    :ivar table: one row per model and set: ``CV <k>-fold`` (mean and SD over the folds),
        ``held-out, fold models`` (mean and SD of the k fold models on the held-out split) and
        ``held-out, ensemble`` (their summed logits; SD empty); columns ``model``, ``set``,
        ``accuracy``, ``precision``, ``recall``, ``f1`` (macro), ``<metric>_sd`` and
        ``seconds`` (training wall time of the model's k folds, on the CV row).
    :ivar folds: one row per model and fold: sizes, metrics, ``epochs`` run (XGBoost: trees),
        ``best_epoch`` and training ``seconds``.
    :ivar predictions: the held-out images: ``image_id``, ``entity`` and, per model key, the
        ensemble's prediction.
    :ivar explanation: entity x metadata feature, mean |GradientShap| of the first fusion head.
    """

    table: pd.DataFrame
    folds: pd.DataFrame
    predictions: pd.DataFrame
    out: Path
    explanation: pd.DataFrame | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def markdown(self) -> str:
        """The table as Markdown, ``mean ± sd`` per cell."""
        header = ["model", "set", *(m if m == "accuracy" else f"macro {m}" for m in METRICS), "train s"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        previous = None
        for r in self.table.to_dict("records"):
            cells = [r["model"] if r["model"] != previous else "", r["set"]]
            for m in METRICS:
                sd = r[f"{m}_sd"]
                cells.append(f"{r[m]:.3f}" if pd.isna(sd) else f"{r[m]:.3f} ± {sd:.3f}")
            cells.append("" if pd.isna(r["seconds"]) else f"{r['seconds']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
            previous = r["model"]
        return "\n".join(lines)


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean and sample SD per metric over ``rows``."""
    out: dict[str, float] = {}
    for m in METRICS:
        v = np.array([r[m] for r in rows], dtype=float)
        out[m] = float(v.mean())
        out[f"{m}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return out


def _check_out(out: Path, config: FusionConfig, fingerprint: str) -> None:
    """Stamp ``out`` with the config and data; a folder stamped otherwise is refused."""
    stamp = json.loads(json.dumps({"config": config.model_dump(mode="json"), "data": fingerprint}))
    path = out / "evaluation.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != stamp:
            what = "config" if saved.get("config") != stamp["config"] else "data"
            raise ConfigError(f"{out} holds an evaluation of a different {what}; use a new "
                              "folder (a re-run in the same folder with the same config resumes)")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamp, indent=2))
    (out / "config.yaml").write_text(config.to_yaml())


def evaluate_fusion(source: str | os.PathLike | np.ndarray | FusionData,
                    metadata: pd.DataFrame | str | os.PathLike | None = None,
                    config: FusionConfig | None = None, *, out: str | os.PathLike,
                    progress: Callable[[str], None] | None = None) -> FusionResult:
    """Compare image-only, metadata-only and fused models under patient-level cross-validation.

    :param source: an ingest output folder, a ``uint8 [N, S, S]`` image array, or a
        :class:`FusionData` from :func:`load_fusion_data` (then without ``metadata``).
    :param metadata: canonical metadata frame or CSV (see :func:`load_fusion_data`).
    :param out: result folder: ``results.csv`` and ``results.md`` (the table), ``folds.csv``,
        ``predictions.csv``, ``confusion-<model>.png`` (held-out ensemble),
        ``runs/<model>/fold-<k>/`` (training runs: ``history.csv``, ``best.pt``, the fold's
        ``metadata_encoder.json``); with ``explain``: ``metadata_importance.csv/.png`` and
        ``gradcam-<model>.png``. A re-run with the same config and data resumes.
    :param progress: called with a short message after each fold model.
    """
    config = config or FusionConfig()
    if isinstance(source, FusionData):
        if metadata is not None:
            raise ValueError("FusionData already holds its metadata; do not pass metadata too")
        data = source
    elif metadata is None:
        raise ValueError("evaluate_fusion needs metadata with an ingest folder or image array")
    else:
        data = load_fusion_data(source, metadata, config)
    out = Path(out)
    models = _models(config)
    dev, test, folds = plan_folds(data, config)
    _check_out(out, config, data.fingerprint())

    y_test = data.labels[test]
    fold_rows: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    predictions: dict[str, Any] = {"image_id": data.meta["image_id"].iloc[test].to_numpy(),
                                   "entity": [data.classes[i] for i in y_test]}
    nets: dict[str, list[FusionClassifier | None]] = {}
    files: dict[str, Path] = {}
    for model in models:
        cv, held, ensemble, nets[model.key] = [], [], 0.0, []
        for fold in folds:
            trained = _train_fold(model, data, dev, fold, config,
                                  out / "runs" / model.key / f"fold-{fold.k}")
            rows_k = dev[fold.test]
            scores = classification_metrics(data.labels[rows_k], trained.logits(rows_k).argmax(1))
            cv.append(scores)
            fold_rows.append({"model": model.name, "fold": fold.k, "n_train": len(fold.train),
                              "n_val": len(fold.val), "n_test": len(rows_k), **scores,
                              "epochs": trained.epochs, "best_epoch": trained.best_epoch,
                              "seconds": trained.seconds})
            logits = trained.logits(test)
            held.append(classification_metrics(y_test, logits.argmax(1)))
            ensemble = ensemble + logits
            nets[model.key].append(trained.net)
            if progress:
                progress(f"{model.name}, fold {fold.k}: macro F1 {scores['f1']:.3f}")
        pred = np.asarray(ensemble).argmax(1)
        predictions[model.key] = [data.classes[i] for i in pred]
        no_sd = {f"{m}_sd": np.nan for m in METRICS}
        rows += [
            {"model": model.name, "set": f"CV {config.folds}-fold", **_summary(cv),
             "seconds": sum(r["seconds"] for r in fold_rows if r["model"] == model.name)},
            {"model": model.name, "set": "held-out, fold models", **_summary(held), "seconds": np.nan},
            {"model": model.name, "set": "held-out, ensemble",
             **classification_metrics(y_test, pred), **no_sd, "seconds": np.nan},
        ]
        files[f"confusion-{model.key}"] = _confusion_png(
            data, y_test, pred, out / f"confusion-{model.key}.png",
            f"{model.name}: held-out ensemble, {len(test)} images")

    result = FusionResult(pd.DataFrame(rows), pd.DataFrame(fold_rows), pd.DataFrame(predictions),
                          out, files=files)
    result.table.to_csv(out / "results.csv", index=False, float_format="%.4f")
    result.folds.to_csv(out / "folds.csv", index=False, float_format="%.4f")
    result.predictions.to_csv(out / "predictions.csv", index=False)
    (out / "results.md").write_text(result.markdown() + "\n")
    fused = [m for m in models if m.kind == "torch" and m.use_image and m.use_meta]
    if config.explain and fused:
        result.explanation = _explain(data, dev, test, folds, fused[0], nets[fused[0].key],
                                      config, out, files)
        if config.gradcam_images:
            picks = test[_spread(y_test, config.gradcam_images, config.seed)]
            for model in models:
                if model.kind == "torch" and model.use_image and model.convolutional:
                    files[f"gradcam-{model.key}"] = _gradcam_png(
                        data, picks, folds, nets[model.key], model, out / f"gradcam-{model.key}.png")
    return result


def _confusion_png(data: FusionData, y_true: np.ndarray, pred: np.ndarray, path: Path,
                   title: str) -> Path:
    from msk.core.models.metrics import confusion_matrix, confusion_matrix_png

    cm = confusion_matrix([data.classes[i] for i in y_true], [data.classes[i] for i in pred],
                          data.classes)
    return confusion_matrix_png(cm, data.classes, path, title=title)


def _explain(data: FusionData, dev: np.ndarray, test: np.ndarray, folds: list[_Fold],
             model: _Model, nets: list, config: FusionConfig, out: Path,
             files: dict[str, Path]) -> pd.DataFrame:
    """GradientShap per metadata feature of ``model`` on the held-out rows, each fold model
    with its own encoder and its image features held fixed; the mean table over folds."""
    from msk.core.models.explain import explain_metadata, plot_importance

    tables = []
    for fold, net in zip(folds, nets):
        features = image_features(net, data.images[test], image_size=model.train.image_size)
        explanation = explain_metadata(
            net.head, fold.encoder, data.meta.iloc[test], data.labels[test], data.classes,
            background=data.meta.iloc[dev[fold.train]], image_features=features,
            n_samples=config.explain_samples, seed=config.seed)
        tables.append(explanation.table)
    table = sum(tables[1:], tables[0]) / len(tables)
    table.to_csv(out / "metadata_importance.csv", float_format="%.4f")
    files["metadata_importance"] = plot_importance(
        table, out / "metadata_importance.png",
        title=f"{model.name}: metadata importance\n(mean |GradientShap|, {len(tables)} fold models)")
    return table


def _spread(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` positions in ``labels``, taking the classes in turn (seeded), sorted."""
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    picks: list[int] = []
    while len(picks) < min(n, len(labels)):
        for pool in pools:
            if pool and len(picks) < n:
                picks.append(int(pool.pop()))
    return np.array(sorted(picks), dtype=np.int64)


def _gradcam_png(data: FusionData, rows: np.ndarray, folds: list[_Fold], nets: list,
                 model: _Model, path: Path) -> Path:
    """Grad-CAM of the true class on ``rows``, averaged over the fold models (each with its
    fold's metadata encoding bound), over the network's input image."""
    from msk.core.models.gradcam import grad_cam, save_overlays

    size = model.train.image_size
    cams = np.zeros((len(rows), size, size), np.float32)
    logits = np.zeros((len(rows), len(data.classes)), np.float64)
    for fold, net in zip(folds, nets):
        meta = fold.encoder.transform(data.meta.iloc[rows]) if model.use_meta else None
        cams += grad_cam(_BoundMeta(net, meta), data.images[rows], data.labels[rows],
                         image_size=size, batch_size=len(rows))
        logits += predict_logits(net, data.images[rows], image_size=size, meta=meta)
    titles = [f"{data.classes[t]}\n-> {data.classes[p]}"
              for t, p in zip(data.labels[rows], logits.argmax(1))]
    return save_overlays(data.images[rows], cams / len(nets), path, titles=titles,
                         title=f"Grad-CAM of the true class, {model.name}\n"
                               f"(mean of {len(nets)} fold models; true -> ensemble prediction)")
