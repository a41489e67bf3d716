"""A small learned detector of text burned into radiographs (the ``learned`` scrub detector).

A fully convolutional network (about 0.1 M parameters; :class:`msk.core.models.text_detector.TextNet`)
maps an image, reduced so that its longer side is at most :data:`WORK_SIDE`, to the probability
that each pixel (at half that resolution) lies inside a line of burned-in text.
:func:`detect_text_learned` turns the map into boxes in source pixels: connected regions above
``threshold``, their bounds plus a margin. A region whose highest probability reaches
:data:`CONFIDENT` is *confident* (``pixel_scrub: auto`` blanks only those unless the header
declares burned-in text).

msk ships the network as an ONNX file (``msk/core/data/weights/text_net.onnx``) and runs it with
ONNX Runtime on one thread: ingest's decode workers and serving's gateway scrub without importing
torch (about 300 MiB per process, against 55 MiB for ONNX Runtime).

The weights were trained by ``tools/train_text_net.py`` on msk's synthetic radiographs
(:mod:`msk.core.synth`, drawn without their own text) and real radiographs (the half of
``real-xr`` that :func:`training_half` picks), with text burned in by the script: random names,
dates and codes in the matplotlib fonts (DejaVu, STIX), 1-5 lines, glyphs 1.2-7 % of the longer
side, bright, dark or mid-grey, on the collimator border,
soft tissue or bone, sometimes on a label plate. Single glyphs (lead side markers) are neither
text nor background in training: the loss ignores them. Pillow's default font, which
:mod:`msk.core.synth` burns into its exports, is *not* among the training fonts, so
``bench/scrub.py`` scores the detector on a font it never saw.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.special import expit

from msk.core.errors import MskError

__all__ = ["CONFIDENT", "MIN_SIDE", "THRESHOLD", "WEIGHTS", "WORK_SIDE", "detect_text_learned",
           "load_text_net", "reduce_for_net", "text_probability", "training_half"]

#: The image is reduced (block mean, an integer factor) so that its longer side is at most this.
WORK_SIDE = 512
#: The network was trained on images of 256-512 px (after reduction) and reads the noise and
#: shapes of much smaller images as glyphs: :func:`msk.core.data.scrub.detect_boxes` hands an
#: image whose longer side is below this to the classical detector.
MIN_SIDE = 256
#: Probability above which a pixel (of the half-resolution map) is text.
THRESHOLD = 0.5
#: A region whose highest probability reaches this is confident text.
CONFIDENT = 0.9
#: A box is its region's bounds plus 2 source pixels and this share of the region's height above
#: and below, and :data:`MARGIN_X` of it left and right (a line's last glyph fades out of the map).
MARGIN = 0.3
MARGIN_X = 0.3
#: A box this many of its heights or less from the image's edge is extended to the edge (nothing to
#: keep there; text running off the image is not cut short).
EDGE = 1.0
#: Regions smaller than this many map pixels are noise.
MIN_AREA = 6
#: The weights shipped with msk.
WEIGHTS = Path(__file__).parent / "weights" / "text_net.onnx"


def training_half(rel: str) -> bool:
    """Whether a real file (its path relative to its data folder, e.g. ``isbi-ceph/001.png``)
    belongs to the half ``tools/train_text_net.py`` may draw backgrounds from; the other half is
    kept for measuring the detector's false positives (``bench/scrub.py``)."""
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 2 == 0


@lru_cache(maxsize=4)
def load_text_net(path: Path = WEIGHTS) -> Any:
    """An ONNX Runtime session of the network in ``path`` (default: the one shipped with msk), on
    one thread (ingest runs one decode task per CPU; serving scrubs one upload at a time)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: a warning is no reason to talk during ingest
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors for bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MskError(f"text detector weights {path} are unreadable ({reason})") from exc


def reduce_for_net(pixels: np.ndarray) -> tuple[np.ndarray, int]:
    """:func:`msk.core.data.scrub.block_reduce` to :data:`WORK_SIDE`, then pad (edge values) to
    multiples of 8; returns it and the factor."""
    from msk.core.data.scrub import block_reduce

    small, factor = block_reduce(pixels, WORK_SIDE)
    ph, pw = -small.shape[0] % 8, -small.shape[1] % 8
    if ph or pw:
        small = np.pad(small, ((0, ph), (0, pw)), mode="edge")
    return small, factor


def text_probability(pixels: np.ndarray, net: Any = None) -> tuple[np.ndarray, int]:
    """The text probability map of ``pixels`` (float, display units) and the source pixels per map
    pixel (2 x the reduction factor). The map covers the reduced image's padding too. ``net``: a
    session of :func:`load_text_net` (default: the shipped weights)."""
    net = net or load_text_net()
    small, factor = reduce_for_net(pixels)
    (logits,) = net.run(None, {"image": np.asarray(small, np.float32)[None, None]})
    return expit(logits[0, 0]), 2 * factor


def detect_text_learned(pixels: np.ndarray, *, threshold: float = THRESHOLD,
                        net: Any = None) -> list[tuple[int, int, int, int, float]]:
    """Boxes of text in ``pixels``: ``(x0, y0, x1, y1, score)`` in source pixels (x1, y1
    exclusive), ``score`` the region's highest probability."""
    if pixels.ndim != 2 or min(pixels.shape) < 8:
        return []
    prob, scale = text_probability(pixels, net)
    labels, n = ndimage.label(prob > threshold)
    if n == 0:
        return []
    h, w = pixels.shape
    peaks = ndimage.maximum(prob, labels, np.arange(1, n + 1))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    boxes = []
    for k, sl in enumerate(ndimage.find_objects(labels)):
        if sl is None or sizes[k] < MIN_AREA:
            continue
        rows, cols = sl
        height = (rows.stop - rows.start) * scale
        my, mx = 2 + MARGIN * height, 2 + MARGIN_X * height
        x0, y0 = cols.start * scale - mx, rows.start * scale - my
        x1, y1 = cols.stop * scale + mx, rows.stop * scale + my
        near = EDGE * height
        x0, y0 = (0 if x0 <= near else x0), (0 if y0 <= near else y0)
        x1, y1 = (w if w - x1 <= near else x1), (h if h - y1 <= near else y1)
        boxes.append((max(0, int(x0)), max(0, int(y0)), min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1))),
                      float(peaks[k])))
    return [b for b in boxes if b[2] > b[0] and b[3] > b[1]]
