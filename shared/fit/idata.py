"""From sampler draws to an ArviZ InferenceData with named dimensions.

Groups: ``posterior`` (the interpretable parameters, padding tracks
dropped), ``sample_stats`` (NUTS statistics), ``observed_data`` (the
outcomes), ``constant_data`` (what each row conditions on) and
``posterior_predictive`` (replicated outcomes from a thinned set of draws).
Attributes are str/int/float only, as NetCDF requires (arviz-devs/arviz#2365).
"""

from __future__ import annotations

import json
from typing import Any

import arviz as az
import numpy as np

from shared.contract.domain import ARCHETYPE_PARAMETERS, TRACK_PARAMETERS
from shared.data.dataset import EventRows
from shared.fit.sampler import MAX_TREE_DEPTH, Draws
from shared.storage.netcdf import encode_attrs

#: Draws per chain kept for the posterior predictive (it is per row, so large).
PREDICTIVE_DRAWS = 100



def expit(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def logit(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return np.log(p) - np.log1p(-p)


def calibrated_probability(alpha: np.ndarray, beta: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The model's calibrated probability q = expit(α + β·logit(p)), broadcast (the one place it is written)."""
    return expit(alpha + beta * logit(p))


def posterior_draws(draws: Draws, *, n_tracks: int) -> dict[str, np.ndarray]:
    """The interpretable parameters' draws ``(chain, draw, ...)``, padding tracks dropped: the posterior group's arrays."""
    posterior = {name: draws.params[name] for name in ARCHETYPE_PARAMETERS}
    posterior.update({name: draws.params[name][..., :n_tracks] for name in TRACK_PARAMETERS})
    return posterior


def build_inference_data(
    draws: Draws, rows: EventRows, *, seed: int, attrs: dict[str, Any]
) -> az.InferenceData:
    """Assemble the InferenceData of one job from its draws and its rows."""
    posterior = posterior_draws(draws, n_tracks=len(rows.tracks))
    coords = {
        "event": list(rows.events),
        "archetype": list(rows.archetypes),
        "track": list(rows.tracks),
        "row": np.arange(rows.n_rows),
    }
    dims = {name: ["event", "archetype"] for name in ARCHETYPE_PARAMETERS}
    dims.update({name: ["event", "track"] for name in TRACK_PARAMETERS})

    idata = az.from_dict(
        posterior=posterior,
        sample_stats=_sample_stats(draws),
        observed_data={"y": rows.y.astype(np.int8)},
        constant_data={
            "p": rows.p,
            "event_index": rows.event.astype(np.int32),
            "track_index": rows.track.astype(np.int32),
            "race_index": rows.race.astype(np.int32),
            "driver_index": rows.driver.astype(np.int32),
            "track_archetype": np.asarray(rows.track_archetype, dtype=np.int32),
        },
        posterior_predictive={"y": _replicate(draws, rows, seed=seed)},
        coords=coords,
        dims={
            **dims,
            "y": ["row"],
            "p": ["row"],
            "event_index": ["row"],
            "track_index": ["row"],
            "race_index": ["row"],
            "driver_index": ["row"],
            "track_archetype": ["track"],
        },
    )
    idata.constant_data = idata.constant_data.assign_coords(
        race=list(rows.races), driver=list(rows.drivers)
    )
    for group in idata.groups():
        getattr(idata, group).attrs.update(encode_attrs(attrs))
    return idata


def _sample_stats(draws: Draws) -> dict[str, np.ndarray]:
    s = draws.stats
    n_steps = s["n_steps"].astype(np.int64)
    return {
        "diverging": s["diverging"].astype(np.int8),  # netCDF4 has no bool variables
        "n_steps": n_steps,
        "tree_depth": np.floor(np.log2(n_steps + 1)).astype(np.int64),
        "reached_max_treedepth": (n_steps >= 2**MAX_TREE_DEPTH - 1).astype(np.int8),
        "energy": s["energy"],
        "lp": s["lp"],
        "acceptance_rate": s["acceptance_rate"],
        "step_size": s["step_size"],
    }


def calibrated_probability_draws(params: dict[str, np.ndarray], rows: EventRows, *, draws: slice) -> np.ndarray:
    """q = expit(α[e, k] + β[e, k]·logit(p)) per selected draw and row: (chain, draw, row)."""
    return _q_draws(params, event=rows.event, track=rows.track, p=rows.p, draws=draws)


def _q_draws(params: dict[str, np.ndarray], *, event: np.ndarray, track: np.ndarray, p: np.ndarray, draws: slice):
    alpha = params["alpha_track"][:, draws][..., event, track]
    beta = params["beta_track"][:, draws][..., event, track]
    return calibrated_probability(alpha, beta, p)


def calibrated_probability_mean(params: dict[str, np.ndarray], rows: EventRows, *, block: int = 100) -> np.ndarray:
    """Posterior mean of the calibrated probability of every row, in blocks of draws.

    Rows of equal (event, track, p) have one q: each distinct triple is computed
    once (a forecast from M scenarios takes at most M + 1 values, so rows repeat).
    """
    triples = np.column_stack([rows.event, rows.track, rows.p]).astype(np.float64)
    distinct, inverse = np.unique(triples, axis=0, return_inverse=True)
    event, track, p = distinct[:, 0].astype(np.intp), distinct[:, 1].astype(np.intp), distinct[:, 2]
    n_draws = params["alpha_track"].shape[1]
    total = np.zeros(len(distinct))
    for start in range(0, n_draws, block):
        q = _q_draws(params, event=event, track=track, p=p, draws=slice(start, start + block))
        total += q.sum(axis=(0, 1))
    return (total / (n_draws * params["alpha_track"].shape[0]))[inverse.reshape(-1)]


def _replicate(draws: Draws, rows: EventRows, *, seed: int) -> np.ndarray:
    n_draws = draws.params["alpha_track"].shape[1]
    step = max(1, n_draws // PREDICTIVE_DRAWS)
    q = calibrated_probability_draws(draws.params, rows, draws=slice(0, n_draws, step))
    rng = np.random.default_rng(seed)
    return (rng.random(q.shape) < q).astype(np.int8)


def to_dataset_attrs(idata: az.InferenceData) -> dict[str, Any]:
    """The posterior group's attributes, JSON-decoded where they were encoded."""
    out: dict[str, Any] = {}
    for key, value in idata.posterior.attrs.items():
        if (isinstance(value, str) and value[:1] in "[{") or value in ("true", "false", "null"):
            try:
                out[key] = json.loads(value)
                continue
            except (TypeError, ValueError):
                pass
        out[key] = value
    return out


__all__ = [
    "build_inference_data",
    "calibrated_probability",
    "calibrated_probability_draws",
    "calibrated_probability_mean",
    "expit",
    "logit",
    "posterior_draws",
    "to_dataset_attrs",
]
