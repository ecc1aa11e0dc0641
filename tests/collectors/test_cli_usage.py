"""Argument handling of `serve`, `dashboard`, `export` and `demo`: port numbers, ports in use (one
line, nothing created first), defaults shown in --help, no stderr line per request, `export
--otlp --token` and an authentication failure named as such, and a missing extra named in one
line (issue 23)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

import pytest

from mythos_probe.cli import main
from mythos_probe.collectors.receiver import Receiver
from mythos_probe.collectors.store import Store
from tests.collectors.factory import make_trace

CLI = [sys.executable, "-m", "mythos_probe.cli"]


@contextmanager
def busy_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def one_line(stderr: str, command: str) -> str:
    err = stderr.strip()
    assert err.startswith(f"mythos-probe {command}: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv", [
    ["serve", "--store", "x.duckdb", "--port", "99999"],
    ["serve", "--store", "x.duckdb", "--dashboard-port", "70000"],
    ["serve", "--store", "x.duckdb", "--prometheus", "-1"],
    ["dashboard", "x.duckdb", "--port", "99999"],
    ["demo", "--port", "65536"],
])
def test_a_port_out_of_range_is_a_usage_error_naming_the_range(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "is not a port: use 1 to 65535, or 0 for a free one" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_a_port_that_is_not_a_number_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--store", "x.duckdb", "--port", "http"])
    assert "'http' is not a port number" in capsys.readouterr().err


def test_serve_on_a_busy_port_fails_in_one_line_and_creates_no_store(tmp_path, capsys):
    with busy_port() as port:
        for flag in ("--port", "--dashboard-port"):
            others = ["--port", "0"] if flag == "--dashboard-port" else ["--dashboard-port", "0"]
            assert main(["serve", "--store", str(tmp_path / "new.duckdb"), flag, str(port), *others]) == 2
            assert f"cannot listen on 127.0.0.1:{port}" in one_line(capsys.readouterr().err, "serve")
            assert main(["serve", "--parquet", str(tmp_path / "folder"), flag, str(port), *others]) == 2
            assert f"choose another {flag}" in one_line(capsys.readouterr().err, "serve")
    # a public bind without a token is refused before anything is created too
    assert main(["serve", "--store", str(tmp_path / "new.duckdb"), "--host", "0.0.0.0", "--no-dashboard"]) == 2
    assert "needs an ingest token" in one_line(capsys.readouterr().err, "serve")
    assert list(tmp_path.iterdir()) == []


def test_dashboard_and_demo_on_a_busy_port_print_one_line_and_no_prewarm_traceback(tmp_path):
    path = tmp_path / "s.duckdb"
    with Store(path) as store:  # lens-sampled forwards, so the what-if prewarm has work to do
        store.write_traces([make_trace(i, detail="positions") for i in range(20)])
    with busy_port() as port:
        run = subprocess.run([*CLI, "dashboard", str(path), "--port", str(port)],
                             capture_output=True, text=True, timeout=180)
        assert run.returncode == 2
        assert f"cannot listen on 127.0.0.1:{port}" in one_line(run.stderr, "dashboard")
        demo_store = tmp_path / "demo.duckdb"
        run = subprocess.run([*CLI, "demo", "--store", str(demo_store), "--port", str(port)],
                             capture_output=True, text=True, timeout=180)
        assert run.returncode == 2 and "choose another --port" in one_line(run.stderr, "demo")
        assert not demo_store.exists()  # stopped before the workload and the store


def test_serve_help_shows_the_default_ports(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default 4318" in out and "(default 8050)" in out and "9464 is the usual port" in out


def _serve(tmp_path, *extra):
    proc = subprocess.Popen([*CLI, "serve", "--store", str(tmp_path / "live.duckdb"), "--port", "0",
                             "--dashboard-port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    otlp = proc.stdout.readline()
    dashboard = proc.stdout.readline()
    assert "OTLP/HTTP on" in otlp and "dashboard on" in dashboard, (otlp, dashboard, proc.poll())
    return proc, otlp.split(" on ")[1].split("/v1/traces")[0], dashboard.rsplit(" ", 1)[1].strip()


def test_the_dashboard_logs_no_line_per_request(tmp_path):
    proc, _, dashboard = _serve(tmp_path)
    try:
        for path in ("/", "/_dash-layout", "/_dash-dependencies"):
            with urllib.request.urlopen(dashboard + path, timeout=60) as reply:
                assert reply.status == 200
        body = json.dumps({"output": "app-page.children", "outputs": {"id": "app-page", "property": "children"},
                           "inputs": [{"id": "app-url", "property": "pathname", "value": "/"}],
                           "changedPropIds": [], "state": [{"id": "app-url", "property": "search", "value": ""}]})
        request = urllib.request.Request(dashboard + "/_dash-update-component", data=body.encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:  # the callback the live page POSTs
            assert reply.status == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert err == "", err


@pytest.fixture()
def guarded(tmp_path):
    with Store(tmp_path / "in.duckdb") as store, Receiver(store, "127.0.0.1", 0, token="s3cret") as receiver:
        yield receiver


@pytest.fixture()
def stored_five(tmp_path):
    path = tmp_path / "five.duckdb"
    with Store(path) as store:
        store.write_traces([make_trace(i) for i in range(5)])
    return path


def test_export_otlp_with_the_token_delivers_every_forward(guarded, stored_five, capsys):
    assert main(["export", str(stored_five), "--otlp", guarded.endpoint, "--token", "s3cret"]) == 0
    assert "5 spans delivered, 0 not delivered" in capsys.readouterr().out
    assert int(guarded.store.query("SELECT count(*) AS n FROM forwards")["n"][0]) == 5


@pytest.mark.parametrize("token", [None, "wrong"])
def test_export_otlp_with_a_missing_or_wrong_token_says_authentication_failed(guarded, stored_five, capsys, token,
                                                                              monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_HEADERS", raising=False)
    argv = ["export", str(stored_five), "--otlp", guarded.endpoint] + ([] if token is None else ["--token", token])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "authentication failed" in err and "HTTP 401" in err and "--token" in err, err
    assert ("token given was refused" if token else "no token was given") in err
    assert "listening" not in err  # not blamed on the endpoint


def test_export_token_without_otlp_is_refused(stored_five, capsys, tmp_path):
    assert main(["export", str(stored_five), "--parquet", str(tmp_path / "p"), "--token", "x"]) == 2
    assert "--token is for --otlp" in one_line(capsys.readouterr().err, "export")


def _run_without(modules: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in modules)
    code = f"import sys; {blocked}; from mythos_probe.cli import main; sys.exit(main({argv!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    # duckdb absent: serve fails on the import, and the error handler must not import it again
    run = _run_without(["duckdb"], ["serve", "--store", str(tmp_path / "s.duckdb"), "--port", "0", "--no-dashboard"])
    assert run.returncode == 2
    err = one_line(run.stderr, "serve")
    assert "duckdb is not installed" in err and "pip install 'mythos-probe[server]'" in err
    assert "During handling" not in run.stderr
    run = _run_without(["torch"], ["demo", "--no-serve", "--store", str(tmp_path / "d.duckdb")])
    assert run.returncode == 2
    err = one_line(run.stderr, "demo")
    assert "torch is not installed" in err and "pip install 'mythos-probe[probe]'" in err
    run = _run_without(["dash"], ["dashboard", str(tmp_path / "none.duckdb"), "--port", "0"])
    assert run.returncode == 2 and "pip install 'mythos-probe[server]'" in one_line(run.stderr, "dashboard")
    assert not (tmp_path / "s.duckdb").exists()


def test_attach_without_torch_names_the_probe_extra():
    code = ("import sys; sys.modules['torch'] = None; import mythos_probe\n"
            "try:\n    mythos_probe.attach\nexcept ModuleNotFoundError as e:\n    print(e); print(e.__suppress_context__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.splitlines() == [
        "torch is not installed; attach() and the model need the probe extra: pip install 'mythos-probe[probe]'",
        "True"], run.stdout + run.stderr
