"""worker.device: the process-start check that a GPU worker runs on a GPU."""

from __future__ import annotations


def test_device_check_catches_a_cpu_run_that_wanted_a_gpu():
    from worker.device import device_problem

    # Tests run JAX on the CPU (conftest): fine for a CPU worker, wrong for a GPU one.
    assert device_problem({"JAX_PLATFORMS": "cpu"}) is None
    problem = device_problem({"JAX_PLATFORMS": "cuda"})
    assert problem is not None and "cuda" in problem


def test_device_check_reports_a_backend_that_cannot_start(monkeypatch):
    import jax

    from worker.device import device_problem

    def broken() -> list:
        raise AssertionError()  # what JAX 0.10 raises for JAX_PLATFORMS=cuda without a CUDA plugin

    monkeypatch.setattr(jax, "devices", broken)
    problem = device_problem({"JAX_PLATFORMS": "cuda"})
    assert problem is not None and "could not initialise the cuda backend" in problem
