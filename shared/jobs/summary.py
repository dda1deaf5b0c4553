"""A job's summary, built in one place: :func:`summarize`.

The fit (:func:`shared.fit.calibrate.calibrate`) measures the posterior; the
summary adds what only the jobs layer knows: the raw forecasts' scores
(:func:`shared.stats.evaluation.raw_forecast_scores`, which need no fit), the
time spent loading, and, once the posterior is written, where it went and how
long that took (:func:`completed`, by :func:`shared.jobs.spool.write_results`).
:func:`summarize` is called once per job; every field of the summary that the
fit measured is taken from the fit's field of the same name, and every field
of the job from the job.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import shared
from shared.contract.job import utcnow
from shared.contract.summary import CalibrationSummary, Timings
from shared.stats.evaluation import raw_forecast_scores

if TYPE_CHECKING:
    from shared.fit.calibrate import Fit

#: The fit's timings, read into the summary's Timings rather than its top level.
_FIT_TIMINGS = ("compile_s", "sample_s", "diagnostics_s")


def summarize(fit: Fit, *, load_s: float = 0.0) -> CalibrationSummary:
    """The summary of ``fit``: its measurements, the raw forecasts' scores and ``load_s``.

    Its posterior and summary URIs are None and its write and total times 0
    until :func:`completed` fills them in.
    """
    t0 = time.perf_counter()
    raw = raw_forecast_scores(fit.window, archetypes=fit.archetypes, events=fit.job.events)
    score_s = time.perf_counter() - t0
    measured = {
        f.name: getattr(fit, f.name)
        for f in dataclasses.fields(fit)
        if f.name in CalibrationSummary.model_fields and f.name not in _FIT_TIMINGS
    }
    job = fit.job.model_dump(include=set(CalibrationSummary.model_fields))
    return CalibrationSummary(
        job_id=fit.job.job_id,
        **job,
        **measured,
        converged=fit.converged,
        ensemble=raw.ensemble,
        joint_events=raw.joint_events,
        timings=Timings(load_s=load_s, score_s=score_s, **{name: getattr(fit, name) for name in _FIT_TIMINGS}),
        created_at=utcnow(),
        calq_version=shared.__version__,
    )


def completed(
    summary: CalibrationSummary, *, write_s: float, total_s: float, posterior_uri: str | None, summary_uri: str | None
) -> CalibrationSummary:
    """``summary`` with where its posterior and itself are stored, and the write and total times."""
    timings = summary.timings.model_copy(update={"write_s": write_s, "total_s": total_s})
    return summary.model_copy(update={"timings": timings, "posterior_uri": posterior_uri, "summary_uri": summary_uri})


__all__ = ["completed", "summarize"]
