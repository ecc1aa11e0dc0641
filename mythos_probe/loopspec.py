"""`LoopSpec`: where the loop is in a looped model, declared as iteration *boundaries*.

The boundary model
------------------
A looped model repeats some computation, an *iteration*, and carries a *state* from one iteration
to the next. mythos-probe never guesses that state from a module's input; it reads it where an
iteration ENDS:

    h_t      = the end state of iteration t  (`state` selects it from what the end returns)
    h_{t−1}  = the end state of iteration t − 1; for t = 0, the declared pre-loop state (`init`)

Every convergence and spectral metric is a function of (h_t, h_{t−1}), so they follow the model's
true recurrence whatever happens between the boundaries (an injection added before the step, a
final norm after the layers, messages from the previous pass).

Where an iteration starts and ends, one of:
- `step="path"`: one module called once per iteration (OpenMythos block, PonderNet block, HRM's
  `L_module`);
- `first="path", last="path"`: a pass from the first module's input to the last module's output
  (Ouro: `layers.0` … `norm`; Inkling-2-Loop: the loop layers);
- `method="path.name"`: a method wrapped for the duration of `attach` (Huginn's
  `core_block_forward`, which runs the adapter and several core blocks).

What enters an iteration (read at its start, `state_in` names the argument):
- `injection=None`: the iteration starts from h_{t−1} itself; checked at the first forward;
- `Injection("added", module=…)`: it starts from h_{t−1} + e (HRM: z_L + z_H); e is the module's
  latest output, or, without a module, the difference input − h_{t−1};
- `Injection("concat")`: it starts from cat[h_{t−1}, e] on the last dimension;
- `Injection("argument", arg=1)`: e is another argument of the start (Huginn's `input_embeds`);
- `Injection("restart")`: every pass restarts from the pre-loop state e; h_{t−1} reaches it by
  another path (Inkling-2-Loop's messages);
- `Injection("function", fn=lambda model, h, e: …)`: the start is neither a sum nor a concatenation;
  `fn` builds it from h_{t−1} and e (the module's latest output, else the pre-loop state). Dory:
  `norm(h_{t−1}) + norm(h_{−1})`. `init` is needed: the first input is fn(h_{−1}, e), not h_{−1}.

Halting: `Halting(head, output="probability"|"logit", rule=…)` with the rule the model applies
(its `threshold` a number, or `(model, call) → number` where a per-call option overrides it; `call`
is the forward's arguments by name; `exit_step` a fixed exit iteration the same way; `exits` the
model's own exit decision among its outputs, e.g. PonderNet's sampled `halt_layer_indices`):
"act" (Graves' running sum to a threshold), "cumulative_exit" (Ouro: exit distribution
p_t = λ_t ∏_{s<t}(1 − λ_s), the last step takes the remainder, exit at the first step whose
cumulative mass reaches `threshold`), "threshold" (exit when λ_t ≥ threshold) or "ponder"
(PonderNet samples its exit; the record keeps the expectation: p_t, its cumulative mass, no exit).

Routers: one `Router` per routed layer in the loop, each with the selector of the logits among
its outputs, the scoring function, an optional bias added for the top-k choice only, top-k, and
optionally the selector of the indices the model chose (checked against the re-derived choice).

Readout (for the coda lens): module paths applied in order, or a callable (model, state) → logits.
`readout_is_output=True` (default) says the readout is the model's whole path from the loop's end
state to its logits, and is checked at run time; False for a partial lens (one that skips a
block-attention residual, say); a callable (model, call) → bool where a per-call option decides.

Self-checks: the first recorded forward of an `attach` block, and one in `check_every` after it,
verifies the declaration against what runs (the chain of states, the readout against the model's
logits, the exits, the step the Jacobian differentiates); see `spec_adapter.py`.

Nested loops (HRM's high- and low-level cycles) are several `LoopSpec`s with distinct `name`s;
each gives one `LoopTrace` per forward carrying its `loop_name`, and they share the trace id.

Adding a preset: write the `LoopSpec`s for the model class in `presets.py`, then a test that
steps the model's loop by hand and compares every metric (`tests/probes/test_spec_*.py`).

This module is not: the hooks that read these boundaries (`spec_adapter.SpecAdapter`) or the
presets (`presets.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

Selector = Union[None, int, str, Callable[[Any], torch.Tensor]]
"""Picks a tensor from a module output: None (the tensor itself, or element 0 of a tuple or
`ModelOutput`), an index, an attribute/key name, or a callable on the output."""

INJECTION_MODES = ("added", "concat", "argument", "restart", "function")
HALTING_OUTPUTS = ("probability", "logit")
HALTING_RULES = ("act", "cumulative_exit", "threshold", "ponder")
SCORINGS = ("softmax", "sigmoid")


def select(output: Any, selector: Selector) -> Any:
    """Apply a `Selector` to a module output."""
    if selector is None:
        if isinstance(output, torch.Tensor):
            return output
        return output[0]  # tuples, lists and transformers' ModelOutput all index from 0
    if callable(selector):
        return selector(output)
    if isinstance(selector, int):
        return output[selector]
    return output[selector] if isinstance(output, dict) else getattr(output, selector)


def logits_of(output: Any, selector: Selector = None) -> Any:
    """The logits among a model's outputs: `selector` when given, else the tensor itself, else the
    field named "logits" (a `ModelOutput` whose element 0 is a loss, as Raven's
    `CausalLMOutputRecurrentLatents` always is), else element 0 of a tuple."""
    if selector is not None or isinstance(output, torch.Tensor):
        return select(output, selector)
    if isinstance(output, dict) and "logits" in output:  # ModelOutput is a dict  # pragma: no mutate (`or`: a tuple of tensors never holds "logits")
        return output["logits"]
    if getattr(output, "logits", None) is not None:
        return output.logits
    return select(output, None)


# -- validation: every field checked when built, naming the field ------------------------------


def _is_selector(value) -> bool:
    return value is None or callable(value) or (isinstance(value, (int, str)) and not isinstance(value, bool))


def _check_selector(owner: str, name: str, value) -> None:
    if not _is_selector(value):
        raise TypeError(f"{owner}.{name} must be None, an index, a field name or a callable on the output, "
                        f"got {type(value).__name__} {value!r}")


def _check_path(owner: str, name: str, value, required: bool = False) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str):
        raise TypeError(f"{owner}.{name} must be a module path string like 'model.layers.0', got "
                        f"{type(value).__name__} {value!r}")
    if value and not all(part.isidentifier() or part.isdigit() for part in value.split(".")):
        raise ValueError(f"{owner}.{name} must be a dotted module path like 'model.layers.0', got {value!r}")


def _check_threshold(owner: str, value) -> None:
    if value is None or callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}.threshold must be a number in (0, 1], None or a callable (model, call) → number, "
                        f"got {type(value).__name__} {value!r}")
    if math.isnan(value) or not 0 < value <= 1:
        raise ValueError(f"{owner}.threshold must be in (0, 1] (a probability the exit rule compares with), got {value!r}")


def check_threshold_value(value, where: str) -> Optional[float]:
    """A threshold resolved at run time (from a callable or a per-call option), checked like a declared one."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    _check_threshold(where, value)
    if callable(value):
        raise TypeError(f"{where}.threshold: the callable returned a callable, not a number")
    return value


@dataclass(frozen=True)
class Injection:
    """How the injected input e enters an iteration (see the module docstring)."""

    mode: str = "added"
    module: Optional[str] = None  # e is this module's latest output
    arg: Optional[Union[int, str]] = None  # with mode "argument": e is this argument of the start
    fn: Optional[Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = None  # "function"

    def __post_init__(self):
        if not isinstance(self.mode, str) or self.mode not in INJECTION_MODES:
            raise ValueError(f"Injection.mode must be one of {INJECTION_MODES}, got {self.mode!r}")
        _check_path("Injection", "module", self.module)
        if self.arg is not None and (isinstance(self.arg, bool) or not isinstance(self.arg, (int, str))):
            raise TypeError(f"Injection.arg must be an argument index or name, got {type(self.arg).__name__} {self.arg!r}")
        if isinstance(self.arg, int) and self.arg < 0:
            raise ValueError(f"Injection.arg must be a non-negative argument index, got {self.arg}")
        if self.mode != "argument" and self.arg is not None:
            raise ValueError(f"Injection.arg is for mode 'argument' only (got mode {self.mode!r})")
        if self.mode == "argument" and self.arg is None and self.module is None:
            raise ValueError("Injection('argument') needs arg= (which argument of the start is e) or module=")
        if self.mode == "function" and not callable(self.fn):
            raise TypeError("Injection('function') needs fn=lambda model, h_prev, e: start state "
                            f"(how the iteration's input is built), got {self.fn!r}")
        if self.mode != "function" and self.fn is not None:
            raise ValueError(f"Injection.fn is for mode 'function' only (got mode {self.mode!r})")


@dataclass(frozen=True)
class Halting:
    """The halting head and the exit rule the model applies to it."""

    head: str
    output: str = "probability"
    rule: str = "act"
    # None with "cumulative_exit": the model always runs to the end; a callable (model, call) →
    # threshold where a per-call option or a model attribute decides (Ouro's `exit_threshold=`)
    threshold: Union[None, float, Callable[[torch.nn.Module, dict], Optional[float]]] = 0.99
    select: Selector = None
    exit_step: Optional[Callable[[torch.nn.Module, dict], Optional[int]]] = None  # every position exits here
    exits: Selector = None  # the model's own exit iteration (0-based) per sequence or position, among its outputs

    def __post_init__(self):
        _check_path("Halting", "head", self.head, required=True)
        if self.output not in HALTING_OUTPUTS:
            raise ValueError(f"Halting.output must be one of {HALTING_OUTPUTS}, got {self.output!r}")
        if self.rule not in HALTING_RULES:
            raise ValueError(f"Halting.rule must be one of {HALTING_RULES}, got {self.rule!r}")
        _check_threshold("Halting", self.threshold)
        if self.rule in ("act", "threshold") and self.threshold is None:
            raise ValueError(f"Halting.threshold: rule {self.rule!r} needs a threshold (None is for "
                             "'cumulative_exit' run to the end, or 'ponder')")
        _check_selector("Halting", "select", self.select)
        _check_selector("Halting", "exits", self.exits)
        if self.exit_step is not None and not callable(self.exit_step):
            raise TypeError(f"Halting.exit_step must be a callable (model, call) → iteration or None, got {self.exit_step!r}")


@dataclass(frozen=True)
class Router:
    """One routed layer of the loop. `bias` (an attribute of the router module) is added to the
    scores for the top-k choice only, as aux-loss-free balancing does; `top_k` is a number or
    the name of the router's attribute holding it. With several routers in a loop, an iteration's
    expert load counts expert e's tokens over all of them (tokens × routed layers × k in total),
    and the routing entropy averages over every router's tokens."""

    module: str
    top_k: Union[int, str]
    scoring: str = "softmax"
    select: Selector = None
    bias: Optional[str] = None
    indices: Selector = None  # the model's own chosen experts among the outputs, when it returns them

    def __post_init__(self):
        _check_path("Router", "module", self.module, required=True)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, str)):
            raise TypeError(f"Router.top_k must be a positive int or the name of the router's attribute holding it, "
                            f"got {type(self.top_k).__name__} {self.top_k!r}")
        if isinstance(self.top_k, int) and self.top_k < 1:
            raise ValueError(f"Router.top_k must be at least 1, got {self.top_k}")
        if isinstance(self.top_k, str) and not self.top_k.isidentifier():
            raise ValueError(f"Router.top_k must name an attribute of the router module, got {self.top_k!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"Router.scoring must be one of {SCORINGS}, got {self.scoring!r}")
        _check_selector("Router", "select", self.select)
        _check_selector("Router", "indices", self.indices)
        if self.bias is not None and (not isinstance(self.bias, str) or not self.bias.isidentifier()):
            raise ValueError(f"Router.bias must name an attribute of the router module, got {self.bias!r}")


@dataclass(frozen=True)
class LoopSpec:
    """One loop of a looped model, for `attach(model, spec=LoopSpec(...))` (several for nested
    loops). The module docstring explains the boundary model; `mythos_probe.presets` has worked
    examples for HRM, Inkling-2-Loop, Huginn, Ouro, PonderNet and Dory."""

    step: Optional[str] = None
    first: Optional[str] = None
    last: Optional[str] = None
    method: Optional[str] = None
    state: Selector = None  # h_t among what the end returns
    state_in: Union[int, str] = 0  # the incoming state among the start's arguments
    init: Union[None, str, Callable[[torch.nn.Module], torch.Tensor]] = None  # h_{−1}: a module path or model → h
    injection: Optional[Injection] = None
    halting: Optional[Halting] = None
    routers: tuple[Router, ...] = ()
    readout: Union[None, str, tuple[str, ...], Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = None
    logits: Selector = None  # the model's logits among its outputs; default: the field named "logits"
    looped: tuple[str, ...] = ()  # modules run once per iteration, for FLOPs; default: read from the boundaries
    name: str = "loop"
    readout_is_output: Union[bool, Callable[[torch.nn.Module, dict], bool]] = True  # checked at run time

    def __post_init__(self):
        for f in ("step", "first", "last"):
            _check_path("LoopSpec", f, getattr(self, f))
        if self.method is not None and not isinstance(self.method, str):
            raise TypeError(f"LoopSpec.method must be 'path.to.module.method_name', got {self.method!r}")
        given = [f for f in ("step", "method") if getattr(self, f)]
        given += ["first/last"] if self.first or self.last else []
        if len(given) != 1:
            raise ValueError("LoopSpec: declare exactly one of step=, first= and last=, or method= "
                             f"(where an iteration starts and ends); got {given or 'none'}")
        if (self.first is None) != (self.last is None):
            raise ValueError("LoopSpec: first= and last= go together (the first and last module of one pass)")
        if self.method and not all(part.isidentifier() for part in self.method.split(".")):
            raise ValueError("LoopSpec.method must be 'path.to.module.method_name' or a method of the model, "
                             f"got {self.method!r}")
        if isinstance(self.injection, str) or isinstance(self.halting, str):
            raise TypeError("LoopSpec.injection and .halting take Injection(...) and Halting(...), not a path string")
        if self.injection is not None and not isinstance(self.injection, Injection):
            raise TypeError(f"LoopSpec.injection takes Injection(...), got {type(self.injection).__name__}")
        if self.halting is not None and not isinstance(self.halting, Halting):
            raise TypeError(f"LoopSpec.halting takes Halting(...), got {type(self.halting).__name__}")
        if isinstance(self.routers, Router):
            raise TypeError("LoopSpec.routers is a tuple of Router(...), one per routed layer")
        if isinstance(self.routers, str) or not all(isinstance(r, Router) for r in self.routers):
            raise TypeError(f"LoopSpec.routers is a tuple of Router(...), one per routed layer, got {self.routers!r}")
        object.__setattr__(self, "routers", tuple(self.routers))  # a list works too; stored hashable
        _check_selector("LoopSpec", "state", self.state)
        _check_selector("LoopSpec", "logits", self.logits)
        if isinstance(self.state_in, bool) or not isinstance(self.state_in, (int, str)) or \
                (isinstance(self.state_in, int) and self.state_in < 0):
            raise TypeError(f"LoopSpec.state_in must be a non-negative argument index or an argument name, "
                            f"got {self.state_in!r}")
        if self.init is not None and not (isinstance(self.init, str) or callable(self.init)):
            raise TypeError(f"LoopSpec.init must be a module path or a callable model → tensor, got {self.init!r}")
        if isinstance(self.init, str):
            _check_path("LoopSpec", "init", self.init)
        readout = self.readout
        if isinstance(readout, list):
            object.__setattr__(self, "readout", readout := tuple(readout))
        if isinstance(readout, tuple):
            if not readout:
                raise ValueError("LoopSpec.readout: an empty tuple; give module paths, a callable, or None")
            for path in readout:
                _check_path("LoopSpec", "readout", path, required=True)
        elif readout is not None and not (isinstance(readout, str) or callable(readout)):
            raise TypeError(f"LoopSpec.readout must be module paths or a callable (model, state) → logits, got {readout!r}")
        if isinstance(readout, str):
            _check_path("LoopSpec", "readout", readout)
        if isinstance(self.looped, str):
            raise TypeError("LoopSpec.looped is a tuple of module paths, not one string")
        object.__setattr__(self, "looped", tuple(self.looped))
        for path in self.looped:
            _check_path("LoopSpec", "looped", path, required=True)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"LoopSpec.name must be a non-empty string, got {self.name!r}")
        if not (isinstance(self.readout_is_output, bool) or callable(self.readout_is_output)):
            raise TypeError(f"LoopSpec.readout_is_output must be a bool or a callable (model, call) → bool, "
                            f"got {self.readout_is_output!r}")


def resolve(model: torch.nn.Module, path: str, field: str) -> torch.nn.Module:
    """The submodule at `path`, or an error naming the LoopSpec field to fix."""
    try:  # "" is the model itself
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][:20]
        raise ValueError(f"LoopSpec.{field}: {type(model).__name__} has no submodule {path!r}; "
                         f"its submodules include {names}") from None
