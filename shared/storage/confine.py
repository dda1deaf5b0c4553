"""A NetCDF-4 file is read only if every byte it would be decoded from is inside it.

NetCDF-4 files are HDF5 files, and HDF5 can point outside the file or run
code while an array is read. Whoever wrote the file chose its layout: a
producer's dataset, or a posterior planted in the store or named on the
command line. :func:`confinement_problems` walks the file's links with h5py
*before* netCDF4 or xarray open it (netCDF4 follows external links as soon
as it opens a file), resolving nothing that leaves the file, and refuses:

- **external links** (``H5Lcreate_external``): a name in this file for an
  object in another file; resolving one opens that file, and a missing
  target answers differently from a present one (an existence oracle);
- **soft links**: netCDF never writes them; they are not followed;
- **external raw storage** (``H5Pset_external``): a dataset whose values are
  bytes of another file (``/etc/passwd``, ``/proc/self/environ``) at offsets
  the writer chose;
- **virtual datasets** (``H5D_VIRTUAL``): values mapped from other files;
- **filters outside** :data:`ALLOWED_FILTERS` (deflate, shuffle,
  fletcher32, what calq and arviz write): any other filter id makes HDF5
  look for a plugin, code loaded from the worker's plugin path;
- more than :data:`MAX_OBJECTS` objects (every one costs a header read).

Attributes cannot be stored outside the file and named datatypes hold no
data: both are fine. Classic NetCDF files (``CDF\\x01``, ``CDF\\x02``,
``CDF\\x05``) cannot hold any of these features and are not walked.

Each problem names the variable (its path in the file) and the feature, and
never anything the feature points at: not a target path, not whether it
exists, not a byte read through it.
"""

from __future__ import annotations

import io
import os

import h5py

from shared.contract.errors import InvalidDataset

#: HDF5 filter ids a variable may use: deflate (1), shuffle (2) and fletcher32 (3), all built into HDF5.
ALLOWED_FILTERS: dict[int, str] = {1: "deflate", 2: "shuffle", 3: "fletcher32"}
#: The most objects (groups, variables, links) one file may hold; a calibration file holds tens.
MAX_OBJECTS = 10_000
#: At most this many refused objects are named, one line each.
MAX_LINES = 5
#: Longest object path quoted in a problem.
_MAX_NAME_CHARS = 120
_CLASSIC = (b"CDF\x01", b"CDF\x02", b"CDF\x05")
_OUTSIDE = "calq reads only data stored inside the file"


def confinement_problems(source: str | os.PathLike[str] | bytes) -> list[str]:
    """One line per object of a NetCDF-4 file that leaves the file (see the module docstring).

    ``source`` is a path or the file's bytes. An empty list means the file
    may be opened by netCDF4; a classic NetCDF file always gives one.
    Raises ``OSError`` when HDF5 cannot open the file at all (the caller
    names it unreadable: a file calq cannot walk is never decoded).
    """
    if _is_classic(source):
        return []
    opened = h5py.File(io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source), "r")
    with opened as handle:
        problems, walked = [], 0
        pending = [("", handle)]
        seen = {h5py.h5o.get_info(handle.id).addr}
        while pending:
            prefix, group = pending.pop()
            for name in group:
                walked += 1
                if walked > MAX_OBJECTS:
                    return [f"the file holds more than {MAX_OBJECTS:,} objects (groups, variables and links); "
                            "a calibration file holds tens"]
                path = f"{prefix}{_quoted(name)}"
                link = group.get(name, getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    problems.append(f"{path}: a link to another file (HDF5 external link); {_OUTSIDE}")
                elif isinstance(link, h5py.SoftLink):
                    problems.append(f"{path}: a soft link (HDF5 soft link), which calq does not follow; {_OUTSIDE}")
                else:
                    problems += _object_problems(group[name], path, pending, seen)
    if len(problems) > MAX_LINES:
        problems = [*problems[:MAX_LINES], f"… and {len(problems) - MAX_LINES} more object(s) refused the same way"]
    return problems


def check_confined(
    source: str | os.PathLike[str] | bytes, *, label: str | None = None, kind: str = "calibration dataset"
) -> None:
    """Raise :class:`InvalidDataset` (intrinsic: the file's own bytes) if the file leaves itself.

    ``label`` names the file in the message and ``kind`` what it was meant to
    be. ``OSError`` passes through as in :func:`confinement_problems`.
    """
    problems = confinement_problems(source)
    if problems:
        raise InvalidDataset(problems, source=label, intrinsic=True, kind=kind)


def _object_problems(obj: object, path: str, pending: list, seen: set[int]) -> list[str]:
    """A hard-linked object's problems; a group not seen before joins ``pending``."""
    if isinstance(obj, h5py.Group):
        addr = h5py.h5o.get_info(obj.id).addr
        if addr not in seen:  # a group hard-linked twice (or into itself) is walked once
            seen.add(addr)
            pending.append((f"{path}/", obj))
        return []
    if not isinstance(obj, h5py.Dataset):
        return []  # a named datatype holds no data
    plist = obj.id.get_create_plist()
    if plist.get_external_count() > 0:
        return [f"{path}: stored outside the file (HDF5 external raw storage); {_OUTSIDE}"]
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        return [f"{path}: values mapped from other files (HDF5 virtual dataset); {_OUTSIDE}"]
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    refused = sorted({f for f in filters if f not in ALLOWED_FILTERS})
    if refused:
        ids = ", ".join(str(f) for f in refused)
        allowed = ", ".join(f"{name} ({fid})" for fid, name in ALLOWED_FILTERS.items())
        return [f"{path}: encoded with HDF5 filter id {ids}, outside the filters calq decodes ({allowed})"]
    return []


def _is_classic(source: str | os.PathLike[str] | bytes) -> bool:
    if isinstance(source, bytes):
        head = source[:4]
    else:
        with open(source, "rb") as handle:
            head = handle.read(4)
    return head in _CLASSIC


def _quoted(name: str) -> str:
    """An object name as a problem quotes it: printable, and at most :data:`_MAX_NAME_CHARS` long."""
    text = name if name.isprintable() else ascii(name)[1:-1]
    return text if len(text) <= _MAX_NAME_CHARS else text[:_MAX_NAME_CHARS] + "…"


__all__ = ["ALLOWED_FILTERS", "MAX_LINES", "MAX_OBJECTS", "check_confined", "confinement_problems"]
