"""Throughput of the synthetic export: ``msk synth`` files/s, serial vs parallel workers.

    .venv/bin/python bench/synth.py --n 2000 --workers 1,2

Prints wall time, files/s and peak RSS per setting, side by side, and checks that every
setting writes a byte-identical ground truth.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import shutil
import tempfile
import time
from pathlib import Path

from msk.core.synth import SynthConfig, synthesize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--out", type=Path, default=None, help="scratch folder [default: a temp dir]")
    ap.add_argument("--style", default="radiograph", help="SynthConfig.style: radiograph or basic")
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="msk-bench-synth-"))
    rows, digests = [], set()
    for workers in (int(w) for w in args.workers.split(",")):
        out = root / f"w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        report = synthesize(out, SynthConfig(n_images=args.n, workers=workers, style=args.style), progress=False)
        wall = time.perf_counter() - t0
        digests.add(hashlib.sha256(report.ground_truth.read_bytes()).hexdigest())
        size = sum(p.stat().st_size for p in (out / "export").rglob("*") if p.is_file())
        rows.append((workers, wall, args.n / wall, size / 2**20))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"msk synth, style {args.style}, n={args.n} "
          f"(peak RSS of this process {peak:.0f} MiB; workers are separate processes)")
    print(f"{'workers':>8} {'wall s':>8} {'files/s':>8} {'speed-up':>9} {'MiB':>7}")
    for workers, wall, fps, mib in rows:
        print(f"{workers:>8} {wall:>8.1f} {fps:>8.1f} {fps / rows[0][2]:>8.2f}x {mib:>7.0f}")
    print("ground truth identical across settings:", len(digests) == 1)
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
