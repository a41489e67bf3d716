"""Pixel scrubbing: find text burned into a radiograph and blank it before it is stored.

Scanners, PACS exports and digitised films burn patient names, dates, institution codes and
side markers into the pixels; no header de-identification removes them. :func:`scrub_text`
finds lines of text with :func:`detect_text` and fills each box with the image's minimum
(black), so the shards, the contact sheets and everything a model or a person sees afterwards
carry no burned-in text.

The detector is classical (no model weights, a few tens of milliseconds per image on one core):
burned-in text is made of thin strokes of one high-contrast grey level, set in rows of glyphs
of equal height. On the image reduced to at most :data:`WORK_SIDE` pixels:

1. a white (bright text) and a black (dark text) top-hat with a square a few stroke widths wide
   keeps thin structures standing out from their surroundings by more than :data:`MIN_CONTRAST`;
2. their connected components that look like glyphs (height, width, ink density, a flat grey
   level) are kept;
3. glyphs of similar height, aligned on one baseline and at most a glyph height apart, form a
   line; a line of at least :data:`MIN_GLYPHS` glyphs whose grey levels agree is text.
   Lines stacked on one another are one block. A box is the block's bounds plus a margin.

A single isolated glyph is never a line, so a lead side marker ("L", "R") alone stays: it
carries no identity, and radiologists want it. Bone does not look like this: trabeculae are
low-contrast and irregular, cortices are long strokes, not rows of short equal ones
(``bench/scrub.py`` measures how much bone is blanked on synthetic exports and how much is
blanked on real radiographs).

Modes (``pixel_scrub`` of ``msk ingest``): ``off`` leaves the pixels untouched; ``always``
blanks every block found (a line of at least :data:`MIN_GLYPHS` glyphs); ``auto`` does the same
when the DICOM header declares ``BurnedInAnnotation`` YES, and otherwise blanks only the
*confident* blocks (a line of at least :data:`CONFIDENT_GLYPHS` glyphs): two aligned glyph-like
blobs are sometimes bone, three rarely are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

__all__ = [
    "CONFIDENT_GLYPHS",
    "MAX_AREA",
    "MAX_LINES",
    "METHOD",
    "MIN_CONTRAST",
    "MIN_GLYPHS",
    "NOISE_FACTOR",
    "WORK_SIDE",
    "Box",
    "SHARPNESS",
    "ScrubMode",
    "ScrubResult",
    "blank_boxes",
    "detect_text",
    "scrub_fields",
    "scrub_text",
]

ScrubMode = Literal["auto", "always", "off"]

#: Name of the detector, recorded in the manifest's ``scrub`` column.
METHOD = "morphology"
#: Detection runs on the image reduced (block mean) so that its longer side is at most this.
WORK_SIDE = 1024
#: Top-hat contrast (display units, [0, 1]) a stroke needs to be ink.
MIN_CONTRAST = 0.08
#: The ink threshold is at least this many times the image's noise (standard deviation).
NOISE_FACTOR = 5.0
#: The steepest pixel step of a glyph is at least this share of its contrast (sharp edges).
SHARPNESS = 0.7
#: Glyphs a line needs; a single glyph (a side marker) is not text.
MIN_GLYPHS = 2
#: A block taller than this many lines (of twice the glyph height) is not burned-in text.
MAX_LINES = 8
#: Nor is a block covering more than this share of the image.
MAX_AREA = 0.1
#: Glyphs of a line that make ``auto`` scrub an image whose header does not declare burned-in text.
CONFIDENT_GLYPHS = 3


@dataclass(frozen=True)
class Box:
    """A text box in source pixels: columns ``x0 .. x1 - 1``, rows ``y0 .. y1 - 1``; ``glyphs``
    is the number of glyphs of its longest line."""

    x0: int
    y0: int
    x1: int
    y1: int
    glyphs: int


@dataclass(frozen=True)
class ScrubResult:
    """What :func:`scrub_text` did: the (possibly) blanked pixels, the boxes it blanked and why.

    ``trigger`` is ``None`` when nothing was blanked, else ``always``, ``burned_in_annotation``
    (the header declared it) or ``text_detected``.
    """

    pixels: np.ndarray
    boxes: tuple[Box, ...]
    trigger: str | None


def _reduce(pixels: np.ndarray) -> tuple[np.ndarray, int]:
    """Block-mean the image so its longer side is at most :data:`WORK_SIDE`; returns it and the factor."""
    factor = max(1, -(-max(pixels.shape) // WORK_SIDE))
    if factor == 1:
        return pixels.astype(np.float32, copy=False), 1
    h, w = (pixels.shape[0] // factor) * factor, (pixels.shape[1] // factor) * factor
    small = pixels[:h, :w].astype(np.float32).reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
    return small, factor


def _noise(img: np.ndarray, tile: int = 32) -> np.ndarray:
    """Local pixel noise (a robust standard deviation) per ``tile`` x ``tile`` block, at full size:
    1.4826 x the block median of ``|img - median3x3(img)|`` (strokes of text fill too little of a
    block to move its median; flat letterbox bars give 0)."""
    residual = np.abs(img - ndimage.median_filter(img, size=3))
    h, w = img.shape
    th, tw = -(-h // tile), -(-w // tile)
    padded = np.pad(residual, ((0, th * tile - h), (0, tw * tile - w)), mode="edge")
    blocks = np.median(padded.reshape(th, tile, tw, tile).transpose(0, 2, 1, 3).reshape(th, tw, -1), axis=2)
    # the median filter's residual of Gaussian noise is about 0.7 of its standard deviation
    sigma = 1.4826 * blocks / 0.7
    return np.repeat(np.repeat(sigma, tile, axis=0), tile, axis=1)[:h, :w].astype(np.float32)


def _glyphs(img: np.ndarray, hat: np.ndarray, min_h: int, max_h: int, threshold: np.ndarray) -> np.ndarray:
    """Glyph-shaped connected components of ``hat > threshold`` (``hat``: a top-hat of ``img``,
    the ink bright): an array of rows ``x0, y0, x1, y1, level`` (level: the ink's brightest value)."""
    labels, n = ndimage.label(hat > threshold)  # 4-connected: glyphs touching at a corner stay apart
    if n == 0:
        return np.zeros((0, 5), np.float32)
    slices = ndimage.find_objects(labels)
    box = np.array([(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop) for sl in slices], np.float32)
    h, w = box[:, 3] - box[:, 1], box[:, 2] - box[:, 0]
    index = np.arange(1, n + 1)
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = (h >= min_h) & (h <= max_h) & (w <= 3 * h) & (area >= 6)
    fill = area / np.maximum(h * w, 1)
    keep &= (fill >= 0.12) & (fill <= 0.85)
    if not keep.any():
        return np.zeros((0, 5), np.float32)
    index = index[keep]
    strength = np.asarray(ndimage.maximum(hat, labels, index), np.float32)
    above = np.asarray(ndimage.maximum(hat / threshold, labels, index), np.float32)
    level = np.asarray(ndimage.maximum(img, labels, index), np.float32)
    step = np.maximum(np.abs(np.diff(img, axis=1, append=img[:, -1:])), np.abs(np.diff(img, axis=0, append=img[-1:])))
    edge = np.asarray(ndimage.maximum(step, labels, index), np.float32)
    # faint blobs, and blobs without a sharp edge (a pixel step of most of their contrast), are
    # texture, not ink: rendered text rises from its background within a pixel or two
    strong = (above >= 1.5) & (edge >= SHARPNESS * strength)
    return np.column_stack([box[keep][strong], level[strong]])


#: Added to the level of dark glyphs so that bright and dark glyphs never share a line.
_DARK = np.array([0, 0, 0, 0, 10], np.float32)


def _blocks(g: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """Group glyphs (rows of :func:`_glyphs`) into text blocks: ``(member rows, glyphs of its
    longest line)`` for each group of glyphs linked as neighbours on a line (similar height,
    shared baseline, a gap under a glyph height, the same grey level) or on stacked lines."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    n = len(g)
    if n == 0:
        return []
    h = g[:, 3] - g[:, 1]
    centres = np.column_stack([(g[:, 0] + g[:, 2]) / 2, (g[:, 1] + g[:, 3]) / 2])
    reach = 2.0 * float(h.max()) + float((g[:, 2] - g[:, 0]).max())
    pairs = cKDTree(centres).query_pairs(r=reach, output_type="ndarray").reshape(-1, 2)
    i, j = pairs[:, 0], pairs[:, 1]
    hmax, hmin = np.maximum(h[i], h[j]), np.minimum(h[i], h[j])
    similar = (hmax <= 1.6 * hmin) & (np.abs(g[i, 4] - g[j, 4]) <= 0.15)
    gap_x = np.maximum(g[i, 0], g[j, 0]) - np.minimum(g[i, 2], g[j, 2])
    gap_y = np.maximum(g[i, 1], g[j, 1]) - np.minimum(g[i, 3], g[j, 3])
    baseline = np.abs(g[i, 3] - g[j, 3]) <= 0.2 * hmax + 1
    same_line = similar & (gap_x <= 0.9 * hmax) & baseline & (gap_y < -0.5 * hmin)
    stacked = similar & (gap_x < 0) & (gap_y >= -1) & (gap_y <= 1.2 * hmax)

    def components(mask: np.ndarray) -> tuple[int, np.ndarray]:
        graph = coo_matrix((np.ones(int(mask.sum())), (i[mask], j[mask])), shape=(n, n))
        count, labels = connected_components(graph, directed=False)
        return int(count), labels

    _, line = components(same_line)
    line_size = np.bincount(line)[line]  # glyphs on each glyph's line
    n_groups, group = components(same_line | stacked)
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(n_groups + 1))
    blocks = (order[bounds[k]:bounds[k + 1]] for k in range(n_groups))
    return [(members, int(line_size[members].max())) for members in blocks if len(members) > 1]


def detect_text(pixels: np.ndarray, *, min_glyphs: int = MIN_GLYPHS) -> list[Box]:
    """Boxes of the blocks of burned-in text in a grey image (float in [0, 1], any size).

    See the module docstring for the method; a box's ``glyphs`` counts the glyphs of its longest
    line, and only boxes with at least ``min_glyphs`` of them are returned.
    """
    if pixels.ndim != 2 or min(pixels.shape) < 8:
        return []
    img, factor = _reduce(pixels)
    side = max(img.shape)
    min_h, max_h = 5, max(8, int(0.14 * side))
    size = max(5, int(0.025 * side)) | 1  # a few stroke widths of the largest text
    threshold = np.maximum(MIN_CONTRAST, NOISE_FACTOR * _noise(img))
    hats = (img - ndimage.grey_opening(img, size=(size, size)), ndimage.grey_closing(img, size=(size, size)) - img)
    glyphs = np.concatenate([
        _glyphs(img, hats[0], min_h, max_h, threshold),
        _glyphs(1.0 - img, hats[1], min_h, max_h, threshold) + _DARK,
    ])
    boxes = []
    for members, run in _blocks(glyphs):
        if run < min_glyphs:
            continue
        m = glyphs[members]
        dark = bool(m[0, 4] >= _DARK[4])
        ink = 1.0 - img if dark else img
        level = float(np.median(m[:, 4])) - (_DARK[4] if dark else 0.0)
        height = float(np.median(m[:, 3] - m[:, 1]))
        x0, y0, x1, y1 = m[:, 0].min(), m[:, 1].min(), m[:, 2].max(), m[:, 3].max()
        if y1 - y0 > MAX_LINES * 2 * height or (x1 - x0) * (y1 - y0) > MAX_AREA * img.size:
            continue  # an annotation is a few short lines in a corner, not a field of blobs
        if run >= CONFIDENT_GLYPHS:
            x0, y0, x1, y1 = _grow(ink, hats[dark], (x0, y0, x1, y1), level, height, threshold)
        margin = 2 + 0.2 * height
        boxes.append(Box(max(0, int((x0 - margin) * factor)), max(0, int((y0 - margin) * factor)),
                         min(pixels.shape[1], int(np.ceil((x1 + margin) * factor))),
                         min(pixels.shape[0], int(np.ceil((y1 + margin) * factor))), run))
    return _merge_overlapping(boxes)


def _grow(ink: np.ndarray, hat: np.ndarray, box: tuple[float, float, float, float], level: float,
          height: float, threshold: np.ndarray) -> tuple[float, float, float, float]:
    """Extend a text block's box to the ink of its grey ``level`` next to it: glyphs the first pass
    missed because they touch an edge of the background or sit on a brighter part of it (the
    first or last glyph of a line, a line of a block on another background), at most two glyph
    heights sideways and one and a half up or down."""
    x0, y0, x1, y1 = box
    wx0, wx1 = int(max(0, x0 - 2 * height)), int(min(ink.shape[1], x1 + 2 * height))
    wy0, wy1 = int(max(0, y0 - 1.5 * height)), int(min(ink.shape[0], y1 + 1.5 * height))
    sub, sub_hat = ink[wy0:wy1, wx0:wx1], hat[wy0:wy1, wx0:wx1]
    win = (np.abs(sub - level) <= 0.1) & (sub_hat > 0.5 * threshold[wy0:wy1, wx0:wx1])
    labels, _ = ndimage.label(win, structure=np.ones((3, 3), bool))
    step = np.maximum(np.abs(np.diff(sub, axis=1, append=sub[:, -1:])), np.abs(np.diff(sub, axis=0, append=sub[-1:])))
    for index, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if h > 1.6 * height or w > 4 * height or h * w < 4:
            continue
        comp = labels[sl] == index
        strength = float(sub_hat[sl][comp].max())
        if strength < float(threshold[wy0:wy1, wx0:wx1][sl][comp].max()) or step[sl][comp].max() < SHARPNESS * strength:
            continue  # faint or soft: not ink
        x0, y0 = min(x0, wx0 + sl[1].start), min(y0, wy0 + sl[0].start)
        x1, y1 = max(x1, wx0 + sl[1].stop), max(y1, wy0 + sl[0].stop)
    return x0, y0, x1, y1


def _merge_overlapping(boxes: list[Box]) -> list[Box]:
    """Replace boxes that overlap by their union, until none overlap."""
    boxes = list(boxes)
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1:
                    boxes[i] = Box(min(a.x0, b.x0), min(a.y0, b.y0), max(a.x1, b.x1), max(a.y1, b.y1),
                                   max(a.glyphs, b.glyphs))
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return boxes


def blank_boxes(pixels: np.ndarray, boxes: tuple[Box, ...] | list[Box]) -> np.ndarray:
    """A copy of ``pixels`` with every box filled with the image's minimum (black)."""
    out = pixels.copy()
    fill = out.min() if out.size else 0
    for b in boxes:
        out[b.y0:b.y1, b.x0:b.x1] = fill
    return out


def scrub_text(pixels: np.ndarray, mode: ScrubMode, *, burned_in: bool = False) -> ScrubResult:
    """Blank the burned-in text of ``pixels`` according to ``mode`` (module docstring).

    ``burned_in`` is the header's ``BurnedInAnnotation`` == YES. With ``off`` the same array
    is returned, untouched.
    """
    if mode == "off":
        return ScrubResult(pixels, (), None)
    boxes = tuple(detect_text(pixels))
    if mode == "always":
        trigger = "always"
    elif burned_in:
        trigger = "burned_in_annotation"
    else:
        boxes = tuple(b for b in boxes if b.glyphs >= CONFIDENT_GLYPHS)
        trigger = "text_detected"
    if not boxes:
        return ScrubResult(pixels, (), None)
    return ScrubResult(blank_boxes(pixels, boxes), boxes, trigger)


def scrub_fields(result: ScrubResult, mode: ScrubMode) -> dict[str, str | int | None]:
    """The manifest's ``scrub`` and ``scrub_boxes`` of an image: ``off`` (and no count) when
    ``mode`` is off, else ``<method>:<trigger>`` (``<method>:none`` when nothing was blanked) and
    the number of boxes blanked. Never the text itself: msk does not read it."""
    if mode == "off":
        return {"scrub": "off", "scrub_boxes": None}
    return {"scrub": f"{METHOD}:{result.trigger or 'none'}", "scrub_boxes": len(result.boxes)}
