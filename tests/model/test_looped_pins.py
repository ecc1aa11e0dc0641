"""Pins of `model/looped.py` that its mutation runs found unpinned (issue 24): the choices the loop
makes without changing its numbers, checked by what they cost or which path runs, and the
paths no other fast test reaches.

- which exit policy reads the host, and how often (a fixed loop never does; compaction turned off
  asks only "has every position halted?");
- when the loop compacts: the automatic share from a step's FLOPs (B·T·position FLOPs), ACT's
  share counted as whole rows up to their last running position, never under autograd, in
  training mode or for ACT on a KV cache;
- grouped-query attention with several key heads (each serving several query heads), where
  dropping `enable_gqa` fails; the cached keys an MLA or GQA layer counts when it plans the
  attention of a few queries; the positions the coda lens runs;
- the float32 internals (RoPE angles, loop-index signal, ACT sums) whatever torch's default dtype;
- the coda lens after a chunk on a KV cache (it read that chunk's own keys too: fixed);
- dropout in training mode only, a fresh model's initialisation, the input guards at their
  boundaries, a criterion exactly at its threshold, `from_open_mythos`'s dtype and mode, what
  `run_with_cache` records.

Every expected number is computed here: the recurrence by hand (`_hand`, shared with
test_looped_recurrence.py), the positions still running from its exit steps, the shares by
their formulas. This file is in the fast mutation-testing selection of `model/looped.py`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mythos_probe.model import LoopedConfig, LoopedTransformer
from mythos_probe.model.looped import RecurrentBlock, loop_index_embeddings, precompute_rope_freqs
from mythos_probe.model.queries import Queries
from mythos_probe.model.variants import active_parameters
from tests.conftest import SyncCounter
from tests.model.test_looped_recurrence import IDS, IDS3, MICRO, _between, _converging, _criterion, _hand, _model


def _syncs(m, ids, **kw) -> list[str]:
    with torch.no_grad(), SyncCounter() as counter:
        m(ids, **kw)
    return counter.syncs


def _latent_threshold(m, ids=IDS) -> float:
    """A latent threshold between the relative residuals of different positions at iteration 2:
    positions exit at different iterations."""
    return _between(_criterion(m, ids, "latent")[2])


def _running_before(exit_at: torch.Tensor, t: int) -> torch.Tensor:
    """(B, T) bool: the positions still running when iteration t starts (not exited at t - 1 or before)."""
    return (exit_at < 0) | (exit_at >= t)


# -- host reads --------------------------------------------------------------------------------------


def test_a_fixed_loop_reads_nothing_back_and_an_uncompacted_one_only_whether_all_halted():
    """The input checks read min and max of the ids (two scalar reads). A fixed loop adds none,
    however many iterations it runs (no exit decision to read); with compaction off
    (compact_below=0, and the micro model's automatic share, 0 below 16 MFLOP a step) a latent
    loop adds one scalar read per iteration (has every position halted?) and never copies its
    halted mask to the host, which only compaction needs."""
    m = _model()
    assert _syncs(m, IDS, n_loops=2, exit="fixed") == ["_local_scalar_dense"] * 2
    assert _syncs(m, IDS, n_loops=5, exit="fixed") == ["_local_scalar_dense"] * 2
    threshold = _latent_threshold(m)
    _, iterations, exit_at = _hand(m, IDS, 6, "latent", threshold)
    assert 1 < iterations < 6 and len(set(exit_at.flatten().tolist())) >= 2
    for compact in (0.0, None):
        m.recurrent.compact_below = compact
        got = _syncs(m, IDS, n_loops=6, exit="latent", exit_threshold=threshold)
        assert got == ["_local_scalar_dense"] * (2 + iterations), compact
        assert m.last_forward["iterations"] == iterations
    m.recurrent.compact_below = 2.0  # compacting: one copy of the halted mask per iteration instead
    got = _syncs(m, IDS, n_loops=6, exit="latent", exit_threshold=threshold)
    assert got == ["_local_scalar_dense"] * 2 + ["copy to host"] * iterations


# -- when the loop compacts --------------------------------------------------------------------------


def test_the_automatic_share_is_the_rule_at_batch_times_length_times_position_flops():
    """`position_flops` is one position through one iteration, 2 × the active parameters
    (Kaplan); the automatic `compact_below` is `compact_share(B·T·position_flops)`. With the
    position's FLOPs set so that a step of IDS (2 × 6 positions) costs 16 MFLOP × 2⁵ (share 0.9),
    the loop compacts exactly as with compact_below=0.9 given by hand, which differs from the
    masked loop here (a share of B/T, or T/B, would be under 16 MFLOP: never compact)."""
    m = _model()
    assert m.recurrent.position_flops == 2 * active_parameters(m.recurrent)
    B, T = IDS.shape
    m.recurrent.position_flops = 16e6 * 2**5 / (B * T)
    assert RecurrentBlock.compact_share(16e6 * 2**5) == pytest.approx(0.9)
    threshold = _latent_threshold(m)
    want, iterations, exit_at = _hand(m, IDS, 6, "latent", threshold)
    running = [int(_running_before(exit_at, t).sum()) for t in range(1, iterations)]
    by_rule = B * T + sum(r if r / (B * T) < 0.9 else B * T for r in running)
    assert by_rule < B * T * iterations  # some iteration runs below 90 %: the rule compacts it
    with torch.no_grad():
        got = m(IDS, n_loops=6, exit="latent", exit_threshold=threshold)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert m.last_forward["row_iterations"] == by_rule


@pytest.mark.parametrize("seed, ids", [(0, IDS), (1, IDS3)])
def test_act_compacts_by_the_share_of_whole_rows_up_to_the_last_running_position(seed, ids):
    """ACT's compacted step runs whole rows up to their last running position, so its share is
    rows × extent / (B·T), not the share of running positions: with compact_below between the
    two at some iteration, that iteration runs masked (every position), and the rows run are
    those the rows × extent rule gives."""
    m = _model(seed=seed, act_threshold=1.5)
    want, iterations, exit_at = _hand(m, ids, 8, "act")
    B, T = ids.shape

    def shares(t):
        running = _running_before(exit_at, t)
        cols = running.any(0)
        extent = T - int(cols.flip(0).int().argmax()) if cols.any() else 0
        rows = int(running.any(1).sum())
        return float(running.float().mean()), rows * extent / (B * T), rows * extent

    table = [shares(t) for t in range(1, iterations)]
    # an iteration where some rows or positions are cut and fewer positions run than that share
    cut = [(mean, share) for mean, share, _ in table if mean < share < 1]
    assert cut, table
    mean, share = cut[0]
    compact = (mean + share) / 2
    by_rows = B * T + sum(n if s < compact else B * T for _, s, n in table)
    by_positions = B * T + sum(n if m_ < compact else B * T for m_, _, n in table)
    assert by_rows != by_positions  # the fixture tells the two rules apart
    m.recurrent.compact_below = compact
    with torch.no_grad():
        got = m(ids, n_loops=8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert m.last_forward["iterations"] == iterations
    assert m.last_forward["row_iterations"] == by_rows


def test_the_loop_never_compacts_under_autograd_in_training_mode_or_for_act_on_a_kv_cache():
    """compact_below > 1 (compact whenever a position has exited) is overridden where compaction
    cannot run: under autograd (a gradient must reach every position's state), in training mode
    (dropout), and for ACT on a KV cache (every loop depth of every position is cached). Each
    runs every position at every iteration and gives the masked loop's logits."""
    m = _model()
    threshold = _latent_threshold(m)
    want, iterations, exit_at = _hand(m, IDS, 6, "latent", threshold)
    assert iterations > 1 and bool((exit_at[:, :] >= 0).any())
    m.recurrent.compact_below = 2.0
    got = m(IDS, n_loops=6, exit="latent", exit_threshold=threshold)  # autograd on
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)
    assert m.last_forward["row_iterations"] == IDS.numel() * iterations
    m.train()  # dropout 0: the same numbers, but no compaction
    with torch.no_grad():
        got = m(IDS, n_loops=6, exit="latent", exit_threshold=threshold)
    m.eval()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert m.last_forward["row_iterations"] == IDS.numel() * iterations

    act = _model(act_threshold=0.9)
    _, act_iterations, act_exit = _hand(act, IDS, 6, "act")
    assert act_iterations < 6 and len(set(act_exit.flatten().tolist())) >= 2  # halts part-way without a cache
    out = {}
    for compact in (0.0, 2.0):
        act.recurrent.compact_below = compact
        kv: dict = {}
        with torch.no_grad():
            out[compact] = act(IDS, n_loops=6, kv_cache=kv)
        assert act.last_forward["iterations"] == 6  # a cache needs every depth
        assert act.last_forward["row_iterations"] == IDS.numel() * 6
    torch.testing.assert_close(out[2.0], out[0.0], atol=0, rtol=0)


def test_a_hook_on_the_injection_sees_every_iteration_at_inference():
    """At inference the loop computes the decay A once and applies the update itself, unless
    something watches the loop: then it calls the injection module, so that a hook on it fires
    once per iteration with the states the recurrence gives."""
    m = _model()
    seen = []
    handle = m.recurrent.injection.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            got = m(IDS, n_loops=3, exit="fixed")
    finally:
        handle.remove()
    want, _, _ = _hand(m, IDS, 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(seen) == 3 and all(s.shape == (*IDS.shape, MICRO["dim"]) for s in seen)


# -- grouped-query attention with several key heads, the keys a plan counts, the lens's positions ------


GQA = dict(n_heads=4, n_kv_heads=2)  # each of 2 key/value heads serves 2 query heads: no broadcasting


def test_grouped_query_attention_with_several_key_heads_on_every_path():
    """4 query heads on 2 key/value heads (the micro model's 2 on 1 would broadcast even without
    GQA): the hooked attention's z is softmax(q·kᵀ/√d, causal)·v with key head j serving query
    heads 2j and 2j+1, computed here from the hooked q, k, v, fused (the prelude's) and written
    out for a hook on the pattern (the loop's); the logits of the fused, hooked and
    compacted loops and of a prefill in two chunks on a KV cache are the recurrence's."""
    m = _model(**GQA)
    threshold = _latent_threshold(m)
    want, _, exit_at = _hand(m, IDS, 6, "latent", threshold)
    assert len(set(exit_at.flatten().tolist())) >= 2
    # the prelude's attention stays fused (no hook on its scores or pattern), the loop's is written out
    names = [f"{site}.attn.hook_{n}" for site in ("prelude.0", "recurrent.block") for n in ("q", "k", "v", "z")]
    names.append("recurrent.block.attn.hook_pattern")
    with torch.no_grad():
        logits, cache = m.run_with_cache(IDS, n_loops=6, exit="latent", exit_threshold=threshold, names_filter=names)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    for site in ("prelude.0", "recurrent.block"):
        in_loop = site.startswith("recurrent")  # a loop site: its value at iteration 1
        key = lambda n: (f"{site}.attn.hook_{n}", 1) if in_loop else f"{site}.attn.hook_{n}"  # noqa: E731
        q, k, v = (cache[key(n)].transpose(1, 2) for n in ("q", "k", "v"))  # (B, heads, T, d)
        assert q.shape[1] == 4 and k.shape[1] == 2
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -math.inf)
        torch.testing.assert_close(cache[key("z")], (scores.softmax(-1) @ v).transpose(1, 2), atol=1e-5, rtol=1e-5)
        if in_loop:
            torch.testing.assert_close(cache[key("pattern")], scores.softmax(-1), atol=1e-6, rtol=1e-5)
    for compact in (0.0, 2.0):
        m.recurrent.compact_below = compact
        with torch.no_grad():
            got = m(IDS, n_loops=6, exit="latent", exit_threshold=threshold)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        whole = m(IDS, n_loops=3, exit="fixed")
        kv: dict = {}
        first = m(IDS[:, :4], n_loops=3, exit="fixed", kv_cache=kv)
        second = m(IDS[:, 4:], n_loops=3, exit="fixed", kv_cache=kv, start_pos=4)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole, _hand(m, IDS, 3)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_a_few_queries_on_a_kv_cache_are_planned_with_the_cached_keys_counted(attn_type, monkeypatch):
    """The coda lens of one position of a 20-token chunk after 40 cached: the last coda layer
    plans its attention for 20 positions over 60 keys (40 cached + 20), the cost the plan is
    chosen by (6 over 6 without a cache); and the lens is the full lens at that position."""
    m = _model(attn_type=attn_type)
    ids = torch.randint(0, 64, (2, 60), generator=torch.Generator().manual_seed(9))
    planned = []
    plan = Queries.plan
    monkeypatch.setattr(Queries, "plan",
                        lambda self, seq_len, keys: planned.append((seq_len, keys)) or plan(self, seq_len, keys))
    kv: dict = {}
    with torch.no_grad():
        _, cache = m.run_with_cache(IDS, n_loops=2, exit="fixed", names_filter="recurrent.hook_state_out")
        planned.clear()
        m.coda_lens(cache["recurrent.hook_state_out", 1], torch.tensor([0, 2, 5]))
        assert planned == [(6, 6)]  # no cache: the keys are this call's own
        m(ids[:, :40], n_loops=2, exit="fixed", kv_cache=kv)
        _, cache = m.run_with_cache(ids[:, 40:], n_loops=2, exit="fixed", kv_cache=kv, start_pos=40,
                                    names_filter="recurrent.hook_state_out")
        h = cache["recurrent.hook_state_out", 1]
        planned.clear()
        few = m.coda_lens(h, torch.tensor([5]))
        assert planned == [(20, 60)]
        torch.testing.assert_close(few, m.coda_lens(h)[:, [5]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_the_coda_lens_of_some_rows_runs_their_positions_up_to_the_last_wanted_one(attn_type):
    """Queries of row 0 only, up to position 2 of 6: without a KV cache (or on one the forward
    started empty) the coda runs row 0's positions 0..2 only (later ones feed no wanted query,
    causal), up to position 39 of 60 positions 0..39; up to position 5 (the whole row), or on a
    chunk after cached ones (whose keys cover the whole chunk), every position of row 0. The
    log-probabilities are the full lens's there (the forward's, on the cache)."""
    m = _model(attn_type=attn_type)
    shapes = []
    handle = m.coda[0].register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    D = MICRO["dim"]
    try:
        with torch.no_grad():
            _, cache = m.run_with_cache(IDS, n_loops=2, exit="fixed", names_filter="recurrent.hook_state_out")
            h = cache["recurrent.hook_state_out", 1]
            full = m.coda_lens(h)
            for last, want_shape in ((2, (1, 3, D)), (5, (1, 6, D))):
                mask = np.zeros(IDS.shape, dtype=bool)
                mask[0, [0, last]] = True
                shapes.clear()
                got = m.coda_lens(h, queries=Queries.from_mask(mask, h.device))
                assert shapes == [want_shape]
                torch.testing.assert_close(got, full[0, [0, last]], atol=1e-5, rtol=1e-5)
            long = torch.randint(0, 64, (2, 60), generator=torch.Generator().manual_seed(9))
            _, cache = m.run_with_cache(long, n_loops=2, exit="fixed", names_filter="recurrent.hook_state_out")
            mask = np.zeros(long.shape, dtype=bool)
            mask[1, 39] = True  # extent 40: past the model's width (32), short of the row (60)
            shapes.clear()
            got = m.coda_lens(cache["recurrent.hook_state_out", 1], queries=Queries.from_mask(mask, h.device))
            assert shapes == [(1, 40, D)]
            kv: dict = {}  # a first chunk on a KV cache: nothing was cached before it
            m(IDS, n_loops=2, exit="fixed", kv_cache=kv)
            mask = np.zeros(IDS.shape, dtype=bool)
            mask[0, 2] = True
            shapes.clear()
            got = m.coda_lens(h, queries=Queries.from_mask(mask, h.device))
            assert shapes == [(1, 3, D)]
            torch.testing.assert_close(got, full[0, [2]], atol=1e-5, rtol=1e-5)
            kv = {}  # a chunk of 4 after 2 cached
            m(IDS[:, :2], n_loops=2, exit="fixed", kv_cache=kv)
            logits, cache = m.run_with_cache(IDS[:, 2:], n_loops=2, exit="fixed", kv_cache=kv, start_pos=2,
                                             names_filter="recurrent.hook_state_out")
            h = cache["recurrent.hook_state_out", 1]
            mask = np.zeros((2, 4), dtype=bool)
            mask[0, 1] = True
            shapes.clear()
            got = m.coda_lens(h, queries=Queries.from_mask(mask, h.device))
            assert shapes == [(1, 4, D)]
            torch.testing.assert_close(got, torch.log_softmax(logits[0, [1]], -1), atol=1e-5, rtol=1e-5)
    finally:
        handle.remove()


# -- float32 internals whatever torch's default dtype ----------------------------------------------


@pytest.fixture
def default_float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def test_rope_tables_loop_signal_and_act_sums_stay_float32_under_a_float64_default(default_float64):
    """With torch's default dtype float64 (a user's setting), the RoPE tables are the complex64
    ones computed in float32, the loop-index signal is computed in float32 then cast (bit for bit
    the float32 one, even when float64 is asked for), and a float32 model's ACT sums stay float32."""
    torch.set_default_dtype(torch.float32)
    rope32, emb32 = precompute_rope_freqs(8, 12, 100.0), loop_index_embeddings(5, 4, 8, "cpu", torch.float32)
    torch.set_default_dtype(torch.float64)
    rope = precompute_rope_freqs(8, 12, 100.0)
    assert rope.dtype == torch.complex64 and torch.equal(rope, rope32)
    emb = loop_index_embeddings(5, 4, 8, "cpu", torch.float64)
    assert emb.dtype == torch.float64 and torch.equal(emb, emb32.double())
    torch.set_default_dtype(torch.float32)
    m = _model(act_threshold=0.9)
    torch.set_default_dtype(torch.float64)
    with torch.no_grad():
        _, cache = m.run_with_cache(IDS, n_loops=3, names_filter="recurrent.hook_cum_halt")
    assert cache["recurrent.hook_cum_halt", 0].dtype == torch.float32


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_the_coda_lens_after_a_chunk_on_a_kv_cache_reads_only_what_the_forward_found_cached(attn_type):
    """After a forward on a KV cache the coda's cache also holds that forward's own positions: the
    lens of its last state must read only the earlier chunks' keys, as the forward's coda did, and
    so give the forward's log-probabilities. (It read them all: each of the chunk's keys twice and
    later positions before their time, which sharp attention, as here, shows.)"""
    m = _model(attn_type=attn_type)
    with torch.no_grad():  # sharp attention in the coda: a key seen twice or too early moves the output
        attn = m.coda[0].attn
        for w in ((attn.wq, attn.wk) if attn_type == "gqa" else (attn.q_up_nope, attn.kv_up)):
            w.weight.mul_(40)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    kv: dict = {}
    with torch.no_grad():
        m(ids[:, :8], n_loops=2, exit="fixed", kv_cache=kv)
        logits, cache = m.run_with_cache(ids[:, 8:], n_loops=2, exit="fixed", kv_cache=kv, start_pos=8,
                                         names_filter="recurrent.hook_state_out")
        h = cache["recurrent.hook_state_out", 1]
        want = torch.log_softmax(logits, -1)
        torch.testing.assert_close(m.coda_lens(h), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.coda_lens(h, torch.tensor([1, 3])), want[:, [1, 3]], atol=1e-5, rtol=1e-5)
        assert all(t.shape[1] == 12 for t in kv["coda_0"].values())  # read, never written


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_a_hook_on_a_prelude_site_leaves_the_loop_compacting(attn_type):
    """A hook on a layer site outside the loop turns the layer sites on for the forward, but the
    loop is not watched: it still compacts, its attention running the selected queries' path (not
    the hooked one, which needs every position), and gives the recurrence's logits."""
    m = _model(attn_type=attn_type)
    threshold = _latent_threshold(m)
    want, iterations, exit_at = _hand(m, IDS, 6, "latent", threshold)
    m.recurrent.compact_below = 2.0
    with torch.no_grad():
        logits, cache = m.run_with_cache(IDS, n_loops=6, exit="latent", exit_threshold=threshold,
                                         names_filter="prelude.0.attn.hook_z")
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    assert cache["prelude.0.attn.hook_z"].shape[:2] == IDS.shape
    running = IDS.numel() + sum(int(_running_before(exit_at, t).sum()) for t in range(1, iterations))
    assert m.last_forward["row_iterations"] == running < IDS.numel() * iterations


def test_to_empty_without_recursion_leaves_the_submodules_alone():
    """`Module._apply` passes `recurse` on: `to_empty(recurse=False)` re-allocates the model's own
    tensors only (here the RoPE tables, kept complex64), never a submodule's weights."""
    m = _model()
    weight = m.prelude[0].attn.wq.weight.detach().clone()
    table = m.freqs_cis.clone()
    m.to_empty(device="cpu", recurse=False)
    assert torch.equal(m.prelude[0].attn.wq.weight.detach(), weight)
    assert m.freqs_cis.dtype == torch.complex64 and torch.equal(m.freqs_cis, table)


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_dropout_acts_in_training_mode_only_on_the_fused_and_the_written_out_attention(attn_type):
    """cfg.dropout = 0.3: in eval mode the logits are the dropout-free model's, bit for bit, fused
    or written out for a hook on the pattern (z = pattern·v); in training mode dropout acts on the
    attention and the residual stream (other logits, the same again under the same seed), and the
    written-out attention's z is no longer pattern·v (the pattern hook sees it before dropout)."""
    m, plain = _model(attn_type=attn_type, dropout=0.3), _model(attn_type=attn_type)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), plain.state_dict().values()))
    names = ["prelude.0.attn.hook_pattern", "prelude.0.attn.hook_v", "prelude.0.attn.hook_z"]

    def z_and_pattern_v(cache):
        pattern, v = cache[names[0]], cache[names[1]].transpose(1, 2)
        v = v.repeat_interleave(pattern.shape[1] // v.shape[1], 1)
        return cache[names[2]], (pattern @ v).transpose(1, 2)

    with torch.no_grad():
        want = plain(IDS, n_loops=2, exit="fixed")
        assert torch.equal(m(IDS, n_loops=2, exit="fixed"), want)
        logits, cache = m.run_with_cache(IDS, n_loops=2, exit="fixed", names_filter=names)
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(*z_and_pattern_v(cache), atol=1e-6, rtol=1e-5)
        m.train()
        torch.manual_seed(3)
        trained = m(IDS, n_loops=2, exit="fixed")
        torch.manual_seed(3)
        assert torch.equal(m(IDS, n_loops=2, exit="fixed"), trained)
        assert (trained - want).abs().max() > 1e-3
        m.prelude[0].resid_drop.p = 0.0  # dropout left in the attention alone (the hooked block's)
        for layer in (*m.coda, m.recurrent.block):
            layer.resid_drop.p = 0.0
            if attn_type == "gqa":
                layer.attn.dropout_p = 0.0
            else:
                layer.attn.attn_drop.p = 0.0
        logits, cache = m.run_with_cache(IDS, n_loops=2, exit="fixed", names_filter=names)
        assert (logits - want).abs().max() > 1e-3
        z, pattern_v = z_and_pattern_v(cache)
        assert (z - pattern_v).abs().max() > 1e-3


# -- a fresh model ------------------------------------------------------------------------------------


def test_a_fresh_model_starts_from_the_documented_initialisation():
    """Every Linear and Embedding weight (the LoRA's per-iteration scale included) is drawn from
    N(0, 0.02²), the LoRA's B as randn·0.02; the halting head's bias keeps torch's default
    (uniform within ±1/√dim); a fresh loop has run no rows. Sample std within ±35 % of 0.02 (the
    smallest tensor, the LoRA's B, has 128 entries: a 5-sigma band is about ±31 %)."""
    torch.manual_seed(0)
    m = LoopedTransformer(LoopedConfig(**MICRO))
    weights = {name: mod.weight.detach() for name, mod in m.named_modules()
               if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding))}
    assert "recurrent.lora.scale" in weights and "recurrent.act.halt" in weights
    weights["recurrent.lora.B"] = m.recurrent.lora.B.detach()
    for name, w in weights.items():
        assert 0.013 < float(w.std()) < 0.027, name
        assert abs(float(w.mean())) < 0.01, name
    bias = m.recurrent.act.halt.bias.detach()
    assert 0 < abs(float(bias)) <= 1 / math.sqrt(MICRO["dim"])
    assert m.recurrent.row_iterations == 0


def test_a_hook_on_a_coda_layer_site_sees_the_stream_the_head_reads():
    """The coda's layer sites are hook points like the prelude's: the last coda block's
    hook_resid_post, normed and through the tied head, is the forward's logits. A coda lens runs
    the coda without firing its sites (a forward does)."""
    m = _model()
    with torch.no_grad():
        logits, cache = m.run_with_cache(IDS, n_loops=2, exit="fixed", names_filter="coda.0.hook_resid_post")
        assert not m.sites.on  # the switch is the forward's: off again after it
        torch.testing.assert_close(m.head(m.norm(cache["coda.0.hook_resid_post"])), logits, atol=1e-5, rtol=1e-5)
        calls = []
        handle = m.coda[0].hook_resid_post.register_forward_hook(lambda *args: calls.append(1))
        try:
            m.coda_lens(cache["coda.0.hook_resid_post"])  # a lens is no forward: the coda's sites stay quiet
            assert calls == []
            m(IDS, n_loops=2, exit="fixed")
            assert calls == [1]
        finally:
            handle.remove()


def test_inputs_on_the_guards_boundaries_are_accepted_and_just_past_them_refused():
    """The last positions that fit (start_pos + T = max_seq_len), token ids 0 and vocab_size - 1,
    int32 ids, one sequence of one token, one loop and a threshold of exactly 0 all run; the id
    vocab_size alone, a boolean or NaN threshold are refused with the message naming the fix."""
    m = _model()
    V, L = MICRO["vocab_size"], MICRO["max_seq_len"]
    edge = torch.tensor([[0, V - 1, 5, 0, V - 1, 7]])
    with torch.no_grad():
        for ids, kw in ((edge, dict(start_pos=L - 6)), (edge.int(), {}), (edge[:, :1], {}),
                        (IDS, dict(n_loops=1)), (IDS, dict(exit="latent", exit_threshold=0.0))):
            out = m(ids, **{"n_loops": 2, "exit": "fixed", **kw})
            assert out.shape == (*ids.shape, V)
        assert m.last_forward["iterations"] == 2  # threshold 0: no position's residual falls below it
        assert m(IDS, n_loops=1, exit="fixed").shape == (*IDS.shape, V) and m.last_forward["iterations"] == 1
    for call, message in ((lambda: m(torch.tensor([[V]])), f"token ids must lie in [0, vocab_size={V})"),
                          (lambda: m(IDS, exit="kl", exit_threshold=True),
                           "exit_threshold must be a number, got bool True"),
                          (lambda: m(IDS, exit="latent", exit_threshold=float("nan")),
                           "exit_threshold must be a non-negative number (the latent criterion stops a position below "
                           "it), got nan; default 0.01")):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message


def test_from_open_mythos_keeps_its_weights_dtype_and_mode_and_refuses_lookalikes():
    """A float64 OpenMythos in training mode gives a float64 model in training mode with the same
    weights (RoPE tables still complex64); an eval one an eval model. A module with only one of
    OpenMythos's `cfg` and `recurrent` is refused, naming what is expected."""
    open_mythos = pytest.importorskip("open_mythos.main", reason="open-mythos is installed by scripts/bootstrap.sh")
    torch.manual_seed(0)
    om = open_mythos.OpenMythos(LoopedConfig(**MICRO).to_mythos_config()).double().train()
    ours = LoopedTransformer.from_open_mythos(om)
    assert ours.training and ours.embed.weight.dtype == torch.float64 and ours.freqs_cis.dtype == torch.complex64
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in om.state_dict().items())
    assert not LoopedTransformer.from_open_mythos(om.eval()).training
    for attribute in ("cfg", "recurrent"):
        lookalike = torch.nn.Linear(2, 2)
        setattr(lookalike, attribute, om.cfg if attribute == "cfg" else om.recurrent)
        with pytest.raises(TypeError) as err:
            LoopedTransformer.from_open_mythos(lookalike)
        assert str(err.value) == "from_open_mythos expects an open_mythos.main.OpenMythos model"


@pytest.mark.parametrize("policy, embed_scale", [("latent", 50.0), ("kl", 20.0)])
def test_budgets_without_a_threshold_use_the_policys_default(policy, embed_scale):
    """A `LoopBudget` with no exit_threshold stops its row at the policy's documented default
    (latent 1e-2, kl 1e-3): the same logits and iterations as a forward without budgets at
    n_loops = the budgets' max_loops, on a model where that default stops positions part-way."""
    from mythos_probe.model.budgets import LoopBudget

    m = _converging(embed_scale)
    with torch.no_grad():
        want = m(IDS, n_loops=12, exit=policy)
        iterations = m.last_forward["iterations"]
        got = m(IDS, exit=policy, budgets=[LoopBudget(12), LoopBudget(12)])
    _, _, exit_at = _hand(m, IDS, 12, policy, 1e-2 if policy == "latent" else 1e-3)
    assert len(set(exit_at.flatten().tolist())) >= 2  # the default stops some positions, at different iterations
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert m.last_forward["iterations"] == iterations


@pytest.mark.parametrize("policy", ["latent", "kl"])
def test_a_criterion_exactly_at_the_threshold_does_not_stop_its_position(policy):
    """A position stops when its criterion is below the threshold, strictly: with the threshold
    set to exactly the smallest criterion of the first iteration that has one (the model's own
    float32 value, computed here with the same functions from its states), no position stops
    there; one float32 step above it, that position does."""
    from mythos_probe.metrics.convergence import rel_residual
    from mythos_probe.metrics.lens import kl
    from mythos_probe.model.looped import _norm

    m = _model()
    with torch.no_grad():
        # the loop's sites only: the layers' sites would write the attention out (other rounding)
        _, cache = m.run_with_cache(IDS, n_loops=3, exit="fixed",
                                    names_filter=["recurrent.hook_state_in", "recurrent.hook_state_out"])
        states = [cache["recurrent.hook_state_in", 0]] + [cache["recurrent.hook_state_out", t] for t in range(3)]
        if policy == "latent":
            t, value = 0, rel_residual(_norm(states[1] - states[0]), _norm(states[1]))
        else:
            t, value = 1, kl(m.coda_lens(states[2]), m.coda_lens(states[1]))
    lowest = value.min()
    at, above = float(lowest), float(torch.nextafter(lowest, torch.tensor(math.inf)))
    assert int((value == lowest).sum()) == 1 and float(value.flatten().sort().values[1]) > above
    for threshold, stopped in ((at, 0), (above, 1)):
        with torch.no_grad():
            _, run = m.run_with_cache(IDS, n_loops=3, exit=policy, exit_threshold=threshold,
                                      names_filter="recurrent.hook_halted")
        assert int(run["recurrent.hook_halted", t].sum()) == stopped, threshold


def test_the_cache_records_the_calls_arguments_its_defaults_and_logits():
    """`run_with_cache` records what the analysis replays: the arguments as passed (keyword ones
    included), the defaults of those left out, and the logits, detached."""
    m = _model()
    threshold = _latent_threshold(m)
    logits, cache = m.run_with_cache(IDS, 4, exit="latent", exit_threshold=threshold,
                                     names_filter="recurrent.hook_halted")
    forward = cache.forward
    assert forward["n_loops"] == 4 and forward["exit"] == "latent" and forward["exit_threshold"] == threshold
    assert forward["start_pos"] == 0 and forward["kv_cache"] is None and forward["budgets"] is None
    assert torch.equal(forward["input_ids"], IDS)
    assert torch.equal(forward["logits"], logits.detach()) and not forward["logits"].requires_grad


def test_a_compacted_step_runs_positions_only_up_to_the_last_running_one(monkeypatch):
    """Without a KV cache a compacted latent step attends over the rows with a running position,
    up to the last running position (later ones feed no running query, causal): each step's
    attention is planned for that many positions and keys, on a fixture where it cuts some."""
    m = _model(seed=2)
    threshold = _between(_criterion(m, IDS, "latent")[3])  # the last positions exit first here
    want, iterations, exit_at = _hand(m, IDS, 6, "latent", threshold)
    extents = []
    for t in range(1, iterations):
        cols = _running_before(exit_at, t).any(0)
        extents.append(IDS.shape[1] - int(cols.flip(0).int().argmax()))
    assert min(extents) < IDS.shape[1], extents
    planned = []
    plan = Queries.plan
    monkeypatch.setattr(Queries, "plan",
                        lambda self, seq_len, keys: planned.append((seq_len, keys)) or plan(self, seq_len, keys))
    m.recurrent.compact_below = 2.0
    with torch.no_grad():
        got = m(IDS, n_loops=6, exit="latent", exit_threshold=threshold)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert planned == [(n, n) for n in extents]


def test_at_inference_the_decay_is_computed_once_per_forward():
    """A = exp(-exp(log_dt + log_A)) is computed once per forward at inference (two `exp` ops in
    the whole forward, nothing else in the model exponentiates), masked or compacted, ACT's
    compacted row steps included; under autograd the injection module computes it every
    iteration (so gradients sum as in OpenMythos)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ExpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten.exp.default
            return func(*args, **(kwargs or {}))

    m = _model(act_threshold=1.5)
    for compact in (0.0, 2.0):
        m.recurrent.compact_below = compact
        with torch.no_grad(), ExpCounter() as counter:
            m(IDS, n_loops=8)
        assert counter.n == 2 and m.last_forward["iterations"] > 2, compact
    if compact:
        assert m.last_forward["row_iterations"] < IDS.numel() * m.last_forward["iterations"]  # rows were cut
    with ExpCounter() as counter:
        m(IDS, n_loops=3, exit="fixed")
    assert counter.n == 2 * 3
