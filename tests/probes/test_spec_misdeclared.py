"""A wrong `LoopSpec` is an error (or, where nothing wrong was recorded, a warning) at the first
forward, naming the field to fix; never a trace of wrong numbers. Hooks are gone afterwards."""

import dataclasses

import pytest
import torch
from torch import nn

import mythos_probe
from mythos_probe import Halting, Injection, LoopSpec, Router
from mythos_probe.presets import find
from tests.probes.looped_models import OuroForCausalLM, no_hooks

transformers = pytest.importorskip("transformers")
ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ouro():
    torch.manual_seed(0)
    model = OuroForCausalLM(total_ut_steps=3).eval()
    with torch.no_grad():
        model.model.early_exit_gate.bias.fill_(-2.0)  # logits well below 0
    return model


@pytest.fixture(scope="module")
def hrm():
    cfg = transformers.HrmTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, head_dim=16, H_cycles=2, L_cycles=2)
    torch.manual_seed(0)
    return transformers.HrmTextForCausalLM(cfg).eval()


def run(model, spec, **kwargs):
    try:
        with torch.no_grad(), mythos_probe.attach(model, spec=spec, **kwargs) as rec:
            model(ids)
        return rec
    finally:
        assert no_hooks(model)


def test_a_modulelist_as_step_names_first_and_last(ouro):
    with pytest.raises(ValueError, match=r"LoopSpec.step 'model.layers' is a ModuleList.*first='model.layers.0', "
                                         r"last='model.layers.1'"):
        run(ouro, LoopSpec(step="model.layers"))


def test_halting_logits_declared_as_probabilities(ouro):
    (spec,) = find(ouro)
    wrong = dataclasses.replace(spec, halting=dataclasses.replace(spec.halting, output="probability"))
    with pytest.raises(ValueError, match=r"LoopSpec.halting.output: .*outside \[0, 1\].*output='logit'"):
        run(ouro, wrong)


def test_a_step_input_that_is_not_the_previous_state_needs_an_injection(hrm):
    # HRM's L module starts from z_L + z_H: without the injection, h_{t−1} would be wrong
    spec = LoopSpec(step="model.L_module", init=lambda m: m.model.z_L_init)
    with pytest.raises(ValueError, match=r"LoopSpec.injection: loop 'loop' iteration 0 starts from an input that "
                                         r"is not the previous iteration's end state"):
        run(hrm, spec)


def test_a_wrong_injection_module_is_caught(hrm):
    spec = LoopSpec(step="model.H_module", injection=Injection("added", module="model.embed_tokens"))
    with pytest.raises(ValueError, match=r"LoopSpec.injection: .*plus the injection module's output"):
        run(hrm, spec)


def test_a_state_whose_shape_changes(ouro):
    spec = LoopSpec(first="model.layers.0", last="model.norm", state=lambda out: out[..., :16])
    with pytest.raises(ValueError, match=r"LoopSpec.state: .*shape \(2, 6, 16\).*\(2, 6, 32\)"):
        run(ouro, spec)


@pytest.fixture(scope="module")
def inkling():
    cfg = transformers.Inkling2LoopTextConfig(
        vocab_size=64, unpadded_vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, swa_num_attention_heads=2, swa_num_key_value_heads=1, swa_head_dim=16,
        sliding_window_size=8, d_rel=4, rel_extent=8, moe_intermediate_size=16, n_routed_experts=4,
        num_experts_per_tok=2, n_layers_per_attn_res_block=2, loop_layer_index_start=2, loop_layer_index_end=4,
        loop_num_passes=2, loop_gate_rank=8, max_position_embeddings=64, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.Inkling2LoopForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.5)
    return model


def test_router_output_and_scoring_must_be_what_the_router_does(inkling):
    (spec,) = find(inkling)
    tuple_out = dataclasses.replace(spec, routers=(dataclasses.replace(spec.routers[0], select=lambda out: out),))
    with pytest.raises(ValueError, match=r"LoopSpec.routers\[0\].select picks tuple"):
        run(inkling, tuple_out, probes=["experts"])
    no_bias = dataclasses.replace(spec, routers=tuple(dataclasses.replace(r, bias=None) for r in spec.routers))
    with pytest.raises(ValueError, match=r"LoopSpec.routers\[0\]: the experts re-derived .* fix scoring=, bias="):
        run(inkling, no_bias, probes=["experts"])
    softmax = dataclasses.replace(spec, routers=(Router(spec.routers[0].module, top_k=2, select=0, indices=2),))
    with pytest.raises(ValueError, match=r"LoopSpec.routers\[0\]: the experts re-derived from the declared scoring "
                                         r"\('softmax'\)"):
        run(inkling, softmax, probes=["experts"])


class Step(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(8, 8)

    def forward(self, h, e):
        return torch.tanh(self.cell(h)) + e


class TwoHeads(nn.Module):
    """h ← tanh(W h) + e, with a halting head that the forward never calls."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 8)
        self.step = Step()
        self.halt = nn.Linear(8, 1)
        self.unused = nn.Linear(8, 1)

    def forward(self, input_ids):
        e = self.embed(input_ids)
        h = e
        for _ in range(3):
            h = self.step(h, e)
            torch.sigmoid(self.halt(h))
        return h


def test_hooks_that_never_fire_are_named():
    model = TwoHeads()
    spec = LoopSpec(step="step", injection=Injection("argument", arg=1), halting=Halting("unused", output="logit"))
    with pytest.warns(UserWarning, match=r"LoopSpec.halting.head: .*never ran"):
        rec = run(model, spec)
    assert rec.traces[0].iterations == 3 and "halt_prob" not in rec.traces[0].iteration_metrics
    with pytest.warns(UserWarning, match=r"LoopSpec.step: loop 'loop' \(unused\) never ran"):
        rec = run(model, LoopSpec(step="unused"))
    assert rec.traces == []


def test_a_model_without_a_preset_is_told_which_classes_need_no_spec():
    with pytest.raises(TypeError, match=r"spec=LoopSpec\(step=.*mythos_probe.presets.*HrmTextForCausalLM.*OuroForCausalLM"):
        mythos_probe.attach(nn.Linear(3, 3)).__enter__()
