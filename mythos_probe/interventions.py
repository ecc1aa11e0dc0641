"""Interventions on the loop: change what one iteration does and see what the trace records.

Four interventions, each a context manager that installs hooks on entry and removes them on exit
(also when the forward raises), usable alone or together with `attach` in any order:

- `force_loops(model, n)`: run exactly n iterations. Our `LoopedTransformer` gets
  `n_loops=n, exit="fixed"`; an unmodified OpenMythos gets `n_loops=n` and halting probability 0
  before the last iteration and 1 at it, so its ACT loop never stops early and its output is the
  last state, as `exit="fixed"`;
- `patch_state(model, state, t)`: replace the loop state after iteration t by `state` (taken
  from another run with `capture_states`); activation patching over loop depth;
- `ablate_expert(model, expert)`: that routed expert's router logit becomes the most negative
  finite value, so top-k never picks it and its softmax gate is exactly 0 (−inf in effect; a
  finite value keeps the router-entropy probe finite);
- `override_halting(model, p)`: the ACT halting probability (Graves 2016, "Adaptive Computation
  Time for Recurrent Neural Networks", §2) is the constant p at every iteration and position.

`compare(model, input_ids, intervention)` records one forward without and one with the
intervention and returns both `LoopTrace`s.

Where the hooks go: on our model, its TransformerLens hook points (`recurrent.hook_state_out`,
`recurrent.hook_halt_prob`, `recurrent.block.ffn.hook_router_logits`), reading
`hook.iteration`; on OpenMythos, torch module hooks on `recurrent.injection`, `recurrent.act` and
`recurrent.block.ffn.router`, with the iteration counted by `_OpenMythosClock`. Every hook that
changes a value is registered with `prepend=True`, so the probes of `attach` (registered before or
after) record the changed value, as the model uses it.

This module is not: a probe (probes never change outputs; these do) nor an exit policy of the
model (`model/looped.py`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from mythos_probe.probes.adapters import is_open_mythos
from mythos_probe.records import LoopTrace

__all__ = [
    "Intervention", "force_loops", "patch_state", "capture_states", "ablate_expert", "override_halting", "compare",
]


def _kind(model: torch.nn.Module) -> str:
    from mythos_probe.model.looped import LoopedTransformer

    if isinstance(model, LoopedTransformer):
        return "looped"
    if is_open_mythos(model):
        return "open_mythos"
    raise TypeError(
        f"interventions support mythos_probe.model.LoopedTransformer and open_mythos.main.OpenMythos, "
        f"not {type(model).__name__}"
    )


Handles = list  # of torch.utils.hooks.RemovableHandle


class Intervention:
    """A context manager that installs hooks on entry and removes every one of them on exit.
    Reusable: each `with` installs afresh. `label` tags the traces `compare` records."""

    def __init__(self, model: torch.nn.Module, label: str, install: Callable[[Handles], None]) -> None:
        self.model = model
        self.label = label
        self._install = install
        self._handles: Handles = []

    def __enter__(self) -> "Intervention":
        if self._handles:
            raise RuntimeError(f"intervention {self.label!r} is already active")
        try:
            self._install(self._handles)
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in reversed(handles):
            handle.remove()

    def __repr__(self) -> str:
        return f"Intervention({self.label!r})"


class _OpenMythosClock:
    """The iteration OpenMythos's loop is in (it exposes none): reset when the recurrent block
    starts, advanced after each call of the halting head, which runs exactly once per iteration
    (probes that re-run parts of the loop never call it). Hooks of the same intervention that read
    `t` inside `act` are prepended, so they run before the advance."""

    def __init__(self, model: torch.nn.Module, handles: Handles) -> None:
        self.t = 0
        self.forward = 0  # forwards of the recurrent block seen
        rec = model.recurrent
        handles.append(rec.register_forward_pre_hook(self._reset, prepend=True))
        handles.append(rec.act.register_forward_hook(self._advance))

    def _reset(self, module, args) -> None:
        self.t = 0
        self.forward += 1

    def _advance(self, module, args, output) -> None:
        self.t += 1


# ---------------------------------------------------------------------------------------------
# the interventions
# ---------------------------------------------------------------------------------------------


def force_loops(model: torch.nn.Module, n_loops: int) -> Intervention:
    """Every forward runs exactly `n_loops` iterations (see the module docstring for OpenMythos)."""
    if isinstance(n_loops, bool) or not isinstance(n_loops, int) or n_loops < 1:
        raise ValueError(f"n_loops must be a positive integer, got {n_loops!r}")
    kind = _kind(model)
    signature = inspect.signature(model.forward)
    overrides: dict[str, Any] = {"n_loops": n_loops, **({"exit": "fixed"} if kind == "looped" else {})}

    def arguments(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments.update(overrides)
        return bound.args, bound.kwargs

    def install(handles: Handles) -> None:
        handles.append(model.register_forward_pre_hook(arguments, with_kwargs=True, prepend=True))
        if kind == "open_mythos":
            clock = _OpenMythosClock(model, handles)

            def halt_only_at_the_end(module, args, p):
                return torch.full_like(p, 1.0 if clock.t == n_loops - 1 else 0.0)

            handles.append(model.recurrent.act.register_forward_hook(halt_only_at_the_end, prepend=True))

    return Intervention(model, f"force_loops(n_loops={n_loops})", install)


def _check_state(state: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    if state.shape != output.shape:
        raise ValueError(f"patched state has shape {tuple(state.shape)}, the loop state is {tuple(output.shape)}")
    return state.to(device=output.device, dtype=output.dtype)


def patch_state(model: torch.nn.Module, state: torch.Tensor, iteration: int) -> Intervention:
    """The loop state after iteration `iteration` (0-based) becomes `state` (B, T, D); later
    iterations start from it."""
    if iteration < 0:
        raise ValueError(f"iteration must be ≥ 0, got {iteration}")
    kind = _kind(model)
    state = state.detach()

    def install(handles: Handles) -> None:
        if kind == "looped":
            def replace(hook, args, output):
                return _check_state(state, output) if hook.iteration == iteration else None

            handles.append(model.hook_dict["recurrent.hook_state_out"].register_forward_hook(replace, prepend=True))
            return
        clock = _OpenMythosClock(model, handles)
        done = {"forward": None}

        def replace_injection(module, args, output):
            # the first injection call of the iteration is the loop's; later ones are probes (Jacobian)
            if clock.t == iteration and done["forward"] != clock.forward:
                done["forward"] = clock.forward
                return _check_state(state, output)
            return None

        handles.append(model.recurrent.injection.register_forward_hook(replace_injection, prepend=True))

    return Intervention(model, f"patch_state(iteration={iteration})", install)


@torch.no_grad()
def capture_states(model: torch.nn.Module, input_ids: torch.Tensor, **forward_kwargs) -> list[torch.Tensor]:
    """Run one forward and return the loop state after every iteration, [(B, T, D)] by t: the
    donor states for `patch_state`. Interventions active around it apply to the captured run."""
    kind = _kind(model)
    states: list[torch.Tensor] = []
    handles: Handles = []
    try:
        if kind == "looped":
            def keep(hook, args, output):
                states.append(output.detach().clone())

            handles.append(model.hook_dict["recurrent.hook_state_out"].register_forward_hook(keep))
        else:
            clock = _OpenMythosClock(model, handles)

            def keep_injection(module, args, output):
                if len(states) == clock.t:  # the loop's own call, not a probe's re-run
                    states.append(output.detach().clone())

            handles.append(model.recurrent.injection.register_forward_hook(keep_injection))
        model(input_ids, **forward_kwargs)
    finally:
        for handle in reversed(handles):
            handle.remove()
    return states


def ablate_expert(model: torch.nn.Module, expert: int | Iterable[int]) -> Intervention:
    """Routed expert(s) `expert` are never chosen: their router logit is set to the most negative
    finite value before top-k, so their load is zero and their softmax gate exactly 0."""
    experts = sorted({expert} if isinstance(expert, int) else set(expert))
    kind = _kind(model)
    n_experts, topk = int(model.cfg.n_experts), int(model.cfg.n_experts_per_tok)
    if not experts or any(not 0 <= e < n_experts for e in experts):
        raise ValueError(f"experts to ablate must lie in [0, {n_experts}), got {experts}")
    if n_experts - len(experts) < topk:
        raise ValueError(f"ablating {len(experts)} of {n_experts} experts leaves fewer than top-k={topk} to route to")
    index = torch.tensor(experts)

    def never_route(module, args, logits):
        out = logits.clone()
        out[:, index.to(out.device)] = torch.finfo(out.dtype).min
        return out

    def install(handles: Handles) -> None:
        site = (model.hook_dict["recurrent.block.ffn.hook_router_logits"] if kind == "looped"
                else model.recurrent.block.ffn.router)
        handles.append(site.register_forward_hook(never_route, prepend=True))

    return Intervention(model, f"ablate_expert({','.join(map(str, experts))})", install)


def override_halting(model: torch.nn.Module, probability: float) -> Intervention:
    """The ACT halting probability p_t is `probability` at every iteration and position."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"a halting probability lies in [0, 1], got {probability}")
    kind = _kind(model)

    def constant(module, args, p):
        return torch.full_like(p, probability)

    def install(handles: Handles) -> None:
        site = model.hook_dict["recurrent.hook_halt_prob"] if kind == "looped" else model.recurrent.act
        handles.append(site.register_forward_hook(constant, prepend=True))

    return Intervention(model, f"override_halting({probability:g})", install)


# ---------------------------------------------------------------------------------------------
# before and after
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def compare(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    intervention: Intervention,
    *,
    forward_kwargs: Optional[Mapping[str, Any]] = None,
    **attach_kwargs,
) -> tuple[LoopTrace, LoopTrace]:
    """(before, after): one recorded forward without, then one with `intervention`, both under
    `attach(model, **attach_kwargs)`. The traces carry the attribute `intervention` ("none" or
    the intervention's label) next to any `attributes` given."""
    from mythos_probe.probes.recorder import attach

    traces = []
    for active in (False, True):
        attributes = {**(attach_kwargs.get("attributes") or {}), "intervention": intervention.label if active else "none"}
        with attach(model, **{**attach_kwargs, "attributes": attributes}) as rec:
            if active:
                with intervention:
                    model(input_ids, **(forward_kwargs or {}))
            else:
                model(input_ids, **(forward_kwargs or {}))
        if not rec.traces:
            raise RuntimeError("the forward recorded no trace (is sample_every > 1?)")
        traces.append(rec.traces[-1])
    return traces[0], traces[1]
