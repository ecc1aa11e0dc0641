"""The distributed context: read from the launcher's environment without communicating, shared
run id from the job id, every trace tagged, and the OTel resource attributes by their literal names."""

import os
import socket

import pytest
import torch

import mythos_probe
from mythos_probe.collectors.exporter import process_resource, tracer_provider
from mythos_probe.probes.distributed import Where, job_run_id, where
from mythos_probe.model import LoopedConfig, LoopedTransformer

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "5f0c-uuid"}


def test_torchrun_environment_gives_rank_family_and_job():
    w = where(TORCHRUN)
    assert (w.rank, w.local_rank, w.world_size, w.job_id) == (3, 1, 4, "5f0c-uuid")
    assert (w.host, w.pid) == (socket.gethostname(), os.getpid())
    assert job_run_id(w) == "run-5f0c-uuid"


def test_slurm_environment_when_torchrun_is_absent():
    w = where({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "4242"})
    assert (w.rank, w.local_rank, w.world_size, w.job_id) == (5, 1, 8, "4242")


def test_single_process_defaults():
    w = where({})
    assert (w.rank, w.local_rank, w.world_size, w.job_id) == (0, 0, 1, "")
    assert job_run_id(w) is None


def test_multi_rank_job_without_job_id_warns_and_names_the_fix():
    env = {"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"}
    with pytest.warns(UserWarning, match="attach\\(run_id=...\\)") as caught:
        assert job_run_id(where(env)) is None
    assert caught[0].filename == __file__  # the caller's line, not distributed.py


@pytest.mark.parametrize("env, fix", [({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
                                      ({"RANK": "2", "WORLD_SIZE": "2"}, "outside world size 2")])
def test_bad_launcher_environment_is_a_clear_error(env, fix):
    with pytest.raises(ValueError, match=fix):
        where(env)


def test_attach_tags_every_trace_and_shares_the_job_run_id(monkeypatch):
    for key, value in TORCHRUN.items():
        monkeypatch.setenv(key, value)
    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with mythos_probe.attach(model) as rec:
        model(ids, n_loops=2)
        model(ids, n_loops=3)
    assert len(rec.traces) == 2
    for t in rec.traces:
        assert (t.rank, t.local_rank, t.world_size, t.job_id) == (3, 1, 4, "5f0c-uuid")
        assert (t.host, t.pid, t.run_id) == (socket.gethostname(), os.getpid(), "run-5f0c-uuid")
    with mythos_probe.attach(model, run_id="mine") as rec:
        model(ids, n_loops=2)
    assert rec.traces[0].run_id == "mine" and rec.traces[0].rank == 3
    forwards, experts = rec.frame("forwards"), rec.frame("experts")
    assert forwards[["rank", "local_rank", "world_size", "job_id"]].values.tolist() == [[3, 1, 4, "5f0c-uuid"]]
    assert set(experts["rank"]) == {3}


def test_to_parquet_holds_what_to_duckdb_holds(tmp_path):
    from mythos_probe.collectors.parquet_store import ParquetStore
    from mythos_probe.collectors.store import Store

    model = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    with mythos_probe.attach(model, detail="positions") as rec:
        model(ids, n_loops=3)
        model(ids[:1], n_loops=2)
    files = rec.to_parquet(str(tmp_path / "pq"))
    assert files and all(f.endswith(".parquet") for f in files)
    rec.to_duckdb(str(tmp_path / "s.duckdb"))
    with ParquetStore.open_read_only(tmp_path / "pq") as pq, Store.open_read_only(tmp_path / "s.duckdb") as db:
        for table in ("forwards", "iterations", "positions", "experts"):
            sql = f"SELECT * EXCLUDE (forward_id) FROM {table} ORDER BY ALL"
            assert pq.query(sql).equals(db.query(sql)), table
        want = sum(t.batch * t.seq_len * t.iterations for t in rec.traces)
        assert want > 0 and pq.query("SELECT count(*) AS n FROM positions")["n"].iloc[0] == want


def test_resource_attributes_use_otel_names_and_the_rank_family():
    w = Where(rank=1, local_rank=1, world_size=2, host="node-7", pid=99, job_id="j1")
    assert process_resource(w) == {
        "host.name": "node-7", "process.pid": 99, "recurrent_depth.rank.index": 1,
        "recurrent_depth.rank.local_index": 1, "recurrent_depth.rank.world_size": 2,
        "recurrent_depth.rank.job_id": "j1",
    }
    attrs = tracer_provider().resource.attributes
    assert attrs["host.name"] == socket.gethostname() and attrs["process.pid"] == os.getpid()
    assert attrs["service.name"] == "mythos-probe" and attrs["recurrent_depth.rank.world_size"] == 1


def test_where_has_the_rank_family_of_the_record_with_the_same_defaults():
    import dataclasses

    from mythos_probe.records import LoopTrace

    record = {f.name: f.default for f in dataclasses.fields(LoopTrace)}
    assert {f.name: f.default for f in dataclasses.fields(Where)} == {
        name: record[name] for name in ("rank", "local_rank", "world_size", "host", "pid", "job_id")}
