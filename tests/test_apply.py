"""The vectorised calibration behind ``POST /v1/calibrate`` and ``calq apply``, against its definition.

:func:`shared.fit.apply.calibrate_with_draws` reads the band from rows
sorted in place instead of calling np.quantile across columns; it must give
np.quantile's numbers (its ``linear`` method) and the plain mean, for any
number of draws, and keep the formula's clipping of p at 0 and 1.
"""

from __future__ import annotations

import numpy as np
import pytest

from shared.data.dataset import P_EPS
from shared.fit.apply import BAND, calibrate_with_draws
from shared.fit.idata import calibrated_probability


@pytest.mark.parametrize("draws", [1, 2, 3, 17, 400, 4000])
def test_the_band_and_mean_equal_the_quantile_definition(draws):
    rng = np.random.default_rng(draws)
    alpha, beta = rng.normal(0.2, 0.5, draws), np.exp(rng.normal(-0.1, 0.2, draws))
    p = np.array([0.0, 1e-12, 0.01, 0.2, 0.5, 0.93, 1.0])
    mean, low, high = calibrate_with_draws(alpha, beta, p)
    q = calibrated_probability(alpha[:, None], beta[:, None], np.clip(p, P_EPS, 1 - P_EPS)[None, :])
    tail = (1 - BAND) / 2
    np.testing.assert_allclose(mean, q.mean(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(low, np.quantile(q, tail, axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(high, np.quantile(q, 1 - tail, axis=0), rtol=1e-12, atol=1e-15)
    assert np.all(low <= mean + 1e-15) and np.all(mean <= high + 1e-15)


def test_a_band_of_other_width_and_the_input_left_alone():
    rng = np.random.default_rng(7)
    alpha, beta = rng.normal(size=1000), np.exp(rng.normal(size=1000) * 0.1)
    before = alpha.copy(), beta.copy()
    _, low50, high50 = calibrate_with_draws(alpha, beta, np.array([0.3]), band=0.5)
    _, low94, high94 = calibrate_with_draws(alpha, beta, np.array([0.3]))
    assert low94 < low50 < high50 < high94
    np.testing.assert_array_equal(alpha, before[0])
    np.testing.assert_array_equal(beta, before[1])
