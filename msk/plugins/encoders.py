"""Built-in image encoders: ResNets (the paper's backbones), any timm model by name, and a tiny
CNN for tests and CPU smoke runs. They start from random weights, or, with the option
``pretrained`` (timm encoders only), from a weights file or a Hugging Face hub id
(:mod:`msk.core.models.pretrained`); msk's own checkpoints (DeepCluster, sorter) are loaded by the
training code. Torch is imported only when one is built."""

from __future__ import annotations

from msk.core.hookspecs import hookimpl
from msk.core.specs import EncoderSpec


def _timm(name: str, in_chans: int = 1, **options):
    from msk.plugins.encoder_models import TimmEncoder

    return TimmEncoder(name.removeprefix("timm/"), in_chans=in_chans, **options)


def _tiny(name: str, in_chans: int = 1, **options):
    from msk.plugins.encoder_models import TinyCNN

    if options.pop("pretrained", None):
        from msk.core.models.pretrained import PretrainedError

        raise PretrainedError(f"encoder {name!r} has no pretrained weights; drop the option pretrained "
                              "or use a timm encoder such as resnet18")

    return TinyCNN(in_chans=in_chans, **options)


@hookimpl
def msk_encoders() -> list[EncoderSpec]:
    resnets = [
        EncoderSpec(n, _timm, f"{n} from timm, random init or `pretrained`, {d}-d features")
        for n, d in (("resnet18", 512), ("resnet34", 512), ("resnet50", 2048))
    ]
    return resnets + [
        EncoderSpec("tiny-cnn", _tiny, "4-block CNN, 64-d features; tests and CPU smoke runs"),
        EncoderSpec("timm/*", _timm, "any timm model by name, e.g. timm/vit_small_patch16_224",
                    example="timm/resnet10t"),
    ]
