"""Errors and the machine-readable reasons an input is quarantined for.

Every input of an ingest ends in the manifest either as ``ok`` or quarantined with one of the
:class:`QuarantineReason` values below plus a human-readable detail; nothing is dropped.
"""

from __future__ import annotations

from enum import Enum


class QuarantineReason(str, Enum):
    EMPTY = "empty"  # zero-byte file
    CORRUPT = "corrupt"  # truncated or malformed file, pixel data that does not decode
    NOT_AN_IMAGE = "not_an_image"  # neither DICOM nor a readable PNG/JPEG/BMP/TIFF
    NO_PIXEL_DATA = "no_pixel_data"  # DICOM without an image (SR, presentation state, ...)
    UNSUPPORTED_SYNTAX = "unsupported_syntax"  # transfer syntax no installed decoder handles
    UNSUPPORTED_IMAGE = "unsupported_image"  # photometric interpretation / layout msk cannot render
    TOO_LARGE = "too_large"  # dimensions or file size above the configured cap
    DUPLICATE = "duplicate"  # same content (SHA-256) as an earlier input
    READ_ERROR = "read_error"  # the file could not be read (permissions, I/O error)
    EXCLUDED_MODALITY = "excluded_modality"  # DICOM Modality (or none) not in IngestConfig.modalities
    TOO_SMALL = "too_small"  # shorter side below IngestConfig.min_side (e.g. a 1-pixel-high strip)
    EXTREME_ASPECT = "extreme_aspect"  # longer / shorter side above IngestConfig.max_aspect


class MskError(Exception):
    """Base class of msk's user-facing errors (the CLI prints their message, no traceback)."""


class QuarantineError(MskError):
    """An input that cannot be used; carries the reason that goes into the manifest."""

    def __init__(self, reason: QuarantineReason, detail: str, source: str = ""):
        self.reason = QuarantineReason(reason)
        self.detail = detail
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{self.reason.value}: {detail}")

    def __reduce__(self):  # picklable across Ray worker boundaries
        return (type(self), (self.reason, self.detail, self.source))


class ConfigError(MskError):
    """An invalid configuration file or option."""


class TrainingDataError(MskError):
    """Images and labels that cannot be trained on as asked (too few patients for the splits,
    labels of images that are not in the ingest); the message says what to change."""


class DatasetError(MskError):
    """A labelled dataset layout that cannot be imported (missing column, unknown label, ...);
    the message names the file and line."""


#: What an unusable upload is told, per quarantine reason (never the decoder's own detail,
#: which may quote header values).
REASON_MESSAGES: dict[QuarantineReason, str] = {
    QuarantineReason.EMPTY: "the upload is empty",
    QuarantineReason.CORRUPT: "the file is truncated or malformed, or its pixel data does not decode",
    QuarantineReason.NOT_AN_IMAGE: "the upload is neither DICOM nor PNG/JPEG",
    QuarantineReason.NO_PIXEL_DATA: "the DICOM object holds no image (a report or presentation state?)",
    QuarantineReason.UNSUPPORTED_SYNTAX: "no installed decoder handles the DICOM transfer syntax",
    QuarantineReason.UNSUPPORTED_IMAGE: "the image's photometric interpretation or layout cannot be rendered",
    QuarantineReason.TOO_LARGE: "the image has more pixels than this server accepts (max_pixels)",
    QuarantineReason.DUPLICATE: "the upload duplicates another",
    QuarantineReason.READ_ERROR: "the upload could not be read",
    QuarantineReason.EXCLUDED_MODALITY: "the DICOM modality is not one this server takes",
    QuarantineReason.TOO_SMALL: "the image is too small to be a radiograph",
    QuarantineReason.EXTREME_ASPECT: "the image is a strip (its sides are too unequal to be a radiograph)",
}


def unusable_message(reason: QuarantineReason | str) -> str:
    """The sentence a caller is told for an upload (or a file given to ``msk sort``) that the
    ingest would quarantine for ``reason``; never the decoder's own detail, which may quote
    header values."""
    reason = QuarantineReason(reason)
    if reason is QuarantineReason.NOT_AN_IMAGE:
        return REASON_MESSAGES[reason]
    return f"the image cannot be used: {REASON_MESSAGES[reason]}"
