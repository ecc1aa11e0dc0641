"""Overhead of the `LoopSpec` path, self-checks on, on the looped models that have presets, as a
ratio to a plain forward, beside our `LoopedTransformer` through its built-in adapter.

Per round and model, interleaved: K plain forwards (timed), then inside `attach` (default probes,
summary, `check_every=K`) the first forward (timed on its own: it carries every declaration check)
and K more forwards (timed), the K-th of which is the sampled check; the traces are read inside the
timing (the one device-to-host copy per forward). So "steady" is the overhead with the sampled
checks amortised as they run when left on, and "first" is the first forward's cost over one plain
forward. On a shared machine the minimum over rounds of the process's CPU time, single-threaded,
is the figure least moved by other tenants (the load only ever adds time); medians are printed too.

    .venv/bin/python -m benchmarks.bench_spec [--rounds 3] [--batch 4] [--seq 128] [--dim 256] [--every 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import mythos_probe
from mythos_probe.model import LoopedConfig, LoopedTransformer


def models(dim: int):
    import transformers
    from ponder_transformer import PonderTransformer

    from tests.probes.looped_models import OuroForCausalLM, RavenForCausalLM

    torch.manual_seed(0)
    cfg = LoopedConfig.variant("bench")
    ours = LoopedTransformer(cfg.replace(dim=dim, expert_dim=dim // 2, vocab_size=256)).eval()
    with torch.no_grad():
        ours.recurrent.act.halt.bias.fill_(-20.0)  # every loop runs
    hrm = transformers.HrmTextForCausalLM(transformers.HrmTextConfig(
        vocab_size=256, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2, num_attention_heads=4,
        head_dim=dim // 4, H_cycles=2, L_cycles=3)).eval()
    inkling = transformers.Inkling2LoopForCausalLM(transformers.Inkling2LoopTextConfig(
        vocab_size=256, unpadded_vocab_size=256, hidden_size=dim, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=dim // 4, swa_num_attention_heads=4, swa_num_key_value_heads=2,
        swa_head_dim=dim // 4, sliding_window_size=32, d_rel=8, rel_extent=32, moe_intermediate_size=dim // 2,
        n_routed_experts=8, num_experts_per_tok=2, n_layers_per_attn_res_block=2, loop_layer_index_start=2,
        loop_layer_index_end=4, loop_num_passes=3, loop_gate_rank=16, eos_token_id=0)).eval()
    ponder = PonderTransformer(num_tokens=256, dim=dim, max_seq_len=512, causal=True, dim_head=dim // 4, heads=4).eval()
    dory = transformers.DoryForCausalLM(transformers.DoryConfig(
        vocab_size=256, hidden_size=dim, intermediate_size=2 * dim, num_attention_heads=4, num_key_value_heads=2,
        head_dim=dim // 4, n_input_layers=1, n_recurrent_layers=2, n_output_layers=1, num_hidden_layers=4,
        n_recurrent_loops=3, sliding_window=64, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])).eval()
    with torch.no_grad():
        ponder.block.to_halt_logits[0].bias.fill_(-20.0)  # no early exit: every round runs the same steps
    return {
        "LoopedTransformer (built-in adapter)": (ours, dict(n_loops=8)),
        "HrmTextForCausalLM (2 loops)": (hrm, {}),
        "Inkling2LoopForCausalLM": (inkling, {}),
        "OuroForCausalLM-shaped": (OuroForCausalLM(vocab=256, dim=dim, layers=2, total_ut_steps=4).eval(), {}),
        "RavenForCausalLM-shaped": (RavenForCausalLM(vocab=256, dim=dim, num_steps=8).eval(), {}),
        "PonderTransformer": (ponder, {}),
        "DoryForCausalLM": (dory, {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--every", type=int, default=16, help="check_every: one sampled check per this many forwards")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    ms = models(args.dim)
    ids = torch.randint(0, 256, (args.batch, args.seq))
    K = args.every
    times = {name: {k: [] for k in ("plain", "steady", "first", "plain_cpu", "steady_cpu", "first_cpu")} for name in ms}

    def timed(fn):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0

    def run(model, kwargs, n):
        for _ in range(n):
            torch.manual_seed(1)
            model(ids, **kwargs)

    with torch.no_grad():
        for model, kwargs in ms.values():  # warm-up
            model(ids, **kwargs)
        for _ in range(args.rounds):
            for name, (model, kwargs) in ms.items():
                w, c = timed(lambda: run(model, kwargs, K))
                times[name]["plain"].append(w / K)
                times[name]["plain_cpu"].append(c / K)
                with mythos_probe.attach(model, check_every=K) as rec:
                    w, c = timed(lambda: (run(model, kwargs, 1), rec.traces))  # every declaration check
                    times[name]["first"].append(w)
                    times[name]["first_cpu"].append(c)
                    w, c = timed(lambda: (run(model, kwargs, K), rec.traces))  # the K-th is the sampled check
                    times[name]["steady"].append(w / K)
                    times[name]["steady_cpu"].append(c / K)
                    assert len(rec.traces) % (K + 1) == 0 and rec.traces  # (HRM: two loops, two traces each)
    med = statistics.median
    print(f"B={args.batch} T={args.seq} dim={args.dim} threads={torch.get_num_threads()} rounds={args.rounds} "
          f"check_every={K} (default probes, summary detail; self-checks on)")
    print(f"  {'':<38} {'plain CPU':>10} {'steady (min)':>13} {'steady (med)':>13} {'wall (med)':>11} "
          f"{'first (min)':>12}")
    for name, t in times.items():
        plain = min(t["plain_cpu"])
        print(f"  {name:<38} {plain * 1e3:8.1f}ms {min(t['steady_cpu']) / plain:12.3f}× "
              f"{med(t['steady_cpu']) / med(t['plain_cpu']):12.3f}× {med(t['steady']) / med(t['plain']):10.3f}× "
              f"{min(t['first_cpu']) / plain:11.2f}×")
    print("  target: steady ≤ 1.10× (the sampled checks amortised over check_every forwards); first: the first "
          "forward of an attach block, once")


if __name__ == "__main__":
    main()
