"""The cost governor with a fake clock: exact counts of degraded and refused requests per key
under declared limits, the lowered budget and its reason, the sliding window; and the Prometheus
rules generated from the same limits, tested with `promtool test rules`."""

import dataclasses
import json
import shutil
import subprocess
import textwrap

import pytest

from mythos_probe.governor import BudgetExceeded, Governor
from mythos_probe.loop_profiles import CostLimit, LoopProfiles, Profile
from mythos_probe.model.budgets import LoopBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def file_with(*limits: CostLimit) -> LoopProfiles:
    profiles = {
        "/easy": Profile("/easy", "latent", 3, exit_threshold=0.05, full_depth=8),
        "/hard": Profile("/hard", "fixed", 8, full_depth=8),
    }
    return LoopProfiles("endpoint", 0.99, profiles, 8, limits)


def test_exact_degraded_counts_per_key_over_a_sliding_window():
    """Limit /hard 1000 FLOPs per 10 s (degrade to 2 loops), every user 1500 per 10 s (refuse).
    Requests of 300 FLOPs, one a second, alternating /hard and /easy, users ana and bo. Counts
    worked out by hand below."""
    clock = Clock()
    gov = Governor(file_with(CostLimit("endpoint", "/hard", 1000, 10, degraded_max_loops=2),
                             CostLimit("user", "*", 1500, 10, refuse=True)), clock=clock)
    log = []
    for i in range(12):
        attrs = {"endpoint": "/hard" if i % 2 == 0 else "/easy", "user": "ana" if i % 4 < 2 else "bo"}
        try:
            budget = gov.admit(attrs)
        except BudgetExceeded:
            log.append((i, "refused"))
        else:
            log.append((i, budget.max_loops))
            gov.charge(attrs, 300)
        clock.now += 1
    # /hard requests at t=0,2,4,6,8,10: spent before each 0,300,600,900,1200,1500 → the 5th and 6th degrade
    # (the window is 10 s: at t=10 the t=0 charge has left, 1200 remain). Users: ana at t=0,1,4,5,8,9,
    # bo at t=2,3,6,7,10,11; each has 1500 after five requests, so the 6th of each is refused
    # (ana at t=9: 1500 spent since t=0; bo at t=11: 1500 since t=2).
    assert log == [(0, 8), (1, 3), (2, 8), (3, 3), (4, 8), (5, 3), (6, 8), (7, 3), (8, 2), (9, "refused"),
                   (10, 2), (11, "refused")]
    assert gov.counts() == {
        "endpoint=/hard": {"admitted": 6, "degraded": 2, "refused": 0},
        "user=ana": {"admitted": 5, "degraded": 0, "refused": 1},
        "user=bo": {"admitted": 5, "degraded": 0, "refused": 1},
    }
    assert gov.spent("endpoint", "/hard") == 1200  # at t=12 the charges of t=4, 6, 8 and 10 are within 10 s
    clock.now += 30
    assert gov.spent("endpoint", "/hard") == 0 and gov.admit({"endpoint": "/hard", "user": "ana"}).max_loops == 8


def test_a_degraded_budget_keeps_the_profile_and_says_why():
    clock = Clock()
    gov = Governor(file_with(CostLimit("endpoint", "/easy", 100, 60, degraded_max_loops=1)), clock=clock)
    first = gov.admit({"endpoint": "/easy"})
    assert first == LoopBudget(3, 1, 0.05, "profile endpoint=/easy")
    gov.charge({"endpoint": "/easy"}, 100)
    lowered = gov.admit({"endpoint": "/easy"})
    assert (lowered.max_loops, lowered.min_loops, lowered.exit_threshold) == (1, 1, 0.05)
    assert lowered.reason.startswith("over budget: endpoint=/easy spent 100 FLOPs in the last 60 s")
    assert gov.admit({"endpoint": "/other"}).max_loops == 8  # a group without a profile: full depth


def test_a_served_trace_charges_its_flops_and_a_shadow_does_not():
    from tests.collectors.factory import make_trace

    clock = Clock()
    gov = Governor(file_with(CostLimit("endpoint", "/hard", 1e20, 60)), clock=clock)
    served = dataclasses.replace(make_trace(), attributes={"endpoint": "/hard"})
    gov(served)
    gov(dataclasses.replace(served, kind="shadow"))
    assert gov.spent("endpoint", "/hard") == served.forward_metrics["flops"]


# -- Prometheus rules ---------------------------------------------------------------------------

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool missing: scripts/system-deps.sh installs Debian's prometheus")


def test_rules_name_endpoint_limits_and_skip_user_ones():
    from mythos_probe.budget_rules import rules

    content, skipped = rules(file_with(CostLimit("endpoint", "/hard", 600, 300), CostLimit("user", "*", 5, 60)))
    names = [r.get("record") or r["alert"] for r in content["groups"][0]["rules"]]
    assert names == ["endpoint:recurrent_depth_flops:increase300s", "LoopBudgetNearLimit", "LoopBudgetExceeded"]
    assert skipped and "user=*" in skipped[0]


@needs_promtool
def test_generated_rules_pass_promtool(tmp_path):
    """/hard grows 100 FLOPs a minute, /easy 10 and /mid 50: over 5 minutes /hard spends 500 (over
    its 400 limit), /mid 250 (past 80 % of its 300), /easy 50."""
    from mythos_probe.budget_rules import write_rules

    profiles = file_with(CostLimit("endpoint", "/hard", 400, 300, degraded_max_loops=2),
                         CostLimit("endpoint", "/mid", 300, 300), CostLimit("endpoint", "/easy", 400, 300))
    write_rules(profiles, tmp_path / "rules.yml")
    check = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    series = lambda ep, step: {  # noqa: E731
        "series": f'recurrent_depth_flops_total{{endpoint="{ep}",kind="served",model="m",exit_policy="act",'
                  f'loop_name="loop"}}', "values": f"0+{step}x30"}
    test = {
        "rule_files": ["rules.yml"], "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [series("/hard", 100), series("/mid", 50), series("/easy", 10),
                             {"series": 'recurrent_depth_flops_total{endpoint="/hard",kind="shadow"}',
                              "values": "0+1000x30"}],  # shadows never count
            "promql_exp_test": [],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "LoopBudgetExceeded", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "endpoint": "/hard", "limit_flops": "400", "window": "300s"},
                    "exp_annotations": {
                        "summary": "endpoint /hard spent 500 FLOPs in 300s (100% of its limit 400)",
                        "description": "over the limit the governor lowers max loops: requests run at most 2 loops"},
                }]},
                {"eval_time": "10m", "alertname": "LoopBudgetNearLimit", "exp_alerts": [
                    {"exp_labels": {"severity": "info", "endpoint": ep, "limit_flops": lim, "window": "300s"},
                     "exp_annotations": {
                         "summary": f"endpoint {ep} spent {spent} FLOPs in 300s (80% of its limit {lim})",
                         "description": f"over the limit the governor lowers max loops: requests run at most {d} loops"}}
                    for ep, lim, spent, d in (("/hard", "400", "500", 2), ("/mid", "300", "250", 1))]},
            ],
        }],
    }
    test["tests"][0].pop("promql_exp_test")
    test["tests"][0]["promql_expr_test"] = [{
        "expr": "endpoint:recurrent_depth_flops:increase300s", "eval_time": "10m",
        "exp_samples": [{"labels": 'endpoint:recurrent_depth_flops:increase300s{endpoint="%s"}' % ep, "value": v}
                        for ep, v in (("/easy", 50), ("/hard", 500), ("/mid", 250))],
    }]
    (tmp_path / "test.yml").write_text(json.dumps(test, indent=1))
    result = subprocess.run(["promtool", "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, textwrap.shorten(result.stdout + result.stderr, 3000)
