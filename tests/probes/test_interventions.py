"""Interventions on our LoopedTransformer (hook points) and on an unmodified OpenMythos (module
hooks): each changes what the loop does, the trace recorded by `attach` shows the change, and every
hook is gone afterwards, also when the forward raised. Checks count module calls and read states
with hooks of their own, independent of the interventions and of the probes."""

import pytest
import torch

from mythos_probe import attach
from mythos_probe import interventions as iv
from mythos_probe.model import LoopedConfig, LoopedTransformer

open_mythos = pytest.importorskip("open_mythos.main", reason="open-mythos is installed by scripts/bootstrap.sh")

IDS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
KINDS = ["looped", "open_mythos"]


@pytest.fixture(scope="module")
def pair():
    """OpenMythos and our model with the same weights; ACT halts everything after 2 iterations."""
    torch.manual_seed(1)
    om = open_mythos.OpenMythos(LoopedConfig.variant("tiny-gqa").to_mythos_config()).eval()
    with torch.no_grad():
        om.recurrent.act.halt.bias.fill_(1.0)  # p ≈ 0.73: cumulative ≥ 0.99 at iteration 2
        om.recurrent.injection.log_A.normal_(0, 1)
    return {"open_mythos": om, "looped": LoopedTransformer.from_open_mythos(om).eval()}


def calls_of(module):
    """Counts calls of `module` (a loop iteration runs the recurrent block once)."""
    calls = []
    return calls, module.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 6])  # 6 > max_loop_iters = 4 and > the 2 ACT would run
def test_forcing_loops_runs_exactly_n_iterations(pair, kind, n):
    model = pair[kind]
    calls, handle = calls_of(model.recurrent.block)
    before, after = iv.compare(model, IDS, iv.force_loops(model, n))
    handle.remove()
    assert before.iterations == 2
    assert after.iterations == n and (after.position_iterations == n).all()
    assert len(calls) == 2 + n
    assert after.attributes["intervention"] == f"force_loops(n_loops={n})"


def test_forced_open_mythos_reads_out_the_last_state_like_a_fixed_exit(pair):
    om, ours = pair["open_mythos"], pair["looped"]
    with torch.no_grad():
        with iv.force_loops(om, 5):
            forced = om(IDS)
        fixed = ours(IDS, n_loops=5, exit="fixed")
    torch.testing.assert_close(forced, fixed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_an_ablated_expert_has_zero_load_in_every_iteration(pair, kind):
    model = pair[kind]
    with torch.no_grad(), attach(model) as rec:
        model(IDS)
    expert = int(rec.traces[0].expert_load.sum(0).argmax())  # the busiest expert without ablation
    ran, handle = calls_of(model.recurrent.block.ffn.routed_experts[expert])
    before, after = iv.compare(model, IDS, iv.ablate_expert(model, expert))
    handle.remove()
    assert before.expert_load[:, expert].sum() > 0
    assert (after.expert_load[:, expert] == 0).all()
    k = model.cfg.n_experts_per_tok
    assert (after.expert_load.sum(1) == IDS.numel() * k).all()  # the tokens went to other experts
    assert sum(ran) == before.expert_load[:, expert].sum()  # the expert never ran once ablated
    assert torch.isfinite(torch.tensor(after.iteration_metrics["routing_entropy"])).all()


def states_of(model, kind, **forward_kwargs):
    """Loop state after each iteration, read with the model's own cache or a plain module hook."""
    with torch.no_grad():
        if kind == "looped":
            _, cache = model.run_with_cache(IDS, names_filter="recurrent.hook_state_out", **forward_kwargs)
            return list(cache.stack("recurrent.hook_state_out"))
        states = []
        handle = model.recurrent.injection.register_forward_hook(lambda m, a, out: states.append(out.clone()))
        try:
            model(IDS, **forward_kwargs)
        finally:
            handle.remove()
        return states


@pytest.mark.parametrize("kind", KINDS)
def test_patched_state_makes_later_states_equal_the_donor_run(pair, kind):
    model = pair[kind]
    with iv.force_loops(model, 4):  # a fixed depth, so both runs have iterations 0..3
        donor = iv.capture_states(model, IDS)
        assert all(torch.equal(a, b) for a, b in zip(donor, states_of(model, kind)))
        noise = torch.randn(donor[1].shape, generator=torch.Generator().manual_seed(5)) * 3
        with iv.patch_state(model, noise, 1):  # the second run diverges at iteration 1 …
            diverged = states_of(model, kind)
            with iv.patch_state(model, donor[2], 2):  # … and gets the donor's state back at 2
                patched = states_of(model, kind)
    assert len(donor) == len(patched) == 4
    assert torch.equal(patched[1], noise) and not torch.allclose(diverged[3], donor[3])
    torch.testing.assert_close(patched[2], donor[2], atol=0, rtol=0)
    torch.testing.assert_close(patched[3], donor[3], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_halting_overridden_to_one_stops_act_after_one_iteration(pair, kind):
    model = pair[kind]
    calls, handle = calls_of(model.recurrent.block)
    before, after = iv.compare(model, IDS, iv.override_halting(model, 1.0), probes=["halting"])
    handle.remove()
    assert before.iterations == 2 and after.iterations == 1 and len(calls) == 3
    assert (after.position_iterations == 1).all()
    assert after.iteration_metrics["halt_prob"][0] == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_hooks_are_removed_even_when_the_forward_raises(pair, kind):
    model = pair[kind]
    hooks = hook_count(model)
    with torch.no_grad():
        expected = model(IDS)
        wrong = torch.zeros(1, 1, model.cfg.dim)
        with pytest.raises(ValueError, match="patched state has shape"):
            with attach(model), iv.patch_state(model, wrong, 0), iv.ablate_expert(model, 1), iv.force_loops(model, 3):
                assert hook_count(model) > hooks
                model(IDS)
        assert hook_count(model) == hooks
        torch.testing.assert_close(model(IDS), expected, atol=0, rtol=0)


def test_interventions_refuse_what_they_cannot_do(pair):
    model = pair["looped"]
    with pytest.raises(ValueError, match="fewer than top-k"):
        iv.ablate_expert(model, range(7))
    with pytest.raises(ValueError, match=r"in \[0, 8\)"):
        iv.ablate_expert(model, 8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        iv.override_halting(model, 1.5)
    with pytest.raises(ValueError, match="positive integer"):
        iv.force_loops(model, 0)
    with pytest.raises(TypeError, match="LoopedTransformer"):
        iv.force_loops(torch.nn.Linear(2, 2), 2)
