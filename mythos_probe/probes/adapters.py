"""Adapters: find the loop in a model and feed a `ForwardReducer` the same per-iteration tensors,
whatever the model is.

Three kinds of model, one event stream (`begin`, `encoded`, `iteration`, `end`):
1. our `LoopedTransformer`, through its TransformerLens hook points;
2. an unmodified `open_mythos.main.OpenMythos`, through torch module hooks on its recurrent block,
   router, shared experts, LoRA adapter, injection and halting head. What it does not expose (the
   chosen experts, gates, cumulative halting, the halted mask, the ACT weights) is re-derived
   exactly as `MoEFFN.forward` and `RecurrentBlock.forward` compute it;
3. any other looped model described by `LoopSpec`s (`loopspec.py`), recorded by
   `spec_adapter.SpecAdapter` on this module's base class; presets in `presets.py`.

Every hook detaches what it keeps and returns None, so probes never change outputs or gradients.
This module is not: the metric formulas (`metrics/`) or the trace building (`collector.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from mythos_probe.metrics.halting import act_step
from mythos_probe.model.config import LoopedConfig


@dataclass
class IterationTensors:
    """What one loop iteration did (detached; None where the model does not have it)."""

    state_in: torch.Tensor  # (B, T, D)
    state_out: torch.Tensor  # (B, T, D)
    block_out: Optional[torch.Tensor] = None  # (B, T, D) before the LoRA delta
    lora_delta: Optional[torch.Tensor] = None  # (B, T, D)
    halt_prob: Optional[torch.Tensor] = None  # (B, T)
    cum_halt: Optional[torch.Tensor] = None  # (B, T)
    halted: Optional[torch.Tensor] = None  # (B, T) bool: exited after this iteration
    act_weight: Optional[torch.Tensor] = None  # (B, T)
    router_logits: Optional[torch.Tensor] = None  # (N, E) unbiased
    topk_idx: Optional[torch.Tensor] = None  # (N, k)
    shared_out: Optional[torch.Tensor] = None  # (N, D)
    routed_out: Optional[torch.Tensor] = None  # (N, D)
    injection: Optional[torch.Tensor] = None  # (B, T, D) e entering this iteration (LoopSpec models)


@dataclass
class ForwardContext:
    """What a forward is about, known when it starts."""

    token_ids: torch.Tensor  # (B, T)
    n_loops: int
    exit_policy: str
    cfg: Optional[LoopedConfig]
    past_len: int = 0  # tokens already in the KV cache
    cache_id: Optional[int] = None  # id() of the KV cache: decode steps of one request share it
    injection_A: Optional[torch.Tensor] = None  # (D,) diagonal of Ā
    injection_B: Optional[torch.Tensor] = None  # (D,)
    router_bias: Optional[torch.Tensor] = None  # (E,) added to the logits for the top-k choice
    lens: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None  # (state, positions) → log-probs
    step_fn: Optional[Callable[[torch.Tensor, int], Callable[[torch.Tensor], torch.Tensor]]] = None  # Jacobian
    loop_name: str = "loop"
    trace_id: Optional[str] = None  # set for nested loops: every loop of a forward shares it
    step: Optional[int] = None
    cost_fn: Optional[Callable[..., dict[str, float]]] = None  # (iterations, used) → cost metrics, without a cfg
    budgets: Optional[tuple] = None  # one `LoopBudget` per row when the forward ran with per-request budgets


class _Hooks:
    """Removable handles, removed together (also when a forward raised)."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def add(self, handle) -> None:
        self.handles.append(handle)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _args(args, kwargs, index: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


class _Adapter:
    def __init__(self, model: torch.nn.Module, collector) -> None:
        self.model = model
        self.collector = collector
        self.hooks = _Hooks()
        self.active = False  # inside a recorded forward
        self.paused = False  # while a probe re-runs parts of the model (lens, Jacobian)
        self.parts: dict[str, torch.Tensor] = {}  # what the current iteration has produced so far

    def detach(self) -> None:
        self.hooks.remove()

    def _forward_hooks(self, begin: Callable[[tuple, dict], ForwardContext | None]) -> None:
        def pre(module, args, kwargs):
            if self.paused or self.active:
                return None
            ctx = begin(args, kwargs)
            self.active = ctx is not None and self.collector.begin(ctx)
            return None

        def post(module, args, kwargs, output):
            if self.active and not self.paused:
                if output is None:  # the forward raised: nothing half-built is kept
                    self.active = False
                    self.collector.abort()
                else:
                    self.before_end()
                    self.active = False
                    self.collector.end(output.detach() if isinstance(output, torch.Tensor) else output)
            return None

        self.hooks.add(self.model.register_forward_pre_hook(pre, with_kwargs=True))
        self.hooks.add(self.model.register_forward_hook(post, with_kwargs=True, always_call=True))

    def _keep(self, field: str):
        """A forward hook keeping the detached output as `self.parts[field]`."""
        def hook(module, args, output):
            if self.active and not self.paused:
                self.parts[field] = output.detach()

        return hook

    def before_end(self) -> None:
        """Complete anything pending before the forward's trace is built."""

    def pause(self):
        adapter = self

        class _Paused:
            def __enter__(self):
                adapter.paused = True

            def __exit__(self, *exc):
                adapter.paused = False

        return _Paused()


# ---------------------------------------------------------------------------------------------
# 1. our LoopedTransformer
# ---------------------------------------------------------------------------------------------


class LoopedTransformerAdapter(_Adapter):
    SITES = {
        "recurrent.hook_state_in": "state_in", "recurrent.hook_block_out": "block_out",
        "recurrent.hook_lora_delta": "lora_delta", "recurrent.hook_state_out": "state_out",
        "recurrent.hook_halt_prob": "halt_prob", "recurrent.hook_cum_halt": "cum_halt",
        "recurrent.hook_halted": "halted", "recurrent.block.ffn.hook_router_logits": "router_logits",
        "recurrent.block.ffn.hook_topk_idx": "topk_idx", "recurrent.block.ffn.hook_shared_out": "shared_out",
        "recurrent.block.ffn.hook_routed_out": "routed_out",
    }

    def __init__(self, model, collector) -> None:
        super().__init__(model, collector)
        self._forward_hooks(self._begin)
        hook_dict = model.hook_dict
        for site, field in self.SITES.items():
            self.hooks.add(hook_dict[site].register_forward_hook(self._keep(field)))
        self.hooks.add(hook_dict["hook_encoded"].register_forward_hook(self._on_encoded))
        # the ACT weight is the last site of an iteration: the iteration is complete there
        self.hooks.add(hook_dict["recurrent.hook_act_weight"].register_forward_hook(self._on_last))

    def _begin(self, args, kwargs) -> ForwardContext:
        m = self.model
        kv_cache = _args(args, kwargs, 2, "kv_cache")
        rec = m.recurrent
        budgets = _args(args, kwargs, 6, "budgets")
        budgets = None if budgets is None else tuple(budgets)
        return ForwardContext(
            token_ids=_args(args, kwargs, 0, "input_ids"),
            # with budgets the loop runs as deep as the deepest row's
            n_loops=(max(b.max_loops for b in budgets) if budgets else None)
            or _args(args, kwargs, 1, "n_loops") or m.cfg.max_loop_iters,
            budgets=budgets,
            exit_policy=_args(args, kwargs, 4, "exit", "act"),
            cfg=m.cfg,
            past_len=int(_args(args, kwargs, 3, "start_pos", 0) or 0),
            cache_id=None if kv_cache is None else id(kv_cache),
            injection_A=rec.injection.get_A().detach(),
            injection_B=rec.injection.B.detach(),
            router_bias=rec.block.ffn.router_bias,
            lens=self._lens,
            step_fn=self._step_fn,
        )

    def _on_encoded(self, module, args, output):
        if self.active and not self.paused:
            self.collector.encoded(output.detach())

    def _on_last(self, module, args, output):
        if self.active and not self.paused:
            parts, self.parts = self.parts, {}
            self.collector.iteration(IterationTensors(act_weight=output.detach(), **parts))

    def _lens(self, state: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with self.pause():
            return self.model.coda_lens(state, positions)

    def _step_fn(self, e: torch.Tensor, t: int):
        rec = self.model.recurrent
        ctx = self.model.last_forward
        from mythos_probe.model.looped import loop_index_embeddings

        emb = loop_index_embeddings(t + 1, rec.loop_dim, e.shape[-1], e.device, e.dtype)[t]

        def step(h):
            with self.pause():
                out = rec.block(rec.norm(h + emb + e), ctx["freqs_cis"], ctx["causal"], None)
                out = out + rec.lora(out, t)
                return rec.injection(h, e, out)

        return step


# ---------------------------------------------------------------------------------------------
# 2. unmodified OpenMythos
# ---------------------------------------------------------------------------------------------


def is_open_mythos(model: torch.nn.Module) -> bool:
    # the MRO, not the class alone: FSDP2's fully_shard swaps in a subclass defined by torch
    return any(c.__module__.startswith("open_mythos") for c in type(model).__mro__) and hasattr(model, "recurrent")


class OpenMythosAdapter(_Adapter):
    """Forward boundaries are the embedding (start) and the head (end): `OpenMythos.generate`
    calls `self.forward` directly, which bypasses hooks on the root module. Loop arguments
    (n_loops, KV cache) are read when the recurrent block starts."""

    def __init__(self, model, collector) -> None:
        super().__init__(model, collector)
        rec = model.recurrent
        ffn = rec.block.ffn
        self.threshold = float(model.cfg.act_threshold)
        self.topk = int(ffn.topk)
        self.hooks.add(model.embed.register_forward_pre_hook(self._on_embed))
        self.hooks.add(model.head.register_forward_hook(self._on_head))
        self.hooks.add(rec.register_forward_pre_hook(self._on_loop_start, with_kwargs=True))
        self.hooks.add(ffn.router.register_forward_hook(self._keep("router_logits")))
        for shared in ffn.shared_experts:
            self.hooks.add(shared.register_forward_hook(self._on_shared))
        self.hooks.add(ffn.register_forward_hook(self._on_ffn))
        self.hooks.add(rec.block.register_forward_hook(self._keep("block_out")))
        self.hooks.add(rec.lora.register_forward_hook(self._keep("lora_delta")))
        self.hooks.add(rec.injection.register_forward_hook(self._on_injection))
        self.hooks.add(rec.act.register_forward_hook(self._on_halt))
        self.loop_ctx: dict[str, Any] = {}

    def _on_embed(self, module, args):
        if self.paused:
            return
        if self.active:  # the previous forward raised before reaching the head
            self.collector.abort()
        m = self.model
        self.parts = {}
        self.ctx = ForwardContext(
            token_ids=args[0], n_loops=m.cfg.max_loop_iters, exit_policy="act",
            cfg=LoopedConfig.from_mythos_config(m.cfg),
            injection_A=m.recurrent.injection.get_A().detach(),
            injection_B=m.recurrent.injection.B.detach(),
            router_bias=m.recurrent.block.ffn.router_bias,
            lens=self._lens, step_fn=self._step_fn,
        )
        self.active = self.collector.begin(self.ctx)

    def _on_head(self, module, args, output):
        if self.active and not self.paused:
            self.active = False
            self.collector.end(output.detach())

    def _on_loop_start(self, module, args, kwargs):
        if not self.active or self.paused:
            return None
        h, e = args[0], args[1]
        n_loops = _args(args, kwargs, 4, "n_loops")
        kv_cache = _args(args, kwargs, 5, "kv_cache")
        self.loop_ctx = dict(freqs_cis=_args(args, kwargs, 2, "freqs_cis"), mask=_args(args, kwargs, 3, "mask"),
                             kv_cache=kv_cache)
        ctx = self.ctx
        ctx.n_loops = n_loops or self.model.cfg.max_loop_iters  # as OpenMythos: `n_loops or max_loop_iters`
        if kv_cache is not None:
            ctx.cache_id = id(kv_cache)
            T = h.shape[1]
            # the prelude has already appended this forward's keys; the loop's first key has not
            if "prelude_0" in kv_cache:
                ctx.past_len = next(iter(kv_cache["prelude_0"].values())).shape[1] - T
            elif "recurrent_loop_0" in kv_cache:
                ctx.past_len = next(iter(kv_cache["recurrent_loop_0"].values())).shape[1]
        B, T = h.shape[:2]
        self.cumulative = torch.zeros(B, T, device=h.device)
        self.halted = torch.zeros(B, T, device=h.device, dtype=torch.bool)
        self.collector.encoded(e.detach())
        return None

    def _on_shared(self, module, args, output):
        if self.active and not self.paused:
            prev = self.parts.get("shared_out")
            self.parts["shared_out"] = output.detach() if prev is None else prev + output.detach()

    def _on_ffn(self, module, args, output):
        if not self.active or self.paused:
            return
        # re-derive the routing exactly as MoEFFN.forward: top-k on logits + router_bias
        logits = self.parts["router_logits"]
        self.parts["topk_idx"] = (logits + module.router_bias).topk(self.topk, dim=-1).indices
        flat_out = output.detach().reshape(-1, output.shape[-1])
        shared = self.parts.get("shared_out")
        self.parts["routed_out"] = flat_out if shared is None else flat_out - shared

    def _on_injection(self, module, args, output):
        if self.active and not self.paused:
            self.parts["state_in"] = args[0].detach()
            self.parts["state_out"] = output.detach()

    def _on_halt(self, module, args, output):
        if not self.active or self.paused:
            return
        p = output.detach()
        weight, self.cumulative, self.halted = act_step(p, self.cumulative, self.halted, self.threshold)
        parts, self.parts = self.parts, {}
        self.collector.iteration(IterationTensors(
            halt_prob=p, cum_halt=self.cumulative, halted=self.halted, act_weight=weight, **parts,
        ))

    def _lens(self, state: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        m = self.model
        ctx = self.loop_ctx
        kv = ctx["kv_cache"]
        scratch = dict(kv) if kv is not None else None  # read the cache, never write it
        with self.pause():
            x = state
            for i, layer in enumerate(m.coda):
                x = layer(x, ctx["freqs_cis"], ctx["mask"], scratch, cache_key=f"coda_{i}")
            return F.log_softmax(m.head(m.norm(x[:, positions])).float(), dim=-1)

    def _step_fn(self, e: torch.Tensor, t: int):
        from open_mythos.main import loop_index_embedding

        rec = self.model.recurrent
        ctx = self.loop_ctx

        def step(h):
            with self.pause():
                out = rec.block(rec.norm(loop_index_embedding(h, t, rec.loop_dim) + e), ctx["freqs_cis"], ctx["mask"])
                out = out + rec.lora(out, t)
                return rec.injection(h, e, out)

        return step


