"""Iteration-aware hook points and the activation cache that keeps every loop iteration.

TransformerLens keys hooks and its cache by name alone, so a block that runs T times per forward
keeps only its last call. Here a `LoopHookPoint` is a TransformerLens `HookPoint` that also knows
the current loop iteration (read from a shared `LoopClock` the model advances once per iteration,
so hooks pay nothing to learn it), and `IterationCache` keys activations by `(site, iteration)`.

`refuse_compiled` stops probes from being attached where their hooks would not fire: inside code
compiled by torch.compile.

This module is not: the model (`mythos_probe.model`) or the probes that reduce activations
(`mythos_probe.probes.reductions`). It must stay importable by the model without importing it back.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import Callable, Hashable

import torch
from transformer_lens.hook_points import HookPoint


class LoopClock:
    """The iteration a looped block is in (None outside the loop). One per looped block."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t: int | None = None


class HookSwitch:
    """Whether a model's layer sites (residual, attention, MLP) call their hook points this
    forward: the model sets `on` once per forward when a hook is attached to one of them, so an
    unhooked forward pays no module call per site, and turns it off while it re-runs its own layers
    for a probe (the coda lens), whose calls are no forward of the model's."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = False


def watched_globally() -> bool:
    """Whether a global module hook (`register_module_forward_hook`) is set: it sees every module."""
    return bool(torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks)


def has_hooks(hook_point: HookPoint) -> bool:
    """Whether a forward hook would see `hook_point` (on it, or a global module hook)."""
    return bool(hook_point._forward_hooks or hook_point._forward_pre_hooks) or watched_globally()


class LoopHookPoint(HookPoint):
    """A HookPoint inside the loop: hooks receive it as `hook` and read `hook.iteration`."""

    def __init__(self, clock: LoopClock) -> None:
        super().__init__()
        self.clock = clock

    @property
    def iteration(self) -> int | None:
        return self.clock.t


CacheKey = Hashable  # "site" for sites run once, ("site", t) for loop sites


def cache_key(hook: HookPoint) -> CacheKey:
    if isinstance(hook, LoopHookPoint):
        return (hook.name, hook.iteration)
    return hook.name


class IterationCache(Mapping):
    """Activations of one forward: `cache["site"]` for sites run once, `cache["site", t]` for
    loop sites, `cache.stack("site")` for a (iterations, ...) tensor of a loop site."""

    def __init__(self, store: dict[CacheKey, torch.Tensor] | None = None) -> None:
        self._store: dict[CacheKey, torch.Tensor] = {} if store is None else store

    def __getitem__(self, key: CacheKey) -> torch.Tensor:
        if key in self._store:
            return self._store[key]
        if isinstance(key, str) and (key, 0) in self._store:
            raise KeyError(f"{key!r} runs once per iteration: use cache[{key!r}, t] or cache.stack({key!r})")
        raise KeyError(f"{key!r} is not in the cache; cached sites: {sorted(self.sites())}")

    def __iter__(self) -> Iterator[CacheKey]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def sites(self) -> set[str]:
        return {k[0] if isinstance(k, tuple) else k for k in self._store}

    def iterations(self, site: str) -> int:
        return sum(1 for k in self._store if isinstance(k, tuple) and k[0] == site)

    def stack(self, site: str) -> torch.Tensor:
        n = self.iterations(site)
        if n == 0:
            raise KeyError(f"{site!r} is not a loop site in this cache")
        return torch.stack([self._store[(site, t)] for t in range(n)])

    def caching_hook(self) -> Callable[[torch.Tensor, HookPoint], None]:
        """A forward hook that stores detached activations under their (site, iteration) key."""

        def hook(x: torch.Tensor, hook: HookPoint) -> None:
            self._store[cache_key(hook)] = x.detach()

        return hook


def compiled_modules(model: torch.nn.Module) -> list[str]:
    """Names of `model` (as "") and of its submodules that run compiled by torch.compile:
    `torch.compile(module)` wrappers, `module.compile()`, or a compiled `forward` attribute."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    if dynamo is None:  # torch.compile has never run in this process: nothing is compiled
        return []

    def compiled(module: torch.nn.Module) -> bool:
        return (isinstance(module, dynamo.OptimizedModule) or module._compiled_call_impl is not None
                or hasattr(module.__dict__.get("forward"), "_torchdynamo_orig_callable"))

    # a plain walk first (attach runs once per recording; named_modules costs ms on a large tree)
    stack = [model]
    while stack:
        module = stack.pop()
        if compiled(module):
            return [name for name, m in model.named_modules() if compiled(m)]
        stack.extend(m for m in module._modules.values() if m is not None)
    return []


def refuse_compiled(model: torch.nn.Module) -> None:
    """Raise when part of `model` is compiled. Hooks registered after torch.compile never fire
    inside the compiled code (dynamo does not guard on them), and registered before it they are
    traced into graphs with partial side effects: either way metrics would go missing without a
    word. (Measured on torch 2.13: 0 of 8 router hook calls, expert metrics None.)"""
    names = compiled_modules(model)
    if names:
        where = ", ".join(f"submodule {n!r}" if n else "the model itself" for n in names)
        raise RuntimeError(
            f"mythos_probe.attach: {where} ({type(model).__name__}) runs compiled by torch.compile, and probe "
            "hooks do not fire inside compiled code, so the loop metrics would be missing. Record with the eager "
            "modules: attach to an uncompiled model (for `m = torch.compile(module)` the eager module is "
            "`m._orig_mod`; for `module.compile()` use a copy made before compiling), and compile after the "
            "`with attach(...)` block."
        )
