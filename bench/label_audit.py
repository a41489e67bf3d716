"""A blind audit of real-xr's region labels, and the sorter scored against the audited labels.

    # 1. contact sheets of the test images of one source, numbered, without labels or predictions
    .venv/bin/python bench/label_audit.py sheets --run RUN --ingest INGEST --source roboflow-fracture --out DIR
    # 2. a person writes DIR/audit.csv (item, region, note): what each numbered image shows,
    #    looking at the sheets only (not at key.csv, labels.csv or the predictions)
    # 3. the sorter against the given and the audited labels
    .venv/bin/python bench/label_audit.py score --run RUN --ingest INGEST --key DIR/key.csv --audit AUDIT.csv

``RUN`` is a sorter run of ``bench/real.py`` (``RUN/splits.csv``, ``RUN/predictions_test.csv``),
``INGEST`` its ingest (``labels.csv`` and the manifest, which maps image ids to real-xr paths).
The audit file names images by their real-xr path (``path,audited,note``), so it outlives the
ingest's ids. Why: real-xr's regions come from the source's folder names, and its README's spot
check found films labelled ``finger`` that show the wrist or hand (issue 10, item 5).

Never run by pytest; needs the shared data.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageOps

DEFAULT_REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-xr"


def manifest_paths(ingest: Path) -> pd.DataFrame:
    """``image_id -> path`` (relative to the imported folder) of an ingest's ok rows."""
    parts = sorted((ingest / "manifest").glob("*.parquet"))
    frame = pd.concat([pd.read_parquet(p, columns=["image_id", "path", "status"]) for p in parts])
    return frame[frame["status"] == "ok"].drop_duplicates("image_id").set_index("image_id")[["path"]]


def test_images(run: Path, ingest: Path, source: str | None, part: str = "test") -> pd.DataFrame:
    """The run's images of one part (``test``, ``dev`` or ``all``: ``image_id``, ``path``, ``label``,
    ``source``), of one source or all."""
    for need in (run / "splits.csv", ingest / "labels.csv", ingest / "manifest"):
        if not need.exists():
            sys.exit(f"{need} not found: --run is a sorter run folder, --ingest the ingest it was trained on")
    splits = pd.read_csv(run / "splits.csv")
    test = splits[splits["part"] == part][["image_id"]] if part != "all" else splits[["image_id"]]
    labels = pd.read_csv(ingest / "labels.csv")
    if "source" not in labels.columns:
        if source:
            sys.exit(f"{ingest / 'labels.csv'} has no source column; pass --source ''")
        labels["source"] = ""
    frame = test.merge(labels[["image_id", "label", "source"]], on="image_id")
    frame = frame.join(manifest_paths(ingest), on="image_id")
    if source:
        frame = frame[frame["source"] == source]
    return frame.reset_index(drop=True)


def sheets(args: argparse.Namespace) -> None:
    frame = test_images(args.run, args.ingest, args.source, args.part)
    order = list(range(len(frame)))
    random.Random(args.seed).shuffle(order)  # the sheets' order says nothing about the label
    frame = frame.iloc[order].reset_index(drop=True)
    frame.insert(0, "item", range(1, len(frame) + 1))
    args.out.mkdir(parents=True, exist_ok=True)
    frame[["item", "path"]].to_csv(args.out / "key.csv", index=False)
    pd.DataFrame({"item": frame["item"], "audited": "", "note": ""}).to_csv(args.out / "audit.csv", index=False)
    size, cols = args.thumb, args.columns
    rows = math.ceil(args.per_sheet / cols)
    for sheet, start in enumerate(range(0, len(frame), args.per_sheet), 1):
        canvas = Image.new("L", (cols * size, rows * size), 0)
        draw = ImageDraw.Draw(canvas)
        for k, row in enumerate(frame.iloc[start:start + args.per_sheet].itertuples()):
            with Image.open(args.real / row.path) as image:
                thumb = ImageOps.contain(ImageOps.exif_transpose(image).convert("L"), (size - 4, size - 4))
            x, y = (k % cols) * size, (k // cols) * size
            canvas.paste(thumb, (x + 2, y + 2))
            draw.rectangle((x + 2, y + 2, x + 46, y + 24), fill=0)
            draw.text((x + 6, y + 6), str(row.item), fill=255)
        canvas.save(args.out / f"sheet-{sheet:02d}.png")
    print(f"{len(frame)} images on {sheet} sheets in {args.out}; write {args.out / 'audit.csv'}")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def score(args: argparse.Namespace) -> None:
    frame = test_images(args.run, args.ingest, None)
    predictions = pd.read_csv(args.run / "predictions_test.csv")[["image_id", "predicted", "second"]]
    frame = frame.merge(predictions, on="image_id")
    audit = pd.read_csv(args.audit, keep_default_na=False)
    if args.key:  # an audit by item number: name its images by path
        audit = audit.merge(pd.read_csv(args.key), on="item")
    audit = audit[["path", args.column, "note"]].rename(columns={args.column: "audited"})
    audit = audit[audit["path"].isin(frame["path"])]  # an audit of all images: its test images
    if audit.empty:
        sys.exit(f"{args.audit} names none of this run's test images")
    frame = frame.merge(audit, on="path", how="left")
    answer = frame["audited"].fillna("").astype(str)
    unsure = answer == "?"
    audited = (answer != "") & ~unsure
    # an image nobody audited, or that the auditor could not name ("?"), keeps its given label
    frame["truth"] = np.where(audited, answer, frame["label"])
    classes = sorted(frame["label"].unique())
    inside = frame["truth"].isin(classes)

    n_aud = int(audited.sum())
    agree = int((frame.loc[audited, "audited"] == frame.loc[audited, "label"]).sum())
    lo, hi = wilson(n_aud - agree, n_aud)
    print(f"audited {n_aud + int(unsure.sum())} of {len(frame)} test images, {int(unsure.sum())} of them "
          "not nameable from the film ('?': they keep their given label)")
    print(f"of the {n_aud} named, the given label disagrees with the audit on "
          f"{n_aud - agree} ({(n_aud - agree) / max(n_aud, 1):.1%}, 95 % CI {lo:.1%}-{hi:.1%})")
    print(f"audited regions outside the {len(classes)} trained classes: {int((audited & ~inside).sum())} "
          f"({', '.join(sorted(set(frame.loc[audited & ~inside, 'truth'])))})")
    print("\ngiven label -> audited region (audited images):")
    print(pd.crosstab(frame.loc[audited, "label"], frame.loc[audited, "audited"]).to_string())

    def top(mask: pd.Series, target: str) -> str:
        part = frame[mask]
        top1 = (part["predicted"] == part[target]).mean()
        top2 = ((part["predicted"] == part[target]) | (part["second"] == part[target])).mean()
        return f"{top1:.3f} / {top2:.3f} ({int(mask.sum())} images)"

    everything = pd.Series(True, index=frame.index)
    ceiling = (frame["truth"] == frame["label"]).mean()
    print(f"\na sorter that names what every film shows scores {ceiling:.3f} top-1 against the given labels")
    print("\nsorter top-1 / top-2 on the test set:")
    print(f"  against the given labels:                         {top(everything, 'label')}")
    print(f"  against the audited labels:                       {top(everything, 'truth')}")
    print(f"  against the audited labels, trained classes only: {top(inside, 'truth')}")
    print(f"  named images only, given labels:                  {top(audited, 'label')}")
    print(f"  named images only, audited labels:                {top(audited, 'truth')}")
    wrong = frame[frame["predicted"] != frame["label"]]
    print(f"\nthe {len(wrong)} test images the sorter gets wrong against the given label:")
    print(wrong[["path", "label", "audited", "predicted", "second", "note"]].to_string(index=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("sheets", "score"):
        p = sub.add_parser(name)
        p.add_argument("--run", type=Path, required=True, help="bench/real.py sorter run folder")
        p.add_argument("--ingest", type=Path, required=True, help="that run's ingest folder")
        p.add_argument("--real", type=Path, default=DEFAULT_REAL, help="real-xr folder")
        if name == "sheets":
            p.add_argument("--source", default="roboflow-fracture", help="one source's test images ('' = all)")
            p.add_argument("--part", default="test", choices=["test", "dev", "all"],
                           help="the run's test images, its cross-validation (dev) images, or both")
            p.add_argument("--out", type=Path, required=True)
            p.add_argument("--per-sheet", type=int, default=12)
            p.add_argument("--columns", type=int, default=4)
            p.add_argument("--thumb", type=int, default=320, help="thumbnail size in px")
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("--audit", type=Path, required=True, help="CSV: item (with --key) or path, "
                           "audited (a region, or ? when the film does not say), note")
            p.add_argument("--key", type=Path, help="key.csv of the sheets, when the audit names items")
            p.add_argument("--column", default="audited", help="the audit's answer column (e.g. blind)")
    args = parser.parse_args()
    sheets(args) if args.command == "sheets" else score(args)


if __name__ == "__main__":
    main()
