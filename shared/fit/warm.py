"""Warm starts: begin a job's sampler where a previous fit's posterior left off.

Consecutive fits of one archetype (a backfill's as-of dates, the optimizer's
daily refit) see nearly the same races, so their posteriors nearly agree.
A cold run spends its warmup finding that posterior: the typical set, a
step size and a mass matrix. A warm run takes all three from a stored
posterior of the same archetype:

- **positions**: one joint draw of the previous posterior per chain, picked
  at random (seeded), so chains start apart, inside the typical set;
- **mass matrix**: the dense covariance of every unconstrained coordinate
  over all of the previous draws (thousands, where a cold warmup's windows
  see hundreds, too few for the 240 coordinates of a 24k-row job),
  regularised as Stan and NumPyro regularise their estimates
  (:func:`regularised_covariance`);
- **step size**: the previous run's adapted one, the starting point (and
  the prox centre) of a dual-averaging warmup of :func:`warm_warmup` steps,
  which adapts the step size alone (:func:`shared.fit.nuts.nuts_step`);
- **target acceptance**: the previous fit's, when a remedy had raised it
  (:attr:`WarmSource.target_accept_prob`).

The stored posterior holds the interpretable parameters; the sampler's
coordinates are recovered from them exactly: ``log β``, ``log σ`` and the
non-centred ``z = (α_track − α_arch) / σ_α`` (likewise for ``log β``).
Events, archetypes and tracks are matched by name; a track the previous fit
did not see, and every padding track, starts from its prior (a standard
normal z, unit mass).

A warm start is an optimisation, never an input: the job's id does not
depend on it, its first run is judged by the same criteria as a cold one,
and a warm run whose chains disagree is followed by a cold one
(:func:`shared.fit.remedy.next_plan`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

import arviz as az
import numpy as np

from shared.fit.model import ModelShape
from shared.fit.sampler import StartingPoint

#: A warm run's warmup is this share of the job's (the step size alone adapts) ...
WARM_WARMUP_FRACTION = 0.2
#: ... and never shorter than this, unless the job's own warmup is.
MIN_WARM_WARMUP = 50
#: Stan's (and NumPyro's) regularisation of an estimated mass matrix: shrink towards 1e-3·I by 5 pseudo-draws.
_SHRINK_DRAWS, _SHRINK_TO = 5, 1e-3
#: The dense covariance needs at least this many previous draws per coordinate, else only its diagonal is used.
MIN_DRAWS_PER_COORDINATE = 5


class WarmStartUnusable(ValueError):
    """The previous posterior cannot seed this job (another model, events or archetypes)."""


@dataclass(frozen=True)
class WarmSource:
    """A previous fit to start from: its posterior and where it came from."""

    idata: az.InferenceData
    job_id: str
    posterior_uri: str | None
    data_through: date

    @property
    def target_accept_prob(self) -> float | None:
        """The target acceptance of the previous fit's kept run (None if it did not record a usable one).

        A posterior that needed a higher target to run without divergences
        needs it again one race later: the warm run starts there.
        """
        try:
            value = float(self.idata.posterior.attrs.get("target_accept_prob"))
        except (TypeError, ValueError):
            return None
        return value if 0.0 < value < 1.0 else None


def warm_warmup(warmup: int) -> int:
    """The warmup of a warm run, for a job whose own (cold) warmup is ``warmup``."""
    return min(warmup, max(MIN_WARM_WARMUP, math.ceil(warmup * WARM_WARMUP_FRACTION)))


def starting_point(
    previous: az.InferenceData,
    *,
    events: Sequence[str],
    archetypes: Sequence[str],
    tracks: Sequence[str],
    track_archetype: Sequence[int],
    shape: ModelShape,
    chains: int,
    seed: int,
) -> StartingPoint:
    """Where ``chains`` chains of this job start, from the ``previous`` fit's posterior.

    ``tracks`` are this job's track labels and ``track_archetype`` their
    archetype indices into ``archetypes``; ``shape`` is the padded model
    shape of this job's bucket. Raises :class:`WarmStartUnusable` when the
    previous fit lacks one of the events or archetypes, was centred, or
    holds no finite draws.
    """
    if shape.centered or _attr(previous, "centered") not in (0, "0", False, None):
        raise WarmStartUnusable("warm starts are for the non-centred model")
    draws = unconstrained_draws(previous)
    prev_events = list(previous.posterior["event"].values.astype(str))
    prev_archetypes = list(previous.posterior["archetype"].values.astype(str))
    prev_tracks = list(previous.posterior["track"].values.astype(str))
    prev_track_archetype = np.asarray(previous.constant_data["track_archetype"].values)
    missing = [e for e in events if e not in prev_events] + [a for a in archetypes if a not in prev_archetypes]
    if missing:
        raise WarmStartUnusable(f"the previous fit has no {', '.join(missing)}")
    ei = np.array([prev_events.index(e) for e in events])
    ai = np.array([prev_archetypes.index(a) for a in archetypes])

    # this job's track k ← the previous fit's track of the same name and archetype, or none (-1)
    matched = np.full(shape.n_tracks, -1)
    for k, (label, a) in enumerate(zip(tracks, track_archetype)):
        if label in prev_tracks:
            j = prev_tracks.index(label)
            if prev_archetypes[prev_track_archetype[j]] == archetypes[a]:
                matched[k] = j
    seen = matched >= 0

    n = draws["alpha_arch"].shape[0]
    rng = np.random.default_rng(seed)
    picks = rng.choice(n, size=chains, replace=chains > n)
    positions: dict[str, np.ndarray] = {}
    columns: dict[str, np.ndarray] = {}  # site → (draw, its coordinates), NaN where the previous fit has none
    for name, values in draws.items():
        values = values[:, ei]  # (draw, event, archetype | track)
        if name.endswith("_z"):
            start = rng.standard_normal((chains, len(ei), shape.n_tracks))
            start[:, :, seen] = values[picks][:, :, matched[seen]]
            known = np.full((n, len(ei), shape.n_tracks), np.nan)
            known[:, :, seen] = values[:, :, matched[seen]]
        else:
            start = values[picks][:, :, ai]
            known = values[:, :, ai]
        positions[name] = start.astype(np.float32)
        columns[name] = known.reshape(n, -1)

    # the kernel's order (jax.flatten_util.ravel_pytree of a dict): sites sorted by name, each flattened
    flat = np.concatenate([columns[name] for name in sorted(columns)], axis=1)
    if not all(np.isfinite(v).all() for v in positions.values()) or np.isinf(flat).any():
        raise WarmStartUnusable("the previous posterior holds non-finite draws")
    seen_coordinates = ~np.isnan(flat).any(axis=0)
    if np.isnan(flat[:, seen_coordinates]).any():
        raise WarmStartUnusable("the previous posterior holds non-finite draws")
    step_sizes = np.asarray(previous.sample_stats["step_size"].values)[:, -1]
    step_size = float(np.median(step_sizes))
    if not (np.isfinite(step_size) and step_size > 0):
        raise WarmStartUnusable(f"the previous step size {step_size} is not a positive number")
    inverse_mass = np.eye(flat.shape[1])  # a coordinate the previous fit did not have: its prior's unit scale
    inverse_mass[np.ix_(seen_coordinates, seen_coordinates)] = regularised_covariance(flat[:, seen_coordinates])
    return StartingPoint(positions=positions, step_size=step_size, inverse_mass_matrix=inverse_mass.astype(np.float32))


def unconstrained_draws(idata: az.InferenceData) -> dict[str, np.ndarray]:
    """The sampler's coordinates of every stored draw: site → (draw, event, archetype | track).

    The inverse of the model's transforms (:mod:`shared.fit.model`), applied
    to the stored interpretable parameters; chains are stacked.
    """
    post = idata.posterior

    def stacked(name: str) -> np.ndarray:
        values = np.asarray(post[name].values, np.float64)
        return values.reshape(-1, *values.shape[2:])

    ta = np.asarray(idata.constant_data["track_archetype"].values)
    alpha_arch, log_beta_arch = stacked("alpha_arch"), np.log(stacked("beta_arch"))
    sigma_alpha, sigma_log_beta = stacked("sigma_alpha"), stacked("sigma_log_beta")
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "alpha_arch": alpha_arch,
            "log_beta_arch": log_beta_arch,
            "sigma_alpha": np.log(sigma_alpha),
            "sigma_log_beta": np.log(sigma_log_beta),
            "alpha_track_z": (stacked("alpha_track") - alpha_arch[..., ta]) / sigma_alpha[..., ta],
            "log_beta_track_z": (np.log(stacked("beta_track")) - log_beta_arch[..., ta]) / sigma_log_beta[..., ta],
        }


def regularised_covariance(draws: np.ndarray) -> np.ndarray:
    """The covariance of ``draws`` (draw, coordinate), shrunk as Stan and NumPyro shrink their estimates.

    ``(n/(n+5))·Σ + 1e-3·(5/(n+5))·I`` for n draws. With fewer than
    :data:`MIN_DRAWS_PER_COORDINATE` draws a coordinate the correlations are
    too noisy to trust (Σ is near-singular below one): only the variances
    are kept.
    """
    n, size = draws.shape
    covariance = np.atleast_2d(np.cov(draws, rowvar=False))
    if n < MIN_DRAWS_PER_COORDINATE * size:
        covariance = np.diag(np.diag(covariance))
    return (n / (n + _SHRINK_DRAWS)) * covariance + _SHRINK_TO * (_SHRINK_DRAWS / (n + _SHRINK_DRAWS)) * np.eye(size)


def _attr(idata: az.InferenceData, key: str):
    return idata.posterior.attrs.get(key)


__all__ = [
    "MIN_DRAWS_PER_COORDINATE",
    "MIN_WARM_WARMUP",
    "WARM_WARMUP_FRACTION",
    "WarmSource",
    "WarmStartUnusable",
    "regularised_covariance",
    "starting_point",
    "unconstrained_draws",
    "warm_warmup",
]
