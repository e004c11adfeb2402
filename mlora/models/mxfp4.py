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
    the checkpoint's [E, out, in] layout (nn.Linear's per expert). The loader calls it per expert,
    so its temporaries stay a few times one expert's size."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(E2M1_VALUES, dtype=dtype, device=blocks.device)  # exact in any float dtype
    out = torch.empty(*blocks.shape[:-1], BLOCK, dtype=dtype, device=blocks.device)  # [..., G, 32]
    out[..., 0::2] = lut[(blocks & 0x0F).int()]  # the low nibble first
    out[..., 1::2] = lut[(blocks >> 4).int()]
    torch.ldexp(out, scales.to(torch.int32)[..., None] - SCALE_BIAS, out=out)  # times 2^(scale - 127)
    return out.flatten(-2)  # [..., G * 32]
