"""``synthesize``: write a synthetic PACS export and its ground truth, streaming.

Layout under ``out/``::

    export/<patient folder>/<study folder>/<series folder>/<file>.dcm
    masks/<patient folder>/<study folder>/<series folder>/<file>.png   lesion mask of each image with a lesion
    ground_truth.csv     one row per written file, in index order
    synth.yaml           the configuration used

Each file is written as soon as it is generated and its ground-truth row is appended and
flushed, so memory stays bounded whatever ``n_images`` is. The ground truth's ``mask`` column names
the lesion's mask (a PNG of the image's size, 255 = lesion, :func:`msk.core.io.masks.load_mask`
reads it), empty for images without a lesion; ``text_boxes`` lists every box of text burned into
the pixels (side markers and text blocks, :func:`msk.core.synth.truth.parse_text_boxes`). With
``workers > 1`` the indices are generated in worker processes in chunks, at most a few chunks in
flight, and the rows are still written in index order: the output is byte-identical to a serial
run.
"""

from __future__ import annotations

import csv
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from msk.core.errors import ConfigError
from msk.core.synth.cases import SynthCase, known_drawers, known_sets, preload_sets, priors_for, render_case
from msk.core.synth.config import TRANSFER_SYNTAXES, SynthConfig
from msk.core.synth.dicom_writer import encode
from msk.core.synth.lesions import preload_drawers

GROUND_TRUTH = "ground_truth.csv"
EXPORT = "export"
MASKS = "masks"
CONFIG_FILE = "synth.yaml"
COLUMNS = (
    "path", "patient_id", "study_uid", "sop_uid", "region", "entity", "malignancy", "age", "sex",
    "site", "position", "view", "modality", "sop_class", "transfer_syntax", "photometric",
    "x0", "y0", "x1", "y1", "mask", "expected_status", "text_boxes",
)
CHUNK = 16


@dataclass
class SynthReport:
    """What :func:`synthesize` wrote. The ``by_*`` counts are over the usable (``ok``) files."""

    out: Path
    n_files: int
    n_corrupt: int
    n_lesions: int
    ground_truth: Path
    seconds: float
    by_region: dict[str, int] = field(default_factory=dict)
    by_entity: dict[str, int] = field(default_factory=dict)
    by_syntax: dict[str, int] = field(default_factory=dict)
    priors: str = "defaults"

    @property
    def files_per_second(self) -> float:
        return self.n_files / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        syntaxes = ", ".join(f"{k} {v}" for k, v in sorted(self.by_syntax.items()))
        return (f"{self.n_files} files in {self.seconds:.1f} s ({self.files_per_second:.1f} files/s) "
                f"-> {self.out}: {self.n_lesions} with a lesion, {self.n_corrupt} deliberately corrupt; "
                f"{len(self.by_region)} regions; syntaxes: {syntaxes}; priors: {self.priors}")


def ground_truth_row(case: SynthCase) -> dict[str, str]:
    """The ground-truth row of ``case`` (values as written to the CSV)."""
    has_header = case.corruption not in ("empty", "not_dicom")
    has_image = case.corruption not in ("empty", "not_dicom", "no_pixels")
    lesion = case.lesion if has_image else None
    box = case.box if lesion is not None else None
    row = {
        "path": f"{EXPORT}/{case.relpath}",
        "patient_id": case.patient.patient_id if has_header else "",
        "study_uid": case.study.uid if has_header else "",
        "sop_uid": case.sop_uid if has_header else "",
        "region": case.region if has_image else "",
        "entity": lesion.entity.name if lesion else "",
        "malignancy": lesion.entity.malignancy.value if lesion and lesion.entity.malignancy else "",
        "age": str(case.age) if has_header else "",
        "sex": case.patient.sex if has_header else "",
        "site": lesion.site if lesion else "",
        "position": lesion.position.value if lesion and lesion.position else "",
        "view": case.view if has_image else "",
        "modality": case.modality if has_header else "",
        "sop_class": case.sop_class if has_header else "",
        "transfer_syntax": str(TRANSFER_SYNTAXES[case.transfer_syntax if has_image else "explicit-le"])
        if has_header else "",
        "photometric": case.photometric if has_image else "",
        "x0": "", "y0": "", "x1": "", "y1": "", "mask": "",
        "expected_status": case.expected_status,
        "text_boxes": format_text_boxes(case.text_boxes) if has_image else "",
    }
    if box is not None:
        row.update(x0=str(box[0]), y0=str(box[1]), x1=str(box[2]), y1=str(box[3]), mask=mask_relpath(case))
    return row


def format_text_boxes(boxes: list[tuple[str, int, int, int, int, float]]) -> str:
    """The ``text_boxes`` column: ``kind x0 y0 x1 y1 contrast`` per burned-in box, ``;``-joined
    (:func:`msk.core.synth.truth.parse_text_boxes` reads it back)."""
    return ";".join(f"{kind} {x0} {y0} {x1} {y1} {contrast:g}" for kind, x0, y0, x1, y1, contrast in boxes)


def mask_relpath(case: SynthCase) -> str:
    """Where the lesion mask of ``case`` is written, relative to the synth output folder."""
    return f"{MASKS}/{Path(case.relpath).with_suffix('.png').as_posix()}"


def produce(index: int, config: SynthConfig, export_dir: Path) -> tuple[dict[str, str], SynthCase]:
    """Render, encode and write file ``index`` (and its lesion mask); returns its ground-truth row
    and the case (pixels dropped)."""
    from msk.core.io.masks import write_mask_png

    case = render_case(index, config)
    path = export_dir / case.relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(case))
    row = ground_truth_row(case)
    if row["mask"]:
        write_mask_png(export_dir.parent / row["mask"], case.mask)
    case.pixels = case.mask = case.bone = case.ink = None
    return row, case


# -- parallel generation ------------------------------------------------------------------------

_worker_state: tuple[SynthConfig, Path] | None = None


def _init_worker(config: SynthConfig, export_dir: Path, sets: dict, drawers: dict) -> None:
    global _worker_state
    preload_sets(sets)
    preload_drawers(drawers)
    _worker_state = (config, export_dir)


def _produce_chunk(indices: range) -> list[tuple[dict[str, str], SynthCase]]:
    assert _worker_state is not None
    config, export_dir = _worker_state
    return [produce(i, config, export_dir) for i in indices]


def _generate(config: SynthConfig, export_dir: Path) -> Iterator[tuple[dict[str, str], SynthCase]]:
    """Rows in index order; in worker processes when ``config.workers > 1``."""
    n = config.n_images
    if config.workers == 1:
        for i in range(n):
            yield produce(i, config, export_dir)
        return
    chunks = (range(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK))
    with ProcessPoolExecutor(config.workers, mp_context=get_context("spawn"),
                             initializer=_init_worker,
                             initargs=(config, export_dir, known_sets(config), known_drawers(config))) as pool:
        pending: deque[Future] = deque()
        for chunk in chunks:
            pending.append(pool.submit(_produce_chunk, chunk))
            while len(pending) >= 2 * config.workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _progress(enabled: bool):
    from rich.progress import TaskProgressColumn

    from msk.core.runtime.progress import progress_bar

    return progress_bar(enabled, TaskProgressColumn(), "{task.fields[rate]} files/s", remaining=True,
                        description="[bold]synth[/bold]")


def synthesize(out: Path, config: SynthConfig, *, progress: bool = True,
               overwrite: bool = False) -> SynthReport:
    """Write ``config.n_images`` files to ``out/export`` plus ``ground_truth.csv`` and
    ``synth.yaml``. Refuses to write into an existing export unless ``overwrite``.

    ``config.workers > 1`` starts *spawned* processes (safe next to threads, Ray and torch);
    as with any spawn-based pool, a calling script needs an ``if __name__ == "__main__":``
    guard.
    """
    out = Path(out)
    export_dir = out / EXPORT
    if export_dir.exists() and any(export_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"{export_dir} already exists and is not empty; remove it or pass overwrite")
        shutil.rmtree(export_dir)
        shutil.rmtree(out / MASKS, ignore_errors=True)
    export_dir.mkdir(parents=True, exist_ok=True)
    priors = priors_for(config)  # fail early on missing BTXRD metadata
    header = f"# msk synth configuration (priors used: {priors.source})\n"
    (out / CONFIG_FILE).write_text(header + config.to_yaml())

    counts: dict[str, Counter] = {"region": Counter(), "entity": Counter(), "syntax": Counter()}
    n_files = n_corrupt = n_lesions = 0
    start = time.perf_counter()
    gt_path = out / GROUND_TRUTH
    with gt_path.open("w", newline="") as fh, _progress(progress) as bar:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        fh.flush()
        task = bar.add_task("synth", total=config.n_images, rate="-")
        for row, case in _generate(config, export_dir):
            writer.writerow(row)
            fh.flush()
            n_files += 1
            if row["expected_status"] != "ok":
                n_corrupt += 1
            else:
                counts["region"][case.region] += 1
                counts["syntax"][case.transfer_syntax] += 1
                if row["entity"]:
                    n_lesions += 1
                    counts["entity"][row["entity"]] += 1
            if n_files % 16 == 0 or n_files == config.n_images:
                rate = n_files / max(time.perf_counter() - start, 1e-9)
                bar.update(task, completed=n_files, rate=f"{rate:.1f}")
    return SynthReport(
        out=out, n_files=n_files, n_corrupt=n_corrupt, n_lesions=n_lesions, ground_truth=gt_path,
        seconds=time.perf_counter() - start,
        by_region=dict(sorted(counts["region"].items())), by_entity=dict(sorted(counts["entity"].items())),
        by_syntax=dict(sorted(counts["syntax"].items())), priors=priors.source,
    )
