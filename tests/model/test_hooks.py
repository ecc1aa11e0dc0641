"""Hook points: every iteration is cached under (site, t), hooks learn their iteration, hooks are
removed on exceptions, and hook points add no tensor work when nothing is attached."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mythos_probe.model import LoopedConfig, LoopedTransformer

LOOP_SITES = [
    "recurrent.hook_state_in", "recurrent.hook_block_out", "recurrent.hook_lora_delta",
    "recurrent.hook_state_out", "recurrent.hook_halt_prob", "recurrent.hook_cum_halt",
    "recurrent.hook_halted", "recurrent.hook_act_weight", "recurrent.block.ffn.hook_router_logits",
    "recurrent.block.ffn.hook_topk_idx", "recurrent.block.ffn.hook_gates",
    "recurrent.block.ffn.hook_routed_out", "recurrent.block.ffn.hook_shared_out",
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    with torch.no_grad():
        m.recurrent.act.halt.bias.fill_(-30.0)  # never halt: every loop runs
    return m


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))


def test_cache_keeps_every_iteration(model, ids):
    logits, cache = model.run_with_cache(ids, n_loops=5)
    torch.testing.assert_close(logits, model(ids, n_loops=5))
    for site in LOOP_SITES:
        assert cache.iterations(site) == 5, site
    states = cache.stack("recurrent.hook_state_out")  # (5, B, T, D)
    assert states.shape == (5, 2, 9, 64)
    assert all(not torch.equal(states[t], states[t + 1]) for t in range(4))
    # each iteration's cached state is the injection rule applied to that iteration's parts
    A = model.recurrent.injection.get_A().detach()
    B = model.recurrent.injection.B.detach()
    e = cache["hook_encoded"]
    for t in range(5):
        h_in = cache["recurrent.hook_state_in", t]
        block = cache["recurrent.hook_block_out", t] + cache["recurrent.hook_lora_delta", t]
        torch.testing.assert_close(cache["recurrent.hook_state_out", t], A * h_in + B * e + block)
        if t:
            torch.testing.assert_close(h_in, cache["recurrent.hook_state_out", t - 1])
    # ACT output is the weighted sum of the states with the cached weights
    weights = cache.stack("recurrent.hook_act_weight")  # (5, B, T)
    torch.testing.assert_close(cache["hook_coda_in"], (weights[..., None] * states).sum(0))


def test_cache_errors_say_how_to_index(model, ids):
    _, cache = model.run_with_cache(ids, n_loops=2, names_filter=["recurrent.hook_state_out", "hook_logits"])
    assert cache.sites() == {"recurrent.hook_state_out", "hook_logits"}
    with pytest.raises(KeyError, match="once per iteration"):
        cache["recurrent.hook_state_out"]
    with pytest.raises(KeyError, match="not in the cache"):
        cache["hook_embed"]


def test_run_with_hooks_hooks_learn_the_iteration(model, ids):
    seen = []
    model.run_with_hooks(
        ids, n_loops=4,
        fwd_hooks=[("recurrent.block.ffn.hook_gates", lambda x, hook: seen.append((hook.name, hook.iteration)))],
    )
    assert seen == [("recurrent.block.ffn.hook_gates", t) for t in range(4)]
    assert model.recurrent.clock.t is None


def test_hooks_are_removed_when_the_forward_raises(model, ids):
    def boom(x, hook):
        if hook.iteration == 1:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(ids, n_loops=3, fwd_hooks=[("recurrent.hook_state_in", boom)])
    assert not model.recurrent.hook_state_in._forward_hooks
    assert model.recurrent.clock.t is None
    model(ids, n_loops=3)  # still usable


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_hook_points_add_no_tensor_work_without_hooks(model, ids):
    with torch.no_grad(), OpCounter() as with_hook_points:
        model(ids, n_loops=3)
    stripped = LoopedTransformer(model.cfg).eval()
    stripped.load_state_dict(model.state_dict())
    for _, hp in list(stripped.named_modules()):
        if hp.__class__.__name__.endswith("HookPoint"):
            hp.forward = lambda x: x  # a plain identity, no module machinery
    with torch.no_grad(), OpCounter() as without:
        stripped(ids, n_loops=3)
    assert with_hook_points.ops == without.ops
    assert len(without.ops) > 100
