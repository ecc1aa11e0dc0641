"""Training the small `LoopedTransformer` of the demo on modular chains, and measuring how it uses depth.

`train(cfg, settings)` is the loop as a library function (probes attached, so the run is stored
with its optimizer steps); `main()` is its CLI (`python -m mythos_probe.demo.training --help`), which
writes the shipped checkpoint, its training traces and its note with the measured tables.

Choices, and why:
- Deep supervision: the coda lens of every iteration's state is trained on every position's
  running value (mean cross-entropy over iterations). A position that needs i steps cannot be
  right before iteration i, so the model learns to be right as early as its depth allows, and
  the loop count it needs is readable from the lens.
- The forward runs `exit="fixed"` (all `max_loop_iters` iterations) while training.
- The ACT halting head is trained as a probe of the model's own progress: binary cross-entropy
  toward "the lens prediction is right now and stays right" (detached state, detached target),
  so `exit="act"` at inference halts each position when its value is final and the ACT read-out
  weights mostly that state. ACT adds p up over iterations, so a premature p costs far more than
  a late one (`unsettled_weight`, 40): with an unweighted loss, p ≈ 0.5 on uncertain iterations made
  every position halt after two. OpenMythos's ACT is kept as is; only its training signal is ours.
- Router balancing is aux-loss-free (DeepSeek-V3 §2.1.2): after each step
  router_bias += γ·sign(mean load − load), counted over every loop iteration.
- Chain lengths are sampled per batch in [1, train_steps]; longer chains are held out for the
  depth-extrapolation table.

This module is not: the task (`tasks.py`) or the checkpoint format and loader (`trained.py`).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mythos_probe.model import LoopedConfig, LoopedTransformer
from mythos_probe.demo.tasks import VOCAB, ChainTask

# The shipped model: MoE (4 routed experts, top-2, one shared) and ACT on, 8 loops at most.
CHAIN_CONFIG = LoopedConfig(
    vocab_size=len(VOCAB), dim=64, n_heads=4, n_kv_heads=2, max_seq_len=32, max_loop_iters=8,
    prelude_layers=1, coda_layers=1, attn_type="gqa", n_experts=4, n_shared_experts=1,
    n_experts_per_tok=2, expert_dim=64, lora_rank=8, max_output_tokens=8,
    rope_theta=10000.0,  # why: with ≤ 17 positions and head dim 16, θ=5e5 leaves almost no rotation
)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    train_steps: int = 8  # chains of 1..train_steps operations; longer ones are held out
    seed: int = 0
    halt_weight: float = 0.5
    unsettled_weight: float = 40.0
    balance_rate: float = 1e-3  # γ of the router bias update
    record_every: int = 25  # probes record one optimizer step in this many
    threads: int = 1  # why: 2 threads on 2 shared cores ran ~5× slower than 1 under contention


StepCallback = Callable[[int, LoopedTransformer, float], None]


def _lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    cfg: LoopedConfig = CHAIN_CONFIG,
    settings: TrainSettings = TrainSettings(),
    on_step: Optional[StepCallback] = None,
    progress: bool = True,
):
    """Train from scratch with probes attached; returns (model in eval mode, loss per step,
    LoopTraces recorded during training: one per `record_every` optimizer steps)."""
    import mythos_probe

    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    task = ChainTask(seed=settings.seed)
    length_gen = torch.Generator().manual_seed(settings.seed + 1)
    model = LoopedTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    moe = model.recurrent.block.ffn

    states: list[torch.Tensor] = []
    picks: list[torch.Tensor] = []
    hooks = [
        ("recurrent.hook_state_out", lambda x, hook: states.append(x)),  # with its graph: deep supervision
        ("recurrent.block.ffn.hook_topk_idx", lambda x, hook: picks.append(x)),
    ]
    losses: list[float] = []
    model.train()
    bar = tqdm(range(settings.steps), disable=not progress, desc="train", unit="step", file=sys.stderr)
    with mythos_probe.attach(model, probes=["convergence", "spectral", "halting", "experts", "lora"],
                             optimizer=opt, sample_every=settings.record_every, run_id="training",
                             model_id="chains") as rec, model.hooks(fwd_hooks=hooks):
        for step in bar:
            states.clear()
            picks.clear()
            k = int(torch.randint(1, settings.train_steps + 1, (), generator=length_gen))
            batch = task.batch(settings.batch_size, k)
            model(batch.input_ids, n_loops=cfg.max_loop_iters, exit="fixed")
            lens = torch.stack([model.coda_lens(h) for h in states])  # (I, B, T, V) log-probs
            targets = batch.targets.expand(len(states), -1, -1)
            lens_loss = F.nll_loss(lens.reshape(-1, lens.shape[-1]), targets.reshape(-1))
            with torch.no_grad():
                right = lens.argmax(-1) == targets  # (I, B, T)
                # "right now and at every later iteration": a reverse cumulative AND
                settled = right.flip(0).int().cumprod(0).flip(0).float()
            p = torch.sigmoid(model.recurrent.act.halt(torch.stack(states).detach())).squeeze(-1)
            # ACT sums p over iterations and halts at 0.99, so p must stay near 0 until the value
            # is settled: a wrong "settled" costs `unsettled_weight` times a late one
            weight = torch.where(settled > 0, 1.0, settings.unsettled_weight)
            halt_loss = F.binary_cross_entropy(p, settled, weight=weight)
            loss = lens_loss + settings.halt_weight * halt_loss

            for group in opt.param_groups:
                group["lr"] = _lr_at(step, settings)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                load = torch.bincount(torch.cat([q.reshape(-1) for q in picks]), minlength=cfg.n_experts).float()
                moe.router_bias += settings.balance_rate * torch.sign(load.mean() - load)

            losses.append(lens_loss.item())
            if step % 50 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", halt=f"{halt_loss.item():.3f}", k=k)
            if on_step is not None:
                on_step(step, model, losses[-1])
    return model.eval(), losses, rec.traces


# ---------------------------------------------------------------------------------------------
# Measurements shared by the tests, the notebook and the checkpoint note
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model: LoopedTransformer, batch, n_loops: Optional[int] = None, exit: str = "act") -> float:
    """Share of examples whose final value (last position) is the argmax."""
    logits = model(batch.input_ids, n_loops=n_loops, exit=exit)[:, -1]
    return (logits.argmax(-1) == batch.answers).float().mean().item()


@torch.no_grad()
def iterations_used(model: LoopedTransformer, batch, n_loops: Optional[int] = None, exit: str = "act",
                    exit_threshold: Optional[float] = None) -> torch.Tensor:
    """(B, T) iterations each position ran before its exit policy stopped it (all that ran when
    it never stopped): ACT halting, or the `latent` relative-residual exit."""
    _, cache = model.run_with_cache(batch.input_ids, n_loops=n_loops, exit=exit, exit_threshold=exit_threshold,
                                    names_filter="recurrent.hook_halted")
    halted = cache.stack("recurrent.hook_halted")  # (I, B, T)
    first = halted.float().argmax(0) + 1
    return torch.where(halted.any(0), first, torch.full_like(first, halted.shape[0])).long()


def depth_tables(model: LoopedTransformer, task: ChainTask, lengths: range, loops: list[int], per_cell: int = 256):
    """{"accuracy": {exit: {k: {n_loops: acc}}}, "iterations": {policy: {k: mean at the answer}}}
    on fresh examples from `task` (one batch per chain length, reused across loop counts)."""
    out: dict = {"accuracy": {"act": {}, "fixed": {}}, "iterations": {"act": {}, "latent": {}}}
    for k in lengths:
        batch = task.batch(per_cell, k)
        for ex in ("act", "fixed"):
            out["accuracy"][ex][k] = {n: round(accuracy(model, batch, n, ex), 4) for n in loops}
        out["iterations"]["act"][k] = round(iterations_used(model, batch, max(loops))[:, -1].float().mean().item(), 3)
        out["iterations"]["latent"][k] = round(
            iterations_used(model, batch, max(loops), exit="latent")[:, -1].float().mean().item(), 3)
    return out


def markdown(tables: dict, train_steps: int) -> str:
    lines = []
    for ex, title in (("act", 'exit="act" (default read-out)'), ("fixed", 'exit="fixed" (last state)')):
        acc = tables["accuracy"][ex]
        loops = list(next(iter(acc.values())))
        lines += [f"### Accuracy of the final value, {title}: chain length k (rows) × n_loops (columns)", "",
                  "| k | " + " | ".join(str(n) for n in loops) + " |", "|---|" + "---|" * len(loops)]
        for k, row in acc.items():
            mark = "" if int(k) <= train_steps else " (held out)"
            lines.append(f"| {k}{mark} | " + " | ".join(f"{row[n]:.3f}" for n in loops) + " |")
        lines.append("")
    n_max = max(next(iter(tables["accuracy"]["act"].values())))
    lines += ["### Iterations used by the answer position, mean by chain length", "",
              f"| k | ACT halting (n_loops={n_max}) | latent exit, threshold 1e-2 (n_loops={n_max}) |",
              "|---|---|---|"]
    for k in tables["iterations"]["act"]:
        lines.append(f"| {k} | {tables['iterations']['act'][k]:.2f} | {tables['iterations']['latent'][k]:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    from mythos_probe.demo.checkpoint import CHECKPOINT_DIR, EVAL_SEED, save_checkpoint

    defaults = TrainSettings()
    parser = argparse.ArgumentParser(
        prog="python -m mythos_probe.demo.training",
        description="Train the demo's looped transformer on modular chains and write the checkpoint "
                    "(chains.safetensors, chains.json, chains.md, chains-training.jsonl.gz).",
    )
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value, help=f"default: {value}")
    parser.add_argument("--out", default=str(CHECKPOINT_DIR), help="checkpoint folder (default: the package's)")
    args = parser.parse_args(argv)
    settings = TrainSettings(**{f: getattr(args, f) for f in asdict(defaults)})
    command = " ".join(["python -m mythos_probe.demo.training", shlex.join(sys.argv[1:] if argv is None else argv)]).strip()

    start = time.perf_counter()
    model, losses, traces = train(CHAIN_CONFIG, settings)
    wall = time.perf_counter() - start
    tables = depth_tables(model, ChainTask(seed=EVAL_SEED), range(1, 13), [1, 2, 3, 4, 6, 8, 12, 16])
    metrics = {"train_wall_s": round(wall, 1), "final_loss_mean_last_100": round(sum(losses[-100:]) / 100, 4),
               **tables}
    save_checkpoint(model, args.out, settings=asdict(settings), command=command, metrics=metrics,
                    tables=markdown(tables, settings.train_steps), traces=traces)
    print(f"trained in {wall:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
