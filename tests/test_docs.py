"""Every hook is documented, and every CLI command has --help with an example."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from typer.testing import CliRunner

from msk.core import hookspecs
from msk.core.cli import app
from msk.core.registry import KINDS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def _hooks():
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if name.startswith("msk_")]


#: Hooks that act (add CLI commands) instead of contributing components of a kind.
ACTION_HOOKS = {"msk_commands"}


def test_every_hookspec_is_a_registry_kind():
    assert sorted(set(_hooks()) - ACTION_HOOKS) == sorted(KINDS.values())
    assert ACTION_HOOKS <= set(_hooks())


@pytest.mark.parametrize("hook", _hooks())
def test_hook_is_documented(hook):
    assert f"### {hook}\n" in DOCS.read_text(), f"{hook} has no section in {DOCS}"
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert ":return:" in doc, f"{hook}'s docstring does not say what it returns"


def _commands(group=None, prefix=()):
    """Every leaf command of the CLI as a tuple of words, sub-commands included."""
    import typer.main

    group = group or typer.main.get_command(app)
    for name, cmd in sorted(group.commands.items()):
        if hasattr(cmd, "commands"):  # a group
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,)


@pytest.mark.parametrize("command", list(_commands()), ids=" ".join)
def test_command_help_has_an_example(command):
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and f"msk {' '.join(command)}" in result.output


def test_option_defaults_show_in_help():
    """``[default: ...]`` in a help string is literal text, not a rich markup tag."""
    import inspect

    from msk.core import cli

    hinted = inspect.getsource(cli).count("[default: ")
    shown = 0
    for command in _commands():
        output = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "400"}).output
        shown += output.count("[default: ")
    assert hinted > 20 and shown >= hinted, (shown, hinted)
