"""Out-of-sample scoring kernels: the bootstrap over races and the raw-against-calibrated comparison."""

from __future__ import annotations

import numpy as np
import pytest

from shared.stats import metrics, oos


def test_the_estimate_is_the_per_row_mean_of_race_sums():
    d, n = np.array([1.0, -2.0, 4.0]), np.array([2, 3, 5])
    interval = oos.race_bootstrap(d, n, n_boot=500, seed=1)
    assert interval.mean == pytest.approx(3.0 / 10.0)
    assert interval.low <= interval.mean <= interval.high


def test_one_race_gives_the_point_and_no_race_gives_nan():
    one = oos.race_bootstrap([0.6], [3])
    assert one.mean == one.low == one.high == pytest.approx(0.2)
    assert np.isnan(oos.race_bootstrap([], []).mean)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        oos.race_bootstrap([1.0, 2.0], [1])
    with pytest.raises(ValueError):
        oos.race_bootstrap([1.0], [0])
    with pytest.raises(ValueError):
        oos.race_bootstrap([np.nan], [1])
    with pytest.raises(ValueError):
        oos.race_bootstrap([1.0], [1], level=1.0)


def test_the_bootstrap_is_reproducible_for_a_seed():
    rng = np.random.default_rng(0)
    d, n = rng.normal(size=30), rng.integers(10, 40, 30)
    assert oos.race_bootstrap(d, n, seed=3) == oos.race_bootstrap(d, n, seed=3)


def _coverage(rng, *, replicates: int, races: int, race_sd: float, skewed: bool, mu: float) -> tuple[float, float]:
    """Share of replicates whose 90 % interval lies below / above the known per-row mean ``mu``."""
    below = above = 0
    for _ in range(replicates):
        rows = rng.integers(20, 60, races)
        # race effects shared by a race's rows (rows within a race are dependent), mean zero
        effect = (rng.exponential(race_sd, races) - race_sd) if skewed else rng.normal(0.0, race_sd, races)
        noise = rng.normal(0.0, 0.3, rows.sum())
        sums = np.add.reduceat(noise, np.r_[0, np.cumsum(rows)[:-1]]) + rows * (mu + effect)
        interval = oos.race_bootstrap(sums, rows, n_boot=1000, seed=int(rng.integers(2**31)))
        below += interval.high < mu
        above += interval.low > mu
    return below / replicates, above / replicates


@pytest.mark.parametrize("skewed", [False, True], ids=["normal", "skewed"])
def test_the_interval_covers_the_known_mean_at_about_its_nominal_rate(skewed):
    """90 % intervals on synthetic per-race differences with known mean: ~5 % miss on each side.

    400 replicates: the miss share's standard error is ~1.5 points, so 10 % ± 4.5 is a 3-sigma band
    (the percentile bootstrap runs a little short with 40 races, hence the lower end).
    """
    rng = np.random.default_rng(12)
    below, above = _coverage(rng, replicates=400, races=40, race_sd=0.05, skewed=skewed, mu=0.01)
    assert 0.055 <= below + above <= 0.145, (below, above)
    assert below <= 0.1 and above <= 0.1, (below, above)


def test_an_interval_over_rows_would_be_too_narrow():
    """Why races, not rows: with race effects, a row bootstrap misses far more often than 10 %."""
    rng = np.random.default_rng(5)
    misses_race = misses_row = 0
    for _ in range(200):
        rows = rng.integers(10, 30, 40)
        per_row = np.repeat(rng.normal(0.0, 0.1, 40), rows) + rng.normal(0.0, 0.3, rows.sum())
        sums = np.add.reduceat(per_row, np.r_[0, np.cumsum(rows)[:-1]])
        by_race = oos.race_bootstrap(sums, rows, n_boot=300, seed=1)
        by_row = oos.race_bootstrap(per_row, np.ones(per_row.size), n_boot=300, seed=1)
        misses_race += not by_race.low <= 0.0 <= by_race.high
        misses_row += not by_row.low <= 0.0 <= by_row.high
    assert misses_race / 200 < 0.17
    assert misses_row / 200 > 0.35


def test_compare_scores_raw_and_calibrated_and_sums_per_race():
    rng = np.random.default_rng(2)
    race = np.repeat(np.array(["r2", "r1", "r3"]), [10, 20, 30])
    p = rng.uniform(0.05, 0.95, race.size)
    y = (rng.uniform(size=race.size) < p).astype(float)
    q = np.clip(p + 0.05, 0, 1)
    result = oos.compare(p, q, y, race, n_boot=200)
    assert result["races"] == 3 and result["rows"] == 60
    assert result["raw"]["brier"] == pytest.approx(metrics.brier_score(p, y))
    assert result["calibrated"]["log_loss"] == pytest.approx(metrics.log_loss(q, y))
    assert result["calibrated"]["ece"] == pytest.approx(metrics.expected_calibration_error(q, y))
    expected = metrics.log_loss(p, y) - metrics.log_loss(q, y)
    assert result["log_loss_improvement"]["mean"] == pytest.approx(expected)
    assert result["brier_improvement"]["mean"] == pytest.approx(metrics.brier_score(p, y) - metrics.brier_score(q, y))
    sums = oos.per_race_sums(p, q, y, race)
    assert sums["race"].tolist() == ["r2", "r1", "r3"]  # order of first appearance
    assert sums["rows"].tolist() == [10, 20, 30]
    assert sums["raw_log_loss"][0] == pytest.approx(10 * metrics.log_loss(p[:10], y[:10]))
