"""Two CPU ranks under torchrun (gloo): DDP and FSDP2 around our LoopedTransformer and around an
unmodified OpenMythos, probes exporting OTLP to a `mythos-probe serve --store` and a `serve --parquet`. The store holds
every rank's traces once, tagged with its rank, host, pid and job; the cross-rank join equals the
sums computed from each rank's own traces; gradients with and without probes are bit-identical on
both ranks; and the probes add no collective to a forward."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mythos_probe import frames
from mythos_probe.collectors.export_cli import stored_traces
from mythos_probe.collectors.parquet_store import open_read_only
from mythos_probe.dashboards import queries

pytest.importorskip("open_mythos.main", reason="open-mythos is installed by scripts/bootstrap.sh")

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
CONFIGS = ("ddp-looped", "fsdp-looped", "ddp-openmythos", "fsdp-openmythos")
STEPS = 2


def _serve(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "mythos_probe.cli", "serve", *args, "--port", "0", "--no-dashboard"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    return proc, "http://" + line.split("http://", 1)[1].split("/v1/traces")[0]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """(folder holding both stores the ranks fed, {rank: what that rank measured})."""
    tmp = tmp_path_factory.mktemp("torchrun")
    serves = [_serve(["--store", str(tmp / "store.duckdb")]), _serve(["--parquet", str(tmp / "store")])]
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        endpoints = [arg for _, endpoint in serves for arg in ("--endpoint", endpoint)]
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
             *endpoints, "--out", str(tmp)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    finally:
        for proc, _ in serves:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=60) for proc, _ in serves] == [0, 0]
    return tmp, {r: json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)}


@pytest.fixture(params=["duckdb", "parquet"])
def job(launch, request):
    """(one of the two stores one `serve` each wrote from the same OTLP, the ranks' reports)."""
    tmp, reports = launch
    with open_read_only(tmp / ("store.duckdb" if request.param == "duckdb" else "store")) as store:
        yield store, reports


def test_every_rank_trace_is_stored_once_and_tagged(job):
    store, reports = job
    forwards = store.query("SELECT trace_id, span_id, run_id, step, rank, local_rank, world_size, host, pid, job_id,"
                           " json_extract_string(attributes, '$.config') AS config FROM forwards")
    sent = {(t["trace_id"], t["span_id"]): (r, c) for r, rep in reports.items()
            for c, v in rep["configs"].items() for t in v["traces"]}
    assert len(sent) == 2 * len(CONFIGS) * STEPS
    assert len(forwards) == len(sent) and set(zip(forwards.trace_id, forwards.span_id)) == set(sent)
    job_id = reports[0]["job"]
    assert reports[1]["job"] == job_id
    for row in forwards.itertuples():
        rank, config = sent[(row.trace_id, row.span_id)]
        assert (row.rank, row.local_rank, row.world_size, row.config) == (rank, rank, 2, config)
        assert (row.host, row.pid, row.job_id) == (socket.gethostname(), reports[rank]["pid"], job_id)
        # attach's default run id is the job's on both ranks; the others extend it
        assert row.run_id == f"run-{job_id}" + ("" if config == CONFIGS[0] else f"-{config}")
    models = store.query("SELECT DISTINCT json_extract_string(attributes, '$.config') AS config, model_id FROM forwards")
    by_config = dict(zip(models.config, models.model_id))
    assert len(models) == len(CONFIGS)  # one model id per config, whatever the wrapper
    for kind, cls in (("looped", "LoopedTransformer-"), ("openmythos", "OpenMythos")):
        assert by_config[f"ddp-{kind}"] == by_config[f"fsdp-{kind}"] and by_config[f"ddp-{kind}"].startswith(cls)
    # `mythos-probe export --otlp` rebuilds each record from the store with its rank family
    replayed = {(t.trace_id, t.span_id): (t.rank, t.local_rank, t.world_size, t.host, t.pid, t.job_id)
                for chunk in stored_traces(store) for _, t in chunk}
    assert replayed == {(r.trace_id, r.span_id): (r.rank, r.local_rank, r.world_size, r.host, r.pid, r.job_id)
                        for r in forwards.itertuples()}
    resources = store.query("SELECT DISTINCT json_extract(resource, '$.\"process.pid\"')::BIGINT AS pid,"
                            " json_extract_string(resource, '$.\"host.name\"') AS host,"
                            " json_extract(resource, '$.\"recurrent_depth.rank.index\"')::INTEGER AS rank,"
                            " json_extract_string(resource, '$.\"recurrent_depth.rank.job_id\"') AS job FROM spans")
    assert sorted(map(tuple, resources.to_numpy().tolist())) == sorted(
        (reports[r]["pid"], socket.gethostname(), r, job_id) for r in (0, 1))
    assert all(rep["failed_spans"] == 0 for rep in reports.values())


def test_cross_rank_join_equals_the_sum_over_each_rank_traces(job):
    store, reports = job
    want = {}
    for rep in reports.values():
        for v in rep["configs"].values():
            for t in v["traces"]:
                key = (t["run_id"], t["step"])
                loads, its, ranks = want.get(key, ([0] * len(t["expert_load"]), 0, 0))
                want[key] = ([a + b for a, b in zip(loads, t["expert_load"])], max(its, t["iterations"]), ranks + 1)
    # training steps are `kind="training"` forwards, which the dashboard shows when asked (served by default)
    assert queries.cross_rank(store, queries.Selection()).empty
    for got in (frames.cross_rank(store), queries.cross_rank(store, queries.Selection(kinds=("training",)))):
        assert len(got) == len(want) * len(next(iter(want.values()))[0])
        for (run_id, step), (loads, iterations, ranks) in want.items():
            rows = got[(got.run_id == run_id) & (got.step == step)].sort_values("expert")
            assert rows["load"].tolist() == loads, (run_id, step)
            assert set(rows["iterations_max"]) == {iterations} and set(rows["ranks"]) == {ranks} == {2}
    only = queries.cross_rank(store, queries.Selection(runs=(f"run-{reports[0]['job']}",), kinds=("training",)))
    assert set(only.run_id) == {f"run-{reports[0]['job']}"}


def test_gradients_with_and_without_probes_are_bit_identical_on_every_rank(launch):
    _, reports = launch
    for rank, rep in reports.items():
        for config, v in rep["configs"].items():
            assert v["grads_equal"] == [True] * STEPS, (rank, config)
            assert v["n_grads"] > 0


def test_probes_add_no_collective_to_a_forward(launch):
    _, reports = launch
    for rank, rep in reports.items():
        for config, v in rep["configs"].items():
            plain, probed = v["collectives"]
            assert probed == plain, (rank, config, v["collectives"])
            if config.startswith("fsdp"):
                assert plain > 0, "FSDP2 all-gathers in its forward: the counter must see it"
