"""BatchLoRA: one frozen linear layer shared by several LoRA adapters in one fused batch.

A fused batch holds the rows of several adapters, each adapter a contiguous row range
(`AdapterRows`). `LoraLinear` runs the frozen base matmul once for all rows and then adds
`scale * B(A(dropout(x)))` to each adapter's own rows only.

Gradients come from plain autograd, so they are exact with dropout > 0: the mask that scaled
the forward is the one autograd saved for the backward (a hand-written backward that forgets
the mask is a known bug in an older multi-LoRA runtime).

The model code knows nothing of LoRA: `inject_lora` swaps the target `nn.Linear` modules for
`LoraLinear` wrappers after the model is built, and the trainer tells all wrappers which rows
belong to which adapter through one shared `BatchLayout` before each forward.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# The projections a LoRA may target, in PEFT/HF naming and canonical order.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterRows:
    """Rows [start, end) of a fused batch belong to adapter `name`."""

    name: str
    start: int
    end: int


@dataclass
class BatchLayout:
    """Which rows of the current fused batch belong to which adapter; shared by all wrappers."""

    rows: list[AdapterRows] = field(default_factory=list)


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def dropout_mask(like: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted-dropout mask shaped like `like`: 0 with probability p, else 1 / (1 - p)."""
    keep = torch.empty_like(like).bernoulli_(1.0 - p, generator=generator)
    return keep.div_(1.0 - p)


def lora_delta(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """scale * B(A(x * mask)) for x [..., in], A [r, in], B [out, r] -> [..., out].

    The weights are cast to the activation dtype (LoRA weights live in fp32 for the
    optimizer; autograd casts their gradients back to fp32).
    """
    if mask is not None:
        x = x * mask
    hidden = F.linear(x, lora_A.to(x.dtype))  # [..., r]
    return F.linear(hidden, lora_B.to(x.dtype)) * scale  # [..., out]


class LoraWeights(nn.Module):
    """One adapter's A and B for one target linear, initialised as PEFT does (B = 0)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 use_rslora: bool, seed: int, device: torch.device | str | None = None):
        super().__init__()
        self.r = r
        self.scale = lora_scale(r, alpha, use_rslora)
        self.dropout = dropout
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=torch.float32))
        # PEFT: kaiming_uniform_(A, a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)). Drawn from a
        # generator seeded by (adapter, module) so the values do not depend on other adapters
        # or on which pipeline stage builds this module.
        generator = torch.Generator(device="cpu").manual_seed(seed)
        bound = 1.0 / math.sqrt(in_features)
        init = torch.empty(r, in_features).uniform_(-bound, bound, generator=generator)
        with torch.no_grad():
            self.lora_A.copy_(init)
        # Dropout masks come from the adapter's own generator (set by the adapter), so the
        # sequence of masks an adapter sees does not depend on the other adapters.
        self.generator: torch.Generator | None = None


class LoraLinear(nn.Module):
    """A frozen `nn.Linear` plus any number of adapters, each applied to its rows of the batch."""

    def __init__(self, base: nn.Module, layout: BatchLayout):
        super().__init__()
        self.base = base
        self.layout = layout
        # A plain dict, not a ModuleDict: adapter names may contain dots, and the adapters'
        # weights belong to their `Adapter` objects, not to the base model's state dict.
        self.adapters: dict[str, LoraWeights] = {}

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, S, in]
        y = self.base(x)  # [B, S, out], one matmul for every adapter's rows
        if not y.requires_grad:
            # F.linear on 3-D input returns an autograd view of a 2-D result; an in-place add
            # of a grad-requiring delta into such a view is refused. detach() makes it a plain
            # tensor again without copying (the base path needs no gradient here anyway).
            y = y.detach()
        for rows in self.layout.rows:
            weights = self.adapters.get(rows.name)
            if weights is None:
                continue
            x_rows = x[rows.start:rows.end]  # [b, S, in]
            mask = None
            if self.training and weights.dropout > 0:
                mask = dropout_mask(x_rows, weights.dropout, weights.generator)
            delta = lora_delta(x_rows, weights.lora_A, weights.lora_B, weights.scale, mask)
            # In place on the base output: the base matmul's backward does not need its output,
            # and a slice add avoids concatenating a full-size copy per adapter.
            y[rows.start:rows.end] += delta.to(y.dtype)
        return y


def module_seed(adapter_seed: int, module_path: str) -> int:
    """Seed for one adapter's weights in one module, stable across processes and stages."""
    return (adapter_seed ^ (zlib.crc32(module_path.encode()) * 0x9E3779B1)) % (2**63)


def inject_lora(model: nn.Module, layout: BatchLayout) -> dict[str, LoraLinear]:
    """Wrap every target projection of `model` in a LoraLinear sharing `layout`.

    Returns {module path (HF name, e.g. 'model.layers.0.self_attn.q_proj'): wrapper}. Calling
    it again returns the wrappers already in place.
    """
    wrappers: dict[str, LoraLinear] = {}
    for path, module in list(model.named_modules()):
        leaf = path.rsplit(".", 1)[-1]
        if leaf not in TARGET_MODULES:
            continue
        if isinstance(module, LoraLinear):
            wrappers[path] = module
            continue
        parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        wrapper = LoraLinear(module, layout)
        setattr(parent, leaf, wrapper)
        wrappers[path] = wrapper
    return wrappers
