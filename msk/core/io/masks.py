"""Lesion masks as data: LabelMe JSON or mask images -> binary masks, checked against their image,
and mapped into the square images of an ingest.

A mask is ``bool [H, W]`` in the pixels of its *source* image (the radiograph as it was
ingested, before :func:`msk.core.data.squaring.square_image` made it square). Two file kinds are read:

* **LabelMe JSON** (BTXRD's format; :func:`msk.core.data.roi.read_labelme`): polygons are filled with
  Pillow's ``ImageDraw``; rectangles are filled only when the file has no polygon (BTXRD draws a
  rectangle *and* a polygon around each tumour, the polygon being the outline);
* **mask images** (PNG, ...): any non-zero pixel is lesion.

Bad input, and what happens to it (every error is a one-line :class:`MaskError` naming the file):

* a shape partly or wholly outside the image: **clipped** to the image, with a warning naming the
  file and shape;
* a polygon with fewer than 3 points (or another unusable shape): **skipped**, with a warning
  naming the file and shape; the other shapes are kept (one bad click should not lose an
  annotated tumour);
* an **empty mask** (no shape, every shape skipped or outside, or an all-zero mask image):
  :class:`MaskError`; a tumour mask must mark the tumour;
* a mask of **another size than its image** (a mask image's pixels, or a LabelMe file's
  ``imageWidth``/``imageHeight``): :class:`MaskError` giving both sizes; masks are never
  rescaled silently.

Masks tables (``msk train segmenter``) are CSV files ``image_id,mask_path[,label]``; a relative
``mask_path`` is relative to the CSV's folder. See ``docs/segmentation.md``.
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from msk.core.errors import MskError

__all__ = ["MaskError", "MaskRow", "MaskWarning", "labelme_mask", "load_mask", "mask_from_square", "mask_to_square",
           "read_mask_table", "write_mask_png"]

LABELME_SUFFIXES = (".json",)


class MaskError(MskError, ValueError):
    """A mask that cannot be used; the message names the file and the fix."""


class MaskWarning(UserWarning):
    """A mask shape that was clipped or skipped (the message names the file and the shape)."""


def _warn(messages: list[str]) -> None:
    for message in messages:
        warnings.warn(message, MaskWarning, stacklevel=3)


def labelme_mask(path: str | os.PathLike, *, boxes: Literal["auto", "always", "never"] = "auto",
                 allow_empty: bool = False) -> tuple[np.ndarray, list[str]]:
    """The lesion mask of a LabelMe JSON file at its image's size, and the warnings it gave.

    :param boxes: fill rectangles ``always``, ``never`` or (``auto``) only when there is no polygon.
    :param allow_empty: return an all-False mask instead of raising when nothing is left.
    Warnings (clipped and skipped shapes) are also issued as :class:`MaskWarning`.
    """
    from PIL import Image, ImageDraw

    from msk.core.data.roi import RoiError, read_labelme

    try:
        ann = read_labelme(path)
    except RoiError as exc:
        raise MaskError(str(exc)) from None
    w, h = ann.width, ann.height
    notes = [f"{path}: {s}; skipped" for s in ann.skipped]
    fill_boxes = boxes == "always" or (boxes == "auto" and not ann.polygons)
    shapes: list[tuple[str, str, list[tuple[float, float]]]] = [
        ("polygon", label, pts) for label, pts in ann.polygons]
    if fill_boxes:
        shapes += [("rectangle", label, [(x0, y0), (x1, y1)]) for label, x0, y0, x1, y1 in ann.boxes]
    canvas = Image.new("1", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for i, (kind, label, pts) in enumerate(shapes):
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        where = f"{path}: {kind} {i + 1} ({label or 'no label'})"
        if max(xs) < 0 or max(ys) < 0 or min(xs) >= w or min(ys) >= h:
            notes.append(f"{where} lies entirely outside the {w}x{h} image; skipped")
            continue
        if min(xs) < 0 or min(ys) < 0 or max(xs) > w or max(ys) > h:
            notes.append(f"{where} extends outside the {w}x{h} image; clipped to it")
        if kind == "polygon":
            draw.polygon(pts, fill=1, outline=1)  # Pillow draws only inside the image: the clip
        else:
            draw.rectangle([pts[0], pts[1]], fill=1, outline=1)
    mask = np.asarray(canvas, dtype=bool)
    _warn(notes)
    if not mask.any() and not allow_empty:
        why = "it has no shapes" if ann.is_empty() else "no usable shape is left inside the image"
        raise MaskError(f"{path}: empty lesion mask ({why}); fix the annotation or leave the image out")
    return mask, notes


def load_mask(path: str | os.PathLike, image_shape: tuple[int, int] | None = None, *,
              allow_empty: bool = False) -> np.ndarray:
    """``bool [H, W]`` from a LabelMe JSON file or a mask image, checked against ``image_shape``
    (``(height, width)`` of the source image) when given."""
    from msk.core.data.roi import RoiError, read_mask

    path = Path(path)
    if not path.is_file():
        raise MaskError(f"{path}: no such mask file")
    if path.suffix.lower() in LABELME_SUFFIXES:
        mask, _ = labelme_mask(path, allow_empty=True)
    else:
        try:
            mask = read_mask(path)
        except RoiError as exc:
            raise MaskError(str(exc)) from None
        if mask.ndim != 2:
            raise MaskError(f"{path}: a mask must be a single-channel image, got shape {mask.shape}")
    if image_shape is not None and tuple(mask.shape) != tuple(int(v) for v in image_shape):
        raise MaskError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} (width x height) but its image is "
                        f"{image_shape[1]}x{image_shape[0]}; masks must have their image's size")
    if not allow_empty and not mask.any():
        raise MaskError(f"{path}: empty lesion mask (no non-zero pixel); fix the mask or leave the image out")
    return mask


def mask_to_square(mask: np.ndarray, size: int, resize: Literal["pad", "stretch"] = "pad") -> np.ndarray:
    """Map a source-image mask into the ``size`` x ``size`` image that
    :func:`msk.core.data.squaring.square_image` makes from that source: the same scaling and padding
    (one implementation), then a 0.5 threshold of the anti-aliased result."""
    from msk.core.data.squaring import square_image

    return square_image(mask.astype(np.float32), size, resize) >= 128


def mask_from_square(mask: np.ndarray, source_shape: tuple[int, int],
                     resize: Literal["pad", "stretch"] = "pad") -> np.ndarray:
    """The inverse of :func:`mask_to_square`: a mask of the ingest's square image -> ``bool
    [height, width]`` in the source image's pixels (a predicted lesion drawn on the original)."""
    from msk.core.data.squaring import unsquare_image

    return unsquare_image(np.asarray(mask, np.float32), source_shape, resize) >= 0.5


def write_mask_png(path: str | os.PathLike, mask: np.ndarray) -> Path:
    """Write ``mask`` as an 8-bit PNG (0 background, 255 lesion), the format :func:`load_mask` reads."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path, optimize=True)
    return path


@dataclass(frozen=True)
class MaskRow:
    """One row of a masks table: the ingest image, its mask file (absolute) and optional label."""

    image_id: str
    mask_path: Path
    label: str | None
    where: str


def read_mask_table(path: str | os.PathLike) -> list[MaskRow]:
    """Rows of a CSV ``image_id,mask_path[,label]`` (relative mask paths: from the CSV's folder)."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            missing = [c for c in ("image_id", "mask_path") if c not in columns]
            if missing:
                raise MaskError(f"{path}, line 1: no column {', '.join(missing)}; a masks table has columns "
                                f"image_id,mask_path[,label] (found: {', '.join(columns) or 'none'})")
            rows: list[MaskRow] = []
            seen: dict[str, int] = {}
            for line, row in enumerate(reader, 2):
                image_id, mask = (row.get("image_id") or "").strip(), (row.get("mask_path") or "").strip()
                where = f"{path}, line {line}"
                if not image_id or not mask:
                    raise MaskError(f"{where}: empty image_id or mask_path")
                if image_id in seen:
                    raise MaskError(f"{where}: image {image_id} already has a mask (line {seen[image_id]}); "
                                    "merge its shapes into one mask file")
                seen[image_id] = line
                label = (row.get("label") or "").strip() or None
                rows.append(MaskRow(image_id, Path(mask) if Path(mask).is_absolute() else path.parent / mask,
                                    label, where))
    except OSError as exc:
        raise MaskError(f"{path}: cannot read the masks table ({exc.strerror or exc})") from None
    if not rows:
        raise MaskError(f"{path}: the masks table has no rows")
    return rows
