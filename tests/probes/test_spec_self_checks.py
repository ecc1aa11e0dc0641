"""The run-time self-checks of the `LoopSpec` path, each shown firing, and the cases where the
model's true recurrence is not what a naive reading records: a step carrying a second tensor,
per-token depths, a loop run in another method, an added term that is not what it is declared to
be, a declaration that goes wrong after the first forward (the sampled checks), and planted
mistakes in presets (a wrong init, a pass one layer short, a wrong readout).

Every metric is compared with an independent recomputation from the model's true recurrence:
the states are read by our own hooks in a plain forward, or stepped by hand."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import mythos_probe
from mythos_probe import Halting, Injection, LoopSpec, Router
from mythos_probe.metrics.spectral import jacobian_sigma_max
from mythos_probe.presets import find
from tests.probes.looped_models import (
    Capture, KLExitLoop, MomentumLoop, OuroForCausalLM, PerTokenDepth, RavenForCausalLM, assert_matches, no_hooks,
    reference,
)

ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(3))


def record(model, spec=None, calls=1, **kwargs):
    with torch.no_grad(), mythos_probe.attach(model, spec=spec, **kwargs) as rec:
        for _ in range(calls):
            model(ids)
    assert no_hooks(model)
    return rec.traces


# -- jacobian: a step carrying a second tensor ---------------------------------------------------


def test_a_second_carried_tensor_leaves_the_jacobian_out_with_a_named_warning():
    torch.manual_seed(0)
    model = MomentumLoop().eval()
    spec = LoopSpec(step="step", state=0, injection=Injection("argument", arg=2))
    with pytest.warns(UserWarning, match=r"LoopSpec.state: loop 'loop''s step takes another tensor that changes every "
                                         r"iteration \(argument 1\): a second carried state"):
        (trace,) = record(model, spec, probes=["convergence", "spectral", "jacobian"])
    assert "jacobian_sigma_max" not in trace.iteration_metrics
    # the h metrics are still those of the true recurrence
    with torch.no_grad(), Capture(step=model.step) as cap:
        model(ids)
    assert_matches(trace, reference([out[0] for out in cap.outputs["step"]], cap.inputs["step"][0][0]))
    # the number it would have given differs from the map the model iterates, (h, v) ↦ (h', v')
    h, v, e = cap.inputs["step"][1]
    held = jacobian_sigma_max(lambda x: model.step(x, v[:1], e[:1])[0], h[:1]).item()
    joint = jacobian_sigma_max(lambda hv: torch.cat(model.step(*hv.chunk(2, -1), e[:1]), -1),
                               torch.cat([h, v], -1)[:1]).item()
    assert abs(held - joint) > 0.05


def test_a_step_whose_rerun_differs_leaves_the_jacobian_out():
    """Injection declared as an argument the step does not use the way declared: re-running the
    step from h_{t−1} and e does not give h_t."""

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.cell = nn.Embedding(32, 8), nn.Linear(8, 8)

        def forward(self, input_ids):
            h = self.embed(input_ids)
            for t in range(3):
                h = self.step(h, torch.full_like(h, float(t)))
            return h

        def step(self, h, bias):
            return torch.tanh(self.cell(h) + bias)

    torch.manual_seed(0)
    spec = LoopSpec(method="step")  # `bias` changes every iteration: also a second input
    with pytest.warns(UserWarning, match=r"LoopSpec.state: .*argument 1"):
        (trace,) = record(Noisy(), spec, probes=["jacobian"])
    assert "jacobian_sigma_max" not in trace.iteration_metrics


# -- counts: per-token depths ------------------------------------------------------------------


def test_per_token_depths_use_the_kept_state_and_report_each_positions_depth():
    torch.manual_seed(0)
    model = PerTokenDepth().eval()
    spec = LoopSpec(step="step", readout=("norm", "head"))
    with torch.no_grad(), Capture(step=model.step) as cap:
        model(ids)
    # the true recurrence: the state the model kept, by hand
    depth = model.depths[: ids.shape[1]]
    h, kept = cap.inputs["step"][0][0], []
    for t, out in enumerate(cap.outputs["step"]):
        h = torch.where((t < depth)[None, :, None], out, h)
        kept.append(h)
    h0 = cap.inputs["step"][0][0]
    traces = record(model, spec, calls=3, check_every=None, probes=["convergence", "spectral"], detail="positions")
    assert len(traces) == 3
    for trace in traces:  # the first (checked) forward and the unchecked ones alike
        assert_matches(trace, reference(kept, h0))
        np.testing.assert_array_equal(trace.position_iterations, depth.expand(2, -1).numpy())
        np.testing.assert_array_equal(trace.iteration_metrics["exit_count"], np.bincount(
            depth.expand(2, -1).reshape(-1).numpy() - 1, minlength=6))
        # the step outputs the model threw away are not what the trace reads
        thrown = reference(cap.outputs["step"], h0)["state_norm"]
        assert np.abs(trace.iteration_metrics["state_norm"] - thrown).max() > 1e-3


# -- coverage: a loop run in another method ----------------------------------------------------


def test_a_loop_run_in_another_method_warns_once_naming_it():
    torch.manual_seed(0)
    model = KLExitLoop().eval()
    with torch.no_grad(), mythos_probe.attach(model, spec=LoopSpec(step="step")) as rec:
        with pytest.warns(UserWarning, match=r"loop 'loop' ran outside a forward of KLExitLoop \(in forward_adaptive\)"):
            model.forward_adaptive(ids)
        model.forward_adaptive(ids)
        model(ids)
    assert len(rec.traces) == 1 and rec.traces[0].iterations == 6
    assert no_hooks(model)


# -- chain: the added term, and the sampled checks ---------------------------------------------


class NormPlusX(nn.Module):
    """h ← step(norm(h) + x): the input is not h + e for any fixed e."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Embedding(32, 8), nn.RMSNorm(8)
        self.step = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.leak = 0.0  # set later: the declaration stops holding after the first forward

    def forward(self, input_ids):
        x = self.embed(input_ids)
        h = x
        for _ in range(4):
            h = self.step(self.norm(h) + x) + self.leak * h
        return h


def test_added_without_a_module_is_checked():
    torch.manual_seed(0)
    spec = LoopSpec(step="step", injection=Injection("added"), init="embed")
    with pytest.raises(ValueError, match=r"LoopSpec.injection: loop 'loop' declares Injection\('added'\) without a "
                                         r"module, but the added term .* changed between iterations 0 and 1"):
        record(NormPlusX(), spec)


def test_a_function_injection_records_the_true_recurrence():
    torch.manual_seed(0)
    model = NormPlusX()
    spec = LoopSpec(step="step", init="embed", injection=Injection("function", fn=lambda m, h, e: m.norm(h) + e))
    with torch.no_grad(), Capture(step=model.step) as cap:
        model(ids)
    (trace,) = record(model, spec, probes=["convergence", "spectral", "jacobian"])
    x = model.embed(ids)
    assert_matches(trace, reference(cap.outputs["step"], x))
    previous = [x] + cap.outputs["step"][:-1]
    sigma = [jacobian_sigma_max(lambda h: model.step(model.norm(h) + x[:1]), p[:1]).item() for p in previous]
    np.testing.assert_allclose(trace.iteration_metrics["jacobian_sigma_max"], sigma, rtol=1e-5)
    np.testing.assert_allclose(trace.iteration_metrics["norm_inject"], x.norm(dim=-1).mean().item(), rtol=1e-5)


@pytest.mark.parametrize("check_every, fires", [(2, True), (None, False)])
def test_the_sampled_checks_catch_a_declaration_that_stops_holding(check_every, fires):
    torch.manual_seed(0)
    model = NormPlusX()
    spec = LoopSpec(step="step", init="embed", injection=Injection("function", fn=lambda m, h, e: m.norm(h) + e))
    with torch.no_grad(), mythos_probe.attach(model, spec=spec, check_every=check_every) as rec:
        model(ids)  # checked: holds
        model.leak = 0.5  # from now on the next input is no longer step(norm(h) + x)
        model(ids)  # recorded, not checked
        if fires:
            with pytest.raises(ValueError, match=r"LoopSpec.injection: loop 'loop' iteration 1 starts from an input "
                                                 r"that is not Injection.fn"):
                model(ids)  # the third recorded forward is checked again
        else:
            model(ids)
    assert len(rec.traces) == (2 if fires else 3)
    assert no_hooks(model)


# -- planted mistakes in presets ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ouro():
    torch.manual_seed(0)
    model = OuroForCausalLM(total_ut_steps=3, early_exit_threshold=0.6).eval()
    with torch.no_grad():
        model.model.early_exit_gate.weight.normal_(0, 0.3)
        model.model.early_exit_gate.bias.fill_(-0.5)
    return model


def test_planted_last_one_layer_short_is_caught(ouro):
    (spec,) = find(ouro)
    short = dataclasses.replace(spec, last="model.layers.1")  # the pass ends at the norm, not the last layer
    with pytest.raises(ValueError, match=r"LoopSpec.injection: loop 'loop' iteration 1 starts from an input that is "
                                         r"not the previous iteration's end state.*last="):
        record(ouro, short)


def test_planted_wrong_readout_is_caught():
    torch.manual_seed(0)
    raven = RavenForCausalLM(num_steps=3).eval()
    (spec,) = find(raven)
    no_coda = dataclasses.replace(spec, readout=("transformer.ln_f", "lm_head"))  # skips the coda
    with pytest.raises(ValueError, match=r"LoopSpec.readout: loop 'loop''s readout of the end state differs from the "
                                         r"logits the model returned at 16 of 16 positions"):
        with torch.no_grad(), mythos_probe.attach(raven, spec=no_coda):
            raven(torch.randint(0, 64, (2, 8)))
    with torch.no_grad(), mythos_probe.attach(raven, spec=dataclasses.replace(no_coda, readout_is_output=False)) as rec:
        raven(torch.randint(0, 64, (2, 8)))  # a partial lens, declared as one
    assert len(rec.traces) == 1 and no_hooks(raven)


def test_planted_wrong_exit_is_caught_by_the_readout(ouro):
    (spec,) = find(ouro)
    fixed = dataclasses.replace(spec, halting=dataclasses.replace(spec.halting, threshold=0.9))  # not the model's
    with pytest.raises(ValueError, match=r"LoopSpec.readout: .*at each position's recorded exit \(halting=\)"):
        record(ouro, fixed)


def test_planted_wrong_init_is_caught():
    torch.manual_seed(0)
    model = NormPlusX()
    fn = lambda m, h, e: m.norm(h) + e  # noqa: E731
    with pytest.raises(ValueError, match=r"LoopSpec.init: module 'step.0' did not run before the loop's first iteration"):
        record(model, LoopSpec(step="step", init="step.0", injection=Injection("function", fn=fn)))
    with pytest.raises(ValueError, match=r"iteration 0 starts from an input that is not Injection.fn.*Either init= is "
                                         r"not the pre-loop state"):
        record(model, LoopSpec(step="step", init=lambda m: torch.zeros(8), injection=Injection("function", fn=fn)))


# -- validation when built, and errors inside the first forward naming their field --------------


@pytest.mark.parametrize("build, match", [
    (lambda: Halting("head", threshold=-1), r"Halting.threshold must be in \(0, 1\]"),
    (lambda: Halting("head", threshold=float("nan")), r"Halting.threshold must be in \(0, 1\]"),
    (lambda: Halting("head", threshold="0.5"), r"Halting.threshold must be a number"),
    (lambda: Halting("head", rule="act", threshold=None), r"Halting.threshold: rule 'act' needs a threshold"),
    (lambda: Halting(3), r"Halting.head must be a module path"),
    (lambda: Halting("head", select=1.5), r"Halting.select must be"),
    (lambda: Router("gate", top_k=-2), r"Router.top_k must be at least 1"),
    (lambda: Router("gate", top_k=2.0), r"Router.top_k must be a positive int"),
    (lambda: Router("gate", top_k=2, bias=5), r"Router.bias must name an attribute"),
    (lambda: Injection("sum"), r"Injection.mode must be one of"),
    (lambda: Injection("added", arg=1), r"Injection.arg is for mode 'argument' only"),
    (lambda: Injection("function"), r"Injection\('function'\) needs fn="),
    (lambda: Injection("added", module="a b"), r"Injection.module must be a dotted module path"),
    (lambda: LoopSpec(step="blocks.0", routers="blocks.0"), r"LoopSpec.routers is a tuple of Router"),
    (lambda: LoopSpec(step="blocks.0", init=3), r"LoopSpec.init must be a module path or a callable"),
    (lambda: LoopSpec(step="blocks.0", state_in=-1), r"LoopSpec.state_in must be"),
    (lambda: LoopSpec(step="blocks.0", readout=()), r"LoopSpec.readout: an empty tuple"),
    (lambda: LoopSpec(step="blocks.0", halting=Injection()), r"LoopSpec.halting takes Halting"),
    (lambda: LoopSpec(step="blocks.0", name=""), r"LoopSpec.name must be a non-empty string"),
    (lambda: LoopSpec(step=5), r"LoopSpec.step must be a module path"),
    (lambda: LoopSpec(step="blocks.0", readout_is_output="yes"), r"LoopSpec.readout_is_output must be a bool"),
])
def test_every_field_is_checked_when_built(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


@pytest.mark.parametrize("kwargs, match", [
    (dict(check_every=0), r"check_every must be a positive integer or None"),
    (dict(probes="lens"), r"probes takes a list of probe names"),
    (dict(run_id=""), r"run_id must be a non-empty string"),
    (dict(token_text="abc"), r"token_text must be a callable"),
    (dict(on_trace=[1]), r"on_trace takes callables"),
    (dict(spec="step"), r"spec= takes a LoopSpec"),
])
def test_attach_options_are_checked(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mythos_probe.attach(KLExitLoop(), **kwargs).__enter__()


def test_errors_inside_the_first_forward_name_their_field():
    torch.manual_seed(0)
    model = KLExitLoop().eval()
    with pytest.raises(ValueError, match=r"LoopSpec.init: loop 'loop' declares a pre-loop state of shape \(3,\)"):
        record(model, LoopSpec(step="step", init=lambda m: torch.zeros(3)))
    with pytest.raises(ValueError, match=r"LoopSpec.injection.module: 'step.0' had not run when iteration 0"):
        record(model, LoopSpec(step="step", injection=Injection("added", module="step.0")))
    with pytest.raises(ValueError, match=r"LoopSpec.readout raised RuntimeError"):
        record(model, LoopSpec(step="step", readout=("step.0", "head", "head")))
    ouro = OuroForCausalLM(total_ut_steps=2)
    (spec,) = find(ouro)
    with pytest.raises(ValueError, match=r"LoopSpec.halting.threshold must be in \(0, 1\]"):
        with torch.no_grad(), mythos_probe.attach(ouro, spec=spec):
            ouro(ids, exit_threshold=-1.0)  # garbage per call: named, never a record of exits the model never made
    with pytest.raises(ValueError, match=r"LoopSpec.routers\[0\].top_k: 99 is not between 1 and the router's 16 experts"):
        record(model, LoopSpec(step="step", routers=(Router("step.0", top_k=99),)))
    assert no_hooks(model) and no_hooks(ouro)


def test_a_pass_that_cannot_be_re_run_warns_instead_of_a_jacobian(ouro):
    with pytest.warns(UserWarning, match=r"LoopSpec.first/last: loop 'loop''s pass \(model.layers.0 … model.norm\) is "
                                         r"not a run of entries of one ModuleList"):
        (trace,) = record(ouro, probes=["jacobian", "convergence"])
    assert "jacobian_sigma_max" not in trace.iteration_metrics
