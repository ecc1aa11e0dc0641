"""Expected failures of `serve`, `export` and `dashboard` are one line on stderr and exit status 2;
`--debug` shows the traceback. Damaged stores (text, truncated, overwritten pages) are refused with
the same "not a readable … store (left untouched)" error, and left byte for byte as they were."""

import signal
import socket
import subprocess
import sys

import pytest

from mythos_probe.cli import main
from mythos_probe.collectors.store import Store, StoreError, StoreLockedError
from tests.collectors.factory import make_trace


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "good.duckdb"
    with Store(path) as store:
        store.write_traces([make_trace(i) for i in range(40)])
    return path.read_bytes()


def bad_stores(tmp_path, stored):
    """name → path of a file that is not a readable store."""
    files = {
        "text": b"hello, not a database\n",
        "empty": b"",
        "header only": stored[:4096],
        "truncated": stored[: len(stored) // 3],
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.duckdb"
        paths[name].write_bytes(data)
    newer = tmp_path / "newer.duckdb"
    with Store(newer) as store:
        store.query("INSERT INTO _migrations (name) VALUES ('m999_from_the_future')")
    paths["newer"] = newer
    return paths


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mythos-probe {command}: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_serve_and_export_refuse_unreadable_stores_in_one_line(tmp_path, stored, capsys):
    for name, path in bad_stores(tmp_path, stored).items():
        before = path.read_bytes()
        assert main(["serve", "--store", str(path), "--port", "0", "--no-dashboard"]) == 2, name
        err = one_line_error(capsys, "serve")
        assert ("upgrade mythos-probe" if name == "newer" else "not a readable DuckDB store (left untouched)") in err
        assert main(["export", str(path), "--parquet", str(tmp_path / "out")]) == 2, name
        one_line_error(capsys, "export")
        assert path.read_bytes() == before, name


def test_a_damaged_page_found_during_export_is_one_line(tmp_path, stored, capsys):
    # overwrite 64 KiB at a quarter, half and three quarters of the file: the catalog opens, and
    # some data page export reads fails its checksum (one place alone may fall in a table export
    # does not read, such as a rollup, or in free space)
    damaged = bytearray(stored)
    for at in (len(damaged) // 4, len(damaged) // 2, 3 * len(damaged) // 4):
        damaged[at: at + 65536] = b"\xab" * 65536
    path = tmp_path / "damaged.duckdb"
    path.write_bytes(bytes(damaged))
    code = main(["export", str(path), "--parquet", str(tmp_path / "out")])
    if code == 0:
        pytest.fail("a store with 64 KiB overwritten exported without error")
    assert code == 2
    assert "not a readable DuckDB store (left untouched)" in one_line_error(capsys, "export")


def test_serve_refuses_a_public_bind_without_token_and_a_port_in_use(tmp_path, capsys):
    assert main(["serve", "--store", str(tmp_path / "a.duckdb"), "--host", "0.0.0.0", "--no-dashboard"]) == 2
    assert "needs an ingest token" in one_line_error(capsys, "serve")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--store", str(tmp_path / "b.duckdb"), "--port", str(port), "--no-dashboard"]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in one_line_error(capsys, "serve")
        assert main(["serve", "--store", str(tmp_path / "c.duckdb"), "--port", "0", "--dashboard-port", str(port)]) == 2
        assert "choose another --dashboard-port" in one_line_error(capsys, "serve")
    assert main(["export", str(tmp_path / "a.duckdb")]) == 2
    assert "nothing to do" in one_line_error(capsys, "export")


def test_a_store_locked_by_another_serve_is_one_line_and_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "locked.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, duckdb; con = duckdb.connect(sys.argv[1]); print('held', flush=True); "
         "sys.stdin.read()", str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        command = [sys.executable, "-m", "mythos_probe.cli", "serve", "--store", str(path), "--port", "0", "--no-dashboard"]
        plain = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert plain.returncode == 2
        assert plain.stderr.count("\n") == 1 and "held by a writer process" in plain.stderr, plain.stderr
        debug = subprocess.run(command[:3] + ["--debug"] + command[3:], capture_output=True, text=True, timeout=120)
        assert debug.returncode == 1 and "Traceback" in debug.stderr and "StoreLockedError" in debug.stderr
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_the_dashboard_names_a_text_file_as_not_a_store(tmp_path, monkeypatch):
    from mythos_probe.dashboards.cli import open_store

    (tmp_path / "notes.txt").write_text("hello\n")
    monkeypatch.chdir(tmp_path)
    store, problem = open_store("notes.txt")
    assert store is None and "not a readable DuckDB store (left untouched)" in problem
    assert "in-memory" not in problem


def test_store_wraps_every_damaged_file_as_store_error(tmp_path, stored):
    for name, path in bad_stores(tmp_path, stored).items():
        if name == "newer":
            continue
        for read_only in (True, False):
            with pytest.raises(StoreError, match="left untouched"):
                Store(path, read_only=read_only)


def test_a_store_a_dashboard_has_open_is_said_to_be_held_by_a_reader_not_a_writer(tmp_path):
    path = tmp_path / "viewed.duckdb"
    Store(path).close()
    dashboard = subprocess.Popen([sys.executable, "-m", "mythos_probe.cli", "dashboard", str(path), "--port", "0"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "http://127.0.0.1:" in dashboard.stdout.readline()  # serving: the file is open read-only
        serve = subprocess.run([sys.executable, "-m", "mythos_probe.cli", "serve", "--store", str(path), "--port", "0",
                                "--no-dashboard"], capture_output=True, text=True, timeout=120)
        assert serve.returncode == 2 and serve.stderr.count("\n") == 1, serve.stderr
        assert "open read-only in another process" in serve.stderr and "writer process" not in serve.stderr
        assert f"(PID {dashboard.pid})" in serve.stderr
        with pytest.raises(StoreLockedError, match="open read-only in another process"):
            Store(path)  # what rec.to_duckdb(path) opens
        with Store.open_read_only(path) as store:  # readers share the file with the dashboard
            assert store.query("SELECT count(*) AS n FROM forwards").n[0] == 0
    finally:
        dashboard.send_signal(signal.SIGTERM)
        dashboard.wait(timeout=60)
