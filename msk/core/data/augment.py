"""Input pipeline of the networks: grey images to tensors, augmentations, and the Sobel filter.

Images enter as ``uint8`` arrays ``[S, S]``. :func:`eval_transform` gives the deterministic view
used to compute features and predictions (the model's preprocessing, see
:mod:`msk.core.data.preprocess`, then resize + centre crop), :func:`augmented_view` the random view
used to train (the transforms of :class:`msk.core.data.preprocess.AugmentConfig`; each draws from
torch's random generator, which the DataLoader seeds per worker), both ending in the same
normalisation. :func:`train_transform` is the augmentation msk had before
:class:`~msk.core.data.preprocess.AugmentConfig` (random resized crop, flips, a small rotation,
brightness/contrast). :class:`SobelFilter` is DeepCluster's fixed first layer: it turns one grey
channel into its horizontal and vertical gradients, which removes the shortcut of clustering on
global brightness and contrast (Caron et al. 2018, section 3.4).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from msk.core.data.preprocess import AugmentConfig, Preprocess, PreprocessConfig

#: Grey value mapped to 0 and the scale of the normalisation (images in [0, 1]).
GREY_MEAN, GREY_STD = 0.5, 0.25

Transform = Callable[[torch.Tensor], torch.Tensor]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W]`` -> ``float32 [1, H, W]`` in [0, 1] (a copy: read-only arrays, e.g. from Ray's
    object store, are fine)."""
    return torch.tensor(image, dtype=torch.float32).unsqueeze(0).div_(255.0)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - GREY_MEAN) / GREY_STD


def _preprocess_steps(preprocess: PreprocessConfig | None) -> list[nn.Module]:
    return [] if preprocess is None or preprocess.is_identity else [Preprocess(preprocess)]


def eval_transform(image_size: int, preprocess: PreprocessConfig | None = None) -> Transform:
    """The deterministic network view: ``preprocess`` (none by default), resize the shorter side
    to ``image_size``, take the centre square, normalise."""
    return v2.Compose([
        *_preprocess_steps(preprocess),
        v2.Resize(image_size, antialias=True),
        v2.CenterCrop(image_size),
        v2.Lambda(_normalize),
    ])


def train_transform(image_size: int, *, scale: tuple[float, float] = (0.4, 1.0),
                    degrees: float = 10.0, jitter: float = 0.3,
                    vertical_flip: float = 0.0) -> Transform:
    """The classic training view for grey radiographs (no preprocessing).

    Random resized crop (``scale`` of the area), horizontal flip (radiographs of left and right
    limbs are mirror images), optional vertical flip, a rotation of up to ``degrees``, and
    brightness/contrast jitter of ``jitter``: :func:`augmented_view` of
    :meth:`AugmentConfig.legacy <msk.core.data.preprocess.AugmentConfig.legacy>`.
    """
    config = AugmentConfig.legacy(scale=scale, degrees=degrees, jitter=jitter, vertical_flip=vertical_flip)
    return augmented_view(image_size, config)


# -- random transforms on [1, H, W] float images in [0, 1] --------------------------------------


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _log_uniform(low: float, high: float) -> float:
    return math.exp(_uniform(math.log(low), math.log(high)))


class _RandomStep(nn.Module):
    """Applies :meth:`change` with probability ``p`` (drawn from torch's generator)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def change(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or (self.p < 1 and float(torch.rand(())) >= self.p):
            return x
        return self.change(x)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RandomInvert(_RandomStep):
    """``1 - x``: the grey scale of a MONOCHROME1-like export (bone dark)."""

    def change(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 - x


class RandomLetterbox(_RandomStep):
    """Pad with black to a random aspect ratio in ``[1, max_aspect]`` (along a random axis,
    centred), then resize back to the input's size: the content is squeezed between black bars
    (at least one pixel each), as the ingest squares an image of that shape."""

    def __init__(self, p: float, max_aspect: float):
        super().__init__(p)
        self.max_aspect = max_aspect

    def change(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        aspect = _uniform(1.0, self.max_aspect)
        out = torch.zeros_like(x)
        if float(torch.rand(())) < 0.5:
            inner = min(w - 2, round(w / aspect))
            if inner < 1:
                return x
            left = (w - inner) // 2
            out[..., :, left:left + inner] = F.resize(x, [h, inner], antialias=True)
        else:
            inner = min(h - 2, round(h / aspect))
            if inner < 1:
                return x
            top = (h - inner) // 2
            out[..., top:top + inner, :] = F.resize(x, [inner, w], antialias=True)
        return out.clamp_(0.0, 1.0)


class RandomBorder(_RandomStep):
    """Black bars on random sides (each side with probability 1/2, at least one), each 1 pixel
    to ``max_width`` of the side wide."""

    def __init__(self, p: float, max_width: float):
        super().__init__(p)
        self.max_width = max_width

    def change(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        sides = torch.rand(4) < 0.5
        if not bool(sides.any()):
            sides[int(torch.randint(4, ()))] = True
        widths = torch.rand(4) * self.max_width
        y = x.clone()
        top, bottom, left, right = (max(1, round(float(f) * n)) for f, n in zip(widths, (h, h, w, w)))
        if sides[0] and top:
            y[..., :top, :] = 0.0
        if sides[1] and bottom:
            y[..., h - bottom:, :] = 0.0
        if sides[2] and left:
            y[..., :, :left] = 0.0
        if sides[3] and right:
            y[..., :, w - right:] = 0.0
        return y


class RandomJpeg(_RandomStep):
    """Encode as JPEG at a quality drawn from ``quality`` and decode again (Pillow)."""

    def __init__(self, p: float, quality: tuple[int, int]):
        super().__init__(p)
        self.quality = quality

    def change(self, x: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        quality = int(torch.randint(self.quality[0], self.quality[1] + 1, ()))
        pixels = (x.reshape(x.shape[-2:]).clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        decoded = np.asarray(Image.open(buffer).convert("L"))
        return torch.from_numpy(decoded.astype(np.float32) / 255.0).reshape(x.shape).to(x.device)


class RandomBlur(_RandomStep):
    """Gaussian blur, ``sigma`` in pixels of the network input (scaled to the image's side)."""

    def __init__(self, p: float, sigma: tuple[float, float], image_size: int):
        super().__init__(p)
        self.sigma, self.image_size = sigma, image_size

    def change(self, x: torch.Tensor) -> torch.Tensor:
        side = min(x.shape[-2:])
        sigma = _uniform(*self.sigma) * max(x.shape[-2:]) / self.image_size
        kernel = min(2 * math.ceil(3 * sigma) + 1, side if side % 2 else side - 1)
        if kernel < 3:
            return x
        return F.gaussian_blur(x, [kernel, kernel], [sigma, sigma])


class RandomNoise(_RandomStep):
    """Poisson noise (share ``poisson``; ``photons`` counts at full scale) or additive
    Gaussian noise (standard deviation drawn from ``std``), clipped to [0, 1]."""

    def __init__(self, p: float, std: tuple[float, float], poisson: float, photons: tuple[float, float]):
        super().__init__(p)
        self.std, self.poisson, self.photons = std, poisson, photons

    def change(self, x: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(())) < self.poisson:
            photons = _log_uniform(*self.photons)
            return (torch.poisson(x.clamp(0, 1) * photons) / photons).clamp_(0.0, 1.0)
        return (x + torch.randn_like(x) * _uniform(*self.std)).clamp_(0.0, 1.0)


class RandomGamma(_RandomStep):
    """``x ** g``, ``g`` log-uniform in ``gamma``."""

    def __init__(self, p: float, gamma: tuple[float, float]):
        super().__init__(p)
        self.gamma = gamma

    def change(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0).pow(_log_uniform(*self.gamma))


class _CropOrCentre(_RandomStep):
    """A random resized crop with probability ``p``, else the centre view."""

    def __init__(self, p: float, crop: nn.Module, centre: nn.Module):
        super().__init__(p)
        self.crop, self.centre = crop, centre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.crop(x) if float(torch.rand(())) < self.p else self.centre(x)


def augmented_view(image_size: int, augmentation: AugmentConfig,
                   preprocess: PreprocessConfig | None = None) -> Transform:
    """The random training view ``augmentation`` describes, around ``preprocess``.

    Source-like changes on the stored image (inversion, letterbox, borders, JPEG, blur, noise),
    then the preprocessing the model is served with, then crop to ``image_size``, flips,
    rotation, gamma, brightness/contrast and the normalisation. Transforms with probability 0
    are left out, and those with probability 1 run without a draw, so the classic configuration
    (:meth:`AugmentConfig.legacy`) is exactly :func:`train_transform`'s pipeline.
    """
    a = augmentation
    steps: list[nn.Module] = []
    if a.invert:
        steps.append(RandomInvert(a.invert))
    if a.letterbox.p:
        steps.append(RandomLetterbox(a.letterbox.p, a.letterbox.max_aspect))
    if a.border.p:
        steps.append(RandomBorder(a.border.p, a.border.max_width))
    if a.jpeg.p:
        steps.append(RandomJpeg(a.jpeg.p, a.jpeg.quality))
    if a.blur.p:
        steps.append(RandomBlur(a.blur.p, a.blur.sigma, image_size))
    if a.noise.p:
        steps.append(RandomNoise(a.noise.p, a.noise.std, a.noise.poisson, a.noise.photons))
    steps += _preprocess_steps(preprocess)
    crop = v2.RandomResizedCrop(image_size, scale=a.crop.scale, ratio=a.crop.ratio, antialias=True)
    centre = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
    steps.append(crop if a.crop.p >= 1 else centre if a.crop.p <= 0 else _CropOrCentre(a.crop.p, crop, centre))
    if a.hflip:
        steps.append(v2.RandomHorizontalFlip(a.hflip))
    if a.vflip:
        steps.append(v2.RandomVerticalFlip(a.vflip))
    if a.rotation.p:
        rotate = v2.RandomRotation(a.rotation.degrees)
        steps.append(rotate if a.rotation.p >= 1 else v2.RandomApply([rotate], p=a.rotation.p))
    if a.gamma.p:
        steps.append(RandomGamma(a.gamma.p, a.gamma.gamma))
    if a.contrast.p:
        jitter = v2.ColorJitter(brightness=a.contrast.brightness, contrast=a.contrast.contrast)
        steps.append(jitter if a.contrast.p >= 1 else v2.RandomApply([jitter], p=a.contrast.p))
    steps.append(v2.Lambda(_normalize))
    return v2.Compose(steps)


class ImageArrayDataset(Dataset):
    """Items ``(transform(image), label)`` of a ``uint8 [N, S, S]`` array and int labels."""

    def __init__(self, images: np.ndarray, labels: Sequence[int] | np.ndarray | None,
                 transform: Transform):
        if images.ndim != 3:
            raise ValueError(f"images must be a [N, S, S] array, got shape {images.shape}")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = -1 if self.labels is None else int(self.labels[index])
        return self.transform(to_tensor(self.images[index])), label


class SobelFilter(nn.Module):
    """Fixed (non-trainable) Sobel layer: ``[B, 1, H, W]`` grey -> ``[B, 2, H, W]`` gradients.

    The original DeepCluster first converts RGB to grey with a fixed 1x1 convolution; our inputs
    are grey already, so only the two 3x3 Sobel kernels remain. The kernels are a buffer, so they
    are saved with the model but never updated by an optimiser.
    """

    out_chans = 2
    weight: torch.Tensor  # the registered buffer [2, 1, 3, 3]

    def __init__(self) -> None:
        super().__init__()
        gx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("weight", torch.stack([gx, gx.t()]).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1:
            raise ValueError(f"SobelFilter expects one grey channel, got {x.shape[1]}")
        return nn.functional.conv2d(x, self.weight, padding=1)


def input_layer(sobel: bool) -> nn.Module:
    """The fixed layer in front of the encoder: :class:`SobelFilter` or the identity."""
    return SobelFilter() if sobel else nn.Identity()


def encoder_in_chans(sobel: bool) -> int:
    """Channels the encoder sees: 2 Sobel gradients, or 1 grey channel."""
    return SobelFilter.out_chans if sobel else 1
