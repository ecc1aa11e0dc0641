"""PyPI's `ponder-transformer` (PonderNet) under `attach(model)` with no spec: the block returns
(state, halting logits); the record reads the logits through a sigmoid and keeps PonderNet's
halting distribution p_t = λ_t Π(1 − λ_s) as its expectation, and, as `position_iterations`, the
exit the model sampled per sequence (its returned `halt_layer_indices`). Compared with the block's
own outputs and the model's return value in a plain forward under the same seed."""

import numpy as np
import pytest
import torch

import mythos_probe
from tests.probes.looped_models import Capture, assert_matches, no_hooks, reference

ponder_transformer = pytest.importorskip("ponder_transformer")


@pytest.fixture(scope="module")
def ponder():
    torch.manual_seed(0)
    model = ponder_transformer.PonderTransformer(num_tokens=64, dim=32, max_seq_len=16, causal=True,
                                                 dim_head=8, heads=2).eval()
    with torch.no_grad():
        model.block.to_halt_logits[0].weight.mul_(0.1)
        model.block.to_halt_logits[0].bias.fill_(-1.5)  # halt late: several iterations run
    return model


ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def test_states_halting_expectation_and_lens_match_the_block(ponder):
    torch.manual_seed(5)
    with torch.no_grad(), Capture(block=ponder.block) as cap:
        logits, halt_layer_indices = ponder(ids)
    torch.manual_seed(5)  # the same exit samples
    with torch.no_grad(), mythos_probe.attach(ponder, probes=["convergence", "spectral", "halting", "lens"],
                                              lens_positions="all") as rec:
        ponder(ids)
    (trace,) = rec.traces
    states = [out[0] for out in cap.outputs["block"]]
    assert trace.iterations == len(states) >= 3  # the model's own early break, after several iterations
    assert_matches(trace, reference(states, cap.inputs["block"][0][0]))

    lam = torch.stack([torch.sigmoid(out[1]) for out in cap.outputs["block"]])  # (I, B, T)
    survive = torch.cat([torch.ones_like(lam[:1]), torch.cumprod(1 - lam, 0)[:-1]])
    p = lam * survive
    np.testing.assert_allclose(trace.iteration_metrics["halt_prob"], lam.mean(dim=(1, 2)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(trace.iteration_metrics["act_weight"], p.mean(dim=(1, 2)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(trace.iteration_metrics["cum_halt"], p.cumsum(0).mean(dim=(1, 2)).numpy(), rtol=1e-5)
    assert trace.iteration_metrics["halted_fraction"].max() == 0  # the expectation claims no exit ...
    # ... and the exit the model sampled per sequence is recorded beside it, for every position
    np.testing.assert_array_equal(trace.position_iterations,
                                  (halt_layer_indices + 1)[:, None].expand(-1, ids.shape[1]).numpy())
    assert len(set(halt_layer_indices.tolist())) > 1 or halt_layer_indices.max() < len(states) - 1
    np.testing.assert_array_equal(trace.iteration_metrics["exit_count"],
                                  np.bincount(np.repeat(halt_layer_indices.numpy(), ids.shape[1]), minlength=len(states)))

    for t, h in enumerate(states):
        lens = ponder.to_logits(h).log_softmax(-1)
        assert trace.iteration_metrics["lens_entropy"][t] == pytest.approx(
            -(lens.exp() * lens).sum(-1).mean().item(), abs=1e-5)
    assert no_hooks(ponder)


def test_a_sampled_exit_that_is_not_declared_is_warned_about(ponder):
    import dataclasses

    from mythos_probe.presets import find

    (spec,) = find(ponder)
    blind = dataclasses.replace(spec, halting=dataclasses.replace(spec.halting, exits=None))
    # the readout check sees that the model's logits are not those of the last state everywhere
    torch.manual_seed(5)
    with pytest.raises(ValueError, match=r"LoopSpec.readout: .* at each position's recorded exit \(halting=\)"):
        with torch.no_grad(), mythos_probe.attach(ponder, spec=blind, probes=["halting"]):
            ponder(ids)
    blind = dataclasses.replace(blind, readout_is_output=False)
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match=r"LoopSpec.halting.exits: loop 'loop' samples its exit"):
        with torch.no_grad(), mythos_probe.attach(ponder, spec=blind, probes=["halting"]) as rec:
            ponder(ids)
    assert (rec.traces[0].position_iterations == rec.traces[0].iterations).all()
