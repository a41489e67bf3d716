"""Supervised training: learns, checkpoints, resumes, initialises from a checkpoint, stops early."""

from __future__ import annotations

import numpy as np
import pytest

from msk.core.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from msk.core.models.train import (
    TrainConfig,
    TrainError,
    build_classifier,
    class_weights,
    fit_classifier,
    load_model,
    predict_logits,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def bars(n: int, seed: int = 0, size: int = 32):
    """Three classes: a horizontal bar, a vertical bar, a bright square (with noise)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(n, size, size)).astype(np.uint8)
    labels = np.arange(n) % 3
    for img, y in zip(images, labels):
        o = rng.integers(4, size - 12)
        if y == 0:
            img[o:o + 4, 2:-2] = 220
        elif y == 1:
            img[2:-2, o:o + 4] = 220
        else:
            img[o:o + 10, o:o + 10] = 220
    return images, labels


def fast(**kw) -> TrainConfig:
    return TrainConfig(**{"encoder": "tiny-cnn", "image_size": 32, "epochs": 4, "batch_size": 16,
                          "lr": 5e-3, "augment": False, **kw})


def test_learns_checkpoints_and_predicts(tmp_path):
    x, y = bars(96)
    vx, vy = bars(48, seed=1)
    res = fit_classifier(x, y, 3, fast(epochs=6), out=tmp_path, val=(vx, vy))
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4, 5, 6]
    acc = (predict_logits(res.model, vx, image_size=32).argmax(1) == vy).mean()
    assert acc >= 0.8, acc
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch-*.pt"))
    assert kept == ["epoch-006.pt"]  # best + last only by default
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["best.pt"]
    assert (tmp_path / "history.csv").read_text().startswith("epoch,train_loss,val_loss")
    model, ckpt = load_model(res.best)
    assert ckpt.epoch == res.best_epoch
    np.testing.assert_allclose(predict_logits(model, vx[:5], image_size=32),
                               predict_logits(res.model, vx[:5], image_size=32), atol=1e-5)


def test_class_names_and_per_epoch_scores_are_recorded(tmp_path):
    x, y = bars(48)
    seen = []

    def score(model):  # runs after every epoch, model in eval mode
        seen.append(model.training)
        return {"val_custom": float(len(seen))}

    res = fit_classifier(x, y, 3, fast(epochs=2), out=tmp_path, classes=["h", "v", "sq"], score=score)
    assert seen == [False, False] and [r["val_custom"] for r in res.history] == [1.0, 2.0]
    assert load_checkpoint(res.best).extra["classes"] == ["h", "v", "sq"]
    with pytest.raises(TrainError, match="2 class names for 3 classes"):
        fit_classifier(x, y, 3, fast(epochs=1), out=tmp_path / "other", classes=["h", "v"])


def test_encoder_options_are_recorded_so_checkpoints_rebuild_alone(tmp_path):
    """A ViT trained at 24 px (img_size, patch_size options) loads and embeds from its checkpoint."""
    from msk.core.models.embed import Embedder

    x, y = bars(24, size=24)
    options = {"img_size": 24, "patch_size": 8, "depth": 1}
    res = fit_classifier(x, y, 3, fast(encoder="timm/vit_tiny_patch16_224", encoder_options=options,
                                       image_size=24, epochs=1), out=tmp_path)
    assert load_checkpoint(res.best).extra["encoder_options"] == options
    model, _ = load_model(res.best)
    np.testing.assert_allclose(predict_logits(model, x[:4], image_size=24),
                               predict_logits(res.model, x[:4], image_size=24), atol=1e-5)
    assert Embedder(res.best).embed_images(x[:4]).shape == (4, model.encoder.feature_dim)


def test_resume_continues_after_last_epoch(tmp_path):
    x, y = bars(48)
    fit_classifier(x, y, 3, fast(epochs=2, keep_checkpoints=1), out=tmp_path)
    res = fit_classifier(x, y, 3, fast(epochs=3, keep_checkpoints=None), out=tmp_path)
    assert [r["epoch"] for r in res.history] == [1, 2, 3]
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch-*.pt"))
    assert kept == ["epoch-002.pt", "epoch-003.pt"]  # epoch 1 pruned by the first run
    with pytest.raises(TrainError, match="holds a run of a 'tiny-cnn' encoder with 3 classes"):
        fit_classifier(x, y % 2, 2, fast(epochs=3), out=tmp_path)


def test_a_resumed_run_repeats_the_uninterrupted_one(tmp_path):
    """With augmentation (torch's random transforms): epochs 3-4 after a stop at epoch 2 are the
    epochs 3-4 of a run that never stopped."""
    x, y = bars(48)
    config = fast(epochs=4, augment=True, aug_prob=1.0)
    whole = fit_classifier(x, y, 3, config, out=tmp_path / "whole").history
    fit_classifier(x, y, 3, config.model_copy(update={"epochs": 2}), out=tmp_path / "resumed")
    resumed = fit_classifier(x, y, 3, config, out=tmp_path / "resumed").history
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in whole]


def test_early_stopping(tmp_path):
    x, y = bars(48)
    rng = np.random.default_rng(0)
    res = fit_classifier(x, y, 3, fast(epochs=30, patience=2, lr=0.05), out=tmp_path,
                         val=(x[:24], rng.integers(0, 3, 24)))  # unlearnable validation labels
    assert len(res.history) < 30
    assert res.history[-1]["epoch"] - res.best_epoch == 2


def test_init_from_checkpoint_and_wrong_architecture(tmp_path):
    x, y = bars(48)
    first = fit_classifier(x, y, 3, fast(epochs=1), out=tmp_path / "a")
    model = build_classifier(fast(init=str(first.best)), num_classes=5)
    ref = load_checkpoint(first.best).state_dict
    for k, v in model.encoder.state_dict().items():
        assert (v == ref[k]).all(), k
    with pytest.raises(CheckpointError, match="holds a 'tiny-cnn' encoder; it cannot be loaded into 'resnet18'"):
        build_classifier(fast(init=str(first.best), encoder="resnet18"), num_classes=3)
    enc_only = save_checkpoint(tmp_path / "enc.pt", model.encoder, arch="tiny-cnn", in_chans=1,
                               config={}, epoch=1)
    with pytest.raises(CheckpointError, match="without a classifier head"):
        load_model(enc_only)


def test_median_frequency_weights():
    w = class_weights(np.array([0] * 8 + [1] * 2 + [2] * 4), 4)
    np.testing.assert_allclose(w, [0.5, 2.0, 1.0, 0.0])


@pytest.mark.parametrize("images, labels, match", [
    (np.zeros((4, 8, 8), np.float32), [0, 1, 0, 1], "must be uint8"),
    (np.zeros((4, 8, 8), np.uint8), [0, 1, 0], "3 labels for 4 images"),
    (np.zeros((4, 8, 8), np.uint8), [0, 1, 0, 7], "labels must lie in 0..2"),
])
def test_bad_input(tmp_path, images, labels, match):
    with pytest.raises(TrainError, match=match):
        fit_classifier(images, labels, 3, fast(), out=tmp_path)


@pytest.mark.slow
def test_ray_train_two_workers(ray_session, tmp_path):
    x, y = bars(64)
    res = fit_classifier(x, y, 3, fast(epochs=2, num_workers=2), out=tmp_path, val=(x[:16], y[:16]))
    assert [r["epoch"] for r in res.history] == [1, 2]
    # the checkpoints live once, in the run folder: best + last, no copy under Ray Train's ray/
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pt")) == [
        "best.pt", "checkpoints/epoch-002.pt"]
