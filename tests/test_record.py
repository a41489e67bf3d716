"""Self-describing checkpoints: every saved model carries a typed record (msk.core.models.record)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from msk.core.data.metadata import MetadataEncoder
from msk.core.errors import MskError
from msk.core.io.checkpoint import load_checkpoint, save_checkpoint
from msk.core.models.record import ModelRecord, data_fingerprint, read_record
from msk.core.models.train import TrainConfig, fit_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n: int = 24, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, size=(n, size, size)).astype(np.uint8)
    labels = np.arange(n) % 2
    images[labels == 1, 8:24, 8:24] = 255
    return images, labels


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{"encoder": "tiny-cnn", "image_size": 32, "epochs": 2, "batch_size": 8, "seed": 1, **kw})


def test_a_trained_classifier_says_what_it_is(tmp_path):
    images, labels = _data()
    result = fit_classifier(images[:16], labels[:16], 2, _config(), out=tmp_path / "run",
                            val=(images[16:], labels[16:]), classes=["hand", "foot"],
                            record={"task": "sorter", "entity_set": "samx-regions",
                                    "squaring": {"image_size": 32, "resize": "stretch"}})
    record = read_record(result.best)
    assert record.format == 1 and record.task == "sorter" and record.classes == ["hand", "foot"]
    assert record.entity_set == "samx-regions" and record.squaring.resize == "stretch"
    assert record.input.image_size == 32 and record.input.preprocess == _config().preprocess
    assert record.encoder.name == "tiny-cnn" and record.encoder.in_chans == 1 and not record.encoder.sobel
    assert record.data.fingerprint == data_fingerprint(images[:16], labels[:16]) and record.data.n_images == 16
    assert {"val_loss", "val_accuracy", "train_loss"} <= set(record.metrics)
    best_epoch = load_checkpoint(result.best).epoch
    assert record.metrics["val_loss"] == pytest.approx(result.history[best_epoch - 1]["val_loss"])
    # every epoch checkpoint carries one too
    assert read_record(tmp_path / "run" / "checkpoints" / "epoch-002.pt").task == "sorter"


def test_the_fingerprint_follows_the_data():
    images, labels = _data()
    same = data_fingerprint(images.copy(), labels.copy())
    assert same == data_fingerprint(images, labels)
    changed = images.copy()
    changed[3, 5, 7] ^= 1
    assert data_fingerprint(changed, labels) != same
    assert data_fingerprint(images, labels[::-1]) != same
    assert data_fingerprint(images.reshape(len(images), 16, 64), labels) != same  # same bytes, another shape


def test_an_older_checkpoint_is_converted_when_read(tmp_path):
    from msk.core.registry import build_encoder

    encoder = build_encoder("tiny-cnn", in_chans=1)
    old = save_checkpoint(tmp_path / "old.pt", encoder, arch="tiny-cnn", in_chans=1,
                          config={"image_size": 48, "sobel": False}, epoch=3,
                          head={"weight": torch.zeros(1)}, num_classes=2, classes=["a", "b"])
    record = read_record(old)
    assert record.format == 0 and record.task == "classifier" and record.classes == ["a", "b"]
    assert record.input.image_size == 48 and record.data.fingerprint is None
    assert "converted from an older checkpoint" in dict(record.summary())["format"]
    dc = save_checkpoint(tmp_path / "dc.pt", encoder, arch="tiny-cnn", in_chans=2,
                         config={"image_size": 48, "sobel": True}, epoch=1, assignments=torch.zeros(3))
    record = read_record(dc)
    assert record.task == "deepcluster" and record.encoder.in_chans == 2 and record.encoder.sobel


def test_msk_checkpoint_shows_the_record(tmp_path):
    from msk.core.cli import app

    images, labels = _data()
    result = fit_classifier(images, labels, 2, _config(epochs=1), out=tmp_path / "run", classes=["x", "y"])
    shown = CliRunner().invoke(app, ["checkpoint", str(result.best), "--json"])
    assert shown.exit_code == 0, shown.output
    assert ModelRecord.model_validate(json.loads(shown.output)).classes == ["x", "y"]
    table = CliRunner().invoke(app, ["checkpoint", str(result.best)])
    assert table.exit_code == 0 and "tiny-cnn" in table.output and "classifier" in table.output
    missing = CliRunner().invoke(app, ["checkpoint", str(tmp_path / "nope.pt")])
    assert isinstance(missing.exception, MskError) and "nope.pt does not exist" in str(missing.exception)


def test_a_fusion_model_is_served_from_its_checkpoint_alone(tmp_path):
    """The fitted metadata encoder travels in the record: serving needs no metadata_encoder file."""
    import pandas as pd

    from msk.core.data.squaring import SquaringConfig
    from msk.core.stages.fusion.training import fit_fusion
    from msk.serve.classifier import load_classifier_model
    from msk.serve.config import ClassifyConfig

    images, labels = _data()
    frame = pd.DataFrame({"image_id": [f"i{i}" for i in range(len(images))], "age": np.linspace(5, 80, len(images)),
                          "sex": np.where(labels == 1, "M", "F"), "site": "femur", "view": "frontal"})
    encoder = MetadataEncoder().fit(frame)
    result = fit_fusion(images, labels, encoder.transform(frame), 2, _config(epochs=1), out=tmp_path / "fusion",
                        head="concat", hidden=(8,), classes=["benign", "malignant"],
                        record={"metadata_encoder": encoder.to_dict()})
    record = read_record(result.best)
    assert record.task == "fusion" and record.head["head"] == "concat" and record.metadata_encoder is not None
    served = load_classifier_model(ClassifyConfig(checkpoint=result.best), SquaringConfig(image_size=32))
    assert served.classes == ["benign", "malignant"]
    assert served.encoder is not None and served.encoder.dim == encoder.dim
    np.testing.assert_allclose(served.encoder.transform(frame), encoder.transform(frame))
