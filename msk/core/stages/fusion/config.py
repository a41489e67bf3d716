"""``msk eval fusion``'s typed options: the models to compare, their training, the ROI and the metadata schema."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from msk.core.config import MskConfig
from msk.core.data.metadata import MetadataSchema
from msk.core.models.baselines import XgbConfig
from msk.core.models.train import (
    TrainConfig,
)
from msk.core.specs import FUSION_DROPOUT, FUSION_HIDDEN

#: Lesion box columns of a metadata frame: original-image pixels, ``x1``/``y1`` exclusive.
BOX_COLUMNS: tuple[str, ...] = ("x0", "y0", "x1", "y1")


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
