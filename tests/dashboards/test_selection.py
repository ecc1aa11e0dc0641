"""The filter bar's record-v2 filters (forward kind served by default, loop, rank, exit policy,
iterations, absolute time), its URL form, and the forwards list paged, sorted and filtered on the
server, checked against the traces themselves."""

from __future__ import annotations

import pandas as pd
import pytest

from mythos_probe.dashboards import filters, queries, urlstate
from mythos_probe.dashboards.queries import Selection
from tests.dashboards.factory import BASE_NS

def _ids(df) -> set:
    return set(df["trace_id"])


def _listed(store, sel, **kw) -> pd.DataFrame:
    return queries.forward_list(store, sel, queries.attribute_keys(store), limit=None, **kw)[0]


def test_served_forwards_by_default_and_every_kind_on_request(mixed):
    store, traces = mixed
    assert _ids(_listed(store, Selection())) == {t.trace_id for t in traces if t.kind == "served"}
    assert _ids(_listed(store, Selection(kinds=()))) == {t.trace_id for t in traces}
    assert _ids(_listed(store, Selection(kinds=("shadow",)))) == {t.trace_id for t in traces if t.kind == "shadow"}


def test_loop_rank_policy_iterations_and_time_filters(mixed):
    store, traces = mixed
    every = dict(kinds=())
    cases = {
        Selection(loops=("inner",), **every): lambda t: t.loop_name == "inner",
        Selection(ranks=(1,), **every): lambda t: t.rank == 1,
        Selection(policies=("fixed",), **every): lambda t: t.exit_policy == "fixed",
        Selection(min_iterations=5, max_iterations=5, **every): lambda t: t.iterations == 5,
        Selection(start=pd.Timestamp("2026-01-01 00:03"), end=pd.Timestamp("2026-01-01 00:07"), **every):
            lambda t: 3 * 60 * 10**9 <= t.start_ns - BASE_NS <= 7 * 60 * 10**9,
    }
    for sel, keep in cases.items():
        wanted = {t.trace_id for t in traces if keep(t)}
        assert wanted and _ids(_listed(store, sel)) == wanted, sel


def test_grouping_by_rank_and_kind(mixed):
    store, traces = mixed
    for group, key in (("rank", lambda t: str(t.rank)), ("kind", lambda t: t.kind)):
        df = queries.compute_saved(store, Selection(kinds=(), group=group))
        counts = pd.Series([key(t) for t in traces]).value_counts().sort_index()
        assert df.set_index("grp")["forwards"].to_dict() == counts.to_dict()


def test_forward_list_pages_sorts_and_filters_on_the_server(mixed):
    store, traces = mixed
    served = [t for t in traces if t.kind == "served"]
    keys = queries.attribute_keys(store)
    sort = [{"colId": "duration_ms", "sort": "desc"}]
    page, total = queries.forward_list(store, Selection(), keys, sort, {}, offset=2, limit=3)
    ordered = sorted(served, key=lambda t: -(t.end_ns - t.start_ns))
    assert total == len(served)
    assert page["trace_id"].tolist() == [t.trace_id for t in ordered[2:5]]
    text = {"attr__endpoint": {"filterType": "text", "type": "equals", "filter": "/code"}}
    number = {"iterations": {"filterType": "number", "type": "greaterThanOrEqual", "filter": 5}}
    assert _ids(_listed(store, Selection(), filters=text)) == {t.trace_id for t in served if t.attributes["endpoint"] == "/code"}
    assert _ids(_listed(store, Selection(), filters=number)) == {t.trace_id for t in served if t.iterations >= 5}
    assert set(page.columns) >= {"attr__endpoint", "attr__user", "kind", "loop_name", "rank"}
    with pytest.raises(ValueError, match="cannot sort"):
        queries.forward_list(store, Selection(), keys, [{"colId": "1; DROP TABLE forwards", "sort": "asc"}])
    with pytest.raises(ValueError, match="cannot filter"):
        queries.forward_list(store, Selection(), keys, filters={"nope": {"filterType": "text", "type": "equals"}})


def test_url_state_round_trips_and_names_what_it_cannot_read():
    state, problems = urlstate.parse("?kind=all&run=a&run=b&rank=1&imin=3&from=2026-01-01+00:03&x=time&target=0.95")
    assert problems == []
    assert (state["kind"], state["run"], state["rank"], state["imin"], state["x"], state["target"]) == (
        "all", ("a", "b"), (1,), 3, "time", 0.95)
    assert urlstate.parse(urlstate.encode(state))[0] == state
    assert urlstate.encode(urlstate.parse("")[0]) == ""  # defaults stay out of the link
    state, problems = urlstate.parse("?imin=three&colour=red")
    assert state["imin"] is None and len(problems) == 2 and "imin" in problems[1 if "colour" in problems[0] else 0]
    sel = filters.selection(urlstate.parse("?kind=shadow&from=2026-01-01T00:03:00Z")[0])
    assert sel.kinds == ("shadow",) and sel.start == pd.Timestamp("2026-01-01 00:03")
    with pytest.raises(ValueError, match="not a time"):
        filters.selection(urlstate.parse("?from=yesterday-ish")[0])
    with pytest.raises(ValueError, match="swap"):
        filters.selection(urlstate.parse("?from=2026-01-02&to=2026-01-01")[0])


def test_a_click_opens_the_forward_or_the_forwards_it_stands_for():
    from mythos_probe.dashboards.components import click_target, forwards_link, group_filter

    def click(*refs):
        return {"points": [{"customdata": [r, 3]} for r in refs]}

    assert click_target(click("ab" * 16), "?run=r") == "/forward?run=r&trace=" + "ab" * 16
    assert click_target(click("r|2026-01-01 00:00:00|2026-01-01 00:05:00"), "?x=time") == (
        "/?run=r&from=2026-01-01+00%3A00%3A00&to=2026-01-01+00%3A05%3A00&x=time")
    # a forward's marker under the same x as a bucket wins
    assert click_target(click("r|a|b", "cd" * 16), "").endswith("trace=" + "cd" * 16)
    assert click_target({"points": [{"x": 1}]}, "") is None
    assert group_filter("attr:endpoint", "/chat") == {"attr": "endpoint", "val": ("/chat",)}
    assert group_filter("rank", "3") == {"rank": (3,)} and group_filter("none", "all") == {}
    assert forwards_link("?trace=" + "a" * 32, "kind", "shadow", imin=4, imax=4) == "/?kind=shadow&imin=4&imax=4"


def test_sync_moves_values_between_the_url_and_the_controls():
    from dash import no_update

    from mythos_probe.dashboards.app import sync_controls

    keys = ["kind", "run", "imin"]
    # the URL changed (a link, the back button): the controls take its values
    search, values = sync_controls("?run=a&run=b&kind=all", ["served", [], None], keys, from_url=True)
    assert search is no_update and values == ["all", ["a", "b"], no_update]
    # a control changed: the URL takes it, other keys kept; defaults stay out of the link
    search, values = sync_controls("?trace=" + "f" * 32, ["served", ["a"], 3], keys, from_url=False)
    assert search == "?run=a&imin=3&trace=" + "f" * 32 and values == [no_update] * 3
    assert sync_controls("?run=a", ["served", ["a"], None], keys, from_url=False)[0] is no_update
