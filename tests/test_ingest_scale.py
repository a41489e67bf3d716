"""``msk ingest`` scales out: decode tasks write their own shards, the driver commits manifest rows only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from msk.core.io.dataset import read_shards
from msk.core.io.manifest import committed_shards, read_manifest, shard_path
from msk.core.stages.ingest import pipeline as ingest_module
from msk.core.stages.ingest.pipeline import IngestConfig, ingest


def _pngs(src: Path, n: int, *, copies: int = 0) -> None:
    """``n`` distinct small PNGs, plus ``copies`` byte-identical copies of the first ones."""
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 30), dtype=np.uint8)).save(src / f"img{i:02d}.png")
    for i in range(copies):
        (src / f"zz_copy{i:02d}.png").write_bytes((src / f"img{i:02d}.png").read_bytes())


def _config(tmp: Path, **kw) -> IngestConfig:
    return IngestConfig(**({"image_size": 16, "key_file": tmp / "key", "create_key": True} | kw))


def _decoded(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ingest_module._DECODED_SCHEMA)


def _ok_row(path: str, sha: str) -> dict:
    return {"path": path, "image_id": f"id-{path}", "status": "ok", "content_sha256": sha, "bytes": 4,
            "image": b"\1\2\3\4", "height": 2, "width": 2}


def test_a_retried_task_overwrites_its_shard_instead_of_adding_one(tmp_path):
    """The shard names depend on the run and the task only: a second attempt replaces the first's file."""
    (tmp_path / "shards").mkdir()
    batch = ingest_module._Batch(position=0, chunk=7, first_shard=4, paths=["a", "b", "c"])
    decoded = _decoded([_ok_row("a", "1"), {"path": "b", "image_id": "id-b", "status": "quarantined",
                                            "reason": "empty"}, _ok_row("c", "2")])
    first = ingest_module._write_shards(decoded, tmp_path, batch, 2, "ab12")
    second = ingest_module._write_shards(decoded, tmp_path, batch, 2, "ab12")
    assert first == second
    files = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert files == [shard_path(tmp_path, 7, 4, "ab12").name]
    assert [r["shard"] for r in first] == ["shards/" + files[0], None, "shards/" + files[0]]
    assert all("image" not in r for r in first)  # no pixels go back to the driver
    assert pq.read_table(tmp_path / "shards" / files[0]).column("image_id").to_pylist() == ["id-a", "id-c"]


def test_duplicates_are_removed_from_the_shard_their_task_wrote(tmp_path):
    """Content seen earlier (in an earlier task of the chunk, or an earlier run) is dropped from the
    later task's shard at commit; a shard left empty is deleted."""
    (tmp_path / "shards").mkdir()
    chunk = ["a", "b", "c", "d"]
    committer = ingest_module._ChunkCommitter(tmp_path, [chunk], 0, {"9": "old/run.png"})
    batches = [ingest_module._Batch(0, 0, 0, ["a", "b"]), ingest_module._Batch(0, 0, 1, ["c", "d"])]
    rows = [[_ok_row("a", "1"), _ok_row("b", "9")], [_ok_row("c", "1"), _ok_row("d", "1")]]
    written = [ingest_module._write_shards(_decoded(r), tmp_path, b, 8, "cd34") for b, r in zip(batches, rows)]
    committer.add(batches[1], written[1])  # tasks finish out of order; the commit waits for the chunk
    assert read_manifest(tmp_path).num_rows == 0
    committer.add(batches[0], written[0])
    manifest = {r["path"]: r for r in read_manifest(tmp_path).to_pylist()}
    assert {p: r["reason"] or r["status"] for p, r in manifest.items()} == {
        "a": "ok", "b": "duplicate", "c": "duplicate", "d": "duplicate"}
    assert manifest["b"]["detail"] == "same content (SHA-256) as old/run.png" and manifest["b"]["shard"] is None
    assert [p.name for p in committed_shards(tmp_path)] == [shard_path(tmp_path, 0, 0, "cd34").name]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [shard_path(tmp_path, 0, 0, "cd34").name]
    assert pq.read_table(committed_shards(tmp_path)[0]).column("image_id").to_pylist() == ["id-a"]


@pytest.mark.slow
def test_workers_write_the_shards_and_the_driver_none(tmp_path, ray_session, monkeypatch):
    """With no duplicate and no crashed task the driver writes no shard file at all."""
    src = tmp_path / "export"
    _pngs(src, 11)

    def driver_writes(*args, **kwargs):
        raise AssertionError("the driver wrote a shard")

    monkeypatch.setattr(ingest_module, "_write_parquet", driver_writes)  # the driver's copy only
    report = ingest(src, tmp_path / "out", _config(tmp_path, batch_size=3, chunk_files=5), progress=False)
    assert report.n_ok == 11 and report.n_quarantined == 0
    manifest = read_manifest(tmp_path / "out")
    assert None not in manifest.column("node").to_pylist()
    shards = committed_shards(tmp_path / "out")
    assert len(shards) == 5  # chunks of 5, 5, 1 files in tasks of 3, 2 | 3, 2 | 1 files
    assert sorted(read_shards(tmp_path / "out").column("image_id").to_pylist()) == \
        sorted(manifest.column("image_id").to_pylist())


@pytest.mark.slow
def test_a_shard_no_manifest_names_is_removed_by_the_next_run(tmp_path, ray_session):
    """A decode task of a killed run may finish after its driver died: its file is never committed."""
    src, out = tmp_path / "export", tmp_path / "out"
    _pngs(src, 4, copies=2)
    cfg = _config(tmp_path, batch_size=2, chunk_files=4)
    ingest(src, out, cfg, progress=False)
    straggler = shard_path(out, 0, 9, "0badc0de")
    pq.write_table(read_shards(out), straggler)
    report = ingest(src, out, cfg, progress=False)
    assert report.n_processed == 0 and not straggler.exists()
    assert sorted(out.joinpath("shards").iterdir()) == committed_shards(out)
    assert read_shards(out).num_rows == report.n_ok == 4 and report.by_reason == {"duplicate": 2}


def test_tasks_never_span_chunks_and_a_small_run_still_uses_every_cpu():
    big = [[f"a{i:04d}" for i in range(1024)], [f"b{i:04d}" for i in range(1000)]]
    batches = ingest_module._batches(big, 5, 64, 10, slots=2)
    assert [len(b.paths) for b in batches] == [64] * 16 + [64] * 15 + [40]
    assert [p for b in batches for p in b.paths] == big[0] + big[1]
    assert {b.chunk for b in batches[:16]} == {5} and {b.chunk for b in batches[16:]} == {6}
    assert [b.first_shard for b in batches[:3]] == [0, 7, 14] and batches[0].n_shards == 7  # 64 rows, 10 a shard
    small = [[f"c{i:02d}" for i in range(43)]]  # 43 files, 2 CPUs: 4 tasks of at most 11, not one of 43
    assert [len(b.paths) for b in ingest_module._batches(small, 0, 64, 1024, slots=2)] == [11, 11, 11, 10]


def _slow_decode(batch, *, _real=ingest_module._decode_batch, **kwargs):
    """A decode that takes 1.5 s per task, so that tasks are in flight when the driver fails."""
    import time

    time.sleep(1.5)
    return _real(batch, **kwargs)


@pytest.mark.slow
def test_a_driver_error_returns_only_after_its_tasks_stopped_writing(tmp_path, ray_session, monkeypatch):
    """When the driver fails, the decode tasks in flight end before ``ingest`` raises: no shard
    file appears in the folder afterwards (waited for, not cancelled: ray-project/ray#54846)."""
    import sys
    import time

    src, out = tmp_path / "export", tmp_path / "out"
    _pngs(src, 12)
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests
    monkeypatch.setattr(ingest_module, "_decode_batch", _slow_decode)

    def fail(self, batch, rows):
        raise RuntimeError("the driver failed")

    monkeypatch.setattr(ingest_module._ChunkCommitter, "add", fail)
    with pytest.raises(RuntimeError, match="the driver failed"):
        ingest(src, out, _config(tmp_path, batch_size=1, chunk_files=6), progress=False)
    written = sorted(p.name for p in out.joinpath("shards").iterdir())
    time.sleep(2.0)  # a task still running would write its shard now
    assert sorted(p.name for p in out.joinpath("shards").iterdir()) == written
    assert len(written) >= 2  # the tasks in flight at the failure finished and wrote
