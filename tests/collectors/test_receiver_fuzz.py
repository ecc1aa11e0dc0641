"""Property-based: OTLP requests from the project's encoder, valid and mutated by Hypothesis, sent to
a running receiver. Every request gets 200, 400, 413 or 415; the store stays consistent (each forward
has exactly its rows, no row without its forward) and the server keeps serving."""

import gzip

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue

from mythos_probe.collectors.otlp_decode import Limits
from mythos_probe.collectors.receiver import Receiver
from mythos_probe.collectors.store import Store
from tests.collectors.factory import make_trace
from tests.collectors.test_receiver import otlp_body, post

SHAPE_KEYS = [f"recurrent_depth.{k}" for k in (
    "batch", "seq_len", "iterations", "n_loops", "schema_version", "detail", "step", "expert.count",
    "position.shape", "token_ids", "token_text", "position.iterations_used", "expert.load",
    "iteration.rel_residual", "position.rel_residual", "forward.flops", "kind", "loop_name", "rank.index")]

scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(lambda v: AnyValue(int_value=v)),
    st.sampled_from([-1, 0, 1, 2, 3, 5, 10**6]).map(lambda v: AnyValue(int_value=v)),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda v: AnyValue(double_value=v)),
    st.text(max_size=8).map(lambda v: AnyValue(string_value=v)),
    st.sampled_from(["positions", "summary", "served", "loop"]).map(lambda v: AnyValue(string_value=v)),
    st.booleans().map(lambda v: AnyValue(bool_value=v)),
    st.binary(max_size=8).map(lambda v: AnyValue(bytes_value=v)),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=40).map(lambda vs: AnyValue(array_value=ArrayValue(values=vs))),
    st.lists(st.integers(-3, 40), max_size=60).map(
        lambda vs: AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=v) for v in vs]))),
    st.lists(st.floats(), max_size=60).map(
        lambda vs: AnyValue(array_value=ArrayValue(values=[AnyValue(double_value=v) for v in vs]))),
)

traces = st.builds(
    lambda seed, batch, seq_len, n_loops, detail, n_experts, all_metrics, with_text: make_trace(
        seed, batch=batch, seq_len=seq_len, n_loops=n_loops, detail=detail, n_experts=n_experts,
        all_metrics=all_metrics, with_text=with_text),
    st.integers(0, 10**6), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4),
    st.sampled_from(["summary", "positions"]), st.integers(0, 3), st.booleans(), st.booleans(),
)

mutation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(SHAPE_KEYS), values),
    st.tuples(st.just("delete"), st.sampled_from(SHAPE_KEYS), st.none()),
    st.tuples(st.just("set"), st.just("recurrent_depth.attr.wide"), st.integers(495, 505).map(
        lambda n: AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=1)] * n)))),
    st.tuples(st.just("time"), st.sampled_from(["start_time_unix_nano", "end_time_unix_nano"]),
              st.integers(0, 2**64 - 1)),
    st.tuples(st.just("id"), st.sampled_from(["trace_id", "span_id", "parent_span_id"]), st.binary(max_size=20)),
    st.tuples(st.just("name"), st.sampled_from(["looped_forward", "loop_iteration", "other"]), st.none()),
)


def mutate(request, span_index, op):
    kind, key, value = op
    spans = request.resource_spans[0].scope_spans[0].spans
    span = spans[span_index % len(spans)]
    if kind in ("set", "delete"):
        kept = [kv for kv in span.attributes if kv.key != key]
        del span.attributes[:]
        span.attributes.extend(kept)
        if kind == "set":
            span.attributes.append(KeyValue(key=key, value=value))
    elif kind == "time":
        setattr(span, key, value)
    elif kind == "id":
        setattr(span, key, value)
    else:
        span.name = key


def consistent(store):
    """(forwards, problems): every forward has exactly its rows; no row lacks its forward."""
    checks = {
        "iterations": ("SELECT count(*) FROM iterations i WHERE i.trace_id = f.trace_id AND i.span_id = f.span_id",
                       "f.iterations"),
        "positions": ("SELECT count(*) FROM positions p WHERE p.trace_id = f.trace_id AND p.span_id = f.span_id",
                      "CASE WHEN f.detail = 'positions' THEN f.batch * f.seq_len * f.iterations ELSE 0 END"),
        "experts": ("SELECT count(*) FROM experts e WHERE e.trace_id = f.trace_id AND e.span_id = f.span_id",
                    "f.iterations * f.n_experts"),
        "spans": ("SELECT count(*) FROM spans s WHERE s.trace_id = f.trace_id AND s.span_id = f.span_id", "1"),
    }
    problems = []
    for table, (counted, expected) in checks.items():
        bad = store.query(f"SELECT count(*) AS n FROM forwards f WHERE ({counted}) <> {expected}").n[0]
        if bad:
            problems.append(f"{bad} forwards with the wrong number of {table} rows")
        if table != "spans":
            orphans = store.query(f"SELECT count(*) AS n FROM {table} t WHERE NOT EXISTS "
                                  "(SELECT 1 FROM forwards f WHERE f.trace_id = t.trace_id AND f.span_id = t.span_id)").n[0]
            if orphans:
                problems.append(f"{orphans} orphaned {table} rows")
    return problems


def test_fuzzed_requests_are_answered_and_leave_the_store_consistent(tmp_path):
    limits = Limits(max_body_bytes=64 * 1024, max_spans=6, max_array=500, max_iterations=64, max_rows=80)
    statuses = {}
    with Store(tmp_path / "fuzz.duckdb") as store, Receiver(store, port=0, limits=limits) as receiver:

        @settings(max_examples=150, deadline=None, database=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(st.lists(traces, min_size=1, max_size=3), st.lists(st.tuples(st.integers(0, 2), mutation), max_size=3),
               st.sampled_from(["as is", "truncated", "flipped", "gzip"]), st.integers(0, 2**16))
        def send(batch, mutations, framing, where):
            request = otlp_body(batch)
            for span_index, op in mutations:
                mutate(request, span_index, op)
            body = request.SerializeToString()
            headers = {}
            if framing == "truncated":
                body = body[: where % max(len(body), 1)]
            elif framing == "flipped":
                i = where % len(body)
                body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1:]
            elif framing == "gzip":
                body, headers = gzip.compress(body), {"Content-Encoding": "gzip"}
            status, reply = post(receiver, body, headers=headers)
            assert status in (200, 400, 413), (status, reply)
            statuses[status] = statuses.get(status, 0) + 1
            if not mutations and framing in ("as is", "gzip") and len(batch) <= limits.max_spans:
                fits = sum(1 + t.iterations * (1 + t.n_experts) + (t.batch * t.seq_len * t.iterations
                           if t.detail == "positions" else 0) for t in batch) <= limits.max_rows
                assert status == (200 if fits and len(body) <= limits.max_body_bytes else 413), reply

        send()
        assert consistent(store) == []
        assert min(statuses.get(200, 0), statuses.get(400, 0), statuses.get(413, 0)) > 0, statuses
        good = make_trace(10**7, batch=1, seq_len=2, n_loops=2)
        assert post(receiver, otlp_body([good]).SerializeToString())[0] == 200
        stored = store.query("SELECT iterations, batch, seq_len FROM forwards WHERE trace_id = ?", [good.trace_id])
        assert tuple(stored.iloc[0]) == (good.iterations, 1, 2)
