"""Forward and KV-cached decode speed of LoopedTransformer against unmodified OpenMythos.

Both models share the same weights; a speed-up is the median ratio of interleaved pairs of runs,
in CPU time (absolute times on shared machines mean little). Shape from the model issue: B=4,
T=256, 32 experts, top-2, 8 loops, CPU.
The halting head is biased so no position halts early: both models run all 8 loops.
Also the forward's FLOP rate as a fraction of the GEMM rate measured in the same run, float32
and bf16 (CPU time, so that other jobs on a shared machine barely move it).

    .venv/bin/python benchmarks/bench_model.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def interleaved(a, b, repeats: int) -> list[tuple[float, float]]:
    """CPU seconds of `a` and `b` run alternately `repeats` times (after a warm-up of each): a slow
    spell of a shared machine hits both runs of a pair."""
    a(), b()
    pairs = []
    for _ in range(repeats):
        t0 = time.process_time()
        a()
        t1 = time.process_time()
        b()
        pairs.append((t1 - t0, time.process_time() - t1))
    return pairs


def cpu_timed(fn, repeats: int) -> float:
    """Fastest CPU time (this process, all threads) of `repeats` runs: others' load barely moves it."""
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        samples.append(time.process_time() - t0)
    return min(samples)


def gemm_fraction(model, ids, loops: int, repeats: int) -> None:
    """FLOP rate of the forward (Kaplan count, `variants.forward_flops`) as a fraction of the GEMM
    rate, float32 and bf16 (a bf16 copy of the model): the median over interleaved pairs of a
    forward and eight plain matmuls of the model's typical shape (tokens × dim @ dim × 4·dim), so
    that a slow spell of the machine hits both sides of a pair (CPU time)."""
    import copy

    from mythos_probe.model.variants import forward_flops

    B, T = ids.shape
    flops = forward_flops(model.cfg, B, T, B * T * loops)
    gemm_flops = 2 * 1024 * 256 * 1024 * 8
    for dtype in (torch.float32, torch.bfloat16):
        m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        a, b = torch.randn(1024, 256, dtype=dtype), torch.randn(256, 1024, dtype=dtype)
        with torch.no_grad():
            pairs = interleaved(lambda: m(ids, n_loops=loops, exit="fixed"), lambda: [a @ b for _ in range(8)],
                                max(repeats, 7))
        rate = statistics.median(flops / p[0] for p in pairs)
        peak = statistics.median(gemm_flops / p[1] for p in pairs)
        fraction = statistics.median((flops / p[0]) / (gemm_flops / p[1]) for p in pairs)
        print(f"  {str(dtype)[6:]:>8}: forward {rate / 1e9:6.1f} GFLOP/s, GEMM {peak / 1e9:6.1f} GFLOP/s, "
              f"fraction {fraction:.2f} (CPU time)")


def main() -> None:
    from open_mythos.main import OpenMythos

    from mythos_probe.model import LoopedConfig, LoopedTransformer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--loops", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    for attn in ("gqa", "mla"):
        cfg = LoopedConfig.variant("bench").replace(attn_type=attn, kv_lora_rank=64, q_lora_rank=128,
                                                    qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
        torch.manual_seed(0)
        om = OpenMythos(cfg.to_mythos_config()).eval()
        with torch.no_grad():
            om.recurrent.act.halt.bias.fill_(-20.0)  # never halt: all loops run in both models
        ours = LoopedTransformer.from_open_mythos(om).eval()
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))

        with torch.no_grad():
            diff = (om(ids, n_loops=args.loops) - ours(ids, n_loops=args.loops)).abs().max().item()
            forwards = interleaved(lambda: om(ids, n_loops=args.loops), lambda: ours(ids, n_loops=args.loops),
                                   args.repeats)
        t_om, t_ours = (statistics.median(f[i] for f in forwards) for i in (0, 1))

        def decode(model) -> float:
            """CPU seconds of `--decode-tokens` KV-cached steps after a 32-token prompt."""
            cache: dict = {}
            model(ids[:, :32], n_loops=args.loops, kv_cache=cache)
            t0 = time.process_time()
            for i in range(args.decode_tokens):
                model(ids[:, 32 + i : 33 + i], n_loops=args.loops, kv_cache=cache, start_pos=32 + i)
            return time.process_time() - t0

        with torch.no_grad():
            pairs = interleaved(lambda: decode(om), lambda: decode(ours), max(args.repeats, 5))
        tokens = args.batch * args.decode_tokens
        tps_om = tokens / statistics.median(p[0] for p in pairs)
        tps_ours = tokens / statistics.median(p[1] for p in pairs)
        decode_speedup = statistics.median(p[0] / p[1] for p in pairs)

        print(f"[{attn}] B={args.batch} T={args.seq} experts={cfg.n_experts} top-{cfg.n_experts_per_tok} "
              f"loops={args.loops} threads={torch.get_num_threads()}  max|Δlogits|={diff:.2e}")
        gemm_fraction(ours, ids, args.loops, args.repeats)
        print(f"  forward: OpenMythos {t_om * 1e3:8.1f} ms   ours {t_ours * 1e3:8.1f} ms   speed-up "
              f"{statistics.median(f[0] / f[1] for f in forwards):5.2f}×")
        print(f"  decode : OpenMythos {tps_om:8.1f} tok/s ours {tps_ours:8.1f} tok/s speed-up {decode_speedup:5.2f}×")


if __name__ == "__main__":
    main()
