"""``msk sort RUN IMAGE...``: a trained sorter on image files, with ``unknown`` for misfits.

Files are decoded and squared exactly as ``/v1/sort`` does it
(:func:`msk.core.data.squaring.read_square`: the ingest's :func:`msk.core.io.dicom.read_image`
and :func:`msk.core.data.squaring.square_image`), at the size and resize mode of the ingest the run
was trained on (``sorter.json`` records them under ``"ingest"``; ``--ingest`` names the ingest
folder instead). :func:`msk.core.models.sorter.sort_answer` is the answer per image that the CLI prints and
``/v1/sort`` returns: the ``k`` most probable regions, the image's score, the threshold and
whether the image is ``unknown`` (:mod:`msk.core.models.ood`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msk.core.data.squaring import SquaringConfig, read_square, recorded_squaring
from msk.core.errors import ConfigError, QuarantineError, unusable_message

__all__ = ["FileError", "ReadImages", "read_images", "run_preprocess"]


def run_preprocess(run: str | os.PathLike, ingest: str | os.PathLike | None = None):
    """The :class:`msk.core.data.squaring.SquaringConfig` that makes new images like the run's
    training images: from ``ingest``'s ``ingest.json`` if given, else from ``sorter.json``."""
    from msk.core.models.sorter import read_sorter_info

    if ingest is not None:
        return SquaringConfig(ingest=Path(ingest)).resolved()
    recorded = read_sorter_info(run).get("ingest")
    if not recorded or "image_size" not in recorded:
        raise ConfigError(f"{Path(run) / 'sorter.json'} does not record how its training images "
                          "were squared (a run from before `msk sort`); pass --ingest with the "
                          "run's ingest folder, or rerun `msk train sorter` on the run folder")
    values = recorded_squaring(recorded)
    return SquaringConfig(**values)


@dataclass(frozen=True)
class FileError:
    """A file that could not be sorted: its path, the ingest's quarantine reason (or
    ``read_error``) and a sentence saying why."""

    path: str
    reason: str
    message: str

    def line(self) -> str:
        return f"{self.path}: {self.reason}: {self.message}"


@dataclass
class ReadImages:
    """Decoded files: square ``uint8 [N, S, S]`` images with their paths, and the failures."""

    images: np.ndarray
    paths: list[str]
    errors: list[FileError] = field(default_factory=list)


def read_images(paths: Sequence[str | os.PathLike], preprocess) -> ReadImages:
    """Decode every file like an upload to ``/v1/sort``; unreadable files become
    :class:`FileError` s, never exceptions."""
    images, ok, errors = [], [], []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            errors.append(FileError(str(path), "read_error", exc.strerror or type(exc).__name__))
            continue
        try:
            images.append(read_square(data, preprocess)[0])
        except QuarantineError as exc:
            errors.append(FileError(str(path), exc.reason.value,
                                    unusable_message(exc.reason).replace("the upload", "the file")))
            continue
        ok.append(str(path))
    size = preprocess.image_size
    stacked = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
    return ReadImages(stacked, ok, errors)


