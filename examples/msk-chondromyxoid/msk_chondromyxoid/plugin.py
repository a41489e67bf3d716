"""The hooks of the plugin: an entity set, a lesion drawer and a subcommand.

msk loads this module through the entry point ``[project.entry-points.msk]`` of the package's
``pyproject.toml``; every function decorated with ``@hookimpl`` answers the msk hook of the
same name (``msk/core/hookspecs.py``). Nothing of msk is changed or patched.

* ``msk_entity_sets``: the set ``cmf-differential`` -- chondromyxoid fibroma and two entities
  it is confused with (non-ossifying fibroma, aneurysmal bone cyst: msk's own entities, drawn by
  msk's built-in drawers). ``msk synth`` with ``entity_set: cmf-differential`` draws it; a
  classifier trained on it names its classes in this order; ``msk serve`` with
  ``classifier.entity_set: cmf-differential`` answers with these names.
* ``msk_lesion_drawers``: how chondromyxoid fibroma looks in a synthetic radiograph.
* ``msk_commands``: ``msk cmf-priors`` prints the synthesis priors of the set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from msk.core.hookspecs import hookimpl
from msk.core.specs import BonePosition, Entity, EntitySet, LesionDrawer, Malignancy

if TYPE_CHECKING:
    import numpy as np
    import typer

    from msk.core.synth.canvas import Canvas
    from msk.core.synth.lesions import Frame

#: The new entity. Its fields are also the priors ``msk synth`` draws patients from: age
#: uniform in ``age_range``, female with probability ``female_fraction``, the lesion on one of
#: ``sites`` (names of the ``samx-regions`` set) at one of ``positions`` along the bone.
#: Chondromyxoid fibroma: second and third decades, men about 1.5-2 times as often as women,
#: most often the proximal tibia, then femur, foot and pelvis; metaphyseal, eccentric
#: (WHO Classification of Tumours, 5th ed., 2020; Resnick).
CHONDROMYXOID_FIBROMA = Entity(
    name="chondromyxoid fibroma",
    code="CMF",
    aliases=("cmf", "chondromyxoid fibroma of bone"),
    malignancy=Malignancy.BENIGN,
    age_range=(10, 30),
    sites=("lower leg", "femur", "foot", "pelvis"),
    positions=(BonePosition.METAPHYSIS, BonePosition.META_DIAPHYSIS),
    female_fraction=0.4,
)


def _builtin(name: str) -> Entity:
    """One of msk's own bone-tumour entities (its drawer is msk's built-in one)."""
    from msk.plugins.entity_sets import bone_tumours

    return bone_tumours.get(name)


@hookimpl
def msk_entity_sets() -> list[EntitySet]:
    return [EntitySet(
        name="cmf-differential",
        kind="tumour",
        description="chondromyxoid fibroma and its radiographic differential (msk-chondromyxoid)",
        entities=(CHONDROMYXOID_FIBROMA, _builtin("non-ossifying fibroma"), _builtin("aneurysmal bone cyst")),
    )]


def draw_chondromyxoid_fibroma(cv: Canvas, f: Frame, rng: np.random.Generator) -> None:
    """An eccentric, elongated metaphyseal lucency: lobulated, with a thick sclerotic scalloped
    margin towards the medulla, the cortex over it thinned and bulging, coarse pseudo-septa and
    no matrix calcification.

    ``f`` is the host bone's local frame: lengths in bone half widths, ``along`` the shaft,
    ``across`` towards the lesion's cortex (the cortex is at ``across = 1``). Everything drawn
    with ``lesion=True`` becomes the lesion's mask and box. Use only ``rng`` for randomness.
    """
    length = rng.uniform(1.3, 2.2)  # long axis along the shaft
    centre = rng.uniform(0.45, 0.6)  # eccentric: towards one cortex
    n = int(rng.integers(3, 6))
    step = 1.6 * length / n  # overlapping lobes along the shaft: (centre, half length, half width)
    lobes = [((i - (n - 1) / 2) * step, step * rng.uniform(0.8, 1.1), rng.uniform(0.42, 0.6)) for i in range(n)]
    for a, ha, hc in lobes:  # the sclerotic, scalloped rim first: the lucency erases its inner half
        cv.dense(f.ring(a, centre, ha, hc, 0.15), rng.uniform(0.4, 0.6), lesion=True)
    for a, ha, hc in lobes:
        cv.lucency(f.ellipse(a, centre, ha, hc), rng.uniform(0.65, 0.9))
    # the cortex over the lesion is thinned and bulges outwards ("blown out")
    cv.dense(f.ring(0.0, centre + 0.2, length * 0.95, 0.55, 0.04), 0.3, lesion=True)
    for _ in range(int(rng.integers(2, 5))):  # coarse pseudo-septa across the lucency
        a = rng.uniform(-0.7, 0.7) * length
        cv.dense(f.capsule((a, centre - 0.45), (a + rng.uniform(-0.2, 0.2), centre + 0.5), 0.03), 0.2,
                 lesion=True)


@hookimpl
def msk_lesion_drawers() -> list[LesionDrawer]:
    return [LesionDrawer(
        name=CHONDROMYXOID_FIBROMA.name,
        draw=draw_chondromyxoid_fibroma,
        # with the BTXRD annotations present, outline it with BTXRD's "other benign tumour"
        # polygons (BTXRD has no CMF class, hence also no btxrd_column: the Entity's priors hold)
        outlines=("other bt",),
        fill="lucent",
        description="eccentric lobulated metaphyseal lucency, sclerotic scalloped rim, bulging cortex",
    )]


@hookimpl
def msk_commands(app: typer.Typer) -> None:
    import typer

    @app.command("cmf-priors")
    def cmf_priors(
        entity_set: str = typer.Option("cmf-differential", help="entity set whose priors to print"),
    ) -> None:
        """Print the synthesis priors (age, share of women, sites, positions) of an entity set.

        [b]Example[/b]: [cyan]msk cmf-priors --entity-set cmf-differential[/cyan]
        """
        from msk.core.registry import entity_set as lookup

        for e in lookup(entity_set).entities:
            low, high = e.age_range or ("?", "?")
            positions = ", ".join(p.value for p in e.positions) or "any"
            typer.echo(f"{e.name}: age {low}-{high}, female {e.female_fraction:.0%}, "
                       f"sites {', '.join(e.sites)}, positions {positions}")
