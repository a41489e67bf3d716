"""Machine profiles: the sizes and epochs a training command uses when the user does not say.

The configs' own defaults (``TrainConfig``, ``DeepClusterConfig``, ...) are the full settings of
the methods (128 px inputs, 10 epochs, 5 folds), which take hours on a laptop's CPU: ``msk train
sorter`` on 3,000 images ran 2.1 h on 2 CPUs with them. The training commands therefore take
``--profile auto|cpu|gpu`` (env ``MSK_PROFILE``; ``auto``: ``gpu`` when torch sees a CUDA device
and ``--no-gpu`` was not given, else ``cpu``) and :func:`apply_profile` fills in the
:data:`PROFILES` values of that profile for every option the user left unset: an option given on
the command line or in the ``--config`` file always wins (pydantic's ``model_fields_set`` tells
them apart). A run folder that already holds a ``config.yaml`` keeps its recorded values, so a
run resumes with the sizes it started with on any machine.

The Python API is not affected: a config built in Python has the class defaults. The table is
documented in ``docs/profiles.md``, with the measured epoch times behind the CPU profile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from msk.core.errors import ConfigError

__all__ = ["PROFILES", "PROFILE_NAMES", "AppliedProfile", "apply_profile", "choose_profile", "set_options"]

C = TypeVar("C", bound=BaseModel)

#: The profile names ``--profile`` takes.
PROFILE_NAMES = ("auto", "cpu", "gpu")

#: task -> profile -> {option (dotted for nested configs): value}. The CPU profile keeps one Ray
#: Train worker where a command trains few long runs (cluster, sorter, segmenter): the worker runs
#: torch on one thread, which on a shared, loaded machine measured 8.2 s per sorter epoch where the
#: same epoch in process with torch's two threads took 121.7 s (docs/profiles.md). Commands that
#: train many short runs (transfer, fusion, recommender) stay in process: a Ray Train start costs
#: 15-40 s per run.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "cluster": {  # DeepClusterConfig
        "cpu": {"image_size": 64, "epochs": 5, "batch_size": 64, "num_workers": 1},
        "gpu": {"image_size": 128, "epochs": 10, "batch_size": 128, "num_workers": 1, "use_gpu": True,
                "loader_workers": 4},
    },
    "sorter": {  # SorterConfig
        "cpu": {"image_size": 64, "epochs": 5, "folds": 3, "batch_size": 32, "num_workers": 1},
        "gpu": {"image_size": 128, "epochs": 10, "folds": 5, "batch_size": 64, "num_workers": 1,
                "use_gpu": True},
    },
    "segmenter": {  # SegmenterConfig (image_size a multiple of 32)
        "cpu": {"image_size": 64, "epochs": 5, "folds": 3, "batch_size": 16, "num_workers": 1},
        "gpu": {"image_size": 128, "epochs": 10, "folds": 5, "batch_size": 32, "num_workers": 1,
                "use_gpu": True},
    },
    "transfer": {  # TransferConfig (every arm, every fold)
        "cpu": {"image_size": 64, "epochs": 5, "folds": 3, "batch_size": 32, "num_workers": 0},
        "gpu": {"image_size": 128, "epochs": 10, "folds": 5, "batch_size": 64, "num_workers": 0,
                "use_gpu": True},
    },
    "fusion": {  # FusionConfig: its train block is already CPU-sized (tiny-cnn, 64 px)
        "cpu": {"train.epochs": 10, "train.num_workers": 0},
        "gpu": {"train.epochs": 20, "train.num_workers": 0, "train.use_gpu": True},
    },
    "recommender": {  # RecommenderEvalConfig: every classifier and the DeepCluster embedding
        "cpu": {"training.epochs": 5, "deepcluster.epochs": 3, "num_workers": 0},
        "gpu": {"training.epochs": 10, "deepcluster.epochs": 5, "num_workers": 0},
    },
}


def choose_profile(name: str | None, *, use_gpu: bool | None = None) -> tuple[str, str]:
    """``(profile, why)``: ``cpu`` or ``gpu`` for ``name`` (``auto``/None: by the machine)."""
    name = (name or "auto").strip().lower()
    if name not in PROFILE_NAMES:
        raise ConfigError(f"--profile {name!r}: expected one of {', '.join(PROFILE_NAMES)}")
    if name != "auto":
        return name, "chosen"
    if use_gpu is False:
        return "cpu", "--no-gpu"
    import torch

    if torch.cuda.is_available():
        return "gpu", f"torch sees {torch.cuda.device_count()} CUDA device(s)"
    return "cpu", "torch sees no CUDA device"


@dataclass
class AppliedProfile:
    """What :func:`apply_profile` did: the profile, why, and the options it set or kept."""

    name: str
    why: str
    applied: dict[str, Any]
    kept: dict[str, Any]

    def line(self) -> str:
        """One line for the console: the profile and every option it decided."""
        def show(values: dict[str, Any]) -> str:
            return ", ".join(f"{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items())

        text = f"profile {self.name} ({self.why})"
        if self.applied:
            text += f": {show(self.applied)}"
        if self.kept:
            text += f"; as the run folder records: {show(self.kept)}"
        return text + "; options you set win (--profile cpu|gpu to choose)"


def _is_set(config: BaseModel, dotted: str) -> bool:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, BaseModel) or part not in node.model_fields_set:
            return False
        node = getattr(node, part)
    return True


def _lookup(data: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _put(data: dict[str, Any], config: BaseModel, dotted: str, value: Any) -> None:
    """Set ``dotted`` in ``data`` (``config``'s set options), copying nested blocks as needed."""
    *parents, leaf = dotted.split(".")
    node, model = data, config
    for part in parents:
        model = getattr(model, part)
        if not isinstance(node.get(part), dict):
            node[part] = model.model_dump(exclude_unset=True)  # a default block: its own values
        node = node[part]
    node[leaf] = value


def set_options(config: C, options: dict[str, Any]) -> C:
    """``config`` with ``options`` (dotted names reach into nested configs, e.g.
    ``train.image_size``; None values are skipped), validated; a nested block keeps its other
    values. For command-line options of nested configs, which ``load_config`` would replace whole."""
    options = {k: v for k, v in options.items() if v is not None}
    if not options:
        return config
    data = config.model_dump(exclude_unset=True)
    for option, value in options.items():
        _put(data, config, option, value)
    try:
        return type(config).model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"options {', '.join(options)}: invalid {type(config).__name__}: {problems}") from None


def _saved(run_dir: str | os.PathLike | None) -> dict[str, Any]:
    if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
        return {}
    from msk.core.config import read_yaml_mapping

    return read_yaml_mapping(Path(run_dir) / "config.yaml", "run config")


def apply_profile(config: C, task: str, profile: str | None = "auto", *,
                  run_dir: str | os.PathLike | None = None) -> tuple[C, AppliedProfile]:
    """``config`` with the :data:`PROFILES` values of ``task`` for the options it leaves unset.

    :param profile: ``auto`` (or None), ``cpu`` or ``gpu`` (:func:`choose_profile`).
    :param run_dir: the command's run folder; where it holds a ``config.yaml`` (a run being
        resumed), unset options take the values recorded there instead of the profile's.
    :return: the new config (validated; the decided options count as set) and what was done.
    """
    if task not in PROFILES:
        raise ValueError(f"no profile for task {task!r}; known: {', '.join(PROFILES)}")
    use_gpu = getattr(config, "use_gpu", None) if _is_set(config, "use_gpu") else None
    name, why = choose_profile(profile, use_gpu=use_gpu)
    saved = _saved(run_dir)
    data = config.model_dump(exclude_unset=True)
    applied, kept = {}, {}
    for option, value in PROFILES[task][name].items():
        if _is_set(config, option):
            continue
        found, recorded = _lookup(saved, option)
        if found:
            kept[option] = recorded
            _put(data, config, option, recorded)
        else:
            applied[option] = value
            _put(data, config, option, value)
    if not applied and not kept:
        return config, AppliedProfile(name, why, applied, kept)
    try:
        return type(config).model_validate(data), AppliedProfile(name, why, applied, kept)
    except ValidationError as exc:  # e.g. a profile size that another option of the config rules out
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"profile {name} ({', '.join(f'{k} {v}' for k, v in applied.items())}) does not fit "
                          f"the options given: {problems}; set those options yourself") from None
