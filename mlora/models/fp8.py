"""FP8 weights (`quantization_config` quant_method `fp8`), read back to floats.

Block-scaled (DeepSeek-V3/R1's and Kimi K2's releases): a projection's weight `W` [out, in] is
float8 (e4m3) and beside it `W_scale_inv` [ceil(out / b0), ceil(in / b1)] fp32: one scale per block
of b0 x b1 weights (`quantization_config.weight_block_size`, 128 x 128; transformers' default when
the key is absent), by which the float8 values are multiplied.

Per-tensor (Mistral Small 4's and Ministral 3's releases: `weight_block_size` null): one fp32 scale
per weight, `W_scale_inv` of shape () (transformers' FP8Linear holds `torch.tensor(1.0)`); stacked
experts (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) have `gate_up_proj_scale_inv`
[E, 2, 1] (one scale per expert for its gate rows and one for its up rows) and `down_proj_scale_inv`
[E, 1, 1]. Beside them, with `activation_scheme` "static", `W.activation_scale` (and the experts'
`gate_up_proj_activation_scale` / `down_proj_activation_scale` [E]) scale the activations for FP8
matmuls at run time: nothing to do with the weights' values, so never read.

mlora dequantizes them once, at load, as transformers does with `dequantize=True`
(integrations/finegrained_fp8.py: `weight.float() * scale`); the frozen base is then bf16 (or
4/8-bit with bitsandbytes, quantized from the dequantized weights).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))
SCALE_SUFFIX = "_scale_inv"  # 'model.layers.0.mlp.down_proj.weight' -> '..._scale_inv'
PER_TENSOR = "per-tensor"  # a quantization_config's scheme when weight_block_size is null
# A static activation scheme's scales: 'x.weight' -> 'x.activation_scale', a stacked
# 'x.experts.gate_up_proj' -> 'x.experts.gate_up_proj_activation_scale'
ACTIVATION_SCALE = re.compile(r".*[._]activation_scale$")


def scale_name(weight: str) -> str:
    return weight + SCALE_SUFFIX


def dequantize(weight: Tensor, scale_inv: Tensor, block: tuple[int, int]) -> Tensor:
    """weight [out, in] float8, scale_inv [ceil(out / b0), ceil(in / b1)] -> [out, in] fp32."""
    rows, cols = weight.shape
    b0, b1 = block
    if scale_inv.shape != (-(-rows // b0), -(-cols // b1)):
        raise ValueError(f"scales {tuple(scale_inv.shape)} do not fit a {rows} x {cols} weight "
                         f"in blocks of {b0} x {b1}")
    scale = scale_inv.float().repeat_interleave(b0, dim=0)[:rows].repeat_interleave(b1, dim=1)[:, :cols]  # [out, in]
    return weight.float() * scale


def dequantize_per_tensor(weight: Tensor, scale_inv: Tensor) -> Tensor:
    """weight [out, in] float8, scale_inv one scale (shape (), (1,) or (1, 1)) -> [out, in] fp32."""
    if scale_inv.dim() > 2 or scale_inv.numel() != 1:
        raise ValueError(f"scale of shape {tuple(scale_inv.shape)} is not one per-tensor scale")
    return weight.float() * scale_inv.float().reshape(())


def per_expert_scale_shape(experts: int, halved: bool) -> tuple[int, int, int]:
    """A per-tensor FP8 stacked expert tensor's scales: [E, 2, 1] for gate_up_proj (gate, up), else [E, 1, 1]."""
    return (experts, 2 if halved else 1, 1)
