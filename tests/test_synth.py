"""The synthetic generator: a valid, realistic dataset whose miscalibration is known."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import xarray as xr
from scipy.special import expit, softmax

from shared.contract.domain import ARCHETYPES, TRACKS
from shared.data.dataset import open_dataset, save_dataset, validate
from shared.data.synth import (
    TEMPERATURE,
    TRUTH_EVENTS,
    descending_ranks,
    fit_logistic,
    plackett_luce,
    synthesize,
    truth,
)

SCENARIOS = 200


@pytest.fixture(scope="module")
def season() -> xr.Dataset:
    return synthesize(seasons=1, scenarios=SCENARIOS, seed=1)


def test_the_generated_dataset_validates(season):
    assert validate(season) is season


def test_it_is_deterministic_for_a_seed(season):
    xr.testing.assert_identical(synthesize(seasons=1, scenarios=SCENARIOS, seed=1), season)
    other = synthesize(seasons=1, scenarios=SCENARIOS, seed=2)
    assert not np.array_equal(other["finish_position"].values, season["finish_position"].values, equal_nan=True)
    assert truth(other) != truth(season)


def test_shapes_and_coordinates(season):
    assert dict(season.sizes) == {"race": 36, "scenario": SCENARIOS, "driver": 46}
    assert season["sim_position"].dims == ("race", "scenario", "driver")
    assert season["sim_position"].dtype == np.float32 and season["sim_points"].dtype == np.float32
    assert season["finish_position"].dims == ("race", "driver")
    assert list(season["driver"].values[:3]) == ["d01", "d02", "d03"] and season["driver"].values[-1] == "d46"
    np.testing.assert_array_equal(season["scenario"].values, np.arange(SCENARIOS))
    assert all(re.fullmatch(r"2024-\d{2}-[a-z-]+", r) for r in season["race"].values)
    assert season["race"].values[0] == "2024-01-daytona"
    dates = season["race_date"].values
    assert np.issubdtype(dates.dtype, np.datetime64) and (np.diff(dates) > np.timedelta64(0)).all()
    months = dates.astype("datetime64[M]").astype(int) % 12 + 1
    assert months.min() == 2 and months.max() == 11


def test_a_realistic_schedule_on_real_tracks(season):
    for track, archetype in zip(season["track"].values, season["archetype"].values):
        assert track in TRACKS[archetype]
    counts = Counter(season["archetype"].values.tolist())
    assert counts == {"superspeedway": 6, "intermediate": 15, "short_track": 9, "road_course": 6}
    superspeedways = Counter(season["track"].values[season["archetype"].values == "superspeedway"].tolist())
    assert superspeedways == {"Daytona": 2, "Talladega": 2, "Atlanta": 2}


def test_later_seasons_bring_new_tracks():
    two = synthesize(seasons=2, scenarios=5, seed=0)
    assert two.sizes["race"] == 72 and len(set(two["race"].values)) == 72
    first, second = (set(two["track"].values[two["race_date"].dt.year.values == y]) for y in (2024, 2025))
    assert second - first == {"Mexico City", "North Wilkesboro"}


def test_entries_and_absent_drivers_are_nan(season):
    entered = ~np.isnan(season["finish_position"].values)
    assert (entered.sum(axis=1) == 38).all()
    assert (entered.all(axis=0)).sum() >= 30  # the full-timers run every race
    assert (~entered).any(axis=0).sum() >= 8  # part-timers come and go
    absent = ~entered
    assert np.isnan(season["points"].values[absent]).all()
    for name in ("sim_position", "sim_points"):
        sims = season[name].values
        assert np.isnan(sims.transpose(0, 2, 1)[absent]).all()
        assert not np.isnan(sims.transpose(0, 2, 1)[entered]).any()


def test_every_scenario_is_a_permutation_of_the_field(season):
    sims = np.sort(season["sim_position"].values, axis=-1)
    np.testing.assert_array_equal(sims[..., :38], np.broadcast_to(np.arange(1, 39), sims[..., :38].shape))
    finish = np.sort(season["finish_position"].values, axis=-1)
    np.testing.assert_array_equal(finish[:, :38], np.broadcast_to(np.arange(1, 39), (36, 38)))


def test_the_truth_parses_and_has_every_archetype_track_and_event(season):
    t = truth(season)
    assert t["seed"] == 1 and t["scenarios"] == SCENARIOS and t["truth_scenarios"] >= SCENARIOS
    assert t["generator"] == "calq.synth" and t["version"] == 1
    assert t["events"] == list(TRUTH_EVENTS)
    assert t["temperature"]["archetype"] == TEMPERATURE
    assert set(t["archetypes"]) == set(ARCHETYPES)
    for archetype in ARCHETYPES:
        tracks = set(season["track"].values[season["archetype"].values == archetype])
        assert set(t["tracks"][archetype]) == tracks
        assert set(t["temperature"]["track"][archetype]) == tracks
        for event in TRUTH_EVENTS:
            fit = t["archetypes"][archetype][event]
            assert np.isfinite([fit["alpha"], fit["beta"]]).all()
            for track in tracks:
                assert set(t["tracks"][archetype][track][event]) >= {"alpha", "beta"}


def test_the_truth_has_the_intended_direction_of_miscalibration(season):
    beta = {a: truth(season)["archetypes"][a]["top_5"]["beta"] for a in ARCHETYPES}
    assert beta["superspeedway"] < 0.6  # over-confident: favourites too likely
    assert beta["road_course"] < 1.0
    assert beta["short_track"] > 1.0  # under-confident
    assert 0.8 < beta["intermediate"] < 1.1  # close to calibrated


def test_truth_needs_the_attribute(season):
    with pytest.raises(ValueError, match="calq_truth"):
        truth(season.drop_attrs())


def test_points_rise_as_the_finishing_position_improves(season):
    finish = season["finish_position"].values
    points = season["points"].values
    mean_by_position = np.array([points[finish == k].mean() for k in range(1, 39)])
    assert mean_by_position[0] > 45  # winners score finish points and dominator points
    assert (np.diff(mean_by_position[:20]) < 0).mean() > 0.8
    assert mean_by_position[:5].mean() > mean_by_position[5:15].mean() > mean_by_position[15:].mean()
    sims, sim_points = season["sim_position"].values, season["sim_points"].values
    sim_means = np.array([sim_points[sims == k].mean() for k in range(1, 39)])
    assert (np.diff(sim_means) < 0).all()


def test_save_and_open_round_trip(season, tmp_path):
    loaded = open_dataset(save_dataset(season, tmp_path / "season.nc"))
    xr.testing.assert_identical(loaded, season)
    assert truth(loaded) == truth(season)


def test_fit_logistic_recovers_known_parameters():
    x = np.linspace(-6, 3, 400)
    q = expit(-0.7 + 1.4 * x)
    alpha, beta = fit_logistic(x, q)
    assert alpha == pytest.approx(-0.7, abs=1e-8) and beta == pytest.approx(1.4, abs=1e-8)
    weights = np.where(x > 0, 3.0, 1.0)
    assert fit_logistic(x, q, weights=weights) == pytest.approx((-0.7, 1.4), abs=1e-8)


def test_fit_logistic_is_the_expected_log_loss_minimum():
    rng = np.random.default_rng(0)
    x = rng.normal(-2, 1.5, 300)
    q = expit(0.3 + 0.6 * x + rng.normal(0, 0.3, x.size))  # not exactly logistic in x

    def loss(a, b):
        mu = expit(a + b * x)
        return -np.sum(q * np.log(mu) + (1 - q) * np.log1p(-mu))

    alpha, beta = fit_logistic(x, q)
    for da, db in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)]:
        assert loss(alpha, beta) < loss(alpha + da, beta + db)


def test_plackett_luce_wins_in_proportion_to_worth():
    rng = np.random.default_rng(0)
    strength = np.array([1.0, 0.0, -0.5, 0.5])
    positions = plackett_luce(rng, strength, scenarios=40_000)
    np.testing.assert_allclose((positions == 1).mean(axis=0), softmax(strength), atol=0.01)
    assert positions.dtype == np.int16


def test_descending_ranks():
    keys = np.array([[0.1, 3.0, -1.0], [2.0, 1.0, 0.0]])
    np.testing.assert_array_equal(descending_ranks(keys), [[2, 1, 3], [1, 2, 3]])


@pytest.mark.parametrize(
    "kwargs", [{"seasons": 0}, {"scenarios": 0}, {"drivers_per_race": 50}, {"drivers_per_race": 1}]
)
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        synthesize(**kwargs)


def test_a_field_as_large_as_the_pool():
    ds = synthesize(seasons=1, scenarios=5, seed=0, drivers_per_race=6, pool_size=6)
    validate(ds)
    assert not np.isnan(ds["finish_position"].values).any()
    fits = truth(ds)["archetypes"]["intermediate"]
    assert fits["top_10"] == {"alpha": None, "beta": None, "n": fits["top_10"]["n"]}  # certain: no fit
    assert fits["top_1"]["beta"] is not None


# -- harder regimes (shared.data.regimes) ---------------------------------------------


@pytest.mark.parametrize("name", ["few_tracks", "dominant_track", "unequal_rows", "over_confident", "track_outliers"])
def test_each_regime_is_a_valid_dataset_with_its_world(name):
    from shared.data.regimes import REGIMES, synthesize_regime

    r = REGIMES[name]
    ds = synthesize_regime(name, seed=4, scenarios=50)
    assert validate(ds) is ds
    assert list(ds["track"].values) == list(r.schedule)
    assert set(ds["archetype"].values) == {r.archetype}
    assert int((~np.isnan(ds["finish_position"].values)).sum(axis=1).max()) == r.drivers_per_race
    t = truth(ds)
    assert ds.attrs["calq_regime"] == name
    for archetype, value in r.temperature.items():
        assert t["temperature"]["archetype"][archetype] == value
    base = t["temperature"]["archetype"][r.archetype]
    for track, factor in r.track_factor.items():
        assert t["temperature"]["track"][r.archetype][track] == pytest.approx(base * factor)
    xr.testing.assert_identical(synthesize_regime(name, seed=4, scenarios=50), ds)


def test_regime_truths_go_the_intended_way():
    from shared.data.regimes import synthesize_regime

    over = truth(synthesize_regime("over_confident", seed=1, scenarios=100))["archetypes"]["road_course"]
    under = truth(synthesize_regime("under_confident", seed=1, scenarios=100))["archetypes"]["short_track"]
    assert over["top_5"]["beta"] < 0.6 and under["top_5"]["beta"] > 1.6
    outliers = truth(synthesize_regime("track_outliers", seed=1, scenarios=100))["tracks"]["intermediate"]
    assert outliers["Las Vegas"]["top_5"]["beta"] < 0.8 and outliers["Kansas"]["top_5"]["beta"] > 1.1

    def share_near_0_or_1(ds) -> float:
        ds = ds.isel(race=np.flatnonzero(ds["archetype"].values == "intermediate"))
        p = (ds["sim_position"].values <= 10).mean(axis=1)[~np.isnan(ds["finish_position"].values)]
        return float(((p < 0.02) | (p > 0.98)).mean())

    extreme = share_near_0_or_1(synthesize_regime("extreme_forecasts", seed=1, scenarios=200))
    default = share_near_0_or_1(synthesize(seasons=1, scenarios=200, seed=1))
    assert extreme > 0.2 and extreme > 3 * default, (extreme, default)  # forecasts near 0 and 1


def test_an_unknown_regime_or_schedule_is_refused():
    from shared.data.regimes import synthesize_regime

    with pytest.raises(ValueError, match="unknown regime 'nope'; known: few_tracks"):
        synthesize_regime("nope")
    with pytest.raises(ValueError, match="known tracks"):
        synthesize(schedule=["Nowhere Speedway"], scenarios=10)
    with pytest.raises(ValueError, match="unknown archetype"):
        synthesize(temperature={"dirt": 2.0}, scenarios=10)


def test_calq_synth_writes_a_regime(tmp_path):
    from typer.testing import CliRunner

    from producer.cli import app

    out = tmp_path / "few.nc"
    result = CliRunner().invoke(app, ["synth", str(out), "--regime", "few_tracks", "--scenarios", "20"])
    assert result.exit_code == 0, result.output
    ds = open_dataset(out)
    assert ds.attrs["calq_regime"] == "few_tracks" and ds.sizes["race"] == 5
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "x.nc"), "--regime", "nope"])
    assert bad.exit_code == 2 and not (tmp_path / "x.nc").exists()
