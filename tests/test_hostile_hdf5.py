"""Hostile HDF5 layouts: NetCDF-4 files that would make calq read outside them (issue 16).

Each file is a valid calibration dataset whose ``finish_position`` (or a
posterior whose ``alpha_track``) was rewritten with h5py to use one HDF5
feature that reads elsewhere: external raw storage in ``/etc/passwd``,
``/proc/self/environ`` or a missing file, an external link, a virtual
dataset, a filter outside deflate/shuffle/fletcher32, a soft link. Every
builder first proves the file is armed (netCDF4 opens it and, where the
target exists, decodes the outside bytes), so a test here fails if the gate
is removed. Datasets go through the real worker handler (the harness of
``tests/test_hostile.py``); posteriors through the store, ``calq apply``
and ``calq report --posterior``. Each case asserts the job is rejected, the
reason names the variable and the feature, the same reason whether the
target exists or not, and that nothing read through the feature reached it.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import netCDF4
import numpy as np
import pytest
import xarray as xr

from shared.contract.errors import InvalidDataset
from shared.data.dataset import open_dataset, save_dataset
from shared.storage import confine
from shared.storage.confine import confinement_problems
from shared.storage.netcdf import read_inference_data, write_netcdf
from shared.storage.store import posterior_key
from tests.test_hostile import base, env, rejected, submit_file  # noqa: F401  (fixtures and the worker harness)

OUTSIDE = "calq reads only data stored inside the file"
EXTERNAL = "finish_position: stored outside the file (HDF5 external raw storage); " + OUTSIDE
#: Text that would show the target leaked: its path, its bytes, a value decoded from them, the old leaking check.
LEAKS = ("/etc", "passwd", "environ", "root", "PATH", "nope", "non-integer", "HDF error", "e-", "e+")

Make = Callable[[h5py.Group, np.ndarray], object]


# -- builders --------------------------------------------------------------------------------------


def rewritten(plain: Path, path: Path, make: Make, *, variable: str = "finish_position", group: str = "/") -> Path:
    """A copy of ``plain`` whose ``variable`` (in ``group``) is replaced by what ``make`` builds.

    ``make(group, values)`` creates the new object under ``variable`` (``values``:
    the old one's, for shape and dtype); a dataset it returns gets the old
    attributes and dimension scales back, so netCDF4 reads the file as before.
    """
    shutil.copy(plain, path)
    with h5py.File(path, "r+") as f:
        parent = f[group]
        old = parent[variable]
        attrs = {k: v for k, v in old.attrs.items() if k not in ("DIMENSION_LIST", "_Netcdf4Coordinates")}
        scales = [[parent[os.path.basename(s.name)] for s in dim.values()] for dim in old.dims]
        values = old[()]
        del parent[variable]
        new = make(parent, values)
        if isinstance(new, h5py.Dataset):
            for key, value in attrs.items():
                new.attrs[key] = value
            for i, found in enumerate(scales):
                for scale in found:
                    new.dims[i].attach_scale(scale)
    return path


def external(target: str) -> Make:
    def make(group, values):
        return group.create_dataset("finish_position", shape=values.shape, dtype=values.dtype,
                                    external=[(target, 0, values.nbytes)])
    return make


def external_link(target: str) -> Make:
    def make(group, values):
        group["finish_position"] = h5py.ExternalLink(target, "/finish_position")
    return make


def virtual(target: str) -> Make:
    def make(group, values):
        layout = h5py.VirtualLayout(shape=values.shape, dtype=values.dtype)
        layout[:] = h5py.VirtualSource(target, "finish_position", shape=values.shape)
        return group.create_virtual_dataset("finish_position", layout, fillvalue=np.nan)
    return make


def filtered(**options) -> Make:
    def make(group, values):
        return group.create_dataset("finish_position", data=values, chunks=True, **options)
    return make


def soft_link(group, values):
    group["finish_position"] = h5py.SoftLink("/sim_position")


@pytest.fixture(scope="module")
def files(base, tmp_path_factory) -> dict[str, Path]:  # noqa: F811  (base: the fixture imported above)
    """The plain dataset and a valid dataset elsewhere on the host (a link target that exists)."""
    root = tmp_path_factory.mktemp("hdf5")
    plain = save_dataset(base, root / "plain.nc", compress=False)
    other = save_dataset(base, root / "elsewhere.nc")
    return {"plain": plain, "elsewhere": other, "root": root}


def build(files, name: str, make: Make) -> Path:
    return rewritten(files["plain"], files["root"] / f"{name}.nc", make)


def armed(path: Path) -> np.ndarray:
    """What netCDF4 decodes of ``finish_position`` without the gate: proof the file reads outside itself."""
    with netCDF4.Dataset(path) as nc:
        return np.asarray(nc["finish_position"][:])


def refused(outcome, reason_line: str) -> None:
    """Rejected with exactly ``reason_line`` as its problem, nothing leaked, the file deleted (its own bytes)."""
    rejected(outcome, reason_line)
    assert outcome.reason.count("  - ") == 1, outcome.reason
    for leak in LEAKS:
        assert leak not in outcome.reason.split("\n", 1)[1], (leak, outcome.reason)
    assert not outcome.stored  # the layout is the file's own, for every worker


def reason_lines(outcome) -> list[str]:
    return [line.strip()[2:] for line in outcome.reason.splitlines()[1:]]


# -- external raw storage --------------------------------------------------------------------------


def test_external_raw_storage_in_etc_passwd_is_refused_without_a_byte_of_it(env, files):  # noqa: F811
    path = build(files, "passwd", external("/etc/passwd"))
    assert armed(path).size  # netCDF4 alone decodes /etc/passwd as finishing positions
    refused(submit_file(env, path), EXTERNAL)


def test_external_raw_storage_in_the_workers_environment_is_refused(env, files):  # noqa: F811
    path = build(files, "environ", external("/proc/self/environ"))
    outcome = submit_file(env, path)
    refused(outcome, EXTERNAL)
    for value in (v for k, v in os.environ.items() if len(v) >= 6):
        assert value not in outcome.reason, "an environment value reached the reason"


def test_external_raw_storage_in_a_missing_file_gives_the_same_reason(env, files):  # noqa: F811
    present = submit_file(env, build(files, "present", external("/etc/passwd")))
    missing = submit_file(env, build(files, "missing", external("/nope/missing-target.bin")))
    refused(missing, EXTERNAL)
    assert reason_lines(missing) == reason_lines(present)  # no existence oracle


# -- links and virtual datasets ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "make", "line"),
    [
        ("external link", external_link, "finish_position: a link to another file (HDF5 external link); "),
        ("virtual dataset", virtual, "finish_position: values mapped from other files (HDF5 virtual dataset); "),
    ],
)
def test_a_link_out_of_the_file_is_refused_the_same_whether_its_target_exists(env, files, kind, make, line):  # noqa: F811
    existing = build(files, f"{kind}-present", make(str(files["elsewhere"])))
    missing = build(files, f"{kind}-missing", make("/nope/missing-target.nc"))
    assert armed(existing).size  # netCDF4 follows it into the other file
    present_outcome, missing_outcome = submit_file(env, existing), submit_file(env, missing)
    refused(present_outcome, line + OUTSIDE)
    refused(missing_outcome, line + OUTSIDE)
    assert reason_lines(present_outcome) == reason_lines(missing_outcome)


def test_a_soft_link_is_not_followed(env, files):  # noqa: F811
    path = build(files, "soft", soft_link)
    assert armed(path).size
    refused(submit_file(env, path), "finish_position: a soft link (HDF5 soft link), which calq does not follow")


# -- filters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "filter_id"),
    [({"compression": "lzf"}, "32000"), ({"scaleoffset": 2}, "6")],
    ids=["lzf-plugin", "scaleoffset"],
)
def test_a_filter_outside_the_allow_list_is_refused(env, files, options, filter_id):  # noqa: F811
    path = build(files, f"filter-{filter_id}", filtered(**options))
    refused(
        submit_file(env, path),
        f"finish_position: encoded with HDF5 filter id {filter_id}, outside the filters calq decodes "
        "(deflate (1), shuffle (2), fletcher32 (3))",
    )


def test_deflate_shuffle_and_fletcher32_still_pass(files, base):  # noqa: F811
    path = build(files, "allowed", filtered(compression="gzip", shuffle=True, fletcher32=True))
    assert confinement_problems(path) == []
    ds = open_dataset(path)
    assert ds.sizes == base.sizes


def test_files_calq_writes_pass(files, tmp_path):
    assert confinement_problems(files["elsewhere"]) == []  # save_dataset: zlib + shuffle
    classic = tmp_path / "classic.nc"
    xr.Dataset({"x": ("n", np.arange(3.0))}).to_netcdf(classic, format="NETCDF3_64BIT")
    assert confinement_problems(classic) == []  # classic NetCDF cannot point outside: not walked


def test_bytes_in_memory_are_walked_too(files):
    path = build(files, "in-memory", external("/etc/passwd"))
    with pytest.raises(InvalidDataset) as caught:
        open_dataset(io.BytesIO(path.read_bytes()), label="upload")
    assert caught.value.problems == [EXTERNAL] and caught.value.intrinsic


def test_a_group_hard_linked_into_itself_is_walked_once(tmp_path):
    path = tmp_path / "loop.h5"
    with h5py.File(path, "w") as f:
        group = f.create_group("g")
        group["loop"] = group  # a hard link: a cycle
        group["x"] = h5py.ExternalLink("/etc/passwd", "/x")
    assert confinement_problems(path) == ["g/x: a link to another file (HDF5 external link); " + OUTSIDE]


def test_a_file_of_too_many_objects_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(confine, "MAX_OBJECTS", 20)
    path = tmp_path / "many.h5"
    with h5py.File(path, "w") as f:
        for i in range(21):
            f.create_group(f"g{i}")
    assert confinement_problems(path) == [
        "the file holds more than 20 objects (groups, variables and links); a calibration file holds tens"
    ]


# -- posteriors read back: warm starts, calq apply, calq report --posterior -------------------------


@pytest.fixture(scope="module")
def posterior(tmp_path_factory) -> Path:
    import arviz as az

    rng = np.random.default_rng(0)
    idata = az.from_dict(
        posterior={"alpha_track": rng.normal(size=(1, 20, 2, 3)), "beta_track": rng.normal(size=(1, 20, 2, 3))},
        dims={"alpha_track": ["event", "track"], "beta_track": ["event", "track"]},
    )
    path = tmp_path_factory.mktemp("posterior") / "plain.nc"
    write_netcdf(idata, path)
    return path


def hostile_posterior(plain: Path, path: Path, target: str) -> Path:
    def make(group, values):
        return group.create_dataset("alpha_track", shape=values.shape, dtype=values.dtype,
                                    external=[(target, 0, values.nbytes)])
    return rewritten(plain, path, make, variable="alpha_track", group="posterior")


POSTERIOR_LINE = "posterior/alpha_track: stored outside the file (HDF5 external raw storage); " + OUTSIDE


def test_a_posterior_is_read_back_only_from_inside_its_file(posterior, tmp_path):
    assert "alpha_track" in read_inference_data(posterior).posterior  # arviz's own file passes
    for target in ("/etc/passwd", "/nope/missing-target.bin"):
        path = hostile_posterior(posterior, tmp_path / "hostile.nc", target)
        with pytest.raises(InvalidDataset) as caught:
            read_inference_data(path, label="the posterior")
        assert caught.value.problems == [POSTERIOR_LINE]
        assert str(caught.value).startswith("invalid posterior (the posterior):")  # not "calibration dataset"


def test_a_posterior_planted_in_the_store_is_refused_where_it_is_read(posterior, tmp_path, env):  # noqa: F811
    """Warm starts, the client and the report read stored posteriors through the store: the same walk."""
    _, store, _ = env
    path = hostile_posterior(posterior, tmp_path / "planted.nc", "/proc/self/environ")
    uri = store.put_file(path, posterior_key("all", "cj-planted"))
    with pytest.raises(InvalidDataset) as caught:
        store.get_inference_data(uri, groups=("posterior",))
    assert caught.value.problems == [POSTERIOR_LINE]


def test_a_posterior_over_the_size_limit_is_refused_before_it_is_decoded(posterior, tmp_path):
    import arviz as az

    with pytest.raises(InvalidDataset) as caught:
        read_inference_data(posterior, max_bytes=1000)
    assert "limits.max_decoded_bytes" in caught.value.problems[0] and "the file holds" in caught.value.problems[0]
    bomb = tmp_path / "bomb.nc"  # 8 MB of zeros, deflated to a few KB
    write_netcdf(az.from_dict(posterior={"alpha_track": np.zeros((1, 1000, 10, 100))}), bomb)
    size = bomb.stat().st_size
    assert size < 1_000_000
    with pytest.raises(InvalidDataset) as caught:
        read_inference_data(bomb, max_bytes=1_000_000)  # the file fits, its decoded variables do not
    assert "once decoded" in caught.value.problems[0]


@pytest.mark.parametrize("command", ["apply", "report"])
def test_calq_apply_and_report_refuse_a_posterior_that_reads_outside(posterior, tmp_path, command):
    path = hostile_posterior(posterior, tmp_path / "cj-hostile.nc", "/etc/passwd")
    args = {"apply": ["apply", str(path), "--event", "top_5", "--p", "0.3"],
            "report": ["report", "--posterior", str(path), "--html", str(tmp_path / "r.html")]}[command]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CALQ_")}
    environ.update(CALQ_STORAGE_URL=str(tmp_path / "store"), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "producer.cli", *args], env=environ, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "HDF5 external raw storage" in result.stderr and "alpha_track" in result.stderr, result.stderr[-2000:]
    assert "invalid posterior" in result.stderr and "calibration dataset" not in result.stderr
    assert not (tmp_path / "r.html").exists()
    said = result.stderr.replace(str(path), "<posterior>")
    assert "root" not in said and "/bin/" not in said and "passwd" not in said
