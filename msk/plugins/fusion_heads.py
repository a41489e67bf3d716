"""Built-in fusion heads (see :mod:`msk.plugins.fusion_models` for the modules). Torch is
imported only when a head is built, so registry look-ups stay cheap."""

from __future__ import annotations

from msk.core.hookspecs import hookimpl
from msk.core.specs import FusionHeadSpec


def _build(name: str, **options):
    from msk.plugins.fusion_models import build

    return build(name, **options)


@hookimpl
def msk_fusion_heads() -> list[FusionHeadSpec]:
    return [
        FusionHeadSpec("concat", _build, "joint fusion: metadata MLP embedding ++ image features"),
        FusionHeadSpec("gated", _build, "metadata gates the image features, then concatenation"),
        FusionHeadSpec("film", _build, "metadata scales/shifts the image features (FiLM)"),
    ]
