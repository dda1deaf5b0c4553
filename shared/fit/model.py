"""The hierarchical logistic recalibration model.

For a forecast probability p of an event (a top-t finish) at a track k of
archetype a, the calibrated probability is::

    logit(q) = α[e, k] + β[e, k] · logit(p)

with one set of parameters per event e: events overlap (a top-5 finish is
also a top-10), so their rows are never pooled as if independent. Tracks are
partially pooled towards their archetype, so a track seen once borrows
strength from its siblings, and a track never seen takes its archetype's
population distribution.

Priors (logit scale), each with its reason:

- ``alpha_arch[e, a] ~ Normal(0, 1)``: a bias of ±2 on the logit scale already
  turns 12 % into 50 %; larger biases are implausible for a forecaster worth
  calibrating.
- ``log_beta_arch[e, a] ~ Normal(0, 0.5)``: β = exp(·) stays positive (the
  forecast orders drivers the right way round) and lies in [0.37, 2.7] with
  95 % prior mass, from strongly over- to strongly under-confident.
- ``sigma_alpha[e, a] ~ LogNormal(log 0.15, 0.6)`` and
  ``sigma_log_beta[e, a] ~ LogNormal(log 0.09, 0.6)``: tracks of one
  archetype differ by tenths on the logit scale. 95 % of the prior mass lies
  in [0.046, 0.49] for the bias and [0.028, 0.29] for the steepness (a
  factor of at most 1.34), with no mass piled at zero: they are different
  tracks, and a spread below a few hundredths changes no calibrated
  probability (0.05 on the logit scale moves 50 % by 1.2 points). The upper
  ends are those of the half-normals ``HalfNormal(0.25)`` and
  ``HalfNormal(0.15)`` these priors replaced (model ``logit-hier/1``), so
  few-track archetypes (three superspeedways) still shrink hard. What the
  half-normals' mass near zero cost, measured (issue 21, table below): the
  posterior's low tail of a track scale is the neck of the non-centred form
  where strong data per track meet a small scale; there the sampler
  diverged (in 5 of 6 runs at 24k rows, warm runs worst) and a warm run
  needed 31 leapfrog steps a draw where the log-normal needs 15.
  Wider half-normal scales (0.5 and 0.25) were worse still: five seasons of
  all archetypes diverged at target acceptance 0.8 and 0.9.
- ``alpha_track[e, k] ~ Normal(alpha_arch[e, a(k)], sigma_alpha[e, a(k)])``,
  ``log_beta_track[e, k] ~ Normal(log_beta_arch[e, a(k)], sigma_log_beta[e, a(k)])``.

Archetypes are *not* pooled with each other: four groups are too few to learn
a scale from, each has plenty of data, and it keeps an ``all`` job's
archetype posteriors those of four separate jobs.

The track level is non-centred: ``alpha_track = alpha_arch + sigma_alpha · z``
with ``z ~ Normal(0, 1)``. Measured on synthetic seasons (intermediate,
top-5 and top-10, 4 chains × (500 + 1000), this 2-core machine, with the
first, wider track-scale priors):

=========  ==========  =======  ===========  ===========  ==========
seasons    form        rows     leapfrog     divergences  min ESS
=========  ==========  =======  ===========  ===========  ==========
1          non-centred  1,140   15           0            2,553
1          centred      1,140   107          850          8
5          non-centred  5,700   20           1            1,334
5          centred      5,700   82           900          10
=========  ==========  =======  ===========  ===========  ==========

Tracks of one archetype differ little, so the track scales are small and a
centred form meets the funnel however much data there is; the non-centred
trees grow only slowly with the data. ``ModelShape.centered`` keeps the
centred form available for benchmarks on other data. Padding tracks (added
so datasets of different sizes share one compiled sampler) always take the
non-centred form: they see no data, and a centred prior-only group is
exactly the funnel.

The likelihood uses **sufficient statistics**, an exact rewrite: the
Bernoulli log-likelihood ``Σ y·η − softplus(η)`` with
``η = α[e, k] + β[e, k] · x`` has
``Σ y·η = Σ_(e,k) α[e, k] · Σy + β[e, k] · Σy·x``: only the softplus term
needs every row. ``ModelData.sum_y`` and ``sum_yx`` carry the sums per
(event, track), computed once per job, and (α, β) reach the rows through one
flat gather. Value and gradient of the log density (one chain), best of 5
on this 2-core machine when it was quiet: 23,296 padded rows 300 → 217 µs,
2,048 rows 70 → 65 µs.

The softplus term is then summed over **distinct rows** with their counts
as weights (:func:`distinct_rows`), also exact: a forecast from M scenarios
takes at most M + 1 values, so rows of one event and track repeat. Measured
on synthetic seasons with 400 scenarios, all archetypes, three events: 24,624
rows are 8,364 distinct (26,112 → 9,216 padded rows), and one value and
gradient took 339 → 178 µs (best of 7 × 200 calls, the machine shared with
other work, so both sides slow alike); ten seasons, 41,040 rows, are 10,484
distinct. A season alone (4,104 rows) goes from 4,224 to 2,944 padded rows
and 175 → 118 µs.

The distinct rows are then laid out in **blocks** (:func:`block_slots`):
each block of ``ModelShape.row_block`` (32) slots holds rows of one (event,
track), a group's last block padded with rows of weight 0. The model reads
(α, β) once per block and broadcasts them over its slots, where it had
gathered them per row: the gather's gradient, a scatter-add over every row,
had cost more than the softplus itself. Value and gradient of four chains
at 24,624 rows of all archetypes (8,598 distinct rows), interleaved, best
of 15 × 100 calls, load average 3–4 on the 2 cores: 490 µs per row (9,216
padded) → 176 µs in blocks of 32 (10,368 padded), of which the softplus
written as ``max(η, 0) + log1p(e^−|η|)`` gives 285 → 240 µs and the blocks
the rest; blocks of 16 and 64 measured 201 and 187 µs. One intermediate
season (1,200 distinct rows): 176 → 123 µs. Exact: gradients agree with
the row-wise layout's to 4e-6 relative (tests/test_model_rows.py).

**The track-scale priors, measured** (issue 21): the half-normals of
``logit-hier/1`` against a Gamma(2, 2.5/s) (the half-normal's mean and
about its 95 % quantile, density 0 at 0) and the log-normals above (and
one with log-sd 0.8, median 0.55 s). Synthetic seasons (400 scenarios,
events top_1, top_5, top_10), calq's sampler, 4 chains × 1,000 draws, the
first attempt only (no remedy); cold: 500 of warmup; warm: 100, from the
fit one race earlier; three seeds each, the machine shared (load 4–5), so
"ESS/1k", the min bulk ESS per 1,000 leapfrog steps of the sampling phase
(per gradient), is the figure to compare:

=======================  ==========  ====  ===========  ===========  ==============
data                     prior       run   leapfrog     divergences  ESS/1k
=======================  ==========  ====  ===========  ===========  ==============
all, 6 seasons, 24,624   half-normal cold  31, 31, 31   1, 0, 1      16.2 12.0 11.0
all, 6 seasons, 24,624   half-normal warm  30, 31, 31   5, 29, 8     15.2 6.3 15.6
all, 6 seasons, 24,624   gamma(2)    cold  31, 31, 31   0, 0, 1      22.9 20.6 18.7
all, 6 seasons, 24,624   gamma(2)    warm  15, 15, 15   0, 1, 2      37.7 33.4 25.8
all, 6 seasons, 24,624   log-normal  cold  31, 31, 31   0, 0, 0      33.0 30.0 31.4
all, 6 seasons, 24,624   log-normal  warm  15, 15, 15   0, 0, 1      58.0 58.3 51.5
all, 6 seasons, 24,624   l-n sd 0.8  cold  31, 31, 31   1, 0, 0      28.6 26.7 26.2
all, 6 seasons, 24,624   l-n sd 0.8  warm  16, 15, 15   0, 0, 0      41.6 52.6 39.0
intermediate, 1, 1,710   half-normal cold  20, 23, 19   0, 0, 0      28.6 27.7 29.8
intermediate, 1, 1,710   half-normal warm  15, 15, 15   0, 0, 0      50.0 49.4 48.0
intermediate, 1, 1,710   log-normal  cold  15, 17, 15   0, 0, 0      39.6 40.7 42.6
intermediate, 1, 1,710   log-normal  warm  16, 16, 13   0, 0, 0      53.4 55.7 70.9
=======================  ==========  ====  ===========  ===========  ==============

The log-normal gives two to four times the ESS per gradient at 24k rows
and removes nearly every divergence (one in six runs had one, which the
remedies absorb); a warm run's trees halve. The divergent draws of the
half-normal sat in the low tail of a track scale (quantiles 0.001–0.2 of σ
for one (event, archetype) at a time). Before the priors changed, the cheap
remedies did not cure them: a target acceptance of 0.85 or 0.9 still gave
4, 1, 2 and 3, 1, 1 divergences (trees stay at 31 steps), a warm warmup
2.5 times as long 8, 3, 3, 6; the remedy ladder's 0.99 did, at twice the
gradients.

Tried and dropped: moving the archetype intercept at the information-weighted
centre m of logit(p) (``α_arch + β_arch·m``, prior ``Normal(β·m, 1)``, exact).
It lowered the α–β posterior correlation (−0.73 → about −0.3 for top_1) but
not the trees (31 leapfrog steps per draw at 20,520 rows either way; 20.1 →
18.7 at 8,550), and at 20–25k rows of all archetypes it diverged more often
at target acceptance 0.8 (single runs of 4,000 draws at 20,520 rows: 10 and 1
divergences, against 0 and 1 for the plain form; both calq jobs at 24,624
rows needed remedies, none since). A dense mass-matrix block over the
archetype-level sites did not shorten the trees either (31 steps, lower ESS).

**Shorter trees at scale** (issue 21), measured with ``logit-hier/1``'s
half-normal track-scale priors, on synthetic seasons of 400
scenarios, events top_1, top_5 and top_10, calq's sampler, 4 chains × 1,000
draws after a cold warmup of 500 or a warm one of 100 from the fit one race
earlier; "ESS/1k" is the min bulk ESS per 1,000 leapfrog steps of the
sampling phase (per gradient, so the machine's load, 19–24 on 2 cores, does
not enter it):

======================  ==============  ========  =========  ===========  =======
data                    run             leapfrog  min ESS    divergences  ESS/1k
======================  ==============  ========  =========  ===========  =======
all, 6 seasons, 24,624  cold            31.0      1,537      0            12.4
all, 6 seasons, 24,624  warm, diagonal  31.0      1,957      1            15.8
all, 6 seasons, 24,624  warm, dense     31.0      1,835      0            14.8
all, 6 seasons, 24,624  cold, depth 4   15.0      547        0            9.1
all, 6 seasons, 24,624  warm, depth 4   15.0      739        0            12.3

intermediate, 23,940    cold            25.0      1,532      0            15.3
intermediate, 23,940    warm, diagonal  17.1      1,791      0            26.2
intermediate, 23,940    warm, dense     15.8      1,769      0            27.9

extreme_forecasts, 912  cold            15.0      2,063      0            34.4
extreme_forecasts, 912  warm, diagonal  15.0      2,148      0            35.8
extreme_forecasts, 912  warm, dense     15.0      2,317      0            38.6

track_outliers, 1,216   cold            16.7      1,971      0            29.4
track_outliers, 1,216   warm, diagonal  15.0      2,131      4            35.4
track_outliers, 1,216   warm, dense     15.0      2,369      0            39.5

unequal_rows, 960       cold            28.6      3,277      4            28.6
unequal_rows, 960       warm, diagonal  18.2      2,056      1            28.2
unequal_rows, 960       warm, dense     15.0      2,037      2            34.0

dominant_track, 1,216   cold            29.6      2,787      3            23.5
dominant_track, 1,216   warm, diagonal  29.5      3,169      1            26.8
dominant_track, 1,216   warm, dense     19.4      1,838      4            23.7
======================  ==============  ========  =========  ===========  =======

- *Kept, a small gain*: a warm run's **dense mass matrix** over every
  unconstrained coordinate (240 at 24k rows of all archetypes), the
  regularised covariance of the previous posterior's draws
  (:mod:`shared.fit.warm`). It does not shorten the trees of all
  archetypes at 24k rows (the step size grows 0.144 → 0.175, the trees
  stay at depth 5); against the diagonal it gives more ESS per gradient on
  four of six datasets (+7 % to +21 %: intermediate at 24k, three harder
  regimes, ``track_outliers``' warm divergences 4 → 0) and less on two
  (−6 % on all archetypes at 24k, −12 % on ``dominant_track``, whose three
  tracks leave the track scale to its prior: divergences 1 → 4). These are
  single runs (one seed each); together, +5 % ESS per gradient, 7 → 6
  divergences. Its cost: the momentum
  and position updates become (240 × 240) matrix-vector products, each
  about 5 µs more than the diagonal's product (four chains, best of 7 × 200
  calls) against about 800 µs for one value and gradient of four chains at
  24k rows: about 2 % a leapfrog step. Cold runs hold the identity in the same
  dense form and adapt its diagonal (one compiled sampler for both).
- *Dropped*: **max tree depth 4** (15 steps a draw at 24k rows instead of
  31): ESS per gradient falls by a quarter (12.4 → 9.1 cold, 15.8 → 12.3
  warm): the truncated trajectories mix worse than they save.
- *Dropped*: a **per-track centred form** for the tracks with the most
  data (plain NumPyro, one chain, 500 + 500, 24,624 rows): a median
  (event, track) holds 228 rows; centring those with 600 or more centres
  none (31.0 steps, min ESS 215, as the non-centred form), and centring
  those with 300 or more was stopped after 15 minutes where the non-centred
  form took 4.7 under the same load: the track scales are small, so even data-rich tracks sit in
  the funnel, as the centred rows above show. NumPyro's learned
  centredness (``LocScaleReparam(centered=None)``) was measured before:
  36.6 steps and 17 divergences against 31.0 and 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer.util import potential_energy

#: Prior scales (logit scale); the module docstring gives the reason for each.
ALPHA_ARCH_SD = 1.0
LOG_BETA_ARCH_SD = 0.5
#: The track scales' log-normal priors: their medians, and one log-sd for both.
SIGMA_ALPHA_MEDIAN = 0.15
SIGMA_LOG_BETA_MEDIAN = 0.09
SIGMA_LOG_SD = 0.6


@dataclass(frozen=True)
class ModelShape:
    """The static part of the model: changing it means a new compile."""

    n_events: int
    n_archetypes: int
    n_tracks: int
    centered: bool
    #: Slots per block of the likelihood's rows (:func:`block_slots`); 1 is the plain row-wise layout.
    row_block: int = 32


class ModelData(NamedTuple):
    """Padded arrays the model conditions on; their shapes define a bucket.

    ``x`` is logit(p) per row and ``weight`` how many of the job's rows it
    stands for: rows of one event and track with the same forecast are one
    row of weight n (the likelihood's softplus term is the same for each),
    and padding rows weigh 0. ``y`` is the number of successes per row.
    ``track_real`` is False on padding tracks. ``sum_y[e, k]`` and
    ``sum_yx[e, k]`` are Σy and Σy·x over the rows of event e at track k.
    Build them with :func:`model_data`. With outcomes, the rows are laid out
    in blocks (:func:`block_slots`): each block of ``ModelShape.row_block``
    slots holds rows of one (event, track) only, so the model reads (α, β)
    once per block. ``y`` None means: simulate the outcomes from the prior
    (one per row of weight 1, any order).
    """

    x: jnp.ndarray
    y: jnp.ndarray | None
    event: jnp.ndarray
    track: jnp.ndarray
    weight: jnp.ndarray
    track_archetype: jnp.ndarray
    track_real: jnp.ndarray
    sum_y: jnp.ndarray
    sum_yx: jnp.ndarray


def model_data(
    *,
    x: np.ndarray,
    y: np.ndarray | None,
    event: np.ndarray,
    track: np.ndarray,
    mask: np.ndarray,
    track_archetype: np.ndarray,
    track_real: np.ndarray,
    n_events: int,
    n_rows: int | None = None,
    row_block: int = ModelShape.row_block,
) -> ModelData:
    """The model's arrays from the job's rows, with their sufficient statistics, padded to ``n_rows``.

    Rows where ``mask`` is False count nowhere. With outcomes ``y``, rows of
    equal (event, track, x) are merged into one whose ``weight`` is their
    count (:func:`distinct_rows`): exact, and the gradient's cost falls with
    the number of distinct forecasts, not of rows. The merged rows are laid
    out in blocks of ``row_block`` slots (:func:`block_slots`). ``n_rows``
    (default: the number of rows given, in whole blocks, or the slots the
    merged rows need where that is more) must hold them; the rest is padding.
    """
    x = np.asarray(x, np.float32)
    n_given = x.shape[0]
    event, track, mask = np.asarray(event, np.int32), np.asarray(track, np.int32), np.asarray(mask, bool)
    track_archetype = np.asarray(track_archetype, np.int32)
    K = track_archetype.shape[0]
    sum_y = np.zeros((n_events, K))
    sum_yx = np.zeros((n_events, K))
    if y is None:
        weight = mask.astype(np.float32)
        slots, n_slots = np.arange(x.shape[0]), x.shape[0]
    else:
        y = np.asarray(y, np.float64)[mask]
        x, event, track = x[mask], event[mask], track[mask]
        np.add.at(sum_y, (event, track), y)
        np.add.at(sum_yx, (event, track), y * x)
        first, inverse, weight = distinct_rows(event=event, track=track, x=x)
        x, event, track = x[first], event[first], track[first]
        y = np.bincount(inverse, weights=y, minlength=first.size)
        slots, n_slots = block_slots(event=event, track=track, row_block=row_block)
    if n_rows is None:  # as many as given (in whole blocks), unless the blocks' padding needs more
        n_rows = n_given if y is None else max(n_slots, -(-n_given // row_block) * row_block)
    if n_slots > n_rows:
        raise ValueError(f"{x.shape[0]:,} distinct rows in {n_slots:,} slots do not fit a bucket of {n_rows:,}")
    if y is not None and n_rows % row_block:
        raise ValueError(f"a bucket of {n_rows:,} rows is not whole blocks of {row_block}")

    def padded(values: np.ndarray, dtype) -> jnp.ndarray:
        out = np.zeros(n_rows, dtype)
        out[slots] = values
        return jnp.asarray(out)

    return ModelData(
        x=padded(x, np.float32),
        y=None if y is None else padded(y, np.int32),
        event=padded(event, np.int32),
        track=padded(track, np.int32),
        weight=padded(weight, np.float32),
        track_archetype=jnp.asarray(track_archetype),
        track_real=jnp.asarray(np.asarray(track_real, bool)),
        sum_y=jnp.asarray(sum_y, jnp.float32),
        sum_yx=jnp.asarray(sum_yx, jnp.float32),
    )


def distinct_rows(*, event: np.ndarray, track: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of equal (event, track, x): ``(first, inverse, count)``.

    ``first`` indexes one row of each distinct triple, ``inverse`` maps each
    row to its triple, ``count`` is how many rows each stands for. A forecast
    from M scenarios takes at most M + 1 values, so a season's rows repeat
    (measured: 23,760 rows of ten seasons hold 6,692 distinct triples).
    Equal means bit-equal float32 x: exact, never a rounding of forecasts.
    """
    key = (np.asarray(event, np.uint64) << np.uint64(48)) | (np.asarray(track, np.uint64) << np.uint64(32)) \
        | np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    _, first, inverse, count = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    return first, inverse.reshape(-1), count.astype(np.float32)


def block_slots(*, event: np.ndarray, track: np.ndarray, row_block: int) -> tuple[np.ndarray, int]:
    """Each row's slot, and the slots in all, when each (event, track)'s rows fill whole blocks.

    The rows must come grouped by (event, track), as :func:`distinct_rows`
    orders them. A group's rows take consecutive slots from the start of a
    block, and its last block is padded (weight 0) to ``row_block`` slots,
    so every block holds one (event, track) and its first slot is a real row.
    """
    event, track = np.asarray(event), np.asarray(track)
    n = event.shape[0]
    if n == 0:
        return np.zeros(0, np.intp), 0
    starts = np.flatnonzero(np.r_[True, (event[1:] != event[:-1]) | (track[1:] != track[:-1])])
    sizes = np.diff(np.r_[starts, n])
    if len(set(zip(event[starts].tolist(), track[starts].tolist()))) != starts.size:
        raise ValueError("rows must come grouped by (event, track)")
    blocks = -(-sizes // row_block)
    first_slot = row_block * np.r_[0, np.cumsum(blocks)[:-1]]
    group = np.repeat(np.arange(starts.size), sizes)
    return first_slot[group] + np.arange(n) - starts[group], int(row_block * blocks.sum())


def row_slots(*, event: np.ndarray, track: np.ndarray, x: np.ndarray, row_block: int = ModelShape.row_block) -> int:
    """How many slots the job's rows take once merged (:func:`distinct_rows`) and laid out in blocks."""
    first = distinct_rows(event=event, track=track, x=x)[0]
    return block_slots(event=np.asarray(event)[first], track=np.asarray(track)[first], row_block=row_block)[1]


def _softplus(eta: jnp.ndarray) -> jnp.ndarray:
    """log(1 + e^η), stably: max(η, 0) + log1p(e^−|η|).

    The same function as ``jax.nn.softplus`` (``logaddexp(η, 0)``), whose
    value and gradient cost twice as much on the CPU: 40,000 values and
    gradients (four chains at 24k rows) 236 → 125 µs.
    """
    return jnp.maximum(eta, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(eta)))


def track_scale_prior(median: float) -> dist.Distribution:
    """The prior of a track scale σ (the spread of one archetype's tracks) with this median."""
    return dist.LogNormal(float(np.log(median)), SIGMA_LOG_SD)


def _track_level(name: str, loc, scale, real, centered: bool):
    """Track parameters around their archetype's, centred or not.

    Padding tracks are always sampled as standard normals (non-centred, no data).
    """
    if centered:
        raw = numpyro.sample(
            f"{name}_raw",
            dist.Normal(jnp.where(real, loc, 0.0), jnp.where(real, scale, 1.0)),
        )
        return jnp.where(real, raw, loc + scale * raw)
    z = numpyro.sample(f"{name}_z", dist.Normal(jnp.zeros_like(loc), 1.0))
    return loc + scale * z


def calibration_model(data: ModelData, *, shape: ModelShape) -> None:
    """NumPyro model of the recalibration; ``y`` is observed where ``mask`` holds.

    With ``data.y`` None the outcomes are drawn (site ``y``), for simulation.
    """
    E, A, K = shape.n_events, shape.n_archetypes, shape.n_tracks
    with numpyro.plate("event", E, dim=-2):
        with numpyro.plate("archetype", A, dim=-1):
            alpha_arch = numpyro.sample("alpha_arch", dist.Normal(0.0, ALPHA_ARCH_SD))
            log_beta_arch = numpyro.sample("log_beta_arch", dist.Normal(0.0, LOG_BETA_ARCH_SD))
            sigma_alpha = numpyro.sample("sigma_alpha", track_scale_prior(SIGMA_ALPHA_MEDIAN))
            sigma_log_beta = numpyro.sample("sigma_log_beta", track_scale_prior(SIGMA_LOG_BETA_MEDIAN))
    numpyro.deterministic("beta_arch", jnp.exp(log_beta_arch))

    ta = data.track_archetype
    with numpyro.plate("event_t", E, dim=-2), numpyro.plate("track", K, dim=-1):
        alpha_track = _track_level(
            "alpha_track", alpha_arch[:, ta], sigma_alpha[:, ta], data.track_real, shape.centered
        )
        log_beta_track = _track_level(
            "log_beta_track", log_beta_arch[:, ta], sigma_log_beta[:, ta], data.track_real, shape.centered
        )
    numpyro.deterministic("alpha_track", alpha_track)
    beta_track = numpyro.deterministic("beta_track", jnp.exp(log_beta_track))

    # (α, β) gathered once per block of rows of one (event, track), through a flat index (block_slots);
    # simulated rows (y None) come in any order, a block of one each
    block = 1 if data.y is None else shape.row_block
    per_block = jnp.stack([alpha_track.reshape(-1), beta_track.reshape(-1)], axis=-1)[
        (data.event * K + data.track)[::block]
    ]
    logits = per_block[:, :1] + per_block[:, 1:] * data.x.reshape(-1, block)
    if data.y is None:
        with numpyro.plate("row", data.x.shape[0]), numpyro.handlers.mask(mask=data.weight > 0):
            numpyro.sample("y", dist.Bernoulli(logits=logits.reshape(-1)))
        return
    # Σ_rows y·η − softplus(η): Σ y·η from the sufficient statistics, softplus once per distinct row × its weight
    linear = jnp.sum(alpha_track * data.sum_y + beta_track * data.sum_yx)
    numpyro.factor("y", linear - jnp.sum(data.weight.reshape(-1, block) * _softplus(logits)))


def potential(data: ModelData, shape: ModelShape):
    """The sampler's potential energy of :func:`calibration_model` given ``data``: params ↦ −log density.

    The same function as NumPyro's ``potential_energy`` of the model (the
    log density of the unconstrained parameters, Jacobians included; tested
    equal in value and gradient), for the non-centred form with outcomes,
    its value and gradient computed in one pass (:func:`_value_and_gradient`)
    where autodiff of the traced model took twice the kernels: measured,
    value and gradient of one chain, best of 5 × 2,000 calls, CPU: 14.1 →
    6.6 µs at one intermediate season (2,048 padded rows), 42 → 27 µs at 24,624
    rows of all archetypes. The centred form (benchmarks only) is NumPyro's.
    """
    if shape.centered or data.y is None:
        model = partial(calibration_model, shape=shape)
        return partial(potential_energy, model, (data,), {})
    return lambda params: _potential(params, data, shape.n_archetypes, shape.row_block)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _potential(params: dict, data: ModelData, n_archetypes: int, block: int) -> jnp.ndarray:
    return _value_and_gradient(params, data, n_archetypes, block)[0]


def _potential_forward(params, data, n_archetypes, block):
    value, gradient = _value_and_gradient(params, data, n_archetypes, block)
    return value, (gradient, data)


def _potential_backward(n_archetypes, block, residuals, cotangent):
    gradient, data = residuals
    return jax.tree_util.tree_map(lambda g: cotangent * g, gradient), jax.tree_util.tree_map(_no_cotangent, data)


def _no_cotangent(x):
    if x is None:
        return None
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


_potential.defvjp(_potential_forward, _potential_backward)


def _value_and_gradient(params: dict, data: ModelData, n_archetypes: int, block: int):
    """−log density of the unconstrained ``params`` and its gradient, by hand.

    With σ = exp(u) the track scales' log-normal prior and its Jacobian make a
    normal density of u. The tracks' (α, β) reach the likelihood's blocks by
    one gather; the gradient comes back through one segment sum over blocks
    and one sum over each archetype's tracks.
    """
    a, log_b = params["alpha_arch"], params["log_beta_arch"]
    u_a, u_b = params["sigma_alpha"], params["sigma_log_beta"]
    z_a, z_b = params["alpha_track_z"], params["log_beta_track_z"]
    E, K = z_a.shape
    ta = data.track_archetype
    s_a, s_b = jnp.exp(u_a)[:, ta], jnp.exp(u_b)[:, ta]
    alpha = a[:, ta] + s_a * z_a
    beta = jnp.exp(log_b[:, ta] + s_b * z_b)

    cell = (data.event * K + data.track)[::block]
    per_block = jnp.stack([alpha.reshape(-1), beta.reshape(-1)], axis=-1)[cell]
    x, w = data.x.reshape(-1, block), data.weight.reshape(-1, block)
    eta = per_block[:, :1] + per_block[:, 1:] * x
    e = jnp.exp(-jnp.abs(eta))
    softplus = jnp.maximum(eta, 0.0) + jnp.log1p(e)
    rate = w * jnp.where(eta >= 0, 1.0, e) / (1.0 + e)  # w·sigmoid(η), the softplus term's derivative
    by_block = jnp.stack([jnp.sum(rate, axis=1), jnp.sum(rate * x, axis=1)], axis=-1)
    by_cell = jax.ops.segment_sum(by_block, cell, num_segments=E * K).reshape(E, K, 2)
    d_alpha = by_cell[..., 0] - data.sum_y  # ∂(−log density)/∂α[e, k]
    d_log_beta = (by_cell[..., 1] - data.sum_yx) * beta

    # log σ is normal under the track scales' log-normal priors (their Jacobian included): centred and scaled
    prior_a, prior_b = track_scale_prior(SIGMA_ALPHA_MEDIAN), track_scale_prior(SIGMA_LOG_BETA_MEDIAN)
    v_a, v_b = (u_a - prior_a.loc) / prior_a.scale, (u_b - prior_b.loc) / prior_b.scale
    log_likelihood = jnp.sum(alpha * data.sum_y + beta * data.sum_yx) - jnp.sum(w * softplus)
    log_prior = (
        _normal_log_density(a, ALPHA_ARCH_SD) + _normal_log_density(log_b, LOG_BETA_ARCH_SD)
        + _normal_log_density(v_a, 1.0) - v_a.size * np.log(prior_a.scale)
        + _normal_log_density(v_b, 1.0) - v_b.size * np.log(prior_b.scale)
        + _normal_log_density(z_a, 1.0) + _normal_log_density(z_b, 1.0)
    )
    of_archetype = (ta[:, None] == jnp.arange(n_archetypes)).astype(d_alpha.dtype)  # (track, archetype)
    gradient = {
        "alpha_arch": a / ALPHA_ARCH_SD**2 + d_alpha @ of_archetype,
        "log_beta_arch": log_b / LOG_BETA_ARCH_SD**2 + d_log_beta @ of_archetype,
        "sigma_alpha": v_a / prior_a.scale + jnp.exp(u_a) * ((d_alpha * z_a) @ of_archetype),
        "sigma_log_beta": v_b / prior_b.scale + jnp.exp(u_b) * ((d_log_beta * z_b) @ of_archetype),
        "alpha_track_z": z_a + s_a * d_alpha,
        "log_beta_track_z": z_b + s_b * d_log_beta,
    }
    return -(log_prior + log_likelihood), gradient


def _normal_log_density(v: jnp.ndarray, sd: float) -> jnp.ndarray:
    """Σ log Normal(v | 0, sd)."""
    return jnp.sum(-0.5 * jnp.square(v / sd)) - v.size * (np.log(sd) + 0.5 * np.log(2 * np.pi))


__all__ = [
    "ModelData",
    "ModelShape",
    "block_slots",
    "calibration_model",
    "distinct_rows",
    "model_data",
    "potential",
    "row_slots",
    "track_scale_prior",
]
