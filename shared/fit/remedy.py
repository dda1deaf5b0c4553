"""Convergence remedies: what the next sampler run changes when one fails the criteria.

A run that fails :class:`~shared.contract.summary.ConvergenceCriteria` is not
reported at once: calq runs the sampler again, changing one thing, up to
``criteria.max_attempts`` runs in all, and judges the last. The rules, in
order of the failure seen:

- **a warm run whose chains disagree** (R-hat above the limit): they have
  not forgotten where they started, a previous posterior
  (:mod:`shared.fit.warm`) too far from this one: start cold, with the
  job's own warmup. A warm start may save time, never cost a result. A warm
  run's other failures are remedied as below, and it stays warm while only
  the target acceptance or the draws change (divergences say the step size
  was too large, not that the start was wrong);
- **divergent transitions**: the step size was too large somewhere in the
  posterior; raise the step-size adaptation's target acceptance along
  :data:`TARGET_LADDER` (0.8 → 0.9 → 0.95 → 0.99). The target is a dynamic
  argument of the compiled sampler, so this compiles nothing. Past 0.99, the
  warmup doubles instead (a better-adapted mass matrix).
- **R-hat above the limit**: chains disagree, so they have not forgotten
  their starts: double the warmup (a new compile: the warmup length is
  static) and the draws.
- **bulk ESS below the minimum** (and nothing else): draw more, in
  proportion to the shortfall with a 25 % margin, at most 4× per step.

Every run gets its own seed, derived from the job's seed and the attempt's
number (:func:`attempt_seed`): the same job gives the same runs. Each plan
carries the job's own settings (:class:`JobRuns`), so a remedy needs
nothing handed back to it, and no run grows past the schema's
:data:`~shared.contract.job.MAX_RUN_LENGTH` for warmup or draws, nor past
the worker's cap on the two together (``limits.max_draws_per_chain``, the
cap a job itself was checked against; :data:`MAX_DRAWS_PER_CHAIN`, the
settings' default, where no cap is given): a remedy that cannot grow within
them is not run. Each number has one home: the first target acceptance is
:data:`~shared.contract.summary.TARGET_ACCEPT`, the ladder's first rung.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from shared.contract.job import MAX_RUN_LENGTH
from shared.contract.settings import DataLimits
from shared.contract.summary import TARGET_ACCEPT, ConvergenceCriteria

#: Target acceptance probabilities, in the order remedies try them: the first run's, then higher.
TARGET_LADDER: tuple[float, ...] = (TARGET_ACCEPT, 0.9, 0.95, 0.99)
#: Warmup + draws of one chain, at most, where no worker's limits are given: the settings' default cap.
MAX_DRAWS_PER_CHAIN = DataLimits.model_fields["max_draws_per_chain"].default
#: More draws for low ESS: the shortfall times this margin, at most MAX_DRAW_GROWTH times as many.
ESS_MARGIN = 1.25
MAX_DRAW_GROWTH = 4


@dataclass(frozen=True)
class JobRuns:
    """What every run of one job derives from: the job's own seed and lengths, and the cap on a chain."""

    seed: int
    warmup: int
    samples: int
    max_draws: int  # warmup + samples of one chain, at most (the worker's limits.max_draws_per_chain)

    def fits(self, warmup: int, samples: int) -> bool:
        return warmup <= MAX_RUN_LENGTH and samples <= MAX_RUN_LENGTH and warmup + samples <= self.max_draws


@dataclass(frozen=True)
class RunPlan:
    """The settings of one sampler run, and the job's own they derive from."""

    job: JobRuns
    number: int
    seed: int
    target_accept_prob: float
    warmup: int
    samples: int
    remedy: str | None = None
    warm: bool = False  # starts from a previous fit (shared.fit.warm), with a shorter warmup


@dataclass(frozen=True)
class RunOutcome:
    """The worst values of a finished run, as the criteria read them."""

    max_rhat: float
    min_ess_bulk: float
    divergences: int


def attempt_seed(seed: int, number: int) -> int:
    """The seed of attempt ``number`` (1-based): the job's own for the first, then derived from both."""
    if number == 1:
        return seed
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def first_plan(
    *, seed: int, warmup: int, samples: int, max_draws: int = MAX_DRAWS_PER_CHAIN, target_accept_prob: float = TARGET_ACCEPT
) -> RunPlan:
    """The job's own settings, as attempt 1; ``max_draws`` caps warmup + samples of any later run."""
    job = JobRuns(seed=seed, warmup=warmup, samples=samples, max_draws=max(max_draws, warmup + samples))
    return RunPlan(job=job, number=1, seed=seed, target_accept_prob=target_accept_prob, warmup=warmup, samples=samples)


def next_plan(plan: RunPlan, outcome: RunOutcome, criteria: ConvergenceCriteria) -> RunPlan | None:
    """The remedy after ``plan`` ended with ``outcome``; None when it passed or no remedy is left.

    See the module docstring for the rules. ``criteria.max_attempts`` bounds
    the number of runs, and ``plan.job`` the length of each.
    """
    if plan.number >= criteria.max_attempts:
        return None
    job = plan.job
    number = plan.number + 1
    base = replace(plan, number=number, seed=attempt_seed(job.seed, number))
    failures = criteria.failures(max_rhat=outcome.max_rhat, min_ess_bulk=outcome.min_ess_bulk, divergences=outcome.divergences)
    if not failures:
        return None
    if plan.warm and not outcome.max_rhat <= criteria.max_rhat:
        return replace(
            base, warm=False, warmup=job.warmup, samples=min(plan.samples, job.max_draws - job.warmup),
            remedy=f"warm start failed ({'; '.join(failures)}): cold start",
        )
    if outcome.divergences > criteria.max_divergences:
        higher = [t for t in TARGET_LADDER if t > plan.target_accept_prob]
        if higher:
            return replace(
                base, target_accept_prob=higher[0],
                remedy=f"{outcome.divergences} divergent transitions: target acceptance {higher[0]}",
            )
        # a longer warmup: a cold run's remedy, from the job's own warmup when the run was warm
        warmup = _longest(2 * (job.warmup if plan.warm else plan.warmup), room=job.max_draws - plan.samples)
        if warmup < job.warmup if plan.warm else warmup <= plan.warmup:
            return None
        cold = ": cold start," if plan.warm else ":"
        return replace(base, warm=False, warmup=warmup,
                       remedy=f"{outcome.divergences} divergent transitions{cold} warmup {warmup}")
    if not outcome.max_rhat <= criteria.max_rhat:
        scale = min(2.0, job.max_draws / (plan.warmup + plan.samples))
        warmup = _longest(int(plan.warmup * scale), room=job.max_draws)
        samples = _longest(int(plan.samples * scale), room=job.max_draws - warmup)
        if warmup <= plan.warmup and samples <= plan.samples:
            return None
        return replace(
            base, warmup=warmup, samples=samples,
            remedy=f"max R-hat {outcome.max_rhat:.4f}: warmup {warmup}, {samples} draws",
        )
    if not outcome.min_ess_bulk >= criteria.min_ess_bulk:
        ess = outcome.min_ess_bulk if math.isfinite(outcome.min_ess_bulk) else 1.0
        shortfall = criteria.min_ess_bulk / max(ess, 1.0)
        growth = min(MAX_DRAW_GROWTH, max(1.25, shortfall * ESS_MARGIN))
        samples = _longest(math.ceil(plan.samples * growth), room=job.max_draws - plan.warmup)
        if samples <= plan.samples:
            return None
        return replace(base, samples=samples, remedy=f"min bulk ESS {outcome.min_ess_bulk:.0f}: {samples} draws")
    return None


def _longest(length: int, *, room: int) -> int:
    """``length`` within the schema's bound and the ``room`` a chain has left."""
    return max(0, min(length, MAX_RUN_LENGTH, room))


__all__ = [
    "MAX_DRAWS_PER_CHAIN",
    "TARGET_ACCEPT",
    "TARGET_LADDER",
    "JobRuns",
    "RunOutcome",
    "RunPlan",
    "attempt_seed",
    "first_plan",
    "next_plan",
]
