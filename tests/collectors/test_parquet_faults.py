"""Faults on the Parquet store, with real processes: a writer SIGKILLed between its child and
forward files or before its commit, `serve --parquet` SIGKILLed right after a 200, a real
filesystem that fills, two receivers on one folder getting the same requests, two writers racing
for the same forwards, and compaction killed midway or running under writers and a reader. After
each fault the folder holds exactly the forwards and rows expected, computed from the `LoopTrace`s
themselves (not from the store), and Prometheus counted each forward once."""

from __future__ import annotations

import http.client
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from mythos_probe.collectors.parquet_store import ParquetStore, committed
from mythos_probe.collectors.schema import TABLES
from mythos_probe.dashboards import queries
from tests.collectors.factory import make_trace
from tests.collectors.test_receiver import otlp_body

ROOT = Path(__file__).resolve().parents[2]


def traces_for(seeds, **kw):
    """Small positions-detail forwards, one per seed, a minute apart and over two runs."""
    return [make_trace(s, batch=2, seq_len=4, n_loops=4, run_id=f"run-{s % 2}", start_ns=1_760_000_000_000_000_000 + s * 60 * 10**9, **kw)
            for s in seeds]


def expected(traces) -> dict[str, int]:
    """Rows each table must hold for `traces`, from the records alone."""
    return {
        "forwards": len(traces),
        "iterations": sum(t.iterations for t in traces),
        "positions": sum(t.batch * t.seq_len * t.iterations for t in traces if t.detail == "positions"),
        "experts": sum(t.expert_load.size for t in traces if t.expert_load is not None),
        "spans": len(traces),
        "tokens": sum(t.batch * t.seq_len for t in traces),
    }


def stored(folder) -> dict[str, int]:
    """Rows per table as a reader sees them, and the tokens the Loops page counts; checks that no
    forward is there twice and none lacks its rows."""
    with ParquetStore.open_read_only(folder) as r:
        counts = {t: int(r.query(f"SELECT count(*) AS n FROM {t}")["n"].iloc[0]) for t in TABLES}
        counts["tokens"] = int(queries.tokens_by_iterations_used(r, queries.Selection())["tokens"].sum())
        keys = r.query("SELECT count(DISTINCT (trace_id, span_id)) AS k, count(DISTINCT forward_id) AS f FROM forwards")
        assert keys["k"].iloc[0] == keys["f"].iloc[0] == counts["forwards"], "a forward is stored twice"
        orphans = r.query("SELECT count(*) AS n FROM iterations WHERE forward_id NOT IN (SELECT forward_id FROM forwards)")
        assert orphans["n"].iloc[0] == 0, "iteration rows without their forward are visible"
    return counts


# One query, so one committed version: each forward once, with all its rows, and no row without it.
CONSISTENT = """
SELECT (SELECT count(*) FROM forwards) AS forwards,
       (SELECT count(DISTINCT (trace_id, span_id)) FROM forwards) AS keys,
       (SELECT coalesce(sum(batch * seq_len * iterations), 0) FROM forwards) AS want_positions,
       (SELECT count(*) FROM positions) AS positions,
       (SELECT coalesce(sum(iterations), 0) FROM forwards) AS want_iterations,
       (SELECT count(*) FROM iterations) AS iterations,
       (SELECT count(*) FROM positions WHERE forward_id NOT IN (SELECT forward_id FROM forwards)) AS orphans
"""


def consistent(reader) -> int:
    row = reader.query(CONSISTENT).iloc[0]
    assert row["forwards"] == row["keys"], "a forward is visible twice"
    assert (row["positions"], row["iterations"], row["orphans"]) == (row["want_positions"], row["want_iterations"], 0)
    return int(row["forwards"])


def files_on_disk(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for t in TABLES for p in (Path(folder) / t).glob("date=*/*.parquet")}


# A writer process that SIGKILLs itself at a chosen moment of a write or a compaction.
KILLED = """
import os, signal, sys
from mythos_probe.collectors.parquet_store import ParquetStore
from tests.collectors.test_parquet_faults import traces_for
folder, moment, seeds = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]]
place, commit = ParquetStore._place, ParquetStore._commit
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
def placing(self, staged, rel, table, *rest):
    if moment == "between child and forward files" and table == "forwards":
        die()
    return place(self, staged, rel, table, *rest)
def committing(self, entry, valid):
    if moment == "before the commit" or (moment == "compaction before its commit" and entry.get("remove")):
        die()
    return commit(self, entry, valid)
ParquetStore._place, ParquetStore._commit = placing, committing
store = ParquetStore(folder)
if moment == "compaction after its commit":
    store.clean = lambda *args: die()  # the cleaning that follows the commit
if moment.startswith("compaction"):
    store.compact()
else:
    store.write_traces(traces_for(seeds))
raise SystemExit("not killed")
"""


def run_killed(folder, moment, seeds=()):
    proc = subprocess.run([sys.executable, "-c", KILLED, str(folder), moment, *map(str, seeds)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.parametrize("moment", ["between child and forward files", "before the commit"])
def test_a_writer_killed_mid_write_leaves_nothing_visible_and_a_rewrite_stores_each_forward_once(tmp_path, moment):
    folder = tmp_path / "pq"
    first, rest = traces_for(range(3)), traces_for(range(3, 7))
    with ParquetStore(folder) as w:
        assert w.write_traces(first) == 3
    before = files_on_disk(folder)
    run_killed(folder, moment, range(3, 7))
    left = files_on_disk(folder) - before
    assert left, "the killed writer left no file: the fault did not happen where the test says"
    assert stored(folder) == expected(first)  # its child files are on disk, unread
    assert {p for p in committed(folder).entries} == before
    assert len(list(folder.glob(".tmp-*"))) == 1  # the dead writer's staging folder
    with ParquetStore(folder) as w:  # a new writer cleans what the dead one left …
        assert files_on_disk(folder) == before and not list(folder.glob(".tmp-*"))
        assert w.write_traces(first + rest) == 4  # … and the same traces again store only the new ones
        assert w.write_traces(first + rest) == 0
    assert stored(folder) == expected(first + rest)


def test_two_writers_racing_for_the_same_forwards_store_them_once(tmp_path):
    """Deterministic race: writer A has written its files and is about to commit when writer B
    commits some of the same forwards first; A must drop them and commit only the others."""
    folder = tmp_path / "pq"
    a, b = ParquetStore(folder), ParquetStore(folder)
    ours, theirs = traces_for(range(6)), traces_for(range(4, 9))
    original = a._commit
    raced = []

    def commit_after_b(entry, valid):
        if not raced:
            raced.append(b.write_new(theirs, _span_rows(theirs)))
        return original(entry, valid)

    a._commit = commit_after_b
    new = a.write_new(ours, _span_rows(ours))
    a.close(), b.close()
    assert [t.trace_id for t in raced[0]] == [t.trace_id for t in theirs]
    assert [t.trace_id for t in new] == [t.trace_id for t in ours[:4]]
    assert stored(folder) == expected(traces_for(range(9)))
    assert files_on_disk(folder) == set(committed(folder).entries), "A's first file set was not removed"


def _span_rows(traces):
    from mythos_probe.collectors.rows import trace_span_row

    return [trace_span_row(t) for t in traces]


WRITE_SAME = """
import sys
from mythos_probe.collectors.parquet_store import ParquetStore
from tests.collectors.test_parquet_faults import traces_for
folder, rounds = sys.argv[1], int(sys.argv[2])
with ParquetStore(folder) as store:
    new = sum(store.write_traces(traces_for(range(r, r + 4))) for r in range(rounds))
print(new)
"""


def test_writer_processes_given_the_same_forwards_at_once_store_each_once(tmp_path):
    folder, rounds = tmp_path / "pq", 6
    ParquetStore(folder).close()
    procs = [subprocess.Popen([sys.executable, "-c", WRITE_SAME, str(folder), str(rounds)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    news = [int(p.communicate(timeout=300)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    every = traces_for(range(rounds + 3))
    assert sum(news) == len(every)  # each forward reported new by exactly one writer
    assert stored(folder) == expected(every)


# serve --parquet


def start_serve(folder, *extra):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mythos_probe.cli", "serve", "--parquet", str(folder), "--port", "0",
         "--no-dashboard", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    line = proc.stdout.readline()
    assert "OTLP/HTTP on" in line, proc.stderr.read() if proc.poll() is not None else line
    port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
    metrics = proc.stdout.readline().split(" on ")[1].strip() if "--prometheus" in extra else None
    return proc, port, metrics


def post(port, body: bytes) -> tuple[int, dict]:
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        con.request("POST", "/v1/traces", body=body, headers={"Content-Type": "application/x-protobuf"})
        resp = con.getresponse()
        resp.read()
        return resp.status, dict(resp.getheaders())
    finally:
        con.close()


def prometheus_total(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_killed_right_after_a_200_kept_every_acknowledged_forward(tmp_path):
    folder = tmp_path / "pq"
    proc, port, _ = start_serve(folder)
    sent = []
    try:
        for r in range(6):
            batch = traces_for(range(5 * r, 5 * r + 5))
            assert post(port, otlp_body(batch).SerializeToString())[0] == 200
            sent += batch
        proc.send_signal(signal.SIGKILL)  # at once after the last 200
        proc.wait()
    finally:
        stop(proc)
    assert stored(folder) == expected(sent)


def test_serve_compacts_the_folder_above_a_file_count_while_it_receives(tmp_path):
    folder = tmp_path / "pq"
    proc, port, _ = start_serve(folder, "--compact-above", "12")
    sent = []
    try:
        for r in range(8):  # each request commits one file set of 5 files
            batch = traces_for(range(3 * r, 3 * r + 3))
            assert post(port, otlp_body(batch).SerializeToString())[0] == 200
            sent += batch
    finally:
        stop(proc)  # waits for a compaction still running
    assert proc.returncode == 0
    removals = [e for e in map(json.loads, map(Path.read_text, sorted((folder / "_log").glob("*.json")))) if e["remove"]]
    assert removals and len(committed(folder).entries) < 8 * 5
    assert stored(folder) == expected(sent)


def test_two_receivers_on_one_folder_store_and_count_a_retried_forward_once(tmp_path):
    """Every request reaches receiver A, again A (a retry) and B (a retry that went to the other
    replica) at the same moment: stored once, counted once by the two Prometheus exporters together."""
    folder = tmp_path / "pq"
    ParquetStore(folder).close()
    a, port_a, metrics_a = start_serve(folder, "--prometheus", "0")
    b, port_b, metrics_b = start_serve(folder, "--prometheus", "0")
    sent = []
    try:
        for r in range(5):
            batch = traces_for(range(4 * r, 4 * r + 4))
            body = otlp_body(batch).SerializeToString()
            statuses = []
            threads = [threading.Thread(target=lambda p=p: statuses.append(post(p, body)[0])) for p in (port_a, port_a, port_b)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            assert statuses == [200, 200, 200]
            sent += batch
        forwards = sum(prometheus_total(m, "recurrent_depth_forwards_total") for m in (metrics_a, metrics_b))
        tokens = sum(prometheus_total(m, "recurrent_depth_tokens_total") for m in (metrics_a, metrics_b))
    finally:
        stop(a), stop(b)
    assert stored(folder) == expected(sent)
    assert (forwards, tokens) == (len(sent), expected(sent)["tokens"])


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs when this process may mount (root with CAP_SYS_ADMIN), filled by a file;
    else the serve process's RLIMIT_FSIZE is lowered to 1 byte (every file write it makes fails).
    MYTHOS_TEST_NO_MOUNT=1 takes the second way where mounting works."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = not os.environ.get("MYTHOS_TEST_NO_MOUNT") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode == 0
    filler = mount / "filler"

    def fill(pid):
        if not mounted:  # the soft limit only: raising it again needs no privilege
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]))
            return
        with open(filler, "wb", buffering=0) as f:  # up to ENOSPC, then 48 KiB free: a file set gets partly written (files are ~20 KiB)
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        os.truncate(filler, max(0, filler.stat().st_size - 48 * 1024))

    def free(pid):
        if not mounted:
            hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
        else:
            filler.unlink()

    yield mount / "pq", fill, free
    if mounted:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_answers_503_with_retry_after_and_a_resend_stores_each_forward_once(small_disk):
    folder, fill, free = small_disk
    proc, port, metrics = start_serve(folder, "--prometheus", "0")
    try:
        batches = [traces_for(range(8 * r, 8 * r + 8)) for r in range(6)]
        bodies = [otlp_body(b).SerializeToString() for b in batches]
        assert [post(port, body)[0] for body in bodies[:2]] == [200, 200]
        fill(proc.pid)
        refused = [post(port, body) for body in bodies[2:]]
        assert [status for status, _ in refused] == [503] * 4
        assert all(headers.get("Retry-After") == "5" for _, headers in refused)
        assert stored(folder) == expected(batches[0] + batches[1])  # nothing of a refused request
        free(proc.pid)
        assert [post(port, body)[0] for body in bodies] == [200] * 6  # the exporters resend
        sent = [t for b in batches for t in b]
        forwards = prometheus_total(metrics, "recurrent_depth_forwards_total")
    finally:
        stop(proc)
    assert proc.returncode == 0
    assert stored(folder) == expected(sent)
    assert forwards == len(sent)
    assert files_on_disk(folder) == set(committed(folder).entries), "a refused request left files"


# compaction


def test_killed_mid_compaction_leaves_the_folder_readable_and_complete(tmp_path):
    folder = tmp_path / "pq"
    sent = traces_for(range(12))
    with ParquetStore(folder) as w:
        for i in range(0, 12, 2):
            w.write_traces(sent[i:i + 2])
    sets = len(committed(folder).entries)
    run_killed(folder, "compaction before its commit")
    assert stored(folder) == expected(sent)
    assert len(committed(folder).entries) == sets and len(files_on_disk(folder)) > sets  # its merged files, unread
    run_killed(folder, "compaction after its commit")
    assert stored(folder) == expected(sent)
    after = committed(folder)
    assert len(after.entries) == len({(e["table"], e["date"]) for e in after.entries.values()}) < sets
    result = subprocess.run([sys.executable, "-m", "mythos_probe.cli", "compact", str(folder)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert stored(folder) == expected(sent)
    # the killed compactions' uncommitted files are gone; the files they replaced wait out the retention
    assert files_on_disk(folder) == set(after.entries) | set(after.removed)


def test_a_reader_whose_files_a_compaction_deleted_reads_the_log_again(tmp_path):
    folder = tmp_path / "pq"
    sent = traces_for(range(6))
    with ParquetStore(folder) as w:
        for t in sent:
            w.write_traces([t])
    reader = ParquetStore.open_read_only(folder)
    assert stored(folder) == expected(sent) and reader.query("SELECT count(*) AS n FROM forwards")["n"].iloc[0] == 6
    with ParquetStore(folder) as w:
        assert w.compact(retain_removed_seconds=0)["after"] < 6 * 5
    assert files_on_disk(folder) == set(committed(folder).entries)  # the old files are gone
    assert reader.query("SELECT count(*) AS n, sum(tokens) AS t FROM forwards").iloc[0].tolist() == [6, expected(sent)["tokens"]]
    reader.close()


WRITER = """
import sys, time
from mythos_probe.collectors.parquet_store import ParquetStore
from tests.collectors.test_parquet_faults import traces_for
folder, k = sys.argv[1], int(sys.argv[2])
with ParquetStore(folder) as store:
    for i in range(6):
        store.write_traces(traces_for([100 * k + i]))
        time.sleep(0.02)
"""


def test_compaction_under_concurrent_writers_and_a_reader(tmp_path):
    """Three writer processes commit, a thread compacts again and again (deleting what it replaced
    2 s before: queries take milliseconds), and the reader checks every state it sees meanwhile."""
    folder = tmp_path / "pq"
    ParquetStore(folder).close()
    reader = ParquetStore.open_read_only(folder)
    compactor = ParquetStore(folder)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(k)], cwd=ROOT) for k in range(3)]
    writing = lambda: any(p.poll() is None for p in procs)  # noqa: E731
    thread = threading.Thread(target=lambda: [compactor.compact(retain_removed_seconds=2) for _ in iter(writing, False)])
    thread.start()
    seen = []
    while thread.is_alive():
        seen.append(consistent(reader))
    thread.join()
    assert [p.returncode for p in procs] == [0, 0, 0]
    compactor.compact(retain_removed_seconds=0)
    compactor.close()
    sent = traces_for([100 * k + i for k in range(3) for i in range(6)])
    assert seen == sorted(seen) and len(set(seen)) > 2, seen
    assert stored(folder) == expected(sent)
    log = [json.loads(p.read_text()) for p in sorted((folder / "_log").glob("*.json"))]
    assert sum(bool(e["remove"]) for e in log) > 1, "compaction never ran while the writers did"
    assert files_on_disk(folder) == set(committed(folder).entries), "replaced files were not deleted"
    snapshot = committed(folder)
    assert len(snapshot.entries) == len({(e["table"], e["date"]) for e in snapshot.entries.values()})
    reader.close()


def test_the_manifest_prunes_files_by_date_model_and_run(tmp_path):
    folder = tmp_path / "pq"
    with ParquetStore(folder) as w:
        w.write_traces(traces_for([0, 2]))  # run-0
        w.write_traces(traces_for([1, 3]))  # run-1
    snapshot = committed(folder)
    run0 = snapshot.files("forwards", runs=["run-0"])
    assert len(run0) == 1 and len(snapshot.files("forwards")) == 2
    import pyarrow.parquet as pq

    assert sorted(pq.read_table(run0[0])["run_id"].to_pylist()) == ["run-0", "run-0"]
    assert snapshot.files("forwards", models=["no-such-model"]) == []
    assert len(snapshot.files("spans", runs=["run-0"])) == 2  # spans do not know their run: kept
    assert len(snapshot.files("forwards", dates=["2025-10-09"])) == 2
    assert snapshot.files("forwards", dates=["2025-10-10"]) == []


def test_a_folder_of_layout_1_is_refused_until_compact_converts_it_keeping_each_forward_once(tmp_path):
    """Layout 1 (no commit log) made visible whatever was on disk: a forwards file written twice
    and the child files of a writer killed before its forwards. Converting keeps each forward once,
    with exactly its rows."""
    import shutil

    from mythos_probe.collectors.migrations import SchemaError

    folder, other = tmp_path / "pq", tmp_path / "other"
    kept, orphaned = traces_for(range(4)), traces_for(range(10, 12))
    with ParquetStore(folder) as w:
        w.write_traces(kept[:2])
        w.write_traces(kept[2:])
    with ParquetStore(other) as w:
        w.write_traces(orphaned)
    shutil.rmtree(folder / "_log")
    (folder / "mythos-probe.json").write_text(json.dumps({"format": "mythos-probe parquet store", "layout_version": 1}))
    for table in ("forwards", "iterations", "positions"):  # the first set again, as a second file
        first = sorted((folder / table).glob("date=*/*.parquet"))[0]
        shutil.copy(first, first.with_name("vm-1-aaaaaa-000009-0.parquet"))
    for table in ("iterations", "positions", "experts"):  # children whose forwards never came
        for f in (other / table).glob("date=*/*.parquet"):
            (folder / f.relative_to(other)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, folder / f.relative_to(other).with_name("vm-2-bbbbbb-000000-0.parquet"))
    with pytest.raises(SchemaError, match="mythos-probe compact"):
        ParquetStore.open_read_only(folder)
    result = subprocess.run([sys.executable, "-m", "mythos_probe.cli", "compact", str(folder)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert stored(folder) == expected(kept)
    assert files_on_disk(folder) == set(committed(folder).entries)
    with ParquetStore(folder) as w:
        assert w.write_traces(kept + orphaned) == 2
    assert stored(folder) == expected(kept + orphaned)


def test_compact_refuses_what_is_not_a_store_folder_and_creates_nothing(tmp_path, capsys):
    from mythos_probe.cli import main

    assert main(["compact", str(tmp_path / "typo")]) == 2
    assert "not a mythos-probe Parquet store folder" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_compacting_again_merges_fresh_sets_into_the_compacted_files(tmp_path):
    folder = tmp_path / "pq"
    sent = traces_for(range(6))
    with ParquetStore(folder) as w:
        for i in range(0, 6, 2):
            w.write_traces(sent[i:i + 2])
            w.compact(retain_removed_seconds=0)
        entries = w.snapshot().entries
    assert len(entries) == len({(e["table"], e["date"]) for e in entries.values()}) == 5
    assert stored(folder) == expected(sent)
