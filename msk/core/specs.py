"""What a plugin hands to msk: one small, typed record per swappable component.

A *spec* names a component and says how to build it; the registry stores specs, never
instances, so importing a plugin costs nothing until its component is used.  A spec name may
hold one ``*`` wildcard (``"timm/*"``): it then stands for a family, and ``build`` receives the
concrete name asked for as ``name=``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable


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


@dataclass(frozen=True)
class FusionHeadSpec(ComponentSpec):
    """Fusion head: ``build(name, image_dim, meta_dim, num_classes, **options)`` returns a
    ``torch.nn.Module`` with ``forward(image_features [B, image_dim] | None, meta [B, meta_dim]
    | None) -> logits [B, num_classes]``. ``image_dim=0`` or ``meta_dim=0`` gives the
    metadata-only or image-only variant of the same head."""


@dataclass(frozen=True)
class RetrieverSpec(ComponentSpec):
    """Nearest-neighbour index: ``build(name, dim, **options)`` returns a
    :class:`msk.core.retrieval.Retriever` with ``train(x)``, ``add(x, ids)``,
    ``search(q, k) -> SearchResult(ids, distances, indices, metric)``, ``save(path)``,
    ``ntotal`` and a class method ``load(path)``."""


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
    """

    name: str
    code: str
    aliases: tuple[str, ...] = ()
    malignancy: Malignancy | None = None
    age_range: tuple[int, int] | None = None
    sites: tuple[str, ...] = ()
    positions: tuple[BonePosition, ...] = ()


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
