"""Built-in retrievers for the recommender, all on faiss: exact search ("flat"), locality-sensitive
hashing ("lsh"), a graph index ("hnsw") and an inverted file ("ivf").

All four store L2-normalised vectors (see :mod:`msk.core.models.retrieval` for the interface, the
distances and the file format). The defaults below were chosen from ``bench/retrieval.py``; the
measurements and the reasons are in ``docs/recommender.md``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

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
    metric: Metric = "ip"
    gpu_support = True

    def _new_index(self) -> Any:
        import faiss

        return faiss.IndexFlatIP(self.dim)


class LSHOptions(MskConfig):
    nbits: int = Field(128, ge=1, le=65536,
                       description="hash bits per vector (code size nbits/8 bytes); itq uses at most dim bits and "
                                   "fewer than its training vectors (the bits used are recorded)")
    hashing: Literal["itq", "rotation"] = Field(
        "itq", description="itq: PCA to nbits dimensions + a learned rotation (iterative quantization), sign bits; "
                           "rotation: random rotation to nbits dimensions, one bit per dimension above its median")
    rerank: int = Field(400, ge=0, description="re-rank rerank*k Hamming candidates by exact cosine (keeps the "
                                               "float vectors, dim*4 bytes each); 0: Hamming distances only")


class LSHRetriever(FaissRetriever):
    """Binary hash codes searched by Hamming distance, optionally re-ranked exactly.

    Every vector is hashed to ``nbits`` bits and a query scans all codes by Hamming distance
    (faiss's popcount kernels): the locality-sensitive hashing of the paper. Two hashings:

    * ``itq`` (default): PCA to ``nbits`` dimensions and iterative quantization (Gong &
      Lazebnik 2011: the rotation that makes the signs lose least), ``faiss.ITQTransform`` +
      ``IndexLSH``; the codes follow the data, so fewer bits suffice;
    * ``rotation``: a random rotation to ``nbits`` dimensions and one bit per dimension (above or
      below its median on the training vectors), ``faiss.IndexLSH``; data-independent.

    With ``rerank > 0`` (default 400) the ``rerank * k`` nearest codes are re-ranked by exact cosine
    against the stored float vectors (``faiss.IndexRefineFlat``): distances are then
    ``1 - cosine`` (metric ``"ip"``) and recall@10 against exact search is 0.95 or more at 1M
    vectors (``docs/recommender.md``), at the price of keeping the vectors (``dim * 4`` bytes
    each besides the ``nbits / 8``-byte code). ``rerank=0`` keeps the codes only and returns
    Hamming distances in bits (metric ``"hamming"``). ``rerank`` may be changed between
    searches as long as it stays above 0 (or stays 0). Training (the PCA, rotation or medians)
    happens on the first :meth:`add` if :meth:`train` or :meth:`build` was not called: train on
    a representative sample, not on a handful of vectors.
    """

    kind = "lsh"
    metric: Metric = "hamming"
    Options = LSHOptions
    trainable = True

    def __init__(self, dim: int, *, gpu: bool = False, **options: Any):
        super().__init__(dim, gpu=gpu, **options)
        opts = self.options
        if opts.hashing == "itq" and opts.nbits > self.dim:
            opts.nbits = self.dim  # PCA cannot give more dimensions than the vectors have
        self.metric = "ip" if opts.rerank else "hamming"

    def _new_index(self) -> Any:
        return self._factory_index(self.options.nbits)

    def _factory_index(self, nbits: int) -> Any:
        import faiss

        codes = f"ITQ{nbits},LSH" if self.options.hashing == "itq" else f"LSH{nbits}rt"
        # The random rotation is set up by many tiny OpenMP loops: single-threaded it takes
        # 0.16 s for 512 -> 1024 bits, with 2 threads on a busy 2-core machine 10 s.
        with _omp_threads(1):
            return faiss.index_factory(self.dim, codes + (",RFlat" if self.options.rerank else ""))

    def _train(self, x: np.ndarray) -> None:
        if self.options.hashing == "itq" and len(x) <= self.options.nbits:
            # PCA to nbits dimensions needs more than nbits training vectors
            self.options.nbits = max(1, len(x) - 1)
            self._index = self._factory_index(self.options.nbits)
        super()._train(x)

    def _configure(self, index: Any) -> None:
        refine = hasattr(index, "k_factor")
        if refine != bool(self.options.rerank):
            raise RetrievalError(
                f"lsh index built with rerank={'>0' if refine else '0'} cannot search with "
                f"rerank={self.options.rerank}: re-ranking needs the float vectors stored at build "
                f"time; build a new index"
            )
        if refine:
            index.k_factor = float(self.options.rerank)

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self._configure(self.index)
        distances, positions = self.index.search(q, k)
        if self.options.rerank:  # squared L2 of unit vectors = 2 - 2 cosine
            return np.clip(distances / 2.0, 0.0, 2.0), positions
        return distances, positions

    def _restore(self, sections: Mapping[str, memoryview], ntotal: int) -> None:
        super()._restore(sections, ntotal)
        import faiss

        # files from before hashing/rerank existed hold a bare IndexLSH (random rotation, no re-ranking)
        if isinstance(faiss.downcast_index(self._index), faiss.IndexLSH) and self.options.rerank:
            self.options.hashing, self.options.rerank, self.metric = "rotation", 0, "hamming"


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
    metric: Metric = "ip"
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
    metric: Metric = "ip"
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
                      "hash codes + Hamming search, exact re-ranking (faiss ITQ/IndexLSH + IndexRefineFlat; "
                      "nbits, hashing, rerank)"),
        RetrieverSpec("hnsw", _factory(HNSWRetriever),
                      "HNSW graph, cosine (faiss IndexHNSWFlat; m, ef_construction, ef_search)"),
        RetrieverSpec("ivf", _factory(IVFRetriever),
                      "inverted file, cosine (faiss IndexIVFFlat; nlist, nprobe); CPU or GPU",
                      example_options={"nlist": 16, "nprobe": 4}),
    ]
