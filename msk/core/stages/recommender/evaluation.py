"""``msk eval recommender``: the recommender against image classifiers, without patient leakage.

The protocol (:func:`evaluate_recommender`), repeated for every seed in ``config.seeds``:

1. **Split** the labelled images 80/20 *by patient*, stratified by entity
   (:func:`msk.core.data.splits.patient_split`); :func:`msk.core.data.splits.assert_disjoint_patients`
   refuses any split that puts a patient on both sides, and the recommender's index is checked
   to hold training patients only.
2. **Classifiers** (``config.classifiers``, e.g. a CNN and a vision transformer) are trained on
   the training images with the same budget (epochs, learning rate, batch size, augmentation:
   ``config.training``) and predict the test images (:mod:`msk.core.models.train`).
3. **Recommenders**, one per entry of ``config.embeddings``: an encoder that saw the training
   images only (``"deepcluster"``: DeepCluster on the training images, no labels; the name of
   a classifier of step 2: its fine-tuned encoder; or a fixed checkpoint path) embeds both
   sides (:class:`msk.core.models.embed.Embedder`), a :class:`msk.core.models.recommender.Recommender` indexes
   the training embeddings, and every test image is classified by the vote of its ``k``
   nearest training images, for each ``k`` in ``config.ks``.

With lesion boxes (``config.roi``), models see the lesion's region of interest: the box plus
``roi_margin`` on each side, cropped from the ingest image and resized to ``image_size``
(:func:`msk.core.models.embed.roi_crops`), as in the paper.

Outputs in ``out/``: ``results.csv`` (one row per seed and model), ``summary.csv`` and
``summary.md`` (mean ± sd over seeds; one-way ANOVA and Tukey HSD across the compared models on
their per-seed accuracy), ``confusion/<model>.png`` (summed over seeds), ``gallery/`` (per query
a contact strip of the query and its ``k`` neighbours, and ``index.html``), ``splits.csv`` and
the run folders of every trained model under ``seed-<s>/``.
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from msk.core.config import MskConfig
from msk.core.errors import MskError
from msk.core.models.deepcluster import DeepClusterConfig

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ClassifierSpec", "EvalData", "RecommenderEvalConfig", "RecommenderEvaluation",
    "TrainingBudget", "anova", "evaluate_recommender", "evaluate_split", "load_eval_data",
    "read_labels", "synth_labels",
]

BOX_COLUMNS = ("x0", "y0", "x1", "y1")


class EvalError(MskError, ValueError):
    """Input the evaluation cannot use (labels, boxes, configuration)."""


# -- configuration -----------------------------------------------------------------------------


class ClassifierSpec(MskConfig):
    """A baseline classifier: an encoder with a linear head, trained on the training split."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="row label, e.g. cnn, vit")
    encoder: str = Field(..., description="encoder registry name, e.g. resnet18, timm/vit_tiny_patch16_224")
    encoder_options: dict[str, Any] = Field(
        default_factory=dict, description="encoder keyword arguments (timm: img_size, patch_size, depth)")


class TrainingBudget(MskConfig):
    """The training budget every classifier gets (the same for all, so they compare fairly)."""

    epochs: int = Field(10, ge=1, description="training epochs of each classifier")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    batch_size: int = Field(32, ge=2, description="images per training step")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    augment: bool = Field(True, description="augment training images")
    aug_prob: float = Field(0.8, ge=0, le=1, description="share of training images augmented")
    class_weighting: Literal["none", "median_frequency"] = Field(
        "none", description="loss weights per class: median frequency balancing (Eigen & Fergus)")


class RecommenderEvalConfig(MskConfig):
    """Options of ``msk eval recommender`` (YAML keys of ``--config``)."""

    seeds: list[int] = Field([0, 1, 2], min_length=1, description="one patient split and training run per seed")
    test_size: float = Field(0.2, gt=0, lt=1, description="share of patients in the test set")
    image_size: int = Field(64, ge=8, description="network input side (the ROI crop's side with roi)")
    roi: bool = Field(True, description="use the lesion box + margin (needs x0, y0, x1, y1 in the labels)")
    roi_margin: float = Field(0.15, ge=0, description="margin on each side, a fraction of the lesion's longer side")
    entity_set: str | None = Field("bone-tumours",
                                   description="entity order of confusion matrices; None: sorted labels")
    classifiers: list[ClassifierSpec] = Field(
        default_factory=lambda: [
            ClassifierSpec(name="cnn", encoder="resnet18"),
            ClassifierSpec(name="vit", encoder="timm/vit_tiny_patch16_224",
                           encoder_options={"img_size": 64, "patch_size": 8}),
        ])
    training: TrainingBudget = Field(default_factory=TrainingBudget)
    embeddings: list[str] = Field(
        ["deepcluster", "cnn"], min_length=1,
        description="encoders of the recommender: 'deepcluster', a classifier name, or a checkpoint path")
    deepcluster: DeepClusterConfig = Field(
        default_factory=lambda: DeepClusterConfig(encoder="resnet18", k=100, epochs=5),
        description="DeepCluster for 'deepcluster' (image_size, seed and num_workers are set per run)")
    retriever: str = Field("lsh", description="retriever registry name (lsh: the recommender's default)")
    retriever_options: dict[str, Any] = Field(default_factory=dict, description="options of the retriever")
    ks: list[int] = Field([1, 3, 5, 7], min_length=1, description="neighbours that vote")
    k: int = Field(3, ge=1, description="the recommender's k in the model comparison (ANOVA, confusion, gallery)")
    weighting: Literal["none", "distance", "inverse_frequency"] = Field(
        "none", description="vote weighting (msk.core.models.vote)")
    gallery_queries: int = Field(12, ge=0, description="test images shown in the gallery (first seed)")
    num_workers: int = Field(0, ge=0, description="Ray Train workers per training run; 0: in this process")

    @model_validator(mode="after")
    def _consistent(self) -> RecommenderEvalConfig:
        names = [c.name for c in self.classifiers]
        if len(set(names)) != len(names):
            raise ValueError(f"classifier names must be unique, got {names}")
        if self.k not in self.ks:
            raise ValueError(f"k={self.k} must be one of ks={self.ks}")
        if self.weighting == "none" and any(k % 2 == 0 for k in self.ks):
            raise ValueError(f"an unweighted vote needs odd k; ks={self.ks}")
        for c in self.classifiers:
            size = c.encoder_options.get("img_size")
            if size is not None and size != self.image_size:
                raise ValueError(f"classifier {c.name}: img_size={size} differs from image_size={self.image_size}")
        return self


# -- data --------------------------------------------------------------------------------------


@dataclass
class EvalData:
    """The labelled images of an evaluation: model inputs and ids, one row per image."""

    images: np.ndarray  # uint8 [N, S, S], the ROI crops (roi) or the ingest images
    entities: np.ndarray  # str [N]
    image_ids: list[str]
    patient_ids: list[str]
    study_ids: list[str]
    classes: list[str]  # label order (confusion matrices, class indices)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def y(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[e] for e in self.entities], np.int64)

    def ids(self, idx: np.ndarray) -> dict[str, list[str]]:
        return {"image_id": [self.image_ids[i] for i in idx],
                "patient_id": [self.patient_ids[i] for i in idx],
                "study_id": [self.study_ids[i] for i in idx]}


def read_labels(path_or_frame: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """Labels of an evaluation: ``image_id``, ``entity`` (or ``label``, as ``msk import`` writes)
    and optional lesion box ``x0, y0, x1, y1`` (source-image pixels) and ``patient_id`` (used
    where the ingest has none); a CSV or Parquet file, or a DataFrame."""
    import pandas as pd

    if isinstance(path_or_frame, pd.DataFrame):
        df, where = path_or_frame.copy(), "labels"
    else:
        where = str(path_or_frame)
        path = Path(path_or_frame)
        if not path.is_file():
            raise EvalError(f"labels file {path} does not exist")
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if "entity" not in df.columns and "label" in df.columns:  # an `msk import` labels file
        df = df.rename(columns={"label": "entity"})
    missing = [c for c in ("image_id", "entity") if c not in df.columns]
    if missing:
        raise EvalError(f"{where}: missing column(s) {', '.join(missing)}; columns are {list(df.columns)}")
    df = df[df["entity"].notna() & (df["entity"].astype(str).str.strip() != "")]
    dupes = df["image_id"][df["image_id"].duplicated()]
    if len(dupes):
        raise EvalError(f"{where}: {len(dupes)} image ids appear twice (first: {dupes.iloc[0]!r})")
    return df.reset_index(drop=True)


def synth_labels(synth_dir: str | os.PathLike, ingest_dir: str | os.PathLike) -> pd.DataFrame:
    """Labels of a synthetic export (``msk synth``) after ingest: lesion images only.

    Joins ``ground_truth.csv`` (paths relative to the synth folder) to the ingest manifest
    (paths relative to the ingest's source folder, read from ``ingest.json``) and returns
    ``image_id, entity, site, x0, y0, x1, y1`` of the images ingest accepted.
    """
    import pandas as pd

    from msk.core.io.manifest import read_ingest_summary, read_manifest

    synth_dir, ingest_dir = Path(synth_dir).resolve(), Path(ingest_dir)
    truth = pd.read_csv(synth_dir / "ground_truth.csv")
    truth = truth[truth["entity"].notna()]
    summary = read_ingest_summary(ingest_dir) or {}
    if not summary.get("src"):
        raise EvalError(f"{ingest_dir}: no readable ingest.json with its source folder; run `msk ingest` first")
    src = Path(summary["src"]).resolve()
    try:
        prefix = src.relative_to(synth_dir).as_posix() + "/"
    except ValueError:
        raise EvalError(f"{ingest_dir} ingested {src}, which is not inside the synthetic export "
                        f"{synth_dir}") from None
    truth = truth[truth["path"].str.startswith(prefix)].assign(
        path=lambda t: t["path"].str.slice(len(prefix)))
    manifest = read_manifest(ingest_dir, columns=["path", "image_id", "status"]).to_pandas()
    joined = truth.merge(manifest[manifest["status"] == "ok"], on="path", how="inner")
    if joined.empty:
        raise EvalError(f"no lesion image of {synth_dir} is in the ingest {ingest_dir}")
    return joined[["image_id", "entity", "site", *BOX_COLUMNS]].reset_index(drop=True)


def load_eval_data(ingest_dir: str | os.PathLike, labels: pd.DataFrame, *, image_size: int,
                   roi: bool, roi_margin: float = 0.15, entity_set: str | None = None) -> EvalData:
    """The labelled images of ``ingest_dir``, as ROI crops (``roi``) or whole ingest images."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from msk.core.io.dataset import images_from_table, read_shards
    from msk.core.models.embed import _ingest_resize, map_source_box, roi_crops

    if roi and not set(BOX_COLUMNS) <= set(labels.columns):
        raise EvalError("roi=True needs lesion boxes: columns x0, y0, x1, y1 in the labels "
                        "(or set roi: false)")
    wanted = pa.array(labels["image_id"].astype(str).tolist(), pa.string())
    table = read_shards(ingest_dir, columns=["image_id", "image", "height", "width", "source_height",
                                             "source_width", "patient_id", "study_id"],
                        filter=pc.field("image_id").isin(wanted))
    if table.num_rows == 0:
        raise EvalError(f"none of the {len(labels)} labelled images is in {ingest_dir}")
    ids = table.column("image_id").to_pylist()
    rows = labels.set_index("image_id").loc[ids]
    patients = table.column("patient_id").to_pylist()
    if "patient_id" in rows.columns:  # PNG/JPEG inputs: the labels file's (`msk import`)
        patients = [p or (q if isinstance(q, str) and q.strip() else None)
                    for p, q in zip(patients, rows["patient_id"].tolist())]
    no_patient = [i for i, p in zip(ids, patients) if not p]
    if no_patient:
        raise EvalError(f"{len(no_patient)} images have no patient id (first {no_patient[0]!r}); "
                        f"a patient-level split needs one")
    images = images_from_table(table)
    if roi:
        resize = _ingest_resize(Path(ingest_dir))
        boxes = [map_source_box(b, (h, w), images.shape[1], resize) for b, h, w in zip(
            rows[list(BOX_COLUMNS)].to_numpy(float), table.column("source_height").to_pylist(),
            table.column("source_width").to_pylist())]
        images = roi_crops(images, boxes, image_size, margin=roi_margin, ids=ids)
    entities = rows["entity"].astype(str).to_numpy()
    return EvalData(images, entities, ids, patients,
                    table.column("study_id").to_pylist(), _class_order(entities, entity_set))


def _class_order(entities: np.ndarray, entity_set: str | None) -> list[str]:
    present = sorted(set(entities.tolist()))
    if entity_set is None:
        return present
    from msk.core.registry import entity_set as get_entity_set

    names = get_entity_set(entity_set).names
    unknown = [e for e in present if e not in names]
    if unknown:
        raise EvalError(f"labels {unknown} are not in entity set {entity_set!r} ({', '.join(names)}); "
                        f"fix the labels or set entity_set: null")
    return [n for n in names if n in present]


# -- one split ---------------------------------------------------------------------------------


@dataclass
class SplitOutcome:
    """What one seed produced: metric rows, predictions for confusion matrices, a gallery source."""

    rows: list[dict[str, Any]]
    predictions: dict[str, tuple[np.ndarray, np.ndarray]]  # model -> (y_true, y_pred) entity names
    recommendations: dict[str, tuple[np.ndarray, list]] = field(default_factory=dict)


def train_classifier(spec: ClassifierSpec, data: EvalData, train_idx: np.ndarray,
                     config: RecommenderEvalConfig, seed: int, out: Path, *, use_gpu: bool = False,
                     val_idx: np.ndarray | None = None, score=None):
    """Train ``spec`` on ``data[train_idx]`` with the config's budget (:func:`msk.core.models.train.fit`;
    ``val_idx`` and ``score`` as its ``val`` and ``score``)."""
    from msk.core.models.train import TrainConfig, fit_classifier

    budget = config.training
    train_config = TrainConfig(
        encoder=spec.encoder, encoder_options=spec.encoder_options, image_size=config.image_size,
        epochs=budget.epochs, lr=budget.lr,
        batch_size=budget.batch_size, weight_decay=budget.weight_decay, augment=budget.augment,
        aug_prob=budget.aug_prob, class_weighting=budget.class_weighting,
        num_workers=config.num_workers, use_gpu=use_gpu, seed=seed)
    images, y = data.images[train_idx], data.y[train_idx]
    val = None if val_idx is None else (data.images[val_idx], data.y[val_idx])
    return fit_classifier(images, y, len(data.classes), train_config, out=out, val=val, score=score,
                          classes=data.classes)


def _deepcluster_checkpoint(data: EvalData, train_idx: np.ndarray, config: RecommenderEvalConfig,
                            seed: int, out: Path) -> Path:
    from msk.core.models.deepcluster import run_deepcluster

    dc_config = config.deepcluster.model_copy(update={
        "image_size": config.image_size, "seed": seed, "num_workers": config.num_workers})
    result = run_deepcluster(data.images[train_idx], dc_config, out=out, progress=False,
                             image_ids=[data.image_ids[i] for i in train_idx])
    return result.checkpoint


def _metrics(y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, float]:
    from msk.core.models.metrics import accuracy, macro_f1, macro_precision, macro_recall

    return {"accuracy": accuracy(y_true, y_pred), "macro_precision": macro_precision(y_true, y_pred),
            "macro_recall": macro_recall(y_true, y_pred), "macro_f1": macro_f1(y_true, y_pred)}


def evaluate_split(data: EvalData, train_idx: np.ndarray, test_idx: np.ndarray,
                   config: RecommenderEvalConfig, *, seed: int, out: str | os.PathLike,
                   log=None) -> SplitOutcome:
    """Train and score every model of ``config`` on one train/test split of ``data``.

    Refuses (:class:`msk.core.data.splits.PatientOverlapError`) a split with a patient on both sides.
    """
    from msk.core.data.splits import assert_disjoint_patients
    from msk.core.models.embed import Embedder, embeddings_table
    from msk.core.models.metrics import precision_at_k
    from msk.core.models.recommender import Recommender
    from msk.core.models.train import predict_logits

    log = log or (lambda message: None)
    train_idx, test_idx = np.asarray(train_idx, np.int64), np.asarray(test_idx, np.int64)
    patients = np.asarray(data.patient_ids, dtype=object)
    assert_disjoint_patients(patients[train_idx], patients[test_idx])
    if not len(train_idx) or not len(test_idx):
        raise EvalError(f"empty split: {len(train_idx)} training and {len(test_idx)} test images")
    out = Path(out)
    y_test = data.entities[test_idx]
    common = {"seed": seed, "n_train": len(train_idx), "n_test": len(test_idx)}
    outcome = SplitOutcome([], {})

    checkpoints: dict[str, tuple[Path, dict[str, Any]]] = {}
    for spec in config.classifiers:
        log(f"seed {seed}: training {spec.name} ({spec.encoder})")
        began = time.perf_counter()
        fitted = train_classifier(spec, data, train_idx, config, seed, out / spec.name)
        logits = predict_logits(fitted.model, data.images[test_idx], image_size=config.image_size)
        pred = np.asarray(data.classes, dtype=object)[logits.argmax(1)].astype(str)
        outcome.rows.append({**common, "model": spec.name, "kind": "classifier", "k": None,
                             **_metrics(y_test, pred), "precision_at_k": None,
                             "seconds": time.perf_counter() - began})
        outcome.predictions[spec.name] = (y_test, pred)
        checkpoints[spec.name] = (fitted.best, spec.encoder_options)

    for source in config.embeddings:
        began = time.perf_counter()
        if source == "deepcluster":
            log(f"seed {seed}: DeepCluster on the {len(train_idx)} training images")
            ckpt, options = _deepcluster_checkpoint(data, train_idx, config, seed, out / "deepcluster"), {}
        elif source in checkpoints:
            ckpt, options = checkpoints[source]
        else:
            ckpt, options = Path(source), {}
        embedder = Embedder(ckpt, image_size=config.image_size, encoder_options=options)
        x = embedder.embed_images(data.images)
        train_table = embeddings_table(data.ids(train_idx), x[train_idx], embedder.info)
        recommender = Recommender.build(
            train_table, data.entities[train_idx].tolist(), retriever=config.retriever,
            k=config.k, weighting=config.weighting, retriever_options=config.retriever_options)
        assert_disjoint_patients(recommender.records.column("patient_id").to_pylist(),
                                 patients[test_idx])
        name = f"recommender[{source if source in checkpoints or source == 'deepcluster' else Path(source).stem}]"
        proposals = {k: recommender.recommend(x[test_idx], k=k) for k in sorted(config.ks)}
        seconds = time.perf_counter() - began
        for k, recs in proposals.items():
            pred = np.array([r.entity for r in recs], dtype=str)
            neighbour_labels = [[n.entity for n in r.neighbours] for r in recs]
            model = f"{name} k={k}"
            outcome.rows.append({**common, "model": model, "kind": "recommender", "k": k,
                                 **_metrics(y_test, pred),
                                 "precision_at_k": precision_at_k(neighbour_labels, y_test.tolist(), k),
                                 "seconds": seconds})
            outcome.predictions[model] = (y_test, pred)
        outcome.recommendations[f"{name} k={config.k}"] = (test_idx, proposals[config.k])
    return outcome


# -- statistics --------------------------------------------------------------------------------


@dataclass
class AnovaResult:
    """One-way ANOVA of per-seed accuracy across models, and Tukey's HSD for every pair."""

    models: list[str]
    f_statistic: float
    p_value: float
    pairs: pd.DataFrame  # model_a, model_b, mean_difference, p_value, ci_low, ci_high

    def markdown(self) -> str:
        lines = [f"One-way ANOVA of accuracy across {len(self.models)} models (one value per seed): "
                 f"F = {self.f_statistic:.3f}, p {_p(self.p_value, equals=True)}.", "",
                 "Tukey HSD (difference = first − second):", "",
                 "| model | vs | difference | 95 % CI | p |", "|---|---|---:|---|---:|"]
        for r in self.pairs.itertuples():
            lines.append(f"| {r.model_a} | {r.model_b} | {r.mean_difference:+.3f} | "
                         f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}] | {_p(r.p_value)} |")
        return "\n".join(lines)


def _p(p: float, *, equals: bool = False) -> str:
    if not np.isfinite(p):
        text = "nan"
    elif p < 0.001:
        return "< 0.001"
    else:
        text = f"{p:.3f}"
    return f"= {text}" if equals else text


def anova(groups: dict[str, Sequence[float]]) -> AnovaResult:
    """One-way ANOVA (:func:`scipy.stats.f_oneway`) and Tukey HSD (:func:`scipy.stats.tukey_hsd`)
    of ``model -> per-seed values``; needs two or more models with two or more values each."""
    import pandas as pd
    from scipy.stats import f_oneway, tukey_hsd

    names = list(groups)
    values = [np.asarray(groups[n], np.float64) for n in names]
    if len(names) < 2 or min(len(v) for v in values) < 2:
        raise EvalError("ANOVA needs at least two models with at least two seeds each")
    if all(np.ptp(v) == 0 for v in values):  # no variance within any group: F is undefined
        f, p = (np.inf, 0.0) if len({float(v[0]) for v in values}) > 1 else (np.nan, np.nan)
        pairs = pd.DataFrame([{"model_a": a, "model_b": b,
                               "mean_difference": float(values[i].mean() - values[j].mean()),
                               "p_value": np.nan, "ci_low": np.nan, "ci_high": np.nan}
                              for i, a in enumerate(names) for j, b in enumerate(names) if i < j])
        return AnovaResult(names, float(f), float(p), pairs)
    f, p = f_oneway(*values)
    hsd = tukey_hsd(*values)
    ci = hsd.confidence_interval(0.95)
    pairs = pd.DataFrame([{"model_a": a, "model_b": b, "mean_difference": float(values[i].mean() - values[j].mean()),
                           "p_value": float(hsd.pvalue[i, j]), "ci_low": float(ci.low[i, j]),
                           "ci_high": float(ci.high[i, j])}
                          for i, a in enumerate(names) for j, b in enumerate(names) if i < j])
    return AnovaResult(names, float(f), float(p), pairs)


# -- the whole protocol ------------------------------------------------------------------------


SUMMARY_METRICS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "precision_at_k")


@dataclass
class RecommenderEvaluation:
    """Outcome of :func:`evaluate_recommender` (everything is also written to :attr:`out`)."""

    results: pd.DataFrame  # one row per seed and model
    summary: pd.DataFrame  # per model: mean and sd of SUMMARY_METRICS over seeds
    anova: AnovaResult | None
    compared: list[str]  # the models in the ANOVA
    out: Path
    n_images: int
    n_patients: int
    classes: list[str]
    seconds: float = 0.0

    def markdown(self) -> str:
        """The summary table (mean ± sd over seeds) and the ANOVA, as Markdown."""
        cols = ["accuracy", "macro_precision", "macro_recall", "precision_at_k"]
        head = "| model | " + " | ".join(c.replace("_", " ") for c in cols) + " |"
        lines = [head, "|---|" + "---:|" * len(cols)]
        for r in self.summary.itertuples(index=False):
            cells = []
            for c in cols:
                mean, sd = getattr(r, f"{c}_mean"), getattr(r, f"{c}_sd")
                cells.append("–" if not np.isfinite(mean) else f"{mean:.3f} ± {sd:.3f}")
            lines.append(f"| {r.model} | " + " | ".join(cells) + " |")
        text = "\n".join(lines)
        if self.anova is not None:
            text += "\n\n" + self.anova.markdown()
        return text


def _summarise(results: pd.DataFrame) -> pd.DataFrame:
    order = list(dict.fromkeys(results["model"]))
    grouped = results.groupby("model", sort=False)[list(SUMMARY_METRICS)]
    mean, sd = grouped.mean(), grouped.std(ddof=1)
    summary = mean.add_suffix("_mean").join(sd.add_suffix("_sd")).loc[order].reset_index()
    summary.insert(1, "seeds", results.groupby("model", sort=False).size().loc[order].to_numpy())
    return summary


def evaluate_recommender(ingest_dir: str | os.PathLike, labels: str | os.PathLike | pd.DataFrame,
                         out: str | os.PathLike, config: RecommenderEvalConfig | None = None, *,
                         progress: bool = True) -> RecommenderEvaluation:
    """Run the evaluation protocol (module docstring) on the labelled images of ``ingest_dir``.

    :param labels: ``image_id, entity`` (and ``x0, y0, x1, y1`` for ROI crops), see
        :func:`read_labels`; :func:`synth_labels` makes them for a synthetic export.
    :param out: output folder (see the module docstring).
    """
    import pandas as pd
    from rich.console import Console

    from msk.core.data.splits import patient_split
    from msk.core.models.metrics import confusion_matrix, confusion_matrix_png

    began = time.perf_counter()
    config = config or RecommenderEvalConfig()
    console = Console(stderr=True, quiet=not progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config.to_yaml())
    data = load_eval_data(ingest_dir, read_labels(labels), image_size=config.image_size,
                          roi=config.roi, roi_margin=config.roi_margin, entity_set=config.entity_set)
    n_patients = len(set(data.patient_ids))
    console.print(f"{len(data)} labelled images of {n_patients} patients, {len(data.classes)} entities")

    rows, splits, predictions, gallery = [], [], {}, None
    for seed in config.seeds:
        train_idx, test_idx = patient_split(data.patient_ids, data.entities, config.test_size, seed)
        splits.append(pd.DataFrame({"seed": seed, "image_id": data.image_ids,
                                    "patient_id": data.patient_ids,
                                    "split": np.where(np.isin(np.arange(len(data)), test_idx), "test", "train")}))
        outcome = evaluate_split(data, train_idx, test_idx, config, seed=seed,
                                 out=out / f"seed-{seed}", log=console.print)
        rows += outcome.rows
        for model, (t, p) in outcome.predictions.items():
            prev = predictions.get(model, ([], []))
            predictions[model] = ([*prev[0], *t], [*prev[1], *p])
        if gallery is None and outcome.recommendations:
            gallery = next(iter(outcome.recommendations.items()))
        seed_rows = pd.DataFrame(outcome.rows)
        console.print(seed_rows[["model", "accuracy", "macro_recall"]].to_string(index=False), markup=False)

    results = pd.DataFrame(rows)
    results.to_csv(out / "results.csv", index=False)
    pd.concat(splits).to_csv(out / "splits.csv", index=False)
    summary = _summarise(results)
    summary.to_csv(out / "summary.csv", index=False)

    compared = [c.name for c in config.classifiers] + [
        m for m in dict.fromkeys(results["model"]) if m.endswith(f" k={config.k}")]
    result_anova = None
    if len(config.seeds) >= 2 and len(compared) >= 2:
        per_seed = {m: results.loc[results["model"] == m, "accuracy"].to_numpy() for m in compared}
        result_anova = anova(per_seed)
        result_anova.pairs.to_csv(out / "tukey_hsd.csv", index=False)

    (out / "confusion").mkdir(exist_ok=True)
    for model in compared:
        t, p = predictions[model]
        cm = confusion_matrix(t, p, data.classes)
        confusion_matrix_png(cm, data.classes, out / "confusion" / f"{_slug(model)}.png",
                             title=f"{model}, {len(config.seeds)} seed(s) summed")
    if gallery is not None and config.gallery_queries:
        write_gallery(data, *gallery[1], out / "gallery", title=gallery[0],
                      n_queries=config.gallery_queries)

    evaluation = RecommenderEvaluation(results, summary, result_anova, compared, out, len(data),
                                       n_patients, data.classes, time.perf_counter() - began)
    header = (f"# Recommender evaluation\n\n{len(data)} images of {n_patients} patients, "
              f"{len(data.classes)} entities; seeds {config.seeds}, {config.test_size:.0%} of "
              f"patients in each test set; mean ± sd over seeds.\n\n")
    (out / "summary.md").write_text(header + evaluation.markdown() + "\n")
    return evaluation


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-")


# -- the gallery -------------------------------------------------------------------------------


def _strip(query: np.ndarray, neighbours: list[np.ndarray], captions: list[str], *, thumb: int = 112):
    """A white contact strip: the query, a gap, its neighbours; a caption under each tile."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line = 12
    tiles = [query, *neighbours]
    gap, sep = 4, 16
    width = gap + len(tiles) * (thumb + gap) + sep
    height = gap + thumb + 3 * line + gap
    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    for i, (tile, caption) in enumerate(zip(tiles, captions)):
        x = gap + i * (thumb + gap) + (sep if i else 0)
        image = Image.fromarray(tile).convert("L").resize((thumb, thumb), Image.Resampling.NEAREST)
        strip.paste(image, (x, gap))
        if i == 0:
            draw.rectangle([x - 1, gap - 1, x + thumb, gap + thumb], outline="black")
        for j, text in enumerate(caption.split("\n")[:3]):
            draw.text((x, gap + thumb + 1 + j * line), text[:19], fill="black", font=font)
    return strip


def write_gallery(data: EvalData, test_idx: np.ndarray, recommendations: list, out: str | os.PathLike, *,
                  title: str = "recommender", n_queries: int = 12) -> Path:
    """Contact strips (query + its neighbours) for ``n_queries`` test images, one entity after
    another, and ``index.html`` listing them with the vote and the neighbours' pseudonymised ids."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    position = {image_id: i for i, image_id in enumerate(data.image_ids)}
    by_entity: dict[str, list[int]] = {}
    for j, i in enumerate(test_idx):
        by_entity.setdefault(str(data.entities[i]), []).append(j)
    chosen: list[int] = []
    while len(chosen) < min(n_queries, len(test_idx)):
        for entity in data.classes:
            queue = by_entity.get(entity, [])
            if queue and len(chosen) < n_queries:
                chosen.append(queue.pop(0))
        if not any(by_entity.values()):
            break
    sections = []
    for n, j in enumerate(chosen):
        i, rec = int(test_idx[j]), recommendations[j]
        truth = str(data.entities[i])
        neighbours = [data.images[position[nb.image_id]] for nb in rec.neighbours]
        captions = [f"QUERY\n{truth}\n-> {rec.entity}"] + [
            f"#{r + 1} d={nb.distance:.3g}\n{nb.entity}\n{nb.patient_id}" for r, nb in enumerate(rec.neighbours)]
        name = f"query-{n:02d}.png"
        _strip(data.images[i], neighbours, captions).save(out / name)
        verdict = "correct" if rec.entity == truth else "wrong"
        shares = ", ".join(f"{html.escape(e)} {s:.0%}" for e, s in rec.shares.items())
        items = "".join(
            f"<li>#{r + 1} {html.escape(nb.entity)}, distance {nb.distance:.4g}: patient "
            f"<code>{html.escape(str(nb.patient_id))}</code>, study <code>{html.escape(str(nb.study_id))}</code>, "
            f"image <code>{html.escape(nb.image_id)}</code></li>" for r, nb in enumerate(rec.neighbours))
        sections.append(
            f'<section><h2>query {n + 1}: {html.escape(truth)} → {html.escape(rec.entity)} '
            f'<span class="{verdict}">{verdict}</span></h2>'
            f'<p>image <code>{html.escape(data.image_ids[i])}</code>, patient '
            f'<code>{html.escape(data.patient_ids[i])}</code>; vote: {shares}</p>'
            f'<img src="{name}" alt="query {n + 1} and its neighbours"><ol>{items}</ol></section>')
    from msk.core.io.report import html_page

    page = html_page(f"{title}: {len(chosen)} test queries and their nearest training images", f"""
<p>Left: the query (framed) with its true entity and the vote; right: its nearest previous
patients' images, nearest first, with distance, confirmed entity and pseudonymised patient id.
No test patient is in the index.</p>
{chr(10).join(sections)}
""", what="recommender gallery", subtitle=str(out))
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"

