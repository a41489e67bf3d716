"""Built-in retrievers for the recommender, all on faiss: exact search ("flat"), locality-sensitive
hashing ("lsh"), a graph index ("hnsw") and an inverted file ("ivf").

All four store L2-normalised vectors (see :mod:`msk.core.models.retrieval` for the interface, the
distances and the file format). The defaults below were chosen from ``bench/retrieval.py``; the
measurements and the reasons are in ``docs/recommender.md``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, model_validator

from msk.core.config import MskConfig
from msk.core.hookspecs import hookimpl
from msk.core.models.retrieval import Metric, RetrievalError, Retriever
from msk.core.specs import RetrieverSpec


class FaissRetriever(Retriever):
    """A :class:`Retriever` backed by one faiss index, kept in :attr:`index`.

    Subclasses implement :meth:`_new_index` and, where options act at search time,
    :meth:`_configure`. ``gpu=True`` moves the index to GPU 0 with ``faiss.index_cpu_to_gpu``
    where faiss has a GPU implementation of it (:attr:`gpu_support`); it is saved from, and
    loaded to, the CPU.
    """

    gpu_support: ClassVar[bool] = False

    def __init__(self, dim: int, *, gpu: bool = False, **options: Any):
        super().__init__(dim, gpu=gpu, **options)
        self._gpu_resources = self._gpu_setup() if self.gpu else None
        self._index: Any = None

    @property
    def index(self) -> Any:
        """The faiss index, created on first use (a loaded index never builds an empty one)."""
        if self._index is None:
            self._index = self._on_device(self._new_index())
        return self._index

    def _new_index(self) -> Any:
        raise NotImplementedError

    def _configure(self, index: Any) -> None:
        """Apply options that faiss keeps as mutable index parameters (called before use)."""

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def _train(self, x: np.ndarray) -> None:
        self._configure(self.index)
        self.index.train(x)

    def _add(self, x: np.ndarray) -> None:
        self._configure(self.index)
        self.index.add(x)

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self._configure(self.index)
        scores, positions = self.index.search(q, k)
        if self.metric == "ip":  # faiss returns similarities, highest first
            return np.clip(1.0 - scores, 0.0, 2.0), positions
        return scores, positions

    def _state(self) -> dict[str, np.ndarray]:
        import faiss

        index = faiss.index_gpu_to_cpu(self.index) if self._gpu_resources is not None else self.index
        return {"faiss": faiss.serialize_index(index)}

    def _restore(self, sections: Mapping[str, memoryview], ntotal: int) -> None:
        import faiss

        index = faiss.deserialize_index(np.frombuffer(sections["faiss"], dtype=np.uint8))
        if index.d != self.dim or index.ntotal != ntotal:
            raise ValueError(
                f"the faiss index holds {index.ntotal} {index.d}-d vectors; the header says "
                f"{ntotal} {self.dim}-d"
            )
        self._index = self._on_device(index)

    def _on_device(self, index: Any) -> Any:
        if self._gpu_resources is None:
            return index
        import faiss

        return faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)

    def _gpu_setup(self) -> Any:
        import faiss

        if not self.gpu_support:
            raise RetrievalError(
                f"faiss has no GPU implementation of the {self.kind} index; use gpu=False "
                f"(the flat and ivf retrievers run on the GPU)"
            )
        if not hasattr(faiss, "StandardGpuResources"):
            raise RetrievalError(
                f"gpu=True needs faiss with GPU support; the installed faiss {faiss.__version__} "
                f"is CPU-only (pip uninstall faiss-cpu, then pip install 'msk[gpu]')"
            )
        if faiss.get_num_gpus() < 1:
            raise RetrievalError("gpu=True but faiss sees no CUDA GPU")
        return faiss.StandardGpuResources()


class FlatRetriever(FaissRetriever):
    """Exact search: inner product of normalised vectors (cosine) against every stored vector
    (``faiss.IndexFlatIP``). The reference the approximate indexes are measured against; on 2
    CPU cores about 8 ms per query over 1M 512-d vectors."""

    kind = "flat"
    metric: ClassVar[Metric] = "ip"
    gpu_support = True

    def _new_index(self) -> Any:
        import faiss

        return faiss.IndexFlatIP(self.dim)


class LSHOptions(MskConfig):
    nbits: int = Field(1024, ge=8, le=65536, description="hash bits per vector (code size nbits/8 bytes)")


class LSHRetriever(FaissRetriever):
    """Locality-sensitive hashing (``faiss.IndexLSH``): a random rotation of the normalised
    vector to ``nbits`` dimensions, one bit per dimension (above or below that dimension's
    median on the training vectors), and an exhaustive Hamming-distance scan of the codes.
    Distances are Hamming distances in bits. Training (the medians) happens on the first
    :meth:`add` if :meth:`train` or :meth:`build` was not called: train on a representative
    sample, not on a handful of vectors."""

    kind = "lsh"
    metric: ClassVar[Metric] = "hamming"
    Options = LSHOptions
    trainable = True

    def _new_index(self) -> Any:
        import faiss

        # The random rotation is set up by many tiny OpenMP loops: single-threaded it takes
        # 0.16 s for 512 -> 1024 bits, with 2 threads on a busy 2-core machine 10 s.
        with _omp_threads(1):
            return faiss.IndexLSH(self.dim, self.options.nbits, True, True)


class HNSWOptions(MskConfig):
    m: int = Field(32, ge=2, le=256, description="graph neighbours per node (faiss's M)")
    ef_construction: int = Field(80, ge=1, description="candidate list size while inserting")
    ef_search: int = Field(128, ge=1,
                           description="candidate list size while searching (at least k is used)")


class HNSWRetriever(FaissRetriever):
    """Hierarchical navigable small-world graph over the normalised vectors with inner-product
    distance (``faiss.IndexHNSWFlat``). No training; vectors can be added at any time.
    ``ef_search`` may be changed between searches (``index.options.ef_search = 128``)."""

    kind = "hnsw"
    metric: ClassVar[Metric] = "ip"
    Options = HNSWOptions

    def _new_index(self) -> Any:
        import faiss

        return faiss.IndexHNSWFlat(self.dim, self.options.m, faiss.METRIC_INNER_PRODUCT)

    def _configure(self, index: Any) -> None:
        index.hnsw.efConstruction = self.options.ef_construction
        index.hnsw.efSearch = self.options.ef_search


class IVFOptions(MskConfig):
    nlist: int = Field(1024, ge=1, description="k-means cells; training needs at least nlist vectors")
    nprobe: int = Field(16, ge=1, description="cells visited per query")

    @model_validator(mode="after")
    def _nprobe_within_nlist(self) -> IVFOptions:
        if self.nprobe > self.nlist:
            raise ValueError(f"nprobe={self.nprobe} exceeds nlist={self.nlist}")
        return self


class IVFRetriever(FaissRetriever):
    """Inverted file (``faiss.IndexIVFFlat``, inner product): k-means splits the space into
    ``nlist`` cells, a query scans the ``nprobe`` nearest cells exactly. Trained on the first
    :meth:`add` when :meth:`train` or :meth:`build` was not called; that needs at least
    ``nlist`` vectors (faiss advises 39 per cell). ``nprobe`` may be changed between
    searches."""

    kind = "ivf"
    metric: ClassVar[Metric] = "ip"
    Options = IVFOptions
    trainable = True
    gpu_support = True

    def _new_index(self) -> Any:
        import faiss

        quantizer = faiss.IndexFlatIP(self.dim)
        return faiss.IndexIVFFlat(quantizer, self.dim, self.options.nlist, faiss.METRIC_INNER_PRODUCT)

    def _train(self, x: np.ndarray) -> None:
        if len(x) < self.options.nlist:
            raise RetrievalError(
                f"ivf index with nlist={self.options.nlist} needs at least {self.options.nlist} "
                f"training vectors, got {len(x)}: lower nlist (about sqrt(N) to 4*sqrt(N), with "
                f"39 or more vectors per cell) or train on more vectors"
            )
        super()._train(x)

    def _configure(self, index: Any) -> None:
        index.nprobe = self.options.nprobe


@contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    """Run the body with faiss using ``n`` OpenMP threads, then restore the previous number."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _factory(cls: type[FaissRetriever]):
    def build(name: str, dim: int, **options: Any) -> FaissRetriever:
        return cls(dim, **options)

    build.__doc__ = f"Build a {cls.__name__}(dim, gpu=False, **options)."
    return build


@hookimpl
def msk_retrievers() -> list[RetrieverSpec]:
    return [
        RetrieverSpec("flat", _factory(FlatRetriever),
                      "exact cosine search (faiss IndexFlatIP); CPU or GPU"),
        RetrieverSpec("lsh", _factory(LSHRetriever),
                      "locality-sensitive hashing, Hamming distance (faiss IndexLSH; nbits)"),
        RetrieverSpec("hnsw", _factory(HNSWRetriever),
                      "HNSW graph, cosine (faiss IndexHNSWFlat; m, ef_construction, ef_search)"),
        RetrieverSpec("ivf", _factory(IVFRetriever),
                      "inverted file, cosine (faiss IndexIVFFlat; nlist, nprobe); CPU or GPU",
                      example_options={"nlist": 16, "nprobe": 4}),
    ]
