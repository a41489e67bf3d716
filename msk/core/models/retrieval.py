"""Similar-patient retrieval: the interface every nearest-neighbour index implements, and its file.

A :class:`Retriever` stores L2-normalised feature vectors of previous patients' images under
string ids (pseudonymised image ids) and returns the ``k`` nearest stored images of a query.
Concrete indexes (exact, LSH, HNSW, IVF; see :mod:`msk.plugins.retrievers`) implement four small
hooks; this base class owns everything they share: input validation, the id table, search
results and the on-disk format.

Distances, smaller is nearer:

* ``metric == "ip"``: ``1 - cosine similarity`` of the normalised vectors, in ``[0, 2]``.
* ``metric == "hamming"``: number of differing hash bits, in ``[0, nbits]``.

Every index L2-normalises what it is given (cosine similarity is the similarity msk ranks by);
zero vectors, NaN and infinity are refused.

File format (one file, written atomically: a temporary file in the same folder, fsync,
``os.replace``)::

    b"MSKINDEX"                 8 bytes, magic
    header length H             4 bytes, little-endian unsigned
    header                      H bytes, UTF-8 JSON: format_version, kind, dim, ntotal, metric,
                                options, msk_version, sections [[name, nbytes], ...],
                                payload_sha256
    sha256(header)              32 bytes
    payload                     the sections, concatenated in header order

The payload holds the index's own sections (a serialised faiss index, for the built-ins) and
``ids`` (a JSON list of the ids in insertion order). A flipped byte anywhere, a truncated or
extended file, or a file from a newer format is refused with an :class:`IndexFileError` naming
the file and the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Literal, TypeVar

import numpy as np

from msk.core.config import MskConfig, load_config
from msk.core.errors import MskError

MAGIC = b"MSKINDEX"
FORMAT_VERSION = 1
_HEADER_LEN = struct.Struct("<I")
_DIGEST_BYTES = 32
_MAX_HEADER_BYTES = 1 << 20

Metric = Literal["ip", "hamming"]
R = TypeVar("R", bound="Retriever")


class RetrievalError(MskError, ValueError):
    """Input an index cannot take: wrong shape or dimension, NaN, duplicate ids, bad ``k``."""


class IndexFileError(MskError):
    """A saved index that cannot be loaded; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class SearchResult:
    """The ``k`` nearest stored vectors of each of ``M`` queries, nearest first.

    :param ids: per query, the ids of the neighbours found (``k`` of them unless an approximate
        index found fewer; the missing ones are left out here).
    :param distances: float32 ``[M, k]``; see the module docstring for their meaning; ``inf``
        where fewer than ``k`` neighbours were found.
    :param indices: int64 ``[M, k]``: insertion positions of the neighbours (the row of the
        vector in the order it was added); ``-1`` where fewer than ``k`` were found.
    :param metric: ``"ip"`` (distances are ``1 - cosine``) or ``"hamming"`` (differing bits).
    """

    ids: list[list[str]]
    distances: np.ndarray
    indices: np.ndarray
    metric: Metric

    def __len__(self) -> int:
        return len(self.ids)

    def labels(self, labels: Mapping[str, str] | Sequence[str] | np.ndarray) -> list[list[str]]:
        """Labels of the neighbours, per query, nearest first.

        :param labels: either a mapping ``id -> label`` or a sequence aligned with the index's
            insertion order (``labels[i]`` is the label of the ``i``-th vector added).
        """
        if isinstance(labels, Mapping):
            try:
                return [[labels[i] for i in row] for row in self.ids]
            except KeyError as exc:
                raise RetrievalError(f"no label for neighbour id {exc.args[0]!r}") from None
        table = np.asarray(labels, dtype=object)
        if len(self.indices) and self.indices.max(initial=-1) >= len(table):
            raise RetrievalError(
                f"labels has {len(table)} entries but the index returned position "
                f"{int(self.indices.max())}; pass one label per stored vector, in insertion order"
            )
        return [table[row[row >= 0]].tolist() for row in self.indices]


class NoOptions(MskConfig):
    """Options of an index that has none."""


class Retriever:
    """A nearest-neighbour index of L2-normalised vectors under string ids.

    Subclasses set :attr:`kind`, :attr:`metric` and :attr:`Options` and implement
    :meth:`_add`, :meth:`_search`, :meth:`_state` and :meth:`_restore` (plus :meth:`_train`
    and :attr:`is_trained` where the index needs training). Build one through the registry::

        from msk.core.registry import build_retriever
        index = build_retriever("hnsw", dim=512, ef_search=128)
        index.build(features, image_ids)
        result = index.search(query_features, k=5)
        index.save("archive.mskidx")
        index = load_retriever("archive.mskidx", expect_dim=512)

    :param dim: dimension of the vectors.
    :param gpu: run on the GPU (where the index and the installed faiss support it).
    :param options: the index's options, validated by its :attr:`Options` model.
    """

    kind: ClassVar[str] = ""
    metric: Metric = "ip"
    Options: ClassVar[type[MskConfig]] = NoOptions
    #: whether the index learns from data (then :meth:`_train` and :attr:`is_trained` matter)
    trainable: ClassVar[bool] = False

    def __init__(self, dim: int, *, gpu: bool = False, **options: Any):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise RetrievalError(f"{self.kind} index: dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.gpu = bool(gpu)
        self.options = load_config(self.Options, **options)
        self._ids: list[str] = []
        self._positions: dict[str, int] = {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.model_dump().items())
        return f"{type(self).__name__}(dim={self.dim}, ntotal={self.ntotal}{', ' if opts else ''}{opts})"

    # -- state ---------------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        """Number of stored vectors."""
        return len(self._ids)

    @property
    def ids(self) -> tuple[str, ...]:
        """Ids of the stored vectors, in insertion order."""
        return tuple(self._ids)

    @property
    def is_trained(self) -> bool:
        """Whether :meth:`add` can store vectors without training first."""
        return True

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._positions

    # -- building ------------------------------------------------------------------------------

    def train(self, x: np.ndarray) -> None:
        """Fit what the index learns from data (IVF centroids, LSH thresholds) on ``x``.

        Indexes without training (:attr:`trainable` False) validate ``x`` and ignore it.
        Training an index that already stores vectors is refused: their codes would no longer
        match.
        """
        self._train_normalised(self._vectors(x, "training vectors"))

    def add(self, x: np.ndarray, ids: Sequence[str]) -> None:
        """Store the vectors ``x`` (float ``[N, dim]``) under ``ids`` (``N`` new, unique strings).

        Adding is incremental: earlier vectors stay, nothing is rebuilt. An untrained index is
        trained on ``x`` first. Nothing is stored if any input is refused.
        """
        x = self._vectors(x, "vectors")
        self._store(x, self._new_ids(ids, len(x)))

    def build(self: R, x: np.ndarray, ids: Sequence[str]) -> R:
        """Train on ``x`` and add it (the usual way to index an archive); returns the index."""
        x = self._vectors(x, "vectors")
        ids = self._new_ids(ids, len(x))  # refuse bad ids before spending time on training
        if len(x):
            self._train_normalised(x)
        self._store(x, ids)
        return self

    def _train_normalised(self, x: np.ndarray) -> None:
        if not self.trainable:
            return
        if self.ntotal:
            raise RetrievalError(
                f"{self.kind} index already stores {self.ntotal} vectors; retraining would "
                f"invalidate them: build a new index instead"
            )
        self._train(x)

    def _store(self, x: np.ndarray, ids: list[str]) -> None:
        if not len(x):
            return
        if not self.is_trained:
            self._train(x)
        self._add(x)
        start = len(self._ids)
        self._ids.extend(ids)
        self._positions.update((image_id, start + i) for i, image_id in enumerate(ids))

    # -- searching -----------------------------------------------------------------------------

    def search(self, q: np.ndarray, k: int) -> SearchResult:
        """The ``k`` stored vectors nearest to each query, nearest first.

        :param q: float ``[M, dim]`` (a single ``[dim]`` vector is one query).
        :param k: neighbours per query, ``1 <= k <= ntotal``.
        """
        if self.ntotal == 0:
            raise RetrievalError(f"cannot search an empty {self.kind} index: add vectors first")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise RetrievalError(f"k must be a positive integer, got {k!r}")
        if k > self.ntotal:
            raise RetrievalError(
                f"k={k} neighbours asked for, but the {self.kind} index stores only "
                f"{self.ntotal} vectors"
            )
        q = np.asarray(q)
        q = self._vectors(q[None, :] if q.ndim == 1 else q, "queries")
        if not len(q):
            return SearchResult([], np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), self.metric)
        distances, indices = self._search(q, int(k))
        indices = np.ascontiguousarray(indices, dtype=np.int64)
        distances = np.ascontiguousarray(distances, dtype=np.float32)
        distances[indices < 0] = np.inf
        ids = [[self._ids[i] for i in row if i >= 0] for row in indices.tolist()]
        return SearchResult(ids, distances, indices, self.metric)

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to ``path`` (one file, atomically); returns the path."""
        path = Path(path)
        sections = dict(self._state())
        if "ids" in sections:
            raise RuntimeError(f"{type(self).__name__}._state() must not use the section name 'ids'")
        sections["ids"] = json.dumps(self._ids, ensure_ascii=False).encode()
        header = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "metric": self.metric,
            "options": self.options.model_dump(mode="json"),
            "msk_version": _msk_version(),
        }
        write_index_file(path, header, sections)
        return path

    @classmethod
    def load(cls: type[R], path: str | os.PathLike, *, expect_dim: int | None = None,
             gpu: bool = False) -> R:
        """Read an index saved by :meth:`save`; ``Retriever.load`` reads any kind, a subclass
        only its own."""
        only_kind = None if cls is Retriever else cls
        return _load(Path(path), expect_dim, gpu, only_kind)  # type: ignore[return-value]

    # -- for subclasses ------------------------------------------------------------------------

    def _train(self, x: np.ndarray) -> None:
        """Train on normalised, validated ``x``; only indexes with :attr:`is_trained` False."""

    def _add(self, x: np.ndarray) -> None:
        """Append normalised, validated ``x`` (positions ``ntotal .. ntotal + N - 1``)."""
        raise NotImplementedError

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(distances [M, k], positions [M, k])`` for normalised ``q``, nearest first, in this
        index's :attr:`metric` (see the module docstring); position ``-1`` for missing ones."""
        raise NotImplementedError

    def _state(self) -> dict[str, bytes | np.ndarray]:
        """Named byte buffers that :meth:`_restore` turns back into this index (ids excluded)."""
        raise NotImplementedError

    def _restore(self, sections: Mapping[str, memoryview], ntotal: int) -> None:
        """Rebuild the index from :meth:`_state`'s sections; raise ``ValueError`` unless it then
        holds ``ntotal`` vectors."""
        raise NotImplementedError

    # -- validation ----------------------------------------------------------------------------

    def _vectors(self, x: Any, what: str) -> np.ndarray:
        """``x`` as a C-contiguous, L2-normalised float32 ``[N, dim]`` copy; refuses bad input."""
        x = np.asarray(x)
        if x.ndim != 2:
            raise RetrievalError(f"{what} must be a 2-D array [N, {self.dim}], got shape {x.shape}")
        if x.shape[1] != self.dim:
            raise RetrievalError(
                f"{what} have dimension {x.shape[1]}, but this {self.kind} index holds "
                f"{self.dim}-d vectors (features from another encoder?)"
            )
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise RetrievalError(f"{what} must be real numbers, got dtype {x.dtype}")
        x = np.array(x, dtype=np.float32, order="C", copy=True)
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise RetrievalError(
                f"{len(bad)} of {len(x)} {what} contain NaN or infinite values "
                f"(first: row {int(bad[0])})"
            )
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if len(x) and not norms.all():
            raise RetrievalError(
                f"{what}: row {int(np.flatnonzero(norms[:, 0] == 0)[0])} is a zero vector; "
                f"its cosine similarity is undefined"
            )
        x /= norms
        return x

    def _new_ids(self, ids: Sequence[str], n: int) -> list[str]:
        if isinstance(ids, str):
            raise RetrievalError("ids must be a sequence of strings, one per vector, not one string")
        ids = list(ids)
        if len(ids) != n:
            raise RetrievalError(f"{n} vectors but {len(ids)} ids")
        not_str = [i for i in ids if not isinstance(i, str) or not i]
        if not_str:
            raise RetrievalError(f"ids must be non-empty strings; got {not_str[0]!r}")
        seen: set[str] = set()
        dupes = []
        for image_id in ids:
            if image_id in self._positions or image_id in seen:
                dupes.append(image_id)
            seen.add(image_id)
        if dupes:
            raise RetrievalError(
                f"{len(dupes)} duplicate id(s) refused: {_some(dupes)}; each image is stored once"
            )
        return ids


def load_retriever(path: str | os.PathLike, expect_dim: int | None = None, *,
                   gpu: bool = False) -> Retriever:
    """Read an index saved by :meth:`Retriever.save`, whatever its kind.

    The kind is looked up in the plugin registry, so indexes of third-party retrievers load too.

    :param expect_dim: refuse an index whose vectors do not have this dimension.
    :param gpu: move the loaded index to the GPU.
    :raises IndexFileError: the file is missing, corrupt, truncated, from a newer msk, of an
        unknown kind or of the wrong dimension.
    """
    return _load(Path(path), expect_dim, gpu, None)


def _load(path: Path, expect_dim: int | None, gpu: bool, cls: type[Retriever] | None) -> Retriever:
    header, sections = read_index_file(path)
    kind, dim, ntotal = header["kind"], header["dim"], header["ntotal"]
    if expect_dim is not None and dim != expect_dim:
        raise IndexFileError(
            path, f"index holds {dim}-d vectors but {expect_dim}-d were expected "
                  f"(index built from another encoder's features?)"
        )
    if cls is not None and cls.kind != kind:
        raise IndexFileError(path, f"holds a {kind!r} index, not {cls.kind!r}")
    if "ids" not in sections:
        raise IndexFileError(path, "corrupt: the file has no 'ids' section")
    if cls is not None:
        index = cls(dim, gpu=gpu, **header["options"])
    else:
        from msk.core.registry import UnknownComponentError, build_retriever

        try:
            index = build_retriever(kind, dim=dim, gpu=gpu, **header["options"])
        except UnknownComponentError:
            raise IndexFileError(
                path, f"index kind {kind!r} is not provided by any installed plugin "
                      f"(run `msk plugins` to list retrievers)"
            ) from None
    try:
        ids = json.loads(bytes(sections["ids"]).decode())
        index._restore(sections, ntotal)
    except Exception as exc:  # a payload that passed its checksum but does not decode
        raise IndexFileError(path, f"cannot rebuild the {kind!r} index: {exc}") from exc
    if not isinstance(ids, list) or len(ids) != ntotal:
        raise IndexFileError(path, f"corrupt: header says {ntotal} vectors but the file has "
                                   f"{len(ids) if isinstance(ids, list) else 'no list of'} ids")
    index._ids = ids
    index._positions = {image_id: i for i, image_id in enumerate(ids)}
    if len(index._positions) != len(ids):
        raise IndexFileError(path, "corrupt: the stored ids contain duplicates")
    return index


# -- the file ----------------------------------------------------------------------------------


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``path`` for writing; on success it is fsync'ed and
    renamed over ``path`` (``os.replace``), on any error it is removed and ``path`` is left as
    it was. The file is created with owner-only permissions (it holds patient-derived data)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_index_file(path: str | os.PathLike, header: dict[str, Any],
                     sections: Mapping[str, bytes | np.ndarray]) -> None:
    """Write ``header`` and the payload ``sections`` to ``path`` in msk's index format."""
    buffers = {name: _as_bytes_view(buf) for name, buf in sections.items()}
    digest = hashlib.sha256()
    for buf in buffers.values():
        digest.update(buf)
    header = {**header, "sections": [[name, buf.nbytes] for name, buf in buffers.items()],
              "payload_sha256": digest.hexdigest()}
    head = json.dumps(header, sort_keys=True).encode()
    with atomic_write(path) as fh:
        fh.write(MAGIC)
        fh.write(_HEADER_LEN.pack(len(head)))
        fh.write(head)
        fh.write(hashlib.sha256(head).digest())
        for buf in buffers.values():
            fh.write(buf)


def read_index_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, memoryview]]:
    """Read and verify a file written by :func:`write_index_file`: ``(header, sections)``."""
    path = Path(path)
    try:
        data = memoryview(path.read_bytes())
    except FileNotFoundError:
        raise IndexFileError(path, "no such index file") from None
    except OSError as exc:
        raise IndexFileError(path, f"cannot read: {exc.strerror or exc}") from None
    if bytes(data[: len(MAGIC)]) != MAGIC:
        raise IndexFileError(path, "not an msk index file (bad magic bytes)")
    pos = len(MAGIC) + _HEADER_LEN.size
    if len(data) < pos:
        raise IndexFileError(path, "truncated: the file ends inside its header")
    (head_len,) = _HEADER_LEN.unpack(data[len(MAGIC):pos])
    if head_len > _MAX_HEADER_BYTES:
        raise IndexFileError(path, f"corrupt: implausible header length {head_len}")
    if len(data) < pos + head_len + _DIGEST_BYTES:
        raise IndexFileError(path, "truncated: the file ends inside its header")
    head = data[pos: pos + head_len]
    pos += head_len
    if hashlib.sha256(head).digest() != bytes(data[pos: pos + _DIGEST_BYTES]):
        raise IndexFileError(path, "corrupt: the header does not match its checksum")
    pos += _DIGEST_BYTES
    try:
        header = json.loads(bytes(head).decode())
        header_ok = isinstance(header, dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        header_ok = False
    if not header_ok:
        raise IndexFileError(path, "corrupt: the header is not a JSON object")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise IndexFileError(
            path, f"written in index format {version!r} by msk {header.get('msk_version', '?')}; "
                  f"this msk ({_msk_version()}) reads format {FORMAT_VERSION} or older: upgrade msk"
        )
    missing = {"kind", "dim", "ntotal", "options", "sections", "payload_sha256"} - header.keys()
    if missing:
        raise IndexFileError(path, f"corrupt: header lacks {', '.join(sorted(missing))}")
    try:
        layout = [(str(name), int(nbytes)) for name, nbytes in header["sections"]]
    except (TypeError, ValueError):
        raise IndexFileError(path, "corrupt: malformed section table in the header") from None
    expected = pos + sum(n for _, n in layout)
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "corrupt: trailing bytes"
        raise IndexFileError(path, f"{state}: expected {expected} bytes, the file has {len(data)}")
    payload = data[pos:]
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise IndexFileError(path, "corrupt: the payload does not match its sha256 checksum")
    sections: dict[str, memoryview] = {}
    for name, nbytes in layout:
        sections[name] = data[pos: pos + nbytes]
        pos += nbytes
    return header, sections


def _as_bytes_view(buf: bytes | np.ndarray) -> memoryview:
    if isinstance(buf, np.ndarray):
        return memoryview(np.ascontiguousarray(buf).view(np.uint8).reshape(-1))
    return memoryview(buf).cast("B")


def _msk_version() -> str:
    from msk import __version__

    return __version__


def _some(items: Sequence[Any], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")
