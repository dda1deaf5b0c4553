"""The wheel is what the Dockerfile installs: build it, install it non-editable, and use it.

The editable install the other tests use hides a missing subpackage; this test
does not. The wheel goes into a fresh virtual environment that borrows the test
environment's third-party packages (``--no-deps`` plus a ``.pth`` line), and
runs from a folder outside the checkout, so every import comes from the wheel.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def run(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, argv))} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtual environment with calq installed from its wheel; its bin folder."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a clean copy: a stale build/ folder in the checkout would hide a missing package
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "calq-store", ".pytest_cache", ".hypothesis"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), str(source)],
        cwd=root)
    (wheel,) = (root / "dist").glob("calq-*.whl")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    bin_dir = env_dir / "bin"
    python = bin_dir / "python"
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).strip())
    borrowed = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "borrowed-test-packages.pth").write_text("\n".join(borrowed) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)], cwd=root)
    return bin_dir


def clean_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALQ_") and k != "PYTHONPATH"}
    env.update(CALQ_STORAGE_URL=str(tmp / "store"), CALQ_COMPILE_CACHE_DIR="", JAX_PLATFORMS="cpu",
               CALQ_CONVERGENCE__MIN_ESS_BULK="10", CALQ_CONVERGENCE__MAX_RHAT="1.5", CALQ_CONVERGENCE__MAX_DIVERGENCES="20")
    return env


def test_every_module_imports_from_the_installed_wheel(installed, tmp_path):
    code = (
        "import importlib, pkgutil, sys\n"
        "names = []\n"
        "for top in ('shared', 'producer', 'worker'):\n"
        "    package = importlib.import_module(top)\n"
        "    assert package.__file__.startswith(sys.prefix), package.__file__\n"
        "    names.append(top)\n"
        "    names += [m.name for m in pkgutil.walk_packages(package.__path__, top + '.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    count = int(run([str(installed / "python"), "-c", code], cwd=tmp_path, env=clean_env(tmp_path)).strip())
    expected = sum(1 for package in ("shared", "producer", "worker") for _ in (ROOT / package).rglob("*.py"))
    assert count == expected


def test_the_installed_cli_runs_a_tiny_embedded_job(installed, tmp_path):
    env = clean_env(tmp_path)
    calq = str(installed / "calq")
    assert "calibrate" in run([calq, "--help"], cwd=tmp_path, env=env)
    run([calq, "synth", "tiny.nc", "--seasons", "1", "--scenarios", "100", "--seed", "3"], cwd=tmp_path, env=env)
    out = run([calq, "calibrate", "tiny.nc", "--archetype", "superspeedway", "--events", "top_5",
               "--warmup", "50", "--samples", "50", "--chains", "2", "--json"], cwd=tmp_path, env=env)
    assert '"archetype":"superspeedway"' in out.replace(" ", "")
    assert list((tmp_path / "store" / "posteriors" / "superspeedway").glob("*.nc"))
