"""Readable output: Ray's own output off unless ``msk -v`` (msk.core.runtime.ray_start), and a failed run
leaves no empty folder, or a FAILED marker next to what it wrote (msk.core.runtime.runlock)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from msk.core.cli import app
from msk.core.errors import MskError
from msk.core.runtime import ray_start
from msk.core.runtime.runlock import FAILED_FILE, LOCK_FILE, run_lock

_SCRIPT = Path(sys.executable).with_name("msk")
MSK = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "msk.core.cli"]


# -- a failed run's folder -----------------------------------------------------------------------


def test_a_cli_run_failing_before_writing_leaves_no_folder(tmp_path):
    src = tmp_path / "export"
    src.mkdir()
    out = tmp_path / "runs" / "ingest"
    result = CliRunner().invoke(app, ["ingest", str(src), str(out), "--config", str(tmp_path / "missing.yaml")])
    assert isinstance(result.exception, MskError) and "missing.yaml does not exist" in str(result.exception)
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_a_cli_run_failing_after_writing_leaves_a_failed_marker(tmp_path, monkeypatch):
    import msk.core.synth

    def half_synthesize(out, config):
        (Path(out) / "export").mkdir(parents=True)
        (Path(out) / "export" / "000001.dcm").write_bytes(b"partial")
        raise MskError("disk full while writing 000002.dcm")

    monkeypatch.setattr(msk.core.synth, "synthesize", half_synthesize)
    out = tmp_path / "synth"
    result = CliRunner().invoke(app, ["synth", str(out), "--n", "4"], prog_name="msk")
    assert isinstance(result.exception, MskError)
    marker = (out / FAILED_FILE).read_text()
    assert marker.startswith("msk synth failed: disk full while writing 000002.dcm\n"), marker
    assert "incomplete" in marker
    assert (out / "export" / "000001.dcm").is_file() and not (out / LOCK_FILE).exists()


def test_the_marker_goes_when_the_same_command_succeeds_and_never_marks_an_older_run(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(MskError):
        with run_lock(run, "msk cluster"):
            (run / "history.csv").write_text("epoch\n1\n")
            raise MskError("bad input")
    assert (run / FAILED_FILE).read_text().startswith("msk cluster failed: bad input")
    with run_lock(run, "msk clusters label"):  # another command on the folder leaves the marker alone
        pass
    assert (run / FAILED_FILE).is_file()
    with run_lock(run, "msk cluster"):  # the resumed run ends well
        (run / "history.csv").write_text("epoch\n1\n2\n")
    assert not (run / FAILED_FILE).exists()

    with pytest.raises(MskError):  # a failing command on a finished run's folder does not mark the run
        with run_lock(run, "msk clusters label"):
            raise MskError("labels of another ingest")
    assert not (run / FAILED_FILE).exists()
    with pytest.raises(SystemExit):  # exit status 0 is not a failure
        with run_lock(tmp_path / "ok", "msk x"):
            (tmp_path / "ok" / "a").write_text("a")
            raise SystemExit(0)
    assert not (tmp_path / "ok" / FAILED_FILE).exists()


# -- Ray's output ------------------------------------------------------------------------------


def test_verbose_flag_turns_rays_output_on(monkeypatch):
    monkeypatch.delenv(ray_start.VERBOSE_ENV, raising=False)
    assert not ray_start.verbose()
    result = CliRunner().invoke(app, ["synth", "--help"])
    assert result.exit_code == 0, result.output
    assert not ray_start.verbose()
    result = CliRunner().invoke(app, ["-v", "synth", "--help"])
    assert result.exit_code == 0, result.output
    assert ray_start.verbose() and os.environ[ray_start.VERBOSE_ENV] == "1"  # inherited by Ray's workers
    monkeypatch.setenv(ray_start.VERBOSE_ENV, "0")
    assert not ray_start.verbose()


def test_output_of_rays_internal_actors_is_dropped_and_msks_kept(monkeypatch):
    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    printed = []
    monkeypatch.setattr(dispatcher, "handlers", [("ray_print_logs", printed.append), ("other", lambda d: None)])
    ray_start._drop_internal_actor_output()
    ray_start._drop_internal_actor_output()  # idempotent: wrapped once
    for actor in ("TrainController", "PlacementGroupCleaner", "RayTrainWorker", ""):
        dispatcher.emit({"actor_name": actor, "lines": [f"from {actor or 'a task'}"], "pid": 1, "is_err": False})
    assert [d["lines"][0] for d in printed] == ["from RayTrainWorker", "from a task"]
    assert [name for name, _ in dispatcher.handlers] == ["other", "ray_print_logs"]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    done = subprocess.run([*MSK, "synth", str(root / "synth"), "--n", "6", "--image-size", "64"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return root / "synth" / "export"


@pytest.mark.slow
def test_a_ray_command_prints_no_ray_start_up(tiny_export, tmp_path):
    key = tmp_path / "key"
    key.write_text("0" * 64)
    key.chmod(0o600)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in (ray_start.VERBOSE_ENV, "RAY_ADDRESS", *ray_start.QUIET_ENV):
        env.pop(name, None)
    done = subprocess.run([*MSK, "ingest", str(tiny_export), str(tmp_path / "ingest"), "--key-file", str(key),
                           "--image-size", "32"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "6 inputs: 6 ok" in output
    assert "Started a local Ray instance" not in output and "Token authentication" not in output, output
    assert " INFO " not in output and " WARNING " not in output, output


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_start_ray_is_quiet_unless_verbose(monkeypatch, verbose):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    for name in ray_start.QUIET_ENV:  # set then deleted: monkeypatch restores them after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv(ray_start.VERBOSE_ENV, "1" if verbose else "0")
    assert ray_start.start_ray(include_dashboard=False)
    (options,) = calls
    assert options["include_dashboard"] is False
    if verbose:  # Ray as Ray would start on its own
        assert options == {"include_dashboard": False}
        assert not any(name in os.environ for name in ray_start.QUIET_ENV)
        assert ray_start.train_logging_config() is None
    else:
        assert options["logging_level"] >= logging.WARNING
        assert os.environ["RAY_LOGGER_LEVEL"] == "warning"  # Ray's workers inherit it
        assert ray_start.train_logging_config().log_level == "WARNING"


def test_progress_follows_a_runs_history_per_epoch(tmp_path):
    """The sorter's bar moves per epoch (it sat at 0/5 for minutes when it moved per fold): a
    watcher counts the rows of the fold's history.csv while the fold trains."""
    import time

    from msk.core.runtime.progress import follow_history, progress_bar

    history = tmp_path / "history.csv"
    with progress_bar(False) as bar:
        task = bar.add_task("sorter", total=10)
        with follow_history(bar, task, history, 5, every_s=0.02):
            time.sleep(0.1)
            assert bar.tasks[0].completed == 5  # no history yet: the epochs of earlier folds
            history.write_text("epoch,train_loss\n1,0.9\n2,0.7\n")
            time.sleep(0.2)
            assert bar.tasks[0].completed == 7
