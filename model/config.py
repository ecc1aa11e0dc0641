"""`LoopedConfig`: the hyperparameters of a looped transformer, and the named presets.

The fields and defaults are exactly those of OpenMythos's `MythosConfig` (open-mythos 0.5.0,
`open_mythos/main.py`) so a config converts both ways without loss; unlike `MythosConfig` it is
validated on construction and rejects inconsistent values with an error that names the field and
the fix. Presets are plain data (litgpt style); parameter and FLOP counts live in `variants.py`.

This module is not: the model (`looped.py`) or exit policies (chosen per forward, not per config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoopedConfig:
    vocab_size: int = 32000
    dim: int = 2048
    n_heads: int = 16
    n_kv_heads: int = 4  # GQA: fewer KV heads than Q heads
    max_seq_len: int = 4096
    max_loop_iters: int = 16  # T: recurrent depth at inference, and the LoRA scale table size
    prelude_layers: int = 2
    coda_layers: int = 2
    attn_type: str = "mla"  # "gqa" | "mla"
    kv_lora_rank: int = 512  # MLA: compressed KV latent cached instead of full K/V
    q_lora_rank: int = 1536  # MLA: compressed Q latent
    qk_rope_head_dim: int = 64  # MLA: per-head dims that receive RoPE
    qk_nope_head_dim: int = 128  # MLA: per-head dims without RoPE
    v_head_dim: int = 128  # MLA: per-head value dim
    n_experts: int = 64  # routed experts in the recurrent block's MoE
    n_shared_experts: int = 2  # always-on experts
    n_experts_per_tok: int = 4  # top-k routed
    expert_dim: int = 512  # hidden size of one routed expert (shared ones are k× wider)
    act_threshold: float = 0.99  # ACT: cumulative halting probability at which a position stops (> 1: rarely/never)
    rope_theta: float = 500000.0
    lora_rank: int = 16  # depth-wise LoRA rank
    max_output_tokens: int = 4096
    dropout: float = 0.0  # why: 0 at inference; 0.1 is usual for pretraining

    def __post_init__(self) -> None:
        for name in (
            "vocab_size", "dim", "n_heads", "n_kv_heads", "max_seq_len", "max_loop_iters",
            "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
            "n_experts", "n_experts_per_tok", "expert_dim", "lora_rank", "max_output_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LoopedConfig.{name} must be a positive integer, got {value!r}")
        for name in ("prelude_layers", "coda_layers", "n_shared_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LoopedConfig.{name} must be a non-negative integer, got {value!r}")
        if self.attn_type not in ("gqa", "mla"):
            raise ValueError(f"LoopedConfig.attn_type must be 'gqa' or 'mla', got {self.attn_type!r}")
        if self.dim % self.n_heads:
            raise ValueError(
                f"LoopedConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}: "
                f"choose n_heads among the divisors of dim (for example {_divisor_near(self.dim, self.n_heads)})"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"LoopedConfig: head dim dim/n_heads={self.dim // self.n_heads} must be even for RoPE; "
                "change dim or n_heads"
            )
        if self.attn_type == "gqa" and self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LoopedConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} for GQA"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"LoopedConfig.qk_rope_head_dim={self.qk_rope_head_dim} must be even for RoPE")
        if self.n_experts_per_tok > self.n_experts:
            raise ValueError(
                f"LoopedConfig.n_experts_per_tok={self.n_experts_per_tok} exceeds n_experts={self.n_experts}: "
                "top-k cannot choose more experts than exist; lower n_experts_per_tok or raise n_experts"
            )
        if self.dim // 8 < 2 or (self.dim // 8) % 2:
            raise ValueError(
                f"LoopedConfig.dim={self.dim} gives a loop-index embedding width dim//8={self.dim // 8}, "
                "which must be even and at least 2: use a dim that is a multiple of 16"
            )
        # Above 1 is valid, as in OpenMythos: a common way to turn ACT off (the cumulative
        # probability is a plain sum, so it may still pass a threshold of 1.5 after many loops).
        if not self.act_threshold > 0.0:
            raise ValueError(f"LoopedConfig.act_threshold must be a positive number, got {self.act_threshold!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoopedConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.rope_theta <= 0:
            raise ValueError(f"LoopedConfig.rope_theta must be positive, got {self.rope_theta!r}")

    # derived values (litgpt style: properties, never stored)
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def loop_dim(self) -> int:
        """Channels receiving the sinusoidal loop-index embedding."""
        return self.dim // 8

    @property
    def dense_hidden(self) -> int:
        """Hidden size of the dense SwiGLU FFN in prelude and coda blocks."""
        return self.dim * 4 // 3

    def replace(self, **changes: Any) -> "LoopedConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoopedConfig":
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown LoopedConfig fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_mythos_config(cls, mythos_cfg: Any) -> "LoopedConfig":
        """From an `open_mythos.main.MythosConfig` (or anything with the same attributes)."""
        return cls(**{f.name: getattr(mythos_cfg, f.name) for f in dataclasses.fields(cls)})

    def to_mythos_config(self) -> Any:
        from open_mythos.main import MythosConfig

        return MythosConfig(**self.to_dict())

    @classmethod
    def variant(cls, name: str) -> "LoopedConfig":
        """A named preset: OpenMythos's `1b` … `1t` or a tiny one for tests (see `VARIANTS`)."""
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose one of: {', '.join(VARIANTS)}")
        return cls(**VARIANTS[name])


def _divisor_near(n: int, target: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - target))


def _mythos(dim, n_heads, n_kv_heads, max_seq_len, loops, layers, kv_lora, q_lora, rope, nope, v,
            experts, shared, topk, expert_dim, lora, vocab=32000, rope_theta=500000.0, max_out=4096):
    return dict(
        vocab_size=vocab, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, max_seq_len=max_seq_len,
        max_loop_iters=loops, prelude_layers=layers, coda_layers=layers, attn_type="mla",
        kv_lora_rank=kv_lora, q_lora_rank=q_lora, qk_rope_head_dim=rope, qk_nope_head_dim=nope,
        v_head_dim=v, n_experts=experts, n_shared_experts=shared, n_experts_per_tok=topk,
        expert_dim=expert_dim, act_threshold=0.99, rope_theta=rope_theta, lora_rank=lora,
        max_output_tokens=max_out,
    )


# Source: open-mythos 0.5.0, open_mythos/variants.py (mythos_1b … mythos_1t), transcribed as data.
VARIANTS: dict[str, dict[str, Any]] = {
    "1b": _mythos(2048, 16, 4, 4096, 16, 2, 256, 512, 32, 64, 64, 64, 2, 4, 2048, 8),
    "3b": _mythos(3072, 24, 6, 4096, 16, 2, 384, 768, 32, 96, 96, 64, 2, 4, 4096, 8),
    "10b": _mythos(4096, 32, 8, 8192, 24, 2, 512, 1024, 64, 128, 128, 128, 2, 4, 5632, 16),
    "50b": _mythos(6144, 48, 8, 8192, 32, 3, 512, 1536, 64, 128, 128, 256, 4, 4, 9728, 32),
    "100b": _mythos(8192, 64, 8, 1000000, 32, 4, 512, 2048, 64, 128, 128, 256, 4, 8, 13568, 64,
                    rope_theta=1000000.0, max_out=131072),
    "500b": _mythos(12288, 96, 16, 1000000, 48, 4, 1024, 3072, 64, 128, 128, 512, 8, 8, 23040, 128,
                    vocab=100000, rope_theta=1000000.0, max_out=131072),
    "1t": _mythos(16384, 128, 16, 1000000, 64, 6, 1024, 4096, 64, 128, 128, 512, 8, 8, 34560, 256,
                  vocab=100000, rope_theta=2000000.0, max_out=131072),
    # Tiny presets for tests and notebooks: every code path, milliseconds per forward on a CPU.
    "tiny-gqa": dict(vocab_size=256, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=128, max_loop_iters=4,
                     prelude_layers=1, coda_layers=1, attn_type="gqa", n_experts=8, n_shared_experts=1,
                     n_experts_per_tok=2, expert_dim=32, lora_rank=4, max_output_tokens=64),
    "tiny-mla": dict(vocab_size=256, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=128, max_loop_iters=4,
                     prelude_layers=1, coda_layers=1, attn_type="mla", kv_lora_rank=32, q_lora_rank=48,
                     qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_experts=8,
                     n_shared_experts=1, n_experts_per_tok=2, expert_dim=32, lora_rank=4, max_output_tokens=64),
    # The benchmark shape of the model issue: 32 experts, top-2, 8 loops, on a CPU in seconds.
    "bench": dict(vocab_size=4096, dim=256, n_heads=8, n_kv_heads=4, max_seq_len=512, max_loop_iters=8,
                  prelude_layers=1, coda_layers=1, attn_type="gqa", n_experts=32, n_shared_experts=1,
                  n_experts_per_tok=2, expert_dim=128, lora_rank=8, max_output_tokens=256),
}
