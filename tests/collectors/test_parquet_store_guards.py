"""`collectors/parquet_store.py`: every refusal with its message (a file where a folder belongs, a
folder of other files, a damaged or newer or older marker, a write to a read-only store), the
constants and defaults pinned, the forward key pinned by literal values, the writer-liveness rule
at its edges, and the manifest's pruning. Fast, in-process; tests/collectors/test_parquet_store.py
and test_parquet_faults.py run the writers and readers."""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mythos_probe.collectors import parquet_store as PS
from mythos_probe.collectors.migrations import SchemaError
from mythos_probe.collectors.parquet_store import ParquetStore, Snapshot
from mythos_probe.collectors.store import StoreError
from tests.collectors.factory import make_trace


def message(fn, *args, exc=StoreError, **kwargs) -> str:
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_constants_and_defaults():
    assert (PS.MARKER, PS.LOG, PS.LAYOUT_VERSION) == ("mythos-probe.json", "_log", 2)
    assert PS.RETAIN_REMOVED_SECONDS == 600.0 and PS.FOREIGN_ORPHAN_SECONDS == 86_400.0
    assert PS.COMPACT_BELOW_BYTES == 256 * 2**20
    init = inspect.signature(ParquetStore.__init__).parameters
    assert init["read_only"].default is False and init["compact_above"].default is None
    assert inspect.signature(ParquetStore.compact).parameters["retain_removed_seconds"].default == 600.0
    assert inspect.signature(ParquetStore.clean).parameters["retain_removed_seconds"].default == 600.0
    assert inspect.signature(PS.compact).parameters["retain_removed_seconds"].default == 600.0


def test_a_new_folder_gets_its_marker_and_log(tmp_path):
    with ParquetStore(tmp_path / "s") as store:
        assert store.read_only is False and store.compact_above is None
        assert json.loads((tmp_path / "s" / "mythos-probe.json").read_text()) == {
            "format": "mythos-probe parquet store", "layout_version": 2}
        assert (tmp_path / "s" / "_log").is_dir()
        assert store.writer.startswith(PS._host() + f"-{os.getpid()}-")
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "s").iterdir())  # close removes staging


def test_refusals_name_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "missing"
    assert message(ParquetStore.open_read_only, missing) == f"{missing} does not exist: nothing has been recorded there yet"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert message(ParquetStore.open_read_only, empty) == \
        f"{empty} is not a mythos-probe Parquet store (no mythos-probe.json)"
    a_file = tmp_path / "f.duckdb"
    a_file.write_text("x")
    assert message(ParquetStore, a_file) == f"{a_file} is a file; a Parquet store is a folder (pass a folder path)"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    assert message(ParquetStore, other) == f"{other} holds other files; give a new or empty folder for a Parquet store"
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".DS_Store").write_text("x")
    ParquetStore(hidden).close()  # hidden files do not count
    with ParquetStore(tmp_path / "ok") as store:
        store.write_traces([make_trace(1, detail="summary")])
    with ParquetStore.open_read_only(tmp_path / "ok") as ro:
        assert ro.read_only is True
        assert message(ro.write_traces, [make_trace(2)]) == f"Parquet store {tmp_path / 'ok'} is open read-only"
        assert message(ro.compact) == f"Parquet store {tmp_path / 'ok'} is open read-only"
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    assert message(PS.compact, nothing) == \
        f"{nothing} is not a mythos-probe Parquet store folder (no mythos-probe.json); nothing to compact"


@pytest.mark.parametrize("marker, exc, text", [
    ("not json", StoreError, "is not a mythos-probe marker"),
    ('{"format": "x"}', StoreError, "is not a mythos-probe marker"),
    ('{"layout_version": 3}', SchemaError, "has Parquet layout version 3, newer than this mythos-probe reads (2); "
                                           "upgrade mythos-probe"),
    ('{"layout_version": 1}', SchemaError, "was written by a mythos-probe without the commit log (layout 1); convert "
                                           "it with `mythos-probe compact"),
])
def test_marker_checks(tmp_path, marker, exc, text):
    (tmp_path / "mythos-probe.json").write_text(marker)
    got = message(PS._check_marker, tmp_path, exc=exc)
    assert got.startswith(str(tmp_path)) and text in got
    assert text in message(PS.committed, tmp_path, exc=exc)
    (tmp_path / "mythos-probe.json").write_text('{"layout_version": 2}')
    PS._check_marker(tmp_path)


def test_forward_ids_are_a_fixed_63_bit_hash():
    ids = PS.forward_ids(["0af7651916cd43dd8448eb211c80319c", "a"], ["b7ad6b7169203331", "b"])
    assert ids.dtype == np.int64
    # literal values: every process and every version must number a forward alike
    assert ids.tolist() == [6486997509766329227, 516043656796244036]
    assert PS.forward_ids([], []).tolist() == []


def test_writer_liveness_at_its_edges():
    now = time.time()
    host = PS._host()
    assert PS._writer_alive(f"{host}-{os.getpid()}-abc", now) is True
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert PS._writer_alive(f"{host}-{int(dead.stdout)}-abc", now) is False
    assert PS._writer_alive(f"elsewhere-{os.getpid()}-abc", now) is True  # another host: cannot tell
    old = now - PS.FOREIGN_ORPHAN_SECONDS - 5
    assert PS._writer_alive(f"elsewhere-{os.getpid()}-abc", old) is False  # … until a day has passed
    assert PS._writer_alive(f"{host}-{os.getpid()}-abc", old) is False
    assert PS._writer_alive(f"elsewhere-{os.getpid()}-abc", now - PS.FOREIGN_ORPHAN_SECONDS + 60) is True
    assert PS._writer_alive("no-pid-here", now) is True  # not ours to judge
    assert PS._writer_alive(f"{host}-1-abc", now) is True  # pid 1 runs (as root or another user)
    assert PS._host() == "".join(c if c.isalnum() or c in "_." else "_" for c in socket.gethostname())


def test_snapshot_files_pruned_by_the_manifest(tmp_path):
    snap = Snapshot(tmp_path)
    entry = lambda path, table, date, models, runs: {  # noqa: E731
        "path": path, "table": table, "date": date, "models": models, "runs": runs}
    snap._apply(1, {"time": 0.0, "add": [entry("f/a", "forwards", "2026-01-01", ["m1"], ["r1"]),
                                         entry("f/b", "forwards", "2026-01-02", ["m2"], ["r1", "r2"]),
                                         entry("s/c", "spans", "2026-01-01", None, None)]})
    assert snap.version == 1
    rel = lambda paths: [p.relative_to(tmp_path).as_posix() for p in paths]  # noqa: E731
    assert rel(snap.files("forwards")) == ["f/a", "f/b"]
    assert rel(snap.files("forwards", dates="2026-01-02")) == ["f/b"]
    assert rel(snap.files("forwards", dates=["2026-01-01", "2026-01-02"], models="m1")) == ["f/a"]
    assert rel(snap.files("forwards", runs=["r2"])) == ["f/b"]
    assert rel(snap.files("forwards", models=[])) == []
    assert rel(snap.files("spans", models="m9")) == ["s/c"]  # an entry that does not know its models is kept
    snap._apply(2, {"time": 5.0, "remove": ["f/a"]})
    assert rel(snap.files("forwards")) == ["f/b"] and snap.removed == {"f/a": 5.0}


def test_known_keys_across_the_sorted_array_and_recent_commits(tmp_path):
    snap = Snapshot(tmp_path)
    snap._apply(1, {"time": 0.0, "keys": {"forwards": list(range(0, 8192, 2))}})  # 4,096 keys: kept as recent
    assert len(snap._sorted["forwards"]) == 0 and sum(map(len, snap._recent["forwards"])) == 4096
    snap._apply(2, {"time": 0.0, "keys": {"forwards": [8193]}})  # past 4,096: merged into the sorted array
    assert len(snap._sorted["forwards"]) == 4097 and snap._recent["forwards"] == []
    snap._apply(3, {"time": 0.0, "keys": {"forwards": [7, 9], "spans": []}})
    assert snap.known("forwards", np.array([0, 2, 3, 7, 9, 8190, 8192, 8193, -1])).tolist() == \
        [True, True, False, True, True, True, False, True, False]
    assert snap.known("spans", np.array([0])).tolist() == [False]
    copy = snap.copy()
    snap._apply(4, {"time": 0.0, "keys": {"forwards": [11]}})
    assert copy.known("forwards", np.array([11])).tolist() == [False] and copy.version == 3


def test_first_new_keeps_the_first_of_each_key(tmp_path):
    snap = Snapshot(tmp_path)
    snap._apply(1, {"time": 0.0, "keys": {"forwards": [5]}})
    keep = PS._first_new(snap, "forwards", np.array([3, 5, 3, 4], dtype=np.int64))
    assert keep.tolist() == [True, False, False, True]
    assert PS._first_new(snap, "forwards", np.array([], dtype=np.int64)).tolist() == []
