"""The wire format pinned by literal names and values, each side on its own.

The encoder (`spans.trace_to_attributes`, `rows.*_table`) is checked against attribute and
column names and values written out by hand here, and the decoder (`spans.attributes_to_trace`)
is fed a hand-written attribute dict: a mistake made on both sides of a round trip (a renamed
attribute, a transposed array) fails here although every round trip would pass. A span emitted
through the real OTel SDK is read back from its in-memory exporter."""

from __future__ import annotations

import math
import threading

import numpy as np
import pyarrow as pa
import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mythos_probe.collectors import rows, spans
from mythos_probe.collectors.exporter import tracer_provider
from mythos_probe.records import FORWARD_METRIC_NAMES, ITERATION_METRIC_NAMES, POSITION_METRIC_NAMES, LoopTrace

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"


def hand_trace(**over) -> LoopTrace:
    """batch 2, seq 3, 2 iterations of 4 loops, 3 experts: every value distinct and written out."""
    kw = dict(
        trace_id=TRACE_ID, span_id=SPAN_ID, run_id="run-7", model_id="tiny", step=11,
        start_ns=1_000_000_000, end_ns=1_000_600_000, batch=2, seq_len=3, n_loops=4, iterations=2,
        exit_policy="kl", detail="positions",
        iteration_metrics={"rel_residual": [math.nan, 0.25], "halt_prob": [0.5, 0.75]},
        position_metrics={"state_norm": np.arange(12, dtype=np.float32).reshape(2, 3, 2) / 4},
        forward_metrics={"flops": 1234.5, "rho_A": 0.875},
        expert_load=[[1, 2, 3], [4, 5, 0]],
        position_iterations=[[1, 2, 2], [2, 1, 2]],
        token_ids=[[10, 11, 12], [20, 21, 22]],
        token_text=(("a", "b", "c"), ("d", "e", "f")),
        attributes={"request_id": "r1", "priority": 3, "cached": False, "temp": 0.5},
        loop_name="think", kind="shadow", rank=1, local_rank=0, world_size=2, host="node-3", pid=4242,
        job_id="job-9",
    )
    kw.update(over)
    return LoopTrace(**kw)


HAND_ATTRS = {
    "gen_ai.operation.name": "text_completion",
    "gen_ai.request.model": "tiny",
    "gen_ai.usage.input_tokens": 6,
    "openinference.span.kind": "LLM",
    "llm.model_name": "tiny",
    "recurrent_depth.run_id": "run-7",
    "recurrent_depth.model_id": "tiny",
    "recurrent_depth.step": 11,
    "recurrent_depth.batch": 2,
    "recurrent_depth.seq_len": 3,
    "recurrent_depth.n_loops": 4,
    "recurrent_depth.iterations": 2,
    "recurrent_depth.exit_policy": "kl",
    "recurrent_depth.detail": "positions",
    "recurrent_depth.schema_version": 2,
    "recurrent_depth.loop_name": "think",
    "recurrent_depth.kind": "shadow",
    "recurrent_depth.rank.index": 1,
    "recurrent_depth.rank.local_index": 0,
    "recurrent_depth.rank.world_size": 2,
    "recurrent_depth.rank.host": "node-3",
    "recurrent_depth.rank.pid": 4242,
    "recurrent_depth.rank.job_id": "job-9",
    "recurrent_depth.iteration.rel_residual": [math.nan, 0.25],
    "recurrent_depth.iteration.halt_prob": [0.5, 0.75],
    "recurrent_depth.forward.flops": 1234.5,
    "recurrent_depth.forward.rho_A": 0.875,
    "recurrent_depth.position.shape": [2, 3, 2],
    "recurrent_depth.position.state_norm": [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75],
    "recurrent_depth.expert.count": 3,
    "recurrent_depth.expert.load": [1, 2, 3, 4, 5, 0],
    "recurrent_depth.position.iterations_used": [1, 2, 2, 2, 1, 2],
    "recurrent_depth.token_ids": [10, 11, 12, 20, 21, 22],
    "recurrent_depth.token_text": ["a", "b", "c", "d", "e", "f"],
    "recurrent_depth.attr.request_id": "r1",
    "recurrent_depth.attr.priority": 3,
    "recurrent_depth.attr.cached": False,
    "recurrent_depth.attr.temp": 0.5,
}


def same(a, b):
    """Equality of attribute dicts with NaN == NaN and exact types (1 is not 1.0 or True)."""
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, list):
            assert isinstance(y, list) and len(x) == len(y), k
            for u, v in zip(x, y):
                assert type(u) is type(v) and (u == v or (u != u and v != v)), (k, x, y)
        else:
            assert type(x) is type(y) and x == y, (k, x, y)


def test_constants():
    assert (spans.FORWARD_SPAN_NAME, spans.ITERATION_SPAN_NAME, spans.NS) == ("looped_forward", "loop_iteration", "recurrent_depth.")
    assert spans.ATTR_ITERATION_INDEX == "recurrent_depth.iteration.index"
    assert spans.ATTR_ITERATION_TIMING == "recurrent_depth.iteration.timing"
    assert spans.SPAN_LIMITS.max_span_attributes == 4096 and spans.SPAN_LIMITS.max_attribute_length is None
    assert spans.POSITION_LEVEL_ATTRS == frozenset(
        [f"recurrent_depth.position.{n}" for n in POSITION_METRIC_NAMES]
        + ["recurrent_depth.position.shape", "recurrent_depth.position.iterations_used",
           "recurrent_depth.token_ids", "recurrent_depth.token_text"])


def test_encoder_writes_the_literal_attributes():
    same(spans.trace_to_attributes(hand_trace()), HAND_ATTRS)


def test_encoder_without_positions_and_without_optional_fields():
    attrs = spans.trace_to_attributes(hand_trace(), positions=False)
    # only the per-position metric arrays and their shape are left out
    want = {k: v for k, v in HAND_ATTRS.items()
            if k not in ("recurrent_depth.position.shape", "recurrent_depth.position.state_norm")}
    same(attrs, want)
    bare = hand_trace(detail="summary", position_metrics={}, expert_load=None, position_iterations=None,
                      token_ids=None, token_text=None, attributes={}, iteration_metrics={}, forward_metrics={})
    keep = {k: v for k, v in HAND_ATTRS.items()
            if not k.startswith(("recurrent_depth.position.", "recurrent_depth.expert.", "recurrent_depth.token_",
                                 "recurrent_depth.attr.", "recurrent_depth.iteration.", "recurrent_depth.forward."))}
    keep["recurrent_depth.detail"] = "summary"
    same(spans.trace_to_attributes(bare), keep)


def test_decoder_reads_the_literal_attributes():
    t = spans.attributes_to_trace(HAND_ATTRS, TRACE_ID, SPAN_ID, 1_000_000_000, 1_000_600_000)
    want = hand_trace()
    assert t.to_dict() == want.to_dict()
    assert t.position_metrics["state_norm"].dtype == np.float32
    assert t.position_metrics["state_norm"][1, 2, 0] == 2.5  # (b, s, t) C order
    assert t.expert_load[1].tolist() == [4, 5, 0] and t.expert_load.dtype == np.int64
    assert t.token_ids[1, 0] == 20 and t.position_iterations[0, 1] == 2
    assert t.token_text == (("a", "b", "c"), ("d", "e", "f"))
    assert isinstance(t.step, int) and isinstance(t.pid, int) and isinstance(t.host, str)


def test_decoder_of_a_version_1_span_uses_the_record_defaults():
    v1 = {k: v for k, v in HAND_ATTRS.items()
          if not k.startswith(("recurrent_depth.rank.", "recurrent_depth.loop_name", "recurrent_depth.kind"))}
    v1["recurrent_depth.schema_version"] = 1
    t = spans.attributes_to_trace(v1, TRACE_ID, SPAN_ID, 5, 9)
    assert (t.loop_name, t.kind, t.rank, t.local_rank, t.world_size, t.host, t.pid, t.job_id) == (
        "loop", "served", 0, 0, 1, "", 0, "")
    assert (t.schema_version, t.start_ns, t.end_ns) == (1, 5, 9)


def test_decoder_accepts_numpy_arrays_as_the_receiver_gives_them():
    attrs = dict(HAND_ATTRS)
    attrs["recurrent_depth.attr.priority"] = np.array(3)  # a 0-d array becomes the plain value
    attrs["recurrent_depth.position.shape"] = np.array([2, 3, 2])
    attrs["recurrent_depth.iteration.halt_prob"] = np.array([0.5, 0.75])
    t = spans.attributes_to_trace(attrs, TRACE_ID, SPAN_ID, 0, 1)
    assert t.attributes["priority"] == 3 and type(t.attributes["priority"]) is int
    assert t.iteration_metrics["halt_prob"].tolist() == [0.5, 0.75]


def test_is_loop_span():
    assert spans.is_loop_span("looped_forward", {"recurrent_depth.schema_version": 2})
    assert not spans.is_loop_span("looped_forward", {"recurrent_depth.run_id": "x"})
    assert not spans.is_loop_span("loop_iteration", {"recurrent_depth.schema_version": 2})


def emitted(trace, iteration_spans):
    exporter = InMemorySpanExporter()
    provider = tracer_provider(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("caller"):  # the forward span is a root all the same
        spans.emit(tracer, trace, iteration_spans=iteration_spans)
    provider.shutdown()
    return [s for s in exporter.get_finished_spans() if s.name != "caller"]


def test_emit_through_the_sdk():
    trace = hand_trace(start_ns=1_000, end_ns=1_301)
    (forward,) = emitted(trace, iteration_spans=False)
    assert forward.name == "looped_forward" and forward.kind == SpanKind.INTERNAL
    assert forward.parent is None
    assert f"{forward.context.trace_id:032x}" == TRACE_ID and f"{forward.context.span_id:016x}" == SPAN_ID
    assert (forward.start_time, forward.end_time) == (1_000, 1_301)
    got = {k: list(v) if isinstance(v, tuple) else v for k, v in forward.attributes.items()}
    same(got, HAND_ATTRS)


def test_emit_iteration_spans_split_the_forward_evenly_and_skip_nan():
    trace = hand_trace(start_ns=1_000, end_ns=1_301)
    out = emitted(trace, iteration_spans=True)
    children = sorted((s for s in out if s.name.startswith("loop_iteration ")), key=lambda s: s.start_time)
    (forward,) = [s for s in out if s.name == "looped_forward"]
    assert len(children) == 2
    assert [(c.start_time, c.end_time) for c in children] == [(1_000, 1_150), (1_150, 1_301)]
    assert all(c.parent.span_id == forward.context.span_id for c in children)
    assert all(c.context.trace_id == forward.context.trace_id for c in children)
    assert dict(children[0].attributes) == {"recurrent_depth.iteration.index": 0,
                                            "recurrent_depth.iteration.timing": "even_split",
                                            "recurrent_depth.iteration.halt_prob": 0.5}
    assert dict(children[1].attributes) == {"recurrent_depth.iteration.index": 1,
                                            "recurrent_depth.iteration.timing": "even_split",
                                            "recurrent_depth.iteration.rel_residual": 0.25,
                                            "recurrent_depth.iteration.halt_prob": 0.75}


def test_emit_of_a_forward_without_iterations_has_no_children():
    empty = hand_trace(iterations=0, n_loops=0, iteration_metrics={}, position_metrics={}, expert_load=None,
                       detail="summary")
    assert [s.name for s in emitted(empty, iteration_spans=True)] == ["looped_forward"]


EMIT_REFUSAL = ("emit needs a TracerProvider built with LoopTraceIdGenerator (use "
                "mythos_probe.collectors.exporter.tracer_provider) so span ids match the LoopTrace")


def test_emit_refuses_another_id_generator_naming_the_fix():
    for tracer in (TracerProvider().get_tracer("t"), otel_trace.NoOpTracer()):  # the latter has no id_generator
        with pytest.raises(ValueError) as info:
            spans.emit(tracer, hand_trace())
        assert str(info.value) == EMIT_REFUSAL


def test_emit_makes_no_iteration_spans_by_default():
    exporter = InMemorySpanExporter()
    provider = tracer_provider(SimpleSpanProcessor(exporter))
    spans.emit(provider.get_tracer("t"), hand_trace())
    provider.shutdown()
    assert [s.name for s in exporter.get_finished_spans()] == ["looped_forward"]


def test_decoder_of_a_span_without_the_optional_arrays():
    bare = hand_trace(detail="summary", position_metrics={}, expert_load=None, position_iterations=None,
                      token_ids=None, token_text=None)
    t = spans.attributes_to_trace(spans.trace_to_attributes(bare), TRACE_ID, SPAN_ID, 1_000_000_000, 1_000_600_000)
    assert (t.position_iterations, t.token_ids, t.token_text, t.expert_load) == (None, None, None, None)
    assert t.position_metrics == {} and t.to_dict() == bare.to_dict()


def test_id_generator_pins_one_span_per_thread():
    gen = spans.LoopTraceIdGenerator()
    gen.pin(7, 9)
    seen = {}

    def other():
        seen["ids"] = (gen.generate_trace_id(), gen.generate_span_id())

    th = threading.Thread(target=other)
    th.start()
    th.join()
    assert seen["ids"] != (7, 9)  # another thread never takes the pin
    assert (gen.generate_trace_id(), gen.generate_span_id()) == (7, 9)
    assert gen.generate_span_id() != 9  # the pin is spent on the span id
    assert gen.generate_trace_id() != 7


# --- rows: table columns by literal name ---------------------------------------------------------

def test_forwards_row_by_literal_columns():
    table = rows.forwards_table([hand_trace()], 41)
    row = table.to_pylist()[0]
    assert row["forward_id"] == 41
    fixed = {k: row[k] for k in ("trace_id", "span_id", "run_id", "model_id", "step", "start_ns", "end_ns", "duration_ms",
                                 "batch", "seq_len", "tokens", "n_loops", "iterations", "exit_policy", "detail",
                                 "n_experts", "schema_version", "loop_name", "kind", "rank", "local_rank",
                                 "world_size", "host", "pid", "job_id")}
    assert fixed == {"trace_id": TRACE_ID, "span_id": SPAN_ID, "run_id": "run-7", "model_id": "tiny", "step": 11,
                     "start_ns": 1_000_000_000, "end_ns": 1_000_600_000, "duration_ms": 0.6, "batch": 2,
                     "seq_len": 3, "tokens": 6, "n_loops": 4, "iterations": 2, "exit_policy": "kl",
                     "detail": "positions", "n_experts": 3, "schema_version": 2, "loop_name": "think",
                     "kind": "shadow", "rank": 1, "local_rank": 0, "world_size": 2, "host": "node-3", "pid": 4242,
                     "job_id": "job-9"}
    assert row["start_time"].isoformat() == "1970-01-01T00:00:01"
    odd = rows.forwards_table([hand_trace(start_ns=1_000_001_999, end_ns=1_000_602_000)], 0).to_pylist()[0]
    assert odd["start_time"].isoformat() == "1970-01-01T00:00:01.000001"  # whole microseconds, floored
    assert row["attributes"] == '{"request_id": "r1", "priority": 3, "cached": false, "temp": 0.5}'
    assert row["flops"] == 1234.5 and row["rho_A"] == 0.875
    assert all(row[n] is None for n in FORWARD_METRIC_NAMES if n not in ("flops", "rho_A"))


def test_iterations_rows_by_literal_columns():
    t2 = hand_trace(trace_id="1" * 32, span_id="2" * 16, iterations=1, iteration_metrics={"halt_prob": [0.125]},
                    position_metrics={}, expert_load=None, detail="summary")
    table = rows.iterations_table([hand_trace(), t2], 5)
    got = table.to_pydict()
    assert got["forward_id"] == [5, 5, 6]
    assert got["trace_id"] == [TRACE_ID, TRACE_ID, "1" * 32] and got["span_id"] == [SPAN_ID, SPAN_ID, "2" * 16]
    assert got["iteration"] == [0, 1, 0]
    assert got["halt_prob"] == [0.5, 0.75, 0.125]
    assert math.isnan(got["rel_residual"][0]) and got["rel_residual"][1:] == [0.25, None]  # NaN kept, missing NULL
    assert all(got[n] == [None] * 3 for n in ITERATION_METRIC_NAMES if n not in ("halt_prob", "rel_residual"))
    assert table.schema.field("iteration").type == pa.int32()
    assert table.column("trace_id").type == pa.dictionary(pa.int32(), pa.string())


def test_positions_rows_in_c_order_by_literal_columns():
    summary = hand_trace(trace_id="3" * 32, detail="summary", position_metrics={})
    table = rows.positions_table([summary, hand_trace(), hand_trace(trace_id="4" * 32, token_text=None, token_ids=None,
                                                                     position_iterations=None)], 100)
    got = table.to_pydict()
    assert len(got["forward_id"]) == 24 and got["forward_id"][:12] == [101] * 12 and got["forward_id"][12:] == [102] * 12
    assert got["batch_index"][:12] == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert got["position"][:12] == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]
    assert got["iteration"][:12] == [0, 1] * 6
    assert got["token_id"][:12] == [10, 10, 11, 11, 12, 12, 20, 20, 21, 21, 22, 22]
    assert got["token_text"][:12] == ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e", "f", "f"]
    assert got["iterations_used"][:12] == [1, 1, 2, 2, 2, 2, 2, 2, 1, 1, 2, 2]
    assert got["state_norm"][:12] == [i / 4 for i in range(12)]
    assert got["token_id"][12:] == [None] * 12 and got["token_text"][12:] == [None] * 12
    assert got["iterations_used"][12:] == [None] * 12
    assert got["trace_id"][12:] == ["4" * 32] * 12
    assert all(got[n] == [None] * 24 for n in POSITION_METRIC_NAMES if n != "state_norm")
    assert table.schema.field("state_norm").type == pa.float32()


def test_positions_token_text_of_two_forwards_index_their_own_words():
    other = hand_trace(trace_id="5" * 32, token_text=(("u", "v", "w"), ("x", "y", "z")))
    got = rows.positions_table([hand_trace(), other], 0).column("token_text").to_pylist()
    assert got[12:] == ["u", "u", "v", "v", "w", "w", "x", "x", "y", "y", "z", "z"]


def test_experts_rows_by_literal_columns():
    none = hand_trace(trace_id="6" * 32, expert_load=None)
    got = rows.experts_table([none, hand_trace()], 7).to_pydict()
    assert got["forward_id"] == [8] * 6
    assert got["iteration"] == [0, 0, 0, 1, 1, 1]
    assert got["expert"] == [0, 1, 2, 0, 1, 2]
    assert got["load"] == [1, 2, 3, 4, 5, 0]


def test_empty_tables_keep_their_schema():
    for name, table in rows.trace_tables([], 0).items():
        assert table.num_rows == 0, name
    assert rows.positions_table([], 0).schema.names[:3] == ["trace_id", "span_id", "forward_id"] or \
        set(["trace_id", "span_id"]) <= set(rows.positions_table([], 0).schema.names)


def test_trace_tables_numbers_forwards_from_the_first_id():
    tables = rows.trace_tables([hand_trace(), hand_trace(trace_id="7" * 32)], 20)
    assert set(tables) == {"forwards", "iterations", "positions", "experts"}
    for name, table in tables.items():
        assert set(table.column("forward_id").to_pylist()) == {20, 21}, name


def test_json_value_nulls_non_finite_everywhere():
    assert rows.json_value(math.nan) is None and rows.json_value(math.inf) is None and rows.json_value(1.5) == 1.5
    assert rows.json_value([1.0, math.nan, [math.inf, 2], "x"]) == [1.0, None, [None, 2], "x"]
    assert rows.json_value((1, -math.inf)) == [1, None]
    assert rows.json_value(np.array([1.0, np.nan])) == [1.0, None]
    assert rows.json_value(np.array([1.0, 2.0])) == [1.0, 2.0]
    assert rows.json_value(np.array([1, 2])) == [1, 2]
    assert rows.json_value("s") == "s" and rows.json_value(True) is True
    assert rows.to_json({"a": math.nan, "b": [1, 2]}) == '{"a": null, "b": [1, 2]}'


def test_span_rows_by_literal_columns():
    row = rows.trace_span_row(hand_trace(), {"service.name": "svc", "x": math.nan})
    attrs = row.pop("attributes")
    assert row == {"trace_id": TRACE_ID, "span_id": SPAN_ID, "parent_span_id": None, "name": "looped_forward",
                   "kind": "INTERNAL", "start_ns": 1_000_000_000, "end_ns": 1_000_600_000, "status_code": "UNSET",
                   "status_message": None, "resource": '{"service.name": "svc", "x": null}'}
    import json

    kept = json.loads(attrs)
    # the arrays the typed tables hold are left out; scalars and user attributes stay
    assert "recurrent_depth.iteration.halt_prob" not in kept and "recurrent_depth.expert.load" not in kept
    assert "recurrent_depth.token_ids" not in kept and "recurrent_depth.position.shape" not in kept
    assert kept["recurrent_depth.expert.count"] == 3 and kept["recurrent_depth.attr.request_id"] == "r1"
    assert kept["recurrent_depth.forward.flops"] == 1234.5
    assert rows.trace_span_row(hand_trace())["resource"] == "{}"


def test_decode_span_of_a_loop_span_and_of_another_span():
    trace, row = rows.decode_span(trace_id=TRACE_ID, span_id=SPAN_ID, parent_span_id="p" * 16, name="looped_forward",
                                  kind="SERVER", start_ns=1_000_000_000, end_ns=1_000_600_000, status_code="ERROR",
                                  status_message="", resource={}, attributes=HAND_ATTRS)
    assert trace.to_dict() == hand_trace().to_dict()
    assert (row["trace_id"], row["span_id"], row["name"]) == (TRACE_ID, SPAN_ID, "looped_forward")
    assert (row["parent_span_id"], row["kind"], row["status_code"], row["status_message"]) == ("p" * 16, "SERVER", "ERROR", None)
    assert "recurrent_depth.token_text" not in row["attributes"]
    other = {"recurrent_depth.iteration.halt_prob": [1.0], "http.route": "/x"}
    trace, row = rows.decode_span(trace_id=TRACE_ID, span_id=SPAN_ID, parent_span_id=None, name="http", kind="SERVER",
                                  start_ns=3, end_ns=4, status_code="OK", status_message="bad", resource={},
                                  attributes=other)
    assert trace is None
    assert row["attributes"] == '{"recurrent_depth.iteration.halt_prob": [1.0], "http.route": "/x"}'  # kept: not a forward
    assert row["status_message"] == "bad" and (row["start_ns"], row["end_ns"]) == (3, 4)


def test_spans_table_schema():
    table = rows.spans_table([rows.trace_span_row(hand_trace())])
    assert table.schema.names == ["trace_id", "span_id", "parent_span_id", "name", "kind", "start_ns", "end_ns",
                                  "status_code", "status_message", "resource", "attributes"]
    assert table.schema.field("start_ns").type == pa.int64()


# Per-request budgets (rows differ, one threshold left to the policy: NaN), written out by hand.
BUDGETS = dict(row_max_loops=[3, 4], row_min_loops=[1, 2], row_exit_threshold=[0.25, math.nan],
               row_budget_reason=("tier:free", "explicit"))
BUDGET_ATTRS = {
    "recurrent_depth.budget.max_loops": [3, 4],
    "recurrent_depth.budget.min_loops": [1, 2],
    "recurrent_depth.budget.exit_threshold": [0.25, math.nan],
    "recurrent_depth.budget.reason": ["tier:free", "explicit"],
}


def test_encoder_writes_the_budgets_as_plain_lists():
    """Plain ints, floats and strs (the SDK drops numpy scalars from a sequence attribute)."""
    same(spans.trace_to_attributes(hand_trace(**BUDGETS)), {**HAND_ATTRS, **BUDGET_ATTRS})


def test_decoder_reads_the_budgets_from_lists_and_from_the_receivers_arrays():
    for given in (BUDGET_ATTRS, {k: np.asarray(v) for k, v in BUDGET_ATTRS.items()}):
        t = spans.attributes_to_trace({**HAND_ATTRS, **given}, TRACE_ID, SPAN_ID, 1_000_000_000, 1_000_600_000)
        assert t.row_max_loops.tolist() == [3, 4] and t.row_max_loops.dtype == np.int64
        assert t.row_min_loops.tolist() == [1, 2] and t.row_min_loops.dtype == np.int64
        assert t.row_exit_threshold[0] == 0.25 and math.isnan(t.row_exit_threshold[1])
        assert t.row_budget_reason == ("tier:free", "explicit") and all(type(r) is str for r in t.row_budget_reason)
    unbudgeted = spans.attributes_to_trace(HAND_ATTRS, TRACE_ID, SPAN_ID, 0, 1)
    assert (unbudgeted.row_max_loops, unbudgeted.row_min_loops, unbudgeted.row_exit_threshold,
            unbudgeted.row_budget_reason) == (None, None, None, None)


def test_emit_keeps_the_budgets_through_the_sdk():
    (forward,) = emitted(hand_trace(**BUDGETS), iteration_spans=False)
    got = {k: list(v) if isinstance(v, tuple) else v for k, v in forward.attributes.items()}
    same(got, {**HAND_ATTRS, **BUDGET_ATTRS})


def test_encoder_without_tables_leaves_out_the_iteration_arrays_and_the_expert_load_only():
    """`tables=False` (the raw `spans` row): the iterations and experts tables hold those arrays;
    the expert count, the forward scalars and the budgets stay."""
    attrs = spans.trace_to_attributes(hand_trace(**BUDGETS), positions=False, tables=False)
    left_out = {"recurrent_depth.iteration.rel_residual", "recurrent_depth.iteration.halt_prob",
                "recurrent_depth.expert.load", "recurrent_depth.position.shape", "recurrent_depth.position.state_norm"}
    same(attrs, {k: v for k, v in {**HAND_ATTRS, **BUDGET_ATTRS}.items() if k not in left_out})
