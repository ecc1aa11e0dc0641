"""`SpecAdapter` (mythos_probe/probes/spec_adapter.py) on tiny in-process models: the paths the
model-level spec tests leave out, and every message a misdeclaration gets, written out in full
(a test that matches a message's first words lets the rest of it say anything). Written against
survivors of `scripts/mutation.sh mythos_probe/probes/spec_adapter.py`; each test runs in well
under a second.

- the added-term check: quiet on a true `h + e` recurrence over several iterations, quiet where
  another declared loop ran in between (HRM's two levels), and its message;
- a loop run outside the model's forward: the warning names the chain of methods, or says it ran
  from code outside the model, once;
- `generate`: its forwards share one trace id, with steps 0, 1, 2; the next plain forward is its
  own trace again;
- a pass of ModuleList entries taking per-layer arguments: the Jacobian re-runs each layer with
  its own arguments and equals one computed by hand;
- routers: expert loads and routing entropy against the model's own choices and sigmoid scores,
  and each misdeclared router field's message."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mythos_probe
from mythos_probe import Injection, LoopSpec, Router
from mythos_probe.metrics.spectral import jacobian_sigma_max
from tests.probes.looped_models import no_hooks

ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(7))


def record(model, spec, calls=1, **kwargs):
    with torch.no_grad(), mythos_probe.attach(model, spec=spec, **kwargs) as rec:
        for _ in range(calls):
            model(ids)
    assert no_hooks(model)
    return rec.traces


def error_of(model, spec, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        record(model, spec, **kwargs)
    assert no_hooks(model)
    return str(err.value)


# -- the added term ---------------------------------------------------------------------------


class AddedLoop(nn.Module):
    """h ← step(h + x) from h = 0: the input is h_{t−1} + e with e = x at every iteration."""

    def __init__(self, steps=4, norm=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.norm = nn.RMSNorm(8) if norm else nn.Identity()
        self.steps = steps

    def forward(self, input_ids):
        x = self.embed(input_ids)
        h = torch.zeros_like(x)
        for _ in range(self.steps):
            h = self.step(self.norm(h) + x)
        return h


def test_a_true_added_injection_passes_its_check_at_every_iteration():
    model = AddedLoop()
    (trace,) = record(model, LoopSpec(step="step", injection=Injection("added"), init=lambda m: torch.zeros(8)),
                      probes=["convergence", "spectral"])
    assert trace.iterations == 4
    x = model.embed(ids)
    np.testing.assert_allclose(trace.iteration_metrics["norm_inject"], x.norm(dim=-1).mean().item(), rtol=1e-5)


def test_the_added_term_message_in_full():
    spec = LoopSpec(step="step", injection=Injection("added"), init=lambda m: torch.zeros(8))
    assert error_of(AddedLoop(norm=True), spec) == (
        "LoopSpec.injection: loop 'loop' declares Injection('added') without a module, but the added term "
        "(input − previous end state) changed between iterations 0 and 1 with no other declared loop running in "
        "between: the input is not h_{t−1} + e. Declare module= (where e comes from), or Injection('function', "
        "fn=...) if the input is built another way")


class TwoLevels(nn.Module):
    """HRM's shape: a low loop z_L ← L(z_L + z_H + x) run twice per high iteration, and a high
    loop z_H ← H(z_H + z_L). The low loop's added term z_H + x changes only after H ran."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.low = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.high = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def forward(self, input_ids):
        x = self.embed(input_ids)
        z_h = z_l = torch.zeros_like(x)
        for _ in range(3):
            for _ in range(2):
                z_l = self.low(z_l + z_h + x)
            z_h = self.high(z_h + z_l)
        return z_h


def test_the_added_term_may_change_where_another_loop_ran_in_between():
    zeros = lambda m: torch.zeros(8)  # noqa: E731
    specs = (LoopSpec(step="low", name="low", injection=Injection("added"), init=zeros),
             LoopSpec(step="high", name="high", injection=Injection("added"), init=zeros))
    low, high = record(TwoLevels(), specs)
    assert (low.loop_name, low.iterations, high.loop_name, high.iterations) == ("low", 6, "high", 3)
    assert low.trace_id == high.trace_id


# -- a loop run outside the model's forward ------------------------------------------------------


class Outside(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def forward(self, input_ids):
        return self.step(self.step(self.embed(input_ids)))

    def inner(self, input_ids):
        return self.step(self.embed(input_ids))

    def outer(self, input_ids):
        return self.inner(input_ids)


def test_a_loop_run_outside_the_forward_names_the_methods_once():
    model = Outside()
    with torch.no_grad(), mythos_probe.attach(model, spec=LoopSpec(step="step")) as rec:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.outer(ids)
            model.outer(ids)  # warned once only
        model(ids)
    assert [str(w.message) for w in caught] == [
        "LoopSpec: loop 'loop' ran outside a forward of Outside (in inner ← outer); its iterations are not recorded. "
        "Record a forward (model(...)), or describe the method that runs the loop with LoopSpec(method=...)"]
    assert len(rec.traces) == 1 and rec.traces[0].iterations == 2
    assert no_hooks(model)


def test_a_loop_run_from_code_outside_the_model_says_so():
    model = Outside()
    with torch.no_grad(), mythos_probe.attach(model, spec=LoopSpec(step="step")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.step(model.embed(ids))
    assert [str(w.message) for w in caught] == [
        "LoopSpec: loop 'loop' ran outside a forward of Outside (in code outside the model's forward); its "
        "iterations are not recorded. Record a forward (model(...)), or describe the method that runs the loop "
        "with LoopSpec(method=...)"]


# -- generate ------------------------------------------------------------------------------------


class Generates(Outside):
    def generate(self, input_ids, steps=3):
        for _ in range(steps):
            self(input_ids)
        return input_ids


def test_the_forwards_of_one_generate_call_share_a_trace_id_and_count_steps():
    model = Generates()
    with torch.no_grad(), mythos_probe.attach(model, spec=LoopSpec(step="step")) as rec:
        model.generate(ids)
        model.generate(ids, steps=2)
        model(ids)
    first, second, plain = rec.traces[:3], rec.traces[3:5], rec.traces[5]
    assert len(rec.traces) == 6
    assert [t.step for t in first] == [0, 1, 2] and [t.step for t in second] == [0, 1]
    assert len({t.trace_id for t in first}) == 1 and len({t.trace_id for t in second}) == 1
    assert first[0].trace_id != second[0].trace_id
    assert plain.trace_id not in {first[0].trace_id, second[0].trace_id}
    assert no_hooks(model)


# -- a pass of ModuleList entries with per-layer arguments -----------------------------------------


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h, scale=1.0):
        return torch.tanh(self.lin(h) * scale)


class PassModel(nn.Module):
    """Each iteration runs layers 0 and 1, each with its own `scale` (as layers take their own
    masks); layer 2 of the same ModuleList runs once after the loop."""

    scales = (0.5, 2.0)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.layers = nn.ModuleList([Scaled(), Scaled(), Scaled()])

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for _ in range(3):
            for layer, s in zip(self.layers, self.scales):
                h = layer(h, scale=s)
        return self.layers[2](h)


def test_the_jacobian_of_a_pass_re_runs_each_layer_with_its_own_arguments():
    model = PassModel()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a pass re-run with the wrong arguments would warn and drop the Jacobian
        (trace,) = record(model, LoopSpec(first="layers.0", last="layers.1"), probes=["jacobian"])
    h = model.embed(ids)
    states = [h]
    for _ in range(3):
        for layer, s in zip(model.layers, model.scales):
            h = layer(h, scale=s)
        states.append(h)
    one_pass = lambda x: model.layers[1](model.layers[0](x, scale=0.5), scale=2.0)  # noqa: E731
    want = [jacobian_sigma_max(one_pass, s[:1]).item() for s in states[:-1]]
    np.testing.assert_allclose(trace.iteration_metrics["jacobian_sigma_max"], want, rtol=1e-5)


# -- routers -------------------------------------------------------------------------------------


class Gate(nn.Module):
    """Sigmoid scores, the top-k chosen with a correction bias (DeepSeek-V3's aux-loss-free
    routing); returns (logits, chosen experts)."""

    def __init__(self, experts=4, top_k=2):
        super().__init__()
        self.proj = nn.Linear(8, experts)
        with torch.no_grad():  # logits spread enough that softmax + bias, sigmoid + bias and sigmoid
            self.proj.weight.mul_(4)  # alone choose differently at some tokens
        self.top_k = top_k
        self.register_buffer("correction", torch.linspace(0.3, -0.3, experts))

    def forward(self, h):
        logits = self.proj(h)
        return logits, (logits.sigmoid() + self.correction).topk(self.top_k, dim=-1).indices


class RoutedStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.lin = nn.Linear(8, 8)

    def forward(self, h):
        self.gate(h)
        return torch.tanh(self.lin(h))


class Routed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = RoutedStep()

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for _ in range(3):
            h = self.step(h)
        return h


ROUTER = Router("step.gate", top_k="top_k", scoring="sigmoid", select=0, bias="correction", indices=1)


def routed(**changes):
    fields = dict(module=ROUTER.module, top_k=ROUTER.top_k, scoring=ROUTER.scoring, select=ROUTER.select,
                  bias=ROUTER.bias, indices=ROUTER.indices)
    return LoopSpec(step="step", routers=(Router(**{**fields, **changes}),))


def test_router_loads_and_entropy_against_the_models_own_choices():
    model = Routed()
    (trace,) = record(model, routed(), probes=["experts"])
    h = model.embed(ids)
    loads, entropy = [], []
    for _ in range(3):
        logits, chosen = model.step.gate(h)
        loads.append(np.bincount(chosen.reshape(-1).numpy(), minlength=4))
        p = logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True)  # normalised sigmoid scores
        entropy.append(-(p * p.log()).sum(-1).mean().item())
        h = model.step(h)
    np.testing.assert_array_equal(trace.expert_load, np.stack(loads))
    np.testing.assert_allclose(trace.iteration_metrics["routing_entropy"], entropy, rtol=1e-5)


@pytest.mark.parametrize("changes, message", [
    (dict(select=lambda out: "logits"),
     "LoopSpec.routers[0].select picks str from the router 'step.gate' output (tuple); it must pick the (tokens, "
     "experts) logits (and top_k must give an int, got 2)"),
    (dict(top_k="no_such_attribute"),
     "LoopSpec.routers[0].select picks Tensor from the router 'step.gate' output (tuple); it must pick the (tokens, "
     "experts) logits (and top_k must give an int, got None)"),
    (dict(top_k=5), "LoopSpec.routers[0].top_k: 5 is not between 1 and the router's 4 experts"),
    (dict(bias="proj"), "LoopSpec.routers[0].bias: Gate has no tensor 'proj' with one value per expert (4)"),
    (dict(bias=None),
     "LoopSpec.routers[0]: the experts re-derived from the declared scoring ('sigmoid'), bias (None) and top_k (2) "
     "are not the ones the router chose; fix scoring=, bias= or top_k= (or indices= if it selects something else)"),
    (dict(scoring="softmax"),
     "LoopSpec.routers[0]: the experts re-derived from the declared scoring ('softmax'), bias ('correction') and "
     "top_k (2) are not the ones the router chose; fix scoring=, bias= or top_k= (or indices= if it selects "
     "something else)"),
])
def test_each_misdeclared_router_field_gets_its_message(changes, message):
    assert error_of(Routed(), routed(**changes), probes=["experts"]) == message


# -- the chain check's message for each injection mode ---------------------------------------------


class Chain(nn.Module):
    """h ← step(build(h, x)) from h = x, the step a Linear + tanh (on [h, x] where build concatenates)."""

    def __init__(self, build, width=8, steps=3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = nn.Sequential(nn.Linear(width, 8), nn.Tanh())
        self.build, self.steps = build, steps

    def forward(self, input_ids):
        x = self.embed(input_ids)
        h = x
        for _ in range(self.steps):
            h = self.step(self.build(h, x))
        return h


class ArgStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h, e):
        return torch.tanh(self.lin(h) + e)


class ArgChain(nn.Module):
    """h ← step(h / 2, x): the state is halved on its way in, which no declaration says."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = ArgStep()

    def forward(self, input_ids):
        x = self.embed(input_ids)
        h = x
        for _ in range(3):
            h = self.step(0.5 * h, x)
        return h


HINT = ("Declare how the input is built (injection=Injection('added'|'concat'|'argument'|'restart'|'function', "
        "...)), or fix state= / last= (the end state: the pass's last module) and state_in= (the argument carrying "
        "the state)")


KEPT = " at 10 of 10 positions (it is neither the step's output nor a state kept from before it)"


def chained(t, what, hint=HINT):
    return f"LoopSpec.injection: loop 'loop' iteration {t} starts from an input that is not {what}. {hint}"


class Drifting:
    """h + x at the first iteration, h / 2 + x after it."""

    def __init__(self):
        self.calls = 0

    def __call__(self, h, x):
        self.calls += 1
        return h + x if self.calls == 1 else 0.5 * h + x


plus = lambda h, x: h + x  # noqa: E731
half_plus = lambda h, x: 0.5 * h + x  # noqa: E731
to_h_plus_e = lambda m, h, e: h + e  # noqa: E731


@pytest.mark.parametrize("model, spec, message", [
    # modes whose next input holds the kept state: checked position by position (per-token depths)
    (lambda: Chain(plus), LoopSpec(step="step"), chained(1, "the previous iteration's end state" + KEPT)),
    (ArgChain, LoopSpec(step="step", injection=Injection("argument", arg=1)),
     chained(1, "the previous iteration's end state" + KEPT)),
    (lambda: Chain(lambda h, x: h), LoopSpec(step="step", injection=Injection("restart")),
     chained(1, "the first iteration's input (Injection('restart'))")),
    (lambda: Chain(half_plus), LoopSpec(step="step", injection=Injection("added", module="embed")),
     chained(1, "the previous end state plus the injection module's output")),
    (lambda: Chain(lambda h, x: torch.cat([0.5 * h, x], -1), width=16), LoopSpec(step="step", injection=Injection("concat")),
     chained(1, "cat[previous end state, e]" + KEPT)),
    (lambda: Chain(Drifting()), LoopSpec(step="step", init="embed",
                                         injection=Injection("function", module="embed", fn=to_h_plus_e)),
     chained(1, "Injection.fn(model, previous end state, e)")),
    (lambda: Chain(plus), LoopSpec(step="step", init=lambda m: torch.zeros(8),
                                   injection=Injection("function", fn=to_h_plus_e)),
     chained(0, "Injection.fn(model, previous end state, e)",
             "Either init= is not the pre-loop state (it must give what the model holds before iteration 0), or "
             "declare how the input is built (injection=Injection('added'|'concat'|'argument'|'restart'|'function', "
             "...)), or fix state= / last= (the end state: the pass's last module) and state_in= (the argument "
             "carrying the state)")),
])
def test_the_chain_message_names_what_each_mode_expected(model, spec, message):
    assert error_of(model(), spec) == message


# -- the Jacobian: each mode's re-run, and the steps that cannot be re-run ----------------------------


@pytest.mark.parametrize("model, spec, one_step", [
    (lambda: Chain(plus), LoopSpec(step="step", injection=Injection("added", module="embed")),
     lambda m, h, x: m.step(h + x)),
    (lambda: Chain(lambda h, x: torch.cat([h, x], -1), width=16), LoopSpec(step="step", injection=Injection("concat")),
     lambda m, h, x: m.step(torch.cat([h, x], -1))),
    (lambda: Chain(half_plus), LoopSpec(step="step", init="embed", injection=Injection("function", module="embed",
                                                                                       fn=lambda m, h, e: 0.5 * h + e)),
     lambda m, h, x: m.step(0.5 * h + x)),
    (lambda: Chain(lambda h, x: h), LoopSpec(step="step"), lambda m, h, x: m.step(h)),
    (ArgChain, LoopSpec(step="step", state_in="h", injection=Injection("argument", arg="e")),
     lambda m, h, x: m.step(h, x)),
])
def test_the_jacobian_re_runs_the_step_as_declared(model, spec, one_step):
    if isinstance(spec.injection, Injection) and spec.injection.arg == "e":
        model = ArgChainByName
    m = model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a step re-run that differs would warn and drop the Jacobian
        (trace,) = record(m, spec, probes=["jacobian"])
    x = m.embed(ids)
    h, want = x, []
    for _ in range(3):
        want.append(jacobian_sigma_max(lambda v: one_step(m, v, x[:1]), h[:1]).item())
        h = one_step(m, h, x)
    np.testing.assert_allclose(trace.iteration_metrics["jacobian_sigma_max"], want, rtol=1e-5)


class ArgChainByName(ArgChain):
    """h ← step(h=h, e=x): the state and e passed by name."""

    def forward(self, input_ids):
        x = self.embed(input_ids)
        h = x
        for _ in range(3):
            h = self.step(h=h, e=x)
        return h


class NoisyStep(nn.Module):
    def __init__(self, fail_on_one=False):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.fail_on_one = fail_on_one

    def forward(self, h):
        if self.fail_on_one and h.shape[0] == 1:
            raise RuntimeError("no batch of one")
        noise = 0.0 if self.fail_on_one else 0.1 * torch.randn_like(h)
        return torch.tanh(self.lin(h) + noise)


class Noisy(nn.Module):
    def __init__(self, fail_on_one=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = NoisyStep(fail_on_one)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for _ in range(3):
            h = self.step(h)
        return h


@pytest.mark.parametrize("fail_on_one, message", [
    (False, "LoopSpec.injection: re-running loop 'loop''s step from h_{t−1} and the declared injection does not give "
            "the recorded h_t (iteration 0): the step is not a function of the declared state and injection alone "
            "(noise, another carried tensor, or an input built another way); jacobian_sigma_max is left out rather "
            "than the derivative of another map"),
    (True, "LoopSpec: loop 'loop''s step cannot be re-run from the declared state and injection (RuntimeError: no "
           "batch of one); jacobian_sigma_max is left out"),
])
def test_a_step_that_cannot_be_re_run_leaves_the_jacobian_out_once(fail_on_one, message):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traces = record(Noisy(fail_on_one), LoopSpec(step="step"), calls=2, probes=["jacobian", "convergence"])
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == [message]
    assert all("jacobian_sigma_max" not in t.iteration_metrics for t in traces) and len(traces) == 2


def test_a_pass_declared_backwards_is_refused():
    with pytest.raises(ValueError) as err:
        mythos_probe.attach(PassModel(), spec=LoopSpec(first="layers.1", last="layers.0")).__enter__()
    assert str(err.value) == "LoopSpec.last 'layers.0' comes before first 'layers.1' in their ModuleList"


# -- the readout ---------------------------------------------------------------------------------------


class WithHead(Chain):
    def __init__(self):
        super().__init__(lambda h, x: h)
        self.head = nn.Linear(8, 32)

    def forward(self, input_ids):
        return self.head(super().forward(input_ids))


@pytest.mark.parametrize("readout, message", [
    (lambda m, s: m.head(s).sum(-1),
     "LoopSpec.readout of loop 'loop' gives Tensor(2, 5); it must end at the (B, T, vocab) logits"),
    (lambda m, s: None, "LoopSpec.readout of loop 'loop' gives NoneType; it must end at the (B, T, vocab) logits"),
    (lambda m, s: m.head(s)[..., :16],
     "LoopSpec.readout of loop 'loop' gives logits of shape (2, 5, 16), the model returns (2, 5, 32); readout= must "
     "end at the logits"),
])
def test_a_readout_that_does_not_end_at_the_logits_is_named(readout, message):
    assert error_of(WithHead(), LoopSpec(step="step", readout=readout)) == message


def test_the_lens_is_the_readout_of_each_state_against_the_models_logits():
    model = WithHead()
    (trace,) = record(model, LoopSpec(step="step", readout="head"), probes=["lens"], lens_positions="all")
    (trace_fn,) = record(model, LoopSpec(step="step", readout=lambda m, s: m.head(s)), probes=["lens"],
                         lens_positions="all")
    h, entropy, kl = model.embed(ids), [], []
    states = []
    for _ in range(3):
        h = model.step(h)
        states.append(h)
    final = model.head(states[-1]).log_softmax(-1)
    for s in states:
        logp = model.head(s).log_softmax(-1)
        entropy.append(-(logp.exp() * logp).sum(-1).mean().item())
        kl.append((final.exp() * (final - logp)).sum(-1).mean().item())
    for t in (trace, trace_fn):
        np.testing.assert_allclose(t.iteration_metrics["lens_entropy"], entropy, rtol=1e-5)
        np.testing.assert_allclose(t.iteration_metrics["lens_kl_final"], kl, rtol=1e-4, atol=1e-7)


class OtherPasses(PassModel):
    """The same loop with its layers in a Sequential (not a ModuleList), or each iteration ending
    in a module outside the list (`tail`)."""

    def __init__(self, sequential=False):
        super().__init__()
        if sequential:
            self.layers = nn.Sequential(*self.layers)
        self.tail = nn.Identity() if sequential else nn.Tanh()

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for _ in range(3):
            for layer, s in zip(self.layers, self.scales):
                h = layer(h, scale=s)
            h = self.tail(h)
        return h


@pytest.mark.parametrize("sequential, last, shown", [(True, "layers.1", "layers.0 … layers.1"),
                                                      (False, "tail", "layers.0 … tail")])
def test_a_pass_that_is_not_a_run_of_one_modulelist_has_no_jacobian(sequential, last, shown):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traces = record(OtherPasses(sequential), LoopSpec(first="layers.0", last=last), calls=2,
                        probes=["jacobian", "convergence"])
    assert [t.iterations for t in traces] == [3, 3]
    assert all("jacobian_sigma_max" not in t.iteration_metrics for t in traces)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == [  # once, not per forward
        f"LoopSpec.first/last: loop 'loop''s pass ({shown}) is not a run of entries of one ModuleList taking the state "
        "first, so the pass cannot be re-run to differentiate it; jacobian_sigma_max is left out (declare step= or "
        "method= for a module that runs one iteration)"]


# -- a loop declared by its method ---------------------------------------------------------------


class ByMethod(nn.Module):
    def __init__(self, fail_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.lin = nn.Linear(8, 8)
        self.fail_at, self.calls = fail_at, 0

    def iterate(self, h):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("iteration failed")
        return torch.tanh(self.lin(h))

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for _ in range(3):
            h = self.iterate(h)
        return h


def test_a_method_loop_records_its_iterations_and_a_raising_forward_records_nothing():
    model = ByMethod()
    (trace,) = record(model, LoopSpec(method="iterate"), probes=["convergence"])
    assert trace.iterations == 3 and "iterate" not in vars(model)
    failing = ByMethod(fail_at=2)
    with torch.no_grad(), mythos_probe.attach(failing, spec=LoopSpec(method="iterate")) as rec:
        with pytest.raises(RuntimeError, match="iteration failed"):
            failing(ids)
        failing(ids)  # the next forward is recorded whole
    assert [t.iterations for t in rec.traces] == [3]
    assert "iterate" not in vars(failing) and no_hooks(failing)


# -- more router fields ----------------------------------------------------------------------------


class Flags(Gate):
    def __init__(self):
        super().__init__()
        self.flag, self.zero = True, 0
        self.register_buffer("short", torch.zeros(3))


def test_router_attributes_of_the_wrong_kind_are_named():
    def fails(**changes):
        model = Routed()
        model.step.gate = Flags()
        return error_of(model, routed(**changes), probes=["experts"])

    assert fails(top_k="flag") == (
        "LoopSpec.routers[0].select picks Tensor from the router 'step.gate' output (tuple); it must pick the (tokens, "
        "experts) logits (and top_k must give an int, got True)")
    assert fails(top_k="zero") == "LoopSpec.routers[0].top_k: 0 is not between 1 and the router's 4 experts"
    assert fails(bias="short") == "LoopSpec.routers[0].bias: Flags has no tensor 'short' with one value per expert (4)"
    assert fails(select=lambda out: out[0][0, 0]) == (  # one row: (experts,)
        "LoopSpec.routers[0].select picks Tensor from the router 'step.gate' output (tuple); it must pick the (tokens, "
        "experts) logits (and top_k must give an int, got 2)")


class TwoGates(nn.Module):
    def __init__(self, experts=(4, 4)):
        super().__init__()
        self.a, self.b = Gate(experts[0]), Gate(experts[1])
        self.lin = nn.Linear(8, 8)

    def forward(self, h):
        self.a(h)
        self.b(h)
        return torch.tanh(self.lin(h))


@pytest.mark.parametrize("experts", [(4, 4), (4, 6)])
def test_two_routers_of_one_loop(experts):
    model = Routed()
    model.step = TwoGates(experts)
    spec = LoopSpec(step="step", routers=tuple(
        Router(f"step.{g}", top_k="top_k", scoring="sigmoid", select=0, bias="correction", indices=1) for g in "ab"))
    if experts[0] != experts[1]:
        assert error_of(model, spec, probes=["experts"]) == (
            "LoopSpec.routers: the routers of one loop must have the same number of experts")
        return
    (trace,) = record(model, spec, probes=["experts"])
    h, loads = model.embed(ids), []
    for _ in range(3):
        chosen = torch.cat([model.step.a(h)[1].reshape(-1, 2), model.step.b(h)[1].reshape(-1, 2)])
        loads.append(np.bincount(chosen.reshape(-1).numpy(), minlength=4))
        h = model.step(h)
    np.testing.assert_array_equal(trace.expert_load, np.stack(loads))


class SoftmaxGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 4)
        with torch.no_grad():
            self.proj.weight.mul_(4)

    def forward(self, h):
        logits = self.proj(h)
        return logits, logits.softmax(-1).topk(2, dim=-1).indices


def test_a_softmax_router_without_bias():
    model = Routed()
    model.step.gate = SoftmaxGate()
    (trace,) = record(model, LoopSpec(step="step", routers=(Router("step.gate", top_k=2, select=0, indices=1),)),
                      probes=["experts"])
    h, loads, entropy = model.embed(ids), [], []
    for _ in range(3):
        logits, chosen = model.step.gate(h)
        loads.append(np.bincount(chosen.reshape(-1).numpy(), minlength=4))
        p = logits.softmax(-1)
        entropy.append(-(p * p.log()).sum(-1).mean().item())
        h = model.step(h)
    np.testing.assert_array_equal(trace.expert_load, np.stack(loads))
    np.testing.assert_allclose(trace.iteration_metrics["routing_entropy"], entropy, rtol=1e-5)


def test_a_lens_only_readout_is_not_read_as_the_state_the_model_kept():
    """A readout the model never calls (a lens, readout_is_output=False): the lens's own calls of
    it, between iterations, are not the model's input to its readout after the loop, which is
    where the state kept after the last iteration is read."""
    model = WithHead()
    model.lens_head = nn.Linear(8, 32)  # never called by forward
    spec = LoopSpec(step="step", readout="lens_head", readout_is_output=False)
    (trace,) = record(model, spec, probes=["lens", "convergence"], detail="positions")
    np.testing.assert_array_equal(trace.position_iterations, np.full((2, 5), 3))
    assert trace.iterations == 3


# -- halting rules, against the rule computed by hand ----------------------------------------------------


class Halts(nn.Module):
    """A halting head read on each iteration's end state (Ouro's exit gate); the model itself
    always runs `steps` iterations, so only the declared rule decides the exits."""

    def __init__(self, probability=False, steps=4):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        gate = nn.Linear(8, 1)
        with torch.no_grad():
            gate.weight.normal_(0, 2.0)  # probabilities spread over (0, 1): positions exit at different steps
        self.head = nn.Sequential(gate, nn.Sigmoid()) if probability else gate
        self.steps = steps

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for _ in range(self.steps):
            h = self.step(h)
            self.head(h)
        return h

    @torch.no_grad()
    def lambdas(self):
        h, out = self.embed(ids), []
        for _ in range(self.steps):
            h = self.step(h)
            v = self.head(h).squeeze(-1)
            out.append(v if isinstance(self.head, nn.Sequential) else torch.sigmoid(v))
        return torch.stack(out).numpy()  # (I, B, T)


def per_position(a):
    """(I, B, T) → the trace's (B, T, I) layout of position metrics."""
    return np.moveaxis(a, 0, -1)


def by_hand(rule, lam, threshold):
    """(cum, weight, halted), each (I, B, T), of each rule from the halting probabilities."""
    I = lam.shape[0]
    cum, weight, halted = np.zeros_like(lam), np.zeros_like(lam), np.zeros(lam.shape, bool)
    remaining, total, was = np.ones_like(lam[0]), np.zeros_like(lam[0]), np.zeros(lam[0].shape, bool)
    for t in range(I):
        if rule == "threshold":
            now = was | (lam[t] >= threshold)
            weight[t], cum[t] = (now & ~was), now
        else:  # cumulative_exit / ponder: p_t = λ_t Π(1 − λ_s); cumulative_exit's last step takes what remains
            last = rule == "cumulative_exit" and t == I - 1
            weight[t] = remaining if last else lam[t] * remaining
            remaining = remaining * (1 - lam[t])
            total = total + weight[t]
            cum[t] = total
            now = (was | (total >= threshold) | last) if rule == "cumulative_exit" else was
        halted[t], was = now, now
    return cum, weight, halted


# thresholds where positions exit at different steps (threshold: 3, 5 more, 2 never; cumulative: 2, 8 at the 3rd)
@pytest.mark.parametrize("rule, threshold", [("threshold", 0.545), ("cumulative_exit", 0.8), ("ponder", 0.5)])
@pytest.mark.parametrize("probability", [False, True])
def test_each_exit_rule_against_the_rule_by_hand(rule, threshold, probability):
    from mythos_probe import Halting

    model = Halts(probability)
    spec = LoopSpec(step="step", halting=Halting("head", output="probability" if probability else "logit", rule=rule,
                                                 threshold=threshold))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ponder: the undeclared sampled exit is warned about (tested elsewhere)
        (trace,) = record(model, spec, probes=["halting"], detail="positions")
    lam = model.lambdas()
    cum, weight, halted = by_hand(rule, lam, threshold)
    pm = trace.position_metrics
    np.testing.assert_allclose(pm["halt_prob"], per_position(lam), rtol=1e-5)
    np.testing.assert_allclose(pm["cum_halt"], per_position(cum), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pm["act_weight"], per_position(weight), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(trace.iteration_metrics["halted_fraction"], halted.mean((1, 2)), rtol=1e-6)
    if rule != "ponder":
        first = np.where(halted.any(0), halted.argmax(0) + 1, lam.shape[0])
        np.testing.assert_array_equal(trace.position_iterations, first)


def test_a_fixed_exit_step_and_a_threshold_per_call():
    from mythos_probe import Halting

    model = Halts()
    lam = model.lambdas()
    fixed = LoopSpec(step="step", halting=Halting("head", output="logit", rule="threshold", threshold=0.545,
                                                  exit_step=lambda m, call: 1))
    (trace,) = record(model, fixed, probes=["halting"], detail="positions")
    np.testing.assert_array_equal(trace.iteration_metrics["halted_fraction"], [0, 1, 1, 1])
    np.testing.assert_array_equal(trace.position_iterations, np.full((2, 5), 2))
    per_call = LoopSpec(step="step", halting=Halting("head", output="logit", rule="threshold",
                                                     threshold=lambda m, call: 0.545))
    (trace,) = record(model, per_call, probes=["halting"], detail="positions")
    np.testing.assert_allclose(trace.iteration_metrics["halted_fraction"],
                               by_hand("threshold", lam, 0.545)[2].mean((1, 2)), rtol=1e-6)


@pytest.mark.parametrize("returned, message", [
    (-1, "LoopSpec.halting.exit_step returned -1; it must give a non-negative iteration or None"),
    (True, "LoopSpec.halting.exit_step returned True; it must give a non-negative iteration or None"),
    (1.0, "LoopSpec.halting.exit_step returned 1.0; it must give a non-negative iteration or None"),
])
def test_an_exit_step_that_is_not_an_iteration_is_named(returned, message):
    from mythos_probe import Halting

    spec = LoopSpec(step="step", halting=Halting("head", output="logit", rule="threshold", threshold=0.545,
                                                 exit_step=lambda m, call: returned))
    assert error_of(Halts(), spec, probes=["halting"]) == message


def test_an_exit_step_of_none_or_0_and_a_threshold_per_call_out_of_range():
    from mythos_probe import Halting

    lam = Halts().lambdas()
    for returned, halted in ((None, by_hand("threshold", lam, 0.545)[2].mean((1, 2))), (0, [1, 1, 1, 1])):
        spec = LoopSpec(step="step", halting=Halting("head", output="logit", rule="threshold", threshold=0.545,
                                                     exit_step=lambda m, call: returned))
        (trace,) = record(Halts(), spec, probes=["halting"])
        np.testing.assert_allclose(trace.iteration_metrics["halted_fraction"], halted, rtol=1e-6)
    spec = LoopSpec(step="step", halting=Halting("head", output="logit", rule="threshold",
                                                 threshold=lambda m, call: 1.5))
    with pytest.raises(ValueError, match=r"^LoopSpec.halting.threshold must be in \(0, 1\]"):
        record(Halts(), spec, probes=["halting"])


@pytest.mark.parametrize("module, message", [
    (None, "LoopSpec.init is needed with Injection('function') and no module: e is the pre-loop state (declare "
           "init='path' or init=lambda model: tensor)"),
    ("embed", "LoopSpec.init is needed with Injection('function'): the first iteration's input is fn(model, h_{−1}, "
              "e), not the pre-loop state h_{−1} (declare init='path' or init=lambda model: tensor)"),
])
def test_a_function_injection_needs_the_pre_loop_state(module, message):
    with pytest.raises(ValueError) as err:
        mythos_probe.attach(Chain(plus), spec=LoopSpec(step="step", injection=Injection("function", module=module,
                                                                                          fn=to_h_plus_e))).__enter__()
    assert str(err.value) == message


def test_a_readout_may_return_a_model_output_and_its_errors_name_it():
    model = WithHead()
    (trace,) = record(model, LoopSpec(step="step", readout=lambda m, s: (m.head(s),)), probes=["lens"])
    assert trace.iterations == 3  # the logits found in a tuple, as in a model's output
    assert error_of(model, LoopSpec(step="step", readout=lambda m, s: 1 / 0)) == (
        "LoopSpec.readout raised ZeroDivisionError: division by zero")


# -- what the declaration's callables and selectors are given, and their errors -------------------------------


@pytest.mark.parametrize("select, message", [
    (lambda out: out[:, :3, 0], "LoopSpec.halting.select: the head 'head' gives (2, 3); it must select one value per "
                                "position (2, 5) or per sequence (2,)"),
    (lambda out: 0.5, "LoopSpec.halting.select: the head 'head' gives float; it must select one value per position "
                      "(2, 5) or per sequence (2,)"),
    (lambda out: 1 / 0, "LoopSpec.halting.select raised ZeroDivisionError: division by zero"),
])
def test_a_halting_select_of_the_wrong_shape_or_that_raises_is_named(select, message):
    from mythos_probe import Halting

    spec = LoopSpec(step="step", halting=Halting("head", output="logit", rule="threshold", threshold=0.545,
                                                 select=select))
    assert error_of(Halts(), spec, probes=["halting"]) == message


def test_a_halting_select_per_sequence_is_given_the_heads_output_and_spread_over_its_positions():
    """select= gets the head's own output; one value per sequence holds for each of its positions."""
    from mythos_probe import Halting

    seen = []

    def first_position(out):
        seen.append(out.shape)
        return out[:, 0, 0]  # (B,): each sequence's first position

    spec = LoopSpec(step="step", halting=Halting("head", output="logit", rule="threshold", threshold=0.545,
                                                 select=first_position))
    model = Halts()
    (trace,) = record(model, spec, probes=["halting"], detail="positions")
    assert seen and all(shape == (2, 5, 1) for shape in seen)
    lam = np.repeat(model.lambdas()[:, :, :1], 5, axis=2)  # (I, B, T): the first position's λ everywhere
    np.testing.assert_allclose(trace.position_metrics["halt_prob"], per_position(lam), rtol=1e-5)
    halted = by_hand("threshold", lam, 0.545)[2]
    np.testing.assert_allclose(trace.iteration_metrics["halted_fraction"], halted.mean((1, 2)), rtol=1e-6)


def test_the_exit_step_and_threshold_callables_are_given_the_model_and_their_errors_name_them():
    from mythos_probe import Halting

    model = Halts()
    lam = model.lambdas()
    # read from the model (as Ouro's exit_at_step): exit after iteration steps - 3 = 1
    spec = LoopSpec(step="step", halting=Halting("head", output="logit", rule="threshold", threshold=0.545,
                                                 exit_step=lambda m, call: m.steps - 3))
    (trace,) = record(model, spec, probes=["halting"], detail="positions")
    np.testing.assert_array_equal(trace.position_iterations, np.full((2, 5), 2))
    model.gate_threshold = 0.545
    spec = LoopSpec(step="step", halting=Halting("head", output="logit", rule="threshold",
                                                 threshold=lambda m, call: m.gate_threshold))
    (trace,) = record(model, spec, probes=["halting"])
    np.testing.assert_allclose(trace.iteration_metrics["halted_fraction"],
                               by_hand("threshold", lam, 0.545)[2].mean((1, 2)), rtol=1e-6)
    for field, raising in (("exit_step", dict(threshold=0.545, exit_step=lambda m, call: m.no_such_field)),
                           ("threshold", dict(threshold=lambda m, call: m.no_such_field))):
        spec = LoopSpec(step="step", halting=Halting("head", output="logit", rule="threshold", **raising))
        assert error_of(model, spec, probes=["halting"]) == (
            f"LoopSpec.halting.{field} raised AttributeError: 'Halts' object has no attribute 'no_such_field'")


class KeywordHead(WithHead):
    """Calls its readout with the state as a keyword argument (`head(input=h)`): the readout's
    pre-hook sees no positional argument, so the state kept after the loop is not read there."""

    def forward(self, input_ids):
        return self.head(input=Chain.forward(self, input_ids))


def test_a_readout_called_with_keyword_arguments_only_is_recorded():
    model = KeywordHead()
    (trace,) = record(model, LoopSpec(step="step", readout="head"), probes=["lens", "convergence"],
                      detail="positions")
    assert trace.iterations == 3
    np.testing.assert_array_equal(trace.position_iterations, np.full((2, 5), 3))


class OneLayerPass(nn.Module):
    """Each iteration runs layer 0 alone, with a per-sequence `bias` of shape (B, T, 8) (as a
    layer takes a per-sequence mask); layer 1 runs once after the loop."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.layers = nn.ModuleList([Scaled(), Scaled()])
        self.bias = nn.Embedding(32, 8)

    def forward(self, input_ids):
        h, bias = self.embed(input_ids), self.bias(input_ids)
        for _ in range(3):
            h = self.layers[0](h, scale=bias)
        return self.layers[1](h)


def test_a_pass_of_one_layer_re_runs_it_with_the_first_sequences_arguments():
    """first == last: a pass of one entry of the ModuleList. Its Jacobian re-runs that layer on the
    first sequence with the first sequence's slice of every batch-shaped argument."""
    model = OneLayerPass()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a re-run that differs would warn and drop the Jacobian
        (trace,) = record(model, LoopSpec(first="layers.0", last="layers.0"), probes=["jacobian"])
    h, bias = model.embed(ids), model.bias(ids)
    want = []
    for _ in range(3):
        want.append(jacobian_sigma_max(lambda v: model.layers[0](v, scale=bias[:1]), h[:1]).item())
        h = model.layers[0](h, scale=bias)
    np.testing.assert_allclose(trace.iteration_metrics["jacobian_sigma_max"], want, rtol=1e-5)


class OwnExits(Halts):
    """Returns (state, the exit iteration it says each sequence took), as PonderNet returns its
    sampled exits; the loop itself runs all four iterations."""

    def __init__(self, exits):
        super().__init__()
        self.exits = exits

    def forward(self, input_ids):
        return super().forward(input_ids), self.exits


def exits_spec():
    from mythos_probe import Halting

    return LoopSpec(step="step", halting=Halting("head", output="logit", rule="threshold", threshold=0.545, exits=1),
                    readout_is_output=False)


def test_the_models_own_exits_are_the_iterations_used_and_checked_against_those_it_ran():
    (trace,) = record(OwnExits(torch.tensor([0, 3])), exits_spec(), probes=["halting"], detail="positions")
    np.testing.assert_array_equal(trace.position_iterations, [[1] * 5, [4] * 5])
    for exits in (torch.tensor([4, 1]), torch.tensor([1, -1])):  # past the 4 iterations run, before the first
        assert error_of(OwnExits(exits), exits_spec(), probes=["halting"]) == (
            "LoopSpec.halting.exits: the model's exits lie outside the 4 iterations it ran")
    assert error_of(OwnExits(torch.tensor([1.0, 2.0])), exits_spec(), probes=["halting"]) == (
        "LoopSpec.halting.exits picks Tensor from the model's output; it must pick the exit iteration (integers) per "
        "sequence (2,) or per position (2, 5)")


def test_a_declared_head_that_never_runs_is_warned_about_in_full():
    from mythos_probe import Halting

    model = Halts()
    model.spare = nn.Linear(8, 1)  # never called
    spec = LoopSpec(step="step", halting=Halting("spare", output="logit", rule="threshold", threshold=0.5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (trace,) = record(model, spec, probes=["halting", "convergence"])
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == [
        "LoopSpec.halting.head: 'loop' declares a module that never ran during the loop; its metrics are missing "
        "from the trace. Check the path"]
    assert trace.iterations == 4 and "halt_prob" not in trace.iteration_metrics


def test_a_restarting_loops_injection_is_its_first_input():
    """Injection('restart'): every iteration starts from the first one's input, which is the e the
    record carries (its norm, the injection's)."""
    model = Chain(lambda h, x: x)
    (trace,) = record(model, LoopSpec(step="step", injection=Injection("restart")), probes=["spectral"])
    assert trace.iterations == 3
    np.testing.assert_allclose(trace.iteration_metrics["norm_inject"], model.embed(ids).norm(dim=-1).mean().item(),
                               rtol=1e-5)


def test_a_concat_loops_init_is_checked_against_its_first_input():
    """With init= declared, iteration 0's input must be cat[init, e]: the model starts from h = x,
    not from the zeros declared."""
    model = Chain(lambda h, x: torch.cat([h, x], -1), width=16)
    spec = LoopSpec(step="step", init=lambda m: torch.zeros(8), injection=Injection("concat"))
    assert error_of(model, spec) == chained(
        0, "cat[previous end state, e]",
        "Either init= is not the pre-loop state (it must give what the model holds before iteration 0), or "
        "declare how the input is built (injection=Injection('added'|'concat'|'argument'|'restart'|'function', "
        "...)), or fix state= / last= (the end state: the pass's last module) and state_in= (the argument "
        "carrying the state)")
    (trace,) = record(model, LoopSpec(step="step", init="embed", injection=Injection("concat")), probes=["convergence"])
    assert trace.iterations == 3


def test_an_init_of_the_wrong_shape_and_a_readout_is_output_callable_that_raises_are_named():
    assert error_of(Chain(plus), LoopSpec(step="step", init=lambda m: torch.zeros(3),
                                          injection=Injection("added"))) == (
        "LoopSpec.init: loop 'loop' declares a pre-loop state of shape (3,), which does not broadcast to the loop's "
        "state (2, 5, 8); init must give the state before iteration 0 (or one row of it)")
    assert error_of(WithHead(), LoopSpec(step="step", readout="head", readout_is_output=lambda m, call: 1 / 0)) == (
        "LoopSpec.readout_is_output raised ZeroDivisionError: division by zero")


def test_the_readout_of_a_one_iteration_loop_is_checked():
    model = WithHead()
    model.steps = 1
    (trace,) = record(model, LoopSpec(step="step", readout="head"), probes=["lens"])
    assert trace.iterations == 1
    wrong = LoopSpec(step="step", readout=lambda m, s: 2 * m.head(s))
    assert error_of(model, wrong).startswith("LoopSpec.readout: loop 'loop''s readout of the end state differs from "
                                             "the logits the model returned at 10 of 10 positions.")


class MomentumByName(nn.Module):
    """(h, v) ← step(h, v=v, e=e): the second carried tensor passed by name."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = MomentumKwargsStep()

    def forward(self, input_ids):
        e = self.embed(input_ids)
        h, v = e, torch.zeros_like(e)
        for _ in range(3):
            h, v = self.step(h, v=v, e=e)
        return h


class MomentumKwargsStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(8, 8)

    def forward(self, h, v=None, e=None):
        v = 0.9 * v + torch.tanh(self.cell(h)) + e
        return h + 0.5 * v, v


def test_a_second_carried_tensor_passed_by_name_leaves_the_jacobian_out():
    spec = LoopSpec(step="step", state=0, injection=Injection("argument", arg="e"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (trace,) = record(MomentumByName(), spec, probes=["convergence", "jacobian"])
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == [
        "LoopSpec.state: loop 'loop''s step takes another tensor that changes every iteration (argument 'v'): a "
        "second carried state (a momentum beside h, say). jacobian_sigma_max would be the derivative of h with it "
        "held fixed, not of the map the model iterates, so it is left out"]
    assert "jacobian_sigma_max" not in trace.iteration_metrics and trace.iterations == 3


class Cache:
    """A KV cache as transformers' caches answer for their length (`get_seq_length`)."""

    def __init__(self):
        self.n = 0

    def get_seq_length(self):
        return self.n


class CachedChain(Chain):
    def __init__(self):
        super().__init__(lambda h, x: h)

    def forward(self, input_ids, past_key_values=None):
        out = super().forward(input_ids)
        past_key_values.n += input_ids.shape[1]
        return out


def test_forwards_on_one_kv_cache_share_a_trace_id_and_count_decode_steps():
    """A prefill and two decode steps on one cache: one trace id, steps 0, 1, 2; a new cache (its
    length 0) starts a new request. A loop without halting records its exit policy as unknown."""
    model = CachedChain()
    first, second = Cache(), Cache()
    with torch.no_grad(), mythos_probe.attach(model, spec=LoopSpec(step="step"), probes=["convergence"]) as rec:
        model(ids, past_key_values=first)
        model(ids[:, :1], past_key_values=first)
        model(ids[:, :1], past_key_values=first)
        model(ids, past_key_values=second)
    traces = rec.traces
    assert [t.step for t in traces] == [0, 1, 2, 0] and first.n == 7
    assert len({t.trace_id for t in traces[:3]}) == 1 and traces[3].trace_id != traces[0].trace_id
    assert [t.exit_policy for t in traces] == ["unknown"] * 4


def test_a_state_in_the_start_was_not_called_with_and_a_missing_looped_module_are_named():
    assert error_of(Chain(plus), LoopSpec(step="step", state_in=2)) == (
        "LoopSpec.state_in=2: the start of loop 'loop' was called with 1 positional arguments and []; name the "
        "argument that carries the state")
    with pytest.raises(ValueError) as err:
        mythos_probe.attach(Chain(plus), spec=LoopSpec(step="step", looped=("nope",))).__enter__()
    assert str(err.value) == ("LoopSpec.looped: Chain has no submodule 'nope'; its submodules include ['embed', 'step', "
                              "'step.0', 'step.1']")


@pytest.mark.parametrize("spec, message", [
    (LoopSpec(method="nope.run"), "LoopSpec.method: Chain has no submodule 'nope'; its submodules include ['embed', "
                                  "'step', 'step.0', 'step.1']"),
    (LoopSpec(method="step.nope"), "LoopSpec.method: Sequential has no method 'nope'"),
    (LoopSpec(step="step", init="nope"), "LoopSpec.init: Chain has no submodule 'nope'; its submodules include "
                                         "['embed', 'step', 'step.0', 'step.1']"),
])
def test_paths_to_nothing_are_named_by_their_field(spec, message):
    with pytest.raises(ValueError) as err:
        mythos_probe.attach(Chain(plus), spec=spec).__enter__()
    assert str(err.value) == message


@pytest.mark.parametrize("state, message", [
    (lambda out: out[0], "LoopSpec.state selects a Tensor of shape (5, 8) from the iteration's end output (Tensor); "
                         "it must pick the (B, T, D) state"),
    (lambda out: 0.5, "LoopSpec.state selects a float from the iteration's end output (Tensor); it must pick the "
                      "(B, T, D) state"),
])
def test_a_state_selector_that_does_not_pick_the_state_is_named(state, message):
    assert error_of(Chain(lambda h, x: h), LoopSpec(step="step", state=state)) == message


class FixedHead(nn.Module):
    """A halting head giving the same probabilities at every iteration, one per position."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values).reshape(1, -1, 1)

    def forward(self, h):
        return self.values.expand(h.shape[0], -1, 1)


def test_probabilities_of_exactly_0_and_1_are_accepted_and_a_threshold_of_none_never_exits():
    from mythos_probe import Halting

    model = Halts()
    model.head = FixedHead([0.0, 1.0, 0.5, 0.25, 1.0])
    spec = LoopSpec(step="step", halting=Halting("head", output="probability", rule="threshold", threshold=0.5))
    (trace,) = record(model, spec, probes=["halting"], detail="positions")
    np.testing.assert_array_equal(trace.position_iterations, [[4, 1, 1, 4, 1]] * 2)
    never = LoopSpec(step="step", halting=Halting("head", output="probability", rule="cumulative_exit", threshold=None))
    (trace,) = record(model, never, probes=["halting"])
    np.testing.assert_array_equal(trace.iteration_metrics["halted_fraction"], [0, 0, 0, 0])
    model.head = FixedHead([0.0, 1.5, 0.5, 0.25, 1.0])
    assert error_of(model, spec, probes=["halting"]) == (
        "LoopSpec.halting.output: the head 'head' gives values in [0, 1.5], outside [0, 1], but they are declared "
        "probabilities; declare Halting(..., output='logit') if the model applies a sigmoid")


# -- misdeclarations refused with their whole message (survivors of a second random sample) ----

SUBMODULES = "['embed', 'step', 'step.0', 'step.1', 'norm']"


@pytest.mark.parametrize("spec, message", [
    (LoopSpec(step="nope"), f"LoopSpec.step: AddedLoop has no submodule 'nope'; its submodules include {SUBMODULES}"),
    (LoopSpec(step="step", injection=Injection("added", module="nope")),
     f"LoopSpec.injection.module: AddedLoop has no submodule 'nope'; its submodules include {SUBMODULES}"),
    (LoopSpec(step="step", injection=Injection("added")),
     "LoopSpec.init is needed with Injection('added') and no module: the pre-loop state cannot be told apart "
     "from e at t = 0 (declare init='path' or init=lambda model: tensor)"),
])
def test_a_path_to_nothing_or_a_missing_init_is_refused_naming_the_field(spec, message):
    assert error_of(AddedLoop(), spec) == message


def test_an_injection_fn_returning_no_tensor_is_refused_naming_it():
    spec = LoopSpec(step="step", injection=Injection("function", fn=lambda m, h, e: "x"), init=lambda m: torch.zeros(8))
    with pytest.raises(TypeError) as err:
        record(AddedLoop(), spec)
    assert str(err.value) == "LoopSpec.injection.fn returned str, not the iteration's input tensor"


class KeywordState(nn.Module):
    """h ← step(h=h, scale=2.0): the state passed by keyword beside a float."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = ScaledByKeyword()

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for _ in range(3):
            h = self.step(h=h, scale=2.0)
        return h


class ScaledByKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h, scale):
        return torch.tanh(self.lin(h)) * scale


def test_a_state_in_that_picks_no_tensor_is_refused_naming_the_argument():
    message = error_of(KeywordState(), LoopSpec(step="step", state_in="scale"))
    assert message == ("LoopSpec.state_in='scale' picks a float from the start's inputs, not the state tensor; "
                       "name the argument that carries the state")
    (trace,) = record(KeywordState(), LoopSpec(step="step", state_in="h"), probes=["convergence"])
    assert trace.iterations == 3
