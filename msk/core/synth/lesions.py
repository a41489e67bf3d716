"""Bone-tumour lesions: where a lesion sits on its bone, and how its drawing is placed.

Each entity is drawn by the lesion drawer a plugin registers for it (hook
``msk_lesion_drawers``, :class:`~msk.core.specs.LesionDrawer`; the built-in drawings of the
``bone-tumours`` set are :mod:`msk.plugins.lesion_drawings`). A drawer draws in the *local
frame* of its host bone (:class:`Frame`): ``along`` runs down the shaft away from the joint,
``across`` points to one cortex, and lengths are in units of the local bone half width ``r``,
so a lesion scales with the bone it sits in (a phalanx or a femur).

Everything that belongs to the lesion also marks the canvas's lesion mask, from which the
bounding box is taken.

**Real outlines.** Where the BTXRD annotations are found (``../shared/data/btxrd-meta/annotations``
next to the repository or the working directory; the environment variable
``MSK_LESION_OUTLINES`` = ``drawn`` turns this off, or names another folder of LabelMe files),
each lesion takes the outline of a real tumour: one BTXRD polygon of its entity
(the drawer's ``outlines``, :data:`BTXRD_OUTLINES`; by default the polygons of BTXRD's benign
tumours), chosen and mirrored by the lesion's own generator (so a patient's
lesion keeps its outline in every image). The polygon, normalised to its principal axes, is
placed on the lesion's site: its long axis along the bone, stretched over the extent that the
entity's drawing covers there. The drawing is then cut to the polygon, a faint change of density
fills it, and the lesion mask is exactly the polygon.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from msk.core.specs import BTXRD_BENIGN_OUTLINES, BonePosition, LesionDrawer
from msk.core.synth.canvas import Canvas, Capsule, Ellipse, Minus, Point, Polygon, Shape
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


# -- the drawers -------------------------------------------------------------------------------

Draw = Callable[[Canvas, Frame, np.random.Generator], None]

#: drawers handed to a worker process (:func:`preload_drawers`); others come from the registry.
_PRELOADED: dict[str, LesionDrawer] = {}


def drawer_for(entity: str) -> LesionDrawer:
    """The registered :class:`~msk.core.specs.LesionDrawer` of ``entity`` (hook
    ``msk_lesion_drawers``); an :class:`~msk.core.registry.UnknownComponentError` lists the
    drawable entities."""
    if entity in _PRELOADED:
        return _PRELOADED[entity]
    from msk.core.registry import lesion_drawer

    return lesion_drawer(entity)


def drawable() -> list[str]:
    """Names of the entities some plugin draws."""
    from msk.core.registry import get_registry

    return sorted({*get_registry().names("lesion_drawer"), *_PRELOADED})


def preload_drawers(drawers: Mapping[str, LesionDrawer]) -> None:
    """Hand already resolved drawers to this process (synthesis workers then never load the
    plugin registry, and see drawers registered at run time in the parent)."""
    _PRELOADED.update(drawers)


class _DrawerView(Mapping[str, Any]):
    """Read-only view of the registered drawers: entity name -> one field of its drawer."""

    def __init__(self, field: str):
        self._field = field

    def __getitem__(self, entity: str) -> Any:
        if entity not in drawable():
            raise KeyError(entity)
        return getattr(drawer_for(entity), self._field)

    def __iter__(self) -> Iterator[str]:
        return iter(drawable())

    def __len__(self) -> int:
        return len(drawable())


#: entity name -> drawing, the registry's view (built-ins: :mod:`msk.plugins.lesion_drawers`).
LESIONS: Mapping[str, Draw] = _DrawerView("draw")

# -- real tumour outlines (BTXRD polygons) ------------------------------------------------------

#: entity -> BTXRD shape labels whose polygons outline it (each drawer's ``outlines``).
BTXRD_OUTLINES: Mapping[str, tuple[str, ...]] = _DrawerView("outlines")
#: outlines of the entities whose drawer names none of its own (benign and intermediate ones).
BTXRD_BENIGN = BTXRD_BENIGN_OUTLINES
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
    from msk.core.data.roi import RoiError, read_labelme

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
    labels = drawer_for(entity).outlines
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
    drawer = drawer_for(entity)
    folder = outline_folder()
    pool = outlines_for(entity, folder) if folder is not None else ()
    if not pool:
        drawer.draw(cv, frame, rng)
        return
    outline = pool[int(rng.integers(len(pool)))] * np.where(rng.random(2) < 0.5, -1.0, 1.0)
    probe = Canvas(cv.h, cv.w, cv.transform, cv.texture)
    drawer.draw(probe, frame, copy.deepcopy(rng))
    extent = _footprint(probe.mask, cv, frame)
    if extent is None:  # the drawing (nearly) misses the canvas: nothing to outline
        drawer.draw(cv, frame, rng)
        return
    a0, a1, c0, c1 = extent
    polygon = Polygon(tuple(frame.at((a0 + a1) / 2 + u * (a1 - a0) / 2, (c0 + c1) / 2 + v * (c1 - c0) / 2)
                            for u, v in outline))
    cv.clipped_to(polygon)
    try:
        if drawer.fill == "dense":  # exophytic bone
            cv.dense(polygon, rng.uniform(0.08, 0.16), lesion=True)
        else:
            cv.lucency(polygon, rng.uniform(0.1, 0.25))
        drawer.draw(cv, frame, rng)
        cv.mark(polygon)
    finally:
        cv.clipped_to(None)
