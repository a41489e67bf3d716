"""The ingest manifest: one row per input file, the audit log and the commit marker of an ingest.

An ingest output folder looks like this::

    OUT/
      ingest.json                      summary of the last run and the config it used
      shards/part-000000-000.parquet   images + pseudonymised fields (no source paths, no PHI)
      manifest/part-000000.parquet     every input of chunk 0: path, status, reason, sha256, ...

The manifest is the operator's audit log and stays inside the hospital zone: unlike the
shards it holds the source paths (relative to SRC), which often embed names or accession
numbers. Each chunk's manifest part is written last, atomically; a chunk without one was
interrupted, and :func:`remove_uncommitted` deletes whatever it left behind so it is redone.

The ``node`` column records the Ray node that decoded each file, so an ingest on a cluster
shows how its work was spread. Columns added to :data:`MANIFEST_SCHEMA` over time read as
null from parts written before them (:func:`read_manifest` reads every part with the current
schema), so an older output folder still resumes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_DIR = "manifest"
SHARDS_DIR = "shards"
SUMMARY_FILE = "ingest.json"

OK = "ok"
QUARANTINED = "quarantined"


def read_ingest_summary(ingest_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``INGEST/ingest.json`` (the last run's report and the config it used): the one reader of it.
    ``None`` when the folder has none or it is unreadable (callers decide whether that is an error)."""
    import json

    try:
        summary = json.loads((Path(ingest_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def ingest_resize(ingest_dir: str | os.PathLike) -> Literal["pad", "stretch"]:
    """The ``resize`` mode an ingest squared its images with (``pad`` when not recorded, as
    ingest's default). The whole recorded squaring is read by
    :meth:`msk.core.data.squaring.SquaringConfig.resolved`."""
    config = (read_ingest_summary(ingest_dir) or {}).get("config") or {}
    return "stretch" if config.get("resize") == "stretch" else "pad"


#: One row per input file, ``ok`` or ``quarantined``; nothing an ingest sees is left out.
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),  # relative to SRC, POSIX separators
        pa.field("image_id", pa.string(), nullable=False),  # keyed hash of path; the shard key
        pa.field("status", pa.string(), nullable=False),  # "ok" | "quarantined"
        pa.field("reason", pa.string()),  # a QuarantineReason value; null when ok
        pa.field("detail", pa.string()),  # human-readable cause; null when ok
        pa.field("content_sha256", pa.string()),  # null when the file could not be read
        pa.field("bytes", pa.int64()),  # file size; null when it could not be stat'ed
        pa.field("shard", pa.string()),  # shard file relative to OUT; null when quarantined
        # Ray node id of the worker that decoded the file; null when no worker returned a row
        # (the file crashed every worker it ran in) and in parts written before msk recorded it
        pa.field("node", pa.string()),
        # "; "-joined warnings of an ok image that is usable but suspicious ("colour_image",
        # "small_image", "upscaled", ...); null when there is none
        pa.field("warning", pa.string()),
        # DICOM Modality and Body Part Examined (coded values as in the shards); filled whenever
        # the header was read, also for quarantined inputs (excluded_modality says which); null
        # for files without them (PNG/JPEG/BMP/TIFF)
        pa.field("modality", pa.string()),
        pa.field("body_part", pa.string()),
        # pixel scrubbing of burned-in text (msk.core.data.scrub): "<method>:<trigger>"
        # ("morphology:burned_in_annotation", "morphology:text_detected", "morphology:always",
        # "morphology:none" when nothing was blanked) or "off"; null when quarantined
        pa.field("scrub", pa.string()),
        # how many text boxes were blanked (never their text); null when off or quarantined
        pa.field("scrub_boxes", pa.int32()),
    ]
)

_MANIFEST_PART = re.compile(r"^part-(\d{6})\.parquet$")
# part-<chunk>-<index>[-<run>].parquet: <run> tells the files of two runs apart (see shard_path)
_SHARD_PART = re.compile(r"^part-(\d{6})-\d{3,}(?:-[0-9a-f]+)?\.parquet$")


def manifest_part_path(out: Path, chunk: int) -> Path:
    return Path(out) / MANIFEST_DIR / f"part-{chunk:06d}.parquet"


def shard_path(out: Path, chunk: int, index: int, run: str | None = None) -> Path:
    """Shard ``index`` of chunk ``chunk``; ``run`` (hex) is the writing run's token.

    Within a run the name is deterministic, so a retried decode task overwrites its own file
    instead of adding a second copy; the token keeps a straggler task of an earlier, killed run
    from overwriting a file of this run (its file is an unreferenced orphan instead).
    """
    suffix = f"-{run}" if run else ""
    return Path(out) / SHARDS_DIR / f"part-{chunk:06d}-{index:03d}{suffix}.parquet"


def committed_chunks(out: Path) -> list[int]:
    """Chunk numbers that have a manifest part, ascending."""
    folder = Path(out) / MANIFEST_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _MANIFEST_PART.match(p.name)))


def read_manifest(out: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """All committed manifest rows of the ingest output ``out``, in input order.

    Returns an empty table with :data:`MANIFEST_SCHEMA` when nothing has been committed yet.
    Every part is read with the current schema: a column missing from an older part is null.
    """
    parts = [manifest_part_path(Path(out), c) for c in committed_chunks(Path(out))]
    schema = MANIFEST_SCHEMA if columns is None else pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
    if not parts:
        return schema.empty_table()
    return pa.concat_tables(pq.read_table(p, columns=columns, schema=schema) for p in parts)


def write_manifest_part(out: Path, chunk: int, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write chunk ``chunk``'s manifest part atomically (temp file + rename) and return its path.

    This is the chunk's commit: call it only once all of the chunk's shards are in place.
    """
    final = manifest_part_path(out, chunk)
    final.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([dict(r) for r in rows], schema=MANIFEST_SCHEMA)
    tmp = final.with_name(f".{final.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, final)
    return final


def remove_uncommitted(out: Path) -> list[Path]:
    """Delete shards no manifest part references, and temporary files; return them.

    Such files are left by an ingest that stopped between writing a chunk's shards and its
    manifest part (their inputs are not in the manifest, so the next run processes them again),
    or by a decode task of a killed run that finished after its driver died.
    """
    out = Path(out)
    committed = set(committed_chunks(out))
    referenced = {Path(s).name for s in read_manifest(out, columns=["shard"]).column("shard").to_pylist() if s}
    removed: list[Path] = []
    for folder in (out / SHARDS_DIR, out / MANIFEST_DIR):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            m = _SHARD_PART.match(p.name)
            orphan = (m is not None and (int(m.group(1)) not in committed or p.name not in referenced)
                      or p.name.startswith("."))
            if orphan and p.is_file():
                p.unlink()
                removed.append(p)
    return removed


@dataclass
class ManifestState:
    """What earlier runs already did: the resume point of an ingest."""

    done: set[str] = field(default_factory=set)  # relative paths with a manifest row
    first_ok: dict[str, str] = field(default_factory=dict)  # content sha256 -> first ok path
    next_chunk: int = 0

    @classmethod
    def load(cls, out: Path) -> ManifestState:
        table = read_manifest(out, columns=["path", "status", "content_sha256"])
        state = cls(done=set(table.column("path").to_pylist()))
        for path, status, sha in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            if status == OK and sha is not None:
                state.first_ok.setdefault(sha, path)
        chunks = committed_chunks(out)
        state.next_chunk = chunks[-1] + 1 if chunks else 0
        return state


def committed_shards(out: str | os.PathLike) -> list[Path]:
    """The shard files referenced by the manifest (those of committed chunks), sorted."""
    table = read_manifest(out, columns=["shard"])
    names = {s for s in table.column("shard").to_pylist() if s is not None}
    return [Path(out) / s for s in sorted(names)]
