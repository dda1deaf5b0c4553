"""The newcomer's path (issue 22): every mistake is one line and exit 2, help tells the truth, output fits.

Each test runs ``calq`` as a person does (a subprocess in an empty folder,
embedded mode) and checks the exit code, the one line it says and that it
left nothing behind.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from producer.exit_codes import ExitCode
from shared.data.dataset import save_dataset
from shared.data.synth import synthesize
from tests.services import calq_environ, run_calq, start_calq

ROOT = Path(__file__).resolve().parents[1]


def calq(folder: Path, *args: str, extra: dict[str, str] | None = None, timeout: float = 120):
    """``calq *args`` in ``folder``, with only the CALQ_ variables in ``extra``."""
    return run_calq(calq_environ(**(extra or {})), folder, *args, check=False, timeout=timeout)


def one_line_usage(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, nothing on stdout, exactly one line on stderr holding every needle, no traceback."""
    assert result.returncode == ExitCode.USAGE, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stdout == ""
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def season(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("newcomer-data")
    ds = synthesize(seasons=1, scenarios=20, seed=3, drivers_per_race=8, pool_size=10)
    return save_dataset(ds, folder / "season.nc")


# -- 1. every usage mistake is one line and exit 2 ---------------------------------------------


def test_a_misspelt_archetype_is_one_line_with_did_you_mean_and_uploads_nothing(tmp_path, season):
    result = calq(tmp_path, "calibrate", str(season), "--archetype", "superspeedwy")
    one_line_usage(result, "unknown archetype 'superspeedwy'", "did you mean superspeedway?", "--archetype")
    assert list(tmp_path.iterdir()) == []  # no calq-store/: the typo is caught before the upload


def test_a_misspelt_lane_is_one_line_with_did_you_mean_and_uploads_nothing(tmp_path, season):
    one_line_usage(calq(tmp_path, "submit", str(season), "--archetype", "intermediate", "--lane", "bach"),
                   "unknown lane 'bach'", "did you mean batch?", "--lane")
    assert list(tmp_path.iterdir()) == []


def test_latest_of_a_misspelt_archetype_says_unknown_archetype_not_no_calibration_yet(tmp_path):
    line = one_line_usage(calq(tmp_path, "latest", "superspeedwy"), "unknown archetype", "did you mean superspeedway?")
    assert "no converged calibration" not in line
    one_line_usage(calq(tmp_path, "latest", "Intermediate"), "did you mean intermediate?")
    assert list(tmp_path.iterdir()) == []


def test_a_misspelt_event_is_one_line_with_did_you_mean(tmp_path, season):
    one_line_usage(calq(tmp_path, "calibrate", str(season), "--events", "top_5,top10"),
                   "unknown event 'top10'", "did you mean top_10?", "top_N")
    one_line_usage(calq(tmp_path, "latest", "intermediate", "--event", "top-5"), "did you mean top_5?")
    one_line_usage(calq(tmp_path, "backfill", str(season), "--from", "2024-03-01", "--to", "2024-04-01",
                        "--archetypes", "intermediate,roadcourse"), "did you mean road_course?")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_dataset_or_a_folder_is_a_usage_mistake_that_creates_no_store(tmp_path):
    for command in ("calibrate", "submit", "backfill", "evaluate"):
        extra = {"submit": ["--archetype", "intermediate"], "backfill": ["--from", "2024-01-01", "--to", "2024-02-01"],
                 "evaluate": ["--from", "2024-01-01", "--to", "2024-02-01"]}.get(command, [])
        one_line_usage(calq(tmp_path, command, "nowhere.nc", *extra), "'nowhere.nc' does not exist")
    (tmp_path / "folder.nc").mkdir()
    one_line_usage(calq(tmp_path, "calibrate", "folder.nc"), "is a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["folder.nc"]


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("CALQ_STORAGE_URL", "ftp://x/y", "storage scheme 'ftp'"),
        ("CALQ_STORAGE_URL", "s3://", "names a bucket"),
        ("CALQ_BROKER_URL", "http://nope", "a Redis URL starts with redis://"),
        ("CALQ_RESULT_BACKEND", "http://user:hunter2-secret@nope/0", "a Redis URL starts with redis://"),
    ],
)
def test_a_bad_url_is_one_line_naming_the_variable_and_calq_config_refuses_it(tmp_path, variable, value, needle):
    for args in (["config"], ["latest", "superspeedway"], ["jobs"]):
        line = one_line_usage(calq(tmp_path, *args, extra={variable: value}), variable, needle)
        assert "hunter2-secret" not in line  # a URL may hold a password: only its scheme is named
    assert list(tmp_path.iterdir()) == []


def test_a_bad_number_setting_names_its_variable(tmp_path):
    one_line_usage(calq(tmp_path, "config", extra={"CALQ_SAMPLER__WARMUP": "lots"}), "CALQ_SAMPLER__WARMUP")


def test_click_mistakes_are_one_line_too(tmp_path):
    one_line_usage(calq(tmp_path, "wait"), "calq wait: Missing argument", "(see 'calq wait --help')")
    one_line_usage(calq(tmp_path, "calibrte"), "No such command 'calibrte'")
    one_line_usage(calq(tmp_path, "apply", "x.nc", "--event", "top_5", "--p", "a,b"), "not a comma-separated list")


def test_an_unexpected_error_is_one_line_unless_debug(monkeypatch, capsys):
    from producer import cli

    def broken(**_):
        raise RuntimeError("something calq did not expect")

    monkeypatch.setattr(cli, "app", broken)
    monkeypatch.setattr(sys, "argv", ["calq", "config"])
    assert cli._run() == ExitCode.FAILED
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "RuntimeError: something calq did not expect" in said and "--debug" in said
    monkeypatch.setattr(cli, "_debug", True)
    with pytest.raises(RuntimeError, match="did not expect"):
        cli._run()


def test_typers_130_for_a_keyboard_interrupt_is_calqs_cancelled(monkeypatch):
    from producer import cli

    monkeypatch.setattr(cli, "app", lambda **_: 130)
    assert cli._run() == ExitCode.CANCELLED


def test_version(tmp_path):
    from importlib.metadata import version

    result = calq(tmp_path, "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"calq {version('calq')}"


# -- 2. --help that tells the truth ------------------------------------------------------------


def _commands() -> dict:
    """Every command and sub-command by the words that call it (``token create``), groups included."""
    import typer.main

    from producer.cli import app

    found = {}

    def walk(group, prefix: str) -> None:
        for name, command in group.commands.items():
            found[f"{prefix}{name}"] = command
            if hasattr(command, "commands"):
                walk(command, f"{prefix}{name} ")

    walk(typer.main.get_command(app), "")
    return found


def _help(*args: str) -> str:
    from typer.testing import CliRunner

    from producer.cli import app

    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_help_has_plain_names_no_flag_placeholders_and_no_rst():
    for name in ["", *_commands()]:
        text = _help(*name.split())
        assert "<bool>" not in text, (name, text)  # a flag takes no value
        assert "``" not in text, (name, text)  # no reST literals
        assert not re.search(r"\{[A-Za-z_.]+\}", text), (name, text)  # no {DATASET}, no unfilled {sampler.warmup}
    assert "Usage: calq calibrate [OPTIONS] DATASET" in _help("calibrate")
    assert "Usage: calq wait [OPTIONS] JOB_ID" in _help("wait")


def test_every_option_and_argument_is_described():
    for name, command in _commands().items():
        for param in command.params:
            assert (getattr(param, "help", None) or "").strip(), f"calq {name}: {param.name} has no help"


def test_help_shows_the_sampler_defaults_in_force(tmp_path):
    shown = calq(tmp_path, "calibrate", "--help", extra={"CALQ_SAMPLER__WARMUP": "77", "CALQ_SAMPLER__CHAINS": "3",
                                                         "COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "CALQ_SAMPLER__WARMUP, now 77" in shown.stdout and "CALQ_SAMPLER__CHAINS, now 3" in shown.stdout
    assert "500" not in shown.stdout  # the built-in default is not claimed


def test_synth_help_lists_every_regime():
    from shared.data.regimes import REGIMES

    text = " ".join(_help("synth").split())
    for name in REGIMES:
        assert name in text


def test_version_debug_and_completion_are_offered():
    text = _help()
    for option in ("--version", "--debug", "--install-completion", "--show-completion"):
        assert option in text


# -- 3. output that fits the terminal ----------------------------------------------------------

TINY = ["--scenarios", "20", "--warmup", "20", "--samples", "20", "--chains", "1"]
ARCHETYPE_NAMES = ("superspeedway", "intermediate", "short_track", "road_course")


@pytest.fixture(scope="module")
def demo_at_80(tmp_path_factory):
    """``calq demo`` at 80 columns, run twice in one folder (the second reuses the first's fits)."""
    folder = tmp_path_factory.mktemp("demo80")
    first = calq(folder, "demo", *TINY, extra={"COLUMNS": "80"}, timeout=900)
    again = calq(folder, "demo", *TINY, extra={"COLUMNS": "80"}, timeout=900)
    for result in (first, again):
        assert result.returncode == 0, result.stderr[-3000:]
    return first, again


def assert_fits(text: str, width: int) -> None:
    """No line wider than ``width``, except a URI alone on its line (kept whole to be copied); no name cut."""
    for line in text.splitlines():
        if len(line) > width:
            assert line.startswith(("file://", "s3://")) and " " not in line, (width, line)
    assert "…" not in text, text


def test_demo_at_80_columns_keeps_names_whole_one_line_per_row(demo_at_80):
    first, _ = demo_at_80
    assert_fits(first.stdout, 80)
    rows = [line for line in first.stdout.splitlines() if line.startswith("│")]
    tables = first.stdout.count("archetype")  # each part of the table names its rows by archetype
    assert tables >= 1
    for name in ARCHETYPE_NAMES:
        assert sum(line.startswith(f"│ {name} ") for line in rows) == 3 * tables  # three events, one line each


def test_demo_puts_each_posterior_uri_whole_on_its_own_line(demo_at_80):
    first, _ = demo_at_80
    uris = [line for line in first.stdout.splitlines() if line.startswith("file://")]
    assert len(uris) == 4
    for uri in uris:
        assert Path(uri.removeprefix("file://")).is_file(), uri  # copyable as printed: the file is there


def test_a_second_demo_says_it_reused_the_stored_fits(demo_at_80):
    first, again = demo_at_80
    assert "reused" not in first.stderr
    assert "reused 4 of 4 job(s) already in the store: not fitted again" in again.stderr


def _record(archetype: str, event: str, *, rows: int = 1234) -> dict:
    score = {"log_loss": 0.312345, "brier": 0.101234, "ece": 0.012345}
    better = {"mean": 0.001234, "low": -0.000123, "high": 0.002345}
    return {"archetype": archetype, "event": event, "races": 36, "rows": rows, "unscored_races": 2,
            "raw": score, "calibrated": score, "log_loss_improvement": better, "brier_improvement": better}


@pytest.mark.parametrize("width", [80, 120])
def test_evaluate_table_fits_the_terminal_with_whole_names(width):
    import io

    from rich.console import Console

    from producer.evaluate import evaluate_tables

    records = [_record(a, e) for a in ARCHETYPE_NAMES for e in ("top_1", "top_5", "top_10")]
    records.append(_record("road_course", "top_20", rows=0))
    console = Console(width=width, file=io.StringIO(), record=True)
    tables = evaluate_tables(records, width=width)
    for table in tables:
        console.print(table)
    text = console.export_text()
    assert_fits(text, width)
    for name in ARCHETYPE_NAMES:
        row_lines = [line for line in text.splitlines() if line.startswith(f"│ {name} ")]
        assert len(row_lines) == len([r for r in records if r["archetype"] == name]) * len(tables)
    for header in ("Δ Brier", "ECE", "Δ log loss"):
        assert header in text


def test_evaluate_html_says_where_it_wrote_the_page(tmp_path, season, monkeypatch):
    from typer.testing import CliRunner

    import producer.evaluate as evaluate
    from producer.cli import app

    monkeypatch.setattr(evaluate, "evaluate_command", lambda *a, **k: evaluate.EvaluationResult([], [], []))
    page = tmp_path / "evaluation.html"
    result = CliRunner().invoke(app, ["evaluate", str(season), "--from", "2024-03-01", "--to", "2024-04-01",
                                      "--html", str(page)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert page.is_file() and f"wrote the evaluation page to {page}" in " ".join(result.output.split())


# -- 4. a reference for every JSON output ------------------------------------------------------


def test_the_docs_page_is_the_one_the_models_generate():
    from producer.schemas import markdown

    page = (ROOT / "docs" / "json-outputs.md").read_text()
    assert page == markdown(), "docs/json-outputs.md is stale: run calq schema all --markdown > docs/json-outputs.md"


def test_every_field_of_every_output_is_in_the_page_with_a_meaning():
    from producer.schemas import OUTPUTS, fields, json_schema

    page = (ROOT / "docs" / "json-outputs.md").read_text()
    for name in OUTPUTS:
        found = fields(json_schema(name))
        assert len(found) >= 5  # the walk found the fields (a broken walk finds none)
        for path, _, description in found:
            assert f"| `{path}` |" in page, (name, path)
            assert description.strip(), f"{name}: {path} has no description"


def test_calq_schema_prints_the_models_json_schema(tmp_path):
    import json

    from producer.schemas import json_schema

    for name in ("summary", "job", "evaluation", "calibration"):
        result = calq(tmp_path, "schema", name)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == json_schema(name)
    one_line_usage(calq(tmp_path, "schema", "sumary"), "unknown output 'sumary'", "did you mean summary?")


def test_the_evaluation_model_describes_the_records_evaluate_builds():
    import types
    from datetime import date

    import numpy as np
    from pydantic import ValidationError

    from producer.evaluate import Evaluation, Unscored
    from producer.schemas import EvaluationRecord

    rng = np.random.default_rng(0)
    n = 60
    p = rng.uniform(0.05, 0.95, n)
    rows = {
        "p": p, "q": np.clip(p + 0.02, 0, 1), "y": (rng.uniform(size=n) < p).astype(float),
        "low": np.clip(p - 0.1, 0, 1), "high": np.clip(p + 0.1, 0, 1),
        "race": np.repeat(["r1", "r2", "r3"], n // 3).astype(object),
        "track": np.repeat(["Kansas", "Texas", "Kansas"], n // 3).astype(object),
        "date": np.repeat([date(2025, 3, 1), date(2025, 3, 8), date(2025, 3, 15)], n // 3).astype(object),
        "job": np.repeat(["cj-a", "cj-a", "cj-b"], n // 3).astype(object),
    }
    missing = [Unscored("intermediate", "r0", date(2025, 2, 1), "Kansas", "no earlier race of its archetype in the window")]
    this = types.SimpleNamespace(n_boot=50, seed=0)
    record = Evaluation._record(this, "intermediate", "top_5", rows, missing)
    empty = Evaluation._record(this, "road_course", "top_5", None, [])
    from producer.evaluate import _no_nan

    for built in (record, empty):
        EvaluationRecord.model_validate(_no_nan(built))  # every key it builds is declared
    with pytest.raises(ValidationError):
        EvaluationRecord.model_validate({**_no_nan(record), "undocumented": 1})  # and no other


def test_the_readme_lists_every_evaluate_field():
    from producer.schemas import EvaluationRecord

    readme = " ".join((ROOT / "README.md").read_text().split())
    section = readme[readme.index("`--json` prints one object per archetype × event"):][:900]
    for name in EvaluationRecord.model_fields:
        assert f"`{name}`" in section, name


# -- 5. smaller things a newcomer meets --------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["calibrate", "{season}", "--as-of", "2025-13-01"],
        ["calibrate", "{season}", "--archetype", "intermediate", "--window-days", "0"],
        ["calibrate", "{season}", "--samples", "0"],
        ["submit", "{season}", "--archetype", "intermediate", "--events", "top_0"],
        ["backfill", "{season}", "--from", "2025-01-01", "--to", "June"],
        ["evaluate", "{season}", "--from", "2025-01-01", "--to", "2025-02-01", "--archetypes", "oval"],
        ["apply", "nowhere.nc", "--event", "top_5", "--p", "0.2"],
        ["status", "cj-000000000000000000000000"],
        ["latest", "intermediate"],
        ["cancel", "cj-000000000000000000000000"],
    ],
    ids=lambda args: " ".join(args[:3]),
)
def test_a_failing_command_in_an_empty_folder_creates_no_store(tmp_path, season, args):
    result = calq(tmp_path, *[a.replace("{season}", str(season)) for a in args])
    assert result.returncode in (ExitCode.USAGE, ExitCode.FAILED), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [], result.stderr  # no calq-store/, nothing uploaded


def test_a_rejected_job_says_its_reason_once(tmp_path, season):
    from shared.data.dataset import open_dataset

    ds = open_dataset(season)
    races = ds["race"].values.astype(object)
    races[1] = races[0]  # a duplicated race id: the job is rejected before any sampling
    broken = save_dataset(ds.assign_coords(race=races), tmp_path / "broken.nc")
    result = calq(tmp_path, "calibrate", str(broken), "--archetype", "superspeedway", "--warmup", "10",
                  "--samples", "10", "--chains", "1")
    assert result.returncode == ExitCode.FAILED, result.stderr[-3000:]
    said = " ".join(result.stderr.split())
    assert said.count("duplicated race ids") == 1, result.stderr  # the command's own line, not a log line too
    assert "WARNING" not in result.stderr and "rejected" in said


def test_the_readme_examples_write_into_a_scratch_folder():
    readme = (ROOT / "README.md").read_text()
    using = readme[readme.index("## Using it"):readme.index("## The fleet")]
    first = using[using.index("```bash") + len("```bash"):].strip().splitlines()[0]
    assert first.startswith("mkdir -p ") and "&& cd " in first  # before anything writes season.nc or a page
    fleet = readme[readme.index("## The fleet"):]
    redis_line = next(line for line in fleet.splitlines() if line.startswith("redis-server"))
    assert "--save ''" in redis_line  # no dump.rdb in the folder it runs in
    assert "calq-demo.nc" not in fleet.split("```")[1]  # the fleet uses the scratch folder's season.nc


# -- 6. an unseen track is said, a track in the wrong case is refused ---------------------------


def small_posterior():
    """A posterior of calq's layout with two intermediate tracks (Kansas, Texas) and one event."""
    import arviz as az
    import numpy as np
    import xarray as xr

    rng = np.random.default_rng(0)
    dims = ("chain", "draw", "event")

    def draws(*extra: int, centre: float = 0.0):
        return centre + rng.normal(0, 0.1, size=(2, 50, 1, *extra))

    posterior = xr.Dataset(
        {"alpha_track": ((*dims, "track"), draws(2)), "beta_track": ((*dims, "track"), draws(2, centre=1.0)),
         "alpha_arch": ((*dims, "archetype"), draws(1)), "beta_arch": ((*dims, "archetype"), draws(1, centre=1.0)),
         "sigma_alpha": ((*dims, "archetype"), np.abs(draws(1))),
         "sigma_log_beta": ((*dims, "archetype"), np.abs(draws(1)))},
        coords={"chain": [0, 1], "draw": range(50), "event": ["top_5"], "archetype": ["intermediate"],
                "track": ["Kansas", "Texas"]},
    )
    constant = xr.Dataset({"track_archetype": (("track",), np.array([0, 0]))}, coords={"track": ["Kansas", "Texas"]})
    return az.InferenceData(posterior=posterior, constant_data=constant)


def test_calibrate_probabilities_says_whether_the_track_was_fitted_and_refuses_a_case_typo():
    from shared.fit.apply import calibrate_probabilities

    idata = small_posterior()
    assert calibrate_probabilities(idata, [0.2], event="top_5", track="Kansas")[0].track_seen is True
    assert calibrate_probabilities(idata, [0.2], event="top_5", track="Nowhere")[0].track_seen is False
    assert calibrate_probabilities(idata, [0.2], event="top_5", archetype="intermediate")[0].track_seen is None
    with pytest.raises(ValueError, match=r"'kansas' is not in this posterior, but 'Kansas' is: did you mean Kansas\?"):
        calibrate_probabilities(idata, [0.2], event="top_5", track="kansas")


def test_client_calibrate_refuses_a_track_in_the_wrong_case(tmp_path, monkeypatch):
    import types

    from producer.client import CalibrationClient
    from shared.contract.settings import Settings

    client = CalibrationClient(Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=None))
    idata = small_posterior()
    monkeypatch.setattr(client, "latest", lambda archetype, event: types.SimpleNamespace(posterior_uri="file:///x.nc"))
    monkeypatch.setattr(client.catalog, "posterior", lambda summary, **_: idata)  # the latest fit's posterior
    assert [r.track_seen for r in client.calibrate("intermediate", "Nowhere", "top_5", [0.1, 0.3])] == [False, False]
    with pytest.raises(ValueError, match="did you mean Kansas"):
        client.calibrate("intermediate", "kansas", "top_5", [0.1, 0.3])


def test_calq_apply_says_an_unseen_track_and_refuses_a_case_typo(tmp_path):
    import json

    posterior = tmp_path / "cj-small.nc"
    small_posterior().to_netcdf(str(posterior))
    typo = calq(tmp_path, "apply", str(posterior), "--event", "top_5", "--p", "0.2", "--track", "Kansass",
                extra={"COLUMNS": "200"})
    assert typo.returncode == 0, typo.stderr
    assert "Kansass is not a track of this posterior: it borrows its archetype's population" in typo.stdout
    assert "did you mean Kansas?" in typo.stdout
    shown = calq(tmp_path, "apply", str(posterior), "--event", "top_5", "--p", "0.2,0.5", "--track", "Nowhere", "--json")
    assert [r["track_seen"] for r in json.loads(shown.stdout)] == [False, False]
    known = calq(tmp_path, "apply", str(posterior), "--event", "top_5", "--p", "0.2", "--track", "Texas", "--json")
    assert json.loads(known.stdout)[0]["track_seen"] is True
    one_line_usage(calq(tmp_path, "apply", str(posterior), "--event", "top_5", "--p", "0.2", "--track", "kansas"),
                   "'kansas' is not in this posterior, but 'Kansas' is: did you mean Kansas?")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cj-small.nc"]  # nothing else written


def test_ctrl_c_twice_exits_4_never_130(tmp_path, season):
    from tests.test_ctrl_c import interrupt

    running = start_calq(calq_environ(), tmp_path, "calibrate", str(season), "--archetype", "intermediate",
                         "--warmup", "2000", "--samples", "2000", "--chains", "1", text=True)
    # calq is running once it has uploaded the dataset (the store exists); interrupt() also asserts no traceback
    code, _, stderr = interrupt(running, when=(tmp_path / "calq-store").exists, what="calq to upload the dataset",
                                times=2, timeout=120)
    assert code == ExitCode.CANCELLED, (code, stderr[-3000:])
