"""The shipped `chains` checkpoint, measured on held-out examples (generator seed ≠ training seed).

These tests load `model/checkpoints/chains.*`; they never train. The tables behind them are in
`model/checkpoints/chains.md`.
"""

from __future__ import annotations

import pytest
import torch

from mythos_probe.model import LoopedTransformer
from mythos_probe.demo.tasks import TASK_VERSION, ChainTask
from mythos_probe.demo.checkpoint import CHECKPOINT_DIR, EVAL_SEED, load_metadata, load_trained_model, load_training_traces
from mythos_probe.demo.training import accuracy, iterations_used


@pytest.fixture(scope="module")
def trained():
    return load_trained_model()


@pytest.fixture(scope="module")
def train_steps():
    return load_metadata()["settings"]["train_steps"]


def test_checkpoint_ships_as_package_data_with_its_recipe():
    for name in ("chains.safetensors", "chains.json", "chains.md", "chains-training.jsonl.gz"):
        assert (CHECKPOINT_DIR / name).is_file()
    meta = load_metadata()
    assert meta["task_version"] == TASK_VERSION
    assert meta["command"].startswith("python -m mythos_probe.demo.training")
    assert (CHECKPOINT_DIR / "chains.safetensors").stat().st_size < 5 * 2**20


def test_loader_returns_eval_model_and_held_out_task(trained):
    model, task = trained
    assert isinstance(model, LoopedTransformer) and not model.training
    train_seed = load_metadata()["settings"]["seed"]
    assert EVAL_SEED != train_seed
    assert not torch.equal(task.batch(8, 2).input_ids, ChainTask(train_seed).batch(8, 2).input_ids)


def test_training_run_traces_cover_the_optimizer_steps():
    traces = load_training_traces()
    settings = load_metadata()["settings"]
    assert [t.step for t in traces] == list(range(0, settings["steps"], settings["record_every"]))
    assert all("rho_A" in t.forward_metrics and "halt_prob" in t.iteration_metrics for t in traces)


def test_the_shipped_version_1_training_recording_loads_as_training():
    import gzip
    import json

    with gzip.open(CHECKPOINT_DIR / "chains-training.jsonl.gz", "rt") as f:
        raw = [json.loads(line) for line in f]
    assert {r["schema_version"] for r in raw} == {1} and not any("kind" in r for r in raw)  # what makes it a test
    traces = load_training_traces()
    assert len(traces) == len(raw) == 80
    assert {t.kind for t in traces} == {"training"}


def test_accuracy_at_the_default_loop_count_on_trained_lengths(trained, train_steps):
    model, task = trained
    easy = [accuracy(model, task.batch(256, k)) for k in range(1, train_steps + 1)]  # default: ACT, 8 loops
    assert min(easy) >= 0.95, easy


def test_accuracy_rises_with_loops_then_saturates(trained, train_steps):
    model, task = trained
    batch = task.batch(256, train_steps)
    curve = [accuracy(model, batch, n, exit="fixed") for n in (1, 2, 4, 8, 12)]
    assert curve[0] < 0.5 < curve[3]  # one loop is not enough, the trained depth is
    assert all(b >= a - 0.02 for a, b in zip(curve, curve[1:]))  # rises (noise allowed)
    assert abs(curve[4] - curve[3]) <= 0.03  # then saturates


def test_longer_chains_need_more_iterations(trained):
    model, task = trained
    used = [iterations_used(model, task.batch(256, k), n_loops=16)[:, -1].float().mean().item() for k in (1, 3, 5, 7)]
    assert all(b > a for a, b in zip(used, used[1:])), used


def test_positions_later_in_a_chain_halt_later(trained):
    model, task = trained
    used = iterations_used(model, task.batch(256, 8), n_loops=16).float().mean(0)  # (T,) by position
    assert used[-1] > used[1] + 1
