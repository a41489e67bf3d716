"""What a plugin hands to msk: one small, typed record per swappable component.

A *spec* names a component and says how to build it; the registry stores specs, never
instances, so importing a plugin costs nothing until its component is used.  A spec name may
hold one ``*`` wildcard (``"timm/*"``): it then stands for a family, and ``build`` receives the
concrete name asked for as ``name=``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field as PydanticField
from pydantic import ValidationError

from msk.core.config import MskConfig
from msk.core.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from msk.core.synth.canvas import Canvas
    from msk.core.synth.lesions import Frame


@dataclass(frozen=True)
class ComponentSpec:
    """A buildable component.

    :param name: registry name, lower case; may contain one ``*`` (a family, e.g. ``timm/*``).
    :param build: factory; called as ``build(name=<requested name>, **options)``.
    :param description: one line shown by ``msk plugins``.
    :param example: a concrete name to use when ``name`` is a family (for ``msk plugins`` and the
        plugin contract test).
    :param example_options: options that build a small working instance (the plugin contract
        test builds with them; e.g. an IVF index with few cells for a few hundred vectors).
    """

    name: str
    build: Callable[..., Any]
    description: str = ""
    example: str | None = None
    example_options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_family(self) -> bool:
        return "*" in self.name

    @property
    def example_name(self) -> str:
        return self.example or self.name


@dataclass(frozen=True)
class EncoderSpec(ComponentSpec):
    """Image encoder: ``build(name, in_chans=1, **options)`` returns a ``torch.nn.Module`` that
    maps ``[B, in_chans, H, W]`` float images to ``[B, feature_dim]`` features and has an int
    attribute ``feature_dim``."""


@dataclass(frozen=True)
class ClustererSpec(ComponentSpec):
    """Clusterer: ``build(name, **options)`` returns an object with
    ``fit(x: float32[N, D], k: int, seed: int) -> ClusterResult``."""


#: Metadata MLP widths and dropout of a fusion head when none are given: the one place of these
#: defaults (fusion training, the metadata-only baseline and serving older checkpoints).
FUSION_HIDDEN: tuple[int, ...] = (64, 32)
FUSION_DROPOUT: float = 0.2


@dataclass(frozen=True)
class FusionHeadSpec(ComponentSpec):
    """Fusion head: ``build(name, image_dim, meta_dim, num_classes, **options)`` returns a
    ``torch.nn.Module`` with ``forward(image_features [B, image_dim] | None, meta [B, meta_dim]
    | None) -> logits [B, num_classes]``. ``image_dim=0`` or ``meta_dim=0`` gives the
    metadata-only or image-only variant of the same head."""


@dataclass(frozen=True)
class RetrieverSpec(ComponentSpec):
    """Nearest-neighbour index: ``build(name, dim, **options)`` returns a
    :class:`msk.core.models.retrieval.Retriever` with ``train(x)``, ``add(x, ids)``,
    ``search(q, k) -> SearchResult(ids, distances, indices, metric)``, ``save(path)``,
    ``ntotal`` and a class method ``load(path)``."""


@dataclass(frozen=True)
class SegmenterSpec(ComponentSpec):
    """Lesion segmenter: ``build(name, in_chans=1, encoder=..., **options)`` returns a
    ``torch.nn.Module`` that maps ``[B, in_chans, H, W]`` float images (``H``, ``W`` multiples of
    32, or of ``2**encoder_depth``) to ``[B, 1, H, W]`` lesion logits, with string attributes
    ``architecture`` and ``encoder_name``. No weights are downloaded."""


@dataclass(frozen=True)
class DatasetRecord:
    """One labelled file of a dataset layout, as a dataset plugin reads it.

    :param path: the file, relative to the dataset folder (SRC), POSIX separators.
    :param label: the class as the layout writes it (checked against the options' entity set).
    :param patient: the patient or group the file belongs to (the split unit); ``None`` when the
        layout has none. Written out only as a keyed pseudonym, never raw.
    :param extra: further columns for the labels file (``finding``, ``source``, lesion box
        ``x0, y0, x1, y1`` in source-image pixels, clinical metadata ``age``, ``sex``, ...).
    :param where: where the record comes from, for error messages (``"labels.csv, line 12"``).
    """

    path: str
    label: str
    patient: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    where: str = ""


class DatasetOptions(MskConfig):
    """Options every dataset plugin takes; a plugin subclasses this for its own (pydantic)."""

    entity_set: str | None = PydanticField(
        "samx-regions", description="entity set the labels must belong to; null takes any label")
    extra_labels: list[str] = PydanticField(
        [], description="labels accepted besides the entity set's names (e.g. normal)")


@dataclass(frozen=True)
class DatasetSpec:
    """A labelled dataset layout: ``read(src, options)`` yields one :class:`DatasetRecord` per
    labelled file under the folder ``src``.

    :param name: registry name, lower case (``"mura"``).
    :param read: ``read(src: Path, options) -> Iterable[DatasetRecord]``; ``options`` is an
        instance of ``options``. It reads the layout's label files only (never the images) and
        raises :class:`msk.core.errors.DatasetError` naming the file and line of a problem.
        Records come in a stable order; ``msk import`` checks labels, paths and duplicates.
    :param options: the pydantic model of the plugin's options (a :class:`DatasetOptions`).
    :param description: one line shown by ``msk plugins``.
    :param example_layout: ``example_layout(folder) -> options`` writes a tiny instance of the
        layout (a few small images and its label files) into ``folder`` and returns the options
        that read it; the plugin contract test reads every dataset through it.
    """

    name: str
    read: Callable[[Path, Any], Iterable[DatasetRecord]]
    options: type[DatasetOptions] = DatasetOptions
    description: str = ""
    example_layout: Callable[[Path], dict[str, Any]] | None = None

    is_family = False

    def parse_options(self, options: Mapping[str, Any] | None = None, where: str = "options") -> DatasetOptions:
        """``options`` validated by :attr:`options`; a :class:`~msk.core.errors.ConfigError`
        names the dataset, the option and the problem."""
        try:
            return self.options.model_validate(dict(options or {}))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '(root)'}: {e['msg']}"
                                 for e in exc.errors())
            known = ", ".join(self.options.model_fields)
            raise ConfigError(f"{where}: invalid options of dataset {self.name!r}: {problems} "
                              f"(options: {known})") from None


class Malignancy(str, Enum):
    """WHO grade of a bone-tumour entity (WHO Classification of Tumours, 5th ed., 2020)."""

    BENIGN = "benign"
    INTERMEDIATE = "intermediate"
    MALIGNANT = "malignant"


class BonePosition(str, Enum):
    """Position of a lesion along a long bone, proximal-distal axis agnostic."""

    EPIPHYSIS = "epiphysis"
    EPI_METAPHYSIS = "epi-metaphysis"
    METAPHYSIS = "metaphysis"
    META_DIAPHYSIS = "meta-diaphysis"
    DIAPHYSIS = "diaphysis"


@dataclass(frozen=True)
class Entity:
    """One class of an entity set (an anatomical region or a tumour entity).

    :param name: canonical name, lower case (``"ewing sarcoma"``).
    :param code: short stable code used in files and ids (``"ES"``).
    :param aliases: other spellings that map to this entity (case-insensitive).
    :param malignancy: grade, for tumour entities.
    :param age_range: typical patient age (years) as ``(low, high)``; a prior for synthesis.
    :param sites: typical anatomical regions (names of the ``samx-regions`` set).
    :param positions: typical positions on the bone.
    :param female_fraction: share of female patients; a prior for synthesis.
    """

    name: str
    code: str
    aliases: tuple[str, ...] = ()
    malignancy: Malignancy | None = None
    age_range: tuple[int, int] | None = None
    sites: tuple[str, ...] = ()
    positions: tuple[BonePosition, ...] = ()
    female_fraction: float = 0.5


@dataclass(frozen=True)
class EntitySet:
    """A named, ordered vocabulary of entities; the class index of an entity is its position.

    :param name: registry name (``"samx-regions"``).
    :param kind: ``"region"`` (anatomical regions) or ``"tumour"`` (tumour entities).
    """

    name: str
    kind: str
    entities: tuple[Entity, ...]
    description: str = ""
    _lookup: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("region", "tumour"):
            raise ValueError(f"entity set {self.name!r}: kind must be 'region' or 'tumour', not {self.kind!r}")
        for i, e in enumerate(self.entities):
            for key in (e.name, e.code, *e.aliases):
                k = key.strip().lower()
                if k in self._lookup and self._lookup[k] != i:
                    raise ValueError(f"entity set {self.name!r}: {key!r} names two entities")
                self._lookup[k] = i

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entities]

    def __len__(self) -> int:
        return len(self.entities)

    def index(self, name: str) -> int:
        """Class index of ``name`` (canonical name, code or alias; case-insensitive)."""
        try:
            return self._lookup[name.strip().lower()]
        except KeyError:
            raise KeyError(
                f"{name!r} is not in entity set {self.name!r}; known: {', '.join(self.names)}"
            ) from None

    def get(self, name: str) -> Entity:
        return self.entities[self.index(name)]


#: BTXRD shape labels whose real outlines a lesion takes when its drawer names none: BTXRD's
#: benign tumours.
BTXRD_BENIGN_OUTLINES: tuple[str, ...] = ("simple bone cyst", "osteofibroma", "other bt")


@dataclass(frozen=True)
class LesionDrawer:
    """How ``msk synth`` draws one tumour entity, and where its patients' priors come from.

    The entity's other priors (typical age, share of women, sites, positions on the bone) are
    fields of its :class:`Entity`; ``msk synth`` draws every entity of its ``entity_set`` and
    refuses a set with an entity that no drawer names.

    :param name: the entity's canonical name (as in its entity set), lower case; one drawer
        serves every set that has an entity of this name.
    :param draw: ``draw(canvas, frame, rng)`` draws the lesion on the
        :class:`~msk.core.synth.canvas.Canvas` in the host bone's local
        :class:`~msk.core.synth.lesions.Frame` (lengths in bone half widths: ``frame.ellipse``,
        ``frame.ring``, ``frame.capsule``; ``canvas.lucency``, ``canvas.dense``, ...). What it
        draws with ``lesion=True`` (and ``canvas.mark``) is the lesion's mask and box. Its only
        randomness is ``rng``, so one generator gives one lesion.
    :param outlines: BTXRD shape labels whose real tumour polygons outline the lesion where the
        BTXRD annotations are present (:mod:`msk.core.synth.lesions`); ``()``: always as drawn.
    :param fill: what fills a real outline under the drawing: ``"lucent"`` (bone destroyed) or
        ``"dense"`` (exophytic bone, as an osteochondroma).
    :param btxrd_column: the class column of BTXRD's ``dataset.csv`` whose rows give the
        entity's joint (age, sex, site) prior under ``priors: btxrd``; ``None``: the entity's own.
    :param description: one line shown by ``msk plugins``.
    """

    name: str
    draw: Callable[[Canvas, Frame, np.random.Generator], None]
    outlines: tuple[str, ...] = BTXRD_BENIGN_OUTLINES
    fill: Literal["lucent", "dense"] = "lucent"
    btxrd_column: str | None = None
    description: str = ""

    is_family = False

    def __post_init__(self) -> None:
        if self.fill not in ("lucent", "dense"):
            raise ValueError(f"lesion drawer {self.name!r}: fill must be 'lucent' or 'dense', not {self.fill!r}")
        if not callable(self.draw):
            raise TypeError(f"lesion drawer {self.name!r}: draw must be callable")


@dataclass(frozen=True)
class TuningTaskSpec(ComponentSpec):
    """A task ``msk tune`` searches hyperparameters for: ``build(name)`` returns a
    :class:`msk.core.stages.tuning.search.Task` (its config class, data loader, split, trial and metric).

    :param command: the command that takes the best config, with its arguments
        (``"msk train sorter INGEST LABELS OUT"``); ``msk tune`` prints it with ``--config``.
    :param labels: what the LABELS argument of ``msk tune`` is for this task.
    :param space: the default search space (YAML); ``None``: ``tune/<name>.yaml`` of the
        repository checkout.
    """

    command: str = ""
    labels: str = ""
    space: Path | None = None
