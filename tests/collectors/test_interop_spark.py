"""Spark (a real standalone cluster: a master and two workers on 127.0.0.1, started here) computes
the dashboard's aggregates over a Parquet store folder equal, column by column, to DuckDB's views
on the same folder (`collectors.spark` against `dashboards.queries`).

One Spark session serves every test of the module (starting the JVMs is most of the cost)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mythos_probe.collectors.parquet_store import ParquetStore
from mythos_probe.dashboards import queries
from mythos_probe.dashboards.queries import Selection
from tests.conftest import free_port, get_json, need
from tests.dashboards.factory import BASE_NS, synthetic_trace

pytestmark = pytest.mark.interop


def _traces() -> list:
    """Two runs of 4 ranks stepping together (ranks differ in iterations and time), plus served,
    shadow and training forwards over three endpoints, one of them with NaN halting values."""
    rng = np.random.default_rng(11)
    out = []
    for i in range(48):
        rank = i % 4
        t = synthetic_trace(rng, run_id=("job-a", "job-b")[(i // 4) % 2], model_id=("m-1", "m-2")[i % 2],
                            step=i // 8, start_ns=BASE_NS + i * 7 * 10**9, n_loops=(4, 6, 8)[(i + rank) % 3],
                            batch=1, seq_len=5, n_experts=(3 if i % 12 else 0) or 3,
                            attributes={"endpoint": ("/chat", "/code", "/it's")[i % 3]} if i % 7 else {})
        if i == 9:
            metrics = dict(t.iteration_metrics)
            metrics["halted_fraction"] = np.r_[np.nan, metrics["halted_fraction"][1:]]
            t = dataclasses.replace(t, iteration_metrics=metrics)
        out.append(dataclasses.replace(t, rank=rank, local_rank=rank, world_size=4,
                                       kind=("served", "served", "shadow", "training")[(i // 4) % 4]))
    return out


def _spark_home() -> Path | None:
    try:
        import pyspark
    except ImportError:
        return None
    return Path(pyspark.__file__).parent


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    home = _spark_home()
    need(home is not None, "pyspark is not installed (pip install -e '.[dev]')")
    need(shutil.which("java") is not None, "Java 17 is not installed (scripts/system-deps.sh)")
    work = tmp_path_factory.mktemp("spark")
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_DAEMON_MEMORY": "256m",
           "SPARK_LOG_DIR": str(work), "SPARK_WORKER_DIR": str(work / "workers"), "PYSPARK_PYTHON": sys.executable}
    port, ui = free_port(), free_port()
    spark_class = [str(home / "bin" / "spark-class")]
    procs = [subprocess.Popen(
        [*spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
         "--webui-port", str(ui)], env=env, stdout=open(work / "master.log", "wb"), stderr=subprocess.STDOUT)]
    session = None
    try:
        for k in range(2):
            procs.append(subprocess.Popen(
                [*spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "1",
                 "--memory", "768m", "--webui-port", str(free_port()), f"spark://127.0.0.1:{port}"],
                env=env, stdout=open(work / f"worker-{k}.log", "wb"), stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 180
        while True:
            try:
                if get_json(f"http://127.0.0.1:{ui}/json/").get("aliveworkers") == 2:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                logs = "\n".join(p.name + ":\n" + p.read_text()[-2000:] for p in sorted(work.glob("*.log")))
                pytest.fail(f"the Spark master and two workers did not come up:\n{logs}")
            time.sleep(0.5)
        from pyspark.sql import SparkSession

        os.environ.update({k: env[k] for k in ("SPARK_HOME", "SPARK_LOCAL_IP", "PYSPARK_PYTHON")})
        session = (SparkSession.builder.master(f"spark://127.0.0.1:{port}").appName("mythos-probe-interop")
                   .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
                   .config("spark.driver.memory", "512m").config("spark.executor.memory", "512m")
                   .config("spark.executor.cores", "1").config("spark.cores.max", "2")
                   .config("spark.sql.shuffle.partitions", "2").config("spark.sql.session.timeZone", "UTC")
                   .config("spark.sql.execution.arrow.pyspark.enabled", "true")
                   .config("spark.ui.enabled", "false").getOrCreate())
        session.sparkContext.setLogLevel("ERROR")
        # the work runs on the two workers' executors, not in the driver
        deadline = time.monotonic() + 120
        while session.sparkContext._jsc.sc().getExecutorMemoryStatus().size() < 3:  # the driver + 2 executors
            if time.monotonic() > deadline:
                pytest.fail("the Spark application got no executors on the two workers")
            time.sleep(0.5)
        yield session
    finally:
        if session is not None:
            session.stop()
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("parquet") / "store"
    traces = _traces()
    for part in (traces[:20], traces[20:]):  # two writers, two file sets per table
        with ParquetStore(path) as store:
            store.write_traces(part)
    return path


def _equal(spark_df, duck: pd.DataFrame, what: str, sort: list[str] | None = None) -> None:
    got = spark_df.toPandas()
    assert list(got.columns) == list(duck.columns), what
    assert len(duck) > 0, f"{what}: an empty view cannot show a difference"
    if sort:  # order ties (equal sort keys) are not an engine's to keep
        got, duck = (d.sort_values(sort, kind="stable").reset_index(drop=True) for d in (got, duck))
    assert len(got) == len(duck), what
    for c in duck.columns:
        a, b = got[c], duck[c]
        if pd.api.types.is_numeric_dtype(b) and not pd.api.types.is_bool_dtype(b):
            np.testing.assert_allclose(a.astype(float), b.astype(float), rtol=1e-12, equal_nan=True,
                                       err_msg=f"{what}: {c}")
        else:
            assert a.tolist() == b.tolist(), f"{what}: {c}"


# (kinds, group): every group kind (none, a label, a user attribute) and both kind filters, few enough
# that the module stays well under a minute of Spark jobs on two cores
CASES = (((), "attr:endpoint"), ((), "rank"), (("served",), "none"))


def test_spark_on_two_workers_equals_duckdb_on_every_dashboard_aggregate(spark, folder):
    from mythos_probe.collectors.spark import SparkViews

    with ParquetStore.open_read_only(folder) as duck:
        for kinds, group in CASES:
            views = SparkViews(spark, folder, kinds=kinds)
            sel = Selection(kinds=kinds, group=group)
            what = f"kinds={kinds or 'all'}, group={group}"
            _equal(views.forwards_by_iterations(group), queries.forwards_by_iterations(duck, sel), f"loops {what}")
            _equal(views.tokens_by_iterations_used(group), queries.tokens_by_iterations_used(duck, sel),
                   f"tokens {what}")
            _equal(views.halting_by_iteration(group), queries.halting_by_iteration(duck, sel), f"halting {what}")
            _equal(views.cost_by_group(group), queries.cost_by_group(duck, sel), f"cost {what}", sort=["grp"])
        _equal(SparkViews(spark, folder, kinds=()).cross_rank(), queries.cross_rank(duck, Selection(kinds=())), "cross-rank")
        # the fixture can show what it is meant to: NaN reaches a mean, ranks disagree, endpoints unset
        assert queries.halting_by_iteration(duck, Selection(kinds=()))["halted_fraction"].isna().any()
        steps = queries.cross_rank(duck, Selection(kinds=()))
        assert (steps["iterations_max"] > steps["iterations_min"]).any() and (steps["ranks"] == 4).any()
        assert "(unset)" in set(queries.cost_by_group(duck, Selection(group="attr:endpoint"))["grp"])


def test_spark_reads_every_file_set_once(spark, folder):
    from mythos_probe.collectors.spark import SparkViews, table_files

    assert len(table_files(folder, "forwards")) >= 2
    counts = SparkViews(spark, folder).table("forwards").groupBy("trace_id", "span_id").count()
    assert counts.count() == len(_traces()) and counts.where("count > 1").count() == 0
