"""Square model inputs: how ingest fits a radiograph into its ``size`` x ``size`` image, and back.

Every image msk stores or feeds a model is square (:func:`square_image`); boxes and masks drawn on
the square map back to the source's own pixels (:func:`map_box_from_square`,
:func:`unsquare_image`) and boxes drawn on the source into the square (:func:`map_box_to_square`).
Ingest, the stages and serving share these functions, so the geometry is written once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from msk.core.config import MskConfig
from msk.core.data.scrub import DEFAULT_DETECTOR, ScrubDetector, ScrubMode
from msk.core.errors import ConfigError, MskError

__all__ = ["INGEST_SQUARING", "SquaringConfig", "map_box_from_square", "map_box_to_square", "read_square",
           "recorded_squaring", "square_image", "unsquare_image"]


def square_image(pixels: np.ndarray, size: int, mode: Literal["pad", "stretch"] = "pad") -> np.ndarray:
    """Resize a float image in [0, 1] to a ``size`` x ``size`` uint8 image, anti-aliased.

    ``pad`` scales the longer side to ``size`` and centres the image on black (the background
    of a bone-bright radiograph); ``stretch`` scales each axis independently. Resampling is
    PIL's bilinear filter, whose support widens with the scale factor, so downscaling
    averages over the source pixels instead of aliasing.
    """
    h, w = pixels.shape
    if mode == "stretch":
        new_w, new_h = size, size
    else:
        scale = size / max(h, w)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    resized = np.asarray(img.resize((new_w, new_h), Image.Resampling.BILINEAR))
    canvas = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = np.clip(np.rint(resized * 255.0), 0, 255)
    return canvas


def map_box_to_square(box: Sequence[float], source_shape: tuple[int, int], size: int,
                      resize: Literal["pad", "stretch"] = "pad") -> tuple[float, float, float, float]:
    """Map ``(x0, y0, x1, y1)`` in a ``(height, width)`` source image into the ``size`` x ``size``
    image :func:`square_image` makes from it: ``pad`` scales the longer side to ``size`` (the
    shorter to ``round(side * scale)``) and centres it; ``stretch`` scales each axis to ``size``."""
    h, w = (int(v) for v in source_shape)
    left, top, new_w, new_h = _placement(source_shape, size, resize)
    sx, sy = new_w / w, new_h / h
    x0, y0, x1, y1 = (float(v) for v in box)
    return left + x0 * sx, top + y0 * sy, left + x1 * sx, top + y1 * sy


def _placement(source_shape: tuple[int, int], size: int,
               resize: Literal["pad", "stretch"]) -> tuple[int, int, int, int]:
    """``(left, top, new_w, new_h)``: where :func:`square_image` puts a source image in its square."""
    h, w = (int(v) for v in source_shape)
    if h < 1 or w < 1:
        raise MskError(f"source image size {h}x{w} is empty; cannot map into it")
    if resize == "stretch":
        new_w, new_h = size, size
    else:
        scale = size / max(h, w)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    return (size - new_w) // 2, (size - new_h) // 2, new_w, new_h


def map_box_from_square(box: Sequence[float], source_shape: tuple[int, int], size: int,
                        resize: Literal["pad", "stretch"] = "pad") -> tuple[float, float, float, float]:
    """The inverse of :func:`map_box_to_square`: ``(x0, y0, x1, y1)`` in the ``size`` x ``size``
    square image -> the ``(height, width)`` source image's pixels, clipped to the source."""
    h, w = (int(v) for v in source_shape)
    left, top, new_w, new_h = _placement(source_shape, size, resize)
    sx, sy = w / new_w, h / new_h
    x0, y0, x1, y1 = (float(v) for v in box)
    return (min(max((x0 - left) * sx, 0.0), w), min(max((y0 - top) * sy, 0.0), h),
            min(max((x1 - left) * sx, 0.0), w), min(max((y1 - top) * sy, 0.0), h))


def unsquare_image(square: np.ndarray, source_shape: tuple[int, int],
                   resize: Literal["pad", "stretch"] = "pad") -> np.ndarray:
    """The inverse of :func:`square_image` for a ``[size, size]`` array made from a source of
    ``(height, width)``: the padding is cut off and the rest resized (bilinear) back to the
    source size. Returns ``float32 [height, width]``; masks threshold it (see
    :func:`msk.core.io.masks.mask_from_square`)."""
    size = int(square.shape[0])
    h, w = (int(v) for v in source_shape)
    left, top, new_w, new_h = _placement(source_shape, size, resize)
    inner = np.ascontiguousarray(square[top:top + new_h, left:left + new_w], dtype=np.float32)
    return np.asarray(Image.fromarray(inner, mode="F").resize((w, h), Image.Resampling.BILINEAR), np.float32)


#: The ingest options (in its ``ingest.json``) that decide the square image a model sees; a
#: training run records them, and serving, ``msk sort`` and ``msk segment`` prepare new images
#: with the same values.
INGEST_SQUARING: tuple[str, ...] = ("image_size", "resize", "max_pixels", "pixel_scrub", "scrub_detector")


def recorded_squaring(values: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`INGEST_SQUARING` options among ``values`` (an ingest's config, a run's record).

    A record that scrubbed but names no ``scrub_detector`` was made before there was a choice:
    its detector was ``morphology``."""
    found = {k: values[k] for k in INGEST_SQUARING if k in values}
    if found.get("pixel_scrub", "off") != "off" and "scrub_detector" not in found:
        found["scrub_detector"] = "morphology"
    return found


class SquaringConfig(MskConfig):
    """How an upload becomes the square ``uint8`` image the models were trained on.

    The decoder is the ingest's (:func:`msk.core.io.dicom.read_image`) and the square the
    ingest's (:func:`msk.core.data.squaring.square_image`); the models then apply their own eval
    transform. ``image_size`` and ``resize`` must be those of the ingest that made the
    training images: set ``ingest`` to read them from its ``ingest.json``.
    """

    ingest: Path | None = Field(
        None, description="ingest output folder whose ingest.json gives image_size, resize, max_pixels, "
        "pixel_scrub, scrub_detector")
    image_size: int = Field(256, ge=8, le=8192, description="side of the square image (the ingest's image_size)")
    resize: Literal["pad", "stretch"] = Field("pad", description="the ingest's resize mode")
    max_pixels: int = Field(50_000_000, gt=0, description="larger images are refused (422, reason too_large)")
    pixel_scrub: ScrubMode = Field(
        "auto", description="blank burned-in text before squaring, as the ingest does (msk.core.data.scrub): "
        "the models see what they were trained on and a Grad-CAM image shows no burned-in name; the "
        "ingest's value when `ingest` is set")
    scrub_detector: ScrubDetector = Field(
        DEFAULT_DETECTOR, description="the detector of burned-in text (learned or morphology); the ingest's "
        "value when `ingest` is set")

    def resolved(self) -> SquaringConfig:
        """This config with the values of ``ingest``'s ``ingest.json`` filled in.

        A value set explicitly that contradicts the ingest's is an error: the models would
        see images prepared unlike their training images.
        """
        if self.ingest is None:
            return self
        from msk.core.io.manifest import SUMMARY_FILE, read_ingest_summary

        summary = Path(self.ingest) / SUMMARY_FILE
        if not summary.is_file():
            raise ConfigError(f"preprocess.ingest: {summary} does not exist (not an ingest output folder?)")
        saved = (read_ingest_summary(self.ingest) or {}).get("config")
        if not isinstance(saved, dict):
            raise ConfigError(f"preprocess.ingest: {summary} is unreadable (no JSON object with its config)")
        values = recorded_squaring(saved)
        clash = {k: (getattr(self, k), v) for k, v in values.items()
                 if k in self.model_fields_set and getattr(self, k) != v}
        if clash:
            detail = ", ".join(f"{k}: {mine!r} here, {theirs!r} in {summary}" for k, (mine, theirs) in clash.items())
            raise ConfigError(f"preprocess contradicts the ingest it names ({detail}); drop the "
                              "explicit value(s)")
        return self.model_copy(update=values)


def read_square(data: bytes, config: SquaringConfig, source: str = "upload") -> tuple[np.ndarray, tuple[int, int]]:
    """Decode a file's bytes and square them exactly as the ingest does: ``(uint8 [S, S] image,
    decoded (height, width))``. A file the ingest would quarantine raises its
    :class:`~msk.core.errors.QuarantineError` (CPU work: serving runs it in a thread)."""
    from msk.core.io.dicom import read_image

    decoded = read_image(data, source=source, max_pixels=config.max_pixels)
    pixels = decoded.pixels
    if config.pixel_scrub != "off":
        from msk.core.data.scrub import scrub_text

        pixels = scrub_text(pixels, config.pixel_scrub, burned_in=decoded.meta.burned_in,
                            detector=config.scrub_detector).pixels
    return square_image(pixels, config.image_size, config.resize), tuple(decoded.pixels.shape)
