"""msk's header de-identification next to dicognito and deid, attribute by attribute, against PS3.15 Annex E.

Contestants, each on its own fresh copy of the same files:

* **msk**: :meth:`msk.core.io.pseudonym.Pseudonymiser.scrub_dataset` (``dates="year"``);
* **dicognito** (``dicognito.anonymizer.Anonymizer``, seeded): its default handlers;
* **deid** (``deid.dicom.replace_identifiers`` with its default ``dicom`` recipe and
  ``remove_private=True``).

Inputs: a synthetic data set with a distinct value in every writable attribute of the Basic
Profile's table (:func:`msk.core.io.deid_profile.fill_profile`, plus a private tag and an overlay),
``--n-synth`` images of msk's synthetic PACS export (:mod:`msk.core.synth`, seed 0), and the real
DICOMs of ``../shared/data/dicom`` and ``dicom-hip-dx`` where present.

For every top-level attribute of the table present in an input, the outcome is ``removed``,
``emptied``, ``replaced`` or ``kept`` (unchanged). Under the Basic Profile no attribute of the
table may be kept as it was (every action is X, Z, D, U or a choice among them); msk keeps the
patient's sex and age by the Retain Patient Characteristics Option. Printed: per tool, the count
of attributes by outcome, then every attribute that some tool keeps unchanged; ``--markdown``
writes the full per-attribute table.

Usage (``dicognito`` comes with ``.[test]``; ``deid`` is installed by hand, ``pip install deid==0.4.13``;
a tool that is missing or fails on a file is reported on stderr and counted nowhere)::

    python bench/deid.py [--shared ../shared/data] [--markdown out/deid-table.md]
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import tempfile
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from msk.core.io.deid_profile import PROFILE_EDITION, fill_profile, profile_action
from msk.core.io.pseudonym import Pseudonymiser

REPO = Path(__file__).resolve().parents[1]
# This script is bench/deid.py: keep `import deid` (the package compared here) from finding itself.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
TOOLS = ("msk", "dicognito", "deid")
OUTCOMES = ("removed", "emptied", "replaced", "kept")


def synthetic() -> Dataset:
    """Every writable profile attribute filled, a private tag and an overlay comment."""
    ds = Dataset()
    fill_profile(ds)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.private_block(0x0009, "ZQ PRIVATE", create=True).add_new(0x01, "LO", "zq77777x")
    ds.add_new(0x60004000, "LT", "overlay comment zq88888x")
    return ds


def real_files(shared: Path) -> list[Path]:
    return [p for folder in ("dicom", "dicom-hip-dx") for p in sorted((shared / folder).rglob("*"))
            if p.suffix == ".dcm" or p.name == "CR-MONO1-10-chest"]


def run_msk(ds: Dataset) -> Dataset:
    return Pseudonymiser(b"bench-deid-key-0123456789").scrub_dataset(ds)


def run_dicognito(ds: Dataset) -> Dataset:
    from dicognito.anonymizer import Anonymizer

    Anonymizer(seed="bench").anonymize(ds)
    return ds


def run_deid(ds: Dataset) -> Dataset:
    from deid.config import DeidRecipe
    from deid.dicom import replace_identifiers

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.dcm"
        ds.save_as(path, enforce_file_format=True)
        return replace_identifiers([str(path)], deid=DeidRecipe(), save=False, remove_private=True)[0]


RUNNERS = {"msk": run_msk, "dicognito": run_dicognito, "deid": run_deid}


def outcome(before: pydicom.DataElement, after: Dataset) -> str:
    if before.tag not in after:
        return "removed"
    value = after[before.tag].value
    if value in (None, "", b"") or (before.VR == "SQ" and len(value) == 0):
        return "emptied"
    if before.VR == "SQ":
        return "kept" if len(value) == len(before.value) and str(value) == str(before.value) else "replaced"
    return "kept" if str(value) == str(before.value) else "replaced"


def compare(inputs: list[tuple[str, Dataset]]) -> dict[str, dict[str, Counter]]:
    """attribute name -> tool -> Counter of outcomes over the inputs that have it."""
    table: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for name, ds in inputs:
        results = {}
        for tool, run in RUNNERS.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    results[tool] = run(copy.deepcopy(ds))
            except Exception as exc:  # noqa: BLE001 - a tool that fails on a file is reported, not fatal
                print(f"{tool} failed on {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        for elem in ds:
            if elem.tag.is_private:
                key = "(private tags)"
            elif (action := profile_action(elem.tag)) is None:
                continue
            else:
                key = f"{elem.keyword or elem.tag} [{action}]"
            for tool, after in results.items():
                table[key][tool][outcome(elem, after)] += 1
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--markdown", type=Path, help="write the full per-attribute table here")
    parser.add_argument("--n-synth", type=int, default=12, help="images of a synthetic export (0: none)")
    args = parser.parse_args(argv)
    inputs = [("synthetic", synthetic())]
    with tempfile.TemporaryDirectory() as tmp:
        if args.n_synth:
            from msk.core.synth.config import SynthConfig
            from msk.core.synth.export import synthesize

            synthesize(Path(tmp), SynthConfig(n_images=args.n_synth, seed=0, image_size=64, priors="defaults"),
                       progress=False)
        for path in sorted((Path(tmp) / "export").rglob("*.dcm")):
            inputs.append((path.name, pydicom.dcmread(path, force=True)))
    n_export = len(inputs) - 1
    for path in real_files(args.shared) if args.shared.is_dir() else []:
        inputs.append((path.name, pydicom.dcmread(io.BytesIO(path.read_bytes()), force=True)))
    table = compare(inputs)
    print(f"PS3.15 Table E.1-1 ({PROFILE_EDITION}); inputs: 1 filled data set + {n_export} synthetic export + "
          f"{len(inputs) - 1 - n_export} real DICOMs; "
          f"{len(table)} profile attributes (and private tags) present")
    print(f"{'tool':10} " + " ".join(f"{o:>9}" for o in OUTCOMES) + "   (attributes; one counted per outcome seen)")
    for tool in TOOLS:
        counts = Counter(o for row in table.values() for o in row[tool])
        print(f"{tool:10} " + " ".join(f"{counts[o]:>9}" for o in OUTCOMES))

    def cell(row: dict[str, Counter], tool: str) -> str:
        return "/".join(o for o in OUTCOMES if row[tool][o]) or "-"

    kept = {k: row for k, row in table.items() if any(row[t]["kept"] for t in TOOLS)}
    print(f"\nattributes some tool keeps unchanged ({len(kept)}):")
    print(f"{'attribute [action]':58} " + " ".join(f"{t:>18}" for t in TOOLS))
    for key in sorted(kept):
        print(f"{key[:58]:58} " + " ".join(f"{cell(kept[key], t):>18}" for t in TOOLS))
    if args.markdown:
        lines = ["| attribute [PS3.15 action] | " + " | ".join(TOOLS) + " |", "|---|" + "---|" * len(TOOLS)]
        lines += [f"| {k} | " + " | ".join(cell(table[k], t) for t in TOOLS) + " |" for k in sorted(table)]
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + "\n")
        print(f"\nfull table: {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
