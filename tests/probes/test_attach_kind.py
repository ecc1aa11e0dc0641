"""attach(kind=...): each trace says whether it was served, a full-depth shadow or training, so
that dashboards can show served traffic alone."""

import pytest
import torch

import mythos_probe
from mythos_probe.model import LoopedConfig, LoopedTransformer

ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LoopedTransformer(LoopedConfig.variant("tiny-gqa"))


def test_kind_follows_training_mode_and_grad_unless_given(model):
    with mythos_probe.attach(model) as rec:
        model.train()
        model(ids, n_loops=2, exit="fixed")  # training mode, grad on: a training forward
        with torch.no_grad():
            model(ids, n_loops=2, exit="fixed")  # training mode but no grad: an evaluation, served
        model.eval()
        model(ids, n_loops=2, exit="fixed")
    with mythos_probe.attach(model, kind="shadow") as shadow:
        model(ids, n_loops=2, exit="fixed")
    assert [t.kind for t in rec.traces] == ["training", "served", "served"]
    assert [t.kind for t in shadow.traces] == ["shadow"]


def test_unknown_kind_is_refused_naming_the_choices(model):
    with pytest.raises(ValueError, match="served.*shadow.*training"):
        with mythos_probe.attach(model, kind="canary"):
            pass
