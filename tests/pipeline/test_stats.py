"""The paired bootstrap of the ablation study on inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from e2pa.engine.stats import paired_bootstrap


def test_constant_difference_gives_a_zero_width_interval_at_that_value():
    result = paired_bootstrap(np.full((12, 5), 0.04), n_boot=500)
    assert result.mean == pytest.approx(0.04)
    assert result.low == pytest.approx(0.04) and result.high == pytest.approx(0.04)
    assert result.significant and (result.n_cases, result.n_seeds) == (12, 5)


def test_symmetric_zero_mean_difference_covers_zero_and_is_not_significant():
    d = np.array([[-0.1, 0.1], [0.1, -0.1], [-0.05, 0.05], [0.05, -0.05], [-0.2, 0.2], [0.2, -0.2]])
    result = paired_bootstrap(d, n_boot=2000)
    assert result.mean == pytest.approx(0.0, abs=1e-12)
    assert result.low < 0 < result.high and not result.significant


def test_a_clear_shift_is_significant_and_the_interval_brackets_the_mean():
    rng = np.random.default_rng(1)
    d = 0.05 + 0.01 * rng.standard_normal((12, 5))
    result = paired_bootstrap(d, n_boot=2000)
    assert result.low < result.mean < result.high and result.low > 0.03 and result.high < 0.07
    assert result.format().endswith("*")


def test_seeded_and_one_dimensional_input():
    d = np.random.default_rng(0).standard_normal(20)
    assert paired_bootstrap(d, seed=3) == paired_bootstrap(d, seed=3)
    assert paired_bootstrap(d, seed=3).n_seeds == 1


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap(np.array([[0.1, np.nan]]))
    with pytest.raises(ValueError, match="n_cases, n_seeds"):
        paired_bootstrap(np.zeros((2, 2, 2)))
