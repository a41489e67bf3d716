"""The sorter's report: ``RUN/report.html``, one page with its numbers, confusion matrices and
Grad-CAM overlays, in msk's look (:mod:`msk.core.io.report`; ``msk clusters review`` links it).

Written by ``msk train sorter`` at the end of a run and again by ``msk eval sorter`` (which adds
the scores against a truth); it reads only the run folder's files (``sorter.json``,
``truth_eval.json``, ``confusion_*.png``, ``gradcam.png``), so it can be rewritten at any time.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from msk.core.io.report import html_page

__all__ = ["REPORT_FILE", "write_sorter_report"]

REPORT_FILE = "report.html"


def _scores(name: str, scores: dict[str, Any]) -> str:
    folds = ", ".join(f"{x:.3f}" for x in scores.get("fold_top1") or [])
    unknown = scores.get("unknown")
    def number(key: str) -> str:
        value = scores.get(key)
        return "–" if value is None else f"{value:.3f}"

    rows = [("images", str(scores.get("n", "–"))), ("top-1 (ensemble)", number("top1")),
            ("top-2 (ensemble)", number("top2")), ("macro F1", number("macro_f1")),
            ("top-1 per fold", folds or "–")]
    if unknown is not None:
        rows.append(("flagged unknown", f"{unknown:.1%}"))
    if scores.get("left_out"):
        rows.append(("left out (classes the sorter lacks)",
                     ", ".join(f"{k} {v}" for k, v in scores["left_out"].items())))
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    image = scores.get("confusion_png")
    picture = f'<p><img src="{html.escape(image)}" alt="confusion matrix, {html.escape(name)}"></p>' if image else ""
    return (f"<section><h2>{html.escape(name)} images <small>(scored against the labels trained on)</small></h2>"
            f'<table class="report">{table}</table>{picture}</section>')


def write_sorter_report(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/report.html`` from the run's files and return its path."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "sorter.json").read_text())
    classes = [str(c) for c in info.get("classes") or []]
    facts = [f"{info[key]} {what}" for key, what in (("n_images", "images"), ("folds", "folds"),
                                                     ("n_test", "test images"), ("image_size", "px input"))
             if info.get(key) is not None]
    parts = [f"<p>{len(classes)} classes ({html.escape(', '.join(classes))}); {html.escape(', '.join(facts))}.</p>"]
    for name in ("test", "holdout"):
        if info.get(name):
            parts.append(_scores(name, info[name]))
    truth_file = run_dir / "truth_eval.json"
    if truth_file.is_file():
        t = json.loads(truth_file.read_text())
        parts.append(
            f"<section><h2>against a truth <small>({html.escape(str(t['truth']))})</small></h2>"
            f'<table class="report"><tr><th>scored against</th><th>images</th><th>top-1</th><th>top-2</th></tr>'
            f"<tr><td>weak labels (trained on)</td><td>{t['n_test']}</td><td>{t['weak_top1']:.3f}</td>"
            f"<td>{t['weak_top2']:.3f}</td></tr>"
            f"<tr><td>truth</td><td>{t['n_known']}</td><td><b>{t['truth_top1']:.3f}</b></td>"
            f"<td><b>{t['truth_top2']:.3f}</b></td></tr></table>"
            f"<p>The weak labels agree with the truth on {t['weak_agreement']:.1%} of these images.</p></section>")
    if (run_dir / "gradcam.png").is_file():
        parts.append('<section><h2>Grad-CAM <small>(where the sorter looked, test images)</small></h2>'
                     '<p><img src="gradcam.png" alt="Grad-CAM overlays of test images"></p></section>')
    for note in info.get("notes") or []:
        parts.append(f'<p class="dim">note: {html.escape(str(note))}</p>')
    path = run_dir / REPORT_FILE
    tmp = path.with_name(f".{REPORT_FILE}.tmp")
    tmp.write_text(html_page(f"region sorter: {run_dir.name}", "\n".join(parts), what="sorter report",
                             subtitle=str(run_dir)), encoding="utf-8")
    os.replace(tmp, path)
    return path
