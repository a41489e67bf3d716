"""The image + clinical metadata classifier: an msk encoder and a registered fusion head.

:class:`FusionClassifier` is what ``msk eval fusion`` trains and ``/v1/classify`` serves;
:func:`build_fusion_model` rebuilds it from a training config (or a checkpoint's record), so
serving needs only this module. Training and the cross-validation protocol live in
:mod:`msk.core.stages.fusion.training`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from msk.core.io.checkpoint import load_state
from msk.core.models.train import ImageClassifier, TrainConfig, init_checkpoint
from msk.core.registry import build_fusion_head
from msk.core.specs import FUSION_DROPOUT, FUSION_HIDDEN

__all__ = ["FusionClassifier", "build_fusion_model"]


class FusionClassifier(ImageClassifier):
    """Encoder + fusion head: ``model(images [B, 1, S, S], meta [B, D] | None) -> logits``.

    :param head: a registered fusion head name (``msk plugins fusion_head``).
    :param meta_dim: encoded metadata width; 0 gives the image-only model.
    :param use_image: ``False`` gives the metadata-only model (``image_dim=0``): the encoder
        is built (checkpoints stay msk encoder checkpoints) but frozen and never run.
    :param encoder_options: keyword arguments for the encoder (e.g. a ViT's ``img_size``).
    """

    def __init__(self, encoder_name: str, num_classes: int, *, head: str = "concat",
                 meta_dim: int, use_image: bool = True, sobel: bool = False,
                 hidden: Sequence[int] = FUSION_HIDDEN, dropout: float = FUSION_DROPOUT,
                 encoder_options: dict[str, Any] | None = None):
        super().__init__(encoder_name, num_classes, sobel=sobel, encoder_options=encoder_options)
        self.use_image, self.meta_dim = use_image, meta_dim
        self.head = build_fusion_head(head, image_dim=self.encoder.feature_dim if use_image else 0,
                                      meta_dim=meta_dim, num_classes=num_classes,
                                      hidden=tuple(hidden), dropout=dropout)
        if not use_image:
            self.encoder.requires_grad_(False)  # not in the optimiser's way, nor DDP's
        #: saved in every checkpoint (``extra["architecture"]``) so that serving rebuilds the model
        self.architecture = {"head": head, "hidden": list(hidden), "dropout": float(dropout),
                             "meta_dim": int(meta_dim), "use_image": bool(use_image)}

    def forward(self, images: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        features = self.features(images) if self.use_image else None
        return self.head(features, meta)


def build_fusion_model(train: TrainConfig | dict[str, Any], num_classes: int, *,
                       head: str = "concat", meta_dim: int, use_image: bool = True,
                       hidden: Sequence[int] = FUSION_HIDDEN, dropout: float = FUSION_DROPOUT,
                       encoder_options: dict[str, Any] | None = None) -> FusionClassifier:
    """The model ``train`` describes (``encoder``, ``sobel``) with the encoder weights of
    ``train.init`` loaded, as :func:`msk.core.models.train.build_classifier` does for linear heads."""
    config = train if isinstance(train, TrainConfig) else TrainConfig.model_validate(train)
    ckpt, sobel = init_checkpoint(config)
    model = FusionClassifier(config.encoder, num_classes, head=head, meta_dim=meta_dim,
                             use_image=use_image, sobel=sobel, hidden=hidden, dropout=dropout,
                             encoder_options=config.encoder_options if encoder_options is None else encoder_options)
    if ckpt is not None and use_image:
        load_state(model.encoder, ckpt, arch=config.encoder)
    return model
