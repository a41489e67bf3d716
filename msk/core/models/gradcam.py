"""Grad-CAM heat maps of image classifiers, averaged over the models of a cross-validation.

Grad-CAM (Selvaraju et al., ICCV 2017) weights the feature maps of a convolutional layer by the
spatial mean of the gradient of a class logit and keeps the positive part: where the layer saw
evidence *for* that class. msk computes it with captum's ``LayerGradCam`` on the last layer of
the encoder that still has a spatial map (:func:`target_layer`), upsamples it to the network
input and scales each map to a maximum of 1, so that the maps of different models are
comparable. :func:`mean_cam` averages the maps of several models (the fold models of
:mod:`msk.core.stages.sorter.training`) per image; :func:`overlay` and :func:`save_overlays` draw them on the
radiograph.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from msk.core.data.augment import eval_transform, to_tensor
from msk.core.data.preprocess import PreprocessConfig, input_config_of

__all__ = ["grad_cam", "mean_cam", "overlay", "save_overlays", "target_layer"]


def target_layer(model: nn.Module, image_size: int) -> nn.Module:
    """The module of ``model.encoder`` that last outputs a spatial feature map.

    Found by tracing one forward pass of a blank ``image_size`` image: the module (container or
    leaf) whose output, in the order outputs are produced, is the last 4-D tensor larger than
    1 x 1. For a ResNet this is ``layer4``, for the tiny CNN its last ReLU.
    """
    encoder = model.encoder
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"{type(model).__name__}.encoder is not a torch module")
    found: list[nn.Module] = []

    def record(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-2:].numel() > 1:
            found.append(module)

    hooks = [m.register_forward_hook(record) for m in encoder.modules() if m is not encoder]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 1, image_size, image_size, device=_device(model)))
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    if not found:
        raise ValueError(f"{type(encoder).__name__} has no layer with a spatial feature map at "
                         f"{image_size} px; Grad-CAM needs a convolutional encoder")
    return found[-1]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _inputs(images: np.ndarray, image_size: int, preprocess: PreprocessConfig | None = None) -> torch.Tensor:
    """The deterministic network view of ``uint8 [N, S, S]`` images, ``[N, 1, size, size]``."""
    view = eval_transform(image_size, preprocess)
    return torch.stack([view(to_tensor(image)) for image in images])


def grad_cam(model: nn.Module, images: np.ndarray, targets: Sequence[int] | np.ndarray, *,
             image_size: int, layer: nn.Module | None = None, batch_size: int = 32,
             preprocess: PreprocessConfig | None = None) -> np.ndarray:
    """Grad-CAM of class ``targets[i]`` for ``images[i]``: ``float32 [N, image_size, image_size]``.

    :param model: an :class:`msk.core.models.train.ImageClassifier` (anything with an ``encoder`` and
        ``model(images) -> logits``).
    :param layer: the layer to explain; default :func:`target_layer`.
    :param preprocess: the input preprocessing; default the model's own (its ``input_config``,
        see :mod:`msk.core.data.preprocess`), none for a model without one.
    Each map is ReLU'd, bilinearly upsampled to the input size and divided by its maximum
    (a map without positive evidence stays all zero).
    """
    from captum.attr import LayerAttribution, LayerGradCam

    targets = np.asarray(targets, dtype=np.int64)
    if images.ndim != 3 or len(targets) != len(images):
        raise ValueError(f"need images [N, S, S] and one target per image; got {images.shape} "
                         f"and {len(targets)} targets")
    config = input_config_of(model)
    if preprocess is None and config is not None:
        preprocess = config.preprocess
    model.eval()
    layer = layer if layer is not None else target_layer(model, image_size)
    cam = LayerGradCam(model, layer)
    device = _device(model)
    maps = []
    for start in range(0, len(images), batch_size):
        x = _inputs(images[start:start + batch_size], image_size, preprocess).to(device)
        y = torch.from_numpy(targets[start:start + batch_size]).to(device)
        attr = cam.attribute(x, target=y, relu_attributions=True)
        up = LayerAttribution.interpolate(attr.detach(), (image_size, image_size), "bilinear")
        maps.append(up[:, 0].clamp_min(0).cpu())
    if not maps:
        return np.zeros((0, image_size, image_size), np.float32)
    out = torch.cat(maps)
    peak = out.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return (out / peak).numpy().astype(np.float32)


def mean_cam(models: Sequence[nn.Module], images: np.ndarray, targets: Sequence[int] | np.ndarray,
             *, image_size: int) -> np.ndarray:
    """The per-image mean of the models' (max-normalised) Grad-CAM maps, ``[N, size, size]``."""
    if not models:
        raise ValueError("mean_cam needs at least one model")
    total = np.zeros((len(images), image_size, image_size), np.float32)
    for model in models:
        total += grad_cam(model, images, targets, image_size=image_size)
    return total / len(models)


def overlay(image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.45,
            colormap: str = "jet") -> np.ndarray:
    """``uint8 [H, W, 3]``: the grey ``image`` with ``cam`` (values in [0, 1]) as a colour map.

    ``cam`` is resized to the image; the colour is blended in proportion to ``alpha * cam``, so
    regions without evidence keep the plain radiograph.
    """
    from matplotlib import colormaps
    from PIL import Image

    if image.ndim != 2:
        raise ValueError(f"overlay needs a grey image [H, W], got shape {image.shape}")
    h, w = image.shape
    resized = Image.fromarray(np.asarray(cam, np.float32)).resize((w, h), Image.Resampling.BILINEAR)
    resized = np.clip(np.asarray(resized), 0.0, 1.0)
    colour = colormaps[colormap](resized)[..., :3]
    grey = np.repeat((image.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    weight = alpha * resized[..., None]
    return np.round(255 * ((1 - weight) * grey + weight * colour)).astype(np.uint8)


def save_overlays(images: np.ndarray, cams: np.ndarray, path: str | os.PathLike, *,
                  titles: Sequence[str] | None = None, columns: int = 4,
                  title: str | None = None) -> Path:
    """A PNG grid of :func:`overlay` tiles, one per image, each with its title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(images) != len(cams) or (titles is not None and len(titles) != len(images)):
        raise ValueError(f"{len(images)} images, {len(cams)} maps and "
                         f"{'no' if titles is None else len(titles)} titles")
    n = max(len(images), 1)
    columns = min(columns, n)
    rows = -(-n // columns)
    fig = Figure(figsize=(2.6 * columns, 2.8 * rows + (0.4 if title else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title)
    for i, (image, cam) in enumerate(zip(images, cams)):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(overlay(image, cam))
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
