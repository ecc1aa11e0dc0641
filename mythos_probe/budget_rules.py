"""Prometheus recording and alerting rules generated from the cost limits of a profiles file.

For each window length among the endpoint limits, one recording rule:

    endpoint:recurrent_depth_flops:increase<W>s = sum by (endpoint) (increase(recurrent_depth_flops_total{kind="served"}[<W>s]))

over the counter `collectors.prometheus.LoopMetrics` exports; and per limit two alerts on it:
`LoopBudgetNearLimit` (at 80 % of the limit) and `LoopBudgetExceeded` (at the limit), labelled
with the endpoint and the limit, so that what the in-process governor enforces is also what
alerts. A limit with value "*" alerts for every endpoint.

Only endpoint limits become rules: the exported counters carry an `endpoint` label but no
`user` (an unbounded label would grow Prometheus's series without bound), so user limits are
enforced by the governor alone and `rules` lists them as skipped.

The file is JSON, which is YAML: `promtool check rules` and Prometheus read it as is.

This module is not: the governor (`governor`) nor the exporter (`collectors.prometheus`).
"""

from __future__ import annotations

import json
from pathlib import Path

from mythos_probe.loop_profiles import LoopProfiles

COUNTER = "recurrent_depth_flops_total"
GROUP = "mythos-probe-loop-budgets"
NEAR = 0.8


def record_name(window_s: float) -> str:
    return f"endpoint:recurrent_depth_flops:increase{_seconds(window_s)}s"


def _seconds(window_s: float) -> int:
    if window_s != int(window_s) or window_s < 1:
        raise ValueError(f"a Prometheus rule window must be whole seconds, got {window_s!r}")
    return int(window_s)


def rules(profiles: LoopProfiles) -> tuple[dict, list[str]]:
    """(the rule file as a dict, the limits left out with why)."""
    endpoint = [lim for lim in profiles.limits if lim.key == "endpoint"]
    skipped = [f"{lim.key}={lim.value}: the exported counters have no {lim.key!r} label; the governor enforces it"
               for lim in profiles.limits if lim.key != "endpoint"]
    out = []
    for w in sorted({_seconds(lim.window_s) for lim in endpoint}):
        out.append({"record": record_name(w),
                    "expr": f'sum by (endpoint) (increase({COUNTER}{{kind="served"}}[{w}s]))'})
    for lim in endpoint:
        w = _seconds(lim.window_s)
        selector = "" if lim.value == "*" else "{endpoint=" + json.dumps(lim.value) + "}"
        for alert, share, severity in (("LoopBudgetNearLimit", NEAR, "info"), ("LoopBudgetExceeded", 1.0, "warning")):
            action = "requests are refused" if lim.refuse else f"requests run at most {lim.degraded_max_loops} loops"
            out.append({
                "alert": alert,
                "expr": f"{record_name(w)}{selector} >= {share * lim.flops:.17g}",
                "labels": {"severity": severity, "limit_flops": f"{lim.flops:.6g}", "window": f"{w}s"},
                "annotations": {
                    "summary": f"endpoint {{{{ $labels.endpoint }}}} spent {{{{ $value | humanize }}}} FLOPs in {w}s "
                               f"({share:.0%} of its limit {lim.flops:.3g})",
                    "description": f"over the limit the governor lowers max loops: {action}",
                },
            })
    return {"groups": [{"name": GROUP, "rules": out}]}, skipped


def write_rules(profiles: LoopProfiles, path: str | Path) -> list[str]:
    """Write the rule file; returns the limits left out (see `rules`)."""
    content, skipped = rules(profiles)
    Path(path).write_text(json.dumps(content, indent=2) + "\n")
    return skipped
