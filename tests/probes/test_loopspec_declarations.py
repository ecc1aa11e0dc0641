"""What a `LoopSpec` declaration accepts and refuses when it is built, with no model run: every
default pinned, every guard reached on the value just past its limit (and the value just inside
accepted), each refusal's message naming the field to fix; and the selectors that pick tensors
out of module outputs (`select`, `logits_of`), the run-time threshold check and `resolve`.
tests/probes/test_spec_*.py check what the declarations mean on running models."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from mythos_probe.loopspec import (
    HALTING_OUTPUTS,
    HALTING_RULES,
    INJECTION_MODES,
    SCORINGS,
    Halting,
    Injection,
    LoopSpec,
    Router,
    check_threshold_value,
    logits_of,
    resolve,
    select,
)


def test_the_declared_vocabularies():
    assert INJECTION_MODES == ("added", "concat", "argument", "restart", "function")
    assert HALTING_OUTPUTS == ("probability", "logit")
    assert HALTING_RULES == ("act", "cumulative_exit", "threshold", "ponder")
    assert SCORINGS == ("softmax", "sigmoid")


def test_every_default_of_a_declaration():
    inj = Injection()
    assert (inj.mode, inj.module, inj.arg, inj.fn) == ("added", None, None, None)
    h = Halting("head")
    assert (h.output, h.rule, h.threshold, h.select, h.exit_step, h.exits) == ("probability", "act", 0.99, None, None, None)
    r = Router("router", top_k=2)
    assert (r.scoring, r.select, r.bias, r.indices) == ("softmax", None, None, None)
    s = LoopSpec(step="block")
    assert (s.first, s.last, s.method, s.state, s.state_in, s.init, s.injection, s.halting) == (
        None, None, None, None, 0, None, None, None)
    assert (s.routers, s.readout, s.logits, s.looped, s.name, s.readout_is_output) == ((), None, None, (), "loop", True)


# -- select / logits_of ---------------------------------------------------------------------------


class Output(OrderedDict):
    """A transformers-like ModelOutput: a dict whose fields are also attributes, indexable by name."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def test_select_each_kind_of_selector():
    a, b = torch.zeros(1), torch.ones(1)
    assert select(a, None) is a
    assert select((a, b), None) is a
    assert select([b, a], None) is b
    assert select((a, b), 1) is b
    assert select({"x": a, "y": b}, "y") is b
    assert select(Output(x=a, y=b), "y") is b

    class Obj:
        y = b

    assert select(Obj(), "y") is b
    assert select((a, b), lambda out: out[1]) is b


def test_logits_of_prefers_the_selector_then_the_tensor_then_the_logits_field():
    loss, logits, other = torch.tensor(1.0), torch.randn(2, 3), torch.randn(2, 3)
    assert logits_of(logits) is logits
    assert logits_of((other, logits), 1) is logits
    assert logits_of(Output(loss=loss, logits=logits)) is logits  # element 0 is the loss
    assert logits_of({"loss": loss, "logits": logits}) is logits

    class WithLogits:
        def __init__(self, value):
            self.logits = value

        def __getitem__(self, i):
            return (other,)[i]

    assert logits_of(WithLogits(logits)) is logits
    assert logits_of(WithLogits(None)) is other  # a None field: element 0
    assert logits_of((other, logits)) is other
    assert logits_of({"loss": loss, "logits": logits}, "loss") is loss


# -- thresholds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ok", [1, 1.0, 0.5, 1e-9, None])
def test_thresholds_in_the_open_closed_unit_interval_are_accepted(ok):
    assert Halting("head", threshold=ok if ok is not None else None, rule="ponder").threshold == ok


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0000001, 2, math.nan])
def test_thresholds_outside_the_unit_interval_are_refused(bad):
    with pytest.raises(ValueError, match=r"^Halting.threshold must be in \(0, 1\] \(a probability the exit rule "
                                         r"compares with\), got "):
        Halting("head", threshold=bad)


@pytest.mark.parametrize("bad", [True, "0.5", [0.5]])
def test_a_threshold_that_is_not_a_number_is_refused(bad):
    with pytest.raises(TypeError, match=r"^Halting.threshold must be a number in \(0, 1\], None or a callable "
                                        r"\(model, call\) → number, got (bool|str|list) "):
        Halting("head", threshold=bad)


def test_a_callable_threshold_is_kept():
    fn = lambda model, call: 0.5  # noqa: E731
    assert Halting("head", threshold=fn).threshold is fn


def test_check_threshold_value_at_run_time():
    assert check_threshold_value(0.7, "x") == 0.7
    assert check_threshold_value(None, "x") is None
    one = check_threshold_value(torch.tensor([0.25]), "x")
    assert one == 0.25 and type(one) is float
    with pytest.raises(ValueError, match=r"^where.threshold must be in \(0, 1\]"):
        check_threshold_value(torch.tensor(1.5), "where")
    with pytest.raises(TypeError, match=r"^where.threshold must be a number"):
        check_threshold_value(torch.tensor([0.1, 0.2]), "where")  # two values are no threshold
    with pytest.raises(TypeError, match=r"^where.threshold: the callable returned a callable, not a number$"):
        check_threshold_value(lambda m, c: 0.5, "where")


@pytest.mark.parametrize("rule", ["act", "threshold"])
def test_rules_that_compare_with_a_threshold_need_one(rule):
    with pytest.raises(ValueError, match=rf"^Halting.threshold: rule '{rule}' needs a threshold \(None is for "
                                         r"'cumulative_exit' run to the end, or 'ponder'\)$"):
        Halting("head", rule=rule, threshold=None)


@pytest.mark.parametrize("rule", ["cumulative_exit", "ponder"])
def test_rules_that_may_run_to_the_end_take_no_threshold(rule):
    assert Halting("head", rule=rule, threshold=None).threshold is None


# -- Halting --------------------------------------------------------------------------------------


def test_halting_guards():
    with pytest.raises(TypeError, match=r"^Halting.head must be a module path string like 'model.layers.0', got "
                                        r"NoneType None$"):
        Halting(None)
    with pytest.raises(ValueError, match=r"^Halting.output must be one of \('probability', 'logit'\), got 'prob'$"):
        Halting("head", output="prob")
    with pytest.raises(ValueError, match=r"^Halting.rule must be one of .*'ponder'\), got 'graves'$"):
        Halting("head", rule="graves")
    with pytest.raises(TypeError, match=r"^Halting.select must be None, an index, a field name or a callable on the "
                                        r"output, got float 1.5$"):
        Halting("head", select=1.5)
    with pytest.raises(TypeError, match=r"^Halting.exits must be None"):
        Halting("head", exits=True)  # a bool is no index
    with pytest.raises(TypeError, match=r"^Halting.exit_step must be a callable \(model, call\) → iteration or None, "
                                        r"got 3$"):
        Halting("head", exit_step=3)
    for rule in HALTING_RULES:
        for output in HALTING_OUTPUTS:
            assert Halting("head", output=output, rule=rule).rule == rule
    assert Halting("", exits=0, select="p").exits == 0  # "" is the model itself
    pick, step = (lambda out: out[1]), (lambda model, call: 3)
    h = Halting("head", select=pick, exits=pick, exit_step=step)  # callables are accepted
    assert (h.select, h.exits, h.exit_step) == (pick, pick, step)


# -- module paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["", "block", "model.layers.0", "layers.12.mlp", "_x.y"])
def test_dotted_paths_are_accepted(path):
    assert LoopSpec(step="s", init=path or None, looped=(path,)).looped == (path,)


@pytest.mark.parametrize("path", ["model..layers", "model.layers.", "model/layers", "layers[0]", "a.0b"])
def test_paths_that_are_not_dotted_module_names_are_refused(path):
    with pytest.raises(ValueError, match=rf"^LoopSpec.step must be a dotted module path like 'model.layers.0', got "
                                         rf"{path!r}".replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        LoopSpec(step=path)


def test_a_path_that_is_not_a_string_is_refused():
    with pytest.raises(TypeError, match=r"^LoopSpec.first must be a module path string like 'model.layers.0', got "
                                        r"int 3$"):
        LoopSpec(first=3, last="b")


# -- Injection ------------------------------------------------------------------------------------


def test_injection_guards():
    for mode in ("added", "concat", "restart"):
        assert Injection(mode).mode == mode
    assert Injection("argument", arg=0).arg == 0
    assert Injection("argument", arg="input_embeds").arg == "input_embeds"
    assert Injection("argument", module="embed").module == "embed"
    fn = lambda model, h, e: h + e  # noqa: E731
    assert Injection("function", fn=fn).fn is fn
    with pytest.raises(ValueError, match=r"^Injection.mode must be one of \('added', .*'function'\), got 'sum'$"):
        Injection("sum")
    with pytest.raises(ValueError, match=r"^Injection.mode must be one of"):
        Injection(["added"])  # not a string: refused, not an unhashable-type error
    with pytest.raises(ValueError, match=r"^Injection.module must be a dotted module path"):
        Injection(module="a..b")
    with pytest.raises(TypeError, match=r"^Injection.arg must be an argument index or name, got bool True$"):
        Injection("argument", arg=True)
    with pytest.raises(TypeError, match=r"^Injection.arg must be an argument index or name, got float 1.0$"):
        Injection("argument", arg=1.0)
    with pytest.raises(ValueError, match=r"^Injection.arg must be a non-negative argument index, got -1$"):
        Injection("argument", arg=-1)
    with pytest.raises(ValueError, match=r"^Injection.arg is for mode 'argument' only \(got mode 'added'\)$"):
        Injection("added", arg=1)
    with pytest.raises(ValueError, match=r"^Injection\('argument'\) needs arg= \(which argument of the start is e\) "
                                         r"or module=$"):
        Injection("argument")
    with pytest.raises(TypeError, match=r"^Injection\('function'\) needs fn=lambda model, h_prev, e: start state "
                                        r"\(how the iteration's input is built\), got None$"):
        Injection("function")
    with pytest.raises(ValueError, match=r"^Injection.fn is for mode 'function' only \(got mode 'concat'\)$"):
        Injection("concat", fn=fn)


# -- Router ---------------------------------------------------------------------------------------


def test_router_guards():
    assert Router("r", top_k=1).top_k == 1
    assert Router("r", top_k="top_k", scoring="sigmoid", bias="e_bias", select=0, indices="idx").bias == "e_bias"
    with pytest.raises(TypeError, match=r"^Router.module must be a module path string"):
        Router(None, top_k=1)
    with pytest.raises(TypeError, match=r"^Router.top_k must be a positive int or the name of the router's attribute "
                                        r"holding it, got bool True$"):
        Router("r", top_k=True)
    with pytest.raises(TypeError, match=r"^Router.top_k must be a positive int .*got float 2.0$"):
        Router("r", top_k=2.0)
    with pytest.raises(ValueError, match=r"^Router.top_k must be at least 1, got 0$"):
        Router("r", top_k=0)
    with pytest.raises(ValueError, match=r"^Router.top_k must name an attribute of the router module, got 'top-k'$"):
        Router("r", top_k="top-k")
    with pytest.raises(ValueError, match=r"^Router.scoring must be one of \('softmax', 'sigmoid'\), got 'relu'$"):
        Router("r", top_k=1, scoring="relu")
    with pytest.raises(TypeError, match=r"^Router.select must be None"):
        Router("r", top_k=1, select=2.0)
    with pytest.raises(TypeError, match=r"^Router.indices must be None"):
        Router("r", top_k=1, indices=[1])
    with pytest.raises(ValueError, match=r"^Router.bias must name an attribute of the router module, got 'a.b'$"):
        Router("r", top_k=1, bias="a.b")
    with pytest.raises(ValueError, match=r"^Router.bias must name an attribute of the router module, got 3$"):
        Router("r", top_k=1, bias=3)


# -- LoopSpec -------------------------------------------------------------------------------------


def test_exactly_one_boundary_is_declared():
    assert LoopSpec(method="core_block_forward").method == "core_block_forward"
    assert LoopSpec(method="model.core.forward_block").method == "model.core.forward_block"
    assert (LoopSpec(first="layers.0", last="norm").first, LoopSpec(first="layers.0", last="norm").last) == (
        "layers.0", "norm")
    with pytest.raises(ValueError, match=r"^LoopSpec: declare exactly one of step=, first= and last=, or method= "
                                         r"\(where an iteration starts and ends\); got none$"):
        LoopSpec()
    with pytest.raises(ValueError, match=r"got \['step', 'method'\]$"):
        LoopSpec(step="a", method="b")
    with pytest.raises(ValueError, match=r"got \['step', 'first/last'\]$"):
        LoopSpec(step="a", first="b", last="c")
    with pytest.raises(ValueError, match=r"got \['method', 'first/last'\]$"):
        LoopSpec(method="a", last="c")
    with pytest.raises(ValueError, match=r"^LoopSpec: first= and last= go together \(the first and last module of "
                                         r"one pass\)$"):
        LoopSpec(first="a")
    with pytest.raises(ValueError, match=r"^LoopSpec: first= and last= go together"):
        LoopSpec(last="a")
    with pytest.raises(TypeError, match=r"^LoopSpec.method must be 'path.to.module.method_name', got 3$"):
        LoopSpec(method=3)
    with pytest.raises(ValueError, match=r"^LoopSpec.method must be 'path.to.module.method_name' or a method of the "
                                         r"model, got 'layers.0.forward'$"):
        LoopSpec(method="layers.0.forward")  # "0" is a digit, no identifier: a method path has none


def test_spec_parts_must_be_declaration_objects():
    with pytest.raises(TypeError, match=r"^LoopSpec.injection and .halting take Injection\(...\) and Halting\(...\), "
                                        r"not a path string$"):
        LoopSpec(step="s", injection="embed")
    with pytest.raises(TypeError, match=r"^LoopSpec.injection and .halting take"):
        LoopSpec(step="s", halting="head")
    with pytest.raises(TypeError, match=r"^LoopSpec.injection takes Injection\(...\), got Halting$"):
        LoopSpec(step="s", injection=Halting("head"))
    with pytest.raises(TypeError, match=r"^LoopSpec.halting takes Halting\(...\), got Injection$"):
        LoopSpec(step="s", halting=Injection())
    r = Router("r", top_k=1)
    with pytest.raises(TypeError, match=r"^LoopSpec.routers is a tuple of Router\(...\), one per routed layer$"):
        LoopSpec(step="s", routers=r)
    with pytest.raises(TypeError, match=r"^LoopSpec.routers is a tuple of Router\(...\), one per routed layer, got "
                                        r"'router'$"):
        LoopSpec(step="s", routers="router")
    with pytest.raises(TypeError, match=r"got \(Router\(.*\), 'r2'\)$"):
        LoopSpec(step="s", routers=(r, "r2"))
    spec = LoopSpec(step="s", routers=[r, r], looped=["a", "b.0"], readout=["norm", "lm_head"],
                    injection=Injection(), halting=Halting("h"))
    assert spec.routers == (r, r) and spec.looped == ("a", "b.0") and spec.readout == ("norm", "lm_head")
    hash(spec)  # stored hashable


def test_state_logits_and_state_in():
    assert LoopSpec(step="s", state=1, logits="logits", state_in="hidden").state_in == "hidden"
    assert LoopSpec(step="s", state_in=2).state_in == 2
    with pytest.raises(TypeError, match=r"^LoopSpec.state must be None, an index"):
        LoopSpec(step="s", state=0.5)
    with pytest.raises(TypeError, match=r"^LoopSpec.logits must be None, an index"):
        LoopSpec(step="s", logits=False)
    for bad in (True, -1, 1.0, None):
        with pytest.raises(TypeError, match=r"^LoopSpec.state_in must be a non-negative argument index or an argument "
                                            rf"name, got {bad!r}$".replace(".", r"\.")):
            LoopSpec(step="s", state_in=bad)


def test_init_readout_looped_name_and_readout_is_output():
    init = lambda model: torch.zeros(1)  # noqa: E731
    assert LoopSpec(step="s", init=init).init is init
    assert LoopSpec(step="s", init="embed").init == "embed"
    with pytest.raises(TypeError, match=r"^LoopSpec.init must be a module path or a callable model → tensor, got 3$"):
        LoopSpec(step="s", init=3)
    with pytest.raises(ValueError, match=r"^LoopSpec.init must be a dotted module path"):
        LoopSpec(step="s", init="a b")
    head = lambda model, h: h  # noqa: E731
    assert LoopSpec(step="s", readout=head).readout is head
    assert LoopSpec(step="s", readout="lm_head").readout == "lm_head"
    assert LoopSpec(step="s", readout=("norm",)).readout == ("norm",)
    with pytest.raises(ValueError, match=r"^LoopSpec.readout: an empty tuple; give module paths, a callable, or None$"):
        LoopSpec(step="s", readout=())
    with pytest.raises(ValueError, match=r"^LoopSpec.readout: an empty tuple"):
        LoopSpec(step="s", readout=[])
    with pytest.raises(TypeError, match=r"^LoopSpec.readout must be a module path string"):
        LoopSpec(step="s", readout=("norm", None))
    with pytest.raises(ValueError, match=r"^LoopSpec.readout must be a dotted module path"):
        LoopSpec(step="s", readout="lm head")
    with pytest.raises(TypeError, match=r"^LoopSpec.readout must be module paths or a callable \(model, state\) → "
                                        r"logits, got 3$"):
        LoopSpec(step="s", readout=3)
    with pytest.raises(TypeError, match=r"^LoopSpec.looped is a tuple of module paths, not one string$"):
        LoopSpec(step="s", looped="block")
    with pytest.raises(TypeError, match=r"^LoopSpec.looped must be a module path string"):
        LoopSpec(step="s", looped=(None,))
    with pytest.raises(ValueError, match=r"^LoopSpec.looped must be a dotted module path"):
        LoopSpec(step="s", looped=("a-b",))
    for bad in ("", None, 3):
        with pytest.raises(ValueError, match=rf"^LoopSpec.name must be a non-empty string, got {bad!r}$"):
            LoopSpec(step="s", name=bad)
    decide = lambda model, call: False  # noqa: E731
    assert LoopSpec(step="s", readout_is_output=False).readout_is_output is False
    assert LoopSpec(step="s", readout_is_output=decide).readout_is_output is decide
    with pytest.raises(TypeError, match=r"^LoopSpec.readout_is_output must be a bool or a callable \(model, call\) → "
                                        r"bool, got 1$"):
        LoopSpec(step="s", readout_is_output=1)


# -- resolve --------------------------------------------------------------------------------------


def test_resolve_finds_the_submodule_or_names_the_field_and_what_exists():
    model = nn.Sequential(OrderedDict(embed=nn.Embedding(4, 2), block=nn.Sequential(nn.Linear(2, 2))))
    assert resolve(model, "", "step") is model
    assert resolve(model, "block.0", "step") is model.block[0]
    with pytest.raises(ValueError, match=r"^LoopSpec.first: Sequential has no submodule 'blocks'; its submodules "
                                         r"include \['embed', 'block', 'block.0'\]$"):
        resolve(model, "blocks", "first")
    many = nn.Sequential(*[nn.Identity() for _ in range(30)])
    with pytest.raises(ValueError) as err:
        resolve(many, "x", "step")
    assert str(err.value).endswith(f"include {[str(i) for i in range(20)]}")  # the first 20 only
