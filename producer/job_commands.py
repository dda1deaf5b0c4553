"""``calq cancel`` and ``calq jobs``: find a job, and stop it.

Registered on the ``calq`` app by :mod:`producer.cli`; an unknown job id
ends the command with exit code 1 (:mod:`producer.exit_codes`).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from shared.contract.job import JobState

STATES = ", ".join(s.value for s in JobState)


def cancel(
    job_id: Annotated[str, typer.Argument(help="The job to cancel (calq jobs lists them).")],
    reason: Annotated[str, typer.Option(help="Why; kept in the job's record.")] = "cancelled by request",
    as_json: Annotated[bool, typer.Option("--json", help='Print {"job_id", "state"} as JSON.')] = False,
) -> None:
    """Cancel a job: a queued job never starts; a running one stops at its next check.

    Cancelling a finished job changes nothing and says so; an unknown id is an error (exit 1).
    """
    from producer.console import client, err, out, print_json, say

    record, changed = client().cancel(job_id, reason)
    if as_json:
        print_json({"job_id": record.job_id, "state": record.state.value})
    elif record.state is JobState.CANCELLED and changed:
        say(out, f"{record.job_id} cancelled")
    elif changed:
        say(out, f"{record.job_id} is running: it stops at its next check (calq wait {record.job_id})")
    if not changed:
        what = "already asked to stop" if record.state is JobState.RUNNING else f"already {record.state.value}"
        say(err, f"{record.job_id} is {what}: nothing changed")


def jobs(
    state: Annotated[Optional[str], typer.Option(help=f"Only jobs in this state ({STATES}).")] = None,
    archetype: Annotated[Optional[str], typer.Option(help="Only jobs of this archetype (or 'all').")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many jobs.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the records as JSON.")] = False,
    everything: Annotated[bool, typer.Option(
        "--all", help="Every job (no --limit), and the corrupt records and latest pointers, with why.",
    )] = False,
) -> None:
    """List the newest jobs, with state, progress and worker.

    A record or latest pointer that cannot be read (not JSON, an unknown
    state, another job's or archetype's) is skipped with a warning; ``--all``
    lists them by key and why (``--json``: ``{"jobs": [...], "corrupt": [{"key", "why"}]}``).
    """
    from producer.console import client, out, print_json
    from producer.render import corrupt_table, jobs_table

    if state is not None and state not in {s.value for s in JobState}:
        raise typer.BadParameter(f"{state!r} is not a state; one of {STATES}", param_hint="--state")
    calq = client()
    records = calq.jobs(state=state, archetype=archetype, limit=None if everything else limit)
    corrupt = calq.registry.corrupt() if everything else []
    if as_json:
        listed = [r.model_dump(mode="json") for r in records]
        print_json({"jobs": listed, "corrupt": [{"key": c.key, "why": c.why} for c in corrupt]} if everything else listed)
    else:
        out.print(jobs_table(records, width=out.width))
        if corrupt:
            out.print(corrupt_table(corrupt))


def register(app: typer.Typer) -> None:
    """Add ``cancel`` and ``jobs`` to the ``calq`` app."""
    app.command()(cancel)
    app.command()(jobs)


__all__ = ["cancel", "jobs", "register"]
