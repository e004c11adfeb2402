"""Checkpoint names of the families whose safetensors files do not use LLaMA's names.

(Mixtral's sparse MLP is `block_sparse_moe` and its experts' projections w1, w3, w2; mlora
names them as Qwen's MoE models do: `mlp.experts.{e}.gate_proj`, `up_proj`, `down_proj`.
GPT-OSS's router is `mlp.router`, and its checkpoints stack each layer's experts into one
tensor per projection, of which each of mlora's per-expert modules reads a slice
(`StackedSlice`); so may the other MoE families' (`experts_stacked`, as transformers 5 holds
them). GLM-4.5's, DeepSeek-V2/V3's and Mistral Small 4's shared experts are `mlp.shared_experts`.)

mlora's modules always carry LLaMA's names (`model.layers.3.self_attn.qkv_proj`), which the
LoRA, quantization, pipeline and memory code rely on. ChatGLM's and Baichuan's checkpoints
(read by their own remote code) and the image-text ones (Gemma 3, Mistral 3) name the same
tensors otherwise; a `Naming` translates at the two edges where names leave mlora: reading the
base's safetensors (to_checkpoint), and writing or reading a PEFT adapter, whose keys and
target_modules must be the module paths PEFT sees on the real model (to_module; the same as
the tensor names but for the image-text ones, whose transformers model nests its modules
otherwise than its files).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass


# (mlora's name, the checkpoint's), as prefixes; {i} is a decoder layer's index. The first
# pattern that matches wins, so a projection's entry comes before its layer's.
_CHATGLM = (
    ("model.embed_tokens.", "transformer.embedding.word_embeddings."),
    ("model.layers.{i}.self_attn.qkv_proj.", "transformer.encoder.layers.{i}.self_attention.query_key_value."),
    ("model.layers.{i}.self_attn.o_proj.", "transformer.encoder.layers.{i}.self_attention.dense."),
    ("model.layers.{i}.mlp.gate_up_proj.", "transformer.encoder.layers.{i}.mlp.dense_h_to_4h."),
    ("model.layers.{i}.mlp.down_proj.", "transformer.encoder.layers.{i}.mlp.dense_4h_to_h."),
    ("model.layers.{i}.", "transformer.encoder.layers.{i}."),  # input_layernorm, post_attention_layernorm
    ("model.norm.", "transformer.encoder.final_layernorm."),
    ("lm_head.", "transformer.output_layer."),
)
_BAICHUAN = (("model.layers.{i}.self_attn.qkv_proj.", "model.layers.{i}.self_attn.W_pack."),)
# Image-text checkpoints (Gemma 3's, Mistral 3's): the language model's tensors as their
# safetensors name them, and its modules as transformers' Gemma3ForConditionalGeneration /
# Mistral3ForConditionalGeneration name them (what PEFT sees)
_IMAGE_TEXT = (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))
_IMAGE_TEXT_MODULES = (("model.", "model.language_model."),)
# Mistral 3's: its language model may be Mistral Small 4's (mistral4), whose shared experts are
# `mlp.shared_experts` (below); the rule is idle for its dense language models. Its checkpoints
# name the language model either as transformers 4 (and transformers 5's save_pretrained) wrote
# them, `language_model.model.*`, or as transformers 5 holds them in memory (its modules' names),
# `model.language_model.*` with `lm_head` unprefixed (Mistral Small 4's release: `native`)
_MISTRAL3 = (("model.layers.{i}.mlp.shared_expert.", "language_model.model.layers.{i}.mlp.shared_experts."),
             *_IMAGE_TEXT)
_MISTRAL3_MODULES = (("model.layers.{i}.mlp.shared_expert.", "model.language_model.layers.{i}.mlp.shared_experts."),
                     *_IMAGE_TEXT_MODULES)
# Qwen3.5's and Gemma 4's image-text checkpoints name the language model `model.language_model.`
# (the head stays `lm_head`). For Qwen3.5, transformers' AutoModelForCausalLM builds the text
# model from them, whose modules carry mlora's names (and PEFT's adapter keys with them); for
# Gemma 4 it builds the image-text model, whose modules are named as the tensors.
_LANGUAGE_MODEL = (("model.", "model.language_model."),)
# Llama 4's sparse and dense MLPs are `feed_forward` (mlora's `mlp`), its router `feed_forward.router`;
# its image-text checkpoints (Llama4ForConditionalGeneration) name the language model's tensors and
# modules alike `language_model.model.*`
_LLAMA4 = (("model.layers.{i}.mlp.gate.", "model.layers.{i}.feed_forward.router."),
           ("model.layers.{i}.mlp.", "model.layers.{i}.feed_forward."))
_LLAMA4_IMAGE_TEXT = (*((mine, "language_model." + theirs) for mine, theirs in _LLAMA4), *_IMAGE_TEXT)
# The families whose modules (what PEFT sees) are not named as their tensors are
_MODULE_RULES = {"gemma3": _IMAGE_TEXT_MODULES, "mistral3": _MISTRAL3_MODULES, "gemma4": _LANGUAGE_MODEL,
                 "qwen3_5": (), "qwen3_5_moe": (), "llama4": _LLAMA4_IMAGE_TEXT}

# A projection's own name in each family (PEFT's target_modules match the last name part).
_LEAVES = {
    "chatglm": {"qkv_proj": "query_key_value", "o_proj": "dense", "gate_up_proj": "dense_h_to_4h",
                "down_proj": "dense_4h_to_h"},
    "baichuan": {"qkv_proj": "W_pack"},
    "mixtral": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},  # the LLaMA paper's names
}
# Mixtral's sparse MLP (block_sparse_moe) and its experts' projections; {e}: an expert
_MIXTRAL = (*((f"model.layers.{{i}}.mlp.experts.{{e}}.{mine}.",
               f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{theirs}.")
              for mine, theirs in _LEAVES["mixtral"].items()),
            ("model.layers.{i}.mlp.", "model.layers.{i}.block_sparse_moe."))
# GPT-OSS's router is `mlp.router` (mlora's `mlp.gate`); its experts are stacked (below)
_GPT_OSS = (("model.layers.{i}.mlp.gate.", "model.layers.{i}.mlp.router."),)
# DeepSeek-V2/V3's and GLM-4.5's shared experts are one MLP, `mlp.shared_experts` (mlora's
# `mlp.shared_expert`, Qwen2-MoE's name)
_SHARED_EXPERTS = (("model.layers.{i}.mlp.shared_expert.", "model.layers.{i}.mlp.shared_experts."),)
# The families whose checkpoints name tensors otherwise, and their rules
_RULES = {"chatglm": _CHATGLM, "baichuan": _BAICHUAN, "gemma3": _IMAGE_TEXT, "mistral3": _MISTRAL3,
          "qwen3_5": _LANGUAGE_MODEL, "qwen3_5_moe": _LANGUAGE_MODEL, "gemma4": _LANGUAGE_MODEL,
          "mixtral": _MIXTRAL, "gpt_oss": _GPT_OSS,
          "glm4_moe": _SHARED_EXPERTS, "deepseek_v2": _SHARED_EXPERTS, "deepseek_v3": _SHARED_EXPERTS,
          "mistral4": _SHARED_EXPERTS, "llama4_text": _LLAMA4, "llama4": _LLAMA4_IMAGE_TEXT}

# GPT-OSS stores a sparse layer's experts stacked, one tensor per projection for all experts:
# `mlp.experts.gate_up_proj` [E, in, out] and `mlp.experts.gate_up_proj_bias` [E, out] (the
# released checkpoints hold the weights in MXFP4 instead: `..._blocks` and `..._scales`, see
# mxfp4.py). mlora's experts are nn.Linear modules per expert, as for the other MoE families;
# each reads its slice of the stacked tensor (its weight transposed).
STACKED_PROJECTIONS = ("gate_up_proj", "down_proj")  # (PEFT's wrapping order, stacked_lora.py: the first innermost)
# An expert's projection as mlora names the module: (the experts module, the expert, the projection)
STACKED_EXPERT_PROJECTION = re.compile(rf"(?P<experts>model\.layers\.\d+\.mlp\.experts)\.(?P<e>\d+)\."
                               rf"(?P<proj>{'|'.join(STACKED_PROJECTIONS)})")
_STACKED = {"gpt_oss": re.compile(STACKED_EXPERT_PROJECTION.pattern + r"\.(?P<kind>weight|bias)")}
# The other MoE families' checkpoints hold the experts per expert, but transformers 5 holds them
# stacked in memory, `mlp.experts.gate_up_proj` [E, 2 * I, H] (each expert's gate rows, then its up
# rows: conversion_mapping.py's MergeModulelist(dim=0), Concatenate(dim=1)) and `mlp.experts.down_proj`
# [E, H, I], and reads checkpoints saved that way too (Qwen3.5-MoE's releases, a state_dict saved as
# is). Both are nn.Linear's layout per expert: mlora's gate_proj and up_proj are the halves of
# gate_up_proj's rows. (Mixtral's sparse MLP is then `mlp`, transformers 5's name for block_sparse_moe.)
GATE_UP_STACKED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "deepseek_v2", "deepseek_v3",
                   "mistral4", "qwen3_5_moe_text", "qwen3_5_moe", "qwen3_next",
                   "mistral3",  # (Mistral 3's: Mistral Small 4's experts; its dense models have none)
                   "gemma4_text", "gemma4",  # (Gemma 4 26B-A4B's: `layers.{i}.experts`, no `mlp.`)
                   "llama4_text", "llama4")  # (Llama 4's always, as nn.Linear's transpose: _TRANSPOSED_STACKED)
# Llama 4 stacks [E, in, out] (`feed_forward.experts.gate_up_proj` [E, H, 2 * I], gate columns then
# up columns; `down_proj` [E, I, H]): each expert's weights are the transposes of its slices
_TRANSPOSED_STACKED = ("llama4_text", "llama4")
# (Gemma 4's experts keep gate_up_proj whole: each reads its expert's whole slice)
_GATE_UP = re.compile(r"(?P<experts>model\.layers\.\d+\.(mlp\.)?experts)\.(?P<e>\d+)\."
                      r"(?P<proj>gate_up|gate|up|down)_proj\.weight")


@dataclass(frozen=True)
class StackedSlice:
    """Where a per-expert tensor of mlora lives in a checkpoint that stacks the experts."""

    tensor: str  # the stacked checkpoint tensor ('model.layers.0.mlp.experts.gate_up_proj')
    expert: int  # the index along its first dim
    transposed: bool  # a weight (stacked as [E, in, out] in full precision: nn.Linear's [out, in] is its transpose)
    half: int | None = None  # gate_up_proj [E, 2 * I, H]'s gate rows (0) or up rows (1); None: the whole slice

    def stacked_shape(self, experts: int, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The full-precision stacked tensor's shape, for `experts` slices of mlora's `shape`."""
        shape = tuple(reversed(shape)) if self.transposed else tuple(shape)
        if self.half is None:
            return (experts, *shape)
        return (experts, *shape[:-1], 2 * shape[-1]) if self.transposed else (experts, 2 * shape[0], *shape[1:])


@functools.lru_cache(maxsize=None)  # a handful of prefixes, matched against every tensor name
def _compile(prefix: str) -> re.Pattern:
    pattern = re.escape(prefix)
    for key in ("i", "e"):  # a layer's index, an expert's
        pattern = pattern.replace(re.escape("{%s}" % key), rf"(?P<{key}>\d+)")
    return re.compile(pattern)


@dataclass(frozen=True)
class Naming:
    """Translates between mlora's tensor / module names and a checkpoint's. Names are full
    paths; a module path (no '.weight') translates like its tensors."""

    family: str | None = None  # None: the checkpoint uses mlora's names
    experts_stacked: bool = False  # a GATE_UP_STACKED family's checkpoint that stacks the experts
    native: bool = False  # a mistral3 checkpoint named as transformers 5's modules (`model.language_model.*`)

    def _rules(self, modules: bool = False) -> tuple[tuple[str, str], ...]:
        if (modules or self.native) and self.family in _MODULE_RULES:
            return _MODULE_RULES[self.family]
        if self.experts_stacked and self.family == "mixtral":  # (transformers 5's names: mlora's)
            return ()
        return _RULES.get(self.family, ())

    def _translate(self, name: str, forward: bool, modules: bool = False) -> str:
        for mine, theirs in self._rules(modules):
            src, dst = (mine, theirs) if forward else (theirs, mine)
            full = name + "."  # so that a module path matches its prefix too
            m = _compile(src).match(full)
            if m:
                out = dst
                for key, value in m.groupdict().items():
                    out = out.replace("{%s}" % key, value)
                return (out + full[m.end():])[:-1]
        return name

    def to_checkpoint(self, name: str) -> str:
        """mlora's name -> the checkpoint's ('model.layers.0.self_attn.qkv_proj.weight' ->
        'transformer.encoder.layers.0.self_attention.query_key_value.weight' for ChatGLM); a
        stacked expert tensor's name for a slice of one (GPT-OSS, experts_stacked; `stacked_slice`)."""
        stacked = self.stacked_slice(name)
        return self._translate(name, forward=True) if stacked is None else stacked.tensor

    @property
    def stacks_experts(self) -> bool:
        """Whether the checkpoint (and transformers' model, and PEFT's LoRA on it) stack each
        sparse layer's experts into one parameter per projection (GPT-OSS; not PEFT's LoRA on the
        other families, whichever way their checkpoint holds them: experts_stacked)."""
        return self.family in _STACKED

    def stacked_slice(self, name: str) -> StackedSlice | None:
        """The stacked checkpoint tensor that holds this per-expert tensor of mlora, if the
        family stacks its experts ('model.layers.0.mlp.experts.5.down_proj.weight' -> expert 5 of
        'model.layers.0.mlp.experts.down_proj', transposed, for GPT-OSS; experts_stacked:
        '...experts.5.up_proj.weight' -> the up rows of expert 5 of '...experts.gate_up_proj')."""
        if self.experts_stacked:
            m = _GATE_UP.fullmatch(name)
            if m is None:
                return None
            tensor = f"{m['experts']}.{'down_proj' if m['proj'] == 'down' else 'gate_up_proj'}"
            half = {"gate": 0, "up": 1, "down": None, "gate_up": None}[m["proj"]]
            return StackedSlice(self._translate(tensor, forward=True), int(m["e"]), self.family in _TRANSPOSED_STACKED,
                                half)
        pattern = _STACKED.get(self.family)
        m = None if pattern is None else pattern.fullmatch(name)
        if m is None:
            return None
        weight = m["kind"] == "weight"
        return StackedSlice(f"{m['experts']}.{m['proj']}{'' if weight else '_bias'}", int(m["e"]), weight)

    def from_checkpoint(self, name: str) -> str:
        """The checkpoint's name -> mlora's (names no rule matches stay as they are)."""
        return self._translate(name, forward=False)

    def to_module(self, path: str) -> str:
        """mlora's module path -> the path of the same module in transformers' (or the remote
        code's) model, which PEFT's adapter keys use; the checkpoint's name but for the image-text
        models ('model.layers.0.mlp' -> 'model.language_model.layers.0.mlp')."""
        return self._translate(path, forward=True, modules=True)

    def from_module(self, path: str) -> str:
        """A module path of transformers' model -> mlora's. For Qwen3.5, whose adapters mlora
        names as its text model does (AutoModelForCausalLM), also the image-text model's
        (`model.language_model.layers.0...`), which an adapter trained on that one carries."""
        if self.family in ("qwen3_5", "qwen3_5_moe") and path.startswith("model.language_model."):
            return "model." + path[len("model.language_model."):]
        return self._translate(path, forward=False, modules=True)

    def peft_target_modules(self, projections: list[str]) -> list[str] | str:
        """adapter_config.json's target_modules for these projections: their names, or for the
        image-text models a regular expression that PEFT matches against whole module paths,
        so that the vision tower's q/k/v_proj stay untouched."""
        leaves = [self.leaf(p) for p in projections]
        if not _MODULE_RULES.get(self.family):  # (PEFT's model has no vision tower)
            return leaves
        mlp = self.to_module("model.layers.0.mlp").rsplit(".", 1)[-1]
        if self.family == "llama4":  # its MLPs are feed_forward, and its shared expert takes LoRA too
            mlp = rf"{mlp}|{mlp}\.shared_expert"
        return rf"{re.escape(self.to_module('model.layers'))}\.\d+\.(self_attn|{mlp})\.({'|'.join(leaves)})"

    def leaf(self, projection: str) -> str:
        """The checkpoint's name of a projection ('qkv_proj' -> 'W_pack' for Baichuan)."""
        return _LEAVES.get(self.family, {}).get(projection, projection)


def naming_for(model_type: str, experts_stacked: bool = False, native: bool = False) -> Naming:
    """The family's naming; experts_stacked: of a checkpoint that stacks a GATE_UP_STACKED family's experts;
    native: of a mistral3 checkpoint that names its tensors as transformers 5's modules (NATIVE_MARK)."""
    assert not native or model_type == "mistral3", model_type
    if experts_stacked:
        assert model_type in GATE_UP_STACKED, model_type
        return Naming(model_type, experts_stacked=True, native=native)
    return Naming(model_type if model_type in _RULES else None, native=native)


# The tensor whose presence tells a `native` mistral3 checkpoint
NATIVE_MARK = "model.language_model.embed_tokens.weight"
