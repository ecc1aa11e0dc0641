"""Interop: a LoopTrace exported over OTLP to a real Arize Phoenix (separate venv, loopback only)
comes back through Phoenix's REST API with every loop attribute intact."""

import math
import os
import subprocess
import time
from pathlib import Path

import pytest

from mythos_probe.collectors.exporter import BoundedSpanProcessor, otlp_exporter, tracer_provider
from mythos_probe.collectors.spans import attributes_to_trace, emit, trace_to_attributes
from tests.collectors.factory import make_trace, traces_equal
from tests.conftest import free_port, get_json, need

pytestmark = [pytest.mark.interop, pytest.mark.slow]
PHOENIX = Path(__file__).resolve().parents[2] / ".venv-phoenix" / "bin" / "phoenix"


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory):
    need(PHOENIX.exists(), f"{PHOENIX} missing: run scripts/interop-deps.sh")
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "PHOENIX_HOST": "127.0.0.1", "PHOENIX_PORT": str(port), "PHOENIX_GRPC_PORT": str(grpc_port),
           "PHOENIX_WORKING_DIR": str(tmp_path_factory.mktemp("phoenix")), "PHOENIX_TELEMETRY_ENABLED": "false"}
    log = tmp_path_factory.mktemp("phoenix-log") / "phoenix.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(PHOENIX), "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        up = False
        for _ in range(240):  # bounded: 120 s at most for a cold start on 2 cores
            if proc.poll() is not None:
                break
            try:
                up = get_json(url + "/v1/projects") is not None
                break
            except OSError:
                time.sleep(0.5)
        need(up, f"Phoenix did not start: {log.read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_loop_attributes_survive_a_trip_through_phoenix(phoenix):
    trace = make_trace(11, batch=2, seq_len=3, n_loops=5)
    processor = BoundedSpanProcessor(otlp_exporter(phoenix, timeout=10))
    emit(tracer_provider(processor, service_name="interop").get_tracer("t"), trace)
    assert processor.force_flush() and processor.exported_spans == 1
    span = None
    for _ in range(60):  # Phoenix ingests asynchronously
        spans = get_json(phoenix + "/v1/projects/default/spans?limit=100")["data"]
        span = next((s for s in spans if s["context"]["span_id"] == trace.span_id), None)
        if span:
            break
        time.sleep(0.5)
    assert span is not None
    assert span["context"]["trace_id"] == trace.trace_id
    assert span["span_kind"] == "LLM" and span["name"] == "looped_forward"
    attrs = span["attributes"]
    sent = trace_to_attributes(trace)
    loop_keys = {k for k in sent if k.startswith("recurrent_depth.")}
    assert loop_keys <= set(attrs)

    def nan_back(v):  # Phoenix's JSON has no NaN: it answers null
        if isinstance(v, list):
            return [math.nan if x is None else x for x in v]
        return math.nan if v is None else v

    received = {k: nan_back(attrs[k]) for k in loop_keys}
    rebuilt = attributes_to_trace(received, trace.trace_id, trace.span_id, trace.start_ns, trace.end_ns)
    assert traces_equal(trace, rebuilt)
