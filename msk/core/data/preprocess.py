"""Model-input preprocessing and the augmentation options: the same path in training and serving.

Stored images (``uint8 [S, S]`` squares written by the ingest, which keeps them as decoded) come
from many sources whose grey levels differ for reasons that have nothing to do with anatomy:
one archive exports a narrow soft window, another a wide bone window, a third a dark JPEG with
black padding. :class:`PreprocessConfig` removes most of that *at model-input time*, in every
place an image enters a network (training, validation, evaluation, Grad-CAM, embeddings,
serving), on a float copy in ``[0, 1]``:

1. **percentile window** (on by default): the ``low_percentile`` / ``high_percentile`` grey
   levels of the image's *foreground* (pixels above ``background_level``, so that black
   letterbox bars and padding do not count) are mapped to 0 and 1 and the rest clipped; a
   per-image version of the "auto window" of a PACS viewer;
2. **CLAHE** (off by default): contrast-limited adaptive histogram equalisation
   (:func:`skimage.exposure.equalize_adapthist`), which evens out local contrast, e.g. the
   heel effect or a film's uneven exposure;
3. **gamma** (1, i.e. off, by default): a fixed ``x ** gamma``.

Background pixels (at or below ``background_level`` before preprocessing) are black afterwards,
whatever the steps did to them.

A trained model carries its :class:`InputConfig` (image size and preprocessing, like timm's
``pretrained_cfg``): :mod:`msk.core.models.train` sets it on the model, saves it in the checkpoint's
config and restores it in :func:`msk.core.models.train.load_model`, so
:func:`msk.core.models.train.predict_logits` and serving apply exactly what training applied.
Checkpoints written before preprocessing existed carry no ``preprocess`` key and are read as
:meth:`PreprocessConfig.none` (the images go in as before).

:class:`AugmentConfig` holds the probability and strength of each random training transform;
the transforms themselves are in :mod:`msk.core.data.augment`. See ``docs/preprocessing.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from msk.core.config import MskConfig

__all__ = [
    "AugmentConfig", "BlurAugment", "BorderAugment", "ContrastAugment", "CropAugment",
    "GammaAugment", "InputConfig", "JpegAugment", "LetterboxAugment", "NoiseAugment",
    "Preprocess", "PreprocessConfig", "RotationAugment", "clahe", "foreground_mask",
    "input_config_of", "percentile_window", "preprocess_image",
]


def _ordered(pair: tuple[float, float], name: str) -> None:
    if pair[0] > pair[1]:
        raise ValueError(f"{name} must be (low, high) with low <= high; got {tuple(pair)}")


# -- preprocessing -----------------------------------------------------------------------------


class PreprocessConfig(MskConfig):
    """Intensity normalisation of every model input (YAML key ``preprocess``).

    Applied to the stored square image as floats in [0, 1], before resizing to the network
    input; the same in training, evaluation and serving (the model records it).
    """

    window: bool = Field(True, description="per-image percentile window: map the low/high percentile of the "
                                           "foreground to 0/1 and clip")
    low_percentile: float = Field(1.0, ge=0, lt=100, description="foreground percentile mapped to 0")
    high_percentile: float = Field(99.0, gt=0, le=100, description="foreground percentile mapped to 1")
    background_level: float = Field(
        0.02, ge=0, lt=1, description="pixels at or below this grey level (fraction of full scale) are background "
                                      "(letterbox bars, padding): left out of the percentiles, black afterwards")
    clahe: bool = Field(False, description="contrast-limited adaptive histogram equalisation after the window")
    clahe_clip: float = Field(0.01, gt=0, le=1, description="CLAHE clip limit (skimage's clip_limit)")
    clahe_tiles: int = Field(8, ge=1, le=64, description="CLAHE tiles per side (kernel = side / tiles)")
    gamma: float = Field(1.0, gt=0, description="fixed gamma x ** gamma after window and CLAHE (1: off)")

    @model_validator(mode="after")
    def _percentiles(self) -> PreprocessConfig:
        if self.low_percentile >= self.high_percentile:
            raise ValueError(f"low_percentile ({self.low_percentile}) must be below high_percentile "
                             f"({self.high_percentile})")
        return self

    @classmethod
    def none(cls) -> PreprocessConfig:
        """No intensity change: what models trained before preprocessing existed were fed."""
        return cls(window=False, clahe=False, gamma=1.0)

    @property
    def is_identity(self) -> bool:
        return not self.window and not self.clahe and self.gamma == 1.0


def foreground_mask(x: torch.Tensor, background_level: float) -> torch.Tensor:
    """``bool`` mask of the pixels above ``background_level`` (the image, not its black bars)."""
    return x > background_level


def percentile_window(x: torch.Tensor, low: float = 1.0, high: float = 99.0, *,
                      background_level: float = 0.02) -> torch.Tensor:
    """Map the ``low``/``high`` percentiles of ``x``'s foreground to 0/1, clipped to [0, 1].

    ``x`` is a float image in [0, 1] of any shape. The percentiles are taken over the pixels
    above ``background_level``; an image with fewer than 16 of them uses all its pixels, and
    one whose window is narrower than 1/1000 (a blank image) is returned unchanged.
    """
    values = x[foreground_mask(x, background_level)]
    if values.numel() < 16:
        values = x.flatten()
    q = torch.quantile(values.float(), torch.tensor([low / 100.0, high / 100.0], dtype=torch.float32))
    lo, hi = float(q[0]), float(q[1])
    if hi - lo < 1e-3:
        return x
    return ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)


def clahe(x: torch.Tensor, *, clip: float = 0.01, tiles: int = 8) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalisation of a ``[1, H, W]`` (or ``[H, W]``) image.

    scikit-image's :func:`~skimage.exposure.equalize_adapthist` with a kernel of
    ``side / tiles`` pixels and ``clip_limit=clip``; a constant image is returned unchanged.
    """
    from skimage.exposure import equalize_adapthist

    image = x.detach().cpu().numpy().astype(np.float64)
    height, width = image.shape[-2:]
    plane = image.reshape(height, width)
    if float(plane.max() - plane.min()) < 1e-6:
        return x
    kernel = (max(2, height // tiles), max(2, width // tiles))
    out = equalize_adapthist(np.clip(plane, 0.0, 1.0), kernel_size=kernel, clip_limit=clip)
    return torch.from_numpy(out.astype(np.float32)).reshape(x.shape).to(x.device)


def preprocess_image(x: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """``config``'s window, CLAHE and gamma applied to a float image in [0, 1] (a new tensor)."""
    if config.is_identity:
        return x
    background = ~foreground_mask(x, config.background_level)
    y = x
    if config.window:
        y = percentile_window(y, config.low_percentile, config.high_percentile,
                              background_level=config.background_level)
    if config.clahe:
        y = clahe(y, clip=config.clahe_clip, tiles=config.clahe_tiles)
    if config.gamma != 1.0:
        y = y.clamp(0.0, 1.0).pow(config.gamma)
    y = y.clone() if y is x else y
    y[background] = 0.0
    return y


class Preprocess(nn.Module):
    """:func:`preprocess_image` as a transform step (``[1, H, W]`` float in [0, 1])."""

    def __init__(self, config: PreprocessConfig):
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return preprocess_image(x, self.config)

    def extra_repr(self) -> str:
        return repr(self.config)


class InputConfig(MskConfig):
    """What a model takes: the network input side and the preprocessing it was trained with.

    The msk counterpart of timm's ``pretrained_cfg``; the normalisation after it is fixed
    (:data:`msk.core.data.augment.GREY_MEAN`, :data:`msk.core.data.augment.GREY_STD`).
    """

    image_size: int = Field(ge=8, description="side of the network input")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig.none)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> InputConfig | None:
        """The input config of a checkpoint's saved job config (``None`` without an
        ``image_size``); without a ``preprocess`` key (checkpoints written before it existed)
        the preprocessing is :meth:`PreprocessConfig.none`."""
        if config.get("image_size") is None:
            return None
        raw = config.get("preprocess")
        preprocess = PreprocessConfig.none() if raw is None else PreprocessConfig.model_validate(raw)
        return cls(image_size=int(config["image_size"]), preprocess=preprocess)


def input_config_of(model: nn.Module) -> InputConfig | None:
    """The :class:`InputConfig` a model carries (``model.input_config``, also inside a DDP
    wrapper), or ``None``."""
    for candidate in (model, getattr(model, "module", None)):
        found = getattr(candidate, "input_config", None)
        if isinstance(found, InputConfig):
            return found
    return None


# -- augmentation options ----------------------------------------------------------------------


class CropAugment(MskConfig):
    """Random resized crop to the network input (otherwise: resize and centre crop)."""

    p: float = Field(1.0, ge=0, le=1, description="probability of a random crop")
    scale: tuple[float, float] = Field((0.4, 1.0), description="area of the crop, a fraction of the image")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="aspect ratio range of the crop")

    @model_validator(mode="after")
    def _check(self) -> CropAugment:
        _ordered(self.scale, "crop.scale")
        _ordered(self.ratio, "crop.ratio")
        if not (0 < self.scale[0] and self.scale[1] <= 1 and self.ratio[0] > 0):
            raise ValueError(f"crop.scale must lie in (0, 1] and crop.ratio be positive; got {self.scale}, "
                             f"{self.ratio}")
        return self


class RotationAugment(MskConfig):
    """Rotation by a uniform angle in ``[-degrees, degrees]`` (corners filled black)."""

    p: float = Field(1.0, ge=0, le=1, description="probability of a rotation")
    degrees: float = Field(10.0, ge=0, le=180, description="largest angle either way")


class GammaAugment(MskConfig):
    """``x ** g`` with ``g`` log-uniform in ``gamma`` (after the preprocessing: residual
    differences of the display curve)."""

    p: float = Field(0.5, ge=0, le=1, description="probability of a gamma change")
    gamma: tuple[float, float] = Field((0.7, 1.5), description="(low, high), both > 0")

    @model_validator(mode="after")
    def _check(self) -> GammaAugment:
        _ordered(self.gamma, "gamma.gamma")
        if self.gamma[0] <= 0:
            raise ValueError(f"gamma.gamma must be positive; got {self.gamma}")
        return self


class ContrastAugment(MskConfig):
    """Brightness and contrast jitter (torchvision ``ColorJitter``) after the preprocessing."""

    p: float = Field(0.8, ge=0, le=1, description="probability of a brightness and contrast jitter")
    brightness: float = Field(0.3, ge=0, le=1, description="brightness factor drawn from [1 - b, 1 + b]")
    contrast: float = Field(0.3, ge=0, le=1, description="contrast factor drawn from [1 - c, 1 + c]")


class BlurAugment(MskConfig):
    """Gaussian blur of the stored image (soft detectors, downscaled exports)."""

    p: float = Field(0.2, ge=0, le=1, description="probability of a blur")
    sigma: tuple[float, float] = Field((0.3, 1.2), description="standard deviation, in pixels of the network input")

    @model_validator(mode="after")
    def _check(self) -> BlurAugment:
        _ordered(self.sigma, "blur.sigma")
        if self.sigma[0] <= 0:
            raise ValueError(f"blur.sigma must be positive; got {self.sigma}")
        return self


class NoiseAugment(MskConfig):
    """Gaussian (electronic) or Poisson (quantum) noise on the stored image."""

    p: float = Field(0.2, ge=0, le=1, description="probability of noise")
    std: tuple[float, float] = Field((0.005, 0.03), description="Gaussian standard deviation, fraction of full scale")
    poisson: float = Field(0.5, ge=0, le=1, description="share of the noisy images that get Poisson noise instead")
    photons: tuple[float, float] = Field((30.0, 300.0), description="Poisson: expected counts at full scale "
                                                                    "(fewer: noisier), log-uniform")

    @model_validator(mode="after")
    def _check(self) -> NoiseAugment:
        _ordered(self.std, "noise.std")
        _ordered(self.photons, "noise.photons")
        if self.std[0] < 0 or self.photons[0] <= 0:
            raise ValueError("noise.std must be >= 0 and noise.photons > 0")
        return self


class JpegAugment(MskConfig):
    """JPEG compression artefacts: encode and decode at a random quality (Pillow)."""

    p: float = Field(0.2, ge=0, le=1, description="probability of JPEG compression")
    quality: tuple[int, int] = Field((25, 90), description="JPEG quality range, 1-95")

    @model_validator(mode="after")
    def _check(self) -> JpegAugment:
        _ordered(self.quality, "jpeg.quality")
        if self.quality[0] < 1 or self.quality[1] > 95:
            raise ValueError(f"jpeg.quality must lie in 1..95; got {self.quality}")
        return self


class LetterboxAugment(MskConfig):
    """Pad to a random aspect ratio with black, then resize back to a square: the content is
    squeezed between black bars, as an image of another shape squared by the ingest."""

    p: float = Field(0.4, ge=0, le=1, description="probability of a letterbox")
    max_aspect: float = Field(1.6, ge=1, le=4, description="largest long/short side ratio of the padded image")


class BorderAugment(MskConfig):
    """Black bars of random width on random sides (padding, collimation, cropped exports)."""

    p: float = Field(0.3, ge=0, le=1, description="probability of black bars")
    max_width: float = Field(0.15, gt=0, lt=0.5, description="widest bar, a fraction of the side")


class AugmentConfig(MskConfig):
    """Random training transforms (YAML key ``augmentation``), each with its probability.

    Order: on the stored image ``invert``, ``letterbox``, ``border``, ``jpeg``, ``blur`` and
    ``noise`` (differences between sources, which the preprocessing then sees as it would at
    serving time); then the preprocessing; then ``crop`` to the network input, ``hflip``,
    ``vflip``, ``rotation``, ``gamma`` and ``contrast``. A probability of 0 switches a
    transform off.
    """

    hflip: float = Field(0.5, ge=0, le=1, description="horizontal flip (left and right limbs are mirror images)")
    vflip: float = Field(0.0, ge=0, le=1, description="vertical flip (off: anatomy is not up-down symmetric)")
    invert: float = Field(0.1, ge=0, le=1, description="grey-level inversion (MONOCHROME1-like exports)")
    crop: CropAugment = Field(default_factory=CropAugment)
    rotation: RotationAugment = Field(default_factory=RotationAugment)
    gamma: GammaAugment = Field(default_factory=GammaAugment)
    contrast: ContrastAugment = Field(default_factory=ContrastAugment)
    blur: BlurAugment = Field(default_factory=BlurAugment)
    noise: NoiseAugment = Field(default_factory=NoiseAugment)
    jpeg: JpegAugment = Field(default_factory=JpegAugment)
    letterbox: LetterboxAugment = Field(default_factory=LetterboxAugment)
    border: BorderAugment = Field(default_factory=BorderAugment)

    @classmethod
    def legacy(cls, *, scale: tuple[float, float] = (0.4, 1.0), degrees: float = 10.0,
               jitter: float = 0.3, vertical_flip: float = 0.0) -> AugmentConfig:
        """The augmentation of msk before this config existed: random resized crop, horizontal
        flip, rotation and brightness/contrast jitter, always; nothing else."""
        return cls(hflip=0.5, vflip=vertical_flip, invert=0.0,
                   crop=CropAugment(p=1.0, scale=scale), rotation=RotationAugment(p=1.0, degrees=degrees),
                   gamma=GammaAugment(p=0.0), contrast=ContrastAugment(p=1.0, brightness=jitter, contrast=jitter),
                   blur=BlurAugment(p=0.0), noise=NoiseAugment(p=0.0), jpeg=JpegAugment(p=0.0),
                   letterbox=LetterboxAugment(p=0.0), border=BorderAugment(p=0.0))
