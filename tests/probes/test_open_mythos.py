"""Probes attached to an unmodified open_mythos.main.OpenMythos measure the same numbers as on our
model with the same weights, and what they re-derive (expert choice, ACT accumulation, early
break) matches what the package actually ran."""

import numpy as np
import pytest
import torch

import mythos_probe
from mythos_probe.model import LoopedConfig, LoopedTransformer

open_mythos = pytest.importorskip("open_mythos.main", reason="open-mythos is installed by scripts/bootstrap.sh")

PROBES = ["convergence", "spectral", "halting", "experts", "lora", "cost", "lens"]


@pytest.fixture(scope="module", params=["tiny-gqa", "tiny-mla"])
def pair(request):
    cfg = LoopedConfig.variant(request.param)
    torch.manual_seed(4)
    om = open_mythos.OpenMythos(cfg.to_mythos_config()).eval()
    with torch.no_grad():
        om.recurrent.act.halt.bias.fill_(-1.0)
        om.recurrent.act.halt.weight.normal_(0, 0.5)
        om.recurrent.injection.log_A.normal_(0, 1)
        om.recurrent.block.ffn.router_bias.normal_(0, 0.05)
    return om, LoopedTransformer.from_open_mythos(om).eval()


ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(5))


def record(model, **kwargs):
    with torch.no_grad(), mythos_probe.attach(model, probes=PROBES, detail="positions", lens_positions="all") as rec:
        model(ids, **kwargs)
    return rec.traces[0]


def test_same_metrics_as_on_our_model_with_the_same_weights(pair):
    om, ours = pair
    theirs, mine = record(om, n_loops=6), record(ours, n_loops=6)
    assert theirs.iterations == mine.iterations
    assert set(theirs.iteration_metrics) == set(mine.iteration_metrics)
    for name, values in mine.iteration_metrics.items():
        np.testing.assert_allclose(theirs.iteration_metrics[name], values, rtol=2e-3, atol=1e-5, err_msg=name)
    for name, values in mine.forward_metrics.items():
        assert theirs.forward_metrics[name] == pytest.approx(values, rel=2e-3, abs=1e-5), name
    assert np.array_equal(theirs.expert_load, mine.expert_load)
    assert np.array_equal(theirs.position_iterations, mine.position_iterations)
    for name, values in mine.position_metrics.items():
        np.testing.assert_allclose(theirs.position_metrics[name], values, rtol=2e-3, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("halt_bias, early", [(-30.0, False), (1.0, True)])
def test_iterations_equal_the_times_the_recurrent_block_ran(pair, halt_bias, early):
    om, _ = pair
    saved = [p.detach().clone() for p in om.recurrent.act.halt.parameters()]
    calls = []
    handle = om.recurrent.block.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            om.recurrent.act.halt.weight.zero_()  # every position halts on the same step
            om.recurrent.act.halt.bias.fill_(halt_bias)
        trace = record(om, n_loops=8)
    finally:
        handle.remove()
        with torch.no_grad():
            for p, value in zip(om.recurrent.act.halt.parameters(), saved):
                p.copy_(value)
    assert trace.iterations == len(calls)
    assert (trace.iterations < 8) == early  # when the package broke out early, the trace says so


def test_expert_loads_sum_to_tokens_times_top_k_and_follow_the_biased_router(pair):
    om, _ = pair
    logits = []
    handle = om.recurrent.block.ffn.router.register_forward_hook(lambda m, a, out: logits.append(out.detach()))
    try:
        trace = record(om, n_loops=4)
    finally:
        handle.remove()
    k = om.cfg.n_experts_per_tok
    assert (trace.expert_load.sum(axis=1) == ids.numel() * k).all()
    bias = om.recurrent.block.ffn.router_bias
    for t, lg in enumerate(logits):
        chosen = (lg + bias).topk(k, dim=-1).indices
        assert np.array_equal(trace.expert_load[t], np.bincount(chosen.reshape(-1).numpy(), minlength=om.cfg.n_experts))


def test_rho_equals_the_largest_entry_of_get_A(pair):
    om, _ = pair
    trace = record(om, n_loops=2)
    assert trace.forward_metrics["rho_A"] == pytest.approx(om.recurrent.injection.get_A().max().item(), rel=1e-6)


def test_decode_steps_of_one_generate_share_a_trace_id(pair):
    om, _ = pair
    torch.manual_seed(0)
    with mythos_probe.attach(om) as rec:
        om.generate(ids[:1, :4], max_new_tokens=3, n_loops=3)
    traces = rec.traces
    assert [t.step for t in traces] == [0, 1, 2]
    assert len({t.trace_id for t in traces}) == 1 and len({t.span_id for t in traces}) == 3
    assert [t.seq_len for t in traces] == [4, 1, 1]
    assert all(t.iterations == 3 for t in traces)  # with a KV cache every loop runs


def test_our_generate_records_under_inference_mode_what_a_no_grad_decode_records(pair):
    """`LoopedTransformer.generate` decodes under torch.inference_mode: the probes still record one
    trace per step with one trace id, and every value equals that of the same decode run by hand
    under no_grad (a probe that edited an inference tensor in place would raise, one that read a
    stale one would differ)."""
    _, ours = pair
    prompt = ids[:1, :4]
    with mythos_probe.attach(ours, probes=PROBES, detail="positions", lens_positions="all") as rec:
        out = ours.generate(prompt, max_new_tokens=3, n_loops=3, temperature=0)
    with torch.no_grad(), mythos_probe.attach(ours, probes=PROBES, detail="positions", lens_positions="all") as ref:
        cache: dict = {}
        ours(prompt, n_loops=3, kv_cache=cache)
        for i in range(2):
            ours(out[:, 4 + i : 5 + i], n_loops=3, kv_cache=cache, start_pos=4 + i)
    got, expected = rec.traces, ref.traces
    assert [t.step for t in got] == [0, 1, 2] and len({t.trace_id for t in got}) == 1
    assert [t.seq_len for t in got] == [t.seq_len for t in expected] == [4, 1, 1]
    for g, e in zip(got, expected):
        assert g.iterations == e.iterations
        assert g.iteration_metrics.keys() == e.iteration_metrics.keys() and g.iteration_metrics
        for name in e.iteration_metrics:
            np.testing.assert_array_equal(g.iteration_metrics[name], e.iteration_metrics[name], err_msg=name)
        assert g.forward_metrics == e.forward_metrics
        for name in e.position_metrics:
            np.testing.assert_array_equal(g.position_metrics[name], e.position_metrics[name], err_msg=name)
        assert np.array_equal(g.expert_load, e.expert_load)
