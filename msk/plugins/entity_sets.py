"""Built-in entity sets: the 28 anatomical regions of the SAM-X sorter, the 10 bone-tumour
entities of the recommender study, and the 9 tumour classes of the public BTXRD data set.

Tumour priors (age range, typical sites, position on the bone) follow standard bone-tumour
references (WHO 2020 classification; Resnick, *Diagnosis of Bone and Joint Disorders*). They are
*shipped defaults* for synthesis; ``msk synth`` replaces age/sex/site priors with the real BTXRD
distribution where ``../shared/data/btxrd-meta`` is present.
"""

from __future__ import annotations

from msk.core.hookspecs import hookimpl
from msk.core.io.btxrd import BTXRD_SITE_TO_REGION  # noqa: F401  (kept importable from here)
from msk.core.specs import BonePosition as P
from msk.core.specs import Entity, EntitySet
from msk.core.specs import Malignancy as M

SAMX_REGIONS = (
    "abdomen", "ankle", "calcaneus", "cervical spine", "clavicle", "elbow", "femur", "finger",
    "foot", "forearm", "hand", "hip", "humerus", "knee", "lower leg", "lumbar spine",
    "paranasal sinuses", "patella", "pelvis", "ribs", "sacrum", "shoulder", "skull", "spine",
    "thoracic spine", "thorax", "whole leg", "wrist",
)

_REGION_ALIASES = {
    "cervical spine": ("c-spine", "cspine"), "lumbar spine": ("l-spine", "lspine"),
    "thoracic spine": ("t-spine", "tspine"), "thorax": ("chest",), "lower leg": ("tibia/fibula",),
    "paranasal sinuses": ("sinuses",), "whole leg": ("leg long",),
}


def _code(name: str) -> str:
    return name.upper().replace(" ", "_")


samx_regions = EntitySet(
    name="samx-regions",
    kind="region",
    description="anatomical regions of the SAM-X radiograph sorter",
    entities=tuple(Entity(n, _code(n), _REGION_ALIASES.get(n, ())) for n in SAMX_REGIONS),
)

bone_tumours = EntitySet(
    name="bone-tumours",
    kind="tumour",
    description="primary bone-tumour entities of the recommender study, with WHO grade",
    entities=(
        Entity("aneurysmal bone cyst", "ABC", ("abc",), M.INTERMEDIATE, (5, 25),
               ("femur", "lower leg", "humerus", "pelvis", "spine"), (P.METAPHYSIS,)),
        Entity("chondroblastoma", "CB", (), M.BENIGN, (10, 25),
               ("knee", "femur", "humerus", "shoulder", "lower leg"), (P.EPIPHYSIS,)),
        Entity("chondrosarcoma", "CS", (), M.MALIGNANT, (35, 75),
               ("pelvis", "femur", "humerus", "ribs", "shoulder"),
               (P.METAPHYSIS, P.META_DIAPHYSIS, P.DIAPHYSIS)),
        Entity("enchondroma", "EC", (), M.BENIGN, (15, 55),
               ("finger", "hand", "femur", "humerus", "foot"), (P.METAPHYSIS, P.DIAPHYSIS)),
        Entity("ewing sarcoma", "ES", ("ewing's sarcoma", "ewing"), M.MALIGNANT, (5, 25),
               ("femur", "pelvis", "lower leg", "humerus", "ribs"),
               (P.DIAPHYSIS, P.META_DIAPHYSIS)),
        Entity("fibrous dysplasia", "FD", (), M.BENIGN, (5, 40),
               ("femur", "lower leg", "ribs", "skull", "humerus"), (P.DIAPHYSIS, P.META_DIAPHYSIS)),
        Entity("giant cell tumour", "GCT", ("giant cell tumor", "giant cell tumour of bone"),
               M.INTERMEDIATE, (20, 45), ("knee", "femur", "lower leg", "wrist", "forearm"),
               (P.EPI_METAPHYSIS,)),
        Entity("non-ossifying fibroma", "NOF", ("nof", "non ossifying fibroma"), M.BENIGN, (5, 20),
               ("femur", "lower leg", "knee"), (P.METAPHYSIS, P.META_DIAPHYSIS)),
        Entity("osteochondroma", "OC", ("exostosis",), M.BENIGN, (5, 30),
               ("femur", "lower leg", "humerus", "knee", "shoulder"), (P.METAPHYSIS,)),
        Entity("osteosarcoma", "OS", (), M.MALIGNANT, (10, 30),
               ("femur", "lower leg", "humerus", "knee", "pelvis"), (P.METAPHYSIS,)),
    ),
)

btxrd = EntitySet(
    name="btxrd",
    kind="tumour",
    description="tumour classes of the public BTXRD data set (Yao et al., Sci Data 2025)",
    entities=(
        Entity("osteochondroma", "OC", (), M.BENIGN),
        Entity("multiple osteochondromas", "MOC", (), M.BENIGN),
        Entity("simple bone cyst", "SBC", (), M.BENIGN),
        Entity("giant cell tumor", "GCT", ("giant cell tumour",), M.INTERMEDIATE),
        Entity("osteofibroma", "OF", ("osteofibrous dysplasia",), M.BENIGN),
        Entity("synovial osteochondroma", "SOC", (), M.BENIGN),
        Entity("other bt", "OBT", ("other benign tumour",), M.BENIGN),
        Entity("osteosarcoma", "OS", (), M.MALIGNANT),
        Entity("other mt", "OMT", ("other malignant tumour",), M.MALIGNANT),
    ),
)


@hookimpl
def msk_entity_sets() -> list[EntitySet]:
    return [samx_regions, bone_tumours, btxrd]
