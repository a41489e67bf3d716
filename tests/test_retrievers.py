"""Retrievers: exactness, recall of the approximate indexes, incremental add, refusals of bad
input, and the index file (round trip, corruption, atomic writes)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from msk.core.errors import ConfigError
from msk.core.models import retrieval
from msk.core.models.retrieval import (
    IndexFileError,
    RetrievalError,
    Retriever,
    atomic_write,
    load_retriever,
    write_index_file,
)
from msk.core.registry import build_retriever, get_registry
from msk.plugins.retrievers import FlatRetriever, HNSWRetriever

DIM = 32
# Small enough for a fast test, large enough for each index to be meaningful.
OPTIONS = {
    "flat": {},
    "lsh": {"nbits": 32, "rerank": 10},  # 100 candidates of 2000 re-ranked: not exhaustive
    "hnsw": {"m": 16},
    "ivf": {"nlist": 16, "nprobe": 4},
}
# recall@10 against exact search on the structured toy set, measured over 5 seeds:
# lsh (itq, 32 bits, rerank 10) 0.935-0.964, hnsw 1.00, ivf 0.995-1.00; thresholds leave a margin.
# The Hamming-only lsh of before (random rotation, 256 or 1024 bits, no re-ranking) had
# 0.68-0.71 and 0.81-0.84: below the bound (test_hamming_only_lsh_misses_the_bound).
MIN_RECALL = {"lsh": 0.9, "hnsw": 0.95, "ivf": 0.95}
HAMMING_ONLY = {"nbits": 1024, "hashing": "rotation", "rerank": 0}


def structured(n: int, dim: int = DIM, latent: int = 8, clusters: int = 20, seed: int = 0):
    """Vectors like image features: a mixture of clusters on a low-dimensional subspace plus
    a little isotropic noise (not iid noise, on which no approximate index can do well)."""
    rng = np.random.default_rng(seed)
    lift = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T
    centres = rng.standard_normal((clusters, latent))
    labels = rng.integers(0, clusters, n)
    x = (centres[labels] + 0.5 * rng.standard_normal((n, latent))) @ lift
    x += 0.1 * rng.standard_normal((n, dim))
    return x.astype(np.float32), labels


@pytest.fixture(scope="module")
def toy():
    x, _ = structured(2100)
    return x[:2000], [f"img-{i:05d}" for i in range(2000)], x[2000:]


@pytest.fixture(scope="module")
def built(toy):
    db, ids, _ = toy
    return {kind: build_retriever(kind, dim=DIM, **opts).build(db, ids) for kind, opts in OPTIONS.items()}


def cosine_neighbours(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    db = db / np.linalg.norm(db, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    sim = q.astype(np.float64) @ db.T.astype(np.float64)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return order, 1 - np.take_along_axis(sim, order, axis=1)


def test_builtins_are_registered():
    assert set(OPTIONS) <= set(get_registry().names("retriever"))


@pytest.mark.parametrize("kind", OPTIONS)
def test_search_result_shape_and_order(built, toy, kind):
    index = built[kind]
    result = index.search(toy[2], k=7)
    assert index.ntotal == 2000 and index.dim == DIM
    assert result.distances.shape == result.indices.shape == (100, 7)
    assert result.distances.dtype == np.float32 and result.indices.dtype == np.int64
    assert (np.diff(result.distances, axis=1) >= 0).all(), "neighbours must be nearest first"
    assert result.ids == [[toy[1][i] for i in row] for row in result.indices]
    assert result.metric == index.metric


def test_flat_is_exact(built, toy):
    db, ids, q = toy
    result = built["flat"].search(q, k=5)
    order, dist = cosine_neighbours(db, q, 5)
    np.testing.assert_array_equal(result.indices[:, 0], order[:, 0])
    np.testing.assert_allclose(result.distances, dist, atol=1e-5)
    assert result.ids[0][0] == ids[order[0, 0]]


def test_a_stored_vector_is_its_own_nearest_neighbour(built, toy):
    db, ids, _ = toy
    for kind in OPTIONS:
        result = built[kind].search(db[:20], k=1)
        assert [r[0] for r in result.ids] == ids[:20], kind
        assert np.allclose(result.distances[:, 0], 0, atol=1e-5), kind


@pytest.mark.parametrize("kind", MIN_RECALL)
def test_approximate_recall_at_10(built, toy, kind):
    truth = built["flat"].search(toy[2], k=10).indices
    found = built[kind].search(toy[2], k=10).indices
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert recall >= MIN_RECALL[kind], f"{kind} recall@10 {recall:.3f}"


def test_hamming_only_lsh_misses_the_bound(built, toy):
    """The bound above is one the paper's plain Hamming ranking (the old lsh) does not reach,
    even with 32 times the bits: the re-ranking is what earns it."""
    db, ids, q = toy
    truth = built["flat"].search(q, k=10).indices
    old = build_retriever("lsh", dim=DIM, **HAMMING_ONLY).build(db, ids)
    assert old.metric == "hamming" and old.search(q[:1], k=1).distances.max() <= 1024
    found = old.search(q, k=10).indices
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert recall < MIN_RECALL["lsh"], f"Hamming-only lsh recall@10 {recall:.3f}"


def test_lsh_rerank_gives_cosine_distances(built, toy):
    db, _, q = toy
    result = built["lsh"].search(q, k=5)
    assert built["lsh"].metric == result.metric == "ip"
    dbn = db / np.linalg.norm(db, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    cosine = np.einsum("md,mkd->mk", qn, dbn[result.indices])
    np.testing.assert_allclose(result.distances, 1 - cosine, atol=1e-5)


def test_lsh_itq_bits_are_bounded_by_dim_and_training_vectors(toy):
    db, ids, q = toy
    wide = build_retriever("lsh", dim=DIM, nbits=128)
    assert wide.options.nbits == DIM  # PCA cannot give more dimensions than the vectors have
    few = build_retriever("lsh", dim=DIM).build(db[:10], ids[:10])
    assert few.options.nbits == 9 and few.search(db[:3], k=1).ids == [[i] for i in ids[:3]]
    assert build_retriever("lsh", dim=DIM, hashing="rotation", nbits=128).options.nbits == 128


def test_lsh_rerank_cannot_be_switched_on_a_built_index(toy):
    db, ids, q = toy
    index = build_retriever("lsh", dim=DIM, nbits=16, rerank=0).build(db[:200], ids[:200])
    index.options.rerank = 4
    with pytest.raises(RetrievalError, match="rerank=0 cannot search with rerank=4"):
        index.search(q[:1], k=1)


def test_lsh_file_of_the_hamming_only_format_loads(toy, tmp_path):
    """A file written before hashing/rerank existed (a bare IndexLSH, options {"nbits": N})."""
    import faiss

    db, ids, q = toy
    old = build_retriever("lsh", dim=DIM, **HAMMING_ONLY).build(db[:300], ids[:300])
    write_index_file(tmp_path / "old.mskidx",
                     {"format_version": 1, "kind": "lsh", "dim": DIM, "ntotal": 300, "metric": "hamming",
                      "options": {"nbits": 1024}, "msk_version": "0"},
                     {"faiss": faiss.serialize_index(old.index),
                      "ids": json.dumps(ids[:300]).encode()})
    loaded = load_retriever(tmp_path / "old.mskidx")
    assert (loaded.options.hashing, loaded.options.rerank, loaded.metric) == ("rotation", 0, "hamming")
    np.testing.assert_array_equal(loaded.search(q, k=5).indices, old.search(q, k=5).indices)


def test_vectors_are_normalised(built, toy):
    db, ids, q = toy
    scaled = FlatRetriever(DIM).build(db * 7.5, ids)
    a, b = scaled.search(q * 0.01, k=5), built["flat"].search(q, k=5)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.distances, b.distances, atol=1e-5)


def test_single_query_vector_and_empty_batch(built, toy):
    one = built["flat"].search(toy[2][0], k=3)
    assert one.distances.shape == (1, 3)
    empty = built["flat"].search(np.zeros((0, DIM), np.float32), k=3)
    assert len(empty) == 0 and empty.indices.shape == (0, 3)


@pytest.mark.parametrize("kind", OPTIONS)
def test_incremental_add_finds_the_new_vector(toy, kind):
    db, ids, q = toy
    index = build_retriever(kind, dim=DIM, **OPTIONS[kind]).build(db[:1500], ids[:1500])
    index.add(db[1500:], ids[1500:])
    assert index.ntotal == 2000
    result = index.search(db[1990:], k=1)
    assert [r[0] for r in result.ids] == ids[1990:]
    assert "img-01999" in index and index.ids[-1] == "img-01999"


@pytest.mark.parametrize("kind", OPTIONS)
def test_save_load_round_trip(built, toy, tmp_path, kind):
    index, q = built[kind], toy[2]
    path = index.save(tmp_path / f"{kind}.mskidx")
    assert sorted(os.listdir(tmp_path)) == [f"{kind}.mskidx"], "no temporary file may be left"
    for loaded in (load_retriever(path, expect_dim=DIM), type(index).load(path), Retriever.load(path)):
        assert type(loaded) is type(index)
        assert (loaded.kind, loaded.dim, loaded.ntotal, loaded.ids) == (kind, DIM, 2000, index.ids)
        assert loaded.options == index.options
        before, after = index.search(q, k=5), loaded.search(q, k=5)
        assert after.ids == before.ids
        np.testing.assert_array_equal(after.distances, before.distances)
    loaded.add(q[:1], ["new-image"])  # a loaded index keeps growing, and still refuses duplicates
    assert loaded.search(q[:1], k=1).ids == [["new-image"]]
    with pytest.raises(RetrievalError, match="duplicate"):
        loaded.add(q[1:2], [index.ids[0]])


def test_header_records_the_index(built, tmp_path):
    path = built["hnsw"].save(tmp_path / "h.mskidx")
    header, sections = retrieval.read_index_file(path)
    assert header["format_version"] == retrieval.FORMAT_VERSION
    assert (header["kind"], header["dim"], header["ntotal"], header["metric"]) == ("hnsw", DIM, 2000, "ip")
    assert header["options"] == {"m": 16, "ef_construction": 80, "ef_search": 128}
    assert header["msk_version"] and len(header["payload_sha256"]) == 64
    assert set(sections) == {"faiss", "ids"}


def test_fewer_than_k_found_is_padded(toy):
    db, ids, q = toy
    index = build_retriever("ivf", dim=DIM, nlist=16, nprobe=1).build(db, ids)
    result = index.search(q[:5], k=600)  # one cell of ~125 vectors cannot supply 600
    missing = result.indices < 0
    assert missing.any() and (result.indices[~missing] >= 0).all()
    assert np.isinf(result.distances[missing]).all() and np.isfinite(result.distances[~missing]).all()
    assert [len(r) for r in result.ids] == list((~missing).sum(axis=1))
    assert [len(r) for r in result.labels(ids)] == [len(r) for r in result.ids]


def test_search_time_options_can_change(built, toy):
    index = built["ivf"]
    try:
        index.options.nprobe = 16  # all cells: exact
        assert index.search(toy[2], k=5).ids == built["flat"].search(toy[2], k=5).ids
        with pytest.raises(ValueError):
            index.options.nprobe = 0
    finally:
        index.options.nprobe = OPTIONS["ivf"]["nprobe"]


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", OPTIONS)
def test_searching_an_empty_index_is_an_error(kind):
    index = build_retriever(kind, dim=DIM, **OPTIONS[kind])
    with pytest.raises(RetrievalError, match=f"cannot search an empty {kind} index"):
        index.search(np.ones((1, DIM), np.float32), k=1)


def test_k_must_fit_the_index(built, toy):
    with pytest.raises(RetrievalError, match="k=2001 neighbours asked for, but the flat index stores "
                                             "only 2000"):
        built["flat"].search(toy[2], k=2001)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(RetrievalError, match="k must be a positive integer"):
            built["flat"].search(toy[2], k=bad)


@pytest.mark.parametrize("bad, message", [
    (np.nan, "contain NaN or infinite values"),
    (np.inf, "contain NaN or infinite values"),
])
def test_non_finite_vectors_are_refused(toy, bad, message):
    db, ids, q = toy
    index = FlatRetriever(DIM).build(db[:10], ids[:10])
    x = db[10:13].copy()
    x[1, 4] = bad
    with pytest.raises(RetrievalError, match=f"1 of 3 vectors {message} \\(first: row 1\\)"):
        index.add(x, ids[10:13])
    assert index.ntotal == 10, "a refused add stores nothing"
    with pytest.raises(RetrievalError, match=f"queries {message}"):
        index.search(x, k=1)


def test_wrong_dimension_and_shape_are_refused(toy):
    db, ids, _ = toy
    index = FlatRetriever(DIM).build(db[:10], ids[:10])
    with pytest.raises(RetrievalError, match="vectors have dimension 16, but this flat index holds 32-d"):
        index.add(db[10:12, :16], ids[10:12])
    with pytest.raises(RetrievalError, match="queries have dimension 64"):
        index.search(np.ones((2, 64), np.float32), k=1)
    with pytest.raises(RetrievalError, match="must be a 2-D array"):
        index.add(db[None, :3], ids[:3])
    with pytest.raises(RetrievalError, match="row 1 is a zero vector"):
        index.add(np.stack([db[11], np.zeros(DIM, np.float32)]), ["a", "b"])
    with pytest.raises(RetrievalError, match="dim must be a positive integer"):
        FlatRetriever(0)


def test_ids_are_checked(toy):
    db, ids, _ = toy
    index = FlatRetriever(DIM).build(db[:10], ids[:10])
    with pytest.raises(RetrievalError, match=r"2 duplicate id\(s\) refused: 'img-00003', 'x'"):
        index.add(db[10:13], ["img-00003", "x", "x"])
    with pytest.raises(RetrievalError, match="3 vectors but 2 ids"):
        index.add(db[10:13], ["a", "b"])
    with pytest.raises(RetrievalError, match="non-empty strings"):
        index.add(db[10:12], ["a", 7])
    with pytest.raises(RetrievalError, match="not one string"):
        index.add(db[10:11], "a")
    assert index.ntotal == 10


def test_options_are_validated():
    with pytest.raises(ConfigError, match="nprobe=32 exceeds nlist=16"):
        build_retriever("ivf", dim=DIM, nlist=16, nprobe=32)
    with pytest.raises(ConfigError, match="efsearch"):
        build_retriever("hnsw", dim=DIM, efsearch=10)
    with pytest.raises(ConfigError, match="nbits"):
        build_retriever("lsh", dim=DIM, nbits=0)


def test_ivf_needs_enough_training_vectors(toy):
    db, ids, _ = toy
    index = build_retriever("ivf", dim=DIM, nlist=64)
    with pytest.raises(RetrievalError, match="nlist=64 needs at least 64 training vectors, got 40"):
        index.add(db[:40], ids[:40])
    assert index.ntotal == 0 and not index.is_trained
    index.add(db[:100], ids[:100])  # trained on its first add
    assert index.is_trained and index.ntotal == 100
    with pytest.raises(RetrievalError, match="retraining would invalidate them"):
        index.train(db)


def test_gpu_without_faiss_gpu_is_a_clear_error():
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss has a GPU here")
    with pytest.raises(RetrievalError, match="gpu=True"):
        build_retriever("flat", dim=DIM, gpu=True)
    with pytest.raises(RetrievalError, match="no GPU implementation of the hnsw index"):
        build_retriever("hnsw", dim=DIM, gpu=True)


def test_search_result_labels(built, toy):
    result = built["flat"].search(toy[2][:3], k=3)
    labels = [f"class-{i % 4}" for i in range(2000)]
    by_id = dict(zip(toy[1], labels))
    assert result.labels(labels) == result.labels(by_id)
    assert result.labels(labels)[0] == [labels[i] for i in result.indices[0]]
    with pytest.raises(RetrievalError, match="one label per stored vector"):
        result.labels(labels[:1])


# -- the file ---------------------------------------------------------------------------------


@pytest.fixture
def saved(built, tmp_path):
    return built["flat"].save(tmp_path / "flat.mskidx")


def _header_end(path) -> int:
    data = path.read_bytes()
    (n,) = retrieval._HEADER_LEN.unpack(data[8:12])
    return 12 + n + 32


@pytest.mark.parametrize("where, reason", [
    ("magic", "not an msk index file"),
    ("header", "corrupt: the header does not match its checksum"),
    ("digest", "corrupt: the header does not match its checksum"),
    ("payload", "corrupt: the payload does not match its sha256 checksum"),
    ("last", "corrupt: the payload does not match its sha256 checksum"),
])
def test_a_flipped_byte_is_detected(saved, where, reason):
    data = bytearray(saved.read_bytes())
    end = _header_end(saved)
    offset = {"magic": 0, "header": 20, "digest": end - 1, "payload": end + 100, "last": len(data) - 1}[where]
    data[offset] ^= 0x01
    saved.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match=reason) as exc:
        load_retriever(saved)
    assert str(saved) in str(exc.value)


@pytest.mark.parametrize("keep", [0, 5, 10, 40, "header", "payload", -1])
def test_a_truncated_file_is_detected(saved, keep):
    data = saved.read_bytes()
    ends = {"header": _header_end(saved), "payload": _header_end(saved) + 1000, -1: len(data) - 1}
    n = ends.get(keep, keep)
    saved.write_bytes(data[:n])
    with pytest.raises(IndexFileError, match="truncated|not an msk index file") as exc:
        load_retriever(saved)
    assert str(saved) in str(exc.value)


def test_trailing_bytes_are_detected(saved):
    saved.write_bytes(saved.read_bytes() + b"\0")
    with pytest.raises(IndexFileError, match="corrupt: trailing bytes"):
        load_retriever(saved)


def test_missing_file(tmp_path):
    with pytest.raises(IndexFileError, match="nothing.mskidx: no such index file"):
        load_retriever(tmp_path / "nothing.mskidx")


def test_dimension_and_kind_mismatch(saved):
    with pytest.raises(IndexFileError, match="holds 32-d vectors but 512-d were expected") as exc:
        load_retriever(saved, expect_dim=512)
    assert str(saved) in str(exc.value)
    with pytest.raises(IndexFileError, match="holds a 'flat' index, not 'hnsw'"):
        HNSWRetriever.load(saved)


def _write(path, **header):
    base = {"format_version": 1, "kind": "flat", "dim": DIM, "ntotal": 0, "metric": "ip",
            "options": {}, "msk_version": "0"}
    write_index_file(path, {**base, **header}, {"ids": json.dumps([]).encode()})
    return path


def test_newer_format_is_refused(tmp_path):
    path = _write(tmp_path / "future.mskidx", format_version=99, msk_version="9.0")
    with pytest.raises(IndexFileError, match="index format 99 by msk 9.0; .* upgrade msk"):
        load_retriever(path)


def test_unknown_kind_is_refused(tmp_path):
    path = _write(tmp_path / "odd.mskidx", kind="annoy")
    with pytest.raises(IndexFileError, match="index kind 'annoy' is not provided by any installed plugin"):
        load_retriever(path)


def test_undecodable_payload_is_refused(tmp_path):
    path = tmp_path / "bad.mskidx"
    write_index_file(path, {"format_version": 1, "kind": "flat", "dim": DIM, "ntotal": 1,
                            "metric": "ip", "options": {}, "msk_version": "0"},
                     {"faiss": b"not a faiss index", "ids": b'["a"]'})
    with pytest.raises(IndexFileError, match="bad.mskidx: cannot rebuild the 'flat' index"):
        load_retriever(path)


def test_failed_save_leaves_the_old_file_untouched(built, saved, monkeypatch):
    before = saved.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(retrieval.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        built["hnsw"].save(saved)
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name], "the temporary file must be removed"


def test_atomic_write_leaves_nothing_when_interrupted_mid_write(tmp_path):
    target = tmp_path / "index.mskidx"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as fh:
            fh.write(b"MSKINDEX partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
