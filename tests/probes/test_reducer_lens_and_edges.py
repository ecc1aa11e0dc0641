"""`ForwardReducer` on the inputs tests/probes/test_reducer_direct.py does not build: output logits
of the last few positions only (`logits_to_keep` in generate), where the coda lens has a final
distribution at some sampled positions and not at others, the offset at 1 and at several; the
index tensors built once per forward on the states' device (a "meta" device here, which no
default placement can match); an aborted forward; iterations used that the adapter reports; the
trajectory probe on states rewritten in place, released at the last iteration, in bfloat16.
Every expected value is recomputed in numpy."""

from __future__ import annotations


import numpy as np
import pytest
import torch

# imported at collection so that a mutation run's fork server holds the model package (and every
# forked test skips its import); the same import the cost tests need anyway
from mythos_probe.model.config import LoopedConfig
from mythos_probe.model.variants import count_parameters
from mythos_probe.probes import reductions
from mythos_probe.probes.adapters import ForwardContext, IterationTensors
from mythos_probe.probes.reductions import DEFAULT_PROBES, ForwardReducer, _Forward
from tests.probes.test_reducer_direct import B, D, I, T, V, X, lens_fn, n
from tests.probes import test_trajectory as traj

# Done once at collection for the same reason: the cost model's parameter count (it builds the
# model on the meta device, ~4 s, cached per config) and torch.func's first JVP (the jacobian
# probe's), which every forked mutant would otherwise pay again in each test that reaches them.
count_parameters(LoopedConfig.variant("tiny-gqa"))
torch.func.jvp(lambda v: 2 * v, (torch.ones(2),), (torch.ones(2),))


def log_softmax(z):
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def lens_forward(positions, logits, detail="positions"):
    """One forward with the lens probe only; returns (trace, the reducer, its _Forward before end)."""
    out = []
    W = torch.randn(D, V, generator=torch.Generator().manual_seed(11))
    red = ForwardReducer(("lens",), detail, positions, 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="fixed", cfg=None, lens=lens_fn(W)))
    for t in range(I):
        red.iteration(IterationTensors(state_in=X["h"][t], state_out=X["h"][t + 1]))
    f = red.fwd
    red.end(logits)
    lp = log_softmax(np.stack([n(s) for s in X["h"]])[1:] @ n(W))  # (I, B, T, V) the lens at every position
    return out[0].materialize(), red, f, lp


@pytest.mark.parametrize("kept", [T - 1, 3])  # offset 1 (only position 0 lacks a final) and offset T − 3
def test_lens_with_logits_of_the_last_positions_only(kept):
    off = T - kept
    full = torch.randn(B, T, V, generator=torch.Generator().manual_seed(4))
    positions = sorted({0, off - 1, off, T - 1})  # two before the kept logits, two within them
    tr, red, f, lp = lens_forward(positions, full[:, off:])
    idx = np.array(positions)
    has = idx >= off
    final = log_softmax(n(full))[:, idx]  # (B, P, V), only the entries at `has` are the model's
    lp = lp[:, :, idx]  # (I, B, P, V)
    kl_final = (np.exp(final) * (final - lp)).sum(-1)  # (I, B, P)
    agree = (lp.argmax(-1) == final.argmax(-1)).astype(float)
    ent = -(np.exp(lp) * lp).sum(-1)
    pm = tr.position_metrics
    # positions whose final the model did not return: NaN, never a KL against another position's logits
    assert np.isnan(pm["lens_kl_final"][:, idx[~has]]).all() and np.isnan(pm["lens_top1_agree"][:, idx[~has]]).all()
    np.testing.assert_allclose(pm["lens_kl_final"][:, idx[has]], kl_final[:, :, has].transpose(1, 2, 0),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(pm["lens_top1_agree"][:, idx[has]], agree[:, :, has].transpose(1, 2, 0))
    # what needs no final is there at every sampled position
    np.testing.assert_allclose(pm["lens_entropy"][:, idx], ent.transpose(1, 2, 0), rtol=1e-5)
    np.testing.assert_array_equal(pm["lens_argmax"][:, idx], lp.argmax(-1).transpose(1, 2, 0))
    np.testing.assert_allclose(tr.iteration_metrics["lens_entropy"], ent.mean((1, 2)), rtol=1e-5)

    # the summary itself: the final-dependent columns NaN off the kept logits, the others finite,
    # the argmax (a token id) never averaged into an iteration metric
    iteration, maps = red._lens_summary(f, full[:, off:])
    assert set(iteration) == {"lens_kl_final", "lens_kl_prev", "lens_entropy", "lens_top1_agree", "lens_final_rank"}
    assert set(maps) == {"lens_kl_final", "lens_kl_prev", "lens_entropy", "lens_argmax", "lens_top1_agree"}
    for name in ("lens_kl_final", "lens_top1_agree", "lens_final_rank"):
        assert torch.isnan(iteration[name]).all(), name  # a sampled position has no final to compare with
    rank = (lp > np.take_along_axis(lp, final.argmax(-1)[None, ..., None].repeat(I, 0), -1)).sum(-1)
    # with the kept positions alone sampled, the means are over the positions that have a final
    keep = ForwardReducer(("lens",), "positions", [p for p in positions if p >= off], 1, lambda p: None, {}, "r",
                          "m", lambda: None)
    g = _Forward(ctx=f.ctx, start_ns=0, lens_index=torch.tensor(idx[has]),
                 lens_logp=[x[:, torch.from_numpy(has)] for x in f.lens_logp])
    it_kept, _ = keep._lens_summary(g, full[:, off:])
    np.testing.assert_allclose(n(it_kept["lens_final_rank"]), rank[:, :, has].mean((1, 2)))
    np.testing.assert_allclose(n(it_kept["lens_kl_final"]), kl_final[:, :, has].mean((1, 2)), rtol=1e-4, atol=1e-6)


def test_index_tensors_live_on_the_states_device():
    red = ForwardReducer(("convergence", "lens"), "positions", "last", 1, lambda p: None, {}, "r", "m", lambda: None)
    meta = torch.device("meta")
    for positions, want in (("last", [T - 1]), ("all", list(range(T))), ([1, -1], [1, T - 1])):
        red.lens_positions = positions
        assert red._lens_index(T, meta).device == meta
        assert red._lens_index(T, torch.device("cpu")).tolist() == want


def test_an_aborted_forward_leaves_nothing_behind():
    out = []
    red = ForwardReducer(("convergence",), "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
    assert red.begin(ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="fixed", cfg=None))
    red.iteration(IterationTensors(state_in=X["h"][0], state_out=X["h"][1]))
    red.abort()
    assert red.fwd is None
    red.iteration(IterationTensors(state_in=X["h"][1], state_out=X["h"][2]))  # ignored: no forward open
    red.end(None)
    assert out == []


@pytest.mark.parametrize("n_loops, want_loops", [(0, I), (9, 9)])
def test_the_cost_probe_passes_the_forwards_shape_to_the_cost_model(monkeypatch, n_loops, want_loops):
    calls = []
    monkeypatch.setattr(reductions, "forward_cost",
                        lambda *args: calls.append(args) or {"flops": 3.0, "loop_flops": 2.0})
    cfg = LoopedConfig.variant("tiny-gqa")
    out = []
    red = ForwardReducer(("cost",), "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=X["ids"], n_loops=n_loops, exit_policy="act", cfg=cfg, past_len=5))
    for t in range(I):
        red.iteration(IterationTensors(state_in=X["h"][t], state_out=X["h"][t + 1], halted=X["halted"][t]))
    red.end(None)
    tr = out[0].materialize()
    (args,) = calls
    assert args[:6] == (cfg, B, T, I, want_loops, 5)
    halted = np.stack([n(h) for h in X["halted"]]).astype(bool)
    np.testing.assert_array_equal(args[6], np.where(halted.any(0), halted.argmax(0) + 1, I))
    assert args[6].dtype == np.int64  # counts, as the cost model and a user's cost_fn expect
    assert (tr.forward_metrics["flops"], tr.forward_metrics["loop_flops"]) == (3.0, 2.0)


def test_expert_ones_and_lens_maps_live_on_the_routers_and_logits_device():
    meta = torch.device("meta")
    red = ForwardReducer(("experts", "lens"), "positions", "all", 1, lambda p: None, {}, "r", "m", lambda: None)
    cfg = LoopedConfig.variant("tiny-gqa")
    f = _Forward(ctx=ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="fixed", cfg=cfg), start_ns=0)
    red._experts(f, IterationTensors(state_in=X["h"][0], state_out=X["h"][1],
                                     topk_idx=torch.zeros(6, 2, dtype=torch.long, device=meta)), {})
    assert f.ones.device == meta and f.loads[0].device == meta and f.loads[0].shape == (cfg.n_experts,)
    f.lens_index = torch.arange(T, device=meta)
    f.lens_logp = [torch.zeros(B, T, V, device=meta).log_softmax(-1)] * 2
    iteration, maps = red._lens_summary(f, torch.zeros(B, T, V, device=meta))
    assert {m.device for m in maps.values()} == {meta} and maps["lens_entropy"].shape == (2, B, T)



def test_halting_bookkeeping_lives_on_the_masks_device():
    meta = torch.device("meta")
    red = ForwardReducer(("halting",), "positions", "last", 1, lambda p: None, {}, "r", "m", lambda: None)
    f = _Forward(ctx=ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="act", cfg=None), start_ns=0)
    red._halting(f, IterationTensors(state_in=X["h"][0], state_out=X["h"][1],
                                     halted=torch.zeros(B, T, dtype=torch.bool, device=meta)), 0, {})
    assert f.halt_iter.device == meta and f.halt_iter.dtype == torch.long


def test_a_shared_expert_output_without_a_routed_one_gives_no_ratio():
    out = []
    red = ForwardReducer(("experts",), "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="fixed", cfg=None))
    for t in range(I):
        red.iteration(IterationTensors(state_in=X["h"][t], state_out=X["h"][t + 1], router_logits=X["logits"][t],
                                       topk_idx=X["topk"][t], shared_out=X["shared"][t]))
    red.end(None)
    metrics = out[0].materialize().iteration_metrics
    assert "shared_routed_ratio" not in metrics and "routing_entropy" in metrics


def test_probes_that_run_model_modules_fork_the_rng_of_the_states_device(monkeypatch):
    """On a GPU the CUDA generator of that device is forked (its dropout masks stay the model's);
    on a CPU no CUDA device is touched. fork_rng is recorded, not run: there is no GPU here."""
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices=None, **kw: ("forked", devices))
    cuda = torch.device("cuda", 1)
    assert reductions._rng_untouched(cuda) == ("forked", [cuda])
    assert reductions._rng_untouched(torch.device("cpu")) == ("forked", [])


def test_counts_come_back_as_integers():
    """The packed buffer is float32; expert loads and iterations used are counts, rounded back to int64."""
    out = []
    red = ForwardReducer(("experts", "halting"), "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="act", cfg=None))
    for t in range(I):
        red.iteration(IterationTensors(state_in=X["h"][t], state_out=X["h"][t + 1], halted=X["halted"][t],
                                       router_logits=X["logits"][t], topk_idx=X["topk"][t]))
    red.end(None)
    # the packed buffer's layout: (kind, names, shape) per entry, in packing order
    E = X["logits"][0].shape[-1]
    assert out[0].layout == [
        ("iteration", ("routing_entropy", "bias_changed_share", "topk_overlap", "expert_max_vio", "expert_cv",
                       "expert_load_entropy", "expert_dead", "expert_active_ratio", "exit_count"), (9, I)),
        ("expert_load", ("expert_load",), (I, E)), ("used", ("used",), (B, T)),
        ("forward", ("mean_iterations", "reached_last_share", "halted_first_share"), (3,))]
    tr = out[0].materialize()
    assert tr.expert_load.dtype == np.int64 and tr.position_iterations.dtype == np.int64
    assert tr.iteration_metrics["topk_overlap"].dtype == np.float64


def test_the_request_map_is_cleared_only_past_4096_requests():
    out = []
    red = ForwardReducer(("convergence",), "summary", "last", 1, out.append, {}, "r", "m", lambda: None)

    def forward(cache_id, past=0):
        red.begin(ForwardContext(token_ids=X["ids"], n_loops=1, exit_policy="fixed", cfg=None, cache_id=cache_id,
                                 past_len=past))
        red.iteration(IterationTensors(state_in=X["h"][0], state_out=X["h"][1]))
        red.end(None)

    red.requests.update({-i: ("x" * 32, 1) for i in range(1, 4097)})  # 4096 requests held
    forward(1)
    assert len(red.requests) == 4097  # 4096 is not past the limit: kept, the new one added
    forward(2)
    assert list(red.requests) == [2]  # 4097 is: cleared before the new one


def test_a_forward_on_another_device_is_packed_on_that_device():
    """Every tensor `end` builds (iterations used, exit counts, the packed buffer) lives on the
    states' device; on the "meta" device no default placement can pass for it."""
    meta = torch.device("meta")
    out = []
    # "lens" without a lens to read: its index is built, nothing else of it runs
    red = ForwardReducer(("convergence", "spectral", "lens"), "positions", "all", 1, out.append, {}, "r", "m",
                         lambda: None)
    red.begin(ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="fixed", cfg=None))
    for t in range(I):
        red.iteration(IterationTensors(state_in=X["h"][t].to(meta), state_out=X["h"][t + 1].to(meta)))
        # what the first iteration builds once per forward: there too (a CPU index or NaN would
        # pass through most ops, and cost a copy per iteration on a GPU)
        f = red.fwd
        assert {f.nan.device, f.corr_index.device, f.dist_index.device, f.lens_index.device} == {meta}
    red.end(None)
    (pending,) = out
    assert pending.packed.device == meta
    assert pending.layout == [
        ("iteration", ("rel_residual", "cos_step", "state_norm", "growth_ratio", "step_orthogonality",
                       "token_correlation", "nonfinite_fraction", "dist_to_final", "exit_count"), (9, I)),
        ("position", ("rel_residual",), (I, B, T)), ("position", ("cos_step",), (I, B, T)),
        ("position", ("state_norm",), (I, B, T)), ("used", ("used",), (B, T)),
        ("forward", ("mean_iterations", "reached_last_share"), (2,))]


def test_a_forward_without_iterations_warns_with_the_whole_fix_at_the_callers_line():
    out = []
    red = ForwardReducer(("convergence",), "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="fixed", cfg=None))
    with pytest.warns(UserWarning) as caught:
        red.end(None)
    (warning,) = caught
    assert str(warning.message) == (
        "mythos_probe: a recorded forward ran no loop iteration the probes could see, so it has no trace. If the "
        "looped block is compiled (torch.compile), record with the eager module; with a LoopSpec, check that `step` "
        "names the submodule called every iteration.")
    # the line that ended the forward, not reductions.py (under mutmut too: tests/conftest.py)
    assert warning.filename == __file__
    assert out == []


def test_rows_sharing_their_names_are_one_stacked_table():
    """The common case (every iteration has the same metrics) is one stack: the columns are views
    of one (I, S) table, not a stack per name."""
    rows = [(("a", "b", "c"), torch.tensor([1.0, 2.0, 3.0])), (("a", "b", "c"), torch.tensor([4.0, 5.0, 6.0]))]
    got = reductions._columns(rows)
    assert {k: v.tolist() for k, v in got.items()} == {"a": [1.0, 4.0], "b": [2.0, 5.0], "c": [3.0, 6.0]}
    storage = {v.untyped_storage().data_ptr() for v in got.values()}
    assert len(storage) == 1 and got["b"].storage_offset() == 1


def test_iterations_used_that_the_adapter_knows_override_the_halting_bookkeeping():
    """A model that reports its own per-position depths (its exits, Ouro's or HRM's per-token
    counts) gives `used` to `end`, as float or int, on its own device: that, not the halting masks,
    is each position's iteration count, and the counts and shares are of it."""
    from tests.probes.test_reducer_direct import used_of

    depths = torch.randint(1, I + 1, (B, T), generator=torch.Generator().manual_seed(8))
    want = depths.numpy()
    assert not np.array_equal(want, used_of(X)) and (want == I).any() and (want < I).any()
    out = []
    red = ForwardReducer(("halting",), "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="fixed", cfg=None))
    for t in range(I):
        red.iteration(IterationTensors(state_in=X["h"][t], state_out=X["h"][t + 1], halted=X["halted"][t]))
    red.end(None, used=depths.float())  # a float count: kept as integers
    tr = out[0].materialize()
    np.testing.assert_array_equal(tr.position_iterations, want)
    np.testing.assert_array_equal(tr.iteration_metrics["exit_count"], np.bincount(want.ravel() - 1, minlength=I))
    assert tr.forward_metrics["mean_iterations"] == pytest.approx(want.mean())
    assert tr.forward_metrics["reached_last_share"] == pytest.approx((want == I).mean())
    # on another device than the states: moved to theirs (the meta device: no default placement passes)
    meta = torch.device("meta")
    red.begin(ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="fixed", cfg=None))
    for t in range(I):
        red.iteration(IterationTensors(state_in=X["h"][t].to(meta), state_out=X["h"][t + 1].to(meta)))
    red.end(None, used=depths)
    assert out[1].packed.device == meta and ("used", ("used",), (B, T)) in out[1].layout


# -- the trajectory probe on inputs tests/probes/test_trajectory.py does not build: a model that
# updates its state tensor in place (the probe must keep a copy of each state), a loop whose
# state-sized bookkeeping must be gone once its last iteration is seen (before the coda runs),
# a loop that ends before n_loops, bfloat16 states. Expected values: numpy PCAs of the states.


def pcs(trace) -> tuple[np.ndarray, np.ndarray]:
    got = np.stack([trace.position_metrics[f"traj_pc{j}"] for j in (1, 2, 3)], -1)  # (B, T, I, 3)
    share = np.stack([trace.position_metrics[f"traj_pc{j}_share"] for j in (1, 2, 3)], -1)
    return got, share


def test_a_state_the_model_rewrites_in_place_is_copied_each_iteration():
    """One state tensor, overwritten by every iteration (as a model that runs `h.copy_(...)` or
    `h.add_(...)` does): the probe must have kept each iteration's values."""
    out = []
    red = ForwardReducer(("trajectory",), "positions", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=torch.zeros(traj.B, traj.T, dtype=torch.long), n_loops=traj.I,
                             exit_policy="fixed", cfg=None))
    h = torch.tensor(traj.H[0], dtype=torch.float32)
    for i in range(traj.I):
        before = h.clone()
        h.copy_(torch.tensor(traj.H[i + 1], dtype=torch.float32))  # the model's own tensor, rewritten
        red.iteration(IterationTensors(state_in=before, state_out=h))
    h.zero_()  # and once more after the loop, before the trace is built
    red.end(None)
    tr = out[0].materialize()
    got, share = pcs(tr)
    for b, p in ((0, 0), (0, 1), (0, 2), (1, 3)):
        want, want_share = traj.numpy_pca(traj.H[1:, b, p])
        for j in range(3):
            sign = 1.0 if got[b, p, :, j] @ want[:, j] >= 0 else -1.0
            np.testing.assert_allclose(got[b, p, :, j], sign * want[:, j], atol=2e-5 * np.abs(want).max())
        np.testing.assert_allclose(share[b, p, 0], want_share, atol=1e-5)
    for b in range(traj.B):
        for p in range(traj.T):
            np.testing.assert_array_equal(tr.position_metrics["traj_fixed"][b, p], traj.numpy_fixed(traj.H, b, p))


def test_the_loops_states_are_released_at_its_last_iteration():
    """At the n_loops-th iteration every state-sized tensor the probes hold is dropped (the coda and
    head, where a forward peaks in memory, run next); the trace built afterwards is unchanged."""
    out = []
    probes = (*DEFAULT_PROBES, "trajectory")
    red = ForwardReducer(probes, "positions", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=torch.zeros(traj.B, traj.T, dtype=torch.long), n_loops=traj.I,
                             exit_policy="fixed", cfg=None))
    states = torch.tensor(traj.H, dtype=torch.float32)
    for i in range(traj.I):
        red.iteration(IterationTensors(state_in=states[i], state_out=states[i + 1]))
        f = red.fwd
        if i < traj.I - 1:
            assert len(f.traj_states) == len(f.traj_steps) == len(f.trail) == i + 1 and f.prev is not None
    assert (f.traj_states, f.traj_steps, f.trail) == ([], [], [])
    assert (f.final, f.prev, f.prev_delta, f.prev_topk) == (None, None, None, None)
    assert f.traj_gram is not None and f.traj_fixed.shape == (traj.I, traj.B, traj.T) and f.dist.shape == (traj.I,)
    red.end(None)
    tr = out[0].materialize()
    got, share = pcs(tr)
    want, want_share = traj.numpy_pca(traj.H[1:, 0, 1])  # the orbit: two directions
    np.testing.assert_allclose(np.abs(got[0, 1, :, :2]), np.abs(want[:, :2]), atol=2e-5 * np.abs(want).max())
    np.testing.assert_allclose(share[0, 1, 0], want_share, atol=1e-5)
    assert tr.iteration_metrics["dist_to_final"][-1] == 0.0


def test_a_loop_that_ends_before_n_loops_is_reduced_when_the_forward_ends():
    """An exit policy stopped the loop before n_loops: no iteration was the last, so the states are
    reduced at `end`, over the iterations that ran."""
    out = []
    red = ForwardReducer(("trajectory",), "positions", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=torch.zeros(traj.B, traj.T, dtype=torch.long), n_loops=traj.I + 5,
                             exit_policy="kl", cfg=None))
    states = torch.tensor(traj.H, dtype=torch.float32)
    for i in range(traj.I):
        red.iteration(IterationTensors(state_in=states[i], state_out=states[i + 1]))
    assert len(red.fwd.traj_states) == traj.I and red.fwd.traj_gram is None
    red.end(None)
    tr = out[0].materialize()
    assert (tr.iterations, tr.n_loops) == (traj.I, traj.I + 5)
    got, share = pcs(tr)
    want, want_share = traj.numpy_pca(traj.H[1:, 0, 0])
    sign = 1.0 if got[0, 0, :, 0] @ want[:, 0] >= 0 else -1.0
    np.testing.assert_allclose(got[0, 0, :, 0], sign * want[:, 0], atol=2e-5 * np.abs(want).max())
    np.testing.assert_array_equal(tr.position_metrics["traj_fixed"][0, 2], traj.numpy_fixed(traj.H, 0, 2))


def test_bfloat16_rounding_of_a_straight_path_is_no_second_direction():
    """States held in bfloat16 (the model's dtype, not float32) are known to 2⁻⁸ of their size: a
    straight slide, once rounded, wobbles off its line by that much, and the probe must read the
    wobble as rounding (one direction, share 1) by the bfloat16 floor. The fixture shows the
    property: the wobble's singular value is far above float32's floor and below bfloat16's."""
    g = torch.Generator().manual_seed(3)
    c, v = 10 * torch.randn(8, generator=g), torch.randn(8, generator=g)
    n = 6
    h = torch.stack([c + t * v for t in range(n + 1)])[:, None, None].to(torch.bfloat16)  # (n + 1, 1, 1, D)
    out = []
    red = ForwardReducer(("trajectory",), "positions", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=torch.zeros(1, 1, dtype=torch.long), n_loops=n, exit_policy="fixed", cfg=None))
    for i in range(n):
        red.iteration(IterationTensors(state_in=h[i], state_out=h[i + 1]))
    red.end(None)
    tr = out[0].materialize()
    x = h[1:, 0, 0].double().numpy()
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    frobenius = np.linalg.norm(x)
    assert 4 * 2**-24 * frobenius < s[1] <= 4 * 2**-8 * frobenius  # rounding, by bfloat16's measure only
    assert tr.position_metrics["traj_pc1_share"][0, 0].tolist() == [1.0] * n
    for j in (2, 3):
        assert (tr.position_metrics[f"traj_pc{j}"][0, 0] == 0).all()
        assert (tr.position_metrics[f"traj_pc{j}_share"][0, 0] == 0).all()
    want, _ = traj.numpy_pca(x)
    np.testing.assert_allclose(np.abs(tr.position_metrics["traj_pc1"][0, 0]), np.abs(want[:, 0]), rtol=1e-3)


def test_per_row_budgets_are_recorded_row_by_row():
    """A forward run with one `LoopBudget` per row records each row's limits and reason, in row
    order (the rows' values all differ, so a swapped or dropped field shows); none: no budget fields."""
    from mythos_probe.model.budgets import LoopBudget

    budgets = (LoopBudget(max_loops=4, min_loops=2, exit_threshold=0.01, reason="paid"),
               LoopBudget(max_loops=3, min_loops=1, exit_threshold=0.5, reason="free tier"))
    out = []
    red = ForwardReducer(("convergence",), "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
    for ctx_budgets in (budgets, None):
        red.begin(ForwardContext(token_ids=X["ids"], n_loops=4, exit_policy="kl", cfg=None, budgets=ctx_budgets))
        for t in range(3):
            red.iteration(IterationTensors(state_in=X["h"][t], state_out=X["h"][t + 1]))
        red.end(None)
    with_budgets, without = (p.materialize() for p in out)
    assert with_budgets.row_max_loops.tolist() == [4, 3] and with_budgets.row_min_loops.tolist() == [2, 1]
    assert with_budgets.row_exit_threshold.tolist() == [0.01, 0.5]
    assert with_budgets.row_budget_reason == ("paid", "free tier")
    assert (without.row_max_loops, without.row_min_loops, without.row_exit_threshold,
            without.row_budget_reason) == (None, None, None, None)


def test_a_trajectory_longer_than_n_loops_is_not_packed_and_the_record_refuses_it():
    """A loop that ran past its n_loops (6 of 4): the trajectory reduced at the 4th iteration does
    not describe the forward, so the pending trace carries neither its Gram matrices nor its fixed
    points, and the record refuses the forward naming both counts."""
    from mythos_probe.records import InvalidRecord

    out = []
    red = ForwardReducer(("trajectory",), "positions", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=torch.zeros(traj.B, traj.T, dtype=torch.long), n_loops=4,
                             exit_policy="fixed", cfg=None))
    states = torch.tensor(traj.H, dtype=torch.float32)
    for i in range(6):
        red.iteration(IterationTensors(state_in=states[i], state_out=states[i + 1]))
    red.end(None)
    (pending,) = out
    assert pending.trajectory is None and [kind for kind, _, _ in pending.layout] == ["iteration", "used", "forward"]
    with pytest.raises(InvalidRecord, match=r"iterations = 6 is more than n_loops = 4"):
        pending.materialize()


def test_the_injection_norm_needs_the_spectral_probe_b_and_e():
    """mean ‖B⊙e‖ is recorded with the spectral probe when the adapter gave both B and e; B
    without e (a model whose e the adapter did not see) records none rather than failing, and
    without the spectral probe there is none either."""
    def forward(probes, e, Bv):
        out = []
        red = ForwardReducer(probes, "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
        red.begin(ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="fixed", cfg=None, injection_B=Bv))
        if e is not None:
            red.encoded(e)
        for t in range(I):
            red.iteration(IterationTensors(state_in=X["h"][t], state_out=X["h"][t + 1]))
        red.end(None)
        return out[0].materialize().iteration_metrics

    want = np.linalg.norm(n(X["Bv"]) * n(X["e"]), axis=-1).mean()
    np.testing.assert_allclose(forward(("spectral",), X["e"], X["Bv"])["norm_inject"], np.full(I, want), rtol=1e-5)
    assert "norm_inject" not in forward(("spectral",), None, X["Bv"])
    assert "norm_inject" not in forward(("spectral",), X["e"], None)
    assert "norm_inject" not in forward(("convergence",), X["e"], X["Bv"])


def test_the_norm_of_the_state_entering_an_iteration_is_the_last_iterations(monkeypatch):
    """The state entering iteration t is the one that left t − 1: its norm is reused, each state
    normed once per forward (a state-sized reduction saved per iteration); a state the model
    changed in between (another tensor) is normed again, and the metrics stay exact."""
    normed = []
    real = torch.linalg.vector_norm

    def spy(x, *args, **kwargs):
        normed.append(x.data_ptr())
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "vector_norm", spy)
    states = torch.stack(X["h"])  # (I + 1, B, T, D): state_in at t is state_out of t − 1, the same memory
    out = []
    red = ForwardReducer(("convergence", "spectral"), "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="fixed", cfg=None))
    for t in range(I):
        red.iteration(IterationTensors(state_in=states[t], state_out=states[t + 1]))
    red.end(None)
    assert [normed.count(states[t].data_ptr()) for t in range(I + 1)] == [1] * (I + 1)
    # a state changed between iterations: a copy, so its own norm (growth_ratio = ‖h_t‖ / ‖h_{t−1}‖)
    normed.clear()
    red.begin(ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="fixed", cfg=None))
    for t in range(I):
        red.iteration(IterationTensors(state_in=states[t] * 2 if t else states[t], state_out=states[t + 1]))
    red.end(None)
    h = n(states)
    nh = np.linalg.norm(h, axis=-1)
    entering = np.concatenate([nh[:1], 2 * nh[1:-1]])
    np.testing.assert_allclose(out[1].materialize().iteration_metrics["growth_ratio"],
                               (nh[1:] / entering).mean((1, 2)), rtol=1e-5)


def test_begin_says_which_forwards_are_sampled():
    """sample_every=3: forwards 0, 3, 6 are recorded; `begin` says so (the adapter skips its hooks'
    work on the others) and opens a forward only for those."""
    red = ForwardReducer(("convergence",), "summary", "last", 3, lambda p: None, {}, "r", "m", lambda: None)
    opened = []
    for _ in range(7):
        opened.append(red.begin(ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="fixed", cfg=None)))
        assert (red.fwd is not None) == opened[-1]
        red.abort()
    assert opened == [True, False, False, True, False, False, True] and red.forwards_seen == 7


def test_an_injection_that_changes_per_iteration_is_normed_per_iteration():
    """A LoopSpec's e may change between iterations (HRM's z_H between L cycles): the adapter gives
    it per iteration, norm_inject is then mean ‖e_t‖ of that iteration, and the jacobian probe's
    step takes that e (its first row), not the prelude's."""
    g = torch.Generator().manual_seed(12)
    injections = [(t + 1) * torch.randn(B, T, D, generator=g) for t in range(I)]
    seen = []

    def step_fn(e, t):
        seen.append((t, e))
        return lambda h: h + e

    out = []
    red = ForwardReducer(("spectral", "jacobian"), "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="fixed", cfg=None, step_fn=step_fn))
    red.encoded(X["e"])  # the prelude's e, which the per-iteration one replaces
    for t in range(I):
        red.iteration(IterationTensors(state_in=X["h"][t], state_out=X["h"][t + 1], injection=injections[t].double()))
    red.end(None)
    metrics = out[0].materialize().iteration_metrics
    want = [np.linalg.norm(n(e), axis=-1).mean() for e in injections]
    assert len(set(np.round(want, 3))) == I  # the fixture's e differs per iteration
    np.testing.assert_allclose(metrics["norm_inject"], want, rtol=1e-6)
    assert [t for t, _ in seen] == list(range(I))
    for (t, e), inj in zip(seen, injections):
        assert torch.equal(e, inj.double()[:1])
    np.testing.assert_allclose(metrics["jacobian_sigma_max"], np.ones(I), rtol=1e-4)  # ∂(h + e)/∂h = 1


def test_the_trajectory_probe_reuses_the_convergence_step(monkeypatch):
    """With the convergence probe on, the trajectory's relative steps are its rel_residual (no
    second ‖h_t − h_{t−1}‖ of the state); alone, the probe computes them itself."""
    calls = []
    real = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda *a, **k: calls.append(1) or real(*a, **k))

    def norms(probes):
        calls.clear()
        out = []
        red = ForwardReducer(probes, "positions", "last", 1, out.append, {}, "r", "m", lambda: None)
        red.begin(ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="fixed", cfg=None))
        for t in range(I):
            red.iteration(IterationTensors(state_in=X["h"][t], state_out=X["h"][t + 1]))
        red.end(None)
        return len(calls), out[0].materialize()

    convergence_only, _ = norms(("convergence",))
    with_trajectory, both = norms(("convergence", "trajectory"))
    assert with_trajectory == convergence_only
    _, alone = norms(("trajectory",))
    np.testing.assert_array_equal(alone.position_metrics["traj_fixed"], both.position_metrics["traj_fixed"])


def test_the_spectral_probe_alone_records_the_block_norm():
    """norm_block belongs to the spectral probe (the lora probe is off here): ‖block‖, or
    ‖block + lora‖ when the adapter gives a LoRA delta; no lora_rel_norm without its probe."""
    block = [n(b) for b in X["block"]]
    for lora in (False, True):
        out = []
        red = ForwardReducer(("spectral",), "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
        red.begin(ForwardContext(token_ids=X["ids"], n_loops=I, exit_policy="fixed", cfg=None))
        for t in range(I):
            red.iteration(IterationTensors(state_in=X["h"][t], state_out=X["h"][t + 1], block_out=X["block"][t],
                                           lora_delta=X["lora"][t] if lora else None))
        red.end(None)
        metrics = out[0].materialize().iteration_metrics
        want = [np.linalg.norm(b + (n(X["lora"][t]) if lora else 0), axis=-1).mean() for t, b in enumerate(block)]
        np.testing.assert_allclose(metrics["norm_block"], want, rtol=1e-5)
        assert "lora_rel_norm" not in metrics


def test_the_reducer_itself_refuses_a_trajectory_without_positions_and_starts_idle():
    with pytest.raises(ValueError) as caught:
        ForwardReducer(("convergence", "trajectory"), "summary", "last", 1, lambda p: None, {}, "r", "m", lambda: None)
    assert str(caught.value) == ("the trajectory probe records a path per position: attach(model, "
                                 "probes=[*DEFAULT_PROBES, 'trajectory'], detail='positions')")
    out = []
    red = ForwardReducer(("convergence",), "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
    assert red.fwd is None
    red.encoded(X["e"])  # events before any forward began: nothing to record
    red.iteration(IterationTensors(state_in=X["h"][0], state_out=X["h"][1]))
    red.end(None)
    assert out == [] and red.fwd is None


def test_the_jacobian_probe_differentiates_the_first_row_only():
    """σ_max of the step at the first batch row: rows whose Jacobians differ (tanh saturated in row
    0, linear around 0 in row 1) tell the row apart. By hand: the step h ↦ tanh(h) M + e has the
    block ∂y_p/∂h_p = diag(sech²(h_p)) M per position; with every entry of row 0 at 2, σ_max is
    sech²(2) · σ_max(M) = 3 sech²(2)."""
    M = torch.diag(torch.tensor([3.0, 0.3, 0.2, 0.1, 0.1, 0.05]))
    h = torch.zeros(B, T, D)
    h[0] = 2.0

    def step_fn(e, t):
        return lambda x: torch.tanh(x) @ M + e

    out = []
    red = ForwardReducer(("jacobian",), "summary", "last", 1, out.append, {}, "r", "m", lambda: None)
    red.begin(ForwardContext(token_ids=X["ids"], n_loops=1, exit_policy="fixed", cfg=None, step_fn=step_fn))
    red.encoded(X["e"])
    red.iteration(IterationTensors(state_in=h, state_out=h))
    red.end(None)
    sech2 = 1 / np.cosh(2.0) ** 2
    np.testing.assert_allclose(out[0].materialize().iteration_metrics["jacobian_sigma_max"], [3 * sech2], rtol=1e-3)
