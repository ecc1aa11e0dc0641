import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mythos_probe.collectors.exporter import tracer_provider
from mythos_probe.collectors.spans import (
    FORWARD_SPAN_NAME,
    ITERATION_SPAN_NAME,
    attributes_to_trace,
    emit,
    trace_to_attributes,
)
from mythos_probe.records import ITERATION_METRIC_NAMES
from tests.collectors.factory import make_trace, traces_equal


def roundtrip(trace):
    attrs = trace_to_attributes(trace)
    return attributes_to_trace(attrs, trace.trace_id, trace.span_id, trace.start_ns, trace.end_ns)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"detail": "summary"},
        {"with_text": False, "n_experts": 0},
        {"all_metrics": False, "batch": 3, "seq_len": 1},
    ],
)
def test_attributes_round_trip_exactly(kwargs):
    trace = make_trace(7, **kwargs)
    back = roundtrip(trace)
    assert traces_equal(trace, back)
    assert np.isnan(back.iteration_metrics["rel_residual"][0])  # NaN at t = 0 survives
    assert np.isnan(back.position_metrics["rel_residual"][..., 0]).all() if trace.position_metrics else True


def test_absent_metrics_stay_absent_and_present_nan_stays_nan():
    trace = make_trace(1, all_metrics=False)
    back = roundtrip(trace)
    assert set(back.iteration_metrics) == set(trace.iteration_metrics)
    assert "jacobian_sigma_max" not in back.iteration_metrics


def test_attribute_values_are_plain_lists_and_names_are_namespaced():
    trace = make_trace(2)
    attrs = trace_to_attributes(trace)
    assert all(not isinstance(v, np.ndarray) and not isinstance(v, np.generic) for v in attrs.values())
    foreign = {"gen_ai.operation.name", "gen_ai.request.model", "gen_ai.usage.input_tokens", "openinference.span.kind", "llm.model_name"}
    assert {k for k in attrs if not k.startswith("recurrent_depth.")} == foreign
    assert attrs["gen_ai.usage.input_tokens"] == trace.batch * trace.seq_len
    assert attrs["recurrent_depth.attr.request_id"] == "req-2"
    flat = attrs["recurrent_depth.position.halt_prob"]
    assert flat[trace.seq_len * trace.iterations + 2] == pytest.approx(float(trace.position_metrics["halt_prob"][1, 0, 2]))


def test_emit_uses_the_trace_ids_and_drops_no_attribute_on_the_largest_trace():
    memory = InMemorySpanExporter()
    provider = tracer_provider(SimpleSpanProcessor(memory))
    trace = make_trace(5, batch=4, seq_len=64, n_loops=16)
    many_user_attrs = {f"k{i}": i for i in range(200)}
    trace = type(trace)(**{**trace.__dict__, "attributes": {**trace.attributes, **many_user_attrs}})
    emit(provider.get_tracer("test"), trace, iteration_spans=True)
    spans = memory.get_finished_spans()
    forward = next(s for s in spans if s.name == FORWARD_SPAN_NAME)
    assert f"{forward.context.trace_id:032x}" == trace.trace_id
    assert f"{forward.context.span_id:016x}" == trace.span_id
    assert (forward.start_time, forward.end_time) == (trace.start_ns, trace.end_ns)
    assert forward.parent is None
    assert forward.dropped_attributes == 0
    assert len(forward.attributes) == len(trace_to_attributes(trace)) > 128
    children = sorted((s for s in spans if s.name.startswith(ITERATION_SPAN_NAME)), key=lambda c: c.start_time)
    assert len(children) == trace.iterations
    # each child is named and indexed by its iteration, and the even split is said, not implied
    assert [c.name for c in children] == [f"loop_iteration {t}" for t in range(trace.iterations)]
    assert [c.attributes["recurrent_depth.iteration.index"] for c in children] == list(range(trace.iterations))
    assert {c.attributes["recurrent_depth.iteration.timing"] for c in children} == {"even_split"}
    assert children[0].start_time == trace.start_ns and children[-1].end_time == trace.end_ns
    assert all(c.parent.span_id == forward.context.span_id and c.dropped_attributes == 0 for c in children)
    rebuilt = attributes_to_trace(dict(forward.attributes), trace.trace_id, trace.span_id, trace.start_ns, trace.end_ns)
    assert traces_equal(trace, rebuilt)


def test_emit_refuses_a_provider_that_would_invent_other_ids():
    with pytest.raises(ValueError, match="LoopTraceIdGenerator"):
        emit(TracerProvider().get_tracer("x"), make_trace(0))


def test_iteration_metric_attributes_have_one_value_per_iteration():
    trace = make_trace(3)
    attrs = trace_to_attributes(trace)
    for name in ITERATION_METRIC_NAMES:
        assert len(attrs[f"recurrent_depth.iteration.{name}"]) == trace.iterations


def test_record_v2_fields_travel_under_their_literal_attribute_names():
    import dataclasses

    trace = dataclasses.replace(
        make_trace(3), loop_name="high", kind="training", rank=3, local_rank=1, world_size=4, host="h1",
        pid=99, job_id="slurm-12",
    )
    attrs = trace_to_attributes(trace)
    assert {k: attrs[k] for k in attrs if k.startswith("recurrent_depth.rank.") or k in (
        "recurrent_depth.loop_name", "recurrent_depth.kind", "recurrent_depth.schema_version")} == {
        "recurrent_depth.loop_name": "high",
        "recurrent_depth.kind": "training",
        "recurrent_depth.schema_version": 2,
        "recurrent_depth.rank.index": 3,
        "recurrent_depth.rank.local_index": 1,
        "recurrent_depth.rank.world_size": 4,
        "recurrent_depth.rank.host": "h1",
        "recurrent_depth.rank.pid": 99,
        "recurrent_depth.rank.job_id": "slurm-12",
    }
    assert traces_equal(trace, roundtrip(trace))


def test_a_version_1_span_reads_as_a_single_process_served_forward_of_the_default_loop():
    attrs = {k: v for k, v in trace_to_attributes(make_trace(4)).items()
             if k not in ("recurrent_depth.loop_name", "recurrent_depth.kind") and not k.startswith("recurrent_depth.rank.")}
    attrs["recurrent_depth.schema_version"] = 1
    back = attributes_to_trace(attrs, "a" * 32, "b" * 16, 1, 2)
    assert (back.loop_name, back.kind, back.rank, back.world_size, back.host, back.schema_version) == (
        "loop", "served", 0, 1, "", 1)


@pytest.mark.parametrize(
    "field, value, message",
    [("kind", "replay", "kind must be one of"), ("loop_name", "", "loop_name"), ("rank", 2, "world_size=1")],
)
def test_record_refuses_an_unknown_kind_an_empty_loop_name_and_a_rank_outside_the_world(field, value, message):
    import dataclasses

    with pytest.raises(ValueError, match=message):
        dataclasses.replace(make_trace(0), **{field: value})
