"""Built-in lesion drawers: how ``msk synth`` draws the 10 entities of the ``bone-tumours`` set.

The drawings live in :mod:`msk.plugins.lesion_drawings`, imported on the first drawing only, so
that listing plugins stays cheap. Each drawer also names the BTXRD shape labels whose real
outlines its lesions take (entities without a BTXRD class take BTXRD's other malignant or
benign tumours) and, for the three entities BTXRD has, the ``dataset.csv`` column whose rows
give the joint (age, sex, site) prior.
"""

from __future__ import annotations

import functools
from typing import Any

from msk.core.hookspecs import hookimpl
from msk.core.specs import LesionDrawer


def _draw(function: str, cv: Any, frame: Any, rng: Any) -> None:
    from msk.plugins import lesion_drawings

    getattr(lesion_drawings, function)(cv, frame, rng)


def _drawer(name: str, description: str, **fields: Any) -> LesionDrawer:
    function = name.replace(" ", "_").replace("-", "_")
    return LesionDrawer(name, functools.partial(_draw, function), description=description, **fields)


_MALIGNANT_OUTLINES = ("osteosarcoma", "other mt")

LESION_DRAWERS = (
    _drawer("aneurysmal bone cyst", 'expansile eccentric "soap bubble" lucency with septa and a thin shell'),
    _drawer("chondroblastoma", "small round epiphyseal lucency with a thin sclerotic rim"),
    _drawer("chondrosarcoma", "endosteal scalloping, ring-and-arc matrix, thickened cortex",
            outlines=_MALIGNANT_OUTLINES),
    _drawer("enchondroma", "central lucency with stippled ring-and-arc calcification"),
    _drawer("ewing sarcoma", "diaphyseal permeative lucency, onion-skin periosteal lamellae",
            outlines=_MALIGNANT_OUTLINES),
    _drawer("fibrous dysplasia", "ground-glass diaphyseal lesion, mild expansion, cortical thinning"),
    _drawer("giant cell tumour", "eccentric lytic epi-metaphyseal lesion reaching subchondral bone",
            outlines=("giant cell tumor",), btxrd_column="giant cell tumor"),
    _drawer("non-ossifying fibroma", "eccentric cortical lucency with a sclerotic, scalloped rim"),
    _drawer("osteochondroma", "exophytic stalk in continuity with the medulla, away from the joint",
            outlines=("osteochondroma", "multiple osteochondromas"), fill="dense",
            btxrd_column="osteochondroma"),
    _drawer("osteosarcoma", "metaphyseal mixed lytic/sclerotic mass, sunburst spicules, Codman triangle",
            outlines=("osteosarcoma",), btxrd_column="osteosarcoma"),
)


@hookimpl
def msk_lesion_drawers() -> list[LesionDrawer]:
    return list(LESION_DRAWERS)
