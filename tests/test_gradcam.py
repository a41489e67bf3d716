"""Grad-CAM: the right layer, maps that point at the evidence, averaging and overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from msk.core.models.gradcam import grad_cam, mean_cam, overlay, save_overlays, target_layer
from msk.core.models.train import ImageClassifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Brightness(nn.Module):
    """Logit 0 = +mean brightness, logit 1 = -mean brightness, through a 1x1 conv map.

    Grad-CAM of class 0 is then the (normalised) input itself, and of class 1 all zero: the
    map's weight is negative and Grad-CAM keeps positive evidence only.
    """

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            conv.weight.fill_(1.0)
            conv.bias.fill_(2.0)  # normalised background (-2) -> 0
        self.encoder = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.encoder(x))


def square(at: tuple[int, int], size: int = 32) -> np.ndarray:
    image = np.zeros((size, size), np.uint8)
    image[at[0]:at[0] + 8, at[1]:at[1] + 8] = 255
    return image


def test_target_layer_is_the_last_spatial_map():
    assert isinstance(target_layer(ImageClassifier("tiny-cnn", 3), 32), nn.ReLU)
    resnet = ImageClassifier("resnet18", 3, sobel=True)
    assert target_layer(resnet, 64) is resnet.encoder.backbone.layer4
    assert isinstance(target_layer(Brightness(), 32), nn.ReLU)


def test_cam_points_at_the_evidence_for_the_class():
    images = np.stack([square((2, 2)), square((20, 22))])
    cams = grad_cam(Brightness(), images, [0, 0], image_size=32)
    assert cams.shape == (2, 32, 32) and cams.dtype == np.float32
    assert cams.max() == pytest.approx(1.0)
    for cam, (r, c) in zip(cams, [(2, 2), (20, 22)]):
        peak = np.unravel_index(cam.argmax(), cam.shape)
        assert r <= peak[0] < r + 8 and c <= peak[1] < c + 8
        assert cam[r:r + 8, c:c + 8].mean() > 0.9 and cam[(r + 16) % 32, (c + 16) % 32] < 0.1
    against = grad_cam(Brightness(), images, [1, 1], image_size=32)
    assert not against.any()  # no positive evidence for class 1: an all-zero map


def test_mean_cam_averages_models_per_image():
    images = np.stack([square((2, 2))])
    one = grad_cam(Brightness(), images, [0], image_size=32)
    np.testing.assert_allclose(mean_cam([Brightness(), Brightness()], images, [0], image_size=32), one)
    blind = Brightness()
    with torch.no_grad():
        blind.head.weight.mul_(-1)  # sees the evidence for class 1 instead
    np.testing.assert_allclose(mean_cam([Brightness(), blind], images, [0], image_size=32), one / 2)
    with pytest.raises(ValueError, match="at least one model"):
        mean_cam([], images, [0], image_size=32)


def test_grad_cam_of_a_trained_encoder_runs_on_any_size():
    model = ImageClassifier("tiny-cnn", 3, sobel=True)
    images = np.random.default_rng(0).integers(0, 255, (3, 48, 48), dtype=np.uint8)
    cams = grad_cam(model, images, [0, 1, 2], image_size=40, batch_size=2)
    assert cams.shape == (3, 40, 40) and 0 <= cams.min() and cams.max() <= 1
    with pytest.raises(ValueError, match="one target per image"):
        grad_cam(model, images, [0], image_size=40)


def test_overlay_keeps_the_radiograph_where_there_is_no_evidence(tmp_path):
    image = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    cam = np.zeros((16, 16), np.float32)
    cam[:8, :8] = 1.0
    rgb = overlay(image, cam)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[-1, -1], [image[-1, -1]] * 3)  # grey, untouched
    assert len(set(rgb[2, 2].tolist())) > 1  # coloured where the map is hot
    path = save_overlays(np.stack([image, image]), np.stack([cam, cam]), tmp_path / "g.png",
                         titles=["a", "b"], title="two")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="2 images, 1 maps"):
        save_overlays(np.stack([image, image]), cam[None], tmp_path / "x.png")
