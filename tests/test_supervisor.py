"""worker.supervisor: the plan (pure) and a real Supervisor over tiny fake children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from shared.fit.device import HOST_DEVICES
from worker.exit_codes import WorkerExit
from worker.protocol import SUPERVISOR_PID_ENV, stop_reason
from worker.supervisor import (
    Supervisor,
    WorkerSpec,
    _exit_text,
    detect_gpus,
    oom_kills,
    plan_workers,
)

ROOT = Path(__file__).resolve().parents[1]
HOST_FLAG = "--xla_force_host_platform_device_count"


# -- plan_workers ----------------------------------------------------------------


def test_none_plans_cpu_workers():
    specs = plan_workers("none", queues=None, visible=None, cpu_workers=2, hostname="box", environ={})
    assert [s.name for s in specs] == ["calq-cpu0@box", "calq-cpu1@box"]
    for spec in specs:
        assert spec.gpu is None
        assert spec.queues == ("calq.cpu",)
        assert spec.env["JAX_PLATFORMS"] == "cpu"
        assert spec.env["CUDA_VISIBLE_DEVICES"] == ""
        assert spec.env["XLA_FLAGS"] == f"{HOST_FLAG}={HOST_DEVICES}"
        argv = list(spec.argv)
        assert argv[:6] == [sys.executable, "-m", "celery", "-A", "worker.tasks", "worker"]
        assert argv[argv.index("--pool") + 1] == "solo"
        assert argv[argv.index("--concurrency") + 1] == "1"
        assert argv[argv.index("--hostname") + 1] == spec.name
        assert argv[argv.index("-Q") + 1] == "calq.cpu,calq.cpu.batch"  # interactive first, then batch


def test_an_operators_own_gpu_memory_share_is_left_alone():
    (spec,) = plan_workers("0", hostname="box", environ={"XLA_CLIENT_MEM_FRACTION": "0.5"})
    assert "XLA_CLIENT_MEM_FRACTION" not in spec.env and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in spec.env


def test_gpu_list_plans_one_pinned_worker_per_gpu():
    specs = plan_workers("0,1", queues=None, visible=None, hostname="box", environ={"XLA_FLAGS": f"{HOST_FLAG}=8"})
    assert [(s.name, s.gpu) for s in specs] == [("calq-gpu0@box", "0"), ("calq-gpu1@box", "1")]
    for spec in specs:
        assert spec.queues == ("calq.gpu", "calq.cpu")
        assert spec.env["CUDA_VISIBLE_DEVICES"] == spec.gpu
        assert spec.env["JAX_PLATFORMS"] == "cuda"
        assert spec.env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
        assert spec.env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
        assert "XLA_CLIENT_MEM_FRACTION" not in spec.env  # with both names set, JAX 0.11's CUDA backend does not start
        assert HOST_FLAG not in spec.env["XLA_FLAGS"]  # inherited host-device forcing removed
        argv = list(spec.argv)
        assert argv[argv.index("-Q") + 1] == "calq.gpu,calq.cpu,calq.gpu.batch,calq.cpu.batch"
        assert argv[argv.index("--hostname") + 1] == spec.name


def test_auto_uses_visible_gpus():
    specs = plan_workers("auto", queues=None, visible=["0", "1", "2"], hostname="box", environ={})
    assert [s.gpu for s in specs] == ["0", "1", "2"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "1", "2"]
    assert specs[2].name == "calq-gpu2@box"


def test_auto_without_gpus_falls_back_to_cpu():
    specs = plan_workers("auto", queues=None, visible=[], hostname="box", environ={})
    assert [(s.name, s.gpu, s.queues) for s in specs] == [("calq-cpu0@box", None, ("calq.cpu",))]


def test_auto_detects_with_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    specs = plan_workers("auto", queues=None, visible=None, hostname="box", environ={})
    assert [s.gpu for s in specs] == ["0", "1"]


def test_detect_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    assert detect_gpus({}) == []
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    broken = tmp_path / "nvidia-smi"
    broken.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    broken.chmod(0o755)
    assert detect_gpus({}) == []


def test_queues_override():
    specs = plan_workers("0", queues=["gpu"], visible=None, hostname="box", environ={})
    assert specs[0].queues == ("calq.gpu",)
    specs = plan_workers("none", queues=["cpu,gpu"], visible=None, hostname="box", environ={})
    assert specs[0].queues == ("calq.cpu", "calq.gpu")


@pytest.mark.parametrize(
    ("gpus", "kw", "match"),
    [
        ("0,,1", {}, "invalid GPU list"),
        ("", {}, "invalid GPU list"),
        ("x", {}, "invalid GPU"),
        ("-1", {}, "invalid GPU"),
        ("1,1", {}, "more than once"),
        ("0", {"queues": ["tpu"]}, "unknown queue"),
        ("0", {"queues": []}, "queues is empty"),
        ("none", {"cpu_workers": 0}, "cpu_workers"),
    ],
)
def test_invalid_specs(gpus, kw, match):
    with pytest.raises(ValueError, match=match):
        plan_workers(gpus, **{"queues": None, "visible": None, "hostname": "box", "environ": {}, **kw})


# -- Supervisor with fake children -----------------------------------------------

# A stand-in for a Celery worker: records its start, then behaves as told.
CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    log, mode = sys.argv[1], sys.argv[2]
    def note(word):
        with open(log, "a") as f:
            f.write(f"{word} {os.getpid()}\\n")
    starts = sum(1 for line in open(log) if line.startswith("start")) if os.path.exists(log) else 0
    note("start")
    if mode == "crash-once" and starts == 0:
        sys.exit(3)
    if mode == "device-error":
        sys.exit(int(sys.argv[3]))
    def on_term(*_):
        note("term")
        if mode not in ("ignore-term", "ignore-all"):
            sys.exit(0)
    def on_hand_back(*_):
        note("handback")
        sys.exit(1)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR2, on_hand_back)
    if mode == "ignore-all":
        signal.signal(signal.SIGUSR2, lambda *_: note("ignored"))
    note("ready")
    while True:
        time.sleep(0.05)
    """
)


def fake_spec(name: str, log: Path, mode: str = "sleep", *extra: str) -> WorkerSpec:
    return WorkerSpec(name, None, ("calq.cpu",), {"CALQ_FAKE": name}, (sys.executable, "-c", CHILD, str(log), mode, *extra))


def lines(log: Path) -> list[str]:
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def start(sup: Supervisor) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(sup.run()), daemon=True)
    thread.start()
    assert sup.wait_started(10)
    return thread, result


def test_a_child_that_dies_is_restarted(tmp_path):
    log = tmp_path / "child.log"
    sup = Supervisor([fake_spec("w0", log, "crash-once")], restart_backoff_s=(0.05, 0.2), poll_s=0.02)
    thread, result = start(sup)
    try:
        wait_for(lambda: lines(log).count("ready") == 1)
        assert lines(log)[:2] == ["start", "start"]  # crashed, then started again
        assert sup.children[0].restarts == 1
    finally:
        sup.stop()
        thread.join(10)
    assert result == [0]
    assert lines(log)[-1] == "term"


def test_stop_sends_sigterm_to_every_child_and_returns(tmp_path):
    logs = [tmp_path / f"w{i}.log" for i in range(3)]
    sup = Supervisor([fake_spec(f"w{i}", log) for i, log in enumerate(logs)], poll_s=0.02)
    thread, result = start(sup)
    wait_for(lambda: all("ready" in lines(log) for log in logs))
    pids = list(sup.pids.values())
    sup.stop()
    thread.join(10)
    assert not thread.is_alive() and result == [0]
    for log in logs:
        assert lines(log) == ["start", "ready", "term"]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped, not just signalled


def test_second_stop_is_a_cold_shutdown(tmp_path):
    log = tmp_path / "stubborn.log"
    sup = Supervisor([fake_spec("w0", log, "ignore-term")], poll_s=0.02, kill_after_s=5)
    thread, result = start(sup)
    wait_for(lambda: "ready" in lines(log))
    sup.stop()
    wait_for(lambda: "term" in lines(log))
    assert thread.is_alive()  # warm shutdown waits for the "job"
    sup.stop()
    thread.join(10)
    assert result == [1]
    assert lines(log)[-1] == "handback"  # the hand-back signal, never Celery's SIGQUIT (it fails the job)


def test_a_child_that_ignores_the_cold_shutdown_is_killed(tmp_path):
    log = tmp_path / "deaf.log"
    sup = Supervisor([fake_spec("w0", log, "ignore-all")], poll_s=0.02, kill_after_s=0.5)
    thread, result = start(sup)
    wait_for(lambda: "ready" in lines(log))
    sup.stop(force=True)
    thread.join(10)
    assert result == [1]
    assert sorted(lines(log)[2:]) == ["ignored", "term"]  # both asked (in either order), then killed


def test_children_know_their_supervisor(tmp_path):
    out = tmp_path / "env.txt"
    code = f"import os; open({str(out)!r}, 'w').write(os.environ[{SUPERVISOR_PID_ENV!r}] + ' ' + str(os.getppid()))"
    sup = Supervisor([WorkerSpec("w0", None, ("calq.cpu",), {}, (sys.executable, "-c", code))], poll_s=0.02,
                     restart_backoff_s=(5, 5))
    thread, _ = start(sup)
    try:
        wait_for(out.exists)
        wait_for(lambda: len(out.read_text().split()) == 2)
        told, parent = out.read_text().split()
        assert told == parent  # the child's check: a different parent means the supervisor is gone
    finally:
        sup.stop()
        thread.join(10)
    assert stop_reason({SUPERVISOR_PID_ENV: str(os.getppid())}) is None
    assert "supervisor is gone" in stop_reason({SUPERVISOR_PID_ENV: "1"})
    assert stop_reason({}) is None


def test_only_the_kernel_makes_a_kill_out_of_memory(tmp_path):
    assert _exit_text(-9) == "was killed by SIGKILL (signal 9)"
    assert "OOM killer" in _exit_text(-9, oom_killed=True)
    assert _exit_text(-15) == "was killed by SIGTERM"
    assert _exit_text(3) == "exited with status 3"
    assert _exit_text(69) == "exited with status 69 (its device is not the one it was started for)"
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 0\noom 2\noom_kill 2\n")
    assert oom_kills([str(tmp_path / "missing"), str(events)]) == 2
    assert oom_kills([str(tmp_path / "missing")]) is None


def test_device_error_is_not_restarted(tmp_path):
    log = tmp_path / "gpu.log"
    sup = Supervisor(
        [fake_spec("w0", log, "device-error", str(int(WorkerExit.DEVICE_UNAVAILABLE)))],
        restart_backoff_s=(0.01, 0.05), poll_s=0.02,
    )
    thread, result = start(sup)
    thread.join(10)
    assert result == [1]  # nothing left to run
    assert lines(log) == ["start"]


def test_sigterm_to_the_supervisor_process_stops_every_child(tmp_path):
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_supervisor import fake_spec
        from worker.supervisor import Supervisor
        from pathlib import Path
        specs = [fake_spec("a", Path({str(logs[0])!r})), fake_spec("b", Path({str(logs[1])!r}))]
        sys.exit(Supervisor(specs, poll_s=0.02).run())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        wait_for(lambda: all("ready" in lines(log) for log in logs), timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for log in logs:
        assert lines(log) == ["start", "ready", "term"]
