"""The InferenceData of a job and the calibrated probabilities it is built from (shared/fit/idata.py).

No sampler in the loop: draws are seeded random arrays of the sampler's
shapes (float32, padding tracks included), rows a synthetic season's.
"""

from __future__ import annotations

import arviz as az
import numpy as np
import pytest
import xarray as xr

from shared.contract.domain import ARCHETYPE_PARAMETERS, TRACK_PARAMETERS
from shared.data.dataset import event_rows
from shared.data.synth import synthesize
from shared.fit.idata import (
    _constant_data,
    _sample_stats,
    build_inference_data,
    calibrated_probability,
    calibrated_rows,
    posterior_draws,
    predictive_step,
)
from shared.fit.sampler import Draws, bucket_tracks
from shared.storage.netcdf import encode_attrs, write_netcdf


@pytest.fixture(scope="module")
def rows():
    ds = synthesize(seasons=1, scenarios=200, seed=3)
    return event_rows(ds, events=("top_5", "top_10"), archetypes=("intermediate", "superspeedway"))


def _draws(rows, *, chains=3, n_draws=250, seed=0) -> Draws:
    """Random draws of the sampler's shapes: (chain, draw, event, archetype) and (chain, draw, event, padded track)."""
    rng = np.random.default_rng(seed)
    events, tracks = len(rows.events), bucket_tracks(len(rows.tracks))
    params = {name: rng.normal(size=(chains, n_draws, events, len(rows.archetypes))).astype(np.float32)
              for name in ARCHETYPE_PARAMETERS}
    params["alpha_track"] = rng.normal(0.0, 2.0, (chains, n_draws, events, tracks)).astype(np.float32)
    params["beta_track"] = rng.lognormal(0.0, 0.5, (chains, n_draws, events, tracks)).astype(np.float32)
    stats = {
        "diverging": rng.random((chains, n_draws)) < 0.01,
        "n_steps": rng.integers(1, 64, (chains, n_draws)),
        **{k: rng.normal(size=(chains, n_draws)).astype(np.float32)
           for k in ("energy", "lp", "acceptance_rate", "step_size")},
    }
    return Draws(params=params, stats=stats, compile_s=0.0, sample_s=1.0)


def _row_wise_q(params, rows, draws: slice) -> np.ndarray:
    """The definition: q of every row at every selected draw, (chain, draw, row), row by row."""
    alpha = params["alpha_track"][:, draws][..., rows.event, rows.track]
    beta = params["beta_track"][:, draws][..., rows.event, rows.track]
    return calibrated_probability(alpha, beta, rows.p)


def test_rows_repeat_so_distinct_triples_are_fewer(rows):
    triples = np.unique(np.column_stack([rows.event, rows.track, rows.p]), axis=0)
    assert len(triples) < 0.8 * rows.n_rows  # what calibrated_rows saves, and what the tests below exercise


@pytest.mark.parametrize(("n_draws", "block"), [(250, 100), (250, 7), (40, 100), (1000, 100), (1000, 10)])
def test_calibrated_rows_equal_the_row_wise_definition(rows, n_draws, block):
    params = _draws(rows, n_draws=n_draws).params
    got = calibrated_rows(params, rows, block=block)
    q = _row_wise_q(params, rows, slice(None))
    np.testing.assert_allclose(got.mean, q.mean(axis=(0, 1)), rtol=1e-12, atol=1e-15)
    step = predictive_step(n_draws)
    # the predictive draws are the same numbers as q computed row by row at every step-th draw
    np.testing.assert_array_equal(got.predictive, _row_wise_q(params, rows, slice(0, n_draws, step)))
    assert got.predictive.shape == (3, len(range(0, n_draws, step)), rows.n_rows)


def test_the_replicated_outcomes_are_drawn_from_the_row_wise_q(rows):
    draws = _draws(rows, n_draws=250)
    idata = build_inference_data(draws, rows, seed=11, attrs={"job_id": "j"})
    q = _row_wise_q(draws.params, rows, slice(0, 250, predictive_step(250)))
    expected = (np.random.default_rng(11).random(q.shape) < q).astype(np.int8)
    np.testing.assert_array_equal(idata.posterior_predictive["y"].values, expected)
    given = build_inference_data(draws, rows, seed=11, attrs={"job_id": "j"},
                                 calibrated=calibrated_rows(draws.params, rows))
    np.testing.assert_array_equal(given.posterior_predictive["y"].values, expected)


def _from_dict(draws, rows, *, y_rep, attrs) -> az.InferenceData:
    """The reference: the same groups as ``az.from_dict`` builds them (as build_inference_data did before it built them itself)."""
    dims = {name: ["event", "archetype"] for name in ARCHETYPE_PARAMETERS}
    dims.update({name: ["event", "track"] for name in TRACK_PARAMETERS})
    idata = az.from_dict(
        posterior=posterior_draws(draws, n_tracks=len(rows.tracks)),
        sample_stats=_sample_stats(draws),
        observed_data={"y": rows.y.astype(np.int8)},
        constant_data=_constant_data(rows),
        posterior_predictive={"y": y_rep},
        coords={"event": list(rows.events), "archetype": list(rows.archetypes), "track": list(rows.tracks),
                "row": np.arange(rows.n_rows)},
        dims={**dims, **{name: ["row"] for name in ("y", "p", "event_index", "track_index", "race_index", "driver_index")},
              "track_archetype": ["track"]},
    )
    idata.constant_data = idata.constant_data.assign_coords(race=list(rows.races), driver=list(rows.drivers))
    for group in idata.groups():
        getattr(idata, group).attrs.update(encode_attrs(attrs))
    return idata


def test_the_inference_data_is_the_one_arviz_from_dict_builds(rows, tmp_path):
    draws = _draws(rows, n_draws=250)
    attrs = {"job_id": "j", "job": {"archetype": "intermediate", "as_of": None}, "attempts": 2, "centered": 0}
    got = build_inference_data(draws, rows, seed=5, attrs=attrs)
    expected = _from_dict(draws, rows, y_rep=got.posterior_predictive["y"].values, attrs=attrs)
    assert got.groups() == expected.groups()
    for group in expected.groups():
        mine, theirs = getattr(got, group), getattr(expected, group)
        assert mine.attrs.pop("created_at") and theirs.attrs.pop("created_at")
        xr.testing.assert_identical(mine, theirs)
        for name, variable in theirs.variables.items():
            assert mine[name].dtype == variable.dtype, (group, name)
    # and so is the file: read back, every group is the same
    write_netcdf(got, tmp_path / "mine.nc")
    write_netcdf(expected, tmp_path / "theirs.nc")
    for group in expected.groups():
        with xr.open_dataset(tmp_path / "mine.nc", group=group) as a, xr.open_dataset(tmp_path / "theirs.nc", group=group) as b:
            xr.testing.assert_identical(a.load(), b.load())
