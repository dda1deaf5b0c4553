"""MCMC diagnostics and parameter summaries, from an InferenceData.

Layers as in arviz-stats: ArviZ computes the kernels (rank-normalised split
R-hat, bulk and tail ESS, HDI, BFMI); this module turns them into the
summary's records. It takes any InferenceData with the calq posterior layout,
so it is tested on posteriors built from seeded random arrays, with no
sampler in the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import arviz as az
import numpy as np

from shared.contract.domain import PARAMETERS
from shared.contract.summary import Diagnostics, ParameterSummary

HDI_PROB = 0.94
SUMMARISED = PARAMETERS


@dataclass(frozen=True)
class Convergence:
    """R-hat and bulk ESS of every parameter of one run, and its divergent transitions.

    The arrays are in each parameter's own dimension order (chain and draw
    reduced), so they serve any InferenceData of the same draws, whatever its
    coordinates: computed once per sampler run, they are both the check between
    remedy attempts and, for the last run, the summary's R-hat and bulk ESS.
    """

    r_hat: dict[str, np.ndarray]
    ess_bulk: dict[str, np.ndarray]
    divergences: int

    def worst(self) -> tuple[float, float, int]:
        """(max R-hat, min bulk ESS, divergences): what the convergence criteria read."""
        max_rhat = _worst(float(v) for values in self.r_hat.values() for v in np.ravel(values))
        min_ess = min((float(v) for values in self.ess_bulk.values() for v in np.ravel(values)), default=math.nan)
        return max_rhat, min_ess, self.divergences


def convergence(idata: az.InferenceData, *, var_names=SUMMARISED) -> Convergence:
    """Rank-normalised split R-hat and bulk ESS of every parameter in ``var_names``, and the divergences."""
    post = idata.posterior[list(var_names)]
    rhat = az.rhat(post, method="rank")
    ess = az.ess(post, method="bulk")
    return Convergence(
        r_hat={name: rhat[name].values for name in var_names},
        ess_bulk={name: ess[name].values for name in var_names},
        divergences=int(idata.sample_stats["diverging"].sum()),
    )


def parameter_summaries(
    idata: az.InferenceData, *, var_names=SUMMARISED, known: Convergence | None = None
) -> list[ParameterSummary]:
    """Mean, sd, 94 % HDI, R-hat and bulk/tail ESS of every scalar parameter.

    ``known``: the same draws' :func:`convergence`, whose R-hat and bulk ESS
    are taken rather than computed again.
    """
    post = idata.posterior[list(var_names)]
    stats = {
        "mean": post.mean(("chain", "draw")),
        "sd": post.std(("chain", "draw"), ddof=1),
        "hdi_low": (hdi := az.hdi(post, hdi_prob=HDI_PROB)).sel(hdi="lower", drop=True),
        "hdi_high": hdi.sel(hdi="higher", drop=True),
        "ess_tail": az.ess(post, method="tail"),
    }
    known = known or convergence(idata, var_names=var_names)
    records = []
    for name in var_names:
        dims = [d for d in post[name].dims if d not in ("chain", "draw")]
        labels = [[str(v) for v in post[d].values] for d in dims]
        # numpy arrays in the parameter's own dimension order: no xarray lookups per scalar
        values = {key: ds[name].transpose(*dims).values for key, ds in stats.items()}
        values |= {"r_hat": known.r_hat[name], "ess_bulk": known.ess_bulk[name]}
        for index in np.ndindex(*[len(lab) for lab in labels]):
            coords = dict(zip(dims, (lab[i] for lab, i in zip(labels, index))))
            records.append(
                ParameterSummary(
                    name=f"{name}[{', '.join(coords.values())}]",
                    parameter=name,
                    event=coords["event"],
                    archetype=coords.get("archetype"),
                    track=coords.get("track"),
                    **{key: float(array[index]) for key, array in values.items()},
                )
            )
    return records


def sampler_diagnostics(
    idata: az.InferenceData, parameters: list[ParameterSummary],
    *,
    sample_seconds: float,
    max_tree_depth: int,
) -> Diagnostics:
    """Run-level diagnostics: worst R-hat and ESS, divergences, BFMI, tree depth."""
    stats = idata.sample_stats
    chains, draws = stats.sizes["chain"], stats.sizes["draw"]
    bfmi = [float(b) for b in np.atleast_1d(az.bfmi(idata))] if draws > 1 else [math.nan] * chains
    min_ess_bulk = min((p.ess_bulk for p in parameters), default=math.nan)
    return Diagnostics(
        chains=chains,
        draws=draws,
        max_rhat=_worst(p.r_hat for p in parameters),
        min_ess_bulk=min_ess_bulk,
        min_ess_tail=min((p.ess_tail for p in parameters), default=math.nan),
        divergences=int(stats["diverging"].sum()),
        bfmi=bfmi,
        min_bfmi=min(bfmi),
        max_tree_depth=max_tree_depth,
        tree_depth_hits=int(stats["reached_max_treedepth"].sum()),
        mean_leapfrog_steps=float(stats["n_steps"].mean()),
        ess_bulk_per_second=min_ess_bulk / sample_seconds if sample_seconds > 0 else math.nan,
    )


def _worst(values) -> float:
    """The largest R-hat; NaN (a constant chain) counts as the worst."""
    values = list(values)
    if any(math.isnan(v) for v in values):
        return math.inf
    return max(values, default=math.nan)
