"""Merged rows are exact: the model's likelihood on distinct (event, track, x) rows with weights
equals the row-wise Bernoulli likelihood, in value and gradient (issue 21)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import log_density, potential_energy

from shared.contract.domain import ARCHETYPES
from shared.data.dataset import event_rows
from shared.data.synth import synthesize
from shared.fit.idata import logit
from shared.fit.model import (
    ModelShape,
    block_slots,
    calibration_model,
    distinct_rows,
    model_data,
    potential,
    row_slots,
)
from shared.fit.sampler import bucket_tracks


@pytest.fixture(scope="module")
def rows():
    ds = synthesize(seasons=2, scenarios=40, seed=3)
    return event_rows(ds, events=("top_1", "top_5", "top_10"), archetypes=ARCHETYPES)


def _data(rows, *, n_rows=None):
    K = bucket_tracks(len(rows.tracks))
    track_archetype = np.zeros(K, np.int32)
    track_archetype[: len(rows.tracks)] = rows.track_archetype
    shape = ModelShape(n_events=3, n_archetypes=len(rows.archetypes), n_tracks=K, centered=False)
    data = model_data(
        x=logit(rows.p), y=rows.y, event=rows.event, track=rows.track, mask=np.ones(rows.n_rows, bool),
        track_archetype=track_archetype, track_real=np.arange(K) < len(rows.tracks), n_events=3, n_rows=n_rows,
    )
    return data, shape


def _params(shape, seed):
    """A random point of the model's latent space (constrained values, as a trace gives them)."""
    data = model_data(x=np.zeros(4, np.float32), y=None, event=np.zeros(4, np.int32), track=np.zeros(4, np.int32),
                      mask=np.ones(4, bool), track_archetype=np.zeros(shape.n_tracks, np.int32),
                      track_real=np.ones(shape.n_tracks, bool), n_events=shape.n_events)
    trace = numpyro.handlers.trace(numpyro.handlers.seed(calibration_model, seed)).get_trace(data, shape=shape)
    return {name: site["value"] for name, site in trace.items()
            if site["type"] == "sample" and not site.get("is_observed", False) and name != "y"}


def test_rows_repeat_and_merge_into_fewer(rows):
    first, inverse, count = distinct_rows(event=rows.event, track=rows.track, x=logit(rows.p))
    assert first.size < rows.n_rows / 2  # 40 scenarios: at most 41 forecast values per event and track
    assert count.sum() == rows.n_rows and (count >= 1).all()
    x = logit(rows.p).astype(np.float32)
    np.testing.assert_array_equal(x[first][inverse], x)  # each row maps to a triple with its own x
    np.testing.assert_array_equal(rows.track[first][inverse], rows.track)
    np.testing.assert_array_equal(rows.event[first][inverse], rows.event)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_likelihood_equals_the_row_wise_bernoulli(rows, seed):
    data, shape = _data(rows)
    params = _params(shape, seed)
    with numpyro.handlers.trace() as trace, numpyro.handlers.substitute(data=params):
        calibration_model(data, shape=shape)
    factor = float(trace["y"]["fn"].log_prob(trace["y"]["value"]).sum())  # numpyro.factor: a Unit site
    alpha = np.asarray(trace["alpha_track"]["value"], np.float64)
    beta = np.asarray(trace["beta_track"]["value"], np.float64)
    eta = alpha[rows.event, rows.track] + beta[rows.event, rows.track] * logit(rows.p).astype(np.float32)
    row_wise = float(dist.Bernoulli(logits=jnp.asarray(eta)).log_prob(jnp.asarray(rows.y)).sum())
    assert factor == pytest.approx(row_wise, rel=2e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_merged_and_row_wise_data_give_one_log_density_and_gradient(rows, seed):
    merged, shape = _data(rows)
    # the same rows, each its own row of weight 1 (nothing merged): the definition the merge must equal
    row_wise = merged._replace(
        x=jnp.asarray(logit(rows.p), jnp.float32), y=jnp.asarray(rows.y, jnp.int32),
        event=jnp.asarray(rows.event), track=jnp.asarray(rows.track), weight=jnp.ones(rows.n_rows, jnp.float32),
    )
    assert int((merged.weight > 0).sum()) < rows.n_rows
    row_wise_shape = dataclasses.replace(shape, row_block=1)  # rows in any order: (α, β) read per row
    params = _params(shape, seed)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(params))
    unconstrained = {name: 0.5 * jax.random.normal(key, jnp.shape(v)) for key, (name, v) in zip(keys, params.items())}

    def energy(data, shape):
        return lambda u: potential_energy(calibration_model, (data,), {"shape": shape}, u)

    value_a, grad_a = jax.value_and_grad(energy(merged, shape))(unconstrained)
    value_b, grad_b = jax.value_and_grad(energy(row_wise, row_wise_shape))(unconstrained)
    assert float(value_a) == pytest.approx(float(value_b), rel=1e-5)
    for name in grad_a:
        np.testing.assert_allclose(np.asarray(grad_a[name]), np.asarray(grad_b[name]), rtol=1e-4, atol=1e-3)
    ld, _ = log_density(calibration_model, (merged,), {"shape": shape}, params)
    assert np.isfinite(float(ld))


def test_padding_rows_weigh_nothing(rows):
    n = row_slots(event=rows.event, track=rows.track, x=logit(rows.p))  # merged rows, their blocks' padding included
    small, shape = _data(rows, n_rows=n)
    padded, _ = _data(rows, n_rows=n + 512)
    assert float(padded.weight[n:].sum()) == 0.0
    params = _params(shape, 4)
    a, _ = log_density(calibration_model, (small,), {"shape": shape}, params)
    b, _ = log_density(calibration_model, (padded,), {"shape": shape}, params)
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    with pytest.raises(ValueError, match="do not fit a bucket"):
        _data(rows, n_rows=n - 32)


def test_each_block_holds_rows_of_one_event_and_track(rows):
    data, shape = _data(rows)
    L = shape.row_block
    weight = np.asarray(data.weight).reshape(-1, L)
    group = (np.asarray(data.event) * shape.n_tracks + np.asarray(data.track)).reshape(-1, L)
    real = weight > 0
    used = real.any(axis=1)  # the rest are the bucket's padding blocks
    assert real[used, 0].all()  # a block starts with a real row: the model reads its (event, track) there
    assert (np.where(real, group, group[:, :1]) == group[:, :1]).all()
    groups_with_rows = {(int(e), int(t)) for e, t in zip(rows.event, rows.track)}
    assert len(set(group[used, 0].tolist())) == len(groups_with_rows)


def test_block_slots_fill_whole_blocks_per_group():
    event = np.array([0, 0, 0, 1, 1, 2])
    track = np.array([0, 0, 1, 1, 1, 0])
    slots, n = block_slots(event=event, track=track, row_block=4)
    assert slots.tolist() == [0, 1, 4, 8, 9, 12] and n == 16
    with pytest.raises(ValueError, match="grouped"):
        block_slots(event=np.array([0, 1, 0]), track=np.array([0, 0, 0]), row_block=4)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("archetypes", [("intermediate",), ARCHETYPES])
def test_the_samplers_potential_is_numpyros_potential_energy_in_value_and_gradient(seed, archetypes):
    """model.potential (value and gradient by hand, for the sampler) against autodiff of the traced model.

    On the job's own layout (merged rows in blocks, a bucket's padding rows
    and padding tracks), at points spread wide enough that the softplus
    meets large |η| of both signs; also under jit and vmap, as the sampler calls it.
    """
    ds = synthesize(seasons=2, scenarios=40, seed=3)
    rows = event_rows(ds, events=("top_1", "top_5", "top_10"), archetypes=archetypes)
    data, shape = _data(rows, n_rows=row_slots(event=rows.event, track=rows.track, x=logit(rows.p)) + 256)
    assert shape.n_tracks > len(rows.tracks)  # padding tracks too
    reference = lambda u: potential_energy(calibration_model, (data,), {"shape": shape}, u)  # noqa: E731
    params = _params(shape, seed)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(params))
    points = [{name: scale * jax.random.normal(key, jnp.shape(v)) for key, (name, v) in zip(keys, params.items())}
              for scale in (0.3, 1.0)]
    mine = jax.jit(jax.value_and_grad(potential(data, shape)))
    for u in points:
        value_a, grad_a = jax.value_and_grad(reference)(u)
        value_b, grad_b = mine(u)
        assert np.isfinite(float(value_a))
        assert float(value_b) == pytest.approx(float(value_a), rel=1e-5)
        assert grad_b.keys() == grad_a.keys()
        for name in grad_a:
            np.testing.assert_allclose(np.asarray(grad_b[name]), np.asarray(grad_a[name]), rtol=1e-4,
                                       atol=1e-4 * float(jnp.max(jnp.abs(grad_a[name]))))
    stacked = jax.tree_util.tree_map(lambda *v: jnp.stack(v), *points)
    values, grads = jax.vmap(jax.value_and_grad(potential(data, shape)))(stacked)
    for i, u in enumerate(points):
        value, grad = mine(u)
        assert float(values[i]) == pytest.approx(float(value), rel=1e-5)
        for name in grad:
            np.testing.assert_allclose(np.asarray(grads[name][i]), np.asarray(grad[name]), rtol=1e-5, atol=1e-5)


def test_the_centred_form_keeps_numpyros_potential(rows):
    data, shape = _data(rows)
    centred = dataclasses.replace(shape, centered=True)
    params = {name: jnp.zeros(jnp.shape(v)) for name, v in _params(centred, 0).items()}
    assert "alpha_track_raw" in params
    expected = potential_energy(calibration_model, (data,), {"shape": centred}, params)
    assert float(potential(data, centred)(params)) == pytest.approx(float(expected), rel=1e-6)
