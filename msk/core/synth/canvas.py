"""Vectorised drawing of radiograph-like scenes: signed-distance shapes painted into density layers.

A scene is described in *canonical* coordinates: ``v`` runs down from 0 (top) to 1 (bottom) and
``u`` from 0 to the region's aspect ratio, so one canonical unit is the height of the field of
view. A :class:`Transform` (rotation, uniform scale, translation, horizontal flip and an optional
oblique squeeze) maps canonical shapes to pixels. Because similarity transforms map capsules to
capsules and ellipses to ellipses, shapes are transformed *analytically* and then rasterised
directly in pixel space, each one only inside its own bounding box. No image is ever resampled,
and no pixel is visited by a Python loop.

An X-ray image is a projection of attenuation, so the canvas accumulates *density* in two layers:

``soft``
    soft tissue and air (air is negative density: lungs, sinuses, bowel gas);
``bone``
    bone, painted as a cortical shell with a textured (trabecular) medulla; lesions act on this
    layer (lucencies multiply it down, matrix and periosteal new bone add to it).

:meth:`Canvas.intensity` turns the summed density into a display intensity with Beer-Lambert's
``1 - exp(-k * density)``. A third layer, ``mask``, records the footprint of the lesion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

Point = tuple[float, float]


# -- transforms ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    """Canonical -> pixel similarity transform.

    ``pixel = scale * R(angle) * F * (squeeze(p) - pivot) + centre`` where ``F`` mirrors ``u``
    when ``flip`` is set and ``squeeze`` compresses ``u`` around the pivot (oblique views).
    """

    scale: float
    angle: float = 0.0  # radians, counter-clockwise on screen
    pivot: Point = (0.5, 0.5)
    centre: Point = (0.0, 0.0)
    flip: bool = False
    squeeze: float = 1.0

    def _matrix(self) -> tuple[float, float, float, float]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        f = -1.0 if self.flip else 1.0
        # screen y points down, so a counter-clockwise turn on screen is (c, s; -s, c)
        return (self.scale * c * f, self.scale * s, -self.scale * s * f, self.scale * c)

    def point(self, p: Point) -> Point:
        a, b, c, d = self._matrix()
        u = (p[0] - self.pivot[0]) * self.squeeze
        v = p[1] - self.pivot[1]
        return (a * u + b * v + self.centre[0], c * u + d * v + self.centre[1])

    def vector(self, v: Point) -> Point:
        """Direction vector (not normalised), ignoring translation and squeeze."""
        a, b, c, d = self._matrix()
        return (a * v[0] + b * v[1], c * v[0] + d * v[1])

    def length(self, r: float) -> float:
        return r * self.scale

    def direction_angle(self, angle: float) -> float:
        x, y = self.vector((math.cos(angle), math.sin(angle)))
        return math.atan2(y, x)


# -- shapes -------------------------------------------------------------------------------------


class Shape:
    """A region given by a signed distance (negative inside, in the shape's own units)."""

    def to_px(self, t: Transform) -> Shape:
        raise NotImplementedError

    def bbox(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` enclosing the shape (pixel space)."""
        raise NotImplementedError

    def sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance at pixel centres; ``x`` is a row ``[1, w]``, ``y`` a column ``[h, 1]``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Capsule(Shape):
    """Segment ``a``-``b`` thickened by a radius that tapers linearly from ``ra`` to ``rb``."""

    a: Point
    b: Point
    ra: float
    rb: float | None = None

    def to_px(self, t: Transform) -> Capsule:
        rb = self.ra if self.rb is None else self.rb
        return Capsule(t.point(self.a), t.point(self.b), t.length(self.ra), t.length(rb))

    def bbox(self):
        r = max(self.ra, self.rb if self.rb is not None else self.ra)
        return (min(self.a[0], self.b[0]) - r, min(self.a[1], self.b[1]) - r,
                max(self.a[0], self.b[0]) + r, max(self.a[1], self.b[1]) + r)

    def sdf(self, x, y):
        rb = self.ra if self.rb is None else self.rb
        bax, bay = self.b[0] - self.a[0], self.b[1] - self.a[1]
        pax, pay = x - self.a[0], y - self.a[1]
        h = np.clip((pax * bax + pay * bay) * (1.0 / max(bax * bax + bay * bay, 1e-9)), 0.0, 1.0)
        return np.hypot(pax - bax * h, pay - bay * h) - (self.ra + (rb - self.ra) * h)


@dataclass(frozen=True)
class Ellipse(Shape):
    """Ellipse with semi-axes ``rx`` (along ``angle``) and ``ry``; distance is first-order exact."""

    c: Point
    rx: float
    ry: float
    angle: float = 0.0

    def to_px(self, t: Transform) -> Ellipse:
        return Ellipse(t.point(self.c), t.length(self.rx), t.length(self.ry),
                       t.direction_angle(self.angle))

    def bbox(self):
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        hx = math.hypot(self.rx * ca, self.ry * sa)
        hy = math.hypot(self.rx * sa, self.ry * ca)
        return (self.c[0] - hx, self.c[1] - hy, self.c[0] + hx, self.c[1] + hy)

    def sdf(self, x, y):
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - self.c[0], y - self.c[1]
        lx = (dx * ca + dy * sa) * (1.0 / self.rx)
        ly = (dy * ca - dx * sa) * (1.0 / self.ry)
        q = np.sqrt(lx * lx + ly * ly)
        g = np.sqrt((lx * (1.0 / self.rx)) ** 2 + (ly * (1.0 / self.ry)) ** 2) + 1e-6
        return (q - 1.0) * q / g


@dataclass(frozen=True)
class Box(Shape):
    """Rectangle with half sizes ``hx`` (along ``angle``), ``hy`` and corner radius ``round``."""

    c: Point
    hx: float
    hy: float
    angle: float = 0.0
    round: float = 0.0

    def to_px(self, t: Transform) -> Box:
        return Box(t.point(self.c), t.length(self.hx), t.length(self.hy),
                   t.direction_angle(self.angle), t.length(self.round))

    def bbox(self):
        ca, sa = abs(math.cos(self.angle)), abs(math.sin(self.angle))
        hx = self.hx * ca + self.hy * sa
        hy = self.hx * sa + self.hy * ca
        return (self.c[0] - hx, self.c[1] - hy, self.c[0] + hx, self.c[1] + hy)

    def sdf(self, x, y):
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - self.c[0], y - self.c[1]
        r = min(self.round, self.hx, self.hy)
        qx = np.abs(dx * ca + dy * sa) - (self.hx - r)
        qy = np.abs(dy * ca - dx * sa) - (self.hy - r)
        outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
        return outside + np.minimum(np.maximum(qx, qy), 0.0) - r


@dataclass(frozen=True)
class Arc(Shape):
    """Band of half width ``w`` along a circle of radius ``radius`` around ``c``, covering the
    angles ``mid ± half`` (``half`` < pi). Ribs, skull vault, clavicle curves."""

    c: Point
    radius: float
    w: float
    mid: float
    half: float

    def to_px(self, t: Transform) -> Arc:
        return Arc(t.point(self.c), t.length(self.radius), t.length(self.w),
                   t.direction_angle(self.mid), self.half)

    def bbox(self):
        angles = [self.mid + self.half * (i / 4.0 - 1.0) for i in range(9)]
        xs = [self.c[0] + self.radius * math.cos(a) for a in angles]
        ys = [self.c[1] + self.radius * math.sin(a) for a in angles]
        return (min(xs) - self.w, min(ys) - self.w, max(xs) + self.w, max(ys) + self.w)

    def sdf(self, x, y):
        dx, dy = x - self.c[0], y - self.c[1]
        rho = np.hypot(dx, dy)
        ring = np.abs(rho - self.radius) - self.w
        along = dx * math.cos(self.mid) + dy * math.sin(self.mid)
        cut = (rho * math.cos(self.half) - along) * (1.0 / max(math.sin(self.half), 0.3))
        return np.maximum(ring, cut)


@dataclass(frozen=True)
class Union(Shape):
    """Union of shapes (one outline: internal boundaries disappear)."""

    parts: tuple[Shape, ...]

    def to_px(self, t: Transform) -> Union:
        return Union(tuple(p.to_px(t) for p in self.parts))

    def bbox(self):
        boxes = [p.bbox() for p in self.parts]
        return (min(b[0] for b in boxes), min(b[1] for b in boxes),
                max(b[2] for b in boxes), max(b[3] for b in boxes))

    def sdf(self, x, y):
        d = self.parts[0].sdf(x, y)
        for p in self.parts[1:]:
            d = np.minimum(d, p.sdf(x, y))
        return d


@dataclass(frozen=True)
class Minus(Shape):
    """``keep`` with ``cut`` removed (foramina, hollow rings)."""

    keep: Shape
    cut: Shape

    def to_px(self, t: Transform) -> Minus:
        return Minus(self.keep.to_px(t), self.cut.to_px(t))

    def bbox(self):
        return self.keep.bbox()

    def sdf(self, x, y):
        return np.maximum(self.keep.sdf(x, y), -self.cut.sdf(x, y))


@dataclass(frozen=True)
class Polygon(Shape):
    """A simple polygon (e.g. a real tumour outline); exact distance to its edges, inside by
    the even-odd rule."""

    points: tuple[Point, ...]

    def to_px(self, t: Transform) -> Polygon:
        return Polygon(tuple(t.point(p) for p in self.points))

    def bbox(self):
        xs, ys = [p[0] for p in self.points], [p[1] for p in self.points]
        return (min(xs), min(ys), max(xs), max(ys))

    def sdf(self, x, y):
        shape = np.broadcast_shapes(np.shape(x), np.shape(y))
        d2 = np.full(shape, np.inf, np.float32)
        inside = np.zeros(shape, bool)
        for (ax, ay), (bx, by) in zip(self.points[-1:] + self.points[:-1], self.points):
            ex, ey = bx - ax, by - ay
            px, py = x - ax, y - ay
            t = np.clip((px * ex + py * ey) * (1.0 / max(ex * ex + ey * ey, 1e-12)), 0.0, 1.0)
            np.minimum(d2, (px - ex * t) ** 2 + (py - ey * t) ** 2, out=d2)
            if ey != 0.0:  # even-odd crossings of a ray towards +x
                inside ^= ((ay > y) != (by > y)) & (x < ax + (y - ay) * (ex / ey))
        d = np.sqrt(d2)
        return np.where(inside, -d, d)


def _unit_clip(x: np.ndarray) -> np.ndarray:
    """``clip(x, 0, 1)`` in place (a fresh temporary is expected)."""
    np.maximum(x, 0.0, out=x)
    return np.minimum(x, 1.0, out=x)


# -- the canvas ---------------------------------------------------------------------------------


class Canvas:
    """Density layers of one image plus the transform that places the current scene on it.

    All drawing methods take canonical shapes and canonical lengths; ``self.transform`` maps them
    to pixels (a canvas can hold several scenes, e.g. two views side by side, by switching it).
    While :attr:`clip` holds a shape, everything drawn is cut to it (the intersection of signed
    distances): a lesion's drawing confined to a real tumour outline.
    """

    #: soft tissue is smooth, so it is drawn at 1/SOFT_SUBSAMPLE of the resolution.
    SOFT_SUBSAMPLE = 2

    def __init__(self, height: int, width: int, transform: Transform, texture: np.ndarray):
        self.h, self.w = height, width
        self.transform = transform
        k = self.SOFT_SUBSAMPLE
        self.soft = np.zeros((-(-height // k), -(-width // k)), np.float32)
        self.bone = np.zeros((height, width), np.float32)
        self.mask = np.zeros((height, width), bool)
        self.texture = texture
        self._xs = np.arange(width, dtype=np.float32) + 0.5
        self._ys = np.arange(height, dtype=np.float32) + 0.5
        self.clip: Shape | None = None
        self._clip_cache: dict[Transform, tuple[int, int, np.ndarray]] = {}

    def clipped_to(self, shape: Shape | None) -> Canvas:
        """Cut everything drawn from now on to ``shape`` (``None``: no cut); returns the canvas."""
        self.clip = shape
        self._clip_cache = {}
        return self

    def _clip_distance(self, t: Transform, iy0: int, iy1: int, ix0: int, ix1: int, h: int, w: int) -> np.ndarray:
        """The clip shape's signed distance on a window of the grid of ``t``, computed once per
        grid over the shape's box (a margin of 4 px); far outside it: a large positive distance."""
        if t not in self._clip_cache:
            px = self.clip.to_px(t)
            x0, y0, x1, y1 = px.bbox()
            cx0, cy0 = max(int(x0) - 4, 0), max(int(y0) - 4, 0)
            cx1, cy1 = min(int(x1) + 6, w), min(int(y1) + 6, h)
            d = px.sdf(self._xs[None, cx0:max(cx1, cx0)], self._ys[max(cy0, 0):max(cy1, cy0), None])
            self._clip_cache[t] = (cy0, cx0, np.asarray(d, np.float32))
        cy0, cx0, d = self._clip_cache[t]
        out = np.full((iy1 - iy0, ix1 - ix0), 1e4, np.float32)
        ya, yb = max(iy0, cy0), min(iy1, cy0 + d.shape[0])
        xa, xb = max(ix0, cx0), min(ix1, cx0 + d.shape[1])
        if ya < yb and xa < xb:
            out[ya - iy0:yb - iy0, xa - ix0:xb - ix0] = d[ya - cy0:yb - cy0, xa - cx0:xb - cx0]
        return out

    # rasterisation ----------------------------------------------------------------------------

    def _raster(self, shape: Shape, pad: float, subsample: int = 1):
        """Pixel-space ``(slices, signed distance)`` of ``shape`` or ``None`` if off-canvas.

        With ``subsample`` > 1 the grid is that many times coarser (distances in its pixels).
        """
        t = self.transform
        if subsample > 1:
            t = Transform(t.scale / subsample, t.angle, t.pivot,
                          (t.centre[0] / subsample, t.centre[1] / subsample), t.flip, t.squeeze)
        px = shape.to_px(t)
        x0, y0, x1, y1 = px.bbox()
        h, w = -(-self.h // subsample), -(-self.w // subsample)
        ix0, iy0 = max(int(x0 - pad), 0), max(int(y0 - pad), 0)
        ix1, iy1 = min(int(x1 + pad) + 2, w), min(int(y1 + pad) + 2, h)
        if ix0 >= ix1 or iy0 >= iy1:
            return None
        x = self._xs[None, ix0:ix1]
        y = self._ys[iy0:iy1, None]
        d = px.sdf(x, y)
        if self.clip is not None:
            d = np.maximum(d, self._clip_distance(t, iy0, iy1, ix0, ix1, h, w))
        return (slice(iy0, iy1), slice(ix0, ix1)), d

    def px(self, length: float) -> float:
        """A canonical length in pixels."""
        return self.transform.length(length)

    # painting ---------------------------------------------------------------------------------

    def soft_tissue(self, shape: Shape, density: float, edge: float = 0.04) -> None:
        """Add soft tissue (or air, with negative density). The projected thickness of a rounded
        body falls off like a square root over the ``edge`` (canonical) inside its outline."""
        k = self.SOFT_SUBSAMPLE
        edge_px = max(self.px(edge) / k, 1.0)
        r = self._raster(shape, 1.0, k)
        if r is None:
            return
        sl, d = r
        self.soft[sl] += density * np.sqrt(_unit_clip(-d * (1.0 / edge_px) + 0.5 / edge_px))

    def bone_part(self, shape: Shape, cortex: float, cortex_density: float = 1.0,
                  medulla_density: float = 0.42, lesion: bool = False) -> None:
        """Add a bone: a cortical shell ``cortex`` thick (canonical) around a textured medulla."""
        r = self._raster(shape, 1.0)
        if r is None:
            return
        sl, d = r
        fill = _unit_clip(0.5 - d)
        inner = _unit_clip(0.5 - max(self.px(cortex), 0.8) - d)
        value = cortex_density * (fill - inner) + medulla_density * inner * self.texture[sl]
        self.bone[sl] += value
        if lesion:
            self.mask[sl] |= fill > 0.5

    def dense(self, shape: Shape, density: float, lesion: bool = False, edge_px: float = 1.0) -> None:
        """Add uniformly dense bone or mineral (sclerosis, calcified matrix, periosteal bone)."""
        r = self._raster(shape, edge_px)
        if r is None:
            return
        sl, d = r
        fill = _unit_clip(0.5 - d * (1.0 / edge_px))
        self.bone[sl] += density * fill
        if lesion:
            self.mask[sl] |= fill > 0.5

    def lucency(self, shape: Shape, strength: float, lesion: bool = True, edge_px: float = 1.0) -> None:
        """Remove bone: multiply the bone layer by ``1 - strength`` inside ``shape``."""
        r = self._raster(shape, edge_px)
        if r is None:
            return
        sl, d = r
        fill = _unit_clip(0.5 - d * (1.0 / edge_px))
        self.bone[sl] *= 1.0 - strength * fill
        if lesion:
            self.mask[sl] |= fill > 0.5

    def replace(self, shape: Shape, density: float, lesion: bool = True, edge_px: float = 2.0) -> None:
        """Replace bone by a smooth, featureless density (ground glass)."""
        r = self._raster(shape, edge_px)
        if r is None:
            return
        sl, d = r
        fill = _unit_clip(0.5 - d * (1.0 / edge_px))
        self.bone[sl] += fill * (density - self.bone[sl])
        if lesion:
            self.mask[sl] |= fill > 0.5

    def mark(self, shape: Shape) -> None:
        """Add ``shape`` to the lesion footprint without drawing (a soft-tissue mass)."""
        r = self._raster(shape, 0.0)
        if r is not None:
            sl, d = r
            self.mask[sl] |= d < 0.0

    # output -----------------------------------------------------------------------------------

    def density(self) -> np.ndarray:
        soft = Image.fromarray(np.maximum(self.soft, 0.0), mode="F")
        k = self.SOFT_SUBSAMPLE
        soft = soft.resize((self.w, self.h), Image.Resampling.BILINEAR, box=(0, 0, self.w / k, self.h / k))
        return np.asarray(soft, dtype=np.float32) + np.maximum(self.bone, 0.0)

    def intensity(self, attenuation: float) -> np.ndarray:
        """Display intensity in [0, 1): bright where the beam is attenuated (MONOCHROME2)."""
        return 1.0 - np.exp(-attenuation * self.density())
