"""Benchmark ``msk ingest`` against a plain single-process pydicom loop, side by side, in rounds.

Every contestant runs in a fresh child process (no inherited memory or warm Ray), on the same
files, one after another in each round; the order rotates from round to round (interleaved),
and the table gives the mean ± standard deviation over the rounds, each round's ratio to the
plain loop of the same round, and the 1-minute load average before each run.

* **plain**: ``pydicom.dcmread`` + ``pixel_array`` (first frame, colour averaged) + min-max +
  PIL bilinear resize to ``S x S`` ``uint8``, one file after another, nothing written. 1 core.
* **msk-serial**: msk's per-file work (:func:`msk.core.stages.ingest.pipeline.process_file`:
  read, SHA-256, :func:`~msk.core.io.dicom.read_image` with its header screening, pixel scrub,
  resize, pseudonymise) in the same kind of loop, without Ray and without writing. 1 core.
* **msk**: :func:`msk.core.stages.ingest.pipeline.ingest` into a fresh folder (decode tasks that
  write their own Parquet shards, dedup, manifest) on a local Ray of ``--cpus`` CPUs started in
  the child (``ray.init`` is timed apart). ``msk`` is the first ingest on that Ray (it includes
  starting the worker processes and importing the decoders in them); ``msk-warm`` a second
  ingest of the same files into another fresh folder: the steady state of a long-lived cluster.
* **msk-1node / msk-2node** (``--cluster``): ``msk-warm`` on a ``ray.cluster_utils.Cluster``
  of one node of 1 CPU, and of two nodes of 1 CPU each (two raylets, two object stores).

``--scrub auto,off`` runs the msk contestants with ``pixel_scrub`` auto (the default) and off:
the plain loop does not look for burned-in text, so *off* is the like-for-like comparison and
the difference is the price of the scrub. ``MODE/DETECTOR`` also sets ``scrub_detector``
(``auto/morphology``: the classical detector; the default is ``learned``).

"per core" divides files/s by the cores a contestant may use (1, or ``--cpus``). On a machine
other jobs load, a contestant does not get the cores it may use, so the table also gives
"files per CPU-s": files over the CPU seconds (user + system) the contestant's whole process
tree spent (msk: the driver, Ray's services and its workers, measured in the child around each
ingest; plain: the process). It is what one core sustains when it is really available. Memory: the
parent samples the child's whole process tree every 0.1 s with psutil; "peak tree" is the
largest sum of PSS over the driver, the Ray workers and Ray's services (PSS splits shared pages
between the processes that map them), for msk over the cold and the warm ingest together.

Inputs: ``--n-synth`` synthetic files made with :mod:`msk.core.synth` (kept in ``--out`` and
reused), and with ``--shared`` the DICOMs of ``../shared/data/dicom*`` (decode-bound: large
JPEG 2000 / JPEG-LS), each measured separately. ``--sizes 500,1000,2000`` adds one ``msk``
run per size (the first N files) to show how time and memory grow with the work. Synthetic
DICOMs are made at about 46 files/s, too slow for 100,000; ``--n-png N`` makes N distinct
320 px 8-bit PNGs instead (smooth random textures, about 1,000 files/s on 2 CPUs) for the
growth runs, and ``--rounds 0`` skips the contestant table::

    OMP_NUM_THREADS=1 python bench/ingest.py --n-synth 0 --n-png 100000 --rounds 0 \
        --sizes 1000,10000,100000 --scrub off

Usage::

    OMP_NUM_THREADS=1 python bench/ingest.py --n-synth 2000 --rounds 3 --scrub auto,off --cluster
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MSK_SHARED_DATA", REPO.parent / "shared" / "data"))


# --------------------------------------------------------------------------------------------
# The contestants (run in child processes)


def _files(src: Path, limit: int | None) -> list[str]:
    from msk.core.stages.ingest.pipeline import list_inputs

    return list_inputs(src, ["*"], [".*"])[:limit]


def run_plain(src: Path, size: int, limit: int | None) -> list[dict]:
    """The baseline: a single-process pydicom loop over the same files as msk."""
    import numpy as np
    import pydicom
    from PIL import Image

    warnings.simplefilter("ignore")  # pydicom warns about every truncated file
    files = _files(src, limit)
    ok = 0
    started, cpu = time.perf_counter(), time.process_time()
    for rel in files:
        try:
            ds = pydicom.dcmread(src / rel, force=True)
            arr = ds.pixel_array
            if int(ds.get("NumberOfFrames") or 1) > 1:
                arr = arr[0]
            if arr.ndim == 3:
                arr = arr.mean(axis=-1)
            arr = arr.astype(np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
            small = Image.fromarray(arr, mode="F").resize((size, size), Image.Resampling.BILINEAR)
            np.clip(np.rint(np.asarray(small) * 255), 0, 255).astype(np.uint8)
            ok += 1
        except Exception:  # noqa: BLE001 - the baseline counts failures, like msk quarantines them
            pass
    seconds = time.perf_counter() - started
    return [{"method": "plain", "files": len(files), "ok": ok, "seconds": seconds, "cores": 1,
             "cpu_s": time.process_time() - cpu}]


def _scrub_options(scrub: str) -> dict[str, str]:
    """``auto`` -> pixel_scrub auto; ``auto/morphology`` -> and scrub_detector morphology."""
    mode, _, detector = scrub.partition("/")
    return {"pixel_scrub": mode} | ({"scrub_detector": detector} if detector else {})


def run_serial(src: Path, size: int, limit: int | None, scrub: str) -> list[dict]:
    """msk's per-file work in a single-process loop: no Ray, nothing written."""
    from msk.core.io.pseudonym import Pseudonymiser
    from msk.core.stages.ingest.pipeline import IngestConfig, process_file

    config = IngestConfig(image_size=size, **_scrub_options(scrub))  # type: ignore[arg-type]
    pseudonymiser = Pseudonymiser(b"bench-key-not-secret")
    files = _files(src, limit)
    started, cpu = time.perf_counter(), time.process_time()
    ok = sum(process_file(src, rel, config, pseudonymiser)["status"] == "ok" for rel in files)
    seconds = time.perf_counter() - started
    return [{"method": f"msk-serial[{scrub}]", "files": len(files), "ok": ok, "seconds": seconds, "cores": 1,
             "cpu_s": time.process_time() - cpu}]


def run_msk(src: Path, dst: Path, size: int, limit: int | None, scrub: str, cpus: int, nodes: int,
            key_file: Path) -> list[dict]:
    """``msk ingest`` into fresh folders under ``dst``, cold then warm, on a Ray started here
    (``nodes`` > 0: a ``ray.cluster_utils.Cluster`` of that many 1-CPU nodes, warm run only)."""
    import ray

    from msk.core.io.manifest import read_manifest
    from msk.core.stages.ingest.pipeline import IngestConfig, ingest

    os.environ.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    cluster = None
    if nodes:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        cpus = nodes
    else:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray_init = time.perf_counter() - started
    config = IngestConfig(image_size=size, key_file=key_file, create_key=True,
                          **_scrub_options(scrub))  # type: ignore[arg-type]
    paths = _files(src, limit) if limit else None
    runs = []
    names = ["cold", f"msk-{nodes}node[{scrub}]"] if nodes else [f"msk[{scrub}]", f"msk-warm[{scrub}]"]
    for name in names:
        out = dst / name.replace("[", "-").replace("/", "-").rstrip("]")
        shutil.rmtree(out, ignore_errors=True)
        cpu = tree_cpu_seconds()
        report = ingest(src, out, config, progress=False, paths=paths)
        cpu = tree_cpu_seconds() - cpu
        n_nodes = len(set(read_manifest(out, columns=["node"]).column("node").to_pylist()) - {None})
        runs.append({"method": name, "files": report.n_inputs, "ok": report.n_ok, "seconds": report.seconds,
                     "ray_init": ray_init, "cores": cpus, "nodes_used": n_nodes, "cpu_s": cpu})
        shutil.rmtree(out, ignore_errors=True)
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    return [r for r in runs if r["method"] != "cold"]


# --------------------------------------------------------------------------------------------
# Measuring


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its descendants (the driver, Ray's
    services and workers: Ray's own background work counts against msk)."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class TreeMemory:
    """Samples a process tree's peak memory (sum of PSS) in a background thread."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_tree = 0
        self.peak_parts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total, parts = 0, {}
            for p in procs:
                try:
                    pss = p.memory_full_info().pss
                    total += pss
                    role = _role(p)
                    parts[role] = parts.get(role, 0) + pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            if total > self.peak_tree:
                self.peak_tree, self.peak_parts = total, parts
            self._stop.wait(self.interval)


def _role(p: psutil.Process) -> str:
    """What a process of the tree is: the driver, a Ray service or a Ray worker (by its title)."""
    name = p.name()
    if name.startswith("ray::"):
        return "ray workers"
    cmd = " ".join(p.cmdline()[:3])
    for service in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env"):
        if service in cmd or service in name:
            return service
    return "driver" if "bench/ingest.py" in cmd else name  # the tree's root: this script's --child run


def measure(child: list[str]) -> list[dict]:
    """Run one contestant (``child``: its arguments) in a child process; its results + peak memory."""
    cmd = [sys.executable, __file__, *child]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    load = os.getloadavg()[0]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    with TreeMemory(proc.pid) as mem:
        stdout, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(child)} failed (exit {proc.returncode})")
    results = json.loads(stdout.strip().splitlines()[-1])
    parts = {k: round(v / 2**20) for k, v in sorted(mem.peak_parts.items(), key=lambda kv: -kv[1])}
    return [r | {"peak_tree_mib": mem.peak_tree / 2**20, "peak_parts_mib": parts, "load": load} for r in results]


# --------------------------------------------------------------------------------------------
# Inputs


def shared_source(out: Path) -> Path | None:
    """Every file of ``../shared/data/dicom*``, linked into one folder (msk takes one SRC)."""
    roots = sorted(p for p in SHARED.glob("dicom*") if p.is_dir())
    if not roots:
        print(f"shared DICOMs skipped: none at {SHARED}/dicom* (set MSK_SHARED_DATA)")
        return None
    src = out / "shared-src"
    shutil.rmtree(src, ignore_errors=True)
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                link = src / root.name / path.relative_to(root)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(path)
    return src


def synth_source(out: Path, n: int) -> Path:
    from msk.core.synth import SynthConfig, synthesize

    folder = out / f"synth-{n}"
    if not (folder / "ground_truth.csv").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"making {n} synthetic files in {folder} ...", flush=True)
        synthesize(folder, SynthConfig(n_images=n, seed=0))
    return folder / "export"


def _write_pngs(args: tuple[Path, int, int]) -> None:
    import numpy as np
    from PIL import Image

    folder, start, stop = args
    rng = np.random.default_rng(start)
    base = rng.integers(0, 256, (16, 40, 40)).astype(np.float32)
    for i in range(start, stop):
        texture = np.asarray(Image.fromarray(base[i % 16]).resize((320, 320), Image.Resampling.BICUBIC))
        pixels = np.clip(texture + rng.normal(0, 6, texture.shape) + (i // 16) % 64, 0, 255).astype(np.uint8)
        path = folder / f"{i // 1000:04d}" / f"{i:07d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(path, compress_level=1)


def png_source(out: Path, n: int) -> Path:
    """``n`` distinct 320 px 8-bit PNGs (kept and reused), 1,000 per folder, made in parallel."""
    from concurrent.futures import ProcessPoolExecutor

    folder = out / f"png-{n}"
    done = folder / ".complete"
    if not done.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        print(f"making {n} PNG files in {folder} ...", flush=True)
        started = time.perf_counter()
        parts = [(folder, a, min(n, a + 1000)) for a in range(0, n, 1000)]
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_write_pngs, parts))
        done.write_text(f"{n}\n")
        print(f"  {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def warm_page_cache(src: Path) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_file():
            path.resolve().read_bytes()


# --------------------------------------------------------------------------------------------
# Report


def _ms(values: list[float], digits: int = 1) -> str:
    if not values:  # e.g. a ratio to plain when plain did not run (--methods msk)
        return "-"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def print_table(name: str, rows: list[dict], size: int) -> None:
    """One input's contestants: mean ± sd over rounds of files/s, per core, ratios, memory, load."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    plain = {r["round"]: r["files"] / r["seconds"] for r in rows if r["method"] == "plain"}
    print(f"\n{name}: {rows[0]['files']} files, output {size}x{size} uint8, {psutil.cpu_count()} CPUs, "
          f"Ray {__import__('ray').__version__}, {len(plain)} rounds (mean ± sd)")
    header = (f"| {'contestant':<22} | {'cores':>5} | {'files/s':>15} | {'files/s per core':>16} | "
              f"{'ratio to plain':>14} | {'per core ratio':>14} | {'files per CPU-s':>15} | {'CPU ratio':>11} | "
              f"{'peak tree MiB':>13} | {'load 1-min':>16} |")
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    plain_cpu = {r["round"]: r["files"] / r["cpu_s"] for r in rows if r["method"] == "plain"}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        rate = [r["files"] / r["seconds"] for r in mine]
        cores = mine[0]["cores"]
        ratio = [r["files"] / r["seconds"] / plain[r["round"]] for r in mine if r["round"] in plain]
        per_core = [x / cores for x in ratio]
        per_cpu = [r["files"] / r["cpu_s"] for r in mine]
        cpu_ratio = [r["files"] / r["cpu_s"] / plain_cpu[r["round"]] for r in mine if r["round"] in plain_cpu]
        print(f"| {method:<22} | {cores:>5} | {_ms(rate):>15} | {_ms([x / cores for x in rate]):>16} | "
              f"{_ms(ratio, 2):>14} | {_ms(per_core, 2):>14} | {_ms(per_cpu):>15} | {_ms(cpu_ratio, 2):>11} | "
              f"{_ms([r['peak_tree_mib'] for r in mine], 0):>13} | {_ms([r['load'] for r in mine]):>16} |")
    print("peak memory by process (MiB of PSS, at the sample with the highest total, the highest round):")
    for method in methods:
        top = max((r for r in rows if r["method"] == method), key=lambda r: r["peak_tree_mib"])
        print(f"  {method}: " + ", ".join(f"{k} {v}" for k, v in top.get("peak_parts_mib", {}).items()))
    extra = [r for r in rows if "ray_init" in r]
    if extra:
        print(f"ray.init (not included above): {_ms([r['ray_init'] for r in extra])} s; "
              f"nodes that decoded: { {r['method']: r['nodes_used'] for r in extra} }; "
              f"ok: { {r['method']: r['ok'] for r in rows} }")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-synth", type=int, default=2000, help="synthetic files (0: none)")
    parser.add_argument("--n-png", type=int, default=0, help="distinct 320 px PNG files (growth runs; 0: none)")
    parser.add_argument("--shared", action="store_true", help="also the shared DICOMs, separately")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench-ingest", help="work folder")
    parser.add_argument("--image-size", type=int, default=256, help="output side length in px")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (0: growth runs only)")
    parser.add_argument("--cpus", type=int, default=psutil.cpu_count(), help="Ray CPUs of the msk contestant")
    parser.add_argument("--scrub", default="auto,off", help="pixel_scrub modes of the msk contestants")
    parser.add_argument("--methods", default="plain,msk-serial,msk", help="contestants (plain,msk-serial,msk)")
    parser.add_argument("--cluster", action="store_true", help="add msk on 1 node vs 2 nodes of 1 CPU")
    parser.add_argument("--sizes", default="", help="e.g. 500,1000,2000: one msk run per size (growth)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=0, help="only the first N files of each input (quick runs)")
    parser.add_argument("--nodes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    limit = args.limit or None

    if args.child:
        method, _, scrub = args.child.partition(":")
        if method == "plain":
            results = run_plain(args.src, args.image_size, limit)
        elif method == "msk-serial":
            results = run_serial(args.src, args.image_size, limit, scrub)
        else:
            results = run_msk(args.src, args.out, args.image_size, limit, scrub, args.cpus, args.nodes,
                              args.out.parent / "bench.key")
        print(json.dumps(results))
        return

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    scrubs = [s for s in args.scrub.split(",") if s]
    wanted = args.methods.split(",")
    inputs = {}
    if args.n_synth:
        inputs["synthetic"] = synth_source(out, args.n_synth)
    if args.n_png:
        inputs["PNG"] = png_source(out, args.n_png)
    if args.shared and (shared := shared_source(out)) is not None:
        inputs["shared DICOMs"] = shared
    for name, src in inputs.items():
        warm_page_cache(src)
        base = ["--src", str(src), "--out", str(out / "runs"), "--image-size", str(args.image_size),
                "--limit", str(args.limit)]
        contestants = [["--child", "plain"]] if "plain" in wanted else []
        for scrub in scrubs:
            if "msk-serial" in wanted:
                contestants.append(["--child", f"msk-serial:{scrub}"])
            if "msk" in wanted:
                contestants.append(["--child", f"msk:{scrub}", "--cpus", str(args.cpus)])
            if args.cluster:
                contestants += [["--child", f"msk:{scrub}", "--nodes", str(n)] for n in (1, 2)]
        rows = []
        for k in range(args.rounds):
            order = contestants[k % len(contestants):] + contestants[:k % len(contestants)]
            for child in order:
                print(f"{name} round {k + 1}: {child[1]} {' '.join(child[2:])} ...", flush=True)
                rows += [r | {"round": k} for r in measure(child + base)]
        if rows:
            print_table(name, rows, args.image_size)
        if args.sizes:
            growth = []
            for n in map(int, args.sizes.split(",")):
                print(f"{name}: msk on the first {n} files ...", flush=True)
                growth += [r | {"n": n} for r in measure(["--child", f"msk:{scrubs[0]}", "--cpus", str(args.cpus)]
                                                         + base + ["--limit", str(n)])]
            print(f"\n{name}: growth (msk[{scrubs[0]}] on the first N files, one run each)")
            print("| files | method | seconds | files/s | files per CPU-s | peak tree MiB | load 1-min |\n"
                  "|---:|---|---:|---:|---:|---:|---:|")
            for r in growth:
                print(f"| {r['files']} | {r['method']} | {r['seconds']:.1f} | {r['files'] / r['seconds']:.1f} | "
                      f"{r['files'] / r['cpu_s']:.1f} | {r['peak_tree_mib']:.0f} | {r['load']:.1f} |")


if __name__ == "__main__":
    main()
