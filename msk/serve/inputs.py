"""Request inputs: the uploaded radiograph and, for ``/v1/classify``, its clinical metadata.

An upload arrives either as ``multipart/form-data`` with a file field ``image`` (and a field
``metadata`` holding JSON for ``/v1/classify``), or as the raw body with ``Content-Type``
``application/dicom``, ``image/png``, ``image/jpeg`` or ``application/octet-stream``. The
format is decided from the content, never from the declared type or the file name (which is
never read: a name can hold a patient's).

:func:`decode_radiograph` is the ingest's own preprocessing: :func:`msk.core.io.dicom.read_image`
(the full DICOM pixel pipeline, or Pillow for PNG/JPEG) then
:func:`msk.core.data.squaring.square_image`; a file the ingest would quarantine is refused with the
quarantine reason (:func:`msk.serve.errors.unreadable_image`). Only the pixels go on to the
models; the DICOM header is dropped here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile

from msk.core.data.squaring import SquaringConfig, read_square
from msk.core.errors import QuarantineError
from msk.serve.errors import ApiError, unreadable_image

__all__ = ["RAW_TYPES", "ClinicalMetadata", "Radiograph", "Upload", "decode_radiograph",
           "parse_metadata", "read_upload"]

#: Content types accepted as a raw image body.
RAW_TYPES = frozenset({"application/dicom", "image/png", "image/jpeg", "application/octet-stream"})
IMAGE_FIELD, METADATA_FIELD = "image", "metadata"
#: Longest metadata JSON read (a real record is ~100 characters).
MAX_METADATA_CHARS = 4096


@dataclass(frozen=True)
class Upload:
    """The bytes of the uploaded file and the raw metadata text (if sent)."""

    data: bytes
    metadata: str | None = None


@dataclass(frozen=True)
class Radiograph:
    """A decoded upload: the square ``uint8`` image and the decoded size it was made from."""

    pixels: np.ndarray
    source_shape: tuple[int, int]


async def read_upload(request: Request) -> Upload:
    """Read the request body as an :class:`Upload` (size limits are enforced by the middleware)."""
    mime = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if mime in RAW_TYPES:
        return Upload(await request.body())
    if mime != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type",
                       f"send multipart/form-data with a file field '{IMAGE_FIELD}', or the image as the "
                       f"body with Content-Type {', '.join(sorted(RAW_TYPES))}; got {mime or 'none'!r}")
    form = await request.form(max_files=2, max_fields=4)
    try:
        for name in (IMAGE_FIELD, METADATA_FIELD):
            if len(form.getlist(name)) > 1:
                raise ApiError(422, "invalid_request", f"multipart field '{name}' is sent "
                               f"{len(form.getlist(name))} times; send it once")
        unknown = [k for k in form.keys() if k not in (IMAGE_FIELD, METADATA_FIELD)]
        if unknown:
            raise ApiError(422, "invalid_request", f"{len(unknown)} unknown multipart field(s); only "
                           f"'{IMAGE_FIELD}' and '{METADATA_FIELD}' are read")
        image = form.get(IMAGE_FIELD)
        if not isinstance(image, UploadFile):
            raise ApiError(422, "invalid_request", f"multipart field '{IMAGE_FIELD}' must be a file upload")
        data = await image.read()
        metadata = form.get(METADATA_FIELD)
        if isinstance(metadata, UploadFile):
            metadata = (await metadata.read()).decode("utf-8", errors="replace")
        return Upload(data, metadata)
    finally:
        await form.close()


def decode_radiograph(data: bytes, preprocess: SquaringConfig) -> Radiograph:
    """Decode and square an upload exactly as the ingest does (CPU work: run it in a thread)."""
    try:
        pixels, source_shape = read_square(data, preprocess)
    except QuarantineError as exc:
        raise unreadable_image(exc.reason) from None
    return Radiograph(pixels, source_shape)


BOX_RULE = "box must be x0 < x1, y0 < y1, all >= 0 and finite (pixels of the uploaded image)"


def box_is_ordered(box) -> bool:
    """A lesion box ``(x0, y0, x1, y1)`` a request may send (``metadata.box``, ``?box=``)."""
    return all(math.isfinite(v) for v in box) and box[0] < box[2] and box[1] < box[3] and min(box) >= 0


class ClinicalMetadata(BaseModel):
    """The clinical facts ``/v1/classify`` takes with the image (the ``metadata`` form field).

    ``site`` and ``view`` are checked against the model's vocabulary by the classifier; a
    ``box`` is required when the classifier works on lesion crops.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sex: Literal["M", "F"] = Field(description="M or F")
    age: float | None = Field(None, ge=0, le=120, description="age in years; omit if unknown")
    site: str | None = Field(None, min_length=1, max_length=64, description="anatomical site (the model's vocabulary)")
    view: Literal["frontal", "lateral", "oblique"] | None = None
    position: str | None = Field(None, max_length=32, description="bone position, for models trained with it")
    box: tuple[float, float, float, float] | None = Field(
        None, description="lesion box x0, y0, x1, y1 in pixels of the uploaded image")

    @field_validator("box")
    @classmethod
    def _ordered(cls, box: tuple[float, float, float, float] | None):
        if box is not None and not box_is_ordered(box):
            raise ValueError(BOX_RULE)
        return box


def parse_metadata(text: str | None) -> ClinicalMetadata:
    """Validate the ``metadata`` field; a 422 ``invalid_metadata`` names what is wrong, not values."""
    if text is None:
        raise ApiError(422, "invalid_metadata", f"multipart field '{METADATA_FIELD}' (JSON) is required")
    if len(text) > MAX_METADATA_CHARS:
        raise ApiError(422, "invalid_metadata", f"metadata is {len(text)} characters; at most "
                       f"{MAX_METADATA_CHARS} are read")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_metadata", f"metadata is not valid JSON ({exc.msg} at char {exc.pos})") from None
    except (RecursionError, ValueError) as exc:  # nesting too deep; an integer of thousands of digits
        kind = "nested too deeply" if isinstance(exc, RecursionError) else "holds a number too long to read"
        raise ApiError(422, "invalid_metadata", f"metadata is not usable JSON (it {kind})") from None
    if not isinstance(raw, dict):
        raise ApiError(422, "invalid_metadata", f"metadata must be a JSON object, got {type(raw).__name__}")
    unknown = [i for i, key in enumerate(raw, 1) if key not in ClinicalMetadata.model_fields]
    if unknown:  # never quote a client's key back: it may be a patient's name
        raise ApiError(422, "invalid_metadata", f"metadata has {len(unknown)} unknown key(s) (position "
                       f"{', '.join(map(str, unknown[:5]))}); known keys: {', '.join(ClinicalMetadata.model_fields)}")
    try:
        return ClinicalMetadata.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors())
        raise ApiError(422, "invalid_metadata", f"metadata: {problems}") from None
