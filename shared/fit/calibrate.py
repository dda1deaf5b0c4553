"""The calibration run: ``calibrate(dataset, job) -> (InferenceData, Fit)``.

A pure function of its inputs: no Celery, no Redis, no storage. The worker
and the embedded mode both call it; it is tested directly. It fits and
judges the fit (diagnostics, the in-sample calibration scores); the raw
forecasts' scores and the job's summary are the jobs layer's
(:func:`shared.jobs.summary.summarize`, once per job, when the caller knows
what only it measured: loading, writing, where the posterior went).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import date

import arviz as az
import numpy as np
import xarray as xr

import shared
from shared.contract.control import JobControl
from shared.contract.domain import archetypes_of
from shared.contract.errors import InvalidDataset
from shared.contract.job import CalibrationJob, Progress
from shared.contract.summary import (
    Attempt,
    ConvergenceCriteria,
    Diagnostics,
    EventCalibration,
    ParameterSummary,
    WarmStart,
)
from shared.data.dataset import EventRows, event_rows, select_races, validate
from shared.fit.batch import batched_draws, first_run_of
from shared.fit.idata import build_inference_data, calibrated_rows, logit, posterior_draws
from shared.fit.model import ModelData, ModelShape, model_data, row_slots
from shared.fit.remedy import MAX_DRAWS_PER_CHAIN, TARGET_ACCEPT, RunOutcome, RunPlan, first_plan, next_plan
from shared.fit.sampler import (
    MAX_TREE_DEPTH,
    Bucket,
    Draws,
    StartingPoint,
    bucket_rows,
    bucket_tracks,
    chain_devices,
    chunk_length,
    sampler_for,
)
from shared.fit.warm import WarmSource, WarmStartUnusable, starting_point, warm_warmup
from shared.stats import diagnostics
from shared.stats.evaluation import event_calibration

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Prepared:
    """A job's data, ready for its compiled sampler."""

    window: xr.Dataset
    rows: EventRows
    data: ModelData
    bucket: Bucket


def prepare(ds: xr.Dataset, job: CalibrationJob) -> Prepared:
    """Select the job's races, flatten them to rows and pad them to a bucket.

    Raises :class:`InvalidDataset` when the window holds no race of the job's archetypes.
    """
    archetypes = archetypes_of(job.archetype)
    window = select_races(ds, as_of=job.as_of, window_days=job.window_days, archetypes=archetypes)
    if window.sizes["race"] == 0:
        span = f"before {job.as_of}" if job.as_of else "in the dataset"
        if job.window_days:
            span += f" within {job.window_days} days"
        raise InvalidDataset([f"no races of archetype {job.archetype} {span}"])
    present = [a for a in archetypes if a in set(window["archetype"].values.astype(str))]
    rows = event_rows(window, events=job.events, archetypes=present)
    shape = ModelShape(
        n_events=len(rows.events),
        n_archetypes=len(rows.archetypes),
        n_tracks=bucket_tracks(len(rows.tracks)),
        centered=False,  # measured: see shared.fit.model
    )
    bucket = Bucket(
        shape=shape,
        n_rows=bucket_rows(row_slots(event=rows.event, track=rows.track, x=logit(rows.p), row_block=shape.row_block)),
        chains=job.sampler.chains,
        warmup=job.sampler.warmup,
        chunk=chunk_length(job.sampler.warmup, job.sampler.samples),
        devices=chain_devices(job.sampler.chains),
    )
    return Prepared(window=window, rows=rows, data=pad(rows, bucket), bucket=bucket)


def pad(rows: EventRows, bucket: Bucket) -> ModelData:
    """The rows as model arrays (equal rows merged), padded to the bucket, with their statistics."""
    K = bucket.shape.n_tracks
    track_archetype = np.zeros(K, np.int32)
    track_archetype[: len(rows.tracks)] = rows.track_archetype
    return model_data(
        x=logit(rows.p),
        y=rows.y,
        event=rows.event,
        track=rows.track,
        mask=np.ones(rows.n_rows, bool),
        track_archetype=track_archetype,
        track_real=np.arange(K) < len(rows.tracks),
        n_events=bucket.shape.n_events,
        n_rows=bucket.n_rows,
        row_block=bucket.shape.row_block,
    )


def track_labels(rows: EventRows) -> list[str]:
    """Track names, disambiguated by archetype where one name recurs under two."""
    names = list(rows.tracks)
    return [
        f"{name} ({rows.archetypes[a]})" if names.count(name) > 1 else name
        for name, a in zip(names, rows.track_archetype)
    ]


@dataclass(frozen=True)
class Fit:
    """What a calibration measured: the summary's fields of the same names, and the races it fitted."""

    job: CalibrationJob
    window: xr.Dataset  # the job's races (its window and archetypes), as fitted
    archetypes: list[str]
    data_through: date
    centered: bool
    n_rows: int
    n_races: int
    tracks: dict[str, list[str]]
    convergence_issues: list[str]
    diagnostics: Diagnostics
    attempts: list[Attempt]
    warm_start: WarmStart | None
    parameters: list[ParameterSummary]
    calibration: list[EventCalibration]
    compile_s: float
    sample_s: float
    diagnostics_s: float

    @property
    def converged(self) -> bool:
        return not self.convergence_issues


def calibrate(
    dataset: xr.Dataset,
    job: CalibrationJob,
    *,
    control: JobControl | None = None,
    criteria: ConvergenceCriteria = ConvergenceCriteria(),
    warm: WarmSource | None = None,
    max_draws_per_chain: int = MAX_DRAWS_PER_CHAIN,
    validated: bool = False,
) -> tuple[az.InferenceData, Fit]:
    """Fit the calibration model for ``job`` on ``dataset`` with NUTS.

    The dataset is validated for the job's archetype and events first (bad
    data raises :class:`InvalidDataset`), unless the caller has just done so
    (``validated``: :func:`shared.jobs.datasets.validated`). Progress is reported to ``control``, which
    is checked (time limit, cancellation) before compiling, between sampling
    chunks, between remedy attempts and before the diagnostics. A run that
    fails ``criteria`` is remedied (:mod:`shared.fit.remedy`) while attempts
    and time are left, no run longer than ``max_draws_per_chain`` (warmup +
    draws: the worker's cap); the fit lists every attempt, and the last one is
    judged and reported. Non-convergence after the remedies is a result
    (``Fit.convergence_issues``, the summary's ``converged`` and ``convergence_issues``),
    never raised.

    With ``warm``, a previous fit of the same archetype, the first run starts
    where that posterior is (:mod:`shared.fit.warm`) with a shorter warmup;
    the fit records it (``Fit.warm_start``). A previous fit that cannot seed
    this job is logged and ignored: the run starts cold.

    A job whose first run was sampled in a batch (:func:`shared.fit.batch.first_runs`)
    starts where that run started, and its first attempt is judged from
    those draws; remedies are sampled here, alone.
    """
    control = control or JobControl()
    if not validated:
        validate(dataset, archetype=job.archetype, events=job.events, source=job.dataset_uri)
    prepared = prepare(dataset, job)
    rows = prepared.rows
    log.info(
        "job %s: %d rows, %d races, %d tracks, bucket %s",
        job.job_id, rows.n_rows, len(rows.races), len(rows.tracks), prepared.bucket,
    )

    first = first_run_of(job.job_id)  # sampled in a batch (shared.fit.batch): it started where it started
    seeded = warm_start_of(prepared, job, warm) if first is None else first.seeded
    warm_start = seeded[1] if seeded else None
    draws, known, attempts, stopped = _sample_with_remedies(
        prepared, job, control=control, criteria=criteria, warm=seeded, max_draws=max_draws_per_chain
    )

    control.check("diagnostics")
    control.progress(Progress(phase="diagnostics"))
    t0 = time.perf_counter()
    labelled = dataclasses.replace(rows, tracks=tuple(track_labels(rows)))
    calibrated = calibrated_rows(draws.params, rows)  # the in-sample q̄ and the replicated outcomes' q, one pass
    idata = build_inference_data(
        draws,
        labelled,
        seed=attempts[-1].seed,
        calibrated=calibrated,
        attrs={
            "job_id": job.job_id,
            "job": job.model_dump(mode="json"),
            "model_version": job.model_version,
            "calq_version": shared.__version__,
            "centered": int(prepared.bucket.shape.centered),
            "inference_library": "numpyro",
            "attempts": len(attempts),
            "target_accept_prob": attempts[-1].target_accept_prob,
            "warm_start_from": warm_start.job_id if warm_start else None,
        },
    )
    parameters = diagnostics.parameter_summaries(idata, known=known)  # the last run's R-hat and ESS, reused
    diag = diagnostics.sampler_diagnostics(
        idata, parameters, sample_seconds=draws.sample_s, max_tree_depth=MAX_TREE_DEPTH
    )
    issues = criteria.issues(diag)
    if issues and len(attempts) > 1:
        issues.append(f"after {len(attempts)} attempts")
    if issues and stopped:
        issues.append(stopped)
    archetypes = list(rows.archetypes)
    fit = Fit(
        job=job,
        window=prepared.window,
        archetypes=archetypes,
        data_through=_last_race_date(prepared.window),
        centered=prepared.bucket.shape.centered,
        n_rows=rows.n_rows,
        n_races=len(rows.races),
        tracks={
            a: [t for t, ta in zip(labelled.tracks, rows.track_archetype) if ta == i]
            for i, a in enumerate(archetypes)
        },
        convergence_issues=issues,
        diagnostics=diag,
        attempts=attempts,
        warm_start=warm_start,
        parameters=parameters,
        calibration=event_calibration(rows, calibrated.mean),
        compile_s=sum(a.compile_s for a in attempts),
        sample_s=sum(a.sample_s for a in attempts),
        diagnostics_s=time.perf_counter() - t0,
    )
    if issues:
        log.info("job %s did not converge: %s", job.job_id, "; ".join(issues))  # a result, not a fault
    return idata, fit


#: Seconds kept back, beyond a fifth of the estimate, for diagnostics and writing after a remedy.
REMEDY_RESERVE_S = 15.0


def warm_start_of(
    prepared: Prepared, job: CalibrationJob, warm: WarmSource | None
) -> tuple[StartingPoint, WarmStart] | None:
    """Where the first run starts, from ``warm``, and its record; None for a cold start (also for a batch)."""
    if warm is None:
        return None
    rows = prepared.rows
    try:
        start = starting_point(
            warm.idata,
            events=rows.events, archetypes=rows.archetypes, tracks=track_labels(rows),
            track_archetype=rows.track_archetype, shape=prepared.bucket.shape,
            chains=job.sampler.chains, seed=job.sampler.seed,
        )
    except (WarmStartUnusable, KeyError) as exc:  # KeyError: a posterior without one of the model's variables
        log.warning("job %s: starting cold, fit %s cannot seed it: %s", job.job_id, warm.job_id, exc)
        return None
    record = WarmStart(
        job_id=warm.job_id, posterior_uri=warm.posterior_uri, data_through=warm.data_through,
        warmup=warm_warmup(job.sampler.warmup), target_accept_prob=max(TARGET_ACCEPT, warm.target_accept_prob or 0.0),
    )
    log.info("job %s: warm start from fit %s (data through %s)", job.job_id, warm.job_id, warm.data_through)
    return start, record


def _sample_with_remedies(
    prepared: Prepared,
    job: CalibrationJob,
    *,
    control: JobControl,
    criteria: ConvergenceCriteria,
    warm: tuple[StartingPoint, WarmStart] | None = None,
    max_draws: int,
) -> tuple[Draws, diagnostics.Convergence, list[Attempt], str | None]:
    """Run the sampler, then remedies while the run fails ``criteria``; the last run's draws and convergence.

    With ``warm`` (a starting point and its record) the first run is warm:
    it begins there, with the warmup and target acceptance the record holds.
    Returns the last draws and their R-hat and ESS, every attempt, and why remedies stopped early
    (None when they did not: the run passed, or no attempt or remedy was left).
    """
    plan = first_plan(
        seed=job.sampler.seed, warmup=job.sampler.warmup, samples=job.sampler.samples, max_draws=max_draws
    )
    start = None
    if warm is not None:
        start, record = warm
        plan = dataclasses.replace(plan, warm=True, warmup=record.warmup, target_accept_prob=record.target_accept_prob)
    attempts: list[Attempt] = []
    while True:
        # a warm run shares the cold sampler of the job's own warmup; its shorter warmup is dynamic
        bucket = dataclasses.replace(prepared.bucket, warmup=job.sampler.warmup if plan.warm else plan.warmup)
        control.check("compile")
        control.progress(Progress(phase="compile"))
        t_build = time.perf_counter()
        sampler = sampler_for(bucket)  # traced once per bucket and process
        build_s = time.perf_counter() - t_build
        draws = batched_draws(job.job_id, plan, bucket) or sampler.run(
            prepared.data, seed=plan.seed, samples=plan.samples, control=control,
            target_accept_prob=plan.target_accept_prob,
            start=start if plan.warm else None, warmup=plan.warmup if plan.warm else None,
        )
        known = diagnostics.convergence_of(
            posterior_draws(draws, n_tracks=len(prepared.rows.tracks)), diverging=draws.stats["diverging"]
        )
        max_rhat, min_ess, divergences = known.worst()
        attempt = Attempt(
            number=plan.number, seed=plan.seed, target_accept_prob=plan.target_accept_prob,
            warmup=plan.warmup, samples=plan.samples, divergences=divergences, max_rhat=max_rhat,
            min_ess_bulk=min_ess, mean_leapfrog_steps=float(draws.stats["n_steps"].mean()),
            compile_s=build_s + draws.compile_s, sample_s=draws.sample_s,
            issues=criteria.failures(max_rhat=max_rhat, min_ess_bulk=min_ess, divergences=divergences),
            remedy=plan.remedy, warm_start=plan.warm,
        )
        attempts.append(attempt)
        if not attempt.issues:
            return draws, known, attempts, None
        following = next_plan(plan, RunOutcome(max_rhat=max_rhat, min_ess_bulk=min_ess, divergences=divergences), criteria)
        if following is None:
            return draws, known, attempts, None
        log.info("job %s attempt %d: %s; remedy: %s", job.job_id, plan.number, "; ".join(attempt.issues), following.remedy)
        control.check("remedy")  # a cancellation is seen between attempts
        needed = _estimate_s(attempt, following)
        left = control.remaining_s()
        if left is not None and needed * 1.2 + REMEDY_RESERVE_S > left:
            return draws, known, attempts, (
                f"remedy not run ({following.remedy}): it needs about {needed:.0f} s and {max(left, 0):.0f} s "
                "are left before the job's time limit"
            )
        plan = following


def _estimate_s(last: Attempt, plan: RunPlan) -> float:
    """Seconds the run ``plan`` should take, scaled from the ``last`` one (a new warmup length compiles anew)."""
    scale = (plan.warmup + plan.samples) / (last.warmup + last.samples)
    compile_s = max(last.compile_s, 5.0) if plan.warmup != last.warmup and not (plan.warm or last.warm_start) else 0.0
    return last.sample_s * scale + compile_s


def _last_race_date(ds: xr.Dataset):
    return np.datetime64(ds["race_date"].values.max(), "D").astype(object)
