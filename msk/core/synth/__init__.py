"""``msk synth``: a deterministic synthetic PACS export of radiograph-like DICOM files.

The embedded default data of msk: 28 anatomical regions drawn as recognisable phantoms
(:mod:`.phantoms`), 10 bone-tumour entities drawn with their typical radiographic signs
(:mod:`.lesions`), patient priors from the real BTXRD metadata where available (:mod:`.priors`),
written as messy but valid DICOM (several transfer syntaxes, MONOCHROME1, 12-16 bit, fake PHI,
and a few deliberately broken files) with a ground-truth CSV.

>>> from pathlib import Path
>>> from msk.core.synth import SynthConfig, synthesize
>>> report = synthesize(Path("out"), SynthConfig(n_images=200))  # doctest: +SKIP
"""

from msk.core.synth.cases import SynthCase, plan_case, render_case
from msk.core.synth.config import SynthConfig, working_syntaxes
from msk.core.synth.export import COLUMNS, SynthReport, synthesize
from msk.core.synth.truth import ground_truth_for_ingest

__all__ = ["COLUMNS", "SynthCase", "SynthConfig", "SynthReport", "ground_truth_for_ingest", "plan_case",
           "render_case", "synthesize", "working_syntaxes"]
