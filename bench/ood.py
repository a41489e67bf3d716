"""Does the sorter say ``unknown`` to images that are not musculoskeletal radiographs?

In-distribution: the test split of a small sorter trained on ``real-xr`` (1,258 real
radiographs, 9 regions; the patient-level split of ``msk train sorter``, where every real-xr
group holds one file, so image level = group level). Out-of-distribution, all shipped inside
installed packages or the shared data, nothing downloaded:

* the DICOM test files of pydicom (``pydicom.data.get_testdata_files()``) whose header
  ``Modality`` is not a radiograph (CR, DX, RG, MG, IO, PX are left out), one per
  SOPInstanceUID (pydicom holds the same image in several transfer syntaxes);
* the XA cine ``fo-dicom/HasFragmentSequence.dcm`` of ``../shared/data/dicom``;
* photos and graphics: matplotlib's sample data, scikit-learn's sample images, scikit-image's
  data files.

Every file goes through ``/v1/sort``'s decoder (:func:`msk.serve.inputs.decode_radiograph`)
at the ingest's size. Printed: AUROC (in vs out) and the share kept at the calibrated
threshold (in and out) for msk's default score (Mahalanobis distance on the fold models'
features), the ensemble's max softmax and energy, and one fold model alone (the plain
baseline), then the share kept per kind of OOD input.

    MSK_PSEUDONYM_KEY=... OMP_NUM_THREADS=2 python bench/ood.py --fresh   # tiny-cnn, 64 px, 3 folds x 6 epochs: ~7 min

The ingest (``--ingest``, made with ``msk ingest`` when missing) and the sorter run (``--run``)
are reused when present; ``--fresh`` trains again.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MSK_SHARED_DATA", REPO.parent / "shared" / "data"))
RADIOGRAPHS = {"CR", "DX", "RG", "MG", "IO", "PX"}


def real_xr_labels(real_xr: Path, ingest: Path) -> Path:
    """``image_id,label`` for the ingest of real-xr: manifest ``path`` -> ``image_id`` joined
    to ``labels.csv`` ``path`` -> ``region`` (both relative to real-xr/)."""
    import pandas as pd

    from msk.core.io.manifest import read_manifest

    manifest = read_manifest(ingest, columns=["path", "image_id", "status"]).to_pandas()
    labels = pd.read_csv(real_xr / "labels.csv")
    joined = manifest[manifest["status"] == "ok"].merge(labels, on="path", how="inner")
    path = ingest / "bench_ood_labels.csv"
    joined[["image_id", "region"]].rename(columns={"region": "label"}).to_csv(path, index=False)
    print(f"labels: {len(joined)} of {len(labels)} real-xr images joined to the ingest ({path})")
    return path


def ood_files() -> list[tuple[str, str, str]]:
    """``(kind, path, identity)`` of every out-of-distribution candidate file; files of one
    identity (a DICOM SOPInstanceUID) are one image in several encodings."""
    import matplotlib
    import pydicom
    import skimage
    import sklearn
    from pydicom.data import get_testdata_files

    files: list[tuple[str, str, str]] = []
    for path in sorted(get_testdata_files()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - pydicom's deliberately broken test files
            continue
        modality, uid = str(ds.get("Modality", "") or ""), str(ds.get("SOPInstanceUID", "") or path)
        if modality and modality not in RADIOGRAPHS:
            files.append((f"DICOM {modality} (pydicom)", path, uid))
    xa = SHARED / "dicom" / "fo-dicom" / "HasFragmentSequence.dcm"
    if xa.is_file():
        files.append(("DICOM XA cine (fo-dicom)", str(xa), str(xa)))
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    photos = [("photo/graphic (matplotlib)", str(mpl / n)) for n in
              ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")]
    photos += [("photo (scikit-learn)", p) for p in
               sorted(glob.glob(str(Path(sklearn.__file__).parent / "datasets" / "images" / "*.jpg")))]
    photos += [("photo/graphic (scikit-image)", p) for p in
               sorted(glob.glob(str(Path(skimage.__file__).parent / "data" / "*.png")) +
                      glob.glob(str(Path(skimage.__file__).parent / "data" / "*.jpg")))]
    return files + [(kind, path, path) for kind, path in photos]


def decode_ood(preprocess) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    """Decode the OOD files like uploads, the first decodable file of each identity:
    ``(images, kinds, names, refused)``."""
    from msk.core.stages.sorter.sorting import read_images

    images, kinds, names, refused, seen = [], [], [], [], set()
    for kind, path, identity in ood_files():
        if identity in seen:
            continue
        read = read_images([path], preprocess)
        if read.errors:
            refused.append(f"{Path(path).name} ({read.errors[0].reason})")
            continue
        seen.add(identity)
        images.append(read.images[0])
        kinds.append(kind)
        names.append(Path(path).name)
    return np.stack(images), kinds, names, refused


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(len(inside)), np.zeros(len(outside))], np.r_[inside, outside]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingest", type=Path, default=Path("/tmp/e-ingest"))
    parser.add_argument("--run", type=Path, default=Path("/tmp/e-ood-sorter"))
    parser.add_argument("--ingest-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--encoder", default="tiny-cnn")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--keep", type=float, default=0.95)
    parser.add_argument("--fresh", action="store_true", help="delete --run first")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from msk.core.data.labelled import load_labelled
    from msk.core.models.ood import calibrate, ood_score
    from msk.core.models.sorter import load_sorter, logits_and_features
    from msk.core.stages.sorter.sorting import run_preprocess
    from msk.core.stages.sorter.training import SorterConfig, prepare_sorter_data, sorter_from_ingest

    began = time.perf_counter()
    real_xr = SHARED / "real-xr"
    if not (args.ingest / "ingest.json").is_file():
        from msk.core.stages.ingest.pipeline import IngestConfig, ingest

        os.environ.setdefault("MSK_PSEUDONYM_KEY", "bench-ood-key-0123456789abcdef")
        report = ingest(real_xr, args.ingest, IngestConfig(image_size=args.ingest_size))
        print(f"ingest: {report.n_ok} ok, {report.n_quarantined} quarantined {report.by_reason}")
    labels = real_xr_labels(real_xr, args.ingest)
    if args.fresh and args.run.exists():
        shutil.rmtree(args.run)
    config = SorterConfig(encoder=args.encoder, image_size=args.image_size, epochs=args.epochs,
                          batch_size=32, lr=1e-3, folds=args.folds, num_workers=0,
                          gradcam_images=0, ood_keep=args.keep, ood_score="mahalanobis")
    result = sorter_from_ingest(args.ingest, labels, config, out=args.run)
    print(f"sorter: {result.test.n} test images, ensemble top-1 {result.test.top1:.3f}, "
          f"{time.perf_counter() - began:.0f} s so far")

    ensemble = load_sorter(args.run)  # the shipped score: mahalanobis, with its fold densities
    data, _, _, y, plan = prepare_sorter_data(load_labelled(args.ingest, labels), config)
    preprocess = run_preprocess(args.run)
    out_images, kinds, names, refused = decode_ood(preprocess)

    def outputs(images):  # per fold model: (logits, features)
        return [logits_and_features(m, images, config.image_size) for m in ensemble.models]

    # out-of-fold validation: fold model k on its own validation fold
    val = [logits_and_features(m, data.images[v], config.image_size)
           for m, (_, v) in zip(ensemble.models, plan.folds)]
    test, out = outputs(data.images[plan.test]), outputs(out_images)
    folds = list(range(len(ensemble.models)))
    variants = [("msk default: ensemble, Mahalanobis on features", folds, "mahalanobis"),
                ("ensemble, max softmax (msp)", folds, "msp"),
                ("ensemble, energy", folds, "energy"),
                ("baseline: fold-1 model alone, msp", [0], "msp"),
                ("fold-1 model alone, Mahalanobis", [0], "mahalanobis")]
    rows, kept_by_kind = [], {}
    for name, idx, score in variants:
        dens = [ensemble.densities[i] for i in idx]
        cal = calibrate([val[i][0] for i in idx], score=score, keep=args.keep,
                        val_features=[val[i][1] for i in idx], densities=dens)

        def scored(outs, idx=idx, score=score, dens=dens):
            return ood_score(np.stack([outs[i][0] for i in idx]), score,
                             fold_features=[outs[i][1] for i in idx], densities=dens)

        s_in, s_out = scored(test), scored(out)
        rows.append((name, auroc(s_in, s_out), float(cal.known(s_in).mean()),
                     float(cal.known(s_out).mean()), cal.threshold, cal.n_images))
        if idx == folds and score in ("mahalanobis", "msp"):
            kept_by_kind[score] = {kind: [n for n, k, ok in zip(names, kinds, cal.known(s_out))
                                          if k == kind and ok] for kind in sorted(set(kinds))}
    n_in, n_out = len(plan.test), len(out_images)
    print(f"\nin: real-xr test split, {n_in} images (group-aware: one file per group); out: "
          f"{n_out} non-radiograph images; threshold keeps {args.keep:.0%} of the out-of-fold "
          f"validation images; sorter {args.encoder} at {args.image_size} px, {args.folds} folds x "
          f"{args.epochs} epochs, test top-1 {result.test.top1:.3f}\n")
    print("| score | AUROC | real-xr test kept | OOD kept | threshold | calibration images |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, a, kin, kout, thr, n in rows:
        print(f"| {name} | {a:.3f} | {kin:.1%} | {kout:.1%} | {thr:.4g} | {n} |")
    print("\nper kind of OOD input (ensemble, each score at its calibrated threshold):\n")
    print("| input | images | kept, Mahalanobis (msk) | kept, msp | files kept by msk |")
    print("|---|---:|---:|---:|---|")
    for kind in sorted(set(kinds)):
        n = kinds.count(kind)
        mine = kept_by_kind["mahalanobis"][kind]
        shown = ", ".join(mine[:5]) + (f" +{len(mine) - 5}" if len(mine) > 5 else "")
        print(f"| {kind} | {n} | {len(mine) / n:.0%} | {len(kept_by_kind['msp'][kind]) / n:.0%} | "
              f"{shown or '-'} |")
    print(f"\nOOD files used: {', '.join(sorted(names))}")
    print(f"refused by the decoder (not scored): {', '.join(refused) or 'none'}")
    (args.run / "ood_bench.json").write_text(json.dumps({
        "rows": [dict(zip(("score", "auroc", "in_kept", "out_kept", "threshold", "n_calibration"), r))
                 for r in rows], "kept_by_kind": kept_by_kind, "n_in": n_in, "n_out": n_out,
        "files": names, "refused": refused}, indent=2))
    print(f"\n{time.perf_counter() - began:.0f} s in all; {args.run / 'ood_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
