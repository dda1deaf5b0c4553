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
