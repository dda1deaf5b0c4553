"""The catalog reads summaries back from the store and rebuilds latest pointers."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from shared.contract.domain import ARCHETYPES, archetypes_of
from shared.contract.errors import NotFound
from shared.contract.job import SamplerSettings
from shared.contract.summary import CalibrationSummary, Diagnostics, Timings
from shared.storage.catalog import Catalog, LatestPointer, is_newer, pointers_for
from shared.storage.store import Store, posterior_key, summary_key

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def make_summary(
    job_id: str = "cj-000000000000000000000001",
    *,
    archetype: str = "intermediate",
    events: tuple[str, ...] = ("top_5",),
    converged: bool = True,
    data_through: date = date(2024, 5, 26),
    created_at: datetime = T0,
    store: Store | None = None,
) -> CalibrationSummary:
    """A minimal valid summary; with ``store``, also written there (posterior first)."""
    archetypes = list(archetypes_of(archetype))
    summary = CalibrationSummary(
        job_id=job_id,
        archetype=archetype,
        archetypes=archetypes,
        events=list(events),
        model_version="logit-hier/1",
        dataset_uri="file:///data/races.nc",
        dataset_sha256="0" * 64,
        data_through=data_through,
        sampler=SamplerSettings(warmup=10, samples=10, chains=1),
        centered=False,
        n_rows=100,
        n_races=5,
        tracks={a: ["Somewhere"] for a in archetypes},
        converged=converged,
        convergence_issues=[] if converged else ["max R-hat 1.2000 > 1.01"],
        diagnostics=Diagnostics(
            chains=1,
            draws=10,
            max_rhat=1.0 if converged else 1.2,
            min_ess_bulk=500.0,
            min_ess_tail=500.0,
            divergences=0,
            bfmi=[1.0],
            min_bfmi=1.0,
            max_tree_depth=10,
            tree_depth_hits=0,
            mean_leapfrog_steps=7.0,
            ess_bulk_per_second=100.0,
        ),
        parameters=[],
        calibration=[],
        timings=Timings(),
        created_at=created_at,
        calq_version="0.0.0",
    )
    if store is not None:
        posterior_uri = store.put_bytes(posterior_key(archetype, job_id), b"netcdf")
        uri = store.uri(summary_key(archetype, job_id))
        summary = summary.model_copy(update={"posterior_uri": posterior_uri, "summary_uri": uri})
        store.put_json(summary_key(archetype, job_id), summary.model_dump(mode="json"))
    return summary


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(str(tmp_path / "store"), cache_dir=tmp_path / "cache")


# -- is_newer ------------------------------------------------------------------


def test_later_data_through_is_newer_even_if_created_earlier() -> None:
    old_data = make_summary("cj-a", data_through=date(2024, 5, 1), created_at=T0 + timedelta(days=3))
    new_data = make_summary("cj-b", data_through=date(2024, 5, 8), created_at=T0)
    assert is_newer(new_data, old_data)
    assert not is_newer(old_data, new_data)


def test_same_data_through_later_created_at_wins_then_job_id() -> None:
    first = make_summary("cj-b", created_at=T0)
    second = make_summary("cj-a", created_at=T0 + timedelta(seconds=1))
    assert is_newer(second, first) and not is_newer(first, second)
    tie_a, tie_b = make_summary("cj-a"), make_summary("cj-b")
    assert is_newer(tie_b, tie_a) and not is_newer(tie_a, tie_b)
    assert not is_newer(tie_a, tie_a)


def test_anything_is_newer_than_nothing_and_pointers_compare_too() -> None:
    summary = make_summary()
    assert is_newer(summary, None)
    pointer = LatestPointer.of(summary, "intermediate", "top_5")
    assert not is_newer(summary, pointer)
    assert is_newer(make_summary(created_at=T0 + timedelta(minutes=1)), pointer)


def test_naive_and_aware_timestamps_compare_as_utc() -> None:
    naive = make_summary("cj-a", created_at=datetime(2024, 6, 1, 12, 0, 1))
    aware = make_summary("cj-b", created_at=T0)
    assert is_newer(naive, aware)


# -- pointers ------------------------------------------------------------------


def test_pointers_one_per_archetype_and_event_only_if_converged() -> None:
    summary = make_summary(archetype="all", events=("top_1", "top_5"))
    pointers = pointers_for(summary)
    assert {p.slot for p in pointers} == {(a, e) for a in ARCHETYPES for e in ("top_1", "top_5")}
    assert all(p.job_id == summary.job_id and p.data_through == summary.data_through for p in pointers)
    assert pointers_for(make_summary(converged=False)) == []


def test_pointer_of_refuses_what_the_summary_did_not_fit() -> None:
    summary = make_summary(archetype="intermediate", events=("top_5",))
    with pytest.raises(ValueError, match="archetype"):
        LatestPointer.of(summary, "superspeedway", "top_5")
    with pytest.raises(ValueError, match="event"):
        LatestPointer.of(summary, "intermediate", "top_10")


def test_pointer_round_trips_as_json() -> None:
    pointer = pointers_for(make_summary())[0]
    assert LatestPointer.model_validate_json(pointer.model_dump_json()) == pointer


# -- the catalog ---------------------------------------------------------------


def test_catalog_lists_stored_summaries_and_skips_unreadable(store: Store, caplog) -> None:
    a = make_summary("cj-a", archetype="intermediate", store=store)
    b = make_summary("cj-b", archetype="all", store=store)
    store.put_bytes(summary_key("short_track", "cj-broken"), b"{not json")
    store.put_json(summary_key("short_track", "cj-wrong"), {"job_id": "cj-wrong"})
    with caplog.at_level("WARNING", logger="shared.storage.catalog"):
        found = {s.job_id: s for s in Catalog(store).summaries()}
    assert found == {"cj-a": a, "cj-b": b}
    assert "cj-broken" in caplog.text and "cj-wrong" in caplog.text


def test_catalog_fills_in_uris_from_where_the_summary_lies(store: Store) -> None:
    bare = make_summary("cj-a")
    store.put_json(summary_key("intermediate", "cj-a"), bare.model_dump(mode="json"))
    (found,) = Catalog(store).summaries()
    assert found.summary_uri == store.uri(summary_key("intermediate", "cj-a"))
    assert found.posterior_uri == store.uri(posterior_key("intermediate", "cj-a"))


def test_catalog_summary_by_job_id(store: Store) -> None:
    make_summary("cj-a", archetype="road_course", store=store)
    make_summary("cj-b", archetype="all", store=store)
    catalog = Catalog(store)
    assert catalog.summary("cj-a").archetype == "road_course"
    assert catalog.summary("cj-b").archetype == "all"
    for missing in ("cj-nope", "../etc", ""):
        with pytest.raises(NotFound, match="no summary"):
            catalog.summary(missing)


def test_empty_store_has_no_summaries(store: Store) -> None:
    assert list(Catalog(store).summaries()) == []
    assert Catalog(store).latest_pointers() == {}


def test_latest_pointers_ignore_non_converged_and_older(store: Store) -> None:
    make_summary("cj-old", data_through=date(2024, 5, 1), store=store)
    newest = make_summary("cj-new", data_through=date(2024, 5, 8), store=store)
    make_summary("cj-bad", data_through=date(2024, 5, 15), converged=False, store=store)
    make_summary("cj-older-rerun", data_through=date(2024, 5, 1), created_at=T0 + timedelta(days=9), store=store)
    everything = make_summary(
        "cj-all", archetype="all", events=("top_5", "top_10"), data_through=date(2024, 5, 2), store=store
    )
    latest = Catalog(store).latest_pointers()
    assert latest[("intermediate", "top_5")] == LatestPointer.of(newest, "intermediate", "top_5")
    assert latest[("intermediate", "top_10")].job_id == "cj-all"
    for archetype in ("superspeedway", "short_track", "road_course"):
        for event in ("top_5", "top_10"):
            assert latest[(archetype, event)] == LatestPointer.of(everything, archetype, event)
    assert len(latest) == 8
