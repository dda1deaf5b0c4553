"""Object storage: one small interface over a local folder (``file://``) or S3.

The URL scheme of ``Settings.storage_url`` picks the backend; both are fsspec
filesystems, and callers only see keys (paths relative to the store's root,
such as ``posteriors/intermediate/<job_id>.nc``) and full URIs.

Contracts:

- **Atomic writes.** Every write goes to ``<key>.tmp-<uuid>``, is checked for
  size, then moved to ``<key>`` (``os.replace`` locally, copy + delete on S3).
  A reader never sees half a file, and :meth:`Store.list` hides temporaries.
- **NetCDF goes through a local file** (NetCDF4 cannot be written to an S3
  handle, pydata/xarray#4122), and is read back fully into memory with every
  file closed (a lazily opened file breaks a later overwrite,
  arviz-devs/arviz#1734). :mod:`shared.storage.netcdf` (xarray, about a
  second to import) is imported by those two methods only, so a process that
  reads no dataset (``calq fleet``, ``status``) never pays for it. Attributes that NetCDF cannot hold (dicts, lists of
  mixed types, bools, ``None``) are stored JSON-encoded as strings.
- **Claim check.** Datasets are content-addressed: ``datasets/<sha256>.nc``.
  A job carries the URI and the hash; :meth:`Store.fetch_dataset` returns a
  local file whose bytes have exactly that hash, or raises.
- **Confinement.** A job reads its dataset only at its content address in
  this store (plus, for embedded use, files under the read-only
  ``dataset_roots``). Any other URI (another path, bucket or host, ``..``,
  ``/proc``) is refused with one constant message,
  :class:`~shared.contract.errors.DatasetNotAllowed`, before anything there
  is touched: the answer is the same whether or not the target exists.
- **Errors** are mapped in one place (:func:`storage_errors`): a missing
  object becomes :class:`~shared.contract.errors.NotFound` (or ``DatasetNotFound``),
  an unreachable or overloaded endpoint becomes the retryable
  :class:`~shared.contract.errors.StorageUnavailable`, a refused key or
  signature becomes :class:`~shared.contract.errors.AuthenticationFailed`
  ("authentication failed", permanent), and other permission errors
  propagate unchanged, since retrying cannot fix them. Messages name the
  URI, never a credential.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import re
import stat
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import SecretStr

from shared.contract.errors import (
    AuthenticationFailed,
    CalqError,
    DatasetHashMismatch,
    DatasetNotAllowed,
    DatasetNotFound,
    InvalidDataset,
    NotFound,
    StorageUnavailable,
    Unverified,
    causes,
    is_authentication_failure,
)
from shared.contract.settings import S3Settings, Settings, redact_url, storage_url_from
from shared.storage.provenance import key_bytes

if TYPE_CHECKING:
    import arviz as az
    import xarray as xr

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/calq/datasets")
DATASETS_PREFIX = "datasets"
_TMP_MARK = ".tmp-"
_TMP_NAME = re.compile(r"\.tmp-[0-9a-f]{32}$")
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")

# Errors of the network stack that say "try again later".
_NETWORK_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPIPE,
        getattr(errno, "EREMOTEIO", 121),  # s3fs: HTTP 500 / InternalError
    }
)
_RETRYABLE_S3_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException"}
)


def posterior_key(archetype: str, job_id: str, token: int | None = None) -> str:
    """Key of a job's posterior NetCDF file.

    A fleet worker's upload carries its lease's fencing ``token``
    (``{job_id}.t{token}.nc``): a worker that lost its lease can never
    replace the posterior another worker's summary names. Embedded mode has
    no token, and the key is ``{job_id}.nc``.
    """
    return f"posteriors/{archetype}/{job_id}.nc" if token is None else f"posteriors/{archetype}/{job_id}.t{int(token)}.nc"


def is_posterior_key(key: str, archetype: str, job_id: str) -> bool:
    """Whether ``key`` is one of the keys :func:`posterior_key` gives ``job_id`` of ``archetype`` (any token)."""
    return re.fullmatch(rf"posteriors/{re.escape(archetype)}/{re.escape(job_id)}(\.t\d{{1,19}})?\.nc", key) is not None


def summary_key(archetype: str, job_id: str) -> str:
    """Key of a job's diagnostic summary (JSON)."""
    return f"posteriors/{archetype}/{job_id}.json"


def dataset_key(sha256: str) -> str:
    """Key of a content-addressed dataset."""
    return f"{DATASETS_PREFIX}/{sha256}.nc"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes: the content address of a dataset."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# -- error mapping -------------------------------------------------------------


def _precondition_failed(exc: BaseException) -> bool:
    """True if S3 refused a conditional put because the object exists (412 PreconditionFailed)."""
    for err in causes(exc):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code", "")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                return True
    return False


def _is_transient(exc: BaseException) -> bool:
    """True if ``exc`` (or what caused it) is a network fault or a 5xx/throttle answer."""
    try:
        import botocore.exceptions as bce
    except ImportError:  # pragma: no cover - s3fs brings botocore
        bce = None
    try:
        import aiohttp
    except ImportError:  # pragma: no cover
        aiohttp = None
    from fsspec.exceptions import FSTimeoutError

    for err in causes(exc):
        if isinstance(err, (PermissionError, FileNotFoundError)):
            return False
        if isinstance(err, (ConnectionError, TimeoutError, FSTimeoutError)):
            return True
        if bce is not None:
            if isinstance(err, (bce.ConnectionError, bce.HTTPClientError)):
                return True
            if isinstance(err, bce.ClientError):
                response = getattr(err, "response", None) or {}
                status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
                code = response.get("Error", {}).get("Code", "")
                return status >= 500 or status == 429 or code in _RETRYABLE_S3_CODES
        if aiohttp is not None and isinstance(err, (aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError)):
            return True
        if isinstance(err, OSError) and err.errno in _NETWORK_ERRNOS:
            return True
    return False


@contextlib.contextmanager
def storage_errors(uri: str, *, missing: type[CalqError] | None = NotFound) -> Iterator[None]:
    """Map storage exceptions raised inside the block to calq's error tree.

    ``FileNotFoundError`` becomes ``missing`` (left alone when ``missing`` is
    None); connection errors, timeouts and 5xx/throttling answers become
    :class:`StorageUnavailable`; permission errors and everything else pass
    through unchanged. ``uri`` goes into the message; credentials never do.
    """
    try:
        yield
    except CalqError:
        raise
    except FileNotFoundError as exc:
        if missing is None:
            raise
        raise missing(f"nothing at {redact_url(uri)}") from exc
    except Exception as exc:
        if is_authentication_failure(exc):
            raise AuthenticationFailed(
                f"authentication failed at {redact_url(uri)}: the store refused calq's access key or secret "
                "(check CALQ_S3__ACCESS_KEY_ID and CALQ_S3__SECRET_ACCESS_KEY)"
            ) from exc
        if isinstance(exc, PermissionError):
            raise
        if no_space(exc):  # the store's disk is full: space comes back (a wait, as an outage is)
            raise StorageUnavailable(f"no space left in the store at {redact_url(uri)}: its disk is full") from exc
        if _is_transient(exc):
            raise StorageUnavailable(
                f"storage unavailable at {redact_url(uri)}: {type(exc).__name__}: {exc}"
            ) from exc
        raise


def no_space(exc: BaseException) -> bool:
    """True if ``exc`` (or what caused it) says a disk is full (ENOSPC) or a quota is spent (EDQUOT)."""
    full = {errno.ENOSPC, getattr(errno, "EDQUOT", 122)}
    return any(isinstance(err, OSError) and err.errno in full for err in causes(exc))


# -- the store -----------------------------------------------------------------


class Store:
    """Files under one root URL (``file:///abs/dir`` or ``s3://bucket/prefix``).

    Keys are ``/``-separated paths relative to the root; the general read
    methods also take a full URI (the producer's side: ``calq apply`` reads a
    posterior by path), but a job's dataset is read only through
    :meth:`fetch_dataset`, which is confined to the store's content
    addresses and the read-only ``dataset_roots``. ``s3`` holds endpoint and
    credentials for ``s3://`` URLs; ``cache_dir`` is where S3 datasets are
    downloaded to.

    S3 calls time out after ``connect_timeout_s`` (connecting) or
    ``read_timeout_s`` (silence while reading) and are tried at most
    ``max_attempts`` times with jittered backoff (under 1 s, then under 2 s)
    before :class:`StorageUnavailable`; a refused connection fails within
    about 3 s. Longer outages are the fleet's job: it retries the task.

    ``signing_key`` is the fleet's HMAC key (:mod:`shared.storage.provenance`):
    with it, workers sign what they write and readers of this store
    (:class:`~shared.storage.catalog.Catalog`) verify what they read; None
    is embedded mode, where every summary is trusted.
    """

    def __init__(
        self,
        url: str,
        *,
        s3: S3Settings | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        max_attempts: int = 3,
        dataset_roots: Sequence[str] = (),
        signing_key: SecretStr | str | bytes | None = None,
    ) -> None:
        self.url = storage_url_from(url)
        self.signing_key = key_bytes(signing_key)
        self.dataset_roots = tuple(os.path.realpath(_file_path(storage_url_from(r))) for r in dataset_roots)
        parts = urlsplit(self.url)
        self.scheme = parts.scheme
        if self.scheme == "file":
            self._root = _file_path(self.url)
        elif self.scheme == "s3":
            if not parts.netloc:
                raise ValueError(f"s3 storage URL needs a bucket: {self.url!r}")
            self._root = (parts.netloc + parts.path).rstrip("/")
        else:
            raise ValueError(f"unsupported storage scheme {self.scheme!r} in {redact_url(self.url)!r}")
        self._s3_settings = s3 or S3Settings()
        self.cache_dir = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
        self._timeouts = (connect_timeout_s, read_timeout_s, max_attempts)
        self._local = LocalFileSystem(auto_mkdir=True)
        self._s3fs: Any = None
        self._s3fs_pid: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> Store:
        """The store ``settings.storage_url`` names, with ``settings.s3``."""
        return cls(settings.storage_url, s3=settings.s3, dataset_roots=settings.dataset_roots,
                   signing_key=settings.signing_key, **options)

    def __repr__(self) -> str:
        return f"Store({redact_url(self.url)!r})"

    # -- filesystems and paths --

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem of the root."""
        return self._s3() if self.scheme == "s3" else self._local

    def _s3(self) -> Any:
        # s3fs instances hold an event loop and sessions that do not survive
        # fork (Celery prefork): build one lazily, per process.
        if self._s3fs is None or self._s3fs_pid != os.getpid():
            import s3fs

            connect, read, attempts = self._timeouts
            cfg = self._s3_settings
            secret = cfg.secret_access_key.get_secret_value() if cfg.secret_access_key else None
            client_kwargs = {"region_name": cfg.region} if cfg.region else {}
            self._s3fs = s3fs.S3FileSystem(
                endpoint_url=cfg.endpoint_url,
                key=cfg.access_key_id,
                secret=secret,
                client_kwargs=client_kwargs,
                config_kwargs={
                    "connect_timeout": connect,
                    "read_timeout": read,
                    # botocore's own "max_attempts" counts retries only; this is the total.
                    "retries": {"total_max_attempts": attempts, "mode": "standard"},
                },
                skip_instance_cache=True,
                use_listings_cache=False,
            )
            # s3fs wraps botocore in a second retry loop (for read timeouts and
            # broken bodies); keep it short so the two loops do not multiply.
            self._s3fs.retries = 2
            self._s3fs_pid = os.getpid()
        return self._s3fs

    def _resolve(self, uri_or_key: str) -> tuple[fsspec.AbstractFileSystem, str, str]:
        """(filesystem, fsspec path, URI) of a key of this store or a full URI."""
        if "://" not in uri_or_key:
            path = f"{self._root}/{_check_key(uri_or_key)}"
            return self.fs, path, self._uri_of_path(self.scheme, path)
        scheme = urlsplit(uri_or_key).scheme
        if scheme == "file":
            path = _file_path(uri_or_key)
            return self._local, path, "file://" + path
        if scheme == "s3":
            path = uri_or_key[len("s3://") :].rstrip("/")
            return self._s3(), path, "s3://" + path
        raise ValueError(f"unsupported URI scheme {scheme!r}: {redact_url(uri_or_key)!r}")

    @staticmethod
    def _uri_of_path(scheme: str, path: str) -> str:
        return f"{scheme}://{path}"

    def uri(self, key: str) -> str:
        """Full URI of ``key``: ``file:///abs/root/key`` or ``s3://bucket/prefix/key``."""
        return self._uri_of_path(self.scheme, f"{self._root}/{_check_key(key)}")

    def holds(self, uri: str) -> bool:
        """Whether ``uri`` names an object under this store's root (by its text; nothing is touched)."""
        root = self._uri_of_path(self.scheme, self._root.rstrip("/")) + "/"
        if not uri.startswith(root):
            return False
        try:
            _check_key(uri[len(root):])
        except ValueError:
            return False
        return True

    def key_of(self, uri: str) -> str:
        """The key of ``uri`` relative to this store's root; ValueError if outside it."""
        _, path, _ = self._resolve(uri)
        root = self._root.rstrip("/") + "/"
        if not uri.startswith(f"{self.scheme}://") or not path.startswith(root):
            raise ValueError(f"{redact_url(uri)} is not under {redact_url(self.url)}")
        return path[len(root) :]

    # -- bytes, JSON, files --

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` at ``key`` atomically; returns its URI."""
        fs, path, uri = self._resolve(key)
        with storage_errors(uri, missing=None), self._staging(fs, path) as tmp:
            fs.pipe_file(tmp, bytes(data))
            _check_size(fs, tmp, len(data), uri)
        return uri

    def create_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` at ``key`` only if nothing is there (atomically); its URI, or FileExistsError.

        The conditional put a publication needs: of two writers, exactly one
        wins. A local store links a finished temporary file into place (a
        link never replaces); S3 puts with ``If-None-Match: *``.
        """
        fs, path, uri = self._resolve(key)
        with storage_errors(uri, missing=None):
            if isinstance(fs, LocalFileSystem):
                with self._staging_only(path) as tmp:
                    Path(tmp).write_bytes(bytes(data))
                    os.link(tmp, path)
            else:
                try:
                    fs.pipe_file(path, bytes(data), mode="create")
                except OSError as exc:
                    if isinstance(exc, FileExistsError) or _precondition_failed(exc):
                        raise FileExistsError(errno.EEXIST, "already written", redact_url(uri)) from exc
                    raise
            _check_size(fs, path, len(data), uri)
        return uri

    @contextlib.contextmanager
    def _staging_only(self, path: str) -> Iterator[str]:
        """A temporary local path next to ``path``, removed afterwards whatever happened."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}{_TMP_MARK}{uuid.uuid4().hex}"
        try:
            yield tmp
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> str:
        """Upload a local file to ``key`` atomically (temporary key, size check, move)."""
        fs, path, uri = self._resolve(key)
        size = os.path.getsize(local_path)
        with storage_errors(uri, missing=None), self._staging(fs, path) as tmp:
            fs.put_file(os.fspath(local_path), tmp)
            _check_size(fs, tmp, size, uri)
        return uri

    @contextlib.contextmanager
    def _staging(self, fs: fsspec.AbstractFileSystem, path: str) -> Iterator[str]:
        """Yield a temporary path next to ``path``; move it into place on success."""
        tmp = f"{path}{_TMP_MARK}{uuid.uuid4().hex}"
        try:
            yield tmp
            if isinstance(fs, LocalFileSystem):
                os.replace(tmp, path)
            else:  # S3 has no rename: server-side copy, then delete
                fs.cp_file(tmp, path)
                fs.rm_file(tmp)
        except BaseException as exc:
            # When the endpoint is unreachable, cleaning up would only wait
            # out the retries again; a stray temporary is invisible to list().
            if not (isinstance(exc, Exception) and _is_transient(exc)):
                with contextlib.suppress(Exception):
                    fs.rm_file(tmp)
            raise

    def get_bytes(self, uri_or_key: str) -> bytes:
        """The bytes at a URI or key; NotFound if nothing is there."""
        fs, path, uri = self._resolve(uri_or_key)
        with storage_errors(uri):
            if isinstance(fs, LocalFileSystem) and os.path.isdir(path):
                raise NotFound(f"nothing at {uri} (a folder)")
            return fs.cat_file(path)

    def put_json(self, key: str, obj: Any) -> str:
        """Write ``obj`` as UTF-8 JSON at ``key`` atomically; returns its URI."""
        return self.put_bytes(key, json.dumps(obj, indent=2).encode("utf-8"))

    def get_json(self, uri_or_key: str) -> Any:
        """The JSON document at a URI or key."""
        return json.loads(self.get_bytes(uri_or_key))

    def exists(self, uri_or_key: str) -> bool:
        """Whether an object exists at a URI or key (StorageUnavailable if unknowable)."""
        fs, path, uri = self._resolve(uri_or_key)
        with storage_errors(uri, missing=None):
            return _size(fs, path) is not None

    def list(self, prefix: str = "") -> list[str]:
        """URIs of every object under the folder ``prefix``, sorted; temporaries hidden."""
        base = f"{self._root}/{_check_key(prefix)}" if prefix.strip("/") else self._root
        with storage_errors(self._uri_of_path(self.scheme, base), missing=None):
            try:
                found = self.fs.find(base)
            except FileNotFoundError:
                found = []
        return sorted(self._uri_of_path(self.scheme, p) for p in found if not _TMP_NAME.search(p))

    def delete(self, uri_or_key: str) -> None:
        """Remove the object at a URI or key; nothing happens if it is absent."""
        fs, path, uri = self._resolve(uri_or_key)
        with storage_errors(uri, missing=None):
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                pass

    # -- NetCDF --

    def put_netcdf(self, obj: az.InferenceData | xr.Dataset, key: str) -> str:
        """Write an InferenceData or Dataset as NetCDF4 at ``key`` atomically.

        The file is written locally first (NetCDF4 cannot stream to S3) and
        uploaded with :meth:`put_file`. Attributes NetCDF cannot hold are
        stored JSON-encoded.
        """
        from shared.storage.netcdf import write_netcdf

        with tempfile.TemporaryDirectory(prefix="calq-netcdf-") as tmp_dir:
            local = Path(tmp_dir) / "data.nc"
            write_netcdf(obj, local)
            return self.put_file(local, key)

    def get_inference_data(
        self, uri_or_key: str, *, groups: Sequence[str] | None = None, sha256: str | None = None
    ) -> az.InferenceData:
        """The InferenceData at a URI or key, fully in memory, with no file left open (only ``groups``, if given).

        With ``sha256`` (a signed summary's ``provenance.posterior_sha256``),
        the bytes are copied to a local file and must hash to it before
        anything is decoded, else :class:`Unverified`.
        """
        from shared.storage.netcdf import read_inference_data

        fs, path, uri = self._resolve(uri_or_key)
        if isinstance(fs, LocalFileSystem) and sha256 is None:
            with storage_errors(uri):
                if not os.path.isfile(path):
                    raise FileNotFoundError(path)
            # Decoded outside the mapping: an error of the NetCDF/HDF5 libraries on a file that is there is
            # that error (OSError, the file unreadable), never "nothing at", as for a copied one below.
            return read_inference_data(path, groups=groups)
        # A posterior is read once into memory: copy to a throwaway file (the copy is what is hashed and read).
        with tempfile.TemporaryDirectory(prefix="calq-netcdf-") as tmp_dir:
            local = Path(tmp_dir) / "data.nc"
            with storage_errors(uri):
                if isinstance(fs, LocalFileSystem) and not os.path.isfile(path):
                    raise FileNotFoundError(path)
                fs.get_file(path, str(local))
            if sha256 is not None and not hmac.compare_digest(sha256_file(local), sha256):
                raise Unverified(f"posterior {redact_url(uri)}: its bytes are not the ones its signed summary records")
            return read_inference_data(local, groups=groups)

    def sha256(self, uri_or_key: str) -> str:
        """Hex sha256 of the object's bytes at a URI or key, streamed (NotFound if nothing is there)."""
        fs, path, uri = self._resolve(uri_or_key)
        with storage_errors(uri):
            if isinstance(fs, LocalFileSystem) and not os.path.isfile(path):
                raise FileNotFoundError(path)
            return _sha256_at(fs, path)

    def get_dataset_file(self, uri_or_key: str) -> Path:
        """A local path holding the file at a URI or key.

        ``file://``: the path itself. ``s3://``: a copy in ``cache_dir``
        named by the URI's hash, downloaded once and reused afterwards, so
        use it for objects that never change under their URI (datasets,
        posteriors keyed by job id); :meth:`fetch_dataset` also checks bytes.
        """
        fs, path, uri = self._resolve(uri_or_key)
        if isinstance(fs, LocalFileSystem):
            if not os.path.isfile(path):
                raise NotFound(f"nothing at {uri}")
            return Path(path)
        name = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:32] + _suffix(path)
        target = self.cache_dir / name
        if target.is_file():
            return target
        self._download(fs, path, uri, target, missing=NotFound)
        return target

    # -- content-addressed datasets (claim check) --

    def upload_dataset(self, local_path: str | os.PathLike[str]) -> tuple[str, str]:
        """Store a dataset file at ``datasets/<sha256>.nc``; returns ``(uri, sha256)``.

        Idempotent by content: when the object already there hashes to the
        address, nothing is uploaded. Whoever holds the store's key can put
        bytes at any address first, so a matching size proves nothing: an
        object whose bytes hash otherwise (planted, truncated) is replaced.
        """
        sha = sha256_file(local_path)
        key = dataset_key(sha)
        fs, path, uri = self._resolve(key)
        with storage_errors(uri, missing=None):
            if _size(fs, path) == os.path.getsize(local_path):
                if _sha256_at(fs, path) == sha:
                    log.debug("dataset %s already stored", uri)
                    return uri, sha
                log.warning("dataset %s held bytes of another hash: replaced by the upload", uri)
        return self.put_file(local_path, key), sha

    def dataset_uri(self, sha256: str) -> str:
        """The URI of a dataset's content address in this store: ``<root>/datasets/<sha256>.nc``."""
        return self.uri(dataset_key(sha256.lower()))

    def fetch_dataset(self, uri: str, sha256: str, *, max_bytes: int | None = None) -> Path:
        """A local file whose bytes are the dataset at ``uri``, with hash ``sha256``.

        ``uri`` must be :meth:`dataset_uri` of ``sha256`` exactly, or a
        ``file://`` path under one of ``dataset_roots`` (symlinks resolved);
        anything else raises :class:`DatasetNotAllowed` before the target is
        touched. Then: DatasetNotFound when nothing (or no regular file) is
        there, :class:`InvalidDataset` (not intrinsic: a limit of this
        worker's) when the object is longer than ``max_bytes`` (checked
        before a download), DatasetHashMismatch
        when its bytes hash differently. Local files are verified in place;
        ``s3://`` ones are downloaded into ``cache_dir/<sha256><suffix>``,
        verified before they are renamed into place, and reused (re-verified).
        """
        expected = sha256.lower()
        if not _SHA256.fullmatch(expected):
            raise DatasetNotAllowed()
        if uri == self.dataset_uri(expected):
            fs, path, full_uri = self._resolve(dataset_key(expected))
        elif (local := self._under_dataset_roots(uri)) is not None:
            fs, path, full_uri = self._local, local, "file://" + local
        else:
            log.warning("refused a dataset outside the store (%d-character URI)", len(uri))
            raise DatasetNotAllowed()
        if isinstance(fs, LocalFileSystem):
            _check_local_file(path, full_uri, max_bytes)
            actual = sha256_file(path)
            if actual != expected:
                raise DatasetHashMismatch(full_uri, expected, actual)
            return Path(path)
        target = self.cache_dir / f"{expected}{_suffix(path)}"
        if target.is_file() and sha256_file(target) == expected:
            return target
        if max_bytes is not None:
            with storage_errors(full_uri, missing=DatasetNotFound):
                size = _size(fs, path)
            if size is None:
                raise DatasetNotFound(f"nothing at {full_uri}")
            if size > max_bytes:
                raise _too_large(full_uri, size, max_bytes)
        self._download(fs, path, full_uri, target, missing=DatasetNotFound, sha256=expected)
        return target

    def _under_dataset_roots(self, uri: str) -> str | None:
        """The real local path of a ``file://`` URI under one of ``dataset_roots``, else None."""
        if not self.dataset_roots or not uri.startswith("file://"):
            return None
        try:
            path = os.path.realpath(_file_path(uri))
        except ValueError:
            return None
        for root in self.dataset_roots:
            if path.startswith(root.rstrip("/") + "/"):
                return path
        return None

    def discard_dataset(self, sha256: str) -> None:
        """Delete the dataset at its content address (and its cached copy): its own bytes failed validation.

        Only the content address of ``sha256`` is touched, never a file
        under ``dataset_roots``: those are the embedding program's.
        """
        expected = sha256.lower()
        if not _SHA256.fullmatch(expected):
            return
        self.delete(dataset_key(expected))
        if self.scheme == "s3":
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.cache_dir / f"{expected}.nc")
        log.info("deleted rejected dataset %s from the store", self.dataset_uri(expected))

    def _download(
        self,
        fs: fsspec.AbstractFileSystem,
        path: str,
        uri: str,
        target: Path,
        *,
        missing: type[CalqError],
        sha256: str | None = None,
    ) -> None:
        """Download to ``target`` via a temporary name; verify ``sha256`` before the rename."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}{_TMP_MARK}{uuid.uuid4().hex}")
        try:
            with storage_errors(uri, missing=missing):
                fs.get_file(path, str(tmp))
            if sha256 is not None:
                actual = sha256_file(tmp)
                if actual != sha256:
                    raise DatasetHashMismatch(uri, sha256, actual)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


# -- small helpers -------------------------------------------------------------


def _file_path(uri: str) -> str:
    """Absolute local path of a ``file://`` URI (``file:///abs`` or ``file://localhost/abs``)."""
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file URI with a remote host: {uri!r}")
    path = uri[len("file://") :]
    if parts.netloc == "localhost":
        path = path[len("localhost") :]
    if not path.startswith("/"):
        raise ValueError(f"file URI must hold an absolute path: {uri!r}")
    return os.path.normpath(path) if path != "/" else path


def _check_key(key: str) -> str:
    """``key`` without surrounding slashes; ValueError if it could escape the root."""
    clean = key.strip("/")
    parts = clean.split("/")
    if not clean or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}")
    return clean


def _size(fs: fsspec.AbstractFileSystem, path: str) -> int | None:
    """Size of the file at ``path``, or None if there is none (folders count as none).

    fsspec's own ``isfile`` swallows every error, connection errors included;
    this lets those through.
    """
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    return int(info["size"]) if info.get("type") == "file" else None


def _sha256_at(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Hex sha256 of the object at ``path``, streamed (never held in memory whole)."""
    with fs.open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _check_size(fs: fsspec.AbstractFileSystem, path: str, expected: int, uri: str) -> None:
    actual = fs.size(path)
    if actual != expected:
        raise StorageUnavailable(f"incomplete write to {uri}: {actual} of {expected} bytes arrived")


def _check_local_file(path: str, uri: str, max_bytes: int | None) -> None:
    """A regular file (never a folder or a FIFO, which would block the hash) within ``max_bytes``."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise DatasetNotFound(f"nothing at {uri}") from None
    if not stat.S_ISREG(info.st_mode):
        raise DatasetNotFound(f"nothing at {uri} (not a regular file)")
    if max_bytes is not None and info.st_size > max_bytes:
        raise _too_large(uri, info.st_size, max_bytes)


def _too_large(uri: str, size: int, max_bytes: int) -> InvalidDataset:
    return InvalidDataset(
        [f"the file holds {size:,} bytes, above the limit of {max_bytes:,} (limits.max_decoded_bytes)"],
        source=uri,
        intrinsic=False,  # a limit of this worker's settings: another worker may accept the file, so it is kept
    )


def _suffix(path: str) -> str:
    suffix = Path(path).suffix
    return suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ""


__all__ = [
    "DEFAULT_CACHE_DIR",
    "Store",
    "dataset_key",
    "posterior_key",
    "sha256_file",
    "storage_errors",
    "summary_key",
]
