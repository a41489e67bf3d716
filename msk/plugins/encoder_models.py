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


class ImageNetEncoder(nn.Module):
    """A timm backbone fed as its ImageNet weights were trained: ``[B, 1, H, W] -> [B, feature_dim]``.

    msk's grey input (normalised with :data:`msk.core.data.augment.GREY_MEAN` / ``GREY_STD``) is
    mapped back to grey levels in [0, 1], **repeated** on the 3 RGB channels of the unchanged
    ImageNet stem and normalised with the weights' own mean and std (timm's ``pretrained_cfg`` of
    ``model_name``: ImageNet's for MobileNetV2, 0.5/0.5 for the TF EfficientNet-Lite ports), so a
    radiograph reaches the first convolution exactly as a grey photo did in ImageNet training.
    The normalisation belongs to the encoder, not to ``pretrained``: it is the same with random
    init and when the encoder is rebuilt from an msk checkpoint (serving, ``load_model``), so
    training and serving feed the same numbers. Sobel input (``in_chans=2``, DeepCluster) is not a
    grey level: it goes to timm's adapted stem (:func:`timm.models.adapt_input_conv`), unnormalised.

    :param pretrained: starting weights as for :class:`TimmEncoder` (a path, ``pkg:`` file or hub
        id; torchvision and ``efficientnet_pytorch`` files are renamed to timm's layout).
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, model_name: str, in_chans: int = 1, pretrained: str | bool | None = None, **options):
        super().__init__()
        from timm.models import get_pretrained_cfg

        from msk.core.data.augment import GREY_MEAN, GREY_STD

        self.model_name = model_name
        self.grey = in_chans == 1
        self.inner = TimmEncoder(model_name, in_chans=3 if self.grey else in_chans, pretrained=pretrained,
                                 **options)
        self.feature_dim = self.inner.feature_dim
        cfg = get_pretrained_cfg(model_name)
        mean, std = (cfg.mean, cfg.std) if cfg is not None else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        self.input_mean: tuple[float, ...] = tuple(float(m) for m in mean)
        self.input_std: tuple[float, ...] = tuple(float(s) for s in std)
        # x_msk * scale + shift == (grey - mean) / std, grey = x_msk * GREY_STD + GREY_MEAN
        scale = torch.tensor([GREY_STD / s for s in self.input_std]).view(1, 3, 1, 1)
        shift = torch.tensor([(GREY_MEAN - m) / s for m, s in zip(self.input_mean, self.input_std)]).view(1, 3, 1, 1)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grey:
            x = x.expand(-1, 3, -1, -1) * self.scale + self.shift
        return self.inner(x)

    def extra_repr(self) -> str:
        return f"grey repeated to RGB, mean={self.input_mean}, std={self.input_std}" if self.grey else ""


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
