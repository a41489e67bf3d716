"""Benchmark ``/v1/sort`` over HTTP (Ray Serve) against the same model called in this process.

Both sides do the same work per input: decode the file with the ingest's reader, square it
(:func:`msk.serve.inputs.decode_radiograph`), run the sorter and take the softmax
(:meth:`msk.core.models.sorter.SorterEnsemble.predict_proba`), with one torch thread each:

* **in-process, 1 by 1**: decode + predict one input at a time: the latency floor;
* **in-process, batch B**: decode every input, predict in batches of ``B``: the throughput
  the model allows without any serving;
* **HTTP**: ``msk serve`` with the sorter only (gateway + one sorter replica), Bearer token
  on, driven by ``httpx`` at concurrency 1 and ``--concurrency``, with ``@serve.batch`` off
  (``max_batch_size: 1``) and on (``max_batch_size: B``).

Latency is wall-clock per request (p50, p99); throughput is requests / wall-clock. "overhead"
is the HTTP p50 at concurrency 1 divided by the in-process 1-by-1 p50; "throughput vs
in-process" is the HTTP throughput as a share of the in-process throughput with the same
batching (1 by 1 for batching off, batches of ``B`` for on). The inputs are cut into
``--rounds`` chunks and the contestants take turns chunk by chunk, so that all of them see
the same background load on a shared machine (the client, the gateway, the replica and the
in-process model all share this machine's CPUs).

Inputs are the first ``--n`` files the evidence ingest accepted (``--ingest``: its manifest
and ``ingest.json`` give the source files and the preprocessing), read into memory once;
without it, synthetic PNGs. The model is ``--checkpoint`` or, by default, a ``--encoder``
classifier trained for one epoch on a few of those images (its weights do not matter for
timing). Usage::

    python bench/serve.py --ingest /work/evidence/ingest5k --n 200 --encoder resnet18
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_inputs(ingest: Path | None, n: int, size: int) -> tuple[list[bytes], dict]:
    """``n`` upload bodies and the preprocessing that matches them."""
    if ingest is not None and (ingest / "ingest.json").is_file():
        import json

        from msk.core.io.manifest import read_manifest

        info = json.loads((ingest / "ingest.json").read_text())
        manifest = read_manifest(ingest, columns=["path", "status"]).to_pandas()
        paths = [Path(info["src"]) / p for p in manifest.loc[manifest["status"] == "ok", "path"].head(n)]
        return [p.read_bytes() for p in paths], {"ingest": str(ingest)}
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size * 2, size * 2), dtype=np.uint8)).save(buffer, "PNG")
        bodies.append(buffer.getvalue())
    return bodies, {"image_size": size}


def train_model(images: np.ndarray, encoder: str, image_size: int, out: Path) -> Path:
    from msk.core.models.train import TrainConfig, fit_classifier

    labels = np.arange(len(images)) % 4
    config = TrainConfig(encoder=encoder, image_size=image_size, epochs=1, batch_size=8, augment=False)
    return fit_classifier(images, labels, 4, config, out=out).best


@dataclass
class Tally:
    """Latencies, wall-clock and errors of one contestant, summed over the rounds."""

    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    requests: int = 0
    errors: int = 0

    def add(self, latencies: list[float], seconds: float, requests: int, errors: int = 0) -> None:
        self.latencies += latencies
        self.seconds += seconds
        self.requests += requests
        self.errors += errors

    @property
    def p50(self) -> float:
        return 1000 * float(np.percentile(self.latencies, 50)) if self.latencies else float("nan")

    @property
    def p99(self) -> float:
        return 1000 * float(np.percentile(self.latencies, 99)) if self.latencies else float("nan")

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def in_process(bodies: list[bytes], preprocess, ensemble, batch: int, tally: Tally) -> None:
    """Decode + predict: 1 by 1 (latency per input), or decode all then predict in batches."""
    from msk.serve.inputs import decode_radiograph

    latencies = []
    began = time.perf_counter()
    if batch == 1:
        for body in bodies:
            t = time.perf_counter()
            ensemble.predict_proba(decode_radiograph(body, preprocess).pixels[None])
            latencies.append(time.perf_counter() - t)
    else:
        images = np.stack([decode_radiograph(body, preprocess).pixels for body in bodies])
        for start in range(0, len(images), batch):
            ensemble.predict_proba(images[start:start + batch])
    tally.add(latencies, time.perf_counter() - began, len(bodies))


async def over_http(url: str, token: str, bodies: list[bytes], concurrency: int, tally: Tally) -> None:
    import httpx

    latencies, statuses = [], []
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(body: bytes) -> None:
            async with semaphore:
                t = time.perf_counter()
                r = await client.post("/v1/sort", files={"image": ("x", body)})
                latencies.append(time.perf_counter() - t)
                statuses.append(r.status_code)

        began = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        seconds = time.perf_counter() - began
    tally.add(latencies, seconds, len(bodies), sum(s != 200 for s in statuses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ingest", type=Path, default=Path("/work/evidence/ingest5k"),
                    help="an ingest output whose accepted source files are the inputs")
    ap.add_argument("--n", type=int, default=200, help="requests per measurement")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (n / rounds inputs each)")
    ap.add_argument("--checkpoint", type=Path, help="sorter checkpoint; default: train a throw-away one")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--image-size", type=int, default=128, help="network input side")
    ap.add_argument("--batch", type=int, default=8, help="max_batch_size with batching on")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    args = ap.parse_args()

    import ray
    import torch
    from ray import serve
    from rich.console import Console
    from rich.table import Table

    from msk.core.data.squaring import SquaringConfig
    from msk.core.io.checkpoint import load_checkpoint
    from msk.serve.app import application
    from msk.serve.config import ServeConfig, SortConfig
    from msk.serve.inputs import decode_radiograph
    from msk.serve.sorter import load_sorter_model

    torch.set_num_threads(1)
    console = Console(width=150)
    out = args.out or Path(tempfile.mkdtemp(prefix="msk-bench-serve-"))
    bodies, pre = load_inputs(args.ingest, args.n, args.image_size)
    preprocess = SquaringConfig(**pre).resolved()
    console.print(f"{len(bodies)} inputs ({sum(map(len, bodies)) / len(bodies) / 1024:.0f} KiB mean), "
                  f"preprocess {preprocess.model_dump(exclude={'ingest'})}, {os.cpu_count()} CPUs, "
                  f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    checkpoint = args.checkpoint
    if checkpoint is None:
        images = np.stack([decode_radiograph(b, preprocess).pixels for b in bodies[:32]])
        checkpoint = train_model(images, args.encoder, args.image_size, out / "model")
    n_classes = int(load_checkpoint(checkpoint).extra["num_classes"])
    sort = {"checkpoint": str(checkpoint), "classes": [f"class-{i}" for i in range(n_classes)],
            "num_cpus": 1, "torch_threads": 1}
    ensemble = load_sorter_model(SortConfig.model_validate(sort))

    token = secrets.token_urlsafe(32)
    os.environ["MSK_SERVE_TOKEN"] = token
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    chunks = [bodies[r::args.rounds] for r in range(args.rounds)]
    concurrencies = sorted({1, args.concurrency})
    results: dict[tuple[int, str], Tally] = {}
    try:
        for batch in (1, args.batch):
            config = ServeConfig.model_validate({
                "port": port, "request_timeout_s": 120, "call_timeout_s": 100,
                "preprocess": preprocess.model_dump(mode="json"), "gateway": {"num_cpus": 0.5},
                "sorter": {**sort, "max_batch_size": batch, "max_ongoing_requests": 2 * max(batch, args.concurrency)}})
            started = time.perf_counter()
            serve.run(application(config), name="msk", route_prefix="/")
            console.print(f"deployed with max_batch_size={batch} in {time.perf_counter() - started:.1f} s")
            asyncio.run(over_http(url, token, bodies[:2 * args.concurrency], args.concurrency, Tally()))  # warm-up
            for chunk in chunks:  # interleaved: every contestant sees the same background load
                in_process(chunk, preprocess, ensemble, batch, results.setdefault((batch, "in-process"), Tally()))
                for c in concurrencies:
                    asyncio.run(over_http(url, token, chunk, c, results.setdefault((batch, f"http-{c}"), Tally())))
    finally:
        serve.shutdown()
        ray.shutdown()

    table = Table(title=f"/v1/sort vs in-process: {args.encoder} at {args.image_size} px, {len(bodies)} requests "
                        f"per row in {args.rounds} interleaved rounds", title_justify="left")
    for name in ("path", "batching", "concurrency", "p50 ms", "p99 ms", "req/s", "overhead (p50)",
                 "throughput vs in-process", "errors"):
        table.add_column(name, justify="left" if name in ("path", "batching") else "right")
    for batch in (1, args.batch):
        base = results[(batch, "in-process")]
        floor = results[(1, "in-process")]
        label = "off" if batch == 1 else f"on (max {batch})"
        table.add_row("in-process", "1 by 1" if batch == 1 else f"batches of {batch}", "1" if batch == 1 else "-",
                      _ms(base.p50), _ms(base.p99), f"{base.rps:.1f}", "", "", "")
        for c in concurrencies:
            r = results[(batch, f"http-{c}")]
            table.add_row("HTTP /v1/sort", label, str(c), _ms(r.p50), _ms(r.p99), f"{r.rps:.1f}",
                          f"{r.p50 / floor.p50:.2f}x" if c == 1 else "", f"{r.rps / base.rps:.2f}", str(r.errors))
    console.print(table)
    decode = statistics.mean(_decode_times(bodies[:50], preprocess))
    console.print(f"decode + square alone: {decode:.1f} ms per input (mean of 50, in-process); load average "
                  f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")


def _ms(value: float) -> str:
    return "" if np.isnan(value) else f"{value:.1f}"


def _decode_times(bodies: list[bytes], preprocess) -> list[float]:
    from msk.serve.inputs import decode_radiograph

    times = []
    for body in bodies:
        t = time.perf_counter()
        decode_radiograph(body, preprocess)
        times.append(1000 * (time.perf_counter() - t))
    return times


if __name__ == "__main__":
    main()
