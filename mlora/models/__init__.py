"""Model families mlora implements itself, keyed by the config's `model_type`.

Each family module provides `args_from_hf_config`, `ModelArgs`, `CausalLM`,
`module_sequence` and `tensor_names`. LLaMA, Mistral, Ministral (3), Qwen2, Qwen3, Gemma 1/2/3,
Phi-3, SmolLM3, GLM-4, ChatGLM2/3, Baichuan, Granite, OLMo 2/3 and the mixture-of-experts
Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, GLM-4.5 and DeepSeek-V2/V3 differ only in switches, so one
module serves them all
(checkpoint names that differ, and GPT-OSS's stacked experts, are translated by naming.py).
"""

from __future__ import annotations

from types import ModuleType

from mlora.errors import UserError
from mlora.models import llama
from mlora.models.args import FAMILIES

SUPPORTED = set(FAMILIES)

_FAMILIES: dict[str, ModuleType] = {name: llama for name in SUPPORTED}


def family_for(model_type: str) -> ModuleType:
    """The module implementing `model_type`; UserError for anything else."""
    if model_type not in _FAMILIES:
        raise UserError(f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(SUPPORTED))})")
    return _FAMILIES[model_type]
