"""The cross-rank join: what the ranks of one job did at one step, joined in SQL after the fact.

The probes never communicate inside the forward, so nothing rank-crossing is measured live. Each
rank's traces carry (run_id, step, rank); ranks of one job share the run id
(`mythos_probe.probes.distributed`), and a training step is the optimizer's step on every rank. So
"expert loads of one step summed over the data-parallel ranks" and "the slowest rank's
iterations" are a GROUP BY on (run_id, loop_name, step) over the stored forwards.

`CROSS_RANK` is the query body over a relation `sel` holding forwards rows (the dashboard's filter
CTE, or every forward): one row per (run_id, loop_name, step, expert), the step's columns
repeated on each of its experts (expert and load NULL for a model without routed experts):
- ranks: distinct ranks that recorded the step; world_size: the largest world size they report
  (ranks < world_size means some rank's traces are missing or were sampled out);
- forwards: forwards recorded at the step over all ranks (micro-batches count each);
- iterations_max / iterations_min and rank_most_iterations: the slowest rank in loop iterations;
- duration_ms_max and slowest_rank: the slowest rank in wall-clock time (ties: the lowest rank);
- expert, load: tokens routed to the expert at the step, summed over ranks, forwards and iterations.

This module is not: the store (`store`, `parquet_store`) or the views (`mythos_probe.frames`,
`mythos_probe.dashboards.queries`).
"""

from __future__ import annotations

CROSS_RANK = """
, steps AS (
    SELECT run_id, loop_name, step, count(DISTINCT rank) AS ranks, max(world_size) AS world_size,
           count(*) AS forwards, max(iterations) AS iterations_max, min(iterations) AS iterations_min,
           arg_max(rank, (iterations, -rank)) AS rank_most_iterations,
           max(duration_ms) AS duration_ms_max, arg_max(rank, (duration_ms, -rank)) AS slowest_rank
    FROM sel GROUP BY run_id, loop_name, step)
, loads AS (
    SELECT f.run_id, f.loop_name, f.step, e.expert, CAST(sum(e.load) AS BIGINT) AS load
    FROM experts e JOIN sel f ON e.forward_id = f.forward_id GROUP BY ALL)
SELECT s.*, l.expert, l.load FROM steps s LEFT JOIN loads l USING (run_id, loop_name, step)
ORDER BY s.run_id, s.loop_name, s.step, l.expert
"""
