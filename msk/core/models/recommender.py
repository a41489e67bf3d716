"""The recommender: the previous patients most like a new image, and a vote on their entity.

A :class:`Recommender` is an index of earlier patients' image embeddings (see
:mod:`msk.core.models.embed`) with each image's confirmed entity. For a query embedding it returns a
:class:`Recommendation`: the entity proposed by a majority vote of the ``k`` nearest images
(:func:`msk.core.models.vote.vote`), each entity's share of the vote, and the **linkage**: for every
neighbour, the pseudonymised ``patient_id``, ``study_id`` and ``image_id`` and its distance, so
that a caller can open those patients' records. Nothing else about them is stored or returned.

::

    from msk.core.models.embed import Embedder, read_embeddings
    from msk.core.models.recommender import Recommender

    rec = Recommender.build(read_embeddings("out/embed"), labels, retriever="lsh", k=3)
    rec.save("out/recommender")

    rec = Recommender.load("out/recommender")          # what a Ray Serve replica does
    embedder = Embedder(rec.encoder["checkpoint"])     # the encoder the index was built with
    [proposal] = rec.recommend(embedder.embed_images(image))
    proposal.entity, proposal.shares, proposal.neighbours[0].patient_id

A saved recommender is a folder (format version :data:`FORMAT_VERSION`)::

    recommender.json    format_version, dim, k, weighting, retriever, n_images, entities,
                        encoder (what made the embeddings; its checkpoint relative to the
                        folder), msk_version; written last
    index.mskidx        the retriever (msk.core.models.retrieval file format, checksummed)
    records.parquet     image_id, patient_id, study_id, entity, in index order

Loading checks that the three agree (dimension, ids in the same order) and imports neither
torch nor Ray.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from msk.core.errors import MskError
from msk.core.io.paths import resolve_stored, store_path
from msk.core.models.retrieval import Retriever, atomic_write, load_retriever
from msk.core.models.vote import WEIGHTINGS, Weighting, vote

__all__ = ["FORMAT_VERSION", "Neighbour", "Recommendation", "Recommender", "RecommenderError"]

FORMAT_VERSION = 1
META_FILE = "recommender.json"
INDEX_FILE = "index.mskidx"
RECORDS_FILE = "records.parquet"
_RECORD_COLUMNS = ("image_id", "patient_id", "study_id", "entity")


class RecommenderError(MskError, ValueError):
    """Bad input to a recommender, or a saved recommender that cannot be loaded."""


@dataclass(frozen=True)
class Neighbour:
    """A previous patient's image among a query's nearest: the ids to open its record."""

    patient_id: str | None
    study_id: str | None
    image_id: str
    distance: float
    entity: str


@dataclass(frozen=True)
class Recommendation:
    """The proposal for one query image.

    :param entity: the entity the neighbours vote for.
    :param shares: each voted entity's share of the vote (sums to 1), largest first.
    :param neighbours: the ``k`` nearest previous images, nearest first.
    """

    entity: str
    shares: dict[str, float]
    neighbours: list[Neighbour]

    @property
    def confidence(self) -> float:
        """The winning entity's share of the vote."""
        return self.shares[self.entity]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for an HTTP endpoint)."""
        return {"entity": self.entity, "confidence": self.confidence, "shares": dict(self.shares),
                "neighbours": [asdict(n) for n in self.neighbours]}


class Recommender:
    """Nearest previous patients and a vote; build with :meth:`build`, or :meth:`load` a saved one.

    :param index: a retriever holding one embedding per record, ids = the records' image ids.
    :param records: ``image_id, patient_id, study_id, entity`` per stored image, in index order.
    :param k: neighbours per recommendation (odd for ``weighting="none"``).
    :param weighting: vote weighting, see :func:`msk.core.models.vote.vote`.
    :param encoder: description of the encoder that made the embeddings (kept with the index).
    """

    def __init__(self, index: Retriever, records: pa.Table, *, k: int = 3,
                 weighting: Weighting = "none", encoder: Mapping[str, Any] | None = None):
        missing = [c for c in _RECORD_COLUMNS if c not in records.column_names]
        if missing:
            raise RecommenderError(f"records lack column(s) {', '.join(missing)}")
        if records.num_rows != index.ntotal:
            raise RecommenderError(f"{records.num_rows} records for an index of {index.ntotal} vectors")
        if weighting not in WEIGHTINGS:
            raise RecommenderError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
        self.index = index
        self.records = records.select(list(_RECORD_COLUMNS))
        self._image_ids = self.records.column("image_id").to_pylist()
        self._patient_ids = self.records.column("patient_id").to_pylist()
        self._study_ids = self.records.column("study_id").to_pylist()
        self._entities = [str(e) for e in self.records.column("entity").to_pylist()]
        self.weighting: Weighting = weighting
        self.encoder = dict(encoder or {})
        self.k = self._check_k(k)

    def __repr__(self) -> str:
        return (f"Recommender({self.index.kind}, {len(self)} images of "
                f"{len(set(self._patient_ids))} patients, dim={self.dim}, k={self.k})")

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.dim

    @property
    def entities(self) -> dict[str, int]:
        """Stored images per entity."""
        return dict(Counter(self._entities).most_common())

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def build(cls, embeddings: pa.Table | str | os.PathLike,
              labels: Mapping[str, str] | Sequence[str] | str, *, retriever: str = "lsh",
              k: int = 3, weighting: Weighting = "none",
              retriever_options: Mapping[str, Any] | None = None) -> Recommender:
        """Index earlier patients' embeddings with their confirmed entities.

        :param embeddings: an embeddings table or file (:func:`msk.core.models.embed.read_embeddings`):
            ``image_id, patient_id, study_id, embedding``.
        :param labels: the entity of every image: a mapping ``image_id -> entity``, a sequence
            in table order, or the name of a column of ``embeddings``.
        :param retriever: retriever registry name (``flat``, ``lsh``, ``hnsw``, ``ivf``, ...).
        """
        from msk.core.models.embed import embedding_matrix, encoder_info, read_embeddings
        from msk.core.registry import build_retriever

        table = embeddings if isinstance(embeddings, pa.Table) else read_embeddings(embeddings)
        if table.num_rows == 0:
            raise RecommenderError("cannot build a recommender from zero embeddings: the index "
                                   "would be empty")
        x = embedding_matrix(table)
        ids = table.column("image_id").to_pylist()
        entities = _labels_for(ids, labels, table)
        records = pa.table({
            "image_id": pa.array(ids, pa.string()),
            "patient_id": table.column("patient_id").cast(pa.string()),
            "study_id": table.column("study_id").cast(pa.string()),
            "entity": pa.array(entities, pa.string()),
        })
        cls._check_k_for(k, weighting, len(ids))
        index = build_retriever(retriever, dim=x.shape[1], **dict(retriever_options or {}))
        index.build(x, ids)
        return cls(index, records, k=k, weighting=weighting, encoder=encoder_info(table))

    # -- recommending --------------------------------------------------------------------------

    def recommend(self, queries: np.ndarray, k: int | None = None) -> list[Recommendation]:
        """One :class:`Recommendation` per query embedding (``[M, dim]``, or one ``[dim]``).

        :param k: neighbours that vote; default the recommender's ``k``.
        """
        k = self.k if k is None else self._check_k(k)
        result = self.index.search(queries, k)
        entities = [[self._entities[i] for i in row if i >= 0] for row in result.indices]
        counts = Counter(self._entities) if self.weighting == "inverse_frequency" else None
        votes = vote(entities, result.distances, k=k, weighting=self.weighting,
                     class_frequencies=counts)
        out = []
        for row, dists, label, shares in zip(result.indices, result.distances, votes.labels,
                                             votes.shares):
            neighbours = [Neighbour(self._patient_ids[i], self._study_ids[i], self._image_ids[i],
                                    float(d), self._entities[i])
                          for i, d in zip(row.tolist(), dists.tolist()) if i >= 0]
            out.append(Recommendation(label, shares, neighbours))
        return out

    def _check_k(self, k: int) -> int:
        return self._check_k_for(k, self.weighting, len(self))

    @staticmethod
    def _check_k_for(k: int, weighting: str, n: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise RecommenderError(f"k must be a positive integer, got {k!r}")
        if k > n:
            raise RecommenderError(f"k={k} neighbours asked for, but the recommender holds only "
                                   f"{n} image(s)")
        if weighting == "none" and k % 2 == 0:
            raise RecommenderError(f"an unweighted vote needs an odd k (no two-way ties); got k={k}")
        return int(k)

    # -- files ---------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the recommender to the folder ``directory`` (see the module docstring)."""
        import pyarrow.parquet as pq

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.index.save(directory / INDEX_FILE)
        with atomic_write(directory / RECORDS_FILE) as fh:
            pq.write_table(self.records, fh, compression="zstd")
        encoder = dict(self.encoder)
        if encoder.get("checkpoint"):  # relative to the folder: a moved run tree keeps working
            encoder["checkpoint"] = store_path(encoder["checkpoint"], directory)
        meta = {
            "format_version": FORMAT_VERSION, "dim": self.dim, "k": self.k,
            "weighting": self.weighting, "retriever": self.index.kind, "n_images": len(self),
            "entities": self.entities, "encoder": encoder, "msk_version": _msk_version(),
        }
        with atomic_write(directory / META_FILE) as fh:
            fh.write(json.dumps(meta, indent=2).encode() + b"\n")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, expect_dim: int | None = None) -> Recommender:
        """Read a recommender saved by :meth:`save`.

        :param expect_dim: the dimension of the embeddings the caller will query with (its
            encoder's); a recommender of another dimension is refused.
        """
        import pyarrow.parquet as pq

        directory = Path(directory)
        meta_path = directory / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise RecommenderError(f"{directory}: not a saved recommender (no {META_FILE})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RecommenderError(f"{meta_path}: unreadable ({exc})") from None
        if not isinstance(meta, dict):
            raise RecommenderError(f"{meta_path}: not a recommender description (not a JSON object)")
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise RecommenderError(
                f"{meta_path}: recommender format {version!r} (msk {meta.get('msk_version', '?')}); "
                f"this msk ({_msk_version()}) reads format {FORMAT_VERSION} or older: upgrade msk")
        missing = sorted({"dim", "k", "weighting"} - meta.keys())
        if missing:
            raise RecommenderError(f"{meta_path}: corrupt, lacks {', '.join(missing)}")
        dim = meta["dim"]
        if expect_dim is not None and dim != expect_dim:
            raise RecommenderError(
                f"{directory}: the recommender holds {dim}-d embeddings, but {expect_dim}-d were "
                f"expected (embeddings from another encoder?)")
        index = load_retriever(directory / INDEX_FILE, expect_dim=dim)
        try:
            records = pq.read_table(directory / RECORDS_FILE)
        except (OSError, pa.ArrowException) as exc:
            raise RecommenderError(f"{directory / RECORDS_FILE}: unreadable ({exc})") from None
        if records.column_names[:len(_RECORD_COLUMNS)] != list(_RECORD_COLUMNS) or \
                records.column("image_id").to_pylist() != list(index.ids):
            raise RecommenderError(
                f"{directory}: {RECORDS_FILE} does not match {INDEX_FILE} (different images or "
                f"order); the folder mixes two saves: save the recommender again")
        return cls(index, records, k=meta["k"], weighting=meta["weighting"],
                   encoder=resolved_encoder(meta, directory))


def resolved_encoder(meta: Mapping[str, Any], directory: str | os.PathLike) -> dict[str, Any]:
    """The ``encoder`` of a ``recommender.json`` in ``directory``, its checkpoint an absolute
    path (stored relative to ``directory``; older recommenders: absolute or from the working
    directory, see :mod:`msk.core.io.paths`)."""
    encoder = dict(meta.get("encoder") or {})
    if encoder.get("checkpoint"):
        encoder["checkpoint"] = str(resolve_stored(encoder["checkpoint"], directory))
    return encoder


def _labels_for(ids: list[str], labels: Mapping[str, str] | Sequence[str] | str,
                table: pa.Table) -> list[str]:
    """The entity of each image id, from a mapping, a sequence in table order or a column name."""
    if isinstance(labels, str):
        if labels not in table.column_names:
            raise RecommenderError(f"no label column {labels!r}; columns are {table.column_names}")
        values = table.column(labels).to_pylist()
    elif isinstance(labels, Mapping):
        unlabelled = [i for i in ids if i not in labels]
        if unlabelled:
            raise RecommenderError(f"{len(unlabelled)} of {len(ids)} images have no label "
                                   f"(first: {unlabelled[0]!r})")
        values = [labels[i] for i in ids]
    else:
        values = list(labels)
        if len(values) != len(ids):
            raise RecommenderError(f"{len(values)} labels for {len(ids)} embeddings")
    empty = [i for i, v in zip(ids, values) if v is None or not str(v).strip()]
    if empty:
        raise RecommenderError(f"{len(empty)} images have an empty label (first: {empty[0]!r})")
    return [str(v) for v in values]


def _msk_version() -> str:
    from msk import __version__

    return __version__
