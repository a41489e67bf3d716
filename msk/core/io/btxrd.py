"""The public BTXRD data set's vocabulary as msk maps it (Yao et al., Sci Data 2025).

BTXRD's ``dataset.csv`` flags the sites of an image in 15 columns (bones first, then joints);
:data:`BTXRD_SITE_TO_REGION` maps each to a region of the ``samx-regions`` entity set. Used by
the metadata loader (:mod:`msk.core.data.metadata`), the synthetic priors
(:mod:`msk.core.synth.priors`) and the BTXRD dataset layout.
"""

from __future__ import annotations

#: BTXRD site columns (dataset.csv, in file order) -> SAM-X region.
BTXRD_SITE_TO_REGION: dict[str, str] = {
    "hand": "hand", "ulna": "forearm", "radius": "forearm", "humerus": "humerus",
    "foot": "foot", "tibia": "lower leg", "fibula": "lower leg", "femur": "femur",
    "hip bone": "pelvis", "ankle-joint": "ankle", "knee-joint": "knee", "hip-joint": "hip",
    "wrist-joint": "wrist", "elbow-joint": "elbow", "shoulder-joint": "shoulder",
}

#: The 15 site flag columns of BTXRD's ``dataset.csv``, in file order: bones first, then joints.
BTXRD_SITES: tuple[str, ...] = tuple(BTXRD_SITE_TO_REGION)
