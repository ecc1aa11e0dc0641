"""Loop profiles from evidence: on hand-built shadow forwards whose right answer is known, the
choice per group (truncation depth, bound, FLOPs saved), full depth for too little evidence and
for a bound below the target, the file round trip and `budget_for`, the CLI on a real store; and
on the shipped model, profiles chosen on one workload keep their agreement on held-out requests
run for real with the budgets."""

import json
import math

import numpy as np
import pytest

import mythos_probe
from mythos_probe.loop_profiles import LoopProfiles, wilson_lower
from mythos_probe.records import LoopTrace

ITER = 8


def shadow(i: int, endpoint: str, settles, batch: int = 16, seq: int = 2) -> LoopTrace:
    """A full-depth forward whose positions' lens prediction equals the final one from iteration
    `settles(b, p)` on (and differs before)."""
    agree = np.zeros((batch, seq, ITER))
    for b in range(batch):
        for p in range(seq):
            agree[b, p, settles(b, p):] = 1
    return LoopTrace(
        trace_id=f"{i + 1:032x}", span_id=f"{i + 1:016x}", run_id="r", model_id="m", step=i, start_ns=0, end_ns=1,
        batch=batch, seq_len=seq, n_loops=ITER, iterations=ITER, exit_policy="fixed", detail="positions",
        position_metrics={"lens_top1_agree": agree, "lens_argmax": np.where(agree == 1, 3.0, 5.0)},
        forward_metrics={"flops": 1000.0, "loop_flops": 800.0, "lens_flops": 10.0},
        attributes={"endpoint": endpoint}, kind="shadow",
    )


def test_each_group_gets_the_cheapest_depth_its_bound_allows():
    traces = [shadow(i, "/easy", lambda b, p: 2) for i in range(12)]  # every position settled after 3 loops
    traces += [shadow(100 + i, "/hard", lambda b, p: 6 if b == 0 else 3) for i in range(12)]
    traces += [shadow(200 + i, "/thin", lambda b, p: 0) for i in range(3)]
    # one position in 50 settles only at the last iteration: 98 % agreement at any shallower depth
    traces += [shadow(300 + i, "/late", lambda b, p, i=i: 7 if (i * 32 + b * 2 + p) % 50 == 0 else 1)
               for i in range(25)]
    result = mythos_probe.profiles(traces, target=0.99, by="endpoint", min_requests=8)
    easy, hard, thin, late = (result.profiles[g] for g in ("/easy", "/hard", "/thin", "/late"))
    # /easy: 384 positions all agreeing from 3 loops on; Wilson's bound 384 / (384 + z²) ≥ 0.99
    assert (easy.policy, easy.max_loops, easy.exit_threshold) == ("fixed", 3, None)
    assert easy.agreement == 1.0 and easy.agreement_lower == pytest.approx(384 / (384 + 1.6448536**2), abs=1e-6)
    assert easy.iterations_saved == pytest.approx(5 / 8) and easy.flops_saved == pytest.approx(5 / 8 * 0.8)
    assert easy.forwards == 12 and easy.positions == 384 and easy.mean_iterations == 3
    assert (hard.policy, hard.max_loops) == ("fixed", 7)  # row 0 needs 7 loops
    assert thin.keeps_full_depth and "too little evidence: 3" in thin.note
    assert late.keeps_full_depth and "saves FLOPs" in late.note  # only full depth keeps 99 %
    budget = result.budget_for({"endpoint": "/easy", "user": "ana"})
    assert (budget.max_loops, budget.exit_threshold) == (3, None) and budget.reason == "profile endpoint=/easy"
    assert result.budget_for({"endpoint": "/nowhere"}).max_loops == ITER


def test_the_bound_is_the_lower_of_wilson_and_a_request_bootstrap():
    # 12 requests of 32 positions; in two requests 8 positions disagree at depth 2: 16 / 384 disagree
    traces = [shadow(i, "/x", lambda b, p, i=i: 5 if i < 2 and b < 4 else 1) for i in range(12)]
    result = mythos_probe.profiles(traces, target=0.9, by="endpoint", min_requests=8)
    p = result.profiles["/x"]
    assert p.max_loops == 2 and p.agreement == pytest.approx(1 - 16 / 384)
    wilson = wilson_lower(p.agreement, 384)
    assert p.agreement_lower < wilson  # clustered in two requests: the bootstrap is the lower one
    # by hand: a resample without either bad request agrees 100 %; the 5th percentile holds several
    assert 0.9 <= p.agreement_lower < 1 - 16 / 384


def test_wilson_lower_bound_by_hand():
    # p = 0.9, n = 100, z = 1.6449: (0.9 + z²/200 − z·sqrt(0.0009 + z²/40000)) / (1 + z²/100)
    z = 1.6448536269514722
    expected = (0.9 + z * z / 200 - z * math.sqrt(0.0009 + z * z / 40000)) / (1 + z * z / 100)
    assert wilson_lower(0.9, 100) == pytest.approx(expected, rel=1e-12)
    assert wilson_lower(1.0, 0) == 0.0


def test_the_file_round_trips_and_refuses_a_foreign_one(tmp_path):
    from mythos_probe.loop_profiles import CostLimit

    traces = [shadow(i, "/easy", lambda b, p: 2) for i in range(12)]
    result = mythos_probe.profiles(traces, min_requests=8, limits=[CostLimit("user", "*", 1e9, 60)])
    path = result.save(tmp_path / "p.json")
    loaded = LoopProfiles.load(path)
    assert loaded == result
    assert json.loads(path.read_text())["profiles"]["/easy"]["max_loops"] == 3
    (tmp_path / "bad.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="regenerate it"):
        LoopProfiles.load(tmp_path / "bad.json")


def test_cli_writes_profiles_and_rules_from_a_store(tmp_path, capsys):
    from mythos_probe.cli import main
    from mythos_probe.collectors.store import Store

    with Store(tmp_path / "s.duckdb") as store:
        store.write_traces([shadow(i, "/easy", lambda b, p: 2) for i in range(10)]
                           + [shadow(50 + i, "/hard", lambda b, p: 0) for i in range(2)])
    out, rules = tmp_path / "p.json", tmp_path / "rules.yml"
    assert main(["profiles", str(tmp_path / "s.duckdb"), "--out", str(out), "--rules", str(rules),
                 "--limit", "endpoint=/hard:2e12/60s:degrade=2", "--limit", "user=*:1e12/3600s:refuse"]) == 0
    printed = capsys.readouterr().out
    assert "/easy: exit='fixed', max_loops 3" in printed and "/hard: full depth" in printed
    assert "too little evidence: 2" in printed and "no rule for user=*" in printed
    loaded = LoopProfiles.load(out)
    assert loaded.budget_for({"endpoint": "/easy"}).max_loops == 3
    assert [lim.key for lim in loaded.limits] == ["endpoint", "user"] and loaded.limits[1].refuse
    assert "LoopBudgetExceeded" in rules.read_text()
    with pytest.raises(SystemExit):  # argparse: a malformed limit names the expected form
        main(["profiles", str(tmp_path / "s.duckdb"), "--limit", "endpoint/hard"])
    assert "KEY=VALUE:FLOPS/WINDOWs" in capsys.readouterr().err


# -- the shipped model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    from mythos_probe.demo.checkpoint import load_trained_model

    model, _ = load_trained_model()
    return model


ENDPOINTS = {"/easy": (1, 2, 3), "/medium": (4, 5, 6), "/hard": (7, 8)}


def record_shadows(model, seed: int, per_endpoint: int, batch: int):
    import torch

    from mythos_probe.demo.tasks import ChainTask

    task, traces = ChainTask(seed=seed), []
    with torch.no_grad():
        for endpoint, lengths in ENDPOINTS.items():
            for i in range(per_endpoint):
                b = task.batch(batch, lengths[i % len(lengths)])
                with mythos_probe.attach(model, probes=["cost", "lens"], detail="positions",
                                         attributes={"endpoint": endpoint}) as rec:
                    model(b.input_ids, n_loops=model.cfg.max_loop_iters, exit="fixed")
                traces += rec.traces
    return traces


def test_profiles_chosen_on_one_workload_hold_on_held_out_requests(shipped):
    """On the shipped model: profiles per endpoint at 95 % from 4 shadows of 32 chains each (at
    99 % a 95 % bound needs ~270 positions), then 6 held-out requests per endpoint run for real
    with each row's budget beside full depth; the answer (last position, the position the replay
    reads) agrees at least target − (point − bound)."""
    import torch

    from mythos_probe.demo.tasks import ChainTask

    model = shipped
    result = mythos_probe.profiles(record_shadows(model, 7000, 4, 32), target=0.95, min_requests=4)
    assert not all(p.keeps_full_depth for p in result.profiles.values())
    held_out = ChainTask(seed=8000)
    for endpoint, lengths in ENDPOINTS.items():
        profile = result.profiles[endpoint]
        agree = total = 0
        with torch.no_grad():
            for i in range(6):
                ids = held_out.batch(16, lengths[i % len(lengths)]).input_ids
                budget = result.budget_for({"endpoint": endpoint})
                out = model(ids, exit=profile.policy, budgets=[budget] * ids.shape[0])
                full = model(ids, n_loops=model.cfg.max_loop_iters, exit="fixed")
                agree += int((out[:, -1].argmax(-1) == full[:, -1].argmax(-1)).sum())
                total += ids.shape[0]
        margin = profile.agreement - profile.agreement_lower
        assert agree / total >= result.target - margin, (endpoint, profile.describe(), agree / total)


def test_too_little_evidence_on_the_shipped_model_keeps_full_depth(shipped):
    result = mythos_probe.profiles(record_shadows(shipped, 7100, 2, 8), target=0.99)
    for p in result.profiles.values():
        assert p.keeps_full_depth and p.max_loops == shipped.cfg.max_loop_iters and "too little evidence" in p.note
