"""Response bodies of the HTTP API (they make the OpenAPI schema at ``/openapi.json``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

__all__ = ["ClassifyResponse", "ErrorInfo", "ErrorResponse", "Health", "Probability", "Ready",
           "RecommendResponse", "SegmentResponse", "SortResponse"]

GRADCAM = "base64 PNG (only with ?gradcam=true): Grad-CAM of the top class over the model's input image"


INPUT = ("what the model saw: box (the lesion crop around the box sent), segmented (the lesion crop around "
         "the segmenter's box) or whole_image")
BOX = "the lesion box used, x0, y0, x1, y1 in pixels of the uploaded image (absent for whole_image)"
#: Four numbers. A list, not a tuple: OpenAPI 3.1 tools (schemathesis 4.32 among them) misread the
#: ``prefixItems`` a tuple becomes.
Box = Annotated[list[float], Field(min_length=4, max_length=4)]


class Probability(BaseModel):
    name: str = Field(description="class name (region or entity)")
    probability: float = Field(ge=0, le=1)


class SortResponse(BaseModel):
    regions: list[Probability] = Field(description="the k most probable regions, most probable first")
    unknown: bool = Field(description="true: the image scores below the sorter's calibrated threshold; it "
                                      "does not look like the radiographs the sorter was trained on")
    score: float = Field(description="the image's score (score_name); higher: more like the training images")
    score_name: Literal["mahalanobis", "msp", "energy"] = Field(
        description="mahalanobis: minus the feature distance to the nearest class mean; msp: max softmax "
                    "of the fold ensemble; energy: mean log-sum-exp of the fold logits")
    threshold: float | None = Field(None, description="the calibrated threshold; absent when the served "
                                                      "model has none (then never unknown)")
    gradcam_png: str | None = Field(None, description=GRADCAM)


class Neighbour(BaseModel):
    """A previous patient's image: pseudonymised ids only."""

    patient_id: str | None
    study_id: str | None
    image_id: str
    distance: float = Field(description="1 - cosine similarity (bits: lsh with rerank=0); smaller is nearer")
    entity: str = Field(description="the confirmed entity of that image")


class RecommendResponse(BaseModel):
    entity: str = Field(description="the entity the neighbours vote for")
    confidence: float = Field(description="its share of the vote")
    shares: dict[str, float] = Field(description="every voted entity's share (sums to 1), largest first")
    neighbours: list[Neighbour] = Field(description="the k nearest previous images, nearest first")
    input: Literal["box", "segmented", "whole_image"] = Field(description=INPUT)
    box: Box | None = Field(None, description=BOX)


class ClassifyResponse(BaseModel):
    entities: list[Probability] = Field(description="every entity, most probable first")
    metadata_used: bool = Field(description="false for an image-only model (metadata validated, not used)")
    input: Literal["box", "segmented", "whole_image"] = Field(description=INPUT)
    box: Box | None = Field(None, description=BOX)
    gradcam_png: str | None = Field(None, description=GRADCAM)


class SegmentResponse(BaseModel):
    box: Box = Field(description="the lesion's bounding box, x0, y0, x1, y1 in pixels of the uploaded image "
                                 "(the largest connected lesion region)")
    mask_png: str = Field(description="base64 8-bit PNG of the lesion mask (255 lesion, 0 background), the "
                                      "uploaded image's size")
    height: int = Field(description="mask height (the uploaded image's rows)")
    width: int = Field(description="mask width (the uploaded image's columns)")
    lesion_fraction: float = Field(ge=0, le=1, description="share of the image's pixels in the lesion")
    threshold: float = Field(description="the segmenter's lesion probability threshold")


class ErrorInfo(BaseModel):
    code: str = Field(description="machine-readable error code (see docs/serve.md)")
    message: str
    reason: str | None = Field(None, description="quarantine reason of an unreadable image")


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    models: dict[str, Literal["ready"]] = Field(description="the configured models (details: /v1/models)")
