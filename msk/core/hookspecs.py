"""Hook specifications: every swappable part of msk is contributed through one of these hooks.

Built-in plugins (``msk.plugins.*``) implement them exactly as third-party plugins do; a
third-party package registers a module through the entry-point group ``msk``::

    [project.entry-points.msk]
    my_entities = "my_package.msk_plugin"

and decorates functions in that module with :data:`hookimpl`. A *component* hook returns a
list of specs (see :mod:`msk.core.specs`); results of all plugins are concatenated, and a name
that two plugins register is an error. :data:`COMPONENT_KINDS` names each kind of component,
its hook and its spec type, in the order data flows: entities (and how they look in synthetic
images) and labelled datasets -> encoders -> segmenters -> clusterers -> retrievers -> fusion
heads -> tuning tasks. :func:`msk_commands` adds command-line subcommands instead.

No hook is ``firstresult``: every one collects the answers of all plugins (a hook that wants
one answer would be declared ``@hookspec(firstresult=True)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import pluggy

from msk.core.specs import (
    ClustererSpec,
    DatasetSpec,
    EncoderSpec,
    EntitySet,
    FusionHeadSpec,
    LesionDrawer,
    RetrieverSpec,
    SegmenterSpec,
    TuningTaskSpec,
)

if TYPE_CHECKING:
    import typer

PROJECT = "msk"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- labels: what the images are about -------------------------------------------------------


@hookspec
def msk_entity_sets() -> list[EntitySet]:
    """Register entity sets: vocabularies of anatomical regions or tumour entities.

    Used by the synthetic export, the labelling step (cluster names are checked against a
    region set), the sorter and the tumour classifiers (class order = entity order). A tumour
    entity's synthesis priors (age range, share of women, sites, positions) are fields of its
    :class:`~msk.core.specs.Entity`.

    :return: list of :class:`msk.core.specs.EntitySet`.
    """


@hookspec
def msk_lesion_drawers() -> list[LesionDrawer]:
    """Register how ``msk synth`` draws tumour entities: one drawer per entity name.

    Used by the synthetic export (``msk synth``), which draws every entity of its tumour set
    and refuses a set with an entity no drawer names; a drawer may also name the BTXRD class
    whose rows give its patients' age, sex and site.

    :return: list of :class:`msk.core.specs.LesionDrawer`.
    """


@hookspec
def msk_datasets() -> list[DatasetSpec]:
    """Register labelled dataset layouts (a CSV of paths and labels, a folder per class, MURA,
    BTXRD, ...).

    Used by ``msk import``, which ingests exactly the files a layout labels and writes the
    labels file (``image_id,label,patient_id,...``) that the sorter and the tumour evaluations
    read, without DeepCluster. ``read(src, options)`` reads label files only, never images.

    :return: list of :class:`msk.core.specs.DatasetSpec`.
    """


# -- representation: images -> feature vectors -----------------------------------------------


@hookspec
def msk_encoders() -> list[EncoderSpec]:
    """Register image encoders (CNN or transformer backbones without a classifier).

    Used by DeepCluster, the sorter, transfer learning, ``msk embed`` and the image branch of
    fusion models. ``build(name=..., in_chans=1, **options)`` must work without network access
    (no pretrained downloads: msk's own checkpoints are loaded separately).

    :return: list of :class:`msk.core.specs.EncoderSpec`.
    """


# -- segmentation: images -> lesion masks ----------------------------------------------------


@hookspec
def msk_segmenters() -> list[SegmenterSpec]:
    """Register lesion segmenters (U-Net, U-Net++, ...): image -> one lesion logit per pixel.

    Used by ``msk train segmenter`` and ``msk eval segmenter``; the predicted mask gives the
    region of interest (:mod:`msk.core.data.roi`). ``build(name=..., in_chans=1, encoder=...,
    **options)`` must work without network access (no pretrained downloads).

    :return: list of :class:`msk.core.specs.SegmenterSpec`.
    """


# -- grouping: feature vectors -> pseudo-labels ----------------------------------------------


@hookspec
def msk_clusterers() -> list[ClustererSpec]:
    """Register clusterers that turn features into pseudo-labels (DeepCluster's k-means step).

    :return: list of :class:`msk.core.specs.ClustererSpec`.
    """


# -- retrieval: feature vectors -> similar previous patients ---------------------------------


@hookspec
def msk_retrievers() -> list[RetrieverSpec]:
    """Register nearest-neighbour indexes used by the recommender (exact, LSH, HNSW, IVF, ...).

    :return: list of :class:`msk.core.specs.RetrieverSpec`.
    """


# -- heads: image features + clinical metadata -> entity logits ------------------------------


@hookspec
def msk_fusion_heads() -> list[FusionHeadSpec]:
    """Register fusion heads combining image features with encoded clinical metadata.

    :return: list of :class:`msk.core.specs.FusionHeadSpec`.
    """


# -- tuning: which training commands ``msk tune`` can search -----------------------------------


@hookspec
def msk_tuning_tasks() -> list[TuningTaskSpec]:
    """Register tasks for ``msk tune TASK``: a training command's config class, how one trial
    loads, splits and trains, and the validation metric it reports.

    :return: list of :class:`msk.core.specs.TuningTaskSpec`.
    """


# -- the command line --------------------------------------------------------------------------


@hookspec
def msk_commands(app: typer.Typer) -> None:
    """Add subcommands to the ``msk`` command line (as datasette's ``register_commands``).

    Called once when ``msk`` starts, with the root :class:`typer.Typer` app: decorate functions
    with ``@app.command()`` or add a group with ``app.add_typer(...)``. Import heavy modules
    inside the commands so that ``msk --help`` stays fast; raise
    :class:`msk.core.errors.MskError` for a one-line error and exit code 2.

    :return: nothing: the commands are added to ``app``.
    """


class Kind(NamedTuple):
    """One kind of component: its name (``msk plugins KIND``), hook and spec type."""

    name: str
    hook: str
    spec: type


#: Every kind of component, in pipeline order: the registry, ``msk plugins`` and the plugin
#: contract test all go by this one list.
COMPONENT_KINDS: tuple[Kind, ...] = (
    Kind("entity_set", "msk_entity_sets", EntitySet),
    Kind("lesion_drawer", "msk_lesion_drawers", LesionDrawer),
    Kind("dataset", "msk_datasets", DatasetSpec),
    Kind("encoder", "msk_encoders", EncoderSpec),
    Kind("segmenter", "msk_segmenters", SegmenterSpec),
    Kind("clusterer", "msk_clusterers", ClustererSpec),
    Kind("retriever", "msk_retrievers", RetrieverSpec),
    Kind("fusion_head", "msk_fusion_heads", FusionHeadSpec),
    Kind("tuning_task", "msk_tuning_tasks", TuningTaskSpec),
)
