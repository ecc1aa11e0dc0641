"""The exit rules a `Halting` declares ("act": Graves' running sum; "threshold": per step) give the
exit step the model itself took. The model below halts positions by its own rule, breaks out of
its loop when every position has halted, and returns how many steps each position used."""

import numpy as np
import pytest
import torch
from torch import nn

import mythos_probe
from mythos_probe import Halting, LoopSpec


class Halter(nn.Module):
    def __init__(self, rule: str, threshold: float, max_steps: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 16)
        self.step = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        with torch.no_grad():
            self.head.weight.normal_(0, 1.0)
            self.head.bias.fill_(-2.0)
        self.rule, self.threshold, self.max_steps = rule, threshold, max_steps

    def forward(self, input_ids):
        h = self.embed(input_ids)
        used = torch.zeros(input_ids.shape, dtype=torch.long)
        total = torch.zeros(input_ids.shape)
        done = torch.zeros(input_ids.shape, dtype=torch.bool)
        for t in range(self.max_steps):
            h = self.step(h)
            p = torch.sigmoid(self.head(h)).squeeze(-1)
            if self.rule == "act":
                total = total + p * (~done)
                now = total >= self.threshold
            else:
                now = p >= self.threshold
            used[~done] = t + 1
            done = done | now
            if done.all():
                break
        return h, used


ids = torch.randint(0, 32, (3, 10), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("rule, threshold", [("act", 0.9), ("threshold", 0.3)])
def test_the_declared_rule_gives_the_models_exit_step(rule, threshold):
    model = Halter(rule, threshold).eval()
    spec = LoopSpec(step="step", halting=Halting("head", output="logit", rule=rule, threshold=threshold))
    with torch.no_grad(), mythos_probe.attach(model, spec=spec, probes=["halting"], detail="positions") as rec:
        _, used = model(ids)
    (trace,) = rec.traces
    assert len(np.unique(used.numpy())) > 1  # positions exit at different steps
    np.testing.assert_array_equal(trace.position_iterations, used.numpy())


def test_after_the_first_forward_the_spec_path_adds_no_host_sync():
    """The declaration checks read values on the first forward only; the same sync counter as
    test_no_host_sync then sees the model's own syncs and nothing more."""
    from tests.probes.test_no_host_sync import SyncCounter

    model = Halter("act", 0.9).eval()
    spec = LoopSpec(step="step", halting=Halting("head", output="logit", rule="act", threshold=0.9))
    with torch.no_grad():
        with SyncCounter() as plain:
            model(ids)
        with mythos_probe.attach(model, spec=spec, probes=["convergence", "spectral", "halting", "lens"]) as rec:
            model(ids)
            with SyncCounter() as probed:
                model(ids)
        assert len(rec.traces) == 2
    assert probed.syncs == plain.syncs
