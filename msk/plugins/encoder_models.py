"""Encoder modules behind the built-in ``msk_encoders`` specs (imported only when built)."""

from __future__ import annotations

import torch
from torch import nn


class TimmEncoder(nn.Module):
    """A timm backbone with its classifier removed: ``[B, C, H, W] -> [B, feature_dim]``.

    :param pretrained: starting weights: a weights file, a hub id or ``True`` (timm's default
        weights), loaded as :func:`msk.core.models.pretrained.timm_with_weights` explains; ``None``:
        random init.
    """

    def __init__(self, model_name: str, in_chans: int = 1, pretrained: str | bool | None = None, **options):
        super().__init__()
        import timm

        self.model_name = model_name
        if pretrained:
            from msk.core.models.pretrained import timm_with_weights

            self.backbone = timm_with_weights(model_name, pretrained, num_classes=0, in_chans=in_chans, **options)
        else:
            self.backbone = timm.create_model(
                model_name, pretrained=False, num_classes=0, in_chans=in_chans, **options
            )
        self.feature_dim = int(self.backbone.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


class TinyCNN(nn.Module):
    """Four strided conv blocks and global pooling (~0.1 M parameters): tests and smoke runs."""

    def __init__(self, in_chans: int = 1, width: int = 16, feature_dim: int = 64):
        super().__init__()
        chans = [in_chans, width, width * 2, width * 4, feature_dim]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)
