"""LoopTraces and raw spans → Arrow tables shaped like the store's tables, built vectorized.

Every table is built column by column with numpy (repeat/tile/ravel), never row by row: the
positions table alone holds batch × seq × iterations rows per forward. Per-forward strings
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

from mythos_probe.collectors.schema import RECORD_V2_COLUMNS, TABLES
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
            json_value(v) if isinstance(v, (list, tuple)) else None if type(v) is float and not math.isfinite(v) else v
            for v in value
        ]
    return value


def to_json(mapping: Mapping[str, Any]) -> str:
    return json.dumps({k: json_value(v) for k, v in mapping.items()}, allow_nan=False)  # pragma: no mutate (json_value removed NaN already; a guard)


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
        attributes=trace_to_attributes(trace, positions=False),  # pragma: no mutate (span_row drops the arrays anyway; False only skips encoding them)
    )


def spans_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=arrow_schema("spans"))


def forwards_table(traces: Sequence[LoopTrace], first_forward_id: int) -> pa.Table:
    cols: dict[str, Any] = {
        "forward_id": np.arange(first_forward_id, first_forward_id + len(traces), dtype=np.int64),  # pragma: no mutate (int64 is arange's default)
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
    }
    for name in FORWARD_METRIC_NAMES:
        cols[name] = [t.forward_metrics.get(name) for t in traces]
    schema = arrow_schema("forwards")
    return pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) for f in schema], schema=schema)


class _Columns:
    """Column pieces gathered per forward, then concatenated once into an Arrow table."""

    def __init__(self, table: str) -> None:
        self.schema = arrow_schema(table)
        # looked up once: `add` runs once per metric per forward, ~40 times per span
        self.dtypes = {f.name: f.type.to_pandas_dtype() for f in self.schema}
        self.traces: list[LoopTrace] = []  # one dictionary entry per forward for the id columns
        self.id_index: list[np.ndarray] = []
        self.values: dict[str, list[np.ndarray]] = {}
        self.masks: dict[str, list[np.ndarray]] = {}
        self.text_dict: list[np.ndarray] = []
        self.text_index: list[np.ndarray] = []

    def add_ids(self, trace: LoopTrace, forward_id: int, n: int) -> None:
        self.id_index.append(np.full(n, len(self.traces), dtype=np.int32))
        self.traces.append(trace)
        self.add("forward_id", np.full(n, forward_id, dtype=np.int64), n)  # pragma: no mutate (a Python int fills int64 anyway)

    def add(self, name: str, values: np.ndarray | None, n: int) -> None:
        dtype = self.dtypes[name]  # pragma: no mutate (pa.array casts to the column type too; this keeps one dtype per column)
        if values is None:
            self.values.setdefault(name, []).append(np.zeros(n, dtype=dtype))  # pragma: no mutate (masked: nulls whatever their dtype)
            self.masks.setdefault(name, []).append(np.ones(n, dtype=bool))
        else:
            self.values.setdefault(name, []).append(np.asarray(values, dtype=dtype))  # pragma: no mutate (pa.array casts the same)
            self.masks.setdefault(name, []).append(np.zeros(n, dtype=bool))

    def add_text(self, texts: list[str] | None, index: np.ndarray) -> None:
        offset = sum(len(d) for d in self.text_dict)
        if texts is None:
            self.text_index.append(np.full(len(index), -1, dtype=np.int32))  # pragma: no mutate (every negative index is null)
        else:
            self.text_dict.append(np.array(texts, dtype=object))
            self.text_index.append(index.astype(np.int32) + offset)

    def table(self) -> pa.Table:
        index = np.concatenate(self.id_index) if self.id_index else np.zeros(0, np.int32)
        arrays = {
            "trace_id": pa.DictionaryArray.from_arrays(index, pa.array([t.trace_id for t in self.traces], pa.string())),
            "span_id": pa.DictionaryArray.from_arrays(index, pa.array([t.span_id for t in self.traces], pa.string())),
        }
        if "token_text" in self.schema.names:
            text_index = np.concatenate(self.text_index) if self.text_index else np.zeros(0, np.int32)
            dictionary = np.concatenate(self.text_dict) if self.text_dict else np.zeros(0, object)
            arrays["token_text"] = pa.DictionaryArray.from_arrays(
                pa.array(text_index, mask=text_index < 0), pa.array(dictionary, pa.string())
            )
        for name, pieces in self.values.items():
            values = np.concatenate(pieces)
            mask = np.concatenate(self.masks[name])
            arrays[name] = pa.array(values, mask=mask if mask.any() else None, type=self.schema.field(name).type)  # pragma: no mutate (values have the column dtype; an all-false mask is no mask)
        fields = [pa.field(name, arr.type) for name, arr in arrays.items() if name in self.schema.names]
        return pa.Table.from_arrays([arrays[f.name] for f in fields], schema=pa.schema(fields))


def iterations_table(traces: Iterable[LoopTrace], first_forward_id: int) -> pa.Table:
    cols = _Columns("iterations")
    for forward_id, t in enumerate(traces, first_forward_id):
        n = t.iterations
        cols.add_ids(t, forward_id, n)
        cols.add("iteration", np.arange(n), n)
        for name in ITERATION_METRIC_NAMES:
            cols.add(name, t.iteration_metrics.get(name), n)
    return cols.table()


def positions_table(traces: Iterable[LoopTrace], first_forward_id: int) -> pa.Table:
    """batch × seq × iterations rows per forward at detail="positions", in C order (b, s, t)."""
    cols = _Columns("positions")
    for forward_id, t in enumerate(traces, first_forward_id):
        if t.detail != "positions":
            continue
        b, s, it = t.batch, t.seq_len, t.iterations
        n = b * s * it
        per_position = np.arange(b * s).repeat(it)  # row → flat (b, s) index
        cols.add_ids(t, forward_id, n)
        cols.add("batch_index", per_position // s, n)  # pragma: no mutate (/ too: the int32 cast floors these non-negative quotients)
        cols.add("position", per_position % s, n)
        cols.add("iteration", np.tile(np.arange(it), b * s), n)
        cols.add("token_id", None if t.token_ids is None else t.token_ids.ravel()[per_position], n)
        cols.add(
            "iterations_used",
            None if t.position_iterations is None else t.position_iterations.ravel()[per_position],
            n,
        )
        texts = None if t.token_text is None else [x for row in t.token_text for x in row]
        cols.add_text(texts, per_position)
        for name in POSITION_METRIC_NAMES:
            values = t.position_metrics.get(name)
            cols.add(name, None if values is None else values.ravel(), n)
    return cols.table()


def experts_table(traces: Iterable[LoopTrace], first_forward_id: int) -> pa.Table:
    cols = _Columns("experts")
    for forward_id, t in enumerate(traces, first_forward_id):
        if t.expert_load is None:
            continue
        it, e = t.expert_load.shape
        cols.add_ids(t, forward_id, it * e)
        cols.add("iteration", np.arange(it).repeat(e), it * e)
        cols.add("expert", np.tile(np.arange(e), it), it * e)
        cols.add("load", t.expert_load.ravel(), it * e)
    return cols.table()


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
