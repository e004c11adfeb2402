"""A Triton kernel for loss.py's chunks: the cross-entropy of a chunk's logits and its gradient
with respect to them, written over the logits in place.

Why. In torch ops a chunk's cross-entropy makes and reads fp32 copies of its [c, V] logits
again and again: the upcast (written), log_softmax (read, its output written and kept),
nll_loss's gradient (written, scattered), log_softmax's backward (two read, one written) and
the cast back to the dtype (read, then written): about 36 bytes of memory traffic per token and
vocabulary entry, with 12 bytes a token and entry alive at once. This kernel reads a row of the
dtype's logits twice and writes it once (6 bytes an entry in bf16): a first pass finds the
row's log-sum-exp (an online max and sum, in fp32), a second writes exp(x - lse) - onehot,
rounded once to the dtype as torch's cast rounds it, over the logits. The head's GEMM then
takes those as the gradient of the logits. An ignored target (IGNORE_INDEX) gives a loss of 0
and a gradient of exactly 0.

Imported only where it runs (importing triton costs a second): on CUDA, compiled; on the CPU
under Triton's interpreter (TRITON_INTERPRET=1, the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mlora.device import current_on

BLOCK = 4096  # vocabulary entries a program reads at once (a row of 32 K: 8 steps)


@triton.jit
def cross_entropy_grad_kernel(logits_ptr, stride, targets_ptr, loss_ptr, V, ignore_index, BLOCK: tl.constexpr,
                              WITH_GRAD: tl.constexpr):
    """One program per row: loss_ptr[row] = logsumexp(x) - x[target] (0 when ignored), and
    (WITH_GRAD) the row overwritten with softmax(x) - onehot(target) (0 when ignored), x = the
    row in fp32."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
    trained = target != ignore_index
    # pass 1: the row's max m and sum of exp(x - m), online over blocks, and the target's logit
    # (read here: in pass 2 another warp may already have overwritten it with its gradient)
    m = tl.zeros((), tl.float32) - float("inf")
    total = tl.zeros((), tl.float32)
    x_target = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # (a block of -inf so far: shift by 0, not by -inf, whose exp(-inf - -inf) is NaN)
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        total = total * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
        x_target += tl.sum(tl.where(cols == target, x, 0.0), axis=0)
    lse = m + tl.log(total)
    tl.store(loss_ptr + row, tl.where(trained, lse - x_target, 0.0))
    if WITH_GRAD:  # pass 2: the gradient over the logits
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            grad = tl.where(trained, grad, 0.0)
            tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < V)


def cross_entropy_grad_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                        with_grad: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row cross-entropy [c] fp32 of logits [c, V] (each row contiguous) for targets [c],
    written into `out` (a contiguous [c] fp32, else a new one); with_grad: the logits are
    overwritten with the loss's gradient with respect to them (for a unit loss), else left as
    they are."""
    c, V = logits.shape
    assert logits.stride(1) == 1, "each row of logits must be contiguous"
    assert targets.is_contiguous() and targets.device == logits.device and targets.shape == (c,)
    loss = torch.empty(c, dtype=torch.float32, device=logits.device) if out is None else out
    assert loss.is_contiguous() and loss.dtype == torch.float32 and loss.shape == (c,)
    if c:
        with current_on(logits.device):
            cross_entropy_grad_kernel[(c,)](logits, logits.stride(0), targets, loss, V, ignore_index, BLOCK=BLOCK,
                                            WITH_GRAD=with_grad, num_warps=8)
    return loss
