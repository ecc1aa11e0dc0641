"""`from_cache(cache)`: the `LoopTrace` that `attach` would have recorded for a forward already run
with `LoopedTransformer.run_with_cache`.

It replays the cached loop sites through the same event stream the live adapter feeds
(`begin`, `encoded`, `iteration` per cached iteration, `end`) into the same `ForwardReducer`, so
every metric has its one definition (`probes/reductions.py`, `metrics/`). The forward context is
built by the live adapter's own code from the call's arguments the cache kept.

This module is not: the live recording (`recorder.attach`) or the cache (`model/cache.py`).
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable, Iterable, Optional

from mythos_probe.probes.adapters import IterationTensors, LoopedTransformerAdapter, _Adapter
from mythos_probe.probes.distributed import where as distributed_where
from mythos_probe.probes.reductions import DEFAULT_PROBES, PROBES, ForwardReducer, Pending
from mythos_probe.records import DETAIL_LEVELS, FORWARD_KINDS, LoopTrace


class _Replay(LoopedTransformerAdapter):
    """The live adapter's context, lens and step function, without its hooks: the forward ran."""

    def __init__(self, model) -> None:
        _Adapter.__init__(self, model, collector=None)


def from_cache(
    cache,
    probes: Iterable[str] | None = None,
    detail: str = "summary",
    *,
    lens_positions: str | list[int] = "last",
    attributes: Optional[dict[str, Any]] = None,
    run_id: Optional[str] = None,
    model_id: Optional[str] = None,
    kind: Optional[str] = None,
    token_text: Optional[Callable[[int], str]] = None,
) -> LoopTrace:
    """The `LoopTrace` of the forward a `LoopCache` holds, with the metrics `attach(model, probes,
    detail, ...)` records (same arguments, same meaning). The cache needs the loop sites the live
    probes read (`LoopedTransformerAdapter.SITES`, `recurrent.hook_act_weight`, `hook_encoded`,
    `hook_logits`): cache without a `names_filter`, or keep those. "lens" and "jacobian" re-run
    the coda and the loop step on the cached states, so the model must still hold the weights it
    ran with, and they refuse a forward run on a KV cache (its entries have moved on since)."""
    from mythos_probe.probes.recorder import _model_id

    probes = tuple(DEFAULT_PROBES if probes is None else probes)
    unknown = sorted(set(probes) - set(PROBES))
    if unknown:
        raise ValueError(f"unknown probes {unknown}; choose from {PROBES}")
    if detail not in DETAIL_LEVELS:
        raise ValueError(f"detail must be one of {DETAIL_LEVELS}, got {detail!r}")
    if kind is not None and kind not in FORWARD_KINDS:
        raise ValueError(f"kind must be one of {FORWARD_KINDS} or None, got {kind!r}")
    if not hasattr(cache, "forward") or not hasattr(cache, "model"):
        raise TypeError("from_cache takes the cache of LoopedTransformer.run_with_cache (a LoopCache), "
                        f"got {type(cache).__name__}")
    model, forward = cache.model, cache.forward
    if forward.get("kv_cache") is not None and {"lens", "jacobian"} & set(probes):
        raise ValueError("from_cache cannot replay 'lens' or 'jacobian' for a forward run on a KV cache: the cache "
                         "now holds this forward's keys too. Record that forward live with attach(model, ...), "
                         "or leave those probes out")
    n = cache.n_iterations()
    sites = {**LoopedTransformerAdapter.SITES, "recurrent.hook_act_weight": "act_weight"}
    missing = sorted(s for s in sites if cache.iterations(s) < n) + sorted(
        s for s in ("hook_encoded", "hook_logits") if s not in cache.sites())
    if missing:
        raise KeyError(f"from_cache needs {missing} from every iteration; run_with_cache without names_filter, "
                       "or with a filter that keeps them")

    built: list[Pending] = []
    reducer = ForwardReducer(
        probes=probes, detail=detail, lens_positions=lens_positions, sample_every=1, emit=built.append,
        attributes=dict(attributes or {}),
        run_id=run_id or time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2),
        model_id=model_id or _model_id(model), step_counter=lambda: None, token_text=token_text,
    )
    replay = _Replay(model)
    ctx = replay._begin((), {k: forward[k] for k in ("input_ids", "n_loops", "kv_cache", "start_pos", "exit")})
    live = getattr(model, "last_forward", None)
    model.last_forward = {k: forward[k] for k in ("freqs_cis", "causal", "kv_cache", "n_loops", "exit",
                                                  "iterations") if k in forward}
    try:  # the lens and the step function read the forward's context from the model
        reducer.begin(ctx)
        reducer.encoded(cache["hook_encoded"])
        for t in range(n):
            reducer.iteration(IterationTensors(**{field: cache[site, t] for site, field in sites.items()}))
        reducer.end(cache["hook_logits"])
    finally:
        model.last_forward = live
    (pending,) = built
    pending.meta.update(distributed_where().fields())
    pending.meta["kind"] = kind or ("training" if model.training else "served")
    return pending.materialize()
