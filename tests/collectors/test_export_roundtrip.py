"""Every field of a `LoopTrace` survives `mythos-probe export --otlp` → `mythos-probe serve` → the
store, as real processes. The fields come from the record's own definition (`dataclasses.fields`),
and the traces must set each field with a default to something else somewhere, so a field added
later fails here until it travels (and until these traces exercise it)."""

import dataclasses
import math
import re
import signal
import subprocess
import sys

import numpy as np
import pandas as pd

from mythos_probe.collectors.export_cli import stored_traces
from mythos_probe.collectors.store import Store
from mythos_probe.records import LoopTrace
from tests.collectors.factory import make_trace

CLI = [sys.executable, "-m", "mythos_probe.cli"]


def traces() -> list[LoopTrace]:
    """HRM-like: two loops of one forward (shared trace id), a shadow on rank 2 of 4, a training
    forward, and a version-1 summary forward without text, experts or user attributes."""
    high = dataclasses.replace(
        make_trace(1, n_loops=6), loop_name="H", kind="shadow", rank=2, local_rank=1, world_size=4,
        host="node-7", pid=4242, job_id="slurm-991", exit_policy="act",
        attributes={"endpoint": "/chat", "user": "ana", "priority": 3, "share": 0.25, "canary": True})
    low = dataclasses.replace(make_trace(2, n_loops=6), trace_id=high.trace_id, loop_name="L", kind="shadow",
                              rank=2, local_rank=1, world_size=4, host="node-7", pid=4242, job_id="slurm-991")
    training = dataclasses.replace(make_trace(3, detail="summary"), kind="training", step=120, run_id="training",
                                   row_max_loops=[4, 8], row_min_loops=[1, 2], row_exit_threshold=[0.5, None],
                                   row_budget_reason=["profile /chat", "governor: over budget"])
    old = dataclasses.replace(make_trace(4, detail="summary", with_text=False, n_experts=0), schema_version=1,
                              attributes={}, token_ids=None, position_iterations=None)
    return [high, low, training, old]


# (batch, seq) grids live in the `positions` table, which a store fills only at detail="positions"
# (`rows.positions_table`): a summary forward's grids are not stored, so they read back as None.
GRIDS = ("position_iterations", "token_ids", "token_text")


def expected(trace: LoopTrace) -> LoopTrace:
    if trace.detail == "positions":
        return trace
    return dataclasses.replace(trace, **dict.fromkeys(GRIDS))


def same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


def test_the_traces_set_every_field_away_from_its_default():
    for f in dataclasses.fields(LoopTrace):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is dataclasses.MISSING:
            continue
        values = [getattr(t, f.name) for t in traces()]
        assert any(not same(v, default) for v in values), f"no trace sets {f.name} away from its default {default!r}"
        if default is None:  # an optional array: both absent and present must travel
            assert any(v is None for v in values), f"no trace leaves {f.name} out"


def test_every_field_survives_export_otlp_to_serve(tmp_path):
    sent = traces()
    source, received = tmp_path / "source.duckdb", tmp_path / "received.duckdb"
    with Store(source) as store:
        store.write_traces(sent)
    serve = subprocess.Popen([*CLI, "serve", "--store", str(received), "--port", "0", "--no-dashboard"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = serve.stdout.readline()
        endpoint = re.search(r"(http://127\.0\.0\.1:\d+)/v1/traces", line).group(1)
        export = subprocess.run([*CLI, "export", str(source), "--otlp", endpoint],
                                capture_output=True, text=True, timeout=300)
        assert export.returncode == 0, export.stderr
        assert "4 spans delivered, 0 not delivered" in export.stdout
    finally:
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=120)
    assert serve.returncode == 0, err

    with Store.open_read_only(received) as store:
        back = {(t.trace_id, t.span_id): t for chunk in stored_traces(store) for _, t in chunk}
        # the columns themselves, read without the export's own reader
        columns = store.query("SELECT * FROM forwards").set_index(["trace_id", "span_id"])
    assert len(back) == len(sent) == len(columns)
    for trace in map(expected, sent):
        got = back[(trace.trace_id, trace.span_id)]
        for f in dataclasses.fields(LoopTrace):
            assert same(getattr(got, f.name), getattr(trace, f.name)), (f.name, getattr(got, f.name), getattr(trace, f.name))
        row = columns.loc[(trace.trace_id, trace.span_id)]
        for f in dataclasses.fields(LoopTrace):
            if f.name in row.index and f.name not in ("attributes",):
                want = getattr(trace, f.name)
                if isinstance(want, (np.ndarray, tuple)):  # the per-row budgets: list columns
                    assert same(np.asarray(row[f.name], dtype=np.asarray(want).dtype), np.asarray(want)), f.name
                elif want is None:  # a forward without per-row budgets: NULL
                    assert row[f.name] is None or row[f.name] is pd.NA, f.name
                else:
                    assert row[f.name] == want, f.name
