"""Hostile datasets: outcome, time and peak memory of each, as a worker meets them (issues 8 and 16).

    python bench/hostile.py [--json OUT]

Every case runs in a fresh child process (so its peak memory is its own,
read from ``os.wait4``'s rusage): the file is put in a local store at its
content address and a job on it goes through the worker's own handler
(:func:`shared.jobs.handle.process` → fetch, header limits, load, validate),
which refuses it before any sampling. Reported per case: the final state,
the reason's first line, the wall time of the job inside the child (``job
s``) and the child's peak RSS. ``baseline`` is a child that only imports
what the handler imports (JAX included), so the marginal memory of a case
is its peak minus the baseline's. The header-only path (``limits.check_file``,
what ``calq report`` and a worker run before decoding) is timed for the
largest declared file on its own.

Targets (issue 8): a file declaring 50 GB is refused in under 2 s and under
300 MB of memory. Writes JSON (default ``bench/results/hostile.json``).
Timings on a shared 2-core machine are noisy: say so next to any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "bench" / "results" / "hostile.json"
TARGETS = {"declares 51 GB (2 × f8 [800, 20000, 200])": {"job_s": 2.0, "marginal_mb": 300.0}}

CHILD = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    from pathlib import Path
    import shared.jobs.run  # what a worker has imported before its first job (JAX, NumPyro, ArviZ)
    from shared.contract.job import CalibrationJob, SamplerSettings
    from shared.contract.settings import Settings
    from shared.jobs.handle import Delivery, process
    from shared.jobs.services import Services
    from shared.jobs.registry import StoreRegistry
    from shared.storage.store import Store, dataset_key

    mode, path, store_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    settings = Settings(storage_url=store_dir, compile_cache_dir=None)
    if mode == "baseline":
        print(json.dumps({"state": "-", "reason": "imports only", "job_s": 0.0}))
        sys.exit(0)
    store = Store.from_settings(settings, cache_dir=Path(store_dir) / "cache")
    registry = StoreRegistry(store)
    sha = "0" * 64
    if mode == "store":  # put the file at its content address, as an upload does (a FIFO/folder is made there)
        p = Path(path)
        if p.is_file():
            uri, sha = store.upload_dataset(p)
        else:
            sha = hashlib.sha256(path.encode()).hexdigest()
            target = Path(store._root) / dataset_key(sha)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.mkfifo(target) if path.endswith(".fifo") else target.mkdir()
        uri = store.dataset_uri(sha)
    else:  # mode == "uri": the job names this URI itself
        uri = path
    job = CalibrationJob(archetype="all", dataset_uri=uri, dataset_sha256=sha,
                         sampler=SamplerSettings(warmup=10, samples=10, chains=1))
    registry.claim(job)
    start = time.perf_counter()
    result = process(Services(settings, store, registry), Delivery(job.to_message(), worker="bench"))
    took = time.perf_counter() - start
    reason = (result.get("reason") or "").splitlines()
    detail = next((line.strip(" -") for line in reason[1:] if line.strip()), reason[0] if reason else "")
    state = result.get("state") or ("succeeded" if "converged" in result else "?")  # a summary on success
    print(json.dumps({"state": state, "reason": detail or f"converged={result.get('converged')}", "job_s": took}))
    """
)

HEADER_ONLY = textwrap.dedent(
    """
    import json, sys, time
    from shared.contract.errors import InvalidDataset
    from shared.contract.settings import DataLimits
    from shared.data.limits import check_file
    start = time.perf_counter()
    try:
        check_file(sys.argv[1], DataLimits())
        outcome = "accepted"
    except InvalidDataset as exc:
        outcome = exc.problems[0]
    print(json.dumps({"state": "rejected", "reason": outcome, "job_s": time.perf_counter() - start}))
    """
)


def run_child(code: str, *args: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; its JSON line plus its own peak RSS (MB)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("CALQ_")}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=ROOT)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return {"state": f"crashed ({proc.returncode})", "reason": err.decode()[-300:], "job_s": None,
                "peak_mb": usage.ru_maxrss / 1024}
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    return result


def make_cases(tmp: Path) -> list[tuple[str, str, str]]:
    """(name, mode, path) for every case; files are written under ``tmp``."""
    import netCDF4
    import numpy as np

    from shared.data.dataset import save_dataset
    from shared.data.synth import synthesize

    def declared(name: str, dims: dict[str, int], dtype: str, variables: tuple[str, ...]) -> str:
        path = tmp / name
        with netCDF4.Dataset(path, "w") as nc:
            for dim, size in dims.items():
                nc.createDimension(dim, size)
            for var in variables:
                nc.createVariable(var, dtype, tuple(dims), zlib=True,
                                  chunksizes=(1, min(dims["scenario"], 1000), dims["driver"]))
        return str(path)

    base = synthesize(seasons=1, scenarios=1000, seed=0)
    valid = save_dataset(base, tmp / "valid.nc")
    data = valid.read_bytes()
    (tmp / "truncated.nc").write_bytes(data[: len(data) // 2])
    (tmp / "empty.nc").write_bytes(b"")
    (tmp / "garbage.nc").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(20_000))
    tracks = base["track"].values.astype(object)
    tracks[0] = "T" * 10_000_000
    save_dataset(base.assign_coords(track=("race", tracks)), tmp / "long-name.nc")
    tracks[0] = "Zzqqtrack"
    named = save_dataset(base.assign_coords(track=("race", tracks)), tmp / "named.nc").read_bytes()
    i = named.index(b"Zzqqtrack")
    (tmp / "non-utf8.nc").write_bytes(named[:i] + b"Zzq\xfftrack" + named[i + 9:])
    base.to_netcdf(tmp / "group.nc", group="forecast", engine="netcdf4")
    save_dataset(base.isel(scenario=[0]), tmp / "one-scenario.nc")
    inf = base.copy(deep=True)
    r, s, d = np.argwhere(~np.isnan(inf["sim_points"].values))[0]
    inf["sim_points"].values[r, s, d] = np.inf
    save_dataset(inf, tmp / "inf.nc")
    issue_16 = _issue_16_files(base, tmp)
    return [
        ("baseline", "baseline", "-"),
        ("declares 51 GB (2 × f8 [800, 20000, 200])", "store",
         declared("51gb.nc", {"race": 800, "scenario": 20_000, "driver": 200}, "f8", ("sim_position", "sim_points"))),
        ("declares f4 [36, 200000, 46] (issue: 23 s, 3 GB)", "store",
         declared("3gb.nc", {"race": 36, "scenario": 200_000, "driver": 46}, "f4", ("sim_position",))),
        ("10 MB track name", "store", str(tmp / "long-name.nc")),
        ("non-UTF-8 track name", "store", str(tmp / "non-utf8.nc")),
        ("data inside a NetCDF group", "store", str(tmp / "group.nc")),
        ("scenario axis of 1", "store", str(tmp / "one-scenario.nc")),
        ("+inf in sim_points", "store", str(tmp / "inf.nc")),
        ("truncated file", "store", str(tmp / "truncated.nc")),
        ("empty file", "store", str(tmp / "empty.nc")),
        ("HDF5 signature + random bytes", "store", str(tmp / "garbage.nc")),
        ("FIFO at the content address", "store", str(tmp / "x.fifo")),
        ("folder at the content address", "store", str(tmp / "x.dir")),
        ("file:///proc/self/environ", "uri", "file:///proc/self/environ"),
        ("file:///etc/passwd", "uri", "file:///etc/passwd"),
        ("file://host/etc/passwd", "uri", "file://host/etc/passwd"),
        ("store/../../etc/passwd", "uri", "file://" + str(tmp / "store" / "datasets" / ".." / ".." / "etc" / "passwd")),
        *issue_16,
        ("valid season, 1000 scenarios (loads; no race of 'all' is missing)", "store", str(valid)),
    ]


def _issue_16_files(base, tmp: Path) -> list[tuple[str, str, str]]:
    """Files that read outside themselves (built as tests/test_hostile_hdf5.py builds them), dates, char arrays."""
    import numpy as np

    from shared.data.dataset import save_dataset
    from tests.test_hostile_dates import dated
    from tests.test_hostile_hdf5 import external, external_link, filtered, rewritten, virtual
    from tests.test_hostile_names import as_chars

    plain = save_dataset(base, tmp / "plain.nc", compress=False)
    elsewhere = save_dataset(base, tmp / "elsewhere.nc")
    hdf5 = {
        "HDF5 external raw storage in /etc/passwd": external("/etc/passwd"),
        "HDF5 external raw storage in /proc/self/environ": external("/proc/self/environ"),
        "HDF5 external link to another dataset": external_link(str(elsewhere)),
        "HDF5 virtual dataset over another file": virtual(str(elsewhere)),
        "HDF5 lzf filter (id 32000)": filtered(compression="lzf"),
    }
    cases = [(name, "store", str(rewritten(plain, tmp / f"hdf5-{i}.nc", make))) for i, (name, make) in enumerate(hdf5.items())]
    future = save_dataset(dated(base, "2150-03-01", "2150-03-08"), tmp / "future.nc")
    tracks = base["track"].values.astype(object)
    tracks[3] = "T" * 20_001
    chars = as_chars(base.assign_coords(track=("race", np.asarray(tracks))), tmp / "chars.nc", "track")
    return [*cases, ("races dated 2150", "store", str(future)), ("20,001-char track as a char array", "store", str(chars))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="calq-hostile-") as tmp_dir:
        tmp = Path(tmp_dir)
        cases = make_cases(tmp)
        rows = []
        for name, mode, path in cases:
            store = tempfile.mkdtemp(prefix="store-", dir=tmp)
            result = run_child(CHILD, mode, path, store)
            rows.append({"case": name, **result})
        header = run_child(HEADER_ONLY, cases[1][2])
        rows.append({"case": "header check only: " + cases[1][0], **header})
    baseline = rows[0]["peak_mb"]
    for row in rows:
        row["marginal_mb"] = None if row is rows[-1] else row["peak_mb"] - baseline
    print(f"{'case':62} {'state':9} {'job s':>7} {'peak MB':>8} {'+MB':>6}  reason")
    for row in rows:
        job_s = "-" if row["job_s"] is None else f"{row['job_s']:.3f}"
        marginal = "-" if row["marginal_mb"] is None else f"{row['marginal_mb']:.0f}"
        print(f"{row['case'][:62]:62} {row['state'][:9]:9} {job_s:>7} {row['peak_mb']:8.0f} {marginal:>6}  "
              f"{str(row['reason'])[:110]}")
    verdicts = {}
    for name, target in TARGETS.items():
        row = next(r for r in rows if r["case"] == name)
        ok = (row["state"] == "rejected" and row["job_s"] < target["job_s"]
              and row["marginal_mb"] < target["marginal_mb"])
        verdicts[name] = {"target": target, "met": ok}
        print(f"target {name}: < {target['job_s']} s and < {target['marginal_mb']} MB above baseline: "
              f"{'met' if ok else 'NOT met'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                                 "note": "shared 2-core machine: timings are noisy"},
                                     "rows": rows, "targets": verdicts}, indent=2))
    hostile = [r for r in rows[1:-1] if r["job_s"] is not None and r["state"] == "rejected"]  # not the valid season
    worst = sorted(hostile, key=lambda r: r["job_s"], reverse=True)[:3]
    print("worst three by time: " + "; ".join(f"{r['case']} ({r['job_s']:.2f} s, {r['peak_mb']:.0f} MB peak)" for r in worst))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
