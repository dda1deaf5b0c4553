"""The README followed literally works as written (issue 22): "Using it", then "The fleet" on the same store.

The shell blocks are read from README.md, never copied here, so the README
cannot rot. A test changes only what it must, and says so:

- ``HOME`` is the test's folder, so ``~/calq-scratch`` is a scratch folder of
  the test's own;
- the sampler is tiny and convergence lenient (``CALQ_SAMPLER__*``,
  ``CALQ_CONVERGENCE__*``): these commands are checked for working, not for
  their statistics;
- the fleet's Redis is the suite's own redis-server on a free port (the
  README's ``redis-server ... &`` line is dropped, its URL replaced), and its
  worker is :func:`tests.services.calq_worker` in the same folder (the
  README's ``calq worker ... &`` line is dropped).

Each block runs in one bash, command after command (``cd`` and ``JOB=`` carry
over), and every command must exit 0: the first that does not fails the test,
named with what it printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import calq_environ, calq_worker

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: Small, but converged by these criteria (``calq report --latest`` needs a converged fit): two chains, for R-hat.
TINY = {"CALQ_SAMPLER__WARMUP": "100", "CALQ_SAMPLER__SAMPLES": "100", "CALQ_SAMPLER__CHAINS": "2",
        "CALQ_CONVERGENCE__MIN_ESS_BULK": "5", "CALQ_CONVERGENCE__MAX_RHAT": "1.5",
        "CALQ_CONVERGENCE__MAX_DIVERGENCES": "50", "CALQ_CONVERGENCE__MAX_ATTEMPTS": "2"}
#: The README's own Redis URL, replaced by the suite's server.
README_REDIS = "redis://localhost:6379/0"

pytestmark = pytest.mark.slow  # every command of the README, fits included: minutes on 2 cores


def section(title: str) -> str:
    """The README's text under ``## title``, up to the next second-level heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def commands(text: str) -> list[str]:
    """The commands of the first bash block in ``text``: continuation lines joined, comment-only lines left out."""
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    found: list[str] = []
    pending = ""
    for line in block.splitlines():
        pending += line
        if line.endswith("\\"):
            pending += "\n"
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            found.append(pending)
        pending = ""
    return found


def environment(home: Path, **extra: str) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # calq and python, as the README's install left them
    return calq_environ(HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", COLUMNS="120",
                        **TINY, **extra)


def run_in_order(script: list[str], *, environ: dict[str, str], cwd: Path, timeout: float) -> None:
    """Run ``script``'s commands in one bash; fail naming the first that does not exit 0, with its output."""
    lines = []
    for i, command in enumerate(script):
        lines += [f"echo '::: {i}' >&2", command,
                  f"rc=$?; [ $rc -eq 0 ] || {{ echo \"::: {i} exited $rc\" >&2; exit 97; }}"]
    result = subprocess.run(["bash", "-c", "\n".join(lines)], env=environ, cwd=cwd, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        failed = re.search(r"::: (\d+) exited (\d+)", result.stderr)
        which = script[int(failed.group(1))] if failed else "(the shell itself)"
        out = result.stderr.rsplit(f"::: {failed.group(1)}\n", 1)[-1] if failed else result.stderr
        pytest.fail(f"README command failed: {which}\n{out[-3000:]}\nstdout: {result.stdout[-2000:]}")


def fleet_commands(url: str) -> list[str]:
    """The fleet section's commands, with the suite's Redis and worker in place of the README's background ones."""
    kept = []
    dropped = {"redis-server": 0, "calq worker": 0}
    for command in commands(section("The fleet")):
        starts = next((name for name in dropped if command.startswith(name) and command.split("#")[0].rstrip()
                       .endswith("&")), None)
        if starts:
            dropped[starts] += 1
            continue
        kept.append(command.replace(README_REDIS, url))
    assert dropped == {"redis-server": 1, "calq worker": 1}, dropped  # the README still starts both this way
    assert sum(url in c for c in kept) == 1  # and sets CALQ_BROKER_URL to its own Redis, once
    return kept


def test_the_readme_blocks_are_what_this_test_runs():
    using = commands(section("Using it"))
    assert using[0].startswith("mkdir -p ~/calq-scratch && cd ~/calq-scratch")
    assert not any("<" in c.split("#")[0] for c in using), "a placeholder a newcomer cannot type as written"
    assert any(c.startswith("calq evaluate") for c in using)
    assert any(c.startswith("calq wait $JOB") for c in fleet_commands("redis://127.0.0.1:1/0"))


@pytest.mark.integration
def test_the_readme_followed_literally_works(tmp_path, redis_url):
    environ = environment(tmp_path)
    run_in_order(commands(section("Using it")), environ=environ, cwd=tmp_path, timeout=1500)
    scratch = tmp_path / "calq-scratch"
    for written in ("season.nc", "hard.nc", "forecasts.html", "fit.html", "fit.md", "latest.html", "evaluation.html"):
        assert (scratch / written).is_file(), written
    assert not (tmp_path / "calq-store").exists()  # everything went to the scratch folder

    fleet = environment(tmp_path, CALQ_BROKER_URL=redis_url)
    with calq_worker(fleet, scratch):
        run_in_order(fleet_commands(redis_url), environ=environ, cwd=scratch, timeout=600)
