"""What early exit saves for real: iterations, FLOPs and wall time per exit policy against
`exit="fixed"`, interleaved in one run, at batch 1, 16 and 256, on the shipped trained model (dim
64, chains of 8 steps, budget 16 loops) and on the same recipe trained at dim 256
(`wide_chains.py`: trained once, ~12 min, then cached); `--models random` adds a random dim-256
model (the `bench` preset, T=32, or T=256 with `--full`), on which nothing converges.

Each policy runs at the threshold the what-if recommends (≥ 99 % agreement with full depth on a
calibration batch of full-depth forwards, ranked by FLOPs saved net of the lens readouts `kl`
pays; where no threshold reaches 99 %, the most agreeing one that saves compute, and the line says
so); `act` runs at the config's act_threshold. A policy the what-if does not recommend (no
threshold saves compute) is not timed: its one line says why, and a user keeps exit='fixed'.
Figures come from `mythos_probe.whatif.verify`: FLOPs are those the forward really executed,
counted at the dispatcher (`ExecutedFlops`: keys and values of exited positions and `kl`'s lens
readouts included); a time saved is 1 − the median ratio of
`--repeats` interleaved pairs (policy, full depth), averaged over `--samples` batches (a batch
runs until its slowest position exits, so one batch is one draw), wall and CPU (this process: on a shared
machine the CPU time is the figure others' load barely moves; target: CPU/FLOPs ≥ 0.7 at batch
16 and 256). `--rule` measures the compaction rule instead: one loop iteration, masked against
compacted, as the share of running positions falls, at steps of growing FLOPs, beside the share
below which `RecurrentBlock.compact_share` compacts; whole forwards at small batches, where no
share pays; and the attention plans a compacted layer chooses between (`Queries.plan`).

    .venv/bin/python benchmarks/bench_early_exit.py --threads 1
    .venv/bin/python benchmarks/bench_early_exit.py --models shipped --batches 16 256
    .venv/bin/python benchmarks/bench_early_exit.py --models random --full   # T=256, random dim-256
    .venv/bin/python benchmarks/bench_early_exit.py --rule
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from mythos_probe import attach, whatif
from mythos_probe.model import LoopedConfig, LoopedTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark modules beside this one
from bench_model import cpu_timed  # noqa: E402
from wide_chains import load_wide_chains_model  # noqa: E402

POLICIES = ("kl", "latent", "act")


def thresholds(model, inputs, n_loops) -> dict[str, tuple[float | None, str]]:
    """Per policy: (threshold, note) from the what-if over full-depth forwards of `inputs`;
    threshold None and the reason as note for a policy the what-if does not recommend."""
    with torch.no_grad(), attach(model, probes=["convergence", "halting", "cost", "lens"], detail="positions",
                                 lens_positions="all") as rec:
        model(inputs, n_loops=n_loops, exit="fixed")
    table = whatif.evaluate(rec.traces)
    out: dict[str, tuple[float | None, str]] = {"act": (None, f"cfg {model.cfg.act_threshold:g}")}
    for policy in ("kl", "latent"):
        rows = table[table["criterion"] == whatif.POLICY_CRITERIA[policy]]
        top = float(rows["agreement"].max())
        try:
            best = whatif.recommend(rows, min(0.99, top))  # below 99 %: the most agreeing rows that save compute
        except ValueError as exc:  # none of them saves compute
            out[policy] = (None, f"not recommended: {exc}")
            continue
        out[policy] = (float(best["threshold"]), "recommended" if top >= 0.99 else f"none at 99%: best agreement {top:.1%}")
    return out


def report(name, model, inputs_for, batches, n_loops, repeats, samples) -> None:
    chosen = thresholds(model, inputs_for(16), n_loops)
    print(f"\n[{name}] n_loops={n_loops} threads={torch.get_num_threads()}  (machine shared: ratios, not absolutes)")
    print(f"{'batch':>5} {'policy':>7} {'threshold':>10} {'iters saved':>12} {'FLOPs saved':>12} {'time saved':>11} "
          f"{'CPU saved':>10} {'CPU/FLOPs':>10} {'agree':>7} {'fixed ms':>9}  threshold from")
    timed = [p for p in POLICIES if p == "act" or chosen[p][0] is not None]
    for policy in POLICIES:
        if policy not in timed:
            print(f"{'':>5} {policy:>7} {chosen[policy][1]}")
    for batch in batches:
        inputs = [inputs_for(batch) for _ in range(samples)]
        for policy in timed:
            th, note = chosen[policy]
            # a batch runs until its slowest position exits: one batch is one draw, so average several
            runs = [whatif.verify(model, x, policy, th, n_loops=n_loops, repeats=repeats) for x in inputs]
            r = pd.DataFrame(runs).mean(numeric_only=True)
            ratio = r["cpu_time_saved"] / r["flops_saved"] if r["flops_saved"] > 0 else float("nan")
            print(f"{batch:>5} {policy:>7} {r['threshold']:>10.3g} {r['iterations_saved']:>12.1%} "
                  f"{r['flops_saved']:>12.1%} {r['time_saved']:>11.1%} {r['cpu_time_saved']:>10.1%} {ratio:>10.2f} "
                  f"{r['agreement']:>7.1%} {r['time_fixed_s'] * 1e3:>9.1f}  {note}"
                  + ("  SLOWER than fixed: keep exit='fixed' at this batch" if r["cpu_time_saved"] <= 0 else ""))


def rule(repeats: int) -> None:
    """One iteration of the loop, masked (`_dense_step`) against compacted (`_sparse_step`), with a
    share of positions running at random; `latent`, whose exit test is cheap (kl adds the lens to
    both). The state is the model's own, entering its third iteration on real inputs (the chains
    task for the two chains models, random tokens for the random one): a random state would route
    the MoE unlike the model does. Each figure is the median of paired ratios (dense, then compacted);
    one thread and process CPU time, so that the other jobs on a shared machine do not decide it."""
    import statistics

    from mythos_probe.demo.checkpoint import load_trained_model
    from mythos_probe.demo.tasks import ChainTask
    from mythos_probe.model.looped import _LoopState
    from mythos_probe.model.queries import Queries

    torch.set_num_threads(1)
    shipped, _ = load_trained_model()
    wide, _ = load_wide_chains_model()
    torch.manual_seed(0)
    untrained = LoopedTransformer(LoopedConfig.variant("bench")).eval()
    g = torch.Generator().manual_seed(1)
    print("masked / compacted time of one loop iteration (> 1: compaction pays), and the share below which the "
          "rule compacts")
    shapes = [("shipped", shipped, B, 9) for B in (16, 32, 64, 128, 256)]
    shapes += [("wide", wide, 16, 9), ("wide", wide, 64, 9), ("random", untrained, 16, 64)]
    for name, model, B, T in shapes:
        D, rec = model.cfg.dim, model.recurrent
        ids = (ChainTask(seed=3).batch(B, 8).input_ids if name != "random"
               else torch.randint(0, model.cfg.vocab_size, (B, T), generator=g))
        with torch.no_grad():
            _, cache = model.run_with_cache(ids, n_loops=3, exit="fixed",
                                            names_filter=lambda n: n in ("recurrent.hook_state_in", "hook_encoded"))
        h, e = cache["recurrent.hook_state_in", 2], cache["hook_encoded"]
        freqs, emb, A = model._rope(0, T), torch.zeros(D), rec.injection.get_A()
        row = []
        for running in (1.0, 0.95, 0.9, 0.8, 0.6, 0.4, 0.2, 0.1):
            halted = torch.rand(B, T, generator=g) >= running

            def dense():
                rec._dense_step(_LoopState(h.clone(), halted.clone(), torch.zeros(B, T), A=A), 2, emb, e, freqs,
                                True, None, "latent", 0.0, None, halting=False)

            def sparse():  # the host read and index building included: compaction costs them too
                queries = Queries.from_mask((~halted).to("cpu", copy=True).numpy(), h.device)
                rec._sparse_step(_LoopState(h.clone(), halted.clone(), torch.zeros(B, T), A=A), queries, 2, emb, e,
                                 freqs, True, None, "latent", 0.0, None)

            ratios = []
            with torch.no_grad():
                dense(), sparse()
                for _ in range(repeats):
                    t0 = time.process_time()  # CPU time of this process: others' load barely moves it
                    dense()
                    t1 = time.process_time()
                    sparse()
                    ratios.append((t1 - t0) / (time.process_time() - t1))
            row.append(f"{running:.0%}: {statistics.median(ratios):.2f}")
        flops = B * T * rec.position_flops
        print(f"  {name:<8} B={B:<4} T={T:<3} {flops / 1e6:6.0f} MFLOP/step, rule {rec.compact_share(flops):.0%}:  "
              + "  ".join(row))


def small_steps(repeats: int) -> None:
    """Whole `kl` and `latent` forwards at small batches, compacting from a share of 20 to 80 %
    against never compacting (`compact_below=0`): where a step has too few FLOPs for the compacted
    iteration's fixed cost, the whole forward shows it (a single warm step, as in `rule`, hides the
    caches a real loop evicts). Each figure: policy time / `exit="fixed"` time, the median of
    interleaved CPU-time runs under inference mode, averaged over 3 batches, at the what-if's recommended
    thresholds."""
    import statistics

    from mythos_probe.demo.checkpoint import load_trained_model
    from mythos_probe.demo.tasks import ChainTask

    torch.set_num_threads(1)
    shipped, _ = load_trained_model()
    wide, _ = load_wide_chains_model()
    print("\nwhole forwards, policy / fixed CPU time (< 1: faster), compacting from each share (0: never), and the "
          "rule's share")
    shares = (0.0, 0.2, 0.4, 0.8)
    for name, model, batches in (("shipped", shipped, (1, 4, 8, 16)), ("wide", wide, (1,))):
        rec, n_loops, task = model.recurrent, 2 * model.cfg.max_loop_iters, ChainTask(seed=3)
        chosen = thresholds(model, task.batch(16, 8).input_ids, n_loops)
        for B in batches:
            inputs = [task.batch(B, 8).input_ids for _ in range(3)]
            flops = B * inputs[0].shape[1] * rec.position_flops
            cells = []
            for policy in ("kl", "latent"):
                threshold = chosen[policy][0]
                if threshold is None:
                    continue
                ratios = {share: [] for share in shares}
                for ids in inputs:
                    runs = [("fixed", None, 0.0)] + [(policy, threshold, share) for share in shares]
                    times = {run: [] for run in runs}
                    with torch.inference_mode():  # as verify times them
                        for repeat in range(repeats + 2):  # two warm-up rounds
                            for run in runs:
                                rec.compact_below = run[2]
                                t0 = time.process_time()
                                model(ids, n_loops=n_loops, exit=run[0], exit_threshold=run[1])
                                if repeat >= 2:
                                    times[run].append(time.process_time() - t0)
                    rec.compact_below = None
                    fixed = statistics.median(times[runs[0]])
                    for run in runs[1:]:
                        ratios[run[2]].append(statistics.median(times[run]) / fixed)
                cells.append(f"{policy} " + " ".join(f"{share:.0%}: {statistics.mean(r):.2f}"
                                                     for share, r in ratios.items()))
            print(f"  {name:<8} B={B:<4} {flops / 1e6:6.1f} MFLOP/step, rule {rec.compact_share(flops):.0%}:  "
                  + "   ".join(cells))


def attention_plans(repeats: int) -> None:
    """The three ways `Queries.plan` chooses between, timed at the shipped model's and the dim-256
    model's attention shapes for masks of k running positions in some rows: the measurements
    behind its cost model (plain causal attention over every position of the live rows, the
    wanted queries packed per row, each wanted query alone with its row's keys gathered)."""
    import numpy as np
    import torch.nn.functional as F

    from mythos_probe.model.queries import Queries

    def cpu_us(fn) -> float:
        return cpu_timed(fn, repeats) * 1e6

    print("attention of the selected queries, µs (CPU time, fastest of the repeats): full / packed / gathered → plan")
    rng = np.random.default_rng(0)
    for L, T, H, Hkv, d in ((256, 9, 4, 2, 16), (16, 64, 8, 4, 32)):
        for per_row in sorted({1, 2, 4, T // 2, T - 1}):
            for rows in (L, L // 4):
                mask = np.zeros((L, T), dtype=bool)
                for r in range(rows):
                    mask[r, rng.choice(T, size=per_row, replace=False)] = True
                q = Queries.from_mask(mask, torch.device("cpu"))
                k = v = torch.randn(L, T, Hkv, d)
                q_all = torch.randn(rows, H, T, d)
                k_live = k[q.live].transpose(1, 2)
                with torch.no_grad():
                    full = cpu_us(lambda: F.scaled_dot_product_attention(q_all, k_live, k_live, is_causal=True,
                                                                         enable_gqa=True))
                    q_sel = torch.randn(q.n, H, d)
                    packed = cpu_us(lambda: q.attend(q_sel, k, v, 0, True, 0.0, True, "packed"))
                    gathered = cpu_us(lambda: q.attend(q_sel, k, v, 0, True, 0.0, True, "gathered"))
                print(f"  T={T:<3} rows {rows:>3} of {L:<3} × {per_row:>2} running: {full:7.0f} / {packed:7.0f} / "
                      f"{gathered:7.0f} → {q.plan(T, T)}")


def main() -> None:
    from mythos_probe.demo.tasks import ChainTask
    from mythos_probe.demo.checkpoint import load_trained_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="T=256 on the random dim-256 model (minutes on 2 cores)")
    ap.add_argument("--rule", action="store_true", help="measure the compaction rule instead")
    ap.add_argument("--repeats", type=int, default=9, help="interleaved pairs per figure (default 9)")
    ap.add_argument("--samples", type=int, default=3, help="batches drawn per batch size, figures averaged (default 3)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256], help="batch sizes (default 1 16 256)")
    ap.add_argument("--models", nargs="+", choices=("shipped", "wide", "random"), default=["shipped", "wide"],
                    help="the shipped dim-64 chains model, the dim-256 one (trained once, cached), a random "
                         "dim-256 model (default: shipped wide)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rule:
        rule(max(args.repeats, 15))
        small_steps(args.repeats)
        attention_plans(max(args.repeats, 15))
        return
    run = dict(batches=args.batches, repeats=args.repeats, samples=args.samples)
    for name in args.models:
        if name == "random":
            torch.manual_seed(0)
            model = LoopedTransformer(LoopedConfig.variant("bench")).eval()
            seq, g = (256 if args.full else 32), torch.Generator().manual_seed(0)
            report(f"random dim-256 model (bench preset), T={seq}", model,
                   lambda b: torch.randint(0, model.cfg.vocab_size, (b, seq), generator=g),
                   n_loops=model.cfg.max_loop_iters, **run)
            continue
        model, _ = load_trained_model() if name == "shipped" else load_wide_chains_model()  # keeps the thread count
        task = ChainTask(seed=3)
        report(f"{name} chains model (dim {model.cfg.dim}), chains of 8 steps", model,
               lambda b: task.batch(b, 8).input_ids, n_loops=2 * model.cfg.max_loop_iters, **run)


if __name__ == "__main__":
    main()
