"""ALiBi (attention with linear biases; Baichuan 13B, Baichuan 2 13B): no position encoding in
q and k; instead each head adds slope_h * (k - q) to its attention scores, so a query attends
less to keys the farther back they lie.

The bias goes to SDPA as a float mask that also hides what the bool mask hides. The models'
inference code adds slope_h * k (the key's absolute position), their training code slope_h *
(k - q), as here; the two differ by a constant per query, which softmax ignores, and the
distance k - q rounds less in bf16.
Within a packed document and a left-padded row, columns are positions up to such a constant
too, so the bias needs no position ids.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mlora.device import upload

# SDPA's memory-efficient kernel wants the mask's rows aligned to 16 elements; a mask whose
# last dimension is a multiple of 16 (here: a view of one that is) is used as it is, any other
# is padded into a copy on every call, i.e. once per layer.
_ALIGN = 16


def alibi_slopes(num_heads: int) -> list[float]:
    """One slope per head, the geometric sequence of the ALiBi paper (as Bloom and Baichuan
    compute it): 2^(-8/n), 2^(-16/n), ... for n heads a power of two; otherwise those of the
    largest power of two below n, then every other slope of twice that many."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def alibi_bias(num_heads: int, allowed: Tensor | None, past: int, seq_len: int, device: torch.device,
               dtype: torch.dtype) -> Tensor:
    """The float attention mask of S = seq_len queries at positions past.. over T = past + S
    keys: slope_h * (k - q) where `allowed` (bool [B or 1, 1, S, T], True = may attend; None:
    causal), -inf elsewhere. Returns [B or 1, nh, S, T], a view of a tensor whose rows are
    padded to a multiple of 16 (see _ALIGN). The products in fp32, rounded to `dtype`."""
    T = past + seq_len
    padded = -(-T // _ALIGN) * _ALIGN
    q = torch.arange(past, T, device=device)[:, None]  # [S, 1]
    k = torch.arange(padded, device=device)[None, :]  # [1, T']
    slopes = upload(torch.tensor(alibi_slopes(num_heads), dtype=torch.float32), device)  # [nh]
    bias = (slopes[:, None, None] * (k - q).to(torch.float32)).to(dtype)  # [nh, S, T']
    if allowed is None:
        allowed = (k <= q)[None, None]  # [1, 1, S, T']
    else:
        full = torch.zeros(*allowed.shape[:-1], padded, dtype=torch.bool, device=device)  # padded keys hidden
        full[..., :T] = allowed
        allowed = full
    # Broadcast into [B or 1, nh, S, T'] in the dtype at once: no full-size fp32 copy to cast
    # (three times the mask's memory at the start of a forward)
    return torch.where(allowed, bias, float("-inf"))[..., :T]  # (a Python scalar keeps bias's dtype)
