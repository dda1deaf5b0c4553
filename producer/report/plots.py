"""Plots of calibration results: functions of arrays and summaries that return matplotlib Figures.

Usable on their own in a notebook::

    from producer.report.plots import plot_reliability
    fig = plot_reliability({"top_5": {"raw": curve.to_dict()}}, title="superspeedway")

Conventions, the same in every function:

- matplotlib runs with the Agg backend (set on import, unless a backend was
  already chosen, as in a notebook); nothing here shows a window;
- the Okabe–Ito palette (:data:`PALETTE`), safe for the common colour-vision
  deficiencies; series differ by marker and line style as well as colour;
- every figure has a title and every axis a label;
- every data-derived string (track names, labels) goes through
  :func:`mpl_text`, so ``$`` never starts mathtext and a leading ``_`` never
  hides a legend entry.

Reliability curves are dicts in the layout of
:meth:`shared.stats.metrics.ReliabilityCurve.to_dict` (``bin_lower``,
``bin_upper``, ``mean_forecast``, ``observed_frequency``, ``count``; empty
bins hold None), as they are stored in summaries.
"""

from __future__ import annotations

import math
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import matplotlib

if "MPLBACKEND" not in os.environ and "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

#: Okabe & Ito (2008): distinguishable with any common colour-vision deficiency.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
#: Reliability bins with fewer pairs than this get hollow markers.
SPARSE_BIN = 20
REFERENCE = "#6e7781"  # the diagonal, nominal levels and other references: neutral grey

_STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "figure.titlesize": 12,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
}


def mpl_text(text: object) -> str:
    """``text`` as literal matplotlib text: ``$`` escaped, a leading ``_`` kept visible.

    matplotlib reads a pair of ``$`` as mathtext, and a legend skips labels
    that start with ``_``; track names and labels come from data, so every
    one goes through here.
    """
    s = str(text).replace("\\", "\\\\").replace("$", r"\$")
    return "\u200b" + s if s.startswith("_") else s


def _panel_title(text: object, *, width: int = 30) -> str:
    """A data-derived panel title, on at most two lines of ``width`` characters, so neighbours never overlap."""
    lines = textwrap.wrap(str(text), width=width, break_long_words=True) or [""]
    if len(lines) > 2:
        lines = [lines[0], lines[1][: width - 1] + "…"]
    return mpl_text("\n".join(lines))


def _style(series: int) -> dict:
    return {
        "color": PALETTE[series % len(PALETTE)],
        "marker": MARKERS[series % len(MARKERS)],
        "linestyle": LINESTYLES[series % len(LINESTYLES)],
    }


def _values(seq) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in seq], dtype=np.float64)


def _grid(n: int, *, ncols: int, width: float, height: float, sharey: bool = False, **kw):
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, sharey=sharey, layout="constrained", **kw
        )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _finish(fig: Figure, title: str) -> Figure:
    """Title the figure, wrapped to its width (about 11 characters per inch at the title's size)."""
    width = max(20, int(fig.get_figwidth() * 11))
    fig.suptitle(mpl_text("\n".join(textwrap.wrap(str(title), width=width)) or str(title)), fontweight="bold")
    return fig


# -- reliability -----------------------------------------------------------------


def plot_reliability(
    panels: Mapping[str, Mapping[str, Mapping]],
    *,
    title: str,
    ncols: int = 3,
) -> Figure:
    """Reliability diagrams with counts: one panel per key of ``panels``.

    ``panels`` maps a panel title (an event) to series: label (``"raw"``,
    ``"calibrated"``) → reliability curve dict. Each panel plots observed
    frequency against mean forecast per bin over the 45° line, and below it the
    pairs per bin (log scale), so a reader sees which points rest on few data;
    bins with fewer than :data:`SPARSE_BIN` pairs have hollow markers.
    """
    n = len(panels)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    with plt.rc_context(_STYLE):
        fig = plt.figure(figsize=(3.6 * ncols, 4.3 * nrows), layout="constrained")
        outer = fig.add_gridspec(nrows, ncols)
        for k, (panel, series) in enumerate(panels.items()):
            inner = outer[k // ncols, k % ncols].subgridspec(2, 1, height_ratios=(3, 1), hspace=0.05)
            ax = fig.add_subplot(inner[0])
            ax_n = fig.add_subplot(inner[1], sharex=ax)
            ax.plot([0, 1], [0, 1], color=REFERENCE, linewidth=1, linestyle=":", label="perfect calibration")
            width = 0.8 / max(1, len(series))
            for s, (label, curve) in enumerate(series.items()):
                x = _values(curve["mean_forecast"])
                y = _values(curve["observed_frequency"])
                count = np.asarray(curve["count"], dtype=np.float64)
                lower, upper = _values(curve["bin_lower"]), _values(curve["bin_upper"])
                style = _style(s)
                ax.plot(x, y, markersize=4, linewidth=1.4, label=_panel_title(label), **style)
                sparse = count < SPARSE_BIN
                if sparse.any():  # hollow markers: bins too small to read much into
                    ax.plot(x[sparse], y[sparse], linestyle="none", marker=style["marker"], markersize=5,
                            markerfacecolor="white", markeredgecolor=style["color"])
                centre = (lower + upper) / 2
                offset = (s - (len(series) - 1) / 2) * width * (upper - lower)
                ax_n.bar(centre + offset, np.where(count > 0, count, np.nan), width=width * (upper - lower),
                         color=style["color"], alpha=0.85, label=_panel_title(label))
            ax.set(xlim=(0, 1), ylim=(-0.03, 1.03), ylabel="observed frequency", title=_panel_title(panel, width=40))
            ax.tick_params(labelbottom=False)
            ax.legend(loc="upper left", frameon=False)
            _log_counts(ax_n)
            ax_n.set(xlabel="forecast probability", ylabel="pairs per bin")
    return _finish(fig, title)


def _log_counts(ax) -> None:
    """A log count axis with a few plain-number ticks (1, 10, 100, 1,000)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=4))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


# -- calibrated curves -------------------------------------------------------------


@dataclass(frozen=True)
class Band:
    """A curve with its credible band over a grid: mean, low and high, one value per grid point."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def plot_calibration_curve(
    p: Sequence[float] | np.ndarray,
    curves: Mapping[str, Band],
    *,
    title: str,
    population: Band | None = None,
    population_label: str = "archetype (a new track)",
    band_label: str = "94 % band",
    ncols: int = 4,
) -> Figure:
    """The calibrated probability q(p) with its credible band, one panel per track, over the diagonal.

    ``curves`` maps a track to its :class:`Band` on the grid ``p``; the
    ``population`` band (the archetype's curve for a track it has not seen)
    is drawn dashed in every panel for comparison. Axes are probability
    scales from 0 to 1; points above the diagonal mean the raw forecast was
    too low there.
    """
    p = np.asarray(p, dtype=np.float64)
    fig, axes = _grid(max(1, len(curves)), ncols=ncols, width=2.7, height=2.6, sharey=True)
    for k, (ax, (track, band)) in enumerate(zip(axes, curves.items())):
        ax.plot([0, 1], [0, 1], color=REFERENCE, linewidth=1, linestyle=":", label="q = p")
        ax.fill_between(p, band.low, band.high, color=PALETTE[0], alpha=0.25, linewidth=0, label=mpl_text(band_label))
        if population is not None:  # under the track's curve: where they agree, the track's shows
            ax.plot(p, population.mean, color=PALETTE[3], linestyle="--", linewidth=1.1, zorder=2,
                    label=mpl_text(population_label))
        ax.plot(p, band.mean, color=PALETTE[0], linewidth=1.8, zorder=3, label="calibrated q(p)")
        ax.set(xlim=(0, 1), ylim=(0, 1), title=_panel_title(track), xlabel="forecast p")
        if k % max(1, min(ncols, len(curves))) == 0:
            ax.set_ylabel("calibrated q")
        if k == 0:
            ax.legend(loc="upper left", frameon=False, fontsize=7)
    return _finish(fig, title)


# -- parameters -------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A posterior summary of one parameter: mean and HDI."""

    label: str
    mean: float
    low: float
    high: float


def plot_forest(
    panels: Mapping[str, tuple[Sequence[Interval], Interval | None, tuple[float, float] | None]],
    *,
    title: str,
    reference: Mapping[str, float] | None = None,
) -> Figure:
    """Forest plots side by side: per panel (x-axis label), one row per track with its HDI.

    Each value of ``panels`` is ``(tracks, archetype, population)``: the
    tracks' intervals, the archetype-level interval (drawn first, as a
    diamond) and the archetype's population range (shaded: where 94 % of the
    archetype's tracks are expected). ``reference`` gives, per panel, the value
    of "no recalibration" (α = 0, β = 1), drawn as a dotted line.
    """
    n_rows = max((len(rows) + (arch is not None)) for rows, arch, _ in panels.values()) if panels else 1
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(
            1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 0.9 + 0.32 * n_rows),
            squeeze=False, sharey=True, layout="constrained",
        )
    for ax, (xlabel, (rows, arch, population)) in zip(axes.flat, panels.items()):
        items = ([arch] if arch is not None else []) + list(rows)
        ypos = np.arange(len(items))[::-1]
        if population is not None:
            ax.axvspan(population[0], population[1], color=PALETTE[1], alpha=0.15, linewidth=0,
                       label="archetype population (94 %)")
        if reference and xlabel in reference:
            ax.axvline(reference[xlabel], color=REFERENCE, linestyle=":", linewidth=1, label="no recalibration")
        for y, item in zip(ypos, items):
            is_arch = arch is not None and item is arch
            color = PALETTE[3] if is_arch else PALETTE[0]
            ax.plot([item.low, item.high], [y, y], color=color, linewidth=2.2 if is_arch else 1.6)
            ax.plot(item.mean, y, marker="D" if is_arch else "o", color=color, markersize=6 if is_arch else 4,
                    label="archetype mean, 94 % HDI" if is_arch else None)
        ax.set_yticks(ypos, [mpl_text(i.label) for i in items])
        ax.set(xlabel=mpl_text(xlabel), title=mpl_text(xlabel.split(" ")[0]))
        ax.set_ylim(-0.7, len(items) - 0.3)
    axes.flat[0].set_ylabel("track")
    for ax in axes.flat[1:]:
        ax.tick_params(labelleft=False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), frameon=False)
    return _finish(fig, title)


# -- forecasts ---------------------------------------------------------------------


def plot_pit_histogram(histograms: Mapping[str, Sequence[int]], *, title: str, ncols: int = 4) -> Figure:
    """PIT histograms (density), one panel per key; uniform (= calibrated) is the line at 1.

    The shaded band is where 95 % of a bin's density falls for a calibrated
    forecast with the same number of values (binomial). A U shape means an
    over-confident forecast, a hump an under-confident one.
    """
    fig, axes = _grid(max(1, len(histograms)), ncols=ncols, width=2.9, height=2.4, sharey=True)
    for k, (ax, (label, counts)) in enumerate(zip(axes, histograms.items())):
        counts = np.asarray(counts, dtype=np.float64)
        bins, total = counts.size, counts.sum()
        edges = np.linspace(0, 1, bins + 1)
        density = counts * bins / total if total else counts
        if total:
            sd = math.sqrt(total * (1 / bins) * (1 - 1 / bins)) * bins / total
            ax.axhspan(1 - 1.96 * sd, 1 + 1.96 * sd, color=REFERENCE, alpha=0.15, linewidth=0, label="95 % if calibrated")
        ax.bar(edges[:-1], density, width=1 / bins, align="edge", color=PALETTE[0], edgecolor="white", linewidth=0.6)
        ax.axhline(1, color=REFERENCE, linestyle=":", linewidth=1, label="uniform")
        ax.set(xlim=(0, 1), xlabel="PIT value", title=_panel_title(f"{label} (n = {int(total)})"))
        if k % max(1, min(ncols, len(histograms))) == 0:
            ax.set_ylabel("density")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)
    return _finish(fig, title)


def plot_coverage(coverage: Mapping[str, Mapping[float, float]], *, title: str) -> Figure:
    """Observed coverage of central intervals against the nominal level, one series per key."""
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(4.4, 4.0), layout="constrained")
    ax.plot([0, 1], [0, 1], color=REFERENCE, linestyle=":", linewidth=1, label="calibrated (observed = nominal)")
    for s, (label, levels) in enumerate(coverage.items()):
        nominal = np.array(sorted(float(k) for k in levels))
        observed = np.array([levels[k] for k in sorted(levels, key=float)], dtype=np.float64)
        ax.plot(nominal, observed, markersize=6, linewidth=1.2, label=mpl_text(label), **_style(s))
    ax.set(xlim=(0.4, 1), ylim=(0, 1), xlabel="nominal level of the central interval", ylabel="share of outcomes inside")
    ax.legend(loc="lower right", frameon=False)
    return _finish(fig, title)


# -- MCMC (ArviZ) ------------------------------------------------------------------


def _arviz_figure(axes) -> Figure:
    return np.asarray(axes).flat[0].get_figure()


def _readable(fig: Figure) -> None:
    """ArviZ scales its fonts to its own figure sizes: bring them back to this module's sizes."""
    for ax in fig.axes:
        ax.title.set_fontsize(_STYLE["axes.titlesize"])
        ax.xaxis.label.set_fontsize(_STYLE["axes.labelsize"])
        ax.yaxis.label.set_fontsize(_STYLE["axes.labelsize"])
        ax.tick_params(labelsize=8)
    fig.set_layout_engine("constrained")


def _with_bool_divergences(idata):
    """The posterior and sample stats with ``diverging`` as booleans.

    calq stores ``diverging`` as int8 (netCDF4 has no bool variables); ArviZ
    indexes with it, so an int array would mark the wrong draws as divergent.
    """
    import arviz as az

    stats = idata.sample_stats
    if "diverging" in stats and stats["diverging"].dtype != bool:
        stats = stats.assign(diverging=stats["diverging"].astype(bool))
    return az.InferenceData(posterior=idata.posterior, sample_stats=stats)


def _panels(var_names: Sequence[str], coords: Mapping[str, Sequence[str]], idata) -> int:
    n = 0
    for name in var_names:
        size = 1
        for dim in idata.posterior[name].dims:
            if dim not in ("chain", "draw"):
                size *= len(coords.get(dim, idata.posterior[dim].values))
        n += size
    return n


def plot_rank(idata, *, var_names: Sequence[str], coords: Mapping[str, Sequence[str]], title: str) -> Figure:
    """ArviZ rank plots: per chain, the ranks of its draws among all chains (uniform when chains agree)."""
    import arviz as az

    n = _panels(var_names, coords, idata)
    ncols = min(3, n)
    figsize = (3.2 * ncols, 2.6 * math.ceil(n / ncols))
    with plt.rc_context(_STYLE):
        axes = az.plot_rank(idata, var_names=list(var_names), coords=dict(coords), kind="bars", figsize=figsize,
                            colors=list(PALETTE[:idata.posterior.sizes["chain"]]))
        fig = _arviz_figure(axes)
        for ax in np.asarray(axes).flat:
            ax.set_xlabel("rank (all chains)")
            ax.set_ylabel("chain")
    _readable(fig)
    return _finish(fig, title)


def plot_trace(idata, *, var_names: Sequence[str], coords: Mapping[str, Sequence[str]], title: str) -> Figure:
    """ArviZ traces: each chain's draws (right) and their densities (left), one row per variable and coordinate.

    Divergent draws, if any, are marked in black below the traces.
    """
    import arviz as az

    n = _panels(var_names, coords, idata)
    with plt.rc_context(_STYLE):
        axes = az.plot_trace(_with_bool_divergences(idata), var_names=list(var_names), coords=dict(coords), compact=False,
                             figsize=(9, 1.7 * n), chain_prop={"color": list(PALETTE[:idata.posterior.sizes["chain"]])})
        fig = _arviz_figure(axes)
        for row in np.atleast_2d(axes):
            row[0].set(xlabel="value", ylabel="density")
            row[1].set(xlabel="draw", ylabel="value")
    _readable(fig)
    return _finish(fig, title)


def plot_energy(idata, *, title: str) -> Figure:
    """ArviZ energy plot: marginal energy against energy transitions, with BFMI per chain."""
    import arviz as az

    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(5.0, 3.4), layout="constrained")
        az.plot_energy(idata, ax=ax, fill_color=(PALETTE[0], PALETTE[1]), legend=True, bfmi=True)
    legend = ax.get_legend()
    if legend is not None:  # beside the plot, not over the densities
        ax.legend(legend.legend_handles, [t.get_text() for t in legend.texts], loc="upper left",
                  bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.set(xlabel="energy (centred)", ylabel="density")
    return _finish(fig, title)


__all__ = [
    "MARKERS",
    "PALETTE",
    "Band",
    "Interval",
    "mpl_text",
    "plot_calibration_curve",
    "plot_coverage",
    "plot_energy",
    "plot_forest",
    "plot_pit_histogram",
    "plot_rank",
    "plot_reliability",
    "plot_trace",
]
