"""Train the learned burned-in-text detector (:mod:`msk.core.data.text_net`) and write its weights.

The training images are msk's synthetic radiographs (:func:`msk.core.synth.cases.render_case`)
drawn *without* their own burned-in text, with text burned in here: random names, dates, IDs and
codes in matplotlib's fonts (DejaVu Sans / Sans Mono / Serif, STIX; Pillow's default font, the
one the synthetic exports use, is left out so that ``bench/scrub.py`` scores an unseen font),
1-5 lines, glyphs 1.2-7 % of the image's longer side, bright, dark or mid-grey, anywhere
(mostly near an edge), sometimes on a label plate, sometimes blurred. The target is each line's
box (its ink's bounds) at half resolution; a lone glyph (a side marker) is ignored by the loss.

Usage (about 25 minutes on 2 CPU cores)::

    OMP_NUM_THREADS=2 python tools/train_text_net.py --out text_net_v1.onnx
    OMP_NUM_THREADS=2 python tools/train_text_net.py --real-images 600 --teacher text_net_v1.onnx \
        --out msk/core/data/weights/text_net.onnx

(the two runs behind the shipped weights: docs/ingest.md, "How the learned detector was trained").
The network is trained in torch (:class:`msk.core.models.text_detector.TextNet`) and written as
ONNX (:func:`msk.core.models.text_detector.export_onnx`, needs the ``onnx`` package).

The run is seeded: the same arguments give the same weights on the same torch build.
"""

from __future__ import annotations

import argparse
import hashlib
import string
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IGNORE = 2
#: On real backgrounds, the teacher's boxes this share of the longer side or closer to an edge
#: are ignored (films carry labels and markers there); its other boxes are taught as background.
EDGE = 0.12
SIZES = (256, 320, 384, 448, 512)


def _fonts() -> list[Path]:
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = sorted(p for p in root.glob("*.ttf")
                   if p.name.startswith(("DejaVuSans", "DejaVuSerif", "STIXGeneral")) and "Display" not in p.name)
    if not names:
        raise SystemExit(f"no training fonts under {root}")
    return names


def _word(rng: np.random.Generator) -> str:
    kind = rng.integers(7)
    up, low, dig = string.ascii_uppercase, string.ascii_lowercase, string.digits
    n = int(rng.integers(2, 11))
    if kind == 0:  # NAME, First
        last = "".join(rng.choice(list(up), n))
        first = rng.choice(list(up)) + "".join(rng.choice(list(low), n // 2 + 1))
        return last + " " + first
    if kind == 1:  # a date
        d, m, y = int(rng.integers(1, 29)), int(rng.integers(1, 13)), int(rng.integers(1950, 2030))
        sep = str(rng.choice([".", "/", "-"]))
        parts = [f"{d:02d}", f"{m:02d}", str(y)]
        return sep.join(parts if rng.random() < 0.5 else parts[::-1])
    if kind == 2:  # an ID
        return "".join(rng.choice(list(dig), n + 2))
    if kind == 3:  # a code
        return "".join(rng.choice(list(up + dig), n))
    if kind == 4:  # words
        return " ".join("".join(rng.choice(list(low if rng.random() < 0.5 else up), int(rng.integers(2, 8))))
                        for _ in range(int(rng.integers(1, 4))))
    if kind == 5:  # time / field
        clock = f"{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}"
        return clock + (" kV 60" if rng.random() < 0.3 else "")
    return "".join(rng.choice(list(up + low + dig + " .-/:"), n)).strip() or "AB"


def _value(rng: np.random.Generator, under: float, faint: float = 0.0) -> float:
    """The text's grey level on a region of median ``under``: bright, dark or mid-grey, and with
    probability ``faint`` close to the region's own level (0.06-0.2 off it: barely legible text,
    and text whose line runs onto a region where it cannot be seen)."""
    if faint and rng.random() < faint:
        v = under + float(rng.choice([-1.0, 1.0])) * float(rng.uniform(0.06, 0.2))
        return float(np.clip(v if 0.0 <= v <= 1.0 else 2 * under - v, 0.0, 1.0))
    r = rng.random()
    if r < 0.45:
        return float(rng.uniform(0.6, 1.0))
    if r < 0.8:
        return float(rng.uniform(0.0, 0.15))
    v = float(rng.uniform(0.25, 0.75))
    return v if abs(v - under) > 0.08 else float(np.clip(under + rng.choice([-0.15, 0.15]), 0, 1))


def burn(img: np.ndarray, rng: np.random.Generator, fonts: list[Path], faint: float = 0.0,
         ) -> tuple[np.ndarray, np.ndarray]:
    """Burn random text into ``img`` (display units); returns it and the label (0 background,
    1 a line of text, :data:`IGNORE` a lone glyph)."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = img.shape
    side = max(h, w)
    label = np.zeros((h, w), np.uint8)
    n_blocks = int(rng.choice([0, 1, 1, 2, 2, 3]))
    n_marks = int(rng.random() < 0.5) + int(rng.random() < 0.15)
    items = [("block", None)] * n_blocks + [("mark", None)] * n_marks
    for kind, _ in items:
        px = int(round(rng.uniform(0.012, 0.07 if kind == "block" else 0.1) * side))
        px = max(px, 6)
        font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), px)
        lines = ([_word(rng) for _ in range(int(rng.integers(1, 6)))] if kind == "block"
                 else [str(rng.choice(list("LRAPXD")))])
        gap = int(px * rng.uniform(0.1, 0.5))
        probe = ImageDraw.Draw(Image.new("L", (1, 1)))
        boxes = [probe.textbbox((0, 0), t, font=font) for t in lines]
        tw = max(b[2] - b[0] for b in boxes) + 4
        heights = [b[3] - b[1] for b in boxes]
        th = sum(heights) + gap * (len(lines) - 1) + 4
        if tw >= w - 4 or th >= h - 4:
            continue
        if rng.random() < 0.6:  # near an edge
            x = int(rng.choice([rng.integers(0, max(1, w // 12)), w - tw - rng.integers(0, max(1, w // 12))]))
            y = int(rng.choice([rng.integers(0, max(1, h // 12)), h - th - rng.integers(0, max(1, h // 12))]))
        else:
            x, y = int(rng.integers(0, w - tw)), int(rng.integers(0, h - th))
        x, y = int(np.clip(x, 0, w - tw)), int(np.clip(y, 0, h - th))
        patch = Image.new("L", (tw, th))
        draw = ImageDraw.Draw(patch)
        align = rng.random() < 0.3
        top, line_boxes = 2, []
        for t, b, lh in zip(lines, boxes, heights, strict=True):
            left = 2 if not align else 2 + (tw - 4 - (b[2] - b[0]))
            draw.text((left - b[0], top - b[1]), t, font=font, fill=255)
            line_boxes.append((top, top + lh))
            top += lh + gap
        alpha = np.asarray(patch, np.float32) / 255.0
        if rng.random() < 0.25:
            from scipy.ndimage import gaussian_filter

            alpha = gaussian_filter(alpha, rng.uniform(0.3, 0.9))
        region = img[y:y + th, x:x + tw]
        if rng.random() < 0.2 and kind == "block":  # a label plate
            plate = float(rng.uniform(0.0, 0.2) if rng.random() < 0.5 else rng.uniform(0.8, 1.0))
            region[:] = plate + rng.normal(0, 0.01, region.shape).astype(np.float32)
            value = float(np.clip(1.0 - plate + rng.uniform(-0.2, 0.2), 0, 1))
        else:
            value = _value(rng, float(np.median(region)), faint)
        region += alpha * (value - region)
        ink = alpha > 0.25
        for t0, t1 in line_boxes:
            rows = ink[t0:t1]
            if not rows.any():
                continue
            cols = np.flatnonzero(rows.any(axis=0))
            rr = np.flatnonzero(rows.any(axis=1))
            sub = label[y + t0 + rr[0]:y + t0 + rr[-1] + 1, x + cols[0]:x + cols[-1] + 1]
            sub[...] = np.maximum(sub, 1) if kind == "block" else IGNORE
    return img, label


def _render(job: tuple[int, int, int, float]) -> tuple[np.ndarray, np.ndarray]:
    """One training image: synthetic case ``index`` of an export of ``size`` px and ``seed``,
    without its own text, with text burned in (``faint``: see :func:`_value`)."""
    index, size, seed, faint = job
    from msk.core.synth import cases
    from msk.core.synth.config import SynthConfig

    captured: list[np.ndarray] = []

    def capture(img, rng, case, box):  # type: ignore[no-untyped-def]
        captured.append(img.copy())
        return False

    cases._annotate = capture  # type: ignore[assignment]  # this process only: drawing without text
    config = SynthConfig(n_images=100_000, image_size=size, seed=seed)
    case = cases.render_case(index, config)
    if not captured:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.uint8)
    rng = np.random.default_rng([seed, index, 7])
    img = np.clip(captured[0], 0.0, 1.0).astype(np.float32)
    img, label = burn(img, rng, _fonts(), faint)
    img = np.clip(img + rng.normal(0, rng.uniform(0.0, 0.01), img.shape).astype(np.float32), 0, 1)
    if rng.random() < 0.5:  # another window: gamma
        img = img ** float(rng.uniform(0.7, 1.4))
    img = np.round(img * 255) / 255  # 8-bit like most decoded films
    del case
    return img.astype(np.float32), label


def _render_real(job: tuple[str, int, str | None, float]) -> tuple[np.ndarray, np.ndarray]:
    """A real radiograph as a background: reduced like the detector reduces it, every pixel
    background except where the classical detector, or the teacher network near the image's edge
    (where films carry their labels and markers), finds text (ignored: the film may carry real
    text there), with text burned in."""
    path, seed, teacher, faint = job
    import warnings

    from msk.core.data.scrub import block_reduce, detect_text
    from msk.core.data.text_net import WORK_SIDE, detect_text_learned, load_text_net
    from msk.core.io.dicom import read_image

    rng = np.random.default_rng([seed, int(hashlib.sha256(path.encode()).hexdigest()[:8], 16), 11])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = read_image(Path(path).read_bytes(), source=path).pixels
    except Exception:  # noqa: BLE001 - an unreadable file is no background
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.uint8)
    img, factor = block_reduce(pixels, WORK_SIDE)  # as the detector reduces it, without its padding
    label = np.zeros(img.shape, np.uint8)
    boxes = [(b.x0, b.y0, b.x1, b.y1) for b in detect_text(pixels)]
    if teacher:
        edge = EDGE * max(pixels.shape)
        for x0, y0, x1, y1, _ in detect_text_learned(pixels, net=load_text_net(Path(teacher))):
            if min(x0, y0, pixels.shape[1] - x1, pixels.shape[0] - y1) <= edge:
                boxes.append((x0, y0, x1, y1))
    for x0, y0, x1, y1 in boxes:
        label[y0 // factor:-(-y1 // factor), x0 // factor:-(-x1 // factor)] = IGNORE
    img, label = burn(img.copy(), rng, _fonts(), faint)
    return np.clip(img, 0, 1).astype(np.float32), label


def make_set(n: int, seed: int, workers: int, real: list[str] = (), teacher: str | None = None,  # type: ignore[assignment]
             faint: float = 0.0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    jobs = [(int(i), int(rng.choice(SIZES)), seed, faint) for i in rng.choice(100_000, n, replace=False)]
    with get_context("spawn").Pool(workers) as pool:
        out = [r for r in pool.imap(_render, jobs, chunksize=16) if r[0].size]
        out += [r for r in pool.imap(_render_real, [(p, seed, teacher, faint) for p in real], chunksize=8) if r[0].size]
    return out


def real_backgrounds(root: Path, n: int, seed: int) -> list[str]:
    """``n`` files of the training half of ``root`` (every image under it), drawn with ``seed``."""
    from msk.core.data.text_net import training_half

    if n <= 0:
        return []
    if not root.is_dir():
        raise SystemExit(f"--real {root} is not a folder (or pass --real-images 0)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
    half = [p for p in files if training_half(str(p.relative_to(root)))]
    picked = np.random.default_rng(seed).choice(len(half), min(n, len(half)), replace=False)
    return [str(half[int(i)]) for i in sorted(picked)]


def _crop(img: np.ndarray, label: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        img = np.pad(img, ((0, ph), (0, pw)), mode="edge")
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
        h, w = img.shape
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    img, label = img[y:y + size, x:x + size], label[y:y + size, x:x + size]
    if rng.random() < 0.15:  # films are sometimes scanned mirrored
        img, label = img[:, ::-1], label[:, ::-1]
    return img, label


def _half(label: np.ndarray) -> np.ndarray:
    """The label at half resolution: text where any of the 2 x 2 pixels is text, else ignored
    where any is ignored."""
    h, w = label.shape
    blocks = label.reshape(h // 2, 2, w // 2, 2)
    text = (blocks == 1).any(axis=(1, 3))
    ignore = (blocks == IGNORE).any(axis=(1, 3))
    return np.where(text, 1, np.where(ignore, IGNORE, 0)).astype(np.uint8)


def train(data, steps: int, batch: int, crop: int, seed: int, width: int):  # type: ignore[no-untyped-def]
    import torch

    from msk.core.models.text_detector import TextNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    net = TextNet(width)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    start = time.time()
    running = 0.0
    for step in range(1, steps + 1):
        xs, ys = [], []
        for k in rng.integers(0, len(data), batch):
            img, label = _crop(*data[int(k)], rng, crop)
            xs.append(img)
            ys.append(_half(label))
        x = torch.from_numpy(np.stack(xs)[:, None].copy())
        y = torch.from_numpy(np.stack(ys)[:, None].astype(np.int64))
        logits = net(x)
        valid = (y != IGNORE).float()
        target = (y == 1).float()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, target, weight=valid * (1 + 2 * target), reduction="sum") / valid.sum().clamp(min=1)
        p = torch.sigmoid(logits) * valid
        dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
        loss = bce + dice
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * float(loss.detach()) if step > 1 else float(loss.detach())
        if step % 50 == 0 or step == steps:
            print(f"step {step}/{steps} loss {running:.4f} ({time.time() - start:.0f} s)", flush=True)
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "msk" / "core" / "data" / "weights" / "text_net.onnx",
                        help="the ONNX file to write (msk.core.models.text_detector.export_onnx)")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=101,
                        help="export seed of the backgrounds (the benchmarks use 7, 11 and 2027)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--real", type=Path, default=REPO.parent / "shared" / "data" / "real-xr" / "images",
                        help="real radiographs whose training half (training_half) gives backgrounds")
    parser.add_argument("--real-images", type=int, default=0, help="real backgrounds (0: synthetic only)")
    parser.add_argument("--faint", type=float, default=0.0,
                        help="share of text blocks drawn close to their background's grey level (0.06-0.2 off)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="the ONNX file of an earlier run: its boxes near a real background's edge are ignored")
    args = parser.parse_args()
    from msk.core.models.text_detector import export_onnx

    start = time.time()
    real = real_backgrounds(args.real, args.real_images, args.seed)
    data = make_set(args.images, args.seed, args.workers, real, str(args.teacher) if args.teacher else None,
                    args.faint)
    print(f"{len(data)} training images in {time.time() - start:.0f} s", flush=True)
    net = train(data, args.steps, args.batch, args.crop, args.seed, args.width)
    export_onnx(net, args.out, {"trained_by": "tools/train_text_net.py"}
                | {f"arg.{k}": str(v) for k, v in vars(args).items()})
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
