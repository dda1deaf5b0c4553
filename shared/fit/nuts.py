"""One NUTS transition whose target acceptance probability is a traced argument.

NumPyro's functional ``hmc()`` fixes the target acceptance probability when
its ``init_kernel`` is traced: the step-size adaptation closes over the
Python number. calq's convergence remedies raise the target (0.8 → 0.9 →
0.95 → 0.99) on the same compiled sampler, so :func:`nuts_step` rebuilds
that adaptation inside the traced step from NumPyro's own parts
(``warmup_adapter``, ``velocity_verlet``, ``build_tree``) with the target as
an array argument. The transition is NumPyro's NUTS (multinomial sampling,
windowed adaptation); only where the target comes from, and the mass
matrix's form (below), differ. The initial state still comes from NumPyro's ``init_kernel``,
whose adaptation set-up does not use the target.

The mass matrix is held dense, (size, size), in every state
(:func:`with_dense_mass`; factored on the host, :func:`dense_metric`), so a
warm and a cold run differ only in values: a warm start (:mod:`shared.fit.warm`) begins with the covariance of a
previous posterior's draws over every unconstrained coordinate, far more
draws than a short warmup sees, and keeps it, adapting only the step size
by dual averaging over its whole warmup in one window (NumPyro's windows
would restart the step size at each window's end, for a mass matrix that
does not change); a cold run starts at the identity and adapts a diagonal
in NumPyro's windows (:func:`_adapt_diagonal`), the estimate laid on the
dense matrix's diagonal. Whether a run is warm, and its warmup length, are
traced arguments too, so warm and cold runs share one compiled sampler.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax import lax, random
from numpyro.infer.hmc import HMCState, momentum_generator
from numpyro.infer.hmc_util import (
    IntegratorState,
    build_adaptation_schedule,
    build_tree,
    dual_averaging,
    euclidean_kinetic_energy,
    find_reasonable_step_size,
    velocity_verlet,
    warmup_adapter,
)
from numpyro.util import cond, identity

#: A trajectory whose energy error exceeds this is divergent (NumPyro's default).
MAX_DELTA_ENERGY = 1000.0


def nuts_step(
    state: HMCState,
    potential_fn,
    *,
    step: jnp.ndarray | int,
    num_warmup: int,
    target_accept_prob: jnp.ndarray,
    max_tree_depth: int,
    warm: jnp.ndarray | bool = False,
    warm_warmup: jnp.ndarray | int = 0,
) -> HMCState:
    """Advance ``state`` by one NUTS transition, adapting during the warmup.

    A cold run adapts step size and mass matrix in NumPyro's windows over
    ``num_warmup`` steps; a ``warm`` one adapts the step size alone over
    ``warm_warmup`` steps. ``num_warmup`` and ``max_tree_depth`` are static
    (the adaptation windows and the tree's loop bounds depend on them);
    ``target_accept_prob``, ``warm`` and ``warm_warmup`` may be traced scalars
    (``warm`` must be the same for every chain).

    ``step`` is the transition's index (``state.i``'s value). Under
    ``vmap`` (chains on one device, a batch of jobs) ``state.i`` is batched,
    and a ``cond`` on a batched predicate runs both branches: every
    transition would run the warmup's adaptation, window ends (a step-size
    search of leapfrog steps) included, and discard it. A ``step`` (and a
    ``warm``, ``warm_warmup``) the same for every chain and job, passed
    unbatched, keeps the adaptation's branches real.
    """
    kinetic_fn = euclidean_kinetic_energy
    rng_key, key_momentum, key_tree = random.split(state.rng_key, 3)
    adapt = state.adapt_state
    r = momentum_generator(state.z, adapt.mass_matrix_sqrt, key_momentum)
    _, vv_update = velocity_verlet(potential_fn, kinetic_fn)
    start = IntegratorState(state.z, r, state.potential_energy, state.z_grad)
    tree = build_tree(
        vv_update,
        kinetic_fn,
        start,
        adapt.inverse_mass_matrix,
        adapt.step_size,
        key_tree,
        max_delta_energy=MAX_DELTA_ENERGY,
        max_tree_depth=max_tree_depth,
    )
    accept_prob = tree.sum_accept_probs / tree.num_proposals
    proposal = IntegratorState(tree.z_proposal, r, tree.z_proposal_pe, tree.z_proposal_grad)

    _, wa_update = warmup_adapter(
        num_warmup,
        find_reasonable_step_size=partial(find_reasonable_step_size, potential_fn, kinetic_fn, momentum_generator),
        target_accept_prob=target_accept_prob,
    )
    step_size_only = partial(_adapt_step_size, num_warmup=warm_warmup, target_accept_prob=target_accept_prob)
    diagonal = partial(_adapt_diagonal, wa_update, num_warmup=num_warmup)
    warmup = jnp.where(warm, warm_warmup, num_warmup)
    adapt_state = cond(
        step < warmup,
        (step, accept_prob, proposal, adapt),
        lambda args: lax.cond(warm, lambda a: step_size_only(*a), lambda a: diagonal(*a), args),
        adapt,
        identity,
    )
    itr = step + 1
    n = jnp.where(step < warmup, itr, itr - warmup)
    return HMCState(
        i=itr,
        z=proposal.z,
        z_grad=proposal.z_grad,
        potential_energy=proposal.potential_energy,
        energy=tree.z_proposal_energy,
        r=None,
        trajectory_length=state.trajectory_length,
        num_steps=tree.num_proposals,
        accept_prob=accept_prob,
        mean_accept_prob=state.mean_accept_prob + (accept_prob - state.mean_accept_prob) / n,
        diverging=tree.diverging,
        adapt_state=adapt_state,
        rng_key=rng_key,
    )


class DenseMetric(NamedTuple):
    """A dense inverse mass matrix M⁻¹ (size × size) and the momentum scales NumPyro's state holds with it.

    ``sqrt`` is L⁻ᵀ for the Cholesky factor L of M⁻¹ (M⁻¹ = L·Lᵀ, so
    L⁻ᵀ·L⁻¹ = M), ``sqrt_inv`` is Lᵀ. Factored on the host
    (:func:`dense_metric`), never in a compiled program: see :func:`with_dense_mass`.
    """

    inverse: np.ndarray
    sqrt: np.ndarray
    sqrt_inv: np.ndarray


def dense_metric(inverse_mass_matrix: np.ndarray) -> DenseMetric:
    """``inverse_mass_matrix`` and its factors, computed in float64 with NumPy and SciPy, as float32."""
    inverse = np.asarray(inverse_mass_matrix, np.float64)
    lower = np.linalg.cholesky(inverse)
    sqrt = scipy.linalg.solve_triangular(lower.T, np.eye(len(inverse)), lower=False)
    return DenseMetric(*(np.asarray(m, np.float32) for m in (inverse, sqrt, lower.T)))


def with_dense_mass(
    state: HMCState,
    metric: DenseMetric,
    potential_fn,
    *,
    find_step_size: jnp.ndarray | bool,
    rng_key,
) -> HMCState:
    """``state`` (from NumPyro's ``init_kernel``, diagonal) with the dense ``metric``.

    With ``find_step_size`` (a traced bool) the step size is searched again
    from the state's, by NumPyro's heuristic, under the new metric.

    The metric comes factored (:func:`dense_metric`) because a Cholesky
    factor or triangular solve inside the program is a LAPACK custom call,
    which on the CPU fans a batch out over XLA's intra-op thread pool from a
    worker of that same pool and waits for it. With a job axis (vmap) and
    chains on four host devices (pmap), every worker of the pool waited for
    work that no free worker was left to run: the batched sampler hung
    forever, no thread using the CPU (:mod:`shared.fit.batch`; gdb showed
    each ``tf_XLAEigen`` worker in ``jax::ParallelBatchMap`` under
    ``lapack_spotrf_ffi``).
    """
    adapt = state.adapt_state._replace(
        inverse_mass_matrix=metric.inverse, mass_matrix_sqrt=metric.sqrt, mass_matrix_sqrt_inv=metric.sqrt_inv
    )
    found = find_reasonable_step_size(
        potential_fn, euclidean_kinetic_energy, momentum_generator, adapt.step_size, metric.inverse,
        IntegratorState(state.z, None, state.potential_energy, state.z_grad), rng_key,
    )
    return state._replace(adapt_state=adapt._replace(step_size=jnp.where(find_step_size, found, adapt.step_size)))


def _adapt_diagonal(wa_update, t, accept_prob, proposal, adapt, *, num_warmup: int):
    """NumPyro's windowed adaptation of a diagonal mass matrix, on a state that holds its matrix dense.

    The adapter sees the diagonals; its estimate (and the momentum scales
    derived from it) go back on the diagonal of dense matrices. Its window
    index is recomputed from ``t`` (the windows that ended before step t),
    the value the state holds: the state's is batched under ``vmap``, and
    the adapter's conds on it would run the window-end update (a step-size
    search of leapfrog steps) at every step; ``t``'s is not (see :func:`nuts_step`).
    """
    names = ("inverse_mass_matrix", "mass_matrix_sqrt", "mass_matrix_sqrt_inv")
    diagonal = adapt._replace(
        window_idx=window_index(t, num_warmup).astype(jnp.result_type(adapt.window_idx)),
        **{name: jnp.diagonal(getattr(adapt, name)) for name in names},
    )
    adapted = wa_update(t, accept_prob, proposal, diagonal)
    return adapted._replace(**{name: jnp.diag(getattr(adapted, name)) for name in names})


def window_index(t, num_warmup: int) -> jnp.ndarray:
    """The adaptation window step ``t`` of a ``num_warmup``-step warmup is in: how many windows ended before it."""
    ends = jnp.array([window.end for window in build_adaptation_schedule(num_warmup)])
    return jnp.sum(ends < t)


def _adapt_step_size(t, accept_prob, _proposal, adapt, *, num_warmup: int, target_accept_prob):
    """One dual-averaging update of the step size (NumPyro's, in a single window); the mass matrix stays."""
    _, ss_update = dual_averaging()
    ss_state = ss_update(target_accept_prob - accept_prob, adapt.ss_state)
    log_step_size, log_step_size_avg, *_ = ss_state
    # the last warmup step settles on the averaged step size, as NumPyro's adapter does
    step_size = jnp.exp(jnp.where(t == num_warmup - 1, log_step_size_avg, log_step_size))
    finfo = jnp.finfo(jnp.result_type(step_size))
    return adapt._replace(step_size=jnp.clip(step_size, finfo.tiny, finfo.max), ss_state=ss_state)


__all__ = ["MAX_DELTA_ENERGY", "DenseMetric", "dense_metric", "nuts_step", "window_index", "with_dense_mass"]
