"""Paths in saved artefacts and config files: relative to where they are written.

* An artefact that records another file (``recommender.json``'s encoder checkpoint, the
  checkpoint in ``embeddings.parquet``, the ingest of ``sorter.json`` and ``embed.json``, the
  checkpoints in a tune ``best.yaml``) stores it **relative to the artefact's folder**
  (:func:`store_path`) and resolves it from there (:func:`resolve_stored`), so a run tree can be
  moved or copied as a whole. Artefacts written by older msk versions keep working: an absolute
  path is used as it is, and a relative one that does not exist beside the artefact is tried
  from the current directory (where older versions resolved it).
* A config file (``--config`` YAML, ``serve.yaml``) is read by
  :func:`msk.core.config.load_config`, which resolves its relative paths from the **file's
  folder** (:func:`resolve_config_paths`), never from the current directory. Options given on
  the command line stay relative to the current directory, as usual.

In a config, a field typed ``Path`` is always a path. The string options that may name a file
(``init``, ``pretrained``, ``encoder_options.pretrained``, the values of transfer ``arms`` and
recommender ``embeddings``) are resolved from the file's folder when that file exists there;
other values (``random``, ``hf-hub:org/name``, a registry name) are left as they are.
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["resolve_config_paths", "resolve_stored", "store_path", "stored_config_paths"]

#: String fields that may name a file (see the module docstring); ``pretrained:`` is the prefix
#: of a transfer arm of pretrained weights.
MAYBE_PATH_FIELDS = frozenset({"init", "pretrained"})
MAYBE_PATH_DICT_KEYS = {"encoder_options": "pretrained", "options": "pretrained"}
MAYBE_PATH_VALUES = frozenset({"arms", "embeddings"})
_PREFIX = "pretrained:"


def store_path(path: str | os.PathLike | None, folder: str | os.PathLike) -> str | None:
    """``path`` (absolute, or relative to the current directory) as written into an artefact in
    ``folder``: relative to ``folder``, POSIX separators."""
    if path is None:
        return None
    target = os.path.abspath(os.path.expanduser(os.fspath(path)))
    try:
        return Path(os.path.relpath(target, os.path.abspath(os.fspath(folder)))).as_posix()
    except ValueError:  # another drive (Windows): keep it absolute
        return target


def resolve_stored(value: str | os.PathLike | None, folder: str | os.PathLike) -> Path | None:
    """The absolute path of ``value`` read from an artefact in ``folder`` (see the module
    docstring for paths written by older versions)."""
    if value is None or value == "":
        return None
    raw = Path(os.path.expanduser(os.fspath(value)))
    if raw.is_absolute():
        return raw
    beside = Path(os.path.normpath(os.path.join(os.path.abspath(os.fspath(folder)), raw)))
    if not beside.exists() and raw.exists():  # an older msk stored it relative to its working directory
        return raw.absolute()
    return beside


def _is_path_type(annotation: Any) -> bool:
    if annotation is Path or (isinstance(annotation, type) and issubclass(annotation, os.PathLike)):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_path_type(a) for a in typing.get_args(annotation))
    return False


def _models_in(annotation: Any) -> list[type]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def _maybe_file(value: Any, base: Path) -> Any:
    """``value`` resolved from ``base`` if it is a relative path of an existing file there."""
    if not isinstance(value, str) or not value or ":" in value or value.startswith("~"):
        return value
    if Path(value).is_absolute():
        return value
    candidate = base / value
    return str(Path(os.path.normpath(candidate))) if candidate.exists() else value


def resolve_config_paths(cls: type, data: dict[str, Any], base: str | os.PathLike) -> dict[str, Any]:
    """A copy of the mapping ``data`` (a config file's, for the model ``cls``) whose relative
    paths are resolved from ``base`` (the file's folder)."""
    base = Path(os.path.abspath(os.fspath(base)))
    fields = getattr(cls, "model_fields", {})
    out = dict(data)
    for name, value in data.items():
        field = fields.get(name)
        if field is None or value is None:
            continue
        annotation = field.annotation
        if _is_path_type(annotation) and isinstance(value, (str, os.PathLike)):
            raw = os.path.expanduser(os.fspath(value))
            out[name] = raw if os.path.isabs(raw) else os.path.normpath(base / raw)
        elif models := _models_in(annotation):
            if isinstance(value, dict):
                out[name] = resolve_config_paths(models[0], value, base)
            elif isinstance(value, list):
                out[name] = [resolve_config_paths(models[0], v, base) if isinstance(v, dict) else v
                             for v in value]
        elif name in MAYBE_PATH_FIELDS:
            out[name] = _maybe_file(value, base)
        elif name in MAYBE_PATH_DICT_KEYS and isinstance(value, dict) and MAYBE_PATH_DICT_KEYS[name] in value:
            key = MAYBE_PATH_DICT_KEYS[name]
            out[name] = {**value, key: _maybe_file(value[key], base)}
        elif name in MAYBE_PATH_VALUES:
            out[name] = _map_values(value, lambda v: _maybe_pretrained(v, base))
    return out


def _maybe_pretrained(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value.startswith(_PREFIX):
        return _PREFIX + _maybe_file(value[len(_PREFIX):], base)
    return _maybe_file(value, base)


def _map_values(value: Any, fn) -> Any:
    if isinstance(value, dict):
        return {k: fn(v) for k, v in value.items()}
    if isinstance(value, list):
        return [fn(v) for v in value]
    return value


def stored_config_paths(dumped: dict[str, Any], cls: type, folder: str | os.PathLike) -> dict[str, Any]:
    """The inverse of :func:`resolve_config_paths` for writing a config file into ``folder``
    (e.g. a tune ``best.yaml``): existing files named by its paths become relative to ``folder``."""
    fields = getattr(cls, "model_fields", {})
    out = dict(dumped)

    def rel(v: Any) -> Any:
        if isinstance(v, str) and v.startswith(_PREFIX):
            return _PREFIX + rel(v[len(_PREFIX):])
        if isinstance(v, str) and v and ":" not in v and Path(v).expanduser().exists():
            return store_path(v, folder)
        return v

    for name, value in dumped.items():
        field = fields.get(name)
        if field is None or value is None:
            continue
        if _is_path_type(field.annotation) and isinstance(value, str):
            out[name] = store_path(value, folder)
        elif models := _models_in(field.annotation):
            if isinstance(value, dict):
                out[name] = stored_config_paths(value, models[0], folder)
            elif isinstance(value, list):
                out[name] = [stored_config_paths(v, models[0], folder) if isinstance(v, dict) else v
                             for v in value]
        elif name in MAYBE_PATH_FIELDS:
            out[name] = rel(value)
        elif name in MAYBE_PATH_DICT_KEYS and isinstance(value, dict) and MAYBE_PATH_DICT_KEYS[name] in value:
            key = MAYBE_PATH_DICT_KEYS[name]
            out[name] = {**value, key: rel(value[key])}
        elif name in MAYBE_PATH_VALUES:
            out[name] = _map_values(value, rel)
    return out
