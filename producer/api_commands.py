"""``calq serve``, ``calq token create|list|revoke`` and ``calq acl``: the calibration API and who may call it.

Registered on the ``calq`` app by :mod:`producer.cli`. Both need the fleet's
Redis (``CALQ_BROKER_URL``); tokens may live in a file instead
(``CALQ_API__TOKENS=file``). A token is printed once, by ``create``; calq
keeps only its sha256 (:mod:`producer.api.tokens`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

token_app = typer.Typer(help="Create, list and revoke API tokens.", no_args_is_help=True)


def serve(
    host: Annotated[Optional[str], typer.Option(help="Address to listen on (default: CALQ_API__HOST, 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(min=0, max=65535, help="Port (default: CALQ_API__PORT, 8000).")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Server processes (one per core to use).")] = 1,
) -> None:
    """Serve the calibration API (OpenAPI at /openapi.json, docs at /docs) until Ctrl-C or SIGTERM."""
    from producer.api.app import create_app
    from producer.api.server import serve as run
    from producer.console import err, say
    from shared.contract.settings import get_settings

    settings = get_settings()
    app = create_app(settings) if workers == 1 else None  # several: each process builds its own
    host = host or settings.api.host
    port = settings.api.port if port is None else port
    say(err, f"calq API on http://{host}:{port} (docs at /docs)")
    run(app, host=host, port=port, log_level=settings.log_level.lower(), workers=workers)


@token_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who holds it, e.g. optimizer or backfill-2025.")],
    role: Annotated[str, typer.Option(help="producer or operator.")] = "producer",
    max_queued: Annotated[Optional[int], typer.Option(min=1, help="Jobs of this token queued or running at once.")] = None,
    max_draws: Annotated[Optional[int], typer.Option(min=1, help="Largest job: chains × (warmup + samples).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"name", "role", "token"} as JSON.')] = False,
) -> None:
    """Create a token and print it, once: calq keeps only its hash."""
    from producer.api.tokens import Role
    from producer.console import err, out, print_json, say

    if role not in {r.value for r in Role}:
        raise typer.BadParameter(f"{role!r} is not a role; one of {', '.join(r.value for r in Role)}", param_hint="--role")
    try:
        secret, record = _tokens().create(name, role=role, max_queued=max_queued, max_draws=max_draws)
    except ValueError as exc:  # a bad or taken name
        raise typer.BadParameter(str(exc).splitlines()[0], param_hint="NAME") from None
    if as_json:
        print_json({"name": record.name, "role": record.role.value, "token": secret})
        return
    out.print(secret, highlight=False, markup=False)
    say(err, f"token {record.name} ({record.role.value}) created: it is shown this once; set CALQ_API__TOKEN to it")


@token_app.command("list")
def list_tokens(as_json: Annotated[bool, typer.Option("--json", help="Print the records (never a token) as JSON.")] = False) -> None:
    """List tokens: name, role, quotas, created and revoked (the tokens themselves are not kept)."""
    from rich.table import Table

    from producer.console import out, print_json
    from producer.sanitize import for_markup

    records = _tokens().list()
    if as_json:
        print_json([r.model_dump(mode="json", exclude={"sha256"}) for r in records])
        return
    table = Table(title="API tokens", title_justify="left")
    for column in ("name", "role", "max queued", "max draws", "created", "revoked"):
        table.add_column(column)
    for r in records:
        table.add_row(for_markup(r.name), r.role.value, str(r.max_queued or "-"), str(r.max_draws or "-"),
                      r.created_at.strftime("%Y-%m-%d %H:%M"), r.revoked_at.strftime("%Y-%m-%d %H:%M") if r.revoked_at else "-")
    out.print(table)


@token_app.command("revoke")
def revoke(name: Annotated[str, typer.Argument(help="The token's name (calq token list).")]) -> None:
    """Revoke a token: every API process refuses it from the next request on."""
    from producer.console import out, say

    record = _tokens().revoke(name)
    say(out, f"token {record.name} revoked")


def acl(
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Write the ACL file here (default: print it).")] = None,
) -> None:
    """Write Redis ACL rules for the users api, worker and operator (passwords from CALQ_REDIS_ACL__*, as sha256).

    Load the file with redis-server --aclfile; the default user is switched off. Only the operator may run
    FLUSHALL, CONFIG, DEBUG and the other server commands.
    """
    from producer.console import err, say
    from shared.contract.settings import get_settings
    from shared.jobs.acl import acl_rules

    group = get_settings().redis_acl
    passwords = {name: secret.get_secret_value() for name, secret in
                 (("api", group.api_password), ("worker", group.worker_password), ("operator", group.operator_password))
                 if secret is not None}
    missing = sorted({"api", "worker", "operator"} - set(passwords))
    if missing:
        raise typer.BadParameter("set " + ", ".join(f"CALQ_REDIS_ACL__{m.upper()}_PASSWORD" for m in missing))
    text = "\n".join(acl_rules(passwords)) + "\n"
    if out_path is None:
        print(text, end="")
        return
    out_path.write_text(text)
    out_path.chmod(0o644)  # redis-server runs as another user; the file holds sha256 hashes, no password
    say(err, f"wrote {out_path}: users api, worker, operator (redis-server --aclfile {out_path})")


def _tokens():
    from producer.api.tokens import token_store
    from shared.contract.settings import get_settings

    settings = get_settings()
    if settings.api.tokens == "redis" and settings.embedded:
        raise typer.BadParameter("tokens live in the fleet's Redis: set CALQ_BROKER_URL (or CALQ_API__TOKENS=file)")
    return token_store(settings)


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``acl`` and ``token`` to the ``calq`` app."""
    app.command()(serve)
    app.command()(acl)
    app.add_typer(token_app, name="token")


__all__ = ["acl", "register", "serve", "token_app"]
