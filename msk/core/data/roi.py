"""Regions of interest from lesion annotations: LabelMe reading, mask rasterisation, square
crop boxes with a margin, and the crop itself.

Coordinates are pixels with the origin at the top-left corner of the image; boxes are
``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive (``image[y0:y1, x0:x1]``), and shapes are
``(height, width)`` like NumPy's.

Bad geometry, and what happens to it:

* a point outside the image: kept by :func:`read_labelme`; clipped to the image by
  :func:`lesion_box` and :func:`rasterize_mask` (PIL draws only inside);
* a shape entirely outside the image: ignored by :func:`lesion_box` and :func:`roi_box`; if
  no shape is left, they raise :class:`RoiError`;
* a degenerate rectangle (zero width or height): kept, it still marks a location; the crop box
  around it has the minimum side ``min_side``;
* a polygon with fewer than 3 points, an unsupported shape type (circle, line, point), or a
  non-finite coordinate: skipped at reading time, listed in ``Annotation.skipped``;
* an annotation without shapes: :func:`rasterize_mask` gives an all-False mask and
  :func:`lesion_box` raises :class:`RoiError`;
* a file that is not LabelMe JSON or lacks ``imageWidth``/``imageHeight``: :class:`RoiError`
  naming the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msk.core.errors import MskError

Box = tuple[int, int, int, int]
Point = tuple[float, float]


class RoiError(MskError, ValueError):
    """An annotation or box that gives no usable region; the message names the source."""


@dataclass
class Annotation:
    """Lesion shapes of one image, in that image's pixel coordinates.

    :param boxes: ``(label, x0, y0, x1, y1)`` with ``x0 <= x1`` and ``y0 <= y1`` (floats).
    :param polygons: ``(label, points)`` with at least 3 ``(x, y)`` points.
    :param skipped: one line per shape that was not kept, with the reason.
    """

    width: int
    height: int
    boxes: list[tuple[str, float, float, float, float]] = field(default_factory=list)
    polygons: list[tuple[str, list[Point]]] = field(default_factory=list)
    source: str = ""
    skipped: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def labels(self) -> set[str]:
        return {b[0] for b in self.boxes} | {p[0] for p in self.polygons}

    def is_empty(self) -> bool:
        return not self.boxes and not self.polygons


def read_labelme(path: str | os.PathLike) -> Annotation:
    """Read the rectangles and polygons of a LabelMe JSON file (the image itself is not read)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RoiError(f"{path}: not a readable LabelMe JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise RoiError(f"{path}: not a LabelMe JSON file (top level is not an object)")
    try:
        width, height = int(data["imageWidth"]), int(data["imageHeight"])
    except (KeyError, TypeError, ValueError):
        raise RoiError(f"{path}: imageWidth/imageHeight missing or not integers") from None
    if width <= 0 or height <= 0:
        raise RoiError(f"{path}: image size {width}x{height} is empty")
    ann = Annotation(width, height, source=str(path))
    for i, shape in enumerate(data.get("shapes") or []):
        label = str(shape.get("label", "")).strip()
        kind = shape.get("shape_type") or "polygon"  # LabelMe's default type
        try:
            points = [(float(x), float(y)) for x, y in shape.get("points") or []]
        except (TypeError, ValueError):
            ann.skipped.append(f"shape {i} ({label}): points are not (x, y) numbers")
            continue
        if not all(math.isfinite(v) for p in points for v in p):
            ann.skipped.append(f"shape {i} ({label}): non-finite coordinate")
        elif kind == "rectangle" and len(points) == 2:
            (xa, ya), (xb, yb) = points
            ann.boxes.append((label, min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)))
        elif kind == "polygon" and len(points) >= 3:
            ann.polygons.append((label, points))
        else:
            ann.skipped.append(f"shape {i} ({label}): {kind} with {len(points)} points "
                               "is not a rectangle (2 points) or polygon (>= 3 points)")
    return ann


def read_mask(path: str | Path) -> np.ndarray:
    """A lesion mask image (PNG, ...) as ``bool [H, W]``: any non-zero pixel is lesion."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "I", "I;16", "1") else im)
    except OSError as exc:
        raise RoiError(f"{path}: not a readable mask image ({exc})") from None
    return arr > 0


def rasterize_mask(
    annotation: Annotation,
    shape: tuple[int, int] | None = None,
    *,
    include_boxes: bool = False,
) -> np.ndarray:
    """Fill the annotation's polygons into a ``bool [H, W]`` mask.

    :param shape: ``(height, width)`` of the mask; default the annotated image's size. A
        different shape scales the coordinates, so a mask can be made at a working resolution.
    :param include_boxes: also fill the rectangles (for annotations with boxes only).
    """
    from PIL import Image, ImageDraw

    h, w = shape or annotation.shape
    sx, sy = w / annotation.width, h / annotation.height
    canvas = Image.new("1", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for _, points in annotation.polygons:
        draw.polygon([(x * sx, y * sy) for x, y in points], fill=1, outline=1)
    if include_boxes:
        for _, x0, y0, x1, y1 in annotation.boxes:
            draw.rectangle([x0 * sx, y0 * sy, x1 * sx, y1 * sy], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def lesion_box(annotation: Annotation) -> Box:
    """The box of the pixels that the rectangles and polygons touch, clipped to the image.

    Pixel ``i`` covers ``[i, i + 1)``, so a shape from ``x0`` to ``x1`` touches pixels
    ``floor(x0)`` to ``floor(x1)``: a degenerate shape still covers one pixel, and the box
    contains every pixel :func:`rasterize_mask` sets.
    """
    x0, y0, x1, y1 = _extent(annotation)
    return _clip_box(x0, y0, x1, y1, annotation.shape, annotation.source or "annotation")


def _extent(annotation: Annotation) -> tuple[float, float, float, float]:
    """Continuous bounds of the shapes that overlap the image (others are ignored)."""
    bounds = [(x0, y0, x1, y1) for _, x0, y0, x1, y1 in annotation.boxes]
    bounds += [(min(p[0] for p in pts), min(p[1] for p in pts),
                max(p[0] for p in pts), max(p[1] for p in pts)) for _, pts in annotation.polygons]
    source = annotation.source or "annotation"
    if not bounds:
        raise RoiError(f"{source}: no lesion shapes")
    w, h = annotation.width, annotation.height
    inside = [b for b in bounds if b[2] >= 0 and b[3] >= 0 and b[0] < w and b[1] < h]
    if not inside:
        raise RoiError(f"{source}: every lesion shape lies outside the {w}x{h} image")
    return (min(b[0] for b in inside), min(b[1] for b in inside),
            max(b[2] for b in inside), max(b[3] for b in inside))


def _clip_box(x0: float, y0: float, x1: float, y1: float, image_shape: tuple[int, int],
              source: str) -> Box:
    h, w = image_shape
    bx0, by0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    bx1, by1 = min(w, math.floor(x1) + 1), min(h, math.floor(y1) + 1)
    if bx0 >= bx1 or by0 >= by1:
        raise RoiError(f"{source}: lesion ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside the "
                       f"{w}x{h} image")
    return bx0, by0, bx1, by1


def roi_box(
    lesion: np.ndarray | Annotation | Sequence[float],
    image_shape: tuple[int, int] | None = None,
    margin: float = 0.15,
    min_side: int = 16,
) -> Box:
    """A square crop box around a lesion with ``margin`` on each side, inside the image.

    :param lesion: a ``bool [H, W]`` mask, an :class:`Annotation`, or a box
        ``(x0, y0, x1, y1)`` in annotation coordinates (it covers pixels ``floor(x0)`` to
        ``floor(x1)``, like :func:`lesion_box`).
    :param image_shape: ``(height, width)`` of the image; defaults to the mask's shape or the
        annotation's size (required for a plain box).
    :param margin: fraction of the lesion's longer side added on *each* side: the square's
        side is ``ceil(max(w, h) * (1 + 2 * margin))``, at least ``min_side``.

    The square is centred on the lesion. Where it sticks out of the image it is first
    **shifted** inside (its size is kept, so the lesion moves off-centre). Only when it is
    longer than the image's width or height is it **shrunk**, to the largest square that fits
    (side ``min(width, height)``): the margin gives way first. A lesion longer than the image's
    shorter side cannot sit in any square inside the image; the box is then as square as
    possible: the image's full shorter extent by the lesion's longer extent, and
    :func:`crop_roi` pads it to a square. The result always contains the lesion's box, lies
    inside the image and is never empty.
    """
    if isinstance(lesion, Annotation):
        image_shape = image_shape or lesion.shape
        sx, sy = image_shape[1] / lesion.width, image_shape[0] / lesion.height
        x0, y0, x1, y1 = _extent(lesion)
        box = _clip_box(x0 * sx, y0 * sy, x1 * sx, y1 * sy, image_shape,
                        lesion.source or "annotation")
    elif isinstance(lesion, np.ndarray):
        if lesion.ndim != 2:
            raise RoiError(f"a lesion mask must be 2-D [H, W], got shape {lesion.shape}")
        image_shape = image_shape or lesion.shape
        if tuple(image_shape) != lesion.shape:
            raise RoiError(f"mask shape {lesion.shape} differs from image shape {image_shape}")
        box = mask_box(lesion)
    else:
        if image_shape is None:
            raise RoiError("roi_box needs image_shape=(height, width) for a plain box")
        if len(lesion) != 4:
            raise RoiError(f"a box is (x0, y0, x1, y1), got {lesion!r}")
        x0, y0, x1, y1 = (float(v) for v in lesion)
        box = _clip_box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1), image_shape, "box")
    if margin < 0:
        raise RoiError(f"margin must be >= 0, got {margin}")

    h, w = int(image_shape[0]), int(image_shape[1])
    bx0, by0, bx1, by1 = box
    side = max(math.ceil(max(bx1 - bx0, by1 - by0) * (1 + 2 * margin)), min_side)
    fit = min(side, w, h)  # the largest square that fits, if the full one does not
    side_x, side_y = max(fit, bx1 - bx0), max(fit, by1 - by0)
    x0 = _place(bx0, bx1, side_x, w)
    y0 = _place(by0, by1, side_y, h)
    return x0, y0, x0 + side_x, y0 + side_y


def _place(lo: int, hi: int, side: int, extent: int) -> int:
    """Start of a ``side``-long interval centred on ``[lo, hi)``, shifted into ``[0, extent)``."""
    start = (lo + hi - side) // 2  # contains [lo, hi) because hi - lo <= side
    return min(max(start, 0), extent - side)


def crop_roi(image: np.ndarray, box: Box, size: int = 224) -> np.ndarray:
    """Crop ``box`` from ``image`` and resize it to a ``float32 [size, size]`` grey image.

    Colour images (``[H, W, 3|4]``) are converted to grey (ITU-R 601 luma). Integer images are
    scaled to ``[0, 1]`` by their dtype's maximum; float images keep their values. A
    non-square box (see :func:`roi_box`) is padded with zeros to a centred square first, so the
    anatomy keeps its aspect ratio. Resizing is bilinear with antialiasing.
    """
    from PIL import Image

    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] in (3, 4):
        rgb = img[..., :3].astype(np.float32)
        grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        img = grey if not np.issubdtype(img.dtype, np.integer) else grey / np.iinfo(img.dtype).max
    elif img.ndim == 2:
        img = (img.astype(np.float32) / np.iinfo(img.dtype).max
               if np.issubdtype(img.dtype, np.integer) else img.astype(np.float32))
    else:
        raise RoiError(f"image must be [H, W] or [H, W, 3|4], got shape {img.shape}")
    h, w = img.shape
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise RoiError(f"crop box {box} is empty or outside the {w}x{h} image")
    crop = img[y0:y1, x0:x1]
    ch, cw = crop.shape
    if ch != cw:
        side = max(ch, cw)
        square = np.zeros((side, side), dtype=np.float32)
        oy, ox = (side - ch) // 2, (side - cw) // 2
        square[oy:oy + ch, ox:ox + cw] = crop
        crop = square
    resized = Image.fromarray(np.ascontiguousarray(crop, dtype=np.float32)).resize(
        (size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def lesion_crop(image: np.ndarray, lesion: np.ndarray | Sequence[float], size: int, *,
                margin: float = 0.15) -> np.ndarray:
    """The region of interest every msk model takes: the lesion's (box or ``bool`` mask) square
    box plus ``margin`` (:func:`roi_box`) cropped from ``image`` and resized to ``uint8 [size, size]``
    (:func:`crop_roi`). Raises :class:`RoiError` for an empty or outside box."""
    square = roi_box(lesion if isinstance(lesion, np.ndarray) else tuple(lesion), np.asarray(image).shape[:2],
                     margin=margin)
    return np.clip(np.rint(crop_roi(image, square, size) * 255), 0, 255).astype(np.uint8)


def mask_box(mask: np.ndarray) -> Box:
    """The tight box ``(x0, y0, x1, y1)`` (exclusive ends) of a non-empty ``bool [H, W]`` mask."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise RoiError("the lesion mask is empty")
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1
