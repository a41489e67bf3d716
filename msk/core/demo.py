"""``msk demo OUT``: the whole chain on the embedded synthetic default, in one command.

An application over msk's stages (it imports them; no stage imports it), in the order a
newcomer would run them by hand, each step writing what the matching command writes:

1. ``msk synth``: a synthetic PACS export (DICOM, with corrupt files and burned-in names);
2. ``msk ingest``: sharded Parquet, every file accounted for;
3. ``msk cluster``: DeepCluster on every ingested image (``k`` from the data size) and contact
   sheets (``cluster/sheets/index.html``);
4. ``msk clusters label --from ground_truth.csv``: **a simulated expert**: each cluster is named
   by the majority true region of its images. A real archive has no truth file: a person names
   the clusters from the contact sheets (``msk clusters export`` / ``apply``);
5. ``msk train sorter`` on those weak labels, fine-tuned from the DeepCluster encoder, and
   ``msk eval sorter --truth``: top-1/top-2 against the weak labels and against the truth;
6. lesion ROIs (true lesion box + 15 %, square) of the lesion images, patients split into
   **known** patients (the archive) and **unseen** ones: an image classifier of the entity on
   the known patients' crops (fine-tuned from the sorter's encoder, transfer learning), then a
   fusion classifier (crop + age, sex, site; ``msk eval fusion``'s model) from its encoder;
7. ``msk build recommender`` from the known patients' lesion crops with that encoder;
8. ``msk serve`` on a free local port with the sorter, recommender and fusion classifier; the unseen
   patients' DICOM files are sent over HTTP as a client would (``/v1/sort``, ``/v1/classify``
   with the lesion box in the metadata, ``/v1/recommend?box=``), plus one request without a box,
   which the lesion-crop models must refuse (422 ``box_required``);
9. ``OUT/report.html``: one page with every stage's numbers and pictures; ``OUT/demo.json``
   holds the numbers and the wall time of every step.

Every number is measured on msk's **synthetic** images: it shows that the chain works, not how
it does on real radiographs (``docs/real.md``).
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from msk.core.config import MskConfig
from msk.core.errors import MskError
from msk.core.models.deepcluster import default_k

__all__ = ["DemoConfig", "DemoError", "DemoResult", "default_k", "run_demo"]

#: the demo's bearer token file (in OUT, 0600): the server is never started without one.
TOKEN_FILE = "serve.token"


class DemoError(MskError):
    """A demo step that cannot go on; the message names the step and the fix."""


class DemoConfig(MskConfig):
    """Options of ``msk demo`` (YAML keys of ``--config``). The defaults fit 2 CPUs in well under 15 minutes."""

    n_images: int = Field(1200, ge=100, description="synthetic files (about 1 % corrupt)")
    lesion_fraction: float = Field(0.6, gt=0, le=1, description="share of synthetic images with a tumour "
                                                               "(msk synth's default is 0.35)")
    synth_size: int = Field(192, ge=64, description="long side of the synthetic images in px")
    image_size: int = Field(64, ge=32, description="ingest square side and network input of every model")
    encoder: str = Field("resnet18", description="encoder of DeepCluster, the sorter and the classifier")
    k: int | None = Field(None, ge=2, description="DeepCluster clusters; default from the data size (default_k)")
    cluster_epochs: int = Field(5, ge=1, description="DeepCluster epochs")
    sorter_epochs: int = Field(6, ge=1, description="sorter epochs per fold")
    folds: int = Field(3, ge=2, description="sorter cross-validation folds")
    classifier_epochs: int = Field(15, ge=1, description="lesion classifier epochs")
    roi_size: int = Field(64, ge=16, description="side of the lesion crops")
    unseen_share: float = Field(0.25, gt=0, lt=1, description="share of lesion patients kept unseen "
                                                              "(served, never indexed or trained on)")
    requests: int = Field(12, ge=1, description="unseen lesion images sent to the server")
    serve: bool = Field(True, description="start msk serve and send the requests (false: stop after step 7)")
    seed: int = Field(0, ge=0, description="seed of the synthetic data, splits and training")


@dataclass
class DemoResult:
    """What :func:`run_demo` measured (also ``OUT/demo.json``) and where the report is."""

    out: Path
    report: Path
    steps: dict[str, float] = field(default_factory=dict)
    numbers: dict[str, Any] = field(default_factory=dict)


class _Steps:
    """Times each step, prints one line per step, and keeps the numbers."""

    def __init__(self, say):
        self.say, self.seconds, self.numbers = say, {}, {}
        self._began = time.perf_counter()

    def step(self, name: str, what: str):
        self.say(f"[bold]{len(self.seconds) + 1}. {name}[/bold]: {what}")
        self._current, self._began = name, time.perf_counter()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.seconds[self._current] = round(time.perf_counter() - self._began, 1)
        if exc[0] is None:
            self.say(f"   done in {self.seconds[self._current]:.0f} s")


def _patient_split(patients: list[str], share: float, seed: int) -> set[str]:
    """The unseen patients: a deterministic hash split (the same patients for the same seed)."""
    def draw(p: str) -> float:
        return int(hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    unseen = {p for p in patients if draw(p) < share}
    if not unseen or len(unseen) == len(patients):
        raise DemoError(f"{len(patients)} lesion patients cannot be split {1 - share:.0%}/{share:.0%}; "
                        "raise n_images")
    return unseen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lesions(ingest: Path, synth_dir: Path, truth_file: Path, image_size: int):
    """Lesion images: ``(ids, images uint8, entity, patient, source box, square box, ground-truth rows)``;
    the rows (:func:`msk.core.synth.ground_truth_for_ingest`, in the order of ``ids``) hold each file's
    ``path`` under ``synth_dir`` and its clinical facts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from msk.core.data.squaring import map_box_to_square
    from msk.core.io.dataset import images_from_table, read_shards
    from msk.core.io.truth import read_truth
    from msk.core.synth import ground_truth_for_ingest

    truth = read_truth(truth_file, what="entity", ingest=ingest)
    ids = sorted(i for i in truth.labels if i in truth.boxes)
    table = read_shards(ingest, columns=["image_id", "image", "height", "width", "source_height",
                                         "source_width", "patient_id"])
    table = table.filter(pc.is_in(table["image_id"], value_set=pa.array(ids)))
    rows = {r: i for i, r in enumerate(table["image_id"].to_pylist())}
    ids = [i for i in ids if i in rows]
    order = np.array([rows[i] for i in ids], dtype=np.int64)
    images = images_from_table(table)[order]
    heights = np.asarray(table["source_height"].to_pylist())[order]
    widths = np.asarray(table["source_width"].to_pylist())[order]
    patients = [table["patient_id"][int(j)].as_py() or f"image:{ids[n]}" for n, j in enumerate(order)]
    source_boxes = [truth.boxes[i] for i in ids]
    square_boxes = [map_box_to_square(b, (int(h), int(w)), image_size)
                    for b, h, w in zip(source_boxes, heights, widths)]
    rows = ground_truth_for_ingest(synth_dir, ingest).set_index("image_id").loc[ids]
    return ids, images, [truth.labels[i] for i in ids], patients, source_boxes, square_boxes, rows


def _accuracy(predicted, truth) -> float:
    from msk.core.models.metrics import accuracy

    return accuracy(list(truth), list(predicted)) if len(truth) else float("nan")


def run_demo(out: str | os.PathLike, config: DemoConfig | None = None, *, say=print) -> DemoResult:
    """Run the chain into ``out`` (see the module docstring) and write ``out/report.html``."""
    from msk.core.data.labelled import load_labelled
    from msk.core.data.metadata import MetadataEncoder, MetadataSchema
    from msk.core.data.squaring import SquaringConfig
    from msk.core.io.truth import read_truth
    from msk.core.models.deepcluster import DeepClusterConfig, from_ingest, run_deepcluster
    from msk.core.models.embed import Embedder, roi_crops
    from msk.core.models.recommender import Recommender
    from msk.core.models.train import TrainConfig, fit_classifier, load_model, predict_logits
    from msk.core.runtime.runlock import LOCK_FILE
    from msk.core.stages.cluster.labelling import export_clusters, name_clusters_from_truth
    from msk.core.stages.fusion.training import fit_fusion
    from msk.core.stages.ingest.pipeline import IngestConfig, ingest
    from msk.core.stages.recommender.build import RecommenderBuildConfig, build_recommender
    from msk.core.stages.sorter.evaluation import evaluate_against_truth
    from msk.core.stages.sorter.training import SorterConfig, train_sorter
    from msk.core.synth import SynthConfig, synthesize
    from msk.serve.classifier import load_classifier_model
    from msk.serve.config import ClassifyConfig, RoiConfig

    config = config or DemoConfig()
    out = Path(out).absolute()
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise DemoError(f"{out} is not empty; give msk demo a new folder (it starts from scratch)")
    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps(say)
    numbers = steps.numbers
    k = config.k or default_k(config.n_images)

    with steps.step("synth", f"{config.n_images} synthetic DICOM files"):
        synth = synthesize(out / "synth", SynthConfig(n_images=config.n_images, seed=config.seed,
                                                      image_size=config.synth_size,
                                                      lesion_fraction=config.lesion_fraction), progress=False)
        truth_file = synth.ground_truth
        numbers["synth"] = {"files": synth.n_files}

    with steps.step("ingest", f"Ray Data into {config.image_size} px shards"):
        key = out.parent / f".{out.name}.pseudonym.key"  # never inside the outputs
        report = ingest(synth.out / "export", out / "ingest",
                        IngestConfig(image_size=config.image_size, key_file=key, create_key=True), progress=False)
        numbers["ingest"] = {"ok": report.n_ok, "quarantined": report.n_quarantined,
                             "reasons": dict(report.by_reason)}
        say(f"   {report.n_ok} ok, {report.n_quarantined} quarantined "
            f"({', '.join(f'{r} {n}' for r, n in report.by_reason.items()) or 'none'})")

    with steps.step("cluster", f"DeepCluster, k={k}, {config.cluster_epochs} epochs"):
        images, table = from_ingest(out / "ingest", columns=["image_id", "image", "height", "width"])
        image_ids = table["image_id"].to_pylist()
        regions = read_truth(truth_file, what="region", ingest=out / "ingest").labels
        dc = run_deepcluster(images, DeepClusterConfig(encoder=config.encoder, k=k, epochs=config.cluster_epochs,
                                                       image_size=config.image_size, num_workers=0,
                                                       seed=config.seed, pca_dim=min(64, k * 2)),
                             out=out / "cluster", ground_truth=[regions.get(i, "unknown") for i in image_ids],
                             image_ids=image_ids, progress=False)
        export_clusters(images, dc.assignments, out / "cluster" / "review", per_sheet=16, thumb=64,
                        ground_truth=[regions.get(i, "unknown") for i in image_ids], k=k, seed=config.seed)
        numbers["cluster"] = {"k": k, "images": len(images),
                              "nmi_truth": [h.get("nmi_truth") for h in dc.history]}

    with steps.step("name clusters", "SIMULATED EXPERT: majority true region of each cluster"):
        named = name_clusters_from_truth(out / "cluster", truth_file, ingest=out / "ingest")
        numbers["labels"] = {"nmi": round(named.nmi, 3), "purity": round(named.purity, 3),
                             "named": sum(1 for n in named.names if n.label), "clusters": len(named.names),
                             "named_by": named.named_by}
        for line in named.lines():
            say(f"   {line}")

    with steps.step("sorter", f"{config.folds}-fold CV on the weak labels, from the DeepCluster encoder"):
        data = load_labelled(out / "ingest", named.weak_file)
        sorter_config = SorterConfig(encoder=config.encoder, init=str(dc.checkpoint), image_size=config.image_size,
                                     epochs=config.sorter_epochs, folds=config.folds, num_workers=0,
                                     small_classes="drop", seed=config.seed, gradcam_images=8)
        sorter = train_sorter(data, sorter_config, out=out / "sorter", progress=True)
        scored = evaluate_against_truth(out / "sorter", truth_file, ingest=out / "ingest")
        numbers["sorter"] = {"classes": len(sorter.classes), "test_images": scored.n_test,
                             "top1_weak": round(scored.weak_top1, 3), "top2_weak": round(scored.weak_top2, 3),
                             "top1_truth": round(scored.truth_top1, 3), "top2_truth": round(scored.truth_top2, 3)}
        say(f"   test top-1 {scored.truth_top1:.3f} against the truth, {scored.weak_top1:.3f} against the "
            "weak labels")

    with steps.step("lesion classifier", "entity from the lesion crop (box + 15 %), known patients"):
        ids, images, entities, patients, source_boxes, square_boxes, rows = _lesions(
            out / "ingest", synth.out, truth_file, config.image_size)
        unseen = _patient_split(sorted(set(patients)), config.unseen_share, config.seed)
        known_idx = np.array([i for i, p in enumerate(patients) if p not in unseen])
        unseen_idx = np.array([i for i, p in enumerate(patients) if p in unseen])
        classes = sorted({entities[i] for i in known_idx})
        crops = roi_crops(images, square_boxes, config.roi_size, margin=0.15, ids=ids)
        y = np.array([classes.index(e) if e in classes else -1 for e in entities])
        fold1 = out / "sorter" / "fold-1" / "best.pt"
        clf_config = TrainConfig(encoder=config.encoder, init=str(fold1), image_size=config.roi_size,
                                 epochs=config.classifier_epochs, batch_size=32, lr=1e-3, seed=config.seed)
        fitted = fit_classifier(crops[known_idx], y[known_idx], len(classes), clf_config,
                                out=out / "classifier", classes=classes)
        model, _ = load_model(fitted.best)
        seen = [i for i in unseen_idx if y[i] >= 0]
        predicted = np.argmax(predict_logits(model, crops[seen], image_size=config.roi_size), axis=1)
        numbers["classifier"] = {"classes": classes, "known_images": len(known_idx), "unseen_images": len(seen),
                                 "unseen_patients": len(unseen),
                                 "accuracy_unseen": round(_accuracy(predicted, y[seen]), 3),
                                 "majority_baseline": round(float(np.max(np.bincount(y[seen])) / len(seen)), 3)
                                 if seen else None}
        say(f"   {len(classes)} entities; accuracy on {len(seen)} unseen patients' lesions "
            f"{numbers['classifier']['accuracy_unseen']:.3f} (majority class "
            f"{numbers['classifier']['majority_baseline']:.3f})")

    with steps.step("fusion classifier", "lesion crop + age, sex, site and view (concat head), from that encoder"):
        frame = _clinical(rows)
        encoder = MetadataEncoder(MetadataSchema(sites=sorted(set(frame["site"].dropna())), unknown="ignore")).fit(
            frame.iloc[known_idx])
        (out / "fusion").mkdir(exist_ok=True)
        encoder.save(out / "fusion" / "metadata_encoder.json")
        meta = encoder.transform(frame)
        fused = fit_fusion(crops[known_idx], y[known_idx], meta[known_idx], len(classes),
                           clf_config.model_copy(update={"init": str(fitted.best)}), out=out / "fusion",
                           head="concat", classes=classes)
        served_model = load_classifier_model(
            ClassifyConfig(checkpoint=fused.best, metadata_encoder=out / "fusion" / "metadata_encoder.json",
                           classes=classes, roi=RoiConfig(margin=0.15, size=config.roi_size)),
            SquaringConfig(image_size=config.image_size))
        fused_p = np.argmax(served_model.probabilities(crops[seen], meta[seen].astype(np.float32)), axis=1)
        in_process = {ids[i]: classes[int(c)] for i, c in zip(seen, fused_p)}
        numbers["fusion"] = {"metadata": ["age", "sex", "site", "view"],
                             "accuracy_unseen": round(_accuracy(fused_p, y[seen]), 3)}
        say(f"   accuracy on the same unseen lesions {numbers['fusion']['accuracy_unseen']:.3f} (image only "
            f"{numbers['classifier']['accuracy_unseen']:.3f})")

    with steps.step("recommender", "index the known patients' lesion crops with the classifier's encoder"):
        labels_csv = out / "recommender_labels.csv"
        with labels_csv.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image_id", "entity", "patient_id", "x0", "y0", "x1", "y1"])
            for i in known_idx:
                writer.writerow([ids[i], entities[i], patients[i], *source_boxes[i]])
        built = build_recommender(out / "ingest", labels_csv, out / "recommender", fitted.best,
                                  RecommenderBuildConfig(k=3, retriever="flat", image_size=config.roi_size))
        recommender = Recommender.load(out / "recommender")
        embedder = Embedder(fitted.best, image_size=config.roi_size)
        votes = [r.entity for r in recommender.recommend(embedder.embed_images(crops[unseen_idx]))]
        voted = {ids[i]: v for i, v in zip(unseen_idx, votes)}
        numbers["recommender"] = {"indexed": built.n_images, "k": 3,
                                  "accuracy_unseen": round(_accuracy(votes, [entities[i] for i in unseen_idx]), 3)}
        say(f"   {built.n_images} crops indexed; vote accuracy on unseen patients "
            f"{numbers['recommender']['accuracy_unseen']:.3f}")

    answers: list[dict[str, Any]] = []
    if config.serve:
        with steps.step("serve", f"msk serve + {config.requests} requests of unseen patients over HTTP"):
            answers = _serve_and_ask(out, config, classes, [(ids[i], rows["path"].iloc[i], entities[i],
                                                              source_boxes[i], frame.iloc[i].to_dict())
                                                             for i in unseen_idx[:config.requests]],
                                     synth.out, regions)
            for a in answers:  # the served models must answer as the same models did in this process
                if "sorted" in a:
                    a["same_as_in_process"] = (a["classified"] == in_process.get(a["image_id"], a["classified"])
                                               and a["recommended"] == voted[a["image_id"]])
            numbers["serve"] = _serve_numbers(answers)
            say(f"   {json.dumps(numbers['serve'])}")

    result = DemoResult(out, out / "report.html", dict(steps.seconds), numbers)
    (out / "demo.json").write_text(json.dumps({"config": config.model_dump(mode="json"), "seconds": steps.seconds,
                                               "numbers": numbers}, indent=2, default=str) + "\n")
    _write_report(result, answers, config)
    say(f"report: {result.report} (total {sum(steps.seconds.values()):.0f} s)")
    return result


def _clinical(rows):
    """``image_id, sex, age, site, view`` of the lesion images from their ground-truth rows."""
    import pandas as pd

    from msk.core.io.clinical import DICOM_VIEWS

    return pd.DataFrame({"image_id": rows.index, "sex": rows["sex"].where(rows["sex"].isin(["M", "F"]), None),
                         "age": rows["age"], "site": rows["site"],
                         "view": [DICOM_VIEWS.get(str(v).upper()) for v in rows["view"]]}).reset_index(drop=True)


def _serve_and_ask(out: Path, config: DemoConfig, classes: list[str], cases: list[tuple],
                   synth_dir: Path, regions: dict[str, str]) -> list[dict[str, Any]]:
    """Start ``msk serve`` (non-blocking) on the demo's models, send the unseen cases, stop it."""
    import secrets

    import httpx
    import pandas as pd
    import yaml
    from ray import serve

    from msk.serve.app import serve_main

    token = out / TOKEN_FILE
    token.write_text(secrets.token_urlsafe(32) + "\n")
    token.chmod(0o600)
    port = _free_port()
    serve_yaml = out / "serve.yaml"
    serve_yaml.write_text(yaml.safe_dump({
        "port": port, "token_file": TOKEN_FILE, "preprocess": {"ingest": "ingest"},
        "gateway": {"num_cpus": 0.1},
        "sorter": {"checkpoint": "sorter", "num_cpus": 0.1},
        "recommender": {"path": "recommender", "num_cpus": 0.1},
        "classifier": {"checkpoint": "fusion/best.pt", "metadata_encoder": "fusion/metadata_encoder.json",
                       "classes": classes, "num_cpus": 0.1, "roi": {"margin": 0.15, "size": config.roi_size}},
    }, sort_keys=False))
    url = serve_main(serve_yaml, blocking=False)
    headers = {"Authorization": f"Bearer {token.read_text().strip()}"}
    answers = []
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            for image_id, path, entity, box, clinical in cases:
                data = (synth_dir / path).read_bytes()
                metadata = {"sex": clinical["sex"] or "F", "box": list(box),
                            "age": None if pd.isna(clinical["age"]) else float(clinical["age"]),
                            "site": None if pd.isna(clinical["site"]) else clinical["site"],
                            "view": clinical["view"] or None}
                files = {"image": (image_id, data, "application/dicom")}
                sort = client.post("/v1/sort", files=files).json()
                classify = client.post("/v1/classify", files=files, data={"metadata": json.dumps(metadata)}).json()
                recommend = client.post("/v1/recommend", files=files,
                                        params={"box": ",".join(f"{v:g}" for v in box)}).json()
                answers.append({"image_id": image_id, "region": regions.get(image_id), "entity": entity,
                                "sorted": sort["regions"][0]["name"], "unknown": sort["unknown"],
                                "classified": classify["entities"][0]["name"],
                                "classified_p": round(classify["entities"][0]["probability"], 3),
                                "recommended": recommend["entity"], "vote": round(recommend["confidence"], 3),
                                "input": classify["input"]})
            if cases:
                whole = client.post("/v1/classify", files={"image": ("x", (synth_dir / cases[0][1]).read_bytes())},
                                    data={"metadata": json.dumps({"sex": "F"})})
                answers.append({"image_id": cases[0][0], "no_box": whole.status_code,
                                "code": whole.json().get("error", {}).get("code")})
    finally:
        serve.shutdown()
    return answers


def _serve_numbers(answers: list[dict[str, Any]]) -> dict[str, Any]:
    cases = [a for a in answers if "sorted" in a]
    refusal = next((a for a in answers if "no_box" in a), None)
    return {"requests": len(cases),
            "sort_top1": round(_accuracy([a["sorted"] for a in cases], [a["region"] for a in cases]), 3),
            "classify_accuracy": round(_accuracy([a["classified"] for a in cases], [a["entity"] for a in cases]), 3),
            "recommend_accuracy": round(_accuracy([a["recommended"] for a in cases], [a["entity"] for a in cases]), 3),
            "same_as_in_process": sum(bool(a.get("same_as_in_process")) for a in cases),
            "whole_image_without_box": None if refusal is None else f"{refusal['no_box']} {refusal['code']}"}


def _write_report(result: DemoResult, answers: list[dict[str, Any]], config: DemoConfig) -> None:
    """``OUT/report.html``: the steps, their numbers and pictures (links relative to OUT)."""
    out, n = result.out, result.numbers
    esc = html.escape

    def img(rel: str, caption: str) -> str:
        return (f'<figure><img src="{esc(rel)}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'
                if (out / rel).is_file() else "")

    def table(rows: list[dict[str, Any]]) -> str:
        if not rows:
            return ""
        head = "".join(f"<th>{esc(str(k))}</th>" for k in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    sheets = sorted((out / "cluster" / "review" / "sheets").glob("*.png"))[:4]
    steps = [{"step": k, "seconds": v} for k, v in result.steps.items()]
    sections = [
        "<h1>msk demo</h1>",
        "<p><b>Synthetic data.</b> Every number on this page comes from msk's own synthetic images: it shows "
        "that the chain runs end to end, not how msk does on real radiographs (see docs/real.md).</p>",
        f"<h2>Steps</h2>{table(steps)}<p>total {sum(result.steps.values()):.0f} s</p>",
        f"<h2>1-2. Synthetic export and ingest</h2>{table([n.get('synth', {}) | n.get('ingest', {})])}",
        f"<h2>3. DeepCluster</h2><p>k={n['cluster']['k']}, NMI against the true regions per epoch: "
        f"{esc(str(n['cluster']['nmi_truth']))}. <a href='cluster/review/index.html'>contact sheets</a></p>"
        + "".join(img(p.relative_to(out).as_posix(), p.stem) for p in sheets),
        f"<h2>4. Clusters named by a simulated expert</h2><p><b>Automatic</b>: each cluster took the majority "
        f"true region of its images ({esc(n['labels']['named_by'])}). A real archive is named by a person "
        f"from the contact sheets.</p>{table([n['labels']])}",
        f"<h2>5. Sorter</h2>{table([n['sorter']])}"
        + img("sorter/confusion_test.png", "confusion matrix, test patients (weak labels)")
        + img("sorter/gradcam.png", "Grad-CAM of test images"),
        f"<h2>6. Lesion classifier</h2>{table([{k: v for k, v in n['classifier'].items() if k != 'classes'}])}"
        f"<p>entities: {esc(', '.join(n['classifier']['classes']))}</p>",
        f"<h2>6b. Fusion classifier (lesion crop + age, sex, site, view), served</h2>{table([n['fusion']])}",
        f"<h2>7. Recommender</h2>{table([n['recommender']])}",
    ]
    if answers:
        sections.append(f"<h2>8. Served: unseen patients over HTTP</h2>{table([n['serve']])}"
                        f"{table([a for a in answers if 'sorted' in a])}"
                        "<p>A whole radiograph sent to the lesion classifier without a box is refused, never "
                        "classified: " + esc(str(n['serve']['whole_image_without_box'])) + "</p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:520px}"
             "figure{display:inline-block;margin:4px}")
    result.report.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>msk demo</title>"
                             f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n")
