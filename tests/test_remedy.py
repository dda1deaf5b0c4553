"""shared.fit.remedy: the plans of a job's sampler runs, without a sampler."""

from __future__ import annotations

from dataclasses import replace

from shared.contract.summary import ConvergenceCriteria
from shared.fit.remedy import RunOutcome, attempt_seed, first_plan, next_plan


def test_remedy_rules():
    criteria = ConvergenceCriteria()
    plan = first_plan(seed=5, warmup=500, samples=1000)
    assert plan.seed == 5 and plan.target_accept_prob == 0.8
    targets = []
    for _ in range(3):
        plan = next_plan(plan, RunOutcome(max_rhat=1.0, min_ess_bulk=2000, divergences=2), criteria)
        targets.append(plan.target_accept_prob)
    assert targets == [0.9, 0.95, 0.99] and plan.number == 4
    assert next_plan(plan, RunOutcome(1.0, 2000, 1), criteria) is None  # max_attempts=4 reached
    more = ConvergenceCriteria(max_attempts=10)
    longer = next_plan(plan, RunOutcome(1.0, 2000, 1), more)
    assert longer.warmup == 1000 and longer.target_accept_prob == 0.99
    start = first_plan(seed=5, warmup=500, samples=1000)
    rhat = next_plan(start, RunOutcome(1.05, 2000, 0), criteria)
    assert (rhat.warmup, rhat.samples) == (1000, 2000)
    ess = next_plan(start, RunOutcome(1.0, 100, 0), criteria)
    assert ess.samples == 4000 and ess.warmup == 500  # 4× at most
    ess = next_plan(start, RunOutcome(1.0, 350, 0), criteria)
    assert ess.samples == 1429  # shortfall 400/350 with a 25 % margin
    assert next_plan(start, RunOutcome(1.0, 2000, 0), criteria) is None  # it passed
    assert attempt_seed(5, 2) == attempt_seed(5, 2) != attempt_seed(5, 3) != attempt_seed(6, 2)


def test_remedies_stay_within_the_workers_cap():
    """A remedy never asks for more warmup + draws per chain than the worker's limits.max_draws_per_chain."""
    criteria = ConvergenceCriteria(max_attempts=10)
    start = first_plan(seed=1, warmup=500, samples=1000, max_draws=2000)
    rhat = next_plan(start, RunOutcome(1.2, 2000, 0), criteria)
    assert rhat.warmup > 500 and rhat.samples > 1000 and rhat.warmup + rhat.samples <= 2000
    assert next_plan(start, RunOutcome(1.0, 10, 0), criteria).samples == 1500  # 4× wanted, 1,500 left
    full = first_plan(seed=1, warmup=1000, samples=1000, max_draws=2000)
    assert next_plan(full, RunOutcome(1.0, 10, 0), criteria) is None  # no room to draw more: no remedy
    assert next_plan(full, RunOutcome(1.2, 2000, 0), criteria) is None
    assert next_plan(replace(full, target_accept_prob=0.99), RunOutcome(1.0, 2000, 3), criteria) is None
    assert next_plan(full, RunOutcome(1.0, 2000, 3), criteria).target_accept_prob == 0.9  # costs no draws


def test_a_warm_run_stays_warm_unless_its_chains_disagree():
    criteria = ConvergenceCriteria()
    warm = replace(first_plan(seed=5, warmup=500, samples=1000), warm=True, warmup=100)

    def after(plan, outcome):
        return next_plan(plan, outcome, criteria)

    for rhat_failure in (RunOutcome(1.2, 2000, 0), RunOutcome(1.2, 10, 3)):
        cold = after(warm, rhat_failure)  # the chains remember their starts: start cold
        assert not cold.warm and (cold.warmup, cold.samples, cold.number) == (500, 1000, 2)
        assert cold.target_accept_prob == 0.8 and cold.remedy.startswith("warm start failed (max R-hat")
    divergent = after(warm, RunOutcome(1.0, 2000, 3))  # the step size was too large, not the start wrong
    assert divergent.warm and divergent.warmup == 100 and divergent.target_accept_prob == 0.9
    short = after(warm, RunOutcome(1.0, 300, 0))
    assert short.warm and short.samples > 1000 and short.warmup == 100
    top = replace(warm, target_accept_prob=0.99)
    longer = after(top, RunOutcome(1.0, 2000, 1))  # no higher target left: a longer warmup, which is cold
    assert not longer.warm and longer.warmup == 1000 and longer.target_accept_prob == 0.99
    assert after(warm, RunOutcome(1.0, 2000, 0)) is None  # it passed
