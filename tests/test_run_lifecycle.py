"""A run's life cycle on the command line: one run per folder (msk.core.runtime.runlock), paths that
survive moving a run tree (msk.core.io.paths), and a clean shutdown on SIGTERM/SIGINT
(msk.core.runtime.shutdown): no Ray process of the command left behind."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from msk.core.config import load_config
from msk.core.errors import ConfigError
from msk.core.runtime.runlock import LOCK_FILE, RunLockedError, read_holder, run_lock

_SCRIPT = Path(sys.executable).with_name("msk")  # the installed entry point (its name is in messages)
MSK = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "msk.core.cli"]
REPO = Path(__file__).resolve().parents[1]


def msk(*args: str, cwd: Path | None = None, env: dict | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*MSK, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# -- one run per folder --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_a_folder_stops_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with run_lock(run, "msk cluster"):
        holder = read_holder(run / LOCK_FILE)
        assert holder.pid == os.getpid() and holder.command == "msk cluster" and holder.host == socket.gethostname()
        started = time.perf_counter()
        result = msk("synth", str(run), "--n", "4")  # another process: refused before any work
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert f"is being written by another msk cluster (pid {os.getpid()}" in result.stderr
        assert time.perf_counter() - started < 60
        assert not (run / "export").exists()
    assert not (run / LOCK_FILE).exists()


def test_the_lock_is_released_after_success_and_after_an_error(tmp_path):
    run = tmp_path / "run"
    with run_lock(run, "msk embed"):
        (run / "result.txt").write_text("done")
    assert not (run / LOCK_FILE).exists() and (run / "result.txt").is_file()
    with pytest.raises(ValueError, match="boom"):
        with run_lock(run, "msk embed"):
            raise ValueError("boom")
    assert not (run / LOCK_FILE).exists()
    with run_lock(run, "msk embed"):  # free again
        pass
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError):
        with run_lock(fresh, "msk embed"):
            raise ValueError("boom")
    assert not fresh.exists(), "a folder the lock created and the run left empty is removed"
    with run_lock(tmp_path / "a" / "b" / "c", "msk embed"):
        pass
    assert not (tmp_path / "a").exists()  # with the parents it created


@pytest.mark.slow
def test_a_cli_run_that_fails_releases_its_lock_and_leaves_no_empty_folder(tmp_path):
    result = msk("synth", str(tmp_path / "out"), "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "missing.yaml does not exist" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    pid = dead_pid()
    (run / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                             "command": "msk train sorter", "started": "yesterday"}))
    with caplog.at_level(logging.WARNING, logger="msk.core.runtime.runlock"):
        with run_lock(run, "msk train sorter"):
            assert read_holder(run / LOCK_FILE).pid == os.getpid()
    assert f"stale lock of msk train sorter (pid {pid}" in caplog.text and "no longer running" in caplog.text
    assert not (run / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_respected_unless_forced(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    record = {"pid": dead_pid(), "host": "elsewhere.example", "command": "msk tune", "started": "now"}
    (run / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(RunLockedError, match=r"msk tune .* on elsewhere.example.*--force-unlock or delete .*\.lock"):
        with run_lock(run, "msk tune"):
            pass  # pragma: no cover
    assert json.loads((run / LOCK_FILE).read_text()) == record  # untouched
    with run_lock(run, "msk tune", force=True):
        assert read_holder(run / LOCK_FILE).host == socket.gethostname()


def test_locks_are_reentrant_in_one_process_and_ingest_uses_them(tmp_path):
    from msk.core.stages.ingest.pipeline import IngestConfig, ingest

    run = tmp_path / "run"
    with run_lock(run, "msk import"):
        with run_lock(run, "msk ingest"):  # msk import runs an ingest into its own folder
            pass
        assert read_holder(run / LOCK_FILE).command == "msk import"
    (tmp_path / "src").mkdir()
    config = IngestConfig(key_file=tmp_path / "key", create_key=True)
    with run_lock(tmp_path / "out", "msk import"):  # ingest's lock is this lock, re-entered here
        assert ingest(tmp_path / "src", tmp_path / "out", config, progress=False).n_inputs == 0
        assert read_holder(tmp_path / "out" / LOCK_FILE).command == "msk import"
    assert not (tmp_path / "out" / LOCK_FILE).exists()


# -- paths ----------------------------------------------------------------------------------------


def test_config_file_paths_resolve_from_the_files_folder(tmp_path, monkeypatch):
    from msk.core.models.train import TrainConfig
    from msk.serve.config import ServeConfig

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "init.pt").write_bytes(b"x")
    (conf / "serve.yaml").write_text(yaml.safe_dump({
        "token_file": "token", "preprocess": {"ingest": "../ingest"}, "recommender": {"path": "rec"},
        "sorter": {"checkpoint": str(tmp_path / "abs")}}))
    (conf / "train.yaml").write_text("init: init.pt\n")
    (conf / "hub.yaml").write_text("encoder_options: {pretrained: 'hf-hub:org/name'}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(ServeConfig, Path("../conf/serve.yaml"))
    assert cfg.token_file == conf / "token" and cfg.recommender.path == conf / "rec"
    assert cfg.preprocess.ingest == tmp_path / "ingest" and cfg.sorter.checkpoint == tmp_path / "abs"
    assert load_config(TrainConfig, conf / "train.yaml").init == str(conf / "init.pt")
    assert load_config(TrainConfig, conf / "train.yaml", init="random").init == "random"  # options win
    assert load_config(TrainConfig, conf / "hub.yaml").encoder_options["pretrained"] == "hf-hub:org/name"
    # a config written into a folder (tune's best.yaml) names the file relative to it
    written = TrainConfig(init=str(conf / "init.pt")).to_yaml(tmp_path / "tune")
    assert yaml.safe_load(written)["init"] == "../conf/init.pt"


def tiny_recommender(root: Path) -> tuple[Path, np.ndarray]:
    """A tiny CNN checkpoint (root/model) and a recommender over its embeddings (root/rec),
    built from inside ``root`` with relative paths, as a user in a shell would."""
    import torch

    from msk.core.models.embed import Embedder, embeddings_table
    from msk.core.models.recommender import Recommender
    from msk.core.models.train import TrainConfig, fit_classifier

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 32, 32), dtype=np.uint8)
    labels = np.arange(12) % 2
    cwd = os.getcwd()
    os.chdir(root)
    try:
        fit_classifier(x, labels, 2, TrainConfig(encoder="tiny-cnn", image_size=32, epochs=1, batch_size=4,
                                                 augment=False), out="model")
        embedder = Embedder("model/best.pt")
        ids = {"image_id": [f"img-{i}" for i in range(12)], "patient_id": [f"p{i}" for i in range(12)],
               "study_id": [f"s{i}" for i in range(12)]}
        table = embeddings_table(ids, embedder.embed_images(x), embedder.info)
        Recommender.build(table, [["a", "b"][y] for y in labels], retriever="flat", k=3).save("rec")
    finally:
        os.chdir(cwd)
    return root / "rec", x


def test_a_moved_run_tree_keeps_its_recommender_working(tmp_path, monkeypatch, one_torch_thread):
    from msk.core.models.recommender import Recommender
    from msk.serve.config import RecommendConfig
    from msk.serve.recommender import inspect_recommender

    (tmp_path / "run").mkdir()
    rec, _ = tiny_recommender(tmp_path / "run")
    stored = json.loads((rec / "recommender.json").read_text())["encoder"]["checkpoint"]
    assert stored == "../model/best.pt"
    shutil.move(tmp_path / "run", tmp_path / "moved")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    loaded = Recommender.load(tmp_path / "moved" / "rec")
    assert loaded.encoder["checkpoint"] == str(tmp_path / "moved" / "model" / "best.pt")
    assert inspect_recommender(RecommendConfig(path=tmp_path / "moved" / "rec"))["checkpoint"].is_file()

    # the recommender folder alone, moved away from its checkpoint: a clear error with the fix
    shutil.move(tmp_path / "moved" / "rec", tmp_path / "rec-alone")
    with pytest.raises(ConfigError, match=r"encoder checkpoint .*model/best.pt \(recorded in .*recommender.json "
                                          r"as \.\./model/best.pt\) does not exist.*set recommender.encoder"):
        inspect_recommender(RecommendConfig(path=tmp_path / "rec-alone"))
    fixed = inspect_recommender(RecommendConfig(path=tmp_path / "rec-alone",
                                                encoder=tmp_path / "moved" / "model" / "best.pt"))
    assert fixed["checkpoint"] == tmp_path / "moved" / "model" / "best.pt"


def test_an_old_recommender_with_an_absolute_checkpoint_still_loads(tmp_path, one_torch_thread):
    from msk.core.models.recommender import Recommender

    rec, _ = tiny_recommender(tmp_path)
    meta = json.loads((rec / "recommender.json").read_text())
    meta["encoder"]["checkpoint"] = str(tmp_path / "model" / "best.pt")  # as older msk versions wrote it
    (rec / "recommender.json").write_text(json.dumps(meta))
    shutil.move(rec, tmp_path / "elsewhere")
    assert Recommender.load(tmp_path / "elsewhere").encoder["checkpoint"] == str(tmp_path / "model" / "best.pt")


def test_embeddings_store_their_checkpoint_relative_to_the_file(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from msk.core.models.embed import EncoderInfo, _stored, embeddings_table, encoder_info, read_embeddings

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "best.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    info = EncoderInfo("tiny-cnn", 2, 32, False, "ckpt/best.pt")
    out = tmp_path / "emb"
    out.mkdir()
    table = embeddings_table({"image_id": ["a"], "patient_id": ["p"], "study_id": ["s"]},
                             np.ones((1, 2), np.float32), _stored(info, out))
    pq.write_table(table, out / "embeddings.parquet")
    assert encoder_info(pq.read_table(out / "embeddings.parquet"))["checkpoint"] == "../ckpt/best.pt"
    shutil.move(tmp_path / "emb", tmp_path / "ckpt" / "emb")  # moved alone: read from its new folder
    assert encoder_info(read_embeddings(tmp_path / "ckpt" / "emb"))["checkpoint"] == str(
        tmp_path / "ckpt" / "ckpt" / "best.pt")
    shutil.move(tmp_path / "ckpt" / "emb", tmp_path / "emb")
    assert encoder_info(read_embeddings(tmp_path / "emb"))["checkpoint"] == str(tmp_path / "ckpt" / "best.pt")


@pytest.mark.slow
def test_bad_serve_inputs_are_one_line_errors_with_the_fix(tmp_path, one_torch_thread):
    (tmp_path / "run").mkdir()
    rec, _ = tiny_recommender(tmp_path / "run")
    shutil.move(rec, tmp_path / "rec-alone")
    (tmp_path / "token").write_text("t" * 32 + "\n")
    (tmp_path / "token").chmod(0o600)
    (tmp_path / "moved.yaml").write_text("token_file: token\nrecommender: {path: rec-alone}\n")
    (tmp_path / "notoken.yaml").write_text("token_file: no-such-token\nrecommender: {path: run/rec}\n")
    for config, expected in [("moved.yaml", "the recommender folder was moved without it"),
                             ("notoken.yaml", f"token_file: {tmp_path / 'no-such-token'} does not exist; "
                                              "write the bearer token into it")]:
        result = msk("serve", str(tmp_path / config), cwd=REPO, env={"MSK_SERVE_TOKEN": ""})
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert expected in result.stderr


# -- clean shutdown -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(processes: list) -> list:
    import psutil

    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _listener(port: int) -> str:
    """``ADDRESS COMMAND-LINE`` of the process listening on TCP ``port`` ('' if none)."""
    import psutil

    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return " ".join([conn.laddr.ip, *psutil.Process(conn.pid).cmdline()])
    return ""


def _stop_and_check(proc: subprocess.Popen, signum: int, expected_rc: int) -> dict:
    """Send ``signum``; the command exits with ``expected_rc`` and every process it started
    (snapshot just before the signal) is gone within 10 s."""
    ray_procs = _descendants(proc.pid)
    names = " ".join(" ".join(p.cmdline()) for p in _alive(ray_procs))
    assert "raylet" in names and "gcs_server" in names, f"Ray is not running under msk: {names}"
    sent = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    seconds = time.monotonic() - sent
    while _alive(ray_procs) and time.monotonic() - sent < 10:
        time.sleep(0.2)
    left = [" ".join(p.cmdline())[:80] for p in _alive(ray_procs)]
    assert not left, f"still running 10 s after {signal.Signals(signum).name}: {left}; exit {proc.returncode}; " \
                     f"stderr: {err[-2000:]}"
    assert proc.returncode == expected_rc, err[-3000:]
    print(f"{signal.Signals(signum).name}: exit {proc.returncode} after {seconds:.1f} s; "
          f"{len(ray_procs)} processes of the command gone")
    return {"seconds": seconds, "stdout": out, "stderr": err}


@pytest.mark.slow
@pytest.mark.parametrize("ingress", ["proxy", "direct"])
def test_serve_stops_cleanly_on_sigterm_serving_a_moved_run_tree(tmp_path, one_torch_thread, ingress):
    """``msk serve`` answers on its port and stops cleanly on SIGTERM; with ``ingress: direct`` the
    port is held by the gateway replica itself, not by Serve's proxy (which moves to port + 1)."""
    import httpx

    (tmp_path / "run").mkdir()
    rec, x = tiny_recommender(tmp_path / "run")
    shutil.move(tmp_path / "run", tmp_path / "moved")
    token = "tok-" + "x" * 28
    (tmp_path / "moved" / "token").write_text(token + "\n")
    port = _free_port()
    (tmp_path / "moved" / "serve.yaml").write_text(yaml.safe_dump({
        "port": port, "token_file": "token", "preprocess": {"image_size": 32}, "ingress": ingress,
        "gateway": {"num_cpus": 0.25}, "recommender": {"path": "rec", "num_cpus": 0.25}}))
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    proc = subprocess.Popen([*MSK, "serve", "moved/serve.yaml"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": ray_tmp, "MSK_SERVE_TOKEN": ""})
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "msk serve did not become ready in 240 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(x[0]).save(buffer, format="PNG")
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/recommend", content=buffer.getvalue(),
                            headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["neighbours"]) == 3
        holder = _listener(port)
        assert ("ServeReplica:msk:gateway" if ingress == "direct" else "ProxyActor") in holder, holder
        assert holder.startswith("127.0.0.1 "), holder  # the config's host, not every interface
        if ingress == "direct":
            assert "ProxyActor" in _listener(port + 1)
        result = _stop_and_check(proc, signal.SIGTERM, 0)
        assert "stopped by SIGTERM; shutting down" in result["stderr"] and "stopped serving" in result["stdout"]
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_ray_data_command_stops_cleanly_on_a_signal(tmp_path, signum):
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3000):  # enough that the ingest is still running when the signal comes
        Image.fromarray(rng.integers(0, 255, (48, 48), np.uint8)).save(src / f"{i:05d}.png")
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    out = tmp_path / "out"
    proc = subprocess.Popen([*MSK, "ingest", str(src), str(out), "--image-size", "32"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": ray_tmp,
                                 "MSK_PSEUDONYM_KEY": "test-key-0123456789abcdef"})
    try:
        deadline = time.monotonic() + 180
        while not any((out / "manifest").glob("*")) and time.monotonic() < deadline:  # Ray Data is running
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        result = _stop_and_check(proc, signum, 128 + signum)
        assert f"stopped by {signal.Signals(signum).name}" in result["stderr"]
        assert not (out / LOCK_FILE).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
