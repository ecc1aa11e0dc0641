"""ForwardReducer: reduces each loop iteration to metric tensors on the device and, after the
forward, packs them into one buffer; `Pending.materialize` makes a `LoopTrace` from it.

Why this shape: inside the loop nothing is read back (no `.item()`, `.cpu()`, `bool(tensor)`,
no data-dependent shapes), so on a GPU the probes queue kernels behind the model's and never stall
it. Each iteration is reduced when it ends (one row of iteration scalars), and nothing the size of
a state outlives it except the previous step: probe memory does not grow by a state per iteration
(dist_to_final keeps a bfloat16 position sample, see `metrics/convergence.py`). What depends only
on the shapes is computed once per forward. After the forward every metric is flattened into one
float32 tensor: one device-to-host copy per forward, made lazily when the traces are read.

This module is not: the formulas (`metrics/`), the model plumbing (`adapters.py`) or the
notebook-facing recorder (`recorder.py`).
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from mythos_probe.probes.adapters import ForwardContext, IterationTensors
from mythos_probe.metrics import convergence, experts, halting, lens, spectral, trajectory
from mythos_probe.metrics.cost import forward_cost
from mythos_probe.user_frame import outside
from mythos_probe.records import ITERATION_METRIC_NAMES, POSITION_METRIC_NAMES, LoopTrace

PROBES = ("convergence", "spectral", "halting", "experts", "lora", "cost", "lens", "jacobian", "trajectory")
DEFAULT_PROBES = ("convergence", "spectral", "halting", "experts", "lora", "cost")
# lens and jacobian each re-run part of the model per iteration; trajectory keeps every state of
# the loop on the device until the loop ends (memory: one state per iteration), at detail="positions"
OPT_IN_PROBES = ("lens", "jacobian", "trajectory")

_NAN = float("nan")


@dataclass
class Pending:
    """A recorded forward whose numbers still live on the device."""

    packed: torch.Tensor  # every metric, flattened, float32
    # (kind, names, shape) in packing order; "iteration" and "forward" are one table each, a row per name
    layout: list[tuple[str, tuple[str, ...], tuple[int, ...]]]
    meta: dict[str, Any]
    # (B, T, I, I) centred Gram matrices of the states, for the trajectory probe: its eigh runs on
    # the device here, after the forward (a batched eigh checks its results on the host, a sync
    # that must not fall inside the loop), and only the projections join the one transfer
    trajectory: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (Gram, rounding floor)

    def materialize(self) -> LoopTrace:
        packed, layout = self.packed, self.layout
        if self.trajectory is not None:
            proj, share = trajectory.principal_paths(*self.trajectory)  # (k, I, B, T), (k, B, T)
            maps = {f"traj_pc{j + 1}": proj[j] for j in range(len(proj))}
            maps.update({f"traj_pc{j + 1}_share": share[j].expand_as(proj[j]) for j in range(len(share))})
            packed = torch.cat([packed, *(m.reshape(-1) for m in maps.values())])
            layout = [*layout, *(("position", (name,), tuple(m.shape)) for name, m in maps.items())]
        flat = packed.cpu().numpy()  # the one transfer of this forward
        meta = dict(self.meta)
        iteration, position, forward = {}, {}, {}
        expert_load = used = None
        offset = 0
        for kind, names, shape in layout:
            size = math.prod(shape)
            arr = flat[offset : offset + size].reshape(shape)
            offset += size
            if kind == "iteration":
                iteration.update(zip(names, arr.astype(
                    np.float64,  # pragma: no mutate (astype(None) is float64 too)
                )))
            elif kind == "position":
                position[names[0]] = np.moveaxis(arr, 0, -1)  # (I, B, T) → (B, T, I)
            elif kind == "forward":
                forward.update(zip(names, arr.tolist()))
            elif kind == "expert_load":
                expert_load = np.rint(arr)  # counts: LoopTrace stores them as int64
            elif kind == "used":
                used = np.rint(arr).astype(np.int64)
        iterations = meta["iterations"]
        if used is not None and used.size and (used.min() < 1 or used.max() > iterations):
            # checked here, where the forward's numbers reach the host anyway: no sync in the forward
            raise ValueError(
                f"mythos_probe: loop {meta['loop_name']!r} reports positions that used {used.min()} to {used.max()} "
                f"iterations, outside the {iterations} it ran, so this forward's halting metrics would be wrong. "
                "Where the model gives its own exits (Halting(..., exits=...)), the selector must pick each "
                "position's 0-based exit iteration; attach(..., check_every=1) checks them in every forward.")
        nonfinite = iteration.get("nonfinite_fraction")
        if nonfinite is not None:
            bad = np.flatnonzero(nonfinite > 0)
            forward["diverged_at"] = float(bad[0]) if bad.size else -1.0
        cost = meta.pop("cost_fn", None)
        if cost is not None:
            forward.update(cost(iterations, used))
        return LoopTrace(
            iteration_metrics=iteration, position_metrics=position, forward_metrics=forward,
            expert_load=expert_load, position_iterations=used, **meta,
        )


@dataclass
class _Forward:
    """What the loop keeps between iterations. Everything here is either O(1) in the loop count
    (the previous step, running halting state) or small per iteration: one row of iteration
    scalars, the (M, B, T) maps at detail="positions", the expert loads (E,), and the bfloat16
    sample of the state that dist_to_final needs (1/32 of a state)."""

    ctx: ForwardContext
    start_ns: int
    e: Optional[torch.Tensor] = None
    iterations: int = 0
    # computed at the first iteration, once per forward: they depend only on the shapes
    corr_index: Optional[torch.Tensor] = None
    dist_index: Optional[torch.Tensor] = None
    lens_index: Optional[torch.Tensor] = None
    nan: Optional[torch.Tensor] = None
    ones: Optional[torch.Tensor] = None  # N·k ones for the expert loads
    norm_inject: Optional[torch.Tensor] = None  # mean ‖B⊙e‖: e is the same every iteration
    rows: list[tuple[tuple[str, ...], torch.Tensor]] = field(default_factory=list)  # (names, (S,)) per iteration
    maps: list[tuple[tuple[str, ...], torch.Tensor]] = field(default_factory=list)  # (names, (M, B, T)) per iteration
    loads: list[torch.Tensor] = field(default_factory=list)  # (E,) per iteration
    trail: list[torch.Tensor] = field(default_factory=list)  # (B, P, D) bfloat16 per iteration
    final: Optional[torch.Tensor] = None  # (B, P, D) float32 sample of the latest state
    dist: Optional[torch.Tensor] = None  # (I,) once the last iteration is known
    lens_logp: list[torch.Tensor] = field(default_factory=list)
    prev: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (h, ‖h‖) of t − 1
    prev_delta: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (Δ, ‖Δ‖) of t − 1
    prev_topk: Optional[torch.Tensor] = None
    halt_iter: Optional[torch.Tensor] = None  # (B, T) first halting iteration + 1, 0 while running
    halted_first: Optional[torch.Tensor] = None
    cum_prev: Optional[torch.Tensor] = None  # cumulative halting after t − 1 ...
    cum_prev2: Optional[torch.Tensor] = None  # ... and after t − 2
    before_last: Optional[torch.Tensor] = None  # (B, T) cumulative halting before the halting step
    bias_zero: bool = False  # the router bias is known to be zero: top-k choices are unbiased
    # trajectory probe: every state of the loop (released at the loop's end, once reduced to
    # their Gram matrices) and each iteration's relative step (B, T)
    traj_states: list[torch.Tensor] = field(default_factory=list)
    traj_steps: list[torch.Tensor] = field(default_factory=list)
    traj_gram: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (B, T, I, I) Gram, (B, T) rounding floor
    traj_dtype: torch.dtype = torch.float32  # the model's state dtype (its rounding)
    traj_fixed: Optional[torch.Tensor] = None  # (I, B, T)


class ForwardReducer:
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
        if "trajectory" in self.probes and detail != "positions":
            raise ValueError("the trajectory probe records a path per position: attach(model, "
                             "probes=[*DEFAULT_PROBES, 'trajectory'], detail='positions')")
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
        self.fwd = _Forward(ctx=ctx, start_ns=time.time_ns(), bias_zero=_known_zero(ctx.router_bias))
        return True

    def abort(self) -> None:
        self.fwd = None

    def encoded(self, e: torch.Tensor) -> None:
        if self.fwd is not None:
            self.fwd.e = e

    def iteration(self, it: IterationTensors) -> None:
        """Reduces one iteration to a row of iteration scalars right away (one mean over the
        stacked per-position maps), so nothing state-sized outlives the iteration but the
        previous step and the bfloat16 position sample. No host reads: every value stays a
        device tensor until the forward's single transfer."""
        f = self.fwd
        if f is None:
            return
        t = f.iterations
        f.iterations += 1
        p = self.probes
        h, hp = _f32(it.state_out), _f32(it.state_in)
        if f.nan is None:
            self._first_iteration(f, h)
        pos: dict[str, torch.Tensor] = {}  # (B, T) per-position values, averaged into the row
        scalars: dict[str, torch.Tensor] = {}  # () iteration scalars
        norm_h = torch.linalg.vector_norm(h, dim=-1)  # (B, T)
        prev = f.prev
        # the state entering t is the state that left t − 1: reuse its norm instead of recomputing
        same = prev is not None and prev[0].data_ptr() == hp.data_ptr() and prev[0].shape == hp.shape
        norm_hp = prev[1] if same else torch.linalg.vector_norm(hp, dim=-1)
        if "convergence" in p:
            delta = h - hp  # exact: never ‖h‖² + ‖h_prev‖² − 2 h·h_prev, which cancels once converged
            norm_delta = torch.linalg.vector_norm(delta, dim=-1)
            pos["rel_residual"] = convergence.rel_residual(norm_delta, norm_h)
            pos["cos_step"] = convergence.cos_step(torch.linalg.vecdot(h, hp), norm_h, norm_hp)
            if f.prev_delta is None:
                scalars["step_orthogonality"] = f.nan
            else:
                last, norm_last = f.prev_delta
                scalars["step_orthogonality"] = convergence.step_orthogonality(
                    torch.linalg.vecdot(delta, last), norm_delta, norm_last).mean()
            f.prev_delta = (delta, norm_delta)
            scalars["token_correlation"] = convergence.token_correlation(h[:, f.corr_index])
            f.final = h[:, f.dist_index]
            f.trail.append(f.final.to(torch.bfloat16))
        f.prev = (h, norm_h)
        if "trajectory" in p:
            # kept whole until the loop ends: detached, and copied when `h` is the model's own
            # tensor (a model may update its state in place)
            f.traj_states.append(h.detach().clone() if h is it.state_out else h.detach())
            f.traj_dtype = it.state_out.dtype
            step = pos.get("rel_residual")
            if step is None:
                step = convergence.rel_residual(torch.linalg.vector_norm(h - hp, dim=-1), norm_h)
            f.traj_steps.append(step)
        if "spectral" in p:
            pos["state_norm"] = norm_h
            pos["growth_ratio"] = spectral.growth_ratio(norm_h, norm_hp)
            scalars["nonfinite_fraction"] = spectral.nonfinite(norm_h).float().mean()
            if f.ctx.injection_A is not None:
                pos["norm_decay"] = torch.linalg.vector_norm(f.ctx.injection_A * hp, dim=-1)
            if it.injection is not None:  # a LoopSpec's e, which may change per iteration
                scalars["norm_inject"] = torch.linalg.vector_norm(_f32(it.injection), dim=-1).mean()
        if ("spectral" in p or "lora" in p) and it.block_out is not None:
            block = _f32(it.block_out)
            norm_block = torch.linalg.vector_norm(block, dim=-1)
            if it.lora_delta is None:
                if "spectral" in p:
                    pos["norm_block"] = norm_block
            else:
                lora = _f32(it.lora_delta)
                norm_lora = torch.linalg.vector_norm(lora, dim=-1)
                if "spectral" in p:
                    # ‖block + lora‖ from the two norms and their dot product: no sum tensor is built
                    # (no cancellation either: the LoRA delta is small next to the block output)
                    squared = norm_block.square() + norm_lora.square() + 2 * torch.linalg.vecdot(block, lora)
                    pos["norm_block"] = squared.clamp_min(0).sqrt()
                if "lora" in p:
                    pos["lora_rel_norm"] = norm_lora / norm_block.clamp_min(convergence.EPS)
        if it.halted is not None:
            self._halting(f, it, t, pos)
        if "experts" in p and it.topk_idx is not None:
            self._experts(f, it, scalars)
        if "lens" in p and f.ctx.lens is not None:
            with _rng_untouched(h.device), torch.no_grad():
                f.lens_logp.append(f.ctx.lens(it.state_out, f.lens_index))
        # e of this iteration where the adapter gives one (HRM's z_H changes between L cycles)
        e = it.injection if it.injection is not None else f.e
        if "jacobian" in p and f.ctx.step_fn is not None and e is not None:
            with _rng_untouched(h.device):
                step = f.ctx.step_fn(e[:1], t)
                scalars["jacobian_sigma_max"] = spectral.jacobian_sigma_max(step, it.state_in[:1]).float().reshape(())

        parts = []
        if pos:
            maps = torch.stack(list(pos.values()))  # (M, B, T)
            parts.append(maps.mean(dim=(1, 2)))
            if self.detail == "positions":  # keep only the maps that are position metrics
                keep = [j for j, name in enumerate(pos) if name in POSITION_METRIC_NAMES]
                f.maps.append((tuple(list(pos)[j] for j in keep), maps[keep]))
        if scalars:
            parts.append(torch.stack(list(scalars.values())))
        if parts:
            f.rows.append((tuple(pos) + tuple(scalars), torch.cat(parts)))
        if f.ctx.n_loops and f.iterations == f.ctx.n_loops:
            self._loop_done(f)  # the last iteration: release the loop-wide state before the coda

    def _first_iteration(self, f: _Forward, h: torch.Tensor) -> None:
        """What depends only on the shapes, computed once per forward instead of per iteration."""
        T, device = h.shape[1], h.device
        f.nan = torch.full((), _NAN, device=device)
        f.corr_index = convergence.evenly_spaced(T, min(T, self.correlation_positions), device)
        f.dist_index = convergence.evenly_spaced(T, convergence.sample_positions(T), device)
        if "lens" in self.probes:
            f.lens_index = self._lens_index(T, device)
        if f.ctx.injection_B is not None and f.e is not None and "spectral" in self.probes:
            f.norm_inject = torch.linalg.vector_norm(f.ctx.injection_B * f.e.float(), dim=-1).mean()

    def _halting(self, f: _Forward, it: IterationTensors, t: int, pos: dict[str, torch.Tensor]) -> None:
        """Exit bookkeeping, streamed: the first halting iteration of each position and the
        cumulative probability before it (for ponder cost) are updated in place of keeping the
        per-iteration masks."""
        if f.halt_iter is None:
            f.halt_iter = torch.zeros(it.halted.shape, dtype=torch.long, device=it.halted.device)
            f.halted_first = it.halted.float().mean()
        newly, f.halt_iter = halting.first_halt(it.halted, f.halt_iter, t)
        if it.cum_halt is not None:
            cum = _f32(it.cum_halt)
            before = torch.zeros_like(cum) if f.cum_prev is None else f.cum_prev
            f.before_last = before if f.before_last is None else torch.where(newly, before, f.before_last)
            f.cum_prev2, f.cum_prev = f.cum_prev, cum
        if "halting" in self.probes and it.halt_prob is not None:
            prob = _f32(it.halt_prob)
            low, high = halting.saturation(prob)
            pos["halt_prob"] = prob
            if it.cum_halt is not None:  # a LoopSpec exit rule may give p_t without ACT's bookkeeping
                pos["cum_halt"] = _f32(it.cum_halt)
            if it.act_weight is not None:
                pos["act_weight"] = _f32(it.act_weight)
            pos["halted_fraction"] = it.halted.float()
            pos["halt_low_share"] = low.float()
            pos["halt_high_share"] = high.float()

    def _experts(self, f: _Forward, it: IterationTensors, scalars: dict[str, torch.Tensor]) -> None:
        idx = it.topk_idx  # (N, k)
        logits = it.router_logits
        E = (logits.shape[-1]  # pragma: no mutate (logits are (N, E): axis 1 is the last)
             if logits is not None else int(f.ctx.cfg.n_experts))
        if f.ones is None:  # N is the same at every iteration of a forward (topk_overlap compares them)
            f.ones = torch.ones(idx.numel(), device=idx.device)
        f.loads.append(experts.load(idx, E, f.ones))
        if logits is not None:
            scalars["routing_entropy"] = experts.routing_entropy(logits)
            # a zero bias leaves the top-k unchanged: the share is 0 without another top-k
            scalars["bias_changed_share"] = f.nan.new_zeros(()) if f.bias_zero else experts.bias_changed_share(logits, idx)
        scalars["topk_overlap"] = f.nan if f.prev_topk is None else experts.topk_overlap(idx, f.prev_topk)
        f.prev_topk = idx
        if it.shared_out is not None and it.routed_out is not None:
            scalars["shared_routed_ratio"] = experts.shared_routed_ratio(it.shared_out, it.routed_out)

    def _loop_done(self, f: _Forward) -> None:
        """dist_to_final from the sample trail, then drop everything state-sized, so the probes
        hold nothing through the coda and head (where a plain forward peaks in memory)."""
        if f.trail and f.dist is None:
            f.dist = convergence.dist_to_final(f.trail[:-1], f.final)
        if f.traj_states and f.traj_gram is None:
            f.traj_gram = trajectory.centred_gram(torch.stack(f.traj_states), f.traj_dtype)
            f.traj_fixed = trajectory.settled(torch.stack(f.traj_steps))
        f.traj_states, f.traj_steps = [], []
        f.trail, f.final, f.prev, f.prev_delta, f.prev_topk = [], None, None, None, None

    def _lens_index(self, T: int, device) -> torch.Tensor:
        if self.lens_positions == "last":
            return torch.tensor([T - 1], device=device)
        if self.lens_positions == "all":
            return torch.arange(T, device=device)
        bad = [p for p in self.lens_positions if not -T <= p < T]
        if bad:  # p % T would silently read another position
            raise ValueError(f"lens_positions {bad} are out of range for a sequence of {T} tokens: "
                             f"give indices in [-{T}, {T - 1}], or lens_positions='all' or 'last'")
        return torch.tensor([p % T for p in self.lens_positions], device=device)

    def end(self, logits: Any, used: Optional[torch.Tensor] = None) -> None:
        """Build the forward's trace. `used`: (B, T) iterations each position used, where the
        adapter knows them from the model (its own exits, per-token depths); else the halting
        bookkeeping decides."""
        f, self.fwd = self.fwd, None
        if f is None:
            return
        if f.iterations == 0:
            warnings.warn(
                "mythos_probe: a recorded forward ran no loop iteration the probes could see, so it has "
                "no trace. If the looped block is compiled (torch.compile), record with the eager "
                "module; with a LoopSpec, check that `step` names the submodule called every iteration.",
                stacklevel=outside(),
            )
            return
        end_ns = time.time_ns()
        self._loop_done(f)
        ctx = f.ctx
        B, T = ctx.token_ids.shape
        I = f.iterations
        device = f.nan.device
        iteration = _columns(f.rows)  # name → (I,)
        forward: dict[str, torch.Tensor] = {}
        if f.dist is not None and f.dist.shape[0] == I:  # (more iterations than n_loops: none)
            iteration["dist_to_final"] = f.dist
        if f.norm_inject is not None:
            iteration["norm_inject"] = f.norm_inject.expand(I)
        expert_load = None
        if len(f.loads) == I:
            expert_load = torch.stack(f.loads)  # (I, E)
            iteration.update(experts.balance(expert_load))
        if f.lens_logp and isinstance(logits, torch.Tensor):
            lens_iteration, lens_positions = self._lens_summary(f, logits)
            iteration.update(lens_iteration)
        else:
            lens_positions = {}
            if f.lens_logp:
                warnings.warn(
                    "mythos_probe: the lens ran, but the model's output holds no logits tensor to compare it with, "
                    "so this forward has no lens metrics. Select the logits among its outputs (LoopSpec logits=...), "
                    "or leave 'lens' out of the probes.",
                    stacklevel=outside(),
                )

        if used is not None:
            used = used.to(device=device, dtype=torch.long)
        elif f.halt_iter is not None:
            used = halting.iterations_used(f.halt_iter, I)
        else:
            used = torch.full((B, T), I, dtype=torch.long, device=device)
        # clamped: an exit outside the loop, which `Pending.materialize` refuses once on the host, must not
        # fail inside index_add_ first (an IndexError here, a device-side assert on a GPU)
        iteration["exit_count"] = torch.zeros(I, device=used.device).index_add_(
            0, (used - 1).clamp(0, I - 1).reshape(-1), torch.ones(used.numel(), device=used.device))
        forward["mean_iterations"] = used.float().mean()
        forward["reached_last_share"] = (used == I).float().mean()
        if f.halted_first is not None:
            forward["halted_first_share"] = f.halted_first
            if f.before_last is not None and ctx.exit_policy in ("act", "unknown"):
                # positions that never halted used all I iterations: their "before last" is after I − 2
                never = f.halt_iter == 0
                fallback = f.cum_prev2 if f.cum_prev2 is not None else torch.zeros_like(f.before_last)
                ponder_cost, remainder = halting.ponder(used, torch.where(never, fallback, f.before_last))
                forward["ponder_cost"] = ponder_cost.mean()
                forward["remainder_mass"] = remainder.mean()
        if ctx.injection_A is not None and "spectral" in self.probes:
            forward["rho_A"], forward["mean_contraction"] = spectral.injection_spectrum(ctx.injection_A)

        # one flat buffer: a single device-to-host copy per forward, when the traces are read;
        # the iteration and forward metrics go in as one table each (one stack, one layout entry)
        layout: list[tuple[str, tuple[str, ...], tuple[int, ...]]] = []
        parts: list[torch.Tensor] = []

        def add(kind: str, names: tuple[str, ...], value: torch.Tensor) -> None:
            layout.append((kind, names, tuple(value.shape)))
            parts.append(value.reshape(-1).float())

        names = tuple(name for name in iteration if name in ITERATION_METRIC_NAMES)
        if names:
            add("iteration", names, torch.stack([iteration[name] for name in names]))
        traj = {}
        if f.traj_fixed is not None and f.traj_fixed.shape[0] == I:  # (more iterations than n_loops: none)
            traj["traj_fixed"] = f.traj_fixed
        if self.detail == "positions":
            for name, value in {**_columns(f.maps), **lens_positions, **traj}.items():
                if name in POSITION_METRIC_NAMES:
                    add("position", (name,), value)
        if expert_load is not None:
            add("expert_load", ("expert_load",), expert_load)
        add("used", ("used",), used)
        add("forward", tuple(forward), torch.stack([value.reshape(()).float() for value in forward.values()]))

        trace_id, step = self._identity(ctx)
        meta: dict[str, Any] = dict(
            trace_id=trace_id, span_id=secrets.token_hex(8), run_id=self.run_id, model_id=self.model_id,
            step=step, start_ns=f.start_ns, end_ns=end_ns, batch=B, seq_len=T, n_loops=int(ctx.n_loops or I),
            iterations=I, exit_policy=ctx.exit_policy, detail=self.detail, token_ids=ctx.token_ids.detach().cpu(),
            attributes=dict(self.attributes), loop_name=ctx.loop_name,
        )
        if ctx.budgets:
            meta.update(
                row_max_loops=[b.max_loops for b in ctx.budgets], row_min_loops=[b.min_loops for b in ctx.budgets],
                row_exit_threshold=[b.exit_threshold for b in ctx.budgets],
                row_budget_reason=[b.reason for b in ctx.budgets],
            )
        if self.token_text is not None:
            meta["token_text"] = [[self.token_text(i) for i in row] for row in meta["token_ids"].tolist()]
        meta["token_ids"] = meta["token_ids"].numpy()
        if "cost" in self.probes and ctx.cfg is not None:
            cfg, n_loops, past = ctx.cfg, int(ctx.n_loops or I), ctx.past_len

            meta["cost_fn"] = lambda iterations, used: forward_cost(cfg, B, T, iterations, n_loops, past, used)
        elif "cost" in self.probes and ctx.cost_fn is not None:
            meta["cost_fn"] = ctx.cost_fn
        gram = f.traj_gram if traj else None
        self.emit(Pending(torch.cat(parts), layout, meta, trajectory=gram))

    def _lens_summary(self, f: _Forward, logits: torch.Tensor):
        """(iteration metrics (I,), position maps (I, B, T) with NaN off the sampled positions).
        One iteration at a time: (B, P, V) temporaries, never an (I, B, P, V) stack."""
        idx = f.lens_index
        B, T = f.ctx.token_ids.shape
        vocab = f.lens_logp[0].shape[-1]
        if logits.dim() != 3 or logits.shape[0] != B or not 0 < logits.shape[1] <= T or logits.shape[-1] != vocab:
            # e.g. a model returning its hidden states: a KL between them and the lens means nothing
            raise ValueError(
                f"mythos_probe: the lens compares each iteration's readout, logits over {vocab} tokens, with the "
                f"model's output logits (batch {B}, at most {T} positions, {vocab}), but the model's output is "
                f"{tuple(logits.shape)}. Select its logits among its outputs (LoopSpec logits=...), or leave "
                "'lens' out of the probes."
            )
        # logits of the last L positions only (`logits_to_keep` in generate): the others have no final
        off = T - logits.shape[1]
        final = logits[:, (idx - off).clamp_min(0)].float().log_softmax(-1)  # (B, P, V) the model's actual output
        top_final = final.argmax(-1)  # (B, P)
        nan = torch.full_like(top_final, _NAN, dtype=torch.float32)
        has_final = (idx >= off)[None, :].expand_as(nan)
        columns: dict[str, list[torch.Tensor]] = {name: [] for name in (
            "lens_kl_final", "lens_kl_prev", "lens_entropy", "lens_argmax", "lens_top1_agree", "lens_final_rank")}
        prev = None
        for logp in f.lens_logp:
            argmax = logp.argmax(-1)
            columns["lens_kl_final"].append(lens.kl(final, logp))
            columns["lens_kl_prev"].append(nan if prev is None else lens.kl(logp, prev))
            columns["lens_entropy"].append(lens.entropy(logp))
            columns["lens_argmax"].append(argmax.float())
            columns["lens_top1_agree"].append((argmax == top_final).float())
            columns["lens_final_rank"].append(lens.rank_of(logp, top_final))
            prev = logp
        sampled = {name: torch.stack(values) for name, values in columns.items()}  # each (I, B, P)
        if off > 0:  # pragma: no mutate (at 0 every sampled position has a final: the where keeps all)
            for name in ("lens_kl_final", "lens_top1_agree", "lens_final_rank"):
                sampled[name] = torch.where(has_final, sampled[name], nan)
        iteration = {name: v.mean(dim=(1, 2)) for name, v in sampled.items() if name != "lens_argmax"}
        I = len(f.lens_logp)
        positions = {}
        if self.detail == "positions":
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
            trace_id, steps = self.requests.get(ctx.cache_id, (None, 0))  # pragma: no mutate (a new id resets steps)
            if trace_id is None or ctx.past_len == 0:
                trace_id, steps = secrets.token_hex(16), 0
            if len(self.requests) > 4096:  # forget old requests; a new one starts at past_len 0
                self.requests.clear()
            self.requests[ctx.cache_id] = (trace_id, steps + 1)
            return trace_id, steps
        step = self.step_counter()
        return secrets.token_hex(16), self.forwards_seen - 1 if step is None else step


def _f32(x: torch.Tensor) -> torch.Tensor:
    """x as float32; a Python-side check skips the no-op cast (a dispatch per call, per iteration)."""
    return x if x.dtype == torch.float32 else x.float()  # pragma: no mutate (x.float() of a float32 x is x itself)


def _columns(rows: list[tuple[tuple[str, ...], torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-iteration rows (names, (S, ...)) → name → (I, ...). Rows normally share their names
    (one stack); a name missing from some iteration is dropped rather than misaligned."""
    if not rows:
        return {}
    first = rows[0][0]
    if all(names == first for names, _ in rows):
        table = torch.stack([values for _, values in rows])  # (I, S, ...)
        return {name: table[:, j] for j, name in enumerate(first)}
    common = set(first).intersection(*(names for names, _ in rows))
    return {name: torch.stack([values[names.index(name)] for names, values in rows]) for name in first if name in common}


def _known_zero(bias: Optional[torch.Tensor]) -> bool:
    """Whether the router bias is all zeros, read only where that costs no device sync: a CPU
    tensor is read in place (numpy view, no aten op). On a GPU the share is computed instead."""
    # float() first: numpy has no bfloat16 (a float32 bias is returned as is, no copy)
    return bias is not None and bias.device.type == "cpu" and not bias.detach().float().numpy().any()


def _rng_untouched(device: torch.device):
    """Run a probe that calls model modules without moving the RNG streams (dropout in training
    would otherwise draw numbers and change the model's own later dropout masks)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
