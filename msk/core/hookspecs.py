"""Hook specifications: every swappable part of msk is contributed through one of these hooks.

Built-in plugins (``msk.plugins.*``) implement them exactly as third-party plugins do; a
third-party package registers a module through the entry-point group ``msk``::

    [project.entry-points.msk]
    my_entities = "my_package.msk_plugin"

and decorates functions in that module with :data:`hookimpl`. Every hook returns a list of
specs (see :mod:`msk.core.specs`); results of all plugins are concatenated, and a name that two
plugins register is an error. Hooks are grouped by the pipeline phase that consumes them, in
the order data flows: entities and labelled datasets -> encoders -> segmenters -> clusterers ->
retrievers -> fusion heads.
"""

from __future__ import annotations

import pluggy

PROJECT = "msk"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- labels: what the images are about -------------------------------------------------------


@hookspec
def msk_entity_sets():
    """Register entity sets: vocabularies of anatomical regions or tumour entities.

    Used by the synthetic export, the labelling step (cluster names are checked against a
    region set), the sorter and the tumour classifiers (class order = entity order).

    :return: list of :class:`msk.core.specs.EntitySet`.
    """


@hookspec
def msk_datasets():
    """Register labelled dataset layouts (a CSV of paths and labels, a folder per class, MURA,
    BTXRD, ...).

    Used by ``msk import``, which ingests exactly the files a layout labels and writes the
    labels file (``image_id,label,patient_id,...``) that the sorter and the tumour evaluations
    read, without DeepCluster. ``read(src, options)`` reads label files only, never images.

    :return: list of :class:`msk.core.specs.DatasetSpec`.
    """


# -- representation: images -> feature vectors -----------------------------------------------


@hookspec
def msk_encoders():
    """Register image encoders (CNN or transformer backbones without a classifier).

    Used by DeepCluster, the sorter, transfer learning, ``msk embed`` and the image branch of
    fusion models. ``build(name=..., in_chans=1, **options)`` must work without network access
    (no pretrained downloads: msk's own checkpoints are loaded separately).

    :return: list of :class:`msk.core.specs.EncoderSpec`.
    """


# -- segmentation: images -> lesion masks ----------------------------------------------------


@hookspec
def msk_segmenters():
    """Register lesion segmenters (U-Net, U-Net++, ...): image -> one lesion logit per pixel.

    Used by ``msk train segmenter`` and ``msk eval segmenter``; the predicted mask gives the
    region of interest (:mod:`msk.core.roi`). ``build(name=..., in_chans=1, encoder=...,
    **options)`` must work without network access (no pretrained downloads).

    :return: list of :class:`msk.core.specs.SegmenterSpec`.
    """


# -- grouping: feature vectors -> pseudo-labels ----------------------------------------------


@hookspec
def msk_clusterers():
    """Register clusterers that turn features into pseudo-labels (DeepCluster's k-means step).

    :return: list of :class:`msk.core.specs.ClustererSpec`.
    """


# -- retrieval: feature vectors -> similar previous patients ---------------------------------


@hookspec
def msk_retrievers():
    """Register nearest-neighbour indexes used by the recommender (exact, LSH, HNSW, IVF, ...).

    :return: list of :class:`msk.core.specs.RetrieverSpec`.
    """


# -- heads: image features + clinical metadata -> entity logits ------------------------------


@hookspec
def msk_fusion_heads():
    """Register fusion heads combining image features with encoded clinical metadata.

    :return: list of :class:`msk.core.specs.FusionHeadSpec`.
    """
