"""`mythos-probe dashboard FILE`: arguments, and a clear message for every store it cannot open."""

from __future__ import annotations

import argparse
import subprocess
import sys
import urllib.request

import duckdb

from mythos_probe.collectors.store import Store
from mythos_probe.dashboards import cli


def test_defaults_bind_loopback_port_8050():
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    args = parser.parse_args(["traces.duckdb"])
    assert (args.file, args.host, args.port) == ("traces.duckdb", "127.0.0.1", 8050)


def test_missing_file_is_a_message(tmp_path):
    store, problem = cli.open_store(str(tmp_path / "nothing.duckdb"))
    assert store is None and "no store at" in problem


def test_newer_schema_is_a_message(tmp_path):
    path = tmp_path / "newer.duckdb"
    Store(path).close()
    con = duckdb.connect(str(path))
    con.execute("INSERT INTO _migrations (name) VALUES ('m999_from_the_future')")
    con.close()
    store, problem = cli.open_store(str(path))
    assert store is None and "newer" in problem


def test_store_held_by_a_writer_is_a_message(tmp_path):
    path = tmp_path / "held.duckdb"
    Store(path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from mythos_probe.collectors.store import Store; s = Store({str(path)!r}); "
         "print('ready', flush=True); input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        store, problem = cli.open_store(str(path))
        assert store is None and "held by a writer" in problem
    finally:
        holder.communicate("\n", timeout=30)


def test_command_prints_the_url_and_serves_the_problem_page(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mythos_probe.cli", "dashboard", str(tmp_path / "absent.duckdb"), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("mythos-probe dashboard: http://127.0.0.1:")
        url = line.split()[2]
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "no store at" in proc.stderr.read()
