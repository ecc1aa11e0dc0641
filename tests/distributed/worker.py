"""One rank of the distributed tests, launched by `torchrun --nproc-per-node 2` (gloo, CPU).

For each wrapper (DDP, FSDP2 `fully_shard`) around each model (our LoopedTransformer, an unmodified
`open_mythos.main.OpenMythos`), with the same weights on every rank and different data per rank:
trains `STEPS` optimizer steps without probes, then the same from the same weights with probes
exporting OTLP to every `--endpoint`; compares the gradients of every step bit for bit; counts the
collectives (c10d ops seen by the profiler) of one forward with and without probes. Writes what
it measured, straight from its own traces and tensors, to `--out/rank<r>.json` for the test to
check against the store.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import mythos_probe
from mythos_probe.collectors.sinks import otlp_sink
from mythos_probe.probes.distributed import job_run_id, where
from mythos_probe.model import LoopedConfig, LoopedTransformer

STEPS = 2
CONFIGS = ("ddp-looped", "fsdp-looped", "ddp-openmythos", "fsdp-openmythos")


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    cfg = LoopedConfig.variant("tiny-gqa")
    if kind == "looped":
        return LoopedTransformer(cfg).train()
    from open_mythos.main import OpenMythos

    return OpenMythos(cfg.to_mythos_config()).train()


def wrap(model: torch.nn.Module, wrapper: str) -> torch.nn.Module:
    if wrapper == "ddp":
        return DistributedDataParallel(model, find_unused_parameters=True)  # MoE: unchosen experts get no grad
    fully_shard(model)  # FSDP2: shards the parameters in place, returns the same module
    return model


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:  # a parameter the step did not reach (an expert no token chose)
        return None
    return (t.to_local() if hasattr(t, "to_local") else t).clone()  # FSDP2 gradients are DTensor shards


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def train(model, wrapper: str, ids: torch.Tensor, probes: dict | None):
    """(gradients of every step, traces or None)."""
    net = wrap(model, wrapper)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    grads = []

    def steps():
        for _ in range(STEPS):
            opt.zero_grad()
            logits = net(ids[:, :-1], n_loops=3)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            if wrapper == "fsdp":  # FSDP2 reduce-scatters every gradient: experts no token chose get zeros
                loss = loss + 0.0 * sum(p.sum() for p in net.parameters())
            loss.backward()
            grads.append([local(p.grad) for p in net.parameters()])
            opt.step()

    if probes is None:
        steps()
        return net, grads, None
    with mythos_probe.attach(net, optimizer=opt, **probes) as rec:  # DDP or FSDP2, as wrapped
        steps()
    return net, grads, rec.traces


def collectives(net, ids: torch.Tensor, wrapper: str) -> list[int]:
    """c10d operations the profiler sees during one forward, without then with probes, after a
    warm-up forward; FSDP2 is resharded before each so that every forward all-gathers."""
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for probed in (None, False, True):
        if wrapper == "fsdp":
            net.reshard()
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            if probed:
                with mythos_probe.attach(net):
                    net(ids, n_loops=3)
            else:
                net(ids, n_loops=3)
        if probed is not None:
            counts.append(sum(e.count for e in prof.key_averages() if e.key.startswith("c10d::")))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", action="append", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(100 + rank))
    shared = job_run_id(where())
    report = {"rank": rank, "pid": os.getpid(), "job": os.environ["TORCHELASTIC_RUN_ID"], "configs": {}}
    sinks = [otlp_sink(endpoint) for endpoint in args.endpoint]
    try:
        for config in CONFIGS:
            wrapper, kind = config.split("-")
            _, plain, _ = train(build(kind), wrapper, ids, None)
            # the first config keeps attach's default run id (shared through the job id); the
            # others name theirs after it, still without any message between ranks
            run_id = None if config == CONFIGS[0] else f"{shared}-{config}"
            net, probed, traces = train(build(kind), wrapper, ids, {"run_id": run_id, "on_trace": sinks,
                                                                     "attributes": {"config": config}})
            report["configs"][config] = {
                "grads_equal": [all(same(a, b) for a, b in zip(x, y)) for x, y in zip(plain, probed)],
                "n_grads": len(probed[0]),
                "traces": [{"trace_id": t.trace_id, "span_id": t.span_id, "run_id": t.run_id, "step": t.step,
                            "iterations": t.iterations, "expert_load": t.expert_load.sum(0).tolist()} for t in traces],
                "collectives": collectives(net, ids, wrapper),
            }
        assert all(sink.flush() for sink in sinks), "spans were still queued after 30 s"
        report["failed_spans"] = sum(sink.failed_spans + sink.dropped_spans for sink in sinks)
    finally:
        for sink in sinks:
            sink.close()
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
