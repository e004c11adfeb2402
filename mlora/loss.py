"""Per-adapter token cross-entropy over a fused batch, with the head run a chunk at a time.

A batch's logits are its largest tensors: [N, V] in the dtype, upcast to fp32 for a stable
log-softmax, whose fp32 output is kept for the backward, whose backward makes two more fp32
[N, V]: about 14 bytes per token and vocabulary entry, 7 GB for TinyLlama's 16 K tokens and 29 GB
for Llama 3's (V = 128,256). The frozen head needs no weight gradient, so each token's gradient
with respect to its hidden state depends on that token alone. `chunked_head_cross_entropy`
therefore runs the head and the cross-entropy a chunk of tokens at a time, takes each chunk's
gradient with respect to the hidden states right away (for a unit loss), and drops its logits:
only [N, H] survives the forward. The backward scales each token's stored gradient by its
upstream gradient (an adapter's 1 / step tokens); the chain rule is linear in it, so that is
exact up to one rounding of the product in the dtype. Same GEMMs and elementwise work as the
whole-logits loss, and the [N, V] tensors never exist whole.

On CUDA a chunk's cross-entropy and its gradient run in one Triton kernel (loss_kernels.py:
the logits read twice and overwritten once with their gradient, where torch's ops make and
read fp32 copies of them five times over); elsewhere, and for soft-capped or scaled logits,
torch's ops under autograd.

And only the positions that predict a target go through the head, when the batch says which
(`batching.trained_positions`, found on the host): with train_on_inputs false a prompt's tokens
predict nothing, nor do pads, and both cost the head its GEMMs and [N, V] passes all the same.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mlora import kernel_fallback
from mlora.batching import label_token_counts
from mlora.data import IGNORE_INDEX
from mlora.errors import UserError
from mlora.lora import AdapterRows, BatchLayout

# fp32 logits of one chunk: the chunk's working set peaks at three times this (log_softmax's
# fp32 output, kept, and in the chunk's backward nll_loss's and log_softmax's fp32 gradients;
# memory._head_bytes). 256 MiB: 2,048 tokens of a 32 K vocabulary, 512 of a 128 K one.
CHUNK_LOGITS_BYTES = 256 * 2**20
CHUNK_MULTIPLE = 64  # chunk rows a multiple of this: whole GEMM tiles
# How a chunk's cross-entropy runs (MLORA_CROSS_ENTROPY): "triton", it and its gradient in one
# Triton kernel (loss_kernels.py: 6 bytes of traffic per token and vocabulary entry in bf16,
# where torch's ops take about 36; on the CPU through Triton's interpreter, for the tests);
# "torch", torch's ops under autograd; "auto", triton where mlora's LoRA kernel `auto` is
# triton too (CUDA of compute capability 9.0 and up, with Triton), torch elsewhere and after the
# kernel failed here (a Triton that cannot compile it: kernel_fallback.py). The kernel
# takes a plain head only (no soft cap, no scaling, an nn.Linear): other heads run torch's ops
# whatever this says.
cross_entropy = os.environ.get("MLORA_CROSS_ENTROPY", "auto")
CROSS_ENTROPY_CHOICES = ("auto", "triton", "torch")


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per head chunk: fp32 logits of at most CHUNK_LOGITS_BYTES, a multiple of
    CHUNK_MULTIPLE (at least one multiple)."""
    tokens = CHUNK_LOGITS_BYTES // (4 * vocab_size)
    return max(CHUNK_MULTIPLE, tokens // CHUNK_MULTIPLE * CHUNK_MULTIPLE)


def fused_loss_sums(model: torch.nn.Module, layout: BatchLayout,
                    batch) -> dict[str, tuple[torch.Tensor, int]]:
    """Forward a fused batch (`batching.FusedBatch`): every adapter's rows through its own LoRA
    (`layout` tells the wrappers which rows are whose), packed rows with their positions and
    documents; returns `head_loss_sums` of the final hidden states."""
    layout.rows = batch.rows
    h = model(batch.input_ids, batch.attention_mask, position_ids=batch.position_ids,
              document_ids=batch.document_ids, head=False)  # [B, S, H]
    return head_loss_sums(model, h, batch.labels, batch.rows, batch.label_counts, batch.target_positions)


def head_loss_sums(model: torch.nn.Module, h: torch.Tensor, labels: torch.Tensor, rows: list[AdapterRows],
                   counts: dict[str, int] | None = None,
                   positions: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, int]]:
    """For each adapter: (sum of next-token cross-entropy over its label tokens, token count),
    from the final-normed hidden states h [B, S, H] of `model` (a CausalLM with the head,
    forwarded with head=False).

    labels [B, S] aligned with the inputs (HF convention): position t predicts labels[t + 1].
    Summing here and dividing by the optimizer step's token total later makes gradient
    accumulation exact, whatever the micro-batch split.

    counts: the token counts, when the caller counted them on the host (a FusedBatch's
    label_counts); otherwise they are read back from labels' device, which waits for
    everything queued on it (on a GPU, mid-step: the host loses its lead).
    positions: batching.trained_positions of labels and rows (found on the host), with counts:
    only those positions go through the head. A prompt token (train_on_inputs false), a pad or
    a row's last token predicts no target, and the head's GEMMs and [N, V] passes on it
    would be wasted: alpaca-style rows leave a third to a half of their tokens untrained.
    """
    B, S, H = h.shape
    # The last position predicts nothing: its target is IGNORE_INDEX, so that h [B, S, H] is
    # taken whole (a view, where h[:, :-1] would be a copy).
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # [B S]
    flat = h.reshape(B * S, H)
    if positions is None:  # every position, one more in S of head work
        per_row = chunked_head_cross_entropy(model, flat, targets).view(B, S).sum(dim=1)  # [B]
        if counts is None:
            counts = label_token_counts(labels, rows)
        return {r.name: (per_row[r.start:r.end].sum(), counts[r.name]) for r in rows}
    if counts is None:
        raise ValueError("trained positions go with the host's label counts (counts)")
    sizes = [counts[r.name] for r in rows]
    if positions.numel() != sum(sizes):
        raise ValueError(f"{positions.numel()} trained positions for {sum(sizes)} label tokens")
    ce = chunked_head_cross_entropy(model, flat.index_select(0, positions), targets.index_select(0, positions))  # [M]
    return {r.name: (part.sum(), counts[r.name]) for r, part in zip(rows, ce.split(sizes))}


def chunked_head_cross_entropy(model: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [N] fp32 of model.logits(h) for hidden states h [N, H] and
    targets [N] (IGNORE_INDEX: 0, and exactly no gradient, even from non-finite logits), the
    head run CHUNK tokens at a time (module docstring). Differentiable with respect to h only:
    the head must be frozen."""
    if any(p.requires_grad for p in model.lm_head.parameters()):
        raise ValueError("the chunked cross-entropy needs a frozen head (no gradient for lm_head's weight)")
    want_grad = torch.is_grad_enabled() and h.requires_grad  # (evaluation: no gradient made at all)
    return _ChunkedHeadCrossEntropy.apply(h, targets, model, chunk_tokens(model.args.vocab_size), want_grad,
                                          _fused_cross_entropy(model, h))


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # (a search of sys.path: once)


def _fused_cross_entropy(model: torch.nn.Module, h: torch.Tensor) -> bool:
    """Whether the chunks run loss_kernels' kernel (`cross_entropy`)."""
    if cross_entropy == "torch" or not _triton_installed():
        return False
    if model.args.final_softcap is not None or model.args.logits_scaling != 1.0:
        return False  # (its logits are not the head's output: torch's ops, through autograd)
    if type(model.lm_head) is not torch.nn.Linear or model.lm_head.weight.dtype != h.dtype:
        return False
    if cross_entropy == "triton":
        return True
    # (auto: not after the kernel failed here, kernel_fallback.py)
    return h.is_cuda and _auto_uses_kernel(h.device) and kernel_fallback.failure(kernel_fallback.CROSS_ENTROPY) is None


@functools.lru_cache(maxsize=16)
def _auto_uses_kernel(device: torch.device) -> bool:
    """"auto" runs the kernel where mlora runs Triton kernels already: where the LoRA kernel
    `auto` is triton (lora.auto_kernel: CUDA of compute capability 9.0 and up, Triton there)."""
    from mlora.lora import auto_kernel

    return auto_kernel(device) == "triton"


def check_cross_entropy(device: torch.device | None = None) -> None:
    """MLORA_CROSS_ENTROPY (or `cross_entropy` set in code) must be one of
    CROSS_ENTROPY_CHOICES, and "triton" able to run on `device` (None: not checked)."""
    if cross_entropy not in CROSS_ENTROPY_CHOICES:
        raise UserError(f"MLORA_CROSS_ENTROPY={cross_entropy!r} is not one of: {', '.join(CROSS_ENTROPY_CHOICES)}")
    if cross_entropy != "triton":
        return
    if not _triton_installed():
        raise UserError("MLORA_CROSS_ENTROPY=triton: it needs the triton package (CUDA builds of torch bring it)")
    if device is not None and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(f"MLORA_CROSS_ENTROPY=triton: it runs on CUDA devices, not {device.type} "
                        "(TRITON_INTERPRET=1 runs it on the CPU, slowly)")


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Forward: the per-token loss and, when h needs a gradient, each token's gradient of its
    own loss with respect to h (held until the backward). Backward: those, scaled per token."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, targets: torch.Tensor, model: torch.nn.Module,
                chunk: int, want_grad: bool, fused: bool) -> torch.Tensor:
        N = h.shape[0]
        ce = torch.empty(N, dtype=torch.float32, device=h.device)  # [N]
        grad_h = torch.empty_like(h) if want_grad else None  # [N, H]: d ce[t] / d h[t]
        for start in range(0, N, chunk):
            end = min(start + chunk, N)
            if fused:
                try:
                    from mlora.loss_kernels import cross_entropy_grad_  # (imports triton: only when used)

                    logits = model.lm_head(h[start:end])  # [c, V], in the dtype
                    cross_entropy_grad_(logits, targets[start:end], IGNORE_INDEX, want_grad, out=ce[start:end])
                except Exception as err:  # (a Triton that cannot compile or launch it)
                    # (named, or out of memory: raised)
                    kernel_fallback.record(kernel_fallback.CROSS_ENTROPY, err, chosen_by_auto=cross_entropy == "auto")
                    fused = False  # this chunk and the rest: torch's ops, from h
                else:
                    if want_grad:  # logits now hold d ce / d logits: the head's input gradient, [c, H]
                        torch.mm(logits, model.lm_head.weight, out=grad_h[start:end])
                    continue
            with torch.enable_grad():
                piece = h[start:end].detach().requires_grad_(want_grad)  # [c, H]
                # (the dtype's logits die in the upcast: only the fp32 ones are kept, by log_softmax)
                loss = F.cross_entropy(model.logits(piece).float(), targets[start:end],
                                       ignore_index=IGNORE_INDEX, reduction="none")  # [c]
                if want_grad:
                    grad, = torch.autograd.grad(loss, piece, torch.ones_like(loss))  # [c, H]
                    # an ignored token's gradient is 0, but log_softmax's backward makes it
                    # 0 * exp(logit): NaN from a non-finite logit, which would reach the layers
                    trained = (targets[start:end] != IGNORE_INDEX)[:, None]  # [c, 1]
                    torch.where(trained, grad, grad.new_zeros(()), out=grad_h[start:end])
            ce[start:end] = loss.detach()
        ctx.save_for_backward(grad_h)
        return ce

    @staticmethod
    @once_differentiable  # (the stored gradients are constants: no second derivative)
    def backward(ctx, grad_ce: torch.Tensor):
        grad_h, = ctx.saved_tensors
        # computed in fp32, rounded once to the dtype (out= casts)
        scaled = torch.mul(grad_h, grad_ce[:, None], out=torch.empty_like(grad_h))  # [N, H]
        return scaled, None, None, None, None, None
