"""Several jobs of one bucket fitted in one compiled program: the sampler mapped over a job axis.

A backfill's jobs (the windows of an archetype, the archetypes of a season)
share a bucket: the same padded rows and tracks, chains, warmup and draws.
Fitted one at a time, each is a separate device call per chunk, and on a
small bucket the per-step overhead (a NUTS step is a chain of tiny kernels)
costs more than the arithmetic. :class:`BatchedSampler` maps the
per-chain functions of :class:`~shared.fit.sampler.CompiledSampler`
(:meth:`~shared.fit.sampler.CompiledSampler.per_chain_functions`) over a
job axis as well as the chains, so J jobs take one call per chunk::

    per job:    key, data, starting point, step size, mass matrix, warm   (stacked along the job axis)
    program:    chains (pmap over devices, else vmap) × jobs (vmap) × one chain's NUTS
    per chunk:  every job's control is checked; a cancelled job is dropped, the others go on

- Jobs are padded to :data:`JOB_LADDER` (1, 2, 4, 8, … 128) with copies of
  the first, so batches of different sizes share compiles; a padding copy's
  draws are thrown away.
- What may differ between the jobs of a batch: data (same padded shape),
  seeds, starting points, step sizes, mass matrices. What may not
  (:class:`BatchKey`): the bucket, warm or cold, the warmup length, the
  number of draws and the target acceptance, so every job keeps the same
  post-warmup window of the same chunk loop.
- A job's chains start exactly where the job fitted alone starts, with the
  same random numbers (:meth:`~shared.fit.sampler.CompiledSampler.start_args`),
  and the transitions are the same functions; under ``vmap`` the
  tree-building loop runs until every job's tree is done, finished jobs'
  states kept by selection. Vectorised arithmetic rounds differently, so the
  first transitions agree to ~1e-5 and then the chains part (NUTS is
  chaotic): a job's answer in a batch equals its answer alone within Monte
  Carlo error, not to float tolerance (tests/test_fit_batch.py).
- No LAPACK call in the programs: a job's dense metric comes factored from
  the host (:func:`shared.fit.nuts.dense_metric`). Its Cholesky factor,
  once computed in the program and batched over the job axis, hung every
  batch with chains on four host devices at its first call, no thread using
  the CPU: each of XLA's four intra-op workers ran one device's
  ``lapack_spotrf_ffi``, which fans its batch out over that same pool and
  waits (gdb: every ``tf_XLAEigen`` thread in ``jax::ParallelBatchMap``), so
  no worker was left to do the work. One job (a batch of one matrix) or
  chains on one device never filled the pool (tests/test_fit_batch.py).
- Control, as in :meth:`CompiledSampler.run`: before each chunk (and while a
  new program compiles) every job's :class:`~shared.contract.control.JobControl`
  is checked; one that raises (cancelled, past its time limit) drops that job
  alone, its exception kept as its outcome. The others go on; when none is
  left, the run stops.

Each job's :class:`~shared.fit.sampler.Draws` carry the batch's compile
time and an equal share of its sampling time. The jobs layer
(:mod:`shared.jobs.batch`) judges each job's run and hands it to
:func:`shared.fit.calibrate.calibrate` through :func:`first_runs`: a job
whose run passes is finished from these draws; one that needs a remedy runs
its remedies alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import jax
import jax.numpy as jnp
import numpy as np

from shared.contract.control import JobControl
from shared.contract.job import Progress
from shared.contract.summary import WarmStart
from shared.fit.model import ModelData
from shared.fit.remedy import TARGET_ACCEPT, RunPlan
from shared.fit.sampler import (
    Bucket,
    Draws,
    StartingPoint,
    by_chain,
    compile_checked,
    kept_draws,
    over_chains,
    per_chain_layout,
    run_progress,
    sampler_for,
)

log = logging.getLogger(__name__)

#: Batch sizes a program is compiled for: a batch of J jobs runs in the smallest that holds it.
JOB_LADDER: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)


def batching_pays() -> bool:
    """Whether one program over a job axis beats fitting the jobs one at a time on this process's device.

    Not on a CPU. Measured with ``bench/gpu.py --chunks --batch-sizes 1,8,32``
    on the 2-core machine (intermediate, 3 seasons, 2,304 padded rows, 4
    chains, chunks of 40 sampling transitions after 160 of warmup, one
    process, interleaved, best of 3, load average 2.5-3.5), seconds a job a
    chunk, before and after the adaptation's conds stayed conds under
    ``vmap`` (:func:`shared.fit.nuts.nuts_step`; before, every vectorised
    transition also ran the warmup's adaptation and threw it away):

    ============================  =============  =============  =============
    chains                        1 job          8 jobs         32 jobs
    ============================  =============  =============  =============
    4 host devices (pmap)         0.070 / 0.072  0.045 / 0.038  0.047 / 0.034
    1 device (vmap)               0.111 / 0.088  0.175 / 0.133  0.113 / 0.094
    ============================  =============  =============  =============

    A batch's sampling chunks now cost a job 1.89× (8 jobs) and 2.13× (32)
    less than one job alone on the host devices, although a vectorised
    transition runs until the longest of the jobs' trees is done (18.2 and
    19.7 leapfrog steps against 15.4 and 15.2 on average). A whole backfill
    gains nothing from it on a CPU. ``bench/backfill.py``, superspeedway and
    intermediate, 44 window jobs, batches of up to 32 forced: 30.5 jobs a
    minute against 35.2 one at a time in the same run (0.87×); its first
    batch holds jobs that no stored fit can warm-start, which sample cold
    together, where one at a time every job but each archetype's first
    starts warm from the one before it. Seeded, each archetype's first job
    fitted alone first so that every batched job starts warm (an experiment
    outside the repository, two rounds interleaved with the single plan in
    one process): 27.2 and 29.3 jobs a minute against 32.0 and 31.3. Real
    windows' jobs, warm-started from one fit, differ in step size and tree
    depth far more than the seeds of one dataset above, and a vectorised
    transition waits for the longest tree. On a GPU, where a small job's transition
    is bound by kernel launches (issue 21: a season sampled in 5.7 s on an
    H200 against 1.5 s on its CPU), the job axis fills the device; the GPU
    figures are owed (bench/gpu.py).
    """
    return jax.default_backend() != "cpu"


def batch_size(n: int) -> int:
    """The ladder size a batch of ``n`` jobs is padded to (ValueError past the ladder's top)."""
    for size in JOB_LADDER:
        if size >= n:
            return size
    raise ValueError(f"a batch of {n} jobs is larger than the largest program ({JOB_LADDER[-1]})")


@dataclass(frozen=True)
class BatchKey:
    """What every job of one batch shares: the compiled program and the chunk loop.

    ``steps`` is the warmup actually run: the bucket's for a cold run, the
    warm run's own (shorter) one for a warm run.
    """

    bucket: Bucket
    warm: bool
    steps: int
    samples: int
    target_accept_prob: float

    @classmethod
    def first_run(cls, bucket: Bucket, samples: int, warm_start: WarmStart | None = None) -> BatchKey:
        """The key of a job's first run: cold, with the bucket's warmup and the default target acceptance,
        or warm, with the warmup and target its warm-start record holds."""
        if warm_start is None:
            return cls(bucket=bucket, warm=False, steps=bucket.warmup, samples=samples, target_accept_prob=TARGET_ACCEPT)
        return cls(bucket=bucket, warm=True, steps=warm_start.warmup, samples=samples,
                   target_accept_prob=warm_start.target_accept_prob)


@dataclass(frozen=True)
class BatchRun:
    """One job's part of a batch: its data, seed and (warm) starting point, and its control."""

    data: ModelData
    seed: int
    start: StartingPoint | None = None
    control: JobControl | None = None


class _AllStopped(Exception):
    """Every job of a batch was dropped: nothing left to run."""


class BatchedSampler:
    """One bucket's sampler over a job axis of ``size`` jobs, compiled on first use and then reused."""

    def __init__(self, bucket: Bucket, size: int) -> None:
        self.bucket, self.size = bucket, size
        self.single = sampler_for(bucket)  # the per-chain functions, the parameter template, the starting points
        self._lock = threading.Lock()
        self._init, self._chunk = self._build()
        self._compiled: tuple | None = None

    def _build(self):
        # over jobs: every argument has a job axis; then over chains as one job's sampler maps them
        init_one, chunk_one = self.single.per_chain_functions()
        # the chunk's target, warm flag, warm warmup and first step are the batch key's, the same for every job
        return over_chains(self.bucket, jax.vmap(init_one), jax.vmap(chunk_one, in_axes=(0, 0, None, None, None, None)))

    # layout: (chain, job, ...) on the host, (device, chain per device, job, ...) when chains share a device

    def _per_chain(self, values: jnp.ndarray) -> jnp.ndarray:
        return per_chain_layout(self.bucket, values)

    def _by_chain(self, tree) -> dict[str, np.ndarray]:
        return by_chain(self.bucket, tree)

    def _inputs(self, runs: Sequence[BatchRun]) -> tuple:
        """The initial kernel's arguments for ``runs`` (already padded to ``size``), laid out for the devices."""
        starts = [self.single.start_args(run.seed, run.start) for run in runs]
        keys = jnp.stack([s[0] for s in starts], axis=1)  # (chain, job, 2)
        positions = {name: jnp.stack([s[1][name] for s in starts], axis=1) for name in starts[0][1]}
        step_size = jnp.stack([s[2] for s in starts])
        metric = _stacked([s[3] for s in starts])
        warm = jnp.stack([s[4] for s in starts])
        data = _stacked([run.data for run in runs])
        return (self._per_chain(keys), data, {k: self._per_chain(v) for k, v in positions.items()},
                step_size, metric, warm)

    def compile(self, args: tuple) -> tuple:
        """Compile (or fetch from the persistent cache) both programs, once."""
        with self._lock:
            if self._compiled is None:
                init = self._init.lower(*args).compile()
                state = jax.eval_shape(self._init, *args)
                dynamic = _dynamic(warm=False, target=0.8, steps=self.bucket.warmup)
                chunk = self._chunk.lower(state, args[1], *dynamic, jnp.int32(0)).compile()
                self._compiled = (init, chunk)
            return self._compiled

    def run(self, runs: Sequence[BatchRun], *, key: BatchKey) -> list[Draws | BaseException]:
        """Run every job's warmup and ``key.samples`` draws in one program; per job, its draws or why it stopped.

        ``runs`` (at most ``size``) are warm or cold as ``key`` says. A job whose
        control raised (cancelled, out of time) gets that exception in its place;
        the others' draws are unaffected.
        """
        if not runs or len(runs) > self.size:
            raise ValueError(f"{len(runs)} jobs for a program of {self.size}")
        if key.bucket != self.bucket:
            raise ValueError("the batch's key is another bucket's")
        if any((run.start is not None) != key.warm for run in runs):
            raise ValueError("every job of a batch is warm, or every job is cold")
        b = self.bucket
        outcomes: dict[int, BaseException] = {}

        def check(phase: str) -> None:
            for j, run in enumerate(runs):
                if j in outcomes or run.control is None:
                    continue
                try:
                    run.control.check(phase)
                except Exception as exc:  # JobCancelled, JobTimeLimitExceeded: this job alone stops
                    log.info("batch: job %d of %d dropped: %s", j + 1, len(runs), exc)
                    outcomes[j] = exc
            if len(outcomes) == len(runs):
                raise _AllStopped

        def progress(value: Progress) -> None:
            for j, run in enumerate(runs):
                if j not in outcomes and run.control is not None:
                    run.control.progress(value)

        padded = list(runs) + [BatchRun(runs[0].data, runs[0].seed, runs[0].start)] * (self.size - len(runs))
        args = self._inputs(padded)
        t0 = time.perf_counter()
        try:
            progress(Progress(phase="compile"))
            check("compile")
            if self._compiled is None:
                init, chunk = compile_checked(lambda: self.compile(args), lambda: check("compile"),
                                              name=f"calq-compile-batch-{b.n_rows}x{self.size}")
            else:
                init, chunk = self._compiled
            check("compile")
            compile_s = time.perf_counter() - t0

            t1 = time.perf_counter()
            state = init(*args)
            dynamic = _dynamic(warm=key.warm, target=key.target_accept_prob, steps=key.steps)
            total = key.steps + key.samples
            params_parts, stats_parts = [], []
            for i in range(-(-total // b.chunk)):
                check("warmup" if i * b.chunk < key.steps else "sampling")
                state, (params, stats) = chunk(state, args[1], *dynamic, jnp.int32(i * b.chunk))
                jax.block_until_ready(state)
                if (i + 1) * b.chunk > key.steps:
                    params_parts.append(self._by_chain(params))
                    stats_parts.append(self._by_chain(stats))
                progress(run_progress(min((i + 1) * b.chunk, total), key.steps, key.samples))
        except _AllStopped:
            return [outcomes[j] for j in range(len(runs))]
        sample_s = (time.perf_counter() - t1) / len(runs)
        results: list[Draws | BaseException] = []
        for j in range(len(runs)):
            if j in outcomes:
                results.append(outcomes[j])
                continue
            mine = [{k: v[:, j] for k, v in part.items()} for part in params_parts]
            stats = [{k: v[:, j] for k, v in part.items()} for part in stats_parts]
            results.append(Draws(params=kept_draws(mine, key.steps, key.samples, b.chunk),
                                 stats=kept_draws(stats, key.steps, key.samples, b.chunk),
                                 compile_s=compile_s, sample_s=sample_s))
        return results


def _stacked(trees: Sequence) -> object:
    """``trees`` (of one structure) as one tree of arrays with a leading job axis."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def _dynamic(*, warm: bool, target: float, steps: int) -> tuple:
    """The chunk's dynamic arguments, the batch key's: target acceptance, warm, warm warmup."""
    return (jnp.float32(target), jnp.bool_(warm), jnp.int32(steps))


@functools.lru_cache(maxsize=32)
def batched_sampler_for(bucket: Bucket, size: int) -> BatchedSampler:
    """The process-wide batched sampler of a bucket and ladder size (built once, compiled on first run)."""
    log.info("building batched sampler for %s × %d jobs", bucket, size)
    return BatchedSampler(bucket, size)


def sample_batch(runs: Sequence[BatchRun], *, key: BatchKey) -> list[Draws | BaseException]:
    """Fit ``runs`` (one :class:`BatchKey`) in programs of the ladder's sizes; per job, its draws or its exception.

    A batch larger than the ladder's top is run in slices of that size.
    """
    results: list[Draws | BaseException] = []
    top = JOB_LADDER[-1]
    for first in range(0, len(runs), top):
        part = runs[first : first + top]
        results.extend(batched_sampler_for(key.bucket, batch_size(len(part))).run(part, key=key))
    return results


# -- handing a job's first run to calibrate() ---------------------------------------------


@dataclass(frozen=True)
class FirstRun:
    """A job's first run, sampled in a batch: the key it ran under, its seed, its warm start, and its draws.

    ``seeded`` is what :func:`shared.fit.calibrate.warm_start_of` gave the
    batch: the starting point and its record (None: a cold run).
    """

    key: BatchKey
    seed: int
    seeded: tuple[StartingPoint, WarmStart] | None
    draws: Draws


_first_runs: contextvars.ContextVar[Mapping[str, FirstRun]] = contextvars.ContextVar(
    "calq_first_runs", default=MappingProxyType({})
)


@contextlib.contextmanager
def first_runs(runs: Mapping[str, FirstRun]) -> Iterator[None]:
    """Inside, :func:`shared.fit.calibrate.calibrate` takes the first run of a job in ``runs`` (by job id) from it.

    The job's warm start is the one its batched run started from, and its
    first attempt is judged from those draws instead of being sampled again;
    any remedy is sampled alone, as for a job fitted alone.
    """
    token = _first_runs.set({**_first_runs.get(), **runs})
    try:
        yield
    finally:
        _first_runs.reset(token)


def first_run_of(job_id: str) -> FirstRun | None:
    """The batched first run of ``job_id`` handed over by :func:`first_runs`, or None."""
    return _first_runs.get().get(job_id)


def batched_draws(job_id: str, plan: RunPlan, bucket: Bucket) -> Draws | None:
    """The draws of ``plan``, if it is the job's first run and a batch ran exactly it; else None (sample it).

    Exactly: the same bucket, seed, warm or cold, warmup, draws and target acceptance.
    """
    first = first_run_of(job_id)
    if first is None or plan.number != 1:
        return None
    key = first.key
    ran = (key.bucket == bucket and first.seed == plan.seed and key.warm == plan.warm
           and key.steps == plan.warmup and key.samples == plan.samples
           and key.target_accept_prob == plan.target_accept_prob)
    if not ran:
        log.warning("job %s: its batched run is not its first plan's; sampling it alone", job_id)
        return None
    return first.draws


__all__ = [
    "JOB_LADDER",
    "BatchKey",
    "BatchRun",
    "BatchedSampler",
    "FirstRun",
    "batch_size",
    "batched_draws",
    "batched_sampler_for",
    "batching_pays",
    "first_run_of",
    "first_runs",
    "sample_batch",
]
