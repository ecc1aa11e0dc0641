"""Which loop iteration each call of a module is: the map nnsight users need for `tracer.iter`.

nnsight numbers a module's calls within a trace (`tracer.iter[n]` is its n-th call) and leaves
to the user which loop iteration a call belongs to: in a looped model a module may run once per
iteration, once per iteration of an inner loop (HRM), also outside the loop, or again when a probe
re-runs it. `call_iterations(model, "recurrent.block", ids, n_loops=8)` runs one forward and
returns, for each call of that module in order, `(loop name, iteration)` of the innermost loop
iteration in progress, or `(None, None)` for a call outside every loop:

    calls = call_iterations(model, "recurrent.block", ids, n_loops=8)
    n = calls.index(("loop", 3))                 # the call that is iteration 3
    with NNsight(model).trace(ids, n_loops=8) as tracer:
        with tracer.iter[n]:
            model_envoy.recurrent.block.output[:] = 0

Iterations come from where `attach` reads them: our model's loop clock, or the preset's / your
`LoopSpec`'s iteration boundaries (`spec=`). The map is of this forward's arguments: a forward
with other arguments (loops, exit policy, a KV cache) may call the module another number of times.
Our model runs every iteration at full shape while anything wraps or hooks it (nnsight included),
so the calls nnsight counts are the ones counted here.

This module is not: a wrapper of nnsight (it is not imported here) nor a probe.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mythos_probe.loopspec import LoopSpec


class _Quiet:
    """A collector that keeps nothing: the adapter only tracks the iteration boundaries."""

    def begin(self, ctx) -> bool:
        return True

    def encoded(self, e) -> None:
        pass

    def iteration(self, it) -> None:
        pass

    def end(self, output, used=None) -> None:
        pass

    def abort(self) -> None:
        pass

    def _identity(self, ctx) -> tuple[str, int]:  # nested loops share the first loop's trace id
        return "", 0


def call_iterations(model: torch.nn.Module, module: str, *args, spec: LoopSpec | Sequence[LoopSpec] | None = None,
                    **kwargs) -> list[tuple[Optional[str], Optional[int]]]:
    """Run `model(*args, **kwargs)` once (no grad) and return `(loop name, iteration)` for each
    call of the submodule named `module` (as in `model.get_submodule`), in call order."""
    from mythos_probe.model.looped import LoopedTransformer
    from mythos_probe.probes.recorder import _adapter_for
    from mythos_probe.probes.spec_adapter import _Wrapped

    try:
        target = model.get_submodule(module)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no submodule {module!r}; names are those of "
                         "model.named_modules()") from None
    calls: list[tuple[Optional[str], Optional[int]]] = []
    if isinstance(model, LoopedTransformer) and spec is None:
        clock = model.recurrent.clock

        def where(*_):
            calls.append((None, None) if clock.t is None else ("loop", clock.t))

        handle = target.register_forward_pre_hook(where)
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        finally:
            handle.remove()
        return calls

    adapter = _adapter_for(model, spec)(_Quiet)

    def where_spec(*_):
        # the innermost loop with an iteration started and not yet ended (nested loops: HRM)
        running = [loop for loop in adapter.loops if "in" in loop.parts and not loop.pending]
        if not running or adapter.paused:
            calls.append((None, None))
            return
        inner = max(running, key=lambda loop: loop.started)
        calls.append((inner.spec.name, inner.t))

    stamps = {"n": 0}

    def stamp(loop):
        stamps["n"] += 1
        loop.started = stamps["n"]

    handles = []
    for loop in adapter.loops:  # stamp when each iteration starts, to tell the innermost
        loop.started = 0
        if loop.owner is not None:
            handles.append(_Wrapped(loop.owner, loop.method_name, lambda a, k, loop=loop: stamp(loop), lambda out: None))
        else:
            handles.append(loop.start_module.register_forward_pre_hook(lambda m, a, loop=loop: stamp(loop)))
    handles.append(target.register_forward_pre_hook(where_spec))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in reversed(handles):
            handle.remove()
        adapter.detach()
    return calls
