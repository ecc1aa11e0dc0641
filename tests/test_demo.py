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
    assert "loop profiles per endpoint from 4 full-depth shadow forwards" in out
    # 4 requests (chains of 1-4 steps, /easy and /medium): too little evidence, each keeps full depth and says so
    assert out.count("too little evidence") == out.count("keep full depth") == out.count("verdict /") == 2
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


def test_a_profile_is_recommended_only_when_every_round_was_faster():
    """The verdict rule on hand-made measurements: a time-saved range reaching 0 is never
    recommended, whatever the FLOPs; agreement further from the what-if than its bound warns."""
    from mythos_probe.demo.run import describe_measurement
    from mythos_probe.loop_profiles import Profile

    profile = Profile("/easy", "fixed", 2, forwards=20, positions=320, agreement=1.0, agreement_lower=0.99,
                      mean_iterations=2, iterations_saved=0.875, flops_saved=0.6, full_depth=16)
    m = {"agreement": 1.0, "answers": 48, "rounds": 5, "time_saved": (0.4, 0.6)}
    lines = describe_measurement("/easy", profile, m)
    assert lines[0].startswith("run for real on 48 held-out chains beside full depth, 5 interleaved rounds: "
                               "saved 40% to 60% of the time (predicted 60.0% of FLOPs); agreement measured 100.0% "
                               "vs what-if 100.0% (bound ±1.0%)")
    assert lines[-1] == "verdict /easy: recommended: exit='fixed', max_loops 2" and len(lines) == 2
    for low in (0.0, -0.05):
        slower = describe_measurement("/easy", profile, {**m, "time_saved": (low, 0.6)})
        assert slower[-1].startswith("verdict /easy: NOT recommended") and "keep exit='fixed'" in slower[-1]
    off = describe_measurement("/easy", profile, {**m, "agreement": 0.985})  # 1.5 points off, bound 1 point
    assert any(line.startswith("WARNING: measured and what-if agreement differ") for line in off)
    assert "recommended: exit" in off[-1]  # still ≥ target − bound = 98 %
    below = describe_measurement("/easy", profile, {**m, "agreement": 0.975})
    assert below[-1].startswith("verdict /easy: NOT recommended: measured agreement below the target less the bound")
    near = describe_measurement("/easy", profile, {**m, "agreement": 0.991})
    assert not any("WARNING" in line for line in near) and "recommended: exit" in near[-1]
