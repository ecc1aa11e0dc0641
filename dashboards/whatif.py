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

This module is not: the replay over `LoopTrace`s (`mythos_probe.whatif`) nor the figure (the
page draws `mythos_probe.whatif.pareto_figure` of this table).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import pandas as pd

from mythos_probe.dashboards.queries import Selection, select
from mythos_probe.whatif import BASELINES, INPUTS, COLUMNS, CRITERIA, DEFAULT_THRESHOLDS, FIRES, LENS_CRITERIA

# The score column of each criterion over the `steps` rows below: its INPUTS metric, or the two
# derived there (entropy's change, the argmax's run); which way it fires comes from `FIRES`.
# NaN scores never fire (DuckDB orders NaN above every number, so they become NULL first).
_SCORES = {c: {"entropy": "entropy_change", "argmax_stable": "run"}.get(c, INPUTS[c]) for c in CRITERIA}

_ROWS = f"""
, baseline AS (SELECT count(*) > 0 AS has_full FROM positions p JOIN sel f USING (forward_id)
  WHERE f.exit_policy = 'fixed' AND isfinite(p.lens_argmax)),
lens AS (SELECT p.forward_id, p.batch_index, p.position, p.iteration, f.iterations AS n,
    p.lens_top1_agree AS agree, {", ".join(f'p."{col}"' for col in sorted(set(INPUTS.values())))},
    abs(CAST(p.lens_entropy AS DOUBLE) - lag(CAST(p.lens_entropy AS DOUBLE)) OVER w) AS entropy_change,
    p.iteration = 0 OR p.lens_argmax <> lag(p.lens_argmax) OVER w AS changed
  FROM positions p JOIN sel f USING (forward_id)
  WHERE isfinite(p.lens_argmax) AND (f.exit_policy = 'fixed' OR NOT (SELECT has_full FROM baseline))
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
total AS (SELECT sum(n) AS n FROM lens WHERE iteration = 0),
share AS (SELECT CASE WHEN count(*) = count(f.loop_flops) AND count(*) = count(f.flops)
                 THEN sum(f.loop_flops) / sum(f.flops) ELSE 'nan' END AS s,
    CASE WHEN count(*) = count(f.lens_flops) AND count(*) = count(f.flops)
         THEN sum(f.iterations * f.lens_flops) / sum(f.flops) ELSE 'nan' END AS lens
  FROM sel f WHERE f.forward_id IN (SELECT forward_id FROM lens)),
replayed AS (SELECT th.criterion, th.k, th.threshold, avg(e.iteration + 1) AS mean_iterations,
  1 - sum(e.iteration + 1) / any_value(total.n) AS iterations_saved, avg(e.agree) AS agreement, count(*) AS positions,
  any_value(share.s) AS loop_share,
  CASE WHEN th.criterion IN ({", ".join(f"'{c}'" for c in LENS_CRITERIA)}) THEN any_value(share.lens) ELSE 0 END AS lens_share,
  CASE WHEN any_value(baseline.has_full) THEN '{BASELINES[0]}' ELSE '{BASELINES[1]}' END AS baseline
FROM th JOIN ok USING (criterion) JOIN exits e ON e.criterion = th.criterion
  AND e.lo < th.threshold AND th.threshold <= e.hi CROSS JOIN total CROSS JOIN share CROSS JOIN baseline
WHERE ok.available
GROUP BY th.criterion, th.k, th.threshold)
SELECT criterion, threshold, mean_iterations, iterations_saved,
  iterations_saved * loop_share - lens_share * (1 - iterations_saved) AS flops_saved,
  lens_share * (1 - iterations_saved) AS lens_cost, agreement, positions, baseline
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
            f"SELECT '{criterion}' AS criterion, iteration, agree, CAST({lo} AS DOUBLE) AS lo, CAST({hi} AS DOUBLE) AS hi"
            f" FROM steps WHERE lo < hi"
        )
    return _ROWS.format(befores=", ".join(befores), exits=" UNION ALL ".join(exits))


_SQL = _sql()


def evaluate(store, sel: Selection, thresholds: Mapping[str, Iterable[float]] | None = None) -> pd.DataFrame:
    """`mythos_probe.whatif.evaluate` over the selected full-depth forwards' stored positions: one
    row per (criterion, threshold) with mean_iterations, iterations_saved, flops_saved, lens_cost,
    agreement, positions and baseline; empty when no selected full-depth forward has per-position
    lens metrics."""
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
    df = select(store, sel, _SQL, [names, ks, values, list(CRITERIA)])
    return df.astype({"positions": "int64"})[COLUMNS]
