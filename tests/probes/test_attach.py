"""attach(): hooks removed on exit and on exceptions, nesting, sampling, training mode with
bit-identical gradients, attributes, LoopSpec models and clear errors for everything else."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import mythos_probe
from mythos_probe import Halting, Injection, LoopSpec
from mythos_probe.model import LoopedConfig, LoopedTransformer


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval()


ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))


def test_one_trace_per_forward_and_hooks_gone_after_the_block(model):
    before = hook_count(model)
    with mythos_probe.attach(model, attributes={"endpoint": "/chat", "user": "ana", "priority": 2}) as rec:
        assert hook_count(model) > before
        model(ids, n_loops=3, exit="fixed")
        model(ids[:1], n_loops=2, exit="fixed")
    assert hook_count(model) == before
    assert [(t.iterations, t.batch) for t in rec.traces] == [(3, 2), (2, 1)]
    assert all(t.attributes == {"endpoint": "/chat", "user": "ana", "priority": 2} for t in rec.traces)
    assert rec.traces[0].trace_id != rec.traces[1].trace_id
    assert [t.step for t in rec.traces] == [0, 1]
    model(ids)  # no longer recorded
    assert len(rec.traces) == 2


def test_hooks_removed_when_the_block_raises(model):
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="inside"):
        with mythos_probe.attach(model) as rec:
            model(ids, n_loops=2)
            raise RuntimeError("inside")
    assert hook_count(model) == before
    assert len(rec.traces) == 1  # what was recorded before the error is kept


def test_a_forward_that_raises_leaves_no_half_trace(model):
    with mythos_probe.attach(model) as rec:
        with pytest.raises(ValueError):
            model(ids, n_loops=0)
        with pytest.raises(RuntimeError):  # a KV cache of the wrong shape
            model(ids, n_loops=2, start_pos=0, kv_cache={"recurrent_loop_0": {"k": torch.zeros(5, 1, 1, 1)}})
        model(ids, n_loops=2)
    assert len(rec.traces) == 1 and rec.traces[0].iterations <= 2


def test_attaching_twice_gives_two_independent_recorders(model):
    with mythos_probe.attach(model, detail="positions") as outer:
        with mythos_probe.attach(model) as inner:
            model(ids, n_loops=3)
        model(ids, n_loops=3)
    assert len(inner.traces) == 1 and len(outer.traces) == 2
    np.testing.assert_array_equal(inner.traces[0].iteration_metrics["rel_residual"],
                                  outer.traces[0].iteration_metrics["rel_residual"])


def test_sampling_records_one_forward_in_n(model):
    with mythos_probe.attach(model, sample_every=3) as rec:
        for _ in range(7):
            model(ids, n_loops=2)
    assert [t.step for t in rec.traces] == [0, 3, 6]


def test_training_records_the_optimizer_step_and_leaves_gradients_bit_identical():
    def run(with_probes: bool):
        torch.manual_seed(0)
        m = LoopedTransformer(LoopedConfig.variant("tiny-mla").replace(dropout=0.1)).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        grads = []
        ctx = mythos_probe.attach(m, probes=["convergence", "halting", "experts", "lens", "spectral", "lora"],
                                  optimizer=opt) if with_probes else None
        rec = ctx.__enter__() if ctx else None
        try:
            for _ in range(2):
                opt.zero_grad()
                loss = m(ids, n_loops=3).logsumexp(-1).mean()
                loss.backward()
                grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
                opt.step()
        finally:
            if ctx:
                ctx.__exit__(None, None, None)
        return grads, rec

    plain, _ = run(False)
    probed, rec = run(True)
    for a, b in zip(plain, probed):
        assert len(a) == len(b)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert [t.step for t in rec.traces] == [0, 1]


def test_bad_arguments_are_refused_with_the_fix(model):
    with pytest.raises(ValueError, match="unknown probes"):
        mythos_probe.attach(model, probes=["convergance"]).__enter__()
    with pytest.raises(ValueError, match="detail must be one of"):
        mythos_probe.attach(model, detail="everything").__enter__()
    with pytest.raises(ValueError, match="sample_every"):
        mythos_probe.attach(model, sample_every=0).__enter__()
    with pytest.raises(TypeError, match="attribute 'user'"):
        mythos_probe.attach(model, attributes={"user": ["a"]}).__enter__()
    with pytest.raises(ValueError, match="lens_positions"):
        mythos_probe.attach(model, lens_positions="middle").__enter__()
    with pytest.raises(ValueError, match="frame kind"):
        with mythos_probe.attach(model) as rec:
            pass
        rec.frame("layers")


class TinyLoop(nn.Module):
    """A user's own looped model: embed → (h = tanh(W h + e)) × n → readout, with a halting head."""

    def __init__(self, vocab=50, dim=16, loops=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.inject = nn.Linear(dim, dim)
        self.cell = nn.Linear(dim, dim)
        self.halt = nn.Linear(dim, 1)
        self.out = nn.Linear(dim, vocab)
        self.loops = loops

    def step(self, h, e):
        return torch.tanh(self.cell(h) + e)

    def forward(self, input_ids):
        e = self.inject(self.embed(input_ids))
        h = torch.zeros_like(e)
        for _ in range(self.loops):
            h = self.stepper(h, e)
            torch.sigmoid(self.halt(h)).squeeze(-1)
        return self.out(h)


class Stepper(nn.Module):
    def __init__(self, parent):
        super().__init__()
        self.cell = parent.cell

    def forward(self, h, e):
        return torch.tanh(self.cell(h) + e)


def make_user_model():
    torch.manual_seed(0)
    m = TinyLoop()
    m.stepper = Stepper(m)
    return m


def test_loopspec_model_gets_the_same_convergence_metrics():
    m = make_user_model()
    x = torch.randint(0, 50, (2, 6))
    spec = LoopSpec(step="stepper", injection=Injection("argument", arg=1), halting=Halting("halt", output="logit"),
                    readout=lambda model, h: model.out(h))
    with mythos_probe.attach(m, spec=spec, probes=["convergence", "halting", "lens", "spectral"]) as rec:
        logits = m(x)
    t = rec.traces[0]
    assert t.iterations == 5
    # independent recomputation of the loop
    e = m.inject(m.embed(x)).detach()
    h = torch.zeros_like(e)
    rel, cum = [], torch.zeros(2, 6)
    for _ in range(5):
        nh = torch.tanh(m.cell(h) + e).detach()
        rel.append(((nh - h).norm(dim=-1) / nh.norm(dim=-1)).mean().item())
        cum = cum + torch.sigmoid(m.halt(nh)).squeeze(-1).detach() * (cum < 0.99)
        h = nh
    np.testing.assert_allclose(t.iteration_metrics["rel_residual"], rel, rtol=1e-5)
    assert t.iteration_metrics["lens_kl_final"][-1] == pytest.approx(0, abs=1e-6)  # last state is the output
    np.testing.assert_allclose(t.iteration_metrics["norm_inject"], e.norm(dim=-1).mean().item(), rtol=1e-5)
    assert logits.shape == (2, 6, 50)


def test_a_model_without_a_known_loop_gets_told_what_to_declare():
    with pytest.raises(TypeError, match=r"spec=LoopSpec\(step="):
        mythos_probe.attach(nn.Linear(3, 3)).__enter__()
    with pytest.raises(ValueError, match=r"LoopSpec.step: .*no submodule 'blocks.0'"):
        mythos_probe.attach(make_user_model(), spec=LoopSpec(step="blocks.0")).__enter__()


@pytest.mark.parametrize("option, value", [("run_id", 123), ("run_id", ""), ("model_id", 7), ("kind", "canary"),
                                           ("attributes", {"user": None}), ("detail", None)])
def test_options_are_checked_by_the_records_own_validation_naming_them(model, option, value):
    from mythos_probe.records import InvalidRecord

    with pytest.raises(InvalidRecord, match=option if option != "attributes" else "attribute 'user'"):
        mythos_probe.attach(model, **{option: value}).__enter__()


def test_a_streaming_recorder_keeps_only_the_last_traces(model, monkeypatch):
    from mythos_probe.probes import recorder as recorder_module

    streamed = []
    with mythos_probe.attach(model, on_trace=[streamed.append], keep=2) as rec:
        for _ in range(5):
            model(ids)
    assert [t.span_id for t in rec.traces] == [t.span_id for t in streamed[-2:]]
    assert (len(streamed), rec.discarded_traces) == (5, 3)
    monkeypatch.setattr(recorder_module, "STREAMING_KEEP", 3)  # the default bound while on_trace streams
    with mythos_probe.attach(model, on_trace=[streamed.append]) as rec:
        for _ in range(4):
            model(ids)
    assert (len(rec.traces), rec.discarded_traces, len(streamed)) == (3, 1, 9)
    with mythos_probe.attach(model) as rec:  # nothing streams them: every trace is kept
        for _ in range(4):
            model(ids)
    assert (len(rec.traces), rec.discarded_traces) == (4, 0)
    with pytest.raises(ValueError, match="keep must be"):
        mythos_probe.attach(model, keep=-1).__enter__()
