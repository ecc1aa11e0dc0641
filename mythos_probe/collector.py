"""ForwardCollector: reduces each loop iteration to metric tensors on the device and, after the
forward, packs them into one buffer; `Pending.materialize` makes a `LoopTrace` from it.

Why this shape: inside the loop nothing is read back (no `.item()`, `.cpu()`, `bool(tensor)`,
no data-dependent shapes), so on a GPU the probes queue kernels behind the model's and never stall
it. After the forward every metric is flattened into one float32 tensor: one device-to-host copy
per forward, made lazily when the traces are read.

This module is not: the formulas (`metrics/`), the model plumbing (`adapters.py`) or the
notebook-facing recorder (`attach.py`).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from mythos_probe.adapters import ForwardContext, IterationTensors
from mythos_probe.metrics import convergence, experts, halting, lens, spectral
from mythos_probe.records import LoopTrace

PROBES = ("convergence", "spectral", "halting", "experts", "lora", "cost", "lens", "jacobian")
DEFAULT_PROBES = ("convergence", "spectral", "halting", "experts", "lora", "cost")
OPT_IN_PROBES = ("lens", "jacobian")  # each re-runs part of the model per iteration

_NAN = float("nan")


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.float().mean()


@dataclass
class Pending:
    """A recorded forward whose numbers still live on the device."""

    packed: torch.Tensor  # every metric, flattened, float32
    layout: list[tuple[str, str, tuple[int, ...]]]  # (kind, name, shape) in packing order
    meta: dict[str, Any]

    def materialize(self) -> LoopTrace:
        flat = self.packed.cpu().numpy()  # the one transfer of this forward
        meta = dict(self.meta)
        iteration, position, forward = {}, {}, {}
        expert_load = used = None
        offset = 0
        for kind, name, shape in self.layout:
            size = int(np.prod(shape))
            arr = flat[offset : offset + size].reshape(shape)
            offset += size
            if kind == "iteration":
                iteration[name] = arr.astype(np.float64)
            elif kind == "position":
                position[name] = np.moveaxis(arr, 0, -1)  # (I, B, T) → (B, T, I)
            elif kind == "forward":
                forward[name] = float(arr)
            elif kind == "expert_load":
                expert_load = np.rint(arr).astype(np.int64)
            elif kind == "used":
                used = np.rint(arr).astype(np.int64)
        nonfinite = iteration.get("nonfinite_fraction")
        if nonfinite is not None:
            bad = np.flatnonzero(nonfinite > 0)
            forward["diverged_at"] = float(bad[0]) if bad.size else -1.0
        cost = meta.pop("cost_fn", None)
        if cost is not None:
            forward["flops"], forward["flops_saved"] = cost(meta["iterations"])
        return LoopTrace(
            iteration_metrics=iteration, position_metrics=position, forward_metrics=forward,
            expert_load=expert_load, position_iterations=used, **meta,
        )


@dataclass
class _Forward:
    ctx: ForwardContext
    start_ns: int
    e: Optional[torch.Tensor] = None
    scalars: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    positions: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    states: list[torch.Tensor] = field(default_factory=list)
    halted: list[torch.Tensor] = field(default_factory=list)
    cum_halt: list[torch.Tensor] = field(default_factory=list)
    loads: list[torch.Tensor] = field(default_factory=list)
    lens_logp: list[torch.Tensor] = field(default_factory=list)
    prev_delta: Optional[torch.Tensor] = None
    prev_chosen: Optional[torch.Tensor] = None
    iterations: int = 0

    def put(self, name: str, value: torch.Tensor) -> None:
        self.scalars.setdefault(name, []).append(value)

    def put_position(self, name: str, value: torch.Tensor) -> None:
        self.positions.setdefault(name, []).append(value)


class ForwardCollector:
    def __init__(
        self,
        probes: tuple[str, ...],
        detail: str,
        lens_positions: str | list[int],
        sample_every: int,
        emit: Callable[[Pending], None],
        attributes: dict[str, Any],
        run_id: str,
        model_id: str,
        step_counter: Callable[[], Optional[int]],
        token_text: Optional[Callable[[int], str]] = None,
        correlation_positions: int = 32,
    ) -> None:
        self.probes = set(probes)
        self.detail = detail
        self.lens_positions = lens_positions
        self.sample_every = sample_every
        self.emit = emit
        self.attributes = attributes
        self.run_id = run_id
        self.model_id = model_id
        self.step_counter = step_counter
        self.token_text = token_text
        self.correlation_positions = correlation_positions
        self.forwards_seen = 0
        self.requests: dict[int, tuple[str, int]] = {}  # KV cache id → (trace id, decode steps)
        self.fwd: Optional[_Forward] = None

    # -- events from the adapter -----------------------------------------------------------

    def begin(self, ctx: ForwardContext) -> bool:
        index = self.forwards_seen
        self.forwards_seen += 1
        if index % self.sample_every:
            return False
        self.fwd = _Forward(ctx=ctx, start_ns=time.time_ns())
        return True

    def abort(self) -> None:
        self.fwd = None

    def encoded(self, e: torch.Tensor) -> None:
        if self.fwd is not None:
            self.fwd.e = e

    def iteration(self, it: IterationTensors) -> None:
        f = self.fwd
        if f is None:
            return
        t = f.iterations
        f.iterations += 1
        p = self.probes
        positions = self.detail == "positions"
        h, hp = it.state_out.float(), it.state_in.float()
        delta = h - hp
        norm_h = h.norm(dim=-1)  # (B, T), reused by several metrics
        norm_hp = hp.norm(dim=-1)
        if "convergence" in p:
            rel = delta.norm(dim=-1) / norm_h.clamp_min(convergence.EPS)
            cos = 1.0 - (h * hp).sum(-1) / (norm_h * norm_hp).clamp_min(convergence.EPS)
            f.put("rel_residual", rel.mean())
            f.put("cos_step", cos.mean())
            f.put("step_orthogonality", _NAN_T(h) if f.prev_delta is None
                  else convergence.step_orthogonality(delta, f.prev_delta).mean())
            f.put("token_correlation", convergence.token_correlation(h, self.correlation_positions))
            f.prev_delta = delta
            f.states.append(h)
            if positions:
                f.put_position("rel_residual", rel)
                f.put_position("cos_step", cos)
        if "spectral" in p:
            f.put("state_norm", norm_h.mean())
            f.put("growth_ratio", (norm_h / norm_hp.clamp_min(convergence.EPS)).mean())
            f.put("nonfinite_fraction", (~torch.isfinite(norm_h)).float().mean())
            ctx = f.ctx
            if ctx.injection_A is not None:
                f.put("norm_decay", (ctx.injection_A * hp).norm(dim=-1).mean())
                if f.e is not None:
                    f.put("norm_inject", (ctx.injection_B * f.e.float()).norm(dim=-1).mean())
            if it.block_out is not None:
                block = it.block_out if it.lora_delta is None else it.block_out + it.lora_delta
                f.put("norm_block", block.float().norm(dim=-1).mean())
            if positions:
                f.put_position("state_norm", norm_h)
        if "lora" in p and it.lora_delta is not None and it.block_out is not None:
            f.put("lora_rel_norm", (it.lora_delta.float().norm(dim=-1)
                                    / it.block_out.float().norm(dim=-1).clamp_min(convergence.EPS)).mean())
        if "halting" in p and it.halt_prob is not None:
            prob = it.halt_prob.float()
            low, high = halting.saturation(prob)
            f.put("halt_prob", prob.mean())
            f.put("cum_halt", _mean(it.cum_halt))
            f.put("halted_fraction", _mean(it.halted))
            f.put("act_weight", _mean(it.act_weight))
            f.put("halt_low_share", low)
            f.put("halt_high_share", high)
            if positions:
                f.put_position("halt_prob", prob)
                f.put_position("cum_halt", it.cum_halt.float())
                f.put_position("act_weight", it.act_weight.float())
        if it.halted is not None:
            f.halted.append(it.halted)
            if it.cum_halt is not None:
                f.cum_halt.append(it.cum_halt.float())
        if "experts" in p and it.topk_idx is not None:
            self._experts(f, it)
        if "lens" in p and f.ctx.lens is not None:
            with _rng_untouched(h.device), torch.no_grad():
                f.lens_logp.append(f.ctx.lens(it.state_out, self._lens_index(h)))
        if "jacobian" in p and f.ctx.step_fn is not None and f.e is not None:
            with _rng_untouched(h.device):
                step = f.ctx.step_fn(f.e[:1], t)
                f.put("jacobian_sigma_max", spectral.jacobian_sigma_max(step, it.state_in[:1]))

    def _experts(self, f: _Forward, it: IterationTensors) -> None:
        idx = it.topk_idx
        k = idx.shape[-1]
        E = it.router_logits.shape[-1] if it.router_logits is not None else int(f.ctx.cfg.n_experts)
        chosen = experts.choice_mask(idx, E)
        load = experts.load(idx, E)
        f.loads.append(load)
        for name, value in experts.balance(load).items():
            f.put(name, value)
        if it.router_logits is not None:
            f.put("routing_entropy", experts.routing_entropy(it.router_logits))
            f.put("bias_changed_share", experts.bias_changed_share(it.router_logits, chosen, k))
        f.put("topk_overlap", _NAN_T(load) if f.prev_chosen is None else experts.topk_overlap(chosen, f.prev_chosen, k))
        f.prev_chosen = chosen
        if it.shared_out is not None and it.routed_out is not None:
            f.put("shared_routed_ratio", experts.shared_routed_ratio(it.shared_out.float(), it.routed_out.float()))

    def _lens_index(self, h: torch.Tensor) -> torch.Tensor:
        T = h.shape[1]
        if self.lens_positions == "last":
            return torch.tensor([T - 1], device=h.device)
        if self.lens_positions == "all":
            return torch.arange(T, device=h.device)
        return torch.tensor([p % T for p in self.lens_positions], device=h.device)

    def end(self, logits: Any) -> None:
        f, self.fwd = self.fwd, None
        if f is None or f.iterations == 0:
            return
        end_ns = time.time_ns()
        ctx = f.ctx
        B, T = ctx.token_ids.shape
        I = f.iterations
        layout: list[tuple[str, str, tuple[int, ...]]] = []
        parts: list[torch.Tensor] = []

        def add(kind: str, name: str, value: torch.Tensor) -> None:
            layout.append((kind, name, tuple(value.shape)))
            parts.append(value.reshape(-1).float())

        if f.states and "convergence" in self.probes:
            dist = convergence.dist_to_final(torch.stack(f.states))  # (I, B, T)
            f.scalars["dist_to_final"] = list(dist.mean(dim=(1, 2)))
        if f.lens_logp and isinstance(logits, torch.Tensor):
            self._lens_summary(f, logits)
        for name, values in f.scalars.items():
            if len(values) == I:
                add("iteration", name, torch.stack([v.float().reshape(()) for v in values]))
        for name, values in f.positions.items():
            add("position", name, torch.stack(values))
        if f.loads:
            add("expert_load", "expert_load", torch.stack(f.loads))
        if f.halted:
            halted = torch.stack(f.halted)  # (I, B, T)
            used = halting.iterations_used(halted)
        else:
            halted, used = None, torch.full((B, T), I, device=parts[0].device if parts else None, dtype=torch.long)
        add("used", "used", used)
        add("iteration", "exit_count",
            torch.zeros(I, device=used.device).index_add_(0, (used - 1).reshape(-1), torch.ones(used.numel(), device=used.device)))
        add("forward", "mean_iterations", used.float().mean())
        add("forward", "reached_last_share", (used == I).float().mean())
        if halted is not None and ctx.exit_policy in ("act", "unknown") and f.cum_halt:
            ponder_cost, remainder = halting.ponder(torch.stack(f.cum_halt), used)
            add("forward", "ponder_cost", ponder_cost.mean())
            add("forward", "remainder_mass", remainder.mean())
        if halted is not None:
            add("forward", "halted_first_share", halted[0].float().mean())
        if ctx.injection_A is not None and "spectral" in self.probes:
            rho, contraction = spectral.injection_spectrum(ctx.injection_A)
            add("forward", "rho_A", rho)
            add("forward", "mean_contraction", contraction)

        trace_id, step = self._identity(ctx)
        meta: dict[str, Any] = dict(
            trace_id=trace_id, span_id=secrets.token_hex(8), run_id=self.run_id, model_id=self.model_id,
            step=step, start_ns=f.start_ns, end_ns=end_ns, batch=B, seq_len=T, n_loops=int(ctx.n_loops or I),
            iterations=I, exit_policy=ctx.exit_policy, detail=self.detail, token_ids=ctx.token_ids.detach().cpu(),
            attributes=dict(self.attributes),
        )
        if self.token_text is not None:
            ids = meta["token_ids"].tolist()
            meta["token_text"] = [[self.token_text(i) for i in row] for row in ids]
        meta["token_ids"] = meta["token_ids"].numpy()
        if "cost" in self.probes and ctx.cfg is not None:
            cfg, n_loops, past = ctx.cfg, int(ctx.n_loops or I), ctx.past_len
            from mythos_probe.metrics.cost import forward_cost

            meta["cost_fn"] = lambda iterations: forward_cost(cfg, B, T, iterations, n_loops, past)
        self.emit(Pending(torch.cat(parts), layout, meta))

    def _lens_summary(self, f: _Forward, logits: torch.Tensor) -> None:
        idx = self._lens_index(logits)
        final = logits[:, idx].float().log_softmax(-1)  # (B, P, V) the model's actual output
        stack = torch.stack(f.lens_logp)  # (I, B, P, V)
        top_final = final.argmax(-1)  # (B, P)
        kl_final = lens.kl(final[None], stack)  # (I, B, P)
        kl_prev = lens.kl(stack[1:], stack[:-1])
        f.scalars["lens_kl_final"] = list(kl_final.mean(dim=(1, 2)))
        f.scalars["lens_kl_prev"] = [_NAN_T(stack)] + list(kl_prev.mean(dim=(1, 2)))
        f.scalars["lens_entropy"] = list(lens.entropy(stack).mean(dim=(1, 2)))
        f.scalars["lens_top1_agree"] = list((stack.argmax(-1) == top_final).float().mean(dim=(1, 2)))
        f.scalars["lens_final_rank"] = list(lens.rank_of(stack, top_final.expand(stack.shape[:-1])).mean(dim=(1, 2)))
        if self.detail == "positions":
            B, T = logits.shape[:2]
            argmax = stack.argmax(-1)
            per_position = {
                "lens_kl_final": kl_final,
                "lens_kl_prev": torch.cat([torch.full_like(kl_final[:1], _NAN), kl_prev]),
                "lens_entropy": lens.entropy(stack),
                "lens_argmax": argmax.float(),
                "lens_top1_agree": (argmax == top_final).float(),
            }
            for name, values in per_position.items():  # (I, B, P) → (I, B, T), NaN off the lens
                full = torch.full((len(f.lens_logp), B, T), _NAN, device=logits.device)
                full[:, :, idx] = values
                f.positions[name] = list(full)

    def _identity(self, ctx: ForwardContext) -> tuple[str, int]:
        """Decode steps of one request (one KV cache) share a trace id; every forward is a span."""
        if ctx.cache_id is not None:
            trace_id, steps = self.requests.get(ctx.cache_id, (None, 0))
            if trace_id is None or ctx.past_len == 0:
                trace_id, steps = secrets.token_hex(16), 0
            if len(self.requests) > 4096:  # forget old requests; a new one starts at past_len 0
                self.requests.clear()
            self.requests[ctx.cache_id] = (trace_id, steps + 1)
            return trace_id, steps
        step = self.step_counter()
        return secrets.token_hex(16), self.forwards_seen - 1 if step is None else step


def _NAN_T(like: torch.Tensor) -> torch.Tensor:
    return torch.full((), _NAN, device=like.device)


class _rng_untouched:
    """Run a probe that calls model modules without moving the RNG streams (dropout in training
    would otherwise draw numbers and change the model's own later dropout masks)."""

    def __init__(self, device: torch.device) -> None:
        self.devices = [device] if device.type == "cuda" else []

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)

