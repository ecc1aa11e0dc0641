"""transformers' `Inkling2LoopForCausalLM` (tiny random init) under `attach(model)` with no spec: one
pass is the loop layers; every pass restarts from the pre-loop state and the previous pass enters
through messages. Metrics are compared with the passes' true end states (the last loop layer's
outputs, read by a plain forward with hooks), expert loads with the indices each router chose
(sigmoid scores plus its correction bias), the lens with the model's own norm, head and softcap."""

import numpy as np
import pytest
import torch

import mythos_probe
from tests.probes.looped_models import Capture, assert_matches, no_hooks, reference

transformers = pytest.importorskip("transformers")

START, END, PASSES, E, K = 2, 4, 3, 4, 2


@pytest.fixture(scope="module")
def inkling():
    cfg = transformers.Inkling2LoopTextConfig(
        vocab_size=64, unpadded_vocab_size=64, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, swa_num_attention_heads=2, swa_num_key_value_heads=1, swa_head_dim=16,
        sliding_window_size=8, d_rel=4, rel_extent=8, moe_intermediate_size=16, n_routed_experts=E,
        num_experts_per_tok=K, n_layers_per_attn_res_block=2, loop_layer_index_start=START,
        loop_layer_index_end=END, loop_num_passes=PASSES, loop_gate_rank=8, max_position_embeddings=64,
        eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.Inkling2LoopForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # a bias large enough to change choices
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.2)
    return model


ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def test_passes_experts_and_lens_match_the_model(inkling):
    layers = inkling.model.layers
    routers = {f"r{i}": layers[i].mlp.gate for i in range(START, END)}
    with torch.no_grad(), Capture(first=layers[START], last=layers[END - 1], **routers) as cap:
        logits = inkling(ids).logits
    with torch.no_grad(), mythos_probe.attach(inkling, probes=["convergence", "spectral", "experts", "lens"],
                                              lens_positions="all") as rec:
        inkling(ids)
    (trace,) = rec.traces
    assert trace.iterations == PASSES and trace.loop_name == "loop"
    ends, h0 = cap.outputs["last"], cap.inputs["first"][0][0]
    assert_matches(trace, reference(ends, h0))
    np.testing.assert_allclose(trace.iteration_metrics["norm_inject"], h0.norm(dim=-1).mean().item(), rtol=1e-5)

    # experts: the indices every loop-layer router returned, pass by pass
    load = np.zeros((PASSES, E), dtype=np.int64)
    entropy, changed = np.zeros(PASSES), np.zeros(PASSES)
    for t in range(PASSES):
        logits_t = torch.cat([cap.outputs[k][t][0] for k in routers])
        chosen = torch.cat([cap.outputs[k][t][2] for k in routers])
        load[t] = np.bincount(chosen.reshape(-1).numpy(), minlength=E)
        q = torch.sigmoid(logits_t)
        q = q / q.sum(-1, keepdim=True)
        entropy[t] = -(q * q.log()).sum(-1).mean().item()
        unbiased = logits_t.topk(K, dim=-1).indices
        changed[t] = np.mean([[c not in u for c in row] for row, u in zip(chosen.tolist(), unbiased.tolist())])
    np.testing.assert_array_equal(trace.expert_load, load)
    assert load.sum() == PASSES * (END - START) * ids.numel() * K
    np.testing.assert_allclose(trace.iteration_metrics["routing_entropy"], entropy, rtol=1e-5)
    np.testing.assert_allclose(trace.iteration_metrics["bias_changed_share"], changed, atol=1e-6)
    assert changed.max() > 0  # the bias mattered, so a softmax/no-bias reading would differ

    # lens: norm → head → softcap of each pass's end state, against the model's final distribution
    final = logits.float().log_softmax(-1)
    for t, h in enumerate(ends):
        lens = inkling.logit_softcap(inkling.lm_head(inkling.model.norm(h)).float()).log_softmax(-1)
        assert trace.iteration_metrics["lens_entropy"][t] == pytest.approx(
            -(lens.exp() * lens).sum(-1).mean().item(), abs=1e-5)
        assert trace.iteration_metrics["lens_kl_final"][t] == pytest.approx(
            (final.exp() * (final - lens)).sum(-1).mean().item(), abs=1e-5)
    assert no_hooks(inkling)
