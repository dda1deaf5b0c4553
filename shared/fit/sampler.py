"""NUTS compiled once per bucket, run in chunks.

NumPyro's ``MCMC`` compiles anew for every object, process and data shape
(pyro-ppl/numpyro#514). A worker runs many jobs, so calq drives NumPyro's
functional NUTS kernel itself:

- data are padded to bucket sizes (:func:`bucket_rows`,
  :func:`bucket_tracks`) and passed as *dynamic* arguments, so datasets of
  different sizes share one compiled sampler: the smallest buckets (2,048
  rows, 16 tracks) hold a season of any one archetype with three events, so
  every typical archetype job shares one compile; above it, a ladder of
  ratio 2^(1/6) wastes at most ~12 % of the padded rows;
- the target acceptance probability is a dynamic argument too
  (:mod:`shared.fit.nuts`), so a convergence remedy that raises it reuses
  the compiled sampler; only a longer warmup (a static length) compiles anew;
- a :class:`CompiledSampler` per bucket is cached for the life of the process,
  and JAX's persistent compilation cache (:func:`enable_compile_cache`) makes
  a restarted worker warm too;
- a *warm* run starts its chains from given positions, step size and dense
  mass matrix (a previous posterior's: :mod:`shared.fit.warm`) and adapts
  only the step size during its shorter warmup; where the chains start,
  the (size, size) inverse mass matrix (a cold run passes the identity),
  whether the run is warm and its warmup length are dynamic arguments, so
  warm and cold runs share one compiled sampler;
- warmup and sampling run as a sequence of fixed-length chunks (one
  ``lax.scan`` each): between chunks the caller hears progress and the job's
  time limit and cancellation are checked — Celery's solo pool cannot
  enforce time limits itself (celery/celery#8395);
- XLA cannot be interrupted, so a first compile (minutes for a new bucket
  on a cold cache) runs in a thread while the job's control is checked every
  second: a job cancelled (or past its limit) during the compile stops at
  once, and the compile finishes in the background for the next job of its
  bucket.

Chains run in parallel over devices when there are enough (host devices on
a CPU, forced with ``--xla_force_host_platform_device_count``), else
vectorised on one device.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.distributions.transforms import biject_to
from numpyro.infer.hmc import hmc
from numpyro.infer.util import constrain_fn

from shared.contract.control import JobControl
from shared.contract.job import Progress
from shared.fit.model import ModelData, ModelShape, calibration_model, model_data, potential
from shared.fit.nuts import DenseMetric, dense_metric, nuts_step, with_dense_mass
from shared.fit.remedy import TARGET_ACCEPT

log = logging.getLogger(__name__)

MAX_TREE_DEPTH = 10
#: The smallest row bucket: a season of intermediate races (the largest archetype) with three events is 1,710 rows.
MIN_ROW_BUCKET = 2048
#: Row buckets above the smallest grow by this ratio, in multiples of 128 rows.
ROW_BUCKET_RATIO = 2 ** (1 / 6)
ROW_BUCKET_STEP = 128
#: The smallest track bucket: the most tracks any one archetype has in the known schedule is 10.
MIN_TRACK_BUCKET = 16
CHUNKS_PER_RUN = 20
#: How often a job's control is checked while its sampler compiles (seconds).
COMPILE_CHECK_S = 0.5



def bucket_rows(n: int) -> int:
    """Padded row count: :data:`MIN_ROW_BUCKET`, then a 2^(1/6)-geometric ladder in multiples of 128.

    Above the smallest bucket at most ~12 % of the padded rows are padding
    (the ratio's 10.9 % plus the rounding); the ladder has six sizes per doubling.
    """
    size = MIN_ROW_BUCKET
    k = 0
    while size < n:
        k += 1
        size = int(math.ceil(MIN_ROW_BUCKET * ROW_BUCKET_RATIO**k / ROW_BUCKET_STEP) * ROW_BUCKET_STEP)
    return size


def bucket_tracks(n: int) -> int:
    """Padded track count: :data:`MIN_TRACK_BUCKET`, else the next power of two.

    Padding tracks cost no gradient work (they see no rows), only a few
    standard-normal dimensions, so one generous bucket serves every archetype.
    """
    return max(MIN_TRACK_BUCKET, 1 << max(0, n - 1).bit_length())


def chunk_length(warmup: int, samples: int) -> int:
    """Steps per chunk: about :data:`CHUNKS_PER_RUN` chunks a run, a multiple of 10."""
    return max(10, int(math.ceil((warmup + samples) / CHUNKS_PER_RUN / 10) * 10))


@dataclass(frozen=True)
class Bucket:
    """Everything static about a compiled sampler."""

    shape: ModelShape
    n_rows: int
    chains: int
    warmup: int
    chunk: int
    devices: int = 1  # chains are split evenly over this many devices (pmap), vectorised within one


@dataclass(frozen=True)
class StartingPoint:
    """Where a warm run's chains start, in the model's unconstrained space.

    ``positions`` maps each latent site to an array (chain, *site shape);
    ``inverse_mass_matrix`` is dense, (size, size), over the coordinates
    flattened in the order of ``jax.flatten_util.ravel_pytree`` over the
    sites (sorted names), as NumPyro's kernel takes it.
    """

    positions: dict[str, np.ndarray]
    step_size: float
    inverse_mass_matrix: np.ndarray


@dataclass
class Draws:
    """What a run produced, as numpy arrays of shape (chain, draw, ...)."""

    params: dict[str, np.ndarray]
    stats: dict[str, np.ndarray]
    compile_s: float
    sample_s: float


def enable_compile_cache(folder: Path | str | None) -> None:
    """Turn on JAX's persistent compilation cache in ``folder`` (None: leave it off).

    The folder should be local and owned by this worker: parallel writers to
    one cache can corrupt it (jax-ml/jax#22718).
    """
    if folder is None:
        return
    path = Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


class CompileCounter:
    """Counts XLA backend compiles in this process (for tests and benchmarks)."""

    _EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self._lock = threading.Lock()

    def __call__(self, event: str, duration: float, **_: object) -> None:
        if event == self._EVENT:
            with self._lock:
                self.count += 1
                self.seconds += duration


COMPILES = CompileCounter()
jax.monitoring.register_event_duration_secs_listener(COMPILES)


def _unconstrained_template(model, data: ModelData) -> dict[str, jnp.ndarray]:
    """Zeros shaped like each latent site in the unconstrained space."""
    trace = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(data)
    return {
        name: jnp.zeros(jnp.shape(biject_to(site["fn"].support).inv(site["value"])))
        for name, site in trace.items()
        if site["type"] == "sample" and not site["is_observed"]
    }


def _stats_of(state) -> dict[str, jnp.ndarray]:
    return {
        "diverging": state.diverging,
        "n_steps": state.num_steps,
        "energy": state.energy,
        "lp": -state.potential_energy,
        "acceptance_rate": state.accept_prob,
        "step_size": state.adapt_state.step_size,
    }


class CompiledSampler:
    """A NUTS sampler for one :class:`Bucket`, compiled on first use and then reused."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self._lock = threading.Lock()
        model = functools.partial(calibration_model, shape=bucket.shape)
        # What numpyro's initialize_model builds, without its search for valid
        # initial values (a dozen small compiles): this model's log density is
        # finite everywhere, so uniform draws in the unconstrained space do.
        self._param_template = _unconstrained_template(model, self._dummy_data())
        self._postprocess_gen = lambda data: functools.partial(
            constrain_fn, model, (data,), {}, return_deterministic=True
        )
        self._init_kernel, _ = hmc(
            potential_fn_gen=lambda data: potential(data, bucket.shape),
            algo="NUTS",
        )
        self._identity: DenseMetric = dense_metric(np.eye(self._size))  # a cold run's placeholder metric
        self._init, self._chunk = self._build()
        self._compiled: tuple | None = None
        self._cold_start: StartingPoint | None = None

    def _dummy_data(self) -> ModelData:
        b = self.bucket
        K = b.shape.n_tracks
        zeros = np.zeros(b.n_rows, np.int32)
        return model_data(
            x=np.zeros(b.n_rows, np.float32), y=zeros, event=zeros, track=zeros, mask=np.zeros(b.n_rows, bool),
            n_rows=b.n_rows,
            track_archetype=np.zeros(K, np.int32), track_real=np.zeros(K, bool),
            n_events=b.shape.n_events, row_block=b.shape.row_block,
        )

    def per_chain_functions(self):
        """``(init_one, chunk_one)``: one chain's initial state and one chunk of its transitions, unmapped.

        ``init_one(key, data, params, step_size, metric, warm)`` (``metric`` a
        :class:`~shared.fit.nuts.DenseMetric`, factored on the host) and
        ``chunk_one(state, data, target_accept_prob, warm, warm_warmup)``;
        this sampler maps them over chains (:meth:`_build`), a batch over
        jobs as well (:mod:`shared.fit.batch`). Neither holds a LAPACK call
        (see :func:`~shared.fit.nuts.with_dense_mass`).
        """
        warmup, length = self.bucket.warmup, self.bucket.chunk
        template = self._param_template

        def init_one(key, data, params, step_size, metric, warm):
            """A chain's initial state: at ``params`` with this step size and mass matrix when ``warm``, else drawn."""
            init_key, kernel_key = jax.random.split(key)
            leaves, treedef = jax.tree_util.tree_flatten(template)
            keys = jax.random.split(init_key, len(leaves))
            # init_to_uniform(radius=2) in the unconstrained space, as NumPyro does by default.
            drawn = treedef.unflatten(
                [jax.random.uniform(k, jnp.shape(v), minval=-2.0, maxval=2.0) for k, v in zip(keys, leaves)]
            )
            identity = jnp.eye(metric.inverse.shape[0])
            metric = jax.tree_util.tree_map(lambda given: jnp.where(warm, given, identity), metric)  # cold: identity
            state = self._init_kernel(  # the initial state, diagonal; transitions are nuts_step's
                jax.tree_util.tree_map(lambda given, cold: jnp.where(warm, given, cold), params, drawn),
                warmup,
                step_size=jnp.where(warm, step_size, 1.0),
                inverse_mass_matrix=jnp.diagonal(metric.inverse),
                max_tree_depth=MAX_TREE_DEPTH,
                model_args=(data,),
                rng_key=kernel_key,
            )
            found_diagonal = state.adapt_state.step_size
            potential_fn = potential(data, self.bucket.shape)
            state = with_dense_mass(state, metric, potential_fn, find_step_size=warm,
                                    rng_key=jax.random.fold_in(kernel_key, 1))
            # Dual averaging pulls the step size towards its prox centre: 10× the initial one for a cold start
            # (NumPyro's and Stan's), to explore; a warm start's step size is already adapted, so its own,
            # scaled by what the dense metric gains over the diagonal one (the step-size search under each).
            # Measured (intermediate, 2 seasons, 4 × (80 + 800), 20 seeds): 1 warm run of 20 diverged with 10×, none with 1×.
            ss_state = state.adapt_state.ss_state
            prox = jnp.where(warm, jnp.log(step_size * state.adapt_state.step_size / found_diagonal), ss_state[-1])
            return state._replace(adapt_state=state.adapt_state._replace(ss_state=(*ss_state[:-1], prox)))

        def chunk_one(state, data, target_accept_prob, warm, warm_warmup, first_step):
            constrain = self._postprocess_gen(data)
            potential_fn = potential(data, self.bucket.shape)

            def transition(carry, _):
                state, step = carry
                state = nuts_step(
                    state, potential_fn, step=step, num_warmup=warmup, target_accept_prob=target_accept_prob,
                    max_tree_depth=MAX_TREE_DEPTH, warm=warm, warm_warmup=warm_warmup,
                )
                return (state, step + 1), (constrain(state.z), _stats_of(state))

            (state, _), out = jax.lax.scan(transition, (state, first_step), None, length=length)
            return state, out

        return init_one, chunk_one

    def _build(self):
        return over_chains(self.bucket, *self.per_chain_functions())

    def _per_chain(self, values: jnp.ndarray) -> jnp.ndarray:
        return per_chain_layout(self.bucket, values)

    def start_args(self, seed: int, start: StartingPoint | None) -> tuple:
        """``(keys, positions, step_size, metric, warm)`` of one run, chains along the leading axis.

        ``metric`` is the start's inverse mass matrix factored on the host
        (:func:`~shared.fit.nuts.dense_metric`). A cold run's positions, step
        size and metric are placeholders (its chains draw their own starts).
        """
        warm = start is not None
        start = start if warm else self._template_start()
        positions = {}
        for name, template in self._param_template.items():
            value = jnp.asarray(start.positions[name], jnp.float32)
            if value.shape != (self.bucket.chains, *template.shape):
                raise ValueError(f"starting point of {name}: shape {value.shape}, expected {(self.bucket.chains, *template.shape)}")
            positions[name] = value
        shape = np.shape(start.inverse_mass_matrix)
        if shape != (self._size, self._size):
            raise ValueError(f"inverse mass matrix of shape {shape}, expected {(self._size, self._size)}")
        metric = dense_metric(start.inverse_mass_matrix) if warm else self._identity
        keys = jax.random.split(jax.random.PRNGKey(seed), self.bucket.chains)
        return keys, positions, jnp.float32(start.step_size), metric, jnp.bool_(warm)

    def _init_args(self, seed: int, data: ModelData, start: StartingPoint | None) -> tuple:
        """The initial kernel's arguments: keys, data, and where the chains start, laid out for the devices."""
        keys, positions, step_size, metric, warm = self.start_args(seed, start)
        positions = {name: self._per_chain(value) for name, value in positions.items()}
        return (self._per_chain(keys), data, positions, step_size, metric, warm)

    @property
    def _size(self) -> int:
        return sum(int(np.prod(v.shape)) for v in self._param_template.values())

    def compile(self, data: ModelData) -> tuple:
        """Compile (or fetch from the persistent cache) both kernels, once."""
        with self._lock:
            if self._compiled is None:
                args = self._init_args(0, data, None)
                init = self._init.lower(*args).compile()
                state = jax.eval_shape(self._init, *args)
                dynamic = (jnp.float32(TARGET_ACCEPT), jnp.bool_(False), jnp.int32(0), jnp.int32(0))
                chunk = self._chunk.lower(state, data, *dynamic).compile()
                self._compiled = (init, chunk)
            return self._compiled

    def _compile_checked(self, data: ModelData, control: JobControl | None) -> tuple:
        """:meth:`compile`, with ``control`` checked every :data:`COMPILE_CHECK_S` while it runs, and once after.

        The compile runs in a daemon thread; a JobCancelled or
        JobTimeLimitExceeded from ``control`` leaves it running there (its
        result is kept for the next run of this bucket), so a job stops
        within seconds of its cancellation even while XLA compiles.
        """
        if control is None or self._compiled is not None:
            compiled = self.compile(data)
        else:
            compiled = compile_checked(lambda: self.compile(data), lambda: control.check("compile"),
                                       name=f"calq-compile-{self.bucket.n_rows}")
        if control is not None:
            control.check("compile")  # cancelled while it compiled: stop before the first draw
        return compiled

    def _template_start(self) -> StartingPoint:
        """The placeholder a cold run passes for its starting point (ignored: the chains draw their own)."""
        if self._cold_start is None:
            chains = self.bucket.chains
            self._cold_start = StartingPoint(
                positions={k: np.zeros((chains, *v.shape), np.float32) for k, v in self._param_template.items()},
                step_size=1.0,
                inverse_mass_matrix=np.eye(self._size, dtype=np.float32),
            )
        return self._cold_start

    def run(
        self,
        data: ModelData,
        *,
        seed: int,
        samples: int,
        control: JobControl | None = None,
        target_accept_prob: float = TARGET_ACCEPT,
        start: StartingPoint | None = None,
        warmup: int | None = None,
    ) -> Draws:
        """Run warmup then ``samples`` draws per chain; return the post-warmup draws.

        ``samples`` and ``target_accept_prob`` (the step-size adaptation's
        target) are dynamic: changing them compiles nothing. A cold run draws
        its chains' starts and adapts for the bucket's warmup; a warm run
        starts at ``start`` and adapts the step size alone for ``warmup``
        steps (any number: it is dynamic too).

        ``control`` hears progress after every chunk and is checked before
        each one: its time limit raises :class:`JobTimeLimitExceeded` and a
        cancellation :class:`JobCancelled` at the next chunk boundary.
        """
        b = self.bucket
        t0 = time.perf_counter()
        init, chunk = self._compile_checked(data, control)
        compile_s = time.perf_counter() - t0

        if start is None and warmup not in (None, b.warmup):
            raise ValueError(f"a cold run's warmup is its bucket's ({b.warmup}): it sets the adaptation windows")
        if start is not None and (warmup is None or warmup < 1):
            raise ValueError("a warm run needs a warmup of at least one step")
        steps = b.warmup if start is None else warmup
        t1 = time.perf_counter()
        state = init(*self._init_args(seed, data, start))
        dynamic = (jnp.float32(target_accept_prob), jnp.bool_(start is not None), jnp.int32(steps))
        total = steps + samples
        n_chunks = math.ceil(total / b.chunk)
        params_parts, stats_parts = [], []
        for i in range(n_chunks):
            if control is not None:
                control.check("warmup" if i * b.chunk < steps else "sampling")
            state, (params, stats) = chunk(state, data, *dynamic, jnp.int32(i * b.chunk))
            jax.block_until_ready(state)  # dispatch is asynchronous: wait, so progress and limits are real
            done = min((i + 1) * b.chunk, total)
            if (i + 1) * b.chunk > steps:
                params_parts.append(self._by_chain(params))
                stats_parts.append(self._by_chain(stats))
            if control is not None:
                control.progress(run_progress(done, steps, samples))
        params, stats = kept_draws(params_parts, steps, samples, b.chunk), kept_draws(stats_parts, steps, samples, b.chunk)
        return Draws(params=params, stats=stats, compile_s=compile_s, sample_s=time.perf_counter() - t1)


    def _by_chain(self, tree) -> dict[str, np.ndarray]:
        return by_chain(self.bucket, tree)


def over_chains(bucket: Bucket, init_one, chunk_one) -> tuple:
    """``init_one`` and ``chunk_one`` mapped over the bucket's chains: per chain the key, the starting
    positions (init) or the state (chunk); the other arguments shared. One chain per device (pmap), several
    per device (pmap of vmap), or all vectorised on one device (jit of vmap)."""
    init_axes, chunk_axes = (0, None, 0, None, None, None), (0, None, None, None, None, None)
    if bucket.devices == bucket.chains:  # one chain per device
        return jax.pmap(init_one, in_axes=init_axes), jax.pmap(chunk_one, in_axes=chunk_axes)
    init_many = jax.vmap(init_one, in_axes=init_axes)
    chunk_many = jax.vmap(chunk_one, in_axes=chunk_axes)
    if bucket.devices > 1:  # several chains per device
        return jax.pmap(init_many, in_axes=init_axes), jax.pmap(chunk_many, in_axes=chunk_axes)
    return jax.jit(init_many), jax.jit(chunk_many)


def _split_over_devices(bucket: Bucket) -> bool:
    return 1 < bucket.devices < bucket.chains


def per_chain_layout(bucket: Bucket, values: jnp.ndarray) -> jnp.ndarray:
    """An array with a leading chain axis, laid out (devices, chains per device, ...) when chains share a device."""
    if _split_over_devices(bucket):
        return values.reshape(bucket.devices, bucket.chains // bucket.devices, *values.shape[1:])
    return values


def by_chain(bucket: Bucket, tree) -> dict[str, np.ndarray]:
    """Host copies with one leading chain axis, whatever the device layout of :func:`over_chains`."""
    host = jax.device_get(tree)
    if _split_over_devices(bucket):
        return {k: v.reshape((bucket.chains, *v.shape[2:])) for k, v in host.items()}
    return host


def kept_draws(parts: list[dict[str, np.ndarray]], steps: int, samples: int, chunk: int) -> dict[str, np.ndarray]:
    """The post-warmup ``samples`` of each site, from the chunks kept (each (chain, step, ...)) from the one
    holding step ``steps`` on."""
    skip = steps - math.floor(steps / chunk) * chunk  # steps of the first kept chunk that are warmup
    return {k: np.concatenate([p[k] for p in parts], axis=1)[:, skip : skip + samples] for k in parts[0]}


def compile_checked(compile_fn, check, *, name: str):
    """``compile_fn()`` in a daemon thread, ``check()`` called every :data:`COMPILE_CHECK_S` until it returns.

    An exception from ``check`` (a job cancelled or past its limit) leaves
    the compile running there (its result is kept for the next run of its
    bucket) and propagates at once.
    """
    done: Future = Future()

    def work() -> None:
        try:
            done.set_result(compile_fn())
        except BaseException as exc:  # handed to the caller's thread
            done.set_exception(exc)

    threading.Thread(target=work, name=name, daemon=True).start()
    while True:
        try:
            return done.result(timeout=COMPILE_CHECK_S)
        except FutureTimeout:
            check()


def run_progress(done: int, warmup: int, samples: int) -> Progress:
    if done <= warmup:
        return Progress(phase="warmup", fraction=done / warmup, draws_done=0, draws_total=samples)
    drawn = min(done - warmup, samples)
    return Progress(phase="sampling", fraction=drawn / samples, draws_done=drawn, draws_total=samples)


@functools.lru_cache(maxsize=32)
def sampler_for(bucket: Bucket) -> CompiledSampler:
    """The process-wide sampler of a bucket (built once, compiled on first run)."""
    log.info("building sampler for %s", bucket)
    return CompiledSampler(bucket)


def chain_devices(chains: int) -> int:
    """How many devices the chains are split over: the most that divide them evenly.

    Four chains on four host devices run one per device; on one GPU (or one
    CPU device) they are vectorised.
    """
    available = jax.local_device_count()
    return max(d for d in range(1, min(chains, available) + 1) if chains % d == 0)
