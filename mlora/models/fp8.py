"""Block-scaled FP8 weights (DeepSeek-V3/R1's and Kimi K2's released checkpoints), read back to floats.

Such a checkpoint stores a projection's weight `W` [out, in] as float8 (e4m3) and beside it
`W_scale_inv` [ceil(out / b0), ceil(in / b1)] fp32: one scale per block of b0 x b1 weights
(`quantization_config.weight_block_size`, 128 x 128), by which the float8 values are multiplied.
mlora dequantizes them once, at load, as transformers does with `dequantize=True`
(integrations/finegrained_fp8.py); the frozen base is then bf16 (or 4/8-bit with bitsandbytes).
"""

from __future__ import annotations

import torch
from torch import Tensor

FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))
SCALE_SUFFIX = "_scale_inv"  # 'model.layers.0.mlp.down_proj.weight' -> '..._scale_inv'


def scale_name(weight: str) -> str:
    return weight + SCALE_SUFFIX


def dequantize(weight: Tensor, scale_inv: Tensor, block: tuple[int, int]) -> Tensor:
    """weight [out, in] float8, scale_inv [ceil(out / b0), ceil(in / b1)] -> [out, in] fp32."""
    rows, cols = weight.shape
    b0, b1 = block
    if scale_inv.shape != (-(-rows // b0), -(-cols // b1)):
        raise ValueError(f"scales {tuple(scale_inv.shape)} do not fit a {rows} x {cols} weight in blocks of {b0} x {b1}")
    scale = scale_inv.float().repeat_interleave(b0, dim=0)[:rows].repeat_interleave(b1, dim=1)[:, :cols]  # [out, in]
    return weight.float() * scale
