"""Logits of LoopedTransformer equal those of the unmodified open-mythos package on the same weights
(installed with --no-deps by scripts/bootstrap.sh): GQA and MLA, loop counts 1, 4 and beyond
max_loop_iters, ACT halting early and not at all, prefill and KV-cached decode steps."""

import pytest
import torch

open_mythos = pytest.importorskip("open_mythos.main", reason="open-mythos is installed by scripts/bootstrap.sh")

from mythos_probe.model import LoopedConfig, LoopedTransformer  # noqa: E402

TOL = 1e-5


def make_pair(variant: str, halting: str):
    cfg = LoopedConfig.variant(variant)
    torch.manual_seed(1)
    om = open_mythos.OpenMythos(cfg.to_mythos_config()).eval()
    with torch.no_grad():
        # "early": p ≈ 0.73 per step, all positions halt at iteration 2; "never": p ≈ 0
        om.recurrent.act.halt.bias.fill_(1.0 if halting == "early" else -30.0)
        om.recurrent.injection.log_A.normal_(0, 1)  # a non-trivial A, different per channel
        om.recurrent.block.ffn.router_bias.normal_(0, 0.01)
    return om, LoopedTransformer.from_open_mythos(om).eval()


def count_loop_runs(om):
    calls = []
    handle = om.recurrent.block.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("variant", ["tiny-gqa", "tiny-mla"])
@pytest.mark.parametrize("halting", ["early", "never"])
@pytest.mark.parametrize("n_loops", [1, 4, 7])  # 7 > max_loop_iters=4: LoRA scale clamps
def test_prefill_logits_match_open_mythos(variant, halting, n_loops):
    om, ours = make_pair(variant, halting)
    ids = torch.randint(0, om.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    calls, handle = count_loop_runs(om)
    with torch.no_grad():
        expected = om(ids, n_loops=n_loops)
        got = ours(ids, n_loops=n_loops)
    handle.remove()
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    assert ours.last_forward["iterations"] == len(calls)
    if halting == "never":
        assert len(calls) == n_loops
    elif n_loops > 2:
        assert len(calls) < n_loops  # the early break happened in both


@pytest.mark.parametrize("variant", ["tiny-gqa", "tiny-mla"])
@pytest.mark.parametrize("n_loops", [1, 4, 6])
def test_kv_cached_decode_matches_open_mythos(variant, n_loops):
    om, ours = make_pair(variant, "early")
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, om.cfg.vocab_size, (2, 10), generator=g)
    cache_om, cache_ours = {}, {}
    calls, handle = count_loop_runs(om)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(prompt, n_loops=n_loops, kv_cache=cache_ours), om(prompt, n_loops=n_loops, kv_cache=cache_om),
            atol=TOL, rtol=0,
        )
        for step in range(3):
            tok = torch.randint(0, om.cfg.vocab_size, (2, 1), generator=g)
            expected = om(tok, n_loops=n_loops, kv_cache=cache_om, start_pos=10 + step)
            got = ours(tok, n_loops=n_loops, kv_cache=cache_ours, start_pos=10 + step)
            torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    handle.remove()
    assert len(calls) == 4 * n_loops  # with a cache every loop depth runs, halted or not
    assert cache_ours.keys() == cache_om.keys()


def test_state_dict_round_trips_to_open_mythos():
    om, ours = make_pair("tiny-mla", "early")
    fresh = open_mythos.OpenMythos(ours.cfg.to_mythos_config()).eval()
    fresh.load_state_dict(ours.to_open_mythos_state_dict())  # strict: same names and shapes
    ids = torch.randint(0, om.cfg.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, n_loops=3), om(ids, n_loops=3), atol=0, rtol=0)


def test_generate_matches_open_mythos_token_for_token():
    om, ours = make_pair("tiny-gqa", "early")
    prompt = torch.randint(0, om.cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    expected = om.generate(prompt, max_new_tokens=6, n_loops=3, top_k=5)
    torch.manual_seed(7)
    got = ours.generate(prompt, max_new_tokens=6, n_loops=3, top_k=5)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("act_threshold", [1.5, 1e9])  # above 1: ACT late or off, valid in OpenMythos
def test_an_act_threshold_above_one_converts_with_identical_logits(act_threshold):
    cfg = LoopedConfig.variant("tiny-gqa").to_mythos_config()
    cfg.act_threshold = act_threshold
    torch.manual_seed(1)
    om = open_mythos.OpenMythos(cfg).eval()
    with torch.no_grad():
        om.recurrent.act.halt.bias.fill_(0.0)  # p ≈ 0.5: a threshold of 1.5 halts after about 3 loops
    ours = LoopedTransformer.from_open_mythos(om).eval()
    assert ours.cfg.act_threshold == act_threshold
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    calls, handle = count_loop_runs(om)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, n_loops=6), om(ids, n_loops=6), atol=TOL, rtol=0)
    handle.remove()
    assert ours.last_forward["iterations"] == len(calls)
    assert len(calls) == 6 if act_threshold > 6 else 2 < len(calls) < 6
