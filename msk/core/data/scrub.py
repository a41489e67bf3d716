"""Pixel scrubbing: find text burned into a radiograph and blank it before it is stored.

Scanners, PACS exports and digitised films burn patient names, dates, institution codes and
side markers into the pixels; no header de-identification removes them. :func:`scrub_text`
finds lines of text with :func:`detect_text` and fills each box with the image's minimum
(black), so the shards, the contact sheets and everything a model or a person sees afterwards
carry no burned-in text.

The detector is classical (no model weights; about 0.4 s per 512-pixel image on one loaded core):
burned-in text is made of thin strokes of one high-contrast grey level, set in rows of glyphs
of equal height. On the image reduced to at most :data:`WORK_SIDE` pixels:

1. a white (bright text) and a black (dark text) top-hat with a square a few stroke widths wide
   keeps thin structures standing out from their surroundings by more than :data:`MIN_CONTRAST`;
2. their connected components that look like glyphs (height at most :data:`MAX_HEIGHT` of the
   image, width at most :data:`MAX_ASPECT` heights, ink density, a sharp edge) are kept; every
   component is also split at half its strongest contrast, which separates glyphs from a bright
   edge they touch (text running into a collimator border or a bone);
3. glyphs of similar height, aligned on one baseline and at most a glyph height apart, form a
   line; a line of at least :data:`MIN_GLYPHS` glyphs whose grey levels agree is text.
   Lines stacked on one another are one block;
4. a block is completed (:func:`_complete`, a hysteresis on the ink's grey level): glyph-sized
   components at the level of its ink along its lines or on stacked lines are added, so the part
   of a line on another background (fainter there) is blanked with the rest; a line that runs
   into a flat region of its own grey level (dark text onto a black border) is extended across
   it by up to :data:`BRIDGE` glyph heights; text within :data:`EDGE` glyph heights of the
   image's edge is blanked to the edge. A line of only two glyphs is kept only when completion
   finds :data:`SUPPORT` more ink components along it (two aligned blobs are often bone).
   A box is the block's bounds plus a margin of :data:`MARGIN` glyph heights.

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
    "BRIDGE",
    "CONFIDENT_GLYPHS",
    "EDGE",
    "FLAT_RANGE",
    "GROW_REACH",
    "LEVEL_TOL",
    "MARGIN",
    "MAX_AREA",
    "MAX_ASPECT",
    "MAX_HEIGHT",
    "MAX_LINES",
    "METHOD",
    "MIN_CONTRAST",
    "MIN_GLYPHS",
    "NOISE_FACTOR",
    "WORK_SIDE",
    "Box",
    "DEFAULT_DETECTOR",
    "SHARPNESS",
    "ScrubDetector",
    "SUPPORT",
    "ScrubMode",
    "ScrubResult",
    "blank_boxes",
    "block_reduce",
    "detect_boxes",
    "detect_text",
    "detector_for",
    "scrub_fields",
    "scrub_text",
]

ScrubMode = Literal["auto", "always", "off"]
#: ``learned``: :mod:`msk.core.data.text_net` (a small network trained on synthetic burned-in
#: text); ``morphology``: the classical detector of this module (:func:`detect_text`).
ScrubDetector = Literal["learned", "morphology"]

#: Name of the classical detector, recorded in the manifest's ``scrub`` column.
METHOD = "morphology"
#: The detector ingest and serving use unless configured otherwise.
DEFAULT_DETECTOR: ScrubDetector = "learned"
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
#: A glyph taller than this share of the image's longer side is not burned-in text (a bone end, a
#: large lead marker): scanners and PACS burn names and dates in small type.
MAX_HEIGHT = 0.06
#: A glyph is at most this many times as wide as it is tall (a wider blob is the dark gap between
#: two ribs or another stretch of anatomy).
MAX_ASPECT = 1.8
#: A block taller than this many lines (of twice the glyph height) is not burned-in text.
MAX_LINES = 8
#: Nor is a block covering more than this share of the image.
MAX_AREA = 0.1
#: Completion looks this many glyph heights sideways of a block for the rest of its lines.
GROW_REACH = 16
#: Pixels within this of the ink's grey level (or 3 noise deviations) are ink when completing lines.
LEVEL_TOL = 0.03
#: A region whose 3 x 3 range is at most this is flat (a collimator border, not anatomy).
FLAT_RANGE = 0.02
#: A line is extended across a flat region at its ink's level by at most this many glyph heights.
BRIDGE = 6
#: Text this many glyph heights or less from the image's edge is blanked to the edge.
EDGE = 2.0
#: A box is its text's bounds plus 2 pixels and this share of the glyph height on every side
#: (anti-aliased glyph edges, accents, descenders).
MARGIN = 0.35
#: A line of fewer than :data:`CONFIDENT_GLYPHS` glyphs is text only when completing it finds at
#: least this many more ink components at its grey level along it or on stacked lines.
SUPPORT = 2
#: Glyphs of a line that make ``auto`` scrub an image whose header does not declare burned-in text.
CONFIDENT_GLYPHS = 3


@dataclass(frozen=True)
class Box:
    """A text box in source pixels: columns ``x0 .. x1 - 1``, rows ``y0 .. y1 - 1``; ``glyphs``
    is the number of glyphs of its longest line (0 where the detector does not count them);
    ``confident``: ``pixel_scrub: auto`` blanks it without a ``BurnedInAnnotation`` YES."""

    x0: int
    y0: int
    x1: int
    y1: int
    glyphs: int
    confident: bool = True


@dataclass(frozen=True)
class ScrubResult:
    """What :func:`scrub_text` did: the (possibly) blanked pixels, the boxes it blanked and why.

    ``trigger`` is ``None`` when nothing was blanked, else ``always``, ``burned_in_annotation``
    (the header declared it) or ``text_detected``; ``method`` is the detector's name.
    """

    pixels: np.ndarray
    boxes: tuple[Box, ...]
    trigger: str | None
    method: str = METHOD


def block_reduce(pixels: np.ndarray, side: int = WORK_SIDE) -> tuple[np.ndarray, int]:
    """Block-mean the image (float32) by the smallest integer factor that brings its longer side to
    at most ``side`` (rows and columns beyond a whole block dropped); returns it and the factor."""
    factor = max(1, -(-max(pixels.shape) // side))
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
    the ink bright): an array of rows ``x0, y0, x1, y1, level`` (level: the ink's brightest value).

    Every component is also split at half its strongest contrast: where that gives two glyphs or
    more (or the whole was no glyph) they replace it. Glyphs touching a bright edge (text running
    into a collimator border or a bone) merge with it above the threshold but stand out from it."""
    labels, n = ndimage.label(hat > threshold)  # 4-connected: glyphs touching at a corner stay apart
    if n == 0:
        return np.zeros((0, 5), np.float32)
    step = np.maximum(np.abs(np.diff(img, axis=1, append=img[:, -1:])), np.abs(np.diff(img, axis=0, append=img[-1:])))
    above = hat / threshold
    maxima = _label_max(labels, n, hat, above, img, step)
    strength = maxima[0].astype(np.float32)
    strength[0] = 0.0
    split, m = ndimage.label(hat > np.where(labels > 0, 0.5 * strength[labels], np.inf))
    rows, ok = _glyph_rows(labels, n, min_h, max_h, maxima)
    if m == 0:
        return rows
    child_rows, child_ok = _glyph_rows(split, m, min_h, max_h, _label_max(split, m, hat, above, img, step))
    parent = _label_max(split, m, labels)[0][1:].astype(np.int64)[child_ok - 1]
    children = np.bincount(parent, minlength=n + 1)[1:]
    replaced = children >= 2
    use_child = replaced[parent - 1] | ~np.isin(parent, ok)
    keep = ~replaced[ok - 1] if ok.size else np.zeros(0, bool)
    return np.concatenate([rows[keep], child_rows[use_child]])


def _label_max(labels: np.ndarray, n: int, *values: np.ndarray) -> list[np.ndarray]:
    """For each of ``values``, its maximum over each label 1..n of ``labels`` (an array of n + 1,
    entry 0 unused): ``ndimage.maximum(values, labels, index)`` without sorting the whole image
    for every call (that sort was two thirds of the scrub's time)."""
    fg = np.flatnonzero(labels)
    lab = labels.ravel()[fg]
    out = []
    for v in values:
        m = np.full(n + 1, -np.inf)
        np.maximum.at(m, lab, v.ravel()[fg].astype(np.float64))
        out.append(m)
    return out


def _glyph_rows(labels: np.ndarray, n: int, min_h: int, max_h: int,
                maxima: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The glyph rows of :func:`_glyphs` among ``labels`` 1..n and the labels they come from;
    ``maxima``: :func:`_label_max` of the top-hat, the top-hat over the threshold, the image and
    its pixel step, per label."""
    slices = ndimage.find_objects(labels)
    box = np.array([(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop) for sl in slices], np.float32)
    h, w = box[:, 3] - box[:, 1], box[:, 2] - box[:, 0]
    index = np.arange(1, n + 1)
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = (h >= min_h) & (h <= max_h) & (w <= MAX_ASPECT * h) & (area >= 6)
    fill = area / np.maximum(h * w, 1)
    keep &= (fill >= 0.12) & (fill <= 0.85)
    if not keep.any():
        return np.zeros((0, 5), np.float32), np.zeros(0, np.int64)
    index = index[keep]
    strength, above, level, edge = (m[index].astype(np.float32) for m in maxima)
    # faint blobs, and blobs without a sharp edge (a pixel step of most of their contrast), are
    # texture, not ink: rendered text rises from its background within a pixel or two
    strong = (above >= 1.5) & (edge >= SHARPNESS * strength)
    return np.column_stack([box[keep][strong], level[strong]]), index[strong]


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
    img, factor = block_reduce(pixels)
    side = max(img.shape)
    min_h, max_h = 5, max(8, int(MAX_HEIGHT * side))
    size = max(5, int(0.025 * side)) | 1  # a few stroke widths of the largest text
    noise = _noise(img)
    threshold = np.maximum(MIN_CONTRAST, NOISE_FACTOR * noise)
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
        grown, more = _complete(ink, (x0, y0, x1, y1), level, height, noise)
        if run < CONFIDENT_GLYPHS and more < SUPPORT:
            continue  # two aligned blobs and nothing like ink along them: bone, not text
        if (grown[2] - grown[0]) * (grown[3] - grown[1]) <= MAX_AREA * img.size:
            x0, y0, x1, y1 = grown
        # text a glyph height or less from the image's edge: blank to the edge (nothing to see there)
        x0, y0 = (0.0 if x0 <= EDGE * height else x0), (0.0 if y0 <= height else y0)
        x1 = float(img.shape[1]) if img.shape[1] - x1 <= EDGE * height else x1
        y1 = float(img.shape[0]) if img.shape[0] - y1 <= EDGE * height else y1
        margin = 2 + MARGIN * height
        boxes.append(Box(max(0, int((x0 - margin) * factor)), max(0, int((y0 - margin) * factor)),
                         min(pixels.shape[1], int(np.ceil((x1 + margin) * factor))),
                         min(pixels.shape[0], int(np.ceil((y1 + margin) * factor))), run,
                         run >= CONFIDENT_GLYPHS))
    return _merge_overlapping(boxes)


def detector_for(pixels: np.ndarray, detector: ScrubDetector) -> ScrubDetector:
    """The detector that scans ``pixels``: ``learned`` hands an image whose longer side is below
    :data:`msk.core.data.text_net.MIN_SIDE` (smaller than any it was trained on) to ``morphology``."""
    from msk.core.data.text_net import MIN_SIDE

    return "morphology" if detector == "learned" and max(pixels.shape, default=0) < MIN_SIDE else detector


def detect_boxes(pixels: np.ndarray, detector: ScrubDetector = DEFAULT_DETECTOR) -> list[Box]:
    """The text boxes ``detector`` finds in ``pixels`` (float in [0, 1], any size), overlapping
    boxes merged. ``learned`` boxes are confident when the network's peak probability inside
    them reaches :data:`msk.core.data.text_net.CONFIDENT`; a small image goes to the classical
    detector (:func:`detector_for`)."""
    if detector_for(pixels, detector) == "morphology":
        return detect_text(pixels)
    from msk.core.data.text_net import CONFIDENT, detect_text_learned

    found = detect_text_learned(pixels)
    return _merge_overlapping([Box(x0, y0, x1, y1, 0, score >= CONFIDENT) for x0, y0, x1, y1, score in found])


def _complete(ink: np.ndarray, box: tuple[float, float, float, float], level: float, height: float,
              noise: np.ndarray) -> tuple[tuple[float, float, float, float], int]:
    """Grow a text block's box to the rest of its lines (hysteresis): glyphs the first pass missed
    because they sit on another background (text crossing a collimator edge or a bone, fainter
    there, or merged with the edge) still have the ink's grey ``level``. Components of pixels at
    that level, of a glyph's size and standing out from their surroundings, are added while they
    lie on a line of the box at most a glyph height beyond it, or on a line just above or below."""
    x0, y0, x1, y1 = box
    wx0, wx1 = int(max(0, x0 - GROW_REACH * height)), int(min(ink.shape[1], x1 + GROW_REACH * height))
    wy0, wy1 = int(max(0, y0 - 3 * height)), int(min(ink.shape[0], y1 + 3 * height))
    sub = ink[wy0:wy1, wx0:wx1]
    contrast = level - float(np.median(ink[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]))
    tol = min(0.2, max(LEVEL_TOL, 3.0 * float(np.median(noise[wy0:wy1, wx0:wx1])), 0.4 * contrast))
    at_level = np.abs(sub - level) <= tol
    flat = at_level & (ndimage.maximum_filter(sub, 3) - ndimage.minimum_filter(sub, 3) <= FLAT_RANGE)
    # glyphs touching a flat region of their own level (a border) would merge with it: cut it out
    labels, n = ndimage.label(at_level & ~flat, structure=np.ones((3, 3), bool))
    if n == 0:
        return box, 0
    slices = ndimage.find_objects(labels)
    cand = np.array([(sl[1].start + wx0, sl[0].start + wy0, sl[1].stop + wx0, sl[0].stop + wy0) for sl in slices],
                    np.float32)
    ch, cw = cand[:, 3] - cand[:, 1], cand[:, 2] - cand[:, 0]
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    ok = (ch >= max(3.0, 0.4 * height)) & (ch <= 1.4 * height) & (cw <= 3 * height)
    ok &= (area <= 0.85 * ch * cw) | (cw <= 2)  # a blob is no glyph, a thin stroke is
    # the component must stand out: its surroundings (a ring two pixels wide) are off the ink level
    ring = ndimage.binary_dilation(at_level, iterations=2) & ~at_level
    ring_labels = ndimage.grey_dilation(labels, size=(5, 5)) * ring
    ring_sum = np.bincount(ring_labels.ravel(), np.abs(sub - level).ravel(), minlength=n + 1)[1:]
    off = ring_sum / np.maximum(np.bincount(ring_labels.ravel(), minlength=n + 1)[1:], 1)
    ok &= off >= 0.5 * tol
    cand = cand[ok]
    added = np.zeros(len(cand), bool)
    crossed = [False, False]
    while True:
        cy = (cand[:, 1] + cand[:, 3]) / 2
        gap_x = np.maximum(cand[:, 0] - x1, x0 - cand[:, 2])
        gap_y = np.maximum(cand[:, 1] - y1, y0 - cand[:, 3])
        on_line = (cy >= y0 - 0.25 * height) & (cy <= y1 + 0.25 * height) & (gap_x <= 1.2 * height)
        stacked = (gap_x <= 0) & (gap_y <= 0.9 * height) & (cand[:, 3] - cand[:, 1] >= 0.6 * height)
        new = (on_line | stacked) & ~added
        # a flat border is crossed once on each side, never followed
        bridged = _bridge(flat, (x0 - wx0, y0 - wy0, x1 - wx0, y1 - wy0), height)
        moved = False
        if bridged is not None and not crossed[0] and bridged[0] + wx0 < x0:
            x0, crossed[0], moved = bridged[0] + wx0, True, True
        if bridged is not None and not crossed[1] and bridged[1] + wx0 > x1:
            x1, crossed[1], moved = bridged[1] + wx0, True, True
        if not new.any() and not moved:
            return (x0, y0, x1, y1), int(added.sum())
        added |= new
        if new.any():
            x0, y0 = min(x0, float(cand[new, 0].min())), min(y0, float(cand[new, 1].min()))
            x1, y1 = max(x1, float(cand[new, 2].max())), max(y1, float(cand[new, 3].max()))


def _bridge(flat: np.ndarray, box: tuple[float, float, float, float], height: float) -> tuple[float, float] | None:
    """Where a line runs into a flat region at the ink's own grey level (dark text onto a black
    collimator border, white text onto a white one), its glyphs go on unseen: the new left and
    right ends of ``box`` extended across such a region (starting within a glyph height of the
    box, across the line's rows), or None when neither end moves."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    band = flat[max(0, y0):max(y0 + 1, y1)]
    if band.size == 0:
        return None
    cover = band.mean(axis=0) >= 0.9  # columns the flat region fills across the line
    reach = int(np.ceil(2 * height))
    left, right = x0, x1
    start = next((c for c in range(x1, min(len(cover), x1 + reach)) if cover[c]), None)
    if start is not None:
        right = start
        while right < min(len(cover), start + BRIDGE * height) and cover[right]:
            right += 1
    start = next((c for c in range(x0 - 1, max(-1, x0 - 1 - reach), -1) if cover[c]), None)
    if start is not None:
        left = start
        while left > max(0, start - BRIDGE * height) and cover[left - 1]:
            left -= 1
    return None if (left, right) == (x0, x1) else (float(left), float(right))


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
                                   max(a.glyphs, b.glyphs), a.confident or b.confident)
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


def scrub_text(pixels: np.ndarray, mode: ScrubMode, *, burned_in: bool = False,
               detector: ScrubDetector = DEFAULT_DETECTOR) -> ScrubResult:
    """Blank the burned-in text of ``pixels`` according to ``mode`` (module docstring), with the
    boxes of ``detector``.

    ``burned_in`` is the header's ``BurnedInAnnotation`` == YES. With ``off`` the same array
    is returned, untouched.
    """
    if mode == "off":
        return ScrubResult(pixels, (), None, detector)
    detector = detector_for(pixels, detector)
    boxes = tuple(detect_boxes(pixels, detector))
    if mode == "always":
        trigger = "always"
    elif burned_in:
        trigger = "burned_in_annotation"
    else:
        boxes = tuple(b for b in boxes if b.confident)
        trigger = "text_detected"
    if not boxes:
        return ScrubResult(pixels, (), None, detector)
    return ScrubResult(blank_boxes(pixels, boxes), boxes, trigger, detector)


def scrub_fields(result: ScrubResult, mode: ScrubMode) -> dict[str, str | int | None]:
    """The manifest's ``scrub`` and ``scrub_boxes`` of an image: ``off`` (and no count) when
    ``mode`` is off, else ``<method>:<trigger>`` (``<method>:none`` when nothing was blanked) and
    the number of boxes blanked. Never the text itself: msk does not read it."""
    if mode == "off":
        return {"scrub": "off", "scrub_boxes": None}
    return {"scrub": f"{result.method}:{result.trigger or 'none'}", "scrub_boxes": len(result.boxes)}
