"""Benchmark the recommender's retrievers against plain faiss: speed vs exact search, recall@10.

For each database size, stores ``N`` structured 512-d vectors (a mixture of clusters on a
64-d subspace with isotropic noise, L2-normalised: closer to image features than iid noise) in
every retriever and prints, side by side, msk's retriever (``search`` through the public API:
validation, normalisation, ids) and plain faiss searching the very same faiss index with
pre-normalised queries:

* build: train + add, seconds (once);
* single queries (batch 1): process CPU ms per query (all threads; robust to other load on the
  machine) and wall-clock p50 ms;
* throughput at batch 256, queries per second;
* speed vs flat: plain faiss ``IndexFlatIP``'s CPU ms per single query divided by this
  contestant's (and the same for batch-256 throughput), measured in the same round;
* msk/faiss: msk's CPU time per single query over plain faiss's on the same index (msk's cost);
* recall@10 against exact search.

Timings are taken in ``--rounds`` rounds; every round measures every contestant in turn
(interleaved), and the table gives the mean and the spread (standard deviation) over rounds,
with the load average at the start and the end. Never run by pytest. Examples (the numbers in
docs/recommender.md)::

    OMP_WAIT_POLICY=PASSIVE python bench/retrieval.py                    # 100k vectors, quick
    OMP_WAIT_POLICY=PASSIVE python bench/retrieval.py --sizes 1000000 --kinds flat,lsh,ivf --markdown
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from msk.core.models.retrieval import Retriever
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


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


@dataclass
class Contestant:
    """One index under one search-time setting, searched by msk or by plain faiss."""

    side: str  # "msk" or "faiss"
    kind: str
    params: str
    index: Retriever
    setting: dict
    build_s: float | None = None
    recall_10: float = 0.0
    cpu_ms: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    qps_256: list[float] = field(default_factory=list)
    speedup: list[float] = field(default_factory=list)
    batch_speedup: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)
    file_mb: float | None = None

    def search(self, q: np.ndarray) -> np.ndarray:
        """Indices of the ``K`` nearest; msk's ``search`` or faiss's on normalised ``q``."""
        for key, value in self.setting.items():
            setattr(self.index.options, key, value)
        if self.side == "msk":
            return self.index.search(q, K).indices
        faiss_index = self.index.index  # type: ignore[attr-defined]
        if self.setting:
            self.index._configure(faiss_index)  # type: ignore[attr-defined]
        return faiss_index.search(q, K)[1]


def time_single(c: Contestant, q: np.ndarray) -> tuple[float, float]:
    """(process CPU ms per query, wall-clock p50 ms) of single-query searches."""
    wall = np.empty(len(q))
    cpu = time.process_time()
    for i in range(len(q)):
        t = time.perf_counter()
        c.search(q[i:i + 1])
        wall[i] = (time.perf_counter() - t) * 1e3
    return (time.process_time() - cpu) * 1e3 / len(q), float(np.percentile(wall, 50))


def time_batched(c: Contestant, q: np.ndarray, batch: int = 256) -> float:
    t = time.perf_counter()
    for start in range(0, len(q), batch):
        c.search(q[start:start + batch])
    return len(q) / (time.perf_counter() - t)


def _options(text: str) -> dict:
    """``"hashing=itq,nbits=128,rerank=400"`` -> options (ints where they parse)."""
    out: dict = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def configurations(args) -> list[tuple[str, dict, list[dict]]]:
    """``(kind, build options, [search-time settings])`` to measure."""
    out: list[tuple[str, dict, list[dict]]] = []
    for kind in args.kinds:
        if kind == "flat":
            out.append(("flat", {}, [{}]))
        elif kind == "lsh":
            for text in args.lsh:
                options = _options(text)
                reranks = args.rerank if options.get("rerank", 1) else []
                out.append(("lsh", options, [{"rerank": r} for r in reranks] or [{}]))
        elif kind == "hnsw":
            out += [("hnsw", {"m": m, "ef_construction": args.ef_construction},
                     [{"ef_search": e} for e in args.ef_search]) for m in args.hnsw_m]
        elif kind == "ivf":
            out += [("ivf", {"nlist": nl, "nprobe": min(args.nprobe)},
                     [{"nprobe": p} for p in args.nprobe if p <= nl]) for nl in args.nlist]
        else:
            raise SystemExit(f"unknown retriever {kind!r}")
    if not out or out[0][0] != "flat":  # exact search is the reference
        out.insert(0, ("flat", {}, [{}]))
    return out


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def measure_size(n: int, args) -> list[Contestant]:
    console.rule(f"[bold]{n:,} stored vectors, dim {args.dim}, {args.queries} queries")
    t = time.perf_counter()
    db, _, q, _ = database_and_queries(n, args.queries, args.dim, args.seed)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    ids = [f"img-{i:08d}" for i in range(n)]
    console.log(f"data generated in {time.perf_counter() - t:.1f} s")
    contestants: list[Contestant] = []
    truth = None
    for kind, options, settings in configurations(args):
        gc.collect()
        console.log(f"building {kind} {options or ''} (load average {_load()})")
        t = time.perf_counter()
        index = build_retriever(kind, dim=args.dim, **options).build(db, ids)
        build_s = time.perf_counter() - t
        built = {k: v for k, v in index.options.model_dump().items() if k in options or k not in settings[0]}
        for i, setting in enumerate(settings):
            params = ", ".join(f"{k}={v}" for k, v in {**built, **setting}.items()) or "-"
            pair = [Contestant(side, kind, params, index, setting, build_s if i == 0 else None)
                    for side in ("msk", "faiss")]
            found = pair[0].search(q)
            if truth is None:
                truth = found
            for c in pair:
                c.recall_10 = recall_at_k(c.search(qn if c.side == "faiss" else q), truth)
            contestants += pair
            console.log(f"  {params}: built in {build_s:.1f} s, recall@10 {pair[0].recall_10:.3f}")
        if args.save_load:
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                path = index.save(Path(tmp) / f"{kind}.mskidx")
                contestants[-2 * len(settings)].file_mb = path.stat().st_size / 2**20
    del db
    gc.collect()
    single, batch = qn[: args.latency_queries], qn[: args.batch_queries]
    reference = contestants[1]  # plain faiss IndexFlatIP
    assert (reference.side, reference.kind) == ("faiss", "flat")
    for r in range(args.rounds):
        console.log(f"round {r + 1}/{args.rounds}, load average {_load()}")
        for c in contestants:
            cpu_ms, p50 = time_single(c, single if c.side == "faiss" else q[: args.latency_queries])
            c.cpu_ms.append(cpu_ms)
            c.p50_ms.append(p50)
            c.qps_256.append(time_batched(c, batch if c.side == "faiss" else q[: args.batch_queries]))
        for i, c in enumerate(contestants):
            c.speedup.append(reference.cpu_ms[-1] / c.cpu_ms[-1])
            c.batch_speedup.append(c.qps_256[-1] / reference.qps_256[-1])
            if c.side == "msk":
                c.overhead.append(c.cpu_ms[-1] / contestants[i + 1].cpu_ms[-1])
    return contestants


def _ms(values: list[float], spec: str) -> str:
    """Mean ± standard deviation over rounds."""
    if not values:
        return ""
    return f"{format(float(np.mean(values)), spec)} ± {format(float(np.std(values)), spec)}"


COLUMNS = ("N", "side", "index", "params", "build s", "CPU ms/q", "p50 ms", "q/s @256",
           "speed vs flat (1 query)", "speed vs flat (@256)", "msk/faiss CPU", f"recall@{K}", "file MB")


def _cells(n: int, c: Contestant) -> list[str]:
    return [f"{n:,}", c.side, c.kind, c.params, "" if c.build_s is None else f"{c.build_s:.1f}",
            _ms(c.cpu_ms, ".2f"), _ms(c.p50_ms, ".2f"), _ms(c.qps_256, ",.0f"), _ms(c.speedup, ".1f"),
            _ms(c.batch_speedup, ".2f"), _ms(c.overhead, ".2f"), f"{c.recall_10:.3f}",
            "" if c.file_mb is None else f"{c.file_mb:,.0f}"]


def print_table(results: list[tuple[int, list[Contestant]]], title: str, markdown: bool = False) -> None:
    """Print the contestants side by side (a rich table, or GitHub markdown for the docs)."""
    if markdown:
        print(f"\n{title}\n")
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "|".join("---" if c in ("side", "index", "params") else "---:" for c in COLUMNS) + "|")
        for n, contestants in results:
            for c in contestants:
                print("| " + " | ".join(_cells(n, c)) + " |")
        return
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("side", "index", "params") else "right")
    for n, contestants in results:
        for c in contestants:
            table.add_row(*_cells(n, c))
    Console(width=max(console.width, 220)).print(table)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_ints, default=[100_000], help="database sizes (1000000 for the docs)")
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall@10")
    parser.add_argument("--latency-queries", type=int, default=50,
                        help="queries timed one by one in each round")
    parser.add_argument("--batch-queries", type=int, default=512,
                        help="queries timed in batches of 256 in each round")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds, contestants interleaved")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads")
    parser.add_argument("--kinds", type=lambda s: s.split(","), default=["flat", "lsh", "hnsw", "ivf"])
    parser.add_argument("--lsh", type=lambda s: s.split(";"),
                        default=["hashing=itq,nbits=128,rerank=400", "hashing=rotation,nbits=256,rerank=400",
                                 "hashing=rotation,nbits=1024,rerank=0"],
                        help="lsh option sets separated by ';' (the last: the Hamming-only lsh of before)")
    parser.add_argument("--rerank", type=_ints, default=[],
                        help="also search each re-ranking lsh with these rerank factors")
    parser.add_argument("--hnsw-m", type=_ints, default=[32])
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=_ints, default=[64, 128])
    parser.add_argument("--nlist", type=_ints, default=[1024])
    parser.add_argument("--nprobe", type=_ints, default=[16])
    parser.add_argument("--save-load", action="store_true", help="also save each msk index (file MB)")
    parser.add_argument("--tmp", default=None, help="folder for the saved indexes (default: system temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = parser.parse_args(argv)

    import faiss

    from msk.core.registry import get_registry

    get_registry().names("retriever")  # load the plugins now, not inside the first timed build
    faiss.omp_set_num_threads(args.threads)
    start_load = _load()
    console.log(f"faiss {faiss.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
                f"{platform.processor() or platform.machine()}, load average {start_load}")
    results: list[tuple[int, list[Contestant]]] = []
    for n in args.sizes:
        results.append((n, measure_size(n, args)))
    title = (f"msk retrievers vs plain faiss on the same index: mean ± sd over {args.rounds} interleaved "
             f"rounds; load average {start_load} at the start, {_load()} at the end")
    print_table(results, title)
    if args.markdown:
        print_table(results, title, markdown=True)
    if args.json:
        args.json.write_text(json.dumps(
            {"load_average": [start_load, _load()],
             "rows": [{"size": n, **{k: v for k, v in asdict(c).items() if k != "index"}}
                      for n, cs in results for c in cs]}, indent=1))


if __name__ == "__main__":
    main()
