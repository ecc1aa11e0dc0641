"""`call_iterations`: which loop iteration each call of a module is, on our model (the lens's coda
calls inside the loop included) and on a preset with nested loops (transformers' HRM); and with
nnsight's `tracer.iter` it patches iteration 3 of the recurrent block, seen in our trace at
iteration 3 and nowhere before, also where the unwrapped loop would compact."""

import numpy as np
import pytest
import torch

import mythos_probe
from mythos_probe.call_iterations import call_iterations
from mythos_probe.model import LoopedConfig, LoopedTransformer

nnsight = pytest.importorskip("nnsight")  # the dev extra
transformers = pytest.importorskip("transformers")


def _model():
    torch.manual_seed(0)
    return LoopedTransformer(LoopedConfig.variant("tiny-gqa").replace(max_loop_iters=6)).eval()


ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))


def test_calls_of_our_model_map_to_iterations():
    model = _model()
    assert call_iterations(model, "recurrent.block", ids, n_loops=5, exit="fixed") == [("loop", t) for t in range(5)]
    # under kl the coda lens runs the coda inside the loop, once per iteration, before the forward's own call
    coda = call_iterations(model, "coda.0", ids, n_loops=3, exit="kl", exit_threshold=0.0)
    assert coda == [("loop", 0), ("loop", 1), ("loop", 2), (None, None)]
    assert call_iterations(model, "prelude.0", ids, n_loops=2) == [(None, None)]
    with pytest.raises(ValueError, match="no submodule"):
        call_iterations(model, "recurrent.blocks", ids)


def test_nested_preset_loops_name_the_innermost():
    cfg = transformers.HrmTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, head_dim=16, H_cycles=2, L_cycles=3,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    hrm = transformers.HrmTextForCausalLM(cfg).eval()
    x = torch.randint(0, 64, (1, 5))
    assert call_iterations(hrm, "model.L_module", x) == [("L", t) for t in range(6)]
    assert call_iterations(hrm, "model.H_module", x) == [("H", 0), ("H", 1)]
    # a layer inside the L module: the L loop is the innermost in progress
    assert call_iterations(hrm, "model.L_module.layers.0", x) == [("L", t) for t in range(6)]


def test_nnsight_patch_of_iteration_3_shows_in_our_trace():
    model = _model()
    model.recurrent.compact_below = 2.0  # unwrapped, this loop would compact from iteration 1 on
    kw = dict(n_loops=6, exit="latent", exit_threshold=0.0)
    calls = call_iterations(model, "recurrent.block", ids, **kw)
    n = calls.index(("loop", 3))
    envoy = nnsight.NNsight(model)
    with torch.no_grad(), mythos_probe.attach(model, probes=["convergence", "spectral"]) as rec:
        model(ids, **kw)
        with envoy.trace(ids, **kw) as tracer:
            for _ in tracer.iter[n]:
                envoy.recurrent.block.output[:] = 0
    clean, patched = rec.traces
    assert patched.iterations == clean.iterations == 6
    rel_clean, rel_patched = clean.iteration_metrics["rel_residual"], patched.iteration_metrics["rel_residual"]
    np.testing.assert_allclose(rel_patched[:3], rel_clean[:3], rtol=1e-6)
    assert abs(rel_patched[3] - rel_clean[3]) > 0.1
    # the zeroed block output (and so a zero LoRA delta) at iteration 3 only
    norm_block = patched.iteration_metrics["norm_block"]
    assert norm_block[3] == 0 and np.all(norm_block[[0, 1, 2, 4, 5]] > 0)


def test_nnsight_alone_sees_every_iteration_of_a_compacting_loop():
    """Without probes attached too: wrapped by nnsight, the loop runs masked (as hooked), so the
    block is called once per iteration, as `call_iterations` counted."""
    model = _model()
    model.recurrent.compact_below = 2.0  # unwrapped, every iteration after the first would compact
    kw = dict(n_loops=6, exit="latent", exit_threshold=0.0)
    envoy = nnsight.NNsight(model)
    with torch.no_grad(), pytest.warns(UserWarning, match="never reached"):
        with envoy.trace(ids, **kw) as tracer:
            outs = nnsight.save(list())
            for _ in tracer.iter[:]:
                outs.append(envoy.recurrent.block.output.save())
    assert len(outs) == len(call_iterations(model, "recurrent.block", ids, **kw)) == 6
    assert all(o.shape == (2, 6, 64) for o in outs)
