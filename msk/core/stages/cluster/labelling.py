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
import difflib
import html
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msk.core.errors import MskError
from msk.core.specs import EntitySet

__all__ = ["DISCARD", "AutomaticNames", "ClusterName", "LabelFileError", "WeakLabels", "apply_labels",
           "export_clusters", "majority_names", "name_clusters_from_truth", "read_label_file",
           "run_image_ids", "truth_of_images", "truth_scores", "weak_labels_run", "write_cluster_names"]

#: The label that drops a cluster's images from the weak labels.
DISCARD = "discard"


class LabelFileError(MskError):
    """A labels file that cannot be applied; the message names the file and line."""


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
    from msk.core.models.metrics import cluster_purity
    from msk.core.stages.cluster.deepcluster import _nmi

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
    from msk.core.stages.cluster.deepcluster import DeepClusterConfig, load_assignments

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


@dataclass(frozen=True)
class LabelEntry:
    """One ``cluster -> label`` line of a labels file (``label`` is ``""`` when left empty)."""

    cluster: int
    label: str
    line: int


def read_label_file(path: str | os.PathLike) -> list[LabelEntry]:
    """Parse a labels CSV (columns ``cluster`` and ``label``) or YAML mapping ``cluster: label``."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"labels file {path} does not exist")
    if path.suffix.lower() in (".yaml", ".yml"):
        return _read_yaml(path)
    return _read_csv(path)


def _cluster_id(value: str, path: Path, line: int) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise LabelFileError(f"{path}, line {line}: cluster {value!r} is not a cluster number") from None


def _read_csv(path: Path) -> list[LabelEntry]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [x.strip().lower() for x in reader.fieldnames or []]
        if "cluster" not in fields or "label" not in fields:
            raise LabelFileError(f"{path}, line 1: expected the columns cluster and label "
                                 f"(as in the exported labels.csv); found {reader.fieldnames}")
        reader.fieldnames = fields
        entries = []
        for row in reader:
            if not any((v or "").strip() for v in row.values()):
                continue
            line = reader.line_num
            entries.append(LabelEntry(_cluster_id(row["cluster"], path, line),
                                      (row["label"] or "").strip(), line))
    return entries


def _read_yaml(path: Path) -> list[LabelEntry]:
    import yaml

    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise LabelFileError(f"{path}: not valid YAML: {exc}") from None
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise LabelFileError(f"{path}, line {root.start_mark.line + 1}: expected a mapping "
                             "of cluster: label")
    entries = []
    for key, value in root.value:
        line = key.start_mark.line + 1
        if not isinstance(value, yaml.ScalarNode):
            raise LabelFileError(f"{path}, line {line}: the label of cluster {key.value} must be "
                                 "a single name")
        label = "" if value.tag.endswith(":null") else value.value.strip()
        entries.append(LabelEntry(_cluster_id(key.value, path, line), label, line))
    return entries


@dataclass
class WeakLabels:
    """Weak image labels obtained from labelled clusters.

    :param labels: the canonical region name of each image, or ``None`` (discarded/unlabelled).
    :param class_counts: images per weak class, largest first.
    :param cluster_labels: the canonical label of each labelled cluster (``discard`` included).
    :param discarded: number of images in discarded clusters.
    :param unlabelled: number of images in clusters left without a label.
    :param region_set: name of the entity set the labels belong to.
    """

    labels: list[str | None]
    class_counts: dict[str, int]
    cluster_labels: dict[int, str]
    discarded: int
    unlabelled: int
    region_set: str

    def indices(self) -> np.ndarray:
        """Class index of each image in :attr:`region_set` (``-1`` for ``None``)."""
        from msk.core.registry import entity_set

        entities = entity_set(self.region_set)
        return np.array([-1 if x is None else entities.index(x) for x in self.labels], np.int64)

    def save(self, path: str | os.PathLike, image_ids: Sequence[str] | None = None, *,
             run: str | os.PathLike | None = None) -> Path:
        """Write ``row,image_id,label`` per image to a CSV file (empty label for ``None``); with
        ``run``, the DeepCluster run folder the labels came from, also ``<name>.source.json``
        beside it (:func:`weak_labels_run` reads it: ``msk train sorter`` starts from that run's
        encoder)."""
        if image_ids is not None and len(image_ids) != len(self.labels):
            raise ValueError(f"{len(image_ids)} image ids for {len(self.labels)} labels")
        path = Path(path)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["row", "image_id", "label"])
            for i, label in enumerate(self.labels):
                writer.writerow([i, "" if image_ids is None else image_ids[i], label or ""])
        if run is not None:
            import json

            from msk.core.io.paths import store_path

            _source_file(path).write_text(json.dumps(
                {"deepcluster_run": store_path(run, path.parent), "region_set": self.region_set}, indent=2))
        return path

    def table(self):
        """Class counts (and the dropped images) as a rich table."""
        from rich.table import Table

        total = len(self.labels)
        table = Table(title=f"weak labels ({self.region_set})", title_justify="left")
        table.add_column("class")
        table.add_column("clusters", justify="right")
        table.add_column("images", justify="right")
        table.add_column("share", justify="right")
        per_class = Counter(self.cluster_labels.values())
        for name, count in self.class_counts.items():
            table.add_row(name, str(per_class[name]), str(count), f"{count / total:.1%}")
        for name, count in ((f"({DISCARD})", self.discarded), ("(unlabelled)", self.unlabelled)):
            if count:
                table.add_row(f"[dim]{name}[/dim]", "", str(count), f"{count / total:.1%}")
        return table


def _source_file(weak_labels: Path) -> Path:
    return weak_labels.with_name(f"{weak_labels.stem}.source.json")


def weak_labels_run(labels: str | os.PathLike) -> Path | None:
    """The DeepCluster run folder a weak labels file came from, or None: the one its
    ``<name>.source.json`` records (``msk clusters apply`` / ``label`` write it), else the folder
    the file lies in when that is a DeepCluster run (``config.yaml``, ``assignments.csv`` and
    ``checkpoints/``: weak labels saved there before the record existed)."""
    import json

    from msk.core.io.paths import resolve_stored

    labels = Path(labels)
    source = _source_file(labels)
    if source.is_file():
        try:
            recorded = json.loads(source.read_text()).get("deepcluster_run")
        except (ValueError, AttributeError):
            raise LabelFileError(f"{source}: not a weak labels record (JSON with deepcluster_run); "
                                 "delete it or rerun `msk clusters apply`") from None
        return resolve_stored(recorded, source.parent) if recorded else None
    folder = labels.parent
    if all((folder / name).exists() for name in ("config.yaml", "assignments.csv", "checkpoints")):
        return folder
    return None


def _compact(name: str) -> str:
    """A spelling key: lower case without spaces or punctuation ("Lower-Leg" -> "lowerleg")."""
    return re.sub(r"[\W_]+", "", name.lower())


def apply_labels(labels_file: str | os.PathLike, assignments: np.ndarray | Sequence[int], *,
                 region_set: str = "samx-regions", k: int | None = None) -> WeakLabels:
    """Turn a filled-in labels file into weak labels per image.

    Each label is a name, code or alias of ``region_set`` (case-insensitive) or ``discard``;
    clusters with the same region are merged into one class. Errors name the file and line:
    a cluster id that does not exist, a cluster listed twice, a label not in the region set
    (with the closest name as a suggestion), a region written as a spelling that is not one of
    its aliases (``lowerleg`` for ``lower leg``), and a file that labels no image at all.

    :param k: number of clusters of the run (ids ``0..k-1`` are valid; default ``max + 1``).
    """
    from msk.core.registry import entity_set

    path = Path(labels_file)
    assignments = np.asarray(assignments, dtype=np.int64)
    k = max(k or 0, int(assignments.max()) + 1 if len(assignments) else 0)
    entities = entity_set(region_set)
    vocabulary = LabelVocabulary(entities)

    cluster_labels: dict[int, str] = {}
    seen_line: dict[int, int] = {}
    for entry in read_label_file(path):
        where = f"{path}, line {entry.line}"
        if not 0 <= entry.cluster < k:
            raise LabelFileError(f"{where}: cluster {entry.cluster} does not exist "
                                 f"(the clusters are 0..{k - 1})")
        if entry.cluster in seen_line:
            raise LabelFileError(f"{where}: cluster {entry.cluster} is labelled again "
                                 f"(first on line {seen_line[entry.cluster]})")
        seen_line[entry.cluster] = entry.line
        if not entry.label:
            continue
        if entry.label.strip().lower() == DISCARD:
            cluster_labels[entry.cluster] = DISCARD
            continue
        cluster_labels[entry.cluster] = vocabulary.canonical(entry.label, where, entry.line)

    labels: list[str | None] = [None] * len(assignments)
    discarded = unlabelled = 0
    for i, c in enumerate(assignments.tolist()):
        label = cluster_labels.get(c)
        if label is None:
            unlabelled += 1
        elif label == DISCARD:
            discarded += 1
        else:
            labels[i] = label
    counts = Counter(x for x in labels if x is not None)
    if not counts:
        raise LabelFileError(
            f"{path}: no image has a label ({discarded} discarded, {unlabelled} unlabelled); "
            f"write region names of {entities.name} into the label column"
        )
    return WeakLabels(labels, dict(counts.most_common()), cluster_labels, discarded, unlabelled,
                      entities.name)


class LabelVocabulary:
    """The names, codes and aliases of an entity set, as a labels file may write them.

    :meth:`canonical` maps a written label to its canonical name; an unknown label is a
    :class:`LabelFileError` that suggests the name it looks like (same letters, or a close
    spelling) and, for a second spelling of a name used earlier, the line that spelled it first.
    """

    def __init__(self, entities: EntitySet):
        self.entities = entities
        self.spellings = {key: name for name in entities.names
                          for key in (name, entities.get(name).code, *entities.get(name).aliases)}
        self._compact = {_compact(s): name for s, name in self.spellings.items()}
        self._first: dict[str, tuple[str, int]] = {}

    def canonical(self, label: str, where: str, line: int) -> str:
        """The canonical name of ``label``, written at ``where`` (line ``line``)."""
        try:
            name = self.entities.names[self.entities.index(label)]
        except KeyError:
            raise LabelFileError(self._unknown(where, label)) from None
        self._first.setdefault(name, (label, line))
        return name

    def _unknown(self, where: str, label: str) -> str:
        set_name = self.entities.name
        same = self._compact.get(_compact(label))
        if same is not None:
            earlier = self._first.get(same)
            also = f"; line {earlier[1]} writes it {earlier[0]!r}" if earlier else ""
            return (f"{where}: {label!r} looks like {same!r} but is not one of its spellings in "
                    f"{set_name}{also}; write {same!r} so that both clusters become one class")
        close = difflib.get_close_matches(label.strip().lower(), list(self.spellings), n=1, cutoff=0.6)
        hint = f"; did you mean {self.spellings[close[0]]!r}?" if close else ""
        return (f"{where}: {label!r} is not a region of {set_name}{hint} "
                f"(or write {DISCARD!r} to drop the cluster; `msk plugins entity_set` lists the names)")
