"""shared.storage.store on both backends: a local folder and a real S3 endpoint (moto).

The ``s3`` parameter and the Redis check are ``integration`` tests: they use
the real services started by ``tests.services``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from shared.contract.errors import (
    DatasetHashMismatch,
    DatasetNotAllowed,
    DatasetNotFound,
    NotFound,
    StorageUnavailable,
)
from shared.contract.settings import S3Settings, Settings
from shared.storage import store as storage_module
from shared.storage.store import Store, posterior_key, sha256_file, summary_key
from tests.services import free_port

BACKENDS = ["file", pytest.param("s3", marks=pytest.mark.integration)]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "file":
        return Store(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    s3_settings = request.getfixturevalue("s3_settings")
    return Store.from_settings(s3_settings, cache_dir=tmp_path / "cache")


def _all_paths(store: Store) -> list[str]:
    """Every object under the root, temporaries included (bypasses Store.list)."""
    try:
        return store.fs.find(store._root)
    except FileNotFoundError:
        return []


def _inference_data(seed: int = 7):
    import arviz as az

    rng = np.random.default_rng(seed)
    idata = az.from_dict(
        posterior={
            "alpha": rng.normal(size=(2, 50)),
            "beta": rng.normal(size=(2, 50, 3)),
        },
        sample_stats={
            "diverging": rng.random((2, 50)) < 0.1,
            "lp": rng.normal(size=(2, 50)),
            "tree_depth": rng.integers(1, 6, size=(2, 50)),
        },
        coords={"track": ["Daytona", "Talladega", "Atlanta"]},
        dims={"beta": ["track"]},
    )
    idata.posterior.attrs.update(
        {"model_version": "logit-hier/1", "chains": 2, "target_accept": 0.9,
         "config": {"events": ["top_5", "top_10"], "window_days": None}}
    )
    return idata


def _dataset_file(path: Path, seed: int = 0) -> Path:
    import xarray as xr

    rng = np.random.default_rng(seed)
    ds = xr.Dataset(
        {"sim_position": (("race", "scenario", "driver"), rng.integers(1, 41, (3, 20, 5)).astype("f8"))},
        coords={"race": ["r1", "r2", "r3"], "driver": list("abcde")},
        attrs={"source": "test"},
    )
    ds.to_netcdf(path, engine="netcdf4")
    return path


# -- bytes, JSON, listing ------------------------------------------------------


def test_bytes_round_trip(store: Store) -> None:
    data = os.urandom(4096)
    uri = store.put_bytes("a/b/blob.bin", data)
    assert uri == store.uri("a/b/blob.bin")
    assert uri.startswith(f"{store.scheme}://")
    assert store.key_of(uri) == "a/b/blob.bin"
    assert store.get_bytes(uri) == data
    assert store.get_bytes("a/b/blob.bin") == data


def test_json_round_trip(store: Store) -> None:
    doc = {"job_id": "abc", "rhat": 1.003, "flags": ["ok"], "nested": {"n": 3}}
    uri = store.put_json(summary_key("intermediate", "abc"), doc)
    assert uri.endswith("posteriors/intermediate/abc.json")
    assert store.get_json(uri) == doc


def test_exists_list_delete(store: Store) -> None:
    assert not store.exists("runs/one.json")
    assert store.list("runs") == []
    one = store.put_json("runs/one.json", 1)
    two = store.put_json("runs/sub/two.json", 2)
    store.put_json("other/three.json", 3)
    assert store.exists("runs/one.json") and store.exists(one)
    assert not store.exists("runs")  # a folder is not an object
    assert store.list("runs") == sorted([one, two])
    assert len(store.list()) == 3
    store.delete(one)
    assert not store.exists(one)
    store.delete(one)  # deleting what is gone is fine
    assert store.list("runs") == [two]


def test_overwrite_is_atomic_and_leaves_no_temporaries(store: Store, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    store.put_bytes("blobs/x.bin", b"old")
    uri = store.put_file(big, "blobs/x.bin")
    assert store.get_bytes(uri) == big.read_bytes()
    assert [p for p in _all_paths(store) if ".tmp-" in p] == []


def test_failed_write_publishes_nothing(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    def short_write(fs, path, expected, uri):
        raise StorageUnavailable(f"incomplete write to {uri}")

    monkeypatch.setattr(storage_module, "_check_size", short_write)
    with pytest.raises(StorageUnavailable):
        store.put_bytes("blobs/y.bin", b"payload")
    assert not store.exists("blobs/y.bin")
    assert [p for p in _all_paths(store) if ".tmp-" in p] == []


def test_keys_cannot_escape_the_root(store: Store) -> None:
    for bad in ("../x", "a/../../x", "", "a//b"):
        with pytest.raises(ValueError):
            store.uri(bad)
    with pytest.raises(ValueError):
        store.key_of("file:///somewhere/else.nc" if store.scheme == "s3" else "file:///elsewhere/x.nc")


def test_layout_keys() -> None:
    assert posterior_key("superspeedway", "j1") == "posteriors/superspeedway/j1.nc"
    assert summary_key("superspeedway", "j1") == "posteriors/superspeedway/j1.json"


# -- missing objects -----------------------------------------------------------


def test_missing_objects_raise_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get_bytes("nothing/here.bin")
    with pytest.raises(NotFound):
        store.get_json(store.uri("nothing/here.json"))
    with pytest.raises(NotFound):
        store.get_inference_data(posterior_key("intermediate", "missing"))
    with pytest.raises(NotFound):
        store.get_dataset_file("nothing/here.nc")


def test_a_library_error_on_a_posterior_that_is_there_is_not_nothing_at(store: Store, monkeypatch) -> None:
    """HDF5 says ENOENT for more than a missing file; "nothing at" is said only where the store holds nothing."""
    import shared.storage.netcdf as netcdf

    uri = store.put_netcdf(_inference_data(), posterior_key("superspeedway", "there"))

    def hdf5_refuses(path, **_):
        raise FileNotFoundError(2, "Unable to synchronously open file (HDF5)", str(path))

    monkeypatch.setattr(netcdf, "read_inference_data", hdf5_refuses)
    with pytest.raises(FileNotFoundError, match="HDF5") as caught:
        store.get_inference_data(uri)
    assert not isinstance(caught.value, NotFound)


# -- NetCDF --------------------------------------------------------------------


def test_inference_data_round_trip(store: Store) -> None:
    idata = _inference_data()
    key = posterior_key("superspeedway", "job-1")
    uri = store.put_netcdf(idata, key)
    assert uri == store.uri(key)

    back = store.get_inference_data(uri)
    assert set(back.groups()) == {"posterior", "sample_stats"}
    for group in ("posterior", "sample_stats"):
        original, loaded = getattr(idata, group), getattr(back, group)
        assert set(loaded.data_vars) == set(original.data_vars)
        for name in original.data_vars:
            np.testing.assert_array_equal(loaded[name].values, original[name].values)
            assert loaded[name].dtype == original[name].dtype
    assert list(back.posterior.track.values) == ["Daytona", "Talladega", "Atlanta"]

    attrs = back.posterior.attrs
    assert attrs["model_version"] == "logit-hier/1"
    assert attrs["chains"] == 2
    assert attrs["target_accept"] == 0.9
    # NetCDF cannot hold a dict (or None): it is stored JSON-encoded.
    assert json.loads(attrs["config"]) == {"events": ["top_5", "top_10"], "window_days": None}
    # The caller's object is not modified by the encoding.
    assert isinstance(idata.posterior.attrs["config"], dict)


def test_the_one_pass_write_holds_what_arviz_writes(tmp_path: Path) -> None:
    """write_netcdf's one open file holds what ArviZ's to_netcdf (a file open per group) holds: the same groups,
    values, dtypes, coordinates and attributes, each variable compressed alike (zlib at ZLIB_LEVEL, not 4)."""
    import arviz as az
    import netCDF4

    from shared.storage.netcdf import ZLIB_LEVEL, encode_attrs, netcdf_ready, read_inference_data, write_netcdf

    idata = _inference_data()
    idata.attrs = {"job_id": "job-1", "attempts": 2}
    ours, theirs = tmp_path / "ours.nc", tmp_path / "theirs.nc"
    write_netcdf(idata, ours)
    groups = {group: netcdf_ready(getattr(idata, group)) for group in idata.groups()}
    az.InferenceData(attrs=encode_attrs(idata.attrs), **groups).to_netcdf(str(theirs), engine="netcdf4")
    a, b = read_inference_data(ours), read_inference_data(theirs)
    assert a.groups() == b.groups() == idata.groups()
    assert a.attrs == b.attrs == {"job_id": "job-1", "attempts": 2}
    for group in idata.groups():
        assert getattr(a, group).identical(getattr(b, group)), group
    with netCDF4.Dataset(ours) as x, netCDF4.Dataset(theirs) as y:
        assert x.ncattrs() == y.ncattrs() and list(x.groups) == list(y.groups)
        for group in x.groups:
            for name, var in x.groups[group].variables.items():
                theirs = y.groups[group].variables[name].filters()
                expected = {**theirs, "complevel": ZLIB_LEVEL} if theirs["zlib"] else theirs
                assert var.filters() == expected, (group, name)


def test_the_deferred_writes_hold_what_a_write_per_group_holds(tmp_path: Path) -> None:
    """write_netcdf defines every group's variables before writing any array; the file holds, variable for
    variable and in the same order, what ArviZ's way (each group's Dataset.to_netcdf into the file in turn) writes
    with the same encoding: dtypes, dimensions, chunking, filters, attributes (the encoded bool's and the floats'
    NaN fill included) and values."""
    import netCDF4

    from shared.storage.netcdf import ZLIB_LEVEL, _compressible, encode_attrs, netcdf_ready, write_netcdf

    idata = _inference_data()
    idata.posterior["beta"][0, 0, 0] = np.nan
    idata.attrs = {"job_id": "job-1", "tags": ["a", "b"]}
    ours, theirs = tmp_path / "ours.nc", tmp_path / "theirs.nc"
    write_netcdf(idata, ours)
    with netCDF4.Dataset(theirs, mode="w") as root:
        root.setncatts(encode_attrs(idata.attrs))
    for group in idata.groups():
        ds = netcdf_ready(getattr(idata, group))
        encoding = {name: {"zlib": True, "complevel": ZLIB_LEVEL} for name, var in ds.variables.items()
                    if _compressible(var.dtype)}
        ds.to_netcdf(theirs, mode="a", group=group, engine="netcdf4", encoding=encoding)

    def described(path: Path) -> list:
        with netCDF4.Dataset(path) as root:
            out = [[(a, repr(root.getncattr(a))) for a in root.ncattrs()]]
            for name, group in root.groups.items():
                out.append((name, [(a, repr(group.getncattr(a))) for a in group.ncattrs()],
                            [(d.name, d.size) for d in group.dimensions.values()]))
                out.extend((name, v.name, str(v.dtype), v.dimensions, v.chunking(), v.filters(), v.endian(),
                            [(a, repr(v.getncattr(a))) for a in v.ncattrs()], repr(v[...].tolist()))
                           for v in group.variables.values())
        return out

    ours_described = described(ours)
    assert ours_described == described(theirs)
    assert any(entry[1] == "diverging" and ("dtype", "'bool'") in entry[7] for entry in ours_described[1:])


def test_inference_data_is_fully_loaded_and_closed(store: Store) -> None:
    key = posterior_key("road_course", "job-2")
    store.put_netcdf(_inference_data(seed=1), key)
    back = store.get_inference_data(key)
    fd_dir = Path("/proc/self/fd")
    if fd_dir.exists():
        open_files = {os.path.realpath(fd_dir / fd) for fd in os.listdir(fd_dir)}
        assert not any(p.endswith(".nc") for p in open_files), open_files
    # Overwriting right after a read works (arviz-devs/arviz#1734) and the
    # data already read stays valid.
    store.put_netcdf(_inference_data(seed=2), key)
    assert float(back.posterior["alpha"].sum()) == float(_inference_data(seed=1).posterior["alpha"].sum())
    assert store.get_inference_data(key).posterior["alpha"].equals(_inference_data(seed=2).posterior["alpha"])


def test_xarray_dataset_round_trip(store: Store, tmp_path: Path) -> None:
    import xarray as xr

    ds = xr.load_dataset(_dataset_file(tmp_path / "d.nc"))
    ds.attrs["meta"] = {"season": 2024}
    uri = store.put_netcdf(ds, "tables/d.nc")
    local = store.get_dataset_file(uri)
    assert local.is_file()
    assert store.get_dataset_file(uri) == local  # cached / the same file
    back = xr.load_dataset(local, engine="netcdf4")
    np.testing.assert_array_equal(back.sim_position.values, ds.sim_position.values)
    assert json.loads(back.attrs["meta"]) == {"season": 2024}


# -- content-addressed datasets ------------------------------------------------


def test_upload_dataset_is_idempotent_by_content(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _dataset_file(tmp_path / "dataset.nc")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    uri, got_sha = store.upload_dataset(path)
    assert got_sha == sha == sha256_file(path)
    assert uri == store.uri(f"datasets/{sha}.nc")
    assert store.get_bytes(uri) == path.read_bytes()

    calls: list[tuple] = []
    real_put_file = store.put_file
    monkeypatch.setattr(store, "put_file", lambda *a, **k: calls.append(a) or real_put_file(*a, **k))
    copy = tmp_path / "same-content.nc"
    copy.write_bytes(path.read_bytes())
    assert store.upload_dataset(copy) == (uri, sha)
    assert calls == []  # nothing rewritten

    other = _dataset_file(tmp_path / "other.nc", seed=1)
    other_uri, other_sha = store.upload_dataset(other)
    assert other_sha != sha and other_uri != uri and len(calls) == 1


def test_fetch_dataset_verifies_the_hash(store: Store, tmp_path: Path) -> None:
    path = _dataset_file(tmp_path / "dataset.nc")
    uri, sha = store.upload_dataset(path)
    local = store.fetch_dataset(uri, sha)
    assert local.read_bytes() == path.read_bytes()
    assert store.fetch_dataset(uri, sha.upper()) == local

    store.put_bytes(store.key_of(uri), b"tampered")
    fresh = Store(store.url, s3=store._s3_settings, cache_dir=tmp_path / "fresh-cache")
    with pytest.raises(DatasetHashMismatch) as info:
        fresh.fetch_dataset(uri, sha)
    assert info.value.expected == sha
    assert info.value.actual == hashlib.sha256(b"tampered").hexdigest()
    assert info.value.actual not in str(info.value)  # no hash oracle in the reason
    leftovers = list((tmp_path / "fresh-cache").glob("*")) if (tmp_path / "fresh-cache").exists() else []
    assert leftovers == []  # nothing unverified is kept


def test_fetch_dataset_missing(store: Store) -> None:
    sha = "0" * 64
    with pytest.raises(DatasetNotFound):
        store.fetch_dataset(store.uri(f"datasets/{sha}.nc"), sha)


def test_fetch_dataset_reads_only_the_content_address(store: Store, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    path = _dataset_file(tmp_path / "elsewhere" / "mine.nc")
    sha = sha256_file(path)
    for uri in (f"file://{path}", f"file://{tmp_path}/nope.nc", "file:///etc/passwd"):
        with pytest.raises(DatasetNotAllowed) as info:
            store.fetch_dataset(uri, sha)
        assert str(info.value) == DatasetNotAllowed.MESSAGE  # the same whether or not the target exists
    uri, _ = store.upload_dataset(path)
    assert uri == store.dataset_uri(sha)
    assert store.fetch_dataset(uri, sha).read_bytes() == path.read_bytes()


def test_dataset_roots_allow_embedded_reads_under_them_only(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    path = _dataset_file(root / "mine.nc")
    sha = sha256_file(path)
    (root / "escape.nc").symlink_to("/etc/passwd")
    store = Store(str(tmp_path / "store"), cache_dir=tmp_path / "cache", dataset_roots=[str(root)])
    assert store.fetch_dataset(f"file://{path}", sha) == path
    with pytest.raises(DatasetHashMismatch):
        store.fetch_dataset(f"file://{path}", "1" * 64)
    with pytest.raises(DatasetNotFound):
        store.fetch_dataset(f"file://{root}/nope.nc", sha)
    for outside in (f"file://{root}/../store/x.nc", f"file://{root}/escape.nc", f"file://{root}"):
        with pytest.raises(DatasetNotAllowed):
            store.fetch_dataset(outside, sha)
    store.discard_dataset(sha)  # touches only the store's content address
    assert path.exists()


@pytest.mark.integration
def test_s3_dataset_cache_is_reused(s3_settings: Settings, tmp_path: Path) -> None:
    store = Store.from_settings(s3_settings, cache_dir=tmp_path / "cache")
    uri, sha = store.upload_dataset(_dataset_file(tmp_path / "d.nc"))
    local = store.fetch_dataset(uri, sha)
    assert local.parent == tmp_path / "cache"
    store.delete(uri)
    assert store.fetch_dataset(uri, sha) == local  # verified cached copy, no download


# -- backend selection and failures --------------------------------------------


def test_from_settings_picks_the_backend(settings: Settings) -> None:
    store = Store.from_settings(settings)
    assert store.scheme == "file"
    assert store.url == settings.storage_url
    s3 = Store.from_settings(
        Settings(storage_url="s3://bucket/prefix", s3=S3Settings(secret_access_key="hunter2"))
    )
    assert s3.scheme == "s3"
    assert s3.uri("datasets/x.nc") == "s3://bucket/prefix/datasets/x.nc"
    assert s3.key_of("s3://bucket/prefix/datasets/x.nc") == "datasets/x.nc"
    assert "hunter2" not in repr(s3)


def test_unreachable_s3_raises_storage_unavailable_quickly(tmp_path: Path) -> None:
    secret = "sup3r-s3cret-value"
    nowhere = S3Settings(
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id="testing",
        secret_access_key=secret,
        region="us-east-1",
    )

    def expect_unavailable(call, limit_s: float) -> None:
        start = time.monotonic()
        with pytest.raises(StorageUnavailable) as info:
            call()
        elapsed = time.monotonic() - start
        assert elapsed < limit_s, f"took {elapsed:.1f} s"
        assert "s3://calq-bucket/calq" in str(info.value)
        assert secret not in str(info.value)

    # Default retries: 3 attempts, backoff under 1 s then under 2 s.
    store = Store("s3://calq-bucket/calq", s3=nowhere, cache_dir=tmp_path / "cache")
    expect_unavailable(lambda: store.get_bytes("a.bin"), limit_s=6)

    # Every operation maps the failure the same way (one attempt, to stay fast).
    once = Store("s3://calq-bucket/calq", s3=nowhere, cache_dir=tmp_path / "cache", max_attempts=1)
    for call in (
        lambda: once.exists("a.bin"),
        lambda: once.put_bytes("a.bin", b"x"),
        lambda: once.list("posteriors"),
        lambda: once.get_inference_data(posterior_key("intermediate", "j")),
        lambda: once.fetch_dataset(once.dataset_uri("0" * 64), "0" * 64),
    ):
        expect_unavailable(call, limit_s=3)


# -- Redis fixture -------------------------------------------------------------


@pytest.mark.integration
def test_redis_server_answers(redis_server, redis_url: str) -> None:
    import redis

    assert redis_url == redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping() is True
        assert client.dbsize() == 0  # flushed for this test
        client.set("calq:probe", "1")
        assert client.get("calq:probe") == b"1"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert client.config_get("save")["save"] == ""
    finally:
        client.close()
