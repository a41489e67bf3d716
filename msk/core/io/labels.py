"""Label files: the expert's names for clusters, and labels per image.

Two formats, read and checked here so that every stage that takes labels reads them one way:

* **cluster labels** (``cluster,label`` CSV or a YAML ``cluster: label`` mapping, what
  ``msk clusters export`` writes and a person fills in): :func:`apply_labels` checks them against
  the region vocabulary (:class:`LabelVocabulary`) and turns them, with the run's
  ``assignments.npy`` (:func:`load_assignments`), into :class:`WeakLabels` per image;
* **image labels** (``image_id,label[,patient_id]`` CSV, what ``msk clusters apply`` and
  ``msk import`` write): :func:`read_image_labels` and :func:`read_label_patients`.

Errors are :class:`LabelFileError` naming the file and line.
"""

from __future__ import annotations

import csv
import difflib
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msk.core.errors import MskError
from msk.core.specs import EntitySet

__all__ = ["DISCARD", "LabelFileError", "LabelVocabulary", "WeakLabels", "apply_labels", "cluster_run_k",
           "load_assignments", "read_image_labels", "read_label_file", "read_label_patients", "weak_labels_run"]


#: The label that drops a cluster's images from the weak labels.
DISCARD = "discard"


class LabelFileError(MskError):
    """A labels file that cannot be applied; the message names the file and line."""


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


def _canonical(entities: EntitySet | None, extra: Sequence[str]):
    """A function ``(label, path, line) -> canonical name`` that raises
    :class:`LabelFileError` for a label outside ``entities`` and ``extra`` (without
    ``entities``: every label, lower-cased). Labels are checked as in a labels file."""
    extras = {x.strip().lower(): x for x in extra}
    vocabulary = LabelVocabulary(entities) if entities is not None else None

    def canonical(label: str, path: Path, line: int) -> str:
        if label.strip().lower() in extras:
            return extras[label.strip().lower()]
        if vocabulary is None:
            return label.strip().lower()
        return vocabulary.canonical(label, f"{path}, line {line}", line)

    return canonical


def read_image_labels(path: str | os.PathLike, entities: EntitySet | None, *,
                      extra: Sequence[str] = ()) -> dict[str, str]:
    """``image_id -> canonical label`` from a CSV with the columns ``image_id`` and ``label``.

    Other columns (``row`` of the weak labels of ``msk clusters apply``) are ignored; rows with
    an empty label or ``discard`` are left out. Every label must be a name, code or alias of
    ``entities`` (case-insensitive) or one of ``extra`` (e.g. ``"normal"``); without
    ``entities`` any label is taken, lower-cased. Errors name the file and line: an unknown
    label (with the closest region as a suggestion, and, for a second spelling of a region
    written differently before, the line of the first), a row without an image id, and an
    image labelled twice with different classes.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"labels file {path} does not exist")
    canonical = _canonical(entities, extra)
    labels: dict[str, str] = {}
    line_of: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [x.strip().lower() for x in reader.fieldnames or []]
        if "image_id" not in fields or "label" not in fields:
            hint = (" (this is a cluster labels file: pass the DeepCluster run folder too, or use "
                    "the weak labels `msk clusters apply` writes)" if "cluster" in fields else "")
            raise LabelFileError(f"{path}, line 1: expected the columns image_id and label; "
                                 f"found {reader.fieldnames}{hint}")
        reader.fieldnames = fields
        for row in reader:
            line = reader.line_num
            label, image_id = (row["label"] or "").strip(), (row["image_id"] or "").strip()
            if not label or label.lower() == DISCARD:
                continue
            if not image_id:
                raise LabelFileError(f"{path}, line {line}: label {label!r} without an image_id "
                                     "(weak labels saved without image ids cannot be joined to "
                                     "the images; `msk clusters apply` writes them)")
            name = canonical(label, path, line)
            if labels.get(image_id, name) != name:
                raise LabelFileError(f"{path}, line {line}: image {image_id} is labelled "
                                     f"{name!r} but line {line_of[image_id]} says "
                                     f"{labels[image_id]!r}")
            labels[image_id] = name
            line_of.setdefault(image_id, line)
    if not labels:
        raise LabelFileError(f"{path}: no image has a label")
    return labels


def read_label_patients(path: str | os.PathLike) -> dict[str, str]:
    """``image_id -> patient_id`` from the optional ``patient_id`` column of a labels CSV (as
    ``msk import`` writes it: keyed pseudonyms); empty when the column is absent."""
    with Path(path).open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        reader.fieldnames = [x.strip().lower() for x in reader.fieldnames or []]
        if "patient_id" not in reader.fieldnames or "image_id" not in reader.fieldnames:
            return {}
        return {row["image_id"].strip(): row["patient_id"].strip() for row in reader
                if (row["image_id"] or "").strip() and (row["patient_id"] or "").strip()}


def load_assignments(out: str | os.PathLike) -> np.ndarray:
    """The last epoch's cluster of each image (``out/assignments.npy``) of a finished run."""
    path = Path(out) / "assignments.npy"
    if not path.is_file():
        raise LabelFileError(f"{path} does not exist; run `msk cluster` with this --out first")
    return np.load(path)


def cluster_run_k(run: str | os.PathLike) -> int:
    """The number of clusters ``k`` a DeepCluster run folder was made with (its ``config.yaml``)."""
    import yaml

    path = Path(run) / "config.yaml"
    try:
        k = (yaml.safe_load(path.read_text()) or {}).get("k")
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        raise LabelFileError(f"{path}: cannot read the run's k ({exc}); is {run} a `msk cluster` run folder?") from None
    if not isinstance(k, int) or k < 1:
        raise LabelFileError(f"{path}: k is {k!r}, not a number of clusters; is {run} a `msk cluster` run folder?")
    return k
