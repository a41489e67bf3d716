"""``msk eval recommender``'s typed options: the encoders to compare, their training budget, k, the retriever."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from msk.core.config import MskConfig
from msk.core.errors import MskError
from msk.core.models.deepcluster import DeepClusterConfig

if TYPE_CHECKING:
    pass


class EvalError(MskError, ValueError):
    """Input the evaluation cannot use (labels, boxes, configuration)."""


class ClassifierSpec(MskConfig):
    """A baseline classifier: an encoder with a linear head, trained on the training split."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="row label, e.g. cnn, vit")
    encoder: str = Field(..., description="encoder registry name, e.g. resnet18, timm/vit_tiny_patch16_224")
    encoder_options: dict[str, Any] = Field(
        default_factory=dict, description="encoder keyword arguments (timm: img_size, patch_size, depth)")


class TrainingBudget(MskConfig):
    """The training budget every classifier gets (the same for all, so they compare fairly)."""

    epochs: int = Field(10, ge=1, description="training epochs of each classifier")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    batch_size: int = Field(32, ge=2, description="images per training step")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    augment: bool = Field(True, description="augment training images")
    aug_prob: float = Field(0.8, ge=0, le=1, description="share of training images augmented")
    class_weighting: Literal["none", "median_frequency"] = Field(
        "none", description="loss weights per class: median frequency balancing (Eigen & Fergus)")


class RecommenderEvalConfig(MskConfig):
    """Options of ``msk eval recommender`` (YAML keys of ``--config``)."""

    seeds: list[int] = Field([0, 1, 2], min_length=1, description="one patient split and training run per seed")
    test_size: float = Field(0.2, gt=0, lt=1, description="share of patients in the test set")
    image_size: int = Field(64, ge=8, description="network input side (the ROI crop's side with roi)")
    roi: bool = Field(True, description="use the lesion box + margin (needs x0, y0, x1, y1 in the labels)")
    roi_margin: float = Field(0.15, ge=0, description="margin on each side, a fraction of the lesion's longer side")
    entity_set: str | None = Field("bone-tumours",
                                   description="entity order of confusion matrices; None: sorted labels")
    classifiers: list[ClassifierSpec] = Field(
        default_factory=lambda: [
            ClassifierSpec(name="cnn", encoder="resnet18"),
            ClassifierSpec(name="vit", encoder="timm/vit_tiny_patch16_224",
                           encoder_options={"img_size": 64, "patch_size": 8}),
        ])
    training: TrainingBudget = Field(default_factory=TrainingBudget)
    embeddings: list[str] = Field(
        ["deepcluster", "cnn"], min_length=1,
        description="encoders of the recommender: 'deepcluster', a classifier name, or a checkpoint path")
    deepcluster: DeepClusterConfig = Field(
        default_factory=lambda: DeepClusterConfig(encoder="resnet18", k=100, epochs=5),
        description="DeepCluster for 'deepcluster' (image_size, seed and num_workers are set per run)")
    retriever: str = Field("lsh", description="retriever registry name (lsh: the recommender's default)")
    retriever_options: dict[str, Any] = Field(default_factory=dict, description="options of the retriever")
    ks: list[int] = Field([1, 3, 5, 7], min_length=1, description="neighbours that vote")
    k: int = Field(3, ge=1, description="the recommender's k in the model comparison (ANOVA, confusion, gallery)")
    weighting: Literal["none", "distance", "inverse_frequency"] = Field(
        "none", description="vote weighting (msk.core.models.vote)")
    gallery_queries: int = Field(12, ge=0, description="test images shown in the gallery (first seed)")
    num_workers: int = Field(0, ge=0, description="Ray Train workers per training run; 0: in this process")

    @model_validator(mode="after")
    def _consistent(self) -> RecommenderEvalConfig:
        names = [c.name for c in self.classifiers]
        if len(set(names)) != len(names):
            raise ValueError(f"classifier names must be unique, got {names}")
        if self.k not in self.ks:
            raise ValueError(f"k={self.k} must be one of ks={self.ks}")
        if self.weighting == "none" and any(k % 2 == 0 for k in self.ks):
            raise ValueError(f"an unweighted vote needs odd k; ks={self.ks}")
        for c in self.classifiers:
            size = c.encoder_options.get("img_size")
            if size is not None and size != self.image_size:
                raise ValueError(f"classifier {c.name}: img_size={size} differs from image_size={self.image_size}")
        return self
