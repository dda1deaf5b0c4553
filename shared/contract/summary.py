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
    parameter: str
    event: str
    archetype: str | None = None
    track: str | None = None
    mean: float
    sd: float
    hdi_low: float = Field(description="lower end of the 94% highest-density interval")
    hdi_high: float
    r_hat: float
    ess_bulk: float
    ess_tail: float


class Diagnostics(_Frozen):
    chains: int
    draws: int
    max_rhat: float
    min_ess_bulk: float
    min_ess_tail: float
    divergences: int
    bfmi: list[float] = Field(description="energy Bayesian fraction of missing information, per chain")
    min_bfmi: float
    max_tree_depth: int
    tree_depth_hits: int = Field(description="draws whose tree reached the maximum depth")
    mean_leapfrog_steps: float
    ess_bulk_per_second: float


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

    brier: float
    log_loss: float
    ece: float = Field(description="expected calibration error over 10 bins")
    reliability: dict[str, Any]


class EventCalibration(_Frozen):
    """An event's forecasts before and after calibration, for one archetype."""

    event: str
    archetype: str
    n: int
    base_rate: float
    raw: ForecastScores
    calibrated: ForecastScores = Field(description="posterior-mean calibrated probabilities (in-sample)")


class EnsembleScores(_Frozen):
    """The fantasy-points ensemble (sim_points) scored against points, per archetype."""

    archetype: str
    n: int
    crps: float
    log_score: float
    coverage: dict[str, float] = Field(description="central-interval level → share of outcomes inside")


class Attempt(_Frozen):
    """One sampler run of a job: its settings, how it ended and why it was run."""

    number: int = Field(description="1 for the job's own settings, then one per remedy")
    seed: int
    target_accept_prob: float
    warmup: int
    samples: int
    divergences: int
    max_rhat: float
    min_ess_bulk: float
    mean_leapfrog_steps: float
    compile_s: float
    sample_s: float
    issues: list[str] = Field(description="criteria this run failed; empty when it converged")
    remedy: str | None = Field(None, description="what this run changed, and why (None for the first)")
    warm_start: bool = Field(False, description="started from a previous fit's posterior (see CalibrationSummary.warm_start)")


class WarmStart(_Frozen):
    """The previous fit a job's first sampler run started from: an optimisation, never an input.

    Its posterior gave the chains' starting positions, the mass matrix and
    the initial step size, so the run's warmup was shorter (``warmup``).
    """

    job_id: str
    posterior_uri: str | None = None
    data_through: date = Field(description="the last race date the previous fit saw")
    warmup: int = Field(description="warmup steps of the warm run (the step size alone adapts)")
    target_accept_prob: float = Field(0.8, description="the warm run's target acceptance: the previous fit's, at least 0.8")


class Provenance(_Frozen):
    """A worker's proof that it wrote a summary and its posterior (see :mod:`shared.storage.provenance`)."""

    posterior_sha256: str = Field(description="sha256 of the posterior file's bytes, as the worker uploaded them")
    signature: str | None = Field(
        None, description="HMAC-SHA256 under the fleet's signing key of the summary without this field"
    )


class Timings(_Frozen):
    load_s: float = 0.0
    compile_s: float = 0.0
    sample_s: float = 0.0
    diagnostics_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0


class CalibrationSummary(_Frozen):
    """Everything the optimizer reads about one finished calibration."""

    job_id: str
    archetype: ArchetypeOrAll
    archetypes: list[str]
    events: list[str]
    model_version: str
    dataset_uri: str
    dataset_sha256: str
    as_of: date | None = None
    window_days: int | None = None
    data_through: date = Field(description="date of the latest race in the data used")
    sampler: SamplerSettings
    centered: bool
    n_rows: int
    n_races: int
    tracks: dict[str, list[str]] = Field(description="archetype → tracks fitted")
    converged: bool
    convergence_issues: list[str] = []
    diagnostics: Diagnostics
    attempts: list[Attempt] = Field([], description="every sampler run, in order; the last is the one reported")
    warm_start: WarmStart | None = Field(None, description="the previous fit the first run started from; None: a cold start")
    parameters: list[ParameterSummary]
    calibration: list[EventCalibration]
    ensemble: list[EnsembleScores] = []
    joint_events: list[dict[str, Any]] = []
    timings: Timings
    posterior_uri: str | None = None
    summary_uri: str | None = None
    provenance: Provenance | None = Field(None, description="set by workers holding a signing key; None: unsigned")
    created_at: datetime
    calq_version: str

    def parameter(self, parameter: str, event: str, *, archetype: str | None = None, track: str | None = None) -> ParameterSummary:
        """Look up one parameter's summary by its coordinates."""
        for p in self.parameters:
            if p.parameter == parameter and p.event == event and p.archetype == archetype and p.track == track:
                return p
        raise KeyError(f"no {parameter} for event={event} archetype={archetype} track={track}")
