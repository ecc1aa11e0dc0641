"""LoopTraces and raw spans → Arrow tables shaped like the store's tables, built vectorized.

Every table is built column by column with numpy (repeat/tile/ravel), never row by row, and for
a whole batch at once (one concatenation per column, not one piece per metric per forward): the
positions table alone holds batch × seq × iterations rows per forward. `Batch` carries a
request's tables (and rollup increments) from the decode worker that built them to the writer. Per-forward strings
(trace and span ids, token text) become dictionary arrays, so a million-row batch carries each
id once. A metric missing from a record is NULL in its rows; NaN values stay NaN. The store
numbers the forwards of a batch (`forward_id`, see `schema`) and passes the first number in.

This module is not: the table layout (`schema`), the span encoding (`spans`) or the database
writes (`store`).
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from mythos_probe.collectors import rollups
from mythos_probe.collectors.schema import RECORD_V2_COLUMNS, ROW_BUDGET_COLUMNS, TABLES
from mythos_probe.collectors.spans import (
    FORWARD_SPAN_NAME,
    ATTR_EXPERT_LOAD,
    ITERATION_ATTRS,
    POSITION_LEVEL_ATTRS,
    attributes_to_trace,
    is_loop_span,
    trace_to_attributes,
)
from mythos_probe.records import FORWARD_METRIC_NAMES, ITERATION_METRIC_NAMES, POSITION_METRIC_NAMES, LoopTrace

_ARROW_TYPES = {
    "VARCHAR": pa.string(),
    "JSON": pa.string(),
    "BIGINT": pa.int64(),
    "INTEGER": pa.int32(),
    "DOUBLE": pa.float64(),
    "REAL": pa.float32(),
    "TIMESTAMP": pa.timestamp("us"),
    "BIGINT[]": pa.list_(pa.int64()),
    "DOUBLE[]": pa.list_(pa.float64()),
    "VARCHAR[]": pa.list_(pa.string()),
}


_TABLE_ATTRS = POSITION_LEVEL_ATTRS | frozenset(ITERATION_ATTRS.values()) | {ATTR_EXPERT_LOAD}


def arrow_schema(table: str) -> pa.Schema:
    return pa.schema([(name, _ARROW_TYPES[typ]) for name, typ in TABLES[table]])


def json_value(value: Any) -> Any:
    """JSON has no NaN or ±Inf: they become null in the JSON columns (the typed columns keep them).

    Arrays (lists, tuples, numpy arrays from the receiver) are flat in OTel; their elements are
    checked inline rather than by a call per element, since a span carries dozens of them.
    """
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":  # the receiver's double[]: replace the non-finite in one pass
            finite = np.isfinite(value)
            if not finite.all():
                boxed = value.astype(object)
                boxed[~finite] = None
                return boxed.tolist()
        return value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [
            json_value(v) if isinstance(v, (list, tuple)) else None if isinstance(v, float) and not math.isfinite(v) else v
            for v in value
        ]
    return value


def to_json(mapping: Mapping[str, Any]) -> str:
    try:  # most mappings hold only finite Python values: encoded as they are, in one call
        return json.dumps(mapping, allow_nan=False)
    except (ValueError, TypeError):  # NaN/±Inf (→ null) or numpy values: value by value
        return json.dumps({k: json_value(v) for k, v in mapping.items()}, allow_nan=False)


def span_row(
    *,
    trace_id: str,
    span_id: str,
    parent_span_id: str | None,
    name: str,
    kind: str,
    start_ns: int,
    end_ns: int,
    status_code: str,
    status_message: str | None,
    resource: Mapping[str, Any],
    attributes: Mapping[str, Any],
) -> dict[str, Any]:
    """One `spans` row. A forward span's arrays are left out: the `positions`, `iterations` and
    `experts` tables hold them, typed and with their NaNs (JSON would null them); encoding them as
    JSON again was the receiver's largest cost."""
    if name == FORWARD_SPAN_NAME:
        attributes = {k: v for k, v in attributes.items() if k not in _TABLE_ATTRS}
    return {
        "trace_id": trace_id,
        "span_id": span_id,
        "parent_span_id": parent_span_id,
        "name": name,
        "kind": kind,
        "start_ns": int(start_ns),
        "end_ns": int(end_ns),
        "status_code": status_code,
        "status_message": status_message or None,
        "resource": to_json(resource),
        "attributes": to_json(attributes),
    }


def trace_span_row(trace: LoopTrace, resource: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `spans` row that `spans.emit` + an exporter would produce for `trace`."""
    return span_row(
        trace_id=trace.trace_id,
        span_id=trace.span_id,
        parent_span_id=None,
        name=FORWARD_SPAN_NAME,
        kind="INTERNAL",
        start_ns=trace.start_ns,
        end_ns=trace.end_ns,
        status_code="UNSET",
        status_message=None,
        resource=resource or {},
        attributes=trace_to_attributes(trace, positions=False, tables=False),  # pragma: no mutate (span_row drops them anyway: the flags only save work)
    )


def spans_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=arrow_schema("spans"))


def forwards_table(traces: Sequence[LoopTrace], first_forward_id: int) -> pa.Table:
    cols: dict[str, Any] = {
        "forward_id": np.arange(first_forward_id, first_forward_id + len(traces), dtype=np.int64),
        "trace_id": [t.trace_id for t in traces],
        "span_id": [t.span_id for t in traces],
        "run_id": [t.run_id for t in traces],
        "model_id": [t.model_id for t in traces],
        "step": [t.step for t in traces],
        "start_ns": [t.start_ns for t in traces],
        "end_ns": [t.end_ns for t in traces],
        "start_time": [t.start_ns // 1000 for t in traces],
        "duration_ms": [t.duration_ms for t in traces],
        "batch": [t.batch for t in traces],
        "seq_len": [t.seq_len for t in traces],
        "tokens": [t.batch * t.seq_len for t in traces],
        "n_loops": [t.n_loops for t in traces],
        "iterations": [t.iterations for t in traces],
        "exit_policy": [t.exit_policy for t in traces],
        "detail": [t.detail for t in traces],
        "n_experts": [t.n_experts for t in traces],
        "schema_version": [t.schema_version for t in traces],
        "attributes": [to_json(t.attributes) for t in traces],
        **{col: [getattr(t, col) for t in traces] for col, _, _ in RECORD_V2_COLUMNS},
        # lists per batch row, or None (NULL); NaN thresholds stay NaN (the policy's default)
        **{col: [None if (v := getattr(t, col)) is None else list(v) for t in traces] for col, _ in ROW_BUDGET_COLUMNS},
    }
    for name in FORWARD_METRIC_NAMES:
        cols[name] = [t.forward_metrics.get(name) for t in traces]
    schema = arrow_schema("forwards")
    return pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) for f in schema], schema=schema)


def _pieces(pieces: Sequence[Any], counts: np.ndarray, typ: pa.DataType) -> pa.Array:
    """One column of a whole batch from per-forward pieces (None: NULL for that forward's rows),
    concatenated once: the pieces of a record are already typed numpy arrays (`LoopTrace`)."""
    dtype = typ.to_pandas_dtype()
    total = int(counts.sum())
    present = [p is not None for p in pieces]
    if all(present):
        values = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
        return pa.array(values.astype(dtype, copy=False), type=typ)
    values, mask = np.zeros(total, dtype=dtype), np.ones(total, dtype=bool)
    if any(present):
        ends = np.cumsum(counts)
        for piece, end, n in zip(pieces, ends.tolist(), counts.tolist()):
            if piece is not None:
                values[end - n:end] = piece
                mask[end - n:end] = False
    return pa.array(values, mask=mask, type=typ)


def _ids(traces: Sequence[LoopTrace], counts: np.ndarray, first_forward_id: int) -> dict[str, pa.Array]:
    """trace_id, span_id (dictionary arrays: one entry per forward) and forward_id of `counts`
    rows per forward."""
    index = np.repeat(np.arange(len(traces), dtype=np.int32), counts)
    return {
        "trace_id": pa.DictionaryArray.from_arrays(index, pa.array([t.trace_id for t in traces], pa.string())),
        "span_id": pa.DictionaryArray.from_arrays(index, pa.array([t.span_id for t in traces], pa.string())),
        "forward_id": pa.array(np.repeat(np.arange(first_forward_id, first_forward_id + len(traces), dtype=np.int64), counts)),
    }


def _within(counts: np.ndarray) -> np.ndarray:
    """Each row's index within its forward's rows (0 … count-1, forward after forward)."""
    starts = np.cumsum(counts) - counts
    return np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)


def _table(name: str, arrays: dict[str, pa.Array]) -> pa.Table:
    schema = arrow_schema(name)
    fields = [pa.field(n, arr.type) for n, arr in arrays.items() if n in schema.names]
    return pa.Table.from_arrays([arrays[f.name] for f in fields], schema=pa.schema(fields))


def iterations_table(traces: Iterable[LoopTrace], first_forward_id: int) -> pa.Table:
    """`iterations` rows of a whole batch, each column built from the batch's pieces at once."""
    traces = list(traces)
    schema = arrow_schema("iterations")
    counts = np.array([t.iterations for t in traces], dtype=np.int64)
    arrays = _ids(traces, counts, first_forward_id)
    arrays["iteration"] = pa.array(_within(counts), type=schema.field("iteration").type)
    for name in ITERATION_METRIC_NAMES:
        arrays[name] = _pieces([t.iteration_metrics.get(name) for t in traces], counts, schema.field(name).type)
    return _table("iterations", arrays)


def positions_table(traces: Iterable[LoopTrace], first_forward_id: int) -> pa.Table:
    """batch × seq × iterations rows per forward at detail="positions", in C order (b, s, t)."""
    numbered = [(i, t) for i, t in enumerate(traces, first_forward_id) if t.detail == "positions"]
    traces = [t for _, t in numbered]
    schema = arrow_schema("positions")
    counts = np.array([t.batch * t.seq_len * t.iterations for t in traces], dtype=np.int64)
    index = np.repeat(np.arange(len(traces), dtype=np.int32), counts)
    arrays: dict[str, Any] = {
        "trace_id": pa.DictionaryArray.from_arrays(index, pa.array([t.trace_id for t in traces], pa.string())),
        "span_id": pa.DictionaryArray.from_arrays(index, pa.array([t.span_id for t in traces], pa.string())),
    }
    # row → flat (b, s) index within its forward; the texts of all forwards in one dictionary
    per_position = [np.arange(t.batch * t.seq_len).repeat(t.iterations) for t in traces]
    texts, text_index, offset = [], [], 0
    for t, flat in zip(traces, per_position):
        if t.token_text is None:
            text_index.append(np.full(len(flat), -1, dtype=np.int32))
        else:
            texts.extend(x for row in t.token_text for x in row)
            text_index.append(flat.astype(np.int32) + offset)
            offset = len(texts)
    text_index = np.concatenate(text_index) if text_index else np.zeros(0, np.int32)
    arrays["token_text"] = pa.DictionaryArray.from_arrays(pa.array(text_index, mask=text_index < 0),
                                                          pa.array(texts, pa.string()))
    arrays["forward_id"] = pa.array(np.repeat(np.array([i for i, _ in numbered], dtype=np.int64), counts))
    flat = np.concatenate(per_position) if per_position else np.zeros(0, np.int64)
    seq = np.repeat(np.array([t.seq_len for t in traces], dtype=np.int64), counts)
    typ = schema.field
    arrays["batch_index"] = pa.array(flat // np.maximum(seq, 1), type=typ("batch_index").type)
    arrays["position"] = pa.array(flat % np.maximum(seq, 1), type=typ("position").type)
    arrays["iteration"] = pa.array(np.concatenate([np.tile(np.arange(t.iterations), t.batch * t.seq_len) for t in traces])
                                   if traces else np.zeros(0, np.int64), type=typ("iteration").type)
    arrays["token_id"] = _pieces([None if t.token_ids is None else t.token_ids.ravel()[p]
                                  for t, p in zip(traces, per_position)], counts, typ("token_id").type)
    arrays["iterations_used"] = _pieces([None if t.position_iterations is None else t.position_iterations.ravel()[p]
                                         for t, p in zip(traces, per_position)], counts, typ("iterations_used").type)
    for name in POSITION_METRIC_NAMES:
        arrays[name] = _pieces([None if (v := t.position_metrics.get(name)) is None else v.ravel() for t in traces],
                               counts, typ(name).type)
    return _table("positions", arrays)


def experts_table(traces: Iterable[LoopTrace], first_forward_id: int) -> pa.Table:
    numbered = [(i, t) for i, t in enumerate(traces, first_forward_id) if t.expert_load is not None]
    traces = [t for _, t in numbered]
    schema = arrow_schema("experts")
    shapes = np.array([t.expert_load.shape for t in traces], dtype=np.int64).reshape(-1, 2)
    counts = shapes[:, 0] * shapes[:, 1]
    index = np.repeat(np.arange(len(traces), dtype=np.int32), counts)
    within = _within(counts)
    experts = np.repeat(shapes[:, 1], counts)
    arrays = {
        "trace_id": pa.DictionaryArray.from_arrays(index, pa.array([t.trace_id for t in traces], pa.string())),
        "span_id": pa.DictionaryArray.from_arrays(index, pa.array([t.span_id for t in traces], pa.string())),
        "forward_id": pa.array(np.repeat(np.array([i for i, _ in numbered], dtype=np.int64), counts)),
        "iteration": pa.array(within // np.maximum(experts, 1), type=schema.field("iteration").type),
        "expert": pa.array(within % np.maximum(experts, 1), type=schema.field("expert").type),
        "load": _pieces([t.expert_load.ravel() for t in traces], counts, schema.field("load").type),
    }
    return _table("experts", arrays)


def trace_tables(traces: Sequence[LoopTrace], first_forward_id: int) -> dict[str, pa.Table]:
    """The forwards/iterations/positions/experts tables for `traces`, numbered from `first_forward_id`."""
    return {
        "forwards": forwards_table(traces, first_forward_id),
        "iterations": iterations_table(traces, first_forward_id),
        "positions": positions_table(traces, first_forward_id),
        "experts": experts_table(traces, first_forward_id),
    }


def decode_span(
    *,
    trace_id: str,
    span_id: str,
    parent_span_id: str | None,
    name: str,
    kind: str,
    start_ns: int,
    end_ns: int,
    status_code: str,
    status_message: str | None,
    resource: Mapping[str, Any],
    attributes: Mapping[str, Any],
) -> tuple[LoopTrace | None, dict[str, Any]]:
    """A span from any transport → (its LoopTrace, or None for other spans; its `spans` row).

    The SDK exporter and the OTLP receiver both call this, which is why they store the same rows.
    """
    trace = None
    if is_loop_span(name, attributes):
        trace = attributes_to_trace(attributes, trace_id, span_id, start_ns, end_ns)
    row = span_row(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent_span_id,
        name=name,
        kind=kind,
        start_ns=start_ns,
        end_ns=end_ns,
        status_code=status_code,
        status_message=status_message,
        resource=resource,
        attributes=attributes,
    )
    return trace, row


def _streams(tables: Mapping[str, pa.Table]) -> dict[str, bytes]:
    out = {}
    for name, table in tables.items():
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        out[name] = sink.getvalue().to_pybytes()
    return out


def _tables(streams: Mapping[str, bytes]) -> dict[str, pa.Table]:
    return {name: pa.ipc.open_stream(data).read_all() for name, data in streams.items()}


class Batch:
    """A request's forwards and span rows as Arrow tables, built where it was decoded (a decode
    worker), so that only columns cross to the writer: `tables` holds the `trace_tables` of
    `n_forwards` forwards numbered 0 … n-1 and the `spans` table; `traces` the LoopTraces
    themselves where the writer needs them (an `on_stored` callback), else None.
    `Store.write_batch` numbers the new ones and drops the ones already stored."""

    def __init__(self, tables: dict[str, pa.Table], traces: list[LoopTrace] | None = None,
                 increments: dict[str, pa.Table] | None = None) -> None:
        self.tables, self.traces, self.increments = tables, traces, increments

    @classmethod
    def of(cls, traces: Sequence[LoopTrace], span_rows: Sequence[Mapping[str, Any]], keep_traces: bool = False) -> "Batch":
        """The batch of `traces` and `span_rows`, with its rollup increments (`rollups.increments`)."""
        tables = trace_tables(traces, 0)
        tables["spans"] = spans_table(span_rows)
        return cls(tables, list(traces) if keep_traces else None, rollups.increments(tables) if traces else {})

    def __getstate__(self) -> dict:
        # A batch crosses from its decode worker as one Arrow IPC stream per table: 4-5x less CPU
        # on each side than pickling the tables themselves (`benchmarks/bench_receiver`).
        return {"tables": _streams(self.tables), "traces": self.traces,
                "increments": None if self.increments is None else _streams(self.increments)}

    def __setstate__(self, state: dict) -> None:
        self.tables, self.traces = _tables(state["tables"]), state["traces"]
        self.increments = None if state["increments"] is None else _tables(state["increments"])

    @property
    def n_forwards(self) -> int:
        return self.tables["forwards"].num_rows

    @property
    def n_spans(self) -> int:
        return self.tables["spans"].num_rows

    def keys(self, table: str) -> list[tuple[str, str]]:
        """(trace_id, span_id) of each forward (`table` "forwards") or span row ("spans"), in order."""
        t = self.tables[table]
        return list(zip(t.column("trace_id").to_pylist(), t.column("span_id").to_pylist()))

    @classmethod
    def concat(cls, batches: Sequence["Batch"]) -> "Batch":
        """One batch of `batches` in order, the forwards numbered on across them."""
        if len(batches) == 1:
            return batches[0]
        tables, added, offset = {name: [] for name in batches[0].tables}, {}, 0
        for b in batches:
            for name, t in [*b.tables.items(), *(b.increments or {}).items()]:
                if "forward_id" in t.schema.names and offset:
                    i = t.schema.get_field_index("forward_id")
                    t = t.set_column(i, "forward_id", pa.array(t.column(i).to_numpy() + offset, pa.int64()))
                (tables if name in b.tables else added).setdefault(name, []).append(t)
            offset += b.n_forwards
        traces = None if any(b.traces is None for b in batches) else [t for b in batches for t in b.traces]
        increments = None if any(b.increments is None for b in batches) else {
            name: pa.concat_tables(parts, promote_options="default") for name, parts in added.items()}
        return cls({name: pa.concat_tables(parts) for name, parts in tables.items()}, traces, increments)

    def select(self, forwards: np.ndarray, spans: np.ndarray,
               first_forward_id: int) -> tuple[dict[str, pa.Table], dict[str, pa.Table] | None]:
        """(the tables of the forwards at positions `forwards` (ascending), numbered from
        `first_forward_id` on, and of the span rows at positions `spans`; their rollup increments
        when the batch's own hold for them, i.e. every forward is kept, else None)."""
        numbers = np.full(self.n_forwards, -1, dtype=np.int64)
        numbers[forwards] = first_forward_id + np.arange(len(forwards), dtype=np.int64)
        every = self.increments is not None and len(forwards) == self.n_forwards
        out = {}
        for name, t in [*self.tables.items(), *(self.increments.items() if every else ())]:
            if name == "spans":
                out[name] = t if len(spans) == t.num_rows else t.take(pa.array(spans, pa.int64()))
                continue
            i = t.schema.get_field_index("forward_id")
            if i < 0:  # a rollup increment keyed by hour: kept whole (every forward is)
                out[name] = t
                continue
            ids = numbers[t.column(i).to_numpy()] if t.num_rows else np.zeros(0, np.int64)
            keep = ids >= 0
            if not keep.all():
                t, ids = t.filter(pa.array(keep)), ids[keep]
            out[name] = t.set_column(i, "forward_id", pa.array(ids, pa.int64()))
        added = {name: out.pop(name) for name in list(out) if name not in self.tables}
        return out, (added if every else None)
