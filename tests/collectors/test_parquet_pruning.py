"""Partition pruning of a Parquet store folder: a dashboard query whose selection filters on time,
model or run opens only the files the commit log's manifest says may hold a selected forward.

How "opens only" is checked: in a copy of the folder, every committed file that cannot match is
overwritten with garbage, so reading it fails; the views over the copy must still answer, and
equal the answers over the intact folder read without pruning. The same garbage read unpruned
fails, so the check can fail."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from mythos_probe.collectors.parquet_store import ParquetStore
from mythos_probe.dashboards import queries, whatif
from mythos_probe.dashboards.queries import Selection
from tests.dashboards.factory import BASE_NS, synthetic_trace

DAY_NS = 86_400 * 10**9
DAY0 = pd.Timestamp(BASE_NS, unit="ns")
# (model, run) of each file set: each set holds one model and run, so that files can be told apart
PAIRS = (("mythos-1b", "run-a"), ("mythos-3b", "run-b"))


class Unpruned:
    """The store read through its full views (what the dashboard did before pruning)."""

    has_rollups = False

    def __init__(self, store: ParquetStore) -> None:
        self.query = store.query


def _traces(day: int, pair: int, first: int, n: int = 3) -> list:
    rng = np.random.default_rng(1000 * day + 100 * pair + first)
    model, run = PAIRS[pair]
    out = []
    for i in range(first, first + n):
        # spread over the day (hours 0, 7, 14, 21 …) so that a range cutting a day keeps part of it
        t = synthetic_trace(rng, run_id=run, model_id=model, step=i, start_ns=BASE_NS + day * DAY_NS + (i * 7 % 24) * 3600 * 10**9,
                            attributes={"endpoint": ("/chat", "/code")[i % 2]}, n_loops=4 + pair * 2)
        if i % 3 == 2:  # a full-depth shadow beside the served ones: what the what-if replays
            t = dataclasses.replace(t, kind="shadow", exit_policy="fixed")
        out.append(t)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pruning") / "store"
    with ParquetStore(path) as store:
        for day in range(3):
            for pair in range(len(PAIRS)):
                for first in (0, 3):  # two file sets per day and pair
                    store.write_traces(_traces(day, pair, first))
    return path


def _garble(folder: Path, keep: dict, tmp: Path) -> tuple[Path, int]:
    """A copy of `folder` whose committed files outside `keep` are unreadable; (copy, how many)."""
    copy = tmp / "garbled"
    shutil.copytree(folder, copy)
    with ParquetStore.open_read_only(copy) as store:
        entries = store.snapshot().entries
    garbled = 0
    for rel in entries:
        if rel not in keep:
            (copy / rel).write_bytes(b"not a parquet file" * 8)
            garbled += 1
    return copy, garbled


VIEWS = {
    "totals": lambda s, sel: queries.totals(s, sel),
    "halting_by_iteration": lambda s, sel: queries.halting_by_iteration(s, sel),
    "expert_load": lambda s, sel: queries.expert_load(s, sel),
    "iteration_means": lambda s, sel: queries.iteration_means(s, sel, ("state_norm", "growth_ratio")),
    "forwards_by_iterations": lambda s, sel: queries.forwards_by_iterations(s, sel),
    "whatif": lambda s, sel: whatif.evaluate(s, sel),
}

SELECTIONS = {
    # a range cutting day 1 at both ends: day 1's files only
    "range in day 1": (Selection(kinds=(), start=DAY0 + pd.Timedelta(hours=25), end=DAY0 + pd.Timedelta(hours=46)), {1}, None),
    # one model over every day, grouped by run
    "one model": (Selection(kinds=(), models=("mythos-3b",), group="run"), {0, 1, 2}, "mythos-3b"),
    # a run and a range over two days, by a user attribute
    "run and two days": (Selection(kinds=(), runs=("run-a",), group="attr:endpoint", start=DAY0 + pd.Timedelta(hours=30),
                                   end=DAY0 + pd.Timedelta(days=2, hours=5)), {1, 2}, "mythos-1b"),
    # the last 24 h before the newest forward (day 2, 21:00): days 1 and 2, every model (the window's
    # bound is relative to the newest forward of all)
    "window 24h, one model": (Selection(kinds=(), models=("mythos-1b",), window="24h"), {1, 2}, None),
}


@pytest.mark.parametrize("name", list(SELECTIONS))
def test_a_filtered_view_opens_only_the_files_that_may_match(folder, tmp_path, name):
    sel, days, model = SELECTIONS[name]
    with ParquetStore.open_read_only(folder) as store:
        snapshot = store.snapshot()
        keep = sel.scoped(store).keep(snapshot)
        # the manifest's answer, worked out here from the file sets written: date partition and model
        expected = {rel for rel, e in snapshot.entries.items()
                    if e["table"] == "spans" or (e["date"] in {(DAY0 + pd.Timedelta(days=d)).strftime("%Y-%m-%d") for d in days}
                                                 and (model is None or e["models"] == [model]))}
        assert set(keep) == expected
        assert len(keep) < len(snapshot.entries)
        full = {view: fn(Unpruned(store), sel) for view, fn in VIEWS.items()}
    copy, garbled = _garble(folder, keep, tmp_path)
    assert garbled > 0
    with ParquetStore.open_read_only(copy) as store:
        for view, fn in VIEWS.items():
            got = fn(store, sel)
            assert len(got) > 0, view
            pd.testing.assert_frame_equal(got.reset_index(drop=True), full[view].reset_index(drop=True), obj=view)
        with pytest.raises(duckdb.Error):  # the garbage is there: an unpruned read meets it
            queries.totals(Unpruned(store), sel)


def test_a_selection_without_time_model_or_run_reads_the_shared_views(folder):
    with ParquetStore.open_read_only(folder) as store:
        assert Selection(group="attr:endpoint", attribute="endpoint", values=("/chat",)).scoped(store) is store
