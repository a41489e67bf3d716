"""``msk eval sorter``: a finished sorter run scored against a truth file, next to its weak-label
scores.

A sorter trained on weak labels (clusters named by a person or by a simulated expert) reports
top-1/top-2 against those weak labels (``sorter.json``). When a truth is known for some images
(a labels CSV, or a synthetic export's ``ground_truth.csv``; :func:`msk.core.io.truth.read_truth`),
:func:`evaluate_against_truth` scores the same ensemble predictions of the run's test images
(``predictions_test.csv``: best and second region) against it, and says how often the weak
labels themselves agree with the truth. No model is run. Writes ``RUN/truth_eval.json``.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["SorterTruthEvaluation", "evaluate_against_truth"]

RESULT_FILE = "truth_eval.json"


@dataclass
class SorterTruthEvaluation:
    """Scores of a sorter run's test images against the weak labels and against a truth.

    :param n_test: test images (scored against the weak labels, as in ``sorter.json``).
    :param n_known: test images the truth file labels (scored against the truth).
    :param weak_agreement: share of those whose weak label is the true region.
    :param outside: test images per true region the sorter has no class for (always wrong).
    """

    run: str
    truth: str
    n_test: int
    weak_top1: float
    weak_top2: float
    n_known: int
    truth_top1: float
    truth_top2: float
    weak_agreement: float
    outside: dict[str, int] = field(default_factory=dict)

    def table(self):
        """Both scores side by side as a rich table."""
        from rich.table import Table

        table = Table(title=f"sorter {self.run}: test images", title_justify="left")
        for name, justify in (("scored against", "left"), ("images", "right"), ("top-1", "right"),
                              ("top-2", "right")):
            table.add_column(name, justify=justify)
        table.add_row("weak labels (trained on)", str(self.n_test), f"{self.weak_top1:.3f}",
                      f"{self.weak_top2:.3f}")
        table.add_row(f"truth ({self.truth})", str(self.n_known), f"[b]{self.truth_top1:.3f}[/b]",
                      f"[b]{self.truth_top2:.3f}[/b]")
        caption = f"weak labels agree with the truth on {self.weak_agreement:.1%} of these images"
        if self.outside:
            caption += ("; true regions the sorter has no class for (never right): "
                        + ", ".join(f"{k} {v}" for k, v in self.outside.items()))
        table.caption, table.caption_justify = caption, "left"
        return table


def evaluate_against_truth(run_dir: str | os.PathLike, truth_file: str | os.PathLike, *,
                           ingest: str | os.PathLike | None = None) -> SorterTruthEvaluation:
    """Score the test predictions of the sorter run ``run_dir`` against ``truth_file``.

    :param ingest: the run's ingest folder, for a synthetic ``ground_truth.csv`` (default: the
        one ``sorter.json`` records).
    """
    import yaml

    from msk.core.io.truth import canonical_labels, check_overlap, read_truth
    from msk.core.models.sorter import SorterError, read_sorter_info

    run_dir = Path(run_dir)
    info = read_sorter_info(run_dir)
    predictions = run_dir / "predictions_test.csv"
    if not predictions.is_file():
        raise SorterError(f"{predictions} does not exist; rerun `msk train sorter` on {run_dir}")
    with predictions.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if ingest is None:
        ingest = (info.get("ingest") or {}).get("path")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    region_set = (saved or {}).get("region_set", "samx-regions")
    truth = read_truth(truth_file, what="region", ingest=ingest)
    check_overlap(truth, [r["image_id"] for r in rows], predictions)
    truth = canonical_labels(truth.restrict({r["image_id"] for r in rows}), region_set)
    scored = [(r, truth.labels[r["image_id"]]) for r in rows if r["image_id"] in truth.labels]
    n = len(scored)
    classes = set(info["classes"])
    result = SorterTruthEvaluation(
        run=str(run_dir), truth=str(truth_file), n_test=int(info["test"]["n"]),
        weak_top1=float(info["test"]["top1"]), weak_top2=float(info["test"]["top2"]), n_known=n,
        truth_top1=round(sum(r["predicted"] == t for r, t in scored) / n, 4),
        truth_top2=round(sum(t in (r["predicted"], r["second"]) for r, t in scored) / n, 4),
        weak_agreement=round(sum(r["label"] == t for r, t in scored) / n, 4),
        outside=dict(sorted(Counter(t for _, t in scored if t not in classes).items())))
    (run_dir / RESULT_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
    from msk.core.stages.sorter.report import write_sorter_report

    write_sorter_report(run_dir)  # report.html again, now with these scores
    return result
