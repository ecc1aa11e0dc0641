"""A dim-256 chains model for the benchmarks: the shipped model's recipe at 4× the width.

The shipped model (dim 64) is so small that a loop iteration at batch 16 costs mostly operator
overhead, not FLOPs; a random dim-256 model has the width but nothing in it converges, so no exit
policy has anything to save. This one is trained like the shipped model (`demo.training.train`,
same task, seed and settings but the learning rate) and converges per position, so the early-exit
benchmark can measure time against FLOPs where the FLOPs dominate.

Not shipped (9 MB): the first call trains it (~12 min on one core, a progress bar shows) and keeps
it in `artifacts/chains-wide/` (git-ignored); later calls load it. A cached model whose config or
settings differ from the ones below is retrained.

    from wide_chains import load_wide_chains_model  # with benchmarks/ on sys.path, as bench_early_exit does
    model, task = load_wide_chains_model()
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from mythos_probe.demo.checkpoint import load_metadata, load_trained_model, save_checkpoint
from mythos_probe.demo.training import CHAIN_CONFIG, TrainSettings, train

WIDE_CONFIG = CHAIN_CONFIG.replace(dim=256, n_heads=8, n_kv_heads=4, expert_dim=256)
WIDE_SETTINGS = TrainSettings(lr=1.5e-3)  # 3e-3 is the shipped dim-64 model's
CACHE = Path(__file__).resolve().parent.parent / "artifacts" / "chains-wide"
COMMAND = "benchmarks/wide_chains.py (trained on first use)"


def _cached_matches(folder: Path) -> bool:
    try:
        meta = load_metadata(folder)
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("config") == WIDE_CONFIG.to_dict() and meta.get("settings") == asdict(WIDE_SETTINGS)


def load_wide_chains_model(folder: Path = CACHE):
    """(model in eval mode, held-out ChainTask), training and caching the model when needed."""
    if not _cached_matches(folder):
        print(f"training the dim-256 chains model once (~12 min on one core); it is kept in {folder}",
              file=sys.stderr, flush=True)
        threads = torch.get_num_threads()
        model, losses, _ = train(WIDE_CONFIG, WIDE_SETTINGS)
        torch.set_num_threads(threads)  # train() sets its own
        save_checkpoint(model, folder, settings=asdict(WIDE_SETTINGS), command=COMMAND,
                        metrics={"final_loss_mean_last_100": round(sum(losses[-100:]) / 100, 4)},
                        tables="(not measured: a benchmark model)\n", traces=[])
    return load_trained_model(folder)


if __name__ == "__main__":
    model, task = load_wide_chains_model()
    print(f"dim-256 chains model ready in {CACHE}: {sum(p.numel() for p in model.parameters()):,} parameters")
