"""`pip install 'mythos-probe[server]'` on a clean machine (issue 23): a fresh virtual environment
gets the server extra from this checkout, resolved by pip with every dependency (pip's cache and
the configured indexes make it quick), and must hold no torch and no TransformerLens. There,
`serve` receives forwards from this process's real OTLP exporter and serves the dashboard and
Prometheus metrics; `dashboard` serves the stored file; `export` writes Parquet; and `demo`, which
needs the model, says in one line which extra to install."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import duckdb
import pytest

from mythos_probe.collectors.exporter import BoundedSpanProcessor, otlp_exporter, tracer_provider
from mythos_probe.collectors.spans import emit
from tests.collectors.factory import make_trace

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "mythos_probe", "model", "collectors", "dashboards")
N = 12

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server_venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    src.mkdir()
    for name in SOURCES:  # the package's files only: no .venv, build or egg-info of the checkout
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # this environment's pip installs into the new one (no pip bootstrap there); --no-compile: the
    # few modules the commands import compile when first imported
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-compile",
         "--disable-pip-version-check", f"{src}[server]"],
        capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    return venv


def run_in(venv: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    # run outside the checkout: `python -c` puts the working directory first on sys.path
    return subprocess.run([str(venv / "bin" / "python"), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=venv.parent)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as reply:
        assert reply.status == 200, url
        return reply.read().decode()


def test_the_server_install_has_no_torch_and_no_transformer_lens(server_venv):
    # neither is installed, and importing every server module loads no torch
    probe = run_in(server_venv, "-c", "import importlib.util as u, sys; "
                   "print(u.find_spec('torch') is None, u.find_spec('transformer_lens') is None); "
                   "import mythos_probe.collectors.serve, mythos_probe.dashboards.app, "
                   "mythos_probe.collectors.export_cli, mythos_probe.collectors.prometheus; print('torch' in sys.modules)\n"
                   "try:\n    mythos_probe.attach\nexcept ModuleNotFoundError as e:\n    print(repr(str(e)))")
    assert probe.stdout.splitlines() == [
        "True True", "False",
        repr("torch is not installed; attach() and the model need the probe extra: pip install 'mythos-probe[probe]'"),
    ], probe.stdout + probe.stderr


def test_serve_dashboard_and_export_run_in_the_server_install(server_venv, tmp_path):
    store = tmp_path / "live.duckdb"
    serve = subprocess.Popen(
        [str(server_venv / "bin" / "mythos-probe"), "serve", "--store", str(store), "--port", "0",
         "--dashboard-port", "0", "--prometheus", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=server_venv.parent)
    try:
        lines = [serve.stdout.readline() for _ in range(3)]
        assert all(lines), (lines, serve.poll(), serve.stderr.read() if serve.poll() is not None else "")
        endpoint = lines[0].split(" on ")[1].split("/v1/traces")[0]
        dashboard = lines[1].rsplit(" ", 1)[1].strip()
        metrics = lines[2].rsplit(" ", 1)[1].strip()
        # a worker: this process, with torch, exporting over the real OTLP/HTTP exporter
        processor = BoundedSpanProcessor(otlp_exporter(endpoint))
        provider = tracer_provider(processor, service_name="worker")
        traces = [make_trace(i) for i in range(N)]
        for trace in traces:
            emit(provider.get_tracer("test"), trace)
        provider.force_flush()
        provider.shutdown()
        assert processor.exported_spans == N and processor.dropped_spans == 0
        assert "mythos-probe" in get(dashboard + "/")
        layout = get(dashboard + "/_dash-layout")
        assert "app-page" in layout
        scraped = get(metrics)
        total = sum(float(line.rsplit(" ", 1)[1]) for line in scraped.splitlines()
                    if line.startswith("recurrent_depth_forwards_total{"))
        assert total == N, scraped
    finally:
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=120)
    assert serve.returncode == 0, err

    exported = tmp_path / "parquet"
    run = run_in(server_venv, "-m", "mythos_probe.cli", "export", str(store), "--parquet", str(exported))
    assert run.returncode == 0, run.stderr
    assert set(json.loads(run.stdout)) >= {"forwards", "iterations", "positions"}
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{exported}/forwards/*/*/*.parquet')").fetchall()[0][0]
    assert n == N
    n_iterations = duckdb.sql(f"SELECT count(*) FROM read_parquet('{exported}/iterations/*/*/*.parquet')").fetchall()[0][0]
    assert n_iterations == sum(t.iterations for t in traces)

    dashboard = subprocess.Popen([str(server_venv / "bin" / "mythos-probe"), "dashboard", str(store), "--port", "0"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=server_venv.parent)
    try:
        url = dashboard.stdout.readline().split()[2]
        assert "mythos-probe" in get(url)
    finally:
        dashboard.terminate()
        dashboard.communicate(timeout=60)


def test_the_model_commands_name_the_probe_extra(server_venv, tmp_path):
    run = run_in(server_venv, "-m", "mythos_probe.cli", "demo", "--no-serve", "--store", str(tmp_path / "d.duckdb"))
    assert run.returncode == 2
    err = run.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err == ("mythos-probe demo: torch is not installed; attach() and the model need the probe extra: "
                   "pip install 'mythos-probe[probe]'"), err
