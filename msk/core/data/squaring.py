"""Square model inputs: how ingest fits a radiograph into its ``size`` x ``size`` image, and back.

Every image msk stores or feeds a model is square (:func:`square_image`); boxes and masks drawn on
the square map back to the source's own pixels (:func:`map_box_from_square`,
:func:`unsquare_image`) and boxes drawn on the source into the square (:func:`map_box_to_square`).
Ingest, the stages and serving share these functions, so the geometry is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image

from msk.core.errors import MskError

__all__ = ["map_box_from_square", "map_box_to_square", "square_image", "unsquare_image"]


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
