"""`SpecAdapter` (mythos_probe/probes/spec_adapter.py), more pins written against the classes of
mutants that survived a random sample of `scripts/mutation.sh mythos_probe/probes/spec_adapter.py`
(the first file of pins is test_spec_adapter_pins.py, whose tiny models these reuse):

- FLOPs without a config: the parameters each kind of declaration counts as looped (step=,
  first/last in one ModuleList, a pass ending outside it, a Sequential, method=, looped=), the
  non-looped ones counted once (in the first loop only), and the useful FLOPs of positions that
  exit early, all against parameter counts taken by hand;
- every message a misdeclaration gets that no other test writes out in full (a message matched on
  its first words lets the rest of it say anything), and the field each path resolves under;
- warnings given once per attach, not once per forward;
- the injection e each mode records at each iteration (`norm_inject`) and the pre-loop state it
  derives, where the right and the wrong source differ;
- the Jacobian's re-runs: which changing step arguments are a second carried state, which are
  sliced to the first sequence, and that a counter or KV cache of the model is left alone;
- exits: the readout check lines each position's logits up with its own exit state; where the
  readout is not compared; exits per position; thresholds reached exactly;
- per-token depths: a fixed point is not a frozen position, iterations before the first freeze;
- forwards: sampled recording and sampled checks, KV caches by either name, call arguments given
  to the declaration's callables, the logits= selector;
- where each warning points (the user's line, not torch's module code)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mythos_probe
from mythos_probe import Halting, Injection, LoopSpec, Router
from tests.probes.looped_models import no_hooks
from tests.probes.test_spec_adapter_pins import (
    ByMethod, Chain, Halts, OneLayerPass, OtherPasses, Outside, PassModel, Routed, TwoLevels, WithHead, by_hand, error_of, ids,
    plus, record, routed,
)

TOKENS = ids.numel()


def n(*modules) -> int:
    """Parameters of `modules`, each counted once."""
    return sum({id(p): p.numel() for m in modules for p in m.parameters()}.values())


def warned(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning) and str(w.message).startswith("LoopSpec")]


# -- FLOPs: what each declaration counts as looped -------------------------------------------------


def pass_to_other_list():
    """Each iteration runs layers 0, 1 and 2 of one ModuleList, then `blocks.0` of another."""
    model = OtherPasses()
    model.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
    model.tail = model.blocks[0]
    model.scales = (1.0, 1.0, 1.0)
    return model


@pytest.mark.parametrize("make, spec, looped", [
    (WithHead, LoopSpec(step="step"), lambda m: [m.step]),
    (WithHead, LoopSpec(step="step", looped=("step.0",)), lambda m: [m.step[0]]),
    # a pass of entries 0..1 of a ModuleList of 3: the third runs after the loop, not per iteration
    (PassModel, LoopSpec(first="layers.0", last="layers.1"), lambda m: [m.layers[0], m.layers[1]]),
    (OneLayerPass, LoopSpec(first="layers.0", last="layers.0"), lambda m: [m.layers[0]]),
    # a pass ending outside the list: every entry from first to the list's end, and the last module
    (OtherPasses, LoopSpec(first="layers.0", last="tail"), lambda m: list(m.layers)),
    (pass_to_other_list, LoopSpec(first="layers.0", last="blocks.0"), lambda m: list(m.layers) + [m.blocks[0]]),
    # not a ModuleList: the last module only
    (lambda: OtherPasses(sequential=True), LoopSpec(first="layers.0", last="layers.1"), lambda m: [m.layers[1]]),
    (WithHead, LoopSpec(method="step.forward"), lambda m: [m.step]),
])
def test_flops_count_the_looped_parameters_once_per_iteration(make, spec, looped):
    """flops = 2·tokens·(other + I·looped), loop_flops = 2·tokens·I·looped, the embedding
    counted in neither (a lookup, not a matmul)."""
    model = make()
    model.extra = nn.Linear(8, 3)  # run by no one: a parameter outside the loop
    (trace,) = record(model, spec, probes=["cost"])
    loop = n(*looped(model))
    other = n(model) - n(*(m for m in model.modules() if isinstance(m, nn.Embedding))) - loop
    assert loop > 0 and other > 0  # both terms show in the sums
    I = trace.iterations
    assert trace.forward_metrics["flops"] == pytest.approx(2.0 * TOKENS * (other + I * loop), rel=1e-12)
    assert trace.forward_metrics["loop_flops"] == pytest.approx(2.0 * TOKENS * I * loop, rel=1e-12)
    assert trace.forward_metrics["useful_flops"] == pytest.approx(trace.forward_metrics["flops"])  # all used all


def test_a_method_of_the_model_itself_counts_no_looped_parameters():
    """method= on the model: its parameters are not the loop's, so no FLOPs are guessed."""
    (trace,) = record(ByMethod(), LoopSpec(method="iterate"), probes=["cost", "convergence"])
    assert trace.iterations == 3
    assert not {"flops", "loop_flops", "useful_flops"} & set(trace.forward_metrics)


def test_the_parameters_outside_the_loops_are_counted_in_the_first_loop_only():
    model = TwoLevels()
    model.extra = nn.Linear(8, 4)  # neither loop's: counted once, in the first loop's trace
    zeros = lambda m: torch.zeros(8)  # noqa: E731
    low, high = record(model, (LoopSpec(step="low", name="low", injection=Injection("added"), init=zeros),
                               LoopSpec(step="high", name="high", injection=Injection("added"), init=zeros)),
                       probes=["cost"])
    assert low.forward_metrics["flops"] == pytest.approx(2.0 * TOKENS * (n(model.extra) + 6 * n(model.low)))
    assert high.forward_metrics["flops"] == pytest.approx(2.0 * TOKENS * 3 * n(model.high))


def test_useful_flops_count_each_positions_own_iterations():
    """Positions exit at different steps: useful FLOPs count the looped parameters once per
    iteration each position used (from the rule by hand), the rest once per token."""
    model = Halts()
    spec = LoopSpec(step="step", halting=Halting("head", output="logit", rule="threshold", threshold=0.545))
    (trace,) = record(model, spec, probes=["cost", "halting"], detail="positions")
    halted = by_hand("threshold", model.lambdas(), 0.545)[2]
    used = np.where(halted.any(0), halted.argmax(0) + 1, 4)
    assert len(np.unique(used)) > 1
    np.testing.assert_array_equal(trace.position_iterations, used)
    loop, other = n(model.step), n(model.head)
    assert trace.forward_metrics["useful_flops"] == pytest.approx(2.0 * (TOKENS * other + used.sum() * loop))
    assert trace.forward_metrics["flops"] == pytest.approx(2.0 * TOKENS * (other + 4 * loop))


# -- messages in full ------------------------------------------------------------------------------


def attach_error(model, spec, error=ValueError) -> str:
    with pytest.raises(error) as err:
        mythos_probe.attach(model, spec=spec).__enter__()
    assert no_hooks(model)
    return str(err.value)


def test_a_modulelist_or_moduledict_as_step_is_refused_naming_the_pass():
    assert attach_error(PassModel(), LoopSpec(step="layers")) == (
        "LoopSpec.step 'layers' is a ModuleList, which is never called itself, so nothing would be recorded; "
        "declare the pass instead: first='layers.0', last='layers.2'")
    model = PassModel()
    model.blocks = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)})
    assert attach_error(model, LoopSpec(step="blocks")) == (
        "LoopSpec.step 'blocks' is a ModuleDict, which is never called itself, so nothing would be recorded; "
        "declare the pass instead: first='blocks.0', last='blocks.1'")


def test_two_loops_of_one_name_are_refused():
    spec = LoopSpec(step="low")
    assert attach_error(TwoLevels(), (spec, LoopSpec(step="high"))) == (
        "LoopSpec.name must differ between the loops of one model, got ['loop', 'loop']")


SUBMODULES = "['embed', 'step', 'step.0', 'step.1', 'head']"


@pytest.mark.parametrize("spec, field", [
    (LoopSpec(first="nope", last="head"), "first"),
    (LoopSpec(first="step.0", last="nope"), "last"),
    (LoopSpec(step="step", halting=Halting("nope")), "halting.head"),
    (LoopSpec(step="step", readout="nope"), "readout"),
    (LoopSpec(step="step", readout=("head", "nope")), "readout"),
    (LoopSpec(step="step", routers=(Router("head", top_k=1), Router("nope", top_k=1))), "routers[1].module"),
])
def test_each_path_to_nothing_is_named_by_its_field(spec, field):
    assert attach_error(WithHead(), spec) == (
        f"LoopSpec.{field}: WithHead has no submodule 'nope'; its submodules include {SUBMODULES}")


def test_a_model_called_without_token_ids_is_refused_and_input_ids_by_name_is_read():
    model = Chain(lambda h, x: h)
    with torch.no_grad(), mythos_probe.attach(model, spec=LoopSpec(step="step"), probes=["convergence"]) as rec:
        for bad in (ids[0], ids[None]):  # (seq,) and (1, batch, seq)
            with pytest.raises(ValueError) as err:
                model(bad)
            assert str(err.value) == ("LoopSpec models must take (batch, seq) token ids as their first argument or "
                                      "input_ids=")
        model(input_ids=ids)
    assert [t.iterations for t in rec.traces] == [3]
    assert rec.traces[0].exit_policy == "unknown" and rec.traces[0].n_loops == 3  # n_loops: the iterations run


class Shrinking(Chain):
    """Each iteration drops the state's last feature: the end state does not keep one shape."""

    def __init__(self):
        super().__init__(plus)
        self.step = nn.Sequential(nn.Linear(8, 7), nn.Tanh())

    def forward(self, input_ids):
        return self.step(self.embed(input_ids))


def test_an_end_state_of_another_shape_is_named():
    assert error_of(Shrinking(), LoopSpec(step="step")) == (
        "LoopSpec.state: loop 'loop' iteration 0 ends with a state of shape (2, 5, 7) but the previous state has "
        "shape (2, 5, 8); the end state must keep one shape (check state= / init=)")


def test_an_init_that_gives_no_tensor_or_runs_too_late_is_named():
    with pytest.raises(TypeError) as err:
        record(Chain(plus), LoopSpec(step="step", init=lambda m: 0.5))
    assert str(err.value) == "LoopSpec.init: the callable returned float, not the pre-loop state tensor"
    assert error_of(WithHead(), LoopSpec(step="step", init="head")) == (
        "LoopSpec.init: module 'head' did not run before the loop's first iteration (loop 'loop'); name the module "
        "whose output is the pre-loop state")


def test_an_injection_module_that_runs_inside_the_step_is_named():
    assert error_of(Chain(plus), LoopSpec(step="step", injection=Injection("added", module="step.0"))) == (
        "LoopSpec.injection.module: 'step.0' had not run when iteration 0 of loop 'loop' started; e must be the "
        "output of a module that runs before each iteration (not inside the step)")


def never_ran(field, name, where):
    return (f"LoopSpec.{field}: loop {name!r} ({where}) never ran an iteration in this forward, so no trace was "
            "recorded for it; check the path")


def spare_pass():
    model = PassModel()
    model.spare = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])  # never called
    return model


def spare_step():
    model = WithHead()
    model.spare = nn.Linear(8, 8)
    return model


@pytest.mark.parametrize("make, spec, message", [
    (spare_step, LoopSpec(step="spare"), never_ran("step", "loop", "spare")),
    (Outside, LoopSpec(method="inner", name="inner loop"), never_ran("method", "inner loop", "inner")),
    (spare_pass, LoopSpec(first="spare.0", last="spare.1"), never_ran("first/last", "loop", "spare.0 … spare.1")),
])
def test_a_loop_that_never_ran_is_named_by_the_field_that_declares_it(make, spec, message):
    model = make()
    traces = []
    assert warned(lambda: traces.extend(record(model, spec, probes=["convergence"]))) == [message]
    assert traces == []


def test_a_router_that_never_ran_is_named():
    model = Routed()
    model.spare = nn.Linear(8, 4)
    spec = LoopSpec(step="step", routers=(Router("spare", top_k=2), Router("step.gate", top_k=2, select=0)))
    traces = []
    assert warned(lambda: traces.extend(record(model, spec, probes=["experts"]))) == [
        "LoopSpec.routers[0].module: 'loop' declares a module that never ran during the loop; its metrics are "
        "missing from the trace. Check the path"]
    np.testing.assert_array_equal(traces[0].expert_load.sum(1), [TOKENS * 2] * 3)  # the second router's choices


def test_a_restarting_loop_says_once_why_it_has_no_jacobian():
    traces = []
    message = warned(lambda: traces.extend(record(Chain(lambda h, x: x), LoopSpec(step="step", injection=Injection(
        "restart")), calls=2, probes=["jacobian", "convergence"])))
    assert message == [
        "LoopSpec.injection: loop 'loop' restarts every pass from the pre-loop state (Injection('restart')), so a "
        "pass is not a function of h_{t−1}; jacobian_sigma_max is left out"]
    assert [t.iterations for t in traces] == [3, 3]
    assert all("jacobian_sigma_max" not in t.iteration_metrics for t in traces)


def test_an_undeclared_sampled_exit_is_warned_about_once_in_full():
    spec = LoopSpec(step="step", halting=Halting("head", output="logit", rule="ponder", threshold=0.5))
    traces = []
    assert warned(lambda: traces.extend(record(Halts(), spec, calls=3, probes=["halting"]))) == [
        "LoopSpec.halting.exits: loop 'loop' samples its exit (rule 'ponder') but the declaration does not say where "
        "the model returns it, so the trace records the halting distribution's expectation only; declare "
        "Halting(..., exits=<selector of the sampled exit>)"]
    assert len(traces) == 3


# -- the readout check against each position's exit ------------------------------------------------


class HaltsWithHead(Halts):
    """`Halts` (the model runs all 4 iterations, its gate read on each end state) returning the
    logits of the last state: positions the declared rule exits earlier do not match."""

    def __init__(self):
        super().__init__()
        self.lm = nn.Linear(8, 32)

    def forward(self, input_ids):
        return self.lm(super().forward(input_ids))


READOUT_HINT = ("Fix readout= (the path from the end state to the logits), state= or last= (the end state), "
                "halting= (the exit the model takes); or declare readout_is_output=False if the readout is a "
                "partial lens by design")


def test_the_readout_is_checked_at_each_positions_own_exit():
    model = HaltsWithHead()
    halted = by_hand("threshold", model.lambdas(), 0.545)[2]
    early = int((halted[:3].any(0)).sum())  # positions exiting before the last iteration
    assert 0 < early < TOKENS
    spec = LoopSpec(step="step", readout="lm",
                    halting=Halting("head", output="logit", rule="threshold", threshold=0.545))
    assert error_of(model, spec, probes=["halting"]) == (
        f"LoopSpec.readout: loop 'loop''s readout of the end state at each position's recorded exit (halting=) "
        f"differs from the logits the model returned at {early} of {TOKENS} positions. {READOUT_HINT}")
    # a threshold no position reaches: every exit is the last iteration, which the logits are
    (trace,) = record(model, LoopSpec(step="step", readout="lm", halting=Halting(
        "head", output="logit", rule="threshold", threshold=1.0)), probes=["halting"], detail="positions")
    np.testing.assert_array_equal(trace.position_iterations, np.full((2, 5), 4))


def test_a_wrong_readout_without_halting_is_named_in_full():
    assert error_of(WithHead(), LoopSpec(step="step", readout=lambda m, s: 2 * m.head(s))) == (
        f"LoopSpec.readout: loop 'loop''s readout of the end state differs from the logits the model returned at "
        f"10 of 10 positions. {READOUT_HINT}")


# -- the injection e each mode records, per iteration -----------------------------------------------


class VaryingInjection(nn.Module):
    """h ← step(h + inj(x·(t+1))) from h = 0: the injection module runs before each iteration and
    gives another e every time."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.inj = nn.Linear(8, 8)
        self.step = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def forward(self, input_ids):
        x = self.embed(input_ids)
        h = torch.zeros_like(x)
        for t in range(3):
            h = self.step(h + self.inj(x * (t + 1)))
        return h

    @torch.no_grad()
    def injections(self):
        x = self.embed(ids)
        return [self.inj(x * (t + 1)) for t in range(3)]


def mean_norm(e) -> float:
    return e.norm(dim=-1).mean().item()


def test_an_added_injection_module_gives_each_iteration_its_own_e():
    """e of iteration t is the module's output before iteration t: it may differ every
    iteration (the added-term check is for the no-module case only)."""
    model = VaryingInjection()
    (trace,) = record(model, LoopSpec(step="step", injection=Injection("added", module="inj")),
                      probes=["spectral", "convergence"])
    want = [mean_norm(e) for e in model.injections()]
    assert len(set(np.round(want, 3))) == 3  # the three e differ
    np.testing.assert_allclose(trace.iteration_metrics["norm_inject"], want, rtol=1e-5)
    # h_{−1} = (first input) − e = 0: iteration 0's relative step is 1 at every position
    np.testing.assert_allclose(trace.iteration_metrics["rel_residual"], rel_steps(model, torch.zeros(2, 5, 8)), rtol=1e-5)
    assert trace.iteration_metrics["rel_residual"][0] == pytest.approx(1.0)


class ArgByName(nn.Module):
    """h ← step(h=h, e=x) from h = x."""

    def __init__(self):
        super().__init__()
        from tests.probes.test_spec_adapter_pins import ArgStep

        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = ArgStep()

    def forward(self, input_ids):
        x = self.embed(input_ids)
        h = x
        for _ in range(3):
            h = self.step(h=h, e=x)
        return h


class FromZero(nn.Module):
    """h ← step(h + x) from h = 0 (the pre-loop state is not e)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def forward(self, input_ids):
        x = self.embed(input_ids)
        h = torch.zeros_like(x)
        for _ in range(3):
            h = self.step(h + x)
        return h


zeros8 = lambda m: torch.zeros(8)  # noqa: E731


@pytest.mark.parametrize("make, spec", [
    (ArgByName, LoopSpec(step="step", state_in="h", injection=Injection("argument", arg="e"))),
    (ArgByName, LoopSpec(step="step", state_in="h", injection=Injection("argument", module="embed"))),
    (FromZero, LoopSpec(step="step", init=zeros8, injection=Injection("function", module="embed",
                                                                       fn=lambda m, h, e: h + e))),
    (FromZero, LoopSpec(step="step", init=zeros8, injection=Injection("added"))),
    (FromZero, LoopSpec(step="step", injection=Injection("added", module="embed"))),
    (lambda: Chain(lambda h, x: torch.cat([h, x], -1), width=16), LoopSpec(step="step", injection=Injection("concat"))),
])
def test_each_mode_records_the_token_embedding_as_e_at_every_iteration(make, spec):
    """In each of these models e is x, the token embedding, at every iteration (not the pre-loop
    state, which is 0 or x, nor None); the pre-loop state each mode derives is the model's own
    (0 where it starts from zeros, else x), seen in iteration 0's relative step."""
    model = make()
    (trace,) = record(model, spec, probes=["spectral", "convergence"])
    x = model.embed(ids)
    np.testing.assert_allclose(trace.iteration_metrics["norm_inject"], [mean_norm(x)] * 3, rtol=1e-5)
    h_before = torch.zeros_like(x) if isinstance(model, FromZero) else x
    np.testing.assert_allclose(trace.iteration_metrics["rel_residual"], rel_steps(model, h_before), rtol=1e-5)


def rel_steps(model, h_before) -> list[float]:
    """mean ‖h_t − h_{t−1}‖ / ‖h_t‖ per iteration, from the step's outputs in a plain forward."""
    states = [h_before]
    handle = model.step.register_forward_hook(lambda m, a, out: states.append(out.detach()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return [((b - a).norm(dim=-1) / b.norm(dim=-1)).mean().item() for a, b in zip(states, states[1:])]


def test_a_loop_without_injection_records_no_e():
    (trace,) = record(Chain(lambda h, x: h), LoopSpec(step="step"), probes=["spectral", "convergence"])
    assert trace.iterations == 3 and "norm_inject" not in trace.iteration_metrics


# -- what a forward's context carries: the Jacobian's re-run, the lens, the exit policy ----------------


def test_the_jacobian_of_a_method_loop_re_calls_the_method():
    from mythos_probe.metrics.spectral import jacobian_sigma_max

    model = ByMethod()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a re-run that fails or differs would warn
        (trace,) = record(model, LoopSpec(method="iterate"), probes=["jacobian"])
    h, want = model.embed(ids), []
    for _ in range(3):
        want.append(jacobian_sigma_max(lambda v: torch.tanh(model.lin(v)), h[:1]).item())
        h = torch.tanh(model.lin(h))
    np.testing.assert_allclose(trace.iteration_metrics["jacobian_sigma_max"], want, rtol=1e-5)


def test_decode_steps_on_a_kv_cache_have_no_jacobian_and_the_prefill_has_one():
    from tests.probes.test_spec_adapter_pins import Cache, CachedChain

    model, cache = CachedChain(), Cache()
    with torch.no_grad(), mythos_probe.attach(model, spec=LoopSpec(step="step"), probes=["jacobian"]) as rec:
        model(ids, past_key_values=cache)
        model(ids[:, :1], past_key_values=cache)
        model(ids[:, :1], past_key_values=cache)
    assert [t.iterations for t in rec.traces] == [3, 3, 3]
    assert ["jacobian_sigma_max" in t.iteration_metrics for t in rec.traces] == [True, False, False]


def test_no_readout_means_no_lens_and_the_halting_rule_is_the_exit_policy():
    (trace,) = record(Chain(lambda h, x: h), LoopSpec(step="step"), probes=["lens", "convergence"])
    assert trace.iterations == 3 and not [k for k in trace.iteration_metrics if k.startswith("lens")]
    spec = LoopSpec(step="step", halting=Halting("head", output="logit", rule="cumulative_exit", threshold=0.8))
    (trace,) = record(Halts(), spec, probes=["halting"])
    assert trace.exit_policy == "cumulative_exit"


# -- per-token depths: a position at a fixed point is not a frozen one ----------------------------------


class FixedPointStep(nn.Module):
    """tanh(lin(h)) except at position 0, where the step returns its input unchanged (a fixed
    point: the output equals h_{t−1} there, yet the model uses it)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h):
        out = torch.tanh(self.lin(h))
        return torch.cat([h[:, :1], out[:, 1:]], dim=1)


class FixedPointDepths(nn.Module):
    """Per-token depths: position 1 runs one iteration, every other position all three (the
    model keeps position 1's state after its first iteration)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = FixedPointStep()
        self.depths = torch.tensor([3, 1, 3, 3, 3])

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for t in range(3):
            h = torch.where((t < self.depths)[None, :, None], self.step(h), h)
        return h


def test_a_position_whose_step_output_equals_its_state_is_counted_as_running():
    traces = record(FixedPointDepths(), LoopSpec(step="step"), calls=2, probes=["convergence"], detail="positions")
    for trace in traces:  # checked, then not
        np.testing.assert_array_equal(trace.position_iterations, [[3, 1, 3, 3, 3]] * 2)


# -- the step's other arguments: which of them are a second carried state -------------------------------


class ArgsStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h, e, pos, k, idx, rot, v=None):
        out = torch.tanh(self.lin(h) + e + pos * k + rot[0] * rot[1]) + 0.01 * idx[:, None, None].float()
        return out if v is None else out + 0.1 * v


class ArgsLoop(nn.Module):
    """h ← step(h, e_t, pos_t, k_t, idx_t, rot[, v=v_t]): beside the state, arguments that change
    every iteration yet are no carried state: e_t = x·(t+1) (the declared injection argument), a
    per-iteration feature vector pos_t (D,) and scalar k_t (no batch dimension), integer indices
    idx_t (B,), and a constant (cos, sin)-like pair; with `carry`, a momentum v = v/2 + h, which is
    a second carried state."""

    def __init__(self, carry=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = ArgsStep()
        self.carry = carry

    def arguments(self, x, t):
        return (x * (t + 1), torch.linspace(-1, 1, 8) * 0.1 * t, torch.tensor(1.0 + t),
                torch.full((x.shape[0],), t), (0.1 * x, 0.2 * x))

    def forward(self, input_ids):
        x = self.embed(input_ids)
        h, v = x, torch.zeros_like(x)
        for t in range(3):
            h_next = self.step(h, *self.arguments(x, t), **({"v": v} if self.carry else {}))
            v, h = 0.5 * v + h, h_next
        return h


ARGS_SPEC = LoopSpec(step="step", injection=Injection("argument", arg=1))


def test_arguments_that_change_but_carry_no_state_keep_the_jacobian():
    """Each iteration's Jacobian re-runs the step with that iteration's arguments, sliced to the
    first sequence where they have a batch dimension (idx, the pair), whole where not (pos, k)."""
    from mythos_probe.metrics.spectral import jacobian_sigma_max

    model = ArgsLoop()
    traces = []
    assert warned(lambda: traces.extend(record(model, ARGS_SPEC, calls=2, probes=["jacobian", "spectral"]))) == []
    x = model.embed(ids)
    h, want = x, []
    for t in range(3):
        e, pos, k, idx, (c, s) = model.arguments(x, t)
        want.append(jacobian_sigma_max(lambda v: model.step(v, e[:1], pos, k, idx[:1], (c[:1], s[:1])), h[:1]).item())
        h = model.step(h, e, pos, k, idx, (c, s))
    for trace in traces:  # checked, then not
        np.testing.assert_allclose(trace.iteration_metrics["jacobian_sigma_max"], want, rtol=1e-5)
        np.testing.assert_allclose(trace.iteration_metrics["norm_inject"],
                                   [mean_norm(x) * (t + 1) for t in range(3)], rtol=1e-5)


def test_a_momentum_after_the_other_arguments_is_found_and_said_once():
    traces = []
    assert warned(lambda: traces.extend(record(ArgsLoop(carry=True), ARGS_SPEC, calls=2,
                                               probes=["jacobian", "convergence"]))) == [
        "LoopSpec.state: loop 'loop''s step takes another tensor that changes every iteration (argument 'v'): a "
        "second carried state (a momentum beside h, say). jacobian_sigma_max would be the derivative of h with it "
        "held fixed, not of the map the model iterates, so it is left out"]
    assert [t.iterations for t in traces] == [3, 3]
    assert all("jacobian_sigma_max" not in t.iteration_metrics for t in traces)


def test_without_the_jacobian_probe_a_momentum_is_not_looked_for():
    assert warned(lambda: record(ArgsLoop(carry=True), ARGS_SPEC, probes=["convergence"])) == []


class WidthStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h, keep=8):
        return torch.tanh(self.lin(nn.functional.pad(h, (0, 8 - h.shape[-1]))))[..., :keep]


class ShrinksLater(nn.Module):
    """The state keeps its width at iteration 0 and loses a feature at iteration 1."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = WidthStep()

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for keep in (8, 7):
            h = self.step(h, keep=keep)
        return h


def test_a_state_that_changes_shape_after_iteration_0_is_named_as_state_even_with_init():
    """init= decides the state before iteration 0 only: a later change of shape is the state's."""
    assert error_of(ShrinksLater(), LoopSpec(step="step", init="embed")) == (
        "LoopSpec.state: loop 'loop' iteration 1 ends with a state of shape (2, 5, 7) but the previous state has "
        "shape (2, 5, 8); the end state must keep one shape (check state= / init=)")


# -- what the declaration's callables see of the call --------------------------------------------------


class HaltsPerCall(Halts):
    def forward(self, input_ids, gate=0.9, **kwargs):
        return super().forward(input_ids)


class HaltsPerCallOptions(Halts):
    """`**options`, not `**kwargs`: the options are the call's arguments all the same (and the
    dict that held them is not one of them)."""

    def forward(self, input_ids, gate=0.9, **options):
        return super().forward(input_ids)


@pytest.mark.parametrize("model_type, threshold, call", [
    (HaltsPerCall, lambda m, call: call["gate"], lambda model: model(ids, 0.545)),  # positional, bound to its name
    (HaltsPerCall, lambda m, call: call["gate"], lambda model: model(input_ids=ids, gate=0.545)),
    (HaltsPerCall, lambda m, call: call["other"], lambda model: model(ids, other=0.545)),  # among **kwargs, by its own name
    (HaltsPerCallOptions, lambda m, call: call["other"] + ("options" not in call), lambda model: model(ids, other=-0.455)),
])
def test_a_threshold_per_call_reads_the_calls_arguments_by_name(model_type, threshold, call):
    model = model_type()
    spec = LoopSpec(step="step", halting=Halting("head", output="logit", rule="threshold", threshold=threshold))
    with torch.no_grad(), mythos_probe.attach(model, spec=spec, probes=["halting"]) as rec:
        call(model)
    halted = by_hand("threshold", model.lambdas(), 0.545)[2]
    np.testing.assert_allclose(rec.traces[0].iteration_metrics["halted_fraction"], halted.mean((1, 2)), rtol=1e-6)


# -- where the readout is not compared with the model's logits -----------------------------------------


class LastPositionLogits(WithHead):
    """Returns the logits of the last position only (as with logits_to_keep=1)."""

    def forward(self, input_ids):
        return super().forward(input_ids)[:, -1:]


class CachedHead(WithHead):
    def forward(self, input_ids, past_key_values=None):
        out = super().forward(input_ids)
        past_key_values.n += input_ids.shape[1]
        return out


twice = lambda m, s: 2 * m.head(s)  # noqa: E731 - not the model's readout


@pytest.mark.parametrize("make, spec", [
    (WithHead, LoopSpec(step="step", readout=twice, readout_is_output=False)),
    (WithHead, LoopSpec(step="step", readout=twice, readout_is_output=lambda m, call: False)),
    (LastPositionLogits, LoopSpec(step="step", readout=twice)),
    (HaltsWithHead, LoopSpec(step="step", readout=lambda m, s: 2 * m.lm(s),
                             halting=Halting("head", output="logit", rule="act", threshold=0.9))),
])
def test_a_readout_that_is_not_the_output_path_is_not_compared(make, spec):
    """A lens by design (readout_is_output False, or a callable saying so for this call), logits
    of some positions only, and ACT (whose output mixes the states) leave nothing to compare."""
    (trace,) = record(make(), spec, probes=["lens", "convergence"])
    assert trace.iterations in (3, 4) and "lens_entropy" in trace.iteration_metrics


def test_a_readout_is_output_callable_saying_true_is_compared():
    with pytest.raises(ValueError, match=r"^LoopSpec\.readout: loop 'loop''s readout of the end state differs"):
        record(WithHead(), LoopSpec(step="step", readout=twice, readout_is_output=lambda m, call: True))


def test_decode_steps_on_a_kv_cache_are_not_compared():
    """Every forward checked: the prefill's readout is the model's; on the decode steps (past
    tokens in the cache) the readout declared is not, which is not checked there."""
    from tests.probes.test_spec_adapter_pins import Cache

    model, cache = CachedHead(), Cache()
    readout = lambda m, s: m.head(s) if s.shape[1] > 1 else 2 * m.head(s)  # noqa: E731
    with torch.no_grad(), mythos_probe.attach(model, spec=LoopSpec(step="step", readout=readout), check_every=1,
                                              probes=["lens"]) as rec:
        model(ids, past_key_values=cache)
        model(ids[:, :1], past_key_values=cache)
    assert [t.iterations for t in rec.traces] == [3, 3]


def test_the_models_own_exits_per_position_are_the_iterations_used():
    from tests.probes.test_spec_adapter_pins import OwnExits, exits_spec

    exits = torch.tensor([[0, 1, 2, 3, 0], [3, 3, 2, 1, 0]])
    (trace,) = record(OwnExits(exits), exits_spec(), probes=["halting"], detail="positions")
    np.testing.assert_array_equal(trace.position_iterations, exits.numpy() + 1)


class CountingStep(nn.Module):
    """Bumps a 0-dim counter in place and notes each call in the KV cache it is given (as Raven's
    block_idx and a cache-writing block do)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h, counter, past_key_values=None):
        counter.add_(1)
        if past_key_values is not None:
            past_key_values.writes += 1
        return torch.tanh(self.lin(h))


class CountingLoop(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = CountingStep()

    def forward(self, input_ids, past_key_values=None):
        h, counter = self.embed(input_ids), torch.zeros((), dtype=torch.long)
        for _ in range(3):
            h = self.step(h, counter, past_key_values=past_key_values)
        self.counted = int(counter)
        return h


def test_the_jacobians_re_runs_leave_the_models_counter_and_cache_alone():
    from tests.probes.test_spec_adapter_pins import Cache

    model, cache = CountingLoop(), Cache()
    cache.writes = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with torch.no_grad(), mythos_probe.attach(model, spec=LoopSpec(step="step"), probes=["jacobian"]) as rec:
            model(ids, past_key_values=cache)
    assert len(rec.traces[0].iteration_metrics["jacobian_sigma_max"]) == 3  # re-run 3 times, at least
    assert (model.counted, cache.writes) == (3, 3)  # the model's own calls only


def test_exits_that_are_not_one_per_sequence_or_position_or_are_missing_are_named():
    from tests.probes.test_spec_adapter_pins import OwnExits, exits_spec

    assert error_of(OwnExits(torch.tensor([0, 1, 2])), exits_spec(), probes=["halting"]) == (
        "LoopSpec.halting.exits picks Tensor from the model's output; it must pick the exit iteration (integers) per "
        "sequence (2,) or per position (2, 5)")
    missing = LoopSpec(step="step", halting=Halting("head", output="logit", rule="threshold", threshold=0.545, exits=5),
                       readout_is_output=False)
    assert error_of(OwnExits(torch.tensor([0, 1])), missing, probes=["halting"]) == (
        "LoopSpec.halting.exits picks NoneType from the model's output; it must pick the exit iteration (integers) "
        "per sequence (2,) or per position (2, 5)")


def test_the_exits_of_an_unchecked_forward_are_its_own():
    """Each forward reads the model's exits anew, checked or not (check_every=None: the first only)."""
    from tests.probes.test_spec_adapter_pins import OwnExits, exits_spec

    model = OwnExits(torch.tensor([0, 3]))
    with torch.no_grad(), mythos_probe.attach(model, spec=exits_spec(), probes=["halting"], detail="positions",
                                              check_every=None) as rec:
        model(ids)
        model.exits = torch.tensor([2, 1])
        model(ids)
    np.testing.assert_array_equal(rec.traces[0].position_iterations, [[1] * 5, [4] * 5])
    np.testing.assert_array_equal(rec.traces[1].position_iterations, [[3] * 5, [2] * 5])


class FlatGate(nn.Module):
    """Returns (tokens, experts) logits and its top-k choice of softmax scores, as MoE layers that
    flatten the batch do."""

    def __init__(self, top_k):
        super().__init__()
        self.proj = nn.Linear(8, 4)
        with torch.no_grad():
            self.proj.weight.mul_(4)
        self.top_k = top_k

    def forward(self, h):
        logits = self.proj(h).reshape(-1, 4)
        return logits, logits.softmax(-1).topk(self.top_k, dim=-1).indices


@pytest.mark.parametrize("top_k", [1, 4])  # one expert, and every expert
def test_flat_router_logits_and_the_extreme_top_k(top_k):
    model = Routed()
    model.step.gate = FlatGate(top_k)
    (trace,) = record(model, LoopSpec(step="step", routers=(Router("step.gate", top_k="top_k", select=0, indices=1),)),
                      probes=["experts"])
    h, loads = model.embed(ids), []
    for _ in range(3):
        loads.append(np.bincount(model.step.gate(h)[1].reshape(-1).numpy(), minlength=4))
        h = model.step(h)
    assert trace.expert_load.sum() == 3 * TOKENS * top_k
    np.testing.assert_array_equal(trace.expert_load, np.stack(loads))


# -- sampled forwards and sampled checks --------------------------------------------------------------


class Damped(FromZero):
    """h ← step(scale·h + x): the declared h_{t−1} + e holds while scale is 1."""

    scale = 1.0

    def forward(self, input_ids):
        x = self.embed(input_ids)
        h = torch.zeros_like(x)
        for _ in range(3):
            h = self.step(self.scale * h + x)
        return h


def test_checks_count_recorded_forwards_and_unrecorded_ones_run_quietly():
    """sample_every=2 records forwards 0, 2, 4, …; check_every=2 checks recorded forwards 0, 2, …,
    that is model calls 0 and 4. A declaration that stops holding after call 0 is caught at call 4,
    not before; the loop running in the unrecorded calls is no stray loop."""
    model = Damped()
    spec = LoopSpec(step="step", injection=Injection("added", module="embed"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with torch.no_grad(), mythos_probe.attach(model, spec=spec, sample_every=2, check_every=2,
                                                  probes=["convergence"]) as rec:
            model(ids)
            model.scale = 0.5
            for _ in range(3):  # calls 1, 2 (recorded, not checked), 3
                model(ids)
            with pytest.raises(ValueError) as err:
                model(ids)  # call 4: recorded forward 2, checked
    assert [t.iterations for t in rec.traces] == [3, 3]
    assert str(err.value) == (
        "LoopSpec.injection: loop 'loop' iteration 1 starts from an input that is not the previous end state plus "
        "the injection module's output. Declare how the input is built (injection=Injection('added'|'concat'|"
        "'argument'|'restart'|'function', ...)), or fix state= / last= (the end state: the pass's last module) and "
        "state_in= (the argument carrying the state)")
    assert no_hooks(model)


class LateFreeze(nn.Module):
    """Passes the step's output on itself for two iterations (nothing to compare), then keeps
    position 1's state for the last two: it used 2 iterations, every other position 4."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.running = torch.tensor([True, False, True, True, True])

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for t in range(4):
            out = self.step(h)
            h = out if t < 2 else torch.where(self.running[None, :, None], out, h)
        return h


def test_iterations_passed_on_before_the_first_freeze_are_counted():
    traces = record(LateFreeze(), LoopSpec(step="step"), calls=2, probes=["convergence"], detail="positions")
    for trace in traces:
        np.testing.assert_array_equal(trace.position_iterations, [[4, 2, 4, 4, 4]] * 2)


def test_a_cumulative_exit_reaching_its_threshold_exactly_exits_there():
    """λ = 0.5 at every step: the exit mass after step 0 is exactly 0.5, which reaches a threshold
    of 0.5 (≥), so every position exits at its first iteration."""
    from tests.probes.test_spec_adapter_pins import FixedHead

    model = Halts()
    model.head = FixedHead([0.5] * 5)
    spec = LoopSpec(step="step", halting=Halting("head", output="probability", rule="cumulative_exit", threshold=0.5))
    (trace,) = record(model, spec, probes=["halting"], detail="positions")
    np.testing.assert_array_equal(trace.position_iterations, np.ones((2, 5)))
    np.testing.assert_allclose(trace.position_metrics["cum_halt"][0, 0], [0.5, 0.75, 0.875, 1.0])


def test_a_pass_whose_last_module_never_runs_is_named():
    """The pass starts (first runs) but never ends: no iteration completes, which is said."""
    model = spare_pass()
    traces = []
    assert warned(lambda: traces.extend(record(model, LoopSpec(first="layers.0", last="spare.1"),
                                               probes=["convergence"]))) == [
        never_ran("first/last", "loop", "layers.0 … spare.1")]
    assert traces == []


class LossFirst(WithHead):
    """Returns (loss, logits): element 0 is not the logits."""

    def forward(self, input_ids):
        logits = super().forward(input_ids)
        return logits.square().mean(), logits


def test_the_declared_logits_selector_picks_the_models_logits():
    model = LossFirst()
    (trace,) = record(model, LoopSpec(step="step", readout="head", logits=1), probes=["lens"], lens_positions="all")
    h, states = model.embed(ids), []
    for _ in range(3):
        h = model.step(h)
        states.append(h)
    final = model.head(states[-1]).log_softmax(-1)  # the model's own logits, through logits=1
    kl = [(final.exp() * (final - model.head(s).log_softmax(-1))).sum(-1).mean().item() for s in states]
    np.testing.assert_allclose(trace.iteration_metrics["lens_kl_final"], kl, rtol=1e-4, atol=1e-7)


class Halving(Chain):
    """h ← step(scale·h): the declared chain (no injection) holds while scale is 1."""

    scale = 1.0

    def __init__(self):
        super().__init__(lambda h, x: self.scale * h)


def test_an_unchecked_forward_reads_nothing_back_to_compare():
    """check_every=None: only the first forward is checked. A later forward whose inputs are not
    the previous states is recorded as it ran (no host read to find out), the first one is not."""
    model = Halving()
    with torch.no_grad(), mythos_probe.attach(model, spec=LoopSpec(step="step"), check_every=None,
                                              probes=["convergence"], detail="positions") as rec:
        model(ids)
        model.scale = 0.5
        model(ids)
    np.testing.assert_array_equal(rec.traces[1].position_iterations, np.full((2, 5), 3))
    with pytest.raises(ValueError, match=r"^LoopSpec\.injection: loop 'loop' iteration 1 starts from an input that "
                                         r"is not the previous iteration's end state at 10 of 10 positions"):
        record(model, LoopSpec(step="step"))


class NestedPass(nn.Module):
    """`PassModel`'s loop one level down: body.layers.0 and body.layers.1 per iteration, body.layers.2
    after the loop."""

    def __init__(self):
        super().__init__()
        self.embed, self.body = PassModel().embed, PassModel()
        del self.body.embed

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for _ in range(3):
            for layer, s in zip(self.body.layers, self.body.scales):
                h = layer(h, scale=s)
        return self.body.layers[2](h)


def test_flops_of_a_pass_in_a_nested_modulelist():
    model = NestedPass()
    (trace,) = record(model, LoopSpec(first="body.layers.0", last="body.layers.1"), probes=["cost"])
    loop, other = n(model.body.layers[0], model.body.layers[1]), n(model.body.layers[2])
    assert trace.forward_metrics["flops"] == pytest.approx(2.0 * TOKENS * (other + 3 * loop))


# -- where each warning points: the user's line, not torch's module code ---------------------------------


def line_of(fn, text: str) -> tuple[str, int]:
    """(file, line) of the first line of `fn`'s source containing `text`."""
    import inspect

    lines, start = inspect.getsourcelines(fn)
    return inspect.getsourcefile(fn), start + next(i for i, line in enumerate(lines) if text in line)


def located(fn) -> list[tuple[str, int]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [(w.filename, w.lineno) for w in caught if str(w.message).startswith("LoopSpec")]


def test_each_warning_names_the_line_of_user_code_that_ran_it():
    """Warnings raised from the model's hooks are attributed to the first frame outside
    mythos_probe and torch: the caller's `model(ids)` for what is found at the end of a forward,
    the model's own line that ran the step for what is found inside the loop."""
    from tests.probes.test_spec_adapter_pins import Noisy

    called = line_of(record, "model(ids)")
    ponder = LoopSpec(step="step", halting=Halting("head", output="logit", rule="ponder", threshold=0.5))
    assert located(lambda: record(Halts(), ponder, probes=["halting"])) == [called]
    assert located(lambda: record(spare_step(), LoopSpec(step="spare"), probes=["convergence"])) == [called]
    model = Halts()
    model.spare = nn.Linear(8, 1)
    spare_head = LoopSpec(step="step", halting=Halting("spare", output="logit", rule="threshold", threshold=0.5))
    assert located(lambda: record(model, spare_head, probes=["halting"])) == [called]
    sequential = LoopSpec(first="layers.0", last="layers.1")
    assert located(lambda: record(OtherPasses(sequential=True), sequential, probes=["jacobian"])) == [called]
    # found inside the loop: the model's line that calls the step
    assert located(lambda: record(Noisy(), LoopSpec(step="step"), probes=["jacobian"])) == [
        line_of(Noisy.forward, "self.step(h)")]
    assert located(lambda: record(ArgsLoop(carry=True), ARGS_SPEC, probes=["jacobian"])) == [
        line_of(ArgsLoop.forward, "self.step(")]
    stray = Outside()
    with torch.no_grad(), mythos_probe.attach(stray, spec=LoopSpec(step="step")):
        assert located(lambda: stray.outer(ids)) == [line_of(Outside.inner, "self.step(")]


class HeadPerCall(WithHead):
    """`head_only=False` returns the state itself, not the head's logits: the readout is the
    output path only when the call says so."""

    def forward(self, input_ids, head_only=True):
        return super().forward(input_ids) if head_only else Chain.forward(self, input_ids)


def test_readout_is_output_and_exit_step_callables_are_given_the_calls_arguments():
    model = HeadPerCall()
    spec = LoopSpec(step="step", readout="head", readout_is_output=lambda m, call: call["head_only"])
    with torch.no_grad(), mythos_probe.attach(model, spec=spec, check_every=1, probes=["convergence"]) as rec:
        model(ids, head_only=False)  # (B, T, 8) states out, the readout gives (B, T, 32): not compared
        model(ids, head_only=True)
    assert [t.iterations for t in rec.traces] == [3, 3]
    halts = HaltsPerCall()
    spec = LoopSpec(step="step", halting=Halting("head", output="logit", rule="threshold", threshold=0.545,
                                                 exit_step=lambda m, call: call["gate"]))
    with torch.no_grad(), mythos_probe.attach(halts, spec=spec, probes=["halting"], detail="positions") as rec:
        halts(ids, 2)
    np.testing.assert_array_equal(rec.traces[0].position_iterations, np.full((2, 5), 3))


class CacheByName(Chain):
    """Takes its KV cache as `cache=` (Raven's name) rather than `past_key_values=`."""

    def __init__(self):
        super().__init__(lambda h, x: h)

    def forward(self, input_ids, cache=None):
        out = super().forward(input_ids)
        cache.n += input_ids.shape[1]
        return out


def test_a_kv_cache_passed_as_cache_is_found():
    from tests.probes.test_spec_adapter_pins import Cache

    model, cache = CacheByName(), Cache()
    with torch.no_grad(), mythos_probe.attach(model, spec=LoopSpec(step="step"), probes=["jacobian"]) as rec:
        model(ids, cache=cache)
        model(ids[:, :1], cache=cache)
        cache.n = 0  # the same cache emptied: a new request
        model(ids, cache=cache)
    assert [t.step for t in rec.traces] == [0, 1, 0] and rec.traces[0].trace_id == rec.traces[1].trace_id
    assert rec.traces[2].trace_id != rec.traces[0].trace_id
    assert ["jacobian_sigma_max" in t.iteration_metrics for t in rec.traces] == [True, False, True]


class ConcatDepths(nn.Module):
    """h ← step(cat[h, x]), position 1 kept after its first iteration (per-token depths)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.step = nn.Sequential(nn.Linear(16, 8), nn.Tanh())
        self.depths = torch.tensor([3, 1, 3, 3, 3])

    def forward(self, input_ids):
        x = self.embed(input_ids)
        h = x
        for t in range(3):
            h = torch.where((t < self.depths)[None, :, None], self.step(torch.cat([h, x], -1)), h)
        return h


def test_a_concat_loops_kept_state_is_read_from_the_first_half_of_its_next_input():
    (trace,) = record(ConcatDepths(), LoopSpec(step="step", injection=Injection("concat")), probes=["convergence"],
                      detail="positions")
    np.testing.assert_array_equal(trace.position_iterations, [[3, 1, 3, 3, 3]] * 2)


# -- the tolerance of the checks: 1e-4 relative to the largest value, never tighter than 1e-4 absolute ----


class SmallWithHead(WithHead):
    """Logits under 1.5 in magnitude, where an absolute floor above 1 would hide an offset of 1.5e-4."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            self.head.bias.mul_(0.1)


@pytest.mark.parametrize("offset, caught", [(1.5e-4, True), (0.5e-4, False)])
def test_the_readout_check_tolerates_rounding_not_an_offset(offset, caught):
    model = SmallWithHead()
    with torch.no_grad():
        assert model(ids).abs().amax() < 1.5
    spec = LoopSpec(step="step", readout=lambda m, s: m.head(s) + offset)
    if caught:
        assert error_of(model, spec).startswith(
            "LoopSpec.readout: loop 'loop''s readout of the end state differs from the logits the model returned at "
            "10 of 10 positions.")
    else:
        assert record(model, spec)[0].iterations == 3


class SmallFromZero(FromZero):
    """h ← step(h + x) from 0 with x under 1 in magnitude."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.embed.weight.mul_(0.3 / self.embed.weight.abs().max())


@pytest.mark.parametrize("offset, caught", [(1.5e-4, True), (0.5e-4, False)])
def test_the_chain_check_tolerates_rounding_not_an_offset(offset, caught):
    model = SmallFromZero()
    spec = LoopSpec(step="step", init=zeros8, injection=Injection("function", fn=lambda m, h, e: h + e + offset,
                                                                  module="embed"))
    if caught:
        assert error_of(model, spec).startswith(
            "LoopSpec.injection: loop 'loop' iteration 0 starts from an input that is not Injection.fn(model, previous "
            "end state, e).")
    else:
        assert record(model, spec)[0].iterations == 3


@pytest.mark.parametrize("exits, used", [([0, 4], "1 to 5"), ([-1, 2], "0 to 3")])
def test_exits_outside_the_iterations_run_on_an_unchecked_forward_are_refused_when_read(exits, used):
    """Only sampled forwards read the exits during the forward (a host sync); an unchecked one finds
    them out of range where its numbers reach the host, and names the fix, rather than failing in
    index_add_ (a device-side assert on a GPU) or recording a wrong exit count."""
    from tests.probes.test_spec_adapter_pins import OwnExits, exits_spec

    model = OwnExits(torch.tensor([0, 3]))
    with torch.no_grad(), mythos_probe.attach(model, spec=exits_spec(), probes=["halting"], detail="positions",
                                              check_every=None) as rec:
        model(ids)
        model.exits = torch.tensor(exits)  # past the 4 iterations run, or before the first
        model(ids)
        model.exits = torch.tensor([2, 1])
        model(ids)
        with pytest.raises(ValueError) as raised:
            rec.traces
        # the refused forward is left out, and nothing else: the forwards before and after it stay
        assert [t.position_iterations[:, 0].tolist() for t in rec.traces] == [[1, 4], [3, 2]]
    assert str(raised.value) == (
        f"mythos_probe: loop 'loop' reports positions that used {used} iterations, outside the 4 it ran, so this "
        "forward's halting metrics would be wrong. Where the model gives its own exits (Halting(..., exits=...)), "
        "the selector must pick each position's 0-based exit iteration; attach(..., check_every=1) checks them in "
        "every forward.")
