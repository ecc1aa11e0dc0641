"""Early-exit what-if in SQL: `mythos_probe.whatif.evaluate` run by DuckDB over the store's
`positions` table, so that the dashboard replays millions of position rows without loading them.

Same replay, same result: every lens-sampled position (finite `lens_argmax`) of a full-depth
forward (`exit_policy = 'fixed'`, the demo's `kind = 'shadow'` forwards; when the selection has
none, the served ones, and the `baseline` column says "served") exits at the first iteration where a criterion fires, else at the forward's last
iteration, and FLOPs saved are iterations saved × the loop's share of those forwards' FLOPs, less,
for the criteria that read the coda lens (`LENS_CRITERIA`), the lens readouts of the
position-iterations used (NaN when a forward has no `lens_flops`); the criteria, their
default thresholds and the columns come from `mythos_probe.whatif` (numpy and pandas only, no
torch), and `tests/dashboards/test_whatif_sql.py` holds both equal row for row. A criterion whose
input metric some sampled position lacks (NULL: the probe did not run) is left out, as there.

Why it stays linear in the rows rather than positions × iterations × thresholds: each criterion
is a score that fires below τ (kl, rel_residual, cos_step, entropy) or at and above τ (act,
argmax_stable). A position exits at iteration t for exactly the thresholds between its score at
t and its most extreme score before t, (s_t, min_{<t} s] or (max_{<t} s, s_t], and at its last
iteration for all thresholds that never fired. So one pass of window functions gives each row its
interval, and each (position, threshold) pair meets exactly one row in an interval join.

At a million forwards the replay of every full-depth forward takes over a second; `sample=m`
replays m of them chosen by a hash of their id (the same ones each time, spread over the whole
range) and gives each figure a 95 % interval: the forwards are the sampled units, each figure a
ratio of sums over them, its standard error that of a ratio estimate from a simple random sample
without replacement, times Student's t for m − 1 degrees of freedom.

This module is not: the replay over `LoopTrace`s (`mythos_probe.whatif`) nor the figure (the
page draws `mythos_probe.whatif.pareto_figure` of this table).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import pandas as pd

from mythos_probe.collectors import rollups
from mythos_probe.dashboards.queries import Selection, select
from mythos_probe.whatif import BASELINES, INPUTS, COLUMNS, CRITERIA, DEFAULT_THRESHOLDS, FIRES, LENS_CRITERIA

# The score column of each criterion over the `steps` rows below: its INPUTS metric, or the two
# derived there (entropy's change, the argmax's run); which way it fires comes from `FIRES`.
# NaN scores never fire (DuckDB orders NaN above every number, so they become NULL first).
_SCORES = {c: {"entropy": "entropy_change", "argmax_stable": "run"}.get(c, INPUTS[c]) for c in CRITERIA}

_ROWS = f"""
, sampled AS MATERIALIZED (SELECT p.forward_id, p.batch_index, p.position, p.iteration, f.iterations AS n,
    f.exit_policy = 'fixed' AS is_full, f.flops, f.loop_flops, f.lens_flops, p.lens_top1_agree AS agree, p.lens_argmax,
    {", ".join(f'p."{col}"' for col in sorted(set(INPUTS.values()) - {"lens_argmax"}))}
  FROM {{positions}} p JOIN sel f USING (forward_id)
  -- only forwards at detail "positions" have position rows (records.py): the join's build side
  -- is then those, not every selected forward
  WHERE f.detail = 'positions' AND isfinite(p.lens_argmax)),
candidates AS (SELECT forward_id, bool_or(is_full) AS is_full FROM sampled GROUP BY forward_id),
baseline AS (SELECT coalesce(bool_or(is_full), FALSE) AS has_full FROM candidates),
eligible AS (SELECT forward_id FROM candidates WHERE is_full OR NOT (SELECT has_full FROM baseline)),
-- the forwards replayed: every eligible one, or the first ? of them in the order of a hash of
-- their id (a deterministic sample that does not favour old or new forwards)
picked AS (SELECT forward_id FROM eligible ORDER BY hash(forward_id), forward_id LIMIT ?),
sample AS (SELECT (SELECT count(*) FROM picked) AS m, (SELECT count(*) FROM eligible) AS big_m),
lens AS (SELECT p.*,
    abs(CAST(p.lens_entropy AS DOUBLE) - lag(CAST(p.lens_entropy AS DOUBLE)) OVER w) AS entropy_change,
    p.iteration = 0 OR p.lens_argmax <> lag(p.lens_argmax) OVER w AS changed
  FROM sampled p WHERE p.forward_id IN (SELECT forward_id FROM picked)
  WINDOW w AS (PARTITION BY p.forward_id, p.batch_index, p.position ORDER BY p.iteration)),
runs AS (SELECT *, iteration - max(CASE WHEN changed THEN iteration END) OVER (w ROWS UNBOUNDED PRECEDING) AS run
  FROM lens WINDOW w AS (PARTITION BY forward_id, batch_index, position ORDER BY iteration)),
steps AS (SELECT *, {{befores}} FROM runs
  WINDOW before AS (PARTITION BY forward_id, batch_index, position ORDER BY iteration
                    ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)),
exits AS ({{exits}}),
th AS (SELECT unnest(CAST(? AS VARCHAR[])) AS criterion, unnest(CAST(? AS INTEGER[])) AS k,
              unnest(CAST(? AS DOUBLE[])) AS threshold),
avail AS (SELECT {", ".join(f'bool_and("{col}" IS NOT NULL) AS "{c}"' for c, col in INPUTS.items())} FROM lens),
ok AS (UNPIVOT avail ON COLUMNS(*) INTO NAME criterion VALUE available),
-- (from the replayed forwards' columns carried along: `sel` read once is not materialized)
share AS (SELECT CASE WHEN count(*) = count(f.loop_flops) AND count(*) = count(f.flops)
                 THEN sum(f.loop_flops) / sum(f.flops) ELSE 'nan' END AS s,
    CASE WHEN count(*) = count(f.lens_flops) AND count(*) = count(f.flops)
         THEN sum(f.n * f.lens_flops) / sum(f.flops) ELSE 'nan' END AS lens
  FROM (SELECT DISTINCT ON (forward_id) forward_id, n, flops, loop_flops, lens_flops FROM lens) f),
-- per threshold and sampled forward (per threshold only when every forward is replayed: no
-- interval to compute): positions, iterations used, budget and agreeing positions (each position
-- exits at exactly one row per threshold, so the budgets sum to every position's)
per AS (SELECT th.criterion, th.k, th.threshold, count(*) AS npos, sum(e.iteration + 1) AS used,
    sum(e.n) AS budget, sum(e.agree) AS agreed, count(e.agree) AS nagree
  FROM th JOIN ok USING (criterion) JOIN exits e ON e.criterion = th.criterion
    AND e.lo < th.threshold AND th.threshold <= e.hi
  WHERE ok.available GROUP BY th.criterion, th.k, th.threshold, CASE WHEN (SELECT m < big_m FROM sample) THEN e.forward_id END),
est AS (SELECT criterion, k, threshold, sum(used) / sum(npos) AS mean_iterations, 1 - sum(used) / sum(budget) AS iterations_saved,
    sum(agreed) / sum(nagree) AS agreement, sum(npos) AS positions,
    sum(npos) / count(*) AS x_pos, sum(budget) / count(*) AS x_budget, sum(nagree) / count(*) AS x_agree
  FROM per GROUP BY criterion, k, threshold),
-- standard errors of the ratio estimates over a simple random sample of m of M forwards (the
-- forwards are the sampled units: positions of one forward are not independent); 0 when m = M
err AS (SELECT e.criterion, e.k, sqrt(greatest(1 - any_value(sample.m) / any_value(sample.big_m), 0)
      / (any_value(sample.m) * (any_value(sample.m) - 1))) AS z,
    sqrt(sum(power(p.used - (1 - e.iterations_saved) * p.budget, 2))) / any_value(e.x_budget) AS saved_sd,
    sqrt(sum(power(p.used - e.mean_iterations * p.npos, 2))) / any_value(e.x_pos) AS mean_sd,
    sqrt(sum(power(p.agreed - e.agreement * p.nagree, 2))) / any_value(e.x_agree) AS agree_sd
  FROM per p JOIN est e USING (criterion, k) CROSS JOIN sample GROUP BY e.criterion, e.k),
replayed AS (SELECT e.*, share.s AS loop_share,
    CASE WHEN e.criterion IN ({", ".join(f"'{c}'" for c in LENS_CRITERIA)}) THEN share.lens ELSE 0 END AS lens_share,
    CASE WHEN baseline.has_full THEN '{BASELINES[0]}' ELSE '{BASELINES[1]}' END AS baseline,
    CASE WHEN sample.m = sample.big_m THEN 0 ELSE err.z END AS z, err.saved_sd, err.mean_sd, err.agree_sd,
    sample.m AS forwards_replayed, sample.big_m AS forwards_selected
  FROM est e JOIN err USING (criterion, k) CROSS JOIN share CROSS JOIN baseline CROSS JOIN sample)
SELECT criterion, threshold, mean_iterations, iterations_saved,
  iterations_saved * loop_share - lens_share * (1 - iterations_saved) AS flops_saved,
  lens_share * (1 - iterations_saved) AS lens_cost, agreement, positions, baseline,
  z * mean_sd AS mean_iterations_ci, z * saved_sd AS iterations_saved_ci,
  z * saved_sd * (loop_share + lens_share) AS flops_saved_ci, z * agree_sd AS agreement_ci,
  forwards_replayed, forwards_selected
FROM replayed ORDER BY list_position(?, criterion), k
"""


def _score(column: str) -> str:
    return f"nullif(CAST({column} AS DOUBLE), 'nan')"


def _sql() -> str:
    befores, exits = [], []
    for criterion, column in _SCORES.items():
        score, fires = _score(column), FIRES[criterion]
        extreme = "min" if fires == "below" else "max"
        befores.append(f"{extreme}({score}) OVER before AS {criterion}_before")
        last = "iteration = n - 1"
        if fires == "below":  # exits at t for τ in (s_t, min before]; the last row takes every τ ≤ min before
            lo, hi = f"CASE WHEN {last} THEN '-inf' ELSE {score} END", f"coalesce({criterion}_before, 'inf')"
        else:  # exits at t for τ in (max before, s_t]; the last row takes every τ > max before
            lo, hi = f"coalesce({criterion}_before, '-inf')", f"CASE WHEN {last} THEN 'inf' ELSE {score} END"
        exits.append(
            f"SELECT '{criterion}' AS criterion, forward_id, n, iteration, agree, CAST({lo} AS DOUBLE) AS lo, CAST({hi} AS DOUBLE) AS hi"
            f" FROM steps WHERE lo < hi"
        )
    return _ROWS.format(befores=", ".join(befores), exits=" UNION ALL ".join(exits), positions="{positions}")


# over every position row, or over the lens-sampled ones a DuckDB store keeps (`rollups.LENS_TABLE`)
_SQL = _sql().format(positions="positions")
_SQL_ROLLED = _sql().format(positions=rollups.LENS_TABLE)


# With a sample: each estimate's 95 % interval half-width, and how many forwards were replayed
# out of how many selected. flops_saved's interval is iterations_saved's scaled by the loop's and
# the lens's FLOP shares (of the replayed forwards), taken as known.
SAMPLE_COLUMNS = ["mean_iterations_ci", "iterations_saved_ci", "flops_saved_ci", "agreement_ci",
                  "forwards_replayed", "forwards_selected"]


def evaluate(store, sel: Selection, thresholds: Mapping[str, Iterable[float]] | None = None,
             sample: int | None = None) -> pd.DataFrame:
    """`mythos_probe.whatif.evaluate` over the selected full-depth forwards' stored positions: one
    row per (criterion, threshold) with mean_iterations, iterations_saved, flops_saved, lens_cost,
    agreement, positions and baseline; empty when no selected full-depth forward has per-position
    lens metrics.

    `sample`: replay at most this many forwards, chosen by a hash of their id (the same ones on
    every call), and add `SAMPLE_COLUMNS`: each figure is then an estimate with a 95 % interval
    (half-width; 0 when every forward was replayed)."""
    chosen = DEFAULT_THRESHOLDS if thresholds is None else thresholds
    unknown = sorted(set(chosen) - set(CRITERIA))
    if unknown:
        raise ValueError(f"unknown exit criteria {unknown}; choose from {CRITERIA}")
    if sel.kinds and "shadow" not in sel.kinds:
        # The baseline is the full-depth shadow run beside the selected traffic: a selection of
        # served forwards (every page's default) still replays the shadows recorded with them.
        sel = dataclasses.replace(sel, kinds=(*sel.kinds, "shadow"))
    rows = [(c, k, float(t)) for c in CRITERIA if c in chosen for k, t in enumerate(chosen[c])]
    names, ks, values = (list(col) for col in zip(*rows)) if rows else ([], [], [])
    if sample is not None and sample < 2:
        raise ValueError(f"a what-if sample needs at least 2 forwards (an interval needs two), not {sample}")
    sql = _SQL_ROLLED if getattr(store, "has_rollups", False) else _SQL
    df = select(store, sel, sql, [sample, names, ks, values, list(CRITERIA)])
    if len(df):  # standard errors → 95 % half-widths, with Student's t for m − 1 degrees of freedom
        df[SAMPLE_COLUMNS[:4]] *= _t975(int(df["forwards_replayed"].iloc[0]) - 1)
    return df.astype({"positions": "int64"})[COLUMNS if sample is None else COLUMNS + SAMPLE_COLUMNS]


def _t975(dof: int) -> float:
    """Student's t 97.5 % quantile (Cornish–Fisher expansion around the normal's 1.959964;
    within 0.11 % of the tables from 5 degrees of freedom, 0.7 % at 3)."""
    if dof < 1:
        return float("nan")
    z, v = 1.959963984540054, float(dof)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))
