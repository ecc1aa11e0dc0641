"""Huginn / Raven under `attach(model)` with no spec. Its code is not on PyPI, so the model is the
Raven-shaped `looped_models.RavenForCausalLM`, written from the paper and the public code's
structure (same module names, `core_block_forward` method and recurrence). An iteration is the
method: adapter(cat[x, e]) then the core blocks; the state starts random. Metrics are compared with
the core blocks' outputs and the adapter's inputs in a plain forward under the same seed."""

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
        logits = raven(ids).logits
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
    for i, h in enumerate(cap.outputs["core"]):
        lens = raven.lm_head(t.ln_f(h)).log_softmax(-1)
        assert trace.iteration_metrics["lens_entropy"][i] == pytest.approx(
            -(lens.exp() * lens).sum(-1).mean().item(), abs=1e-5)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    looped = n(t.adapter) + n(t.core_block)
    other = n(raven) - n(t.wte) - looped
    assert trace.forward_metrics["flops"] == pytest.approx(2 * ids.numel() * (other + 4 * looped))
    assert logits.shape == (2, 8, 64)
    assert no_hooks(raven)  # the wrapped method is restored


def test_jacobian_is_that_of_the_true_step(raven):
    """σ_max of h ↦ core_block_forward(h, e)[0] on the first sequence, by the same power iteration."""
    t = raven.transformer
    torch.manual_seed(7)
    with torch.no_grad(), Capture(core=t.core_block[-1], adapter=t.adapter) as cap:
        raven(ids, num_steps=2)
    torch.manual_seed(7)
    with torch.no_grad(), mythos_probe.attach(raven, probes=["jacobian"]) as rec:
        raven(ids, num_steps=2)
    x0, e = cap.inputs["adapter"][0][0].chunk(2, dim=-1)
    previous = [x0, cap.outputs["core"][0]]
    sigma = [jacobian_sigma_max(lambda h: raven.core_block_forward(h, e[:1], 0)[0], p[:1]).item() for p in previous]
    np.testing.assert_allclose(rec.traces[0].iteration_metrics["jacobian_sigma_max"], sigma, rtol=1e-5)
