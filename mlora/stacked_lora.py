"""An adapter's LoRA on stacked experts in PEFT's format (GPT-OSS, Gemma 4 26B-A4B, Llama 4).

mlora trains a LoRA per expert (each expert's projections are nn.Linear modules). GPT-OSS's
checkpoint and transformers' model stack a layer's experts into one parameter per projection
(`mlp.experts.gate_up_proj` [E, H, 2I], `mlp.experts.down_proj` [E, I, H]), and PEFT puts a LoRA
on such a parameter through `target_parameters` (peft.tuners.lora.ParamWrapper): one
`lora_A` [E * r, in] holding the experts' A one after another, and one `lora_B` [out, r * E]
whose column j * E + e is column j of expert e's B. Each expert's update is then exactly
scale * B_e A_e, which mlora's per-expert LoRA computes.

PEFT wraps the experts module once per targeted parameter, the later wrapper around the
earlier: with both targeted, gate_up_proj's LoRA sits under `experts.base_layer.` and
down_proj's under `experts.`; with one, it is under `experts.`.

Gemma 4 26B-A4B's experts are stacked the other way round (`experts.gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]: nn.Linear's layout per expert) and hang off the decoder layer itself
(`model.layers.0.experts`, beside its dense MLP). PEFT's ParamWrapper swaps in and out for
such parameters, so their LoRA has the same layout: gate_up_proj's A [E r, H], B [2I, r E].

Llama 4's experts are stacked as GPT-OSS's (`feed_forward.experts.gate_up_proj` [E, H, 2I], gate
columns then up columns; `down_proj` [E, I, H]: x @ W_e), but transformers' Llama4TextExperts
does not say so (no `is_transposed`), and PEFT's ParamWrapper then takes them as [E, out, in]
(peft.tuners.lora.layer.ParamWrapper.update_layer swaps in and out): its lora_A [E r, 2I] and
lora_B [H, r E] of gate_up_proj make the update B_e A_e [H, 2I] that x @ (W_e + s B_e A_e)
applies, x B_e A_e: its B reads the input and its A writes the output. The same update as
nn.Linear's (mlora's: s B A x, A [r, H], B [2I, r]) is A = B_e^T, B = A_e^T: the factors trade
places, each transposed (SWAPPED). The router's weights scale each expert's input before it
(Llama4TextMoe: routed_in * router_scores), and so before the LoRA, in mlora as in PEFT
(models/moe.run_experts, input_weighted).
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import Tensor

from mlora.models.naming import STACKED_PROJECTIONS

# An expert's projection as mlora names the module: (the experts module, the expert, the
# projection); GPT-OSS's experts are `mlp.experts`, Gemma 4's `experts` beside the dense MLP
_EXPERT_PROJECTION = re.compile(rf"(?P<experts>model\.layers\.\d+\.(mlp\.)?experts)\.(?P<e>\d+)\."
                                rf"(?P<proj>{'|'.join(STACKED_PROJECTIONS)})")


# The families whose experts PEFT stacks the LoRA of with A and B traded (above)
SWAPPED = ("llama4_text", "llama4")


def target_parameters(projections: list[str], experts: str = "mlp.experts") -> list[str]:
    """adapter_config.json's target_parameters for these (per-expert) projections; experts: the
    experts module's path in a decoder layer (GPT-OSS's `mlp.experts`, Gemma 4's `experts`)."""
    return [f"{experts}.{p}" for p in STACKED_PROJECTIONS if p in projections]


def _wrapper_prefix(proj: str, projections: list[str]) -> str:
    """Where PEFT keeps the LoRA of `proj` under the experts module: nested ParamWrappers."""
    stacked = [p for p in STACKED_PROJECTIONS if p in projections]
    return "base_layer." * (len(stacked) - 1 - stacked.index(proj))


def split_path(path: str) -> tuple[str, int, str] | None:
    """(experts module path, expert, projection) of an expert's projection; None otherwise."""
    m = _EXPERT_PROJECTION.fullmatch(path)
    return None if m is None else (m["experts"], int(m["e"]), m["proj"])


def peft_module(path: str, projections: list[str]) -> str | None:
    """PEFT's module path of the stacked LoRA that an expert's projection is part of
    ('model.layers.0.mlp.experts.5.gate_up_proj' -> 'model.layers.0.mlp.experts.base_layer'
    with down_proj targeted too); None for any other module."""
    parts = split_path(path)
    if parts is None:
        return None
    experts, _, proj = parts
    return f"{experts}.{_wrapper_prefix(proj, projections)}".rstrip(".")


def stack(per_expert: dict[str, tuple[Tensor, Tensor]], modules: dict[str, str],
          swapped: bool = False) -> dict[str, tuple[Tensor, Tensor]]:
    """{per-expert module path: (A [r, in], B [out, r])} -> {PEFT module path: (A [E r, in],
    B [out, r E])}, experts in index order (every expert of a layer must be there); modules:
    each per-expert path's PEFT module (peft_module). swapped (Llama 4: SWAPPED): PEFT's A
    [E r, out] holds each B^T, its B [in, r E] each A^T."""
    groups: dict[str, dict[int, tuple[Tensor, Tensor]]] = defaultdict(dict)
    for path, (a, b) in per_expert.items():
        groups[modules[path]][split_path(path)[1]] = (b.t(), a.t()) if swapped else (a, b)
    out = {}
    for key, by_expert in groups.items():
        E = len(by_expert)
        assert sorted(by_expert) == list(range(E)), (key, sorted(by_expert))
        a = torch.cat([by_expert[e][0] for e in range(E)])  # [E r, in]: expert-major
        b = torch.stack([by_expert[e][1] for e in range(E)], dim=-1)  # [out, r, E]
        out[key] = (a, b.reshape(b.shape[0], -1))  # [out, r E]: column j E + e
    return out


def unstack(a: Tensor, b: Tensor, expert: int, experts: int, swapped: bool = False) -> tuple[Tensor, Tensor]:
    """One expert's (A [r, in], B [out, r]) from PEFT's stacked A [E r, in] and B [out, r E]
    (swapped: A [E r, out] and B [in, r E], stack's)."""
    a_e, b_e = a.view(experts, -1, a.shape[-1])[expert], b.view(b.shape[0], -1, experts)[:, :, expert]
    return (b_e.t(), a_e.t()) if swapped else (a_e, b_e)
