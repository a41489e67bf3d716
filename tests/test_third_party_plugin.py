"""A third-party package that registers through the entry-point group ``msk`` is picked up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN = textwrap.dedent('''
    from msk.core.hookspecs import hookimpl
    from msk.core.specs import Entity, EntitySet, Malignancy

    @hookimpl
    def msk_entity_sets():
        return [EntitySet("soft-tissue-demo", "tumour", (
            Entity("lipoma", "LIP", malignancy=Malignancy.BENIGN, sites=("femur",)),
            Entity("liposarcoma", "LPS", malignancy=Malignancy.MALIGNANT, sites=("femur",)),
        ))]
''')


def _write_package(root: Path) -> Path:
    pkg = root / "msk-softtissue"
    (pkg / "msk_softtissue").mkdir(parents=True)
    (pkg / "msk_softtissue" / "__init__.py").write_text(PLUGIN)
    (pkg / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "msk-softtissue"
        version = "0.3.1"
        [project.entry-points.msk]
        softtissue = "msk_softtissue"
    '''))
    return pkg


@pytest.mark.slow
def test_installed_plugin_is_listed_and_usable(tmp_path):
    pkg = _write_package(tmp_path)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(pkg)],
        check=True, capture_output=True, text=True,
    )
    code = textwrap.dedent('''
        import sys
        sys.path.insert(0, sys.argv[1])
        from msk.core.registry import get_registry
        entry = get_registry().lookup("entity_set", "soft-tissue-demo")
        print(entry.plugin, "|", entry.origin, "|", entry.spec.names)
    ''')
    out = subprocess.run([sys.executable, "-c", code, str(target)], check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "softtissue | msk-softtissue 0.3.1 | ['lipoma', 'liposarcoma']"

    listing = subprocess.run(
        [sys.executable, "-m", "msk", "plugins", "entity_set"], check=True, capture_output=True,
        text=True, env={**os.environ, "PYTHONPATH": str(target), "COLUMNS": "200"},
    ).stdout
    assert "soft-tissue-demo" in listing and "msk-softtissue 0.3.1" in listing

    # The plugin contract test runs third-party plugins too.
    contract = Path(__file__).with_name("test_plugin_contract.py")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(contract),
         "-k", "soft-tissue-demo"], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout + run.stderr
