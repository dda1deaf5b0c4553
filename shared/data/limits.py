"""Limits checked before the work they bound: a dataset's header, a job's asks.

:func:`check_file` looks at a dataset file *before any array is decoded*:
what kind of file it is (a regular file, not a folder, FIFO or device), its
size, that its HDF5 layout never reads outside the file, and, from the
NetCDF header alone (netCDF4 reads dimensions, shapes and dtypes without
touching data), the length of each dimension and the
bytes every variable takes once decoded. Ids and names along ``race`` and
``driver`` are read one value at a time, so one 10 MB track name costs 10 MB
and is refused, and a name that is not UTF-8 is named with its race.
Every limit is a setting (:class:`~shared.contract.settings.DataLimits`);
a problem names the limit it broke.

:func:`check_job` caps what a producer asks of a worker (chains, warmup +
samples, events), from the worker's settings: a job above a cap is rejected
naming the cap, never quietly run smaller (its id would then lie).

A file that cannot be read, is not NetCDF or holds names that are not
UTF-8 is at fault in its own bytes, for every worker (``intrinsic``: the
worker may delete the stored copy). A file over a limit (size, decoded
bytes, dimension lengths, ``min_scenarios``, id length) is refused by this
worker only: limits are one process's settings, another worker may accept
it, so the stored copy is kept (``intrinsic=False``). A job over a cap is
:class:`JobOverLimit`.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import netCDF4
import numpy as np

from shared.contract.errors import DatasetNotFound, InvalidDataset, JobOverLimit
from shared.contract.job import CalibrationJob
from shared.contract.settings import DataLimits
from shared.storage.confine import check_confined
from shared.storage.netcdf import decoded_bytes

log = logging.getLogger(__name__)

#: The first bytes of a NetCDF file: classic / 64-bit offset / CDF-5, or HDF5 (NetCDF-4).
_MAGIC = (b"CDF\x01", b"CDF\x02", b"CDF\x05", b"\x89HDF\r\n\x1a\n")
#: Variables whose values are ids or names, and the dimension they run along.
_NAME_VARIABLES = {"race": "race", "driver": "driver", "track": "race", "archetype": "race"}
#: The limit on each dimension's length.
_DIMENSION_LIMITS = {"race": "max_races", "scenario": "max_scenarios", "driver": "max_drivers"}
_REQUIRED = ("sim_position", "finish_position")


def _invalid(problems: list[str], source: str | None) -> InvalidDataset:
    """The file's own bytes are at fault, for every worker."""
    return InvalidDataset(problems, source=source, intrinsic=True)


def _over_limit(problems: list[str], source: str | None) -> InvalidDataset:
    """The file breaks one of this worker's limits (a setting): the stored copy is kept."""
    return InvalidDataset(problems, source=source, intrinsic=False)


def check_file(path: str | os.PathLike[str], limits: DataLimits, *, source: str | None = None) -> None:
    """Raise :class:`InvalidDataset` if the file at ``path`` is unreadable or breaks a limit.

    Checks, in order, each before the work the next one costs: the path is a
    regular file (a folder, FIFO, socket or device is refused without being
    opened, so a FIFO never blocks), not empty, at most
    ``limits.max_decoded_bytes`` long and starting like a NetCDF file; an
    HDF5 layout that reads nothing outside the file (external storage or
    links, virtual datasets, unknown filters: :mod:`shared.storage.confine`),
    walked before netCDF4 opens the file; then the header (see
    :func:`check_header`). ``source`` names the dataset in messages (default: the path). A missing file raises DatasetNotFound.
    """
    source = source or os.fspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise DatasetNotFound(f"no dataset file at {source}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise _invalid(["not a file but a folder: a dataset is one NetCDF file"], source)
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
        raise _invalid([f"not a regular file but {kind}: a dataset is one NetCDF file"], source)
    if info.st_size == 0:
        raise _invalid(["the file is empty"], source)
    if info.st_size > limits.max_decoded_bytes:
        raise _over_limit(
            [f"the file holds {info.st_size:,} bytes, above the limit of {limits.max_decoded_bytes:,} "
             "(limits.max_decoded_bytes)"],
            source,
        )
    with open(path, "rb") as handle:
        head = handle.read(8)
    if not head.startswith(_MAGIC):
        raise _invalid(["the file is not NetCDF (it starts with neither CDF nor the HDF5 signature)"], source)
    _check_confined(os.fspath(path), source)
    with _opened(source, path=os.fspath(path)) as nc:
        check_header(nc, limits, source=source)


def check_bytes(data: bytes, limits: DataLimits, *, source: str | None = None) -> None:
    """:func:`check_file` for NetCDF bytes already in memory."""
    if not data:
        raise _invalid(["the file is empty"], source)
    if len(data) > limits.max_decoded_bytes:
        raise _over_limit(
            [f"the file holds {len(data):,} bytes, above the limit of {limits.max_decoded_bytes:,} "
             "(limits.max_decoded_bytes)"],
            source,
        )
    if not data.startswith(_MAGIC):
        raise _invalid(["the file is not NetCDF (it starts with neither CDF nor the HDF5 signature)"], source)
    _check_confined(data, source)
    with _opened(source, memory=data) as nc:
        check_header(nc, limits, source=source)


def _check_confined(file: str | bytes, source: str | None) -> None:
    """Refuse a file whose HDF5 layout reads outside it, before netCDF4 opens it (see :mod:`shared.storage.confine`)."""
    try:
        check_confined(file, label=source)
    except OSError as exc:
        raise _invalid([unreadable_reason(exc)], source) from exc


@contextmanager
def _opened(source: str | None, *, path: str | None = None, memory: bytes | None = None) -> Iterator[Any]:
    try:
        nc = netCDF4.Dataset(path or "in-memory.nc", mode="r", memory=memory)
    except OSError as exc:
        raise _invalid([unreadable_reason(exc)], source) from exc
    try:
        yield nc
    finally:
        nc.close()


def unreadable_reason(exc: BaseException) -> str:
    """A clear line for a NetCDF file the library cannot read (truncated, corrupt, not NetCDF)."""
    text = str(getattr(exc, "strerror", None) or exc)
    hdf5_cannot_open = "Unable to" in text and "open file" in text  # h5py, walking the layout first
    if "HDF error" in text or "truncated" in text.lower() or hdf5_cannot_open:
        return (
            "the file is truncated or corrupt: the NetCDF library could not read it (NetCDF: HDF error); "
            "upload the complete file again"
        )
    if "Unknown file format" in text:
        return "the file is not in a NetCDF format the library knows (NetCDF: Unknown file format)"
    return f"the file is not a readable NetCDF dataset ({type(exc).__name__}: {text})"


def check_header(nc: Any, limits: DataLimits, *, source: str | None = None) -> None:
    """Check an open ``netCDF4.Dataset`` against ``limits`` from its header; raise InvalidDataset.

    - data only inside groups: calq reads the root group, so the groups are named;
    - each of race, scenario and driver at most its ``max_*`` limit, and at
      least ``limits.min_scenarios`` scenarios;
    - the bytes of every variable once decoded (elements × decoded item
      size; integers with a fill value or scale decode to 8-byte floats) at
      most ``limits.max_decoded_bytes``;
    - ids and names (race, driver, track, archetype) at most
      ``limits.max_id_chars`` characters and valid UTF-8.
    """
    problems = _group_problems(nc)  # the file's own
    over: list[str] = []  # this worker's limits
    sizes = {name: len(dim) for name, dim in nc.dimensions.items()}
    for dim, limit_name in _DIMENSION_LIMITS.items():
        limit = getattr(limits, limit_name)
        if sizes.get(dim, 0) > limit:
            over.append(f"{dim}: {sizes[dim]:,} along {dim}, above the limit of {limit:,} (limits.{limit_name})")
    if "scenario" in sizes and sizes["scenario"] < limits.min_scenarios:
        over.append(
            f"scenario: only {sizes['scenario']} scenario(s) per race; a forecast probability needs at least "
            f"{limits.min_scenarios} (limits.min_scenarios)"
        )
    total = sum(decoded_bytes(var) for var in nc.variables.values())
    if total > limits.max_decoded_bytes:
        over.append(
            f"the variables take {total:,} bytes once decoded, above the limit of "
            f"{limits.max_decoded_bytes:,} (limits.max_decoded_bytes)"
        )
    if not problems and not over:  # dimensions are bounded: names may be read now, one at a time
        not_utf8, too_long = _name_problems(nc, limits)
        problems += not_utf8
        over += too_long
    if problems or over:
        log.info("dataset %s refused from its header: %s", source or "<memory>", "; ".join(problems + over))
        # Intrinsic when any problem is the file's own; over this worker's limits alone, the file is kept.
        raise (_invalid if problems else _over_limit)(problems + over, source)


def _group_problems(nc: Any) -> list[str]:
    groups = list(nc.groups)
    if not groups:
        return []
    missing = [name for name in _REQUIRED if name not in nc.variables]
    if not missing:
        return []
    inside = {}
    for name in groups:
        group = nc.groups[name]
        found = [v for v in _REQUIRED if v in group.variables]
        inside[name] = found
    listed = ", ".join(f"{g!r}" + (f" (holding {', '.join(v)})" if v else "") for g, v in inside.items())
    return [
        f"the data is inside NetCDF group(s) {listed}, but calq reads only the root group, where "
        f"{', '.join(missing)} are missing: write the variables at the root"
    ]


def _name_problems(nc: Any, limits: DataLimits) -> tuple[list[str], list[str]]:
    """``(not UTF-8, longer than limits.max_id_chars)``: the file's own problems, then this worker's limit."""
    problems, over = [], []
    for name, dim in _NAME_VARIABLES.items():
        var = nc.variables.get(name)
        values = _name_values(var, dim, limits) if var is not None else None
        if values is None:
            continue
        too_long, not_utf8 = [], []
        for i, value in values:
            if value is None:
                not_utf8.append(i)
            elif len(value) > limits.max_id_chars:
                too_long.append((i, len(value)))
        if too_long:
            i, n = too_long[0]
            over.append(
                f"{name}: {len(too_long)} value(s) longer than {limits.max_id_chars} characters "
                f"(limits.max_id_chars; first: {dim} #{i}, {n:,} characters)"
            )
        if not_utf8:
            where = ", ".join(f"#{i}" for i in not_utf8[:10]) + (f" and {len(not_utf8) - 10} more" if len(not_utf8) > 10 else "")
            problems.append(f"{name}: value(s) that are not valid UTF-8 text at {dim} {where}")
    return problems, over


def _name_values(var: Any, dim: str, limits: DataLimits) -> Iterator[tuple[int, str | None]] | None:
    """The values of an id or name variable along ``dim``, one at a time: ``(index, text)``, text None if not UTF-8.

    Variable-length strings are read value by value. A char array (``S1``
    along ``(dim, length)``, which xarray decodes to strings) is held to the
    same limit: it is read, one row at a time, only when it is wider than
    ``limits.max_id_chars`` (no value is longer than the array is wide);
    its bytes up to the trailing NULs count, as decoded text. None for any
    other layout (the contract check names a wrong one).
    """
    if var.dimensions == (dim,) and var.dtype is str:
        return _string_values(var)
    is_chars = isinstance(var.dtype, np.dtype) and var.dtype == np.dtype("S1")
    if is_chars and len(var.dimensions) == 2 and var.dimensions[0] == dim:
        return _char_values(var) if var.shape[1] > limits.max_id_chars else iter(())
    return None


def _string_values(var: Any) -> Iterator[tuple[int, str | None]]:
    for i in range(var.shape[0]):
        try:
            value = var[i]
        except UnicodeDecodeError:
            yield i, None
            continue
        if isinstance(value, str):
            yield i, value


def _char_values(var: Any) -> Iterator[tuple[int, str | None]]:
    var.set_auto_chartostring(False)  # raw rows of bytes, not decoded by netCDF4
    for i in range(var.shape[0]):
        row = np.ma.getdata(var[i]).tobytes().rstrip(b"\0")
        try:
            yield i, row.decode("utf-8")
        except UnicodeDecodeError:
            yield i, None


def check_job(job: CalibrationJob, limits: DataLimits) -> None:
    """Raise :class:`JobOverLimit` if ``job`` asks for more than ``limits`` allow."""
    problems = []
    s = job.sampler
    if s.chains > limits.max_chains:
        problems.append(f"{s.chains} chains, above this worker's limit of {limits.max_chains} (limits.max_chains)")
    if s.warmup + s.samples > limits.max_draws_per_chain:
        problems.append(
            f"warmup + samples = {s.warmup + s.samples:,} per chain, above this worker's limit of "
            f"{limits.max_draws_per_chain:,} (limits.max_draws_per_chain)"
        )
    if len(job.events) > limits.max_events:
        problems.append(
            f"{len(job.events)} events, above this worker's limit of {limits.max_events} (limits.max_events)"
        )
    if problems:
        raise JobOverLimit("job over this worker's limits: " + "; ".join(problems))


__all__ = ["check_bytes", "check_file", "check_header", "check_job", "decoded_bytes", "unreadable_reason"]
