"""Dynamic loss scaling for fp16: each adapter's loss is multiplied by its own power of two
before the backward, and its fp32 gradient divided by it again before clipping and the step.

Why. The trainer divides an adapter's loss by its step's label tokens T, so every token's
gradient starts at 1/T and shrinks further on its way down the layers. fp16 has no exponent
range to spare (normal values end at 6.1e-5, subnormal ones at 6e-8): at a few thousand tokens
a step, most LoRA gradients of a small model round to zero or to a few bits (measured on
tests/test_loss.py's model: 41 % error at T = 10^4, 100 % at 10^5; test_loss_scale.py).
bf16 and fp32 share fp32's range and need none of this.

How, as torch.amp's GradScaler does it, per adapter, but per token:
- A step's scale is its adapter's per-token scale times its label-token count T rounded to a
  power of two (2^round(log2 T)), so each token's gradient starts within a factor of sqrt(2)
  of the per-token scale, whatever the step's size: a short step is as safe from overflow as a
  long one is from underflow. The per-token scale starts at 1: each token's gradient starts
  near 1, the range an fp16 forward works in.
- The gradients are fp32 sums of scaled fp16 products; dividing by a power of two is exact,
  so the step sees exactly what an unscaled fp32 gradient of these products would be.
- A non-finite gradient under a finite loss is an overflow: the step is skipped (its
  gradients dropped, as for a NaN) and the per-token scale halves. Not an on_nan event:
  overflows are how the scale finds its level. Only at MIN_TOKEN_SCALE (a token's gradient
  overflowing even at 1/256 of its size) does it count as a non-finite gradient.
- After GROWTH_INTERVAL steps without one the per-token scale doubles, so it follows
  gradients that shrink as training goes on.
Each adapter has its own scale and its own steps; all micro-batches of one step have the same
label-token count (the step's normaliser), so they share one scale, and one adapter's overflow
does not skip another's step. The per-token scale is part of a checkpoint; a pipeline's ranks
keep equal copies, since each updates its own from the same global gradient norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GROWTH_INTERVAL = 2000  # clean steps before the scale doubles (GradScaler's default)
MIN_TOKEN_SCALE = 2.0 ** -8  # the per-token scale backs off no further: a non-finite gradient


def needs_loss_scaling(dtype: torch.dtype, quant=None) -> bool:
    """Whether the backward runs in fp16 somewhere: fp16 activations, or a 4-bit base whose
    matmuls compute in fp16 (quant.QuantConfig.compute_dtype; an 8-bit base's backward runs
    in the activation dtype)."""
    compute = getattr(quant, "compute_dtype", None) if quant is not None and quant.bits == 4 else None
    return torch.float16 in (dtype, compute)


@dataclass
class LossScale:
    """One adapter's dynamic loss scale, per label token (a power of two)."""

    per_token: float = 1.0
    clean_steps: int = 0  # steps taken since the scale last changed

    def for_step(self, step_tokens: int) -> float:
        """The scale of a step with `step_tokens` label tokens (its loss's normaliser):
        per_token x 2^round(log2 step_tokens), a power of two (step_tokens 0: per_token)."""
        return self.per_token * 2.0 ** round(math.log2(max(1, step_tokens)))

    def stepped(self) -> None:
        """A step with a finite gradient was taken."""
        self.clean_steps += 1
        if self.clean_steps >= GROWTH_INTERVAL:
            self.per_token *= 2
            self.clean_steps = 0

    def back_off(self) -> bool:
        """After a non-finite gradient: halve the scale and return True (an overflow, the step
        to be skipped), or False at MIN_TOKEN_SCALE (a non-finite gradient of its own)."""
        self.clean_steps = 0
        if self.per_token <= MIN_TOKEN_SCALE:
            return False
        self.per_token /= 2
        return True

    def state(self) -> dict:
        return {"per_token": self.per_token, "clean_steps": self.clean_steps}

    @classmethod
    def from_state(cls, state: dict) -> "LossScale":
        return cls(state["per_token"], state["clean_steps"])
