"""Where a training loop runs: in this process, or on Ray Train workers.

Training loops in msk (DeepCluster, supervised classifiers) are written once against the small
:class:`Workers` interface (rank, device, model preparation, two collectives, reporting) and run
either in the calling process (``num_workers=0``: tests, notebooks, one GPU box) or as one
``TorchTrainer`` run on a Ray cluster (``num_workers>=1``, CPU or GPU, DDP). One Ray Train run
covers all epochs, so its start-up cost (~15-20 s on a 2-core machine) is paid once per job.

Inside a Ray Tune trial (:func:`reporting_to_tune`, see :mod:`msk.core.stages.tuning.search`) every epoch's
report also reaches Tune: directly from this process, or from the Ray Train run through Ray's
``TuneReportCallback``, the Train-inside-Tune pattern Ray documents for Train V2. A Ray Train
run writes ``workers/rank-<k>.json`` (node id, host, device) into its storage folder, so a run
on a cluster records where each rank ran.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from msk.core.errors import MskError

_TO_TUNE = contextvars.ContextVar("msk_report_to_tune", default=False)


@contextlib.contextmanager
def reporting_to_tune():
    """Within this block (inside a Ray Tune trial function), training reports go to Tune."""
    token = _TO_TUNE.set(True)
    try:
        yield
    finally:
        _TO_TUNE.reset(token)


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if v is not None}


class Workers(Protocol):
    """What a training loop needs from its execution environment."""

    rank: int
    world_size: int
    device: Any

    def prepare(self, model): ...

    def all_sum(self, array: np.ndarray) -> np.ndarray: ...

    def broadcast(self, array: np.ndarray | None, shape: tuple[int, ...], dtype) -> np.ndarray: ...

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None: ...

    def restored_checkpoint(self) -> Path | None: ...


class LocalWorkers:
    """A single process: no Ray, no communication."""

    rank, world_size = 0, 1

    def __init__(self, use_gpu: bool = False):
        if use_gpu and not torch.cuda.is_available():
            raise MskError("use_gpu=True but torch sees no CUDA device")
        self.device = torch.device("cuda" if use_gpu else "cpu")

    def prepare(self, model):
        return model.to(self.device)

    def all_sum(self, array):
        return array

    def broadcast(self, array, shape, dtype):
        return array

    def report(self, metrics, checkpoint):
        if _TO_TUNE.get():
            import ray.tune

            ray.tune.report(_clean(metrics))

    def restored_checkpoint(self):
        return None


class RayWorkers:
    """One Ray Train worker: rank, device, DDP and collectives over ``torch.distributed``."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    def all_sum(self, array):
        if not self._distributed():
            return array
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)  # NCCL: on GPU
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def broadcast(self, array, shape, dtype):
        if not self._distributed():
            return array
        tensor = torch.from_numpy(array) if self.rank == 0 else torch.empty(shape, dtype=dtype)
        tensor = tensor.to(self.device)
        dist.broadcast(tensor, src=0)
        return tensor.cpu().numpy()

    def report(self, metrics, checkpoint):
        """Report the epoch's metrics to Ray Train. ``checkpoint`` is not handed to Ray: rank 0
        has already written it into the run folder (the source of truth for resuming), and a
        Ray ``Checkpoint`` would copy it a second time under ``storage/ray`` (134 MB per epoch
        for a resnet18 with its optimizer state)."""
        import ray.train

        ray.train.report(_clean(metrics))

    def restored_checkpoint(self):
        """The checkpoint Ray Train restores after a worker failure, if any (copied locally).
        msk reports no checkpoints to Ray, so this is None unless a loop reports its own."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        local = Path(checkpoint.to_directory(tempfile.mkdtemp(prefix="msk-restore-")))
        files = sorted(local.glob("*.pt"))
        return files[0] if files else None


LoopFn = Callable[[dict[str, Any], Workers], None]


def placement() -> dict[str, Any]:
    """Where this process runs: Ray node id, host and pid (the run folders' placement records)."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "pid": os.getpid()}


def _record_placement(storage: Path, workers: RayWorkers) -> None:
    folder = storage / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{workers.rank}.json").write_text(json.dumps({
        "rank": workers.rank, "world_size": workers.world_size, **placement(),
        "device": str(workers.device)}))


def _ray_entry(loop: LoopFn, payload: dict[str, Any], storage: str) -> None:
    import ray

    from msk.core.runtime.ray_start import quiet_worker

    quiet_worker()
    payload = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in payload.items()}
    workers = RayWorkers()
    _record_placement(Path(storage), workers)
    loop(payload, workers)


def run_workers(loop: LoopFn, payload: dict[str, Any], *, num_workers: int, use_gpu: bool,
                storage: Path, name: str, max_failures: int = 0) -> None:
    """Run ``loop(payload, workers)`` here (``num_workers=0``) or on Ray Train workers.

    On Ray, numpy arrays in ``payload`` travel through the object store (``ray.put``), Ray is
    started if it is not running (``RAY_ADDRESS`` picks a cluster), run state goes under
    ``storage/ray``, each rank records where it ran in ``storage/workers/rank-<k>.json`` and
    a failure on a worker is raised here as an :class:`MskError`. ``storage`` must be shared by
    the nodes on a cluster (rank 0 writes checkpoints there). A worker that dies (killed, out of
    memory, its node lost) makes Ray Train restart the worker group up to ``max_failures`` times
    (``FailureConfig``); ``loop`` then runs again and must resume from what it wrote to
    ``storage`` (the training loop resumes after the last epoch checkpoint of its run folder).
    """
    if num_workers == 0:
        loop(payload, LocalWorkers(use_gpu))
        return

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from msk.core.runtime.ray_start import start_ray, train_logging_config

    start_ray()
    shipped = {k: ray.put(v) if isinstance(v, np.ndarray) else v for k, v in payload.items()}
    callbacks = []
    if _TO_TUNE.get():
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    storage = Path(storage).absolute()
    trainer = TorchTrainer(
        functools.partial(_ray_entry, loop, storage=str(storage)),
        train_loop_config=shipped,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        # mypy reads ray.train's Train v1 RunConfig; at run time it is v2's (Ray's default), which has
        # logging_config and takes Train v2 callbacks such as TuneReportCallback
        run_config=RunConfig(name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",  # type: ignore[call-arg]
                             storage_path=str(storage / "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             callbacks=callbacks,  # type: ignore[arg-type]
                             failure_config=FailureConfig(max_failures=max_failures),
                             logging_config=train_logging_config()),
    )
    try:
        trainer.fit()
    except Exception as exc:  # ray.train.TrainingFailedError wraps the worker's exception
        cause = exc.__cause__ or exc
        raise MskError(f"{name} failed on a Ray Train worker: {cause}") from exc
