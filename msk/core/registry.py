"""The plugin registry: loads built-in and third-party plugins and looks components up by name.

Modelled on datasette's ``plugins.py``: the built-in plugins in :data:`DEFAULT_PLUGINS` are
registered through the same hooks as third-party ones, which arrive through the entry-point
group ``msk``. Lookups take a kind and a name; names may be listed with shell wildcards like
timm's ``list_models("resnet*")``.
"""

from __future__ import annotations

import fnmatch
import importlib
import threading
from dataclasses import dataclass
from typing import Any

import pluggy

from msk.core import hookspecs
from msk.core.errors import MskError
from msk.core.specs import ComponentSpec, EntitySet, LesionDrawer, TuningTaskSpec

DEFAULT_PLUGINS = (
    "msk.plugins.entity_sets",
    "msk.plugins.lesion_drawers",
    "msk.plugins.datasets",
    "msk.plugins.encoders",
    "msk.plugins.segmenters",
    "msk.plugins.clusterers",
    "msk.plugins.retrievers",
    "msk.plugins.fusion_heads",
    "msk.plugins.tuning_tasks",
)

#: kind -> hook name, from :data:`msk.core.hookspecs.COMPONENT_KINDS` (pipeline order, as
#: ``msk plugins`` lists them).
KINDS: dict[str, str] = {k.name: k.hook for k in hookspecs.COMPONENT_KINDS}
_SPEC_TYPES: dict[str, type[Any]] = {k.name: k.spec for k in hookspecs.COMPONENT_KINDS}


class UnknownComponentError(MskError, LookupError):
    """A name that no registered plugin provides; the message lists the available names."""


class UnknownKindError(MskError, ValueError):
    """A component kind that msk does not have; the message lists the kinds."""


class PluginConflictError(MskError, RuntimeError):
    """Two plugins register the same name for the same kind."""


@dataclass(frozen=True)
class Registered:
    """A spec together with where it came from."""

    kind: str
    spec: Any  # one of the spec types of hookspecs.COMPONENT_KINDS
    plugin: str  # plugin (module) name
    origin: str  # "msk <version> (built-in)" or "<distribution> <version>"

    @property
    def name(self) -> str:
        return self.spec.name


class Registry:
    """All components contributed by the registered plugins, by kind and name."""

    def __init__(self, *, load_entrypoints: bool = True, plugins: tuple[str, ...] = DEFAULT_PLUGINS):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        for modname in plugins:
            self.pm.register(importlib.import_module(modname), name=modname)
        if load_entrypoints:
            self.pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        self._catalog: dict[str, dict[str, Registered]] | None = None
        self._apps: set[int] = set()  # typer apps the plugins' commands were added to

    # -- building the catalogue --------------------------------------------------------------

    def _origins(self) -> dict[int, str]:
        from msk import __version__

        origins = {id(p): f"msk {__version__} (built-in)" for p in self.pm.get_plugins()
                   if (self.pm.get_name(p) or "").startswith("msk.")}
        for plugin, dist in self.pm.list_plugin_distinfo():
            origins[id(plugin)] = f"{dist.project_name} {dist.version}"
        return origins

    def _build_catalog(self) -> dict[str, dict[str, Registered]]:
        origins = self._origins()
        catalog: dict[str, dict[str, Registered]] = {}
        for kind, hook_name in KINDS.items():
            entries: dict[str, Registered] = {}
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                specs = impl.function() or []
                for spec in specs:
                    _check_spec(kind, spec, impl.plugin_name)
                    if spec.name in entries:
                        raise PluginConflictError(
                            f"{kind} {spec.name!r} is registered by both "
                            f"{entries[spec.name].plugin!r} and {impl.plugin_name!r}"
                        )
                    entries[spec.name] = Registered(
                        kind, spec, impl.plugin_name,
                        origins.get(id(impl.plugin), "registered at run time"),
                    )
            catalog[kind] = dict(sorted(entries.items()))
        return catalog

    @property
    def catalog(self) -> dict[str, dict[str, Registered]]:
        if self._catalog is None:
            self._catalog = self._build_catalog()
        return self._catalog

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a plugin object or module at run time (tests, notebooks)."""
        self.pm.register(plugin, name=name)
        self._catalog = None

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._catalog = None

    def add_commands(self, app: Any) -> None:
        """Let every plugin add its subcommands to the typer ``app`` (hook ``msk_commands``),
        once per app."""
        if id(app) not in self._apps:
            self._apps.add(id(app))
            self.pm.hook.msk_commands(app=app)

    # -- lookups ------------------------------------------------------------------------------

    def _kind(self, kind: str) -> dict[str, Registered]:
        if kind not in KINDS:
            raise UnknownKindError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")
        return self.catalog[kind]

    def entries(self, kind: str, pattern: str = "*") -> list[Registered]:
        """Registered entries of ``kind`` whose name matches ``pattern`` (shell wildcards)."""
        return [r for n, r in self._kind(kind).items() if fnmatch.fnmatchcase(n, pattern)]

    def names(self, kind: str, pattern: str = "*") -> list[str]:
        """Names of ``kind`` matching ``pattern``, e.g. ``names("encoder", "resnet*")``."""
        return [r.name for r in self.entries(kind, pattern)]

    def lookup(self, kind: str, name: str) -> Registered:
        """The entry for ``name``: an exact name first, then a family (``timm/*``) it matches."""
        entries = self._kind(kind)
        key = name.strip()
        if key in entries:
            return entries[key]
        for entry in entries.values():
            if "*" in entry.name and fnmatch.fnmatchcase(key, entry.name):
                return entry
        available = ", ".join(entries) or "(none registered)"
        close = [n for n in entries if key.lower() in n.lower() or n.lower() in key.lower()]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownComponentError(
            f"no {kind.replace('_', ' ')} named {name!r}.{hint} Available: {available}. "
            f"Run `msk plugins` to see every registered component."
        )

    def get(self, kind: str, name: str) -> Any:
        """The spec registered for ``name`` (of the kind's spec type, see :data:`KINDS`)."""
        return self.lookup(kind, name).spec

    def build(self, kind: str, name: str, **options: Any) -> Any:
        """Build the component ``name`` of ``kind`` with ``options``."""
        spec = self.get(kind, name)
        if not isinstance(spec, ComponentSpec):
            raise TypeError(f"{kind} {name!r} is data, not a buildable component")
        return spec.build(name=name, **options)


def _check_spec(kind: str, spec: Any, plugin: str) -> None:
    expected = _SPEC_TYPES[kind]
    if not isinstance(spec, expected):
        raise TypeError(
            f"plugin {plugin!r} returned {type(spec).__name__} from {KINDS[kind]}; "
            f"expected {expected.__name__}"
        )
    if spec.name != spec.name.strip().lower() or not spec.name or spec.name.count("*") > 1:
        raise ValueError(
            f"plugin {plugin!r}: {kind} name {spec.name!r} must be non-empty, lower case, "
            f"without surrounding spaces and with at most one '*'"
        )


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry (built on first use)."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = Registry()
        return _registry


def reset_registry() -> None:
    """Forget the process-wide registry (the next :func:`get_registry` reloads plugins)."""
    global _registry
    with _lock:
        _registry = None


# Short forms for the common lookups.


def entity_set(name: str) -> EntitySet:
    return get_registry().get("entity_set", name)


def build_encoder(name: str, **options: Any) -> Any:
    """Inside :func:`msk.core.models.pretrained.weights_from_checkpoint` the option ``pretrained`` is
    dropped: an msk checkpoint's weights are loaded next."""
    from msk.core.models.pretrained import for_build

    return get_registry().build("encoder", name, **for_build(options))


def build_segmenter(name: str, **options: Any) -> Any:
    """A lesion segmenter (``unet``, ``unetplusplus``, ...); ``options`` as its spec says."""
    return get_registry().build("segmenter", name, **options)


def build_clusterer(name: str, **options: Any) -> Any:
    return get_registry().build("clusterer", name, **options)


def build_retriever(name: str, **options: Any) -> Any:
    return get_registry().build("retriever", name, **options)


def build_fusion_head(name: str, **options: Any) -> Any:
    return get_registry().build("fusion_head", name, **options)


def lesion_drawer(name: str) -> LesionDrawer:
    """The :class:`~msk.core.specs.LesionDrawer` of the entity ``name``."""
    return get_registry().get("lesion_drawer", name)


def tuning_task(name: str) -> TuningTaskSpec:
    """The :class:`~msk.core.specs.TuningTaskSpec` registered as ``name``."""
    return get_registry().get("tuning_task", name)


def dataset(name: str) -> Any:
    """The :class:`~msk.core.specs.DatasetSpec` registered as ``name``."""
    return get_registry().get("dataset", name)
