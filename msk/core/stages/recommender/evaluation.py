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

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
from msk.core.stages.recommender.config import ClassifierSpec, EvalError, RecommenderEvalConfig
from msk.core.stages.recommender.data import EvalData, load_eval_data, read_labels
from msk.core.stages.recommender.gallery import slug, write_gallery
from msk.core.stages.recommender.statistics import AnovaResult, anova

__all__ = ["RecommenderEvaluation", "evaluate_recommender", "evaluate_split", "train_classifier"]



# -- configuration -----------------------------------------------------------------------------


# -- data --------------------------------------------------------------------------------------


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


def _metrics(y_true: Sequence[str] | np.ndarray, y_pred: Sequence[str] | np.ndarray) -> dict[str, float]:
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
        options: dict[str, Any]
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

    rows, splits, gallery = [], [], None
    predictions: dict[str, tuple[list[str], list[str]]] = {}
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
        truth, predicted = predictions[model]
        cm = confusion_matrix(truth, predicted, data.classes)
        confusion_matrix_png(cm, data.classes, out / "confusion" / f"{slug(model)}.png",
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


# -- the gallery -------------------------------------------------------------------------------


