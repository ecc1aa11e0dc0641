"""`Queries` beyond the causal masks of tests/model/test_compacted_queries.py: the attention plan
against the cost model written out from its docstring, on a grid of batches where each of its
terms decides some choice; the `grid` form the coda lens uses (every row, fixed positions);
non-causal attention; a query head per key/value head (no GQA); dropout reaching the kernel;
and `sdpa`'s padding of a value dimension below the query dimension (MLA), against attention
written out in torch (softmax(q·kᵀ/√d)·v)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mythos_probe.model.queries import Queries, sdpa

CPU = torch.device("cpu")


def by_hand(q, k, v, allowed=None):
    """Attention written out: q (B, H, Q, d), k (B, H, S, d), v (B, H, S, dv), allowed (.., Q, S) bool."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    return scores.softmax(-1) @ v


def docstring_plan(mask, seq_len, keys):
    """The three costs of `Queries.plan`'s docstring, per query head, computed from the mask."""
    counts = mask.sum(1)
    L, width, n = int((counts > 0).sum()), int(counts.max(initial=0)), int(counts.sum())
    costs = {
        "full": L * seq_len * (0.09 + 0.0007 * keys),
        "packed": L * (0.07 + 0.01 * keys) + L * 0.16 * width,
        "gathered": n * (0.16 + 0.015 * keys),
    }
    return min(costs, key=costs.get), costs


def test_the_plan_follows_every_term_of_the_cost_model():
    rng = np.random.default_rng(0)
    chosen = set()
    margins = []
    for B, T, share, keys in itertools.product((1, 3, 8), (4, 16, 64, 200), (0.02, 0.1, 0.3, 0.7, 1.0),
                                               (4, 16, 64, 256, 1024)):
        mask = rng.random((B, T)) < share
        mask[0, -1] = True  # at least one query
        want, costs = docstring_plan(mask, T, keys)
        assert Queries.from_mask(mask, CPU).plan(T, keys) == want, (B, T, share, keys, costs)
        chosen.add(want)
        ordered = sorted(costs.values())
        margins.append((ordered[1] - ordered[0]) / ordered[1])
    assert chosen == {"full", "packed", "gathered"}
    assert min(margins) < 0.05  # some cases sit near a boundary, where a changed constant flips the choice


def test_plan_pins_each_constant_at_a_boundary():
    """Cases built so that each term alone decides: a changed constant or operator flips them."""
    one = np.zeros((1, 100), dtype=bool)
    one[0, 0] = True
    # one query: gathered 0.16 + 0.015·keys vs packed 0.07 + 0.01·keys + 0.16: gathered wins below keys = 14
    assert Queries.from_mask(one, CPU).plan(100, 10) == "gathered"
    assert Queries.from_mask(one, CPU).plan(100, 20) == "packed"
    # a full row of 2 positions: full 2·(0.09 + 0.0007k) vs packed 0.07 + 0.01k + 0.32 vs gathered 2·(0.16 + 0.015k)
    two = np.ones((1, 2), dtype=bool)
    assert Queries.from_mask(two, CPU).plan(2, 2) == "full"
    # 5 of 6 positions: full 6·(0.09 + 0.0007·6) = 0.5652, packed 0.07 + 0.06 + 0.8 = 0.93, gathered 5·0.25 = 1.25
    five = np.array([[1, 1, 1, 1, 1, 0]], dtype=bool)
    assert Queries.from_mask(five, CPU).plan(6, 6) == "full"
    # 8 of 1000 positions, 1000 keys: full 1000·0.79 = 790, packed 0.07 + 10 + 1.28 = 11.35, gathered 8·15.16
    sparse = np.zeros((1, 1000), dtype=bool)
    sparse[0, :8] = True
    assert Queries.from_mask(sparse, CPU).plan(1000, 1000) == "packed"


def test_grid_selects_the_same_positions_of_every_row():
    positions = torch.tensor([4, 0, 2])
    q = Queries.grid(3, positions)
    assert q.rows.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert q.pos.tolist() == [4, 0, 2] * 3
    assert q.live.tolist() == [0, 1, 2] and q.slot.tolist() == q.rows.tolist() and q.local.tolist() == [0, 1, 2]
    assert q.packed.tolist() == list(range(9))
    assert q.last.tolist() == [[4, 0, 2]] * 3
    assert (q.width, q.extent, q.n_rows, q.n, q.every_row) == (3, None, 3, 9, True)
    g = torch.Generator().manual_seed(1)
    B, T, H, d = 3, 5, 2, 4
    q_all, k, v = (torch.randn(B, T, H, d, generator=g) for _ in range(3))
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    want = by_hand(q_all.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), allowed).transpose(1, 2)
    for plan in ("packed", "gathered"):
        torch.testing.assert_close(q.attend(q.take(q_all), k, v, 0, True, 0.0, False, plan), want[q.rows, q.pos],
                                   atol=1e-5, rtol=1e-5)


def test_rows_of_and_within_live():
    q = Queries.from_mask(np.array([[0, 0], [1, 0], [0, 0], [1, 1]], dtype=bool), CPU)
    x = torch.arange(4)
    assert q.rows_of(x).tolist() == [1, 3]  # the live rows of the full batch
    assert q.rows_of(x[q.live]).tolist() == [1, 3]  # already the live rows: kept
    inner = q.within_live()
    assert (inner.rows.tolist(), inner.pos.tolist(), inner.live.tolist(), inner.n_rows) == ([0, 1, 1], [0, 0, 1], [0, 1], 2)
    assert (inner.packed.tolist(), inner.last.tolist(), inner.width, inner.extent) == ([0, 2, 3], [[0, 0], [0, 1]], 2, 2)
    assert (inner.slot.tolist(), inner.local.tolist()) == ([0, 1, 1], [0, 1])
    assert q.extent == 2 and q.width == 2
    assert inner.within_live().rows.tolist() == [0, 1, 1]  # indexing into the live rows again changes nothing


def test_a_batch_of_no_rows_selects_nothing():
    q = Queries.from_mask(np.zeros((0, 5), dtype=bool), CPU)
    assert (q.n, q.width, q.extent, q.n_rows, q.live.tolist()) == (0, 0, 0, 0, [])


@pytest.mark.parametrize("plan", ["packed", "gathered"])
@pytest.mark.parametrize("gqa", [True, False])
def test_non_causal_attention_sees_every_key(plan, gqa):
    g = torch.Generator().manual_seed(3)
    B, T, H, past, d = 3, 4, 4, 2, 8
    Hkv = 2 if gqa else H
    q_all = torch.randn(B, T, H, d, generator=g)
    k, v = torch.randn(B, past + T, Hkv, d, generator=g), torch.randn(B, past + T, Hkv, d, generator=g)
    rep = H // Hkv
    want = by_hand(q_all.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1),
                   v.transpose(1, 2).repeat_interleave(rep, 1)).transpose(1, 2)
    mask = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=bool)
    q = Queries.from_mask(mask, CPU)
    out = q.attend(q.take(q_all), k, v, past, False, 0.0, gqa, plan)
    torch.testing.assert_close(out, want[q.rows, q.pos], atol=1e-5, rtol=1e-5)
    # causal with a cache of `past` positions: query at position p sees keys 0..past + p
    allowed = torch.ones(T, past + T, dtype=torch.bool).tril(diagonal=past)
    causal = by_hand(q_all.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1),
                     v.transpose(1, 2).repeat_interleave(rep, 1), allowed).transpose(1, 2)
    torch.testing.assert_close(q.attend(q.take(q_all), k, v, past, True, 0.0, gqa, plan), causal[q.rows, q.pos],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("plan", ["packed", "gathered"])
def test_dropout_reaches_the_kernel(plan):
    g = torch.Generator().manual_seed(4)
    q_all, k, v = (torch.randn(2, 6, 2, 8, generator=g) for _ in range(3))
    q = Queries.from_mask(np.ones((2, 6), dtype=bool), CPU)
    plain = q.attend(q.take(q_all), k, v, 0, True, 0.0, False, plan)
    torch.manual_seed(0)
    dropped = q.attend(q.take(q_all), k, v, 0, True, 0.9, False, plan)
    assert not torch.allclose(plain, dropped)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_pads_a_value_dimension_below_the_query_dimension(causal):
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 3, 5, 16, generator=g), torch.randn(2, 3, 5, 16, generator=g)
    v = torch.randn(2, 3, 5, 6, generator=g)  # dv 6 < 16
    allowed = torch.ones(5, 5, dtype=torch.bool).tril() if causal else None
    out = sdpa(q, k, v, None, 0.0, False, is_causal=causal)
    assert out.shape == (2, 3, 5, 6)
    torch.testing.assert_close(out, by_hand(q, k, v, allowed), atol=1e-5, rtol=1e-5)
    masked = sdpa(q, k, v, torch.ones(5, 5, dtype=torch.bool).tril(), 0.0, False)
    torch.testing.assert_close(masked, by_hand(q, k, v, torch.ones(5, 5, dtype=torch.bool).tril()), atol=1e-5, rtol=1e-5)
    wide = torch.randn(2, 3, 5, 20, generator=g)  # dv above the query dim: no padding, all kept
    torch.testing.assert_close(sdpa(q, k, wide, None, 0.0, False), by_hand(q, k, wide), atol=1e-5, rtol=1e-5)
    gq = torch.randn(2, 4, 5, 16, generator=g)  # 4 query heads on 2 key/value heads
    torch.testing.assert_close(sdpa(gq, k[:, :2], v[:, :2], None, 0.0, True),
                               by_hand(gq, k[:, :2].repeat_interleave(2, 1), v[:, :2].repeat_interleave(2, 1)),
                               atol=1e-5, rtol=1e-5)


def test_indices_are_copied_to_the_device_asked_for():
    meta = torch.device("meta")
    q = Queries.from_mask(np.eye(3, 4, dtype=bool), meta)
    assert {t.device for t in (q.rows, q.pos, q.live, q.slot, q.packed, q.last, q.local)} == {meta}
    assert q.last.shape == (3, 1) and (q.width, q.extent) == (1, 3)


def test_grid_and_gathered_masks_live_on_the_queries_device():
    meta = torch.device("meta")
    q = Queries.grid(2, torch.tensor([0, 3], device=meta))
    assert {t.device for t in (q.rows, q.pos, q.live, q.slot, q.packed, q.last, q.local)} == {meta}
    x = torch.zeros(q.n, 2, 4, device=meta)
    kv = torch.zeros(2, 4, 2, 4, device=meta)
    assert q.attend(x, kv, kv, 0, True, 0.0, False, "gathered").device == meta


def test_each_plan_runs_its_own_path(monkeypatch):
    """Both paths give the same values, so which one ran is observed directly."""
    ran = []
    real = Queries._gathered
    monkeypatch.setattr(Queries, "_gathered", lambda self, *a: ran.append("gathered") or real(self, *a))
    g = torch.Generator().manual_seed(6)
    q_all, k, v = (torch.randn(2, 3, 2, 4, generator=g) for _ in range(3))
    q = Queries.from_mask(np.array([[1, 0, 1], [0, 1, 0]], dtype=bool), CPU)
    q.attend(q.take(q_all), k, v, 0, True, 0.0, False, "packed")
    assert ran == []
    q.attend(q.take(q_all), k, v, 0, True, 0.0, False, "gathered")
    assert ran == ["gathered"]
    meta = torch.device("meta")
    qm = Queries.from_mask(np.array([[1, 0, 1], [0, 1, 0]], dtype=bool), meta)
    x, kv = torch.zeros(qm.n, 2, 4, device=meta), torch.zeros(2, 3, 2, 4, device=meta)
    assert qm.attend(x, kv, kv, 2, True, 0.0, False, "packed").device == meta  # the packed mask too


def test_sdpa_pads_v_to_the_query_dim_only_when_below_it(monkeypatch):
    """The padding only buys speed (SDPA's fast path), so it is observed at the kernel's call."""
    import mythos_probe.model.queries as queries

    seen, pads = [], []
    real_sdpa, real_pad = F.scaled_dot_product_attention, F.pad
    monkeypatch.setattr(queries.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append(v.shape[-1]) or real_sdpa(q, k, v, **kw))
    monkeypatch.setattr(queries.F, "pad", lambda x, p: pads.append(p) or real_pad(x, p))
    q = torch.zeros(2, 3, 5, 16)  # 3 heads, 5 queries: neither may stand in for the query dim
    for dv in (6, 16, 20):
        out = sdpa(q, q, torch.ones(2, 3, 5, dv), None, 0.0, False)
        assert out.shape[-1] == dv
    assert seen == [16, 16, 20] and pads == [(0, 10)]
