"""bfloat16: `model.to(torch.bfloat16)` and CPU autocast run every exit policy (RoPE tables stay
complex, the ACT sums stay float32, the MoE scatter takes the experts' dtype), the logits stay
near the float32 model's, and the probes record finite metrics on the bf16 model."""

import numpy as np
import pytest
import torch

import mythos_probe
from mythos_probe.probes.reductions import PROBES
from mythos_probe.model import LoopedConfig, LoopedTransformer

ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
RUNS = [dict(exit="fixed"), dict(exit="act"), dict(exit="latent", exit_threshold=0.2), dict(exit="kl", exit_threshold=1e-3)]


def close_to_float32(got: torch.Tensor, want: torch.Tensor) -> None:
    # bf16 keeps 8 mantissa bits: about 1 % of the logits' scale after a few loops
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 0.03 * want.abs().max()


@pytest.fixture(scope="module", params=["tiny-gqa", "tiny-mla"])
def models(request):
    torch.manual_seed(0)
    m32 = LoopedTransformer(LoopedConfig.variant(request.param)).eval()
    m16 = LoopedTransformer(LoopedConfig.variant(request.param)).eval()
    m16.load_state_dict(m32.state_dict())
    return m32, m16.to(torch.bfloat16)


def test_to_bfloat16_keeps_the_rope_tables_complex(models):
    _, m16 = models
    assert m16.embed.weight.dtype == torch.bfloat16
    assert m16.freqs_cis.dtype == m16.freqs_cis_mla.dtype == torch.complex64
    fresh = LoopedTransformer(m16.cfg)
    torch.testing.assert_close(m16.freqs_cis, fresh.freqs_cis)


@pytest.mark.parametrize("run", RUNS, ids=[r["exit"] for r in RUNS])
def test_bf16_model_and_autocast_stay_near_float32(models, run):
    m32, m16 = models
    with torch.no_grad():
        want = m32(ids, n_loops=4, exit="fixed")
        close_to_float32(m16(ids, n_loops=4, exit="fixed"), want)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            close_to_float32(m32(ids, n_loops=4, exit="fixed"), want)
            assert m32(ids, n_loops=4, **run).dtype == torch.bfloat16
        assert torch.isfinite(m16(ids, n_loops=4, **run).float()).all()


def test_probes_record_finite_metrics_on_a_bf16_model():
    torch.manual_seed(0)
    m16 = LoopedTransformer(LoopedConfig.variant("tiny-gqa")).eval().to(torch.bfloat16)
    probes = [p for p in PROBES if p != "jacobian"]  # opt-in, and seconds of bf16 autograd on a CPU
    with torch.no_grad(), mythos_probe.attach(m16, probes=probes, detail="positions", lens_positions="all") as rec:
        m16(ids, n_loops=3, exit="fixed")
        m16(ids, n_loops=3, exit="kl", exit_threshold=1e-3)
    assert len(rec.traces) == 2
    for trace in rec.traces:
        for name in ("rel_residual", "state_norm", "cum_halt", "expert_cv", "lens_kl_final", "lora_rel_norm"):
            assert np.isfinite(trace.iteration_metrics[name]).all(), name
        assert np.isfinite(trace.forward_metrics["flops"])
