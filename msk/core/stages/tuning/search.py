"""Hyperparameter search with Ray Tune over msk's training tasks (``msk tune``).

A **task** is a training command whose config is tuned; each trial trains on one patient-level
split of the task's development data (its test set is never seen) and reports a validation
metric after every epoch, which the ASHA scheduler uses to stop poor trials early:

============  ==========================  =====================================  ==============================
task          config (``--config``)       a trial trains                         metric (max)
============  ==========================  =====================================  ==============================
sorter        ``msk train sorter``        the sorter on fold 1 of its CV plan    ``val_accuracy``
fusion        ``msk eval fusion``         the first head of ``heads``, fold 1    ``val_accuracy``
recommender   ``msk eval recommender``    its first classifier (the encoder the  ``val_vote_accuracy``: k-NN
                                          recommender embeds with), seed 1       vote over the training images
============  ==========================  =====================================  ==============================

A **search space** is YAML (the defaults are ``tune/<task>.yaml`` in the repository) mapping
config keys -- dotted for nested ones, ``train.lr`` -- to a distribution or a constant::

    lr: {loguniform: [1.0e-4, 3.0e-3]}
    batch_size: {choice: [16, 32, 64]}
    aug_prob: {uniform: [0.3, 1.0]}
    epochs: {randint: [4, 12]}        # both ends included
    image_size: 64                    # a constant

The recommender task also takes ``encoder`` (its first classifier's encoder) and ``k`` (added
to ``ks``). The space is checked before Ray starts: every key must be an option of the task's
config, every choice and range end must give a valid config, and a float range on an integer
option is an error.

Trials follow the Train-inside-Tune pattern Ray documents for Ray Train V2: each Tune trial is
a driver that runs :func:`msk.core.models.train.fit`, which with ``num_workers >= 1`` launches a
``TorchTrainer`` whose per-epoch reports reach Tune through ``TuneReportCallback``; with
``num_workers=0`` the trial trains in its own process (cheaper for small models on CPUs; with
``use_gpu`` each trial actor gets one GPU). At most as many trials run at once as the cluster
can give all their workers.

The result folder holds ``best.yaml`` (the best trial's full config, accepted by the task's
training command), ``trials.csv`` (one row per trial: parameters, best metric, epochs run,
status), ``trials/<trial id>/`` (each trial's training run, with ``trial.json``: its parameters
and the node it ran on) and ``ray/`` (Tune's state).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError

from msk.core.config import MskConfig, read_yaml_mapping
from msk.core.errors import ConfigError, MskError

__all__ = ["DISTRIBUTIONS", "SearchSpace", "StateApiWarning", "TASKS", "TuneError", "TuneOptions", "TuneResult",
           "default_space_path", "get_task", "load_space", "load_task_data", "trial_resources", "tune_task"]

#: the distributions a search space may use (besides constants)
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


class TuneError(MskError):
    """A search that cannot start or in which no trial finished."""


class TuneOptions(MskConfig):
    """How the search runs (``msk tune`` options)."""

    samples: int = Field(8, ge=1, description="trials (configurations sampled from the space)")
    num_workers: int = Field(1, ge=0, description="Ray Train workers per trial; 0 trains in the trial's process")
    use_gpu: bool = Field(False, description="one GPU per Ray Train worker")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha: stop poor trials early; "
                                               "fifo: every trial runs all its epochs (the baseline)")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial gets before it can be stopped")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep 1/reduction_factor of trials per rung")
    max_concurrent: int | None = Field(None, ge=1, description="trials at once; None: as many as the cluster fits")
    seed: int = Field(0, description="random state of the sampler (same seed, same configurations)")


# -- search spaces -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One entry of a search space: ``kind`` in :data:`DISTRIBUTIONS` or ``"constant"``."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def probes(self) -> list[Any]:
        """Values that must all give a valid config (choices, range ends, an inner float)."""
        if self.kind == "constant":
            return [self.values[0]]
        if self.kind == "choice":
            return list(self.values)
        lo, hi = self.values
        if self.kind == "randint":
            return [lo, hi]
        inner = math.exp(math.log(lo) + 0.3719 * (math.log(hi) - math.log(lo))) if self.kind == "loguniform" \
            else lo + 0.3719 * (hi - lo)
        return [lo, hi, inner]

    def sampler(self) -> Any:
        """The Ray Tune sampler (a constant stays a constant)."""
        from ray import tune

        if self.kind == "constant":
            return self.values[0]
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "randint":  # tune.randint excludes its upper bound; ours includes it
            return tune.randint(self.values[0], self.values[1] + 1)
        return getattr(tune, self.kind)(*self.values)  # uniform, loguniform

    def largest(self) -> Any:
        """The largest value this entry can take (ASHA's ``max_t`` for ``epochs``)."""
        return max(self.values) if self.kind != "constant" else self.values[0]


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space of one task (see the module docstring)."""

    task: str
    params: tuple[Param, ...]
    source: str = "<dict>"

    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def to_tune(self) -> dict[str, Any]:
        """The ``param_space`` of a ``ray.tune.Tuner``."""
        return {p.key: p.sampler() for p in self.params}

    def largest(self, key: str, default: Any) -> Any:
        return next((p.largest() for p in self.params if p.key == key), default)


def _param(key: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict):
        return Param(key, "constant", (spec,))
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: {key}: expected a constant or one of "
                          f"{', '.join('{' + d + ': ...}' for d in DISTRIBUTIONS)}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {key}: {kind} takes a non-empty list; got {values!r}")
    if kind == "choice":
        return Param(key, kind, tuple(values))
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: {key}: {kind} takes [low, high] numbers; got {values!r}")
    lo, hi = values
    if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise ConfigError(f"{where}: {key}: randint takes integers; got {values!r}")
    if not lo < hi or (kind == "loguniform" and lo <= 0):
        raise ConfigError(f"{where}: {key}: {kind} needs {'0 < ' if kind == 'loguniform' else ''}"
                          f"low < high; got {values!r}")
    return Param(key, kind, (lo, hi))


def load_space(task: str, source: str | os.PathLike | dict[str, Any], base: MskConfig | None = None) -> SearchSpace:
    """Read and check the search space of ``task`` from a YAML file or a dict.

    Every probe value (:meth:`Param.probes`) is applied to ``base`` (default: the task's
    default config) and validated, so a typo or an impossible value fails here, naming the
    file and the key, not in the middle of a search.
    """
    spec = get_task(task)
    where = "<dict>"
    if not isinstance(source, dict):
        where = str(source)
        source = read_yaml_mapping(Path(source), "search space")
    if not source:
        raise ConfigError(f"{where}: the search space is empty")
    params = tuple(_param(str(k), v, where) for k, v in source.items())
    base = base if base is not None else spec.config_cls()
    _check_components(params, where)
    for param in params:
        for value in param.probes():
            try:
                spec.configure(base, {param.key: value})
            except (ValidationError, ConfigError, KeyError, TypeError, ValueError) as exc:
                hint = ""
                if param.kind in ("uniform", "loguniform") and isinstance(value, float) and not value.is_integer():
                    hint = " (a float range on an integer option: use randint or choice)"
                raise ConfigError(f"{where}: {param.key}={value!r} is not a valid {spec.config_cls.__name__} "
                                  f"option{hint}: {_first_error(exc)}") from None
    return SearchSpace(task, params, where)


#: option name -> registry kind of the components it names
_COMPONENT_KEYS = {"encoder": "encoder", "heads": "fusion_head", "retriever": "retriever"}


def _check_components(params: tuple[Param, ...], where: str) -> None:
    """Encoder, head and retriever names in the space must be registered (``msk plugins``)."""
    from msk.core.registry import UnknownComponentError, get_registry

    registry = get_registry()
    for param in params:
        kind = _COMPONENT_KEYS.get(param.key.rsplit(".", 1)[-1])
        if kind is None or param.kind not in ("choice", "constant"):
            continue
        for value in param.values:
            for name in value if isinstance(value, list) else [value]:
                try:
                    registry.lookup(kind, str(name))
                except UnknownComponentError as exc:
                    raise ConfigError(f"{where}: {param.key}: {exc}") from None


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        return f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}"
    return str(exc)


def default_space_path(task: str) -> Path:
    """The task's own default space (its spec's ``space``), else ``tune/<task>.yaml`` of the
    repository checkout msk runs from."""
    from msk.core.registry import tuning_task

    get_task(task)
    path = tuning_task(task).space or Path(__file__).resolve().parents[4] / "tune" / f"{task}.yaml"
    if not path.is_file():
        raise ConfigError(f"no default search space at {path} (msk is not running from a "
                          f"checkout); pass --space FILE (see tune/{task}.yaml in the repository)")
    return path


# -- tasks -------------------------------------------------------------------------------------


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is not a section of the config")
        node = child
    if last not in node:
        raise ConfigError(f"{key}: no such option (options here: {', '.join(node)})")
    node[last] = value


class Task:
    """What ``msk tune <name>`` tunes: a config class, how a trial trains, what it reports."""

    name: ClassVar[str]
    metric: ClassVar[str] = "val_accuracy"
    mode: ClassVar[str] = "max"
    epochs_key: ClassVar[str] = "epochs"  # the option that sets a trial's epochs (ASHA's max_t)

    @property
    def config_cls(self) -> type[MskConfig]:
        raise NotImplementedError

    def configure(self, base: MskConfig, params: dict[str, Any]) -> MskConfig:
        """``base`` with ``params`` (dotted keys) applied, validated."""
        data = copy.deepcopy(base.model_dump(mode="json"))
        for key, value in params.items():
            _set_dotted(data, key, value)
        return self.config_cls.model_validate(data)

    def epochs(self, config: MskConfig) -> int:
        value: Any = config
        for part in self.epochs_key.split("."):
            value = getattr(value, part)
        return int(value)

    def load(self, ingest: Path, labels: Path, base: MskConfig) -> Any:
        """The labelled data of the task (loaded once, shared by all trials)."""
        raise NotImplementedError

    def split(self, data: Any, config: MskConfig) -> Any:
        """The tuning split; also called once on the base config before Ray starts, so that
        data the task cannot split (too few patients per class, ...) fails there."""
        raise NotImplementedError

    def trial(self, data: Any, config: MskConfig, options: TuneOptions, out: Path) -> None:
        """Train on :meth:`split`, reporting ``metric`` every epoch."""
        raise NotImplementedError


class _RegisteredTasks(Mapping[str, Task]):
    """The tuning tasks plugins register (hook ``msk_tuning_tasks``), by name."""

    @staticmethod
    def _names() -> list[str]:
        from msk.core.registry import get_registry

        return get_registry().names("tuning_task")

    def __getitem__(self, name: str) -> Task:
        from msk.core.registry import get_registry

        if name not in self._names():
            raise KeyError(name)
        return get_registry().build("tuning_task", name)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


#: task name -> :class:`Task`, the registry's view (built-ins: :mod:`msk.plugins.tuning_tasks`).
TASKS: Mapping[str, Task] = _RegisteredTasks()


def get_task(name: str) -> Task:
    """The task called ``name`` (:data:`TASKS`); a :class:`ConfigError` lists the tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown tuning task {name!r}; tasks: {', '.join(TASKS)} "
                          "(`msk plugins tuning_task`)") from None


# -- the search --------------------------------------------------------------------------------


@dataclass
class TuneResult:
    """What :func:`tune_task` found (also written to its ``out`` folder)."""

    task: str
    metric: str
    best_value: float
    best_params: dict[str, Any]
    best_config: MskConfig
    best_yaml: Path
    trials: Any  # pandas DataFrame, one row per trial
    out: Path

    def summary(self) -> str:
        return (f"best {self.metric} {self.best_value:.4f} of {len(self.trials)} trials with "
                f"{self.best_params}; config: {self.best_yaml}")


def _trial(params: dict[str, Any], *, task: str, data: Any, base: dict[str, Any], options: dict[str, Any],
           out: str) -> None:
    """One Tune trial (the Ray Train driver when ``num_workers >= 1``)."""
    import ray.tune

    from msk.core.runtime.workers import placement, reporting_to_tune

    spec = TASKS[task]
    config = spec.configure(spec.config_cls.model_validate(base), params)
    run = Path(out) / "trials" / ray.tune.get_context().get_trial_id()
    run.mkdir(parents=True, exist_ok=True)
    (run / "trial.json").write_text(json.dumps({"params": params, **placement()}, default=str))
    with reporting_to_tune():
        spec.trial(data, config, TuneOptions.model_validate(options), run)


class StateApiWarning(RuntimeWarning):
    """Ray Train trials on a Ray instance without its State API (dashboard) may leak resources."""


def _check_state_api(options: TuneOptions) -> None:
    """Warn when trials will be Ray Train runs but Ray's State API does not answer.

    Ray Train V2 removes a run's placement group through a helper that asks the State API
    whether the run's controller is still alive; a trial torn down by Tune kills its
    controller, and without the API (Ray started with ``include_dashboard=False``) the
    placement group can keep its CPUs/GPUs reserved, so that later trials wait for workers that
    never start (seen on a ``ray.cluster_utils.Cluster`` joined by address; docs/tune.md).
    """
    if options.num_workers == 0:
        return
    from ray.util.state import list_nodes

    try:
        list_nodes(limit=1, timeout=10)
    except Exception as exc:  # noqa: BLE001 - ServerUnavailable, connection errors: all "no API"
        warnings.warn(
            f"Ray's State API does not answer ({str(exc).splitlines()[0][:120]}); trials that are "
            "Ray Train runs (--num-workers >= 1) may then leave their placement groups reserved and "
            "later trials wait for ever. Start Ray with its dashboard (the default of `ray start`) "
            "or tune with --num-workers 0.", StateApiWarning, stacklevel=3)


def trial_resources(options: TuneOptions) -> dict[str, float] | None:
    """What a trial's Tune actor asks for: Tune's default (one CPU) unless it trains itself on a
    GPU (``num_workers=0`` with ``use_gpu``); Ray Train workers ask for their own resources."""
    return {"cpu": 1, "gpu": 1} if options.num_workers == 0 and options.use_gpu else None


def _max_concurrent(options: TuneOptions) -> int:
    import ray

    if options.max_concurrent is not None:
        return options.max_concurrent
    resources = ray.cluster_resources()
    if options.use_gpu:
        return max(1, int(resources.get("GPU", 0) // max(1, options.num_workers)))
    return max(1, int(resources.get("CPU", 1) // (1 + options.num_workers)))


def load_task_data(task: str, ingest: str | os.PathLike, labels: str | os.PathLike,
                   base: MskConfig | None = None) -> Any:
    """The labelled images of ``ingest`` as ``task`` trains on them.

    :param labels: what the task's training command takes (sorter: weak labels CSV; fusion:
        metadata CSV; recommender: ``image_id,entity[,x0,y0,x1,y1]`` CSV).
    """
    spec = get_task(task)
    return spec.load(Path(ingest), Path(labels), base if base is not None else spec.config_cls())


def tune_task(task: str, data: Any, *, out: str | os.PathLike,
              space: SearchSpace | str | os.PathLike | dict[str, Any] | None = None,
              base: MskConfig | None = None, options: TuneOptions | None = None) -> TuneResult:
    """Search ``space`` for the best config of ``task``; see the module docstring.

    :param data: from :func:`load_task_data` (or the task's loader: ``LabelledImages``,
        ``FusionData``, ``EvalData``); shared by all trials through Ray's object store.
    :param space: a :class:`SearchSpace`, a YAML file or a dict; default ``tune/<task>.yaml``.
    :param base: the task's config that trials start from (the values the space leaves alone).
    """
    import pandas as pd
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    spec = get_task(task)
    options = options or TuneOptions()
    base = base if base is not None else spec.config_cls()
    if not isinstance(base, spec.config_cls):
        raise ConfigError(f"the base config of {task} must be a {spec.config_cls.__name__}")
    if not isinstance(space, SearchSpace):
        space = load_space(task, space if space is not None else default_space_path(task), base)
    spec.split(data, base)  # unusable data fails here, not in every trial
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)

    from msk.core.runtime.ray_start import start_ray

    start_ray()
    _check_state_api(options)
    max_t = int(space.largest(spec.epochs_key, spec.epochs(base)))
    scheduler = FIFOScheduler() if options.scheduler == "fifo" else ASHAScheduler(
        time_attr="training_iteration", max_t=max_t, grace_period=min(options.grace_period, max_t),
        reduction_factor=options.reduction_factor)
    trainable = tune.with_parameters(functools.partial(
        _trial, task=task, base=base.model_dump(mode="json"), options=options.model_dump(mode="json"),
        out=str(out)), data=data)
    resources = trial_resources(options)
    if resources is not None:
        trainable = tune.with_resources(trainable, resources)
    tuner = tune.Tuner(
        trainable, param_space=space.to_tune(),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                    num_samples=options.samples,
                                    # Tune ignores max_concurrent_trials when given a generator
                                    search_alg=BasicVariantGenerator(random_state=options.seed,
                                                                     max_concurrent=_max_concurrent(options))),
        run_config=tune.RunConfig(name=f"tune-{task}-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str(out / "ray"), verbose=1))
    grid = tuner.fit()
    results = [grid[i] for i in range(len(grid))]

    rows = []
    for result in results:
        frame = result.metrics_dataframe
        values = frame[spec.metric].dropna() if frame is not None and spec.metric in frame else pd.Series(dtype=float)
        rows.append({"trial_id": result.metrics.get("trial_id") if result.metrics else None,
                     **{f"param.{k}": v for k, v in (result.config or {}).items()},
                     spec.metric: float(values.max()) if len(values) else float("nan"),
                     "epochs_run": int(len(frame)) if frame is not None else 0,
                     "status": "error" if result.error else "ok",
                     "error": str(result.error).splitlines()[0][:300] if result.error else ""})
    trials = pd.DataFrame(rows)
    trials.to_csv(out / "trials.csv", index=False)
    finished = trials[trials[spec.metric].notna()]
    if finished.empty:
        first = next((r.error for r in results if r.error), None)
        raise TuneError(f"no trial of {task} reported {spec.metric} (see {out / 'trials.csv'}); "
                        f"first error: {first}")
    best = grid.get_best_result(metric=spec.metric, mode=spec.mode, scope="all")
    assert best.config is not None and best.metrics_dataframe is not None  # it reported the metric
    best_params = dict(best.config)
    best_value = float(best.metrics_dataframe[spec.metric].max())
    best_config = spec.configure(base, best_params)
    best_yaml = out / "best.yaml"
    header = (f"# best of {len(trials)} trials of `msk tune {task}` ({spec.metric} {best_value:.4f});\n"
              f"# search space {space.source}; parameters {best_params}\n")
    best_yaml.write_text(header + best_config.to_yaml(out))  # paths relative to OUT (msk.core.io.paths)
    return TuneResult(task, spec.metric, best_value, best_params, best_config, best_yaml, trials, out)
