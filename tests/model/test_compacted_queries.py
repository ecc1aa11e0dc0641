"""`Queries`: the selected (row, position) pairs a compacted layer computes, checked against plain
full-sequence attention and the full coda lens gathered at the same pairs, and the ACT loop's
rows counted by hand from a masked run's halting record."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mythos_probe.model import LoopedConfig, LoopedTransformer
from mythos_probe.model.queries import Queries

MASK = np.array([[0, 1, 0, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=bool)


def test_indices_of_a_mask():
    q = Queries.from_mask(MASK, torch.device("cpu"))
    rows, pos = np.nonzero(MASK)
    assert q.rows.tolist() == rows.tolist() and q.pos.tolist() == pos.tolist()
    assert q.live.tolist() == [0, 2, 3]
    assert q.slot.tolist() == [0, 0, 1, 1, 1, 2]
    assert q.packed.tolist() == [0, 1, 3, 4, 5, 6]  # row slot · width 3 + rank in the row
    assert q.last.tolist() == [[1, 4, 0], [0, 1, 2], [3, 0, 0]]  # padding sees key 0
    assert (q.width, q.extent, q.n, q.n_rows, q.every_row) == (3, 5, 6, 4, False)
    inner = q.within_live()
    assert inner.rows.tolist() == [0, 0, 1, 1, 1, 2] and inner.live.tolist() == [0, 1, 2] and inner.every_row


def test_an_empty_mask_selects_nothing():
    q = Queries.from_mask(np.zeros((2, 3), dtype=bool), torch.device("cpu"))
    assert (q.n, q.width, q.extent) == (0, 0, 0)
    out = q.attend(torch.zeros(0, 4, 8), torch.zeros(2, 3, 2, 8), torch.zeros(2, 3, 2, 8), 0, True, 0.0, True, "packed")
    assert out.shape == (0, 4, 8)


@pytest.mark.parametrize("plan", ["packed", "gathered"])
@pytest.mark.parametrize("past", [0, 3])
def test_selected_attention_equals_full_causal_attention_at_the_selected_pairs(past, plan):
    """Independent: plain SDPA over every query with an explicit causal mask, then gathered."""
    g = torch.Generator().manual_seed(0)
    B, T, H, Hkv, d = 4, 5, 4, 2, 8
    S = past + T
    q_all = torch.randn(B, T, H, d, generator=g)
    k, v = torch.randn(B, S, Hkv, d, generator=g), torch.randn(B, S, Hkv, d, generator=g)
    allowed = torch.ones(T, S, dtype=torch.bool).tril(diagonal=past)
    full = F.scaled_dot_product_attention(q_all.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=allowed, enable_gqa=True).transpose(1, 2)  # (B, T, H, d)
    q = Queries.from_mask(MASK, torch.device("cpu"))
    out = q.attend(q.take(q_all), k, v, past, True, 0.0, True, plan)
    torch.testing.assert_close(out, full[q.rows, q.pos], atol=1e-6, rtol=0)
    live = q.attend(q.take(q_all), k[q.live], v[q.live], past, True, 0.0, True, plan)  # keys of the live rows only
    torch.testing.assert_close(live, out, atol=1e-6, rtol=0)


def test_the_plan_is_the_cheapest_by_the_cost_model():
    few = Queries.from_mask(np.eye(64, 9, dtype=bool)[:64], torch.device("cpu"))  # one query in each of 64 short rows
    assert few.plan(9, 9) == "gathered"
    long_rows = np.zeros((4, 64), dtype=bool)
    long_rows[:, :8] = True  # 8 of 64 per row: packing beats both
    assert Queries.from_mask(long_rows, torch.device("cpu")).plan(64, 64) == "packed"
    assert Queries.from_mask(np.ones((4, 64), dtype=bool), torch.device("cpu")).plan(64, 64) == "full"


SPARSE = np.array([[0, 0, 0, 0, 0], [0, 1, 0, 0, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=bool)


@pytest.mark.parametrize("mask", [MASK, SPARSE], ids=["many", "few"])
@pytest.mark.parametrize("variant", ["tiny-gqa", "tiny-mla"])
@pytest.mark.parametrize("plan", ["full", "packed", "gathered"])
def test_coda_lens_of_selected_pairs_equals_the_full_lens_there(variant, mask, plan, monkeypatch):
    torch.manual_seed(0)
    m = LoopedTransformer(LoopedConfig.variant(variant)).eval()
    ids = torch.randint(0, 256, (4, 5))
    with torch.no_grad():
        m(ids, n_loops=2)
        h = torch.randn(4, 5, m.cfg.dim)
        q = Queries.from_mask(mask, torch.device("cpu"))
        monkeypatch.setattr(Queries, "plan", lambda self, seq_len, keys: plan)  # each path, whatever the cost
        torch.testing.assert_close(m.coda_lens(h, queries=q), m.coda_lens(h)[q.rows, q.pos], atol=1e-5, rtol=1e-5)


def test_act_compaction_runs_the_rows_with_a_running_position_up_to_the_last_running_one():
    """Counted by hand from a masked run's halting record: per iteration after the first, the rows
    with a running position run positions 0..the last running one of any of them."""
    torch.manual_seed(0)
    m = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()
    ids = torch.randint(8, 256, (4, 12), generator=torch.Generator().manual_seed(5))
    ids[:, 9:], ids[1, 6:] = 7, 7  # each row ends in token 7, which halts at once; the others run on
    with torch.no_grad():
        w = torch.randn(m.cfg.dim)
        w /= w.norm()
        m.embed.weight[7] += 3 * w
        m.recurrent.act.halt.weight.copy_(4 * w)
        m.recurrent.act.halt.bias.fill_(-2.0)
    with torch.no_grad():
        _, cache = m.run_with_cache(ids, n_loops=8, names_filter="recurrent.hook_halted")
        halted = cache.stack("recurrent.hook_halted")  # (I, B, T)
        masked = m(ids, n_loops=8)
        m.recurrent.compact_below = 2.0
        compact = m(ids, n_loops=8)
    m.recurrent.compact_below = None
    expected = ids.numel()
    for t in range(halted.shape[0] - 1):
        rows, positions = np.nonzero((~halted[t]).numpy())
        expected += len(set(rows)) * (positions.max() + 1 if positions.size else 0)
    assert m.last_forward["row_iterations"] == expected < halted.shape[0] * ids.numel()
    torch.testing.assert_close(compact, masked, atol=1e-6, rtol=0)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_mask_attends_like_full_causal_attention(data):
    """Property: for any (B, T) mask and cache length, packed or gathered, the selected queries get
    exactly the plain causal attention of their positions."""
    B, T, past = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 7)), data.draw(st.integers(0, 3))
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T)), dtype=bool).reshape(B, T)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    H, Hkv, d, S = 4, 2, 8, past + T
    q_all = torch.randn(B, T, H, d, generator=g)
    k, v = torch.randn(B, S, Hkv, d, generator=g), torch.randn(B, S, Hkv, d, generator=g)
    allowed = torch.ones(T, S, dtype=torch.bool).tril(diagonal=past)
    full = F.scaled_dot_product_attention(q_all.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=allowed, enable_gqa=True).transpose(1, 2)
    q = Queries.from_mask(mask, torch.device("cpu"))
    rows, pos = np.nonzero(mask)
    assert q.n == rows.size and q.extent == (pos.max() + 1 if pos.size else 0)
    for plan in ("packed", "gathered"):
        out = q.attend(q.take(q_all), k, v, past, True, 0.0, True, plan)
        torch.testing.assert_close(out, full[rows, pos], atol=1e-6, rtol=0)
