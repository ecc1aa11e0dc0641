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
  another path (Inkling-2-Loop's messages).

Halting: `Halting(head, output="probability"|"logit", rule=…)` with the rule the model applies:
"act" (Graves' running sum to a threshold), "cumulative_exit" (Ouro: exit distribution
p_t = λ_t ∏_{s<t}(1 − λ_s), the last step takes the remainder, exit at the first step whose
cumulative mass reaches `threshold`), "threshold" (exit when λ_t ≥ threshold) or "ponder"
(PonderNet samples its exit; the record keeps the expectation: p_t, its cumulative mass, no exit).

Routers: one `Router` per routed layer in the loop, each with the selector of the logits among
its outputs, the scoring function, an optional bias added for the top-k choice only, top-k, and
optionally the selector of the indices the model chose (checked against the re-derived choice).

Readout (for the coda lens): module paths applied in order, or a callable (model, state) → logits.

Nested loops (HRM's high- and low-level cycles) are several `LoopSpec`s with distinct `name`s;
each gives one `LoopTrace` per forward carrying its `loop_name`, and they share the trace id.

Adding a preset: write the `LoopSpec`s for the model class in `presets.py`, then a test that
steps the model's loop by hand and compares every metric (`tests/probes/test_spec_*.py`).

This module is not: the hooks that read these boundaries (`spec_adapter.SpecAdapter`) or the
presets (`presets.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

Selector = Union[None, int, str, Callable[[Any], torch.Tensor]]
"""Picks a tensor from a module output: None (the tensor itself, or element 0 of a tuple or
`ModelOutput`), an index, an attribute/key name, or a callable on the output."""

INJECTION_MODES = ("added", "concat", "argument", "restart")
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


@dataclass(frozen=True)
class Injection:
    """How the injected input e enters an iteration (see the module docstring)."""

    mode: str = "added"
    module: Optional[str] = None  # e is this module's latest output
    arg: Optional[Union[int, str]] = None  # with mode "argument": e is this argument of the start

    def __post_init__(self):
        if self.mode not in INJECTION_MODES:
            raise ValueError(f"Injection.mode must be one of {INJECTION_MODES}, got {self.mode!r}")
        if self.mode == "argument" and self.arg is None and self.module is None:
            raise ValueError("Injection('argument') needs arg= (which argument of the start is e) or module=")


@dataclass(frozen=True)
class Halting:
    """The halting head and the exit rule the model applies to it."""

    head: str
    output: str = "probability"
    rule: str = "act"
    threshold: Optional[float] = 0.99  # None with "cumulative_exit": the model always runs to the end
    select: Selector = None

    def __post_init__(self):
        if self.output not in HALTING_OUTPUTS:
            raise ValueError(f"Halting.output must be one of {HALTING_OUTPUTS}, got {self.output!r}")
        if self.rule not in HALTING_RULES:
            raise ValueError(f"Halting.rule must be one of {HALTING_RULES}, got {self.rule!r}")


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
        if self.scoring not in SCORINGS:
            raise ValueError(f"Router.scoring must be one of {SCORINGS}, got {self.scoring!r}")


@dataclass(frozen=True)
class LoopSpec:
    """One loop of a looped model, for `attach(model, spec=LoopSpec(...))` (several for nested
    loops). The module docstring explains the boundary model; `mythos_probe.presets` has worked
    examples for HRM, Inkling-2-Loop, Huginn, Ouro and PonderNet."""

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
    logits: Selector = None  # the model's logits among its outputs (for the lens' final distribution)
    looped: tuple[str, ...] = ()  # modules run once per iteration, for FLOPs; default: read from the boundaries
    name: str = "loop"

    def __post_init__(self):
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
        if isinstance(self.routers, Router):
            raise TypeError("LoopSpec.routers is a tuple of Router(...), one per routed layer")
        object.__setattr__(self, "routers", tuple(self.routers))  # a list works too; stored hashable


def resolve(model: torch.nn.Module, path: str, field: str) -> torch.nn.Module:
    """The submodule at `path`, or an error naming the LoopSpec field to fix."""
    if path == "":
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][:20]
        raise ValueError(f"LoopSpec.{field}: {type(model).__name__} has no submodule {path!r}; "
                         f"its submodules include {names}") from None
