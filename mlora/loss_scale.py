"""Dynamic loss scaling for fp16: each adapter's loss is multiplied by its own power of two
before the backward, and its fp32 gradient divided by it again before clipping and the step.

Why. The trainer divides an adapter's loss by its step's label tokens T, so every token's
gradient starts at 1/T and shrinks further on its way down the layers. fp16 has no exponent
range to spare (normal values end at 6.1e-5, subnormal ones at 6e-8): at a few thousand tokens
a step, most LoRA gradients of a small model round to zero or to a few bits (measured on
tests/test_loss.py's model: 41 % error at T = 10^4, nothing left at 10^6; test_loss_scale.py).
bf16 and fp32 share fp32's range and need none of this.

How, as torch.amp's GradScaler does it, per adapter:
- The scale starts at the power of two nearest the first step's T, so a token's gradient starts
  near 1 (a whole sequence of them: the range an fp16 forward works in).
- The gradients are fp32 sums of scaled fp16 products; dividing by a power of two is exact,
  so the step sees exactly what an unscaled fp32 gradient of these products would be.
- A non-finite gradient under a finite loss is an overflow: the step is skipped (its
  gradients dropped, as for a NaN) and the scale halves. Not an on_nan event: overflows are
  how the scale finds its level. Only at a scale of 1 (no scaling left) does it count as a
  non-finite gradient.
- After GROWTH_INTERVAL steps without one the scale doubles, so it follows gradients that
  shrink as training goes on.
Each adapter has its own scale and its own steps, so an adapter's step never mixes
micro-batches of different scales, and one adapter's overflow does not skip another's step.
The scale is part of a checkpoint; a pipeline's ranks keep equal copies, since each updates
its own from the same global gradient norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GROWTH_INTERVAL = 2000  # clean steps before the scale doubles (GradScaler's default)
MIN_SCALE = 1.0  # below this there is nothing left to back off: the gradient is truly non-finite


def needs_loss_scaling(dtype: torch.dtype, quant=None) -> bool:
    """Whether the backward runs in fp16 somewhere: fp16 activations, or a 4-bit base whose
    matmuls compute in fp16 (quant.QuantConfig.compute_dtype; an 8-bit base's backward runs
    in the activation dtype)."""
    compute = getattr(quant, "compute_dtype", None) if quant is not None and quant.bits == 4 else None
    return torch.float16 in (dtype, compute)


@dataclass
class LossScale:
    """One adapter's dynamic loss scale (a power of two; None until its first step)."""

    scale: float | None = None
    clean_steps: int = 0  # steps taken since the scale last changed

    def for_step(self, step_tokens: int) -> float:
        """The scale of a micro-batch of a step with `step_tokens` label tokens (the loss's
        normaliser), set at the first one: the power of two nearest it. A step without label
        tokens (its loss and gradient are 0) runs unscaled and leaves it to the next one."""
        if self.scale is None:
            if step_tokens < 1:
                return 1.0
            self.scale = 2.0 ** round(math.log2(step_tokens))
        return self.scale

    def stepped(self) -> None:
        """A step with a finite gradient was taken."""
        if self.scale is None:  # (a step without label tokens: nothing to grow yet)
            return
        self.clean_steps += 1
        if self.clean_steps >= GROWTH_INTERVAL:
            self.scale *= 2
            self.clean_steps = 0

    def back_off(self) -> bool:
        """After a non-finite gradient: halve the scale and return True (an overflow, the step
        to be skipped), or False at MIN_SCALE (a non-finite gradient of its own)."""
        self.clean_steps = 0
        if self.scale is None or self.scale <= MIN_SCALE:
            return False
        self.scale = max(MIN_SCALE, self.scale / 2)
        return True

    def state(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    @classmethod
    def from_state(cls, state: dict) -> "LossScale":
        return cls(state["scale"], state["clean_steps"])
