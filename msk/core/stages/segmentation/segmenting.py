"""``msk segment RUN FILE_OR_DIR... --out DIR``: a trained lesion segmenter on image files, with
the lesion mask written in each file's own pixels (PNG) and, for DICOM files, optionally as a
DICOM Segmentation object a PACS shows over the image (:mod:`msk.core.io.dicom_seg`).

Files are decoded and squared as the ingest and ``/v1/segment`` do it
(:func:`msk.core.io.dicom.read_image`, :func:`msk.core.data.squaring.square_image`), at the square size
and resize mode of the ingest the run was trained on: ``segmenter.json`` records them under
``"ingest"`` (``--ingest`` names the ingest folder instead; a run from before that record falls
back to its ingest folder if it still exists, else to its ``image_size`` and ``pad``). The fold
ensemble's mean lesion probability is thresholded (the run's threshold, or ``--threshold``), the
largest connected region is the lesion (:func:`msk.core.models.segmenter.lesion_mask`) and it is
mapped back onto the file's pixels (:func:`msk.core.io.masks.mask_from_square`).

Per file, in ``DIR``: ``<name>.mask.png`` (0 background, 255 lesion, the file's size), with
``dicom_seg`` ``<name>.seg.dcm`` for DICOM files, and a row of ``segment.csv``: ``file``,
``status`` (``ok``, ``no_lesion``, ``unreadable``), the lesion's tight box ``x0,y0,x1,y1``
(source pixels, exclusive ends: the box ``/v1/segment`` answers), ``lesion_pixels``,
``threshold``, ``mask``, ``seg`` (paths relative to ``DIR``) and ``reason``. ``<name>`` is the
file's path below the folder given (or its name, for a file given), without an image suffix
(``.dcm``, ``.png``, ...); a name already taken gets ``-2``, ``-3``, ... Folders are searched
recursively for files that are images by their content (hidden files are skipped); a file named
on the command line is always tried. Nothing is written for an image without a lesion: it is
reported, never given an empty mask.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from msk.core.config import MskConfig
from msk.core.errors import ConfigError, MskError

__all__ = ["CSV_COLUMNS", "SegmentOptions", "SegmentResult", "SegmentRow", "find_images", "segment_files",
           "segment_preprocess"]

SUMMARY_FILE = "segment.csv"
CSV_COLUMNS = ("file", "status", "x0", "y0", "x1", "y1", "lesion_pixels", "threshold", "mask", "seg", "reason")
#: Suffixes left out of output names (``knee.dcm`` -> ``knee.mask.png``); others are kept
#: (DICOM files named by UID, ``1.2.840.113619.2.5``, keep their last part).
IMAGE_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


class SegmentOptions(MskConfig):
    """Options of ``msk segment``."""

    threshold: float | None = Field(None, gt=0, lt=1, description="lesion probability threshold; default: the run's")
    dicom_seg: bool = Field(False, description="also write a DICOM Segmentation object for each DICOM file")
    batch_size: int = Field(8, ge=1, le=256, description="images decoded and segmented together")


@dataclass
class SegmentRow:
    """One file's outcome (a row of ``segment.csv``)."""

    file: str
    status: str
    threshold: float | None = None
    box: tuple[int, int, int, int] | None = None
    lesion_pixels: int | None = None
    mask: str = ""
    seg: str = ""
    reason: str = ""
    #: Whether the row is a failure of the run (exit 2): unreadable, no lesion, or a SEG that
    #: was asked for a DICOM file and could not be written.
    problem: bool = False

    def record(self) -> dict[str, Any]:
        x0, y0, x1, y1 = self.box if self.box is not None else ("",) * 4
        return {"file": self.file, "status": self.status, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
                "lesion_pixels": "" if self.lesion_pixels is None else self.lesion_pixels,
                "threshold": "" if self.threshold is None else f"{self.threshold:g}",
                "mask": self.mask, "seg": self.seg, "reason": self.reason}

    def line(self) -> str:
        """The line the CLI prints: ``file: lesion ... -> mask`` or ``file: status: reason``."""
        if self.status != "ok":
            return f"{self.file}: {self.status}: {self.reason}"
        box = ",".join(str(v) for v in self.box or ())
        text = f"{self.file}: lesion {self.lesion_pixels} px, box {box} -> {self.mask}"
        text += f", {self.seg}" if self.seg else ""
        return text + (f" ({self.reason})" if self.reason else "")


@dataclass
class SegmentResult:
    """What :func:`segment_files` did: a row per file and the table it wrote."""

    rows: list[SegmentRow]
    table: Path
    notes: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)

    @property
    def problems(self) -> list[SegmentRow]:
        return [r for r in self.rows if r.problem]

    def summary(self) -> str:
        return (f"{len(self.rows)} file(s): {self.count('ok')} with a lesion, {self.count('no_lesion')} without, "
                f"{self.count('unreadable')} unreadable; table: {self.table}")


def segment_preprocess(run: str | os.PathLike, ingest: str | os.PathLike | None = None):
    """The :class:`msk.core.data.squaring.SquaringConfig` that squares new images like the run's
    training images: ``ingest``'s ``ingest.json`` if given, else what ``segmenter.json`` records
    (module docstring). A square size other than the run's is refused."""
    from msk.core.data.squaring import SquaringConfig, recorded_squaring

    run = Path(run)
    from msk.core.models.segmenter import read_segmenter_info

    info = read_segmenter_info(run)
    recorded, source = info.get("ingest"), info.get("source")
    if ingest is not None:
        preprocess = SquaringConfig(ingest=Path(ingest)).resolved()
    elif isinstance(recorded, dict) and "image_size" in recorded:
        preprocess = SquaringConfig(**recorded_squaring(recorded))
    elif source and (Path(source) / "ingest.json").is_file():
        preprocess = SquaringConfig(ingest=Path(source)).resolved()
    else:  # a run from before segmenter.json recorded its ingest, whose ingest folder is gone
        preprocess = SquaringConfig(image_size=int(info["image_size"]), resize="pad")
    if preprocess.image_size != int(info["image_size"]):
        raise ConfigError(f"--ingest {ingest}: its images are {preprocess.image_size} px but the segmenter "
                          f"{run} was trained on {info['image_size']} px images; give the run's own ingest folder")
    return preprocess


def _is_image(path: Path) -> bool:
    from msk.core.io.dicom import sniff_format

    try:
        with path.open("rb") as f:
            return sniff_format(f.read(132)) is not None
    except OSError:
        return True  # tried, and reported as unreadable


def find_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[tuple[Path, str]], list[str]]:
    """``([(file, output name)], notes)`` for files and folders given on the command line: a
    folder's image files (by content, recursively, hidden ones skipped) named by their path
    below it, a file by its name; output names are made unique."""
    found: list[tuple[Path, str]] = []
    notes: list[str] = []
    for given in inputs:
        given = Path(given)
        if not given.is_dir():
            found.append((given, given.name))
            continue
        files = sorted(p for p in given.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(given).parts))
        images = [p for p in files if _is_image(p)]
        if len(images) < len(files):
            notes.append(f"{given}: {len(files) - len(images)} file(s) that are not images were skipped")
        if not images:
            notes.append(f"{given}: no image files found")
        found += [(p, p.relative_to(given).as_posix()) for p in images]
    taken: set[str] = set()
    named = []
    for path, rel in found:
        stem = rel[: -len(Path(rel).suffix)] if Path(rel).suffix.lower() in IMAGE_SUFFIXES else rel
        name, k = stem, 1
        while name.lower() in taken:
            k += 1
            name = f"{stem}-{k}"
        taken.add(name.lower())
        named.append((path, name))
    return named, notes


@dataclass
class _Decoded:
    path: Path
    name: str
    square: np.ndarray
    source_shape: tuple[int, int]
    is_dicom: bool


def _decode(batch: list[tuple[Path, str]], preprocess) -> Iterator[_Decoded | SegmentRow]:
    from msk.core.data.squaring import square_image
    from msk.core.errors import QuarantineError
    from msk.core.io.dicom import read_image

    for path, name in batch:
        try:
            decoded = read_image(path, source=str(path), max_pixels=preprocess.max_pixels)
        except QuarantineError as exc:
            detail = " ".join(str(exc.detail).split())
            yield SegmentRow(str(path), "unreadable", reason=f"{exc.reason.value}: {detail}", problem=True)
            continue
        yield _Decoded(path, name, square_image(decoded.pixels, preprocess.image_size, preprocess.resize),
                       tuple(decoded.pixels.shape), decoded.meta.format == "dicom")


def _segment_one(item: _Decoded, probabilities: np.ndarray, threshold: float, out: Path, preprocess,
                 options: SegmentOptions, algorithm: dict[str, Any]) -> SegmentRow:
    from msk.core.data.roi import mask_box
    from msk.core.io.dicom_seg import DicomSegError, write_dicom_seg
    from msk.core.io.masks import mask_from_square, write_mask_png
    from msk.core.models.segmenter import NoLesionFound, lesion_mask

    file = str(item.path)
    try:
        square = lesion_mask(probabilities, threshold, where=file)
    except NoLesionFound as exc:
        return SegmentRow(file, "no_lesion", threshold, reason=str(exc).removeprefix(f"{file}: "), problem=True)
    mask = mask_from_square(square, item.source_shape, preprocess.resize)
    if not mask.any():
        return SegmentRow(file, "no_lesion", threshold, problem=True,
                          reason=f"the predicted lesion ({int(square.sum())} px at {preprocess.image_size} px) "
                                 "covers less than half a pixel of the image")
    mask_name = f"{item.name}.mask.png"
    write_mask_png(out / mask_name, mask)
    row = SegmentRow(file, "ok", threshold, mask_box(mask), int(mask.sum()), mask_name)
    if options.dicom_seg and not item.is_dicom:
        row.reason = "not DICOM, so no SEG; the PNG mask is this file's output"
    elif options.dicom_seg:
        seg_name = f"{item.name}.seg.dcm"
        try:
            write_dicom_seg(item.path, mask, out / seg_name, where=file, **algorithm)
            row.seg = seg_name
        except DicomSegError as exc:
            row.reason, row.problem = f"no SEG: {str(exc).removeprefix(f'{file}: ')}", True
    return row


def segment_files(run: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                  options: SegmentOptions | None = None, ingest: str | os.PathLike | None = None,
                  on_row: Callable[[SegmentRow], None] | None = None) -> SegmentResult:
    """Segment every image in ``inputs`` (files and folders) with the segmenter run ``run`` and
    write the masks, SEGs and ``segment.csv`` to ``out`` (module docstring). ``on_row`` is
    called with each file's row as soon as it is done. Unreadable files and images without a
    lesion are rows, never exceptions; a run folder or options that cannot be used raise
    :class:`msk.core.errors.MskError` before any file is read."""
    from msk.core.models.segmenter import load_ensemble

    options = options or SegmentOptions()
    run, out = Path(run), Path(out)
    preprocess = segment_preprocess(run, ingest)
    images, notes = find_images(inputs)
    if not images:
        raise MskError(f"{', '.join(str(p) for p in inputs)}: no image files to segment; give DICOM, PNG or "
                       "JPEG files or folders holding them")
    ensemble = load_ensemble(run)
    threshold = float(options.threshold if options.threshold is not None else ensemble.threshold)
    arch = f"{ensemble.info.get('segmenter')}:{ensemble.info.get('encoder')}"
    algorithm = {"algorithm": f"msk {arch}",
                 "parameters": {"threshold": f"{threshold:g}", "folds": str(len(ensemble.models)),
                                "image_size": str(preprocess.image_size), "resize": preprocess.resize}}
    out.mkdir(parents=True, exist_ok=True)
    table = out / SUMMARY_FILE
    rows: list[SegmentRow] = []
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()

        def emit(row: SegmentRow) -> None:
            rows.append(row)
            writer.writerow(row.record())
            f.flush()
            if on_row is not None:
                on_row(row)

        for start in range(0, len(images), options.batch_size):
            decoded = list(_decode(images[start:start + options.batch_size], preprocess))
            ready = [d for d in decoded if isinstance(d, _Decoded)]
            probabilities = iter(ensemble.probabilities(np.stack([d.square for d in ready])) if ready else [])
            for item in decoded:  # in the order given
                emit(item if isinstance(item, SegmentRow) else
                     _segment_one(item, next(probabilities), threshold, out, preprocess, options, algorithm))
    return SegmentResult(rows, table, notes)
