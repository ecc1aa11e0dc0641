"""Spark over a Parquet store folder: the dashboard's fleet-wide aggregates as Spark DataFrames.

For stores past one machine (see README "At scale"): `SparkViews(spark, folder)` reads the folder
that `ParquetStore` writers fill (any number of processes and hosts, on a shared or object file
system) and gives the aggregates the dashboard shows, as lazy DataFrames a user can filter, join
or write on:

- `forwards_by_iterations` and `tokens_by_iterations_used`: the loop distribution;
- `halting_by_iteration`: exits, cumulative halting and the halting means per iteration;
- `cost_by_group`: forwards, tokens, token-iterations, FLOPs per group, e.g. `attr:endpoint`;
- `cross_rank`: one row per (run, loop, step, expert) joined across ranks (`collectors.ranks`).

Each is the same definition as the DuckDB view of the same name in
`mythos_probe.dashboards.queries` (tests/collectors/test_interop_spark.py holds every column of
each equal on one folder): the same filters (`kinds`, served forwards by default), the same
groups (none, model, run, kind, loop, rank, policy, attr:<key>), NaN and NULL handled as SQL
does there, and the same row order.

Which files make up a table is decided in one place, `table_files`: the files the folder's commit
log names (`parquet_store.committed`), never a glob, which would also see a writer's uncommitted
set and the files a compaction replaced. A `SparkViews` DataFrame is a snapshot of the folder as of
the call that made it.

This module is not: the Parquet writer (`parquet_store`), the DuckDB views (`dashboards.queries`)
or a cluster launcher (the test starts a local standalone master and workers; production runs
point `SparkSession.builder.master` at theirs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mythos_probe.collectors.parquet_store import committed
from mythos_probe.collectors.schema import TABLES

# DuckDB's TIMESTAMP has no zone: Spark's timestamp_ntz, not its session-zone timestamp
_SPARK_TYPES = {"VARCHAR": "string", "JSON": "string", "BIGINT": "bigint", "INTEGER": "int", "DOUBLE": "double",
                "REAL": "float", "TIMESTAMP": "timestamp_ntz", "BIGINT[]": "array<bigint>", "DOUBLE[]": "array<double>",
                "VARCHAR[]": "array<string>"}
GROUP_COLUMNS = {"model": "model_id", "run": "run_id", "kind": "kind", "loop": "loop_name", "rank": "rank",
                 "policy": "exit_policy"}


def table_files(folder: str | Path, table: str) -> list[str]:
    """The Parquet files that hold `table` in the store folder, as a reader must list them: the
    committed ones (`parquet_store.committed`), never a glob, which would also see a writer's
    uncommitted file set and the files a compaction replaced (a forward twice)."""
    return [str(p) for p in committed(folder).files(table)]


class SparkViews:
    """The dashboard's aggregates over the Parquet store at `folder`, as DataFrames of `spark`."""

    def __init__(self, spark, folder: str | Path, kinds: Sequence[str] = ("served",)) -> None:
        self.spark, self.folder, self.kinds = spark, Path(folder), tuple(kinds)

    def table(self, name: str):
        """Table `name` read with the store's schema (`schema.TABLES`), so no job infers it and a
        file written before a column existed reads it as NULL, as the DuckDB reader's union by name
        does. The files are listed when this is called: a DataFrame is a snapshot of the folder."""
        files = table_files(self.folder, name)
        if not files:
            raise FileNotFoundError(f"no {name} files in {self.folder}: is it a mythos-probe Parquet store with data?")
        schema = ", ".join(f"`{c}` {_SPARK_TYPES[t]}" for c, t in TABLES[name])
        return self.spark.read.schema(schema).parquet(*files)

    def forwards(self, group: str = "none"):
        """The selected forwards (of `kinds`; every kind when empty) with their group as `grp`."""
        from pyspark.sql import functions as F

        df = self.table("forwards")
        if self.kinds:
            df = df.where(F.col("kind").isin(list(self.kinds)))
        return df.withColumn("grp", _group(group))

    def forwards_by_iterations(self, group: str = "none"):
        from pyspark.sql import functions as F

        return (self.forwards(group).groupBy("grp", "iterations").agg(F.count(F.lit(1)).alias("forwards"))
                .orderBy(F.col("grp").asc_nulls_last(), F.col("iterations").asc_nulls_last()))

    def _iterations(self, group: str):
        f = self.forwards(group).select("forward_id", "grp")
        return self.table("iterations").join(f, "forward_id")

    def tokens_by_iterations_used(self, group: str = "none"):
        from pyspark.sql import functions as F

        return (self._iterations(group).groupBy("grp", (F.col("iteration") + 1).alias("used"))
                .agg(F.sum("exit_count").alias("tokens")).where(F.col("tokens") > 0)
                .orderBy(F.col("grp").asc_nulls_last(), F.col("used").asc_nulls_last()))

    def halting_by_iteration(self, group: str = "none"):
        from pyspark.sql import Window
        from pyspark.sql import functions as F

        per = self._iterations(group).groupBy("grp", "iteration").agg(
            F.sum("exit_count").alias("exits"),
            *(F.avg(m).alias(m) for m in ("halted_fraction", "cum_halt", "halt_low_share", "halt_high_share")),
        )
        upto = Window.partitionBy("grp").orderBy("iteration").rowsBetween(Window.unboundedPreceding, Window.currentRow)
        return (per.select("grp", "iteration", "exits",
                           (F.sum("exits").over(upto) / F.sum("exits").over(Window.partitionBy("grp"))).alias("cumulative_halted"),
                           "halted_fraction", "cum_halt", "halt_low_share", "halt_high_share")
                .orderBy(F.col("grp").asc_nulls_last(), F.col("iteration").asc_nulls_last()))

    def cost_by_group(self, group: str = "none"):
        from pyspark.sql import functions as F

        tokens = F.col("batch") * F.col("seq_len")
        return (self.forwards(group).groupBy("grp").agg(
            F.count(F.lit(1)).alias("forwards"), F.sum("tokens").alias("tokens"),
            F.sum(F.col("mean_iterations") * tokens).alias("token_iterations"), F.sum("flops").alias("flops"),
            F.avg("flops_saved").alias("flops_saved"), F.avg("duration_ms").alias("mean_ms"),
        ).orderBy(F.col("flops").desc_nulls_last()))

    def cross_rank(self):
        """`collectors.ranks.CROSS_RANK` over the selected forwards: per (run, loop, step, expert)."""
        from pyspark.sql import functions as F

        f = self.forwards()
        key = ["run_id", "loop_name", "step"]
        steps = f.groupBy(*key).agg(
            F.countDistinct("rank").alias("ranks"), F.max("world_size").alias("world_size"),
            F.count(F.lit(1)).alias("forwards"), F.max("iterations").alias("iterations_max"),
            F.min("iterations").alias("iterations_min"),
            F.max_by("rank", F.struct("iterations", -F.col("rank"))).alias("rank_most_iterations"),
            F.max("duration_ms").alias("duration_ms_max"),
            F.max_by("rank", F.struct("duration_ms", -F.col("rank"))).alias("slowest_rank"),
        )
        loads = (self.table("experts").join(f.select("forward_id", *key), "forward_id")
                 .groupBy(*key, "expert").agg(F.sum("load").cast("bigint").alias("load")))
        return (steps.join(loads, key, "left")
                .orderBy(*(F.col(c).asc_nulls_last() for c in [*key, "expert"])))


def _group(group: str):
    from pyspark.sql import functions as F

    if group in GROUP_COLUMNS:
        column = F.col(GROUP_COLUMNS[group])
        return column.cast("string") if group == "rank" else column
    if group.startswith("attr:"):
        path = "$['" + group[5:].replace("\\", "\\\\").replace("'", "\\'") + "']"
        return F.coalesce(F.get_json_object("attributes", path), F.lit("(unset)"))
    if group == "none":
        return F.lit("all")
    raise ValueError(f"cannot group by {group!r}; choose none, {', '.join(GROUP_COLUMNS)} or attr:<key>")
