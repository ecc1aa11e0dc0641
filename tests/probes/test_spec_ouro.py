"""Ouro under `attach(model)` with no spec. Its code is not on PyPI, so the model is the
Ouro-shaped `looped_models.OuroForCausalLM`, written from the paper and the public code's
structure (same module names and recurrence: every layer then the norm, `total_ut_steps` times;
`early_exit_gate` logits; exit at the first step whose cumulative exit distribution reaches the
threshold). The exit step is checked against the model's own output: its logits at each position
are the head applied to the state of the step the trace says it exited at."""

import numpy as np
import pytest
import torch

import mythos_probe
from tests.probes.looped_models import Capture, OuroForCausalLM, assert_matches, no_hooks, reference

ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ouro():
    torch.manual_seed(0)
    model = OuroForCausalLM(total_ut_steps=4, early_exit_threshold=0.6).eval()
    with torch.no_grad():
        model.model.early_exit_gate.weight.normal_(0, 0.3)
        model.model.early_exit_gate.bias.fill_(-0.5)
    return model


def test_exit_distribution_and_exit_step_are_the_models(ouro):
    m = ouro.model
    with torch.no_grad(), Capture(norm=m.norm, gate=m.early_exit_gate, first=m.layers[0]) as cap:
        logits = ouro(ids).logits
    with torch.no_grad(), mythos_probe.attach(ouro, probes=["convergence", "spectral", "halting", "lens"],
                                              detail="positions", lens_positions="all") as rec:
        ouro(ids)
    (trace,) = rec.traces
    states = cap.outputs["norm"]
    assert trace.iterations == 4
    assert_matches(trace, reference(states, cap.inputs["first"][0][0]))

    lam = torch.stack([torch.sigmoid(g.squeeze(-1)) for g in cap.outputs["gate"]])  # (I, B, T)
    survive = torch.cat([torch.ones_like(lam[:1]), torch.cumprod(1 - lam, 0)[:-1]])
    pdf = torch.cat([lam[:-1] * survive[:-1], survive[-1:]])  # the last step takes the remainder
    np.testing.assert_allclose(trace.iteration_metrics["halt_prob"], lam.mean(dim=(1, 2)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(trace.iteration_metrics["act_weight"], pdf.mean(dim=(1, 2)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(trace.iteration_metrics["cum_halt"], pdf.cumsum(0).mean(dim=(1, 2)).numpy(), rtol=1e-5)

    used = trace.position_iterations  # (B, T): exit step + 1
    assert len(np.unique(used)) > 1  # positions exit at different steps
    stacked = torch.stack(states)  # (I, B, T, D)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            own = ouro.lm_head(stacked[used[b, t] - 1, b, t])
            torch.testing.assert_close(logits[b, t], own, rtol=0, atol=1e-6)
    np.testing.assert_allclose(trace.iteration_metrics["exit_count"], np.bincount(used.reshape(-1) - 1, minlength=4))
    assert no_hooks(ouro)


def test_without_a_threshold_every_position_runs_to_the_last_step(ouro):
    ouro.early_exit_threshold = None  # as upstream, the config is read into the model when it is built
    try:
        with torch.no_grad(), mythos_probe.attach(ouro, probes=["halting"], detail="positions") as rec:
            ouro(ids)
    finally:
        ouro.early_exit_threshold = 0.6
    assert (rec.traces[0].position_iterations == 4).all()


def own_exits(ouro, logits, states):
    """Each position's exit step as the model's own logits show it: the step whose head output they are."""
    heads = torch.stack([ouro.lm_head(h) for h in states])  # (I, B, T, V)
    match = (heads - logits[None]).abs().amax(-1) <= 1e-6  # (I, B, T)
    assert match.any(0).all()
    return match.float().argmax(0).numpy()  # the first matching step


@pytest.mark.parametrize("how", ["per_call_threshold", "config_exit_step", "per_call_exit_step"])
def test_the_models_per_call_and_config_exit_options_are_recorded(how):
    """Ouro's own options decide its exit: `exit_threshold=` per call, `early_exit_step` in the config,
    `exit_at_step=` per call. The trace's exits equal the exits the model's logits show."""
    torch.manual_seed(0)
    model = OuroForCausalLM(total_ut_steps=4, early_exit_threshold=0.6,
                            early_exit_step=1 if how == "config_exit_step" else None).eval()
    with torch.no_grad():
        model.model.early_exit_gate.weight.normal_(0, 0.3)
        model.model.early_exit_gate.bias.fill_(-0.5)
    call = {"per_call_threshold": dict(exit_threshold=0.3), "config_exit_step": {},
            "per_call_exit_step": dict(exit_at_step=2)}[how]
    m = model.model
    with torch.no_grad(), Capture(norm=m.norm) as cap:
        logits = model(ids, **call).logits
    with torch.no_grad(), mythos_probe.attach(model, probes=["halting"], detail="positions") as rec:
        model(ids, **call)
    exits = own_exits(model, logits, cap.outputs["norm"])
    np.testing.assert_array_equal(rec.traces[0].position_iterations - 1, exits)
    # the per-iteration exit metrics follow the same exits
    np.testing.assert_allclose(rec.traces[0].iteration_metrics["halted_fraction"],
                               [(exits <= t).mean() for t in range(4)], atol=1e-6)
    np.testing.assert_array_equal(rec.traces[0].iteration_metrics["exit_count"], np.bincount(exits.reshape(-1), minlength=4))
    if how == "per_call_threshold":
        assert len(np.unique(exits)) > 1
        # and the config's threshold would give other exits: the per-call option mattered
        with torch.no_grad():
            default = own_exits(model, model(ids).logits, cap.outputs["norm"][:4])
        assert (default != exits).any()
    else:
        assert (exits == (1 if how == "config_exit_step" else 2)).all()


def test_weighted_exit_and_labels_have_no_exit_and_no_readout_check(ouro):
    """With use_weighted_exit (and no threshold) or labels, the logits are the expectation over
    steps: every position runs to the end, and the readout check does not compare a single state."""
    ouro.early_exit_threshold = None
    try:
        with torch.no_grad(), mythos_probe.attach(ouro, probes=["halting"], detail="positions") as rec:
            ouro(ids, use_weighted_exit=True)
            ouro(ids, labels=ids)
    finally:
        ouro.early_exit_threshold = 0.6
    assert all((t.position_iterations == 4).all() for t in rec.traces)
