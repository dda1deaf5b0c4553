"""Tests of shared.stats.metrics: known values, reference implementations and statistical properties."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from shared.stats.metrics import (
    JointEventResult,
    RaceCache,
    ReliabilityCurve,
    brier_score,
    coverage,
    crps_ensemble,
    expected_calibration_error,
    joint_event_validation,
    log_loss,
    log_score,
    pit_histogram,
    pit_uniformity_pvalue,
    pit_values,
    reliability_curve,
)

PROPERTY = settings(max_examples=60, deadline=None)

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
ensembles = hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 25)), elements=finite)


def _observations_for(draw, x):
    return draw(hnp.arrays(np.float64, x.shape[:-1], elements=finite))


@st.composite
def cases(draw):
    """(observations, ensemble) with members on the last axis."""
    x = draw(ensembles)
    return _observations_for(draw, x), x


def crps_pairwise(y: float, x: np.ndarray) -> float:
    """The energy form straight from its definition, O(M²)."""
    return float(np.mean(np.abs(x - y)) - 0.5 * np.mean(np.abs(x[:, None] - x[None, :])))


def crps_gaussian(y: float, mu: float = 0.0, sigma: float = 1.0) -> float:
    z = (y - mu) / sigma
    return sigma * (z * (2.0 * stats.norm.cdf(z) - 1.0) + 2.0 * stats.norm.pdf(z) - 1.0 / math.sqrt(math.pi))


# --------------------------------------------------------------------------
# CRPS
# --------------------------------------------------------------------------


@pytest.mark.parametrize(("y", "expected"), [(2.0, 2.0 / 9.0), (5.0, 23.0 / 9.0)])
def test_crps_known_values(y, expected):
    assert crps_ensemble(y, [1.0, 2.0, 3.0]) == pytest.approx(expected, rel=1e-14)


def test_crps_shapes_axis_and_nan_elements():
    x = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [np.nan, np.nan, np.nan]])
    out = crps_ensemble([2.0, 5.0, np.nan, 1.0], x)
    assert out.shape == (4,)
    np.testing.assert_allclose(out[:2], [2 / 9, 23 / 9], rtol=1e-14)
    assert np.isnan(out[2:]).all()
    # [race, scenario, driver] with the scenarios on axis 1
    rng = np.random.default_rng(1)
    sims = rng.normal(size=(3, 50, 4))
    obs = rng.normal(size=(3, 4))
    np.testing.assert_allclose(crps_ensemble(obs, sims, axis=1), crps_ensemble(obs, np.moveaxis(sims, 1, -1)))
    with pytest.raises(ValueError, match="do not match"):
        crps_ensemble(np.zeros(5), sims)


@PROPERTY
@given(cases())
def test_crps_matches_pairwise_definition_and_is_nonnegative(case):
    y, x = case
    out = crps_ensemble(y, x)
    expected = [crps_pairwise(yi, xi) for yi, xi in zip(y, x, strict=True)]
    scale = 1.0 + np.abs(x).max() + np.abs(y).max()
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12 * scale)
    assert np.all(out >= -1e-12 * scale)


@PROPERTY
@given(finite, st.integers(1, 30))
def test_crps_is_zero_for_a_perfect_point_ensemble(y, m):
    assert crps_ensemble(y, np.full(m, y)) == 0.0


@PROPERTY
@given(cases(), st.floats(-1e3, 1e3))
def test_crps_is_shift_invariant(case, c):
    y, x = case
    scale = 1.0 + np.abs(x).max() + np.abs(y).max() + abs(c)
    np.testing.assert_allclose(crps_ensemble(y + c, x + c), crps_ensemble(y, x), rtol=1e-9, atol=1e-12 * scale)


@PROPERTY
@given(st.data())
def test_crps_drops_nan_members(data):
    x = data.draw(hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(2, 20)), elements=finite))
    y = _observations_for(data.draw, x)
    drop = data.draw(hnp.arrays(np.bool_, x.shape))
    drop[:, 0] = False  # at least one member per element survives
    order = np.argsort(data.draw(hnp.arrays(np.float64, x.shape, elements=st.floats(0, 1))), axis=-1)
    x_nan = np.take_along_axis(np.where(drop, np.nan, x), order, axis=-1)  # NaN anywhere in the row
    expected = [crps_ensemble(yi, xi[~di]) for yi, xi, di in zip(y, x, drop, strict=True)]
    np.testing.assert_allclose(crps_ensemble(y, x_nan), expected, rtol=1e-12, atol=1e-9)


def test_crps_gaussian_ensemble_matches_closed_form():
    assert crps_gaussian(0.0) == pytest.approx(0.23369497725510913, rel=1e-15)
    m = 20_000
    x = np.random.default_rng(20240601).standard_normal(m)
    for y in (0.0, 0.5, -1.0, 2.5):
        # The estimator is a V-statistic; its Monte Carlo error is that of its first-order
        # projection h(X) = |X − y| − E'|X − X'| (for N(0, 1), E'|x − X'| = x(2Φ(x) − 1) + 2φ(x)),
        # se = sd(h)/√M (about 0.003 here), plus an O(1/M) bias, E|X − X'|/(2M) ≈ 3e-5.
        h = np.abs(x - y) - (x * (2.0 * stats.norm.cdf(x) - 1.0) + 2.0 * stats.norm.pdf(x))
        se = h.std(ddof=1) / math.sqrt(m)
        assert abs(crps_ensemble(y, x) - crps_gaussian(y)) < 4.0 * se + 1.0 / m


# --------------------------------------------------------------------------
# log score
# --------------------------------------------------------------------------


def test_log_score_matches_scipy_gaussian_kde():
    rng = np.random.default_rng(3)
    x = rng.gamma(2.0, 3.0, size=(4, 40))
    y = np.array([0.5, 4.0, 9.0, 30.0])
    expected = [stats.gaussian_kde(xi, bw_method="silverman").logpdf(yi)[0] for xi, yi in zip(x, y, strict=True)]
    np.testing.assert_allclose(log_score(y, x), expected, rtol=1e-10)
    h = 0.7
    # scipy's scalar bw_method is a factor on the sample sd, not the bandwidth itself
    expected_h = [
        stats.gaussian_kde(xi, bw_method=h / xi.std(ddof=1)).logpdf(yi)[0] for xi, yi in zip(x, y, strict=True)
    ]
    np.testing.assert_allclose(log_score(y, x, bandwidth=h), expected_h, rtol=1e-10)


def test_log_score_prefers_the_centre_and_stays_finite():
    x = np.random.default_rng(4).normal(10.0, 2.0, size=500)
    centre, tail, far = log_score([10.0, 16.0, 60.0], np.broadcast_to(x, (3, 500)))
    assert centre > tail > far
    assert np.isfinite(far)  # logsumexp: no underflow to -inf
    # degenerate ensembles are floored, not infinite
    hit, miss = log_score([3.0, 4.0], np.full((2, 10), 3.0))
    assert hit == pytest.approx(-math.log(1e-3) - 0.5 * math.log(2 * math.pi))
    assert np.isfinite(miss) and miss < hit


def test_log_score_nan_handling_and_large_ensembles():
    x = np.array([[1.0, np.nan, 2.0, 3.0], [np.nan] * 4, [1.0, 2.0, 3.0, 4.0]])
    out = log_score([2.0, 2.0, np.nan], x)
    assert out[0] == pytest.approx(log_score(2.0, [1.0, 2.0, 3.0]))
    assert np.isnan(out[1:]).all()
    big = np.random.default_rng(5).normal(size=(38, 10_000))
    assert np.isfinite(log_score(np.zeros(38), big)).all()
    with pytest.raises(ValueError, match="bandwidth"):
        log_score(0.0, [1.0, 2.0], bandwidth=0.0)


# --------------------------------------------------------------------------
# coverage
# --------------------------------------------------------------------------


def test_coverage_uses_inclusive_numpy_quantile_intervals():
    rng = np.random.default_rng(6)
    x = rng.integers(0, 10, size=(200, 17)).astype(float)
    x[rng.random(x.shape) < 0.2] = np.nan
    x[0] = np.nan
    y = rng.integers(0, 10, size=200).astype(float)
    y[1] = np.nan
    keep = slice(2, None)
    for level, share in coverage(y, x, levels=(0.5, 0.9)).items():
        lo = np.nanquantile(x[keep], (1 - level) / 2, axis=-1)
        hi = np.nanquantile(x[keep], (1 + level) / 2, axis=-1)
        assert share == pytest.approx(np.mean((y[keep] >= lo) & (y[keep] <= hi)))
    empty = coverage(np.array([np.nan]), np.ones((1, 3)))
    assert list(empty) == [0.5, 0.8, 0.95] and all(math.isnan(v) for v in empty.values())


def test_coverage_calibrated_near_level_overconfident_below():
    rng = np.random.default_rng(7)
    n, m = 4_000, 1_000
    mu, sigma = rng.normal(0.0, 5.0, n), rng.uniform(0.5, 3.0, n)
    y = rng.normal(mu, sigma)
    members = rng.standard_normal((n, m))
    calibrated = coverage(y, mu[:, None] + sigma[:, None] * members)
    narrow = coverage(y, mu[:, None] + 0.6 * sigma[:, None] * members)
    for level in (0.5, 0.8, 0.95):
        se = math.sqrt(level * (1 - level) / n)
        assert abs(calibrated[level] - level) < 4 * se
        assert narrow[level] < level - 4 * se


# --------------------------------------------------------------------------
# probabilities: Brier, log loss, reliability
# --------------------------------------------------------------------------


def test_brier_and_log_loss_by_hand():
    p, y = [0.1, 0.9, 0.5, np.nan, 0.3], [0, 1, 1, 1, np.nan]
    assert brier_score(p, y) == pytest.approx((0.01 + 0.01 + 0.25) / 3)
    assert log_loss(p, y) == pytest.approx(-(2 * math.log(0.9) + math.log(0.5)) / 3)
    assert log_loss([0.0], [1.0], eps=1e-12) == pytest.approx(-math.log(1e-12))
    assert math.isnan(brier_score([np.nan], [1.0]))
    with pytest.raises(ValueError, match="probabilities"):
        brier_score([1.2], [1.0])


def test_reliability_curve_bins_and_json():
    p = np.array([0.0, 0.05, 0.1, 0.55, 0.95, 1.0, np.nan])
    y = np.array([0, 0, 1, 1, 1, 1, 1])
    curve = reliability_curve(p, y, bins=10)
    assert isinstance(curve, ReliabilityCurve)
    np.testing.assert_array_equal(curve.count, [2, 1, 0, 0, 0, 1, 0, 0, 0, 2])
    assert curve.count.sum() == 6
    np.testing.assert_allclose(curve.bin_lower, np.arange(10) / 10)
    np.testing.assert_allclose(curve.bin_upper, np.arange(1, 11) / 10)
    assert curve.mean_forecast[0] == pytest.approx(0.025)
    assert curve.observed_frequency[9] == 1.0
    d = json.loads(json.dumps(curve.to_dict()))
    assert d["mean_forecast"][2] is None and d["observed_frequency"][2] is None
    assert d["count"] == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    expected_ece = (2 * 0.025 + 1 * 0.9 + 1 * 0.45 + 2 * 0.025) / 6
    assert expected_calibration_error(p, y) == pytest.approx(expected_ece)
    with pytest.raises(ValueError):
        curve.count[0] = 3  # read-only


def test_ece_small_when_calibrated_large_when_overconfident():
    rng = np.random.default_rng(8)
    q = rng.uniform(size=20_000)
    y = (rng.uniform(size=q.size) < q).astype(float)
    assert expected_calibration_error(q, y) < 0.02
    sharpened = np.clip(0.5 + 2.0 * (q - 0.5), 0.0, 1.0)
    assert expected_calibration_error(sharpened, y) > 0.1
    assert brier_score(sharpened, y) > brier_score(q, y)


# --------------------------------------------------------------------------
# PIT
# --------------------------------------------------------------------------


def test_pit_ties_are_randomised_and_mid_pit_is_deterministic():
    y, x = np.full(5_000, 3.0), np.full((5_000, 7), 3.0)
    u = pit_values(y, x, rng=np.random.default_rng(0))
    assert pit_uniformity_pvalue(u) > 1e-3  # a point mass at y: u = V ~ U(0, 1)
    np.testing.assert_array_equal(pit_values(y, x, randomized=False), 0.5)
    np.testing.assert_array_equal(pit_values(y, x), pit_values(y, x))  # seeded by default
    out = pit_values([2.0, np.nan, 9.0, 0.0], [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, np.nan], [np.nan] * 4],
                     randomized=False)
    np.testing.assert_allclose(out[[0, 2]], [(0.25 + 0.5) / 2, 1.0])
    assert np.isnan(out[[1, 3]]).all()


def test_pit_histogram_and_pvalue():
    assert pit_histogram([0.0, 0.05, 0.95, 1.0, np.nan], bins=10).tolist() == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert math.isnan(pit_uniformity_pvalue([np.nan]))


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_pit_calibrated_integer_ensembles_are_uniform(seed):
    rng = np.random.default_rng(seed)
    n, m = 3_000, 1_000
    lam = rng.uniform(0.5, 3.0, n)  # small counts: many ties between y and members
    y = rng.poisson(lam).astype(float)
    x = rng.poisson(lam[:, None], size=(n, m)).astype(float)
    u = pit_values(y, x, rng=np.random.default_rng([seed, 1]))  # not the data stream
    assert pit_uniformity_pvalue(u) > 1e-3
    # without randomisation, ties bunch up and the histogram is not flat
    assert pit_uniformity_pvalue(pit_values(y, x, randomized=False)) < 1e-3


def test_pit_overconfident_ensemble_is_u_shaped():
    rng = np.random.default_rng(14)
    n, m = 3_000, 500
    mu = rng.uniform(5.0, 30.0, n)
    y = np.round(rng.normal(mu, 4.0))
    x = np.round(rng.normal(mu[:, None], 1.5, size=(n, m)))
    counts = pit_histogram(pit_values(y, x))
    assert counts[0] > 2 * counts[4:6].mean() and counts[-1] > 2 * counts[4:6].mean()
    assert pit_uniformity_pvalue(pit_values(y, x)) < 1e-6


# --------------------------------------------------------------------------
# joint events
# --------------------------------------------------------------------------


def _simulate_races(rng, races, scenarios, drivers, spread=1.0, truth_spread=None):
    """Finishing positions from a strength-plus-noise model; the outcome is one more draw.

    With ``truth_spread`` above ``spread`` the simulation is over-confident.
    """
    strength = rng.normal(0.0, 1.0, (races, 1, drivers))
    noise = rng.standard_normal((races, scenarios + 1, drivers))
    noise[:, :-1] *= spread
    noise[:, -1] *= spread if truth_spread is None else truth_spread
    positions = (np.argsort(np.argsort(-(strength + noise), axis=-1), axis=-1) + 1).astype(float)
    return positions[:, :-1], positions[:, -1]


def _brute_force(sim, finish, groups, t):
    p, y, g = [], [], []
    for r in range(sim.shape[0]):
        entered = [d for d in range(sim.shape[2]) if not np.isnan(finish[r, d])]
        for a in range(len(entered)):
            for b in range(a + 1, len(entered)):
                i, j = entered[a], entered[b]
                hits = sum(sim[r, s, i] <= t and sim[r, s, j] <= t for s in range(sim.shape[1]))
                p.append(hits / sim.shape[1])
                y.append(float(finish[r, i] <= t and finish[r, j] <= t))
                g.append(groups[r])
    return np.array(p), np.array(y), np.array(g)


def _ece_loop(p, y, bins):
    total = 0.0
    for k in range(bins):
        in_bin = [(pi, yi) for pi, yi in zip(p, y, strict=True) if k == min(int(pi * bins), bins - 1)]
        if in_bin:
            total += len(in_bin) * abs(np.mean([a for a, _ in in_bin]) - np.mean([b for _, b in in_bin]))
    return total / len(p)


def test_joint_event_validation_matches_brute_force():
    rng = np.random.default_rng(15)
    sim, finish = _simulate_races(rng, races=4, scenarios=30, drivers=6)
    finish[1, 2] = np.nan  # not entered
    sim[1, :, 2] = np.nan
    finish[3, [0, 4]] = np.nan
    groups = np.array(["short_track", "road_course", "short_track", "road_course"])
    results = joint_event_validation(sim, finish, thresholds=[1, 3], groups=groups, bins=5)
    assert [(r.group, r.event) for r in results] == [
        ("road_course", "top_1"), ("road_course", "top_3"), ("short_track", "top_1"), ("short_track", "top_3"),
    ]
    for res in results:
        assert isinstance(res, JointEventResult)
        p, y, g = _brute_force(sim, finish, groups, res.threshold)
        p, y = p[g == res.group], y[g == res.group]
        assert res.n_pairs == p.size == res.reliability.count.sum()
        assert res.mean_forecast == pytest.approx(p.mean())
        assert res.observed_frequency == pytest.approx(y.mean())
        assert res.brier_score == pytest.approx(np.mean((p - y) ** 2))
        assert res.expected_calibration_error == pytest.approx(_ece_loop(p, y, 5))
        d = json.loads(json.dumps(res.to_dict()))
        assert d["event"] == f"top_{res.threshold}" and d["group"] == res.group
        assert len(d["reliability"]["count"]) == 5


def test_joint_events_through_the_cache_are_the_joint_events_computed_afresh():
    """Overlapping windows share races' pairs; a race whose arrays changed (same index, other values) is recomputed."""
    rng = np.random.default_rng(16)
    sim, finish = _simulate_races(rng, races=8, scenarios=30, drivers=6)
    groups = np.array(["a", "b"] * 4)
    cache = RaceCache(max_entries=6)  # smaller than the windows' races × thresholds: entries are evicted too

    def both(window, s=sim, f=finish):
        fresh = joint_event_validation(s[window], f[window], thresholds=[1, 3], groups=groups[window])
        cached = joint_event_validation(s[window], f[window], thresholds=[1, 3], groups=groups[window], cache=cache)
        return [r.to_dict() for r in fresh], [r.to_dict() for r in cached]

    for window in (slice(0, 5), slice(1, 6), slice(2, 8), slice(0, 8)):
        fresh, cached = both(window)
        assert cached == fresh
    before = fresh
    changed = sim.copy()
    changed[3][:, [0, 1]] = changed[3][:, [1, 0]]  # the same race, two drivers' simulations swapped
    fresh, cached = both(slice(0, 8), s=changed)
    assert cached == fresh != before


def test_a_race_digest_is_its_arrays_values_shapes_and_dtypes():
    """Equal arrays (copies, non-contiguous views) share a key; the same bytes in another shape or dtype, or
    arrays given in another order, do not."""
    rng = np.random.default_rng(3)
    sim = rng.normal(size=(30, 6)).astype(np.float32)
    finish = rng.permutation(6).astype(np.float64)
    key = RaceCache.digest(sim, finish)
    assert RaceCache.digest(sim.copy(), finish.copy()) == key
    assert RaceCache.digest(np.asfortranarray(sim), finish) == key
    assert RaceCache.digest(np.ascontiguousarray(sim.T).T, finish) == key  # a transposed view of equal values
    assert RaceCache.digest(sim.reshape(6, 30), finish) != key
    assert RaceCache.digest(sim.view(np.int32), finish) != key
    assert RaceCache.digest(finish, sim) != key
    changed = sim.copy()
    changed[0, 0] = np.nextafter(changed[0, 0], np.float32(np.inf))
    assert RaceCache.digest(changed, finish) != key


# ECE of a calibrated simulation is pure sampling noise, larger for wider events
# (co-hits in one race are dependent); bounds are ~1.3x the largest over 30 seeds.
@pytest.mark.parametrize(("t", "max_ece"), [(3, 0.01), (5, 0.015), (10, 0.04)])
def test_joint_event_validation_calibrated_simulation(t, max_ece):
    rng = np.random.default_rng(16 + t)
    sim, finish = _simulate_races(rng, races=60, scenarios=2_000, drivers=20)
    groups = np.where(np.arange(60) % 2 == 0, "intermediate", "superspeedway")
    for res in joint_event_validation(sim, finish, thresholds=[t], groups=groups):
        assert res.n_pairs == 30 * 190
        se = math.sqrt(res.mean_forecast * (1 - res.mean_forecast) / res.n_pairs)
        assert abs(res.observed_frequency - res.mean_forecast) < 6 * se  # pairs share races: loose
        assert res.expected_calibration_error < max_ece


def test_joint_event_validation_flags_overconfident_simulation():
    rng = np.random.default_rng(30)
    # the truth is noisier than the simulation: favourites co-hit less often than forecast
    sim, finish = _simulate_races(rng, races=60, scenarios=2_000, drivers=20, spread=0.3, truth_spread=1.5)
    (res,) = joint_event_validation(sim, finish, thresholds=[5], groups=np.zeros(60, dtype=int))
    assert res.group == "0"
    assert res.expected_calibration_error > 0.03  # a calibrated simulation of this size gives < 0.01
    top = res.reliability
    assert top.count[-1] > 50 and top.observed_frequency[-1] < top.mean_forecast[-1] - 0.3


def test_joint_event_validation_rejects_bad_shapes():
    sim = np.ones((2, 5, 3))
    with pytest.raises(ValueError, match="one label per race"):
        joint_event_validation(sim, np.ones((2, 3)), thresholds=[1], groups=["a"])
    with pytest.raises(ValueError, match="does not match"):
        joint_event_validation(sim, np.ones((2, 4)), thresholds=[1], groups=["a", "b"])


def test_ensemble_scores_race_by_race_are_the_scores_of_the_whole_window():
    """stats.evaluation scores each race once (kept for the next window): the same numbers, exactly, as
    scoring every race of the window at once."""
    from shared.data.synth import synthesize
    from shared.stats.evaluation import COVERAGE_LEVELS, ensemble_scores

    ds = synthesize(seasons=1, scenarios=60, seed=11)
    for first, last in ((0, 12), (3, 20), (0, 20), (3, 20)):  # overlapping windows; the last one all from the cache
        window = ds.isel(race=slice(first, last))
        records = ensemble_scores(window, ["intermediate", "superspeedway"])
        assert {r.archetype for r in records} == {"intermediate", "superspeedway"}
        for record in records:
            sub = window.sel(race=window["archetype"].values == record.archetype)
            members = sub["sim_points"].transpose("race", "driver", "scenario").values
            observed = sub["points"].transpose("race", "driver").values
            assert record.n == int(np.isfinite(observed).sum())
            assert record.crps == float(np.nanmean(crps_ensemble(observed, members)))
            assert record.log_score == float(np.nanmean(log_score(observed, members)))
            expected = coverage(observed, members, levels=COVERAGE_LEVELS)
            assert record.coverage == {f"{level:g}": share for level, share in expected.items()}
