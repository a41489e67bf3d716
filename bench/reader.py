"""Decode time of every shared DICOM with msk's reader (header only and full pipeline).

    python bench/reader.py [--repeats 3] [--data ../shared/data]

Bytes are read from disk before timing, so the numbers are decode cost, not I/O. Prints one
row per file (median of the repeats) and the totals; single process, single thread.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from msk.core.io.dicom import read_dicom_header, read_image

REPO = Path(__file__).resolve().parents[1]
NOT_DICOM = re.compile(r"^(LICENSE|SOURCE|README|NOTES)|\.(json|md|rst|txt)$")


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    files = sorted(p for p in args.data.glob("dicom*/**/*") if p.is_file() and not NOT_DICOM.search(p.name))
    if not files:
        raise SystemExit(f"no DICOM files under {args.data}")

    table = Table(title=f"msk reader, median of {args.repeats} (bytes in memory)")
    for column in ("file", "syntax", "size", "header ms", "decode ms", "MP/s", "window"):
        table.add_column(column, justify="left" if column in ("file", "syntax", "window") else "right")
    total_pixels = total_seconds = 0.0
    for path in track(files, description="decoding", console=Console(stderr=True)):
        data = path.read_bytes()
        header = _median_seconds(lambda data=data: read_dicom_header(data), args.repeats)
        image = read_image(data, source=path.name)
        decode = _median_seconds(lambda data=data: read_image(data), args.repeats)
        pixels = image.pixels.size
        total_pixels += pixels
        total_seconds += decode
        syntax = image.meta.transfer_syntax_uid or "-"
        table.add_row(path.name, syntax, f"{image.meta.rows}x{image.meta.cols}", f"{header * 1e3:.1f}",
                      f"{decode * 1e3:.1f}", f"{pixels / decode / 1e6:.1f}", image.meta.window)
    Console().print(table)
    print(f"{len(files)} files, {total_pixels / 1e6:.1f} MP decoded in {total_seconds:.2f} s: "
          f"{len(files) / total_seconds:.1f} files/s, {total_pixels / 1e6 / total_seconds:.1f} MP/s (1 process)")


if __name__ == "__main__":
    main()
