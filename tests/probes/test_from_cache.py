"""`from_cache`: the trace of a `run_with_cache` forward equals the one `attach` records live, on
every metric (all probes, positions detail), for ACT with positions halting at different
iterations and for a kl exit; and it refuses what it cannot replay."""

import numpy as np
import pytest
import torch

import mythos_probe
from mythos_probe.model import LoopedConfig, LoopedTransformer
from mythos_probe.probes.reductions import PROBES


def _model(variant):
    torch.manual_seed(0)
    m = LoopedTransformer(LoopedConfig.variant(variant).replace(max_loop_iters=5)).eval()
    with torch.no_grad():
        m.recurrent.act.halt.bias.fill_(-1.0)  # ACT: halting probabilities well inside (0, 1)
    return m


def _assert_same(live, replayed):
    assert replayed.iterations == live.iterations and replayed.n_loops == live.n_loops
    assert replayed.exit_policy == live.exit_policy and replayed.detail == live.detail
    np.testing.assert_array_equal(replayed.token_ids, live.token_ids)
    for field in ("iteration_metrics", "position_metrics", "forward_metrics"):
        a, b = getattr(live, field), getattr(replayed, field)
        assert set(a) == set(b), field
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=name)
    np.testing.assert_array_equal(replayed.expert_load, live.expert_load)
    np.testing.assert_array_equal(replayed.position_iterations, live.position_iterations)


# kl: the threshold sits at the median KL of iteration 1 of this seeded model (measured), so
# about half the positions stop there and the rest run on
@pytest.mark.parametrize("variant,exit,kw", [("tiny-gqa", "act", {}), ("tiny-mla", "kl", {"exit_threshold": 7.4e-5})])
def test_from_cache_equals_attach_on_every_metric(variant, exit, kw):
    model = _model(variant)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with mythos_probe.attach(model, probes=PROBES, detail="positions", lens_positions="all") as rec:
            model(ids, n_loops=5, exit=exit, **kw)
        _, cache = model.run_with_cache(ids, n_loops=5, exit=exit, **kw)
    (live,) = rec.traces
    used = live.position_iterations
    if exit == "kl":  # positions stop at different iterations: the halting metrics can differ
        assert used.min() < used.max()
    assert len(live.iteration_metrics) > 20 and "lens_kl_prev" in live.iteration_metrics
    replayed = mythos_probe.from_cache(cache, probes=PROBES, detail="positions", lens_positions="all")
    _assert_same(live, replayed)
    assert replayed.trace_id != live.trace_id


def test_from_cache_refuses_what_it_cannot_replay():
    model = _model("tiny-gqa")
    ids = torch.randint(0, 256, (1, 4))
    _, partial = model.run_with_cache(ids, n_loops=2, names_filter=["recurrent.hook_state_out"])
    with pytest.raises(KeyError, match="names_filter"):
        mythos_probe.from_cache(partial)
    kv = {}
    _, cached = model.run_with_cache(ids, n_loops=2, kv_cache=kv)
    with pytest.raises(ValueError, match="KV cache"):
        mythos_probe.from_cache(cached, probes=["convergence", "lens"])
    trace = mythos_probe.from_cache(cached)  # the default probes replay a KV-cached forward
    assert trace.iterations == 2
    with pytest.raises(TypeError, match="LoopCache"):
        mythos_probe.from_cache({})
