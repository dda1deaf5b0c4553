"""The producer's client over HTTP: :class:`CalibrationClient`'s methods, holding only a token.

:class:`CalibrationClient` returns one of these when ``CALQ_API__URL`` and
``CALQ_API__TOKEN`` are set (the choice is made in its ``__new__``, once).
The public methods keep their meaning and their errors:

============================  ====================================================
HTTP answer                   raised here
============================  ====================================================
401, 403                      AuthenticationFailed (the API's sentence)
404                           NotFound
409 (job did not succeed)     JobDidNotSucceed, with the record
422, 413                      InvalidJob (the API's sentence, the fields named)
429                           OverQuota, with ``retry_after_s`` from Retry-After
5xx, no answer, a timeout     ApiUnavailable (retryable: :meth:`wait` rides it out)
============================  ====================================================

The API's sentences are data from another machine: the CLI prints them
through :mod:`producer.sanitize`, as it does every record.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import xarray as xr

from producer.client import CalibrationClient, JobDidNotSucceed, StatusCallback
from shared.contract.errors import (
    ApiUnavailable,
    AuthenticationFailed,
    CalqError,
    InvalidJob,
    NotFound,
    OverQuota,
)
from shared.contract.job import CalibrationJob, JobState, JobStatus
from shared.contract.settings import Settings, get_settings
from shared.contract.summary import CalibrationSummary
from shared.data.dataset import save_dataset
from shared.fit.apply import CalibratedProbability

log = logging.getLogger(__name__)

#: How often :meth:`RemoteClient.wait` reads the job's record.
POLL_S = 0.5
#: Bytes sent at a time when a dataset is uploaded.
UPLOAD_CHUNK = 1 << 20


class NoDirectAccess(CalqError):
    """A remote client holds a token only: the registry and the store are the API's, not the producer's."""


class RemoteClient(CalibrationClient):
    """:class:`CalibrationClient` over the calibration API (see the module docstring)."""

    def __init__(self, settings: Settings | None = None, *, store: Any = None, registry: Any = None) -> None:
        self.settings = settings or get_settings()
        api = self.settings.api
        if not api.remote:
            raise ValueError("a remote client needs CALQ_API__URL and CALQ_API__TOKEN")
        self.url = api.url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api.token.get_secret_value()}"},
            timeout=api.timeout_s,
        )
        self._interrupted = None
        self._control = None

    def __repr__(self) -> str:
        return f"RemoteClient({self.url!r})"

    @property
    def embedded(self) -> bool:
        return False

    #: The API admits one job at a time (batch lanes per owner): no batch messages from here.
    batch_jobs = 1

    @property
    def store(self):  # type: ignore[override]
        raise NoDirectAccess("this client speaks to the calibration API: the store is not reachable from here")

    @property
    def registry(self):  # type: ignore[override]
        raise NoDirectAccess("this client speaks to the calibration API: job records are read with status and jobs")

    @property
    def catalog(self):  # type: ignore[override]
        raise NoDirectAccess("this client speaks to the calibration API: summaries are read with result and latest")

    # -- HTTP ------------------------------------------------------------------------

    def _call(self, method: str, path: str, **options: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **options)
        except httpx.TransportError as exc:
            raise ApiUnavailable(f"the calibration API at {self.url} cannot be reached: {type(exc).__name__}") from exc
        if response.is_success:
            return response
        raise _error(response)

    # -- jobs ------------------------------------------------------------------------

    def upload(self, dataset: str | os.PathLike | xr.Dataset) -> tuple[str, str]:
        """PUT the dataset at its content address (once by content); returns ``(uri, sha256)``."""
        if isinstance(dataset, xr.Dataset):
            with tempfile.TemporaryDirectory(prefix="calq-upload-") as tmp:
                return self.upload(save_dataset(dataset, Path(tmp) / "dataset.nc"))
        path = Path(dataset)
        if not path.is_file():
            raise NotFound(f"no dataset file at {path}")
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(UPLOAD_CHUNK), b""):
                digest.update(chunk)
        sha = digest.hexdigest()

        def chunks():
            with open(path, "rb") as handle:
                yield from iter(lambda: handle.read(UPLOAD_CHUNK), b"")

        body = self._call("PUT", f"/v1/datasets/{sha}", content=chunks(),
                          headers={"Content-Type": "application/x-netcdf", "Content-Length": str(path.stat().st_size)}).json()
        return body["dataset_uri"], body["dataset_sha256"]

    def admit(
        self,
        job: CalibrationJob,
        *,
        queue: str | None = None,
        lane: str = "interactive",
        on_update: StatusCallback | None = None,
        owner: str | None = None,
    ) -> tuple[JobStatus, bool]:
        """POST the job; ``(record, sent)``. The API rebuilds it from its fields and must find the same id."""
        body = {
            "dataset_sha256": job.dataset_sha256, "archetype": job.archetype, "events": list(job.events),
            "sampler": job.sampler.model_dump(), "as_of": job.as_of.isoformat() if job.as_of else None,
            "window_days": job.window_days, "time_limit_s": job.time_limit_s, "lane": lane,
        }
        response = self._call("POST", "/v1/jobs", json=body)
        answer = response.json()
        if answer["job_id"] != job.job_id:
            raise InvalidJob(
                f"the API built job {answer['job_id']} from this job's fields, not {job.job_id}: "
                "its store or sampler defaults differ from this client's"
            )
        status = self.status(job.job_id)
        if on_update is not None:
            on_update(status)
        return status, response.status_code == 202

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> tuple[JobStatus, bool]:
        """Cancel a job (a producer token: only its own); ``(record, changed)``."""
        answer = self._call("POST", f"/v1/jobs/{_quoted(job_id)}/cancel").json()
        return JobStatus.model_validate(answer["job"]), bool(answer["changed"])

    def jobs(
        self, *, state: JobState | str | None = None, archetype: str | None = None, limit: int | None = 20
    ) -> list[JobStatus]:
        params: dict[str, Any] = {"limit": min(limit or 1000, 1000)}
        if state is not None:
            params["state"] = JobState(state).value
        if archetype is not None:
            params["archetype"] = archetype
        return [JobStatus.model_validate(r) for r in self._call("GET", "/v1/jobs", params=params).json()]

    # -- reading -----------------------------------------------------------------------

    def status(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(self._call("GET", f"/v1/jobs/{_quoted(job_id)}").json())

    def _follow(self, job_id: str, timeout: float, on_update: StatusCallback | None) -> JobStatus:
        """Read the record every :data:`POLL_S` until the job ends (:meth:`CalibrationClient.wait` rides out outages)."""
        from shared.jobs.registry.base import follow

        return follow(lambda: self.status(job_id), job_id=job_id, timeout=timeout, on_update=on_update,
                      pause=time.sleep, poll_s=POLL_S)

    def result(self, job_id: str) -> CalibrationSummary:
        return CalibrationSummary.model_validate(self._call("GET", f"/v1/jobs/{_quoted(job_id)}/summary").json())

    def latest(self, archetype: str, event: str | None = None) -> CalibrationSummary:
        """The newest converged summary for an archetype (and event; default: the newest of its events)."""
        from shared.storage.catalog import LatestPointer, newest

        by_event = self._call("GET", f"/v1/latest/{_quoted(archetype)}").json()
        summaries = {e: CalibrationSummary.model_validate(v["summary"]) for e, v in by_event.items()}
        if event is not None:
            if event not in summaries:
                raise NotFound(f"no converged calibration for {archetype} / {event} yet")
            return summaries[event]
        best = newest(LatestPointer.of(s, archetype, e) for e, s in summaries.items())
        return summaries[best.event]

    def report_html(self, job_id: str) -> str:
        """The HTML page of ``calq report --job``, rendered by the API."""
        return self._call("GET", f"/v1/jobs/{_quoted(job_id)}/report").text

    def posterior(self, job_id: str):
        """The job's posterior, downloaded and opened with the store's checks (a local copy)."""
        from shared.storage.store import Store

        data = self._call("GET", f"/v1/jobs/{_quoted(job_id)}/posterior").content
        with tempfile.TemporaryDirectory(prefix="calq-posterior-") as folder:
            path = Path(folder) / "posterior.nc"
            path.write_bytes(data)
            return Store("file://" + folder).get_inference_data("file://" + str(path))  # read fully into memory

    def posterior_at(self, uri: str):
        """The posterior at a fleet URI: fetched by its job id (the file's name), through the API."""
        name = re.fullmatch(r"(.+?)(\.t\d+)?\.nc", uri.rstrip("/").rsplit("/", 1)[-1])  # JOB.nc or JOB.tN.nc
        if name is None:
            raise NotFound(f"{uri} does not name a posterior (JOB_ID.nc); over the API, give the job id")
        return self.posterior(name.group(1))

    def calibrate(self, archetype: str, track: str | None, event: str, p: Sequence[float]):
        """Calibrate forecast probabilities with the latest converged posterior (computed by the API)."""
        answer = self._call("POST", "/v1/calibrate",
                            json={"archetype": archetype, "track": track, "event": event, "p": [float(x) for x in p]}).json()
        return [CalibratedProbability(p=float(pi), mean=m, low=lo, high=hi, track_seen=answer.get("track_seen"))
                for pi, m, lo, hi in zip(p, answer["q_mean"], answer["q_low"], answer["q_high"])]

    def close(self) -> None:
        self._http.close()


def _quoted(segment: str) -> str:
    from urllib.parse import quote

    return quote(segment, safe="")


def _error(response: httpx.Response) -> CalqError:
    """The calq exception an error answer stands for (the table in the module docstring)."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    detail = str(body.get("detail") or response.reason_phrase or "no detail")
    code = response.status_code
    if code in (401, 403):
        return AuthenticationFailed(f"the calibration API refused the token: {detail}")
    if code == 404:
        return NotFound(detail)
    if code == 409 and isinstance(body.get("job"), dict):
        return JobDidNotSucceed(JobStatus.model_validate(body["job"]))
    if code == 429:
        after = response.headers.get("Retry-After")
        return OverQuota(detail, retry_after_s=float(after) if after and after.isdigit() else None)
    if code in (413, 422) or 400 <= code < 500:
        return InvalidJob(detail)
    return ApiUnavailable(f"the calibration API at {response.url.host} answered {code}: {detail}")


__all__ = ["NoDirectAccess", "RemoteClient"]
