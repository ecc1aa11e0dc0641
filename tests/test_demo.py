"""`mythos-probe demo`: headless summary, a second run reusing the store, a foreign file refused
untouched, and the served dashboard answering on the printed URL."""

import re
import subprocess
import sys
import urllib.request

import duckdb

from mythos_probe.cli import main


def test_headless_runs_twice_on_one_store(tmp_path, capsys):
    store = tmp_path / "demo.duckdb"
    assert main(["demo", "--no-serve", "--store", str(store), "--requests", "4", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "what-if at ≥99% agreement: exit on" in out or "no early-exit policy" in out
    assert "baseline: full-depth shadow forwards" in out or "no early-exit policy" in out
    assert "run for real" in out or "no policy the model runs" in out
    assert "the served policy, run for real (exit='act', threshold 0.99, 4 chains" in out  # always measured too
    assert re.search(r"^\s+1\s+1\s+100\.0%", out, re.M)  # one request of one step, solved
    assert main(["demo", "--no-serve", "--store", str(store), "--requests", "4", "--batch", "4"]) == 0
    con = duckdb.connect(str(store), read_only=True)
    runs = dict(con.execute("SELECT run_id, count(*) FROM forwards GROUP BY run_id").fetchall())
    kinds = dict(con.execute("SELECT kind, count(*) FROM forwards WHERE run_id <> 'training' GROUP BY kind").fetchall())
    training_kinds = con.execute("SELECT DISTINCT kind FROM forwards WHERE run_id = 'training'").fetchall()
    con.close()
    assert kinds == {"served": 8, "shadow": 8}
    assert training_kinds == [("training",)]  # the shipped version-1 recording, which has no kind
    training = runs.pop("training")
    assert training > 10  # the shipped training run, stored once although written twice
    assert sum(runs.values()) == 16  # 4 served + 4 full-depth shadow forwards per run


def test_a_foreign_file_is_refused_and_left_untouched(tmp_path, capsys):
    foreign = tmp_path / "notes.duckdb"
    foreign.write_bytes(b"these are my notes, not a database")
    assert main(["demo", "--no-serve", "--store", str(foreign), "--requests", "1"]) == 2
    assert "--store" in capsys.readouterr().err
    assert foreign.read_bytes() == b"these are my notes, not a database"


def test_bad_sizes_are_refused(capsys):
    assert main(["demo", "--no-serve", "--requests", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_serves_the_dashboard_on_the_printed_url(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mythos_probe.cli", "demo", "--store", str(tmp_path / "d.duckdb"),
         "--requests", "2", "--batch", "2", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        url = None
        for line in proc.stdout:
            if line.startswith("dashboard: "):
                url = line.split()[1]
                break
        assert url and url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and b"mythos-probe" in response.read()
        # the demo serves its store read-only: another process reads it meanwhile (issue 23)
        con = duckdb.connect(str(tmp_path / "d.duckdb"), read_only=True)
        assert con.execute("SELECT count(*) FROM forwards WHERE run_id <> 'training'").fetchall()[0][0] == 4
        con.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_demo_and_dashboard_give_one_what_if_answer(tmp_path, capsys):
    """The dashboard's SQL replay over the whole store (served and shadow forwards) recommends
    the sentence the demo printed: both replay the full-depth shadow forwards only."""
    from mythos_probe import whatif as replay
    from mythos_probe.collectors.store import Store
    from mythos_probe.dashboards import whatif
    from mythos_probe.dashboards.queries import Selection

    store = tmp_path / "demo.duckdb"
    assert main(["demo", "--no-serve", "--store", str(store), "--requests", "6", "--batch", "4"]) == 0
    printed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("what-if at"))
    with Store(store) as s:
        table = whatif.evaluate(s, Selection())
    assert printed == f"what-if at ≥99% agreement: {replay.describe(replay.recommend(table, 0.99))}"


def test_a_measured_policy_that_is_not_faster_says_keep_fixed():
    import pandas as pd

    from mythos_probe.demo.run import describe_measured

    report = pd.Series({"policy": "latent", "threshold": 0.03, "time_saved": 0.2, "flops_saved": 0.4,
                        "iterations_saved": 0.5, "agreement": 1.0, "predicted_flops_saved": 0.45,
                        "predicted_iterations_saved": 0.5, "predicted_agreement": 1.0})
    with_time = lambda saved: pd.concat([report.drop("time_saved"), pd.Series({"time_saved": saved})])  # noqa: E731
    faster = describe_measured(report, "16 chains")
    assert "saved 20.0% of the time, 40.0% of the executed FLOPs" in faster and "\n" not in faster
    slower = describe_measured(with_time(-0.08), "16 chains")
    assert "saved -8.0% of the time" in slower and "NOT faster than exit='fixed'" in slower
    assert "keep exit='fixed'" in slower
    short = describe_measured(with_time(0.02), "16 chains")  # 2 % of the time for 40 % of the FLOPs
    assert "well below the FLOPs saved" in short and "keep exit='fixed'" not in short
    # the boundaries: no time saved is not faster; under half the FLOPs saved is well below
    assert "NOT faster" in describe_measured(with_time(0.0), "16 chains")
    assert "well below" in describe_measured(with_time(0.19), "16 chains")
    assert "\n" not in describe_measured(with_time(0.21), "16 chains")
    # executed FLOPs 5 points or more below the prediction: the line says why, naming ACT's halted positions
    predicted = lambda flops, policy: pd.concat([report.drop(["predicted_flops_saved", "policy"]),  # noqa: E731
                                                 pd.Series({"predicted_flops_saved": flops, "policy": policy})])
    assert "save less than predicted" not in describe_measured(predicted(0.44, "latent"), "16 chains")
    below = describe_measured(predicted(0.46, "latent"), "16 chains")
    assert "save less than predicted" in below and "keys and values of exited positions" in below
    assert "under ACT halted positions keep updating" not in below
    assert "under ACT halted positions keep updating" in describe_measured(predicted(0.6, "act"), "16 chains")
