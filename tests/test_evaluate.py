"""``calq evaluate``: rolling-origin, out-of-sample scores of raw against calibrated forecasts (embedded mode).

The command runs as a newcomer runs it (a subprocess, tiny sampler settings);
what it prints is checked against the store it leaves behind.
"""

from __future__ import annotations

import json
import subprocess
from datetime import date

import numpy as np
import pytest

from producer.client import CalibrationClient
from producer.evaluate import Evaluation
from shared.contract.settings import Settings
from shared.contract.summary import ConvergenceCriteria
from shared.data.dataset import event_rows, open_dataset, save_dataset
from shared.data.synth import synthesize
from shared.fit.apply import calibrate_probabilities
from shared.stats import metrics
from tests.services import calq_environ, convergence_environ, run_calq

TINY = ["--warmup", "80", "--samples", "80", "--chains", "2"]
#: tiny runs cannot reach 400 effective draws: these criteria let them count as converged
LENIENT = {"min_ess_bulk": 10, "max_rhat": 1.2, "max_divergences": 5}
RANGE = ["--from", "2024-01-01", "--to", "2024-06-30"]
ARCHETYPES = ("superspeedway", "road_course")
EVENTS = ("top_5", "top_10")
SCORE_KEYS = {"brier", "log_loss", "ece"}
INTERVAL_KEYS = {"mean", "low", "high"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    return calq_environ(CALQ_STORAGE_URL=str(root / "store"), **convergence_environ(LENIENT)), root


def calq(env, *args, check=True, columns: int = 80) -> subprocess.CompletedProcess:
    environ, root = env
    return run_calq({**environ, "COLUMNS": str(columns)}, root, *args, check=check, timeout=900)


@pytest.fixture(scope="module")
def dataset(env):
    path = env[1] / "season.nc"
    save_dataset(synthesize(seasons=1, scenarios=100, seed=3), path)
    return path


@pytest.fixture(scope="module")
def client(env):
    root = env[1]
    return CalibrationClient(Settings(storage_url=str(root / "store"), compile_cache_dir=None,
                                      convergence=ConvergenceCriteria(**LENIENT)))


@pytest.fixture(scope="module")
def records(env, dataset):
    args = ["evaluate", str(dataset), *RANGE, "--archetypes", ",".join(ARCHETYPES), "--events", ",".join(EVENTS)]
    result = calq(env, *args, *TINY, "--json", "--html", "evaluation.html")
    return json.loads(result.stdout)


def _races_in_range(ds, archetype):
    days = ds["race_date"].values.astype("datetime64[D]")
    keep = (ds["archetype"].values == archetype) & (days >= np.datetime64("2024-01-01")) & (days <= np.datetime64("2024-06-30"))
    return ds["race"].values[keep].astype(str).tolist()


def test_it_prints_one_record_per_archetype_and_event_in_the_issue_format(records):
    assert [(r["archetype"], r["event"]) for r in records] == [(a, e) for a in ARCHETYPES for e in EVENTS]
    for r in records:
        assert {"archetype", "event", "races", "rows", "raw", "calibrated", "log_loss_improvement",
                "brier_improvement", "tracks"} <= set(r)
        assert SCORE_KEYS <= set(r["raw"]) and SCORE_KEYS <= set(r["calibrated"])
        for key in ("log_loss_improvement", "brier_improvement"):
            assert set(r[key]) == INTERVAL_KEYS
            assert r[key]["low"] <= r[key]["mean"] <= r[key]["high"]
        assert r["races"] > 0 and r["rows"] > 0
        assert sum(t["rows"] for t in r["tracks"].values()) == r["rows"]
        for track in r["tracks"].values():
            assert SCORE_KEYS <= set(track["raw"]) and set(track["log_loss_improvement"]) == INTERVAL_KEYS


def test_every_race_in_range_is_scored_or_reported(records, dataset):
    ds = open_dataset(dataset)
    for r in records:
        expected = _races_in_range(ds, r["archetype"])
        scored = [p["race"] for p in r["per_race"]]
        unscored = [u["race"] for u in r["unscored"]]
        assert sorted(scored + unscored) == sorted(expected)
        assert r["races"] == len(scored) and r["unscored_races"] == len(unscored)
        # the season's first race of each archetype has nothing earlier to be scored with
        assert expected[0] in unscored
        assert all("no earlier race" in u["reason"] for u in r["unscored"])


def test_each_race_is_scored_by_a_converged_fit_on_strictly_earlier_races_the_newest(records, client, dataset):
    ds = open_dataset(dataset)
    days = dict(zip(ds["race"].values.astype(str), ds["race_date"].values.astype("datetime64[D]").astype(object)))
    for r in records:
        fits = [client.result(p["job_id"]) for p in r["per_race"]]
        for race, fit in zip(r["per_race"], fits):
            day = days[race["race"]]
            assert fit.converged and fit.archetype == r["archetype"]
            assert fit.as_of <= day and fit.data_through < day
            # newest: the fit saw every earlier race of its archetype
            earlier = [x for x, d in days.items() if d < day and x in _races_in_range(ds, r["archetype"])]
            assert fit.n_races == len(earlier)


def test_the_mean_improvement_is_raw_minus_calibrated_over_all_rows(records):
    for r in records:
        rows = sum(p["rows"] for p in r["per_race"])
        assert rows == r["rows"]
        raw = sum(p["raw_log_loss"] for p in r["per_race"]) / rows
        cal = sum(p["cal_log_loss"] for p in r["per_race"]) / rows
        assert raw == pytest.approx(r["raw"]["log_loss"]) and cal == pytest.approx(r["calibrated"]["log_loss"])
        assert r["log_loss_improvement"]["mean"] == pytest.approx(raw - cal)
        brier = sum(p["raw_brier"] - p["cal_brier"] for p in r["per_race"]) / rows
        assert r["brier_improvement"]["mean"] == pytest.approx(brier)


def test_calibrated_probabilities_are_the_optimizers_posterior_mean(records, client, dataset):
    """A race's calibrated log loss is what calibrate_probabilities gives with the fit that scored it."""
    ds = open_dataset(dataset)
    r = records[0]
    race = r["per_race"][-1]
    fit = client.result(race["job_id"])
    idata = client.store.get_inference_data(fit.posterior_uri)
    one = ds.isel(race=[list(ds["race"].values.astype(str)).index(race["race"])])
    rows = event_rows(one, events=[r["event"]], archetypes=[r["archetype"]])
    q = [c.mean for c in calibrate_probabilities(idata, rows.p, event=r["event"], track=race["track"],
                                                 archetype=r["archetype"])]
    assert race["cal_log_loss"] == pytest.approx(metrics.log_loss(q, rows.y) * rows.n_rows, rel=1e-6)
    assert race["raw_log_loss"] == pytest.approx(metrics.log_loss(rows.p, rows.y) * rows.n_rows, rel=1e-9)


def test_the_html_page_is_written(records, env):
    page = (env[1] / "evaluation.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "out-of-sample" in page.lower()
    assert all(a in page for a in ARCHETYPES)


def test_a_rerun_reuses_the_fits_in_the_store(records, env, dataset, client):
    before = {s.job_id for s in client.catalog.summaries()}
    args = ["evaluate", str(dataset), *RANGE, "--archetypes", ",".join(ARCHETYPES), "--events", ",".join(EVENTS)]
    again = json.loads(calq(env, *args, *TINY, "--json").stdout)
    assert {s.job_id for s in client.catalog.summaries()} == before
    assert again == records


def test_the_table_is_the_default_output(records, env, dataset):
    args = ["evaluate", str(dataset), *RANGE, "--archetypes", "superspeedway", "--events", ",".join(EVENTS)]
    out = calq(env, *args, *TINY, columns=200).stdout
    assert "out-of-sample" in out and "superspeedway" in out and "top_10" in out
    assert f"{records[1]['log_loss_improvement']['mean']:+.4f}" in out  # superspeedway, top_10


def test_fleet_needs_a_broker_and_unknown_archetypes_are_refused(env, dataset):
    result = calq(env, "evaluate", str(dataset), *RANGE, "--fleet", check=False)
    assert result.returncode != 0 and "CALQ_BROKER_URL" in result.stderr
    result = calq(env, "evaluate", str(dataset), *RANGE, "--archetypes", "oval", check=False)
    assert result.returncode != 0 and "oval" in result.stderr


def test_races_whose_fits_did_not_converge_are_reported_not_scored(tmp_path, dataset):
    strict = CalibrationClient(Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=None))
    result = Evaluation(
        strict, dataset, start=date(2024, 3, 1), end=date(2024, 3, 31), archetypes=["short_track"], events="top_5",
        sampler={"warmup": 20, "samples": 20, "chains": 2},  # far too few draws for an ESS of 400
    ).run()
    (record,) = result.records
    assert record["races"] == 0 and record["rows"] == 0
    assert record["log_loss_improvement"]["mean"] is None or np.isnan(record["log_loss_improvement"]["mean"])
    reasons = [u["reason"] for u in record["unscored"]]
    assert any("did not converge" in reason for reason in reasons), reasons
    assert json.loads(json.dumps(result.to_json(), allow_nan=False))  # valid JSON: no NaN


def _fit(cal, window, *, state="succeeded", converged=True):
    from types import SimpleNamespace

    from producer.backfill import Outcome
    from producer.evaluate import Fit

    outcome = Outcome(window.archetype, window.as_of, f"cj-{window.as_of}", state, None if state == "succeeded" else "boom")
    seen = np.isin(cal.race_ids, window.races)
    summary = SimpleNamespace(converged=converged, data_through=cal.days[seen].max().astype(object))
    return Fit(window, outcome, summary if state == "succeeded" else None)


def test_each_race_gets_the_fit_current_before_it_or_the_newest_earlier_one_that_converged():
    from producer.backfill import RaceCalendar
    from producer.evaluate import assign_fits

    entries = [(date(2024, 1, 10), "superspeedway"), (date(2024, 2, 1), "superspeedway"),
               (date(2024, 2, 5), "superspeedway"), (date(2024, 2, 7), "intermediate"),
               (date(2024, 3, 1), "superspeedway")]
    cal = RaceCalendar([f"r{i}" for i in range(5)], np.array([d for d, _ in entries], dtype="datetime64[D]"),
                       [a for _, a in entries], ["Daytona"] * 5)
    windows = cal.windows("superspeedway", [d for d, _ in entries], window_days=30)
    assert [(w.as_of, w.races) for w in windows] == [
        (date(2024, 1, 11), ("r0",)), (date(2024, 2, 2), ("r0", "r1")), (date(2024, 2, 6), ("r0", "r1", "r2")),
        (date(2024, 2, 10), ("r1", "r2")),  # r0 left: the same latest race (r2) as the window before
    ]
    ss = [0, 1, 2, 4]
    # fits created in any order: the race gets the window current before it, not the last one created
    for order in (slice(None), slice(None, None, -1)):
        scored, missing = assign_fits(cal, "superspeedway", ss, [_fit(cal, w) for w in windows][order])
        assert {i: f.window.as_of for i, f in scored.items()} == {
            1: date(2024, 1, 11), 2: date(2024, 2, 2), 4: date(2024, 2, 10)}
        assert [(m.race, m.reason) for m in missing] == [("r0", "no earlier race of its archetype in the window")]
    # the current fit did not converge: the newest earlier one that did scores the race
    fits = [_fit(cal, w, converged=w.as_of != date(2024, 2, 10)) for w in windows]
    assert assign_fits(cal, "superspeedway", [4], fits)[0][4].window.as_of == date(2024, 2, 6)
    # nothing converged before it, or its fit failed: reported with the reason
    _, missing = assign_fits(cal, "superspeedway", [1, 2], [_fit(cal, windows[0], converged=False),
                                                            _fit(cal, windows[1], state="failed")])
    assert "did not converge" in missing[0].reason and "failed: boom" in missing[1].reason


# -- the evaluation page at 1280 px (issue 22) ------------------------------------------------

#: Added to a copy of the page: each table's box and whether its wrapper scrolls sideways, as JSON in #calq-check.
TABLE_CHECKER = """
<script>
addEventListener("load", () => {
  const tables = [...document.querySelectorAll("table")].map(t => {
    const wrap = t.closest(".table-wrap"), title = wrap.querySelector("p.table-title"), box = t.getBoundingClientRect();
    return {title: title ? title.textContent : "", right: box.right, width: box.width,
            scrolls: wrap.scrollWidth > wrap.clientWidth, headers: [...t.querySelectorAll("th")].map(h => h.textContent)};
  });
  const out = document.createElement("pre");
  out.id = "calq-check";
  out.textContent = JSON.stringify({viewport: document.documentElement.clientWidth, tables});
  document.body.appendChild(out);
});
</script>
"""


def test_the_evaluation_page_fits_1280_px_and_writes_every_score_by_one_rule(records, env, tmp_path):
    import html as html_lib
    import re

    from PIL import Image as PILImage

    from tests.test_report import browse

    page = env[1] / "evaluation.html"
    found, shot = browse(page, tmp_path, checker=TABLE_CHECKER)
    assert found["viewport"] == 1280 and found["tables"]
    for table in found["tables"]:  # every table whole on the screen: none scrolls sideways, hiding columns
        assert not table["scrolls"] and table["right"] <= found["viewport"], table
    headers = [h for t in found["tables"] for h in t["headers"]]
    assert {"Δ log loss", "Δ Brier", "ECE raw", "ECE cal"} <= set(headers)
    assert PILImage.open(shot).size == (1280, 2400)

    # one number rule: 4 significant digits in fixed notation, for scores and differences alike
    numbers = [html_lib.unescape(c) for c in re.findall(r'<td class="num">([^<]*)</td>', page.read_text())]
    decimals = [n for n in numbers if "." in n]
    assert decimals, numbers
    for n in numbers:
        assert not re.search(r"[eE][+-]?\d", n), n  # never 4.83e-05
    for n in decimals:
        assert len(n.lstrip("-").replace(".", "").lstrip("0")) == 4, n  # 0.00004830, 0.001205, 0.2345
