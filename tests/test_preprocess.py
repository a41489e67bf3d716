"""Model-input preprocessing and augmentation: each transform does what it must, and training,
evaluation and serving feed a model exactly the same input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torchvision.transforms import v2

from msk.core.data.augment import (
    GREY_MEAN,
    GREY_STD,
    RandomBlur,
    RandomBorder,
    RandomGamma,
    RandomInvert,
    RandomJpeg,
    RandomLetterbox,
    RandomNoise,
    augmented_view,
    eval_transform,
    to_tensor,
    train_transform,
)
from msk.core.data.preprocess import (
    AugmentConfig,
    InputConfig,
    PreprocessConfig,
    clahe,
    percentile_window,
    preprocess_image,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Every transform off: the augmented view is then the plain resize + centre crop.
OFF = {"hflip": 0, "vflip": 0, "invert": 0, "crop": {"p": 0}, "rotation": {"p": 0}, "gamma": {"p": 0},
       "contrast": {"p": 0}, "blur": {"p": 0}, "noise": {"p": 0}, "jpeg": {"p": 0},
       "letterbox": {"p": 0}, "border": {"p": 0}}


def radiograph(size: int = 64, seed: int = 0, border: int = 0) -> np.ndarray:
    """A textured, asymmetric grey image (values 60-200) with black bars of ``border`` px left
    and right."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = 60 + 100 * xx + 30 * np.sin(12 * yy) + rng.normal(0, 4, (size, size))
    image[size // 4: size // 2, size // 5: size // 3] += 40  # a bright "bone" off-centre
    image = np.clip(image, 60, 200).astype(np.uint8)
    if border:
        image[:, :border] = 0
        image[:, -border:] = 0
    return image


def only(**steps) -> AugmentConfig:
    return AugmentConfig.model_validate({**OFF, **steps})


# -- preprocessing -----------------------------------------------------------------------------


def test_percentile_window_maps_foreground_percentiles_and_ignores_black_bars():
    framed = to_tensor(radiograph(border=16))
    fg = framed > 0.02
    out = percentile_window(framed, 2.0, 98.0)
    q = torch.quantile(out[fg], torch.tensor([0.02, 0.98]))
    assert float(q[0]) == pytest.approx(0.0, abs=0.02) and float(q[1]) == pytest.approx(1.0, abs=0.02)
    assert float(out[~fg].max()) == 0.0 and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    # the bars change nothing: the image without them gets the same window
    torch.testing.assert_close(out[:, :, 16:-16], percentile_window(framed[:, :, 16:-16], 2.0, 98.0))
    # counting the bars would have put the low percentile at 0: a different, darker window
    counted = percentile_window(framed, 2.0, 98.0, background_level=-1.0)
    assert float((counted[fg] - out[fg]).abs().max()) > 0.05


def test_window_undoes_a_source_s_contrast_and_brightness():
    x = to_tensor(radiograph())
    dull = x * 0.4 + 0.3  # a low-contrast, bright export of the same image
    config = PreprocessConfig()
    torch.testing.assert_close(preprocess_image(dull, config), preprocess_image(x, config), atol=2e-3, rtol=0)


def _local_contrast(x: torch.Tensor) -> float:
    """Mean standard deviation over 8 x 8 tiles."""
    tiles = x.reshape(x.shape[-2] // 8, 8, x.shape[-1] // 8, 8).permute(0, 2, 1, 3).reshape(-1, 64)
    return float(tiles.std(1).mean())


def test_clahe_raises_local_contrast_and_keeps_the_background_black():
    rng = np.random.default_rng(1)
    flat = 0.45 + 0.02 * rng.standard_normal((64, 64)) + 0.1 * np.linspace(0, 1, 64)[None]
    x = torch.from_numpy(flat.astype(np.float32)).clamp(0.05, 1)[None]
    assert _local_contrast(clahe(x)) > 3 * _local_contrast(x)
    x[:, :, :8] = 0.0  # a black bar
    out = preprocess_image(x, PreprocessConfig(window=False, clahe=True))
    assert float(out[:, :, :8].abs().max()) == 0.0
    assert _local_contrast(out[:, :, 8:]) > 2 * _local_contrast(x[:, :, 8:])


def test_gamma_is_monotone_and_bends_mid_grey():
    ramp = torch.linspace(0.03, 1, 256).reshape(1, 16, 16)
    for gamma in (0.5, 2.0):
        out = preprocess_image(ramp, PreprocessConfig(window=False, gamma=gamma)).flatten()
        assert bool((out[1:] > out[:-1]).all())
    assert float(preprocess_image(torch.full((1, 4, 4), 0.5), PreprocessConfig(window=False, gamma=2.0))[0, 0, 0]) \
        == pytest.approx(0.25)
    torch.manual_seed(0)
    out = RandomGamma(1.0, (0.5, 2.0))(ramp).flatten()
    assert bool((out[1:] >= out[:-1]).all()) and not torch.equal(out, ramp.flatten())


def test_preprocess_config_validation_and_none():
    with pytest.raises(ValidationError, match="below high_percentile"):
        PreprocessConfig(low_percentile=60, high_percentile=40)
    with pytest.raises(ValidationError):
        AugmentConfig(jpeg={"quality": (90, 20)})
    with pytest.raises(ValidationError):
        AugmentConfig(gamma={"gamma": (0.0, 1.0)})
    assert PreprocessConfig.none().is_identity and not PreprocessConfig().is_identity
    x = to_tensor(radiograph())
    assert preprocess_image(x, PreprocessConfig.none()) is x


# -- augmentation ------------------------------------------------------------------------------


def test_inversion_inverts():
    x = to_tensor(radiograph())
    torch.testing.assert_close(RandomInvert(1.0)(x), 1 - x)
    assert RandomInvert(0.0)(x) is x


def test_letterbox_leaves_black_bars_and_keeps_the_size():
    x = torch.ones(1, 40, 40)
    torch.manual_seed(0)
    for _ in range(10):
        out = RandomLetterbox(1.0, 2.0)(x)
        assert out.shape == x.shape
        bars_lr = float(out[0, :, 0].max()) == 0 and float(out[0, :, -1].max()) == 0
        bars_tb = float(out[0, 0].max()) == 0 and float(out[0, -1].max()) == 0
        assert bars_lr != bars_tb  # bars on one axis only
        assert float(out[0, 20, 20]) == pytest.approx(1.0)
        assert 0 < float((out == 0).float().mean()) <= 0.5 + 0.05  # at most 1 - 1/2 of the side


def test_border_blackens_edges_only():
    x = torch.ones(1, 40, 40)
    torch.manual_seed(1)
    for _ in range(10):
        out = RandomBorder(1.0, 0.2)(x)
        assert float(out[0, 20, 20]) == 1.0
        edges = torch.cat([out[0, 0], out[0, -1], out[0, :, 0], out[0, :, -1]])
        assert float(edges.min()) == 0.0 and float((out == 0).float().mean()) <= 1 - 0.6 ** 2


def test_jpeg_changes_pixels_but_keeps_the_mean():
    x = to_tensor(radiograph(seed=2))
    torch.manual_seed(0)
    out = RandomJpeg(1.0, (10, 10))(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert float((out - x).abs().max()) > 0.03
    assert float(out.mean()) == pytest.approx(float(x.mean()), abs=0.01)


def test_noise_and_blur():
    x = to_tensor(radiograph(seed=3))
    torch.manual_seed(0)
    for poisson in (0.0, 1.0):
        out = RandomNoise(1.0, (0.05, 0.05), poisson, (50.0, 50.0))(x)
        assert float((out - x).abs().mean()) > 0.01
        assert float(out.mean()) == pytest.approx(float(x.mean()), abs=0.02)
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    blurred = RandomBlur(1.0, (1.5, 1.5), image_size=64)(x)
    detail = lambda t: float((t[..., 1:] - t[..., :-1]).abs().mean())  # noqa: E731
    assert detail(blurred) < 0.6 * detail(x)


def test_flips_follow_the_config():
    image = radiograph(size=32)
    x = to_tensor(image)
    plain = eval_transform(32)(x)
    torch.testing.assert_close(augmented_view(32, only(hflip=1.0))(x), plain.flip(-1))
    torch.testing.assert_close(augmented_view(32, only(vflip=1.0))(x), plain.flip(-2))
    torch.testing.assert_close(augmented_view(32, only())(x), plain)
    default = AugmentConfig()
    assert default.vflip == 0 and default.hflip == 0.5
    assert not any(isinstance(t, v2.RandomVerticalFlip) for t in augmented_view(32, default).transforms)


def test_augmented_view_shape_dtype_range_and_seeded_determinism():
    everything = AugmentConfig(invert=1.0, letterbox={"p": 1}, border={"p": 1}, jpeg={"p": 1}, blur={"p": 1},
                               noise={"p": 1}, gamma={"p": 1}, contrast={"p": 1})
    view = augmented_view(24, everything, PreprocessConfig(clahe=True))
    x = to_tensor(radiograph(size=48, border=6))
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(view(x))
    out = outs[0]
    assert out.shape == (1, 24, 24) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert float(out.min()) >= (0 - GREY_MEAN) / GREY_STD - 1e-6
    assert float(out.max()) <= (1 - GREY_MEAN) / GREY_STD + 1e-6
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_train_transform_is_the_classic_pipeline():
    """``AugmentConfig.legacy()`` reproduces the augmentation msk had before, draw for draw."""
    from msk.core.data.augment import _normalize

    classic = v2.Compose([v2.RandomResizedCrop(32, scale=(0.4, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                          v2.RandomRotation(10.0), v2.ColorJitter(brightness=0.3, contrast=0.3),
                          v2.Lambda(_normalize)])
    x = to_tensor(radiograph(size=48))
    for seed in range(3):
        torch.manual_seed(seed)
        a = classic(x)
        torch.manual_seed(seed)
        assert torch.equal(a, train_transform(32)(x))


# -- configs and checkpoints -------------------------------------------------------------------


def test_old_train_configs_load():
    from msk.core.models.train import TrainConfig

    old = TrainConfig.model_validate({"encoder": "tiny-cnn", "augment": False, "aug_prob": 0.5})
    assert old.preprocess == PreprocessConfig() and old.augmentation == AugmentConfig()
    new = TrainConfig.model_validate({"preprocess": {"clahe": True}, "augmentation": {"jpeg": {"p": 0.5}}})
    assert new.preprocess.clahe and new.augmentation.jpeg.p == 0.5 and new.augmentation.jpeg.quality == (25, 90)
    assert TrainConfig.model_validate(new.model_dump(mode="json")) == new  # round trip (YAML, checkpoint)
    assert InputConfig.from_config({"image_size": 32}).preprocess.is_identity
    assert InputConfig.from_config({"image_size": 32, "preprocess": {"gamma": 2.0}}).preprocess.gamma == 2.0


def _capture(model):
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return seen


def test_training_evaluation_and_serving_feed_identical_inputs(tmp_path):
    from msk.core.models.sorter import SorterEnsemble
    from msk.core.models.train import TrainConfig, _Arrays, fit_classifier, load_model, predict_logits
    from msk.serve.config import SortConfig
    from msk.serve.sorter import load_sorter_model

    rng = np.random.default_rng(0)
    images = np.stack([radiograph(size=32, seed=s, border=4) for s in range(12)])
    labels = rng.integers(0, 2, 12)
    preprocess = PreprocessConfig(low_percentile=5, high_percentile=95, clahe=True, gamma=1.3)
    config = TrainConfig(encoder="tiny-cnn", image_size=16, epochs=1, batch_size=4, augment=True,
                         preprocess=preprocess, num_workers=0)
    fitted = fit_classifier(images, labels, 2, config, out=tmp_path, classes=["a", "b"])
    model, ckpt = load_model(fitted.best)
    assert model.input_config == InputConfig(image_size=16, preprocess=preprocess)
    assert ckpt.config["preprocess"] == preprocess.model_dump(mode="json")

    # what training's validation loader fed the network
    trained_view = torch.stack([_Arrays(images, labels, None, 16, False, 0.0, 0, preprocess=preprocess)[i][0][0]
                                for i in range(len(images))])
    seen = _capture(model)
    logits = predict_logits(model, images)  # size and preprocessing from the model itself
    torch.testing.assert_close(torch.cat(seen), trained_view, atol=0, rtol=0)
    unprocessed = torch.stack([eval_transform(16)(to_tensor(im)) for im in images])
    assert float((trained_view - unprocessed).abs().max()) > 0.1  # the preprocessing did something

    probs = SorterEnsemble([model], ["a", "b"], 16).predict_proba(images)
    served = load_sorter_model(SortConfig(checkpoint=fitted.best, classes=["a", "b"]))
    np.testing.assert_allclose(served.predict_proba(images), probs, atol=1e-6)
    np.testing.assert_allclose(probs.argmax(1), logits.argmax(1))


def test_old_checkpoint_without_preprocess_predicts_as_before(tmp_path):
    from msk.core.models.train import ImageClassifier, TrainConfig, _save, load_model, predict_logits

    torch.manual_seed(0)
    model = ImageClassifier("tiny-cnn", 3)
    _save(tmp_path / "new.pt", model, TrainConfig(encoder="tiny-cnn", image_size=16), epoch=1)
    raw = torch.load(tmp_path / "new.pt", weights_only=True)
    for key in ("preprocess", "augmentation"):
        del raw["config"][key]
    torch.save(raw, tmp_path / "old.pt")

    old, _ = load_model(tmp_path / "old.pt")
    assert old.input_config.preprocess.is_identity and old.input_config.image_size == 16
    images = np.stack([radiograph(size=32, seed=s, border=4) for s in range(4)])
    classic = v2.Compose([v2.Resize(16, antialias=True), v2.CenterCrop(16),
                          v2.Lambda(lambda t: (t - GREY_MEAN) / GREY_STD)])
    with torch.no_grad():
        before = model.eval()(torch.stack([classic(to_tensor(im)) for im in images])).numpy()
    np.testing.assert_allclose(predict_logits(old, images), before, atol=1e-6)
    new, _ = load_model(tmp_path / "new.pt")
    assert not np.allclose(predict_logits(new, images), before, atol=1e-4)


def test_gradcam_and_embedder_use_the_model_s_preprocessing(tmp_path):
    from msk.core.models.embed import Embedder
    from msk.core.models.gradcam import grad_cam
    from msk.core.models.train import ImageClassifier, TrainConfig, _save, load_model

    torch.manual_seed(0)
    preprocess = PreprocessConfig(gamma=0.5)
    _save(tmp_path / "m.pt", ImageClassifier("tiny-cnn", 2), TrainConfig(encoder="tiny-cnn", image_size=16,
                                                                         preprocess=preprocess), epoch=1)
    model, _ = load_model(tmp_path / "m.pt")
    images = np.stack([radiograph(size=32, seed=s) for s in range(3)])
    own = grad_cam(model, images, [0, 1, 0], image_size=16)
    np.testing.assert_allclose(own, grad_cam(model, images, [0, 1, 0], image_size=16, preprocess=preprocess))
    assert not np.allclose(own, grad_cam(model, images, [0, 1, 0], image_size=16,
                                         preprocess=PreprocessConfig.none()))
    embedder = Embedder(tmp_path / "m.pt")
    with torch.no_grad():
        feats = model.features(torch.stack([eval_transform(16, preprocess)(to_tensor(im)) for im in images]))
    expected = (feats / feats.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(embedder.embed_images(images), expected, atol=1e-5)


def test_deepcluster_resumes_old_runs_with_their_inputs():
    from msk.core.models.deepcluster import DeepClusterConfig, legacy_inputs

    fresh = DeepClusterConfig(encoder="tiny-cnn", k=4)
    old = legacy_inputs(fresh, {"encoder": "tiny-cnn", "k": 4, "image_size": 128})
    assert old.preprocess.is_identity and old.augmentation == AugmentConfig.legacy()
    assert legacy_inputs(fresh, fresh.model_dump(mode="json")) == fresh
    chosen = DeepClusterConfig(encoder="tiny-cnn", k=4, preprocess={"clahe": True})
    assert legacy_inputs(chosen, {"k": 4}).preprocess.clahe
