"""The predicted lesion mask as a DICOM Segmentation object (highdicom), read back with highdicom,
and `msk segment` on files: PNG masks in the files' pixels, segment.csv, SEGs for DICOM files."""

from __future__ import annotations

import csv
import json
import shutil
import warnings

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from msk.core.errors import ConfigError, MskError
from msk.core.io.dicom_seg import DicomSegError, write_dicom_seg

from test_ingest import write_dicom  # tests/ is on sys.path (rootdir conftest)
from test_segmentation import fake_ingest, small

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def blob(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """An irregular lesion: a disc and a bar, so that a flipped or shifted mask differs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    cy, cx, r = rows * rng.uniform(0.3, 0.6), cols * rng.uniform(0.3, 0.6), min(rows, cols) * 0.15
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    mask[int(cy):int(cy) + 3, int(cx):int(cx + 2 * r)] = True
    return mask


def read_back(path, source):
    """``(seg, mask)``: the SEG read by highdicom and its segment 1 on the source's pixels."""
    seg = hd.seg.segread(path)
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])
    return seg, pixels[0, ..., 0] > 0


def check_seg(path, source, mask, label="lesion"):
    seg, back = read_back(path, source)
    assert np.array_equal(back, mask)
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns) and seg.SOPClassUID == SEG_STORAGE
    assert seg.get_source_image_uids() == [(source.StudyInstanceUID, source.SeriesInstanceUID,
                                            source.SOPInstanceUID)]
    assert seg.StudyInstanceUID == source.StudyInstanceUID  # shown with its study in a PACS
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID and seg.SOPInstanceUID != source.SOPInstanceUID
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == label and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Neoplasm"
    assert seg.SegmentationType == "BINARY" and seg.ContentQualification == "RESEARCH"
    return seg


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_seg_of_pydicom_images_reads_back(tmp_path, name):
    path = get_testdata_file(name)
    source = pydicom.dcmread(path)
    mask = blob(source.Rows, source.Columns)
    out = write_dicom_seg(path, mask, tmp_path / "x" / "lesion.seg.dcm", algorithm="msk unet:resnet34",
                          parameters={"threshold": 0.5})
    seg = check_seg(out, source, mask)
    assert seg.PatientID == source.PatientID and seg.PatientName == source.PatientName  # documented: PHI copied
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "msk unet:resnet34" and "threshold" in algorithm.AlgorithmParameters
    # a Dataset works too and is left as it was
    before = pydicom.dcmread(path)
    again = write_dicom_seg(before, ~mask, tmp_path / "inverse.seg.dcm", label="not the lesion")
    check_seg(again, source, ~mask, label="not the lesion")
    assert before == source


@pytest.mark.shared_data
def test_seg_of_a_real_radiograph(tmp_path, shared_data):
    from msk.core.io.dicom import read_image

    path = shared_data / "dicom-hip-dx" / "dicoms" / "xray" / "331_DDH_1.dcm"  # CR, JPEG 2000, RGB
    source = pydicom.dcmread(path)
    assert "PatientBirthDate" not in source  # a type 2 attribute this archive dropped
    assert read_image(path).pixels.shape == (source.Rows, source.Columns)  # msk's pixels are the SEG's
    mask = blob(source.Rows, source.Columns, seed=3)
    seg = check_seg(write_dicom_seg(path, mask, tmp_path / "hip.seg.dcm"), source, mask)
    assert seg.PatientBirthDate == "" and seg.PatientID == source.PatientID
    assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]  # a projection: no geometry


def test_bad_inputs_are_one_line_errors(tmp_path):
    ct = get_testdata_file("CT_small.dcm")
    source = pydicom.dcmread(ct)
    mask = blob(128, 128)
    png = tmp_path / "knee.png"
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(png)
    with pytest.raises(DicomSegError, match=r"knee\.png: a PNG image, not DICOM: .*write the PNG mask instead"):
        write_dicom_seg(png, mask, tmp_path / "a.seg.dcm")
    with pytest.raises(DicomSegError, match=r"CT_small\.dcm: the mask is 100x128 \(width x height\) but the image "
                                            r"is 128x128 \(Columns x Rows\)"):
        write_dicom_seg(ct, mask[:, :100], tmp_path / "a.seg.dcm")
    with pytest.raises(DicomSegError, match=r"CT_small\.dcm: the mask is empty \(no lesion pixel\)"):
        write_dicom_seg(ct, np.zeros((128, 128), bool), tmp_path / "a.seg.dcm")
    with pytest.raises(DicomSegError, match="float32, not a binary mask; threshold"):
        write_dicom_seg(ct, mask.astype(np.float32), tmp_path / "a.seg.dcm")
    frames = pydicom.dcmread(ct)
    frames.NumberOfFrames = 3
    with pytest.raises(DicomSegError, match=r"scan-7: multi-frame image \(3 frames\)"):
        write_dicom_seg(frames, mask, tmp_path / "a.seg.dcm", where="scan-7")
    no_uid = pydicom.dcmread(ct)
    del no_uid.SOPInstanceUID
    with pytest.raises(DicomSegError, match="DICOM object without SOPInstanceUID"):
        write_dicom_seg(no_uid, mask, tmp_path / "a.seg.dcm")
    seg = write_dicom_seg(ct, mask, tmp_path / "ok.seg.dcm")
    with pytest.raises(DicomSegError, match="is a DICOM Segmentation itself"):
        write_dicom_seg(seg, mask, tmp_path / "a.seg.dcm")
    assert not (tmp_path / "a.seg.dcm").exists() and issubclass(DicomSegError, MskError)
    assert np.array_equal(read_back(seg, source)[1], mask)
    with pytest.raises(DicomSegError, match="a segment label has 1 to 64 characters"):
        write_dicom_seg(ct, mask, tmp_path / "a.seg.dcm", label=" ")


def test_no_patient_name_reaches_a_warning(tmp_path):
    image = np.full((32, 32), 200, np.uint16)
    source = write_dicom(tmp_path / "IM1", image, name="Jane Roe")  # a one-component name: highdicom warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = write_dicom_seg(source, blob(32, 32), tmp_path / "IM1.seg.dcm")
    assert not [w for w in caught if "Jane Roe" in str(w.message)]
    assert pydicom.dcmread(out).PatientName == "Jane Roe"  # the SEG belongs to its patient


# -- msk segment -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter_run(tmp_path_factory):
    """A tiny finished `msk train segmenter` run (2 folds, 1 epoch, 32 px)."""
    import torch

    from msk.core.stages.segmentation.training import load_segmentation_data, train_segmenter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("segmenter")
    ingest, table, _ = fake_ingest(root)
    train_segmenter(load_segmentation_data(ingest, table), small(epochs=1), out=root / "run")
    torch.set_num_threads(threads)
    return root / "run"


def lesion_image(rows: int, cols: int, box: tuple[int, int, int, int], bright: float, dark: float) -> np.ndarray:
    x0, y0, x1, y1 = box
    image = np.full((rows, cols), dark, np.float64)
    image[y0:y1, x0:x1] = bright
    return image


@pytest.fixture
def bright_is_lesion(monkeypatch):
    """The ensemble's lesion probability is the image's brightness: known lesions, exact boxes."""
    from msk.core.models.segmenter import SegmenterEnsemble

    monkeypatch.setattr(SegmenterEnsemble, "probabilities", lambda self, images: images.astype(np.float32) / 255)


def test_segmenter_json_records_how_images_were_squared(segmenter_run, tmp_path):
    from msk.core.stages.segmentation.segmenting import segment_preprocess

    info = json.loads((segmenter_run / "segmenter.json").read_text())
    assert info["ingest"]["image_size"] == info["image_size"] == 32
    assert segment_preprocess(segmenter_run).image_size == 32
    old = tmp_path / "old"  # a run from before the record, whose ingest folder is gone: image_size + pad
    old.mkdir()
    info.pop("ingest")
    info["source"] = str(tmp_path / "gone")
    (old / "segmenter.json").write_text(json.dumps({**info, "image_size": 64}))
    assert (segment_preprocess(old).image_size, segment_preprocess(old).resize) == (64, "pad")
    ingest = tmp_path / "ingest128"
    ingest.mkdir()
    (ingest / "ingest.json").write_text(json.dumps({"config": {"image_size": 128, "resize": "stretch"}}))
    with pytest.raises(ConfigError, match="its images are 128 px but the segmenter .* 32 px images"):
        segment_preprocess(segmenter_run, ingest)


def test_find_images_names_outputs_uniquely(tmp_path):
    from msk.core.stages.segmentation.segmenting import find_images

    for folder in ("a", "b"):
        write_dicom(tmp_path / "scans" / folder / "IM1.dcm", np.zeros((8, 8), np.uint16))
    write_dicom(tmp_path / "scans" / "1.2.840.5", np.zeros((8, 8), np.uint16))  # named by UID, no suffix
    (tmp_path / "scans" / "notes.txt").write_text("not an image")
    (tmp_path / "scans" / ".hidden.dcm").write_bytes(b"")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "IM1.png")
    found, notes = find_images([tmp_path / "scans", tmp_path / "IM1.png", tmp_path / "missing.dcm"])
    assert [name for _, name in found] == ["1.2.840.5", "a/IM1", "b/IM1", "IM1", "missing"]
    assert notes == [f"{tmp_path / 'scans'}: 1 file(s) that are not images were skipped"]
    found, _ = find_images([tmp_path / "scans" / "a", tmp_path / "scans" / "b"])
    assert [name for _, name in found] == ["IM1", "IM1-2"]


def test_cli_segment_writes_masks_table_and_seg(segmenter_run, tmp_path, bright_is_lesion):
    from typer.testing import CliRunner

    from msk.core.cli import app
    from msk.core.io.masks import load_mask

    scans = tmp_path / "scans"
    dcm = write_dicom(scans / "knee.dcm", lesion_image(48, 36, (8, 10, 20, 22), 4000, 300).astype(np.uint16))
    png = scans / "hand.png"
    Image.fromarray(lesion_image(30, 50, (30, 4, 44, 12), 250, 20).astype(np.uint8)).save(png)
    dark = scans / "dark.png"
    Image.fromarray(np.full((40, 40), 30, np.uint8)).save(dark)
    bad = scans / "notes.dcm"
    bad.write_text("Patient: Doe^Jane -- not an image\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["segment", str(segmenter_run), str(dcm), str(png), str(dark), str(bad),
                                      "--out", str(out), "--dicom-seg"])
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert [ln for ln in lines if str(bad) in ln] == [f"{bad}: unreadable: not_an_image: neither DICOM nor "
                                                      "PNG/JPEG/BMP/TIFF (starts with b'Patient:')"]
    assert [ln for ln in lines if str(dark) in ln] == [
        f"{dark}: no_lesion: no lesion found: no pixel reaches the segmenter's threshold 0.5 (highest lesion "
        "probability 0.118)"]
    assert "4 file(s): 2 with a lesion, 1 without, 1 unreadable" in result.output
    with (out / "segment.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["file"], r["status"]) for r in rows] == [(str(dcm), "ok"), (str(png), "ok"),
                                                        (str(dark), "no_lesion"), (str(bad), "unreadable")]
    knee, hand = rows[0], rows[1]
    for row, shape, box in ((knee, (48, 36), (8, 10, 20, 22)), (hand, (30, 50), (30, 4, 44, 12))):
        mask = load_mask(out / row["mask"], shape)  # the file's own pixels
        assert all(abs(int(row[k]) - v) <= 1 for k, v in zip(("x0", "y0", "x1", "y1"), box)), (row, box)
        assert abs(int(row["lesion_pixels"]) - (box[2] - box[0]) * (box[3] - box[1])) <= 0.2 * mask.sum()
        assert int(row["lesion_pixels"]) == mask.sum() and row["threshold"] == "0.5"
    assert knee["seg"] == "knee.seg.dcm" and hand["seg"] == "" and hand["reason"].startswith("not DICOM")
    assert rows[2]["mask"] == "" and not (out / "dark.mask.png").exists()
    source = pydicom.dcmread(dcm)
    seg = check_seg(out / "knee.seg.dcm", source, load_mask(out / "knee.mask.png"))
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "msk unet:tu-resnet10t"

    # --threshold: lower than the dark image's brightness finds its "lesion"; only DICOMs get a SEG
    result = CliRunner().invoke(app, ["segment", str(segmenter_run), str(dark), "--out", str(out / "low"),
                                      "--threshold", "0.1"])
    assert result.exit_code == 0, result.output
    assert load_mask(out / "low" / "dark.mask.png").all()
    result = CliRunner().invoke(app, ["segment", str(segmenter_run), str(dark), "--out", str(out), "--threshold", "1"])
    assert isinstance(result.exception, ConfigError) and "threshold" in str(result.exception)


def test_cli_segment_runs_the_trained_ensemble(segmenter_run, tmp_path, one_torch_thread):
    from typer.testing import CliRunner

    from msk.core.cli import app
    from msk.core.io.masks import load_mask

    scans = tmp_path / "scans"
    write_dicom(scans / "a" / "IM1", lesion_image(40, 28, (8, 12, 18, 24), 3500, 400).astype(np.uint16))
    shutil.copy(get_testdata_file("MR_small.dcm"), scans / "MR_small.dcm")
    out = tmp_path / "out"
    # a threshold no 1-epoch network stays under everywhere: the lesion is a large region
    result = CliRunner().invoke(app, ["segment", str(segmenter_run), str(scans), "--out", str(out),
                                      "--dicom-seg", "--threshold", "0.000001"])
    assert result.exit_code == 0, result.output
    with (out / "segment.csv").open() as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    assert set(rows) == {str(scans / "a" / "IM1"), str(scans / "MR_small.dcm")}
    for path, shape in ((scans / "a" / "IM1", (40, 28)), (scans / "MR_small.dcm", (64, 64))):
        row = rows[str(path)]
        assert row["status"] == "ok" and load_mask(out / row["mask"], shape).sum() == int(row["lesion_pixels"])
        check_seg(out / row["seg"], pydicom.dcmread(path), load_mask(out / row["mask"]))
    assert rows[str(scans / "a" / "IM1")]["seg"] == "a/IM1.seg.dcm"


def test_cli_segment_refuses_inputs_without_images(segmenter_run, tmp_path):
    from typer.testing import CliRunner

    from msk.core.cli import app

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("no images here")
    result = CliRunner().invoke(app, ["segment", str(segmenter_run), str(tmp_path / "docs"), "--out",
                                      str(tmp_path / "out")])
    assert isinstance(result.exception, MskError) and "no image files to segment" in str(result.exception)
    result = CliRunner().invoke(app, ["segment", "--help"])
    assert result.exit_code == 0 and "Example" in result.output and "--dicom-seg" in result.output
