"""``calq fleet``: the operator's view of a running fleet, from what its workers publish in Redis.

Per worker: node, pid, device, idle or busy, job and phase, lease age,
heartbeat age, jobs done, last error. Per queue: depth. Totals: dead
letters, invalid messages, jobs per minute over 5 and 60 minutes. Per
archetype: p50 and p95 job seconds and convergence failures in the last hour.
It reads the heartbeat records and the recent-jobs list
(:mod:`shared.jobs.telemetry`), never Celery's ``inspect`` broadcast (slow,
and blind to a busy solo-pool worker). Every value came out of Redis, so
every one is shown through :mod:`producer.sanitize`; records that do not
parse are left out and counted. Registered on the ``calq`` app by
:mod:`producer.cli`; without a broker it is a usage error (exit 2).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.table import Table

from shared.jobs.telemetry import FleetView


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def fleet_view() -> FleetView:
    """The fleet now, read from the broker's Redis (ValueError without a broker)."""
    from shared.contract.settings import get_settings
    from shared.jobs.celery_app import ALL_QUEUES
    from shared.jobs.registry import RedisRegistry
    from shared.jobs.telemetry import read_fleet

    settings = get_settings()
    if settings.embedded:
        raise ValueError("calq fleet needs a broker: set CALQ_BROKER_URL (e.g. redis://localhost:6379/0)")
    registry = RedisRegistry.from_url(settings.backend())
    with registry._errors():  # the registry's one mapping: Redis out → BrokerUnavailable (exit 5), no password shown
        return read_fleet(registry.redis, registry.prefix, ALL_QUEUES)


def fleet_json(view: FleetView) -> dict[str, Any]:
    """The view as JSON-ready data: each worker's record with its ages."""
    data = view.model_dump(mode="json")
    data["workers"] = [
        {**w.beat.model_dump(mode="json"), "heartbeat_age_s": round(w.heartbeat_age_s, 3),
         "lease_age_s": None if w.lease_age_s is None else round(w.lease_age_s, 3)}
        for w in view.workers
    ]
    return data


def fleet_tables(view: FleetView) -> Group:
    """Workers, queues and totals, and archetypes: three tables, every cell sanitized."""
    from producer.sanitize import for_markup

    workers = Table(title="workers", title_justify="left")
    for column in ("worker", "node", "pid", "device", "state", "job", "phase", "lease", "heartbeat", "done",
                   "last error"):
        workers.add_column(column, overflow="fold")
    for w in view.workers:
        b = w.beat
        state = "[yellow]busy[/yellow]" if b.state == "busy" else "[green]idle[/green]"
        workers.add_row(for_markup(b.worker), for_markup(b.node), str(b.pid), for_markup(b.device), state,
                        for_markup(b.job_id or "-"), for_markup(b.phase or "-"), _age(w.lease_age_s),
                        _age(w.heartbeat_age_s), str(b.jobs_done), for_markup(b.last_error or "-"))
    if not view.workers:
        workers.add_row("[dim]no worker has published a heartbeat[/dim]", *[""] * 10)

    totals = Table(title="queues and totals", title_justify="left", show_header=False)
    totals.add_column("what")
    totals.add_column("value", justify="right")
    for queue, depth in view.queues.items():
        totals.add_row(f"queue {for_markup(queue)}", "?" if depth is None else str(depth))
    totals.add_row("dead letters", str(view.dead_letters))
    totals.add_row("invalid messages", str(view.invalid_messages))
    totals.add_row("jobs/min (5 min)", f"{view.jobs_per_minute_5m:.2f}")
    totals.add_row("jobs/min (60 min)", f"{view.jobs_per_minute_60m:.2f}")
    for state, n in view.finished_last_hour.items():
        totals.add_row(f"{for_markup(state)} (last hour)", str(n))

    archetypes = Table(title="archetypes, last hour", title_justify="left")
    for column in ("archetype", "jobs", "p50 s", "p95 s", "not converged"):
        archetypes.add_column(column, justify="left" if column == "archetype" else "right")
    for name, stats in view.archetypes.items():
        archetypes.add_row(for_markup(name), str(stats.jobs), _seconds(stats.p50_s), _seconds(stats.p95_s),
                           str(stats.convergence_failures))
    parts: list[Any] = [workers, totals, archetypes]
    if view.skipped:
        parts.append(f"[yellow]{view.skipped} record(s) in Redis did not parse and were left out[/yellow]")
    return Group(*parts)


def fleet(
    as_json: Annotated[bool, typer.Option("--json", help="Print the view as JSON.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Redraw every --interval seconds until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.5, help="Seconds between redraws with --watch.")] = 2.0,
) -> None:
    """Show the fleet: each worker (busy or idle, job, phase, heartbeat), queue depths, rates, per-archetype times."""
    from producer.console import err, out, print_json, say

    try:
        view = fleet_view()
    except ValueError as exc:
        say(err, str(exc), style="red")
        raise typer.Exit(2) from None
    if as_json and not watch:
        print_json(fleet_json(view))
        return
    if as_json:  # one compact JSON object per line, for a pipe
        while True:
            print(json.dumps(fleet_json(view), ensure_ascii=True), flush=True)
            time.sleep(interval)
            view = fleet_view()
    if not watch:
        out.print(fleet_tables(view))
        return
    from rich.live import Live

    with Live(fleet_tables(view), console=out, refresh_per_second=4) as live:
        while True:
            time.sleep(interval)
            live.update(fleet_tables(fleet_view()))


def register(app: typer.Typer) -> None:
    """Add ``fleet`` to the ``calq`` app."""
    app.command()(fleet)


__all__ = ["fleet", "fleet_json", "fleet_tables", "fleet_view", "register"]
