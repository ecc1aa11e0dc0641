"""The receiver's group commit (`receiver._GroupCommit`) on a real DuckDB store: a commit waits
for the requests still being decoded so that they share its transaction while they outnumber the
requests ready, commits at once when they do not, never waits when nothing is decoding, gives up waiting after its bound, and a request that fails to decode stops counting.

The store is real; only its `write_batch` is wrapped, to count the transactions it runs.
"""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest

from mythos_probe.collectors import receiver as receiver_module
from mythos_probe.collectors.receiver import _GroupCommit
from mythos_probe.collectors.rows import Batch, trace_span_row
from mythos_probe.collectors.store import Store
from tests.collectors.factory import make_trace


def _batch(first: int, n: int) -> Batch:
    traces = [make_trace(first + i) for i in range(n)]
    return Batch.of(traces, [trace_span_row(t) for t in traces])


class _Counted:
    """A real store whose `write_batch` calls (transactions) are recorded with their sizes."""

    def __init__(self, store: Store) -> None:
        self.store, self.sizes = store, []

    def write_batch(self, batch: Batch):
        self.sizes.append(batch.n_forwards)
        return self.store.write_batch(batch)


@pytest.fixture
def counted(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        yield _Counted(store)


def _forwards(counted: _Counted) -> int:
    return int(counted.store.query("SELECT count(*) AS n FROM forwards").n[0])


def test_the_default_wait_is_a_quarter_second():
    assert receiver_module.GROUP_WAIT_SECONDS == 0.25
    assert _GroupCommit(object()).wait_s == 0.25


def _decoding_request(writer, first, n, started, release, done):
    """A request whose body has arrived and whose decode ends when `release` is set."""
    def run():
        with writer.decoding() as ticket:
            writer.begin(ticket)
            started.set()
            release.wait(60)
            writer.write(_batch(first, n), ticket)
            done.append(n)  # once committed

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(60)
    return thread


def _until(condition, seconds=60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_commit_waits_while_more_requests_are_decoding_than_are_ready(counted):
    """Two requests decoding and one ready: the commit waits (2 > 1). Once one of them arrives
    (2 ready, 1 decoding) the two ready commit together without waiting for the last."""
    writer = _GroupCommit(counted, wait_s=600)  # far longer than the test: only a decode's end releases it
    release_a, release_b, done = threading.Event(), threading.Event(), []
    a = _decoding_request(writer, 100, 3, threading.Event(), release_a, done)
    b = _decoding_request(writer, 200, 4, threading.Event(), release_b, done)
    ready = threading.Thread(target=lambda: (writer.write(_batch(0, 2)), done.append(2)))
    ready.start()
    ready.join(0.5)
    assert ready.is_alive(), "the commit went ahead while two requests were still being decoded"
    assert counted.sizes == []
    release_a.set()
    _until(lambda: counted.sizes == [5])  # the ready one and a's, in one transaction; b still decoding
    ready.join(60)
    a.join(60)
    assert sorted(done) == [2, 3] and b.is_alive()
    release_b.set()
    b.join(60)
    assert counted.sizes == [5, 4] and sorted(done) == [2, 3, 4]
    assert _forwards(counted) == 9
    assert writer._decoding == 0


def test_a_ready_request_commits_at_once_beside_one_decoding(counted):
    """One ready, one decoding: the ready one commits now and the other decodes meanwhile (waiting
    for it kept the decode workers idle during every commit)."""
    writer = _GroupCommit(counted, wait_s=600)
    release, done = threading.Event(), []
    slow = _decoding_request(writer, 100, 3, threading.Event(), release, done)
    ready = threading.Thread(target=lambda: (writer.write(_batch(0, 2)), done.append(2)))
    ready.start()
    ready.join(60)
    assert not ready.is_alive() and counted.sizes == [2] and done == [2]
    release.set()
    slow.join(60)
    assert counted.sizes == [2, 3] and writer._decoding == 0


def test_a_request_handed_over_stops_counting_once(counted):
    writer = _GroupCommit(counted, wait_s=600)
    with writer.decoding() as ticket:
        assert writer._decoding == 0  # the body is being read: not counted yet
        writer.begin(ticket)
        writer.begin(ticket)
        assert writer._decoding == 1  # once
        writer.write(_batch(0, 1), ticket)
        assert writer._decoding == 0
    assert writer._decoding == 0  # not decremented twice
    with writer.decoding() as ticket:
        writer.begin(ticket)
        assert writer._decoding == 1
    assert writer._decoding == 0


def test_a_lone_request_never_waits(counted):
    writer = _GroupCommit(counted, wait_s=600)
    t = threading.Thread(target=writer.write, args=(_batch(0, 2),))
    t.start()
    t.join(60)  # it would wait 600 s if it waited at all
    assert not t.is_alive()
    assert counted.sizes == [2] and _forwards(counted) == 2


def test_the_wait_is_bounded_by_wait_s(counted):
    """Two requests stuck decoding outnumber the one ready, so the commit waits, but only wait_s."""
    writer = _GroupCommit(counted, wait_s=0.05)
    release, done = threading.Event(), []
    stuck = [_decoding_request(writer, 100 * k, 1, threading.Event(), release, done) for k in (1, 2)]
    assert writer._decoding == 2
    w = threading.Thread(target=writer.write, args=(_batch(0, 1),))
    w.start()
    w.join(60)
    assert not w.is_alive()
    assert counted.sizes == [1]
    release.set()
    for t in stuck:
        t.join(60)


def test_a_request_that_fails_to_decode_stops_counting(counted):
    writer = _GroupCommit(counted, wait_s=600)
    with pytest.raises(ValueError):
        with writer.decoding() as ticket:
            writer.begin(ticket)
            assert writer._decoding == 1
            raise ValueError("malformed body")
    assert writer._decoding == 0
    t = threading.Thread(target=writer.write, args=(_batch(0, 1),))
    t.start()
    t.join(60)
    assert not t.is_alive() and counted.sizes == [1]


def test_a_batch_crosses_a_process_boundary_unchanged():
    """What a decode worker sends back (pickled; Arrow IPC streams inside) is the same batch:
    every table, schema and dictionary-encoded id column, the increments and the traces."""
    import pickle

    traces = [make_trace(i) for i in range(3)]
    batch = Batch.of(traces, [trace_span_row(t) for t in traces], keep_traces=True)
    back = pickle.loads(pickle.dumps(batch))
    assert set(back.tables) == set(batch.tables) and set(back.increments) == set(batch.increments)
    for got, want in ((back.tables, batch.tables), (back.increments, batch.increments)):
        for name in want:  # NaN cells are NaN on both sides (Table.equals calls NaN unequal)
            assert got[name].schema == want[name].schema, name
            pd.testing.assert_frame_equal(got[name].to_pandas(), want[name].to_pandas(), check_exact=True)
    assert [t.trace_id for t in back.traces] == [t.trace_id for t in traces]
    bare = pickle.loads(pickle.dumps(Batch.of(traces, [trace_span_row(t) for t in traces])))
    assert bare.traces is None and bare.n_forwards == 3
    assert pickle.loads(pickle.dumps(Batch(batch.tables))).increments is None


def test_a_sender_stalling_its_body_holds_no_commit_back(tmp_path):
    """Over real HTTP: a request whose body has not all arrived is not waited for (only decoding
    is), so another sender's request commits while it stalls, even with a wait far past the test."""
    import http.client
    import socket

    from mythos_probe.collectors.receiver import Receiver
    from tests.collectors.test_receiver import otlp_body

    with Store(tmp_path / "s.duckdb") as store, Receiver(store, port=0, decode_workers=0) as receiver:
        receiver.writer.wait_s = 600
        stalled = socket.create_connection(("127.0.0.1", receiver.port), timeout=60)
        stalled.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                        b"Content-Length: 1000\r\n\r\n" + b"\x0a" * 10)  # 10 of its 1,000 bytes
        con = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=60)
        con.request("POST", "/v1/traces", body=otlp_body([make_trace(0)]).SerializeToString(),
                    headers={"Content-Type": "application/x-protobuf"})
        assert con.getresponse().status == 200
        assert int(store.query("SELECT count(*) AS n FROM forwards").n[0]) == 1
        stalled.setblocking(False)
        with pytest.raises(BlockingIOError):  # still unanswered: the commit did not wait for its end (30 s)
            stalled.recv(1)
        con.close()
        stalled.close()


def test_duckdb_gets_the_cores_the_decode_workers_leave(tmp_path, monkeypatch):
    from mythos_probe.collectors import decode_pool
    from mythos_probe.collectors.receiver import Receiver

    def threads(store):
        return int(store.query("SELECT current_setting('threads') AS t").t[0])

    monkeypatch.setattr(decode_pool, "cores", lambda: 6)
    with Store(tmp_path / "a.duckdb") as store:
        Receiver(store, port=0, decode_workers=2).stop()
        assert threads(store) == 4
    with Store(tmp_path / "b.duckdb") as store:
        Receiver(store, port=0, decode_workers=6).stop()
        assert threads(store) == 1  # at least one
    with Store(tmp_path / "c.duckdb") as store:
        before = threads(store)
        Receiver(store, port=0, decode_workers=0).stop()  # decoding inline: DuckDB keeps its default
        assert threads(store) == before
