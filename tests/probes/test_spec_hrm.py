"""transformers' `HrmTextForCausalLM` (tiny random init) under `attach(model)` with no spec: the
preset records two nested loops, H and L, and every metric equals a recomputation from the
model's true recurrence (z_L ← L(z_L + z_H) from z_L_init, z_H ← H(z_H + z_L) from the scaled
embeddings), read from the L_module and H_module outputs of a separate plain forward."""

import duckdb
import numpy as np
import pytest
import torch

import mythos_probe
from tests.probes.looped_models import Capture, assert_matches, no_hooks, reference

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hrm():
    cfg = transformers.HrmTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, head_dim=16, H_cycles=2, L_cycles=3,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.HrmTextForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.z_L_init.normal_(0, 1.0)  # a non-zero start makes the L loop's t = 0 step informative
    return model


ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
PROBES = ["convergence", "spectral", "cost", "lens"]


def true_recurrence(model):
    m = model.model
    with torch.no_grad(), Capture(L=m.L_module, H=m.H_module) as cap:
        logits = model(ids).logits
    z_H0 = m.embed_tokens(ids).detach() * m.embedding_scale
    z_L0 = m.z_L_init.detach().expand_as(z_H0)
    return cap.outputs["L"], cap.outputs["H"], z_L0, z_H0, logits


def test_nested_loops_match_the_true_recurrence(hrm):
    L, H, z_L0, z_H0, logits = true_recurrence(hrm)
    with torch.no_grad(), mythos_probe.attach(hrm, probes=PROBES, lens_positions="all") as rec:
        hrm(ids)
    traces = {t.loop_name: t for t in rec.traces}
    assert set(traces) == {"H", "L"} and len(rec.traces) == 2
    assert traces["H"].trace_id == traces["L"].trace_id  # one forward, one trace id
    assert traces["H"].iterations == 2 and traces["L"].iterations == 6
    assert_matches(traces["L"], reference(L, z_L0))
    assert_matches(traces["H"], reference(H, z_H0))
    # injection: L's e is z_H of its cycle (the scaled embeddings, then H's output); H's is the last z_L
    z_H = [z_H0] * 3 + [H[0]] * 3
    np.testing.assert_allclose(traces["L"].iteration_metrics["norm_inject"],
                               [z.norm(dim=-1).mean().item() for z in z_H], rtol=1e-5)
    np.testing.assert_allclose(traces["H"].iteration_metrics["norm_inject"],
                               [L[2].norm(dim=-1).mean().item(), L[5].norm(dim=-1).mean().item()], rtol=1e-5)
    # lens: the model's own head on each H state; the last one is the model's output
    final = logits.log_softmax(-1)
    for t, z in enumerate(H):
        lens = hrm.lm_head(z).log_softmax(-1)
        kl = (final.exp() * (final - lens)).sum(-1).mean().item()
        assert traces["H"].iteration_metrics["lens_kl_final"][t] == pytest.approx(kl, abs=1e-5)
    assert "lens_kl_final" not in traces["L"].iteration_metrics  # z_L has no readout declared


def test_flops_count_the_looped_parameters_once_per_iteration(hrm):
    with torch.no_grad(), mythos_probe.attach(hrm, probes=PROBES) as rec:
        hrm(ids)
    traces = {t.loop_name: t for t in rec.traces}
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    m = hrm.model
    other = n(hrm) - n(m.embed_tokens) - n(m.L_module) - n(m.H_module)
    tokens = ids.numel()
    assert traces["H"].forward_metrics["flops"] == pytest.approx(2 * tokens * (other + 2 * n(m.H_module)))
    assert traces["L"].forward_metrics["flops"] == pytest.approx(2 * tokens * 6 * n(m.L_module))
    # a spec names no parameters for its readout: no lens cost rather than a guessed one
    assert not any("lens_flops" in t.forward_metrics for t in traces.values())


def test_generate_decode_steps_share_one_trace_id_and_hooks_go(hrm, tmp_path):
    with torch.no_grad(), mythos_probe.attach(hrm) as rec:
        hrm.generate(ids, max_new_tokens=3, do_sample=False)
        first = len(rec.traces)
        hrm.generate(ids, max_new_tokens=2, do_sample=False)
        second = len(rec.traces)
        hrm.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False)  # no KV cache to tell steps by
    assert first == 6  # 3 forwards × 2 loops
    one, two, three = rec.traces[:first], rec.traces[first:second], rec.traces[second:]
    for call in (one, two, three):
        assert len({t.trace_id for t in call}) == 1
    assert len({one[0].trace_id, two[0].trace_id, three[0].trace_id}) == 3
    assert [t.step for t in three if t.loop_name == "L"] == [0, 1]
    assert [t.step for t in one if t.loop_name == "H"] == [0, 1, 2]
    assert no_hooks(hrm)
    path = rec.to_duckdb(str(tmp_path / "hrm.duckdb"))
    with duckdb.connect(path, read_only=True) as db:
        rows = db.execute("select loop_name, count(*) from forwards group by 1 order by 1").fetchall()
    assert rows == [("H", 7), ("L", 7)]


def test_jacobian_differentiates_the_step_with_the_injection_of_its_own_cycle(hrm):
    """From the second H cycle on, the L step is h ↦ L(h + z_H) with that cycle's z_H (the first H
    output), not the embeddings of cycle 0. σ_max by hand from the L module's own calls."""
    from mythos_probe.metrics.spectral import jacobian_sigma_max

    m = hrm.model
    calls = []
    handle = m.L_module.register_forward_pre_hook(lambda mod, a, k: calls.append((a, dict(k))), with_kwargs=True)
    try:
        L, H, z_L0, z_H0, _ = true_recurrence(hrm)
    finally:
        handle.remove()
    with torch.no_grad(), mythos_probe.attach(hrm, probes=["jacobian"]) as rec:
        hrm(ids)
    traces = {t.loop_name: t for t in rec.traces}
    z_H = [z_H0] * 3 + [H[0]] * 3
    previous = [z_L0.contiguous()] + L[:-1]

    def one(v):
        return v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == ids.shape[0] else v

    sigma = []
    for i, (args, kwargs) in enumerate(calls):
        kw = {k: (None if k == "cache" else one(v)) for k, v in kwargs.items()}
        step = lambda h, e=z_H[i][:1], kw=kw: m.L_module(h + e, **kw)  # noqa: E731
        sigma.append(jacobian_sigma_max(step, previous[i][:1]).item())
    np.testing.assert_allclose(traces["L"].iteration_metrics["jacobian_sigma_max"], sigma, rtol=1e-5)
    # the step of cycle 0 applied in cycle 1 gives another number: the fixture tells them apart
    kw = {k: (None if k == "cache" else one(v)) for k, v in calls[4][1].items()}
    stale = jacobian_sigma_max(lambda h: m.L_module(h + z_H0[:1], **kw), previous[4][:1]).item()
    assert abs(stale - sigma[4]) > 1e-3
