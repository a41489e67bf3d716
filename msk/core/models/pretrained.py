"""Pretrained encoder weights from outside msk: a local weights file or a Hugging Face hub id.

The encoder option ``pretrained`` (``TrainConfig.encoder_options``, ``DeepClusterConfig.pretrained``,
a ``msk train transfer`` arm ``NAME=pretrained:VALUE``) names where an encoder's first weights
come from:

- a local file (``.pth``, ``.pt``, ``.bin``, ``.safetensors``) holding a timm/torchvision state
  dict (``torch.save(model.state_dict(), path)`` or a hub download): works air-gapped;
- a hub id, ``hf-hub:org/name`` or ``org/name`` (e.g. ``timm/resnet18.a1_in1k``; ``@revision``
  allowed), fetched with :mod:`huggingface_hub` into its cache (``HF_HOME``); a cached id loads
  without network, and ``HF_HUB_OFFLINE=1`` makes a missing one fail at once instead of retrying;
- ``true``: timm's default hub weights of the architecture.

timm loads them (:func:`timm_with_weights`): its checkpoint filter (e.g. a ViT's position
embedding resized to ``img_size``) and the first convolution adapted from the 3 RGB channels to
msk's 1 (grey: summed over RGB) or 2 (Sobel) input channels. The load is strict apart from the
classifier, which msk's encoders drop: weights of another architecture are an error, not a
silent partial load.

The weights are a starting point only. An encoder rebuilt to receive an msk checkpoint's
weights (:func:`load_model <msk.core.models.train.load_model>`, serving, embedding, resuming a run) is
built inside :func:`weights_from_checkpoint`, where :func:`msk.core.registry.build_encoder`
drops ``pretrained``: the checkpoint's weights win, and the weights file need not exist on a
serving machine. Every failure is a one-line :class:`PretrainedError` naming the value and the fix.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from msk.core.errors import MskError

__all__ = ["OPTION", "WEIGHT_SUFFIXES", "PretrainedError", "for_build", "locate",
           "timm_with_weights", "weights_from_checkpoint"]

#: The encoder option naming pretrained weights.
OPTION = "pretrained"

#: Suffixes of weights files (anything else that exists as a file is tried too).
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_EXAMPLE = "hf-hub:timm/resnet18.a1_in1k"
_FETCH = ("download the weights on a connected machine (`hf download {repo} model.safetensors "
          "--local-dir weights/`) and pass the file")

_FROM_CHECKPOINT: ContextVar[bool] = ContextVar("msk_weights_from_checkpoint", default=False)


class PretrainedError(MskError):
    """Pretrained weights that cannot be found, fetched or loaded into the encoder."""


@contextlib.contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Encoders built inside receive an msk checkpoint's weights next: ``pretrained`` is skipped."""
    token = _FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _FROM_CHECKPOINT.reset(token)


def for_build(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` as an encoder is built with them: without ``pretrained`` (or when it is
    ``None``/``false``) inside :func:`weights_from_checkpoint`."""
    options = dict(options)
    if OPTION in options and (_FROM_CHECKPOINT.get() or options[OPTION] in (None, False, "")):
        del options[OPTION]
    return options


def _where(value: Any) -> str:
    return f"encoder option pretrained={str(value)!r}"


def locate(value: str | os.PathLike) -> tuple[str, str]:
    """``("file", path)`` or ``("hub", "org/name[@revision]")`` for a ``pretrained`` value."""
    text = os.fspath(value).strip()
    if text.startswith("hf-hub:"):
        repo = text.removeprefix("hf-hub:")
        if not _HUB_ID.fullmatch(repo):
            raise PretrainedError(f"{_where(value)}: {repo!r} is not a hub id; write hf-hub:org/name, "
                                  f"e.g. {_EXAMPLE}")
        return "hub", repo
    path = Path(text).expanduser()
    if path.is_file():
        return "file", str(path)
    if path.is_dir():
        raise PretrainedError(f"{_where(value)} is a folder; name the weights file in it "
                              f"({', '.join(WEIGHT_SUFFIXES)})")
    if path.suffix in WEIGHT_SUFFIXES or text.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(text):
        raise PretrainedError(f"{_where(value)}: no such file; give an existing weights file "
                              f"({', '.join(WEIGHT_SUFFIXES)}) or a hub id such as {_EXAMPLE}")
    return "hub", text


def _hub_file(repo: str, value: Any) -> str:
    """The local path of ``repo``'s weights (``model.safetensors``, else ``pytorch_model.bin``),
    from the Hugging Face cache or downloaded into it."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo_id, _, revision = repo.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return hf_hub_download(repo_id, filename, revision=revision or None)
        except LocalEntryNotFoundError:  # offline or unreachable, and not in the cache
            why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no network"
            raise PretrainedError(f"{_where(value)}: not in the Hugging Face cache and {why}: "
                                  + _FETCH.format(repo=repo_id)) from None
        except GatedRepoError:
            raise PretrainedError(f"{_where(value)}: {repo_id} is gated; accept its licence on "
                                  "huggingface.co and log in (`hf auth login`)") from None
        except RepositoryNotFoundError:
            raise PretrainedError(f"{_where(value)}: no hub repository {repo_id} (or it is private); "
                                  f"check the id, e.g. {_EXAMPLE}") from None
        except EntryNotFoundError:
            continue
        except (HfHubHTTPError, OSError) as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise PretrainedError(f"{_where(value)}: the hub download failed ({first}); retry, or "
                                  + _FETCH.format(repo=repo_id)) from None
    raise PretrainedError(f"{_where(value)}: {repo_id} holds neither model.safetensors nor "
                          "pytorch_model.bin; download its weights file and pass the path")


def _is_msk_checkpoint(path: str) -> bool:
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch zip file: certainly not an msk checkpoint
        return False
    return isinstance(data, dict) and {"arch", "msk_version", "state_dict"} <= set(data)


def _state_dict(path: str, value: Any) -> dict[str, Any]:
    from timm.models import load_state_dict

    try:
        state = load_state_dict(path)
    except Exception as exc:  # unpickling, safetensors header, zip errors: all "not a state dict"
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise PretrainedError(f"{_where(value)}: not a readable state dict ({type(exc).__name__}: "
                              f"{first}); save one with torch.save(model.state_dict(), path)") from None
    if not isinstance(state, Mapping) or not state:
        raise PretrainedError(f"{_where(value)}: holds no weights; save them with "
                              "torch.save(model.state_dict(), path)")
    return dict(state)


def timm_with_weights(model_name: str, value: Any, **kwargs: Any):
    """``timm.create_model(model_name, pretrained=True, **kwargs)`` with the weights ``value``
    names (see the module docstring); ``kwargs`` hold ``num_classes``, ``in_chans`` and the
    architecture options. Raises :class:`PretrainedError`."""
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    if value is True:
        if cfg is None or not cfg.hf_hub_id:
            raise PretrainedError(f"{_where(value)}: timm has no default hub weights for "
                                  f"{model_name!r}; name a weights file or a hub id")
        kind, where = "hub", cfg.hf_hub_id
    else:
        kind, where = locate(value)
    path = where if kind == "file" else _hub_file(where, value)
    state = _state_dict(path, value)
    # msk's encoders have no classifier: drop the file's (as timm does when num_classes differs)
    # and load the rest strictly, so that another architecture's weights are an error.
    classifiers = (cfg.classifier if cfg is not None else None) or ()
    for name in (classifiers,) if isinstance(classifiers, str) else classifiers:
        state.pop(f"{name}.weight", None)
        state.pop(f"{name}.bias", None)
    overlay = {"state_dict": state, "num_classes": kwargs.get("num_classes", 0)}
    try:
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, KeyError, ValueError) as exc:  # load_state_dict, checkpoint filters
        hint = (" It is an msk checkpoint: start from it with `init:` instead"
                if kind == "file" and _is_msk_checkpoint(path) else
                " Use the encoder the weights were saved from")
        detail = " ".join(str(exc).split())[:240]
        raise PretrainedError(f"{_where(value)}: the weights do not fit encoder {model_name!r} "
                              f"({detail}).{hint}") from None
    for attr in ("pretrained_cfg", "default_cfg"):  # do not keep a second copy of the weights
        cfg_dict = getattr(model, attr, None)
        if isinstance(cfg_dict, dict):
            cfg_dict.pop("state_dict", None)
    return model
