"""Compiled models: attach refuses a model with a torch.compile'd part, saying what to do, instead
of recording traces whose loop metrics are silently missing; a forward whose loop the hooks never
saw warns instead of vanishing."""

import pytest
import torch

import mythos_probe
from mythos_probe import LoopSpec
from mythos_probe.model import LoopedConfig, LoopedTransformer


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()


def refused(model) -> str:
    with pytest.raises(RuntimeError) as err:
        with mythos_probe.attach(model):
            pass
    return str(err.value)


def test_attach_refuses_a_compiled_recurrent_block_and_says_what_to_do(model):
    eager = model.recurrent
    model.recurrent = torch.compile(eager, backend="eager")  # compiling is lazy: nothing runs here
    message = refused(model)
    assert "'recurrent'" in message and "torch.compile" in message and "_orig_mod" in message
    model.recurrent = model.recurrent._orig_mod  # the fix the message names
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad(), mythos_probe.attach(model) as rec:
        model(ids, n_loops=3, exit="fixed")
    metrics = rec.traces[0].iteration_metrics
    assert rec.traces[0].iterations == 3
    assert metrics["expert_cv"].shape == (3,) and metrics["rel_residual"].shape == (3,)


def test_attach_refuses_module_compile_and_a_compiled_model(model):
    model.recurrent.block.compile(backend="eager")  # nn.Module.compile compiles in place
    assert "'recurrent.block'" in refused(model)
    assert "the model itself" in refused(torch.compile(LoopedTransformer(LoopedConfig.variant("tiny-gqa")), backend="eager"))


def test_a_forward_whose_loop_the_hooks_never_saw_warns(model):
    class Looped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 8)
            self.step = torch.nn.Linear(8, 8)
            self.unused = torch.nn.Linear(8, 8)

        def forward(self, ids):
            h = self.embed(ids)
            for _ in range(3):
                h = self.step(h)
            return h

    m = Looped()
    with pytest.warns(UserWarning, match="no loop iteration"):
        with mythos_probe.attach(m, spec=LoopSpec(step="unused")) as rec:
            m(torch.zeros(1, 4, dtype=torch.long))
    assert rec.traces == []
