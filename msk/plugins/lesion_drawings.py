"""The built-in lesion drawings: one per entity of the ``bone-tumours`` set.

Registered as lesion drawers by :mod:`msk.plugins.lesion_drawers`; each draws in the local
:class:`~msk.core.synth.lesions.Frame` of its host bone (lengths in bone half widths, so a
lesion scales with the bone it sits in). The drawings follow the textbook radiographic signs of
each entity (Resnick; WHO 2020):

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

"""

from __future__ import annotations

import math

import numpy as np

from msk.core.synth.canvas import Arc, Canvas, Minus
from msk.core.synth.lesions import Frame


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
