"""`mythos-probe export`: Parquet that reads back to the same rows, and an OTLP replay that a receiver
stores as the same rows (resource included), with clear failures for a missing store and an
endpoint nobody listens on."""

import dataclasses
import socket

import duckdb
import numpy as np

from mythos_probe.cli import main
from mythos_probe.collectors.schema import TABLES
from mythos_probe.collectors.store import Store
from tests.collectors.conftest import TABLE_KEYS, table
from tests.collectors.factory import make_trace


def test_parquet_export_reads_back_to_the_same_rows(tmp_path, capsys):
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        store.write_traces([make_trace(i, model_id=m) for i, m in enumerate(["a", "b", "a"])])
    assert main(["export", str(path), "--parquet", str(tmp_path / "pq")]) == 0
    assert sorted(p.name for p in (tmp_path / "pq" / "positions").glob("date=*/model_id=*")) == ["model_id=a", "model_id=b"]
    with Store.open_read_only(path) as store:
        for name in TABLES:
            glob = str(tmp_path / "pq" / name / "**" / "*.parquet")
            cols = ", ".join(f'"{c}"' for c, _ in TABLES[name])
            back = duckdb.sql(
                f"SELECT {cols} FROM read_parquet('{glob}', hive_partitioning = true, hive_types_autocast = false) "
                f"ORDER BY {TABLE_KEYS[name]}"
            ).df()
            want = table(store, name, drop=())
            assert len(back) == len(want) > 0, name
            assert back.astype(object).equals(want.astype(object)), name


def replayable_traces():
    """Forwards of both detail levels, without token text or experts, with ±Inf and NaN values."""
    diverged = make_trace(3)
    state_norm = diverged.iteration_metrics["state_norm"].copy()
    state_norm[1:] = np.inf
    diverged = dataclasses.replace(
        diverged, iteration_metrics={**diverged.iteration_metrics, "state_norm": state_norm},
        forward_metrics={**diverged.forward_metrics, "rho_A": -np.inf, "flops": np.nan},
    )
    return [make_trace(0), make_trace(1, with_text=False, n_experts=0), make_trace(2, detail="summary"),
            make_trace(4, all_metrics=False), diverged]


def test_otlp_export_replays_every_row_into_a_receiver(receiver, tmp_path, capsys):
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        store.write_traces(replayable_traces(), resource={"service.name": "trainer", "host.name": "gpu-7"})
    assert main(["export", str(path), "--otlp", receiver.endpoint]) == 0
    assert receiver.received_spans == 5
    with Store.open_read_only(path) as source:
        for name in TABLE_KEYS:
            a, b = table(receiver.store, name), table(source, name)
            assert len(a) == len(b) > 0, name
            assert a.equals(b), name
    out = capsys.readouterr().out
    assert f"replayed 5 forwards to {receiver.endpoint}" in out and "5 spans delivered, 0 not delivered" in out


def test_otlp_export_of_a_missing_store_says_so(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.duckdb"), "--otlp", "http://127.0.0.1:9"]) == 2
    assert "no store at" in capsys.readouterr().err


def test_otlp_export_to_an_unreachable_endpoint_counts_what_was_not_delivered(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # one refused connection is enough to give up
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        store.write_traces([make_trace(i) for i in range(40)])  # two rounds: the second is never tried
    with socket.socket() as s:  # a loopback port with nothing listening: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["export", str(path), "--otlp", f"http://127.0.0.1:{port}"]) == 1
    captured = capsys.readouterr()
    assert "0 spans delivered, 40 not delivered" in captured.out
    assert "40 of 40 spans were not delivered" in captured.err


def test_parquet_export_of_an_over_long_model_id_is_one_clear_error_writing_nothing(tmp_path, capsys):
    path = tmp_path / "s.duckdb"
    cjk = "模" * 86  # 258 bytes of UTF-8, 783 once escaped into model_id=%E6%A8%A1…
    with Store(path) as store:
        store.write_traces([make_trace(0, model_id="fits"), make_trace(1, model_id=cjk)])
    assert main(["export", str(path), "--parquet", str(tmp_path / "pq")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "86 characters" in err and "783 bytes" in err and "255-byte limit" in err
    assert not (tmp_path / "pq").exists()
    with Store(tmp_path / "ok.duckdb") as store:  # the longest id that fits: 246 bytes of ASCII, 255 with model_id=
        store.write_traces([make_trace(0, model_id="m" * 246)])
    assert main(["export", str(tmp_path / "ok.duckdb"), "--parquet", str(tmp_path / "pq2")]) == 0
    assert [p.name for p in (tmp_path / "pq2" / "forwards").glob("date=*/model_id=*")] == ["model_id=" + "m" * 246]
