"""Overhead of the `LoopSpec` path on the looped models that have presets, as a ratio to a plain
forward, beside our `LoopedTransformer` through its built-in adapter.

Per round and model: one plain forward (timed), then inside `attach` (default probes, summary)
one forward that carries the first-forward declaration checks (not timed; they read values on
the host once per attach) and one timed forward, whose trace is then read (the one device-to-host
copy is inside the timing). Models and configurations are interleaved round-robin and the median
and the fastest are reported, so a background load affects all alike: on a shared machine the
minimum over rounds of the process's CPU time, single-threaded, is the figure least moved by
other tenants (the load only ever adds time).

    .venv/bin/python -m benchmarks.bench_spec [--rounds 9] [--batch 4] [--seq 64] [--dim 128] [--threads 1]
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
    with torch.no_grad():
        ponder.block.to_halt_logits[0].bias.fill_(-20.0)  # no early exit: every round runs the same steps
    return {
        "LoopedTransformer (built-in adapter)": (ours, dict(n_loops=8)),
        "HrmTextForCausalLM (2 loops)": (hrm, {}),
        "Inkling2LoopForCausalLM": (inkling, {}),
        "OuroForCausalLM-shaped": (OuroForCausalLM(vocab=256, dim=dim, layers=2, total_ut_steps=4).eval(), {}),
        "RavenForCausalLM-shaped": (RavenForCausalLM(vocab=256, dim=dim, num_steps=8).eval(), {}),
        "PonderTransformer": (ponder, {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    ms = models(args.dim)
    ids = torch.randint(0, 256, (args.batch, args.seq))
    times = {name: {"plain": [], "probed": [], "plain_cpu": [], "probed_cpu": []} for name in ms}

    def timed(fn):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0

    with torch.no_grad():
        for model, kwargs in ms.values():  # warm-up
            model(ids, **kwargs)
        for _ in range(args.rounds):
            for name, (model, kwargs) in ms.items():
                torch.manual_seed(1)
                w, c = timed(lambda: model(ids, **kwargs))
                times[name]["plain"].append(w)
                times[name]["plain_cpu"].append(c)
                with mythos_probe.attach(model) as rec:
                    model(ids, **kwargs)  # the first forward also checks the declaration
                    rec.traces
                    torch.manual_seed(1)

                    def probed():
                        model(ids, **kwargs)
                        return rec.traces  # includes the one host transfer
                    w, c = timed(probed)
                times[name]["probed"].append(w)
                times[name]["probed_cpu"].append(c)
    med = statistics.median
    print(f"B={args.batch} T={args.seq} dim={args.dim} threads={torch.get_num_threads()} rounds={args.rounds} "
          "(default probes, summary detail)")
    print(f"  {'':<40} {'plain CPU':>10} {'probed CPU':>11} {'ratio (min)':>12} {'ratio (median)':>15} "
          f"{'wall (median)':>14}")
    for name, t in times.items():
        plain, probed = min(t["plain_cpu"]), min(t["probed_cpu"])
        print(f"  {name:<40} {plain * 1e3:8.1f}ms {probed * 1e3:9.1f}ms {probed / plain:11.3f}× "
              f"{med(t['probed_cpu']) / med(t['plain_cpu']):14.3f}× {med(t['probed']) / med(t['plain']):13.3f}×")


if __name__ == "__main__":
    main()
