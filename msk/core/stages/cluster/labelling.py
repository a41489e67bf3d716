"""Human-in-the-loop labelling of DeepCluster's clusters (the SAM-X workflow).

1. :func:`export_clusters` writes, for a run's assignments, one contact sheet per cluster, an
   ``index.html`` that shows them by decreasing size, and a ``labels.csv`` template.
2. A person opens ``index.html`` and writes a region name (or ``discard``) into the ``label``
   column of ``labels.csv`` (or a YAML mapping ``cluster: label``). Leaving a label empty leaves
   the cluster unlabelled.
3. :func:`apply_labels` checks the file against the region vocabulary, merges clusters given the
   same region into one weak class and returns :class:`WeakLabels`: a label per image (``None``
   for discarded or unlabelled images).

Clusters with no image (k-means can leave some empty) or a single image are exported like any
other, with a note on the sheet index; they may be labelled, which for an empty cluster has no
effect.
"""

from __future__ import annotations

import csv
import html
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msk.core.io.labels import DISCARD, LabelFileError, WeakLabels, apply_labels, load_assignments

__all__ = ["AutomaticNames", "ClusterName", "export_clusters", "majority_names", "name_clusters_from_truth",
           "run_image_ids", "truth_of_images", "truth_scores", "write_cluster_names"]



# -- export ------------------------------------------------------------------------------------


def _sample(members: np.ndarray, n: int, cluster: int, seed: int) -> np.ndarray:
    """Up to ``n`` of ``members``, drawn deterministically per cluster, in index order."""
    if len(members) <= n:
        return members
    return np.sort(np.random.default_rng([seed, cluster]).choice(members, n, replace=False))


def contact_sheet(images: np.ndarray, *, thumb: int = 96, columns: int | None = None,
                  gap: int = 2):
    """A grey PIL image with ``images`` (``uint8 [n, H, W]``) as ``thumb``-px tiles in a grid."""
    from PIL import Image

    n = len(images)
    columns = columns or max(1, int(np.ceil(np.sqrt(max(n, 1)))))
    rows = max(1, int(np.ceil(n / columns)))
    sheet = Image.new("L", (columns * (thumb + gap) + gap, rows * (thumb + gap) + gap), 255)
    for i, image in enumerate(images):
        tile = Image.fromarray(image).convert("L")
        tile.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
        r, c = divmod(i, columns)
        x = gap + c * (thumb + gap) + (thumb - tile.width) // 2
        y = gap + r * (thumb + gap) + (thumb - tile.height) // 2
        sheet.paste(tile, (x, y))
    return sheet


def _note(size: int) -> str:
    if size == 0:
        return "empty: k-means left no image here; a label has no effect"
    if size == 1:
        return "a single image: label it only if it is clearly one region"
    return ""


def export_clusters(images: np.ndarray, assignments: np.ndarray | Sequence[int],
                    out_dir: str | os.PathLike, *, per_sheet: int = 36, thumb: int = 96,
                    ground_truth: Sequence[str] | None = None, k: int | None = None,
                    seed: int = 0) -> Path:
    """Write contact sheets, ``index.html`` and a ``labels.csv`` template for labelling.

    :param images: ``uint8 [N, H, W]``.
    :param assignments: the cluster of each image (``0..k-1``).
    :param per_sheet: thumbnails per cluster, sampled deterministically (``seed``).
    :param ground_truth: a known label per image; ``index.html`` then shows each cluster's
        composition (to judge a clustering, not to label from).
    :param k: number of clusters, so that empty ones are listed too (default: ``max + 1``).
    :return: the path of ``index.html``.
    """
    labels = np.asarray(assignments, dtype=np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"need images [N, H, W] and N assignments; got images {images.shape} "
                         f"and {len(labels)} assignments")
    if ground_truth is not None and len(ground_truth) != len(labels):
        raise ValueError(f"ground_truth has {len(ground_truth)} entries for {len(labels)} images")
    if len(labels) and labels.min() < 0:
        raise ValueError("assignments must be cluster numbers >= 0")
    k = max(k or 0, int(labels.max()) + 1 if len(labels) else 0)
    out = Path(out_dir)
    (out / "sheets").mkdir(parents=True, exist_ok=True)
    sizes = np.bincount(labels, minlength=k)
    order = sorted(range(k), key=lambda c: (-sizes[c], c))

    sections = []
    for c in order:
        members = np.flatnonzero(labels == c)
        shown = _sample(members, per_sheet, c, seed)
        sheet_name = f"sheets/cluster-{c:04d}.png"
        if len(shown):
            contact_sheet(images[shown], thumb=thumb).save(out / sheet_name)
        sections.append(_html_section(c, int(sizes[c]), len(labels), len(shown),
                                      sheet_name if len(shown) else None,
                                      _composition(ground_truth, members)))

    (out / "index.html").write_text(_html_page(sections, k, len(labels)), encoding="utf-8")
    with (out / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cluster", "size", "label"])
        for c in order:
            writer.writerow([c, int(sizes[c]), ""])
    return out / "index.html"


@dataclass(frozen=True)
class ClusterName:
    """A cluster named automatically from known labels: its majority label and how pure it is."""

    cluster: int
    size: int
    label: str  # "" for an empty cluster
    purity: float  # share of the cluster's images that carry ``label`` (0.0 when empty)


def majority_names(assignments: np.ndarray | Sequence[int], truth: Sequence[str], *,
                   k: int | None = None) -> list[ClusterName]:
    """Name every cluster by the most frequent of its images' known labels (ties: the label
    first in sorted order), with its purity; a *simulated* expert, for evidence runs and for
    archives that already carry a partial truth. Clusters ``0..k-1``, empty ones included."""
    labels = np.asarray(assignments, dtype=np.int64)
    if len(labels) != len(truth):
        raise ValueError(f"{len(truth)} known labels for {len(labels)} assignments")
    k = max(k or 0, int(labels.max()) + 1 if len(labels) else 0)
    members: dict[int, Counter[str]] = {c: Counter() for c in range(k)}
    for c, label in zip(labels.tolist(), truth):
        members[c][str(label)] += 1
    names = []
    for c in range(k):
        counts, size = members[c], sum(members[c].values())
        if not size:
            names.append(ClusterName(c, 0, "", 0.0))
            continue
        label, top = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        names.append(ClusterName(c, size, label, top / size))
    return names


def write_cluster_names(names: Sequence[ClusterName], path: str | os.PathLike, *,
                        named_by: str | None = None) -> Path:
    """A ``cluster,size,label,purity`` labels file that :func:`apply_labels` reads as it reads a
    hand-filled one (the extra columns are ignored there); with ``named_by`` (e.g.
    ``automatic:truth.csv``) a ``named_by`` column says who named the clusters."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cluster", "size", "label", "purity", *(["named_by"] if named_by else [])])
        for n in names:
            writer.writerow([n.cluster, n.size, n.label, f"{n.purity:.4f}",
                             *([named_by] if named_by else [])])
    return path


@dataclass
class AutomaticNames:
    """Clusters of a DeepCluster run named from a truth file (:func:`name_clusters_from_truth`).

    :param names: each cluster's majority label and purity, over its images with a known label.
    :param weak: the weak labels of every image of the run (its cluster's name).
    :param named_by: ``automatic:<truth file>``, written into the names file.
    :param n_known: images of the run that the truth file labels (of ``len(weak.labels)``).
    :param nmi: NMI between the clusters and the truth, over those images.
    :param purity: share of those images whose label is their cluster's majority label.
    """

    names: list[ClusterName]
    weak: WeakLabels
    named_by: str
    n_known: int
    nmi: float
    purity: float
    names_file: Path
    weak_file: Path

    def lines(self) -> list[str]:
        """The summary to print under the weak-label table."""
        named = [n for n in self.names if n.label]
        worst = min(named, key=lambda n: (n.purity, n.cluster))
        return [f"{len(named)} of {len(self.names)} clusters named ({len(self.names) - len(named)} "
                f"without an image of known label); {self.n_known} of {len(self.weak.labels)} "
                f"images have a known label",
                f"against the truth: NMI {self.nmi:.3f}, purity {self.purity:.3f}; least pure "
                f"cluster {worst.cluster} ({worst.label}, {worst.purity:.2f} of {worst.size})"]


def run_image_ids(run_dir: str | os.PathLike) -> list[str]:
    """The image id of each image of a DeepCluster run, in assignment order
    (``RUN/assignments.csv``)."""
    path = Path(run_dir) / "assignments.csv"
    if not path.is_file():
        raise LabelFileError(f"{path} does not exist; run `msk cluster` with this RUN folder first")
    with path.open(newline="") as f:
        ids = [row.get("image_id") or "" for row in csv.DictReader(f)]
    if not all(ids):
        raise LabelFileError(f"{path} does not give an image id for every image; rerun `msk cluster` "
                             "from an ingest output")
    return ids


def truth_of_images(image_ids: Sequence[str], truth_file: str | os.PathLike, where: str | os.PathLike, *,
                    ingest: str | os.PathLike | None = None,
                    region_set: str = "samx-regions") -> list[str | None]:
    """The known region of each of ``image_ids`` (the images of ``where``, a run or ingest
    folder) in a truth file (:func:`msk.core.io.truth.read_truth`), ``None`` where it has none.
    A file that labels none of them, or names regions outside ``region_set``, is an error."""
    from msk.core.io.truth import canonical_labels, check_overlap, read_truth

    truth = read_truth(truth_file, what="region", ingest=ingest)
    check_overlap(truth, image_ids, where)
    truth = canonical_labels(truth.restrict(image_ids), region_set)
    return [truth.labels.get(i) for i in image_ids]


def truth_scores(assignments: np.ndarray | Sequence[int], truth: Sequence[str | None]) -> tuple[float, float, int]:
    """``(NMI, purity, n)`` of a clustering against the known labels ``truth`` (``None``:
    unknown, left out), over the ``n`` images with a known label."""
    from msk.core.models.deepcluster import _nmi
    from msk.core.models.metrics import cluster_purity

    known = [i for i, t in enumerate(truth) if t is not None]
    a = np.asarray(assignments)[known]
    t = [truth[i] for i in known]
    return _nmi(t, a), cluster_purity(a, t), len(known)


def name_clusters_from_truth(run_dir: str | os.PathLike, truth_file: str | os.PathLike, *,
                             ingest: str | os.PathLike | None = None,
                             region_set: str = "samx-regions",
                             weak_out: str | os.PathLike | None = None) -> AutomaticNames:
    """Name every cluster of a DeepCluster run by the majority region of its images in a truth
    file (a *simulated* expert, :func:`majority_names`), write ``RUN/cluster_names.csv`` (the
    labels file of ``msk clusters apply``, with ``purity`` and ``named_by:
    automatic:<truth file>``) and the weak labels (``weak_out``, default
    ``RUN/weak_labels.csv``) that ``msk train sorter`` takes.

    :param truth_file: a labels CSV or a synthetic ``ground_truth.csv``
        (:func:`msk.core.io.truth.read_truth`; the latter needs ``ingest``, the run's ingest).
    Clusters none of whose images has a known label stay unlabelled (their images get no weak
    label). Region names outside ``region_set`` are one error naming them all.
    """
    from msk.core.config import load_config
    from msk.core.models.deepcluster import DeepClusterConfig

    run_dir = Path(run_dir)
    image_ids = run_image_ids(run_dir)
    assignments = load_assignments(run_dir)
    if len(assignments) != len(image_ids):
        raise LabelFileError(f"{run_dir}: {len(assignments)} assignments for {len(image_ids)} image ids; "
                             "the run folder is incomplete, rerun `msk cluster`")
    k = load_config(DeepClusterConfig, run_dir / "config.yaml").k
    truth = truth_of_images(image_ids, truth_file, run_dir, ingest=ingest, region_set=region_set)
    known = np.array([i for i, t in enumerate(truth) if t is not None])
    names = majority_names(assignments[known], [truth[i] for i in known], k=k)
    named_by = f"automatic:{truth_file}"
    names_file = write_cluster_names(names, run_dir / "cluster_names.csv", named_by=named_by)
    weak = apply_labels(names_file, assignments, region_set=region_set, k=k)
    weak_file = weak.save(Path(weak_out) if weak_out is not None else run_dir / "weak_labels.csv",
                          image_ids, run=run_dir)
    nmi, purity, n_known = truth_scores(assignments, truth)
    return AutomaticNames(names, weak, named_by, n_known, nmi, purity, names_file, weak_file)


def _composition(ground_truth: Sequence[str] | None, members: np.ndarray) -> str:
    if ground_truth is None or not len(members):
        return ""
    counts = Counter(str(ground_truth[i]) for i in members).most_common(3)
    return ", ".join(f"{name} {n / len(members):.0%}" for name, n in counts)


def _html_section(c: int, size: int, total: int, shown: int, sheet: str | None,
                  composition: str) -> str:
    share = size / total if total else 0.0
    parts = [f'<section id="cluster-{c}">',
             f"<h2>cluster {c} <small>{size} image{'s' if size != 1 else ''} "
             f"({share:.1%}){f', {shown} shown' if 0 < shown < size else ''}</small></h2>"]
    if note := _note(size):
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    if composition:
        parts.append(f'<p class="truth">ground truth: {html.escape(composition)}</p>')
    if sheet:
        parts.append(f'<img src="{html.escape(sheet)}" alt="cluster {c}" loading="lazy">')
    parts.append("</section>")
    return "\n".join(parts)


def _html_page(sections: list[str], k: int, n: int) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>msk clusters</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
section {{ margin-bottom: 2em; }} h2 small {{ color: #666; font-weight: normal; }}
.note {{ color: #a60; }} .truth {{ color: #06a; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>{k} clusters of {n} images</h1>
<p>Write a region name or <code>{DISCARD}</code> into the <code>label</code> column of
<code>labels.csv</code> for each cluster, then run <code>msk clusters apply labels.csv</code>.
Clusters given the same region are merged; unlabelled clusters are left out.</p>
{chr(10).join(sections)}
</body></html>
"""


# -- reading and applying labels ---------------------------------------------------------------


