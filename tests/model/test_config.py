import dataclasses

import pytest

from mythos_probe.model import VARIANTS, LoopedConfig

open_mythos = pytest.importorskip("open_mythos", reason="open-mythos is installed by scripts/bootstrap.sh")


def test_fields_and_defaults_are_those_of_mythos_config():
    ours = {f.name: f.default for f in dataclasses.fields(LoopedConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(open_mythos.MythosConfig)}
    assert ours == theirs


@pytest.mark.parametrize("name", ["1b", "3b", "10b", "50b", "100b", "500b", "1t"])
def test_presets_equal_open_mythos_variants(name):
    theirs = getattr(open_mythos, f"mythos_{name}")()
    assert LoopedConfig.variant(name) == LoopedConfig.from_mythos_config(theirs)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_preset_is_valid_and_round_trips(name):
    cfg = LoopedConfig.variant(name)
    assert LoopedConfig.from_dict(cfg.to_dict()) == cfg
    assert LoopedConfig.from_mythos_config(cfg.to_mythos_config()) == cfg


@pytest.mark.parametrize(
    "changes, field, fix",
    [
        (dict(dim=100, n_heads=16), "dim=100", "n_heads"),
        (dict(n_experts_per_tok=9, n_experts=8), "n_experts_per_tok=9", "lower n_experts_per_tok"),
        (dict(dim=72, n_heads=4), "dim=72", "multiple of 16"),  # loop-index width 9 is odd
        (dict(dim=0), "dim", "positive integer"),
        (dict(expert_dim=-1), "expert_dim", "positive integer"),
        (dict(prelude_layers=-1), "prelude_layers", "non-negative"),
        (dict(attn_type="flash"), "attn_type", "'gqa' or 'mla'"),
        (dict(attn_type="gqa", n_heads=4, n_kv_heads=3), "n_kv_heads=3", "divide"),
        (dict(act_threshold=0.0), "act_threshold", "positive number"),
        (dict(act_threshold=float("nan")), "act_threshold", "positive number"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7", "even"),
        (dict(n_heads=2.0), "n_heads", "positive integer"),
    ],
)
def test_inconsistent_values_are_rejected_with_field_and_fix(changes, field, fix):
    base = LoopedConfig.variant("tiny-gqa").to_dict()
    with pytest.raises(ValueError) as err:
        LoopedConfig(**{**base, **changes})
    assert field in str(err.value) and fix in str(err.value)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match="tiny-gqa"):
        LoopedConfig.variant("2b")
