"""The ``radiograph`` style of ``msk synth``: framing and image formation that look like real exports.

The ``basic`` style (:func:`msk.core.synth.cases._render_pixels`) draws every region centred in
its own field, bright bone on black. Real radiographs differ in ways a sorter trained on
phantoms must have seen (measured by ``bench/synth_to_real.py``):

* **framing**: knee films are often cropped to the joint space; full-length scoliosis spines
  show the trunk from neck to pelvis; cephalograms sit in a head holder; limb films are exposed
  on a cassette that is turned at any angle, scanned and padded with black, often landscape;
* **image formation**: soft tissue is a visible grey envelope and bone only moderately brighter;
  scatter and the heel effect shade the field; CR/DX processing enhances edges (unsharp mask) and
  windows the image from its own histogram; detector noise is partly correlated;
* **content**: side markers, fixation plates and screws, K-wires and casts on limbs.

Everything is drawn from the image's generator, so a case stays a pure function of
``(config, index)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from msk.core.synth.canvas import Box, Canvas, Capsule, Transform
from msk.core.synth.phantoms import REGIONS, Body, region_aspect

#: limb regions whose films are cassettes turned at any angle and padded with black.
PLATE_REGIONS = frozenset({
    "finger", "hand", "wrist", "forearm", "elbow", "humerus", "shoulder", "clavicle",
    "ankle", "foot", "calcaneus", "lower leg", "knee", "femur", "patella",
})
#: regions that may carry fixation hardware or a cast.
HARDWARE_REGIONS = frozenset({
    "finger", "hand", "wrist", "forearm", "elbow", "humerus", "shoulder", "clavicle",
    "ankle", "foot", "lower leg", "knee", "femur", "hip", "whole leg",
})
#: canonical point of the joint space of regions that are often cropped to the joint.
JOINT_CROPS = {"knee": (0.40, 0.50), "elbow": (0.40, 0.5), "ankle": (0.37, 0.55)}


@dataclass(frozen=True)
class Framing:
    height: int
    width: int
    pivot: tuple[float, float]
    zoom: float
    angle: float  # radians, of the anatomy
    plate: float | None  # angle of the cassette (radians) or None: the film fills the image
    squeeze: float = 1.0  # > 1 stretches the anatomy sideways


def _framing(region: str, view: str, size: int, rng: np.random.Generator) -> Framing:
    spec = REGIONS[region]
    aspect = region_aspect(spec, view)
    pivot = (aspect / 2, 0.5)
    zoom = rng.uniform(0.8, 1.25)
    angle = math.radians(rng.normal(0.0, 6.0))
    plate = None
    squeeze = 1.0
    out_aspect = aspect * rng.uniform(0.85, 1.2)
    u = rng.random()
    cropped = region in JOINT_CROPS and u < (0.55 if region == "knee" else 0.2)
    if cropped:
        pivot = JOINT_CROPS[region]
        # knee crops range from the whole joint to the joint space alone (condyles filling the width)
        zoom = rng.uniform(1.35, 3.2) if region == "knee" else rng.uniform(1.3, 1.8)
        out_aspect = 1.0
        angle = math.radians(rng.normal(0.0, 3.0))
    elif region == "spine" and view != "LAT":
        out_aspect = rng.uniform(0.6, 1.0)
        zoom = rng.uniform(0.95, 1.25)
        pivot = (0.19, 0.5 + rng.uniform(-0.05, 0.08))
        squeeze = rng.uniform(1.0, 1.8)  # films resized to a square stretch the trunk sideways
    elif region == "skull" and view == "LAT":
        out_aspect = rng.uniform(0.75, 1.0)
        zoom = rng.uniform(0.72, 0.92)
        pivot = (0.55 + rng.uniform(-0.04, 0.04), 0.5 + rng.uniform(-0.03, 0.03))
        angle = math.radians(rng.normal(0.0, 4.0))
    elif region == "finger" and view != "LAT":  # drawn as a hand, framed on the fingers
        pivot = (0.42 + rng.uniform(-0.12, 0.12), 0.38)
        # finger films are narrow: often only two or three fingers are in the field
        zoom = rng.uniform(1.0, 1.5) if rng.random() < 0.5 else rng.uniform(1.7, 2.6)
        out_aspect = aspect * rng.uniform(0.7, 1.3)
    elif region == "wrist" and view != "LAT":  # drawn as a hand, framed on the carpus
        pivot = (0.43, 0.8)
        zoom = rng.uniform(0.7, 1.0)
    if region in PLATE_REGIONS and rng.random() < 0.75 and not cropped:
        tilt = rng.normal(0.0, 14.0) if rng.random() < 0.7 else rng.uniform(-40.0, 40.0)
        if rng.random() < 0.25:  # cassette turned landscape
            tilt += 90.0 if rng.random() < 0.5 else -90.0
            out_aspect = 1.0 / out_aspect
        plate = math.radians(tilt)
        angle = plate + math.radians(rng.normal(0.0, 8.0))
        zoom *= rng.uniform(0.55, 0.9) if region in ("elbow", "wrist", "finger", "hand") else rng.uniform(0.7, 1.0)
    out_aspect = min(max(out_aspect, 0.35), 2.0)
    if out_aspect <= 1.0:
        h, w = size, max(int(round(size * out_aspect)), 8)
    else:
        h, w = max(int(round(size / out_aspect)), 8), size
    return Framing(h, w, pivot, zoom, angle, plate, squeeze)


def render_radiograph(case, config, rng: np.random.Generator, r_window: float) -> None:
    """Render ``case`` in the ``radiograph`` style into ``case.pixels`` (and mask, box, spacing)."""
    from msk.core.synth.cases import (
        _ANATOMY,
        _LESION_SHAPE,
        BONE_LEVEL,
        _annotate,
        _noise,
        _store,
        lesion_in_field,
        rng_for,
    )
    from msk.core.synth.lesions import draw_lesion, frame_for
    from msk.core.synth.phantoms import find_anchor

    spec = REGIONS[case.region]
    size = config.image_size
    fr = _framing(case.region, case.view, size, rng)
    h, w = fr.height, fr.width
    scale = h * fr.zoom
    if fr.plate is not None and abs(math.sin(fr.plate)) > 0.7:  # landscape: fit the long axis
        scale = w * fr.zoom
    shift = (rng.uniform(-0.08, 0.08) * w, rng.uniform(-0.08, 0.08) * h)
    flip = case.study.laterality == "L" or (not spec.paired and rng.random() < 0.15)
    squeeze = (rng.uniform(0.72, 0.88) if case.view == "OBL" else 1.0) * fr.squeeze
    anatomy_seed = case.patient.first_index * 64 + case.study.number
    tf = Transform(scale, fr.angle, fr.pivot, (w / 2 + shift[0], h / 2 + shift[1]), flip, squeeze)

    lesion = case.lesion
    tf = lesion_in_field(case, config, tf, h, w, anatomy_seed, realistic=True)

    cv = Canvas(h, w, tf, _trabecular(rng, h, w))
    body = Body(cv, rng_for(config.seed, _ANATOMY, anatomy_seed), case.view, case.age, realistic=True)
    spec.draw(body)
    if lesion is not None:
        frame = frame_for(find_anchor(body.anchors, lesion.anchor, lesion.position), lesion.position, lesion.side)
        draw_lesion(cv, lesion.entity.name, frame, rng_for(config.seed, _LESION_SHAPE, lesion.seed))
    if case.region in HARDWARE_REGIONS:
        _hardware(cv, body, rng)

    img = _expose(cv, rng, size)
    box = None
    if lesion is not None and cv.mask.any():
        rows, cols = np.flatnonzero(cv.mask.any(axis=1)), np.flatnonzero(cv.mask.any(axis=0))
        box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    _process(img, rng, size)
    noise = _noise(rng, h, w)
    img += noise * (rng.uniform(0.003, 0.012) + rng.uniform(0.005, 0.025) * np.sqrt(np.maximum(img, 0.0)))
    _film(img, rng, fr, tf, box)
    case.burned_in = _annotate(img, rng, case, box)
    case.bone = cv.bone > BONE_LEVEL
    if rng.random() < 0.02:  # an occasional inverted (black-bone) film
        img[:] = 1.0 - img
    _store(case, img, cv.mask if lesion is not None else None, box, rng, r_window,
           round(spec.field_mm / (h * fr.zoom), 4))


def _trabecular(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Trabecular texture: the bank's smooth fields plus a stronger fine, streaky component."""
    from msk.core.synth.cases import _noise, _texture

    base = _texture(rng, h, w)
    streak = gaussian_filter(_noise(rng, h, w), (rng.uniform(0.6, 1.2), 0.5), truncate=2.0)
    out = 1.0 + rng.uniform(0.3, 0.7) * (base - 1.0) + rng.uniform(0.05, 0.2) * streak
    return np.maximum(out, 0.2, out=out)


def _hardware(cv: Canvas, body: Body, rng: np.random.Generator) -> None:
    """Fixation plate with screws, K-wires, or a cast, on one long bone of the field."""
    u = rng.random()
    bones = [a for a in body.anchors.values() if not a.flat and a.reach > 0]
    if u < 0.12 and bones:  # plate and screws
        a = bones[int(rng.integers(len(bones)))]
        d0 = rng.uniform(0.3, 1.5) * a.r_end
        length = rng.uniform(0.25, 0.6) * a.reach
        side = 1 if rng.random() < 0.5 else -1
        n = (-a.axis[1] * side, a.axis[0] * side)
        along = d0 + length / 2
        mid = (a.tip[0] + a.axis[0] * along + n[0] * a.r, a.tip[1] + a.axis[1] * along + n[1] * a.r)
        ang = math.atan2(a.axis[1], a.axis[0])
        cv.dense(Box(mid, length / 2, 0.25 * a.r, ang, 0.1 * a.r), rng.uniform(2.0, 4.0))
        for k in range(int(rng.integers(3, 8))):
            t = (k + 0.5) / 7.0 - 0.5
            c = (mid[0] + a.axis[0] * t * length, mid[1] + a.axis[1] * t * length)
            cv.dense(Capsule(c, (c[0] - n[0] * 2.2 * a.r, c[1] - n[1] * 2.2 * a.r), 0.12 * a.r), rng.uniform(2.0, 4.0))
    elif u < 0.18 and bones:  # K-wires
        a = bones[int(rng.integers(len(bones)))]
        for _ in range(int(rng.integers(1, 4))):
            start = (a.tip[0] + rng.uniform(-1, 1) * a.r_end, a.tip[1] + rng.uniform(-1, 1) * a.r_end)
            ang = math.atan2(a.axis[1], a.axis[0]) + rng.uniform(-0.6, 0.6)
            ln = rng.uniform(1.5, 4.0) * a.r_end
            cv.dense(Capsule(start, (start[0] + math.cos(ang) * ln, start[1] + math.sin(ang) * ln), 0.06 * a.r),
                     rng.uniform(2.0, 4.0))
    elif u < 0.26 and bones:  # cast: a thick, faintly textured sleeve around the bone
        a = bones[int(rng.integers(len(bones)))]
        far = (a.tip[0] + a.axis[0] * a.reach * 1.5, a.tip[1] + a.axis[1] * a.reach * 1.5)
        start = (a.tip[0] - a.axis[0] * a.r_end * 2, a.tip[1] - a.axis[1] * a.r_end * 2)
        r = a.r_end * rng.uniform(2.2, 3.2)
        cv.soft_tissue(Capsule(start, far, r), rng.uniform(0.25, 0.6), edge=0.01)


def _expose(cv: Canvas, rng: np.random.Generator, size: int) -> np.ndarray:
    """Beer-Lambert with soft tissue weighted up (a visible envelope) and a random kV
    (bone/soft contrast), then scatter (a blurred copy) and the heel effect."""
    k = Canvas.SOFT_SUBSAMPLE
    soft = np.asarray(Image.fromarray(np.maximum(cv.soft, 0.0), mode="F").resize(
        (cv.w, cv.h), Image.Resampling.BILINEAR, box=(0, 0, cv.w / k, cv.h / k)), dtype=np.float32)
    air = np.asarray(Image.fromarray(np.minimum(cv.soft, 0.0), mode="F").resize(
        (cv.w, cv.h), Image.Resampling.BILINEAR, box=(0, 0, cv.w / k, cv.h / k)), dtype=np.float32)
    bone = np.maximum(cv.bone, 0.0)
    metal = np.maximum(bone - 1.6, 0.0)
    density = rng.uniform(1.0, 2.2) * soft + rng.uniform(0.4, 1.0) * (bone - metal) + 3.0 * metal + 1.5 * air
    img = 1.0 - np.exp(-rng.uniform(1.0, 1.8) * np.maximum(density, 0.0))
    s = rng.uniform(0.05, 0.3)
    img = (1 - s) * img + s * _wide_blur(img, rng.uniform(0.04, 0.12) * size)
    d = rng.normal(0.0, 1.0, 2)
    d /= np.linalg.norm(d) + 1e-9
    yy = np.linspace(-1.0, 1.0, cv.h, dtype=np.float32)[:, None]
    xx = np.linspace(-1.0, 1.0, cv.w, dtype=np.float32)[None, :]
    img *= 1.0 + rng.uniform(0.0, 0.12) * (d[0] * xx + d[1] * yy)
    return img.astype(np.float32)


def _wide_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of large ``sigma`` computed at a quarter of the resolution."""
    h, w = img.shape
    small = Image.fromarray(img, mode="F").resize((max(w // 4, 1), max(h // 4, 1)), Image.Resampling.BILINEAR)
    small = Image.fromarray(gaussian_filter(np.asarray(small), sigma / 4, truncate=2.0), mode="F")
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def _process(img: np.ndarray, rng: np.random.Generator, size: int) -> None:
    """Detector blur, CR/DX processing (unsharp mask) and a histogram-based window, in place."""
    img[:] = gaussian_filter(img, rng.uniform(0.3, 1.0) * size / 320.0, truncate=2.5)
    amount = rng.uniform(0.0, 1.5)
    if amount > 0.05:
        img += amount * (img - _wide_blur(img, rng.uniform(0.015, 0.04) * size))
    lo, hi = np.percentile(img, (rng.uniform(0.0, 8.0), rng.uniform(97.0, 100.0)))
    img -= lo
    img *= 1.0 / max(hi - lo, 1e-3)
    np.clip(img, 0.0, 1.0, out=img)
    np.power(img, rng.uniform(0.6, 1.6), out=img)
    img *= rng.uniform(0.45, 1.0)  # many exports are dim: the window reaches above the bone
    floor = rng.uniform(0.0, 0.25)  # unattenuated field is dark grey, not black
    img *= 1.0 - floor
    img += floor


def _film(img: np.ndarray, rng: np.random.Generator, fr: Framing, tf: Transform, box) -> None:
    """Collimation (a lighter or darker band at the field edge) and, for cassettes, the turned
    cassette scanned onto black: everything outside a rotated rectangle becomes 0."""
    h, w = img.shape
    if fr.plate is None:
        if rng.random() < 0.5:
            x0, y0 = int(rng.uniform(0, 0.1) * w), int(rng.uniform(0, 0.1) * h)
            x1, y1 = w - int(rng.uniform(0, 0.1) * w), h - int(rng.uniform(0, 0.1) * h)
            if box is not None:
                x0, y0 = min(x0, max(box[0] - 2, 0)), min(y0, max(box[1] - 2, 0))
                x1, y1 = max(x1, min(box[2] + 2, w)), max(y1, min(box[3] + 2, h))
            inside = img[y0:y1, x0:x1].copy()
            img[:] = rng.uniform(0.0, 0.05) if rng.random() < 0.7 else rng.uniform(0.5, 0.9)
            img[y0:y1, x0:x1] = inside
        return
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    ang = fr.plate + math.radians(rng.normal(0.0, 2.0))
    c = math.cos(ang), math.sin(ang)
    cx, cy = w / 2 + rng.uniform(-0.05, 0.05) * w, h / 2 + rng.uniform(-0.05, 0.05) * h
    du = (xs - cx) * c[0] + (ys - cy) * c[1]
    dv = -(xs - cx) * c[1] + (ys - cy) * c[0]
    # half sizes along the cassette axes: the cassette's long side follows the image's
    long_half, short_half = max(h, w) / 2, min(h, w) / 2
    if abs(c[1]) > 0.7:
        hu, hv = (long_half, short_half) if h > w else (short_half, long_half)
        hu, hv = hv, hu
    else:
        hu, hv = (short_half, long_half) if h > w else (long_half, short_half)
    f_in = rng.uniform(0.65, 0.95)
    hu, hv = hu * f_in, hv * f_in
    shutter = rng.uniform(0.8, 0.95) if rng.random() < 0.6 else None  # collimated band inside the cassette
    if box is not None:  # the lesion lies inside the exposed field: widen the cassette to take it in
        corners = [(x - cx, y - cy) for x in (box[0], box[2]) for y in (box[1], box[3])]
        reach_u = max(abs(x * c[0] + y * c[1]) for x, y in corners) + 2
        reach_v = max(abs(-x * c[1] + y * c[0]) for x, y in corners) + 2
        inner = shutter or 1.0
        hu, hv = max(hu, reach_u / inner), max(hv, reach_v / inner)
    if shutter is not None:
        band = (np.abs(du) > shutter * hu) | (np.abs(dv) > shutter * hv)
        img[band] = img[band] * 0.3 + rng.uniform(0.3, 0.7) * 0.7
    outside = (np.abs(du) > hu) | (np.abs(dv) > hv)
    img[outside] = rng.uniform(0.0, 0.03)
