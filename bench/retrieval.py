"""Benchmark the recommender's retrievers: build time, latency, throughput, memory, recall.

For each database size, stores ``N`` structured 512-d vectors (a mixture of clusters on a
64-d subspace with isotropic noise, L2-normalised: closer to image features than iid noise) in
every retriever and measures

* build: train + add, seconds;
* latency of single queries (batch 1) through the public ``search`` API: wall-clock p50 and
  p99 in ms, and process CPU ms per query (robust to other load on the machine);
* throughput at batch 256, queries per second;
* index file size (``save``) and the process's RSS growth while building, in MB; save and
  load times;
* recall@10 against exact search, and cluster precision@10 (share of the 10 neighbours from
  the query's cluster: what a label vote sees).

Never run by pytest. Example (the numbers in docs/recommender.md)::

    python bench/retrieval.py --sizes 100000,1000000 --queries 1000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from msk.core.models.retrieval import Retriever, load_retriever
from msk.core.registry import build_retriever

console = Console()
K = 10


def structured_vectors(n: int, dim: int = 512, *, latent: int = 64, clusters: int = 200,
                       spread: float = 0.5, noise: float = 0.35, seed: int = 0,
                       chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """``n`` L2-normalised float32 vectors and their cluster labels.

    Cluster centres are standard normal in a ``latent``-d space, cluster sizes follow a
    Dirichlet draw (unbalanced, like tumour entities), points scatter around their centre with
    standard deviation ``spread``; the latent space is lifted to ``dim`` by a random orthonormal
    map, and isotropic noise of total norm about ``noise`` is added before normalising.
    Everything depends on ``seed`` only.
    """
    rng = np.random.default_rng(seed)
    lift = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T.astype(np.float32)
    centres = rng.standard_normal((clusters, latent)).astype(np.float32)
    weights = rng.dirichlet(np.full(clusters, 2.0))
    return _draw(n, lift, centres, weights, spread, noise, rng, chunk)


def _draw(n, lift, centres, weights, spread, noise, rng, chunk):
    dim = lift.shape[1]
    x = np.empty((n, dim), np.float32)
    labels = rng.choice(len(centres), size=n, p=weights)
    for start in range(0, n, chunk):
        c = labels[start:start + chunk]
        z = centres[c] + spread * rng.standard_normal((len(c), centres.shape[1]), dtype=np.float32)
        block = z @ lift
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        block += (noise / np.sqrt(dim)) * rng.standard_normal(block.shape, dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[start:start + len(c)] = block
    return x, labels


def database_and_queries(n: int, n_queries: int, dim: int, seed: int):
    """Database and held-out queries drawn from the same mixture (queries are not stored)."""
    x, labels = structured_vectors(n + n_queries, dim, seed=seed)
    return x[:n], labels[:n], x[n:], labels[n:]


@dataclass
class Row:
    size: int
    kind: str
    params: str
    build_s: float | None
    p50_ms: float
    p99_ms: float
    cpu_ms: float
    qps_256: float
    file_mb: float | None
    rss_mb: float | None
    save_s: float | None
    load_s: float | None
    recall_10: float
    cluster_p10: float


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def latencies_ms(index: Retriever, q: np.ndarray) -> tuple[np.ndarray, float]:
    """Wall-clock ms of each single-query search, and the mean process CPU ms per query (all
    threads; unlike wall time, barely affected by other processes competing for the cores)."""
    out = np.empty(len(q))
    cpu = time.process_time()
    for i in range(len(q)):
        t = time.perf_counter()
        index.search(q[i:i + 1], K)
        out[i] = (time.perf_counter() - t) * 1e3
    return out, (time.process_time() - cpu) * 1e3 / len(q)


def batched(index: Retriever, q: np.ndarray, batch: int = 256) -> tuple[np.ndarray, float]:
    found = []
    t = time.perf_counter()
    for start in range(0, len(q), batch):
        found.append(index.search(q[start:start + batch], K).indices)
    return np.concatenate(found), len(q) / (time.perf_counter() - t)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def cluster_precision(found: np.ndarray, db_labels: np.ndarray, q_labels: np.ndarray) -> float:
    valid = found >= 0
    same = (db_labels[np.where(valid, found, 0)] == q_labels[:, None]) & valid
    return float(same.mean())


def configurations(args) -> list[tuple[str, dict, str, list[dict]]]:
    """``(kind, build options, search option name, [search option values])`` to measure."""
    out: list[tuple[str, dict, str, list[dict]]] = []
    for kind in args.kinds:
        if kind == "flat":
            out.append(("flat", {}, "", [{}]))
        elif kind == "lsh":
            out += [("lsh", {"nbits": b}, "", [{}]) for b in args.nbits]
        elif kind == "hnsw":
            out += [("hnsw", {"m": m, "ef_construction": args.ef_construction}, "ef_search",
                     [{"ef_search": e} for e in args.ef_search]) for m in args.hnsw_m]
        elif kind == "ivf":
            out += [("ivf", {"nlist": nl, "nprobe": min(args.nprobe)}, "nprobe",
                     [{"nprobe": p} for p in args.nprobe if p <= nl]) for nl in args.nlist]
        else:
            raise SystemExit(f"unknown retriever {kind!r}")
    return out


def measure_size(n: int, args) -> list[Row]:
    console.rule(f"[bold]{n:,} stored vectors, dim {args.dim}, {args.queries} queries")
    t = time.perf_counter()
    db, db_labels, q, q_labels = database_and_queries(n, args.queries, args.dim, args.seed)
    ids = [f"img-{i:08d}" for i in range(n)]
    console.log(f"data generated in {time.perf_counter() - t:.1f} s")
    truth = None
    rows: list[Row] = []
    plan = configurations(args)
    if plan[0][0] != "flat":  # exact search is the reference
        plan.insert(0, ("flat", {}, "", [{}]))
    for kind, options, _, search_settings in plan:
        gc.collect()
        rss0 = rss_bytes()
        console.log(f"building {kind} {options or ''}")
        t = time.perf_counter()
        index = build_retriever(kind, dim=args.dim, **options).build(db, ids)
        build_s = time.perf_counter() - t
        gc.collect()
        rss_mb = (rss_bytes() - rss0) / 2**20
        for i, setting in enumerate(search_settings):
            for key, value in setting.items():
                setattr(index.options, key, value)
            found, qps = batched(index, q)
            if truth is None:
                truth = found
            lat, cpu_ms = latencies_ms(index, q[: args.latency_queries])
            params = ", ".join(f"{k}={v}" for k, v in {**options, **setting}.items()) or "-"
            rows.append(Row(n, kind, params, build_s if i == 0 else None,
                            float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), cpu_ms, qps,
                            None, rss_mb if i == 0 else None, None, None,
                            recall_at_k(found, truth), cluster_precision(found, db_labels, q_labels)))
            r = rows[-1]
            console.log(f"  {params}: recall@10 {r.recall_10:.3f}, p50 {r.p50_ms:.2f} ms, "
                        f"{r.qps_256:,.0f} q/s")
        first = rows[-len(search_settings)]
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            t = time.perf_counter()
            path = index.save(Path(tmp) / f"{kind}.mskidx")
            first.save_s = time.perf_counter() - t
            first.file_mb = path.stat().st_size / 2**20
            del index
            gc.collect()
            t = time.perf_counter()
            loaded = load_retriever(path, expect_dim=args.dim)
            first.load_s = time.perf_counter() - t
            del loaded
        gc.collect()
    return rows


def compare_lsh(n: int, args) -> list[dict]:
    """faiss IndexLSH (rotation + median thresholds) against SimHash (signs of a Gaussian
    projection, faiss IndexBinaryFlat) at the same code sizes."""
    import faiss

    db, _, q, _ = database_and_queries(n, args.queries, args.dim, args.seed)
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(db)
    truth = exact.search(q, K)[1]
    out = []
    for nbits in args.nbits:
        t = time.perf_counter()
        lsh = build_retriever("lsh", dim=args.dim, nbits=nbits).build(db, [str(i) for i in range(n)])
        lsh_build = time.perf_counter() - t
        lsh_found, _ = batched(lsh, q)
        del lsh
        rng = np.random.default_rng(args.seed)
        t = time.perf_counter()
        proj = rng.standard_normal((args.dim, nbits), dtype=np.float32)
        binary = faiss.IndexBinaryFlat(nbits)
        for start in range(0, n, 100_000):
            binary.add(np.packbits(db[start:start + 100_000] @ proj > 0, axis=1))
        sim_build = time.perf_counter() - t
        sim_found = binary.search(np.packbits(q @ proj > 0, axis=1), K)[1]
        out.append({"size": n, "nbits": nbits, "indexlsh_recall_10": recall_at_k(lsh_found, truth),
                    "indexlsh_build_s": lsh_build, "simhash_recall_10": recall_at_k(sim_found, truth),
                    "simhash_build_s": sim_build})
        console.log(out[-1])
    return out


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


COLUMNS = ("N", "index", "params", "build s", "p50 ms", "p99 ms", "CPU ms/q", "q/s @256", "file MB",
           "RSS Δ MB", "save s", "load s", f"recall@{K}", f"cluster p@{K}")


def _cells(r: Row) -> list[str]:
    return [f"{r.size:,}", r.kind, r.params, _fmt(r.build_s, ".1f"), f"{r.p50_ms:.2f}",
            f"{r.p99_ms:.2f}", f"{r.cpu_ms:.2f}", f"{r.qps_256:,.0f}", _fmt(r.file_mb, ",.0f"),
            _fmt(r.rss_mb, ",.0f"), _fmt(r.save_s, ".1f"), _fmt(r.load_s, ".1f"),
            f"{r.recall_10:.3f}", f"{r.cluster_p10:.3f}"]


def print_table(rows: list[Row], markdown: bool = False) -> None:
    """Print ``rows`` side by side (a rich table, or GitHub markdown for the docs)."""
    if markdown:
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "|".join("---" if c in ("index", "params") else "---:" for c in COLUMNS) + "|")
        for r in rows:
            print("| " + " | ".join(_cells(r)) + " |")
        return
    table = Table(title=f"retrievers: batch-1 latency of single queries, recall@{K} vs flat")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("index", "params") else "right",
                         no_wrap=True)
    for r in rows:
        table.add_row(*_cells(r))
    Console(width=max(console.width, 200)).print(table)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_ints, default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000,
                        help="queries for recall and batch-256 throughput")
    parser.add_argument("--latency-queries", type=int, default=200,
                        help="the first this many queries are also timed one by one")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads")
    parser.add_argument("--kinds", type=lambda s: s.split(","), default=["flat", "lsh", "hnsw", "ivf"])
    parser.add_argument("--nbits", type=_ints, default=[256, 1024, 2048], help="lsh code sizes")
    parser.add_argument("--hnsw-m", type=_ints, default=[32])
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=_ints, default=[32, 64, 128])
    parser.add_argument("--nlist", type=_ints, default=[1024])
    parser.add_argument("--nprobe", type=_ints, default=[8, 16, 32])
    parser.add_argument("--compare-lsh", action="store_true",
                        help="also compare faiss IndexLSH with SimHash + IndexBinaryFlat")
    parser.add_argument("--tmp", default=None, help="folder for the saved indexes (default: system temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = parser.parse_args(argv)

    import faiss

    from msk.core.registry import get_registry

    get_registry().names("retriever")  # load the plugins now, not inside the first timed build
    faiss.omp_set_num_threads(args.threads)
    console.log(f"faiss {faiss.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
                f"{platform.processor() or platform.machine()}, load average {os.getloadavg()}")
    rows: list[Row] = []
    lsh_rows: list[dict] = []
    for n in args.sizes:
        rows += measure_size(n, args)
        if args.compare_lsh:
            lsh_rows += compare_lsh(n, args)
        print_table(rows)
    if args.markdown:
        print_table(rows, markdown=True)
        if lsh_rows:
            print("\n| N | nbits | IndexLSH recall@10 | IndexLSH build s | SimHash recall@10 "
                  "| SimHash build s |\n|---:|---:|---:|---:|---:|---:|")
            for r in lsh_rows:
                print(f"| {r['size']:,} | {r['nbits']} | {r['indexlsh_recall_10']:.3f} "
                      f"| {r['indexlsh_build_s']:.1f} | {r['simhash_recall_10']:.3f} "
                      f"| {r['simhash_build_s']:.1f} |")
    console.log(f"load average at the end {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "lsh": lsh_rows}, indent=1))


if __name__ == "__main__":
    main()
