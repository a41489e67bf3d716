"""Benchmark ``/v1/sort`` over HTTP (Ray Serve) against the same model called in this process.

Both sides do the same work per input: decode the file with the ingest's reader, square it
(:func:`msk.serve.inputs.decode_radiograph`), run the sorter and make the answer
(:meth:`msk.core.models.sorter.SorterEnsemble.predict_scores`, :func:`msk.core.models.sorter.sort_answer`),
with one torch thread each:

* **in-process, 1 by 1**: decode + predict one input at a time: the latency floor;
* **in-process, batch B**: decode every input, predict in batches of ``B``: the throughput
  the model allows without any serving;
* **HTTP**: ``msk serve`` with the sorter only (gateway + one sorter replica), Bearer token
  on, driven by ``httpx`` at concurrency 1 and ``--concurrency``, with ``@serve.batch`` off
  (``max_batch_size: 1``) and on (``max_batch_size: B``).

Latency is wall-clock per request (p50, p99); throughput is requests / wall-clock. "p50 vs
in-process" is the HTTP p50 divided by the in-process 1-by-1 p50; "req/s vs in-process" is the
HTTP throughput as a share of the in-process throughput with the same batching (1 by 1 for
batching off, batches of ``B`` for on). "CPU ms/req" is the CPU time per request of this
process plus, for HTTP, Serve's proxy and the msk replicas (psutil): what serving costs, which
a loaded machine distorts much less than the wall clock. The inputs are cut into ``--rounds``
chunks and the contestants take turns chunk by chunk, so that all of them see the same
background load on a shared machine (the client, the gateway, the replica and the in-process
model all share this machine's CPUs); the table gives mean ± sd over the rounds.
``--breakdown`` adds the time of each part of one request (multipart body, parsing, decoding,
the model, ``/healthz`` and ``/v1/models`` round trips) and each process's CPU per request.

Inputs are the first ``--n`` files the evidence ingest accepted (``--ingest``: its manifest
and ``ingest.json`` give the source files and the preprocessing), read into memory once;
without it, synthetic PNGs. The model is ``--checkpoint`` or, by default, a ``--encoder``
classifier trained for one epoch on a few of those images (its weights do not matter for
timing). Usage::

    python bench/serve.py --ingest /work/evidence/ingest5k --n 200 --encoder resnet18
    OMP_NUM_THREADS=1 python bench/serve.py --ingest /nonexistent --n 96 --rounds 3 --breakdown  # synthetic
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
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
class Round:
    """One contestant in one round: latencies (s), wall-clock, requests, CPU seconds."""

    latencies: list[float]
    seconds: float
    requests: int
    cpu: float

    @property
    def p50(self) -> float:
        return 1000 * float(np.percentile(self.latencies, 50)) if self.latencies else float("nan")

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu / self.requests


@dataclass
class Tally:
    """One contestant's rounds and errors."""

    rounds: list[Round] = field(default_factory=list)
    errors: int = 0

    def add(self, latencies: list[float], seconds: float, requests: int, cpu: float, errors: int = 0) -> None:
        self.rounds.append(Round(latencies, seconds, requests, cpu))
        self.errors += errors

    def spread(self, value) -> tuple[float, float]:
        """Mean and standard deviation over the rounds of ``value(round)``."""
        values = [value(r) for r in self.rounds]
        return float(np.mean(values)), float(np.std(values))

    @property
    def p99(self) -> float:
        latencies = [x for r in self.rounds for x in r.latencies]
        return 1000 * float(np.percentile(latencies, 99)) if latencies else float("nan")


class CpuMeter:
    """CPU seconds of this process plus, for HTTP, the Serve processes this process's Ray started
    (the proxy and the msk replicas; not Serve's controller)."""

    NAMES = ("ray::ProxyActor", "ray::ServeReplica:msk")

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.serving: list = []

    def refresh(self) -> None:
        """Find the Serve processes again (after a deployment)."""
        self.serving = [p for p in self.me.children(recursive=True) if p.name().startswith(self.NAMES)
                        or " ".join(p.cmdline()[:1]).startswith(self.NAMES)]

    def by_process(self) -> dict[str, float]:
        """CPU seconds so far of this process ("client") and of each Serve process, by name."""
        found = {"client (this process)": time.process_time()}
        for process in self.serving:
            try:
                times = process.cpu_times()
                name = process.name().removeprefix("ray::")
                found[name] = found.get(name, 0.0) + times.user + times.system
            except Exception:  # noqa: BLE001 - a replica that ended
                pass
        return found

    def seconds(self, with_serving: bool) -> float:
        total = time.process_time()
        for process in self.serving if with_serving else []:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except Exception:  # noqa: BLE001 - a replica that ended: nothing more to count
                pass
        return total


def in_process(bodies: list[bytes], preprocess, ensemble, batch: int, tally: Tally, meter: CpuMeter) -> None:
    """Decode + predict: 1 by 1 (latency per input), or decode all then predict in batches."""
    from msk.core.models.sorter import sort_answer
    from msk.serve.inputs import decode_radiograph

    def answer(images: np.ndarray) -> list[dict]:  # the sorter replica's work, without the serving
        probs, scores = ensemble.predict_scores(images)
        return [sort_answer(p, s, ensemble, 5) for p, s in zip(probs, scores.tolist())]

    latencies = []
    cpu = meter.seconds(False)
    began = time.perf_counter()
    if batch == 1:
        for body in bodies:
            t = time.perf_counter()
            answer(decode_radiograph(body, preprocess).pixels[None])
            latencies.append(time.perf_counter() - t)
    else:
        images = np.stack([decode_radiograph(body, preprocess).pixels for body in bodies])
        for start in range(0, len(images), batch):
            answer(images[start:start + batch])
    tally.add(latencies, time.perf_counter() - began, len(bodies), meter.seconds(False) - cpu)


async def over_http(url: str, token: str, bodies: list[bytes], concurrency: int, tally: Tally,
                    meter: CpuMeter | None = None) -> None:
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

        cpu = meter.seconds(True) if meter else 0.0
        began = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        seconds = time.perf_counter() - began
        cpu = meter.seconds(True) - cpu if meter else 0.0
    tally.add(latencies, seconds, len(bodies), cpu, sum(s != 200 for s in statuses))


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
    ap.add_argument("--batch-wait", type=float, default=None,
                    help="batch_wait_timeout_s with batching on (default: the config's)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    ap.add_argument("--pixel-scrub", choices=("auto", "always", "off"), default=None,
                    help="preprocess.pixel_scrub of both sides (default: the ingest's, else auto); the "
                         "scrub is part of decoding, about 15 ms of a 256 px upload here")
    ap.add_argument("--ingress", choices=("proxy", "direct"), default="proxy",
                    help="who answers the port: Serve's proxy, or the gateway replica (direct ingress); run the "
                         "script once per value, alternating, to compare them")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the parts of a request (multipart parsing, decode, model, hops) at concurrency 1")
    args = ap.parse_args()

    import ray
    import torch
    from ray import serve
    from rich.console import Console
    from rich.table import Table

    from msk.core.data.squaring import SquaringConfig
    from msk.core.io.checkpoint import load_checkpoint
    from msk.serve.app import application, serve_environment
    from msk.serve.config import ServeConfig, SortConfig
    from msk.serve.inputs import decode_radiograph
    from msk.serve.sorter import load_sorter_model

    torch.set_num_threads(1)
    console = Console(width=150)
    out = args.out or Path(tempfile.mkdtemp(prefix="msk-bench-serve-"))
    bodies, pre = load_inputs(args.ingest, args.n, args.image_size)
    if args.pixel_scrub is not None:
        pre["pixel_scrub"] = args.pixel_scrub
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

    def serve_config(batch: int) -> ServeConfig:
        return ServeConfig.model_validate({
            "port": port, "ingress": args.ingress, "request_timeout_s": 120, "call_timeout_s": 100,
            "preprocess": preprocess.model_dump(mode="json"), "gateway": {"num_cpus": 0.5},
            "sorter": {**sort, "max_batch_size": batch, "max_ongoing_requests": 2 * max(batch, args.concurrency),
                       **({} if args.batch_wait is None else {"batch_wait_timeout_s": args.batch_wait})}})

    first = serve_config(1)
    serve_environment(first)  # as `msk serve` does: the proxy and replicas inherit it
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": first.serve_proxy_port,
                                                         "request_timeout_s": 120})
    chunks = [bodies[r::args.rounds] for r in range(args.rounds)]
    concurrencies = sorted({1, args.concurrency})
    results: dict[tuple[int, str], Tally] = {}
    meter = CpuMeter()
    try:
        for batch in sorted({1, args.batch}):
            config = serve_config(batch)
            if args.ingress == "direct":  # the old gateway replica holds the port until it is gone
                serve.delete("msk")
            started = time.perf_counter()
            serve.run(application(config), name="msk", route_prefix="/")
            console.print(f"deployed with max_batch_size={batch} in {time.perf_counter() - started:.1f} s")
            meter.refresh()
            asyncio.run(over_http(url, token, bodies[:2 * args.concurrency], args.concurrency, Tally()))  # warm-up
            for chunk in chunks:  # interleaved: every contestant sees the same background load
                in_process(chunk, preprocess, ensemble, batch, results.setdefault((batch, "in-process"), Tally()),
                           meter)
                for c in concurrencies:
                    asyncio.run(over_http(url, token, chunk, c, results.setdefault((batch, f"http-{c}"), Tally()),
                                          meter))
            if args.breakdown and batch == 1:
                parts = breakdown(url, token, bodies, preprocess, ensemble, args.rounds)
                cpu_parts = cpu_breakdown(url, token, bodies, meter)
    finally:
        serve.shutdown()
        ray.shutdown()
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)

    table = Table(title=f"/v1/sort (ingress: {args.ingress}) vs in-process: {args.encoder} at {args.image_size} px, "
                        f"{len(bodies)} requests "
                        f"per row in {args.rounds} interleaved rounds (mean ± sd over the rounds)",
                  title_justify="left")
    for name in ("path", "batching", "conc.", "p50 ms", "p99 ms", "req/s", "p50 vs in-process",
                 "req/s vs in-process", "CPU ms/req", "CPU vs in-process", "errors"):
        table.add_column(name, justify="left" if name in ("path", "batching") else "right")

    def pm(mean_sd: tuple[float, float], digits: int = 1, suffix: str = "") -> str:
        return f"{mean_sd[0]:.{digits}f}{suffix} ± {mean_sd[1]:.{digits}f}"

    def ratio(a: Tally, b: Tally, value) -> tuple[float, float]:
        values = [value(x) / value(y) for x, y in zip(a.rounds, b.rounds)]
        return float(np.mean(values)), float(np.std(values))

    for batch in sorted({1, args.batch}):
        base = results[(batch, "in-process")]
        floor = results[(1, "in-process")]
        label = "off" if batch == 1 else f"on (max {batch})"
        table.add_row("in-process", "1 by 1" if batch == 1 else f"batches of {batch}", "1" if batch == 1 else "-",
                      pm(base.spread(lambda r: r.p50)) if batch == 1 else "", "", pm(base.spread(lambda r: r.rps)),
                      "", "", pm(base.spread(lambda r: r.cpu_ms)), "", "")
        for c in concurrencies:
            r = results[(batch, f"http-{c}")]
            table.add_row("HTTP /v1/sort", label, str(c), pm(r.spread(lambda x: x.p50)), _ms(r.p99),
                          pm(r.spread(lambda x: x.rps)),
                          pm(ratio(r, floor, lambda x: x.p50), 2, "x") if c == 1 else "",
                          pm(ratio(r, base, lambda x: x.rps), 2), pm(r.spread(lambda x: x.cpu_ms)),
                          pm(ratio(r, base, lambda x: x.cpu_ms), 2, "x"), str(r.errors))
    console.print(table)
    if args.breakdown:
        print_breakdown(console, parts)
        console.print("CPU ms per request by process, POST /v1/sort at concurrency 1 (idle: the same processes "
                      "over the same wall time with no request, per request):")
        for name, (busy, idle) in cpu_parts.items():
            console.print(f"  {name}: {busy:.1f} busy, {idle:.1f} idle")
    decode = statistics.mean(_decode_times(bodies[:50], preprocess))
    console.print(f"decode + square alone: {decode:.1f} ms per input (mean of 50, in-process); load average "
                  f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")


def breakdown(url: str, token: str, bodies: list[bytes], preprocess, ensemble, rounds: int) -> dict[str, list[float]]:
    """Milliseconds per request of each part of ``POST /v1/sort`` at concurrency 1, interleaved.

    In this process: building the multipart body (the client's share), parsing it as the gateway
    does (Starlette), decode + square, the model (forward pass + answer) and the JSON of the
    answer. Over HTTP: ``GET /healthz`` (client + proxy + gateway, no model, no auth),
    ``GET /v1/models`` (adds the Bearer check and one call through a deployment handle to the
    sorter replica) and the whole ``POST /v1/sort``.
    """
    import json

    import httpx
    from starlette.requests import Request

    from msk.core.models.sorter import sort_answer
    from msk.serve.inputs import decode_radiograph

    parts: dict[str, list[float]] = {}

    def timed(name: str, fn, *a):
        t = time.perf_counter()
        value = fn(*a)
        parts.setdefault(name, []).append(1000 * (time.perf_counter() - t))
        return value

    def encode(body: bytes) -> httpx.Request:
        request = httpx.Request("POST", url + "/v1/sort", files={"image": ("x", body)})
        request.read()
        return request

    async def parse(request: httpx.Request) -> bytes:
        sent = False

        async def receive():
            nonlocal sent
            message = {"type": "http.request", "body": b"" if sent else request.content, "more_body": False}
            sent = True
            return message

        scope = {"type": "http", "method": "POST", "path": "/v1/sort", "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers.items()]}
        form = await Request(scope, receive).form(max_files=2, max_fields=4)
        data = await form["image"].read()  # type: ignore[union-attr]
        await form.close()
        return data

    def model(pixels):
        probs, scores = ensemble.predict_scores(pixels[None])
        return sort_answer(probs[0], float(scores[0]), ensemble, 5)

    async def http(chunk: list[bytes]) -> None:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
            for body in chunk:
                calls = (("HTTP GET /healthz", "GET", "/healthz", None),
                         ("HTTP GET /v1/models", "GET", "/v1/models", None),
                         ("HTTP POST /v1/sort", "POST", "/v1/sort", {"image": ("x", body)}))
                for name, method, path, files in calls:
                    t = time.perf_counter()
                    r = await client.request(method, path, files=files)
                    parts.setdefault(name, []).append(1000 * (time.perf_counter() - t))
                    r.raise_for_status()

    async def local(chunk: list[bytes]) -> None:
        for body in chunk:
            request = timed("client: multipart body", encode, body)
            t = time.perf_counter()
            data = await parse(request)
            parts.setdefault("gateway: multipart parse", []).append(1000 * (time.perf_counter() - t))
            image = timed("gateway: decode + square", decode_radiograph, data, preprocess)
            answer = timed("replica: model + answer", model, image.pixels)
            timed("gateway: answer JSON", lambda a: json.dumps(a).encode(), answer)

    for r in range(rounds):
        chunk = bodies[r::rounds]
        asyncio.run(local(chunk))
        asyncio.run(http(chunk))
    return parts


def cpu_breakdown(url: str, token: str, bodies: list[bytes], meter: CpuMeter) -> dict[str, tuple[float, float]]:
    """CPU ms per request of each process while ``POST /v1/sort`` runs 1 by 1, and over the same
    wall time idle (Serve's own background work: health checks, metrics)."""
    before = meter.by_process()
    began = time.perf_counter()
    asyncio.run(over_http(url, token, bodies, 1, Tally()))
    seconds = time.perf_counter() - began
    busy = meter.by_process()
    time.sleep(seconds)
    idle = meter.by_process()
    n = len(bodies)
    return {k: (1000 * (busy[k] - before[k]) / n, 1000 * (idle[k] - busy[k]) / n) for k in before if k in idle}


def print_breakdown(console, parts: dict[str, list[float]]) -> None:
    from rich.table import Table

    table = Table(title="Where the time of one /v1/sort request goes (concurrency 1)", title_justify="left")
    for name in ("part", "p50 ms", "mean ms", "sd ms"):
        table.add_column(name, justify="left" if name == "part" else "right")
    for name, values in parts.items():
        table.add_row(name, f"{np.percentile(values, 50):.2f}", f"{np.mean(values):.2f}", f"{np.std(values):.2f}")
    console.print(table)


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
