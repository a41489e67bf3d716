"""The region sorter: weak labels in, patient-level cross-validation, scores, Grad-CAM out."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from msk.core.data.labelled import LabelledImages, load_labelled
from msk.core.data.splits import plan_splits
from msk.core.errors import TrainingDataError
from msk.core.io.checkpoint import save_checkpoint
from msk.core.io.labels import LabelFileError, read_image_labels
from msk.core.models.sorter import SorterError, load_sorter
from msk.core.models.train import TrainConfig, fit_classifier
from msk.core.registry import entity_set
from msk.core.stages.sorter.training import SorterConfig, train_sorter

from test_train import bars as drawings  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REGIONS = ("hand", "knee", "skull")


def labelled(n: int = 60, seed: int = 0, prefix: str = "p") -> LabelledImages:
    """``n`` images, two per patient (both of the patient's class)."""
    images, classes = drawings(n, seed)
    order = np.argsort(classes, kind="stable")  # patients hold images of one class
    images, classes = images[order], classes[order]
    return LabelledImages(images, [REGIONS[c] for c in classes],
                          [f"{prefix}{i // 2}" for i in range(n)],
                          [f"{prefix}-img{i}" for i in range(n)], source="memory")


def fast(**kw) -> SorterConfig:
    return SorterConfig(**{"encoder": "tiny-cnn", "image_size": 32, "epochs": 2, "batch_size": 16,
                           "lr": 5e-3, "augment": False, "folds": 2, "num_workers": 0,
                           "gradcam_images": 4, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sorter")
    holdout = labelled(18, seed=3, prefix="h")
    return train_sorter(labelled(), fast(), out=out, holdout=holdout, progress=False), out


# -- splits ------------------------------------------------------------------------------------


def test_splits_are_patient_level_with_a_fixed_test_set():
    data = labelled(100)
    plan = plan_splits(data.patient_ids, data.labels, folds=4, test_size=0.2, seed=1)
    pids = np.array(data.patient_ids)
    assert len(set(pids[plan.test])) == 10  # 20 % of 50 patients
    vals = np.concatenate([val for _, val in plan.folds])
    assert sorted(np.concatenate([vals, plan.test])) == list(range(100))  # each image once
    for train, val in plan.folds:
        assert not set(pids[train]) & set(pids[val])
        assert not set(pids[train]) & set(pids[plan.test])
        assert len(train) + len(val) + len(plan.test) == 100
    # stratified: every class is in the test set and in every validation fold
    labels = np.array(data.labels)
    assert set(labels[plan.test]) == set(REGIONS)
    assert all(set(labels[val]) == set(REGIONS) for _, val in plan.folds)


def test_too_few_patients_for_the_folds():
    data = labelled(10)  # 5 patients
    with pytest.raises(TrainingDataError, match=r"5 patient\(s\) \(10 images\) are too few for a 20% "
                                          r"test set and 5 folds: at least 6 are needed"):
        plan_splits(data.patient_ids, data.labels, folds=5)


def test_a_class_with_too_few_patients(tmp_path):
    data = labelled(60)
    keep = [i for i, c in enumerate(data.labels) if c != "skull"] + \
           [i for i, c in enumerate(data.labels) if c == "skull"][:4]  # 2 skull patients
    small = data.subset(keep)
    with pytest.raises(SorterError, match=r"fewer than 3 patients.*'skull' \(4 images, 2 patients\)"
                                          r".*small_classes: drop"):
        train_sorter(small, fast(), out=tmp_path, progress=False)
    assert not (tmp_path / "fold-1").exists()


def test_small_classes_can_be_dropped(tmp_path):
    data = labelled(60)
    keep = [i for i, c in enumerate(data.labels) if c != "skull"] + \
           [i for i, c in enumerate(data.labels) if c == "skull"][:2]
    result = train_sorter(data.subset(keep), fast(epochs=1, small_classes="drop", gradcam_images=0),
                          out=tmp_path, progress=False)
    assert result.classes == ["hand", "knee"]
    assert result.dropped == {"skull": 2}
    assert "left out 2 images of 1 small class(es)" in result.notes[0]


def test_splits_from_an_earlier_run_keep_its_test_patients_after_relabelling(run, tmp_path):
    _, first = run
    data = labelled()
    # an expert corrects two patients' labels and discards one patient: the split of a fresh
    # plan would move, the earlier run's is kept image by image
    labels = list(data.labels)
    labels[6:10] = ["knee"] * 4
    corrected = LabelledImages(data.images, labels, data.patient_ids, data.image_ids, source="memory")
    corrected = corrected.subset(list(range(4, len(corrected))))
    out = tmp_path / "corrected"
    train_sorter(corrected, fast(epochs=1, gradcam_images=0, splits_from=first / "splits.csv"),
                 out=out, progress=False)
    with (first / "splits.csv").open() as f:
        before = {r["image_id"]: (r["part"], r["val_fold"]) for r in csv.DictReader(f)}
    with (out / "splits.csv").open() as f:
        after = list(csv.DictReader(f))
    assert len(after) == len(corrected)
    assert all(before[r["image_id"]] == (r["part"], r["val_fold"]) for r in after)
    assert {r["label"] for r in after if r["image_id"] == "p-img6"} == {"knee"}


def test_splits_from_must_name_every_image(run, tmp_path):
    _, first = run
    extra = labelled(8, seed=5, prefix="new")
    data = labelled()
    both = LabelledImages(np.concatenate([data.images, extra.images]), data.labels + extra.labels,
                          data.patient_ids + extra.patient_ids, data.image_ids + extra.image_ids, source="memory")
    with pytest.raises(SorterError, match=r"splits_from .*splits.csv: 8 of this run's 68 images are not in it "
                                          r"\(e.g. new-img0\)"):
        train_sorter(both, fast(splits_from=first / "splits.csv"), out=tmp_path / "a", progress=False)
    bad = tmp_path / "splits.csv"
    bad.write_text("image_id,part,val_fold\n" + "".join(f"{i},{'test' if k < 10 else 'dev'},{'' if k < 10 else 7}\n"
                                                         for k, i in enumerate(data.image_ids)))
    with pytest.raises(SorterError, match=r"validation folds are \[7\], not 1..2"):
        train_sorter(data, fast(splits_from=bad), out=tmp_path / "b", progress=False)
    rows = [f"{i},test,\n" if k % 4 == 1 else f"{i},dev,{1 + k // 4 % 2}\n" for k, i in enumerate(data.image_ids)]
    bad.write_text("image_id,part,val_fold\n" + "".join(rows))
    with pytest.raises(SorterError, match=r"PAT|patient"):  # one patient's images on both sides
        train_sorter(data, fast(splits_from=bad), out=tmp_path / "c", progress=False)


# -- the run -----------------------------------------------------------------------------------


def test_scores_confusion_matrix_and_predictions(run):
    result, out = run
    assert result.classes == ["hand", "knee", "skull"]  # entity-set order
    test = result.test
    assert test.n == 12 and test.confusion.sum() == 12  # 6 of 30 patients
    assert len(test.fold_top1) == 2 and all(0 <= a <= 1 for a in test.fold_top1)
    assert test.top1 <= test.top2 and all(t1 <= t2 for t1, t2 in zip(test.fold_top1, test.fold_top2))
    assert test.top1 >= 0.5, test  # three easy classes, two epochs: well above chance (1/3)
    assert test.confusion_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(test.predictions_csv.open()))
    assert len(rows) == 12 and set(rows[0]) == {"image_id", "patient_id", "label", "predicted",
                                                "second", "probability", "score", "unknown"}
    assert (test.top1 * 12) == pytest.approx(sum(r["label"] == r["predicted"] for r in rows), abs=1e-3)
    summary = json.loads((out / "sorter.json").read_text())
    assert summary["test"]["top2"] == test.top2 and summary["folds"] == 2
    # the share of test images called unknown is the share of rows scored below the threshold
    threshold = summary["unknown"]["threshold"]
    assert [r["unknown"] == "1" for r in rows] == [float(r["score"]) < threshold for r in rows]
    assert summary["test"]["unknown"] == test.unknown == pytest.approx(
        sum(r["unknown"] == "1" for r in rows) / 12, abs=1e-4)


def test_holdout_is_scored_like_the_test_set(run):
    result, out = run
    assert result.holdout.n == 18 and result.holdout.confusion.sum() == 18
    assert (out / "confusion_holdout.png").is_file() and (out / "predictions_holdout.csv").is_file()


def test_each_fold_is_a_train_run_with_checkpoints(run):
    result, out = run
    splits = list(csv.DictReader((out / "splits.csv").open()))
    assert {r["part"] for r in splits} == {"test", "dev"}
    for fold in result.folds:
        assert fold.out == out / f"fold-{fold.fold}"
        # best + the last epoch's checkpoint only (keep_checkpoints: 1)
        assert [p.name for p in (fold.out / "checkpoints").glob("epoch-*.pt")] == ["epoch-002.pt"]
        assert (fold.out / "best.pt").is_file() and (fold.out / "fold.json").is_file()
        val = [r for r in splits if r["val_fold"] == str(fold.fold)]
        assert len(val) == fold.n_val and fold.n_train + fold.n_val == 48


def test_gradcam_overlays_average_the_fold_models(run):
    result, out = run
    assert result.gradcam == out / "gradcam.png" and result.gradcam.is_file()
    saved = np.load(out / "gradcam" / "cams.npz")
    assert saved["cams"].shape == (4, 32, 32)
    assert len(list((out / "gradcam").glob("*.png"))) == 4
    # round-robin over classes: the 4 images cover all three classes
    test_labels = {r["image_id"]: r["label"] for r in csv.DictReader((out / "predictions_test.csv").open())}
    assert {test_labels[i] for i in saved["image_ids"]} == set(REGIONS)


def test_load_sorter_predicts_like_the_run(run):
    result, out = run
    sorter = load_sorter(out)
    assert sorter.classes == result.classes and len(sorter.models) == 2
    data = labelled(18, seed=3, prefix="h")
    predicted = sorter.predict(data.images)
    rows = list(csv.DictReader((out / "predictions_holdout.csv").open()))
    assert predicted == ["unknown" if r["unknown"] == "1" else r["predicted"] for r in rows]


def test_rerun_skips_finished_folds(run, tmp_path):
    result, out = run
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("epoch-*.pt")}
    again = train_sorter(labelled(), fast(), out=out, progress=False)
    assert all(f.skipped for f in again.folds)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("epoch-*.pt")} == mtimes
    assert again.test.top1 == result.test.top1


def test_rerun_with_another_architecture_is_refused(run):
    _, out = run
    with pytest.raises(SorterError, match=r"holds a sorter run with other options \(encoder: "
                                          r"'tiny-cnn' -> 'resnet18'\); use a new output folder"):
        train_sorter(labelled(), fast(encoder="resnet18"), out=out, progress=False)


def test_other_data_in_the_same_folder_is_refused(run):
    _, out = run
    with pytest.raises(SorterError, match="splits.csv was written for other images or labels"):
        train_sorter(labelled(62), fast(), out=out, progress=False)


def test_resuming_a_fold_checkpoint_of_another_model_names_the_fold(tmp_path):
    images, classes = drawings(8)
    fit_classifier(images, classes % 2, 2, TrainConfig(encoder="tiny-cnn", image_size=32, epochs=1,
                                                      batch_size=4), out=tmp_path / "fold-1")
    with pytest.raises(SorterError, match=r"fold 1 \(.*fold-1\): .* holds a run of a 'tiny-cnn' "
                                          r"encoder with 2 classes"):
        train_sorter(labelled(), fast(), out=tmp_path, progress=False)


def test_init_from_a_checkpoint_of_another_architecture(tmp_path):
    from msk.core.registry import build_encoder

    ckpt = save_checkpoint(tmp_path / "dc.pt", build_encoder("tiny-cnn", in_chans=2), arch="tiny-cnn",
                           in_chans=2, config={"sobel": True}, epoch=1)
    with pytest.raises(SorterError, match=r"cannot fine-tune from init=.*dc.pt: .* holds a 'tiny-cnn' "
                                          r"encoder; it cannot be loaded into 'resnet18'"):
        train_sorter(labelled(), fast(encoder="resnet18", init=str(ckpt)), out=tmp_path / "run",
                     progress=False)


def test_fine_tunes_a_deepcluster_checkpoint(tmp_path):
    """init = a DeepCluster checkpoint (Sobel input): the sorter's fold models start from it."""
    from msk.core.io.checkpoint import load_checkpoint
    from msk.core.models.deepcluster import DeepClusterConfig, run_deepcluster

    data = labelled()
    dc = run_deepcluster(data.images, DeepClusterConfig(encoder="tiny-cnn", k=6, epochs=1,
                                                        image_size=32, pca_dim=8, num_workers=0),
                         out=tmp_path / "dc", progress=False)
    result = train_sorter(data, fast(epochs=1, init=str(dc.checkpoint), gradcam_images=1),
                          out=tmp_path / "sorter", progress=False)
    saved = load_checkpoint(result.folds[0].out / "best.pt")
    assert saved.in_chans == 2 and saved.config["sobel"] is True
    assert saved.config["init"] == str(dc.checkpoint)


def fake_cluster_run(run, image_ids, arch: str = "tiny-cnn"):
    """A DeepCluster run folder (config.yaml, assignments.csv, two epoch checkpoints)."""
    from msk.core.models.deepcluster import DeepClusterConfig
    from msk.core.registry import build_encoder

    run.mkdir(parents=True)
    (run / "config.yaml").write_text(DeepClusterConfig(k=3, encoder=arch).to_yaml())
    write(run / "assignments.csv", ["row", "image_id", "cluster"],
          [(i, image_id, i % 3) for i, image_id in enumerate(image_ids)])
    for epoch in (1, 2):
        save_checkpoint(run / "checkpoints" / f"epoch-{epoch:03d}.pt", build_encoder(arch, in_chans=2),
                        arch=arch, in_chans=2, config={"sobel": True, "k": 3}, epoch=epoch)
    return run


def test_init_defaults_to_the_deepcluster_run_of_the_weak_labels(tmp_path):
    import shutil

    from msk.core.config import load_config
    from msk.core.io.labels import WeakLabels, weak_labels_run
    from msk.core.stages.sorter.training import init_from_weak_labels

    run = fake_cluster_run(tmp_path / "project" / "cluster", ["a", "b", "c"])
    weak = WeakLabels(["hand", "knee", None], {"hand": 1, "knee": 1}, {0: "hand", 1: "knee"}, 0, 1,
                      "samx-regions")
    (tmp_path / "project" / "labels").mkdir()
    labels = weak.save(tmp_path / "project" / "labels" / "weak.csv", ["a", "b", "c"], run=run)
    assert weak_labels_run(labels) == run  # recorded in weak.source.json

    cfg, note = init_from_weak_labels(load_config(SorterConfig), labels)
    assert cfg.init == str(run / "checkpoints" / "epoch-002.pt") and cfg.encoder == "tiny-cnn"
    assert note.startswith(f"init: {run / 'checkpoints' / 'epoch-002.pt'}, the last checkpoint")
    assert "--init random" in note
    assert cfg.model_fields_set >= {"init", "encoder"} and cfg.folds == 5  # the rest stays default

    # --init (random or a checkpoint) wins; an --encoder of another architecture keeps random, saying so
    for chosen in ("random", str(run / "checkpoints" / "epoch-001.pt")):
        assert init_from_weak_labels(load_config(SorterConfig, None, init=chosen), labels) == (
            load_config(SorterConfig, None, init=chosen), None)
    cfg, note = init_from_weak_labels(load_config(SorterConfig, None, encoder="resnet18"), labels)
    assert cfg.init == "random" and "whose encoder is 'tiny-cnn', not 'resnet18'" in note

    # weak labels saved in the run folder before the record existed; a moved project still resolves
    plain = write(run / "weak_labels.csv", ["row", "image_id", "label"], [(0, "a", "hand")])
    assert weak_labels_run(plain) == run
    shutil.move(tmp_path / "project", tmp_path / "moved")
    assert weak_labels_run(tmp_path / "moved" / "labels" / "weak.csv") == tmp_path / "moved" / "cluster"
    # labels of no run: unchanged
    other = write(tmp_path / "expert.csv", ["image_id", "label"], [("a", "hand")])
    assert init_from_weak_labels(load_config(SorterConfig), other) == (load_config(SorterConfig), None)


# -- labels and ingest output ------------------------------------------------------------------


def write(path, header, rows):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def fake_ingest(folder, data: LabelledImages, *, patients=True):
    """A committed ingest output holding ``data``'s images (one shard, one manifest part)."""
    from msk.core.io.manifest import write_manifest_part

    n, size = len(data), data.images.shape[1]
    (folder / "shards").mkdir(parents=True)
    pq.write_table(pa.table({
        "image_id": data.image_ids, "image": [im.tobytes() for im in data.images],
        "height": pa.array([size] * n, pa.int32()), "width": pa.array([size] * n, pa.int32()),
        "patient_id": data.patient_ids if patients else [None] * n,
    }), folder / "shards" / "part-000000-000.parquet")
    write_manifest_part(folder, 0, [{"path": f"{i}.dcm", "image_id": i, "status": "ok",
                                     "shard": "shards/part-000000-000.parquet"} for i in data.image_ids])
    return folder


def test_weak_labels_of_clusters_apply_and_plain_csv(tmp_path):
    regions = entity_set("samx-regions")
    weak = write(tmp_path / "weak.csv", ["row", "image_id", "label"],
                 [(0, "a", "Lower Leg"), (1, "b", ""), (2, "c", "chest"), (3, "d", "discard")])
    assert read_image_labels(weak, regions) == {"a": "lower leg", "c": "thorax"}
    plain = write(tmp_path / "plain.csv", ["image_id", "label"], [("a", "hand"), ("a", "HAND")])
    assert read_image_labels(plain, regions) == {"a": "hand"}


@pytest.mark.parametrize(("rows", "message"), [
    ([("a", "lower leg"), ("b", "lowerleg")],
     r"labels.csv, line 3: 'lowerleg' looks like 'lower leg' but is not one of its spellings in "
     r"samx-regions; line 2 writes it 'lower leg'"),
    ([("a", "hnad")], r"line 2: 'hnad' is not a region of samx-regions; did you mean 'hand'\?"),
    ([("a", "hand"), ("a", "knee")], r"line 3: image a is labelled 'knee' but line 2 says 'hand'"),
    ([("", "hand")], r"line 2: label 'hand' without an image_id"),
    ([("a", "")], r"labels.csv: no image has a label"),
])
def test_bad_label_files(tmp_path, rows, message):
    path = write(tmp_path / "labels.csv", ["image_id", "label"], rows)
    with pytest.raises(LabelFileError, match=message):
        read_image_labels(path, entity_set("samx-regions"))


def test_a_cluster_labels_file_needs_its_run(tmp_path):
    path = write(tmp_path / "labels.csv", ["cluster", "size", "label"], [(0, 3, "hand")])
    with pytest.raises(LabelFileError, match="expected the columns image_id and label.*this is a "
                                             "cluster labels file: pass the DeepCluster run folder"):
        read_image_labels(path, entity_set("samx-regions"))


def test_cluster_labels_with_their_run_surface_labelling_errors(tmp_path):
    from msk.core.models.deepcluster import DeepClusterConfig

    data = labelled(6)
    ingest = fake_ingest(tmp_path / "ingest", data)
    run = tmp_path / "cluster"
    run.mkdir()
    (run / "config.yaml").write_text(DeepClusterConfig(k=3).to_yaml())
    np.save(run / "assignments.npy", np.array([0, 0, 1, 1, 2, 2]))
    write(run / "assignments.csv", ["row", "image_id", "cluster"],
          [(i, data.image_ids[i], i // 2) for i in range(6)])
    good = write(tmp_path / "labels.csv", ["cluster", "size", "label"],
                 [(0, 2, "hand"), (1, 2, "Hand"), (2, 2, "discard")])
    loaded = load_labelled(ingest, good, cluster_run=run)
    assert loaded.labels == ["hand"] * 4 and loaded.image_ids == data.image_ids[:4]
    twice = write(tmp_path / "twice.csv", ["cluster", "size", "label"],
                  [(0, 2, "lower leg"), (1, 2, "lower-leg")])
    with pytest.raises(LabelFileError, match="'lower-leg' looks like 'lower leg'"):
        load_labelled(ingest, twice, cluster_run=run)


def test_labels_of_images_not_in_the_ingest_output(tmp_path):
    data = labelled(6)
    ingest = fake_ingest(tmp_path / "ingest", data)
    labels = write(tmp_path / "labels.csv", ["image_id", "label"],
                   [(i, "hand") for i in [*data.image_ids[:2], "zz1", "zz2"]])
    with pytest.raises(TrainingDataError, match=r"labels 2 of 4 image\(s\) that are not in the ingest "
                                          r"output .*ingest: zz1, zz2; were the labels made for "
                                          r"another ingest\?"):
        load_labelled(ingest, labels)


def test_loading_joins_labels_to_images_by_id(tmp_path):
    data = labelled(6)
    ingest = fake_ingest(tmp_path / "ingest", data, patients=False)
    labels = write(tmp_path / "labels.csv", ["image_id", "label"],
                   [(data.image_ids[4], "knee"), (data.image_ids[1], "skull")])
    with pytest.warns(UserWarning, match="2 image\\(s\\) have no patient id"):
        loaded = load_labelled(ingest, labels)
    assert loaded.image_ids == [data.image_ids[1], data.image_ids[4]]  # ingest order
    assert loaded.labels == ["skull", "knee"]
    np.testing.assert_array_equal(loaded.images, data.images[[1, 4]])
    assert loaded.patient_ids == [f"image:{i}" for i in loaded.image_ids]


def test_holdout_sharing_patients_is_refused(tmp_path):
    data = labelled()
    with pytest.raises(SorterError, match="external hold-out memory shares patients"):
        train_sorter(data, fast(), out=tmp_path, holdout=data.subset([0, 1]), progress=False)


# -- unknown inputs ----------------------------------------------------------------------------


def out_of_fold_scores(out, score="mahalanobis"):
    """Each validation image scored by the fold model it validates (no image scores itself)."""
    from msk.core.models.ood import FeatureDensity, ood_score
    from msk.core.models.sorter import logits_and_features
    from msk.core.models.train import load_model

    data = labelled()
    fold_of = {r["image_id"]: r["val_fold"] for r in csv.DictReader((out / "splits.csv").open())}
    scores = []
    for k in (1, 2):
        val = [i for i, image_id in enumerate(data.image_ids) if fold_of[image_id] == str(k)]
        logits, features = logits_and_features(load_model(out / f"fold-{k}" / "best.pt")[0],
                                               data.images[val], 32)
        density = [FeatureDensity.load(out / f"fold-{k}" / "ood_density.npz")] if score == "mahalanobis" else None
        scores.append(ood_score(logits[None], score, fold_features=[features], densities=density))
    return np.concatenate(scores)


def test_feature_density_is_fitted_on_each_folds_training_images(run):
    from msk.core.models.ood import FeatureDensity
    from msk.core.models.sorter import logits_and_features
    from msk.core.models.train import load_model

    _, out = run
    data = labelled()
    splits = list(csv.DictReader((out / "splits.csv").open()))
    for k in (1, 2):
        train = [i for i, r in enumerate(splits) if r["part"] == "dev" and r["val_fold"] != str(k)]
        density = FeatureDensity.load(out / f"fold-{k}" / "ood_density.npz")
        _, features = logits_and_features(load_model(out / f"fold-{k}" / "best.pt")[0], data.images[train], 32)
        hands = [j for j, i in enumerate(train) if data.labels[i] == "hand"]  # class 0
        assert density.means.shape == (3, features.shape[1])
        np.testing.assert_allclose(density.means[0], features[hands].mean(axis=0), rtol=1e-4, atol=1e-5)


def test_threshold_keeps_ood_keep_of_the_validation_images(run):
    result, out = run
    saved = json.loads((out / "sorter.json").read_text())["unknown"]
    assert saved["score"] == "mahalanobis" and saved["keep"] == 0.95 and saved["n_images"] == 48
    scores = out_of_fold_scores(out)
    kept = (scores >= saved["threshold"]).mean()
    # at least 95 % of the 48 validation images kept, and no more than one image's worth above
    assert 0.95 <= kept <= 0.95 + 1 / 48 + 1e-9 and kept == pytest.approx(saved["kept"], abs=1e-4)
    assert np.isclose(scores, saved["threshold"], rtol=0, atol=1e-6).any()  # a validation score
    assert result.unknown.threshold == saved["threshold"]


class Fixed(torch.nn.Module):
    """A 'model' that gives every image the same logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits, dtype=torch.float32), requires_grad=False)

    def forward(self, images):
        return self.logits.expand(len(images), -1)


def test_below_the_threshold_is_unknown():
    from msk.core.models.ood import UnknownCalibration
    from msk.core.models.sorter import SorterEnsemble

    images = labelled(4).images
    uniform = [Fixed([0.0, 0.0, 0.0]), Fixed([1.0, 1.0, 1.0])]  # max softmax 1/3
    peaked = [Fixed([6.0, 0.0, 0.0]), Fixed([0.0, 0.0, 0.0])]  # mean softmax max ~0.66
    msp = UnknownCalibration("msp", 0.5, 0.95, 100, 0.95)
    assert SorterEnsemble(uniform, list(REGIONS), 32, msp).predict(images) == ["unknown"] * 4
    assert SorterEnsemble(peaked, list(REGIONS), 32, msp).predict(images) == ["hand"] * 4
    probs, scores = SorterEnsemble(peaked, list(REGIONS), 32, msp).predict_scores(images)
    assert scores == pytest.approx(probs.max(axis=1)) and scores[0] == pytest.approx(
        (np.exp(6) / (np.exp(6) + 2) + 1 / 3) / 2, rel=1e-5)
    # energy: mean over folds of logsumexp; uniform log(3) and 1 + log(3) -> 1.6, under 2.0
    energy = UnknownCalibration("energy", 2.0, 0.95, 100, 0.95)
    assert not SorterEnsemble(uniform, list(REGIONS), 32, energy).is_known(images).any()
    assert SorterEnsemble(peaked, list(REGIONS), 32, energy).is_known(images).all()
    # without a calibration (runs from before it) nothing is unknown, as before
    assert SorterEnsemble(uniform, list(REGIONS), 32).predict(images) == ["hand"] * 4


def test_sorter_json_round_trips_the_calibration(run, tmp_path):
    import shutil

    from msk.core.errors import ConfigError, MskError
    from msk.serve.config import SortConfig
    from msk.serve.sorter import load_sorter_model

    result, out = run
    assert load_sorter(out).unknown == result.unknown
    images = labelled(6, seed=4).images
    served = load_sorter_model(SortConfig(checkpoint=out))  # /v1/sort reads the same calibration
    assert served.unknown == result.unknown
    np.testing.assert_allclose(served.predict_scores(images)[1], load_sorter(out).predict_scores(images)[1])
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints", "ray"))
    info = json.loads((copy / "sorter.json").read_text())
    info["unknown"]["threshold"] = "high"
    (copy / "sorter.json").write_text(json.dumps(info))
    with pytest.raises(MskError, match=r"sorter.json: the 'unknown' calibration is unreadable .*rerun "
                                       r"`msk train sorter` on the run folder"):
        load_sorter(copy)
    info["unknown"]["threshold"] = -1.0
    (copy / "sorter.json").write_text(json.dumps(info))
    (copy / "fold-2" / "ood_density.npz").unlink()
    with pytest.raises(MskError, match=r"the mahalanobis score needs .*fold-2/ood_density.npz; rerun"):
        load_sorter(copy)
    with pytest.raises(ConfigError, match=r"sorter.checkpoint: the run .* lacks .*fold-2/ood_density.npz"):
        load_sorter_model(SortConfig(checkpoint=copy))


def test_rerun_calibrates_a_run_from_before_without_retraining(run, tmp_path):
    import shutil

    _, out = run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    info = json.loads((old / "sorter.json").read_text())
    del info["unknown"], info["ingest"]
    (old / "sorter.json").write_text(json.dumps(info))
    assert load_sorter(old).unknown is None
    mtimes = {p: p.stat().st_mtime_ns for p in old.rglob("*.pt")}
    again = train_sorter(labelled(), fast(ood_keep=0.8, ood_score="energy"), out=old, progress=False)
    assert all(f.skipped for f in again.folds)
    assert {p: p.stat().st_mtime_ns for p in old.rglob("*.pt")} == mtimes  # nothing retrained
    saved = json.loads((old / "sorter.json").read_text())["unknown"]
    assert saved["score"] == "energy" and saved["keep"] == 0.8 and 0.8 <= saved["kept"] < 0.85
    scores = out_of_fold_scores(old, "energy")
    assert (scores >= saved["threshold"]).mean() == pytest.approx(saved["kept"], abs=1e-4)


# -- msk sort ----------------------------------------------------------------------------------


def test_msk_sort_cli_on_a_png_and_a_non_image(run, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from msk.core.cli import app

    result, out = run
    image = labelled(6, seed=5).images[0]
    Image.fromarray(image).save(tmp_path / "scan.png")
    sorter = load_sorter(out)
    probs, scores = sorter.predict_scores(image[None])
    answer = CliRunner().invoke(app, ["sort", str(out), str(tmp_path / "scan.png"), "--k", "2", "--json"])
    assert answer.exit_code == 0, answer.output
    got = json.loads(answer.stdout)["images"][0]
    assert [r["name"] for r in got["regions"]] == [REGIONS[i] for i in np.argsort(-probs[0])[:2]]
    assert got["score"] == pytest.approx(scores[0], abs=1e-5) and got["threshold"] == result.unknown.threshold
    assert got["unknown"] == bool(scores[0] < result.unknown.threshold)
    text = CliRunner().invoke(app, ["sort", str(out), str(tmp_path / "scan.png")])
    verdict = "unknown" if got["unknown"] else got["regions"][0]["name"]
    assert text.exit_code == 0 and text.stdout.startswith(f"{tmp_path / 'scan.png'}: {verdict} (mahalanobis ")
    (tmp_path / "notes.txt").write_text("not an image")
    bad = CliRunner().invoke(app, ["sort", str(out), str(tmp_path / "notes.txt")])
    assert bad.exit_code == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'notes.txt'}: not_an_image: the file is neither DICOM nor PNG/JPEG"]
