"""Built-in lesion segmenters: U-Net and U-Net++ from ``segmentation-models-pytorch`` (the seed
thesis's models), encoder ``resnet34`` by default or any timm model as ``tu-<timm name>``, one
input channel, one output (the lesion logit), random initial weights (nothing is downloaded).
Torch and smp are imported only when one is built. See ``docs/segmentation.md``."""

from __future__ import annotations

from msk.core.hookspecs import hookimpl
from msk.core.specs import SegmenterSpec

#: options that build a small, fast network (plugin contract test, CPU smoke runs).
TINY = {"encoder": "tu-resnet10t", "encoder_depth": 3, "decoder_channels": [32, 16, 8]}


def _smp(name: str, in_chans: int = 1, encoder: str = "resnet34", **options):
    from msk.plugins.segmenter_models import SmpSegmenter

    return SmpSegmenter(name, encoder, in_chans=in_chans, **options)


@hookimpl
def msk_segmenters() -> list[SegmenterSpec]:
    return [
        SegmenterSpec("unet", _smp, "U-Net (smp), encoder resnet34 or any timm model as tu-<name>",
                      example_options=TINY),
        SegmenterSpec("unetplusplus", _smp, "U-Net++ (smp, nested dense skips), encoder resnet34 or "
                      "tu-<timm name>", example_options=TINY),
    ]
