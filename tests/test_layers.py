"""The package layers are a checked contract, not a convention.

``shared`` stacks contract → storage → data → stats → fit → jobs: a module may
import its own layer and the ones before it, never a later one. ``producer``
and ``worker`` sit on top and never import each other; ``shared`` imports
neither. JAX is imported only from the fit layer up (checked in a fresh
interpreter, so the test sees real import side effects, lazy imports aside).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["contract", "storage", "data", "stats", "fit", "jobs"]
BELOW_FIT = LAYERS[: LAYERS.index("fit")]


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "shared" or len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_itself_and_the_layers_before_it(layer):
    own = LAYERS.index(layer)
    offences = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in _modules(f"shared/{layer}")
        for module in _imports(path)
        if (other := _layer_of(module)) is not None and other > own
    ]
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("shared", ("producer", "worker")), ("producer", ("worker",)), ("worker", ("producer",))],
)
def test_producer_and_worker_never_import_each_other(package, forbidden):
    offences = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in _modules(package)
        for module in _imports(path)
        if module.split(".")[0] in forbidden
    ]
    assert not offences, "\n".join(offences)


def test_every_shared_module_lives_in_a_layer():
    loose = [p.name for p in (ROOT / "shared").glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside the layers: {loose}"
    assert sorted(p.name for p in (ROOT / "shared").iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)


def test_the_layers_below_fit_never_import_jax():
    modules = [
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for layer in BELOW_FIT
        for path in _modules(f"shared/{layer}")
    ]
    modules = [m.removesuffix(".__init__") for m in modules]
    result, heavy = _loaded_after(f"import importlib\nfor m in {modules!r}: importlib.import_module(m)\n",
                                  ("jax", "jaxlib", "numpyro"))
    assert result.returncode == 0, result.stderr
    assert heavy == [], f"imported below the fit layer: {heavy}"


def test_no_producer_module_imports_the_cli_back():
    """``producer.cli`` is the top: commands print through :mod:`producer.console`, never through the CLI module."""
    offences = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in _modules("producer")
        if path.name != "cli.py"
        for module in _imports(path)
        if module == "producer.cli" or module.startswith("producer.cli.")
    ]
    assert not offences, "\n".join(offences)


def test_the_supervisor_imports_no_celery():
    """The supervisor speaks to its children through :mod:`worker.protocol`; Celery is its children's alone."""
    result, heavy = _loaded_after("import worker.supervisor, worker.protocol, worker.exit_codes\n", ("celery", "kombu", "jax"))
    assert result.returncode == 0, result.stderr
    assert heavy == [], f"imported by worker.supervisor: {heavy}"


def test_calq_fleet_reads_no_dataset_so_imports_no_xarray():
    """``calq fleet --json`` reads Redis only: the registry and the store it passes through import no xarray (~1 s)."""
    code = (
        "import sys\n"
        "sys.argv = ['calq', 'fleet', '--json']\n"
        "from producer.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
    )
    environ = {**os.environ, "CALQ_BROKER_URL": "redis://127.0.0.1:1/0"}  # nobody listens: it fails after importing
    result, heavy = _loaded_after(code, ("xarray", "pandas", "arviz"), env=environ)
    assert "BrokerUnavailable" in result.stderr, result.stderr[-2000:]  # it got as far as reaching Redis
    assert heavy == [], f"imported by calq fleet: {heavy}"


def _loaded_after(code: str, watched: tuple[str, ...], *, env: dict[str, str] | None = None):
    """Run ``code`` in a fresh interpreter: its result, and which of ``watched`` it left imported (sorted)."""
    report = f"import sys\nprint('loaded:' + ','.join(sorted(m for m in {watched!r} if m in sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", code + report], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("loaded:")]
    loaded = lines[-1].removeprefix("loaded:") if lines else "(the code did not finish)"
    return result, [m for m in loaded.split(",") if m]
