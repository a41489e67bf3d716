"""``msk ingest SRC OUT``: a folder tree of DICOM/PNG/JPEG/BMP/TIFF files -> pseudonymised Parquet shards.

The pipeline, per run:

1. **List** every file under SRC (sorted, deterministic; hidden files and OUT itself skipped)
   and drop those the manifest already records: re-running is idempotent, and an interrupted
   run resumes where its last committed chunk ended.
2. **Decode** the rest in Ray tasks of ``batch_size`` files each: a task reads each file, hashes
   its content (SHA-256), decodes it with :func:`msk.core.io.dicom.read_image` (whose header check,
   :func:`msk.core.io.screening.screen_header`, quarantines an excluded modality, a too small image
   or an extreme strip before any pixel is decoded), blanks burned-in text
   (:func:`msk.core.data.scrub.scrub_text`), resizes it to a square ``uint8`` image
   (:func:`msk.core.data.squaring.square_image`), adds the size warnings
   (:func:`msk.core.io.screening.size_warnings`) to
   the reader's and pseudonymises its header (:meth:`~msk.core.io.pseudonym.Pseudonymiser.record`).
   A file that fails in any way becomes a *quarantined* row carrying the reason; one bad file
   never stops an ingest. The task then **writes its ok images itself** to its own shard file
   (``shards/part-<chunk>-<index>-<run>.parquet``, temp file + rename; the name depends only on
   the run and the task, so a retried task overwrites its first attempt's file) and returns
   only the manifest rows of its files (path, status, reason, hash, shard: about 300 bytes each).
3. **Commit** chunk by chunk (``chunk_files`` inputs each, in input order) on the driver: ok
   rows with the same content as an earlier ok input become ``duplicate`` and are removed from
   their task's shard, then the chunk's manifest part is written, which is the commit marker
   (see :mod:`msk.core.io.manifest`). Shards that no manifest part names (a chunk interrupted
   before its commit, a task of a killed run) are deleted by the next run.

No pixel passes through the driver: at 1M radiographs of 256 px that would be 64 GB through
one Python process. The driver's work per file is a manifest row (a dict of a dozen short
fields) and a dictionary lookup for duplicates, so one driver keeps up with many nodes. The
shard folder must be visible to every node at the same path (a shared file system), as for
any distributed writer. Ray Data's ``write_parquet`` is not used because every manifest row
must name the shard holding its image, and duplicates must be decided in input order across
chunks and runs; plain tasks give both, with less overhead per file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import secrets
import stat
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator

import msk
from msk.core.config import MskConfig
from msk.core.data.scrub import DEFAULT_DETECTOR, ScrubDetector, ScrubMode, scrub_fields, scrub_text
from msk.core.data.squaring import square_image
from msk.core.errors import MskError, QuarantineError, QuarantineReason
from msk.core.io.dicom import ImageMeta, read_image
from msk.core.io.manifest import (
    MANIFEST_DIR,
    MANIFEST_SCHEMA,
    OK,
    QUARANTINED,
    SHARDS_DIR,
    SUMMARY_FILE,
    ManifestState,
    committed_shards,
    read_manifest,
    remove_uncommitted,
    shard_path,
    write_manifest_part,
)
from msk.core.io.pseudonym import Pseudonymiser
from msk.core.io.screening import modality_key, normalise_modalities, screen_header, size_warnings

__all__ = ["IngestConfig", "IngestReport", "SHARD_SCHEMA", "ingest", "list_inputs", "square_image"]


class IngestConfig(MskConfig):
    """Options of ``msk ingest`` (YAML keys of ``--config``)."""

    image_size: int = Field(256, ge=8, le=8192, description="side of the square uint8 output image")
    resize: Literal["pad", "stretch"] = Field(
        "pad", description="pad: keep the aspect ratio, centre on black (letterbox); stretch: ignore it"
    )
    max_pixels: int = Field(50_000_000, gt=0, description="larger images are quarantined too_large")
    max_file_bytes: int = Field(1 << 31, gt=0, description="larger files are quarantined too_large")
    include: list[str] = Field(
        ["*"], description="file-name patterns to ingest; the content decides the format, so "
        "extensionless PACS exports are found (non-images end up quarantined, not skipped)"
    )
    exclude: list[str] = Field([".*"], description="file and folder name patterns to skip")
    chunk_files: int = Field(1024, ge=1, description="inputs per commit (the resume unit)")
    shard_rows: int = Field(1024, ge=1, description="at most this many images per shard file (a decode "
                            "task of more than this many files writes several)")
    batch_size: int = Field(64, ge=1, description="files per decode task; each task writes its own shard "
                            "file(s), so this is also the usual number of images per shard")
    num_cpus_per_task: float = Field(1.0, gt=0, description="CPUs Ray reserves per decode task")
    key_file: Path | None = Field(None, description="pseudonymisation key file (env MSK_PSEUDONYM_KEY wins)")
    create_key: bool = Field(False, description="create key_file with a new random key if missing")
    modalities: list[str] | None = Field(
        None, description="keep only these DICOM Modality values, e.g. [CR, DX]; 'none' keeps files "
        "without one (PNG/JPEG/BMP/TIFF); the others are quarantined excluded_modality from their "
        "header, before decoding; null keeps everything"
    )
    min_side: int = Field(16, ge=1, description="images whose shorter side is below this are quarantined too_small")
    max_aspect: float = Field(10.0, ge=1.0, description="images whose longer / shorter side exceeds this "
                              "are quarantined extreme_aspect")
    small_side: int = Field(64, ge=1, description="images whose shorter side is below this get the warning small_image")
    max_upscale: float = Field(2.0, ge=1.0, description="images enlarged by more than this factor to "
                               "image_size get the warning upscaled")
    pixel_scrub: ScrubMode = Field(
        "auto", description="blank text burned into the pixels before they reach the shards "
        "(msk.core.data.scrub): auto: when the DICOM header declares BurnedInAnnotation YES or a line "
        "of text is detected; always: every line of text detected; off: keep the pixels as decoded. "
        "A lone side marker (L/R) is kept"
    )
    scrub_detector: ScrubDetector = Field(
        DEFAULT_DETECTOR, description="what finds the text pixel_scrub blanks: learned (a small network "
        "shipped with msk, msk.core.data.text_net) or morphology (the classical detector of "
        "msk.core.data.scrub); docs/ingest.md compares them"
    )
    dates: Literal["year", "shift"] = Field(
        "year", description="year: shards keep the study's year only (study_year); shift: they keep the "
        "study date moved back by a keyed per-patient number of days (study_date; study_year is null), so "
        "the intervals between a patient's studies survive (docs/privacy.md)"
    )

    @field_validator("modalities")
    @classmethod
    def _tokens(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else normalise_modalities(value)


#: Columns of the shard files. No source path and no identifying header value is stored:
#: ids are keyed hashes (:class:`~msk.core.io.pseudonym.Pseudonymiser`), ages and years are coarse.
SHARD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # raw uint8, row-major, height x width
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("source_height", pa.int32()),  # size of the decoded source image, to map
        pa.field("source_width", pa.int32()),  # source coordinates (ROIs) into ``image``
        pa.field("patient_id", pa.string()),
        pa.field("study_id", pa.string()),
        pa.field("series_id", pa.string()),
        pa.field("instance_id", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("body_part", pa.string()),
        pa.field("view_position", pa.string()),
        pa.field("laterality", pa.string()),
        pa.field("patient_sex", pa.string()),
        pa.field("age_years", pa.int32()),  # whole years, 90 for anyone older than 89
        pa.field("study_year", pa.int32()),
        pa.field("study_date", pa.date32()),  # dates: shift only: the study date shifted per patient
        pa.field("source_format", pa.string()),
        pa.field("transfer_syntax", pa.string()),
        pa.field("photometric", pa.string()),
        pa.field("window", pa.string()),  # how intensities were mapped: "window:<c>/<w>", "percentile", ...
    ]
)

# What a decode task returns per input: the manifest fields plus, for ok rows, the shard row.
_DECODED_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string()),
        pa.field("status", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("content_sha256", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("node", pa.string()),
        pa.field("warning", pa.string()),
        pa.field("scrub", pa.string()),
        pa.field("scrub_boxes", pa.int32()),
        *[SHARD_SCHEMA.field(name).with_nullable(True) for name in SHARD_SCHEMA.names],
    ]
)


@dataclass
class IngestReport:
    """The outcome of :func:`ingest`; counts are over the whole output folder after this run."""

    out: Path
    n_inputs: int  # files found under SRC by this run
    n_ok: int
    n_quarantined: int
    by_reason: dict[str, int]
    n_skipped_existing: int  # of n_inputs, already in the manifest (resume / re-run)
    n_processed: int  # decoded by this run
    seconds: float
    shards: list[Path] = field(default_factory=list)
    manifest: Path = Path()
    by_modality: dict[str, int] = field(default_factory=dict)  # ok inputs per modality ("none": no DICOM one)
    by_warning: dict[str, int] = field(default_factory=dict)  # ok inputs per warning


# --------------------------------------------------------------------------------------------
# Listing


def list_inputs(src: Path, include: list[str], exclude: list[str], *, skip: Path | None = None) -> list[str]:
    """Relative POSIX paths of the files under ``src`` to ingest, sorted.

    A name is taken if it matches any ``include`` pattern and no ``exclude`` pattern (shell
    wildcards, case-sensitive); excluded folders are not entered, nor is ``skip`` (the output
    folder, should it lie inside ``src``). Symbolic links to files are listed (and read through);
    links to folders are not followed. Broken links are listed: they end up quarantined.
    """
    src = Path(src)
    skip_real = os.path.realpath(skip) if skip is not None else None
    if skip_real is not None and not skip_real.startswith(os.path.join(os.path.realpath(src), "")):
        skip_real = None  # OUT is not inside SRC: no folder needs resolving (a realpath per folder is slow)

    def excluded(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in exclude)

    found: list[str] = []
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not excluded(d)
                   and (skip_real is None or os.path.realpath(os.path.join(root, d)) != skip_real)]
        rel_root = Path(root).relative_to(src)
        for name in files:
            if excluded(name) or not any(fnmatch.fnmatchcase(name, p) for p in include):
                continue
            found.append((rel_root / name).as_posix())
    return sorted(found)


def _listed(paths: Sequence[str]) -> list[str]:
    """``paths`` as ingest inputs: sorted and unique; absolute ones or ones leaving SRC are errors."""
    bad = [p for p in paths if not p or p.startswith("/") or "\\" in p or ".." in p.split("/")]
    if bad:
        raise MskError(f"paths must be relative POSIX paths inside the source folder; got {bad[0]!r}")
    return sorted(set(paths))


# --------------------------------------------------------------------------------------------
# Per-file work (runs in Ray workers)


def _os_error(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def _file_size(path: Path, rel: str) -> int:
    """The size of a regular file; anything else raises :class:`QuarantineError` (read_error)."""
    try:
        st = os.stat(path)  # follows symbolic links: a broken one fails here
    except OSError as exc:
        raise QuarantineError(QuarantineReason.READ_ERROR, _os_error(exc), rel) from None
    if not stat.S_ISREG(st.st_mode):  # FIFOs, devices, sockets: never opened
        raise QuarantineError(QuarantineReason.READ_ERROR, "not a regular file", rel)
    return st.st_size


def _read_bytes(path: Path, rel: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise QuarantineError(QuarantineReason.READ_ERROR, _os_error(exc), rel) from None
    if not data:
        raise QuarantineError(QuarantineReason.EMPTY, "zero-byte file", rel)
    return data


def process_file(src: Path, rel: str, config: IngestConfig, pseudonymiser: Pseudonymiser) -> dict[str, Any]:
    """Read, hash, decode, resize and pseudonymise one input; always returns a decoded row.

    The row has the manifest fields (``path``, ``status``, ``reason``, ``warning``, ...) and,
    when ok, the shard fields; ``modality`` and ``body_part`` are filled whenever the header
    was read, quarantined or not. Every failure is caught: :class:`QuarantineError` keeps its
    reason, any other exception is quarantined as ``corrupt`` with the exception's text as detail.
    """
    row: dict[str, Any] = {"path": rel, "image_id": pseudonymiser.record_id(rel), "status": OK}
    headers: list[ImageMeta] = []

    def check(header: ImageMeta) -> None:  # runs before any pixel is decoded
        headers.append(header)
        screen_header(header, modalities=config.modalities, min_side=config.min_side,
                      max_aspect=config.max_aspect)

    try:
        row["bytes"] = size = _file_size(src / rel, rel)
        if size > config.max_file_bytes:
            raise QuarantineError(
                QuarantineReason.TOO_LARGE, f"{size} bytes > max_file_bytes {config.max_file_bytes}", rel
            )
        data = _read_bytes(src / rel, rel)
        row["bytes"] = len(data)  # the file may have changed since the stat
        row["content_sha256"] = hashlib.sha256(data).hexdigest()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every oddity; errors still raise
            decoded = read_image(data, source=rel, max_pixels=config.max_pixels, check=check)
        scrubbed = scrub_text(decoded.pixels, config.pixel_scrub, burned_in=decoded.meta.burned_in,
                              detector=config.scrub_detector)
        image = square_image(scrubbed.pixels, config.image_size, config.resize)
        meta = decoded.meta
        meta = dataclasses.replace(meta, warnings=meta.warnings + size_warnings(
            meta.rows, meta.cols, config.image_size, small_side=config.small_side,
            max_upscale=config.max_upscale, resize=config.resize))
        record = pseudonymiser.record(meta, dates=config.dates)
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop an ingest
        if isinstance(exc, QuarantineError):
            reason, detail = exc.reason.value, exc.detail
        else:
            reason, detail = QuarantineReason.CORRUPT.value, f"{type(exc).__name__}: {exc}"
        if headers:  # what was it? (an excluded modality says which)
            with contextlib.suppress(Exception):
                header = pseudonymiser.record(headers[0])
                row.update(modality=header.get("modality"), body_part=header.get("body_part"))
        return row | {"status": QUARANTINED, "reason": reason, "detail": detail}
    row["warning"] = "; ".join(meta.warnings) or None
    row.update(scrub_fields(scrubbed, config.pixel_scrub))
    row.update({name: record.get(name) for name in SHARD_SCHEMA.names if name in record})
    row.update(
        image=image.tobytes(),
        height=image.shape[0],
        width=image.shape[1],
        source_height=int(decoded.pixels.shape[0]),
        source_width=int(decoded.pixels.shape[1]),
        source_format=meta.format,
        transfer_syntax=meta.transfer_syntax_uid,
        photometric=meta.photometric,
        window=meta.window,
    )
    return row


def _this_node() -> str | None:
    """The Ray node id of this process; ``None`` outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _decode_batch(batch: pa.Table, *, src: Path, config: IngestConfig, pseudonymiser: Pseudonymiser) -> pa.Table:
    """Decode a batch (a table with a ``path`` column): one decoded row per input path, in the same
    order, each stamped with the node that decoded it (the manifest's ``node`` column)."""
    node = _this_node()
    rows = [process_file(src, rel, config, pseudonymiser) | {"node": node}
            for rel in batch.column("path").to_pylist()]
    return pa.Table.from_pylist(rows, schema=_DECODED_SCHEMA)


# --------------------------------------------------------------------------------------------
# Decode tasks: each writes its own shard files; the driver only sees manifest rows


@dataclass(frozen=True)
class _Batch:
    """The inputs of one decode task: ``paths`` of chunk number ``chunk`` (the ``position``-th
    chunk of this run), whose ok images go to shards ``first_shard``, ``first_shard + 1``, ...
    (at most ``n_shards`` of them)."""

    position: int
    chunk: int
    first_shard: int
    paths: list[str]
    n_shards: int = 1


def _write_parquet(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` atomically (temp file + rename), as every shard is written."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd", row_group_size=256)
    os.replace(tmp, path)


def _write_shards(decoded: pa.Table, out: Path, batch: _Batch, shard_rows: int, run: str) -> list[dict[str, Any]]:
    """Write the ok rows of ``decoded`` (:data:`_DECODED_SCHEMA`) to ``batch``'s shard files, at most
    ``shard_rows`` each, and return the manifest rows of all its inputs, each ok one naming its shard.

    The file names depend only on the run and the batch, so a retried task overwrites what its
    first attempt wrote instead of adding a second copy.
    """
    ok = decoded.filter(pc.equal(decoded.column("status"), OK))
    shards: list[str] = []
    for k, start in enumerate(range(0, ok.num_rows, shard_rows)):
        part = ok.slice(start, shard_rows)
        path = shard_path(out, batch.chunk, batch.first_shard + k, run)
        _write_parquet(part.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA), path)
        shards += [path.relative_to(out).as_posix()] * part.num_rows
    rows = decoded.select([n for n in MANIFEST_SCHEMA.names if n != "shard"]).to_pylist()
    names = iter(shards)
    for row in rows:
        row["shard"] = next(names) if row["status"] == OK else None
    return rows


def _decode_and_write(batch: _Batch, *, out: Path, run: str, shared: dict[str, Any]) -> list[dict[str, Any]]:
    """A decode task: decode ``batch`` with ``shared["decode"]`` (:func:`_decode_batch`), write its
    shards, return its manifest rows (small: no pixels travel back to the driver)."""
    decoded = shared["decode"](pa.table({"path": batch.paths}), **shared["kwargs"])
    return _write_shards(decoded, out, batch, shared["config"].shard_rows, run)


# --------------------------------------------------------------------------------------------
# Driver side: dedup, manifest


class _ChunkCommitter:
    """Collects the decode tasks' manifest rows and commits whole chunks, in input order.

    A chunk is committed once all its tasks have returned: ok rows whose content was already
    seen (earlier in this chunk, an earlier chunk or an earlier run) become ``duplicate`` and
    are removed from the shard their task wrote; then the chunk's manifest part is written,
    which commits it.
    """

    def __init__(self, out: Path, chunks: list[list[str]], first_chunk: int,
                 first_ok: dict[str, str]):
        self.out = out
        self.chunks = chunks
        self.first_chunk = first_chunk
        self.first_ok = first_ok
        self.counts: Counter[str] = Counter()
        self.position = 0  # in self.chunks, of the next chunk to commit
        self._results: dict[int, dict[int, list[dict[str, Any]]]] = {}  # position -> first_shard -> rows

    def add(self, batch: _Batch, rows: list[dict[str, Any]]) -> None:
        """Take a task's manifest rows; commit every chunk that is now complete, in order."""
        if [r["path"] for r in rows] != batch.paths:  # never write a wrong manifest
            raise RuntimeError(f"a decode task of chunk {batch.chunk} returned rows of other inputs")
        self._results.setdefault(batch.position, {})[batch.first_shard] = rows
        while self.position < len(self.chunks) and \
                sum(map(len, self._results.get(self.position, {}).values())) == len(self.chunks[self.position]):
            self._commit()

    def _commit(self) -> None:
        parts = self._results.pop(self.position)
        rows = [row for start in sorted(parts) for row in parts[start]]
        if [r["path"] for r in rows] != self.chunks[self.position]:
            raise RuntimeError(f"chunk {self.first_chunk + self.position}: the decoded rows do not match its inputs")
        drop: dict[str, set[str]] = {}  # shard -> image ids of duplicates to remove from it
        for row in rows:
            if row["status"] != OK:
                continue
            first = self.first_ok.setdefault(row["content_sha256"], row["path"])
            if first != row["path"]:
                drop.setdefault(row["shard"], set()).add(row["image_id"])
                row.update(status=QUARANTINED, reason=QuarantineReason.DUPLICATE.value,
                           detail=f"same content (SHA-256) as {first}", shard=None)
        for shard, ids in drop.items():
            _drop_rows(self.out / shard, ids)
        write_manifest_part(self.out, self.first_chunk + self.position, rows)
        self.counts.update(r["status"] for r in rows)
        self.position += 1


def _drop_rows(path: Path, image_ids: set[str]) -> None:
    """Rewrite the shard ``path`` without the rows of ``image_ids`` (deleting it if none is left)."""
    table = pq.read_table(path)
    kept = table.filter(pc.invert(pc.is_in(table.column("image_id"), pa.array(sorted(image_ids), pa.string()))))
    if kept.num_rows:
        _write_parquet(kept, path)
    else:
        path.unlink()


def _ensure_ray() -> None:
    """Start a local Ray instance unless one is running (``RAY_ADDRESS`` joins a cluster)."""
    from msk.core.runtime.ray_start import start_ray

    start_ray(include_dashboard=False, log_to_driver=False)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold ``out``'s run lock (:mod:`msk.core.runtime.runlock`) so two runs never write the same folder."""
    from msk.core.runtime.runlock import run_lock

    with run_lock(out):
        yield


def _progress_bar(enabled: bool):
    from msk.core.runtime.progress import progress_bar

    return progress_bar(enabled, "files · [green]{task.fields[ok]} ok[/green] · [yellow]{task.fields[quarantined]} "
                        "quarantined", remaining=True)


def ingest(src: str | os.PathLike, out: str | os.PathLike, config: IngestConfig | None = None, *,
           progress: bool = True, paths: Sequence[str] | None = None) -> IngestReport:
    """Ingest every file under ``src`` into ``out`` (see the module docstring); resumable.

    ``paths`` (relative POSIX paths under ``src``) restricts the ingest to exactly those files
    instead of listing ``src`` (``include``/``exclude`` are then not applied): ``msk import``
    ingests the files a dataset labels. A listed file that does not exist is quarantined
    ``read_error`` like any unreadable input, never dropped.

    Raises :class:`~msk.core.errors.MskError` for a missing ``src``, a missing key or an
    output folder another ingest is writing; bad *inputs* never raise, they are quarantined.
    """
    started = time.perf_counter()
    config = config or IngestConfig()
    src, out = Path(src).resolve(), Path(out).resolve()
    if not src.is_dir():
        raise MskError(f"source folder {src} does not exist or is not a folder")
    pseudonymiser = Pseudonymiser.from_env_or_file(config.key_file, create=config.create_key)
    (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)

    with _exclusive(out):
        remove_uncommitted(out)
        state = ManifestState.load(out)
        inputs = (list_inputs(src, config.include, config.exclude, skip=out) if paths is None
                  else _listed(paths))
        todo = [p for p in inputs if p not in state.done]
        chunks = [todo[i:i + config.chunk_files] for i in range(0, len(todo), config.chunk_files)]
        committer = _ChunkCommitter(out, chunks, state.next_chunk, state.first_ok)
        if todo:
            _run_pipeline(src, out, config, pseudonymiser, committer, progress)

        manifest = read_manifest(out, columns=["status", "reason", "modality", "warning"])
        statuses = Counter(manifest.column("status").to_pylist())
        by_reason = Counter(r for r in manifest.column("reason").to_pylist() if r is not None)
        by_modality, by_warning = _kept_counts(manifest)
        report = IngestReport(
            out=out,
            n_inputs=len(inputs),
            n_ok=statuses[OK],
            n_quarantined=statuses[QUARANTINED],
            by_reason=dict(sorted(by_reason.items())),
            n_skipped_existing=len(inputs) - len(todo),
            n_processed=len(todo),
            seconds=time.perf_counter() - started,
            shards=committed_shards(out),
            manifest=out / MANIFEST_DIR,
            by_modality=by_modality,
            by_warning=by_warning,
        )
        _write_summary(src, config, report)
    return report


def _batches(chunks: list[list[str]], first_chunk: int, batch_size: int, shard_rows: int,
             slots: int = 1) -> list[_Batch]:
    """The decode tasks of ``chunks``: ``batch_size`` inputs each, never two chunks in one.

    A run too small to give each of the cluster's ``slots`` (concurrent tasks) two tasks gets
    smaller tasks, so that it still uses every CPU (43 large DICOMs in one task of 64 ran on one).
    """
    total = sum(map(len, chunks))
    batch_size = max(1, min(batch_size, math.ceil(total / (2 * slots))))
    per_task = math.ceil(batch_size / shard_rows)  # shard files one task may write
    return [_Batch(position, first_chunk + position, k * per_task, chunk[start:start + batch_size], per_task)
            for position, chunk in enumerate(chunks)
            for k, start in enumerate(range(0, len(chunk), batch_size))]


def _run_pipeline(src: Path, out: Path, config: IngestConfig, pseudonymiser: Pseudonymiser,
                  committer: _ChunkCommitter, progress: bool) -> None:
    """Decode ``committer.chunks`` in Ray tasks that write their own shards; commit in input order.

    At most two tasks per CPU of the cluster are in flight, all of them from the oldest chunk not
    yet committed or the next one: a slow task holds back at most one chunk of finished tasks,
    so the driver buffers at most two chunks of (small) manifest rows, and a kill loses at most
    that much finished work. A task whose worker process dies (a decoder segfault, an out-of-memory kill)
    is retried once; if it fails again its files are decoded one per task
    (:func:`_decode_alone`), so only the file that kills its worker is quarantined. If the
    driver stops (an error), the tasks in flight are waited for before it returns, so none of
    them writes into the folder afterwards (after a signal, the shutdown ends them).
    """
    import ray

    kwargs = {"src": src, "config": config, "pseudonymiser": pseudonymiser}  # the key stays in the cluster
    run = secrets.token_hex(4)
    with _progress_bar(progress) as bar:
        task = bar.add_task("starting Ray", total=sum(map(len, committer.chunks)), ok=0, quarantined=0)
        _ensure_ray()
        bar.update(task, description="ingest")
        # _decode_batch is looked up now, in the driver: a test may replace it
        shared = ray.put({"decode": _decode_batch, "kwargs": kwargs, "config": config})
        remote = ray.remote(_decode_and_write).options(num_cpus=config.num_cpus_per_task, max_retries=1)
        slots = max(1, int(float(ray.cluster_resources().get("CPU", 1.0)) / config.num_cpus_per_task))
        window = 2 * slots
        batches = _batches(committer.chunks, committer.first_chunk, config.batch_size, config.shard_rows, slots)
        pending: dict[Any, _Batch] = {}
        submitted = done = 0
        try:
            while True:
                # in flight: at most `window` tasks, all of the oldest uncommitted chunk or the next
                while (len(pending) < window and submitted < len(batches)
                       and batches[submitted].position <= committer.position + 1):
                    batch = batches[submitted]
                    pending[remote.remote(batch, out=out, run=run, shared=shared)] = batch
                    submitted += 1
                if not pending:
                    break
                [ready], _ = ray.wait(list(pending), num_returns=1)
                batch = pending.pop(ready)
                try:
                    rows = ray.get(ready)
                except ray.exceptions.RayError:
                    rows = _redo_alone(batch, out, run, config, kwargs)
                committer.add(batch, rows)
                done += len(rows)
                bar.update(task, completed=done, ok=committer.counts[OK], quarantined=committer.counts[QUARANTINED])
        finally:
            _finish_in_flight(list(pending))


def _finish_in_flight(refs: list[Any], *, wait_s: float = 30.0) -> None:
    """End the tasks of ``refs`` before the driver returns: none of them writes afterwards.

    They are waited for, not cancelled: a polite ``ray.cancel`` that races with the task's own
    completion aborts the driver inside Ray (``Check failed: it != submissible_tasks_.end()``,
    ray-project/ray#54846; seen here on about one Ctrl-C in four), and the tasks are short (one
    batch each). A task still running after ``wait_s`` (stuck in a decoder's C code) has its
    worker process ended. After a signal nothing is waited for: the shutdown's reaper ends the
    workers within seconds of the exit (:mod:`msk.core.runtime.shutdown`), and shards that a
    task finishes meanwhile are named by no manifest part, so a resume removes them.
    """
    import ray

    from msk.core.runtime import shutdown

    if not refs or shutdown.received() is not None:
        return
    _, alive = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
    for ref in alive:  # stuck in a decoder's C code: end its worker process
        ray.cancel(ref, force=True)
    if alive:
        ray.wait(alive, num_returns=len(alive), timeout=wait_s)


def _redo_alone(batch: _Batch, out: Path, run: str, config: IngestConfig,
                kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest rows of a batch whose task failed twice: its files decoded one per task, its
    shards (whatever the failed attempts wrote replaced) written here."""
    for k in range(batch.n_shards):
        shard_path(out, batch.chunk, batch.first_shard + k, run).unlink(missing_ok=True)
    decoded = pa.Table.from_pylist(_decode_alone(batch.paths, kwargs), schema=_DECODED_SCHEMA)
    return _write_shards(decoded, out, batch, config.shard_rows, run)


def _decode_alone(paths: list[str], kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """Decode each of ``paths`` in a task of its own; a task that fails quarantines its file.

    Used for the files of batches whose worker died, to tell the culprit from its batch-mates.
    """
    if not paths:
        return []
    import ray

    config: IngestConfig = kwargs["config"]
    decode = ray.remote(num_cpus=config.num_cpus_per_task, max_retries=0)(_decode_batch)
    refs = [decode.remote(pa.table({"path": [p]}), **kwargs) for p in paths]
    rows = []
    for path, ref in zip(paths, refs):
        try:
            rows.append(ray.get(ref).to_pylist()[0])
        except ray.exceptions.RayError as exc:
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
            text = (str(cause).strip().splitlines() or [""])[0]
            rows.append(_crashed_row(Path(kwargs["src"]), path, kwargs["pseudonymiser"],
                                     f"decoding failed in its batch and again alone: {type(cause).__name__}: {text}"))
    return rows


def _crashed_row(src: Path, rel: str, pseudonymiser: Pseudonymiser, detail: str) -> dict[str, Any]:
    """The quarantined row of a file that could not be decoded in any worker (hashed here)."""
    row = {"path": rel, "image_id": pseudonymiser.record_id(rel), "status": QUARANTINED,
           "reason": QuarantineReason.CORRUPT.value, "detail": detail}
    with contextlib.suppress(QuarantineError):
        row["bytes"] = _file_size(src / rel, rel)
        row["content_sha256"] = hashlib.sha256(_read_bytes(src / rel, rel)).hexdigest()
    return row


def _kept_counts(manifest: pa.Table) -> tuple[dict[str, int], dict[str, int]]:
    """Ok inputs per modality token (:data:`~msk.core.io.screening.NO_MODALITY` for none; manifests
    written before the column count as none) and per warning, largest first."""
    by_modality: Counter[str] = Counter()
    by_warning: Counter[str] = Counter()
    for status, modality, warning in zip(*(manifest.column(c).to_pylist() for c in ("status", "modality", "warning"))):
        if status != OK:
            continue
        by_modality[modality_key(modality)] += 1
        by_warning.update(w for w in (warning or "").split("; ") if w)
    return dict(by_modality.most_common()), dict(by_warning.most_common())


def _write_summary(src: Path, config: IngestConfig, report: IngestReport) -> None:
    """``OUT/ingest.json``: the last run's report and the config it used (inside the hospital zone)."""
    summary = {
        "msk_version": msk.__version__,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "src": str(src),
        "n_inputs": report.n_inputs,
        "n_skipped_existing": report.n_skipped_existing,
        "n_processed": report.n_processed,
        "n_ok": report.n_ok,
        "n_quarantined": report.n_quarantined,
        "by_reason": report.by_reason,
        "by_modality": report.by_modality,
        "by_warning": report.by_warning,
        "n_shards": len(report.shards),
        "seconds": round(report.seconds, 3),
        "config": config.model_dump(mode="json"),
    }
    tmp = report.out / f".{SUMMARY_FILE}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, report.out / SUMMARY_FILE)
