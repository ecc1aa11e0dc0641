"""Page callbacks called as plain functions: messages for empty stores, unknown trace ids and
failing queries; the heatmap's cells and halting marks; and the import boundary (no torch)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from mythos_probe import whatif as replay
from mythos_probe.dashboards import app as dashboard_app
from mythos_probe.dashboards.components import guarded
from mythos_probe.dashboards.pages import PAGES, forward, forwards, lens
from mythos_probe.dashboards.queries import Selection

PAGE_ARGS = {"forward": ("rel_residual", 0), "spectral": ("step",), "lens": ("kl",), "convergence": ("rel_residual",)}


def _args(page):
    return PAGE_ARGS.get(page.__name__.rsplit(".", 1)[1], ())


def _text(component) -> str:
    return str(component.children) if hasattr(component, "children") else str(component)


def test_every_view_explains_an_empty_store(empty_store):
    for page in PAGES:
        out = page.update(empty_store, Selection(), "", *_args(page))
        assert "no forwards yet" in _text(out[0]), page.__name__


def test_every_view_renders_the_stored_forwards(store):
    for page in PAGES:
        out = page.update(store, Selection(group="attr:endpoint"), "", *_args(page))
        assert "mp-error" not in str(out[0]), page.__name__


def test_filters_matching_nothing_say_which_filter_hides_what(store, traces):
    out = forwards.update(store, Selection(models=("no-such-model",)), "")
    served = sum(t.kind == "served" for t in traces)
    assert _text(out[0]) == f"No forwards match the filters. Lifting one filter alone would show some: Model hides {served}."
    # two filters that each exclude the other's forwards: no single one is to blame
    out = forwards.update(store, Selection(models=("mythos-small",), runs=("run-a",)), "")
    assert _text(out[0]) == ("No forwards match the filters. Lifting one filter alone would show some: "
                             f"Model hides {sum(t.run_id == 'run-a' for t in traces)}; "
                             f"Run hides {sum(t.model_id == 'mythos-small' for t in traces)}.")


def test_unknown_trace_id_is_a_message(store):
    out = forward.update(store, Selection(), "?trace=" + "f" * 32, "rel_residual", 0)
    assert "No forward with trace id" in _text(out[0])


def test_forward_heatmap_cells_and_halting_marks(store, traces):
    t = traces[5]
    out = forward.update(store, Selection(), f"?trace={t.trace_id}", "rel_residual", 1)
    heat = out[3]
    z = np.array(heat.data[0].z, dtype=float)
    np.testing.assert_allclose(z, np.log10(t.position_metrics["rel_residual"][1]), rtol=1e-5)
    assert list(heat.data[0].y) == [f"{p} {w}" for p, w in enumerate(t.token_text[1])]
    assert list(heat.data[0].x) == list(range(1, t.iterations + 1))  # iterations shown from 1
    assert list(heat.data[1].x) == list(t.position_iterations[1])  # marked at the last one run
    tooltip = heat.data[0].hovertemplate
    assert all(s in tooltip for s in (t.trace_id, t.model_id, t.attributes["endpoint"]))
    assert out[2] == [0, 1]


def test_lens_follows_the_selected_forward(store, traces):
    t = traces[2]
    out = lens.update(store, Selection(), f"?trace={t.trace_id}", "rel_residual")
    assert t.trace_id[:8] in out[1].layout.title.text
    criteria = replay.evaluate(traces)["criterion"].unique().tolist()
    assert [d.name for d in out[3].data][: len(criteria)] == criteria
    assert len(out[3].data[0].x) == len(replay.DEFAULT_THRESHOLDS[criteria[0]])
    assert "lens-whatif-table" in str(out[4])


def test_a_failing_query_becomes_a_message_not_a_traceback():
    def update(*_):
        raise RuntimeError("database file vanished\nlong detail")

    out = guarded(update, 3)()
    assert "database file vanished" in str(out[0]) and "long detail" not in str(out[0])
    assert len(out) == 3


def test_pasted_trace_ids_are_normalized():
    assert dashboard_app.normalize_trace_id("  0xABC ") == "0" * 29 + "abc"
    assert dashboard_app.normalize_trace_id("not-hex") is None
    assert dashboard_app.normalize_trace_id("a" * 33) is None
    href, note = dashboard_app.open_trace(1, None, "abc")
    assert href == "/forward?trace=" + "0" * 29 + "abc" and note == ""


def test_navigation_keeps_the_selected_forward_and_filters():
    hrefs = dashboard_app.nav_hrefs("?kind=all&run=run-a&trace=" + "a" * 32)
    assert all(h.endswith("?run=run-a&kind=all&trace=" + "a" * 32) for h in hrefs)
    assert dashboard_app.nav_hrefs("") == [p.PATH for p in PAGES]


def test_the_dashboard_never_imports_torch(tmp_path):
    script = f"""
import sys
from mythos_probe.collectors.store import Store
from mythos_probe.dashboards.app import create_app, route
from mythos_probe.dashboards.pages import PAGES
from mythos_probe.dashboards.queries import Selection
from tests.dashboards.conftest import make_traces
from tests.dashboards.test_pages import _args
store = Store({str(tmp_path / "s.duckdb")!r})
store.write_traces(make_traces())
create_app(store, live=True)
for page in PAGES:
    route(page.PATH)
    page.update(store, Selection(), "", *_args(page))
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, loaded
print("ok")
"""
    # A fresh interpreter: this test process may have imported torch for other reasons.
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=_repo_root())
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def _repo_root() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[2])


def test_convergence_compares_two_time_ranges_on_one_scale(store, traces):
    import pandas as pd

    from mythos_probe.dashboards.pages import convergence

    out = convergence.update(store, Selection(), "", "rel_residual", "2026-01-01 00:00", "2026-01-01 01:00")
    early = [t for t in traces if pd.Timestamp(t.start_ns, unit="ns") <= pd.Timestamp("2026-01-01 01:00")]
    for fig, subset in ((out[1], traces), (out[2], early)):
        # forwards of 6 and 8 iterations: each cell averages the forwards that reached it
        padded = [np.pad(t.position_metrics["rel_residual"], ((0, 0), (0, 0), (0, 8 - t.iterations)), constant_values=np.nan)
                  for t in subset]
        mean = np.nanmean(np.concatenate(padded), axis=0)
        np.testing.assert_allclose(np.array(fig.data[0].z, dtype=float), np.log10(mean), rtol=1e-5)
        assert f"over {len(subset)} forwards" in fig.layout.title.text
    assert (out[1].data[0].zmin, out[1].data[0].zmax) == (out[2].data[0].zmin, out[2].data[0].zmax)
    bad = convergence.update(store, Selection(), "", "rel_residual", "2026-01-02", "2026-01-01")
    assert "swap them" in str(bad[0])


def test_whatif_target_and_threshold_range(store, traces):
    out = lens.update(store, Selection(), "", "kl", 0.5, 0.001, 1.0)
    table_rows = out[4].children[1].children[1].rowData  # the criterion's thresholds, as the grid holds them
    np.testing.assert_allclose([r["threshold"] for r in table_rows], np.geomspace(0.001, 1.0, lens.RANGE_STEPS))
    expected = replay.evaluate(traces, {"kl": np.geomspace(0.001, 1.0, lens.RANGE_STEPS)})
    kl = expected[expected["criterion"] == "kl"]
    np.testing.assert_allclose([r["agreement"] for r in table_rows], kl["agreement"])
    assert "Recommended at ≥ 50.0% agreement" in str(out[4].children[0])
    for bad in ((0.5, 1.0, 0.1), (1.5, None, None)):
        assert "mp-error" in str(lens.update(store, Selection(), "", "kl", *bad)[0])
