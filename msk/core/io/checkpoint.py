"""Encoder checkpoints: the weights plus what is needed to rebuild the encoder that holds them.

A checkpoint is a ``torch.save`` of a plain dict (loadable with ``weights_only=True``)::

    {"arch": "resnet18",           # registry name of the encoder (msk.core.registry)
     "in_chans": 2,                 # channels the encoder takes (2 after a Sobel layer)
     "state_dict": {...},           # the encoder's weights
     "config": {...},               # the job's config (JSON-compatible), e.g. DeepClusterConfig
     "epoch": 3,                    # epochs completed
     "msk_version": "0.1.0",
     "extra": {...}}                # job-specific state (optimizer, last assignments, ...)

:func:`load_encoder` rebuilds the encoder from the registry and loads the weights; asking for an
architecture other than the one saved is a :class:`CheckpointError` that names both. A file that
is no checkpoint is refused by :func:`load_checkpoint` with a one-line :class:`CheckpointError`
naming it and why: empty, another kind of file (an msk index, random bytes), truncated, damaged
(the CRC-32 ``torch.save`` records for each member of its zip archive is checked, which
``torch.load`` does not do: flipped bits would load silently), or holding objects that
``weights_only`` refuses to unpickle.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msk.core.errors import MskError

__all__ = ["CheckpointError", "EncoderCheckpoint", "check_arch", "load_checkpoint",
           "load_encoder", "load_state", "save_checkpoint"]

REQUIRED_KEYS = ("arch", "in_chans", "state_dict", "config", "epoch", "msk_version")


class CheckpointError(MskError):
    """A checkpoint that cannot be read or does not fit the encoder it is loaded into."""


@dataclass
class EncoderCheckpoint:
    """The contents of a checkpoint file (see the module docstring)."""

    arch: str
    in_chans: int
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    epoch: int
    msk_version: str
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "in_chans": self.in_chans, "state_dict": self.state_dict,
                "config": self.config, "epoch": self.epoch, "msk_version": self.msk_version,
                "extra": self.extra}


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper."""
    return getattr(model, "module", model)


def save_checkpoint(path: str | os.PathLike, encoder: nn.Module, *, arch: str, in_chans: int,
                    config: dict[str, Any], epoch: int, **extra: Any) -> Path:
    """Write ``encoder``'s weights with their architecture to ``path`` (atomically).

    ``extra`` holds job-specific state; keep it to tensors, numbers, strings, lists and dicts so
    that the file loads with ``torch.load(weights_only=True)``.
    """
    from msk import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in _unwrap(encoder).state_dict().items()}
    ckpt = EncoderCheckpoint(arch, int(in_chans), state, dict(config), int(epoch), __version__,
                             dict(extra))
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(ckpt.to_dict(), tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> EncoderCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    damaged = _failing_crc(path)
    if damaged is not None:  # torch.load does not check the CRC-32 it writes: flipped bits load silently
        member = damaged.split("/", 1)[-1]  # without the archive's top folder
        raise CheckpointError(f"{path}: not a readable msk checkpoint: damaged (member {member} fails its "
                              "CRC-32 check: bit rot or a partial overwrite); copy it again or use an earlier "
                              "checkpoint")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and unpickler errors all mean "not a checkpoint"
        raise CheckpointError(f"{path}: not a readable msk checkpoint: {_unreadable(path, exc)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not an msk checkpoint (holds a {type(data).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CheckpointError(
            f"{path}: not an msk encoder checkpoint (missing {', '.join(missing)}); "
            "was it written by `msk cluster`?"
        )
    return EncoderCheckpoint(
        arch=str(data["arch"]), in_chans=int(data["in_chans"]), state_dict=data["state_dict"],
        config=dict(data["config"]), epoch=int(data["epoch"]),
        msk_version=str(data["msk_version"]), extra=dict(data.get("extra") or {}), path=path,
    )


def _failing_crc(path: Path) -> str | None:
    """The first member of the zip archive ``torch.save`` wrote whose CRC-32 does not match its
    bytes; ``None`` when all match or ``path`` is no readable zip archive (``torch.load`` says why)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except Exception:  # not a zip archive, truncated, unreadable
        return None


def _unreadable(path: Path, exc: Exception) -> str:
    """Why ``torch.load`` failed on ``path``, in one line: empty, another kind of file, truncated or
    damaged, or objects that ``weights_only`` refuses to unpickle."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if size == 0:
        return "the file is empty (0 bytes)"
    if head.startswith(b"MSKINDEX"):
        return "it is an msk index file (a retriever or recommender index), not a checkpoint"
    if not head.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive
        return (f"not a torch checkpoint (its {size} bytes do not start a zip archive: another file type "
                "or random bytes)")
    text = " ".join(str(exc).split())
    if "Weights only load failed" in text or isinstance(exc, pickle.UnpicklingError):
        return ("it holds objects other than tensors, numbers, strings, lists and dicts, which msk refuses "
                "to unpickle (that could run code); re-save it with msk")
    first = text.split(". ")[0] or type(exc).__name__
    return f"truncated or damaged ({first}); copy it again or use an earlier checkpoint"


def check_arch(ckpt: EncoderCheckpoint, arch: str) -> None:
    """Raise :class:`CheckpointError` unless ``ckpt`` was saved from an ``arch`` encoder."""
    if ckpt.arch != arch:
        raise CheckpointError(
            f"{ckpt.path or 'checkpoint'} holds a {ckpt.arch!r} encoder; it cannot be loaded "
            f"into {arch!r}. Use encoder {ckpt.arch!r}, or train a new checkpoint for {arch!r}."
        )


def load_state(encoder: nn.Module, ckpt: EncoderCheckpoint, *, arch: str) -> nn.Module:
    """Load ``ckpt``'s weights into ``encoder``, built as ``arch``; returns ``encoder``."""
    check_arch(ckpt, arch)
    where = ckpt.path or "checkpoint"
    try:
        _unwrap(encoder).load_state_dict(ckpt.state_dict)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{where}: the weights do not fit encoder {arch!r} with in_chans={ckpt.in_chans} "
            f"(saved by msk {ckpt.msk_version}): {str(exc).splitlines()[0]}"
        ) from None
    return encoder


def load_encoder(path: str | os.PathLike, *, arch: str | None = None) -> tuple[nn.Module, EncoderCheckpoint]:
    """Build the encoder a checkpoint was trained with and load its weights.

    :param arch: the architecture the caller expects; a different saved one is an error.
    :return: ``(encoder, checkpoint)``; ``checkpoint.config`` says how inputs were prepared
        (``sobel``, ``image_size``).
    """
    from msk.core.registry import build_encoder

    ckpt = load_checkpoint(path)
    check_arch(ckpt, arch or ckpt.arch)
    encoder = build_encoder(ckpt.arch, in_chans=ckpt.in_chans)
    return load_state(encoder, ckpt, arch=ckpt.arch), ckpt
