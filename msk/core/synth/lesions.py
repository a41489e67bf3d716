"""Bone-tumour lesions: one drawing per entity of the ``bone-tumours`` set.

Each lesion is drawn in the *local frame* of its host bone (:class:`Frame`): ``along`` runs down
the shaft away from the joint, ``across`` points to one cortex, and lengths are in units of the
local bone half width ``r``, so a lesion scales with the bone it sits in (a phalanx or a femur).
The drawings follow the textbook radiographic signs of each entity (Resnick; WHO 2020):

=====================  =============================================================================
entity                 drawn as
=====================  =============================================================================
osteosarcoma           metaphyseal mixed lytic/sclerotic mass, sunburst spicules, Codman triangle
ewing sarcoma          diaphyseal permeative (moth-eaten) lucency, onion-skin periosteal lamellae
osteochondroma         exophytic stalk in continuity with the medulla, pointing away from the joint
enchondroma            central lucency with stippled ring-and-arc calcification
non-ossifying fibroma  eccentric cortical lucency with a sclerotic, scalloped (multilobular) rim
aneurysmal bone cyst   expansile eccentric "soap bubble" lucency with septa and a thin shell
giant cell tumour      eccentric lytic epi-metaphyseal lesion reaching subchondral bone, no rim
chondroblastoma        small round epiphyseal lucency with a thin sclerotic rim
fibrous dysplasia      ground-glass diaphyseal lesion with mild expansion and cortical thinning
chondrosarcoma         large lesion: endosteal scalloping, ring-and-arc matrix, thickened cortex
=====================  =============================================================================

Everything that belongs to the lesion also marks the canvas's lesion mask, from which the
bounding box is taken.

**Real outlines.** Where the BTXRD annotations are found (``../shared/data/btxrd-meta/annotations``
next to the repository or the working directory; the environment variable
``MSK_LESION_OUTLINES`` = ``drawn`` turns this off, or names another folder of LabelMe files),
each lesion takes the outline of a real tumour: one BTXRD polygon of its entity
(:data:`BTXRD_OUTLINES`; entities without a BTXRD class take the polygons of BTXRD's other benign
or other malignant tumours), chosen and mirrored by the lesion's own generator (so a patient's
lesion keeps its outline in every image). The polygon, normalised to its principal axes, is
placed on the lesion's site: its long axis along the bone, stretched over the extent that the
entity's drawing covers there. The drawing is then cut to the polygon, a faint change of density
fills it, and the lesion mask is exactly the polygon.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from msk.core.specs import BonePosition
from msk.core.synth.canvas import Arc, Canvas, Capsule, Ellipse, Minus, Point, Polygon, Shape
from msk.core.synth.phantoms import Anchor


@dataclass(frozen=True)
class Frame:
    """Where a lesion sits: centre ``c``, unit ``along`` (away from the joint) and ``across``
    (towards the lesion's side) vectors, local half width ``r`` and the distance ``depth`` of
    the centre from the articular surface (long bones)."""

    c: Point
    along: Point
    across: Point
    r: float
    depth: float = math.inf

    def at(self, along: float, across: float) -> Point:
        """The point ``along`` and ``across`` (units of ``r``) from the centre."""
        return (self.c[0] + (self.along[0] * along + self.across[0] * across) * self.r,
                self.c[1] + (self.along[1] * along + self.across[1] * across) * self.r)

    @property
    def angle(self) -> float:
        return math.atan2(self.along[1], self.along[0])

    def ellipse(self, along: float, across: float, half_along: float, half_across: float) -> Ellipse:
        return Ellipse(self.at(along, across), half_along * self.r, half_across * self.r, self.angle)

    def capsule(self, a: tuple[float, float], b: tuple[float, float], ra: float, rb: float | None = None) -> Capsule:
        return Capsule(self.at(*a), self.at(*b), ra * self.r, (rb if rb is not None else ra) * self.r)

    def ring(self, along: float, across: float, half_along: float, half_across: float,
             thickness: float) -> Shape:
        outer = self.ellipse(along, across, half_along + thickness, half_across + thickness)
        return Minus(outer, self.ellipse(along, across, half_along, half_across))


def frame_for(anchor: Anchor, position: BonePosition | None, side: int) -> Frame:
    """The lesion frame at ``position`` on ``anchor`` (flat bones: the anchor's centre)."""
    along = anchor.axis
    across = (-along[1] * side, along[0] * side)
    if anchor.flat or position is None:
        return Frame(anchor.tip, along, across, anchor.r)
    depth = anchor.distance(position)
    c = (anchor.tip[0] + along[0] * depth, anchor.tip[1] + along[1] * depth)
    return Frame(c, along, across, anchor.half_width(depth), depth / max(anchor.half_width(depth), 1e-6))


# -- the entities -------------------------------------------------------------------------------


def osteosarcoma(cv: Canvas, f: Frame, rng: np.random.Generator) -> None:
    length = rng.uniform(1.4, 2.4)
    cv.lucency(f.ellipse(0, 0, length, 0.9), rng.uniform(0.25, 0.5))
    for _ in range(int(rng.integers(4, 9))):
        a, c = rng.uniform(-0.8, 0.8) * length, rng.uniform(-0.7, 0.7)
        cv.dense(f.ellipse(a, c, rng.uniform(0.25, 0.6), rng.uniform(0.2, 0.45)), rng.uniform(0.15, 0.4),
                 lesion=True, edge_px=2.0)
    mass = f.ellipse(0, 1.0, length * 0.9, 0.9)
    cv.soft_tissue(mass, 0.1, edge=0.6 * f.r)
    cv.mark(mass)
    for _ in range(int(rng.integers(10, 20))):  # sunburst: spicules radiating through the cortex
        a = rng.uniform(-0.8, 0.8) * length
        base = (a, 0.85)
        out = rng.uniform(0.6, 1.4)
        tip = (a * (1 + 0.25 * out), 0.85 + out)
        cv.dense(f.capsule(base, tip, 0.06, 0.03), rng.uniform(0.35, 0.6), lesion=True)
    for s in (-1, 1):  # Codman triangle at the edges of the periosteal reaction
        a = s * length * 0.95
        cv.dense(f.capsule((a, 1.0), (a + s * 0.5, 1.35), 0.04), 0.45, lesion=True)


def ewing_sarcoma(cv: Canvas, f: Frame, rng: np.random.Generator) -> None:
    length = rng.uniform(2.5, 4.0)
    for _ in range(int(rng.integers(40, 80))):  # permeative, moth-eaten holes
        a, c = rng.uniform(-1, 1) * length, rng.uniform(-0.95, 0.95)
        cv.lucency(f.ellipse(a, c, rng.uniform(0.08, 0.2), rng.uniform(0.06, 0.14)), rng.uniform(0.5, 0.9))
    cv.lucency(f.ellipse(0, 0, length, 0.9), 0.2)
    for side in (-1, 1):  # onion-skin lamellae parallel to the cortex
        for k in range(int(rng.integers(2, 5))):
            off = side * (1.1 + 0.17 * k)
            cv.dense(f.capsule((-length * 0.85, off), (length * 0.85, off), 0.05), 0.45 - 0.06 * k, lesion=True)
    mass = f.ellipse(0, 1.2, length * 0.8, 0.8)
    cv.soft_tissue(mass, 0.07, edge=0.6 * f.r)
    cv.mark(mass)


def osteochondroma(cv: Canvas, f: Frame, rng: np.random.Generator) -> None:
    tilt = math.radians(rng.uniform(25, 55))  # points along the shaft, away from the joint
    length = rng.uniform(1.4, 2.6)
    base = (0.0, 0.75)
    tip = (base[0] + length * math.sin(tilt), base[1] + length * math.cos(tilt))
    cv.replace(f.ellipse(0.0, 0.8, 0.55, 0.3), 0.36, lesion=True)  # cortex opens into the stalk
    stalk = Minus(f.capsule(base, tip, 0.6, 0.35), f.ellipse(0.0, 0.0, 3.0, 0.8))
    cv.bone_part(stalk, 0.1 * f.r, 0.85, 0.4, lesion=True)
    cap = f.ellipse(tip[0], tip[1], 0.55, 0.45)
    cv.bone_part(cap, 0.06 * f.r, 0.6, 0.35, lesion=True)
    for _ in range(int(rng.integers(2, 6))):
        p = (tip[0] + rng.uniform(-0.5, 0.5), tip[1] + rng.uniform(0.1, 0.6))
        cv.dense(f.ellipse(p[0], p[1], 0.08, 0.08), 0.35, lesion=True)


def enchondroma(cv: Canvas, f: Frame, rng: np.random.Generator) -> None:
    la, lc = rng.uniform(1.0, 1.8), rng.uniform(0.55, 0.75)
    cv.lucency(f.ellipse(0, 0, la, lc), rng.uniform(0.45, 0.65))
    _ring_and_arc(cv, f, rng, la * 0.8, lc * 0.8, int(rng.integers(6, 14)), 0.1)
    for _ in range(int(rng.integers(5, 12))):  # stippled
        a, c = rng.uniform(-0.8, 0.8) * la, rng.uniform(-0.8, 0.8) * lc
        cv.dense(f.ellipse(a, c, 0.05, 0.05), rng.uniform(0.2, 0.4), lesion=True)


def non_ossifying_fibroma(cv: Canvas, f: Frame, rng: np.random.Generator) -> None:
    lobes = [(a, rng.uniform(0.55, 0.9), rng.uniform(0.32, 0.45))
             for a in np.linspace(-1.0, 1.0, int(rng.integers(2, 5))) * rng.uniform(0.7, 1.3)]
    for a, ha, hc in lobes:  # sclerotic rims first: the lobes' lucency erases the inner arcs
        cv.dense(f.ring(a, 0.6, ha, hc, 0.12), rng.uniform(0.35, 0.5), lesion=True)
    for a, ha, hc in lobes:
        cv.lucency(f.ellipse(a, 0.6, ha, hc), rng.uniform(0.55, 0.8))


def aneurysmal_bone_cyst(cv: Canvas, f: Frame, rng: np.random.Generator) -> None:
    ha, hc = rng.uniform(1.1, 1.7), rng.uniform(1.0, 1.35)
    off = rng.uniform(0.3, 0.5)
    cv.lucency(f.ellipse(0, off, ha, hc), rng.uniform(0.75, 0.95))
    cv.dense(f.ring(0, off, ha, hc, 0.06), 0.45, lesion=True)  # thin expanded shell
    for _ in range(int(rng.integers(4, 8))):  # septa: the soap bubbles
        a, c = rng.uniform(-0.6, 0.6) * ha, off + rng.uniform(-0.6, 0.6) * hc
        s = rng.uniform(0.25, 0.5)
        cv.dense(f.ring(a, c, s, s * rng.uniform(0.7, 1.0), 0.04), 0.18, lesion=True)


def giant_cell_tumour(cv: Canvas, f: Frame, rng: np.random.Generator) -> None:
    ha = min(rng.uniform(0.9, 1.3), f.depth - 0.05)  # reaches the subchondral plate
    hc = rng.uniform(0.6, 0.8)
    centre = (-(f.depth - ha - 0.05) if math.isfinite(f.depth) else 0.0, 0.3)
    cv.lucency(f.ellipse(centre[0], centre[1], ha, hc), rng.uniform(0.7, 0.9), edge_px=1.0)
    for _ in range(int(rng.integers(1, 4))):  # faint trabeculation, no sclerotic rim
        a = centre[0] + rng.uniform(-0.5, 0.5) * ha
        cv.dense(Arc(f.at(a, centre[1]), 0.4 * f.r, 0.02 * f.r, rng.uniform(0, 2 * math.pi), 0.8),
                 0.12, lesion=True)


def chondroblastoma(cv: Canvas, f: Frame, rng: np.random.Generator) -> None:
    rad = rng.uniform(0.3, 0.42)
    c = rng.uniform(-0.15, 0.25)
    cv.dense(f.ring(0, c, rad, rad * 0.9, 0.06), 0.35, lesion=True)
    cv.lucency(f.ellipse(0, c, rad, rad * 0.9), rng.uniform(0.55, 0.75))
    for _ in range(int(rng.integers(0, 4))):
        cv.dense(f.ellipse(rng.uniform(-0.5, 0.5) * rad, c + rng.uniform(-0.5, 0.5) * rad, 0.04, 0.04), 0.25,
                 lesion=True)


def fibrous_dysplasia(cv: Canvas, f: Frame, rng: np.random.Generator) -> None:
    length = rng.uniform(2.5, 4.5)
    expand = rng.uniform(1.05, 1.18)
    cv.replace(f.ellipse(0, 0, length, expand), rng.uniform(0.5, 0.62))  # ground glass
    cv.dense(f.ring(0, 0, length, expand, 0.06), 0.55, lesion=True)  # thin, expanded cortex


def chondrosarcoma(cv: Canvas, f: Frame, rng: np.random.Generator) -> None:
    length = rng.uniform(2.5, 4.0)
    cv.lucency(f.ellipse(0, 0, length, 0.85), rng.uniform(0.35, 0.55))
    for _ in range(int(rng.integers(5, 9))):  # endosteal scalloping
        a, s = rng.uniform(-0.8, 0.8) * length, rng.choice((-1.0, 1.0))
        cv.lucency(f.ellipse(a, s * 0.72, 0.3, 0.2), rng.uniform(0.5, 0.7))
    _ring_and_arc(cv, f, rng, length * 0.85, 0.7, int(rng.integers(14, 28)), 0.13)
    for s in (-1, 1):  # cortical thickening
        cv.dense(f.capsule((-length * 0.8, s * 1.02), (length * 0.8, s * 1.02), 0.1), 0.3, lesion=True)


def _ring_and_arc(cv: Canvas, f: Frame, rng: np.random.Generator, ha: float, hc: float, n: int,
                  size: float) -> None:
    """Chondroid matrix: small calcified rings and arcs inside an ellipse."""
    for _ in range(n):
        a, c = rng.uniform(-1, 1) * ha, rng.uniform(-1, 1) * hc
        radius = rng.uniform(0.6, 1.3) * size * f.r
        arc = Arc(f.at(a, c), radius, max(0.22 * radius, 1e-4), rng.uniform(0, 2 * math.pi),
                  rng.uniform(1.0, 2.8))
        cv.dense(arc, rng.uniform(0.3, 0.5), lesion=True)


Draw = Callable[[Canvas, Frame, np.random.Generator], None]

#: entity name (as in the ``bone-tumours`` set) -> drawing.
LESIONS: dict[str, Draw] = {
    "aneurysmal bone cyst": aneurysmal_bone_cyst,
    "chondroblastoma": chondroblastoma,
    "chondrosarcoma": chondrosarcoma,
    "enchondroma": enchondroma,
    "ewing sarcoma": ewing_sarcoma,
    "fibrous dysplasia": fibrous_dysplasia,
    "giant cell tumour": giant_cell_tumour,
    "non-ossifying fibroma": non_ossifying_fibroma,
    "osteochondroma": osteochondroma,
    "osteosarcoma": osteosarcoma,
}

# -- real tumour outlines (BTXRD polygons) ------------------------------------------------------

#: entity -> BTXRD shape labels whose polygons outline it.
BTXRD_OUTLINES: dict[str, tuple[str, ...]] = {
    "osteochondroma": ("osteochondroma", "multiple osteochondromas"),
    "giant cell tumour": ("giant cell tumor",),
    "osteosarcoma": ("osteosarcoma",),
    "ewing sarcoma": ("osteosarcoma", "other mt"),
    "chondrosarcoma": ("osteosarcoma", "other mt"),
}
#: outlines of the other (benign and intermediate) entities.
BTXRD_BENIGN = ("simple bone cyst", "osteofibroma", "other bt")
OUTLINES_ENV = "MSK_LESION_OUTLINES"
ANNOTATIONS_RELATIVE = Path("..") / "shared" / "data" / "btxrd-meta" / "annotations"
MAX_VERTICES = 48
#: lesions covering fewer pixels keep their drawn outline.
MIN_OUTLINE_PIXELS = 24


def outline_folder() -> Path | None:
    """The folder of LabelMe outlines to use, or ``None`` (drawn outlines); see the module doc."""
    from msk.core.errors import ConfigError

    setting = os.environ.get(OUTLINES_ENV, "auto").strip()
    if setting == "drawn":
        return None
    if setting not in ("", "auto"):
        if not Path(setting).is_dir():
            raise ConfigError(f"{OUTLINES_ENV}={setting}: not a folder; use auto, drawn or a folder of LabelMe files")
        return Path(setting).resolve()
    repo = Path(__file__).resolve().parents[3]
    for base in (repo, Path.cwd()):
        candidate = (base / ANNOTATIONS_RELATIVE).resolve()
        if candidate.is_dir():
            return candidate
    return None


def normalise_outline(points: np.ndarray) -> np.ndarray | None:
    """A polygon in its principal axes (long axis first), each axis scaled to [-1, 1], at most
    :data:`MAX_VERTICES` vertices; ``None`` for a degenerate one."""
    pts = np.asarray(points, np.float64)
    if len(pts) > MAX_VERTICES:
        pts = pts[np.linspace(0, len(pts), MAX_VERTICES, endpoint=False).astype(int)]
    centred = pts - pts.mean(axis=0)
    _, vectors = np.linalg.eigh(np.cov(centred.T))
    local = centred @ vectors[:, ::-1]  # largest variance first
    lo, hi = local.min(axis=0), local.max(axis=0)
    if np.any(hi - lo < 1e-6):
        return None
    return (local - (lo + hi) / 2) / ((hi - lo) / 2)


@lru_cache(maxsize=2)
def outline_library(folder: str) -> dict[str, tuple[np.ndarray, ...]]:
    """BTXRD shape label -> normalised polygons of every LabelMe file in ``folder`` (sorted)."""
    from msk.core.roi import RoiError, read_labelme

    library: dict[str, list[np.ndarray]] = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            ann = read_labelme(path)
        except RoiError:
            continue
        for label, pts in ann.polygons:
            outline = normalise_outline(np.asarray(pts))
            if outline is not None:
                library.setdefault(label.strip().lower(), []).append(outline)
    return {k: tuple(v) for k, v in sorted(library.items())}


def outlines_for(entity: str, folder: Path) -> tuple[np.ndarray, ...]:
    library = outline_library(str(folder))
    labels = BTXRD_OUTLINES.get(entity, BTXRD_BENIGN)
    return tuple(o for label in labels for o in library.get(label, ()))


def _footprint(mask: np.ndarray, cv: Canvas, f: Frame) -> tuple[float, float, float, float] | None:
    """Extent ``(along_lo, along_hi, across_lo, across_hi)`` of ``mask`` in frame units."""
    rows, cols = np.nonzero(mask)
    if rows.size < MIN_OUTLINE_PIXELS:  # too few pixels to carry an outline
        return None
    t = cv.transform
    c = np.asarray(t.point(f.c))
    basis = np.column_stack([np.asarray(t.point(f.at(1, 0))) - c, np.asarray(t.point(f.at(0, 1))) - c])
    if abs(np.linalg.det(basis)) < 1e-9:
        return None
    along, across = np.linalg.solve(basis, np.stack([cols + 0.5 - c[0], rows + 0.5 - c[1]]))
    return float(along.min()), float(along.max()), float(across.min()), float(across.max())


def draw_lesion(cv: Canvas, entity: str, frame: Frame, rng: np.random.Generator) -> None:
    """Draw ``entity`` at ``frame``: inside a real BTXRD outline where one is available (see the
    module doc), else as drawn."""
    folder = outline_folder()
    pool = outlines_for(entity, folder) if folder is not None else ()
    if not pool:
        LESIONS[entity](cv, frame, rng)
        return
    outline = pool[int(rng.integers(len(pool)))] * np.where(rng.random(2) < 0.5, -1.0, 1.0)
    probe = Canvas(cv.h, cv.w, cv.transform, cv.texture)
    LESIONS[entity](probe, frame, copy.deepcopy(rng))
    extent = _footprint(probe.mask, cv, frame)
    if extent is None:  # the drawing (nearly) misses the canvas: nothing to outline
        LESIONS[entity](cv, frame, rng)
        return
    a0, a1, c0, c1 = extent
    polygon = Polygon(tuple(frame.at((a0 + a1) / 2 + u * (a1 - a0) / 2, (c0 + c1) / 2 + v * (c1 - c0) / 2)
                            for u, v in outline))
    cv.clipped_to(polygon)
    try:
        if entity == "osteochondroma":  # exophytic bone
            cv.dense(polygon, rng.uniform(0.08, 0.16), lesion=True)
        else:
            cv.lucency(polygon, rng.uniform(0.1, 0.25))
        LESIONS[entity](cv, frame, rng)
        cv.mark(polygon)
    finally:
        cv.clipped_to(None)
