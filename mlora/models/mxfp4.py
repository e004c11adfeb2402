"""MXFP4, the format GPT-OSS's released checkpoints store their experts in, read back to floats.

A stacked expert weight `W` [E, out, in] is stored as `W_blocks` [E, out, in / 32, 16] uint8 (two
4-bit E2M1 values per byte, the low nibble first) and `W_scales` [E, out, in / 32] uint8 (one
power-of-two exponent per 32 values, biased by 127). mlora dequantizes them once, at load, as
transformers does when it has no MXFP4 kernels (integrations/mxfp4.py, convert_moe_packed_tensors);
the result is then the frozen base's weight like any other (and may be quantized again with
bitsandbytes). Every E2M1 value times a power of two is exact in bf16 and fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The 16 E2M1 values, by their 4-bit code (sign bit, 2 exponent bits, 1 mantissa bit)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale
SCALE_BIAS = 127


def blocks_name(stacked: str) -> str:
    return stacked + "_blocks"


def scales_name(stacked: str) -> str:
    return stacked + "_scales"


def dequantize(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G * 32] in dtype: the weight in
    the checkpoint's [E, out, in] layout (nn.Linear's per expert)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    low, high = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]  # [..., G, 16] each
    values = torch.stack([low, high], dim=-1).flatten(-2)  # [..., G, 32]: low nibble first
    out = torch.ldexp(values, scales.to(torch.int32)[..., None] - SCALE_BIAS)  # [..., G, 32]
    return out.flatten(-2).to(dtype)  # [..., G * 32]


def quantize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [..., n * 32] -> (blocks, scales), rounding each value to the nearest E2M1 value
    times its block's power of two (the block's largest magnitude scaled to at most 6). For
    tests: a checkpoint in the released models' format from any weights."""
    w = weight.float().unflatten(-1, (-1, BLOCK))  # [..., G, 32]
    peak = w.abs().amax(dim=-1).clamp_min(2.0 ** -126)  # [..., G]
    exponent = torch.ceil(torch.log2(peak / 6.0)).clamp(-SCALE_BIAS, 127)  # 6 * 2^e >= peak
    scaled = w / torch.exp2(exponent)[..., None]  # [..., G, 32] within [-6, 6]
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    codes = (scaled[..., None] - lut).abs().argmin(dim=-1).to(torch.uint8)  # [..., G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., G, 16]
    return blocks.contiguous(), (exponent + SCALE_BIAS).to(torch.uint8)
