"""Paired comparisons with bootstrap confidence intervals, for ablations over held-out cases × seeds.

A study scores every variant on the same held-out cases with the same seeds (same data order and
patches), so the question "is variant A better than B" is answered on the paired differences
``d[case, seed] = score_A − score_B``. Cases and seeds are both random draws (of patients and of
training runs), so the bootstrap resamples both: each replicate draws ``n_cases`` cases and
``n_seeds`` seeds with replacement (a two-way, crossed resampling) and takes the mean of
``d`` over that grid. The interval is the percentile interval of the replicates. With one seed
it is the ordinary case bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedResult:
    """Mean paired difference and its bootstrap ``level`` interval; ``significant``: the interval
    excludes 0."""

    mean: float
    low: float
    high: float
    n_cases: int
    n_seeds: int
    level: float = 0.95

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def format(self, digits: int = 3) -> str:
        mark = " *" if self.significant else ""
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]{mark}"


def paired_bootstrap(
    differences: np.ndarray, *, n_boot: int = 10000, level: float = 0.95, seed: int = 0
) -> PairedResult:
    """Bootstrap CI of the mean of ``differences`` ``[n_cases, n_seeds]`` (a 1-D array = one seed).

    Deterministic for a ``seed``. NaN entries are an error (a missing score is not a zero).
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim == 1:
        d = d[:, None]
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"paired_bootstrap: differences must be [n_cases, n_seeds] (non-empty); got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("paired_bootstrap: differences hold NaN or inf; every case and seed needs a score")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"paired_bootstrap: level must be in (0, 1) and n_boot >= 1; got {level}, {n_boot}")
    n_cases, n_seeds = d.shape
    rng = np.random.default_rng(seed)
    cases = rng.integers(0, n_cases, size=(n_boot, n_cases))
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    # mean over the resampled grid = mean over rows of (mean over the resampled seeds of each row)
    row_means = d[cases[:, :, None], seeds[:, None, :]].mean(axis=2)
    replicates = row_means.mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(replicates, [alpha, 1 - alpha])
    return PairedResult(
        mean=float(d.mean()), low=float(low), high=float(high), n_cases=n_cases, n_seeds=n_seeds, level=level
    )
