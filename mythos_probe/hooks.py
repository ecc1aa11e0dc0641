"""Iteration-aware hook points and the activation cache that keeps every loop iteration.

TransformerLens keys hooks and its cache by name alone, so a block that runs T times per forward
keeps only its last call. Here a `LoopHookPoint` is a TransformerLens `HookPoint` that also knows
the current loop iteration (read from a shared `LoopClock` the model advances once per iteration,
so hooks pay nothing to learn it), and `IterationCache` keys activations by `(site, iteration)`.

This module is not: the model (`mythos_probe.model`) or the probes that reduce activations
(`mythos_probe.probes`). It must stay importable by the model without importing it back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Callable, Hashable

import torch
from transformer_lens.hook_points import HookPoint


class LoopClock:
    """The iteration a looped block is in (None outside the loop). One per looped block."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t: int | None = None


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
