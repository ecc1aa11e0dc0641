"""The OpenTelemetry span encoding of a `LoopTrace`: a pure encoder/decoder plus `emit`.

One forward becomes one span named `looped_forward` whose attributes carry the whole record, so
any OTLP backend keeps it and our receiver rebuilds the exact `LoopTrace` from them:

- foreign conventions, written for other tools and never read back: `gen_ai.operation.name`
  (`text_completion`: a forward predicts the next tokens), `gen_ai.request.model`,
  `gen_ai.usage.input_tokens`, and OpenInference's `openinference.span.kind=LLM` and
  `llm.model_name` so Phoenix renders the span as a model call;
- ours, all under `recurrent_depth.` (see `ATTR_*` below): identity and shape scalars,
  `recurrent_depth.iteration.<metric>` as double[] (length = iterations),
  `recurrent_depth.forward.<metric>` as double,
  `recurrent_depth.position.<metric>` as double[] flattened in C order from
  (batch, seq, iterations), with the shape in `recurrent_depth.position.shape`,
  `recurrent_depth.expert.load` as int[] flattened from (iterations, n_experts) with
  `recurrent_depth.expert.count`, token ids/text and per-position iterations flattened from
  (batch, seq);
- user attributes as `recurrent_depth.attr.<key>`, namespaced so that a user key can never
  collide with ours or with another convention.

A metric absent from the record is absent from the span; a metric present with NaN values keeps
its NaNs (OTLP doubles are IEEE). Values are plain lists: the SDK stringifies numpy arrays.

`emit` creates the span with the record's own trace/span ids and timestamps so that an id copied
from Phoenix or Jaeger opens the same forward in our dashboard; this needs the tracer's provider
to use `LoopTraceIdGenerator` (`exporter.tracer_provider` does). Optional child spans, one per
iteration, let waterfall views show the loop; the record has no per-iteration timing, so they
split the forward's interval evenly and say so in `recurrent_depth.iteration.timing`.

This module is not: the transport (`exporter`, `receiver`) or the table rows (`rows`).
"""

from __future__ import annotations

import math
import threading
from typing import Any, Mapping

import numpy as np
from opentelemetry.sdk.trace import SpanLimits
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Tracer, set_span_in_context

from mythos_probe.records import (
    FORWARD_METRIC_NAMES,
    ITERATION_METRIC_NAMES,
    POSITION_METRIC_NAMES,
    LoopTrace,
)

FORWARD_SPAN_NAME = "looped_forward"
ITERATION_SPAN_NAME = "loop_iteration"  # + " <t>": `iteration_span_name`


def iteration_span_name(t: int) -> str:
    """The name of iteration t's child span (0-based, as `recurrent_depth.iteration.index`), so a
    trace view lists "loop_iteration 0", "loop_iteration 1", … rather than n identical rows."""
    return f"{ITERATION_SPAN_NAME} {t}"

NS = "recurrent_depth."
ATTR_RUN_ID = NS + "run_id"
ATTR_MODEL_ID = NS + "model_id"
ATTR_STEP = NS + "step"
ATTR_BATCH = NS + "batch"
ATTR_SEQ_LEN = NS + "seq_len"
ATTR_N_LOOPS = NS + "n_loops"
ATTR_ITERATIONS = NS + "iterations"
ATTR_EXIT_POLICY = NS + "exit_policy"
ATTR_DETAIL = NS + "detail"
ATTR_SCHEMA_VERSION = NS + "schema_version"
ATTR_LOOP_NAME = NS + "loop_name"
ATTR_KIND = NS + "kind"
# The rank family travels on every span (not only on the resource) so that one span alone rebuilds
# its record; absent on a version-1 span, where the record's defaults apply.
RANK_ATTRS = {
    "rank": (NS + "rank.index", int),
    "local_rank": (NS + "rank.local_index", int),
    "world_size": (NS + "rank.world_size", int),
    "host": (NS + "rank.host", str),
    "pid": (NS + "rank.pid", int),
    "job_id": (NS + "rank.job_id", str),
}
# The record's scalar fields, each one attribute: `trace_to_attributes` writes them from this table
# and `export --otlp` writes a stored forward's columns through it, so a new scalar field added here
# travels both ways (tests/collectors/test_export_roundtrip.py fails for one that does not).
SCALAR_ATTRS = {
    "run_id": ATTR_RUN_ID,
    "model_id": ATTR_MODEL_ID,
    "step": ATTR_STEP,
    "batch": ATTR_BATCH,
    "seq_len": ATTR_SEQ_LEN,
    "n_loops": ATTR_N_LOOPS,
    "iterations": ATTR_ITERATIONS,
    "exit_policy": ATTR_EXIT_POLICY,
    "detail": ATTR_DETAIL,
    "schema_version": ATTR_SCHEMA_VERSION,
    "loop_name": ATTR_LOOP_NAME,
    "kind": ATTR_KIND,
    **{field: key for field, (key, _) in RANK_ATTRS.items()},
}
# Per-request loop budgets, one entry per batch row (absent when the forward ran one n_loops): int[],
# int[], double[] (NaN: the policy's default) and string[]; `LoopTrace` casts them back on decoding.
BUDGET_ATTRS = {
    "row_max_loops": NS + "budget.max_loops",
    "row_min_loops": NS + "budget.min_loops",
    "row_exit_threshold": NS + "budget.exit_threshold",
    "row_budget_reason": NS + "budget.reason",
}
ATTR_POSITION_SHAPE = NS + "position.shape"
ATTR_POSITION_ITERATIONS = NS + "position.iterations_used"
ATTR_TOKEN_IDS = NS + "token_ids"
ATTR_TOKEN_TEXT = NS + "token_text"
ATTR_EXPERT_COUNT = NS + "expert.count"
ATTR_EXPERT_LOAD = NS + "expert.load"
ATTR_ITERATION_INDEX = NS + "iteration.index"
ATTR_ITERATION_TIMING = NS + "iteration.timing"
PREFIX_ITERATION = NS + "iteration."
PREFIX_FORWARD = NS + "forward."
PREFIX_POSITION = NS + "position."
PREFIX_USER = NS + "attr."

ITERATION_ATTRS = {name: PREFIX_ITERATION + name for name in ITERATION_METRIC_NAMES}
FORWARD_ATTRS = {name: PREFIX_FORWARD + name for name in FORWARD_METRIC_NAMES}
POSITION_ATTRS = {name: PREFIX_POSITION + name for name in POSITION_METRIC_NAMES}

# Attributes whose data the `positions` table holds row by row; the raw `spans` table leaves
# them out rather than storing every per-position array twice.
POSITION_LEVEL_ATTRS = frozenset(
    [*POSITION_ATTRS.values(), ATTR_POSITION_SHAPE, ATTR_POSITION_ITERATIONS, ATTR_TOKEN_IDS, ATTR_TOKEN_TEXT]
)

# A full record is ~70 attributes plus the user's; the SDK default (128) would silently drop the
# oldest beyond that. Attribute values (the flattened arrays) must never be truncated either.
SPAN_LIMITS = SpanLimits(max_span_attributes=4096, max_attribute_length=None)


def trace_to_attributes(trace: LoopTrace, positions: bool = True, tables: bool = True) -> dict[str, Any]:
    """Every field of `trace` as OTel attribute values (str, bool, int, float or lists of one);
    `positions=False` leaves out the per-position arrays (the raw `spans` rows never keep them,
    and turning them into lists is most of the encoding time); `tables=False` also the per-iteration
    arrays and the expert load, which the `iterations` and `experts` tables hold (the `spans` row)."""
    tokens = trace.batch * trace.seq_len
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.request.model": trace.model_id,
        "gen_ai.usage.input_tokens": tokens,
        "openinference.span.kind": "LLM",
        "llm.model_name": trace.model_id,
        # plain int and str: the record's checks (`records.FIELD_CHECKS`) made them so
        **{key: getattr(trace, field) for field, key in SCALAR_ATTRS.items()},
    }
    for name, values in trace.iteration_metrics.items() if tables else ():
        attrs[ITERATION_ATTRS[name]] = values.tolist()
    for name, value in trace.forward_metrics.items():
        attrs[FORWARD_ATTRS[name]] = float(value)
    if positions and trace.position_metrics:
        attrs[ATTR_POSITION_SHAPE] = [trace.batch, trace.seq_len, trace.iterations]
        for name, values in trace.position_metrics.items():
            # float32 → Python float (a double) is exact, so the decoder's cast back restores the same bits.
            attrs[POSITION_ATTRS[name]] = values.ravel().tolist()
    if trace.expert_load is not None:
        attrs[ATTR_EXPERT_COUNT] = trace.n_experts
        if tables:
            attrs[ATTR_EXPERT_LOAD] = trace.expert_load.ravel().tolist()
    if trace.position_iterations is not None:
        attrs[ATTR_POSITION_ITERATIONS] = trace.position_iterations.ravel().tolist()
    if trace.token_ids is not None:
        attrs[ATTR_TOKEN_IDS] = trace.token_ids.ravel().tolist()
    if trace.token_text is not None:
        attrs[ATTR_TOKEN_TEXT] = [t for row in trace.token_text for t in row]
    for field, key in BUDGET_ATTRS.items():
        value = getattr(trace, field)
        if value is not None:
            attrs[key] = list(value) if isinstance(value, tuple) else value.tolist()
    for key, value in trace.attributes.items():
        attrs[PREFIX_USER + key] = value
    return attrs


def is_loop_span(name: str, attrs: Mapping[str, Any]) -> bool:
    """Whether a span (from any transport) carries a `LoopTrace`."""
    return name == FORWARD_SPAN_NAME and ATTR_SCHEMA_VERSION in attrs


def attributes_to_trace(
    attrs: Mapping[str, Any], trace_id: str, span_id: str, start_ns: int, end_ns: int
) -> LoopTrace:
    """Inverse of `trace_to_attributes`: rebuilds the exact record from span attributes."""
    batch, seq_len, iterations = int(attrs[ATTR_BATCH]), int(attrs[ATTR_SEQ_LEN]), int(attrs[ATTR_ITERATIONS])
    iteration_metrics = {
        name: np.asarray(attrs[key]) for name, key in ITERATION_ATTRS.items() if key in attrs  # float64: LoopTrace casts
    }
    forward_metrics = {name: float(attrs[key]) for name, key in FORWARD_ATTRS.items() if key in attrs}
    position_metrics = {}
    if ATTR_POSITION_SHAPE in attrs:
        shape = tuple(int(n) for n in attrs[ATTR_POSITION_SHAPE])
        position_metrics = {
            name: np.asarray(attrs[key]).reshape(shape)  # LoopTrace casts to float32
            for name, key in POSITION_ATTRS.items()
            if key in attrs
        }
    expert_load = None
    if ATTR_EXPERT_LOAD in attrs:
        expert_load = np.asarray(attrs[ATTR_EXPERT_LOAD]).reshape(  # LoopTrace casts to int64
            iterations, int(attrs[ATTR_EXPERT_COUNT])
        )

    def grid(key: str) -> np.ndarray | None:
        return np.asarray(attrs[key]).reshape(batch, seq_len) if key in attrs else None  # LoopTrace casts to int64

    token_text = None
    if ATTR_TOKEN_TEXT in attrs:
        flat = list(attrs[ATTR_TOKEN_TEXT])
        token_text = tuple(tuple(flat[b * seq_len : (b + 1) * seq_len]) for b in range(batch))
    user = {
        key[len(PREFIX_USER) :]: value.tolist() if isinstance(value, np.ndarray) else value
        for key, value in attrs.items()
        if key.startswith(PREFIX_USER)
    }
    return LoopTrace(
        trace_id=trace_id,
        span_id=span_id,
        run_id=str(attrs[ATTR_RUN_ID]),
        model_id=str(attrs[ATTR_MODEL_ID]),
        step=int(attrs[ATTR_STEP]),
        start_ns=int(start_ns),
        end_ns=int(end_ns),
        batch=batch,
        seq_len=seq_len,
        n_loops=int(attrs[ATTR_N_LOOPS]),
        iterations=iterations,
        exit_policy=str(attrs[ATTR_EXIT_POLICY]),
        detail=str(attrs[ATTR_DETAIL]),
        iteration_metrics=iteration_metrics,
        position_metrics=position_metrics,
        forward_metrics=forward_metrics,
        expert_load=expert_load,
        position_iterations=grid(ATTR_POSITION_ITERATIONS),
        token_ids=grid(ATTR_TOKEN_IDS),
        token_text=token_text,
        attributes=user,
        schema_version=int(attrs[ATTR_SCHEMA_VERSION]),
        loop_name=str(attrs.get(ATTR_LOOP_NAME, "loop")),
        kind=str(attrs.get(ATTR_KIND, "served")),
        **{field: cast(attrs[key]) for field, (key, cast) in RANK_ATTRS.items() if key in attrs},
        **{field: attrs[key] for field, key in BUDGET_ATTRS.items() if key in attrs},  # LoopTrace casts
    )


class LoopTraceIdGenerator(IdGenerator):
    """Random ids, except while `emit` pins the next span to its record's own ids.

    The pin is thread-local, so concurrent emitters never take each other's ids.
    """

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self._pinned = threading.local()

    def pin(self, trace_id: int, span_id: int) -> None:
        self._pinned.ids = (trace_id, span_id)

    def generate_trace_id(self) -> int:
        ids = getattr(self._pinned, "ids", None)
        return ids[0] if ids else self._random.generate_trace_id()

    def generate_span_id(self) -> int:
        ids = getattr(self._pinned, "ids", None)
        if ids:  # the SDK asks for the trace id first, then the span id: the pin is spent here
            self._pinned.ids = None  # pragma: no mutate (any falsy value unpins)
            return ids[1]
        return self._random.generate_span_id()


def emit(tracer: Tracer, trace: LoopTrace, iteration_spans: bool = False) -> None:
    """Record `trace` as a finished span (and optional per-iteration children) on `tracer`.

    With `iteration_spans`, each executed iteration t is a child span `loop_iteration t` carrying
    that iteration's metrics. The probes time the forward, not its iterations (timing each one
    would synchronise the device with the host inside the loop), so the children split the
    forward's time into equal slices, and say so: `recurrent_depth.iteration.timing = "even_split"`.

    Raises ValueError when the tracer's provider does not use `LoopTraceIdGenerator`, because a
    span under other ids could never be matched back to its forward.
    """
    generator = getattr(tracer, "id_generator", None)
    if not isinstance(generator, LoopTraceIdGenerator):
        raise ValueError(
            "emit needs a TracerProvider built with LoopTraceIdGenerator "
            "(use mythos_probe.collectors.exporter.tracer_provider) so span ids match the LoopTrace"
        )
    generator.pin(int(trace.trace_id, 16), int(trace.span_id, 16))
    # An empty context: the forward span is a root even when the caller has a span active.
    span = tracer.start_span(
        FORWARD_SPAN_NAME,
        context=Context(),
        kind=SpanKind.INTERNAL,  # pragma: no mutate (the SDK's default kind, written out for the reader)
        attributes=trace_to_attributes(trace),
        start_time=trace.start_ns,
    )
    if iteration_spans and trace.iterations:
        step_ns = (trace.end_ns - trace.start_ns) / trace.iterations
        parent = set_span_in_context(span)
        for t in range(trace.iterations):
            attrs: dict[str, Any] = {ATTR_ITERATION_INDEX: t, ATTR_ITERATION_TIMING: "even_split"}
            for name, values in trace.iteration_metrics.items():
                value = float(values[t])
                if not math.isnan(value):
                    attrs[ITERATION_ATTRS[name]] = value
            child = tracer.start_span(
                iteration_span_name(t), context=parent, attributes=attrs, start_time=trace.start_ns + int(t * step_ns)
            )
            child.end(end_time=trace.start_ns + int((t + 1) * step_ns))
    span.end(end_time=trace.end_ns)
