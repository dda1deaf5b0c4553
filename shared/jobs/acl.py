"""Least privilege in Redis: ACL users ``api``, ``worker`` and ``operator``, generated from one table.

``calq acl`` writes these rules as a Redis ACL file (``aclfile``); each
password comes from the settings (``CALQ_REDIS_ACL__*_PASSWORD``) and is
written as its sha256 (``#<hex>``), so the file holds no secret. The
``default`` user is switched off: every client names its user in its URL
(``redis://api:PASSWORD@redis:6379/0``).

What each role may touch (``{p}`` is the registry prefix, ``calq``):

- **worker**: job records, index, latest pointers, the jobs channel,
  deliveries, invalid messages, leases and their helpers, its heartbeat and
  metrics records (``{p}:fleet*``), the Celery queues, kombu's bindings and
  unacked sets, Celery's results. Never the API's tokens or owners
  (``{p}:api:*``) nor the held batch jobs (``{p}:lanes:*``).
- **api**: job records, index, latest pointers, the jobs channel,
  deliveries (a resubmission resets them), invalid messages and fleet
  records (read), its tokens, owners and quotas (``{p}:api:*``), the held
  batch jobs (``{p}:lanes:*``), and the Celery queues and bindings it sends
  to. Leases only read (``reindex`` repairs records a lease does not hold);
  never kombu's unacked sets or Celery's results.
- **operator**: every key and command.

Every role but the operator is denied FLUSHALL, FLUSHDB, CONFIG, DEBUG and
the other commands that change the server rather than data (:data:`DENIED`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from shared.jobs.celery_app import QUEUES

#: Commands only the operator may run: they change or stop the server, or read every key at once.
DENIED = (
    "flushall", "flushdb", "config", "debug", "shutdown", "monitor", "acl", "module", "save", "bgsave",
    "bgrewriteaof", "replicaof", "slaveof", "failover", "swapdb", "migrate", "restore", "keys",
)


@dataclass(frozen=True)
class Role:
    name: str
    keys: tuple[str, ...]  # ACL key selectors: ~pattern (read and write) or %R~pattern (read only)
    everything: bool = False


def roles(prefix: str = "calq") -> tuple[Role, ...]:
    """The three users and their keys (see the module docstring)."""
    p = prefix
    records = (f"~{p}:job:*", f"~{p}:index", f"~{p}:latest", f"~{p}:jobs", f"~{p}:deliveries:*", f"~{p}:invalid")
    # a queue's key, its batch twin and kombu's priority keys (queue + separator + step), which BRPOP names too
    queues = (*(f"~{q}*" for q in QUEUES), "~_kombu.*")  # kombu: _kombu.binding.*, _kombu.binding_permanent.*
    worker = (*records, f"~{p}:lease*", f"~{p}:leased*", f"~{p}:resend*", f"~{p}:holding*", f"~{p}:lock*",
              f"~{p}:fleet*", *queues, "~unacked", "~unacked_index", "~unacked_mutex", "~celery-task-meta-*",
              "~*.celery.pidbox*")  # its own control queue, and replies to the operator's celery inspect / control
    api = (*records, f"~{p}:api:*", f"~{p}:lanes:*", f"%R~{p}:fleet*", f"%R~{p}:lease*", f"%R~{p}:leased*", *queues)
    return (Role("worker", worker), Role("api", api), Role("operator", ("~*",), everything=True))


def acl_rules(passwords: dict[str, str], *, prefix: str = "calq") -> list[str]:
    """The ACL file's lines: ``user default off`` and one ``user`` line per role with a password.

    ``passwords`` maps a role name to its password (roles without one are
    left out). Passwords are written as sha256 hashes (``#<hex>``).
    """
    lines = ["user default off"]
    for role in roles(prefix):
        password = passwords.get(role.name)
        if not password:
            continue
        commands = "+@all" if role.everything else "+@all " + " ".join(f"-{c}" for c in DENIED)
        lines.append(f"user {role.name} on #{hashlib.sha256(password.encode()).hexdigest()} resetchannels &* "
                     f"{' '.join(role.keys)} {commands}")
    return lines


def setuser_args(line: str) -> list[str]:
    """``ACL SETUSER`` arguments for one ``user`` line of :func:`acl_rules` (to apply rules to a running server)."""
    words = line.split()
    if words[0] != "user":
        raise ValueError("not an ACL user line")
    return [words[1], "reset", *words[2:]]


__all__ = ["DENIED", "acl_rules", "roles", "setuser_args"]
