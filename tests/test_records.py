"""`LoopTrace` refuses what a store could not hold or would hold wrongly, naming the field: the one
validation (`records.FIELD_CHECKS`) that attach options and the receiver run too."""

import dataclasses

import numpy as np
import pytest

from mythos_probe.records import SCHEMA_VERSION, InvalidRecord, LoopTrace, check_field
from tests.collectors.factory import make_trace

TRACE = make_trace(3, batch=2, seq_len=3, n_loops=5)


@pytest.mark.parametrize("change, words", [
    ({"end_ns": TRACE.start_ns - 1}, ["end_ns", "before start_ns"]),
    ({"n_loops": TRACE.iterations - 1}, ["iterations", f"more than n_loops = {TRACE.iterations - 1}"]),
    ({"schema_version": 99}, ["schema_version = 99", "upgrade"]),
    ({"schema_version": 0}, ["schema_version = 0"]),
    ({"token_text": (("a", "b", "c"),)}, ["token_text", "expected (2, 3)"]),
    ({"token_text": (("a", "b"), ("c", "d"))}, ["token_text", "expected (2, 3)"]),
    ({"token_text": ("abc", "def")}, ["token_text", "not strings"]),
    ({"token_text": (("a", "b", 3), ("c", "d", "e"))}, ["token_text", "strings"]),
    ({"trace_id": "g" * 32}, ["trace_id", "hex"]),
    ({"trace_id": "A" * 32}, ["trace_id", "lowercase"]),
    ({"trace_id": "0" * 32}, ["trace_id", "not all zero"]),
    ({"span_id": "ab" * 9}, ["span_id", "16"]),
    ({"run_id": None}, ["run_id", "None"]),
    ({"run_id": 123}, ["run_id", "123"]),
    ({"model_id": ""}, ["model_id", "non-empty"]),
    ({"step": 1.5}, ["step", "integer"]),
    ({"batch": True}, ["batch", "integer"]),
    ({"start_ns": -1}, ["start_ns = -1"]),
    ({"iterations": 2**31}, ["iterations"]),
    ({"exit_policy": None}, ["exit_policy"]),
    ({"detail": "everything"}, ["detail"]),
    ({"kind": "canary"}, ["kind"]),
    ({"loop_name": ""}, ["loop_name"]),
    ({"world_size": 0}, ["world_size"]),
    ({"rank": 1}, ["rank 1", "world_size=1"]),
    ({"pid": -5}, ["pid"]),
    ({"host": 7}, ["host"]),
    ({"attributes": {"user": ["a"]}}, ["attribute 'user'"]),
    ({"attributes": {1: "a"}}, ["attributes keys"]),
])
def test_a_bad_field_is_refused_naming_it(change, words):
    with pytest.raises(InvalidRecord) as caught:
        dataclasses.replace(TRACE, **change)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_invalid_record_is_both_a_value_and_a_type_error():
    # the receiver maps ValueError to 400; Python code expects a TypeError for a wrong type
    assert issubclass(InvalidRecord, ValueError) and issubclass(InvalidRecord, TypeError)


def test_numpy_integers_are_stored_as_python_ints():
    trace = dataclasses.replace(TRACE, step=np.int64(7), batch=np.int32(2), pid=np.uint32(12))
    assert (trace.step, trace.batch, trace.pid) == (7, 2, 12)
    assert {type(trace.step), type(trace.batch), type(trace.pid)} == {int}


def test_the_edges_are_accepted():
    ok = dataclasses.replace(TRACE, end_ns=TRACE.start_ns, n_loops=TRACE.iterations, schema_version=1,
                             token_text=[list("abc"), list("def")], world_size=3, rank=2, local_rank=2)
    assert ok.token_text == (("a", "b", "c"), ("d", "e", "f"))
    assert ok.schema_version == 1 and SCHEMA_VERSION >= 1


def test_check_field_names_the_label_it_is_given():
    with pytest.raises(InvalidRecord, match="recurrent_depth.run_id must be a non-empty string"):
        check_field("run_id", "", "recurrent_depth.run_id")
    assert check_field("kind", "shadow") == "shadow"
