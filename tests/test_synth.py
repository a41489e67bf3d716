"""``msk synth``: determinism, DICOM validity, ground truth, priors, streaming, region shapes."""

from __future__ import annotations

import csv
import warnings
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from msk.core.config import load_config
from msk.core.errors import ConfigError, QuarantineReason
from msk.core.registry import entity_set
from msk.core.specs import BonePosition
from msk.core.synth import COLUMNS, SynthConfig, plan_case, render_case, synthesize
from msk.core.synth import export as export_module
from msk.core.synth.cases import CORRUPTIONS, plan_lesion
from msk.core.synth.dicom_writer import stored_pixels
from msk.core.synth.phantoms import REGIONS, Body, can_host, find_anchor, host_anchor_names
from msk.core.synth.priors import BtxrdPriors

N = 220  # >= 200: at least one corrupt file of each kind


def small(**kw) -> SynthConfig:
    base = dict(n_images=N, seed=0, image_size=64, priors="defaults")
    return SynthConfig(**{**base, **kw})


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "a"
    report = synthesize(out, small(), progress=False)
    return report, read_rows(report.ground_truth)


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ({"transfer_syntaxes": ["jpeg-xl"]}, "unknown transfer syntax 'jpeg-xl'"),
    ({"lesion_fraction": 1.5}, "lesion_fraction"),
    ({"corrupt_fraction": -0.1}, "corrupt_fraction"),
    ({"monochrome1_fraction": 2}, "monochrome1_fraction"),
    ({"entity_set": "no-such-set"}, "no entity set named 'no-such-set'"),
    ({"entity_set": "samx-regions"}, "not a tumour set"),
    ({"entity_set": "btxrd"}, "no lesion drawing"),
    ({"region_set": "bone-tumours"}, "not a region set"),
    ({"images_per_patient": [3, 1]}, "images per patient"),
    ({"transfer_syntaxes": []}, "at least one transfer syntax"),
])
def test_bad_config_is_a_clear_error(tmp_path, override, message):
    with pytest.raises(ConfigError, match="invalid SynthConfig") as err:
        load_config(SynthConfig, None, **override)
    assert message in str(err.value)


def test_transfer_syntaxes_accept_keys_uids_and_names():
    cfg = SynthConfig(transfer_syntaxes=["1.2.840.10008.1.2.5", "Explicit VR Little Endian", "implicit"])
    assert cfg.transfer_syntaxes == ["rle", "explicit-le", "implicit-le"]
    assert {"explicit-le", "implicit-le", "deflated-le", "rle"} <= set(SynthConfig().transfer_syntaxes)


def test_config_round_trips_through_yaml(tmp_path, export):
    report, _ = export
    cfg = load_config(SynthConfig, report.out / "synth.yaml")
    assert cfg == small()


# -- determinism --------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_gives_identical_export_also_in_parallel(tmp_path, export):
    report, rows = export
    again = synthesize(tmp_path / "b", small(workers=2), progress=False)
    assert again.ground_truth.read_bytes() == report.ground_truth.read_bytes()
    for row in rows[::7]:
        if row["expected_status"] == "ok":
            a = pydicom.dcmread(report.out / row["path"]).pixel_array
            b = pydicom.dcmread(again.out / row["path"]).pixel_array
            assert np.array_equal(a, b), row["path"]


def test_other_seed_gives_other_export(export):
    _, rows = export
    other = [render_case(i, small(seed=1)) for i in range(4)]
    mine = [render_case(i, small()) for i in range(4)]
    assert [c.sop_uid for c in other] != [c.sop_uid for c in mine]
    assert {c.sop_uid for c in mine} <= {r["sop_uid"] for r in rows}
    assert not any(a.pixels is not None and b.pixels is not None and a.pixels.shape == b.pixels.shape
                   and np.array_equal(a.pixels, b.pixels) for a, b in zip(mine, other, strict=True))


def test_render_case_is_a_pure_function_of_seed_and_index():
    cfg = small(lesion_fraction=1.0)
    a, b = render_case(5, cfg), render_case(5, cfg)
    assert np.array_equal(a.pixels, b.pixels) and a.box == b.box and a.entity == b.entity
    assert render_case(5, cfg).relpath == plan_case(5, cfg).relpath
    with pytest.raises(IndexError):
        render_case(N, cfg)


# -- the files ----------------------------------------------------------------------------------


def test_counts_by_expected_status(export):
    report, rows = export
    status = Counter(r["expected_status"] for r in rows)
    assert len(rows) == report.n_files == N
    assert report.n_corrupt == N - status["ok"] == len(CORRUPTIONS)  # round(1% of 220) < 5 kinds
    assert status == Counter({"ok": N - 5, "corrupt": 2, "empty": 1, "not_an_image": 1, "no_pixel_data": 1})
    assert set(status) <= {"ok"} | {r.value for r in QuarantineReason}
    for row in rows:
        data = (report.out / row["path"]).read_bytes()
        if row["expected_status"] == "empty":
            assert data == b""
        elif row["expected_status"] == "not_an_image":
            assert b"DICM" not in data[:200]
        elif row["expected_status"] == "no_pixel_data":
            ds = pydicom.dcmread(report.out / row["path"])
            assert ds.Modality == "SR" and "PixelData" not in ds
        elif row["expected_status"] == "corrupt":  # cut short or PixelData too short
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = pydicom.dcmread(report.out / row["path"])
            if "PixelData" in ds:
                with pytest.raises(ValueError, match="less than expected"):
                    ds.pixel_array  # noqa: B018
            else:  # truncated inside encapsulated fragments: pydicom drops the element
                assert any("End of file" in str(w.message) for w in caught)


def test_every_ok_file_reads_back_with_the_rendered_pixels(export):
    report, rows = export
    seen = Counter()
    cfg = small()
    for i, row in enumerate(rows):
        if row["expected_status"] != "ok":
            continue
        ds = pydicom.dcmread(report.out / row["path"])
        arr = ds.pixel_array
        assert arr.shape == (ds.Rows, ds.Columns)
        assert ds.file_meta.TransferSyntaxUID == row["transfer_syntax"]
        assert ds.PhotometricInterpretation == row["photometric"]
        assert (ds.PatientID, ds.StudyInstanceUID, ds.SOPInstanceUID) == (
            row["patient_id"], row["study_uid"], row["sop_uid"])
        case = render_case(i, cfg)
        expected = case.pixels
        if row["photometric"] == "MONOCHROME1":  # stored inverted
            expected = (1 << ds.BitsStored) - 1 - expected
        assert np.array_equal(arr, expected), row["path"]
        assert np.array_equal(arr, stored_pixels(case))
        assert int(arr.max()) < 1 << ds.BitsStored
        seen[ds.file_meta.TransferSyntaxUID.name] += 1
        seen[ds.PhotometricInterpretation] += 1
        seen[f"bits{ds.BitsStored}"] += 1
    assert seen["MONOCHROME1"] > 0 and seen["MONOCHROME2"] > 0
    assert seen["bits12"] > 0 and seen["bits16"] > 0
    assert len([k for k in seen if "Endian" in k or "Lossless" in k]) >= 4


def test_ground_truth_columns_are_complete(export):
    report, rows = export
    assert tuple(rows[0]) == COLUMNS
    tumours = entity_set("bone-tumours")
    required = ("path", "patient_id", "study_uid", "sop_uid", "region", "age", "sex", "view",
                "modality", "sop_class", "transfer_syntax", "photometric")
    lesions = 0
    for row in (r for r in rows if r["expected_status"] == "ok"):
        assert all(row[c] for c in required), row
        assert row["region"] in REGIONS and row["modality"] in ("CR", "DX")
        assert row["view"] in ("AP", "PA", "LAT", "OBL") and row["sex"] in ("F", "M")
        assert 0 <= int(row["age"]) <= 100
        box = [row[k] for k in ("x0", "y0", "x1", "y1")]
        if row["entity"]:
            lesions += 1
            entity = tumours.get(row["entity"])
            assert row["malignancy"] == entity.malignancy.value and row["site"] == row["region"]
            assert row["position"] == "" or BonePosition(row["position"]) in entity.positions
            x0, y0, x1, y1 = map(int, box)
            ds = pydicom.dcmread(report.out / row["path"], stop_before_pixels=True)
            assert 0 <= x0 < x1 <= ds.Columns and 0 <= y0 < y1 <= ds.Rows
        else:
            assert box == ["", "", "", ""] and not row["malignancy"] and not row["site"]
    assert lesions == report.n_lesions and 0.2 < lesions / (N - report.n_corrupt) < 0.5
    assert sum(report.by_region.values()) == sum(report.by_syntax.values()) == N - report.n_corrupt


def test_every_lesion_has_its_mask_png(export):
    from msk.core.io.masks import load_mask

    report, rows = export
    with_mask = [r for r in rows if r["mask"]]
    assert with_mask and all(r["entity"] for r in with_mask)
    assert not any(r["mask"] for r in rows if not r["entity"])
    for row in with_mask:
        if row["expected_status"] != "ok":
            continue
        ds = pydicom.dcmread(report.out / row["path"], stop_before_pixels=True)
        mask = load_mask(report.out / row["mask"], (ds.Rows, ds.Columns))  # the image's size, not empty
        rows_, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert (cols[0], rows_[0], cols[-1] + 1, rows_[-1] + 1) == tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1"))


def test_patients_have_several_studies_and_consistent_identity(export):
    report, rows = export
    ok = [r for r in rows if r["expected_status"] == "ok"]
    by_patient: dict[str, list[dict]] = {}
    for r in ok:
        by_patient.setdefault(r["patient_id"], []).append(r)
    sizes = Counter(len(v) for v in by_patient.values())
    assert max(sizes) <= 4 and any(n > 1 for n in sizes)
    for images in by_patient.values():
        assert len({r["sex"] for r in images}) == 1
        assert len({r["entity"] for r in images}) == 1  # one tumour per patient, in every image
        assert len({Path(r["path"]).parts[1] for r in images}) == 1  # one patient folder
    assert any(len({r["study_uid"] for r in v}) > 1 for v in by_patient.values())


def test_lesion_box_is_the_extent_of_the_lesion_mask():
    cfg = small(lesion_fraction=1.0, corrupt_fraction=0.0, image_size=96)
    for i in range(12):
        case = render_case(i, cfg)
        assert case.mask is not None and case.mask.any()
        rows, cols = np.nonzero(case.mask)
        assert case.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


def test_lesions_sit_at_hostable_positions():
    cfg = small(lesion_fraction=1.0)
    tumours = entity_set("bone-tumours")
    for first in range(0, 400, 4):
        plan, demo = plan_lesion(first, cfg)
        entity = tumours.get(plan.entity.name)
        assert lo_hi(entity.age_range, demo.age)
        assert plan.anchor in host_anchor_names(plan.site, plan.position or entity.positions[0])
        if plan.position is not None:
            assert plan.position in entity.positions and can_host(plan.site, plan.position)
    for region, spec in REGIONS.items():  # every planned anchor exists in every anatomy variant
        for view in spec.views:
            for seed in range(6):
                body = Body(None, np.random.default_rng(seed), view, age=30)
                spec.draw(body)
                for position in BonePosition:
                    for name in host_anchor_names(region, position):
                        anchor = find_anchor(body.anchors, name, position)
                        assert anchor.hosts(position), (region, view, name)


def lo_hi(age_range, age) -> bool:
    return age_range[0] <= age <= age_range[1]


# -- priors -------------------------------------------------------------------------------------


def test_btxrd_priors_drive_age_sex_and_site(shared_data):
    csv_path = shared_data / "btxrd-meta" / "dataset.csv"
    if not csv_path.is_file():
        pytest.skip(f"BTXRD metadata not found at {csv_path}")
    btxrd = small(lesion_fraction=1.0, priors="btxrd", btxrd_csv=csv_path)
    defaults = small(lesion_fraction=1.0)
    real_ages = set(BtxrdPriors.load(csv_path).ages("osteosarcoma"))
    ages = {"btxrd": [], "defaults": []}
    sites = Counter()
    for first in range(3000):
        for name, cfg in (("btxrd", btxrd), ("defaults", defaults)):
            plan, demo = plan_lesion(first, cfg)
            if plan.entity.name == "osteosarcoma":
                ages[name].append(demo.age)
                if name == "btxrd":
                    sites[plan.site] += 1
    assert len(ages["btxrd"]) > 100
    assert set(ages["btxrd"]) <= real_ages  # every age is a real BTXRD osteosarcoma age
    assert max(ages["btxrd"]) > 30  # BTXRD has older osteosarcoma patients than the 10-30 prior
    assert all(10 <= a <= 30 for a in ages["defaults"])
    assert sites.most_common(1)[0][0] in ("femur", "lower leg", "knee")


def test_auto_priors_fall_back_to_defaults(tmp_path, monkeypatch):
    from msk.core.synth import priors

    monkeypatch.setattr(priors, "default_btxrd_csv", lambda: None)
    assert priors.resolve_priors("auto", None).source == "defaults"
    with pytest.raises(ConfigError, match="BTXRD metadata not found"):
        priors.resolve_priors("btxrd", None)


# -- streaming ----------------------------------------------------------------------------------


def test_generation_streams_one_file_at_a_time(tmp_path, monkeypatch):
    """Each case is rendered only after the previous row is on disk, and no case (or its
    pixels) outlives its row."""
    out = tmp_path / "stream"
    alive: list[weakref.ref] = []
    original = export_module.render_case

    def spy(index, config):
        rows_on_disk = (out / "ground_truth.csv").read_text().count("\n") - 1
        assert rows_on_disk == index
        assert sum(r() is not None for r in alive) <= 1
        case = original(index, config)
        alive.append(weakref.ref(case))
        return case

    monkeypatch.setattr(export_module, "render_case", spy)
    report = synthesize(out, small(n_images=30), progress=False)
    assert report.n_files == len(alive) == 30


def test_refuses_to_overwrite_an_export(tmp_path):
    cfg = small(n_images=3)
    synthesize(tmp_path, cfg, progress=False)
    with pytest.raises(ConfigError, match="already exists"):
        synthesize(tmp_path, cfg, progress=False)
    assert synthesize(tmp_path, cfg, progress=False, overwrite=True).n_files == 3


# -- the phantoms -------------------------------------------------------------------------------


def test_regions_are_distinguishable():
    """Nearest-centroid on 12x12 thumbnails of the full pipeline (rotation, zoom, flips,
    shutters, noise, markers) is far above the 1-in-28 chance level."""
    cfg = small(n_images=5000, seed=3, lesion_fraction=0.0, corrupt_fraction=0.0, image_size=48)
    per = 8
    chosen: dict[str, list[int]] = {}
    for i in range(cfg.n_images):
        indices = chosen.setdefault(plan_case(i, cfg).region, [])
        if len(indices) < per:
            indices.append(i)
        if len(chosen) == len(REGIONS) and all(len(v) == per for v in chosen.values()):
            break
    x, y = [], []
    for label, (_, indices) in enumerate(sorted(chosen.items())):
        for i in indices:
            x.append(_thumbnail(render_case(i, cfg)))
            y.append(label)
    x, y = np.array(x), np.array(y)
    train = np.tile(np.arange(per) < per // 2, len(REGIONS))
    centroids = np.stack([x[train & (y == k)].mean(0) for k in range(len(REGIONS))])
    pred = ((x[~train][:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    accuracy = (pred == y[~train]).mean()
    assert accuracy > 0.3, f"nearest-centroid accuracy {accuracy:.2f}"


def _thumbnail(case, size: int = 12) -> np.ndarray:
    a = case.pixels.astype(np.float32)
    h, w = a.shape
    side = max(h, w)
    square = np.zeros((side, side), np.float32)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = a
    t = np.asarray(Image.fromarray(square).resize((size, size), Image.BILINEAR)).ravel()
    return (t - t.mean()) / (t.std() + 1e-6)


# -- styles -------------------------------------------------------------------------------------


def _cases_of(region: str, cfg: SynthConfig, count: int) -> list:
    picked = [i for i in range(cfg.n_images) if plan_case(i, cfg).region == region][:count]
    return [render_case(i, cfg) for i in picked]


def test_both_styles_are_deterministic_and_differ():
    basic, real = small(n_images=40, style="basic"), small(n_images=40, style="radiograph")
    for i in (0, 7, 23):
        a, b = render_case(i, basic), render_case(i, real)
        assert np.array_equal(a.pixels, render_case(i, basic).pixels)
        assert np.array_equal(b.pixels, render_case(i, real).pixels)
        assert (a.region, a.view, a.patient.patient_id) == (b.region, b.view, b.patient.patient_id)
        assert a.pixels.shape != b.pixels.shape or not np.array_equal(a.pixels, b.pixels)


def test_radiograph_style_frames_like_real_films():
    """Knee films are often square crops around the joint; limb cassettes are turned and scanned
    onto black (a large share of pixels at one constant value); the basic style does neither."""
    cfg = small(n_images=2000, lesion_fraction=0.0, corrupt_fraction=0.0, image_size=64)
    knees = _cases_of("knee", cfg, 24)
    assert sum(c.pixels.shape[0] == c.pixels.shape[1] for c in knees) >= 4
    assert not any(c.pixels.shape[0] == c.pixels.shape[1]
                   for c in _cases_of("knee", cfg.model_copy(update={"style": "basic"}), 24))



def test_a_turned_cassette_is_scanned_onto_black():
    from msk.core.synth.radiograph import Framing, _film

    img = np.full((64, 48), 0.5, np.float32)
    _film(img, np.random.default_rng(0), Framing(64, 48, (0.4, 0.5), 1.0, 0.4, plate=0.4), None, None)
    assert max(img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]) < 0.05  # corners outside the cassette
    assert img[32, 24] > 0.3  # the film itself is kept
    black = img < 0.05
    assert any(0.05 < black[y].mean() < 0.95 and not black[y, 24] for y in range(64))  # slanted edges


def test_lesions_lie_inside_the_exposed_field(tmp_path):
    """A lesion near the film's edge widens the cassette to take it in; it used to be cut out of the
    black surround as a bright square patch (44 of 200 lesion images at 192 px, seed 3)."""
    from msk.core.io.dicom import read_image

    report = synthesize(tmp_path, SynthConfig(n_images=80, seed=3, image_size=192, lesion_fraction=1.0,
                                              corrupt_fraction=0.0), progress=False)
    rows = [r for r in csv.DictReader(report.ground_truth.open()) if r["entity"]]
    patches = []
    for r in rows:
        image = read_image(tmp_path / r["path"]).pixels
        h, w = image.shape
        x0, y0, x1, y1 = (int(float(r[k])) for k in ("x0", "y0", "x1", "y1"))
        ring = np.zeros(image.shape, bool)
        ring[max(y0 - 3, 0):min(y1 + 3, h), max(x0 - 3, 0):min(x1 + 3, w)] = True
        ring[y0:y1, x0:x1] = False
        if ring.any() and (image[ring] < 0.035).mean() > 0.3:  # the box's surround is the black outside
            patches.append(r["path"])
    assert len(rows) > 60 and patches == []
