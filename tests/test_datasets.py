"""shared.jobs.datasets: a verified dataset is decoded once for job after job, and only for the same bytes."""

from __future__ import annotations

import xarray as xr

from shared.contract.settings import DataLimits
from shared.data.dataset import save_dataset
from shared.data.synth import synthesize
from shared.jobs import datasets


def test_the_same_verified_bytes_are_decoded_once(tmp_path, monkeypatch):
    path = save_dataset(synthesize(seasons=1, scenarios=50, seed=1), tmp_path / "d.nc")
    reads = []
    real = datasets.open_dataset
    monkeypatch.setattr(datasets, "open_dataset", lambda *a, **k: reads.append(a) or real(*a, **k))
    limits = DataLimits()
    first = datasets.decoded(path, sha256="a" * 64, limits=limits, label="d")
    assert datasets.decoded(path, sha256="a" * 64, limits=limits, label="d") is first
    assert len(reads) == 1
    xr.testing.assert_identical(datasets.decoded(path, sha256="b" * 64, limits=limits, label="d"), first)
    datasets.decoded(path, sha256="b" * 64, limits=DataLimits(max_chains=2), label="d")  # other limits: read again
    assert len(reads) == 3


def test_a_large_dataset_is_not_kept(tmp_path, monkeypatch):
    path = save_dataset(synthesize(seasons=1, scenarios=50, seed=1), tmp_path / "d.nc")
    monkeypatch.setattr(datasets, "MAX_KEPT_BYTES", 1)
    first = datasets.decoded(path, sha256="c" * 64, limits=DataLimits(), label="d")
    assert datasets.decoded(path, sha256="c" * 64, limits=DataLimits(), label="d") is not first


def test_the_kept_dataset_is_validated_once_per_archetype_and_events(tmp_path, monkeypatch):
    """The contract check of the same verified bytes runs once per job's choices; its refusals are never kept;
    a dataset that is not the kept one is checked every time."""
    import pytest

    from shared.contract.errors import InvalidDataset
    from shared.contract.job import CalibrationJob

    ds = synthesize(seasons=1, scenarios=50, seed=1)
    path = save_dataset(ds.isel(race=ds["archetype"].values != "road_course"), tmp_path / "d.nc")
    checks = []
    real = datasets.validate
    monkeypatch.setattr(datasets, "validate", lambda *a, **k: checks.append(k["archetype"]) or real(*a, **k))

    def job(archetype, events=("top_5", "top_10")):
        return CalibrationJob(archetype=archetype, dataset_uri="file:///d.nc", dataset_sha256="d" * 64, events=events)

    kept = datasets.decoded(path, sha256="d" * 64, limits=DataLimits(), label="d")
    for _ in range(3):
        datasets.validated(kept, job("intermediate"))
    assert checks == ["intermediate"]
    datasets.validated(kept, job("intermediate", events=("top_5",)))
    assert len(checks) == 2
    for _ in range(2):  # a refusal (no races of this archetype) is found every time
        with pytest.raises(InvalidDataset):
            datasets.validated(kept, job("road_course"))
    assert len(checks) == 4
    other = kept.copy()
    for _ in range(2):
        datasets.validated(other, job("intermediate"))
    assert len(checks) == 6
    datasets.decoded(path, sha256="e" * 64, limits=DataLimits(), label="d")  # other bytes kept: checked anew
    datasets.validated(datasets.decoded(path, sha256="e" * 64, limits=DataLimits(), label="d"), job("intermediate"))
    assert len(checks) == 7
