"""Faults survived, nothing lost (issue 14 item 4): ``msk ingest`` SIGKILLed at random points and
resumed; corrupt checkpoint and index files refused with one line naming the file and the reason;
a Ray Train worker killed mid-epoch resumes from the run's last checkpoint.

A Serve replica killed under load is tested in ``tests/test_serve.py``
(``test_replica_crash_mid_load_recovers``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_train import bars  # tests/ is on sys.path (rootdir conftest)

REPO = Path(__file__).resolve().parents[1]
KEY = "cd" * 32


# -- msk ingest killed with SIGKILL and resumed ----------------------------------------------------


def _small_export(src: Path, n: int = 88) -> list[str]:
    """``n`` small random PNGs in 3 folders, an empty file and a text file; their relative paths."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = src / f"series{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    (src / "empty.png").write_bytes(b"")
    (src / "notes.txt").write_text("not an image")
    return sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())


def _parts(out: Path) -> int:
    folder = out / "manifest"
    return len(list(folder.glob("part-*.parquet"))) if folder.is_dir() else 0


@pytest.mark.slow
def test_ingest_killed_at_random_points_five_times_loses_and_repeats_nothing(tmp_path, ray_session):
    """Five runs of ``msk ingest`` (a subprocess joined to the test's Ray instance) are SIGKILLed: the
    first at a random moment of its start-up, the others at a random moment after a random number of
    further chunks were committed. A sixth run finishes. The manifest then holds every input once, the
    shards every ok image once, and nothing else is left in the output folder."""
    from msk.core.io.dataset import read_shards
    from msk.core.io.manifest import committed_shards, read_manifest

    src, out = tmp_path / "src", tmp_path / "out"
    inputs = _small_export(src)
    config = tmp_path / "ingest.yaml"
    # 30 chunks of 3 inputs, one decode task per file: a chunk is committed every few tens of ms
    config.write_text("image_size: 32\nchunk_files: 3\nshard_rows: 2\nbatch_size: 1\n")
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "MSK_PSEUDONYM_KEY": KEY, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "msk.core.cli", "ingest", str(src), str(out), "-c", str(config)]
    rng = np.random.default_rng(14)
    killed_mid_run, seen = 0, []
    for attempt in range(5):
        before = _parts(out)
        log = tmp_path / f"run-{attempt}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        if attempt == 0:
            time.sleep(rng.uniform(0.5, 3.0))  # somewhere in the start-up (imports, joining Ray)
        else:
            target = before + int(rng.integers(1, 4))  # one to three more chunks committed, then a bit more
            while _parts(out) < target and proc.poll() is None:
                assert time.monotonic() < deadline, "ingest made no progress in 120 s"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is not None:  # finished before the kill: nothing more to interrupt
            pytest.fail(f"run {attempt} ended (exit {proc.returncode}) before its kill: {log.read_text()[-500:]}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        killed_mid_run += 0 < _parts(out) < 30 and _parts(out) > before
        orphans = len({p.name for p in (out / "shards").glob("*")} - {p.name for p in committed_shards(out)}) \
            if (out / "shards").is_dir() else 0
        seen.append(f"{_parts(out)} chunks committed, {orphans} uncommitted shard files")
        paths = read_manifest(out, columns=["path"]).column("path").to_pylist()
        assert len(paths) == len(set(paths)), f"a path recorded twice after kill {attempt}"

    print("\nafter each SIGKILL: " + "; ".join(seen))
    assert killed_mid_run >= 3, f"only {killed_mid_run} kills landed while chunks were being committed"
    assert _parts(out) < 30, "the kills left nothing to resume"
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "already done" in done.stdout

    manifest = read_manifest(out).to_pylist()
    assert sorted(r["path"] for r in manifest) == inputs  # every input, each once
    status = Counter(r["reason"] or r["status"] for r in manifest)
    assert status == {"ok": 88, "empty": 1, "not_an_image": 1}
    shards = read_shards(out, columns=["image_id"]).column("image_id").to_pylist()
    ok_ids = {r["image_id"] for r in manifest if r["status"] == "ok"}
    assert len(shards) == len(set(shards)) == 88 and set(shards) == ok_ids  # no duplicate shard rows
    on_disk = sorted(p for p in (out / "shards").iterdir())
    assert on_disk == committed_shards(out), "a shard of an interrupted chunk was left behind"
    assert not [p for p in (out / "manifest").iterdir() if p.name.startswith(".")]


# -- corrupt checkpoint and index files are refused with the reason ------------------------------


def _one_line(exc: BaseException, path: Path) -> str:
    text = str(exc)
    assert "\n" not in text and str(path) in text, text
    return text


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    from msk.core.io.checkpoint import save_checkpoint
    from msk.core.registry import build_encoder

    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "encoder.pt", build_encoder("tiny-cnn"),
                           arch="tiny-cnn", in_chans=1, config={}, epoch=1)
    return path.read_bytes()


def _flip_in_largest_tensor(data: bytes) -> bytes:
    import io
    import zipfile

    member = max(zipfile.ZipFile(io.BytesIO(data)).infolist(), key=lambda m: m.file_size)
    offset = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra) + member.file_size // 2
    flipped = bytearray(data)
    flipped[offset] ^= 0x10
    return bytes(flipped)


def _index_file_bytes() -> bytes:
    """A real msk index file (what a recommender holds), to be passed where a checkpoint belongs."""
    import tempfile

    from msk.core.models.retrieval import write_index_file

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "index.mskidx"
        write_index_file(path, {"format_version": 1, "kind": "flat", "dim": 4, "ntotal": 0, "metric": "ip",
                                "options": {}, "msk_version": "0"}, {"ids": b"[]"})
        return path.read_bytes()


@pytest.mark.parametrize("damage, reason", [
    (lambda d: d[: len(d) // 2], "truncated or damaged"),
    (lambda d: d[:-1], "truncated or damaged"),
    (lambda d: d[:40], "truncated or damaged"),
    (lambda d: b"", "the file is empty"),
    (lambda d: np.random.default_rng(0).bytes(4096), "not a torch checkpoint"),
    (_flip_in_largest_tensor, r"damaged \(member data/\d+ fails its CRC-32 check"),
    (lambda d: _index_file_bytes(), "it is an msk index file"),
    (lambda d: b'{"arch": "resnet18"}', "not a torch checkpoint"),
], ids=["half", "last-byte", "40-bytes", "empty", "random", "bit-flip", "index-file", "json"])
def test_a_corrupt_checkpoint_is_refused_in_one_line(checkpoint_bytes, tmp_path, damage, reason):
    from msk.core.io.checkpoint import CheckpointError, load_checkpoint

    path = tmp_path / "encoder.pt"
    path.write_bytes(damage(checkpoint_bytes))
    with pytest.raises(CheckpointError, match=f"not a readable msk checkpoint: {reason}") as exc:
        load_checkpoint(path)
    _one_line(exc.value, path)


def test_a_checkpoint_of_another_kind_is_refused_in_one_line(tmp_path):
    import torch

    from msk.core.io.checkpoint import CheckpointError, load_checkpoint

    cases = {"tensor.pt": (torch.zeros(3), "not an msk checkpoint \\(holds a Tensor\\)"),
             "weights.pt": ({"conv.weight": torch.zeros(1)}, "not an msk encoder checkpoint \\(missing arch"),
             "numpy.pt": ({"x": np.zeros(3)}, "holds objects other than tensors.*refuses to unpickle")}
    for name, (obj, reason) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match=reason) as exc:
            load_checkpoint(tmp_path / name)
        _one_line(exc.value, tmp_path / name)


def test_a_corrupt_recommender_or_index_is_refused_in_one_line(tmp_path, checkpoint_bytes):
    """Each file of a saved recommender, truncated, replaced by random bytes or by a file of another
    kind (a checkpoint): a RecommenderError or IndexFileError naming that file and the reason."""
    from msk.core.errors import MskError
    from msk.core.models.embed import embeddings_table
    from msk.core.models.recommender import Recommender

    rng = np.random.default_rng(1)
    ids = {c: [f"{c[:3].upper()}-{i}" for i in range(12)] for c in ("image_id", "patient_id", "study_id")}
    table = embeddings_table(ids, rng.normal(size=(12, 8)).astype(np.float32))
    recommender = Recommender.build(table, ["a", "b", "c"] * 4, retriever="flat", k=3)
    damages = {"truncated": lambda d: d[: len(d) // 2], "random": lambda d: rng.bytes(len(d)),
               "a checkpoint": lambda d: checkpoint_bytes}
    reasons = {"index.mskidx": "truncated|not an msk index file|corrupt",
               "records.parquet": "unreadable", "recommender.json": "unreadable"}
    for file, reason in reasons.items():
        for what, damage in damages.items():
            folder = recommender.save(tmp_path / f"{file}-{what.replace(' ', '-')}")
            (folder / file).write_bytes(damage((folder / file).read_bytes()))
            with pytest.raises(MskError, match=reason) as exc:
                Recommender.load(folder)
            _one_line(exc.value, folder / file)


# -- a Ray Train worker killed mid-epoch -------------------------------------------------------------


@pytest.mark.slow
def test_a_ray_train_worker_killed_mid_epoch_resumes_from_the_last_checkpoint(tmp_path, ray_session):
    """The Ray Train worker is SIGKILLed early in epoch 3 of 5; Ray Train restarts it
    (``max_failures``) and the run resumes after epoch 2's checkpoint: epochs 1 and 2 are not
    trained again (their checkpoint files are untouched), every epoch is in the history once."""
    import json
    import threading

    import torch

    from msk.core.models.train import TrainConfig, fit_classifier

    torch.set_num_threads(1)
    x, y = bars(384, size=48)
    config = TrainConfig(encoder="tiny-cnn", image_size=48, epochs=5, batch_size=16, lr=5e-3, augment=False,
                         num_workers=1, max_failures=1, keep_checkpoints=None)
    checkpoints = tmp_path / "checkpoints"
    killed: dict[str, object] = {}

    def kill_mid_epoch_3() -> None:
        deadline = time.monotonic() + 300
        while not (checkpoints / "epoch-002.pt").exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        first, second = (checkpoints / f"epoch-00{e}.pt" for e in (1, 2))
        time.sleep(0.3)  # into epoch 3, which takes over a second (about 1.7 s on two idle cores)
        killed["before"] = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (first, second)}
        killed["epoch 3 done"] = (checkpoints / "epoch-003.pt").exists()
        pid = json.loads((tmp_path / "workers" / "rank-0.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid

    killer = threading.Thread(target=kill_mid_epoch_3, daemon=True)
    killer.start()
    result = fit_classifier(x, y, 3, config, out=tmp_path)
    killer.join(timeout=10)

    assert "pid" in killed, "the worker was never killed"
    assert killed["epoch 3 done"] is False, "the kill came after epoch 3 ended"
    restarted = json.loads((tmp_path / "workers" / "rank-0.json").read_text())["pid"]
    assert restarted != killed["pid"], "no new worker ran after the kill"
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4, 5]
    after = {name: ((checkpoints / name).stat().st_ino, (checkpoints / name).stat().st_mtime_ns)
             for name in killed["before"]}  # type: ignore[union-attr]
    assert after == killed["before"], "epochs 1-2 were trained again instead of resumed"
    assert sorted(p.name for p in checkpoints.glob("epoch-*.pt")) == [f"epoch-00{e}.pt" for e in range(1, 6)]
