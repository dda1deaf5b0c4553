"""Writing and reading NetCDF so that every file round-trips.

NetCDF attributes hold only strings and numbers (arviz-devs/arviz#2365,
#1417): ``None``, bools, dicts and mixed lists are stored JSON-encoded
instead, on a copy, so the caller's object is untouched. Files are read fully
into memory and closed at once: a lazily opened file breaks a later
overwrite (arviz-devs/arviz#1734). A file read back is checked before it is
decoded (its size, its HDF5 layout, its decoded size): whoever could write
the store chose its bytes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from shared.contract.errors import InvalidDataset
from shared.storage.confine import check_confined

if TYPE_CHECKING:
    import arviz as az

#: How a refused posterior file is named in the refusal (:class:`InvalidDataset`'s ``kind``).
POSTERIOR = "posterior"


def encode_attr(value: Any) -> Any:
    """``value`` if NetCDF can store it as an attribute, else its JSON encoding."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return json.dumps(bool(value) if value is not None else None)
    if isinstance(value, (str, int, float, np.integer, np.floating)):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "iuf" and value.ndim == 1:
        return value
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        return list(value)
    return json.dumps(value, default=_json_default, sort_keys=True)


def encode_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    return {key: encode_attr(value) for key, value in attrs.items()}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def netcdf_ready(ds: xr.Dataset) -> xr.Dataset:
    """A shallow copy of ``ds`` that NetCDF can store.

    Attributes are encoded, and encodings inherited from a file read earlier
    are dropped: after a selection their chunk sizes may no longer fit.
    """
    out = ds.drop_encoding()
    out.attrs = encode_attrs(ds.attrs)
    for name in out.variables:
        out.variables[name].attrs = encode_attrs(ds.variables[name].attrs)
    return out


#: The zlib level of an InferenceData's variables (ArviZ leaves netCDF4's default, 4). Measured per variable on a
#: warm job (3 seasons of intermediate), level 4 against 1: the posterior's float32 draws 291 / 294 kB (α) and 246 /
#: 247 kB (β), 0.6 ms more each; the replicated outcomes (int8, 1.19 MB raw) 210 / 259 kB, 23 / 15 ms; the small
#: variables alike. Whole files over 12 warm backfill jobs, median of 7 interleaved (load 1.3): level 4 66.4 ms CPU,
#: 817 kB; level 1 56.6 ms (−15 %), 860 kB (+5.3 %, nearly all of it the replicated outcomes). The same intermediate
#: job uncompressed: 30 ms, 2.3 MB (level 4: 67 ms, 948 kB).
ZLIB_LEVEL = 1


def write_netcdf(obj: az.InferenceData | xr.Dataset, path: str | os.PathLike[str], **options: Any) -> None:
    """Write an InferenceData or Dataset to a local NetCDF4 file (netCDF4 engine).

    An InferenceData is written as ArviZ's ``to_netcdf`` writes it (its
    attributes at the root, each group in a NetCDF group of its name, every
    numeric and boolean variable zlib-compressed, at :data:`ZLIB_LEVEL`),
    but in one pass: :func:`_write_groups`.
    """
    import arviz as az

    if isinstance(obj, az.InferenceData):
        _write_groups(obj, path)
    elif isinstance(obj, xr.Dataset):
        netcdf_ready(obj).to_netcdf(path, engine="netcdf4", format="NETCDF4", **options)
    else:
        raise TypeError(f"write_netcdf takes an arviz.InferenceData or xarray.Dataset, not {type(obj).__name__}")


def _write_groups(idata: az.InferenceData, path: str | os.PathLike[str]) -> None:
    """Every group of ``idata`` through one open file: all of them defined first, then every array written.

    Each group goes through xarray's own encoding and netCDF4 store, as
    ``DataTree.to_netcdf`` (and ArviZ's ``to_netcdf``) write it, so the file
    holds the same variables, attributes and filters. Only the order
    differs: xarray writes each array as soon as its variable is defined,
    and netCDF-4 then leaves define mode for the write and enters it again
    for the next variable, flushing the file's metadata each time (about
    40 variables a job). Measured on 11 warm backfill jobs' InferenceData
    (5 groups, 40 variables, 2.4 MB before compression), CPU ms a write,
    median of 7 interleaved (load 3.3): ``DataTree.to_netcdf`` 42.6, this
    25.3; the same netCDF4 calls without xarray's encoding 24.3.
    """
    import netCDF4
    from xarray.backends import NetCDF4DataStore
    from xarray.conventions import encode_dataset_coordinates

    writes = _DeferredWrites()
    with netCDF4.Dataset(str(path), mode="w", format="NETCDF4") as root:
        NetCDF4DataStore(root).store({}, encode_attrs(idata.attrs or {}))
        for group in idata.groups():
            ds = netcdf_ready(getattr(idata, group))
            compressed = {name for name, var in ds.variables.items() if _compressible(var.dtype)}
            for name in compressed:
                ds.variables[name].encoding = {"zlib": True, "complevel": ZLIB_LEVEL}
            variables, attrs = encode_dataset_coordinates(ds)
            NetCDF4DataStore(root.createGroup(group)).store(variables, attrs, compressed, writes)
        writes.write()


class _DeferredWrites:
    """An ``xarray.backends.ArrayWriter`` that keeps each array for :meth:`write` instead of writing it at once."""

    def __init__(self) -> None:
        self._pending: list[tuple[Any, Any, Any]] = []

    def add(self, source: Any, target: Any, region: Any = None) -> None:
        self._pending.append((source, target, region if region else ...))

    def write(self) -> None:
        for source, target, region in self._pending:
            target[region] = source
        self._pending.clear()


def _compressible(dtype: np.dtype) -> bool:
    """The dtypes ArviZ compresses (``arviz.data.inference_data._compressible_dtype``)."""
    if dtype.kind == "V":
        return all(_compressible(item) for item, _ in dtype.fields.values())
    return dtype.kind in {"b", "i", "u", "f", "c", "S"}


def read_inference_data(
    path: str | os.PathLike[str],
    *,
    groups: Sequence[str] | None = None,
    max_bytes: int | None = None,
    label: str | None = None,
) -> az.InferenceData:
    """Read a NetCDF InferenceData fully into memory, closing every file it opened.

    ``groups`` limits what is decoded (default: every group in the file).
    Whoever could write the store, or name a file to ``calq apply`` and
    ``calq report --posterior``, chose this file's bytes, so before any array
    is decoded: the file is at most ``max_bytes`` long (default: the
    settings' ``limits.max_decoded_bytes``), its HDF5 layout reads nothing
    outside it (:func:`~shared.storage.confine.check_confined`), and the
    variables to be read take at most ``max_bytes`` once decoded, counted
    from the header (:func:`decoded_bytes`). A refusal raises
    :class:`~shared.contract.errors.InvalidDataset` naming ``label`` (default: the path)
    and headed "invalid posterior".
    """
    import arviz as az
    import netCDF4

    from shared.contract.settings import get_settings

    label = label or os.fspath(path)
    limit = max_bytes if max_bytes is not None else get_settings().limits.max_decoded_bytes
    size = os.stat(path).st_size
    if size > limit:
        raise InvalidDataset([_over(f"the file holds {size:,} bytes", limit)], source=label, kind=POSTERIOR)
    check_confined(path, label=label, kind=POSTERIOR)
    with netCDF4.Dataset(str(path), mode="r") as handle:
        group_names = [g for g in handle.groups if groups is None or g in groups]
        read = [handle, *(handle.groups[g] for g in group_names)]
        total = sum(decoded_bytes(var) for part in read for var in part.variables.values())
    if total > limit:
        problem = _over(f"the variables to read take {total:,} bytes once decoded", limit)
        raise InvalidDataset([problem], source=label, kind=POSTERIOR)
    loaded = {}
    for group in group_names:
        with xr.open_dataset(path, group=group, engine="netcdf4") as ds:
            loaded[group] = ds.load()
    with xr.open_dataset(path, engine="netcdf4") as root:
        attrs = dict(root.attrs)
    return az.InferenceData(attrs=attrs, **loaded)


def decoded_bytes(var: Any) -> int:
    """Bytes the ``netCDF4.Variable`` ``var`` takes once xarray has decoded it, from the header only.

    Elements × decoded item size; integers with a fill value or scale decode
    to 8-byte floats. Variable-length strings count 8 bytes each (the object
    pointer); their text is bounded by the file size and, in a dataset, by
    the name checks of :mod:`shared.data.limits`.
    """
    n = math.prod(var.shape)
    dtype = var.dtype
    if dtype is str or not isinstance(dtype, np.dtype):
        return n * 8
    attrs = set(var.ncattrs())
    if dtype.kind in "iu" and attrs & {"_FillValue", "missing_value", "scale_factor", "add_offset"}:
        return n * 8
    return n * dtype.itemsize


def _over(what: str, limit: int) -> str:
    return f"{what}, above the limit of {limit:,} (limits.max_decoded_bytes)"
