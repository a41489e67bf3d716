"""Anatomical phantoms: one drawing function per region of the ``samx-regions`` set.

Each phantom draws a radiograph-like projection of its region in canonical coordinates (``v``
down from 0 to 1, ``u`` from 0 to the region's aspect ratio; see :mod:`.canvas`): bones as
cortical shells around a textured medulla, soft tissue as a faint envelope, air as negative
density. The 28 regions differ in what a radiologist (or a small CNN) sorts them by: which bones
are in the field, how many, how large and how they are arranged (a femur is one long shaft with
head and condyles, a hand five rays of phalanges, a lumbar spine five big stacked vertebrae in
lordosis, a thorax dark lungs behind rib arcs ...).

A phantom also registers *anchors*, the places a tumour may sit: the articular ends of long
bones (a lesion is placed at a :class:`~msk.core.specs.BonePosition` measured from the joint
along the shaft) and points on flat bones (pelvis, skull, vertebrae, ribs, scapula ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np

from msk.core.specs import BonePosition
from msk.core.synth.canvas import Arc, Box, Canvas, Capsule, Ellipse, Minus, Point, Shape, Union

# -- small vector helpers -----------------------------------------------------------------------


def _add(p: Point, v: Point, s: float = 1.0) -> Point:
    return (p[0] + v[0] * s, p[1] + v[1] * s)


def _unit(v: Point) -> Point:
    n = math.hypot(v[0], v[1]) or 1.0
    return (v[0] / n, v[1] / n)


def _perp(v: Point) -> Point:
    return (-v[1], v[0])


def _angle(v: Point) -> float:
    return math.atan2(v[1], v[0])


def _polar(angle_deg: float) -> Point:
    """Unit vector ``angle_deg`` from straight up (positive: to the right)."""
    a = math.radians(angle_deg)
    return (math.sin(a), -math.cos(a))


# -- anchors ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anchor:
    """Where a lesion can sit.

    Long bones (``flat=False``): ``tip`` is the articular end, ``axis`` the unit vector from the
    tip into the shaft, ``r`` the shaft half width, ``r_end`` the half width of the bone end and
    ``reach`` the visible length from the tip. Flat bones: ``tip`` is the centre of the host
    area, ``axis`` the bone's long direction, ``r`` its half thickness.
    """

    name: str
    tip: Point
    axis: Point
    r: float
    r_end: float
    reach: float = 0.0
    flat: bool = False

    def distance(self, position: BonePosition) -> float:
        """Distance from the tip along the axis at which ``position`` lies."""
        re, r = self.r_end, self.r
        return {
            BonePosition.EPIPHYSIS: 0.5 * re,
            BonePosition.EPI_METAPHYSIS: 1.0 * re,
            BonePosition.METAPHYSIS: 1.1 * re + 0.9 * r,
            BonePosition.META_DIAPHYSIS: 1.1 * re + 2.3 * r,
            BonePosition.DIAPHYSIS: max(1.1 * re + 4.0 * r, 0.42 * self.reach),
        }[position]

    def hosts(self, position: BonePosition) -> bool:
        """Whether a lesion at ``position`` fits in the visible part of this bone."""
        return self.flat or self.distance(position) + 2.0 * self.r <= self.reach

    def half_width(self, distance: float) -> float:
        """Half width of the bone ``distance`` from the tip (flares from ``r_end`` to ``r``)."""
        if self.flat:
            return self.r
        t = np.clip((distance - 0.9 * self.r_end) / (2.4 * self.r + 1e-9), 0.0, 1.0)
        return float(self.r_end + (self.r - self.r_end) * t)


# -- the drawing context ------------------------------------------------------------------------


class Body:
    """Draws anatomy onto a canvas for one patient and view; collects anchors.

    With ``canvas=None`` nothing is drawn but anchors are still collected (used to find which
    regions can host a lesion position without rendering).
    """

    def __init__(self, canvas: Canvas | None, rng: np.random.Generator, view: str, age: float,
                 realistic: bool = False):
        self.cv = canvas
        self.rng = rng
        self.view = view
        self.age = age
        #: the ``radiograph`` style: some regions are drawn as their common real projection
        #: (a full-length scoliosis spine, a lateral cephalogram in its head holder).
        self.realistic = realistic
        self.young = age < 16
        density = 1.0 if age < 50 else max(0.72, 1.0 - (age - 50) * 0.007)  # osteopenia
        self.cortex_density = 0.95 * density
        self.medulla_density = 0.36 * density
        if realistic:  # less of a cartoon: the medulla is nearly as bright as the cortex
            self.medulla_density *= float(rng.uniform(1.6, 2.4))
            self.cortex_density *= float(rng.uniform(0.7, 0.95))
        self.fat = float(rng.uniform(1.0, 1.45)) if realistic else 1.0  # soft-tissue envelope width
        self.anchors: dict[str, Anchor] = {}

    @property
    def lateral(self) -> bool:
        return self.view == "LAT"

    def jitter(self, scale: float) -> float:
        """Anatomical variation between patients (drawn from the patient's anatomy generator)."""
        return float(self.rng.uniform(-scale, scale))

    # painting

    def soft(self, shape: Shape, density: float = 0.22, edge: float = 0.05) -> None:
        if self.cv is not None:
            if self.realistic and isinstance(shape, Capsule):
                rb = shape.ra if shape.rb is None else shape.rb
                shape = Capsule(_beyond(shape.a, shape.b), _beyond(shape.b, shape.a), shape.ra * self.fat,
                                rb * self.fat)
            self.cv.soft_tissue(shape, density, edge)

    def air(self, shape: Shape, density: float = 0.2, edge: float = 0.03) -> None:
        if self.cv is not None:
            self.cv.soft_tissue(shape, -density, edge)

    def bone(self, shape: Shape, cortex: float = 0.008, scale: float = 1.0,
             medulla: float | None = None) -> None:
        if self.cv is not None:
            m = self.medulla_density * scale if medulla is None else medulla
            self.cv.bone_part(shape, cortex, self.cortex_density * scale, m)

    def dense(self, shape: Shape, density: float, edge_px: float = 1.0) -> None:
        if self.cv is not None:
            self.cv.dense(shape, density, edge_px=edge_px)

    def gap(self, shape: Shape, strength: float = 0.6) -> None:
        """A radiolucent line through bone (growth plate, joint space, foramen)."""
        if self.cv is not None:
            self.cv.lucency(shape, strength, lesion=False)

    # anchors

    def flat(self, name: str, centre: Point, axis: Point, r: float, extent: float) -> None:
        self.anchors[name] = Anchor(name, centre, _unit(axis), r, extent, 0.0, flat=True)

    # compound drawing

    def long_bone(self, names: tuple[str | None, str | None], tip_a: Point, tip_b: Point,
                  r: float, ends: tuple[str, str] = ("flare", "flare"),
                  re: tuple[float, float] | None = None, cortex: float | None = None,
                  extra: tuple[Shape, ...] = (), scale: float = 1.0) -> None:
        """A long (or short tubular) bone from articular end ``tip_a`` to ``tip_b``.

        ``ends`` picks each end's shape: ``flare`` (metaphyseal flare and epiphysis),
        ``condyles``, ``plateau``, ``head`` (humeral head), ``malleolus``, ``knob`` (round head
        of a small bone), ``base`` (flat base of a small bone), ``taper`` (plain round end),
        ``open`` (shapes supplied through ``extra``) or ``cut`` (runs out of the field; no anchor).
        """
        re = re or (1.6 * r, 1.6 * r)
        if self.realistic:  # a zoomed-out film shows more of a limb than the field it was drawn for
            tip_a, tip_b = (tip_a if ends[0] != "cut" else _beyond(tip_a, tip_b)), (
                tip_b if ends[1] != "cut" else _beyond(tip_b, tip_a))
        a = _unit((tip_b[0] - tip_a[0], tip_b[1] - tip_a[1]))
        length = math.hypot(tip_b[0] - tip_a[0], tip_b[1] - tip_a[1])
        inset = {"cut": 0.0, "taper": r, "open": 0.0}
        ia = inset.get(ends[0], 0.6 * re[0])
        ib = inset.get(ends[1], 0.6 * re[1])
        parts = [Capsule(_add(tip_a, a, ia), _add(tip_b, a, -ib), r)]
        parts += _end_shapes(ends[0], tip_a, a, r, re[0])
        parts += _end_shapes(ends[1], tip_b, (-a[0], -a[1]), r, re[1])
        self.bone(Union(tuple(parts) + tuple(extra)), cortex if cortex is not None else 0.28 * r,
                  scale)
        for name, tip, axis, kind, rend in ((names[0], tip_a, a, ends[0], re[0]),
                                           (names[1], tip_b, (-a[0], -a[1]), ends[1], re[1])):
            if kind in ("flare", "condyles", "plateau", "head", "malleolus") and self.young:
                centre = _add(tip, axis, 0.9 * rend)
                self.gap(Box(centre, 0.004, 1.02 * rend, _angle(axis)), 0.5)
            if name is not None and kind != "cut":
                self.anchors[name] = Anchor(name, tip, axis, r, rend, length)

    def vertebra(self, c: Point, w: float, h: float, tilt: float = 0.0, scale: float = 1.0,
                 lateral: bool | None = None) -> None:
        """A vertebra: body plus posterior elements (pedicle rings in AP, arch in LAT)."""
        lateral = self.lateral if lateral is None else lateral
        ax = (math.cos(tilt), math.sin(tilt))
        up = _perp(ax)
        body = Box(c, w / 2, h / 2, tilt, 0.18 * h)
        if lateral:
            back = _add(c, ax, w * 0.5)
            spinous = Capsule(_add(back, ax, w * 0.25), _add(_add(back, ax, w * 0.85), up, -h * 0.45),
                              h * 0.16, h * 0.1)
            arch = Capsule(back, _add(back, ax, w * 0.3), h * 0.22)
            self.bone(body, 0.13 * h, scale)
            self.bone(Union((arch, spinous)), 0.1 * h, scale * 0.8)
        else:
            self.bone(body, 0.13 * h, scale)
            for s in (-1, 1):
                ped = _add(c, ax, s * w * 0.3)
                self.dense(Minus(Ellipse(ped, w * 0.1, h * 0.2, tilt), Ellipse(ped, w * 0.06, h * 0.13, tilt)),
                           0.35 * scale)
                self.bone(Capsule(_add(c, ax, s * w * 0.5), _add(_add(c, ax, s * w * 0.78), up, h * 0.05),
                                  h * 0.12, h * 0.08), 0.05 * h, 0.6 * scale)
            self.dense(Ellipse(_add(c, up, h * 0.1), w * 0.05, h * 0.22, tilt + math.pi / 2), 0.3 * scale)

    def column(self, top: Point, bottom: Point, n: int, w: tuple[float, float],
               bend: float = 0.0, gap: float = 0.28, name: str = "vertebra",
               scale: float = 1.0) -> list[Point]:
        """``n`` vertebrae from ``top`` to ``bottom`` along a bent line (lordosis/kyphosis or
        scoliosis: ``bend`` is the sideways bulge at mid height, canonical units)."""
        centres = []
        step = 1.0 / max(n - 1, 1)
        dist = math.hypot(bottom[0] - top[0], bottom[1] - top[1])
        seg = dist / n if n > 1 else dist
        for i in range(n):
            t = i * step if n > 1 else 0.5
            x = top[0] + (bottom[0] - top[0]) * t + bend * math.sin(math.pi * t)
            y = top[1] + (bottom[1] - top[1]) * t
            slope = bend * math.pi * math.cos(math.pi * t) / max(dist, 1e-6)
            wi = w[0] + (w[1] - w[0]) * t
            h = min(seg * (1 - gap), wi * 0.85)
            self.vertebra((x, y), wi, h, tilt=-slope * 0.9, scale=scale)
            centres.append((x, y))
        mid = centres[n // 2]
        self.flat(name, mid, (0.0, 1.0), w[0] * 0.35, w[0])
        return centres

    def ray(self, prefix: str, base: Point, direction: Point, lengths: tuple[float, ...],
            radii: tuple[float, ...], names: tuple[str, ...], gap: float = 0.012,
            curl: float = 0.0) -> Point:
        """A chain of short tubular bones (metacarpal/metatarsal and phalanges) from ``base``
        outward; returns the distal tip."""
        p = base
        d = _unit(direction)
        for i, (length, r, name) in enumerate(zip(lengths, radii, names, strict=True)):
            q = _add(p, d, length)
            last = i == len(lengths) - 1
            ends = ("base", "taper" if last else "knob")
            extra = (Ellipse(_add(q, d, -r * 0.9), r * 1.0, r * 1.35, _angle(d)),) if last else ()
            self.long_bone((f"{prefix}{name}.proximal", f"{prefix}{name}.distal"), p, q, r,
                           ends=ends, re=(1.45 * r, 1.2 * r), extra=extra)
            p = _add(q, d, gap)
            if curl:
                c, s = math.cos(curl), math.sin(curl)
                d = (d[0] * c - d[1] * s, d[0] * s + d[1] * c)
        return p

    def rib(self, origin: Point, side: int, width: float, w: float, scale: float = 1.0,
            rise: float = 0.75) -> Arc:
        """A rib arching from its vertebra at ``origin`` to the side ``side`` (+1: +u) over
        ``width``: it runs out laterally and slightly up, then curves down the chest wall."""
        radius = width * 0.62
        centre = (origin[0] + side * width * 0.5, origin[1] + radius * rise)
        start = math.atan2(origin[1] - centre[1], origin[0] - centre[0])
        spread = math.radians(105.0)
        arc = Arc(centre, radius, w, start + side * spread / 2, spread / 2)
        self.bone(arc, w * 0.35, scale)
        return arc


def _beyond(p: Point, other: Point, extra: float = 0.8) -> Point:
    """``p`` moved ``extra`` further away from ``other`` when it lies outside the field
    (``v`` < -0.05 or > 1.05): limbs that run out of the drawn field go on beyond it."""
    if -0.05 <= p[1] <= 1.05:
        return p
    d = _unit((p[0] - other[0], p[1] - other[1]))
    return _add(p, d, extra)


def _end_shapes(kind: str, p: Point, a: Point, r: float, re: float) -> list[Shape]:
    n = _perp(a)
    ang = _angle(a)
    flare = Capsule(_add(p, a, 0.85 * re), _add(p, a, 0.9 * re + 2.4 * r), 0.88 * re, r)
    if kind == "flare":
        return [Ellipse(_add(p, a, 0.85 * re), 0.85 * re, re, ang), flare]
    if kind == "condyles":
        return [Ellipse(_add(_add(p, a, 0.55 * re), n, s * 0.47 * re), 0.55 * re, 0.53 * re, ang)
                for s in (-1, 1)] + [flare]
    if kind == "plateau":
        return [Box(_add(p, a, 0.4 * re), 0.4 * re, re, ang, 0.18 * re), flare]
    if kind == "head":
        return [Ellipse(_add(_add(p, a, 0.95 * re), n, 0.25 * re), 0.95 * re, 1.0 * re, ang), flare]
    if kind == "malleolus":
        return [Ellipse(_add(p, a, 0.85 * re), 0.85 * re, re, ang), flare,
                Capsule(_add(_add(p, a, 0.6 * re), n, 0.72 * re), _add(_add(p, a, -0.5 * re), n, 0.78 * re),
                        0.26 * re, 0.18 * re)]
    if kind == "knob":
        return [Ellipse(_add(p, a, 0.8 * re), 0.8 * re, re, ang)]
    if kind == "base":
        return [Box(_add(p, a, 0.45 * re), 0.45 * re, re, ang, 0.3 * re)]
    if kind in ("taper", "cut", "open"):
        return []
    raise ValueError(f"unknown bone end {kind!r}")


# -- lower limb ---------------------------------------------------------------------------------


def _proximal_femur(b: Body, shaft_top: Point, head: Point, r: float, shaft_end: Point,
                    name: str = "femur", distal: str = "cut", re_distal: float = 0.0) -> None:
    """Femoral head, neck, trochanters and shaft (the head points medially, to +u)."""
    neck_base = _add(shaft_top, (0.0, 1.0), 1.2 * r)
    extra = (
        Capsule(neck_base, head, 0.85 * r),
        Ellipse(head, 1.45 * r, 1.45 * r),
        Ellipse(_add(shaft_top, (-1.0, 0.0), 0.75 * r), 0.85 * r, 1.4 * r),  # greater trochanter
        Ellipse(_add(shaft_top, (0.6, 2.8), r), 0.45 * r, 0.55 * r),  # lesser trochanter
    )
    b.long_bone((f"{name}.proximal", f"{name}.distal"), shaft_top, shaft_end, r,
                ends=("open", distal), re=(1.4 * r, re_distal or 2.0 * r), extra=extra)


def femur(b: Body) -> None:
    b.soft(Capsule((0.27, -0.1), (0.25, 1.1), 0.2, 0.13), 0.26)
    b.bone(Minus(Ellipse((0.5, 0.0), 0.16, 0.1, -0.3), Ellipse((0.38, 0.085), 0.06, 0.06)), 0.007, 0.8)
    head = (0.37, 0.085) if not b.lateral else (0.30, 0.075)
    _proximal_femur(b, (0.265, 0.12), head, 0.034, (0.25, 0.92), distal="condyles", re_distal=0.068)
    b.long_bone((None, None), (0.25, 0.955), (0.25, 1.08), 0.033, ("plateau", "cut"), (0.064, 0.0))
    patella = Ellipse((0.25, 0.86), 0.026, 0.034) if not b.lateral else Ellipse((0.31, 0.87), 0.017, 0.035)
    b.bone(patella, 0.005, 0.6)


def lower_leg(b: Body) -> None:
    b.soft(Capsule((0.25, -0.1), (0.25, 1.1), 0.17, 0.1), 0.24)
    b.long_bone((None, None), (0.24, 0.035), (0.24, -0.2), 0.045, ("condyles", "cut"), (0.085, 0.0))
    fib_x = 0.33 if not b.lateral else 0.28
    b.long_bone(("tibia.proximal", "tibia.distal"), (0.24, 0.06), (0.235, 0.93), 0.028,
                ("plateau", "malleolus"), (0.062, 0.042))
    b.long_bone(("fibula.proximal", "fibula.distal"), (fib_x, 0.09), (fib_x - 0.01, 0.955), 0.011,
                ("knob", "knob"), (0.019, 0.019))
    b.bone(Ellipse((0.24, 0.985), 0.05, 0.03), 0.006, 0.8)  # talus dome


def knee(b: Body) -> None:
    b.soft(Capsule((0.4, -0.1), (0.4, 1.1), 0.31, 0.27), 0.26)
    if b.lateral:
        b.long_bone(("femur.distal", None), (0.40, 0.47), (0.38, -0.05), 0.07, ("knob", "cut"),
                    (0.125, 0.0))
        b.long_bone(("tibia.proximal", None), (0.40, 0.53), (0.36, 1.05), 0.065, ("plateau", "cut"),
                    (0.12, 0.0), extra=(Ellipse((0.49, 0.66), 0.035, 0.06),))
        b.long_bone(("fibula.proximal", None), (0.31, 0.6), (0.29, 1.05), 0.02, ("knob", "cut"), (0.03, 0.0), scale=0.8)
        b.bone(Ellipse((0.575, 0.40), 0.035, 0.075, 0.15), 0.008)
        b.flat("patella", (0.575, 0.40), (0.0, 1.0), 0.03, 0.07)
    else:
        b.long_bone(("femur.distal", None), (0.40, 0.475), (0.40, -0.05), 0.068,
                    ("condyles", "cut"), (0.13, 0.0))
        b.long_bone(("tibia.proximal", None), (0.40, 0.525), (0.41, 1.05), 0.063,
                    ("plateau", "cut"), (0.125, 0.0))
        b.long_bone(("fibula.proximal", None), (0.535, 0.6), (0.535, 1.05), 0.02, ("knob", "cut"),
                    (0.034, 0.0))
        b.bone(Ellipse((0.40, 0.39), 0.05, 0.062), 0.008, 0.55)
        b.flat("patella", (0.40, 0.39), (0.0, 1.0), 0.04, 0.06)


def ankle(b: Body) -> None:
    b.soft(Capsule((0.38, -0.1), (0.4, 0.75), 0.22, 0.25), 0.25)
    b.soft(Ellipse((0.4, 0.8), 0.3, 0.16), 0.25)
    b.long_bone(("tibia.distal", None), (0.37, 0.5), (0.37, -0.05), 0.06, ("malleolus", "cut"), (0.1, 0.0))
    if b.lateral:
        b.long_bone(("fibula.distal", None), (0.33, 0.6), (0.35, -0.05), 0.022, ("knob", "cut"), (0.033, 0.0),
                    scale=0.8)
        b.bone(Union((Ellipse((0.40, 0.58), 0.11, 0.07), Ellipse((0.53, 0.62), 0.06, 0.045))), 0.008)
        b.bone(Union((Box((0.34, 0.78), 0.16, 0.08, -0.15, 0.05), Ellipse((0.2, 0.8), 0.07, 0.08))), 0.01)
        b.bone(Ellipse((0.6, 0.68), 0.04, 0.05), 0.006)
        b.flat("calcaneus", (0.34, 0.78), (1.0, 0.0), 0.07, 0.14)
    else:
        b.long_bone(("fibula.distal", None), (0.5, 0.6), (0.49, -0.05), 0.024, ("knob", "cut"), (0.034, 0.0))
        b.bone(Union((Ellipse((0.38, 0.585), 0.105, 0.07), Box((0.38, 0.66), 0.08, 0.04, 0.0, 0.03))), 0.008)
        b.bone(Ellipse((0.4, 0.83), 0.12, 0.08), 0.01, 0.7)
        b.flat("talus", (0.38, 0.6), (1.0, 0.0), 0.05, 0.1)


def calcaneus(b: Body) -> None:
    if b.lateral:
        b.soft(Union((Ellipse((0.55, 0.62), 0.5, 0.3), Capsule((0.45, -0.1), (0.45, 0.4), 0.15))), 0.24)
        body = Union((Box((0.56, 0.6), 0.27, 0.12, -0.12, 0.08), Ellipse((0.30, 0.64), 0.1, 0.115),
                      Ellipse((0.82, 0.53), 0.07, 0.065)))
        b.bone(body, 0.011)
        b.gap(Ellipse((0.5, 0.61), 0.07, 0.045), 0.3)  # neutral triangle
        b.bone(Union((Ellipse((0.6, 0.38), 0.15, 0.095), Ellipse((0.79, 0.43), 0.07, 0.06))), 0.01)
        b.bone(Ellipse((0.94, 0.46), 0.045, 0.06), 0.007)
        b.bone(Ellipse((0.93, 0.6), 0.05, 0.05), 0.007)
        b.long_bone((None, None), (0.57, 0.27), (0.55, -0.1), 0.05, ("flare", "cut"), (0.085, 0.0))
        b.flat("calcaneus", (0.55, 0.6), (1.0, -0.1), 0.1, 0.25)
    else:
        b.soft(Ellipse((0.35, 0.55), 0.3, 0.5), 0.24)
        b.bone(Union((Ellipse((0.36, 0.6), 0.14, 0.3, math.pi / 2 + 0.1), Ellipse((0.2, 0.32), 0.08, 0.06))), 0.012)
        b.bone(Ellipse((0.38, 0.15), 0.16, 0.08), 0.008, 0.8)
        b.flat("calcaneus", (0.36, 0.62), (0.0, 1.0), 0.12, 0.25)


def foot(b: Body) -> None:
    b.soft(Union((Capsule((0.33, 0.12), (0.33, 0.85), 0.22, 0.14), Ellipse((0.33, 0.12), 0.25, 0.1))), 0.22)
    spread = [-14.0, -6.0, 1.0, 7.0, 13.0]
    bases = [(0.22, 0.56), (0.28, 0.55), (0.34, 0.56), (0.40, 0.575), (0.46, 0.6)]
    for k, (ang, base) in enumerate(zip(spread, bases, strict=True), start=1):
        d = _polar(ang + b.jitter(2))
        if k == 1:
            lengths, radii, names = (0.23, 0.11, 0.085), (0.024, 0.02, 0.018), ("mt1", "pp1", "dp1")
        else:
            f = 1.0 - 0.07 * (k - 2)
            lengths = (0.25 * f, 0.07 * f, 0.035 * f, 0.03 * f)
            radii = (0.013, 0.011, 0.009, 0.008)
            names = (f"mt{k}", f"pp{k}", f"mp{k}", f"dp{k}")
        b.ray("", base, d, lengths, radii, names, gap=0.01)
    for x in (0.22, 0.285, 0.345):
        b.bone(Box((x, 0.615), 0.03, 0.04, 0.0, 0.01), 0.006)  # cuneiforms
    b.bone(Box((0.43, 0.65), 0.05, 0.05, 0.3, 0.015), 0.007)  # cuboid
    b.bone(Ellipse((0.28, 0.69), 0.09, 0.035), 0.007)  # navicular
    b.bone(Ellipse((0.30, 0.77), 0.07, 0.06), 0.008)  # talar head
    b.bone(Ellipse((0.38, 0.9), 0.1, 0.12), 0.01, 0.8)  # calcaneus
    b.flat("calcaneus", (0.38, 0.9), (0.0, 1.0), 0.08, 0.12)


def whole_leg(b: Body) -> None:
    b.soft(Capsule((0.17, 0.0), (0.17, 1.02), 0.13, 0.055), 0.22)
    b.bone(Minus(Ellipse((0.3, 0.0), 0.1, 0.07, -0.3), Ellipse((0.235, 0.05), 0.035, 0.035)), 0.005, 0.8)
    _proximal_femur(b, (0.16, 0.07), (0.235, 0.05), 0.018, (0.16, 0.52), distal="condyles", re_distal=0.038)
    b.long_bone(("tibia.proximal", "tibia.distal"), (0.16, 0.54), (0.165, 0.93), 0.016,
                ("plateau", "malleolus"), (0.037, 0.026))
    b.long_bone(("fibula.proximal", "fibula.distal"), (0.205, 0.56), (0.2, 0.945), 0.006,
                ("knob", "knob"), (0.011, 0.011))
    b.bone(Ellipse((0.16, 0.5), 0.015, 0.02), 0.004, 0.6)
    b.bone(Union((Ellipse((0.17, 0.955), 0.04, 0.02), Ellipse((0.15, 0.985), 0.05, 0.02))), 0.005)


def hip(b: Body) -> None:
    b.soft(Ellipse((0.5, 0.55), 0.6, 0.6), 0.3)
    head = (0.42, 0.42)
    b.bone(Minus(Union((Ellipse((0.66, 0.16), 0.3, 0.2, 0.5), Ellipse((0.55, 0.4), 0.12, 0.1))),
                 Ellipse(head, 0.07, 0.07)), 0.012, 0.75)
    b.dense(Arc(head, 0.075, 0.006, -math.pi / 2 + 0.3, 1.3), 0.5)
    b.bone(Minus(Union((Ellipse((0.66, 0.68), 0.15, 0.11), Capsule((0.66, 0.6), (1.05, 0.62), 0.03))),
                 Ellipse((0.66, 0.68), 0.09, 0.06)), 0.01, 0.85)
    b.bone(Ellipse((1.0, 0.15), 0.1, 0.25), 0.01, 0.6)  # sacrum edge
    if b.lateral:  # frog-leg: femur abducted
        _proximal_femur(b, (0.32, 0.5), head, 0.048, (0.0, 1.0))
    else:
        _proximal_femur(b, (0.3, 0.5), head, 0.05, (0.24, 1.1))
    b.flat("ilium", (0.66, 0.16), (1.0, 0.5), 0.05, 0.2)


def pelvis(b: Body) -> None:
    b.soft(Ellipse((0.65, 0.55), 0.68, 0.6), 0.35)
    b.vertebra((0.65, 0.04), 0.16, 0.07, scale=0.8, lateral=False)
    sacrum = Union((Box((0.65, 0.22), 0.09, 0.08, 0.0, 0.03), Box((0.65, 0.33), 0.06, 0.06, 0.0, 0.03),
                    Capsule((0.65, 0.36), (0.65, 0.45), 0.02)))
    b.bone(sacrum, 0.01, 0.85)
    for s in (-1, 1):
        cx = 0.65 + s * 0.25
        for k in range(3):
            b.gap(Ellipse((0.65 + s * 0.045, 0.2 + 0.055 * k), 0.011, 0.011), 0.5)
        wing = Minus(Ellipse((0.65 + s * 0.27, 0.22), 0.2, 0.15, s * 0.5), Ellipse((cx, 0.5), 0.07, 0.07))
        b.bone(wing, 0.011, 0.75)
        b.dense(Arc((cx, 0.5), 0.075, 0.006, -math.pi / 2 - s * 0.3, 1.3), 0.5)
        ring = Minus(Union((Ellipse((0.65 + s * 0.13, 0.68), 0.1, 0.08), Capsule((cx, 0.58), (0.65, 0.64), 0.025))),
                     Ellipse((0.65 + s * 0.13, 0.68), 0.06, 0.045))
        b.bone(ring, 0.009, 0.85)
        b.flat(f"ilium.{'left' if s > 0 else 'right'}", (0.65 + s * 0.3, 0.2), (1.0, 0.0), 0.05, 0.15)
    for s, name in ((-1, "right"), (1, "left")):
        head = (0.65 + s * 0.25, 0.5)
        top = (0.65 + s * 0.37, 0.58)
        neck_base = _add(top, (0.0, 1.0), 0.05)
        extra = (Capsule(neck_base, head, 0.035), Ellipse(head, 0.06, 0.06),
                 Ellipse(_add(top, (s * 0.03, 0.0)), 0.035, 0.05))
        b.long_bone((f"femur.{name}.proximal", None), top, (0.65 + s * 0.4, 1.1), 0.04,
                    ("open", "cut"), (0.055, 0.0), extra=extra)


def sacrum(b: Body) -> None:
    b.soft(Ellipse((0.4, 0.5), 0.5, 0.6), 0.33)
    if b.lateral:
        b.vertebra((0.42, 0.06), 0.2, 0.1, tilt=0.3, lateral=True)
        for k in range(5):
            t = k / 4
            c = (0.36 + 0.08 * math.sin(t * 1.6), 0.2 + 0.13 * k)
            b.bone(Box(c, 0.09 * (1 - 0.45 * t), 0.055, 0.3 - 0.35 * t, 0.02), 0.008)
        b.bone(Union((Capsule((0.44, 0.82), (0.5, 0.9), 0.018), Capsule((0.5, 0.92), (0.55, 0.97), 0.012))), 0.005)
        b.flat("sacrum", (0.36, 0.4), (0.2, 1.0), 0.06, 0.15)
        return
    b.vertebra((0.4, 0.05), 0.22, 0.09, lateral=False)
    for s in (-1, 1):
        b.bone(Ellipse((0.4 + s * 0.36, 0.3), 0.17, 0.3, s * 0.25), 0.012, 0.7)
    body = Union((Capsule((0.4, 0.2), (0.4, 0.74), 0.17, 0.04), Box((0.4, 0.2), 0.25, 0.06, 0.0, 0.03)))
    b.bone(body, 0.01)
    for k in range(4):
        for s in (-1, 1):
            b.gap(Ellipse((0.4 + s * (0.07 - 0.01 * k), 0.24 + 0.11 * k), 0.016, 0.014), 0.55)
    b.bone(Union((Capsule((0.4, 0.78), (0.4, 0.84), 0.022), Capsule((0.4, 0.86), (0.4, 0.9), 0.015))), 0.005)
    b.flat("sacrum", (0.4, 0.35), (0.0, 1.0), 0.08, 0.15)


# -- upper limb ---------------------------------------------------------------------------------


def humerus(b: Body) -> None:
    b.soft(Capsule((0.27, -0.05), (0.25, 1.1), 0.16, 0.12), 0.24)
    b.bone(Union((Ellipse((0.1, 0.12), 0.035, 0.07), Ellipse((0.0, 0.3), 0.1, 0.22, 0.2))), 0.007, 0.7)
    b.bone(Capsule((0.05, 0.02), (0.36, 0.03), 0.02), 0.006, 0.8)  # acromion
    b.long_bone(("humerus.proximal", "humerus.distal"), (0.24, 0.06), (0.25, 0.9), 0.03,
                ("head", "condyles"), (0.062, 0.058))
    b.long_bone((None, None), (0.22, 0.95), (0.2, 1.1), 0.02, ("flare", "cut"), (0.03, 0.0))
    b.long_bone((None, None), (0.29, 0.94), (0.3, 1.1), 0.018, ("knob", "cut"), (0.026, 0.0))


def shoulder(b: Body) -> None:
    b.soft(Ellipse((0.55, 0.6), 0.55, 0.6), 0.28)
    for k in range(4):
        b.rib((-0.35, 0.15 + 0.15 * k), 1, 0.6, 0.012, 0.7)
    b.air(Ellipse((0.12, 0.6), 0.14, 0.35), 0.12)
    b.bone(Union((Ellipse((0.26, 0.62), 0.14, 0.3, 0.15), Ellipse((0.37, 0.4), 0.04, 0.095))), 0.009, 0.55)
    b.bone(Capsule((0.3, 0.2), (0.64, 0.17), 0.028), 0.008)  # acromion
    b.bone(Capsule((-0.05, 0.1), (0.56, 0.14), 0.03), 0.01)  # clavicle
    b.bone(Capsule((0.42, 0.3), (0.5, 0.27), 0.018), 0.006)  # coracoid
    b.long_bone(("humerus.proximal", None), (0.5, 0.28), (0.56, 1.1), 0.06, ("head", "cut"), (0.12, 0.0))
    b.flat("scapula", (0.26, 0.65), (0.2, 1.0), 0.05, 0.2)


def clavicle(b: Body) -> None:
    b.soft(Ellipse((0.75, 0.6), 0.9, 0.6), 0.26)
    for k in range(5):
        b.rib((0.1, -0.1 + 0.15 * k), 1, 0.9, 0.015, 0.7)
    b.air(Ellipse((0.55, 0.85), 0.4, 0.3), 0.12)
    b.column((0.06, -0.05), (0.06, 1.05), 7, (0.1, 0.11), scale=0.7)
    b.bone(Ellipse((1.32, 0.6), 0.12, 0.25), 0.01, 0.7)  # humeral head edge
    b.bone(Capsule((1.15, 0.38), (1.5, 0.36), 0.035), 0.008, 0.9)  # acromion
    bend = (0.72, 0.4 + b.jitter(0.02))
    b.long_bone(("clavicle.medial", None), (0.22, 0.48), bend, 0.032, ("flare", "open"), (0.048, 0.0),
                extra=(Capsule(bend, (1.18, 0.42), 0.03), Ellipse((1.18, 0.42), 0.035, 0.045)))
    b.anchors["clavicle.lateral"] = Anchor("clavicle.lateral", (1.18, 0.42), (-1.0, 0.0), 0.03, 0.045, 0.45)


def elbow(b: Body) -> None:
    if b.lateral:
        b.soft(Union((Capsule((0.3, -0.1), (0.42, 0.55), 0.2), Capsule((0.42, 0.55), (0.95, 0.6), 0.17))), 0.25)
        b.long_bone(("humerus.distal", None), (0.44, 0.52), (0.28, -0.1), 0.055, ("knob", "cut"), (0.09, 0.0))
        b.long_bone(("ulna.proximal", None), (0.36, 0.58), (0.95, 0.66), 0.03, ("open", "cut"), (0.06, 0.0),
                    extra=(Ellipse((0.39, 0.55), 0.06, 0.045, 0.3), Capsule((0.34, 0.5), (0.45, 0.6), 0.03)))
        b.long_bone(("radius.proximal", None), (0.5, 0.5), (0.95, 0.56), 0.026, ("knob", "cut"), (0.038, 0.0),
                    scale=0.85)
    else:
        b.soft(Capsule((0.4, -0.1), (0.4, 1.1), 0.25, 0.2), 0.25)
        b.long_bone(("humerus.distal", None), (0.4, 0.5), (0.4, -0.1), 0.05, ("condyles", "cut"), (0.11, 0.0),
                    extra=(Ellipse((0.27, 0.43), 0.035, 0.04), Ellipse((0.53, 0.43), 0.03, 0.035)))
        b.long_bone(("ulna.proximal", None), (0.36, 0.53), (0.37, 1.1), 0.028, ("flare", "cut"), (0.05, 0.0),
                    extra=(Ellipse((0.37, 0.47), 0.04, 0.05),))
        b.long_bone(("radius.proximal", None), (0.48, 0.55), (0.5, 1.1), 0.026, ("knob", "cut"), (0.04, 0.0))


def forearm(b: Body) -> None:
    b.soft(Capsule((0.26, -0.1), (0.25, 1.1), 0.15, 0.11), 0.24)
    b.long_bone((None, None), (0.25, 0.03), (0.25, -0.2), 0.035, ("condyles", "cut"), (0.075, 0.0))
    rx = 0.31 if not b.lateral else 0.27
    b.long_bone(("ulna.proximal", "ulna.distal"), (0.2, 0.05), (0.2, 0.92), 0.018, ("flare", "knob"),
                (0.035, 0.021), extra=(Ellipse((0.2, 0.04), 0.025, 0.03),))
    b.long_bone(("radius.proximal", "radius.distal"), (rx, 0.07), (rx + 0.01, 0.93), 0.019,
                ("knob", "flare"), (0.026, 0.045))
    for x in (0.18, 0.25, 0.32):
        b.bone(Ellipse((x, 0.98), 0.03, 0.022), 0.005)


def _carpus(b: Body, c: Point, s: float) -> None:
    """Eight carpal bones in two rows around ``c`` (size ``s``)."""
    proximal = [(-1.5, 0.6, 1.0, 0.6), (-0.5, 0.7, 0.8, 0.55), (0.45, 0.65, 0.6, 0.55), (1.2, 0.55, 0.45, 0.5)]
    distal = [(-1.7, -0.45, 0.7, 0.5), (-0.8, -0.55, 0.55, 0.5), (0.1, -0.55, 0.7, 0.6), (1.05, -0.5, 0.7, 0.6)]
    for dx, dy, rx, ry in proximal + distal:
        b.bone(Ellipse((c[0] + dx * s, c[1] + dy * s), rx * s, ry * s, b.jitter(0.3)), 0.12 * s)


def hand(b: Body) -> None:
    b.soft(Ellipse((0.42, 0.72), 0.22, 0.2), 0.22)
    b.soft(Capsule((0.42, 0.85), (0.42, 1.1), 0.16), 0.22)
    b.long_bone(("radius.distal", None), (0.36, 0.84), (0.35, 1.1), 0.035, ("flare", "cut"), (0.06, 0.0))
    b.long_bone(("ulna.distal", None), (0.51, 0.86), (0.52, 1.1), 0.02, ("knob", "cut"), (0.026, 0.0))
    _carpus(b, (0.43, 0.76), 0.032)
    fingers = [(-12.0, (0.33, 0.67), 1.0), (-3.0, (0.39, 0.655), 1.08), (5.0, (0.45, 0.66), 1.02),
               (13.0, (0.51, 0.68), 0.88)]
    for k, (ang, base, f) in enumerate(fingers, start=2):
        d = _polar(ang + b.jitter(2.5))
        tip = _add(base, d, f * 0.52)
        b.soft(Capsule(_add(base, d, 0.2 * f), tip, 0.032), 0.2)
        b.ray("", base, d, (0.2 * f, 0.13 * f, 0.08 * f, 0.06 * f), (0.016, 0.014, 0.012, 0.01),
              (f"mc{k}", f"pp{k}", f"mp{k}", f"dp{k}"), curl=0.04 if b.view == "OBL" else 0.0)
    d = _polar(-42 + b.jitter(4))
    b.soft(Capsule((0.3, 0.72), _add((0.3, 0.72), d, 0.36), 0.04), 0.2)
    b.ray("", (0.31, 0.73), d, (0.15, 0.1, 0.07), (0.018, 0.016, 0.013), ("mc1", "pp1", "dp1"))


def finger(b: Body) -> None:
    if b.realistic and not b.lateral:  # a PA finger film shows the neighbouring fingers too (framed on them)
        hand(b)
        return
    thumb = b.rng.random() < 0.25
    d = _polar(b.jitter(3))
    curl = 0.12 if b.lateral else 0.0
    b.soft(Capsule((0.22, 1.1), (0.22, 0.02), 0.13, 0.1), 0.22)
    if thumb:  # two phalanges; the bones keep the names of a finger's
        b.ray("", (0.23, 0.62), (-d[0], -d[1]), (0.45,), (0.05,), ("mc",))
        b.ray("", (0.22, 0.6), d, (0.3, 0.24), (0.045, 0.038), ("pp", "dp"), gap=0.025, curl=curl)
    else:
        b.ray("", (0.225, 0.73), (-d[0], -d[1]), (0.35,), (0.045,), ("mc",))
        b.ray("", (0.22, 0.69), d, (0.3, 0.2, 0.14), (0.042, 0.036, 0.03), ("pp", "mp", "dp"),
              gap=0.025, curl=curl)


def wrist(b: Body) -> None:
    if b.realistic and not b.lateral:  # a PA wrist film shows the hand and distal forearm
        hand(b)
        return
    b.soft(Capsule((0.4, -0.1), (0.4, 1.1), 0.3, 0.24), 0.24)
    if b.lateral:
        b.long_bone(("radius.distal", None), (0.42, 0.62), (0.4, 1.1), 0.06, ("flare", "cut"), (0.1, 0.0))
        b.long_bone(("ulna.distal", None), (0.38, 0.65), (0.36, 1.1), 0.03, ("knob", "cut"), (0.04, 0.0), scale=0.7)
        b.bone(Union((Ellipse((0.42, 0.5), 0.09, 0.065), Ellipse((0.43, 0.36), 0.08, 0.07))), 0.01)
        b.bone(Ellipse((0.5, 0.45), 0.05, 0.09, 0.2), 0.008, 0.7)
        for k in range(4):
            b.long_bone((None, None), (0.41 + 0.015 * k, 0.26), (0.4 + 0.02 * k, -0.1), 0.03, ("base", "cut"),
                        (0.045, 0.0), scale=0.6)
        b.flat("lunate", (0.42, 0.5), (0.0, 1.0), 0.05, 0.09)
        return
    b.long_bone(("radius.distal", None), (0.33, 0.63), (0.33, 1.1), 0.065, ("malleolus", "cut"), (0.115, 0.0))
    b.long_bone(("ulna.distal", None), (0.56, 0.66), (0.56, 1.1), 0.035, ("knob", "cut"), (0.045, 0.0))
    _carpus(b, (0.43, 0.47), 0.085)
    for k, x in enumerate((0.2, 0.31, 0.42, 0.53, 0.63)):
        ang = -18 + 9 * k
        base = (x, 0.3 + (0.05 if k == 0 else 0.0))
        b.long_bone((None, None), base, _add(base, _polar(ang), 0.45), 0.027 if k else 0.032,
                    ("base", "cut"), (0.042, 0.0))
    b.flat("lunate", (0.4, 0.53), (0.0, 1.0), 0.05, 0.09)


# -- trunk, spine and head ----------------------------------------------------------------------


def thorax(b: Body) -> None:
    if b.lateral:
        b.soft(Box((0.5, 0.55), 0.42, 0.55, 0.0, 0.15), 0.5)
        b.air(Ellipse((0.5, 0.5), 0.33, 0.36), 0.32)
        b.soft(Ellipse((0.35, 0.68), 0.18, 0.15), 0.18)  # heart
        b.column((0.82, 0.03), (0.8, 0.97), 12, (0.09, 0.12), bend=0.05, scale=0.8)
        b.bone(Capsule((0.14, 0.2), (0.11, 0.75), 0.015), 0.005, 0.8)  # sternum
        for k in range(9):
            b.rib((0.78, 0.1 + 0.075 * k), -1, 0.6, 0.008, 0.45, rise=0.95)
        b.flat("rib", (0.45, 0.4), (1.0, 0.0), 0.008, 0.05)
        return
    b.soft(Box((0.5, 0.58), 0.46, 0.55, 0.0, 0.2), 0.48)
    for s in (-1, 1):
        b.air(Union((Ellipse((0.5 + s * 0.2, 0.47), 0.16, 0.31), Ellipse((0.5 + s * 0.22, 0.72), 0.15, 0.1))), 0.33)
    b.soft(Ellipse((0.55, 0.68), 0.15, 0.12), 0.15)
    b.column((0.5, 0.06), (0.5, 0.95), 12, (0.06, 0.08), scale=0.55)
    for k in range(10):
        for s in (-1, 1):
            b.rib((0.5 + s * 0.035, 0.08 + 0.07 * k), s, 0.42, 0.0085, 0.55)
    for s in (-1, 1):
        b.bone(Capsule((0.5 + s * 0.05, 0.18), (0.5 + s * 0.33, 0.14), 0.017), 0.006)  # clavicles
        b.bone(Ellipse((0.5 + s * 0.4, 0.32), 0.06, 0.17, s * 0.2), 0.006, 0.45)  # scapulae
    b.flat("rib", (0.28, 0.37), (0.2, 1.0), 0.0085, 0.05)


def ribs(b: Body) -> None:
    b.soft(Box((0.4, 0.5), 0.45, 0.6, 0.0, 0.15), 0.45)
    b.air(Ellipse((0.38, 0.5), 0.3, 0.42), 0.3)
    b.column((0.76, -0.05), (0.76, 1.05), 9, (0.13, 0.15), scale=0.6)
    for k in range(10):
        b.rib((0.72, -0.05 + 0.1 * k), -1, 0.8, 0.017, 0.9)
    b.bone(Ellipse((0.15, 0.25), 0.07, 0.2, 0.1), 0.007, 0.4)
    b.flat("rib", (0.23, 0.35), (0.3, 1.0), 0.017, 0.08)


def abdomen(b: Body) -> None:
    b.soft(Box((0.425, 0.52), 0.42, 0.56, 0.0, 0.2), 0.45)
    b.soft(Ellipse((0.2, 0.2), 0.17, 0.14), 0.05)  # liver
    for s in (-1, 1):
        b.soft(Ellipse((0.425 + s * 0.14, 0.34), 0.045, 0.08, s * 0.3), 0.05)  # kidneys
        b.rib((0.425 + s * 0.06, -0.1), s, 0.4, 0.009, 0.5)
        b.bone(Ellipse((0.425 + s * 0.26, 0.95), 0.15, 0.12, s * 0.4), 0.01, 0.6)
    b.column((0.425, 0.12), (0.425, 0.76), 5, (0.12, 0.13), scale=0.65)
    b.bone(Box((0.425, 0.93), 0.08, 0.1, 0.0, 0.03), 0.01, 0.6)
    n_gas = int(b.rng.integers(8, 20))
    for _ in range(n_gas):
        c = (0.425 + b.jitter(0.3), 0.55 + b.jitter(0.3))
        b.air(Ellipse(c, 0.015 + abs(b.jitter(0.035)), 0.012 + abs(b.jitter(0.025)), b.jitter(3)), 0.22, 0.01)


def _spine_region(b: Body, n: int, w: tuple[float, float], aspect: float, bend_lat: float) -> list[Point]:
    cx = aspect / 2
    if b.lateral:
        return b.column((cx, 0.05), (cx, 0.95), n, w, bend=bend_lat + b.jitter(0.01))
    return b.column((cx, 0.05), (cx, 0.95), n, w, bend=b.jitter(0.02))


def cervical_spine(b: Body) -> None:
    b.soft(Capsule((0.35, -0.1), (0.35, 1.1), 0.27), 0.3)
    if b.lateral:
        b.air(Capsule((0.58, 0.3), (0.55, 1.1), 0.03), 0.15)
        b.bone(Minus(Ellipse((0.3, -0.05), 0.4, 0.2), Ellipse((0.3, -0.1), 0.36, 0.18)), 0.02, 0.8)
        b.bone(Union((Arc((0.55, 0.05), 0.2, 0.025, math.pi / 2 - 0.3, 0.7),)), 0.008, 0.8)  # mandible
        b.column((0.38, 0.22), (0.4, 0.95), 7, (0.13, 0.14), bend=-0.06)
    else:
        b.air(Capsule((0.35, 0.4), (0.35, 1.1), 0.025), 0.15)
        b.bone(Arc((0.35, -0.1), 0.25, 0.03, math.pi / 2, 1.2), 0.01, 0.9)  # mandible
        b.column((0.35, 0.25), (0.35, 0.95), 6, (0.17, 0.2))
        b.bone(Minus(Ellipse((0.35, 0.16), 0.12, 0.05), Ellipse((0.35, 0.16), 0.05, 0.025)), 0.008, 0.8)


def thoracic_spine(b: Body) -> None:
    b.soft(Box((0.275, 0.5), 0.3, 0.6, 0.0, 0.1), 0.45)
    if not b.lateral:
        for s in (-1, 1):
            b.air(Ellipse((0.275 + s * 0.2, 0.5), 0.12, 0.55), 0.2)
    cs = _spine_region(b, 11, (0.11, 0.14), 0.55, 0.06)
    for (x, y) in cs:
        if b.lateral:
            b.rib((x + 0.04, y), -1, 0.35, 0.007, 0.4, rise=0.95)
        else:
            for s in (-1, 1):
                b.rib((x + s * 0.05, y), s, 0.3, 0.009, 0.7)


def lumbar_spine(b: Body) -> None:
    b.soft(Box((0.325, 0.5), 0.35, 0.6, 0.0, 0.1), 0.45)
    if b.lateral:
        b.column((0.33, 0.07), (0.35, 0.85), 5, (0.22, 0.24), bend=-0.07)
        b.bone(Box((0.38, 0.98), 0.12, 0.07, 0.5, 0.03), 0.012)
    else:
        b.column((0.325, 0.07), (0.325, 0.78), 5, (0.2, 0.23), bend=b.jitter(0.02))
        for s in (-1, 1):
            b.bone(Ellipse((0.325 + s * 0.3, 0.98), 0.16, 0.14, s * 0.4), 0.012, 0.7)
            b.rib((0.325 + s * 0.1, -0.02), s, 0.3, 0.01, 0.6)
        b.bone(Box((0.325, 0.96), 0.1, 0.08, 0.0, 0.03), 0.012, 0.8)


def spine(b: Body) -> None:
    if b.realistic and not b.lateral:
        _full_spine(b)
        return
    b.soft(Box((0.19, 0.5), 0.2, 0.6), 0.4)
    bend = (0.03 if b.lateral else 0.0) + b.jitter(0.04)
    cs = b.column((0.19, 0.03), (0.19, 0.88), 24, (0.04, 0.085), bend=bend, gap=0.3)
    if not b.lateral:
        for (x, y) in cs[7:19]:
            for s in (-1, 1):
                b.rib((x + s * 0.025, y), s, 0.13, 0.004, 0.55)
        for s in (-1, 1):
            b.bone(Ellipse((0.19 + s * 0.12, 0.93), 0.08, 0.07, s * 0.4), 0.006, 0.6)
    b.bone(Box((0.19 + bend * 0.2, 0.92), 0.045, 0.04, 0.0, 0.015), 0.006, 0.8)


def _full_spine(b: Body) -> None:
    """A standing full-length AP spine (scoliosis film): trunk from the neck to the pelvis,
    lungs, rib cage, clavicles and iliac wings around a column that is often curved."""
    cx = 0.19
    wide = 1.0 + b.jitter(0.15)
    b.soft(Box((cx, 0.55), 0.38 * wide, 0.62, 0.0, 0.12), 0.5)
    b.soft(Capsule((cx, -0.1), (cx, 0.05), 0.07), 0.3)  # neck
    top = 0.02 + b.jitter(0.02)
    # on a standing full-length film the lungs are dark grey behind the rib cage (not black), the
    # ribs cross the whole lung fields, and the column is only moderately brighter than the trunk
    for s in (-1, 1):
        b.air(Union((Ellipse((cx + s * 0.12 * wide, 0.3), 0.09 * wide, 0.2),
                     Ellipse((cx + s * 0.13 * wide, 0.44), 0.085 * wide, 0.07))), 0.2 + b.jitter(0.08))
    b.soft(Ellipse((cx + 0.03, 0.4), 0.07 * wide, 0.07), 0.15)  # heart over the left lung base
    scol = b.rng.random() < 0.75
    bend = b.jitter(0.11) if scol else b.jitter(0.015)
    cs = b.column((cx, top), (cx + b.jitter(0.02), 0.84), 22, (0.035, 0.075), bend=bend, gap=0.28,
                  scale=float(b.rng.uniform(0.45, 0.75)))
    rib_scale = float(b.rng.uniform(0.6, 0.95))
    for (x, y) in cs[4:17]:
        for s in (-1, 1):
            b.rib((x + s * 0.02, y - 0.01), s, 0.25 * wide, 0.0065, rib_scale, rise=0.85)
    for s in (-1, 1):
        b.bone(Capsule((cx + s * 0.03, 0.09), (cx + s * 0.2 * wide, 0.065), 0.011), 0.005)  # clavicles
        b.bone(Ellipse((cx + s * 0.27 * wide, 0.2), 0.04, 0.11, s * 0.3), 0.005, 0.4)  # scapulae
        b.bone(Ellipse((cx + s * 0.15 * wide, 0.94), 0.14 * wide, 0.1, s * 0.5), 0.008, 0.35)  # iliac wings
        b.bone(Ellipse((cx + s * 0.18 * wide, 1.07), 0.04, 0.04), 0.006, 0.5)  # femoral heads
    b.bone(Box((cx, 0.94), 0.05, 0.05, 0.0, 0.015), 0.006, 0.5)  # sacrum
    for _ in range(int(b.rng.integers(8, 22))):  # bowel gas
        c = (cx + b.jitter(0.16), 0.72 + b.jitter(0.12))
        b.air(Ellipse(c, 0.01 + abs(b.jitter(0.025)), 0.008 + abs(b.jitter(0.018)), b.jitter(3)), 0.25, 0.01)
    b.flat("vertebra", cs[11], (0.0, 1.0), 0.02, 0.06)


def _cephalogram(b: Body) -> None:
    """A lateral cephalogram: vault, face (orbit, maxilla, teeth, mandible) to the right,
    upper cervical spine, airway, and the head holder's ear rod and nasion bar."""
    big = 1.0 + b.jitter(0.06)
    c = (0.5, 0.4)
    b.soft(Ellipse(c, 0.47 * big, 0.41 * big), 0.3)
    b.soft(Ellipse((0.85, 0.66), 0.2, 0.28, 0.2), 0.28)  # face
    b.soft(Capsule((0.52, 0.8), (0.46, 1.2), 0.2), 0.35)  # neck
    # seen from the side the beam crosses both parietal tables: the whole vault is bright, not
    # a bright ring around a grey brain (real cephalograms, measured by bench/synth_to_real.py)
    vault = Minus(Ellipse(c, 0.43 * big, 0.36 * big), Ellipse((0.72, 0.62), 0.12, 0.1))
    b.bone(vault, 0.025, 0.8, medulla=float(b.rng.uniform(0.2, 0.4)))
    b.dense(vault, float(b.rng.uniform(1.0, 1.6)), edge_px=6.0)  # smooth: the tables, not trabeculae
    for k in range(int(b.rng.integers(2, 5))):  # vascular grooves and sutures: darker lines in the vault
        a0 = b.rng.uniform(-2.6, -0.6)
        b.gap(Arc(c, (0.2 + 0.05 * k) * big, 0.004, a0, b.rng.uniform(0.2, 0.5)), 0.25)
    b.dense(Capsule((0.3, 0.58), (0.68, 0.5), 0.03), 0.5)  # skull base
    b.dense(Minus(Ellipse((0.55, 0.5), 0.04, 0.03), Ellipse((0.55, 0.48), 0.028, 0.02)), 0.5)  # sella
    b.dense(Minus(Ellipse((0.83, 0.45), 0.07, 0.07), Ellipse((0.83, 0.45), 0.055, 0.055)), 0.4)  # orbit
    b.bone(Union((Ellipse((0.84, 0.62), 0.1, 0.07), Capsule((0.9, 0.5), (0.97, 0.66), 0.02),
                  Ellipse((0.8, 0.5), 0.1, 0.08))), 0.01, 1.0, medulla=0.6)  # maxilla, zygoma
    b.air(Ellipse((0.82, 0.6), 0.05, 0.035), 0.2)  # maxillary sinus
    for row, y in ((0, 0.71), (1, 0.755)):
        for k in range(6):
            b.dense(Box((0.76 + 0.033 * k, y), 0.013, 0.022, 0.2 * (row - 0.5)), 0.8)  # teeth
    chin = (0.9 + b.jitter(0.02), 0.88 + b.jitter(0.02))
    b.bone(Union((Capsule((0.6, 0.56), (0.62, 0.8), 0.03), Capsule((0.62, 0.8), chin, 0.032),
                  Ellipse(chin, 0.04, 0.045))), 0.012)  # mandible
    b.air(Capsule((0.66, 0.72), (0.6, 1.1), 0.022), 0.25)  # airway
    b.column((0.5, 0.74), (0.47, 1.15), 5, (0.09, 0.1), bend=-0.02, scale=1.0)
    b.dense(Minus(Ellipse((0.46, 0.56), 0.03, 0.03), Ellipse((0.46, 0.56), 0.018, 0.018)), 1.2)  # ear rod
    b.dense(Box((0.93, 0.15), 0.012, 0.17), 1.2)  # nasion bar
    b.flat("vault", (0.45, 0.09), (1.0, 0.0), 0.02, 0.08)


def skull(b: Body) -> None:
    if b.lateral and b.realistic:
        _cephalogram(b)
        return
    if b.lateral:
        c = (0.55, 0.45)
        b.soft(Ellipse(c, 0.5, 0.43), 0.25)
        b.bone(Ellipse(c, 0.46, 0.38), 0.035, 0.9, medulla=0.04)
        b.air(Union((Ellipse((0.95, 0.42), 0.04, 0.03), Ellipse((0.88, 0.62), 0.06, 0.05))), 0.25)
        b.dense(Minus(Ellipse((0.55, 0.52), 0.05, 0.035), Ellipse((0.55, 0.5), 0.035, 0.025)), 0.5)  # sella
        b.bone(Arc((0.75, 0.6), 0.25, 0.025, math.radians(110), 0.6), 0.01)  # mandible
        b.dense(Capsule((0.35, 0.62), (0.6, 0.57), 0.02), 0.45)  # skull base
        b.flat("vault", (0.45, 0.09), (1.0, 0.0), 0.02, 0.08)
        return
    c = (0.425, 0.45)
    b.soft(Ellipse(c, 0.4, 0.47), 0.25)
    b.bone(Ellipse((0.425, 0.42), 0.36, 0.42), 0.032, 0.9, medulla=0.04)
    for s in (-1, 1):
        o = (0.425 + s * 0.13, 0.5)
        b.dense(Minus(Ellipse(o, 0.085, 0.075), Ellipse(o, 0.07, 0.06)), 0.35)  # orbit rims
        b.dense(Capsule((0.425 + s * 0.05, 0.6), (0.425 + s * 0.33, 0.55), 0.015), 0.3)  # petrous ridges
    b.air(Union((Ellipse((0.425, 0.66), 0.04, 0.07), Ellipse((0.425, 0.36), 0.06, 0.03))), 0.2)
    b.bone(Arc((0.425, 0.58), 0.25, 0.028, math.pi / 2, 1.05), 0.01)  # mandible
    for k in range(10):
        x = 0.425 + (k - 4.5) * 0.025
        b.dense(Box((x, 0.76), 0.009, 0.02), 0.5)
    b.flat("vault", (0.2, 0.2), (0.5, -1.0), 0.025, 0.08)


def paranasal_sinuses(b: Body) -> None:
    c = 0.425
    b.soft(Ellipse((c, 0.5), 0.42, 0.6), 0.3)
    b.bone(Ellipse((c, 0.35), 0.4, 0.5), 0.03, 0.8, medulla=0.12)
    for s in (-1, 1):
        o = (c + s * 0.14, 0.3)
        b.air(Ellipse(o, 0.08, 0.07), 0.12)
        b.dense(Minus(Ellipse(o, 0.1, 0.09), Ellipse(o, 0.08, 0.07)), 0.45)
        m = (c + s * 0.14, 0.55)
        b.air(Ellipse(m, 0.09, 0.11, s * 0.2), 0.3 * (0.4 if b.rng.random() < 0.15 else 1.0))
        b.dense(Minus(Ellipse(m, 0.1, 0.12, s * 0.2), Ellipse(m, 0.09, 0.11, s * 0.2)), 0.35)
        b.dense(Capsule((c + s * 0.24, 0.5), (c + s * 0.4, 0.45), 0.018), 0.4)  # zygomatic arch
    b.air(Union((Ellipse((c - 0.04, 0.12), 0.05, 0.04), Ellipse((c + 0.04, 0.13), 0.045, 0.035))), 0.3)
    b.air(Box((c, 0.55), 0.035, 0.12, 0.0, 0.02), 0.2)
    b.dense(Capsule((c, 0.42), (c, 0.67), 0.005), 0.4)  # septum
    b.bone(Arc((c, 0.55), 0.3, 0.03, math.pi / 2, 1.0), 0.01)  # mandible
    for k in range(12):
        b.dense(Box((c + (k - 5.5) * 0.028, 0.75), 0.01, 0.025), 0.5)
    b.flat("maxilla", (c + 0.14, 0.55), (0.0, 1.0), 0.02, 0.06)


def patella(b: Body) -> None:
    if b.lateral:
        b.soft(Capsule((0.5, -0.1), (0.5, 1.1), 0.42), 0.26)
        b.long_bone((None, None), (0.5, 0.62), (0.3, -0.1), 0.08, ("knob", "cut"), (0.2, 0.0))
        b.long_bone((None, None), (0.55, 0.82), (0.55, 1.1), 0.08, ("plateau", "cut"), (0.18, 0.0))
        b.bone(Union((Ellipse((0.8, 0.46), 0.06, 0.15, 0.2), Ellipse((0.82, 0.6), 0.03, 0.05))), 0.012)
        b.flat("patella", (0.8, 0.46), (0.0, 1.0), 0.05, 0.15)
        return
    b.soft(Ellipse((0.625, 0.6), 0.6, 0.45), 0.26)
    b.bone(Union((Ellipse((0.42, 0.8), 0.22, 0.25), Ellipse((0.83, 0.8), 0.22, 0.25),
                  Box((0.625, 0.9), 0.3, 0.15, 0.0, 0.05))), 0.012)
    b.gap(Ellipse((0.625, 0.56), 0.05, 0.04), 0.4)
    pat = Union((Ellipse((0.6, 0.36), 0.2, 0.075, -0.08), Ellipse((0.62, 0.42), 0.07, 0.05)))
    b.bone(pat, 0.014)
    b.flat("patella", (0.6, 0.37), (1.0, 0.0), 0.07, 0.2)


# -- the region table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """How one anatomical region is drawn and labelled.

    :param aspect: field width / height (the long side of the image is ``image_size``).
    :param views: view positions the region is imaged in (the first is the most common).
    :param paired: a limb region with left/right laterality (left images are mirrored).
    :param body_part: DICOM Body Part Examined defined term (PS3.16 CID 4031).
    :param field_mm: height of the field of view in millimetres (for Pixel Spacing).
    """

    name: str
    draw: Callable[[Body], None]
    aspect: float
    views: tuple[str, ...]
    paired: bool
    body_part: str
    field_mm: float
    lateral_aspect: float | None = None


REGIONS: dict[str, Region] = {r.name: r for r in (
    Region("abdomen", abdomen, 0.85, ("AP",), False, "ABDOMEN", 420),
    Region("ankle", ankle, 0.75, ("AP", "LAT"), True, "ANKLE", 200),
    Region("calcaneus", calcaneus, 1.2, ("LAT", "OBL"), True, "CALCANEUS", 130, 1.2),
    Region("cervical spine", cervical_spine, 0.7, ("LAT", "AP"), False, "CSPINE", 220),
    Region("clavicle", clavicle, 1.5, ("AP",), True, "CLAVICLE", 200),
    Region("elbow", elbow, 0.8, ("AP", "LAT"), True, "ELBOW", 200),
    Region("femur", femur, 0.5, ("AP", "LAT"), True, "FEMUR", 480),
    Region("finger", finger, 0.45, ("PA", "LAT"), True, "FINGER", 110),
    Region("foot", foot, 0.65, ("AP", "OBL"), True, "FOOT", 260),
    Region("forearm", forearm, 0.5, ("AP", "LAT"), True, "FOREARM", 330),
    Region("hand", hand, 0.8, ("PA", "OBL"), True, "HAND", 240),
    Region("hip", hip, 1.0, ("AP", "LAT"), True, "HIP", 260),
    Region("humerus", humerus, 0.5, ("AP", "LAT"), True, "HUMERUS", 400),
    Region("knee", knee, 0.8, ("AP", "LAT"), True, "KNEE", 240),
    Region("lower leg", lower_leg, 0.5, ("AP", "LAT"), True, "LEG", 440),
    Region("lumbar spine", lumbar_spine, 0.65, ("AP", "LAT"), False, "LSPINE", 350),
    Region("paranasal sinuses", paranasal_sinuses, 0.85, ("PA",), False, "SINUS", 220),
    Region("patella", patella, 1.25, ("AP", "LAT"), True, "PATELLA", 150, 0.8),
    Region("pelvis", pelvis, 1.3, ("AP",), False, "PELVIS", 330),
    Region("ribs", ribs, 0.8, ("OBL", "AP"), True, "RIB", 380),
    Region("sacrum", sacrum, 0.8, ("AP", "LAT"), False, "SSPINE", 250),
    Region("shoulder", shoulder, 1.0, ("AP",), True, "SHOULDER", 260),
    Region("skull", skull, 0.85, ("PA", "LAT"), False, "SKULL", 280, 1.15),
    Region("spine", spine, 0.38, ("AP", "LAT"), False, "SPINE", 900),
    Region("thoracic spine", thoracic_spine, 0.55, ("AP", "LAT"), False, "TSPINE", 430),
    Region("thorax", thorax, 1.0, ("PA", "LAT"), False, "CHEST", 430),
    Region("whole leg", whole_leg, 0.33, ("AP",), True, "LOWER LIMB", 1100),
    Region("wrist", wrist, 0.8, ("PA", "LAT"), True, "WRIST", 160),
)}


def region_aspect(region: Region, view: str) -> float:
    if view == "LAT" and region.lateral_aspect is not None:
        return region.lateral_aspect
    if region.name == "calcaneus" and view == "OBL":
        return 0.7
    return region.aspect


def draw_region(body: Body, region: str) -> None:
    """Draw ``region`` with ``body``; its anchors end up in ``body.anchors``."""
    REGIONS[region].draw(body)


@cache
def region_anchors(region: str, view: str | None = None) -> tuple[Anchor, ...]:
    """Anchors of ``region`` for a typical adult (geometry only, nothing is drawn)."""
    spec = REGIONS[region]
    body = Body(None, np.random.default_rng(0), view or spec.views[0], age=40.0)
    spec.draw(body)
    return tuple(body.anchors.values())


def find_anchor(anchors: dict[str, Anchor], name: str, position: BonePosition | None) -> Anchor:
    """``anchors[name]``, or where this patient's anatomy lacks it (a thumb has no middle
    phalanx) the first anchor by name that hosts ``position``."""
    if name in anchors:
        return anchors[name]
    for key in sorted(anchors):
        if position is None or anchors[key].hosts(position):
            return anchors[key]
    raise KeyError(f"no bone can carry a lesion at {position} (wanted {name!r})")


def can_host(region: str, position: BonePosition) -> bool:
    """Whether every view of ``region`` shows a bone that can carry a lesion at ``position``."""
    spec = REGIONS[region]
    return all(any(a.hosts(position) for a in region_anchors(region, v)) for v in spec.views)


def host_anchor_names(region: str, position: BonePosition) -> list[str]:
    """Names of the anchors that host ``position`` in every view of ``region``.

    In :data:`FLAT_BONE_REGIONS` the lesion goes into the flat bone (a pelvic chondrosarcoma
    sits in the ilium, not the femur in the same field); elsewhere long bones come first and
    flat ones are used only when no long bone fits.
    """
    spec = REGIONS[region]
    names: set[str] | None = None
    for v in spec.views:
        here = {a.name for a in region_anchors(region, v) if a.hosts(position)}
        names = here if names is None else names & here
    flat = {a.name for a in region_anchors(region) if a.flat}
    names = names or set()
    if region in FLAT_BONE_REGIONS and names & flat:
        return sorted(names & flat)
    return sorted(names - flat) or sorted(names)


#: regions whose lesions sit in a flat bone even where a long bone is in the field.
FLAT_BONE_REGIONS = frozenset({
    "abdomen", "cervical spine", "lumbar spine", "paranasal sinuses", "pelvis", "ribs", "sacrum",
    "skull", "spine", "thoracic spine", "thorax", "calcaneus", "patella",
})
