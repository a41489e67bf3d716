"""``msk eval segmenter``: IoU and Dice of a segmenter run on its held-out images, per entity and
overall, and an overlay sheet (image, truth, prediction) as PNG + HTML.

The images scored are the masked images that the run did not train or validate on: its fixed
test set (``part == test`` in the run's ``splits.csv``) and any image the run has never seen
(an external set). IoU and Dice are per image (``|P & T| / |P | T|`` and ``2 |P & T| / (|P| +
|T|)`` in the ingest's square pixels), averaged over the images of an entity and over all
images. The prediction is the fold ensemble's mean probability at the run's threshold.
"""

from __future__ import annotations

import csv
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msk.core.models.metrics import overlap_scores
from msk.core.models.segmenter import SegmentationError, load_ensemble
from msk.core.stages.segmentation.training import load_segmentation_data, read_splits

__all__ = ["SegmentationEvaluation", "evaluate_segmenter", "overlay_sheet"]

TRUTH_RGB = (40, 220, 80)
PRED_RGB = (240, 60, 40)


@dataclass
class SegmentationEvaluation:
    """Scores of :func:`evaluate_segmenter`; ``by_label`` maps entity -> ``{n, iou, dice}``."""

    out: Path
    n_images: int
    iou: float
    dice: float
    by_label: dict[str, dict[str, float]]
    n_external: int
    sheet: Path
    page: Path

    def table(self) -> str:
        lines = [f"{'entity':<24} {'n':>5} {'IoU':>7} {'Dice':>7}"]
        for label, s in self.by_label.items():
            lines.append(f"{label:<24} {int(s['n']):>5} {s['iou']:>7.3f} {s['dice']:>7.3f}")
        lines.append(f"{'overall':<24} {self.n_images:>5} {self.iou:>7.3f} {self.dice:>7.3f}")
        return "\n".join(lines)


def _tint(grey: np.ndarray, mask: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """``uint8 [H, W, 3]``: the grey image with ``mask`` tinted and its outline drawn in ``rgb``."""
    from scipy.ndimage import binary_erosion

    out = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    colour = np.asarray(rgb, np.float32)
    out[mask] = 0.6 * out[mask] + 0.4 * colour
    out[mask & ~binary_erosion(mask)] = colour
    return out.clip(0, 255).astype(np.uint8)


def overlay_sheet(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: str | os.PathLike,
                  *, tile: int = 160) -> Path:
    """One row per image: the image, the truth mask (green) and the prediction (red), as a PNG."""
    from PIL import Image

    n = len(images)
    sheet = Image.new("RGB", (3 * tile + 8, max(n, 1) * (tile + 4)), (255, 255, 255))
    for r in range(n):
        grey = images[r]
        views = [np.repeat(grey[..., None], 3, axis=2), _tint(grey, truth[r], TRUTH_RGB),
                 _tint(grey, pred[r], PRED_RGB)]
        for c, view in enumerate(views):
            im = Image.fromarray(view).resize((tile, tile), Image.Resampling.NEAREST)
            sheet.paste(im, (c * (tile + 4), r * (tile + 4)))
    path = Path(path)
    sheet.save(path, optimize=True)
    return path


def _pick(labels: list[str], count: int) -> list[int]:
    """Up to ``count`` indices, round-robin over the labels (deterministic)."""
    by: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by.setdefault(label, []).append(i)
    order: list[int] = []
    queues = [list(v) for _, v in sorted(by.items())]
    while len(order) < count and any(queues):
        for q in queues:
            if q and len(order) < count:
                order.append(q.pop(0))
    return order


def _page(path: Path, result: SegmentationEvaluation, run: Path, rows: list[dict[str, str]]) -> None:
    esc = html.escape
    scores = "".join(f"<tr><td>{esc(k)}</td><td>{int(v['n'])}</td><td>{v['iou']:.3f}</td><td>{v['dice']:.3f}</td></tr>"
                     for k, v in result.by_label.items())
    scores += (f"<tr><th>overall</th><th>{result.n_images}</th><th>{result.iou:.3f}</th>"
               f"<th>{result.dice:.3f}</th></tr>")
    captions = "".join(f"<li>{esc(r['image_id'])}: {esc(r['label'])}, IoU {float(r['iou']):.3f}, "
                       f"Dice {float(r['dice']):.3f}</li>" for r in rows)
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>msk eval segmenter</title>
<style>body{{font-family:sans-serif}} td,th{{padding:2px 10px;text-align:right}}</style></head><body>
<h1>Segmenter {esc(str(run))}</h1>
<p>{result.n_images} held-out images ({result.n_external} not in the run's splits); IoU and Dice per image,
averaged per entity and overall.</p>
<table><tr><th>entity</th><th>n</th><th>IoU</th><th>Dice</th></tr>{scores}</table>
<h2>Overlays</h2><p>Columns: image, truth (green), prediction (red). Rows:</p><ol>{captions}</ol>
<img src="{esc(result.sheet.name)}" alt="overlay sheet"></body></html>
""")


def evaluate_segmenter(run: str | os.PathLike, ingest: str | os.PathLike, masks: str | os.PathLike,
                       out: str | os.PathLike, *, sheet_images: int = 16) -> SegmentationEvaluation:
    """Score the run's fold ensemble on the held-out masked images; write ``scores.csv``,
    ``report.json``, ``overlays.png`` and ``overlays.html`` into ``out``."""
    run, out = Path(run), Path(out)
    parts = read_splits(run)
    ensemble = load_ensemble(run)
    data = load_segmentation_data(ingest, masks)
    if data.images.shape[1] != ensemble.info.get("image_size", data.images.shape[1]):
        raise SegmentationError(f"{ingest} holds {data.images.shape[1]} px images but {run} was trained on "
                                f"{ensemble.info['image_size']} px ones; evaluate on an ingest of that size")
    keep = [i for i, image_id in enumerate(data.image_ids) if parts.get(image_id) != "dev"]
    if not keep:
        raise SegmentationError(f"every masked image of {masks} was used to train or validate {run}; "
                                "evaluate on its test set or on other images")
    data = data.subset(keep)
    pred = ensemble.predict(data.images)
    iou, dice = overlap_scores(pred, data.masks)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"image_id": data.image_ids[i], "patient_id": data.patient_ids[i], "label": data.labels[i],
             "part": parts.get(data.image_ids[i], "external"), "iou": f"{iou[i]:.4f}", "dice": f"{dice[i]:.4f}",
             "truth_pixels": str(int(data.masks[i].sum())), "predicted_pixels": str(int(pred[i].sum()))}
            for i in range(len(data))]
    with (out / "scores.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    by_label = {}
    for label in sorted(set(data.labels)):
        idx = [i for i, lab in enumerate(data.labels) if lab == label]
        by_label[label] = {"n": len(idx), "iou": round(float(iou[idx].mean()), 4),
                           "dice": round(float(dice[idx].mean()), 4)}
    shown = _pick(data.labels, sheet_images)
    sheet = overlay_sheet(data.images[shown], data.masks[shown], pred[shown], out / "overlays.png")
    result = SegmentationEvaluation(out, len(data), round(float(iou.mean()), 4), round(float(dice.mean()), 4),
                                    by_label, sum(r["part"] == "external" for r in rows), sheet,
                                    out / "overlays.html")
    _page(result.page, result, run, [rows[i] for i in shown])
    (out / "report.json").write_text(json.dumps({
        "run": str(run), "ingest": str(ingest), "masks": str(masks), "threshold": ensemble.threshold,
        "n_images": result.n_images, "n_external": result.n_external, "iou": result.iou, "dice": result.dice,
        "by_label": by_label}, indent=2) + "\n")
    return result
