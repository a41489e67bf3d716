"""Naming DeepCluster's clusters in a browser: ``msk clusters review INGEST RUN``.

A small local web app (FastAPI on uvicorn, plain HTML and vanilla JavaScript from the package's
``static/`` folder) shows one cluster at a time: a grid of its images (more on demand), its
size, its nearest clusters (for merging), and a name field that completes the names, codes and
aliases of the entity set. Every decision (a name, ``discard``, a merge into another cluster) is
written at once:

* ``RUN/expert/labels.csv``: ``cluster,size,label,merged_into,named_by`` for every cluster,
  replaced atomically (temporary file, fsync, rename) after each decision. ``msk clusters
  apply RUN/expert/labels.csv RUN`` reads it as it reads a hand-filled ``labels.csv`` (a merged
  cluster carries the label of the cluster it was merged into; the extra columns are ignored);
* ``RUN/expert/audit.csv``: one appended, fsync-ed line per step (time, reviewer, action,
  cluster, old and new label, old and new merge target). Undo is a step too; restarting the app
  rebuilds the undo history from it.

The review folder is held by a run lock (:mod:`msk.core.runtime.runlock`) for as long as the app
runs, so a second reviewer on the same run is refused with the holder's name. A labels file
changed on disk by anyone else while the app runs is detected (its SHA-256 is checked before
every decision and polled by the page); the page then asks whether to load the file or keep the
app's labels, and refuses decisions until answered.

:class:`ReviewSession` holds the state and its files (no web server needed: the tests drive it
directly); :func:`create_app` wraps it in a FastAPI app; :func:`serve_review` runs it.
"""

from __future__ import annotations

import csv
import difflib
import getpass
import hashlib
import hmac
import html
import io
import ipaddress
import os
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from msk.core.config import MskConfig
from msk.core.errors import MskError
from msk.core.io.labels import DISCARD, LabelFileError, LabelVocabulary, _compact
from msk.core.io.report import STYLE_FILE

__all__ = ["AUDIT_FIELDS", "LABEL_FIELDS", "ReviewConfig", "ReviewError", "ReviewRun", "ReviewSession",
           "create_app", "load_review_run", "serve_review"]

REVIEW_DIR = "expert"
LABELS_FILE = "labels.csv"
AUDIT_FILE = "audit.csv"
ASSIGNMENTS_FILE = "assignments.sha256"
LABEL_FIELDS = ["cluster", "size", "label", "merged_into", "named_by"]
AUDIT_FIELDS = ["time", "reviewer", "action", "cluster", "old_label", "new_label", "old_merged_into",
                "new_merged_into"]
#: audit actions that change a cluster (and that undo takes back, last first)
DECISIONS = ("name", "discard", "merge", "clear")
STATIC = Path(__file__).with_name("static")


class ReviewError(MskError):
    """The review cannot start or a decision cannot be taken; the message says why and what to do."""


class ReviewConfig(MskConfig):
    """Options of ``msk clusters review``."""

    host: str = Field("127.0.0.1", description="address to listen on; anything but a loopback address "
                      "requires the token")
    port: int = Field(8765, ge=1, le=65535, description="port to listen on")
    reviewer: str | None = Field(None, description="name written into the audit log (None: the login name)")
    region_set: str = Field("samx-regions", description="entity set the names belong to")
    page_size: int = Field(48, ge=1, le=2000, description="images shown per cluster before 'more'")
    thumb: int = Field(128, ge=16, le=1024, description="thumbnail side in pixels")
    neighbours: int = Field(6, ge=0, le=9, description="nearest clusters offered for merging")
    token: str | None = Field(None, description="access token (None: a random one when host is not a "
                              "loopback address; env MSK_REVIEW_TOKEN)")
    hint_previous: Path | None = Field(None, description="hint: weak labels CSV of a previous run "
                                       "(image_id,label; e.g. OLD/weak_labels.csv), shown as each "
                                       "cluster's majority label there; off when unset")
    hint_truth: Path | None = Field(None, description="hint: a partial truth CSV (image_id,region or "
                                    "label): each cluster's majority and purity over its known images; "
                                    "off when unset")


# -- the run -----------------------------------------------------------------------------------


@dataclass
class ReviewRun:
    """What the app shows of a DeepCluster run.

    :param assignments: the cluster of each image (``[N]``); empty when the run has none.
    :param images: ``uint8 [N, H, W]`` from the ingest (row ``i`` is image ``i`` of the run).
    :param centroids: ``[k, d]`` cluster centres for the nearest clusters, or ``None``.
    :param centroids_from: what the centres were computed from (shown with the neighbours).
    :param empty_reason: set when the run has no cluster to review (the page says it).
    """

    run_dir: Path
    k: int
    assignments: np.ndarray
    image_ids: list[str]
    images: np.ndarray | None = None
    centroids: np.ndarray | None = None
    centroids_from: str = ""
    empty_reason: str = ""
    sizes: np.ndarray = field(init=False)
    order: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.sizes = np.bincount(self.assignments, minlength=self.k)[:self.k] if self.k else np.zeros(0, np.int64)
        self.order = sorted((c for c in range(self.k) if self.sizes[c] > 0), key=lambda c: (-self.sizes[c], c))
        if not self.order and not self.empty_reason:
            self.empty_reason = f"{self.run_dir} has no cluster with an image"

    def members(self, cluster: int) -> np.ndarray:
        """The rows of ``cluster``'s images, in a fixed shuffled order (a fair first page)."""
        rows = np.flatnonzero(self.assignments == cluster)
        return np.random.default_rng([0, cluster]).permutation(rows)

    def nearest(self, cluster: int, n: int) -> list[tuple[int, float]]:
        """Up to ``n`` non-empty clusters closest to ``cluster`` (cosine similarity of centres)."""
        if self.centroids is None or n == 0:
            return []
        c = self.centroids / np.maximum(np.linalg.norm(self.centroids, axis=1, keepdims=True), 1e-12)
        sims = c @ c[cluster]
        candidates = [o for o in self.order if o != cluster]
        candidates.sort(key=lambda o: (-sims[o], o))
        return [(o, float(sims[o])) for o in candidates[:n]]


def _pixel_centroids(images: np.ndarray, assignments: np.ndarray, k: int) -> np.ndarray:
    """Cluster means of 16x16 downsampled, normalised images: neighbours for runs that saved no
    centroids (an approximation, said on the page)."""
    from PIL import Image

    small = np.stack([np.asarray(Image.fromarray(im).resize((16, 16), Image.Resampling.BILINEAR), np.float32)
                      .ravel() for im in images]) if len(images) else np.zeros((0, 256), np.float32)
    small -= small.mean(1, keepdims=True)
    small /= np.maximum(np.linalg.norm(small, axis=1, keepdims=True), 1e-6)
    sums = np.zeros((k, small.shape[1]), np.float32)
    np.add.at(sums, assignments, small)
    return sums / np.maximum(np.bincount(assignments, minlength=k)[:, None], 1)


def load_review_run(ingest_dir: str | os.PathLike, run_dir: str | os.PathLike) -> ReviewRun:
    """The run's clusters with the ingest's images; a run without assignments is a
    :class:`ReviewRun` with ``empty_reason`` set (the app says so) rather than an error."""
    from msk.core.io.dataset import images_from_table, read_shards
    from msk.core.io.labels import cluster_run_k
    from msk.core.stages.cluster.labelling import run_image_ids

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReviewError(f"run folder {run_dir} does not exist; run `msk cluster INGEST {run_dir}` first")
    if not (run_dir / "assignments.npy").is_file():
        return ReviewRun(run_dir, 0, np.zeros(0, np.int64), [],
                         empty_reason=f"{run_dir} has no clusters yet (no assignments.npy): run "
                                      f"`msk cluster INGEST {run_dir}` first")
    assignments = np.load(run_dir / "assignments.npy").astype(np.int64)
    k = max(cluster_run_k(run_dir), int(assignments.max()) + 1 if len(assignments) else 0)
    image_ids = run_image_ids(run_dir)
    table = read_shards(ingest_dir, columns=["image_id", "image", "height", "width"])
    images = images_from_table(table)
    if table["image_id"].to_pylist() != image_ids:
        raise ReviewError(f"{run_dir} was not clustered from {ingest_dir} (its image ids differ from "
                          "the ingest's); give the ingest folder the run was made from")
    centroids, source = None, ""
    path = run_dir / "centroids.npy"
    if path.is_file():
        saved = np.load(path)
        if saved.ndim == 2 and len(saved) == k:
            centroids, source = saved.astype(np.float32), "the run's k-means centres"
    if centroids is None and len(images):
        centroids = _pixel_centroids(images, assignments, k)
        source = "pixel similarity (the run saved no centroids.npy)"
    return ReviewRun(run_dir, k, assignments, image_ids, images, centroids, source)


# -- hints -------------------------------------------------------------------------------------


def _image_labels(path: Path, image_ids: Sequence[str], region_set: str) -> list[str | None]:
    """The label of each image in an ``image_id,label|region`` CSV (None where it has none)."""
    from msk.core.io.truth import read_truth

    truth = read_truth(path, what="region")
    known = set(truth.labels) & set(image_ids)
    if not known:
        raise ReviewError(f"{path} labels none of the {len(image_ids)} images of the run (no image_id in "
                          "common); give a file made for this ingest")
    vocabulary = LabelVocabulary(_entities(region_set))
    out: list[str | None] = []
    for i in image_ids:
        label = truth.labels.get(i)
        if label and label.lower() != DISCARD:
            try:
                label = vocabulary.canonical(label, str(path), 0)
            except LabelFileError:
                pass  # a hint only: shown as written
        out.append(label or None)
    return out


def cluster_hints(run: ReviewRun, labels: list[str | None], what: str) -> dict[int, str]:
    """Each cluster's majority label among its images that ``labels`` knows, as one hint line."""
    per: dict[int, Counter[str]] = {}
    for c, label in zip(run.assignments.tolist(), labels):
        if label:
            per.setdefault(c, Counter())[label] += 1
    hints = {}
    for c, counts in per.items():
        name, top = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        n = sum(counts.values())
        hints[c] = f"{what}: {name} ({top} of {n} known image{'s' if n != 1 else ''}, purity {top / n:.0%})"
    return hints


def _entities(region_set: str):
    from msk.core.registry import entity_set

    return entity_set(region_set)


# -- the session: state and files --------------------------------------------------------------


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class ReviewSession:
    """The reviewer's decisions on one run, kept in ``RUN/expert/`` (see the module docstring).

    Thread-safe: the web app calls it from a thread pool. Errors a reviewer can fix are
    :class:`ReviewError`; a conflict with an edited labels file is ``conflict`` set.
    """

    def __init__(self, run: ReviewRun, *, reviewer: str, region_set: str = "samx-regions",
                 folder: str | os.PathLike | None = None):
        self.run = run
        self.reviewer = reviewer
        self.entities = _entities(region_set)
        self.vocabulary = LabelVocabulary(self.entities)
        self.folder = Path(folder) if folder is not None else run.run_dir / REVIEW_DIR
        self.labels_path = self.folder / LABELS_FILE
        self.audit_path = self.folder / AUDIT_FILE
        self.labels: dict[int, str] = {}
        self.merged: dict[int, int] = {}
        self.named_by: dict[int, str] = {}
        self.undo_stack: list[dict[str, str]] = []
        self.conflict = False
        self.hints: dict[int, list[str]] = {}
        self._lock = threading.RLock()
        self._digest: str | None = None
        if run.k:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._check_same_clusters()
            if self.labels_path.is_file():
                self._load(self._read_file())
            else:
                self._write()
            self._replay_audit()

    # -- reading and writing ---------------------------------------------------------------

    def _check_same_clusters(self) -> None:
        """Refuse a review folder begun on other assignments (the run was clustered again since):
        its cluster numbers would name other clusters. ``FOLDER/assignments.sha256`` records them."""
        marker = self.folder / ASSIGNMENTS_FILE
        digest = hashlib.sha256(np.ascontiguousarray(self.run.assignments, np.int64).tobytes()).hexdigest()
        if marker.is_file() and marker.read_text().strip() != digest:
            raise ReviewError(f"{self.run.run_dir} was clustered again since this review began ({marker} differs "
                              f"from assignments.npy): the numbers in {self.labels_path} name other clusters now; "
                              f"move {self.folder} away to review the new clusters")
        if not marker.is_file():
            marker.write_text(digest + "\n")

    def _read_file(self) -> tuple[dict[int, str], dict[int, int], dict[int, str]]:
        """The labels file's ``(labels, merges, named_by)``, checked against the run and the set."""
        path, k = self.labels_path, self.run.k
        labels: dict[int, str] = {}
        merged: dict[int, int] = {}
        named_by: dict[int, str] = {}
        if not path.is_file():
            raise ReviewError(f"{path} was deleted; keep this app's labels to write it again")
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not {"cluster", "label"} <= set(reader.fieldnames or []):
                raise ReviewError(f"{path}, line 1: expected the columns {','.join(LABEL_FIELDS)}; found "
                                  f"{reader.fieldnames}; move the file away to start a new review")
            for row in reader:
                where = f"{path}, line {reader.line_num}"
                try:
                    c = int(row["cluster"])
                    target = int(row["merged_into"]) if (row.get("merged_into") or "").strip() else None
                except ValueError:
                    raise ReviewError(f"{where}: cluster numbers must be integers") from None
                if not 0 <= c < k or (target is not None and not 0 <= target < k):
                    raise ReviewError(f"{where}: cluster {c if not 0 <= c < k else target} does not exist "
                                      f"(the clusters are 0..{k - 1})")
                label = self._canonical((row["label"] or "").strip(), where)
                if label:
                    labels[c] = label
                if target is not None:
                    merged[c] = target
                if (row.get("named_by") or "").strip():
                    named_by[c] = row["named_by"].strip()
        # a merged cluster whose label was edited to differ from its target's: the edit wins
        for c, target in list(merged.items()):
            root = self._root(target, merged)
            if root is None or labels.get(c, "") != labels.get(root, ""):
                del merged[c]
            else:
                labels.pop(c, None)
        return labels, merged, named_by

    def _canonical(self, label: str, where: str) -> str:
        if not label:
            return ""
        if label.lower() == DISCARD:
            return DISCARD
        try:
            return self.vocabulary.canonical(label, where, 0)
        except LabelFileError as exc:  # typed in the app: the message without the "where: " prefix
            message = str(exc)
            raise ReviewError(message[len(where) + 2:] if not where.startswith(str(self.labels_path))
                              else message) from None

    def _load(self, state: tuple[dict[int, str], dict[int, int], dict[int, str]]) -> None:
        self.labels, self.merged, self.named_by = state
        self._digest = _digest(self.labels_path)

    def _write(self) -> None:
        """Replace the labels file atomically with the current decisions."""
        tmp = self.labels_path.with_name(f".{LABELS_FILE}.tmp")
        rest = [c for c in range(self.run.k) if c not in set(self.run.order)]
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(LABEL_FIELDS)
            for c in [*self.run.order, *rest]:
                writer.writerow([c, int(self.run.sizes[c]), self.effective(c), self.merged.get(c, ""),
                                 self.named_by.get(c, "")])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.labels_path)
        self._digest = _digest(self.labels_path)

    def _audit(self, action: str, cluster: int | str, old: tuple[str, str], new: tuple[str, str]) -> dict[str, str]:
        row = {"time": _now(), "reviewer": self.reviewer, "action": action, "cluster": str(cluster),
               "old_label": old[0], "new_label": new[0], "old_merged_into": old[1], "new_merged_into": new[1]}
        fresh = not self.audit_path.is_file()
        with self.audit_path.open("a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=AUDIT_FIELDS)
            if fresh:
                writer.writeheader()
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())
        return row

    def _replay_audit(self) -> None:
        """Rebuild the undo history from the audit log (decisions push, undo pops, a reload clears)."""
        self.undo_stack = []
        if not self.audit_path.is_file():
            return
        with self.audit_path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row["action"] in DECISIONS:
                    self.undo_stack.append(row)
                elif row["action"] == "undo" and self.undo_stack:
                    self.undo_stack.pop()
                elif row["action"] == "load-file":
                    self.undo_stack = []

    def audit(self) -> list[dict[str, str]]:
        """Every line of the audit log."""
        if not self.audit_path.is_file():
            return []
        with self.audit_path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    # -- state ----------------------------------------------------------------------------

    def _root(self, cluster: int, merged: dict[int, int] | None = None) -> int | None:
        """The cluster whose label ``cluster`` carries (following merges); None on a cycle."""
        merged = self.merged if merged is None else merged
        seen = set()
        while cluster in merged:
            if cluster in seen:
                return None
            seen.add(cluster)
            cluster = merged[cluster]
        return cluster

    def effective(self, cluster: int) -> str:
        """The label ``cluster`` has in the labels file (its merge target's, when merged)."""
        root = self._root(cluster)
        return "" if root is None else self.labels.get(root, "")

    def decided(self, cluster: int) -> bool:
        return bool(self.labels.get(cluster)) or cluster in self.merged

    def _state(self, cluster: int) -> tuple[str, str]:
        return self.labels.get(cluster, ""), str(self.merged.get(cluster, ""))

    def check_cluster(self, cluster: int) -> None:
        if not 0 <= cluster < self.run.k:
            raise KeyError(cluster)

    def check_file(self) -> bool:
        """Whether the labels file changed on disk since the app last wrote or read it (sets
        :attr:`conflict`)."""
        with self._lock:
            if self.run.k and _digest(self.labels_path) != self._digest:
                self.conflict = True
            return self.conflict

    def next_open(self, after: int | None = None) -> int | None:
        """The next undecided cluster in size order after ``after`` (wrapping), else None."""
        order = self.run.order
        start = order.index(after) + 1 if after in order else 0
        for c in order[start:] + order[:start]:
            if not self.decided(c) and c != after:
                return c
        return None

    def progress(self) -> dict[str, int]:
        sizes = self.run.sizes
        named = [c for c in self.run.order if self.effective(c) not in ("", DISCARD)]
        discarded = [c for c in self.run.order if self.effective(c) == DISCARD]
        return {"clusters": len(self.run.order), "decided": sum(self.decided(c) for c in self.run.order),
                "named": len(named), "discarded": len(discarded),
                "merged": sum(c in self.merged for c in self.run.order),
                "images": int(sizes.sum()) if len(sizes) else 0,
                "images_named": int(sum(sizes[c] for c in named)),
                "images_covered": int(sum(sizes[c] for c in (*named, *discarded)))}

    # -- decisions ------------------------------------------------------------------------

    def _guard(self, cluster: int) -> None:
        self.check_cluster(cluster)
        if self.check_file():
            raise ReviewError(f"{self.labels_path} was changed on disk; load it or keep the app's labels first")

    def _change(self, action: str, cluster: int, label: str, target: int | None) -> dict[str, str]:
        old = self._state(cluster)
        if label:
            self.labels[cluster] = label
        else:
            self.labels.pop(cluster, None)
        if target is None:
            self.merged.pop(cluster, None)
        else:
            self.merged[cluster] = target
        self.named_by[cluster] = self.reviewer
        self._write()
        row = self._audit(action, cluster, old, self._state(cluster))
        self.undo_stack.append(row)
        return row

    def name(self, cluster: int, name: str) -> str:
        """Name ``cluster`` (a name, code or alias of the set, or ``discard``); returns the
        canonical name. Unknown names raise :class:`ReviewError` with suggestions."""
        with self._lock:
            self._guard(cluster)
            text = name.strip()
            if not text:
                raise ReviewError("type a name of the entity set, or discard")
            label = self._canonical(text, "typed")
            self._change("discard" if label == DISCARD else "name", cluster, label, None)
            return label

    def discard(self, cluster: int) -> None:
        self.name(cluster, DISCARD)

    def merge(self, cluster: int, into: int) -> None:
        """Give ``cluster`` the label of ``into``, now and whenever ``into`` is renamed."""
        with self._lock:
            self._guard(cluster)
            if not 0 <= into < self.run.k or into not in self.run.order:
                raise ReviewError(f"cluster {into} does not exist or has no image; merge into one of "
                                  "the nearest clusters")
            if self._root(into) == cluster or into == cluster:
                raise ReviewError(f"cluster {into} is already merged into cluster {cluster}; merge the "
                                  "other way round")
            self._change("merge", cluster, "", into)

    def skip(self, cluster: int) -> None:
        """Leave ``cluster`` undecided for now (an audit line, nothing else)."""
        with self._lock:
            self.check_cluster(cluster)
            state = self._state(cluster)
            self._audit("skip", cluster, state, state)

    def undo(self) -> int | None:
        """Take back the last decision; returns its cluster (None: nothing to undo)."""
        with self._lock:
            if self.check_file():
                raise ReviewError(f"{self.labels_path} was changed on disk; load it or keep the app's labels first")
            if not self.undo_stack:
                return None
            last = self.undo_stack.pop()
            c = int(last["cluster"])
            current = self._state(c)
            if last["old_label"]:
                self.labels[c] = last["old_label"]
            else:
                self.labels.pop(c, None)
            if last["old_merged_into"]:
                self.merged[c] = int(last["old_merged_into"])
            else:
                self.merged.pop(c, None)
            self._write()
            self._audit("undo", c, current, self._state(c))
            return c

    def resolve(self, keep: Literal["file", "app"]) -> None:
        """Answer a conflict: load the edited file (each change audited) or write the app's labels over it."""
        with self._lock:
            if keep == "app":
                self._write()
                self._audit("keep-app", "*", ("", ""), ("", ""))
            else:
                old = {c: (self.effective(c), self._state(c)[1]) for c in range(self.run.k)}
                self._load(self._read_file())
                self._audit("load-file", "*", ("", ""), ("", ""))
                for c in range(self.run.k):
                    new = (self.effective(c), self._state(c)[1])
                    if new != old[c]:
                        self._audit("file-edit", c, old[c], new)
                self.undo_stack = []
            self.conflict = False

    # -- suggestions ----------------------------------------------------------------------

    def suggestions(self, text: str, n: int = 5) -> list[str]:
        """Canonical names that ``text`` may have meant (same letters, then close spellings)."""
        spellings = self.vocabulary.spellings
        out: list[str] = []
        same = {_compact(s): n for s, n in spellings.items()}.get(_compact(text))
        if same:
            out.append(same)
        lowered = {s.lower(): name for s, name in spellings.items()}
        for s in difflib.get_close_matches(text.strip().lower(), list(lowered), n=n * 2, cutoff=0.5):
            out.append(lowered[s])
        out += [name for s, name in lowered.items() if text.strip().lower() and text.strip().lower() in s]
        return list(dict.fromkeys(out))[:n]


# -- the web app -------------------------------------------------------------------------------


class Decision(BaseModel):
    """The body of ``POST /api/clusters/{cluster}``."""

    action: Literal["name", "discard", "merge", "skip"]
    name: str = ""
    into: int | None = None


class Resolution(BaseModel):
    """The body of ``POST /api/conflict``: load the edited file, or write the app's labels over it."""

    keep: Literal["file", "app"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _png(image: np.ndarray, side: int) -> bytes:
    from PIL import Image

    tile = Image.fromarray(image).convert("L")
    tile.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    tile.save(buffer, format="PNG")
    return buffer.getvalue()


def _reports(run_dir: Path) -> dict[str, Path]:
    """The HTML reports of the other steps beside the run, by path relative to the run's parent
    folder (``OUT/*.html``, ``OUT/*/*.html``, ``OUT/*/*/*.html``: the demo's ``report.html``, a
    sorter's ``report.html``, a recommender's ``gallery/index.html``...); contact-sheet indexes
    (an ``index.html`` beside a ``labels.csv``) are left out: this app replaces them."""
    root = run_dir.parent
    found = {}
    for pattern in ("*.html", "*/*.html", "*/*/*.html"):
        for path in sorted(root.glob(pattern)):
            if REVIEW_DIR in path.relative_to(root).parts or (path.parent / "labels.csv").is_file():
                continue
            found[path.relative_to(root).as_posix()] = path
    return dict(list(found.items())[:30])


def create_app(session: ReviewSession, config: ReviewConfig, *, token: str | None = None,
               hosts: Sequence[str] | None = None):
    """The FastAPI app of a review session (pages, JSON API, thumbnails, static files).

    :param token: required on every request (query ``token``, then a cookie) when set.
    :param hosts: the only ``Host`` headers answered (a page of another site that a DNS trick
        points at 127.0.0.1 does not reach the app); None: any.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
    from fastapi.staticfiles import StaticFiles

    run = session.run
    app = FastAPI(title="msk clusters review", docs_url=None, redoc_url=None, openapi_url=None)
    if hosts is not None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/msk.css")
    def stylesheet():
        return FileResponse(STYLE_FILE, media_type="text/css")
    page = (STATIC / "review.html").read_text(encoding="utf-8")
    thumbs: dict[int, bytes] = {}
    reports = _reports(run.run_dir)

    if token:
        @app.middleware("http")
        async def require_token(request: Request, call_next):
            given = request.query_params.get("token") or request.cookies.get("msk_review_token") \
                or request.headers.get("x-msk-token") or ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                return HTMLResponse("<h1>401</h1><p>open the URL with ?token=... that "
                                    "<code>msk clusters review</code> printed</p>", status_code=401)
            response = await call_next(request)
            if request.query_params.get("token"):
                response.set_cookie("msk_review_token", token, httponly=True, samesite="strict")
            return response

    def not_found(message: str) -> HTMLResponse:
        text = (STATIC / "404.html").read_text(encoding="utf-8").replace("{message}", html.escape(message))
        return HTMLResponse(text, status_code=404)

    def review_page(cluster: int | None) -> HTMLResponse:
        return HTMLResponse(page.replace("{cluster}", "" if cluster is None else str(cluster))
                            .replace("{empty}", html.escape(run.empty_reason, quote=True)))

    def error(exc: Exception, status: int = 422, **extra: Any) -> JSONResponse:
        return JSONResponse({"error": str(exc), **extra}, status_code=status)

    def cluster_json(c: int, offset: int = 0) -> dict[str, Any]:
        rows = run.members(c)
        neighbours = [{"cluster": o, "similarity": round(s, 3), "size": int(run.sizes[o]),
                       "label": session.effective(o), "merged_into": session.merged.get(o),
                       "thumbs": [int(r) for r in run.members(o)[:4]]}
                      for o, s in run.nearest(c, config.neighbours)]
        rank = run.order.index(c) + 1 if c in run.order else None
        return {"cluster": c, "size": int(run.sizes[c]), "rank": rank, "label": session.labels.get(c, ""),
                "effective": session.effective(c), "merged_into": session.merged.get(c),
                "merged_here": sorted(o for o, t in session.merged.items() if t == c),
                "named_by": session.named_by.get(c, ""),
                "rows": [int(r) for r in rows[offset:offset + config.page_size]],
                "offset": offset, "more": max(0, len(rows) - offset - config.page_size),
                "neighbours": neighbours, "neighbours_from": run.centroids_from,
                "hints": session.hints.get(c, []), "progress": session.progress(),
                "conflict": session.conflict, "can_undo": bool(session.undo_stack),
                "next": session.next_open(c)}

    @app.get("/")
    def home():
        if run.empty_reason:
            return review_page(None)
        first = session.next_open() if session.next_open() is not None else run.order[0]
        return RedirectResponse(f"/cluster/{first}", status_code=303)

    @app.get("/cluster/{cluster}")
    def cluster_page(cluster: str):
        if run.empty_reason:
            return review_page(None)
        if not cluster.isdigit() or not 0 <= int(cluster) < run.k:
            return not_found(f"cluster {cluster} does not exist in this run (the clusters are 0..{run.k - 1})")
        return review_page(int(cluster))

    @app.get("/api/run")
    def run_info():
        spellings = [{"spelling": s, "name": n} for s, n in sorted(session.vocabulary.spellings.items())]
        return {"run": str(run.run_dir), "k": run.k, "order": run.order, "reviewer": session.reviewer,
                "region_set": session.entities.name, "labels_file": str(session.labels_path),
                "audit_file": str(session.audit_path), "empty": run.empty_reason, "discard": DISCARD,
                "spellings": spellings, "reports": [{"name": n, "url": f"/reports/{n}"} for n in reports],
                "hints": bool(session.hints), "progress": session.progress()}

    @app.get("/api/status")
    def status():
        return {"conflict": session.check_file(), "progress": session.progress(),
                "can_undo": bool(session.undo_stack)}

    @app.get("/api/clusters/{cluster}")
    def get_cluster(cluster: int, offset: int = 0):
        if not 0 <= cluster < run.k:
            return error(KeyError(f"cluster {cluster} does not exist"), 404)
        session.check_file()
        return cluster_json(cluster, max(0, offset))

    @app.post("/api/clusters/{cluster}")
    def decide(cluster: int, decision: Decision):
        if not 0 <= cluster < run.k:
            return error(KeyError(f"cluster {cluster} does not exist"), 404)
        try:
            if decision.action == "name":
                session.name(cluster, decision.name)
            elif decision.action == "discard":
                session.discard(cluster)
            elif decision.action == "merge":
                session.merge(cluster, -1 if decision.into is None else decision.into)
            else:
                session.skip(cluster)
        except ReviewError as exc:
            status_code = 409 if session.conflict else 422
            return error(exc, status_code, suggestions=session.suggestions(decision.name)
                         if decision.action == "name" else [], conflict=session.conflict)
        following = session.next_open(cluster)
        if decision.action == "skip" and following is None and cluster in run.order:
            following = run.order[(run.order.index(cluster) + 1) % len(run.order)]
        return {"cluster": cluster, "effective": session.effective(cluster), "next": following,
                "progress": session.progress()}

    @app.post("/api/undo")
    def undo():
        try:
            return {"cluster": session.undo(), "progress": session.progress()}
        except ReviewError as exc:
            return error(exc, 409, conflict=True)

    @app.post("/api/conflict")
    def resolve(answer: Resolution):
        try:
            session.resolve(answer.keep)
        except ReviewError as exc:
            return error(exc, 422, conflict=True)
        return {"conflict": False, "progress": session.progress()}

    @app.get("/thumb/{row}.png")
    def thumb(row: int):
        if run.images is None or not 0 <= row < len(run.images):
            return Response(status_code=404)
        if row not in thumbs:
            thumbs[row] = _png(run.images[row], config.thumb)
        return Response(thumbs[row], media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    report_root = run.run_dir.parent.resolve()
    report_folders = {p.parent.resolve() for p in reports.values()}

    @app.get("/reports/{name:path}")
    def report(name: str):
        """A report, or a page or picture under its folder, never anything else."""
        path = (report_root / name).resolve()
        if not path.is_file() or path.suffix.lower() not in (".html", ".png", ".jpg", ".jpeg", ".svg") \
                or not any(path.is_relative_to(f) for f in report_folders):
            return not_found(f"no report or report file {name}")
        return FileResponse(path)

    @app.exception_handler(404)
    async def missing(request: Request, exc: Exception):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": "not found"}, status_code=404)
        return not_found(f"{request.url.path} is not a page of this app")

    return app


def serve_review(ingest_dir: str | os.PathLike, run_dir: str | os.PathLike, config: ReviewConfig, *,
                 say=print) -> None:
    """Run the review app until interrupted, holding ``RUN/expert``'s lock (a second reviewer is
    refused with the holder's name)."""
    import uvicorn

    from msk.core.runtime.runlock import run_lock

    token = config.token or os.environ.get("MSK_REVIEW_TOKEN") or None
    if not _is_loopback(config.host) and not token:
        token = secrets.token_urlsafe(16)
    reviewer = config.reviewer or getpass.getuser()
    if not Path(run_dir).is_dir():
        raise ReviewError(f"run folder {run_dir} does not exist; run `msk cluster INGEST {run_dir}` first")
    folder = Path(run_dir) / REVIEW_DIR
    with run_lock(folder, f"msk clusters review (reviewer {reviewer})"):
        run = load_review_run(ingest_dir, run_dir)
        session = ReviewSession(run, reviewer=reviewer, region_set=config.region_set, folder=folder)
        for path, what in ((config.hint_previous, "hint, previous run"), (config.hint_truth, "hint, truth")):
            if path is not None:
                for c, line in cluster_hints(run, _image_labels(path, run.image_ids, config.region_set),
                                             what).items():
                    session.hints.setdefault(c, []).append(line)
        app = create_app(session, config, token=token, hosts=["127.0.0.1", "localhost", "::1", "[::1]"]
                         if _is_loopback(config.host) else None)
        server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                               access_log=False))
        host = f"[{config.host}]" if ":" in config.host else config.host
        url = f"http://{host}:{config.port}/" + (f"?token={token}" if token else "")
        if run.empty_reason:
            say(f"note: {run.empty_reason}")
        else:
            progress = session.progress()
            say(f"{progress['decided']} of {progress['clusters']} clusters decided so far; labels: "
                f"{session.labels_path}, audit log: {session.audit_path}")
        say(f"review {run_dir} as {reviewer} at {url} (Ctrl-C stops; every decision is already saved)")
        sys.stdout.flush()  # the URL now, also when stdout is a file or a pipe
        server.run()
