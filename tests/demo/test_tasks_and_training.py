"""The chain task generator and the training loop (a few steps; the shipped model is not retrained)."""

import pytest
import torch

from mythos_probe.demo.tasks import MODULUS, OPS, VOCAB, ChainTask, decode, encode
from mythos_probe.demo.training import CHAIN_CONFIG, TrainSettings, train


def test_same_seed_same_examples_and_different_seed_different():
    a, b, c = ChainTask(3).batch(16, 5), ChainTask(3).batch(16, 5), ChainTask(4).batch(16, 5)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_targets_are_the_running_values_computed_by_hand():
    batch = ChainTask(0).batch(32, 6)
    for ids, targets in zip(batch.input_ids.tolist(), batch.targets.tolist()):
        text = decode(ids).split()
        value = int(text[0])
        expected = [value]
        for tok in text[1:]:
            op, arg = tok[0], int(tok[1:])
            value = (value + arg) % MODULUS if op == "+" else (value * arg) % MODULUS
            expected.append(value)
        assert targets == expected
    assert batch.steps == 6 and batch.input_ids.shape == (32, 7)
    assert torch.equal(batch.answers, batch.targets[:, -1])


def test_text_round_trips_and_unknown_symbols_are_named():
    assert decode(encode("3 +2 *3 +1")) == "3 +2 *3 +1"
    assert len(VOCAB) == MODULUS + len(OPS)
    with pytest.raises(ValueError, match="'/2'"):
        encode("3 /2")


@pytest.mark.parametrize("steps, size", [(0, 4), (17, 4), (3, 0)])
def test_out_of_range_requests_are_refused(steps, size):
    with pytest.raises(ValueError):
        ChainTask(0).batch(size, steps)


def test_a_few_training_steps_lower_the_loss_and_record_the_run():
    seen = []
    settings = TrainSettings(steps=40, batch_size=32, warmup=5, record_every=10, train_steps=3)
    model, losses, traces = train(CHAIN_CONFIG, settings, on_step=lambda s, m, l: seen.append(s), progress=False)
    assert seen == list(range(40))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert not model.training
    assert [t.step for t in traces] == [0, 10, 20, 30]  # the optimizer steps the probes recorded
    assert all(t.run_id == "training" and t.iterations == CHAIN_CONFIG.max_loop_iters for t in traces)
