"""Typed configuration: every job's options are a pydantic model, loadable from YAML.

Each job defines its model next to its code (``IngestConfig`` in :mod:`msk.core.stages.ingest.pipeline`, ...)
by subclassing :class:`MskConfig`; :func:`load_config` reads a YAML file into it (relative paths
from the file's folder) and applies command-line overrides, with errors that name the file and
the offending field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from msk.core.errors import ConfigError

C = TypeVar("C", bound="MskConfig")


class MskConfig(BaseModel):
    """Base of msk's configs: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def to_yaml(self, folder: str | Path | None = None) -> str:
        """The config as YAML; with ``folder``, the YAML of a config file written there: paths of
        existing files relative to it (read back by :func:`load_config` from any directory)."""
        data = self.model_dump(mode="json")
        if folder is not None:
            from msk.core.io.paths import stored_config_paths

            data = stored_config_paths(data, type(self), folder)
        return yaml.safe_dump(data, sort_keys=False)


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (empty file: ``{}``); a :class:`ConfigError` names
    the file when it is missing, not YAML, or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping of option: value, got {type(loaded).__name__}")
    return loaded


def load_config(cls: type[C], path: str | Path | None = None, **overrides: Any) -> C:
    """Build ``cls`` from the YAML file at ``path`` (optional) updated with non-None ``overrides``.

    Relative paths in the file are read from the file's folder, not the current directory
    (:func:`msk.core.io.paths.resolve_config_paths`); ``overrides`` are taken as they are.
    """
    from msk.core.io.paths import resolve_config_paths

    data: dict[str, Any] = {}
    where = "options"
    if path is not None:
        where = str(path)
        data.update(resolve_config_paths(cls, read_yaml_mapping(path), Path(path).parent))
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{where}: invalid {cls.__name__}: {problems}") from None
