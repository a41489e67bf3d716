"""Encoder checkpoints: round trip, and clear errors for files that do not fit."""

from __future__ import annotations

import pytest
import torch

from msk.core.io.checkpoint import CheckpointError, load_checkpoint, load_encoder, load_state, save_checkpoint
from msk.core.registry import build_encoder


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder("tiny-cnn", in_chans=2)
    path = save_checkpoint(tmp_path / "ckpt" / "encoder.pt", encoder, arch="tiny-cnn", in_chans=2,
                           config={"k": 8, "sobel": True}, epoch=3,
                           assignments=torch.tensor([0, 1, 1]))
    return path, encoder


def test_round_trip(tiny_checkpoint):
    path, encoder = tiny_checkpoint
    loaded, ckpt = load_encoder(path)
    assert (ckpt.arch, ckpt.in_chans, ckpt.epoch, ckpt.config) == ("tiny-cnn", 2, 3, {"k": 8, "sobel": True})
    assert ckpt.msk_version and ckpt.path == path
    assert torch.equal(ckpt.extra["assignments"], torch.tensor([0, 1, 1]))
    x = torch.randn(2, 2, 32, 32)
    encoder.eval(), loaded.eval()
    assert torch.allclose(encoder(x), loaded(x))
    assert not list(path.parent.glob(".*.tmp"))


def test_loads_with_weights_only(tiny_checkpoint):
    path, _ = tiny_checkpoint
    data = torch.load(path, weights_only=True)
    assert {"arch", "in_chans", "state_dict", "config", "epoch", "msk_version"} <= set(data)


def test_another_architecture_is_a_clear_error(tiny_checkpoint):
    path, _ = tiny_checkpoint
    with pytest.raises(CheckpointError, match=r"holds a 'tiny-cnn' encoder; it cannot be loaded "
                                              r"into 'resnet18'"):
        load_encoder(path, arch="resnet18")
    with pytest.raises(CheckpointError, match="'tiny-cnn'.*'resnet18'"):
        load_state(build_encoder("resnet18", in_chans=2), load_checkpoint(path), arch="resnet18")


def test_weights_that_do_not_fit_are_a_clear_error(tiny_checkpoint):
    path, _ = tiny_checkpoint
    with pytest.raises(CheckpointError, match="do not fit encoder 'tiny-cnn' with in_chans=2"):
        load_state(build_encoder("tiny-cnn", in_chans=1), load_checkpoint(path), arch="tiny-cnn")


def test_files_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable msk checkpoint"):
        load_checkpoint(junk)
    plain = tmp_path / "plain.pt"
    torch.save(build_encoder("tiny-cnn").state_dict(), plain)
    with pytest.raises(CheckpointError, match="plain.pt: not an msk encoder checkpoint "
                                              r"\(missing arch, in_chans"):
        load_checkpoint(plain)
