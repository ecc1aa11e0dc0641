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
from mythos_probe.metrics.cost import forward_cost
from mythos_probe.records import ITERATION_METRIC_NAMES, POSITION_METRIC_NAMES, LoopTrace

PROBES = ("convergence", "spectral", "halting", "experts", "lora", "cost", "lens", "jacobian")
DEFAULT_PROBES = ("convergence", "spectral", "halting", "experts", "lora", "cost")
OPT_IN_PROBES = ("lens", "jacobian")  # each re-runs part of the model per iteration

_NAN = float("nan")


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
            forward.update(cost(meta["iterations"], used))
        return LoopTrace(
            iteration_metrics=iteration, position_metrics=position, forward_metrics=forward,
            expert_load=expert_load, position_iterations=used, **meta,
        )


@dataclass
class _Forward:
    """What the loop left for the end of the forward: per-position maps (B, T) per iteration and
    the small per-iteration tensors the reductions need. Reductions run once, at the end."""

    ctx: ForwardContext
    start_ns: int
    e: Optional[torch.Tensor] = None
    maps: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name → [(B, T)] per iteration
    scalars: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name → [()] per iteration
    states: list[torch.Tensor] = field(default_factory=list)
    samples: list[torch.Tensor] = field(default_factory=list)  # (B, P, D) positions for token correlation
    halting: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    routing: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    lens_logp: list[torch.Tensor] = field(default_factory=list)
    prev: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # (h, ‖h‖, Δ) of t − 1
    iterations: int = 0

    def put(self, store: dict, name: str, value: torch.Tensor) -> None:
        store.setdefault(name, []).append(value)


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
        """Per-position maps only: every mean, share and ratio is taken once per forward, in
        `end`, over all iterations at once (fewer, larger kernels; no per-iteration reductions)."""
        f = self.fwd
        if f is None:
            return
        t = f.iterations
        f.iterations += 1
        p = self.probes
        maps = f.maps
        h, hp = it.state_out.float(), it.state_in.float()
        norm_h = h.norm(dim=-1)  # (B, T)
        prev = f.prev
        # the state entering t is the state that left t − 1: reuse its norm instead of recomputing
        same = prev is not None and prev[0].data_ptr() == hp.data_ptr() and prev[0].shape == hp.shape
        norm_hp = prev[1] if same else hp.norm(dim=-1)
        if "convergence" in p or "spectral" in p:
            f.put(maps, "norm_h", norm_h)
            f.put(maps, "norm_hp", norm_hp)
        if "convergence" in p:
            delta = h - hp
            f.put(maps, "norm_delta", delta.norm(dim=-1))
            f.put(maps, "dot_h_hp", torch.linalg.vecdot(h, hp))  # fused: no (B, T, D) temporary
            if prev is not None and prev[2] is not None:
                f.put(maps, "dot_delta", torch.linalg.vecdot(delta, prev[2]))
            f.states.append(h)
            f.samples.append(h[:, self._correlation_index(h)])
        else:
            delta = None
        f.prev = (h, norm_h, delta)
        if "spectral" in p and f.ctx.injection_A is not None:
            f.put(maps, "norm_decay", (f.ctx.injection_A * hp).norm(dim=-1))
        if "spectral" in p and it.injection is not None:  # a LoopSpec's e, which may change per iteration
            f.put(maps, "norm_e", it.injection.float().norm(dim=-1))
        if ("spectral" in p or "lora" in p) and it.block_out is not None:
            # ‖block + lora‖ from ‖block‖, ‖lora‖ and their dot product: no sum tensor is built
            # (no cancellation either: the LoRA delta is small next to the block output)
            block = it.block_out.float()
            f.put(maps, "norm_block_raw", block.norm(dim=-1))
            if it.lora_delta is not None:
                lora = it.lora_delta.float()
                f.put(maps, "norm_lora", lora.norm(dim=-1))
                f.put(maps, "dot_block_lora", torch.linalg.vecdot(block, lora))
        if it.halted is not None:
            f.put(f.halting, "halted", it.halted)
        if "halting" in p and it.halt_prob is not None:
            f.put(f.halting, "halt_prob", it.halt_prob)
            f.put(f.halting, "cum_halt", it.cum_halt)
            f.put(f.halting, "act_weight", it.act_weight)
        if "experts" in p and it.topk_idx is not None:
            f.put(f.routing, "topk_idx", it.topk_idx)
            if it.router_logits is not None:
                f.put(f.routing, "router_logits", it.router_logits)
            if it.shared_out is not None and it.routed_out is not None:
                f.put(f.routing, "norm_shared", it.shared_out.float().norm(dim=-1))
                f.put(f.routing, "norm_routed", it.routed_out.float().norm(dim=-1))
        if "lens" in p and f.ctx.lens is not None:
            with _rng_untouched(h.device), torch.no_grad():
                f.lens_logp.append(f.ctx.lens(it.state_out, self._lens_index(h)))
        if "jacobian" in p and f.ctx.step_fn is not None and f.e is not None:
            with _rng_untouched(h.device):
                step = f.ctx.step_fn(f.e[:1], t)
                f.put(f.scalars, "jacobian_sigma_max", spectral.jacobian_sigma_max(step, it.state_in[:1]))

    def _correlation_index(self, h: torch.Tensor) -> torch.Tensor:
        T = h.shape[1]
        return torch.linspace(0, T - 1, min(T, self.correlation_positions), device=h.device).round().long().unique()

    def _lens_index(self, h: torch.Tensor) -> torch.Tensor:
        T = h.shape[1]
        if self.lens_positions == "last":
            return torch.tensor([T - 1], device=h.device)
        if self.lens_positions == "all":
            return torch.arange(T, device=h.device)
        bad = [p for p in self.lens_positions if not -T <= p < T]
        if bad:  # p % T would silently read another position
            raise ValueError(f"lens_positions {bad} are out of range for a sequence of {T} tokens: "
                             f"give indices in [-{T}, {T - 1}], or lens_positions='all' or 'last'")
        return torch.tensor([p % T for p in self.lens_positions], device=h.device)

    def end(self, logits: Any) -> None:
        f, self.fwd = self.fwd, None
        if f is None or f.iterations == 0:
            return
        end_ns = time.time_ns()
        ctx = f.ctx
        B, T = ctx.token_ids.shape
        I = f.iterations
        per_position: dict[str, torch.Tensor] = {}  # name → (I, B, T), averaged into iteration metrics
        iteration: dict[str, torch.Tensor] = {}  # name → (I,)
        forward: dict[str, torch.Tensor] = {}
        m = {name: torch.stack(values) for name, values in f.maps.items() if len(values) == I}
        nan = torch.full((1,), _NAN, device=ctx.token_ids.device)

        if "norm_delta" in m:
            per_position["rel_residual"] = convergence.rel_residual(m["norm_delta"], m["norm_h"])
            per_position["cos_step"] = convergence.cos_step(m["dot_h_hp"], m["norm_h"], m["norm_hp"])
            per_position["dist_to_final"] = convergence.dist_to_final(f.states)
            if len(f.maps.get("dot_delta", ())) == I - 1 and I > 1:
                ortho = convergence.step_orthogonality(torch.stack(f.maps["dot_delta"]), m["norm_delta"][1:],
                                                       m["norm_delta"][:-1])
                iteration["step_orthogonality"] = torch.cat([nan, ortho.mean(dim=(1, 2))])
            else:
                iteration["step_orthogonality"] = nan.expand(I)
            iteration["token_correlation"] = convergence.token_correlation(torch.stack(f.samples))
        if "spectral" in self.probes and "norm_h" in m:
            per_position["state_norm"] = m["norm_h"]
            per_position["growth_ratio"] = spectral.growth_ratio(m["norm_h"], m["norm_hp"])
            iteration["nonfinite_fraction"] = spectral.nonfinite(m["norm_h"]).float().mean(dim=(1, 2))
            if "norm_decay" in m:
                per_position["norm_decay"] = m["norm_decay"]
            if "norm_block_raw" in m:
                squared = m["norm_block_raw"].square()
                if "norm_lora" in m:
                    squared = squared + m["norm_lora"].square() + 2 * m["dot_block_lora"]
                per_position["norm_block"] = squared.clamp_min(0).sqrt()
            if "norm_e" in m:
                iteration["norm_inject"] = m["norm_e"].mean(dim=(1, 2))
            elif ctx.injection_B is not None and f.e is not None:  # e does not change across iterations
                iteration["norm_inject"] = (ctx.injection_B * f.e.float()).norm(dim=-1).mean().expand(I)
        if "lora" in self.probes and "norm_lora" in m:
            per_position["lora_rel_norm"] = m["norm_lora"] / m["norm_block_raw"].clamp_min(convergence.EPS)
        halt = {name: torch.stack(values) for name, values in f.halting.items() if len(values) == I}
        if "halt_prob" in halt:
            prob = halt["halt_prob"].float()
            low, high = halting.saturation(prob)
            per_position["halt_prob"] = prob
            per_position["cum_halt"] = halt["cum_halt"].float()
            per_position["act_weight"] = halt["act_weight"].float()
            per_position["halted_fraction"] = halt["halted"].float()
            per_position["halt_low_share"] = low.float()
            per_position["halt_high_share"] = high.float()
        route = {name: torch.stack(values) for name, values in f.routing.items() if len(values) == I}
        expert_load = None
        if "topk_idx" in route:
            idx = route["topk_idx"]  # (I, N, k)
            k = idx.shape[-1]
            E = route["router_logits"].shape[-1] if "router_logits" in route else int(ctx.cfg.n_experts)
            chosen = experts.choice_mask(idx, E)  # (I, N, E)
            expert_load = experts.load(chosen)  # (I, E)
            iteration.update(experts.balance(expert_load))
            if "router_logits" in route:
                iteration["routing_entropy"] = experts.routing_entropy(route["router_logits"])
                iteration["bias_changed_share"] = experts.bias_changed_share(route["router_logits"], chosen, k)
            iteration["topk_overlap"] = torch.cat([nan, experts.topk_overlap(chosen[1:], chosen[:-1], k)])
            if "norm_shared" in route:
                iteration["shared_routed_ratio"] = experts.shared_routed_ratio(route["norm_shared"], route["norm_routed"])
        for name, values in f.scalars.items():
            if len(values) == I:
                iteration[name] = torch.stack([v.reshape(()) for v in values])

        positions_out = self.detail == "positions"
        for name, values in per_position.items():
            iteration[name] = values.float().mean(dim=(1, 2))
        if f.lens_logp and isinstance(logits, torch.Tensor):
            lens_iteration, lens_positions = self._lens_summary(f, logits)
            iteration.update(lens_iteration)
            if positions_out:
                per_position.update(lens_positions)

        if "halted" in halt:
            used = halting.iterations_used(halt["halted"])
        else:
            used = torch.full((B, T), I, dtype=torch.long, device=ctx.token_ids.device)
        iteration["exit_count"] = torch.zeros(I, device=used.device).index_add_(
            0, (used - 1).reshape(-1), torch.ones(used.numel(), device=used.device))
        forward["mean_iterations"] = used.float().mean()
        forward["reached_last_share"] = (used == I).float().mean()
        if "halted" in halt:
            forward["halted_first_share"] = halt["halted"][0].float().mean()
            if "cum_halt" in halt and ctx.exit_policy in ("act", "unknown"):
                ponder_cost, remainder = halting.ponder(halt["cum_halt"].float(), used)
                forward["ponder_cost"] = ponder_cost.mean()
                forward["remainder_mass"] = remainder.mean()
        if ctx.injection_A is not None and "spectral" in self.probes:
            forward["rho_A"], forward["mean_contraction"] = spectral.injection_spectrum(ctx.injection_A)

        # one flat buffer: a single device-to-host copy per forward, when the traces are read
        layout: list[tuple[str, str, tuple[int, ...]]] = []
        parts: list[torch.Tensor] = []

        def add(kind: str, name: str, value: torch.Tensor) -> None:
            layout.append((kind, name, tuple(value.shape)))
            parts.append(value.reshape(-1).float())

        for name, value in iteration.items():
            if name in ITERATION_METRIC_NAMES:
                add("iteration", name, value)
        if positions_out:
            for name, value in per_position.items():
                if name in POSITION_METRIC_NAMES:
                    add("position", name, value)
        if expert_load is not None:
            add("expert_load", "expert_load", expert_load)
        add("used", "used", used)
        for name, value in forward.items():
            add("forward", name, value)

        trace_id, step = self._identity(ctx)
        meta: dict[str, Any] = dict(
            trace_id=trace_id, span_id=secrets.token_hex(8), run_id=self.run_id, model_id=self.model_id,
            step=step, start_ns=f.start_ns, end_ns=end_ns, batch=B, seq_len=T, n_loops=int(ctx.n_loops or I),
            iterations=I, exit_policy=ctx.exit_policy, detail=self.detail, token_ids=ctx.token_ids.detach().cpu(),
            attributes=dict(self.attributes), loop_name=ctx.loop_name,
        )
        if self.token_text is not None:
            meta["token_text"] = [[self.token_text(i) for i in row] for row in meta["token_ids"].tolist()]
        meta["token_ids"] = meta["token_ids"].numpy()
        if "cost" in self.probes and ctx.cfg is not None:
            cfg, n_loops, past = ctx.cfg, int(ctx.n_loops or I), ctx.past_len

            meta["cost_fn"] = lambda iterations, used: forward_cost(cfg, B, T, iterations, n_loops, past, used)
        elif "cost" in self.probes and ctx.cost_fn is not None:
            meta["cost_fn"] = ctx.cost_fn
        self.emit(Pending(torch.cat(parts), layout, meta))

    def _lens_summary(self, f: _Forward, logits: torch.Tensor):
        """(iteration metrics (I,), position maps (I, B, T) with NaN off the sampled positions)."""
        idx = self._lens_index(logits)
        final = logits[:, idx].float().log_softmax(-1)  # (B, P, V) the model's actual output
        stack = torch.stack(f.lens_logp)  # (I, B, P, V)
        I = stack.shape[0]
        top_final = final.argmax(-1)  # (B, P)
        argmax = stack.argmax(-1)
        nan = torch.full_like(stack[:1, ..., 0], _NAN)
        sampled = {
            "lens_kl_final": lens.kl(final[None], stack),
            "lens_kl_prev": torch.cat([nan, lens.kl(stack[1:], stack[:-1])]),
            "lens_entropy": lens.entropy(stack),
            "lens_argmax": argmax.float(),
            "lens_top1_agree": (argmax == top_final).float(),
            "lens_final_rank": lens.rank_of(stack, top_final.expand(stack.shape[:-1])),
        }  # each (I, B, P)
        iteration = {name: v.mean(dim=(1, 2)) for name, v in sampled.items() if name != "lens_argmax"}
        iteration["lens_kl_prev"] = torch.cat([nan.reshape(-1)[:1], sampled["lens_kl_prev"][1:].mean(dim=(1, 2))])
        B, T = logits.shape[:2]
        positions = {}
        for name in ("lens_kl_final", "lens_kl_prev", "lens_entropy", "lens_argmax", "lens_top1_agree"):
            full = torch.full((I, B, T), _NAN, device=logits.device)
            full[:, :, idx] = sampled[name]
            positions[name] = full
        return iteration, positions

    def _identity(self, ctx: ForwardContext) -> tuple[str, int]:
        """Decode steps of one request (one KV cache) share a trace id; every forward is a span."""
        if ctx.trace_id is not None:  # nested loops of one forward share the identity of the first
            return ctx.trace_id, ctx.step
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


def _rng_untouched(device: torch.device):
    """Run a probe that calls model modules without moving the RNG streams (dropout in training
    would otherwise draw numbers and change the model's own later dropout masks)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
