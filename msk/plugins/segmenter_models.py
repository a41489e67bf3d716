"""The modules behind the built-in segmenters: ``segmentation-models-pytorch`` networks with one
input channel and one output channel (the lesion logit), built without downloading weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from msk.core.errors import ConfigError

#: registry name -> segmentation-models-pytorch architecture name.
ARCHITECTURES = {"unet": "Unet", "unetplusplus": "UnetPlusPlus"}


class SmpSegmenter(nn.Module):
    """An smp encoder-decoder: ``[B, in_chans, H, W]`` -> ``[B, 1, H, W]`` lesion logits.

    :param architecture: ``unet`` or ``unetplusplus``.
    :param encoder: an smp encoder name (``resnet34``) or any timm model as ``tu-<timm name>``.
    :param options: further smp keyword arguments (``encoder_depth``, ``decoder_channels``, ...).
    """

    def __init__(self, architecture: str, encoder: str = "resnet34", in_chans: int = 1, **options: Any):
        super().__init__()
        import segmentation_models_pytorch as smp

        if options.pop("pretrained", None) or options.pop("encoder_weights", None):
            raise ConfigError(f"segmenter {architecture!r}: pretrained encoder weights are not supported "
                              "yet; drop the option (msk builds segmenters from random weights)")
        if "decoder_channels" in options:
            options["decoder_channels"] = tuple(options["decoder_channels"])
        self.architecture, self.encoder_name, self.in_chans = architecture, encoder, int(in_chans)
        self.options = dict(options)
        try:
            self.net = smp.create_model(ARCHITECTURES[architecture], encoder_name=encoder, encoder_weights=None,
                                        in_channels=in_chans, classes=1, **options)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"segmenter {architecture!r} with encoder {encoder!r}: {exc}; encoders are smp "
                              "names (resnet34, efficientnet-b0, ...) or timm models as tu-<name> "
                              "(tu-resnet10t)") from None

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this."""
        return 2 ** int(self.options.get("encoder_depth", 5))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)
