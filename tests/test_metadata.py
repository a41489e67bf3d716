"""Metadata schema, encoder and loaders (BTXRD CSV, msk ingest shards, image join)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from msk.core.config import load_config
from msk.core.data.metadata import BTXRD_SITES, MetadataEncoder, MetadataSchema, join_images
from msk.core.data.roi import read_labelme
from msk.core.errors import ConfigError
from msk.core.io.clinical import CANONICAL_COLUMNS, MetadataError, read_btxrd, read_msk_metadata
from msk.plugins.entity_sets import btxrd


def frame(n: int = 4, **columns) -> pd.DataFrame:
    """A small canonical frame; keyword arguments replace whole columns."""
    base = {
        "image_id": [f"img{i}" for i in range(n)],
        "age": [10.0 + 10 * i for i in range(n)],
        "sex": ["M", "F"] * (n // 2) + ["M"] * (n % 2),
        "sites": [("femur",), ("tibia", "fibula"), ("humerus",), ("femur",)][:n],
        "view": ["frontal", "lateral", "oblique", None][:n],
    }
    base.update(columns)
    return pd.DataFrame(base)


def col(enc: MetadataEncoder, x: np.ndarray, name: str) -> np.ndarray:
    return x[:, enc.feature_names.index(name)]


# -- schema ---------------------------------------------------------------------------------------


def test_schema_defaults_and_yaml(tmp_path):
    s = MetadataSchema()
    assert s.sites == list(BTXRD_SITES) and s.age == "both" and s.unknown == "error"
    path = tmp_path / "schema.yaml"
    path.write_text("age: bins\nsites: [Femur, Lower_Leg]\n")
    loaded = load_config(MetadataSchema, path)
    assert loaded.age == "bins" and loaded.sites == ["femur", "lower leg"]


@pytest.mark.parametrize("bad", [{"age_bins": [0, 10, 10]}, {"age_bins": [5]},
                                 {"sites": ["femur", "Femur"]}, {"age": "log"}, {"sex": "other"}])
def test_schema_rejects_bad_values(tmp_path, bad):
    with pytest.raises(ConfigError):
        load_config(MetadataSchema, **bad)


# -- encoder layout -------------------------------------------------------------------------------


@pytest.mark.parametrize("age, n_age", [("continuous", 2), ("bins", 7), ("both", 8)])
def test_layout_groups_cover_every_column_once(age, n_age):
    enc = MetadataEncoder(MetadataSchema(age=age))
    cols = sorted(i for g in enc.feature_groups.values() for i in g)
    assert cols == list(range(enc.dim)) == list(range(len(enc.feature_names)))
    assert list(enc.feature_groups) == ["sex", "age", "site", "view"]
    assert len(enc.feature_groups["age"]) == n_age  # value and/or 6 bins, + age_missing
    assert len(enc.feature_groups["site"]) == 15 and len(enc.feature_groups["sex"]) == 1
    assert "age_missing" in enc.feature_names


def test_transform_encodes_each_block():
    df = frame()
    enc = MetadataEncoder().fit(df)
    x = enc.transform(df)
    assert x.dtype == np.float32 and x.shape == (4, enc.dim)
    assert col(enc, x, "sex_male").tolist() == [1, 0, 1, 0]
    ages = np.array([10, 20, 30, 40.0])
    np.testing.assert_allclose(col(enc, x, "age"), (ages - ages.mean()) / ages.std(), rtol=1e-6)
    assert col(enc, x, "age_10_20").tolist() == [1, 0, 0, 0]  # bins are [lo, hi)
    assert col(enc, x, "age_40_60").tolist() == [0, 0, 0, 1]
    assert x[:, enc.feature_groups["age"][1:-1]].sum(axis=1).tolist() == [1, 1, 1, 1]
    assert x[1, enc.feature_groups["site"]].sum() == 2  # tibia + fibula: multi-hot
    assert col(enc, x, "site_fibula").tolist() == [0, 1, 0, 0]
    assert x[3, enc.feature_groups["view"]].sum() == 0  # missing view: all zero
    assert col(enc, x, "view_oblique").tolist() == [0, 0, 1, 0]


def test_single_site_column_and_aliases_of_sex():
    df = frame(2, sex=["male", "F"]).drop(columns="sites").assign(site=["Femur", "hip_bone"])
    enc = MetadataEncoder().fit(df)
    x = enc.transform(df)
    assert col(enc, x, "site_femur").tolist() == [1, 0]
    assert col(enc, x, "site_hip bone").tolist() == [0, 1]
    assert col(enc, x, "sex_male").tolist() == [1, 0]


def test_top_age_bin_is_closed():
    enc = MetadataEncoder().fit(frame(2, age=[119.0, 120.0]))
    x = enc.transform(frame(2, age=[119.0, 120.0]))
    assert col(enc, x, "age_60_120").tolist() == [1, 1]


# -- documented edge cases -----------------------------------------------------------------------


def test_missing_age_is_imputed_with_training_median_and_flagged():
    enc = MetadataEncoder().fit(frame(4, age=[10.0, 12.0, 50.0, np.nan]))
    assert enc.age_median == 12.0
    x = enc.transform(frame(2, age=[np.nan, 50.0]))
    assert col(enc, x, "age_missing").tolist() == [1, 0]
    assert col(enc, x, "age_10_20").tolist() == [1, 0]  # the median's bin
    assert col(enc, x, "age")[0] == pytest.approx((12.0 - enc.age_mean) / enc.age_std)


@pytest.mark.parametrize("age", [-1.0, 121.0, 250.0])
def test_age_out_of_range_is_an_error_naming_the_row(age):
    enc = MetadataEncoder().fit(frame())
    with pytest.raises(MetadataError, match=rf"age outside \[0, 120\].*img1={age:g}"):
        enc.transform(frame(2, age=[30.0, age]))


def test_age_that_is_not_a_number_is_an_error():
    with pytest.raises(MetadataError, match="not a number in rows img0"):
        MetadataEncoder().fit(frame(2, age=["45Y", 20]))


def test_fit_needs_some_known_age():
    with pytest.raises(MetadataError, match="no row has a known age"):
        MetadataEncoder().fit(frame(2, age=[np.nan, np.nan]))


@pytest.mark.parametrize("sex", ["O", "X", None, ""])
def test_sex_outside_vocabulary_is_an_error(sex):
    enc = MetadataEncoder().fit(frame())
    with pytest.raises(MetadataError, match=r"sex must be M or F .*img1="):
        enc.transform(frame(2, sex=["F", sex]))


def test_unknown_site_is_an_error_by_default():
    enc = MetadataEncoder().fit(frame())
    with pytest.raises(MetadataError,
                       match=r"not in the vocabulary: skull\): img1='skull'.*unknown='ignore'"):
        enc.transform(frame(2, sites=[("femur",), ("skull",)]))


def test_site_never_seen_in_training_is_unknown_too():
    enc = MetadataEncoder().fit(frame())  # has no 'hand'
    with pytest.raises(MetadataError, match=r"never seen while fitting: hand\): img0='hand'"):
        enc.transform(frame(1, sites=[("hand",)]))


def test_unknown_site_ignored_gives_zero_columns_and_a_warning():
    enc = MetadataEncoder(MetadataSchema(unknown="ignore")).fit(frame())
    with pytest.warns(UserWarning, match=r"1 site value\(s\).*'skull'"):
        x = enc.transform(frame(2, sites=[("femur",), ("skull", "tibia")]))
    assert x[0, enc.feature_groups["site"]].sum() == 1
    assert x[1, enc.feature_groups["site"]].tolist() == [
        1.0 if w == "tibia" else 0.0 for w in enc.schema.sites]  # known sites still encoded


def test_unknown_view_follows_the_same_policy():
    enc = MetadataEncoder().fit(frame())
    with pytest.raises(MetadataError, match="view value"):
        enc.transform(frame(1, view=["axial"]))


def test_positions_block_is_off_by_default_and_explicit_when_on():
    assert not any(n.startswith("position_") for n in MetadataEncoder().feature_names)
    enc = MetadataEncoder(MetadataSchema(positions=True))
    df = frame(3).assign(position=["metaphysis", "Epi-Metaphysis", None])
    x = enc.fit(df).transform(df)
    block = x[:, enc.feature_groups["position"]]
    assert block.shape == (3, 5) and block.sum(axis=1).tolist() == [1, 1, 0]
    assert col(enc, x, "position_epi-metaphysis").tolist() == [0, 1, 0]
    with pytest.raises(MetadataError, match="no 'position' column"):
        enc.transform(frame(3))
    with pytest.raises(MetadataError, match="position outside"):
        enc.transform(frame(1).assign(position=["shaft"]))


def test_transform_needs_fit_and_state_round_trips(tmp_path):
    enc = MetadataEncoder(MetadataSchema(age="continuous"))
    with pytest.raises(MetadataError, match="not fitted"):
        enc.transform(frame())
    enc.fit(frame())
    loaded = MetadataEncoder.load(enc.save(tmp_path / "encoder.json"))
    np.testing.assert_array_equal(loaded.transform(frame()), enc.transform(frame()))
    assert loaded.feature_groups == enc.feature_groups


# -- BTXRD loader on the real CSV ----------------------------------------------------------------


@pytest.fixture(scope="module")
def btxrd_dir(shared_data):
    path = shared_data / "btxrd-meta"
    if not (path / "dataset.csv").is_file():
        pytest.skip(f"BTXRD metadata not found in {path}")
    return path


def test_read_btxrd_real(btxrd_dir):
    df = read_btxrd(btxrd_dir / "dataset.csv")
    assert list(df.columns) == list(CANONICAL_COLUMNS) and len(df) == 1635
    assert set(df["center"]) == {"1", "2"} and set(df["sex"]) == {"M", "F"}
    assert set(df["entity"]) == set(btxrd.names)
    assert df["sites"].map(len).min() >= 1
    assert (df["site"] == df["sites"].map(lambda s: s[0])).all()
    row = df.set_index("image_id").loc["IMG001276.jpeg"]  # flags two entities in the CSV
    assert row["entity"] == "synovial osteochondroma"
    x = MetadataEncoder().fit(df).transform(df)
    assert x.shape == (1635, 27) and np.isfinite(x).all()


def test_btxrd_entity_matches_every_annotation_label(btxrd_dir):
    df = read_btxrd(btxrd_dir / "dataset.csv")
    for image_id, entity in zip(df["image_id"], df["entity"]):
        labels = read_labelme(btxrd_dir / "annotations" / f"{image_id[:-5]}.json").labels
        assert labels == {entity}, image_id


def test_btxrd_pseudo_patient_groups(btxrd_dir):
    df = read_btxrd(btxrd_dir / "dataset.csv")
    per_image = read_btxrd(btxrd_dir / "dataset.csv", grouping="image")
    assert per_image["patient_group"].nunique() == 1635
    n_groups = df["patient_group"].nunique()
    assert 900 < n_groups < 1100  # about 40 % of images share a pseudo-patient
    groups = df.assign(number=df["image_id"].str[3:9].astype(int)).groupby("patient_group")
    assert (groups[["age", "sex", "site", "entity", "center"]].nunique() == 1).all().all()
    span = groups["number"].max() - groups["number"].min() + 1
    assert (span == groups.size()).all()  # consecutive image numbers


def _btxrd_csv(path, rows):
    cols = ["image_id", "center", "age", "gender", *BTXRD_SITES, "tumor", "benign", "malignant",
            *btxrd.names, "upper limb", "lower limb", "pelvis", "frontal", "lateral", "oblique"]
    records = []
    for image_id, entities in rows:
        r = dict.fromkeys(cols, 0)
        r.update({"image_id": image_id, "center": 1, "age": 30, "gender": "F", "femur": 1,
                  "tumor": int(bool(entities)), "frontal": 1})
        r.update(dict.fromkeys(entities, 1))
        records.append(r)
    pd.DataFrame(records, columns=cols).to_csv(path, index=False)
    return path


def test_read_btxrd_errors(tmp_path):
    with pytest.raises(MetadataError, match="no such file"):
        read_btxrd(tmp_path / "absent.csv")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(MetadataError, match="missing columns"):
        read_btxrd(tmp_path / "other.csv")
    csv = _btxrd_csv(tmp_path / "two.csv", [("IMG000001.jpeg", ["osteochondroma", "osteosarcoma"])])
    with pytest.raises(MetadataError,
                       match=r"several entity flags.*IMG000001.jpeg \(osteochondroma \+ osteosarc"):
        read_btxrd(csv)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "IMG000001.json").write_text(json.dumps(
        {"shapes": [{"label": "osteosarcoma", "points": [[0, 0], [1, 1]],
                     "shape_type": "rectangle"}], "imageWidth": 4, "imageHeight": 4}))
    assert read_btxrd(csv)["entity"].tolist() == ["osteosarcoma"]


def test_read_btxrd_normal_rows_have_no_entity_and_tumour_rows_need_one(tmp_path):
    csv = _btxrd_csv(tmp_path / "normal.csv",
                     [("IMG000001.jpeg", []), ("IMG000002.jpeg", ["other mt"])])
    entity = read_btxrd(csv)["entity"]
    assert entity.isna().tolist() == [True, False] and entity[1] == "other mt"
    raw = pd.read_csv(csv)
    raw.loc[0, "tumor"] = 1
    raw.to_csv(csv, index=False)
    with pytest.raises(MetadataError, match="tumour rows without an entity flag: IMG000001.jpeg"):
        read_btxrd(csv)


# -- msk ingest shards -------------------------------------------------------------------------


def _shard(path, **overrides):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = {
        "image_id": ["a", "b", "c"], "image": [b"", b"", b""],
        "patient_id": ["p1", "p1", None], "age_years": [34.5, None, 7.0],
        "patient_sex": ["F", "M", "M"], "body_part": ["CHEST", "Knee", "L_SPINE"],
        "view_position": ["PA", "LL", "XYZ"],
    }
    data.update(overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(data), path)


def test_read_msk_metadata(tmp_path):
    _shard(tmp_path / "shards" / "part-000000-000.parquet")
    df = read_msk_metadata(tmp_path / "shards")
    assert list(df.columns) == list(CANONICAL_COLUMNS)
    assert df["site"].tolist() == ["thorax", "knee", "lumbar spine"]  # aliases of samx-regions
    assert df["view"].tolist()[:2] == ["frontal", "lateral"] and pd.isna(df["view"][2])
    assert df["patient_group"].tolist() == ["p1", "p1", "c"]  # no patient id: its own group
    assert df["age"].isna().tolist() == [False, True, False]
    samx = MetadataSchema(sites=["thorax", "knee", "lumbar spine"])
    x = MetadataEncoder(samx).fit(df).transform(df)
    assert x.shape == (3, 1 + 8 + 3 + 3)


def test_read_msk_metadata_errors(tmp_path):
    with pytest.raises(MetadataError, match="no Parquet shards"):
        read_msk_metadata(tmp_path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image_id": ["a"], "age_years": [3.0]}), tmp_path / "x.parquet")
    with pytest.raises(MetadataError,
                       match=r"lack columns \['patient_sex', 'body_part', 'view_position'\]"):
        read_msk_metadata(tmp_path)


# -- joining to images ---------------------------------------------------------------------------


def test_join_images_orders_by_image_and_refuses_orphans():
    meta = frame(4)
    joined = join_images(meta, ["img2", "img0", "img1", "img3"])
    assert joined["image_id"].tolist() == ["img2", "img0", "img1", "img3"]
    assert joined["age"].tolist() == [30.0, 10.0, 20.0, 40.0]
    with pytest.raises(MetadataError, match=r"2 of 4 metadata rows match no image: img1, img3"):
        join_images(meta, ["img0", "img2"])
    with pytest.warns(UserWarning, match="dropped 2 metadata rows"):
        kept = join_images(meta, ["img0", "img2"], strict=False)
    assert kept["image_id"].tolist() == ["img0", "img2"]
    with pytest.warns(UserWarning, match="1 of 5 images have no metadata row"):
        assert len(join_images(meta, ["img0", "img1", "img2", "img3", "img9"])) == 4


def test_join_images_rejects_duplicates():
    with pytest.raises(MetadataError, match="several rows for image ids img0"):
        join_images(pd.concat([frame(2), frame(1)]), ["img0", "img1"])
    with pytest.raises(MetadataError, match="duplicate image ids: img0"):
        join_images(frame(1), ["img0", "img0"])
