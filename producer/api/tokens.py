"""API tokens: who may call the calibration API, with which role and quota.

A token is ``calq_`` followed by 43 URL-safe characters from
:func:`secrets.token_urlsafe` (256 random bits). It is shown once, when it is
created; calq keeps only its sha256 (a hash of 256 random bits needs no salt
or slow hash: there is nothing to guess from it), its name, role and quota.
Authentication hashes the presented token, finds the name that hash belongs
to, and compares the stored hash with :func:`hmac.compare_digest`.

Two backends, one setting (``api.tokens``):

- :class:`RedisTokens`: hash ``{prefix}:api:tokens`` (name → record JSON)
  and hash ``{prefix}:api:token-hashes`` (sha256 → the same record JSON, so
  a request costs one HGET). Revoking deletes the hash entry in the same
  transaction, so a revoked token fails at once on every API process.
- :class:`FileTokens`: one JSON file (mode 0600), rewritten atomically.

A record read back may have been written by anyone who can write Redis or the
file: one that does not parse is treated as no token (a 401), never echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
from abc import ABC, abstractmethod
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.contract.errors import NotFound
from shared.contract.job import utcnow
from shared.contract.settings import Settings

log = logging.getLogger(__name__)

TOKEN_PREFIX = "calq_"
#: What a token's name may be: it is shown in listings and recorded with each job.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class Role(str, Enum):
    """A producer uploads, submits, reads, calibrates and cancels its own jobs; an operator may do anything."""

    PRODUCER = "producer"
    OPERATOR = "operator"


class Token(BaseModel):
    """What calq keeps of a token: never the token itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    role: Role
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    max_queued: int | None = Field(None, ge=1, description="jobs of this token queued or running at once")
    max_draws: int | None = Field(None, ge=1, description="largest job: chains × (warmup + samples)")
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def new_secret() -> str:
    """A fresh token: ``calq_`` and 256 random bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """The sha256 (hex) calq keeps of a token."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _parse(raw: bytes | str | None) -> Token | None:
    if raw is None:
        return None
    try:
        return Token.model_validate_json(raw)
    except (ValidationError, ValueError):
        return None


class TokenStore(ABC):
    """Create, list, revoke and check tokens (see the module docstring)."""

    def create(
        self, name: str, *, role: Role | str, max_queued: int | None = None, max_draws: int | None = None
    ) -> tuple[str, Token]:
        """A new token named ``name``: ``(secret, record)``. The secret is returned once and never stored.

        ValueError if a token of that name exists (revoked or not: revoke, then create another name).
        """
        if not re.fullmatch(NAME_PATTERN, name):
            raise ValueError("a token name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        secret = new_secret()
        record = Token(name=name, role=Role(role), sha256=digest(secret), max_queued=max_queued,
                       max_draws=max_draws, created_at=utcnow())
        if not self._insert(record):
            raise ValueError(f"a token named {name!r} exists already (calq token list)")
        return secret, record

    def authenticate(self, secret: str) -> Token | None:
        """The active token whose secret this is, or None."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
            return None
        presented = digest(secret)
        record = self._by_hash(presented)
        if record is None or not record.active or not hmac.compare_digest(record.sha256, presented):
            return None
        return record

    def revoke(self, name: str) -> Token:
        """Revoke ``name`` now (NotFound if there is no such token); revoking twice changes nothing."""
        record = self.get(name)
        if not record.active:
            return record
        revoked = record.model_copy(update={"revoked_at": utcnow()})
        self._revoke(revoked)
        return revoked

    def get(self, name: str) -> Token:
        for record in self.list():
            if record.name == name:
                return record
        raise NotFound(f"no token named {name!r}")

    @abstractmethod
    def list(self) -> list[Token]:
        """Every token that can be read, active and revoked, by name."""

    @abstractmethod
    def _insert(self, record: Token) -> bool: ...

    @abstractmethod
    def _by_hash(self, sha256: str) -> Token | None: ...

    @abstractmethod
    def _revoke(self, record: Token) -> None: ...


class RedisTokens(TokenStore):
    """Tokens in Redis (``api.tokens=redis``)."""

    def __init__(self, redis_client: Any, *, prefix: str = "calq") -> None:
        self.redis = redis_client
        self.records_key = f"{prefix}:api:tokens"
        self.hashes_key = f"{prefix}:api:token-hashes"

    def list(self) -> list[Token]:
        found = [_parse(raw) for raw in self.redis.hvals(self.records_key)]
        return sorted((t for t in found if t is not None), key=lambda t: t.name)

    def _insert(self, record: Token) -> bool:
        if not self.redis.hsetnx(self.records_key, record.name, record.model_dump_json()):
            return False
        self.redis.hset(self.hashes_key, record.sha256, record.model_dump_json())
        return True

    def _by_hash(self, sha256: str) -> Token | None:
        return _parse(self.redis.hget(self.hashes_key, sha256))

    def _revoke(self, record: Token) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.hashes_key, record.sha256)
        pipe.hset(self.records_key, record.name, record.model_dump_json())
        pipe.execute()


class FileTokens(TokenStore):
    """Tokens in one JSON file (``api.tokens=file``), for an API without Redis-held secrets."""

    _lock = threading.Lock()

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            log.warning("token file %s cannot be read: every token in it is refused", self.path)
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tokens-")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle, indent=2, sort_keys=True)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def list(self) -> list[Token]:
        found = [_parse(json.dumps(v)) for v in self._read().values()]
        return sorted((t for t in found if t is not None), key=lambda t: t.name)

    def _insert(self, record: Token) -> bool:
        with self._lock:
            data = self._read()
            if record.name in data:
                return False
            data[record.name] = record.model_dump(mode="json")
            self._write(data)
            return True

    def _by_hash(self, sha256: str) -> Token | None:
        for record in self.list():
            if hmac.compare_digest(record.sha256, sha256):
                return record
        return None

    def _revoke(self, record: Token) -> None:
        with self._lock:
            data = self._read()
            data[record.name] = record.model_dump(mode="json")
            self._write(data)


def token_store(settings: Settings, *, redis_client: Any | None = None) -> TokenStore:
    """The token store ``settings.api.tokens`` names (Redis: ``redis_client``, or one on the broker URL)."""
    if settings.api.tokens == "file":
        return FileTokens(settings.api.tokens_file)
    if redis_client is None:
        from shared.contract.settings import redis_client as new_client

        redis_client = new_client(settings.backend(), settings.recovery)
    return RedisTokens(redis_client)


__all__ = ["FileTokens", "RedisTokens", "Role", "Token", "TokenStore", "digest", "new_secret", "token_store"]
