"""The plugin registry: lookups, wildcards, clear errors, conflicts, origins."""

from __future__ import annotations

import pytest

from msk.core import hookspecs
from msk.core.errors import MskError
from msk.core.registry import (
    KINDS,
    PluginConflictError,
    Registry,
    UnknownComponentError,
    entity_set,
    get_registry,
)
from msk.core.specs import ClustererSpec, EncoderSpec


def test_every_kind_has_builtins():
    reg = get_registry()
    assert list(KINDS) == [k.name for k in hookspecs.COMPONENT_KINDS]
    for kind in KINDS:
        assert reg.names(kind), f"no built-in {kind}"


def _hookspecs():
    return {name: f for name, f in vars(hookspecs).items()
            if callable(f) and hasattr(f, f"{hookspecs.PROJECT}_spec")}


def test_every_hook_is_documented_typed_and_used():
    """Like datasette's test_plugin_hooks_are_documented: a hook without a docstring, without
    annotations, or that neither a component kind nor the CLI consumes, fails here."""
    import inspect
    import typing

    specs = _hookspecs()
    assert len(specs) >= 9
    for name, hook in specs.items():
        assert inspect.getdoc(hook) and len(inspect.getdoc(hook)) > 40, f"{name} has no docstring"
        assert "return" in hook.__annotations__, f"{name} has no return annotation"
        params = [p for p in inspect.signature(hook).parameters]
        assert all(p in hook.__annotations__ for p in params), f"{name}: annotate every parameter"
    by_hook = {k.hook: k for k in hookspecs.COMPONENT_KINDS}
    assert set(specs) == {*by_hook, "msk_commands"}
    for hook_name, kind in by_hook.items():
        assert typing.get_type_hints(specs[hook_name])["return"] == list[kind.spec], hook_name
        assert kind.spec.__name__ in inspect.getdoc(specs[hook_name]), f"{hook_name}: name the spec in the doc"


def test_builtin_hookimpls_are_typed_as_their_hooks():
    import typing

    reg = Registry(load_entrypoints=False)
    for kind in hookspecs.COMPONENT_KINDS:
        for impl in getattr(reg.pm.hook, kind.hook).get_hookimpls():
            hints = typing.get_type_hints(impl.function)
            assert hints.get("return") == list[kind.spec], f"{impl.plugin_name}.{kind.hook}: annotate -> list[...]"


def test_every_hook_has_a_section_in_the_plugin_docs():
    """As datasette's test_plugin_hooks_are_documented: docs/plugins.md has a heading per hook."""
    from pathlib import Path

    docs = (Path(hookspecs.__file__).parents[2] / "docs" / "plugins.md").read_text()
    missing = [name for name in _hookspecs() if f"### {name}" not in docs]
    assert not missing, f"hooks without a section in docs/plugins.md: {missing}"


def test_core_never_imports_a_builtin_plugin():
    """msk.core reaches built-in plugins only through the registry (which names them as strings)."""
    import ast
    from pathlib import Path

    core = Path(hookspecs.__file__).parent
    offenders = []
    for path in sorted(core.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(core)}:{node.lineno} {n}" for n in names
                          if n == "msk.plugins" or n.startswith("msk.plugins.")]
    assert not offenders, offenders


def test_plugins_add_subcommands():
    import typer
    from typer.testing import CliRunner

    class Commands:
        @hookspecs.hookimpl
        def msk_commands(self, app):
            @app.command("hello")
            def hello(name: str = typer.Option("world")) -> None:
                """Say hello. [b]Example[/b]: msk hello --name x"""
                typer.echo(f"hello {name}")

    app = typer.Typer()

    @app.command()
    def other() -> None:
        """An existing command."""

    reg = Registry(load_entrypoints=False)
    reg.register(Commands(), name="commands")
    reg.add_commands(app)
    result = CliRunner().invoke(app, ["hello", "--name", "msk"])
    assert result.exit_code == 0 and result.stdout.strip() == "hello msk"


def test_names_with_wildcards():
    reg = get_registry()
    assert reg.names("encoder", "resnet*") == ["resnet18", "resnet34", "resnet50"]
    assert reg.names("encoder", "nothing*") == []


def test_unknown_name_lists_available_and_suggests():
    with pytest.raises(UnknownComponentError) as exc:
        get_registry().get("encoder", "resnet")
    msg = str(exc.value)
    assert "no encoder named 'resnet'" in msg
    assert "Did you mean resnet18, resnet34, resnet50" in msg
    assert "tiny-cnn" in msg
    assert isinstance(exc.value, MskError)  # the CLI prints it as one line, exit 2


@pytest.mark.slow
def test_a_mistyped_encoder_is_one_line_and_exit_2_before_any_data_is_read(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "c.yaml"
    config.write_text("encoder: resnet\n")
    result = subprocess.run([sys.executable, "-m", "msk", "train", "sorter", str(tmp_path / "no-ingest"),
                             str(tmp_path / "no-labels.csv"), str(tmp_path / "out"), "--config", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "resnet" in result.stderr


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown component kind 'encoders'"):
        get_registry().names("encoders")


def test_family_names_resolve_to_their_spec():
    reg = get_registry()
    assert reg.get("encoder", "timm/efficientnet_b0").name == "timm/*"
    assert reg.get("encoder", "resnet18").name == "resnet18"  # exact wins over a family


def test_builtins_report_builtin_origin():
    for kind in KINDS:
        for entry in get_registry().entries(kind):
            assert entry.plugin.startswith("msk.plugins."), entry
            assert entry.origin.endswith("(built-in)")


def test_entity_sets_content():
    regions = entity_set("samx-regions")
    assert len(regions) == 28 and regions.kind == "region"
    assert regions.index("Chest") == regions.index("thorax")
    tumours = entity_set("bone-tumours")
    assert len(tumours) == 10
    assert {e.malignancy.value for e in tumours.entities} == {"benign", "intermediate", "malignant"}
    assert tumours.get("Ewing").malignancy.value == "malignant"
    assert len(entity_set("btxrd")) == 9
    with pytest.raises(KeyError, match="'osteoma' is not in entity set 'bone-tumours'"):
        tumours.index("osteoma")


class _Dupe:
    @hookspecs.hookimpl
    def msk_encoders(self):
        return [EncoderSpec("tiny-cnn", lambda name, **o: None, "a second tiny-cnn")]


class _WrongType:
    @hookspecs.hookimpl
    def msk_clusterers(self):
        return [EncoderSpec("not-a-clusterer", lambda name, **o: None)]


class _BadName:
    @hookspecs.hookimpl
    def msk_clusterers(self):
        return [ClustererSpec("KMeans ", lambda name, **o: None)]


def test_duplicate_names_are_an_error_naming_both_plugins():
    reg = Registry(load_entrypoints=False)
    reg.register(_Dupe(), name="dupe-plugin")
    with pytest.raises(PluginConflictError,
                       match="'tiny-cnn' is registered by both 'msk.plugins.encoders' and 'dupe-plugin'"):
        reg.names("encoder")


@pytest.mark.parametrize("plugin, match", [
    (_WrongType(), "returned EncoderSpec from msk_clusterers; expected ClustererSpec"),
    (_BadName(), "name 'KMeans ' must be non-empty, lower case"),
])
def test_malformed_specs_are_rejected(plugin, match):
    reg = Registry(load_entrypoints=False)
    reg.register(plugin, name="bad-plugin")
    with pytest.raises((TypeError, ValueError), match=match):
        reg.names("clusterer")


def test_runtime_registration_and_unregistration():
    class Extra:
        @hookspecs.hookimpl
        def msk_clusterers(self):
            return [ClustererSpec("my-kmeans", lambda name, **o: ("built", name, o))]

    reg = Registry(load_entrypoints=False)
    reg.register(Extra(), name="extra")
    assert reg.build("clusterer", "my-kmeans", k=3) == ("built", "my-kmeans", {"k": 3})
    assert reg.lookup("clusterer", "my-kmeans").origin == "registered at run time"
    reg.unregister("extra")
    assert "my-kmeans" not in reg.names("clusterer")


def test_listing_plugins_does_not_import_torch():
    """`msk plugins` and entity-set look-ups stay cheap: heavy modules load on build only."""
    import subprocess
    import sys

    code = ("import sys; from msk.core.registry import get_registry; r = get_registry(); "
            "[r.names(k) for k in r.catalog]; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
