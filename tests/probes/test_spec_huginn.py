"""Huginn / Raven under `attach(model)` with no spec. Its code is not on PyPI, so the model is
`looped_models.RavenForCausalLM`, written from the upstream public interface (module names,
`core_block_forward(x, input_embeds, freqs_cis, mask, past_key_values, block_idx, step)`,
`CausalLMOutputRecurrentLatents` with `loss=tensor(0.)` filled, `predict_from_latents`,
`generate(criterion=…)`). An iteration is the method; the state starts random. Metrics are compared
with the core blocks' outputs and the adapter's inputs in a plain forward under the same seed."""

import numpy as np
import pytest
import torch

import mythos_probe
from mythos_probe.metrics.spectral import jacobian_sigma_max
from tests.probes.looped_models import Capture, RavenForCausalLM, assert_matches, no_hooks, reference

ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def raven():
    torch.manual_seed(0)
    return RavenForCausalLM(num_steps=4).eval()


def test_method_iterations_match_the_recurrence(raven):
    t = raven.transformer
    torch.manual_seed(7)
    with torch.no_grad(), Capture(core=t.core_block[-1], adapter=t.adapter) as cap:
        out = raven(ids)
    assert out[0].dim() == 0  # element 0 is the always-filled loss, as upstream: logits are read by name
    torch.manual_seed(7)  # the same random initial state
    with torch.no_grad(), mythos_probe.attach(raven, probes=["convergence", "spectral", "cost", "lens"],
                                              lens_positions="all") as rec:
        raven(ids)
    (trace,) = rec.traces
    assert trace.iterations == 4
    D = 32
    x0, e = cap.inputs["adapter"][0][0][..., :D], cap.inputs["adapter"][0][0][..., D:]
    assert_matches(trace, reference(cap.outputs["core"], x0))
    np.testing.assert_allclose(trace.iteration_metrics["norm_inject"], e.norm(dim=-1).mean().item(), rtol=1e-5)
    final = out.logits.log_softmax(-1)
    for i, h in enumerate(cap.outputs["core"]):
        # the lens is the forward's own output path from the latent: ln_f, coda, ln_f, head
        x = t.ln_f(h)
        for block in t.coda:
            x = block(x)
        lens = raven.lm_head(t.ln_f(x)).log_softmax(-1)
        assert trace.iteration_metrics["lens_entropy"][i] == pytest.approx(
            -(lens.exp() * lens).sum(-1).mean().item(), abs=1e-5)
        assert trace.iteration_metrics["lens_kl_final"][i] == pytest.approx(
            (final.exp() * (final - lens)).sum(-1).mean().item(), abs=1e-5)
    assert trace.iteration_metrics["lens_kl_final"][-1] == pytest.approx(0, abs=1e-6)  # the last one is the output
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    looped = n(t.adapter) + n(t.core_block)
    other = n(raven) - n(t.wte) - looped
    assert trace.forward_metrics["flops"] == pytest.approx(2 * ids.numel() * (other + 4 * looped))
    assert no_hooks(raven)  # the wrapped method is restored


def test_jacobian_is_that_of_the_true_step(raven):
    """σ_max of h ↦ core_block_forward(h, e, …)[0] on the first sequence, by the same power iteration;
    the model's own block counter is left as the model moved it."""
    t = raven.transformer
    torch.manual_seed(7)
    with torch.no_grad(), Capture(core=t.core_block[-1], adapter=t.adapter) as cap:
        plain = raven(ids, num_steps=2).logits
    torch.manual_seed(7)
    with torch.no_grad(), mythos_probe.attach(raven, probes=["jacobian"]) as rec:
        probed = raven(ids, num_steps=2).logits
    torch.testing.assert_close(probed, plain, rtol=0, atol=0)
    x0, e = cap.inputs["adapter"][0][0].chunk(2, dim=-1)
    previous = [x0, cap.outputs["core"][0]]
    freqs = raven.freqs_cis[:, :8]
    sigma = [jacobian_sigma_max(lambda h: raven.core_block_forward(h, e[:1], freqs, None, None, torch.tensor(0), 0)[0],
                                p[:1]).item() for p in previous]
    np.testing.assert_allclose(rec.traces[0].iteration_metrics["jacobian_sigma_max"], sigma, rtol=1e-5)


def test_adaptive_generate_runs_the_loop_outside_forward_and_says_so(raven):
    """`generate(criterion=…)` steps `iterate_one_step` directly: no forward, so no trace; the
    coverage check names the method instead of staying silent."""
    with torch.no_grad(), mythos_probe.attach(raven) as rec:
        with pytest.warns(UserWarning, match=r"loop 'loop' ran outside a forward of RavenForCausalLM "
                                             r"\(in iterate_one_step ← generate_with_adaptive_compute ← generate\)"):
            raven.generate(ids, criterion="latent-diff", exit_threshold=0.01, max_new_tokens=2)
        raven.generate(ids, criterion="latent-diff", max_new_tokens=1)  # warned once per attach
        raven(ids)
    assert len(rec.traces) == 1  # the plain forward is recorded as usual
    assert no_hooks(raven)
