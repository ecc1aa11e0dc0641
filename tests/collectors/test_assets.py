"""The assets for existing stacks (`assets/`): Prometheus rules pass `promtool check rules` and
their unit tests (`promtool test rules`), and every `recurrent_depth_*` series the rules and the
Grafana dashboard name is one that `LoopMetrics` really serves (scraped here from its /metrics).
The rules and every dashboard query run against a real Prometheus in test_interop_prometheus.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from mythos_probe.collectors.prometheus import LoopMetrics
from tests.collectors.factory import make_trace
from tests.conftest import need

ASSETS = Path(__file__).resolve().parents[2] / "assets"
RULES = ASSETS / "prometheus" / "recurrent_depth.rules.yml"
RULES_TEST = ASSETS / "prometheus" / "recurrent_depth.rules.test.yml"
DASHBOARD = ASSETS / "grafana" / "recurrent_depth.json"


def promtool() -> str:
    binary = shutil.which("promtool")
    need(binary is not None, "promtool (Debian's prometheus package) is not installed: run scripts/system-deps.sh")
    return binary


def test_promtool_checks_the_rules():
    run = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS: 13 rules found" in run.stdout


def test_promtool_unit_tests_of_the_rules_pass():
    run = subprocess.run([promtool(), "test", "rules", RULES_TEST.name], capture_output=True, text=True,
                         timeout=120, cwd=RULES_TEST.parent)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_every_alert_has_a_unit_test_that_fires_it():
    import yaml

    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    fired = {t["alertname"] for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
             for t in case["alert_rule_test"] if t["exp_alerts"]}
    # the receiver alert is tested only as silent: its firing is the same increase() > 0 as the drops
    assert alerts - fired == {"RecurrentDepthReceiverRejecting"}


@pytest.fixture(scope="module")
def served_names() -> set[str]:
    """Metric names LoopMetrics serves, with a forward recorded and every counter source watched."""
    with LoopMetrics(0) as metrics:
        metrics.record([make_trace(1)])
        metrics.watch(SimpleNamespace(dropped_spans=1, failed_spans=2, rejected_requests=3))
        with urllib.request.urlopen(metrics.url, timeout=30) as reply:
            text = reply.read().decode()
    return set(re.findall(r"^(recurrent_depth_\w+?)(?:\{| )", text, re.M))


def referenced(exprs: list[str]) -> set[str]:
    """Series names in PromQL expressions (not the `level:metric:operation` names rules record)."""
    return {m for e in exprs for m in re.findall(r"(?<![:\w])(recurrent_depth_\w+)(?![\w:])", e)}


def rule_exprs() -> list[str]:
    import yaml

    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def test_rules_and_dashboard_name_only_served_series(served_names):
    names = referenced(rule_exprs()) | referenced(dashboard_exprs())
    assert len(names) >= 10
    assert names - served_names == set(), f"not served by LoopMetrics: {names - served_names}"
    # and every counter LoopMetrics serves has a panel
    counters = {n for n in served_names if n.endswith("_total")}
    assert counters - referenced(dashboard_exprs()) == set()


def test_the_grafana_dashboard_is_importable_and_explains_each_panel():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert all(p["description"] and p["targets"] and p["datasource"]["uid"] == "${datasource}" for p in panels)
    assert all(t["expr"] and t["refId"] for p in panels for t in p["targets"])
    # panels do not overlap on the 24-column grid
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, p["title"]
        cells |= mine
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "model", "endpoint"]
