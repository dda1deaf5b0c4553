"""The diagnostic summary a job publishes: small JSON, never draws.

The summary is written beside its posterior (the source of truth) and is
the Celery task's result. Everything in it is JSON-serialisable.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.contract.domain import ArchetypeOrAll
from shared.contract.job import SamplerSettings


class _Frozen(BaseModel):
    # R-hat of a stuck chain is inf and a score can be NaN: keep them as strings in JSON.
    model_config = ConfigDict(frozen=True, ser_json_inf_nan="strings")


class ParameterSummary(_Frozen):
    """Posterior summary of one scalar parameter."""

    name: str = Field(description='e.g. "beta_arch[top_5, superspeedway]"')
    parameter: str = Field(
        description="the model parameter: alpha_arch, beta_arch, sigma_alpha, sigma_log_beta, alpha_track or beta_track"
    )
    event: str = Field(description="the event it belongs to, e.g. top_5")
    archetype: str | None = Field(None, description="its archetype; null for a parameter of no one archetype")
    track: str | None = Field(None, description="its track, for track-level parameters; null otherwise")
    mean: float = Field(description="posterior mean (logit scale for α; β is a ratio of logits, 1 = calibrated)")
    sd: float = Field(description="posterior standard deviation, in the parameter's units")
    hdi_low: float = Field(description="lower end of the 94% highest-density interval")
    hdi_high: float = Field(description="upper end of the 94% highest-density interval")
    r_hat: float = Field(description="rank-normalised split R-hat (converged: below 1.01; a stuck chain gives the string inf)")
    ess_bulk: float = Field(description="bulk effective sample size, in draws")
    ess_tail: float = Field(description="tail effective sample size, in draws")


class Diagnostics(_Frozen):
    chains: int = Field(description="chains of the reported sampler run")
    draws: int = Field(description="kept draws per chain of the reported run")
    max_rhat: float = Field(description="worst R-hat over every parameter")
    min_ess_bulk: float = Field(description="smallest bulk ESS over every parameter, in draws")
    min_ess_tail: float = Field(description="smallest tail ESS over every parameter, in draws")
    divergences: int = Field(description="divergent transitions after warmup, all chains together")
    bfmi: list[float] = Field(description="energy Bayesian fraction of missing information, per chain")
    min_bfmi: float = Field(description="lowest BFMI over the chains (below 0.3 suggests poor exploration)")
    max_tree_depth: int = Field(description="the sampler's tree-depth limit")
    tree_depth_hits: int = Field(description="draws whose tree reached the maximum depth")
    mean_leapfrog_steps: float = Field(description="mean leapfrog steps per draw (gradient evaluations)")
    ess_bulk_per_second: float = Field(description="min_ess_bulk per second of sampling")


#: The target acceptance of a job's first sampler run (and the least a warm run uses): the first rung of
#: shared.fit.remedy's ladder; divergence-free on five seasons × four archetypes (see shared.fit.model).
TARGET_ACCEPT = 0.8


class ConvergenceCriteria(_Frozen):
    """When a posterior counts as converged (and may move the ``latest`` pointer).

    A run that fails them is remedied (higher target acceptance, longer
    warmup, more draws: see :mod:`shared.fit.remedy`) up to ``max_attempts``
    sampler runs in all; the last run is judged.
    """

    max_rhat: float = 1.01
    min_ess_bulk: float = 400.0
    max_divergences: int = 0
    max_attempts: int = Field(4, ge=1, le=10, description="sampler runs per job, the first included")

    def issues(self, d: Diagnostics) -> list[str]:
        """Reasons the diagnostics fail these criteria; empty when they pass."""
        return self.failures(max_rhat=d.max_rhat, min_ess_bulk=d.min_ess_bulk, divergences=d.divergences)

    def failures(self, *, max_rhat: float, min_ess_bulk: float, divergences: int) -> list[str]:
        """Reasons a run with these worst values fails the criteria; empty when it passes."""
        reasons = []
        if not max_rhat <= self.max_rhat:
            reasons.append(f"max R-hat {max_rhat:.4f} > {self.max_rhat}")
        if not min_ess_bulk >= self.min_ess_bulk:
            reasons.append(f"min bulk ESS {min_ess_bulk:.0f} < {self.min_ess_bulk:.0f}")
        if divergences > self.max_divergences:
            reasons.append(f"{divergences} divergent transitions")
        return reasons


class ForecastScores(_Frozen):
    """Scores of one set of event probabilities against outcomes."""

    brier: float = Field(description="Brier score: mean squared error of the probabilities (lower is better)")
    log_loss: float = Field(description="mean negative log likelihood of the outcomes, in nats (lower is better)")
    ece: float = Field(description="expected calibration error over 10 equal bins, in probability")
    reliability: dict[str, Any] = Field(
        description="reliability curve over 10 equal bins: bin_lower, bin_upper, mean_forecast, "
        "observed_frequency (null: an empty bin), count"
    )


class EventCalibration(_Frozen):
    """An event's forecasts before and after calibration, for one archetype."""

    event: str = Field(description="the event, e.g. top_5")
    archetype: str = Field(description="the archetype whose races are scored")
    n: int = Field(description="rows scored (race × driver entries)")
    base_rate: float = Field(description="share of rows where the event happened")
    raw: ForecastScores = Field(description="scores of the raw forecast probabilities")
    calibrated: ForecastScores = Field(description="posterior-mean calibrated probabilities (in-sample)")


class EnsembleScores(_Frozen):
    """The fantasy-points ensemble (sim_points) scored against points, per archetype."""

    archetype: str = Field(description="the archetype whose races are scored")
    n: int = Field(description="race × driver entries scored")
    crps: float = Field(description="mean CRPS (energy form), in fantasy points (lower is better)")
    log_score: float = Field(description="mean log density of the outcome under a Gaussian KDE of the ensemble (higher is better)")
    coverage: dict[str, float] = Field(description="central-interval level → share of outcomes inside")


class Attempt(_Frozen):
    """One sampler run of a job: its settings, how it ended and why it was run."""

    number: int = Field(description="1 for the job's own settings, then one per remedy")
    seed: int = Field(description="the run's sampler seed")
    target_accept_prob: float = Field(description="NUTS target acceptance probability")
    warmup: int = Field(description="warmup steps per chain")
    samples: int = Field(description="kept draws per chain")
    divergences: int = Field(description="divergent transitions after warmup")
    max_rhat: float = Field(description="worst R-hat of the run")
    min_ess_bulk: float = Field(description="smallest bulk ESS of the run, in draws")
    mean_leapfrog_steps: float = Field(description="mean leapfrog steps per draw")
    compile_s: float = Field(description="seconds compiling the sampler (0 when reused)")
    sample_s: float = Field(description="seconds of warmup and sampling")
    issues: list[str] = Field(description="criteria this run failed; empty when it converged")
    remedy: str | None = Field(None, description="what this run changed, and why (None for the first)")
    warm_start: bool = Field(False, description="started from a previous fit's posterior (see CalibrationSummary.warm_start)")


class WarmStart(_Frozen):
    """The previous fit a job's first sampler run started from: an optimisation, never an input.

    Its posterior gave the chains' starting positions, the mass matrix and
    the initial step size, so the run's warmup was shorter (``warmup``).
    """

    job_id: str = Field(description="the previous fit's job")
    posterior_uri: str | None = Field(None, description="the previous fit's posterior")
    data_through: date = Field(description="the last race date the previous fit saw")
    warmup: int = Field(description="warmup steps of the warm run (the step size alone adapts)")
    target_accept_prob: float = Field(
        TARGET_ACCEPT, description=f"the warm run's target acceptance: the previous fit's, at least {TARGET_ACCEPT}"
    )


class Provenance(_Frozen):
    """A worker's proof that it wrote a summary and its posterior (see :mod:`shared.storage.provenance`)."""

    posterior_sha256: str = Field(description="sha256 of the posterior file's bytes, as the worker uploaded them")
    signature: str | None = Field(
        None, description="HMAC-SHA256 under the fleet's signing key of the summary without this field"
    )


class Timings(_Frozen):
    load_s: float = Field(0.0, description="seconds: reading and checking the dataset")
    compile_s: float = Field(0.0, description="seconds: compiling the sampler")
    sample_s: float = Field(0.0, description="seconds: warmup and sampling, every run")
    diagnostics_s: float = Field(0.0, description="seconds: diagnostics and the in-sample calibration scores")
    score_s: float = Field(0.0, description="seconds: scoring the raw forecasts (points ensemble, joint events)")
    write_s: float = Field(0.0, description="seconds: writing the posterior and summary")
    total_s: float = Field(0.0, description="seconds: the whole job")


class CalibrationSummary(_Frozen):
    """Everything the optimizer reads about one finished calibration."""

    job_id: str = Field(description="the job's id, derived from its content (cj-…)")
    archetype: ArchetypeOrAll = Field(description="the archetype the job fitted, or all for a joint fit")
    archetypes: list[str] = Field(description="the archetypes in the fit")
    events: list[str] = Field(description="the events fitted, each with its own parameters")
    model_version: str = Field(description="the calibration model's version, e.g. logit-hier/2")
    dataset_uri: str = Field(description="the dataset's content address in the store")
    dataset_sha256: str = Field(description="sha256 of the dataset file's bytes")
    as_of: date | None = Field(None, description="only races before this date were used; null: every race")
    window_days: int | None = Field(None, description="only races in this many days before as_of; null: no window")
    data_through: date = Field(description="date of the latest race in the data used")
    sampler: SamplerSettings = Field(description="the job's sampler settings (part of its identity)")
    centered: bool = Field(description="whether the track level was centred (calq fits non-centred)")
    n_rows: int = Field(description="rows fitted: race × driver × event entries")
    n_races: int = Field(description="races in the data used")
    tracks: dict[str, list[str]] = Field(description="archetype → tracks fitted")
    converged: bool = Field(description="the last run met the convergence criteria (only converged fits move latest)")
    convergence_issues: list[str] = Field([], description="criteria the last run failed; empty when converged")
    diagnostics: Diagnostics = Field(description="MCMC diagnostics of the reported run")
    attempts: list[Attempt] = Field([], description="every sampler run, in order; the last is the one reported")
    warm_start: WarmStart | None = Field(None, description="the previous fit the first run started from; None: a cold start")
    parameters: list[ParameterSummary] = Field(description="posterior summary of every scalar parameter")
    calibration: list[EventCalibration] = Field(description="per event and archetype: scores before and after calibration (in-sample)")
    ensemble: list[EnsembleScores] = Field([], description="fantasy-points ensemble scores per archetype; empty without sim_points")
    joint_events: list[dict[str, Any]] = Field(
        [],
        description="pairs of drivers both hitting an event: group, event, threshold, n_pairs, mean_forecast, "
        "observed_frequency, brier_score, expected_calibration_error, reliability",
    )
    timings: Timings = Field(description="where the job's time went, in seconds")
    posterior_uri: str | None = Field(None, description="URI of the posterior NetCDF (ArviZ InferenceData)")
    summary_uri: str | None = Field(None, description="URI of this summary in the store")
    provenance: Provenance | None = Field(None, description="set by workers holding a signing key; None: unsigned")
    created_at: datetime = Field(description="when the summary was written (UTC)")
    calq_version: str = Field(description="the calq version that ran the job")

    def parameter(self, parameter: str, event: str, *, archetype: str | None = None, track: str | None = None) -> ParameterSummary:
        """Look up one parameter's summary by its coordinates."""
        for p in self.parameters:
            if p.parameter == parameter and p.event == event and p.archetype == archetype and p.track == track:
                return p
        raise KeyError(f"no {parameter} for event={event} archetype={archetype} track={track}")
