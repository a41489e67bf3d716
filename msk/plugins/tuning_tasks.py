"""Built-in tuning tasks of ``msk tune``: the sorter, the fusion heads and the recommender.

Each is a :class:`msk.core.stages.tuning.search.Task` registered through ``msk_tuning_tasks``
exactly as a third-party task is; the stage modules a task trains with are imported when a
trial runs, so that listing plugins stays cheap.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import numpy as np

from msk.core.hookspecs import hookimpl
from msk.core.models.vote import Weighting
from msk.core.specs import TuningTaskSpec
from msk.core.stages.tuning.search import Task, TuneError, TuneOptions


def _build(cls_name: str, name: str, **options: Any) -> Any:
    return globals()[cls_name](**options)


class SorterTask(Task):
    name = "sorter"

    @property
    def config_cls(self):
        from msk.core.stages.sorter.training import SorterConfig

        return SorterConfig

    def load(self, ingest, labels, base):
        from msk.core.data.labelled import load_labelled

        return load_labelled(ingest, labels, entity_set=base.region_set)

    def split(self, data, config):
        from msk.core.stages.sorter.training import prepare_sorter_data

        data, _, classes, y, plan = prepare_sorter_data(data, config)
        return data, classes, y, *plan.folds[0]

    def trial(self, data, config, options, out):
        from msk.core.models.train import fit_classifier

        data, classes, y, train, val = self.split(data, config)
        fit_classifier(data.images[train], y[train], len(classes), _train_part(config.train_config(), options),
                       out=out, val=(data.images[val], y[val]), classes=classes)


class FusionTask(Task):
    name = "fusion"
    epochs_key = "train.epochs"

    @property
    def config_cls(self):
        from msk.core.stages.fusion.config import FusionConfig

        return FusionConfig

    def load(self, ingest, labels, base):
        from msk.core.stages.fusion.data import load_fusion_data

        return load_fusion_data(ingest, labels, base)

    def split(self, data, config):
        from msk.core.stages.fusion.training import plan_folds

        dev, _, folds = plan_folds(data, config)
        return dev, folds[0]

    def trial(self, data, config, options, out):
        from msk.core.stages.fusion.training import fit_fusion

        dev, fold = self.split(data, config)
        train, val = dev[fold.train], dev[fold.val]

        def meta(rows):
            return fold.encoder.transform(data.meta.iloc[rows])

        fit_fusion(data.images[train], data.labels[train], meta(train), len(data.classes),
                   _train_part(config.train, options), out=out, head=config.heads[0],
                   hidden=tuple(config.hidden), dropout=config.dropout,
                   val=(data.images[val], data.labels[val], meta(val)), classes=data.classes)


class VoteScore:
    """``score(model)`` for :func:`msk.core.models.train.fit`: accuracy of the recommender's entity vote
    (:class:`msk.core.models.recommender.Recommender`, built as ``msk eval recommender`` builds it) for
    the validation images among the training images, in the model's embedding space."""

    def __init__(self, train_images, train_ids: dict[str, list[str]], train_labels, val_images, val_labels,
                 *, k: int, image_size: int, retriever: str, retriever_options: dict[str, Any], weighting: Weighting):
        self.train_images, self.train_ids, self.train_labels = train_images, train_ids, list(train_labels)
        self.val_images, self.val_labels = val_images, np.asarray(val_labels)
        self.k, self.image_size, self.weighting = k, image_size, weighting
        self.retriever, self.retriever_options = retriever, dict(retriever_options)

    def __call__(self, model) -> dict[str, float]:
        from msk.core.models.embed import Embedder, embeddings_table
        from msk.core.models.recommender import Recommender

        embedder = Embedder(model, image_size=self.image_size, use_gpu=next(model.parameters()).is_cuda)
        stored = embeddings_table(self.train_ids, embedder.embed_images(self.train_images), embedder.info)
        recommender = Recommender.build(stored, self.train_labels, retriever=self.retriever, k=self.k,
                                        weighting=self.weighting, retriever_options=self.retriever_options)
        predicted = [r.entity for r in recommender.recommend(embedder.embed_images(self.val_images))]
        return {"val_vote_accuracy": round(float(np.mean(np.asarray(predicted) == self.val_labels)), 5)}


class RecommenderTask(Task):
    name = "recommender"
    metric = "val_vote_accuracy"
    epochs_key = "training.epochs"

    @property
    def config_cls(self):
        from msk.core.stages.recommender.config import RecommenderEvalConfig

        return RecommenderEvalConfig

    def configure(self, base, params):
        """Also takes ``encoder`` (the first classifier's) and ``k`` (added to ``ks``)."""
        params, data = dict(params), copy.deepcopy(base.model_dump(mode="json"))
        if "encoder" in params:
            data["classifiers"][0]["encoder"] = params.pop("encoder")
        if "k" in params:
            data["ks"] = sorted({*data["ks"], params["k"]})
        return super().configure(self.config_cls.model_validate(data), params)

    def load(self, ingest, labels, base):
        from msk.core.stages.recommender.data import load_eval_data, read_labels

        return load_eval_data(ingest, read_labels(labels), image_size=base.image_size, roi=base.roi,
                              roi_margin=base.roi_margin, entity_set=base.entity_set)

    def split(self, data, config):
        """The first seed's training patients, split again into train and validation."""
        from msk.core.data.splits import patient_split

        seed = config.seeds[0]
        dev, _ = patient_split(data.patient_ids, data.entities, config.test_size, seed)
        patients = np.asarray(data.patient_ids, dtype=object)
        inner_train, inner_val = patient_split(patients[dev], data.entities[dev], config.test_size, seed)
        train, val = dev[inner_train], dev[inner_val]
        if not len(train) or not len(val) or len(train) < config.k:
            raise TuneError(f"{len(data)} images are too few to tune the recommender: {len(train)} "
                            f"training and {len(val)} validation images for k={config.k}")
        return train, val

    def trial(self, data, config, options, out):
        from msk.core.stages.recommender.evaluation import train_classifier

        train, val = self.split(data, config)
        score = VoteScore(data.images[train], data.ids(train), data.entities[train], data.images[val],
                          data.entities[val], k=config.k, image_size=config.image_size, retriever=config.retriever,
                          retriever_options=config.retriever_options, weighting=config.weighting)
        config = config.model_copy(update={"num_workers": options.num_workers})
        train_classifier(config.classifiers[0], data, train, config, config.seeds[0], out,
                         use_gpu=options.use_gpu, val_idx=val, score=score)


def _train_part(train, options: TuneOptions):
    return train.model_copy(update={"num_workers": options.num_workers, "use_gpu": options.use_gpu})


TUNING_TASKS = (
    TuningTaskSpec(
        "sorter", functools.partial(_build, "SorterTask"),
        "the sorter on fold 1 of its CV plan; metric val_accuracy",
        command="msk train sorter INGEST LABELS OUT", labels="weak labels (sorter)"),
    TuningTaskSpec(
        "fusion", functools.partial(_build, "FusionTask"),
        "the first fusion head of `heads` on fold 1; metric val_accuracy",
        command="msk eval fusion INGEST METADATA OUT", labels="metadata CSV (fusion)"),
    TuningTaskSpec(
        "recommender", functools.partial(_build, "RecommenderTask"),
        "the first classifier of the recommender, seed 1; metric val_vote_accuracy (k-NN vote)",
        command="msk eval recommender INGEST LABELS OUT", labels="image_id,entity CSV (recommender)"),
)


@hookimpl
def msk_tuning_tasks() -> list[TuningTaskSpec]:
    return list(TUNING_TASKS)
