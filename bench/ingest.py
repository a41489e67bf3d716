"""Benchmark ``msk ingest`` (Ray Data) against a plain single-process pydicom loop.

Both process the same files to the same output size, side by side, each in a fresh child
process so that neither inherits the other's memory or warm Ray:

* **plain**: ``pydicom.dcmread`` + ``pixel_array`` (first frame, colour averaged) + naive
  min-max + PIL bilinear resize to ``S x S`` ``uint8``, one file after another, nothing
  written, failures counted.
* **msk-serial**: msk's per-file work (:func:`msk.core.stages.ingest.pipeline.process_file`: read, SHA-256,
  :func:`~msk.core.io.dicom.read_image`, resize, pseudonymise) in the same kind of loop, without
  Ray and without writing: what msk's reader costs compared with the plain loop.
* **msk**: :func:`msk.core.stages.ingest.pipeline.ingest` into a fresh folder (decode, hash, pseudonymise,
  dedup, Parquet shards + manifest), on a local Ray started in the child. ``msk`` is the first
  ingest on that fresh Ray (its time includes starting the worker processes and importing the
  decoders in them; Ray's own start-up, ``ray.init``, is printed separately); ``msk-warm`` is a
  second ingest of the same files into another fresh folder on the same, now warm, Ray: the
  steady state of a long-lived cluster.

The files are read once before any measurement, so every contestant finds them in the page
cache.

Inputs: (a) the shared DICOMs (``../shared/data/dicom*``, skipped with a message if absent),
linked into one source folder, and (b) ``--n-synth`` synthetic files made with
:mod:`msk.core.synth` (kept in ``--out`` and reused on the next run).

Memory: the parent samples the child's whole process tree every 0.1 s with psutil (the child
is the driver; the raylet, GCS and Ray workers are its descendants). "peak tree" is the
largest sum of PSS over the tree (PSS splits shared pages, e.g. the object store and
libraries, between the processes that map them, so the sum is not inflated the way a sum of
RSS is), printed with its split at that moment into the driver, the Ray workers (processes
named ``ray::...``) and Ray's services (raylet, GCS, ...); "peak driver RSS" is the child's own
peak RSS. For msk both cover the cold and the warm ingest together.

Usage::

    python bench/ingest.py --n-synth 2000 --out out/bench-ingest
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
# The two contestants (run in child processes)


def run_plain(src: Path, size: int) -> dict:
    """The baseline: a single-process pydicom loop over the same files as msk."""
    import numpy as np
    import pydicom
    from PIL import Image

    from msk.core.stages.ingest.pipeline import list_inputs

    warnings.simplefilter("ignore")  # pydicom warns about every truncated file
    files = list_inputs(src, ["*"], [".*"])
    ok = 0
    started = time.perf_counter()
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
    return {"files": len(files), "ok": ok, "not_ok": len(files) - ok, "seconds": seconds}


def run_serial(src: Path, size: int) -> dict:
    """msk's per-file work in a single-process loop: no Ray, nothing written."""
    from msk.core.io.pseudonym import Pseudonymiser
    from msk.core.stages.ingest.pipeline import IngestConfig, list_inputs, process_file

    config = IngestConfig(image_size=size)
    pseudonymiser = Pseudonymiser(b"bench-key-not-secret")
    files = list_inputs(src, ["*"], [".*"])
    started = time.perf_counter()
    ok = sum(process_file(src, rel, config, pseudonymiser)["status"] == "ok" for rel in files)
    seconds = time.perf_counter() - started
    return {"files": len(files), "ok": ok, "not_ok": len(files) - ok, "seconds": seconds}


def run_msk(src: Path, dst: Path, size: int, key_file: Path) -> list[dict]:
    """``msk ingest`` into fresh folders under ``dst``, cold then warm, on a Ray started here."""
    import ray

    from msk.core.stages.ingest.pipeline import IngestConfig, ingest

    started = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    ray_init = time.perf_counter() - started
    config = IngestConfig(image_size=size, key_file=key_file, create_key=True)
    runs = []
    for method in ("msk", "msk-warm"):
        shutil.rmtree(dst / method, ignore_errors=True)
        report = ingest(src, dst / method, config, progress=False)
        runs.append({"method": method, "files": report.n_inputs, "ok": report.n_ok,
                     "not_ok": report.n_quarantined, "seconds": report.seconds, "ray_init": ray_init,
                     "by_reason": report.by_reason})
    return runs


# --------------------------------------------------------------------------------------------
# Measuring


class TreeMemory:
    """Samples a process tree's memory in a background thread (see the module docstring)."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_tree = 0
        self.peak_split = (0, 0, 0)  # driver, ray workers, ray services at the peak (PSS)
        self.peak_driver = 0
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
                self.peak_driver = max(self.peak_driver, self.root.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            split = [0, 0, 0]
            for p in procs:
                try:
                    pss = p.memory_full_info().pss
                    kind = 0 if p.pid == self.root.pid else 1 if p.name().startswith("ray::") else 2
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                split[kind] += pss
            if sum(split) > self.peak_tree:
                self.peak_tree, self.peak_split = sum(split), tuple(split)
            self._stop.wait(self.interval)


def measure(method: str, src: Path, out: Path, size: int) -> list[dict]:
    """Run one contestant in a child process; return its results plus peak memory."""
    cmd = [sys.executable, __file__, "--child", method, "--src", str(src), "--out", str(out),
           "--image-size", str(size)]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    with TreeMemory(child.pid) as mem:
        stdout, _ = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"{method} on {src} failed (exit {child.returncode})")
    results = json.loads(stdout.strip().splitlines()[-1])
    mib = 2**20
    for r in results:
        r.update(wall=time.perf_counter() - started, peak_tree_mib=mem.peak_tree / mib,
                 peak_split_mib=[m / mib for m in mem.peak_split], peak_driver_mib=mem.peak_driver / mib)
    return results


# --------------------------------------------------------------------------------------------
# Inputs


def shared_source(out: Path) -> Path | None:
    """Every file of ``../shared/data/dicom*``, linked into one folder (msk takes one SRC)."""
    roots = sorted(p for p in SHARED.glob("dicom*") if p.is_dir())
    if not roots:
        print(f"(a) skipped: no shared DICOMs at {SHARED}/dicom* (set MSK_SHARED_DATA)")
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


def warm_page_cache(src: Path) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_file():
            path.read_bytes()


def synth_source(out: Path, n: int) -> Path | None:
    try:
        from msk.core.synth import SynthConfig, synthesize
    except ImportError as exc:
        print(f"(b) skipped: msk.core.synth is not available ({exc})")
        return None
    folder = out / f"synth-{n}"
    if not (folder / "ground_truth.csv").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"making {n} synthetic files in {folder} ...", flush=True)
        synthesize(folder, SynthConfig(n_images=n, seed=0))
    return folder / "export"


# --------------------------------------------------------------------------------------------


def print_table(rows: list[dict], size: int) -> None:
    print(f"\nmsk ingest vs plain pydicom loop  |  {psutil.cpu_count()} CPUs, output {size}x{size} uint8, "
          f"Ray {__import__('ray').__version__}")
    header = (f"{'input':<12}{'method':<11}{'files':>6}{'ok':>6}{'not ok':>7}{'seconds':>9}{'files/s':>9}"
              f"{'peak tree MiB (driver/workers/services)':>42}{'peak driver RSS MiB':>21}")
    print(header)
    print("-" * len(header))
    for r in rows:
        memory = f"{r['peak_tree_mib']:.0f} ({'/'.join(f'{m:.0f}' for m in r['peak_split_mib'])})"
        print(f"{r['input']:<12}{r['method']:<11}{r['files']:>6}{r['ok']:>6}{r['not_ok']:>7}{r['seconds']:>9.2f}"
              f"{r['files'] / r['seconds']:>9.1f}{memory:>42}"
              f"{r['peak_driver_mib']:>21.0f}")
    print()
    for name in dict.fromkeys(r["input"] for r in rows):
        by_method = {r["method"]: r for r in rows if r["input"] == name}
        speed = {m: r["files"] / r["seconds"] for m, r in by_method.items()}
        print(f"{name}: msk/plain files/s ratio {speed['msk'] / speed['plain']:.2f}x cold, "
              f"{speed['msk-warm'] / speed['plain']:.2f}x warm (msk-serial/plain "
              f"{speed['msk-serial'] / speed['plain']:.2f}x); Ray start-up {by_method['msk']['ray_init']:.1f} s "
              f"(not included); msk quarantined {by_method['msk']['by_reason'] or 'nothing'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-synth", type=int, default=2000, help="synthetic files for input (b)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench-ingest", help="work folder")
    parser.add_argument("--image-size", type=int, default=256, help="output side length in px")
    parser.add_argument("--child", choices=["plain", "msk-serial", "msk"], help=argparse.SUPPRESS)
    parser.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "plain":
        print(json.dumps([run_plain(args.src, args.image_size) | {"method": "plain"}]))
        return
    if args.child == "msk-serial":
        print(json.dumps([run_serial(args.src, args.image_size) | {"method": "msk-serial"}]))
        return
    if args.child == "msk":
        print(json.dumps(run_msk(args.src, args.out, args.image_size, args.out.parent / "bench.key")))
        return

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    inputs = {"(a) shared": shared_source(out), "(b) synth": synth_source(out, args.n_synth)}
    for name, src in inputs.items():
        if src is None:
            continue
        warm_page_cache(src)
        for method in ("plain", "msk-serial", "msk"):
            print(f"{name}: {method} ...", flush=True)
            results = measure(method, src, out / f"ingest-{name.split()[0].strip('()')}", args.image_size)
            rows += [r | {"input": name} for r in results]
    if rows:
        print_table(rows, args.image_size)


if __name__ == "__main__":
    main()
