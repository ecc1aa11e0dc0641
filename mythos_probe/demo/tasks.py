"""The synthetic task the shipped checkpoint is trained on: modular arithmetic chains.

An example is a start digit followed by k operations modulo 7, e.g. (k = 4)

    3 +2 *3 +1 *2        running values: 3 5 1 2 4

and the target at every position is the running value after the operations so far. The value at
position i depends on all i operations before it, applied in order (+ and × do not commute), so
position i needs i sequential steps: the number of reasoning steps is known for every position,
and the answer of an example (its last position) needs exactly k. A looped model can apply one
operation per iteration by attending to the previous position; the loop count it needs grows
with k, which is what the probes should see.

Why this task: an earlier variable-binding task (follow k pointers among shuffled bindings) did
not train on 2 CPU cores in minutes, neither with our model nor with a plain transformer: its
first hop needs an induction-style lookup that emerges only after a long plateau. Here every step
is local and every position is supervised.

This module is not: the model, the training loop (`training.py`) or a general tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Bump on any change to the vocabulary, the layout or the sampling: the checkpoint records it.
TASK_VERSION = "modchain-v1"

MODULUS = 7
OPS = (("+", 1), ("+", 2), ("+", 3), ("*", 2), ("*", 3))
DIGITS = tuple(str(d) for d in range(MODULUS))
VOCAB = DIGITS + tuple(f"{op}{arg}" for op, arg in OPS)
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}
MAX_STEPS = 16  # longest chain the generator makes (training uses fewer; the rest is held out)


def encode(text: str) -> torch.Tensor:
    """Space-separated symbols → (T,) int64 token ids."""
    try:
        return torch.tensor([TOKEN_ID[tok] for tok in text.split()], dtype=torch.long)
    except KeyError as err:
        raise ValueError(f"symbol {err.args[0]!r} is not in the task vocabulary {VOCAB}") from None


def decode(ids) -> str:
    """Token ids (any int sequence or tensor) → space-separated symbols."""
    return " ".join(VOCAB[int(i)] for i in ids)


def run_chain(start: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """Running values (B, k+1) of start digits (B,) under operation indices (B, k)."""
    values = [start]
    v = start
    for i in range(ops.shape[1]):
        op = ops[:, i]
        arg = torch.tensor([a for _, a in OPS])[op]
        is_add = torch.tensor([o == "+" for o, _ in OPS])[op]
        v = torch.where(is_add, v + arg, v * arg) % MODULUS
        values.append(v)
    return torch.stack(values, dim=1)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, k+1): start digit, then k operation tokens
    targets: torch.Tensor  # (B, k+1): token id of the running value at each position
    steps: int  # k, the operations in each example (the answer needs k steps)

    @property
    def answers(self) -> torch.Tensor:
        """(B,) the value after all k operations (target at the last position)."""
        return self.targets[:, -1]


class ChainTask:
    """Seeded generator of k-step chains. Same seed, same calls → same examples."""

    version = TASK_VERSION
    vocab = VOCAB
    max_steps = MAX_STEPS

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, size: int, steps: int) -> Batch:
        """`size` examples of exactly `steps` operations."""
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be in [1, {MAX_STEPS}], got {steps}")
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        start = torch.randint(0, MODULUS, (size,), generator=self.gen)
        ops = torch.randint(0, len(OPS), (size, steps), generator=self.gen)
        return Batch(
            input_ids=torch.cat([start[:, None], len(DIGITS) + ops], dim=1),
            targets=run_chain(start, ops),  # digit token ids are the digits themselves
            steps=steps,
        )
