"""Proof that a worker wrote a summary and its posterior: one HMAC-SHA256 under a key only workers hold.

Who can write the store: anyone holding its key, and every producer holds
it (to upload datasets). So a summary is not trusted because it is there.
With ``Settings.signing_key`` set (``CALQ_SIGNING_KEY``: the workers' and
the operator's, never a producer's), a worker seals each summary it writes
(:func:`seal`) with its ``provenance``::

    provenance.posterior_sha256   sha256 of the posterior file, as uploaded
    provenance.signature          HMAC-SHA256(key, canonical(summary document without provenance.signature))

One MAC covers both objects: a summary that verifies vouches for its own
fields and for the posterior whose bytes hash to the digest it records.
``canonical`` is the JSON document as stored, parsed, then written with
sorted keys and no whitespace, so a reader checks the bytes the writer
stored whatever fields its own model version knows. Signatures are
compared in constant time (:func:`hmac.compare_digest`).

:func:`verify` is applied where summaries are read back, in one place
(:meth:`shared.storage.catalog.Catalog.read`), and the posterior's digest
where its bytes are read (:meth:`shared.storage.store.Store.get_inference_data`
with ``sha256``). What fails is :class:`~shared.contract.errors.Unverified`:
skipped as if absent, named by its key, never quoted.

Without a key (embedded mode, a laptop) nothing is signed and every
summary verifies, as before.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from pydantic import SecretStr

from shared.contract.errors import Unverified
from shared.contract.summary import CalibrationSummary, Provenance

PROVENANCE = "provenance"
SIGNATURE = "signature"


def key_bytes(key: SecretStr | str | bytes | None) -> bytes | None:
    """The signing key as bytes (UTF-8 of a string or secret); None when there is none (or it is empty)."""
    if isinstance(key, SecretStr):
        key = key.get_secret_value()
    if isinstance(key, str):
        key = key.encode("utf-8")
    return key or None


def seal(summary: CalibrationSummary, *, posterior_sha256: str, key: bytes | None) -> CalibrationSummary:
    """``summary`` with its provenance: the posterior's sha256 and the HMAC of both; unchanged without a key."""
    if key is None:
        return summary
    unsigned = summary.model_copy(update={PROVENANCE: Provenance(posterior_sha256=posterior_sha256)})
    document = json.loads(unsigned.model_dump_json())  # exactly what a reader parses back
    signature = _mac(document, key)
    return unsigned.model_copy(update={PROVENANCE: Provenance(posterior_sha256=posterior_sha256, signature=signature)})


def verify(document: Any, key: bytes) -> str:
    """The posterior sha256 a summary document (parsed JSON) vouches for; :class:`Unverified` if it does not.

    The document must carry ``provenance`` with a ``posterior_sha256`` and a
    ``signature`` equal (in constant time) to the HMAC under ``key`` of the
    document without that signature.
    """
    provenance = document.get(PROVENANCE) if isinstance(document, dict) else None
    if not isinstance(provenance, dict):
        raise Unverified("it is not signed by a worker of this fleet")
    signature, digest = provenance.get(SIGNATURE), provenance.get("posterior_sha256")
    if not isinstance(signature, str) or not isinstance(digest, str):
        raise Unverified("it is not signed by a worker of this fleet")
    expected = _mac(document, key).encode("ascii")
    if not hmac.compare_digest(expected, signature.encode("utf-8", "surrogatepass")):
        raise Unverified("its signature does not verify under this fleet's signing key")
    return digest


def _mac(document: dict[str, Any], key: bytes) -> str:
    """Hex HMAC-SHA256 of the canonical form of ``document`` without ``provenance.signature``."""
    provenance = {k: v for k, v in document[PROVENANCE].items() if k != SIGNATURE}
    body = json.dumps({**document, PROVENANCE: provenance}, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, body.encode("ascii"), hashlib.sha256).hexdigest()


__all__ = ["key_bytes", "seal", "verify"]
