"""Pretrained weights from outside msk: files and hub ids, loaded by timm, offline.

No test touches the network: hub lookups run with ``HF_HUB_OFFLINE`` and an empty (or a
hand-made) Hugging Face cache in a temporary folder.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from msk.core.config import load_config
from msk.core.errors import ConfigError
from msk.core.models.pretrained import PretrainedError, locate
from msk.core.models.train import TrainConfig, fit_classifier, load_model, predict_logits
from msk.core.registry import build_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCH = "resnet10t"  # timm's smallest ResNet (deep stem: first conv conv1.0)


def timm_model(name: str = ARCH, seed: int = 0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False)  # 3 RGB channels, 1000-class head


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A timm resnet10t state dict (random init, as ImageNet weights would be saved), in the
    formats msk reads: torch.save (.pth, .bin, a wrapped checkpoint) and safetensors."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")
    state = timm_model().state_dict()
    torch.save(state, folder / "r10t.pth")
    torch.save(state, folder / "pytorch_model.bin")
    torch.save({"state_dict": state, "epoch": 90}, folder / "checkpoint.pt")
    save_file(state, folder / "r10t.safetensors")
    return folder, state


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE and an empty cache: a hub id resolves only from this cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def assert_weights_of(encoder, state, in_chans: int) -> None:
    """Every encoder tensor equals the file's; the first conv as timm adapts RGB to in_chans."""
    from timm.models import adapt_input_conv

    mine = encoder.backbone.state_dict()
    assert set(mine) == set(state) - {"fc.weight", "fc.bias"}
    for key, value in mine.items():
        if key == "conv1.0.weight":
            assert value.shape[1] == in_chans
            assert torch.allclose(value, adapt_input_conv(in_chans, state[key]))
            if in_chans == 1:  # grey: the sum over RGB
                assert torch.allclose(value, state[key].sum(1, keepdim=True))
        else:
            assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("name", ["r10t.pth", "r10t.safetensors", "pytorch_model.bin", "checkpoint.pt"])
@pytest.mark.parametrize("in_chans", [1, 2])
def test_a_weights_file_loads_with_the_first_conv_adapted(weights, name, in_chans):
    folder, state = weights
    encoder = build_encoder(f"timm/{ARCH}", in_chans=in_chans, pretrained=str(folder / name))
    assert_weights_of(encoder, state, in_chans)
    random = build_encoder(f"timm/{ARCH}", in_chans=in_chans)
    assert not torch.equal(random.backbone.layer1[0].conv1.weight, encoder.backbone.layer1[0].conv1.weight)
    assert "state_dict" not in encoder.backbone.pretrained_cfg  # no second copy of the weights
    assert encoder(torch.randn(2, in_chans, 32, 32)).shape == (2, encoder.feature_dim)


def test_weights_of_another_architecture_are_an_error(tmp_path, weights):
    folder, _ = weights
    with pytest.raises(PretrainedError, match=r"pretrained='.*r10t.pth': the weights do not fit encoder "
                                              r"'resnet18' .*Use the encoder the weights were saved from"):
        build_encoder("resnet18", pretrained=str(folder / "r10t.pth"))
    # resnet18 in resnet34's file: only unexpected keys, which timm alone would load silently
    torch.save(timm_model("resnet34").state_dict(), tmp_path / "r34.pth")
    with pytest.raises(PretrainedError, match=r"do not fit encoder 'resnet18' .*Unexpected key"):
        build_encoder("resnet18", pretrained=str(tmp_path / "r34.pth"))


@pytest.mark.parametrize(("make", "message"), [
    (None, r"pretrained='.*missing.pth': no such file; give an existing weights file"),
    ("folder", r"is a folder; name the weights file in it"),
    (b"not weights", r"not a readable state dict .*torch.save\(model.state_dict\(\), path\)"),
    ({}, r"holds no weights"),
])
def test_unusable_files_are_named(tmp_path, make, message):
    path = tmp_path / "missing.pth"
    if make == "folder":
        path.mkdir()
    elif isinstance(make, bytes):
        path.write_bytes(make)
    elif make is not None:
        torch.save(make, path)
    with pytest.raises(PretrainedError, match=message):
        build_encoder(f"timm/{ARCH}", pretrained=str(path))


def test_an_msk_checkpoint_is_sent_to_init(tmp_path):
    from msk.core.io.checkpoint import save_checkpoint

    encoder = build_encoder(f"timm/{ARCH}")
    path = save_checkpoint(tmp_path / "dc.pt", encoder, arch=f"timm/{ARCH}", in_chans=1, config={}, epoch=1)
    with pytest.raises(PretrainedError, match=r"It is an msk checkpoint: start from it with `init:` instead"):
        build_encoder(f"timm/{ARCH}", pretrained=str(path))


def test_locate_tells_files_from_hub_ids(weights):
    folder, _ = weights
    assert locate(folder / "r10t.pth") == ("file", str(folder / "r10t.pth"))
    assert locate("hf-hub:timm/resnet18.a1_in1k") == ("hub", "timm/resnet18.a1_in1k")
    assert locate("timm/resnet18.a1_in1k@main") == ("hub", "timm/resnet18.a1_in1k@main")
    for missing in ("weights/resnet18.safetensors", "./r.bin", "resnet18"):
        with pytest.raises(PretrainedError, match="no such file"):
            locate(missing)
    with pytest.raises(PretrainedError, match="is not a hub id; write hf-hub:org/name"):
        locate("hf-hub:resnet18")


@pytest.mark.parametrize("value", ["hf-hub:timm/resnet10t.c3_in1k", "timm/resnet10t.c3_in1k", True])
def test_a_hub_id_without_network_fails_at_once(offline_hub, value):
    began = time.perf_counter()
    with pytest.raises(PretrainedError, match=r"not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                                              r"download the weights on a connected machine \(`hf download "
                                              r"timm/resnet10t.c3_in1k model.safetensors"):
        build_encoder(f"timm/{ARCH}", pretrained=value)
    assert time.perf_counter() - began < 5


def test_a_cached_hub_id_loads_offline(offline_hub, weights):
    """What `hf download` (or a copied HF_HOME) leaves in the cache loads without network."""
    from safetensors.torch import save_file

    _, state = weights
    repo = offline_hub / "models--acme--r10t-xr"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    save_file(state, repo / "snapshots" / revision / "model.safetensors")
    encoder = build_encoder(f"timm/{ARCH}", pretrained="hf-hub:acme/r10t-xr")
    assert_weights_of(encoder, state, 1)


def test_tiny_cnn_has_no_pretrained_weights(weights):
    with pytest.raises(PretrainedError, match="encoder 'tiny-cnn' has no pretrained weights"):
        build_encoder("tiny-cnn", pretrained=str(weights[0] / "r10t.pth"))
    assert build_encoder("tiny-cnn", pretrained=None).feature_dim == 64  # None: random init


def test_a_checkpoint_rebuilds_without_the_weights_file(tmp_path, weights):
    """Training records `pretrained`; load_model, the embedder and the served models take the
    checkpoint's weights and never open the file (here deleted, as on a serving machine)."""
    from msk.core.data.squaring import SquaringConfig
    from msk.core.io.checkpoint import load_checkpoint
    from msk.core.models.embed import Embedder
    from msk.serve.classifier import load_classifier_model
    from msk.serve.config import ClassifyConfig, SortConfig
    from msk.serve.sorter import load_sorter_model

    from test_sorter import drawings  # tests/ is on sys.path (rootdir conftest)

    folder, state = weights
    file = tmp_path / "imagenet.safetensors"
    file.write_bytes((folder / "r10t.safetensors").read_bytes())
    images, kinds = drawings(16, seed=1)
    config = TrainConfig(encoder=f"timm/{ARCH}", encoder_options={"pretrained": str(file)}, image_size=32,
                         epochs=1, batch_size=8, augment=False)
    fitted = fit_classifier(images, kinds, 3, config, out=tmp_path / "run", classes=["a", "b", "c"])
    ckpt = load_checkpoint(fitted.best)
    assert ckpt.extra["encoder_options"] == {"pretrained": str(file)}
    assert ckpt.config["encoder_options"] == {"pretrained": str(file)}
    trained = ckpt.state_dict["backbone.layer1.0.conv1.weight"]
    assert not torch.equal(trained, state["layer1.0.conv1.weight"])  # fine-tuned away from the file
    expected = predict_logits(fitted.model, images, image_size=32)
    file.unlink()
    model, _ = load_model(fitted.best)
    assert torch.equal(model.encoder.backbone.layer1[0].conv1.weight, trained)
    np.testing.assert_allclose(predict_logits(model, images, image_size=32), expected, rtol=1e-5, atol=1e-5)
    assert Embedder(fitted.best).embed_images(images[:2]).shape[0] == 2
    assert load_sorter_model(SortConfig(checkpoint=fitted.best)).classes == ["a", "b", "c"]
    served = load_classifier_model(ClassifyConfig(checkpoint=fitted.best), SquaringConfig(image_size=32))
    assert torch.equal(served.model.encoder.backbone.layer1[0].conv1.weight, trained)
    with pytest.raises(PretrainedError, match="no such file"):  # a new training run does need the file
        build_encoder(f"timm/{ARCH}", pretrained=str(file))


def test_init_and_pretrained_are_one_start_or_the_other(weights):
    with pytest.raises(ConfigError, match="init and encoder_options.pretrained both name the starting weights"):
        load_config(TrainConfig, None, init="dc.pt", encoder_options={"pretrained": str(weights[0] / "r10t.pth")})


def test_deepcluster_encoder_starts_from_pretrained(weights):
    from msk.core.models.deepcluster import DeepClusterConfig, DeepClusterNet

    folder, state = weights
    net = DeepClusterNet(DeepClusterConfig(encoder=f"timm/{ARCH}", k=4, sobel=True,
                                           pretrained=str(folder / "r10t.safetensors")))
    assert_weights_of(net.encoder, state, 2)  # Sobel: 2 input channels


def test_a_torchvision_state_dict_loads(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18()  # random init; the same layout as the ImageNet file
    torch.save(model.state_dict(), tmp_path / "resnet18-tv.pth")
    encoder = build_encoder("resnet18", pretrained=str(tmp_path / "resnet18-tv.pth"))
    assert torch.equal(encoder.backbone.layer4[1].conv2.weight, model.layer4[1].conv2.weight)
    assert torch.allclose(encoder.backbone.conv1.weight, model.conv1.weight.sum(1, keepdim=True))
