"""One-way ANOVA over the seeds' accuracies of the compared encoders (the paper's test), with its p-value wording."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from msk.core.stages.recommender.config import EvalError

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class AnovaResult:
    """One-way ANOVA of per-seed accuracy across models, and Tukey's HSD for every pair."""

    models: list[str]
    f_statistic: float
    p_value: float
    pairs: pd.DataFrame  # model_a, model_b, mean_difference, p_value, ci_low, ci_high

    def markdown(self) -> str:
        lines = [f"One-way ANOVA of accuracy across {len(self.models)} models (one value per seed): "
                 f"F = {self.f_statistic:.3f}, p {_p(self.p_value, equals=True)}.", "",
                 "Tukey HSD (difference = first − second):", "",
                 "| model | vs | difference | 95 % CI | p |", "|---|---|---:|---|---:|"]
        for r in self.pairs.itertuples():
            lines.append(f"| {r.model_a} | {r.model_b} | {r.mean_difference:+.3f} | "
                         f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}] | {_p(r.p_value)} |")
        return "\n".join(lines)


def _p(p: float, *, equals: bool = False) -> str:
    if not np.isfinite(p):
        text = "nan"
    elif p < 0.001:
        return "< 0.001"
    else:
        text = f"{p:.3f}"
    return f"= {text}" if equals else text


def anova(groups: dict[str, Sequence[float]]) -> AnovaResult:
    """One-way ANOVA (:func:`scipy.stats.f_oneway`) and Tukey HSD (:func:`scipy.stats.tukey_hsd`)
    of ``model -> per-seed values``; needs two or more models with two or more values each."""
    import pandas as pd
    from scipy.stats import f_oneway, tukey_hsd

    names = list(groups)
    values = [np.asarray(groups[n], np.float64) for n in names]
    if len(names) < 2 or min(len(v) for v in values) < 2:
        raise EvalError("ANOVA needs at least two models with at least two seeds each")
    if all(np.ptp(v) == 0 for v in values):  # no variance within any group: F is undefined
        f, p = (np.inf, 0.0) if len({float(v[0]) for v in values}) > 1 else (np.nan, np.nan)
        pairs = pd.DataFrame([{"model_a": a, "model_b": b,
                               "mean_difference": float(values[i].mean() - values[j].mean()),
                               "p_value": np.nan, "ci_low": np.nan, "ci_high": np.nan}
                              for i, a in enumerate(names) for j, b in enumerate(names) if i < j])
        return AnovaResult(names, float(f), float(p), pairs)
    f, p = f_oneway(*values)
    hsd = tukey_hsd(*values)
    ci = hsd.confidence_interval(0.95)
    pairs = pd.DataFrame([{"model_a": a, "model_b": b, "mean_difference": float(values[i].mean() - values[j].mean()),
                           "p_value": float(hsd.pvalue[i, j]), "ci_low": float(ci.low[i, j]),
                           "ci_high": float(ci.high[i, j])}
                          for i, a in enumerate(names) for j, b in enumerate(names) if i < j])
    return AnovaResult(names, float(f), float(p), pairs)
