"""What the three model deployments share: set-up, batching options, refusals and debug hooks.

A model deployment never raises for bad input: it returns a :class:`Rejection`, which the
gateway turns into the JSON error (an exception would travel through Ray and be logged with its
message by Serve; a rejection is logged by nobody). Exceptions are left for real faults.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from msk.core.models.metrics import softmax
from msk.serve.config import ModelConfig

__all__ = ["ModelReplica", "Rejection", "gradcam_png", "softmax"]

logger = logging.getLogger("ray.serve.msk")


@dataclass(frozen=True)
class Rejection:
    """A request the model refuses: HTTP status, error code and a PHI-free message."""

    status: int
    code: str
    message: str


def gradcam_png(image: np.ndarray, cam: np.ndarray) -> str:
    """Base64 PNG of :func:`msk.core.models.gradcam.overlay` of ``cam`` on the grey ``image``."""
    from PIL import Image

    from msk.core.models.gradcam import overlay

    buffer = io.BytesIO()
    Image.fromarray(overlay(image, cam)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class ModelReplica:
    """Base of the model deployments.

    Subclasses define one ``@serve.batch`` method and name it in :attr:`batched`; its batch
    size and wait come from the config (:meth:`configure`). ``debug`` enables :meth:`crash` and
    :meth:`stall`, which the gateway's debug routes (tests only) call.
    """

    batched: str = ""

    def configure(self, config: ModelConfig, *, debug: bool) -> None:
        import torch

        torch.set_num_threads(config.torch_threads)
        self.device = torch.device("cuda" if config.use_gpu else "cpu")
        if config.use_gpu and not torch.cuda.is_available():
            raise RuntimeError("use_gpu is set but torch sees no CUDA device in this replica")
        method = getattr(self, self.batched)
        method.set_max_batch_size(config.max_batch_size)
        method.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.debug = debug

    async def describe(self) -> dict[str, Any]:
        """What the model is (for ``/v1/models`` and ``/readyz``)."""
        raise NotImplementedError

    async def crash(self) -> None:
        """Debug only: end this replica's process at once (Serve starts a new one)."""
        if not self.debug:
            raise PermissionError("debug hooks are off")
        logger.warning("debug crash requested: exiting the replica process")
        os._exit(1)

    async def stall(self, seconds: float) -> str:
        """Debug only: answer after ``seconds`` (to exercise the gateway's timeout)."""
        if not self.debug:
            raise PermissionError("debug hooks are off")
        await asyncio.sleep(seconds)
        return "done"
