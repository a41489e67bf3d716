"""The recommender: linkage, vote, save/load, refusals; the evaluation protocol end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msk.core.data.splits import PatientOverlapError
from msk.core.errors import ConfigError
from msk.core.io.manifest import shard_path, write_manifest_part
from msk.core.models.embed import embeddings_table
from msk.core.models.recommender import Neighbour, Recommendation, Recommender, RecommenderError
from msk.core.models.retrieval import IndexFileError, RetrievalError
from msk.core.stages.ingest.pipeline import SHARD_SCHEMA
from msk.core.stages.recommender.config import ClassifierSpec, EvalError, RecommenderEvalConfig
from msk.core.stages.recommender.data import load_eval_data, read_labels
from msk.core.stages.recommender.evaluation import evaluate_recommender, evaluate_split
from msk.core.stages.recommender.statistics import anova

ENTITIES = ["chondrosarcoma", "enchondroma", "osteochondroma"]


def archive_vectors(per_entity: int = 6, dim: int = 8, seed: int = 0):
    """Embeddings of three well separated entities; two images per patient."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:3] * 4
    x, labels, ids = [], [], {"image_id": [], "patient_id": [], "study_id": []}
    for e, entity in enumerate(ENTITIES):
        for i in range(per_entity):
            x.append(centres[e] + rng.normal(0, 0.3, dim))
            labels.append(entity)
            ids["image_id"].append(f"IMG-{e}-{i}")
            ids["patient_id"].append(f"PAT-{e}-{i // 2}")
            ids["study_id"].append(f"STU-{e}-{i // 2}")
    return embeddings_table(ids, np.array(x, np.float32)), labels, centres


@pytest.fixture
def recommender():
    table, labels, _ = archive_vectors()
    return Recommender.build(table, labels, retriever="flat", k=3)


def test_recommendations_carry_the_vote_and_the_linked_patients(recommender):
    _, _, centres = archive_vectors()
    recs = recommender.recommend(centres + 0.05, k=3)
    assert [r.entity for r in recs] == ENTITIES
    rec = recs[1]
    assert isinstance(rec, Recommendation) and rec.shares == {"enchondroma": 1.0}
    assert rec.confidence == 1.0 and len(rec.neighbours) == 3
    distances = [n.distance for n in rec.neighbours]
    assert distances == sorted(distances) and 0 <= distances[0] < 0.1
    for n in rec.neighbours:  # ids that open the previous patient's record, and nothing else
        assert n.patient_id == f"PAT-1-{int(n.image_id.rsplit('-', 1)[1]) // 2}"
        assert n.study_id == n.patient_id.replace("PAT", "STU") and n.entity == "enchondroma"
    assert {f.name for f in fields(Neighbour)} == {"patient_id", "study_id", "image_id", "distance", "entity"}
    assert json.dumps(rec.to_dict())  # JSON-ready for an endpoint
    assert recommender.entities == {e: 6 for e in ENTITIES}


def test_vote_shares_with_mixed_neighbours():
    table, labels, centres = archive_vectors()
    rec = Recommender.build(table, labels, retriever="flat", k=5)
    between = (centres[0] + centres[1]) / 2 + np.r_[0.2, 0, 0, 0, 0, 0, 0, 0]  # nearer entity 0
    [proposal] = rec.recommend(between)
    assert proposal.entity == "chondrosarcoma" and set(proposal.shares) == set(ENTITIES[:2])
    assert abs(sum(proposal.shares.values()) - 1) < 1e-9 and proposal.confidence >= 0.6


@pytest.mark.parametrize("kind", ["flat", "lsh", "hnsw"])
def test_save_and_load_give_the_same_recommendations(tmp_path, kind):
    table, labels, centres = archive_vectors()
    rec = Recommender.build(table, labels, retriever=kind, k=3,
                            retriever_options={"nbits": 64} if kind == "lsh" else None)
    rec.save(tmp_path / "rec")
    loaded = Recommender.load(tmp_path / "rec", expect_dim=8)
    assert loaded.k == 3 and loaded.index.kind == kind and len(loaded) == 18
    queries = centres + np.random.default_rng(1).normal(0, 0.5, centres.shape)
    assert loaded.recommend(queries) == rec.recommend(queries)
    meta = json.loads((tmp_path / "rec" / "recommender.json").read_text())
    assert meta["format_version"] == 1 and meta["dim"] == 8 and meta["retriever"] == kind


def test_load_refuses_what_does_not_fit(tmp_path, recommender):
    folder = recommender.save(tmp_path / "rec")
    with pytest.raises(RecommenderError, match="holds 8-d embeddings, but 64-d were expected"):
        Recommender.load(folder, expect_dim=64)
    with pytest.raises(RecommenderError, match="not a saved recommender"):
        Recommender.load(tmp_path / "nothing")

    records = pq.read_table(folder / "records.parquet")
    pq.write_table(records.take(list(range(len(records)))[::-1]), folder / "records.parquet")
    with pytest.raises(RecommenderError, match="does not match index.mskidx"):
        Recommender.load(folder)

    folder = recommender.save(tmp_path / "rec2")
    meta = json.loads((folder / "recommender.json").read_text())
    (folder / "recommender.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(RecommenderError, match="format 99.*upgrade msk"):
        Recommender.load(folder)

    folder = recommender.save(tmp_path / "rec3")
    data = bytearray((folder / "index.mskidx").read_bytes())
    data[-3] ^= 0xFF
    (folder / "index.mskidx").write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="corrupt"):
        Recommender.load(folder)


def test_loading_imports_neither_torch_nor_ray(tmp_path, recommender):
    folder = recommender.save(tmp_path / "rec")
    code = ("import sys; from msk.core.models.recommender import Recommender; "
            f"r = Recommender.load({str(folder)!r}); r.recommend([[1.0] + [0.0] * 7]); "
            "heavy = {'torch', 'ray'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_input_is_refused(recommender):
    table, labels, _ = archive_vectors()
    with pytest.raises(RetrievalError, match="dimension 5, but this flat index holds 8-d"):
        recommender.recommend(np.ones((1, 5)))
    with pytest.raises(RetrievalError, match="NaN"):
        recommender.recommend(np.full((1, 8), np.nan))
    with pytest.raises(RecommenderError, match="k=19 neighbours asked for, but the recommender holds only 18"):
        recommender.recommend(np.ones((1, 8)), k=19)
    with pytest.raises(RecommenderError, match="odd k"):
        recommender.recommend(np.ones((1, 8)), k=2)
    with pytest.raises(RecommenderError, match="zero embeddings"):
        Recommender.build(table.slice(0, 0), [], retriever="flat")
    with pytest.raises(RecommenderError, match="k=3 neighbours asked for, but the recommender holds only 2"):
        Recommender.build(table.slice(0, 2), labels[:2], retriever="flat", k=3)
    with pytest.raises(RecommenderError, match="1 of 18 images have no label .first: 'IMG-2-5'"):
        Recommender.build(table, dict(zip(table["image_id"].to_pylist()[:-1], labels)))
    with pytest.raises(RecommenderError, match="empty label"):
        Recommender.build(table, [""] + labels[1:], retriever="flat")

    x = np.ones((18, 8), np.float32)
    x[4, 2] = np.nan
    ids = {c: table[c].to_pylist() for c in ("image_id", "patient_id", "study_id")}
    with pytest.raises(RetrievalError, match="NaN or infinite values .first: row 4"):
        Recommender.build(embeddings_table(ids, x), labels, retriever="flat")
    ids["image_id"][1] = ids["image_id"][0]
    with pytest.raises(RetrievalError, match="duplicate id"):
        Recommender.build(embeddings_table(ids, np.ones((18, 8))), labels, retriever="flat")


def test_labels_from_a_column_and_inverse_frequency_weighting():
    table, labels, centres = archive_vectors()
    table = table.append_column("entity", pa.array(labels))
    rec = Recommender.build(table, "entity", retriever="flat", k=3, weighting="inverse_frequency")
    assert [r.entity for r in rec.recommend(centres)] == ENTITIES
    with pytest.raises(RecommenderError, match="no label column 'diagnosis'"):
        Recommender.build(table, "diagnosis")


# -- the evaluation protocol -------------------------------------------------------------------


def write_ingest(out, n_patients: int = 8, per_patient: int = 2, size: int = 48, seed: int = 0):
    """A committed ingest output written directly with the shard schema: a bright pattern per
    entity (horizontal bar, vertical bar, square) inside a lesion box somewhere in the image."""
    rng = np.random.default_rng(seed)
    rows, manifest, labels = [], [], []
    shard = shard_path(out, 0, 0)
    for p in range(n_patients * len(ENTITIES)):
        e = p % len(ENTITIES)
        for j in range(per_patient):
            image = rng.integers(0, 50, (size, size)).astype(np.uint8)
            x0, y0 = (int(v) for v in rng.integers(2, size - 18, 2))
            lesion = image[y0:y0 + 16, x0:x0 + 16]
            [lesion[6:10, :], lesion[:, 6:10], lesion[4:12, 4:12]][e][...] = 230
            image_id = f"SRC-{p:03d}-{j}"
            rows.append({"image_id": image_id, "image": image.tobytes(), "height": size,
                         "width": size, "source_height": size, "source_width": size,
                         "patient_id": f"PAT-{p:03d}", "study_id": f"STU-{p:03d}"})
            manifest.append({"path": f"{p}/{j}.dcm", "image_id": image_id, "status": "ok",
                             "shard": shard.relative_to(out).as_posix()})
            labels.append({"image_id": image_id, "entity": ENTITIES[e],
                           "x0": x0, "y0": y0, "x1": x0 + 16, "y1": y0 + 16})
    shard.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), shard)
    write_manifest_part(out, 0, manifest)
    return pd.DataFrame(labels)


def small_config(**kw) -> RecommenderEvalConfig:
    return RecommenderEvalConfig(**{
        "seeds": [0, 1], "image_size": 16, "ks": [1, 3], "k": 3, "gallery_queries": 4,
        "classifiers": [
            ClassifierSpec(name="cnn", encoder="tiny-cnn"),
            ClassifierSpec(name="vit", encoder="timm/vit_tiny_patch16_224",
                           encoder_options={"img_size": 16, "patch_size": 8, "depth": 1}),
        ],
        "training": {"epochs": 3, "batch_size": 8, "lr": 3e-3, "augment": False},
        "embeddings": ["cnn", "deepcluster"],
        "deepcluster": {"encoder": "tiny-cnn", "k": 4, "epochs": 1, "batch_size": 8},
        **kw})


@pytest.mark.usefixtures("one_torch_thread")
def test_evaluate_recommender_end_to_end(tmp_path):
    labels = write_ingest(tmp_path / "ingest")
    result = evaluate_recommender(tmp_path / "ingest", labels, tmp_path / "eval", small_config(),
                                  progress=False)
    out = tmp_path / "eval"
    models = ["cnn", "vit", "recommender[cnn] k=1", "recommender[cnn] k=3",
              "recommender[deepcluster] k=1", "recommender[deepcluster] k=3"]
    assert list(result.summary["model"]) == models and (result.summary["seeds"] == 2).all()
    assert len(result.results) == 12 and set(result.results["seed"]) == {0, 1}
    assert result.compared == ["cnn", "vit", "recommender[cnn] k=3", "recommender[deepcluster] k=3"]
    assert result.anova is not None and len(result.anova.pairs) == 6
    # an easy task: the fine-tuned CNN's features retrieve the right pattern
    cnn_vote = result.results.query("model == 'recommender[cnn] k=3'")["accuracy"]
    assert cnn_vote.mean() >= 0.6, cnn_vote
    rec_rows = result.results[result.results["kind"] == "recommender"]
    assert rec_rows["precision_at_k"].between(0, 1).all()

    splits = pd.read_csv(out / "splits.csv")
    for _, s in splits.groupby("seed"):  # patients never on both sides; ~20 % of them in test
        assert not set(s.query("split == 'train'")["patient_id"]) & set(s.query("split == 'test'")["patient_id"])
        assert s.query("split == 'test'")["patient_id"].nunique() == 5
    text = (out / "summary.md").read_text()
    assert "| recommender[cnn] k=3 |" in text and "Tukey HSD" in text and " ± " in text
    assert {p.name for p in (out / "confusion").iterdir()} == {
        "cnn.png", "vit.png", "recommender-cnn--k-3.png", "recommender-deepcluster--k-3.png"}
    page = (out / "gallery" / "index.html").read_text()
    assert page.count("<section>") == 4 and "PAT-" in page
    assert len(list((out / "gallery").glob("query-*.png"))) == 4
    assert pd.read_csv(out / "summary.csv").shape[0] == 6


def test_overlapping_patients_are_refused(tmp_path):
    labels = write_ingest(tmp_path / "ingest", n_patients=2)
    data = load_eval_data(tmp_path / "ingest", labels, image_size=16, roi=True)
    train, test = np.arange(0, 8), np.arange(7, 12)  # image 7's patient (PAT-003) is on both sides
    with pytest.raises(PatientOverlapError, match="1 patient.s. are in both.*PAT-003"):
        evaluate_split(data, train, test, small_config(), seed=0, out=tmp_path / "x")


def test_labels_and_config_are_checked(tmp_path):
    labels = write_ingest(tmp_path / "ingest", n_patients=2)
    with pytest.raises(EvalError, match="missing column.s. entity"):
        read_labels(labels.drop(columns="entity"))
    with pytest.raises(EvalError, match="appear twice"):
        read_labels(pd.concat([labels, labels.iloc[:1]]))
    with pytest.raises(EvalError, match="roi=True needs lesion boxes"):
        load_eval_data(tmp_path / "ingest", labels[["image_id", "entity"]], image_size=16, roi=True)
    with pytest.raises(EvalError, match="not in entity set 'bone-tumours'"):
        load_eval_data(tmp_path / "ingest", labels.assign(entity="cat"), image_size=16, roi=False,
                       entity_set="bone-tumours")
    with pytest.raises(EvalError, match="none of the 1 labelled images"):
        load_eval_data(tmp_path / "ingest", labels.iloc[:1].assign(image_id="SRC-nope"),
                       image_size=16, roi=False)
    with pytest.raises(ValueError, match="k=5 must be one of ks"):
        small_config(k=5)
    with pytest.raises(ValueError, match="odd k"):
        small_config(ks=[2, 3])
    with pytest.raises(ValueError, match="img_size=16 differs from image_size=32"):
        small_config(image_size=32)


def test_anova_matches_scipy():
    from scipy.stats import f_oneway, tukey_hsd

    groups = {"a": [0.50, 0.55, 0.52], "b": [0.70, 0.72, 0.69], "c": [0.51, 0.50, 0.56]}
    result = anova(groups)
    assert result.f_statistic == pytest.approx(f_oneway(*groups.values()).statistic)
    hsd = tukey_hsd(*groups.values())
    ab = result.pairs.query("model_a == 'a' and model_b == 'b'").iloc[0]
    assert ab.p_value == pytest.approx(hsd.pvalue[0, 1]) and ab.mean_difference == pytest.approx(-0.18)
    assert result.p_value < 0.001 and "Tukey HSD" in result.markdown()
    with pytest.raises(EvalError, match="at least two seeds"):
        anova({"a": [0.5], "b": [0.6]})
    constant = anova({"a": [0.5, 0.5], "b": [0.6, 0.6]})  # no variance within groups
    assert constant.f_statistic == np.inf and np.isnan(constant.pairs["p_value"]).all()


def test_config_loads_from_yaml(tmp_path):
    from msk.core.config import load_config

    path = tmp_path / "eval.yaml"
    path.write_text("seeds: [0]\nimage_size: 32\nclassifiers:\n  - {name: cnn, encoder: tiny-cnn}\n"
                    "embeddings: [cnn]\nretriever: lsh\n")
    config = load_config(RecommenderEvalConfig, path)
    assert config.classifiers[0].encoder == "tiny-cnn" and config.retriever == "lsh"
    with pytest.raises(ConfigError, match="classifiers.0.name"):
        load_config(RecommenderEvalConfig, None, classifiers=[{"name": "a b", "encoder": "x"}])
