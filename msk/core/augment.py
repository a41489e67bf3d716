"""Input pipeline of DeepCluster: grey images to tensors, augmentations, and the Sobel filter.

Images enter as ``uint8`` arrays ``[S, S]``. :func:`eval_transform` gives the deterministic view
used to compute features (resize + centre crop), :func:`train_transform` the random view used to
train on pseudo-labels (random resized crop, flips, a small rotation, brightness/contrast), both
ending in the same normalisation. :class:`SobelFilter` is DeepCluster's fixed first layer: it
turns one grey channel into its horizontal and vertical gradients, which removes the shortcut of
clustering on global brightness and contrast (Caron et al. 2018, section 3.4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

#: Grey value mapped to 0 and the scale of the normalisation (images in [0, 1]).
GREY_MEAN, GREY_STD = 0.5, 0.25

Transform = Callable[[torch.Tensor], torch.Tensor]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W]`` -> ``float32 [1, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0).float().div_(255.0)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - GREY_MEAN) / GREY_STD


def eval_transform(image_size: int) -> Transform:
    """Resize the shorter side to ``image_size`` and take the centre square (no randomness)."""
    return v2.Compose([
        v2.Resize(image_size, antialias=True),
        v2.CenterCrop(image_size),
        v2.Lambda(_normalize),
    ])


def train_transform(image_size: int, *, scale: tuple[float, float] = (0.4, 1.0),
                    degrees: float = 10.0, jitter: float = 0.3,
                    vertical_flip: float = 0.0) -> Transform:
    """DeepCluster's training view for grey radiographs.

    Random resized crop (``scale`` of the area), horizontal flip (radiographs of left and right
    limbs are mirror images), optional vertical flip, a rotation of up to ``degrees``, and
    brightness/contrast jitter of ``jitter``.
    """
    steps: list[nn.Module] = [
        v2.RandomResizedCrop(image_size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if vertical_flip:
        steps.append(v2.RandomVerticalFlip(vertical_flip))
    steps += [
        v2.RandomRotation(degrees),
        v2.ColorJitter(brightness=jitter, contrast=jitter),
        v2.Lambda(_normalize),
    ]
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
