"""transformers' `DoryForCausalLM` / `DoryModel` (tiny random init, no download) under `attach(model)`
with no spec, in both `recurrent_kv_cache_mode`s. A pass is the recurrent layer section; every pass
starts from norm(h_{t−1}) + norm(h_{−1}) (h_{−1}: the input section's output), declared as an
`Injection("function")`. Metrics are compared with the passes' true end states (the last recurrent
layer's outputs in a plain forward), the start states with that formula by hand, and the Jacobian
with the recurrent layers re-run by hand from their own arguments."""

import numpy as np
import pytest
import torch

import mythos_probe
from mythos_probe.metrics.spectral import jacobian_sigma_max
from tests.probes.looped_models import Capture, assert_matches, no_hooks, reference

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DoryForCausalLM"):  # transformers >= 5.25 is pinned; say so if not
    pytest.fail("transformers has no DoryForCausalLM: the pinned transformers (5.25) ships it")

IN, REC, OUT, LOOPS = 1, 2, 1, 3
ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def dory(mode: str, causal_lm: bool = True):
    cfg = transformers.DoryConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, n_input_layers=IN, n_recurrent_layers=REC, n_output_layers=OUT,
        num_hidden_layers=IN + REC + OUT, n_recurrent_loops=LOOPS, sliding_window=4, max_position_embeddings=64,
        layer_types=["full_attention", "sliding_attention", "full_attention", "full_attention"],
        recurrent_kv_cache_mode=mode)
    torch.manual_seed(0)
    cls = transformers.DoryForCausalLM if causal_lm else transformers.DoryModel
    return cls(cfg).eval()


def layer_calls(model, m):
    calls = {i: [] for i in range(IN, IN + REC)}
    handles = [m.layers[i].register_forward_pre_hook(lambda mod, a, k, i=i: calls[i].append((a, dict(k))),
                                                     with_kwargs=True) for i in calls]
    with torch.no_grad(), Capture(init=m.layers[IN - 1], first=m.layers[IN], last=m.layers[IN + REC - 1]) as cap:
        out = model(ids)
    for h in handles:
        h.remove()
    return cap, calls, out


@pytest.mark.parametrize("mode", ["per_loop", "last_loop"])
def test_passes_start_states_and_jacobian_match_the_model(mode):
    model = dory(mode)
    m = model.model
    cap, calls, out = layer_calls(model, m)
    h0 = cap.outputs["init"][0]
    ends = cap.outputs["last"]
    assert len(ends) == LOOPS
    # the recurrence the preset declares, checked by hand: start_t = norm(h_{t−1}) + norm(h_{−1})
    for t, (args,) in enumerate(cap.inputs["first"]):
        previous = h0 if t == 0 else ends[t - 1]
        torch.testing.assert_close(args, m.norm(previous) + m.norm(h0), rtol=0, atol=1e-6)
    # the Jacobian re-runs the pass 16 times per iteration: once, in one cache mode, is enough (the
    # modes differ in what the cache keeps, and the Jacobian runs without a cache)
    probes = ["convergence", "spectral", "lens"] + (["jacobian"] if mode == "per_loop" else [])
    with torch.no_grad(), mythos_probe.attach(model, probes=probes, lens_positions="all") as rec:
        probed = model(ids).logits
    torch.testing.assert_close(probed, out.logits, rtol=0, atol=0)  # outputs untouched
    (trace,) = rec.traces
    assert trace.iterations == LOOPS
    assert_matches(trace, reference(ends, h0))
    np.testing.assert_allclose(trace.iteration_metrics["norm_inject"], h0.norm(dim=-1).mean().item(), rtol=1e-5)
    # the partial lens: the final norm and head on each pass state (the output layers skipped)
    for t, h in enumerate(ends):
        lens = model.lm_head(m.norm(h)).float().log_softmax(-1)
        assert trace.iteration_metrics["lens_entropy"][t] == pytest.approx(
            -(lens.exp() * lens).sum(-1).mean().item(), abs=1e-5)
    assert no_hooks(model)

    def one(v):
        if isinstance(v, (tuple, list)):
            return type(v)(one(x) for x in v)
        return v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == ids.shape[0] else v

    if mode != "per_loop":
        assert "jacobian_sigma_max" not in trace.iteration_metrics
        return
    sigma = []
    for t in range(LOOPS):
        previous = (h0 if t == 0 else ends[t - 1])[:1]

        def step(h, t=t):
            x = m.norm(h) + m.norm(h0[:1])
            for i in range(IN, IN + REC):
                args, kwargs = calls[i][t]
                x = m.layers[i](x, **{k: None if k == "cache" else one(v) for k, v in kwargs.items()})
            return x

        sigma.append(jacobian_sigma_max(step, previous.contiguous()).item())
    np.testing.assert_allclose(trace.iteration_metrics["jacobian_sigma_max"], sigma, rtol=1e-5)
    assert no_hooks(model)


@pytest.mark.parametrize("mode", ["per_loop", "last_loop"])
def test_generate_records_every_decode_step_with_the_checks_on(mode):
    """Every decode step is checked (check_every=1): the declared chain holds with the KV cache in
    both modes; one trace id per generate call; generate's output is unchanged."""
    model = dory(mode)
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=3, do_sample=False)
        with mythos_probe.attach(model, check_every=1) as rec:
            probed = model.generate(ids, max_new_tokens=3, do_sample=False)
            model.generate(ids, max_new_tokens=2, do_sample=False)
    torch.testing.assert_close(probed, plain, rtol=0, atol=0)
    assert [t.step for t in rec.traces] == [0, 1, 2, 0, 1]
    assert len({t.trace_id for t in rec.traces[:3]}) == 1 and rec.traces[3].trace_id != rec.traces[0].trace_id
    assert all(t.iterations == LOOPS for t in rec.traces)
    assert no_hooks(model)


def test_the_bare_model_has_the_preset_too():
    model = dory("per_loop", causal_lm=False)
    with torch.no_grad(), Capture(init=model.layers[IN - 1], last=model.layers[IN + REC - 1]) as cap:
        model(ids)
    with torch.no_grad(), mythos_probe.attach(model) as rec:
        model(ids)
    assert_matches(rec.traces[0], reference(cap.outputs["last"], cap.outputs["init"][0]))


def test_a_planted_wrong_init_in_the_preset_is_caught():
    import dataclasses

    from mythos_probe.presets import find

    model = dory("per_loop")
    (spec,) = find(model)
    wrong = dataclasses.replace(spec, init="model.embed_tokens")  # the embeddings, not the input section's output
    with pytest.raises(ValueError, match=r"LoopSpec.injection: loop 'loop' iteration 0 starts from an input that is "
                                         r"not Injection.fn.*Either init= is not the pre-loop state"):
        with torch.no_grad(), mythos_probe.attach(model, spec=wrong):
            model(ids)
    short = dataclasses.replace(spec, last=f"model.layers.{IN + REC - 2}")  # the pass one layer short
    with pytest.raises(ValueError, match=r"iteration 1 starts from an input that is not Injection.fn"):
        with torch.no_grad(), mythos_probe.attach(model, spec=short):
            model(ids)
    assert no_hooks(model)
