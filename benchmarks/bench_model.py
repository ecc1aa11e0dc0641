"""Forward and KV-cached decode speed of LoopedTransformer against unmodified OpenMythos.

Both models share the same weights; ratios come from one run (absolute times on shared machines
mean little). Shape from the model issue: B=4, T=256, 32 experts, top-2, 8 loops, CPU.
The halting head is biased so no position halts early: both models run all 8 loops.

    .venv/bin/python benchmarks/bench_model.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


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
            t_om = timed(lambda: om(ids, n_loops=args.loops), args.repeats)
            t_ours = timed(lambda: ours(ids, n_loops=args.loops), args.repeats)

        def decode(model):
            cache: dict = {}
            model(ids[:, :32], n_loops=args.loops, kv_cache=cache)
            t0 = time.perf_counter()
            for i in range(args.decode_tokens):
                model(ids[:, 32 + i : 33 + i], n_loops=args.loops, kv_cache=cache, start_pos=32 + i)
            return args.batch * args.decode_tokens / (time.perf_counter() - t0)

        with torch.no_grad():
            decode(om), decode(ours)  # warm-up
            tps_om = statistics.median(decode(om) for _ in range(3))
            tps_ours = statistics.median(decode(ours) for _ in range(3))

        print(f"[{attn}] B={args.batch} T={args.seq} experts={cfg.n_experts} top-{cfg.n_experts_per_tok} "
              f"loops={args.loops} threads={torch.get_num_threads()}  max|Δlogits|={diff:.2e}")
        print(f"  forward: OpenMythos {t_om * 1e3:8.1f} ms   ours {t_ours * 1e3:8.1f} ms   speed-up {t_om / t_ours:5.2f}×")
        print(f"  decode : OpenMythos {tps_om:8.1f} tok/s ours {tps_ours:8.1f} tok/s speed-up {tps_ours / tps_om:5.2f}×")


if __name__ == "__main__":
    main()
