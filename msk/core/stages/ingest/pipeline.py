"""``msk ingest SRC OUT``: a folder tree of DICOM/PNG/JPEG/BMP/TIFF files -> pseudonymised Parquet shards.

The pipeline, per run:

1. **List** every file under SRC (sorted, deterministic; hidden files and OUT itself skipped)
   and drop those the manifest already records: re-running is idempotent, and an interrupted
   run resumes where its last committed chunk ended.
2. **Decode** the rest on Ray Data: ``map_batches`` reads each file, hashes its content
   (SHA-256), decodes it with :func:`msk.core.io.dicom.read_image` (whose header check,
   :func:`msk.core.io.screening.screen_header`, quarantines an excluded modality, a too small image
   or an extreme strip before any pixel is decoded), resizes it to a square ``uint8`` image
   (:func:`msk.core.data.squaring.square_image`), adds the size warnings
   (:func:`msk.core.io.screening.size_warnings`) to
   the reader's and pseudonymises its header (:meth:`~msk.core.io.pseudonym.Pseudonymiser.record`).
   A file that fails in any way becomes a *quarantined* row carrying the reason; one bad file
   never stops an ingest.
3. **Commit** chunk by chunk (``chunk_files`` inputs each) on the driver: drop duplicates
   (same content as an earlier ok input), write the ok rows to Parquet shards, then the
   chunk's manifest part, which is the commit marker (see :mod:`msk.core.io.manifest`).

Why the driver writes the shards (pyarrow) instead of ``Dataset.write_parquet``: duplicates
must be decided in input order across chunks and runs, and every manifest row must name the
shard that holds its image, which Ray's writer does not report. The driver consumes the
decoded stream in input order (``preserve_order``), so both are exact and memory stays
bounded by one shard. The expensive part, decoding, stays distributed; what reaches the
driver is the already-resized images (64 KiB each at 256 px), which cost it about 0.7 ms each
(Arrow conversion + zstd Parquet write, measured on this project's 2-core machine): about
1,400 images/s from one driver core, against 10-25 ms of decoding per image in a worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import logging
import math
import os
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
import pyarrow.parquet as pq
from pydantic import Field, field_validator

import msk
from msk.core.config import MskConfig
from msk.core.data.scrub import ScrubMode, scrub_fields, scrub_text
from msk.core.data.squaring import square_image
from msk.core.errors import MskError, QuarantineError, QuarantineReason
from msk.core.io.dicom import ImageMeta, read_image
from msk.core.io.manifest import (
    MANIFEST_DIR,
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
    shard_rows: int = Field(1024, ge=1, description="at most this many images per shard file")
    batch_size: int = Field(16, ge=1, description="files per Ray Data map_batches call")
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

    def excluded(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in exclude)

    found: list[str] = []
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs
                   if not excluded(d) and os.path.realpath(os.path.join(root, d)) != skip_real]
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
        scrubbed = scrub_text(decoded.pixels, config.pixel_scrub, burned_in=decoded.meta.burned_in)
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
    """Ray Data ``map_batches`` function: one decoded row per input path, in the same order,
    each stamped with the node that decoded it (the manifest's ``node`` column)."""
    node = _this_node()
    rows = [process_file(src, rel, config, pseudonymiser) | {"node": node}
            for rel in batch.column("path").to_pylist()]
    return pa.Table.from_pylist(rows, schema=_DECODED_SCHEMA)


# --------------------------------------------------------------------------------------------
# Driver side: dedup, shards, manifest


class _ChunkCommitter:
    """Consumes decoded rows in input order and commits them chunk by chunk.

    For each chunk: ok rows whose content was already seen become ``duplicate``; the others
    go to shard files (temp file + rename, at most ``shard_rows`` each); once the chunk's last
    input has arrived its manifest part is written, which commits the chunk.
    """

    def __init__(self, out: Path, chunks: list[list[str]], first_chunk: int,
                 first_ok: dict[str, str], shard_rows: int):
        self.out = out
        self.chunks = chunks
        self.first_chunk = first_chunk
        self.first_ok = first_ok
        self.shard_rows = shard_rows
        self.counts: Counter[str] = Counter()
        self._index = 0  # position in self.chunks
        self._manifest_rows: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []  # ok rows not yet in a shard
        self._n_shards = 0

    @property
    def chunk(self) -> int:
        return self.first_chunk + self._index

    def add(self, row: dict[str, Any]) -> None:
        expected = self.chunks[self._index][len(self._manifest_rows)]
        if row["path"] != expected:  # preserve_order guarantees this; never write a wrong manifest
            raise RuntimeError(f"decoded rows out of order: got {row['path']!r}, expected {expected!r}")
        if row["status"] == OK:
            first = self.first_ok.setdefault(row["content_sha256"], row["path"])
            if first != row["path"]:
                row.update(status=QUARANTINED, reason=QuarantineReason.DUPLICATE.value,
                           detail=f"same content (SHA-256) as {first}")
        if row["status"] == OK:
            self._pending.append(row)
            if len(self._pending) >= self.shard_rows:
                self._write_shard()
        self._manifest_rows.append(row)
        self.counts[row["status"]] += 1
        if len(self._manifest_rows) == len(self.chunks[self._index]):
            self._commit()

    def _write_shard(self) -> None:
        path = shard_path(self.out, self.chunk, self._n_shards)
        table = pa.Table.from_pylist([{k: r.get(k) for k in SHARD_SCHEMA.names} for r in self._pending],
                                     schema=SHARD_SCHEMA)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp, compression="zstd", row_group_size=256)
        os.replace(tmp, path)
        shard = path.relative_to(self.out).as_posix()
        for r in self._pending:
            r["shard"] = shard
        self._pending = []
        self._n_shards += 1

    def _commit(self) -> None:
        if self._pending:
            self._write_shard()
        write_manifest_part(self.out, self.chunk, self._manifest_rows)
        self._manifest_rows = []
        self._n_shards = 0
        self._index += 1


def _ensure_ray() -> None:
    """Start a local Ray instance unless one is running (``RAY_ADDRESS`` joins a cluster)."""
    from msk.core.runtime.ray_start import start_ray

    start_ray(include_dashboard=False, log_to_driver=False)


@contextlib.contextmanager
def _ray_data_settings() -> Iterator[None]:
    """Ray Data settings of an ingest (ordered, quiet, see below); restored afterwards."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
             ctx.max_errored_blocks, ctx.op_resource_reservation_enabled)
    log = logging.getLogger("ray.data")
    saved_level = log.level
    ctx.execution_options.preserve_order = True  # rows reach the driver in input order
    ctx.enable_progress_bars = False  # ingest shows one progress bar of its own
    ctx.print_on_execution_start = False
    ctx.max_errored_blocks = -1  # a batch whose worker died is redone file by file (_decode_alone)
    # Per-operator reservations balance multi-operator pipelines; ours has one operator, and on
    # a small machine the reservation left it a single concurrent task (measured on 2 CPUs).
    ctx.op_resource_reservation_enabled = False
    log.setLevel(logging.CRITICAL)  # a skipped batch is logged as an ERROR with a traceback
    try:
        yield
    finally:
        (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
         ctx.max_errored_blocks, ctx.op_resource_reservation_enabled) = saved
        log.setLevel(saved_level)


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
        committer = _ChunkCommitter(out, chunks, state.next_chunk, state.first_ok, config.shard_rows)
        if todo:
            _run_pipeline(src, todo, config, pseudonymiser, committer, progress)

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


def _run_pipeline(src: Path, todo: list[str], config: IngestConfig, pseudonymiser: Pseudonymiser,
                  committer: _ChunkCommitter, progress: bool) -> None:
    """Decode ``todo`` on Ray Data and feed the rows, in input order, to ``committer``.

    A batch whose worker process dies (a decoder segfault, an out-of-memory kill) is retried
    once, then skipped by Ray Data; its files are then decoded one per task
    (:func:`_decode_alone`), so only the file that kills its worker is quarantined.
    """
    import ray.data

    kwargs = {"src": src, "config": config, "pseudonymiser": pseudonymiser}  # the key stays in the cluster
    with _ray_data_settings(), _progress_bar(progress) as bar:
        task = bar.add_task("starting Ray", total=len(todo), ok=0, quarantined=0)
        _ensure_ray()
        bar.update(task, description="ingest")
        with warnings.catch_warnings():
            # Ray Data retries a task whose worker died forever unless max_retries is given,
            # which only the (deprecated) **ray_remote_args of map_batches can do.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            ds = ray.data.from_items(
                [{"path": p} for p in todo], override_num_blocks=math.ceil(len(todo) / config.batch_size)
            ).map_batches(
                _decode_batch,
                batch_size=config.batch_size,
                batch_format="pyarrow",
                num_cpus=config.num_cpus_per_task,
                fn_kwargs=kwargs,
                max_retries=1,
            )
        position = 0  # rows up to here have been committed
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                gap = position
                while todo[position] != row["path"]:  # rows of failed batches are missing
                    position += 1
                for lost in _decode_alone(todo[gap:position], kwargs):
                    committer.add(lost)
                committer.add(row)
                position += 1
            bar.update(task, completed=sum(committer.counts.values()),
                       ok=committer.counts[OK], quarantined=committer.counts[QUARANTINED])
        for lost in _decode_alone(todo[position:], kwargs):
            committer.add(lost)
        bar.update(task, completed=sum(committer.counts.values()),
                   ok=committer.counts[OK], quarantined=committer.counts[QUARANTINED])


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
