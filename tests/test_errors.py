import pickle

import pytest

from msk.core.errors import QuarantineError, QuarantineReason


def test_quarantine_error_survives_pickling():
    """Raised inside Ray workers, it must cross the process boundary intact."""
    err = pickle.loads(pickle.dumps(QuarantineError("corrupt", "pixel data too short", "a/b.dcm")))
    assert (err.reason, err.detail, err.source) == (QuarantineReason.CORRUPT, "pixel data too short", "a/b.dcm")
    assert str(err) == "a/b.dcm: corrupt: pixel data too short"


def _leaf_commands(group=None, prefix=()):
    import typer.main

    from msk.core.cli import app

    group = group or typer.main.get_command(app)
    for name, cmd in sorted(group.commands.items()):
        if hasattr(cmd, "commands"):
            yield from _leaf_commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


#: Commands whose arguments are all outputs (they would run, not fail) or that take none.
_RUNS_WITHOUT_INPUTS = {("demo",), ("synth",), ("plugins",)}


@pytest.mark.parametrize("words", [w for w, _ in _leaf_commands() if w not in _RUNS_WITHOUT_INPUTS],
                         ids=" ".join)
def test_every_command_refuses_missing_inputs_with_an_msk_error(words, tmp_path, monkeypatch):
    """Every command given paths that do not exist (arguments and required options) stops with a
    typer usage error or an MskError (one line, exit 2 from `msk`), never another exception."""
    from typer.testing import CliRunner

    from msk.core.cli import app
    from msk.core.errors import MskError

    monkeypatch.setenv("MSK_PROFILE", "cpu")
    [command] = [c for w, c in _leaf_commands() if w == words]
    argv = []
    for param in command.params:
        missing = str(tmp_path / "missing" / param.name)
        if param.param_type_name == "argument":
            argv += [missing] * max(param.nargs, 1)
        elif param.required:
            argv += [param.opts[0], missing]
    result = CliRunner().invoke(app, [*words, *argv])
    assert result.exit_code != 0, result.output
    if not isinstance(result.exception, SystemExit):
        assert isinstance(result.exception, MskError), repr(result.exception)
        assert "\n" not in str(result.exception).strip()
