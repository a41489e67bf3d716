"""The package layout's import rules (CONTRIBUTING.md, "Layout"), read from the source.

Every ``import`` counts, including the lazy ones inside functions: a lazy import is still a
dependency, only a deferred one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import msk

ROOT = Path(msk.__file__).parent
BUILDING_BLOCKS = ("msk.core.io", "msk.core.data", "msk.core.models", "msk.core.runtime")
ORCHESTRATORS = ("msk.core.cli", "msk.core.demo")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "msk" or name.startswith("msk.")}


MODULES = {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return ".".join(parts[:4]) if parts[:3] == ["msk", "core", "stages"] and len(parts) > 3 else None


def _within(module: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _violations(rule) -> list[str]:
    return sorted(f"{m} imports {i}" for m, imported in MODULES.items() for i in imported if rule(m, i))


def test_the_rules_read_real_imports():
    """The reader finds what is plainly there (so an empty violation list means something)."""
    assert "msk.core.errors" in MODULES["msk.core.cli"]
    assert any(_stage(i) for i in MODULES["msk.core.cli"])
    assert len(MODULES) > 80


def test_a_stage_never_imports_another_stage():
    assert _violations(lambda m, i: _stage(m) and _stage(i) and _stage(m) != _stage(i)) == []


def test_building_blocks_never_import_stages_or_orchestrators():
    assert _violations(lambda m, i: _within(m, BUILDING_BLOCKS)
                       and (_stage(i) or _within(i, ORCHESTRATORS))) == []


def test_serving_imports_models_not_training_code():
    assert _violations(lambda m, i: _within(m, "msk.serve")
                       and (_stage(i) or _within(i, ORCHESTRATORS))) == []


def test_core_never_imports_a_builtin_plugin_module():
    assert _violations(lambda m, i: _within(m, "msk.core") and _within(i, "msk.plugins")) == []


def test_core_never_imports_serving():
    """Serving sits on top of msk.core; the command line reaches it only through the ``serve`` command."""
    assert _violations(lambda m, i: _within(m, "msk.core") and not _within(m, ORCHESTRATORS)
                       and _within(i, "msk.serve")) == []


@pytest.mark.parametrize("package", ["io", "data", "models", "runtime", "stages"])
def test_every_package_says_what_it_holds(package):
    doc = ast.get_docstring(ast.parse((ROOT / "core" / package / "__init__.py").read_text()))
    assert doc and len(doc) > 40
