"""mlora's own LLaMA-family decoder: LLaMA 1/2/3, Mistral (Ministral, Ministral 3), Qwen2, Qwen3,
Qwen3.5, Gemma 1/2/3/4, Phi-3, SmolLM3, GLM-4 (and ChatGLM2/3), Baichuan, Granite, OLMo 2/3,
Mixtral, Qwen2/3-MoE, Qwen3.5-MoE, OLMoE, GPT-OSS, GLM-4.5 and DeepSeek-V2/V3 in one readable
file (DeepSeek's latent attention: mla.py; Qwen3.5's linear attention: gdn.py).

The families differ only in switches (biases, sliding windows, RoPE scaling, Qwen3's RMSNorm
of each query and key head; Gemma's (1 + w) norm weights, scaled embeddings and GELU; Gemma 2
and 3's norms around both sublayers; Gemma 2's soft-capped attention scores and logits; Gemma
3's RoPE of its own on the sliding layers; Phi-3's fused qkv_proj and gate_up_proj, partial
rotary dimensions and LongRoPE; SmolLM3's layers without RoPE; GLM's RoPE on adjacent pairs;
Baichuan 2's normalized head; Baichuan 13B's ALiBi, alibi.py; Granite's multipliers; OLMo's
norms after the sublayers; the norm layouts are args.NORM_LAYOUTS; Ministral 3's queries
scaled by position; Qwen3.5's gated attention output and its linear-attention layers; Gemma 4's
heads of two sizes, normed values and layer scalars, and 26B-A4B's experts beside the dense MLP; the
mixture-of-experts MLPs, moe.py; GPT-OSS's attention sinks, with_sink_key),
which `args_from_hf_config` (args.py) reads from a transformers config into a plain
`ModelArgs`; RoPE lives in rope.py.
Module names equal Hugging Face's, so a state-dict key is exactly the safetensors tensor
name (`model.layers.3.self_attn.q_proj.weight`; ChatGLM's and Baichuan's checkpoints, which
only their remote code reads, and the image-text ones name them otherwise: naming.py
translates), and the projections are plain
`nn.Linear` attributes that the LoRA code swaps out by name; nothing here knows about LoRA.

A `CausalLM` may hold the whole model or one pipeline stage: a contiguous run of the
module sequence `["embed", "layer.0", ..., "layer.{L-1}", "norm", "head"]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from mlora import forward_choices
from mlora.device import upload
from mlora.models.alibi import alibi_bias
from mlora.models.gdn import GatedDeltaNet, LinearMixerInputs, linear_tensor_names
from mlora.models.mla import LatentAttention, mla_tensor_names
from mlora.models.moe import BESIDE_NORMS, Gemma4Router, SparseMoE, beside_tensor_names, moe_tensor_names, run_experts
# Re-exported: the family's API (mlora.models) is this module.
from mlora.models.args import FAMILIES, ROPE_TYPES, ModelArgs, RopeArgs, args_from_hf_config  # noqa: F401
from mlora.models.rope import (apply_rope, dynamic_cos_sin_per_row, longrope_cos_sin, rope_cos_sin,  # noqa: F401
                               rope_cos_sin_at, rope_inv_freq, rotate_half, sequence_lengths)

# `enable_gqa` arrived in torch 2.5; older builds (a user's CUDA torch) repeat K/V instead.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


# ----------------------------------------------------------------------------- stages


def module_sequence(args: ModelArgs) -> list[str]:
    """The order a full forward runs in; a pipeline stage is a contiguous slice of it."""
    return ["embed", *(f"layer.{i}" for i in range(args.num_layers)), "norm", "head"]


def _check_parts(args: ModelArgs, parts: Sequence[str] | None) -> list[str]:
    seq = module_sequence(args)
    if parts is None:
        return seq
    unknown = [p for p in parts if p not in seq]
    if unknown:
        raise ValueError(f"unknown model parts {unknown}; expected names from {seq[0]}..{seq[-1]}")
    idx = sorted({seq.index(p) for p in parts})
    if not idx or idx != list(range(idx[0], idx[-1] + 1)):
        raise ValueError(f"a stage must be a non-empty contiguous run of {seq}, got {list(parts)}")
    return [seq[i] for i in idx]


def tensor_names(args: ModelArgs, parts: Sequence[str] | None = None) -> list[str]:
    """The safetensors names a stage reads, in module order. A tied head reads the embedding."""
    names: list[str] = []
    for part in _check_parts(args, parts):
        if part == "embed":
            names.append("model.embed_tokens.weight")
            if args.per_layer_input_size:  # Gemma 4 E2B/E4B: the per-layer inputs' table, projection, norm
                names += [f"model.{n}.weight" for n in ("embed_tokens_per_layer", "per_layer_model_projection",
                                                         "per_layer_projection_norm")]
        elif part == "norm":
            names.append("model.norm.weight")
        elif part == "head":
            names.append("model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight")
        else:
            p = f"model.layers.{part.split('.')[1]}."
            attn = ("qkv",) if args.fused_qkv else ("q", "k", "v")
            linear = args.is_linear(int(part.split(".")[1]))
            if linear:  # Qwen3.5's Gated DeltaNet layers
                names += linear_tensor_names(args, p + "linear_attn.")
            elif args.mla:  # DeepSeek-V3's latent attention
                names += mla_tensor_names(args, p + "self_attn.")
            else:
                if args.values_from_keys(int(part.split(".")[1])):  # (Gemma 4's full layers: no v_proj)
                    attn = ("q", "k")
                if args.kv_source(int(part.split(".")[1])) is not None:  # (Gemma 4's KV-shared layers)
                    attn = ("q",)
                for proj, bias in [*((a, args.attention_bias) for a in attn), ("o", args.o_proj_bias)]:
                    names += [p + f"self_attn.{proj}_proj.weight"] + ([p + f"self_attn.{proj}_proj.bias"] if bias
                                                                      else [])
            if args.qk_norm and not linear:
                names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"][
                    :1 if args.kv_source(int(part.split(".")[1])) is not None else 2]
            if args.attn_sinks:
                names.append(p + "self_attn.sinks")
            if args.moe_layers[int(part.split(".")[1])]:
                names += moe_tensor_names(args, p + "mlp.")
            else:
                for proj in ("gate_up", "down") if args.fused_gate_up else ("gate", "up", "down"):
                    names += [p + f"mlp.{proj}_proj.weight"] + ([p + f"mlp.{proj}_proj.bias"] if args.mlp_bias else [])
            names += [p + f"{norm}.weight" for norm in args.norm_names if norm is not None]
            if args.moe_beside_mlp:  # Gemma 4 26B-A4B's experts
                names += beside_tensor_names(args, p)
            if args.per_layer_input_size:
                names += [p + f"{n}.weight" for n in PER_LAYER_INPUT_MODULES]
            if args.layer_scalar:
                names.append(p + "layer_scalar")
    return list(dict.fromkeys(names))  # drop the duplicate of a tied embed + head


# ----------------------------------------------------------------------------- masks


def attention_masks(args: ModelArgs, layer_ids: Sequence[int], attention_mask: Tensor | None,
                    seq_len: int, device: torch.device) -> dict[int, Tensor | None]:
    """The SDPA mask of each layer in `layer_ids` (shared between layers with the same
    window): bool [B or 1, 1, S, S], True = may attend; None = plain causal.

    SDPA's `is_causal=True` (fastest kernels, no mask in memory) is exact unless a key must
    be hidden from a query that causality alone would show it: a pad token with real tokens
    after it (left padding) or a token beyond an active sliding window. Right padding is
    fine: real queries never look right, and pad queries feed only ignored positions."""
    key_ok = pos = None  # [B, 1, 1, S]; [B, S]: a left-padded row's positions (Llama 4's chunks)
    if attention_mask is not None:
        # Checked where the mask is: a mask on the host (the trainer's) costs no read back
        # from the device, which would wait for everything queued there.
        am = attention_mask.to(dtype=torch.bool)  # [B, S]
        right_padded_only = bool((am[:, 1:] <= am[:, :-1]).all())  # ones then zeros, per row
        if not right_padded_only:
            key_ok = upload(am, device)[:, None, None, :]  # a plain copy would wait for the device
            if any(args.attention_chunk[i] is not None for i in layer_ids):
                pos = upload(real_positions(am), device)
    by_window: dict[tuple[int | None, int | None], Tensor | None] = {}
    out: dict[int, Tensor | None] = {}
    for i in layer_ids:
        window, chunk = args.sliding_window[i], args.attention_chunk[i]
        if window is not None and window >= seq_len:
            window = None  # the window cannot cut anything at this length
        if chunk is not None and chunk >= seq_len:
            chunk = None  # (nor the chunk)
        if (window, chunk) not in by_window:
            by_window[window, chunk] = _build_mask(window, key_ok, seq_len, device, chunk, pos)
        out[i] = by_window[window, chunk]
    return out


def real_positions(attention_mask: Tensor) -> Tensor:
    """[B, T] int64: each token's position counted from its row's first real token (0 on the
    left padding before it), from a 0/1 attention_mask [B, T]."""
    return (attention_mask.to(torch.int64).cumsum(-1) - 1).clamp(min=0)


def same_chunk(pos: Tensor, chunk: int, queries: int) -> Tensor:
    """Llama 4's chunked attention: bool [B or 1, 1, S, T], whether the last `queries` of the
    positions pos [B or 1, T] (each token's in its sequence: chunks start at a row's first real
    token, as transformers' left-padding offset, and at each packed document's) are in the same
    chunk of `chunk` positions as each key."""
    ids = pos // chunk
    return (ids[:, -queries:, None] == ids[:, None, :])[:, None]


def _build_mask(window: int | None, key_ok: Tensor | None, seq_len: int, device: torch.device,
                chunk: int | None = None, pos: Tensor | None = None) -> Tensor | None:
    if window is None and key_ok is None and chunk is None:
        return None
    q = torch.arange(seq_len, device=device)[:, None]  # [S, 1]
    k = torch.arange(seq_len, device=device)[None, :]  # [1, S]
    allowed = k <= q  # [S, S]
    if window is not None:
        allowed = allowed & (q - k < window)
    allowed = allowed[None, None]  # [1, 1, S, S]
    if chunk is not None:  # (positions: the columns, or a left-padded row's own)
        allowed = allowed & same_chunk(k if pos is None else pos, chunk, seq_len)
    if key_ok is not None:
        # A query always sees itself, so an all-pad row still has one key and never NaN.
        allowed = (allowed & key_ok) | (q == k)  # [B, 1, S, S]
    return allowed


def document_masks(args: ModelArgs, layer_ids: Sequence[int], document_ids: Tensor,
                   attention_mask: Tensor | None, position_ids: Tensor | None = None) -> dict[int, Tensor]:
    """Masks for packed rows: bool [B, 1, S, S], True = may attend. A query sees the earlier
    keys of its own document only (and, on a sliding-window layer, only the last `window` of
    them), so several sequences share a row without seeing each other.

    document_ids [B, S]: one id per packed sequence, a separate id for padding. Positions in
    one document are consecutive columns, so the column distance q - k of two tokens of the
    same document is their position distance, and the window needs no position ids. Llama 4's
    chunks do: position_ids [B, S], each token's position in its document."""
    B, S = document_ids.shape
    device = document_ids.device
    q = torch.arange(S, device=device)[:, None]  # [S, 1]
    k = torch.arange(S, device=device)[None, :]  # [1, S]
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # [B, S(q), S(k)]
    base = same_doc & (k <= q)  # [B, S, S]
    if attention_mask is not None:
        base = base & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]  # hide pad keys
    by_window: dict[tuple[int | None, int | None], Tensor] = {}
    out: dict[int, Tensor] = {}
    for i in layer_ids:
        window, chunk = args.sliding_window[i], args.attention_chunk[i]
        if window is not None and window >= S:
            window = None  # the window cannot cut anything at this length
        if chunk is not None and chunk >= S:
            chunk = None
        if (window, chunk) not in by_window:
            allowed = base if window is None else base & (q - k < window)  # [B, S, S]
            if chunk is not None:  # (Llama 4) by each token's position in its document
                if position_ids is None:
                    raise ValueError("packed rows (document_ids) need their position_ids for chunked attention")
                allowed = allowed & same_chunk(position_ids, chunk, S)[:, 0]
            # A query always sees itself, so no row is all-False (SDPA would give NaN).
            by_window[window, chunk] = (allowed | (q == k))[:, None]  # [B, 1, S, S]
        out[i] = by_window[window, chunk]
    return out


# ----------------------------------------------------------------------------- KV cache


@dataclass
class KVCache:
    """Keys and values of the tokens a model has seen, per decoder layer, so generation runs
    each new token alone instead of the whole sequence again. Rows are the batch's rows; all
    rows share one length (left-padded prompts, one new token per row and step)."""

    layers: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # [B, nkv, T, D] each, after RoPE
    length: int = 0  # T: tokens cached per row
    # Linear-attention layers (Qwen3.5, models/gdn.py): what they carry from token to token instead
    # of keys and values: (conv state [B, conv_dim, K - 1] in the dtype, recurrent state [B, Hv, Dk, Dv] fp32)
    states: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def extend(self, layer_id: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The layer's keys and values with k, v [B, nkv, S, D] appended; kept for the next call."""
        past = self.layers.get(layer_id)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # [B, nkv, T + S, D]
        self.layers[layer_id] = (k, v)
        return k, v


def cached_masks(args: ModelArgs, layer_ids: Sequence[int], attention_mask: Tensor | None, past: int,
                 seq_len: int, device: torch.device) -> dict[int, Tensor]:
    """Masks for `seq_len` new queries after `past` cached tokens: bool [B or 1, 1, S, past + S],
    True = may attend. Always explicit: SDPA's is_causal aligns queries with the first keys,
    not the last. attention_mask [B, past + S] covers every key, cached ones included."""
    q = torch.arange(past, past + seq_len)[:, None]  # [S, 1] positions of the new tokens
    k = torch.arange(past + seq_len)[None, :]  # [1, T]
    key_ok = None if attention_mask is None else attention_mask.to(torch.bool)[:, None, :]  # [B, 1, T]
    # (Llama 4's chunks: by each row's positions, counted from its first real token)
    pos = k if attention_mask is None else real_positions(attention_mask)  # [B or 1, T]
    out, by_window = {}, {}
    for i in layer_ids:
        window, chunk = args.sliding_window[i], args.attention_chunk[i]
        if (window, chunk) not in by_window:
            allowed = (k <= q)[None]  # [1, S, T]
            if window is not None:
                allowed = allowed & (q - k < window)
            if chunk is not None:
                allowed = allowed & same_chunk(pos, chunk, seq_len)[:, 0]  # [B or 1, S, T]
            allowed = allowed if key_ok is None else (allowed & key_ok) | (q == k)[None]  # [B, S, T]
            by_window[window, chunk] = upload(allowed[:, None], device)  # [B, 1, S, T]
        out[i] = by_window[window, chunk]
    return out


# ----------------------------------------------------------------------------- recompute


def checkpointed_layer(layer: nn.Module, generators: Sequence[torch.Generator], *inputs: Tensor) -> Tensor:
    """Run `layer(*inputs)` under activation checkpointing (non-reentrant): its activations
    are dropped after the forward and recomputed during the backward.

    torch's checkpoint replays the global CPU/CUDA RNG, but LoRA dropout draws from the
    adapters' own generators (`generators`), which it does not know. So: snapshot them before
    the first forward; rewind them to that snapshot for the recomputation, which then draws
    the very masks the first forward used; and afterwards put them back where they were just
    before the recomputation, so the draws of later layers and later steps are untouched. The
    LoRA kernel each input group ran is replayed too (forward_choices.py): a Triton kernel that
    failed in between would otherwise change how the recomputation draws its masks."""
    before = [g.get_state() for g in generators]
    first = True
    choices = forward_choices.ForwardChoices()

    def run(*args: Tensor) -> Tensor:
        nonlocal first
        if first:
            first = False
            with forward_choices.noting(choices):
                return layer(*args)
        now = [g.get_state() for g in generators]
        for g, state in zip(generators, before):
            g.set_state(state)
        try:
            with forward_choices.replaying(choices):
                return layer(*args)
        finally:  # also when checkpoint's early stop ends the recomputation midway
            for g, state in zip(generators, now):
                g.set_state(state)

    return torch.utils.checkpoint.checkpoint(run, *inputs, use_reentrant=False)


# ----------------------------------------------------------------------------- modules


_RMS_NORM = getattr(F, "rms_norm", None)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool = False, weight_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))
        self.eps = eps
        self.gemma = gemma  # scale by (1 + w) in fp32, then cast (HF's Gemma3RMSNorm)
        self.weight_fp32 = weight_fp32  # scale by w in fp32, then cast (OLMo 2, ChatGLM, GPT-OSS)

    @classmethod
    def of(cls, args: ModelArgs, dim: int) -> RMSNorm:
        return cls(dim, args.rms_norm_eps, args.gemma_norms, args.norm_weight_fp32)

    def forward(self, x: Tensor) -> Tensor:
        # fp32 statistics even for bf16 activations; cast back before the weight, as HF does.
        # F.rms_norm is the same math (x * rsqrt(mean(x^2) + eps)); on CUDA (torch >= 2.9)
        # one fused kernel forward and one backward instead of about five elementwise passes
        # each, on the CPU the same ops as written out.
        h = x.float()
        if _RMS_NORM is not None:
            h = _RMS_NORM(h, (h.shape[-1],), eps=self.eps)
        else:  # torch < 2.4
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        if self.weight_fp32:
            return (self.weight * h).to(x.dtype)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int = 0):
        super().__init__()
        # (Gemma 4's full layers have heads and K/V heads of their own)
        self.num_heads, self.num_kv_heads = args.num_heads, args.kv_heads_of(layer_id)
        self.head_dim = args.head_dim_of(layer_id)
        q_dim, kv_dim = args.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # Gemma 4: with attention_k_eq_v its full layers have no v_proj (the values are k_proj's
        # output), and the values are normed per head without a weight
        self.values_from_keys, self.v_norm = args.values_from_keys(layer_id), args.v_norm
        # Gemma 4's KV sharing: a shared layer has no k/v projections (it attends to its source
        # layer's keys and values); a source layer hands its keys and values on
        self.kv_shared = args.kv_source(layer_id) is not None
        self.keeps_kv = any(args.kv_source(i) == layer_id for i in range(args.num_layers))
        self.fused = args.fused_qkv
        self.output_gate = args.attn_output_gate  # Qwen3.5: sigmoid(gate) times SDPA's output
        if self.fused:  # Phi-3, ChatGLM, Baichuan: one projection, split into q, k, v
            self.qkv_proj = nn.Linear(args.hidden_size, q_dim + 2 * kv_dim, bias=args.attention_bias)
            self.splits = (q_dim, kv_dim, kv_dim)
        else:
            # (Qwen3.5: each head's query and output gate, [q_h | gate_h])
            self.q_proj = nn.Linear(args.hidden_size, q_dim * (2 if self.output_gate else 1), bias=args.attention_bias)
            if not self.kv_shared:
                self.k_proj = nn.Linear(args.hidden_size, kv_dim, bias=args.attention_bias)
            if not self.values_from_keys and not self.kv_shared:
                self.v_proj = nn.Linear(args.hidden_size, kv_dim, bias=args.attention_bias)
        self.o_proj = nn.Linear(q_dim, args.hidden_size, bias=args.o_proj_bias)
        if args.qk_norm:  # per head ([D] weights), or over the whole projection (OLMo 2)
            per_head = args.qk_norm_per_head
            self.q_norm = RMSNorm.of(args, self.head_dim if per_head else q_dim)
            if not self.kv_shared:
                self.k_norm = RMSNorm.of(args, self.head_dim if per_head else kv_dim)
        self.eps = args.rms_norm_eps
        self.qk_norm = args.qk_norm and args.qk_norm_per_head
        self.qk_norm_whole = args.qk_norm and not args.qk_norm_per_head
        self.scale = args.attn_scale  # None: SDPA's 1 / sqrt(D)
        self.rope_interleaved = args.rope.interleaved
        self.qk_l2_norm = args.qk_l2_norm  # (Llama 4: after RoPE, on its RoPE layers)
        self.q_scale_fp32 = bool(args.query_scale_offset)  # (Llama 4 scales in fp32, then casts)
        self.softcap = args.attn_softcap
        if args.attn_sinks:  # GPT-OSS: one learnt logit per head in every softmax's denominator
            self.sinks = nn.Parameter(torch.zeros(args.num_heads))
        self.has_sinks = args.attn_sinks

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None = None, layer_id: int = 0, q_scale: Tensor | None = None,
                shared_kv: tuple[Tensor, Tensor] | None = None) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        """q_scale: each query's factor after RoPE ([S, 1] or [B, 1, S, 1]; Ministral 3), or None.
        shared_kv: a KV-shared layer's keys and values, its source layer's [B, nkv, T, D] each
        (Gemma 4). A source layer returns (output, (its keys, its values)) to hand on."""
        B, S, _ = x.shape  # x [B, S, H]
        if self.kv_shared:  # (Gemma 4: per-head q norms, RoPE; the source layer's keys, its cache's included)
            q = self.q_norm(self.q_proj(x).view(B, S, self.num_heads, self.head_dim)).transpose(1, 2)  # [B, nh, S, D]
            if cos is not None:
                q = apply_rope(q, cos, sin, self.rope_interleaved).to(x.dtype)
            return self._attend(q, *shared_kv, mask, None)
        gate = None
        if self.fused:
            q, k, v = self.qkv_proj(x).split(self.splits, dim=-1)  # [B, S, nh*D], [B, S, nkv*D] x 2
        else:
            q, k = self.q_proj(x), self.k_proj(x)
            v = k if self.values_from_keys else self.v_proj(x)
            if self.output_gate:
                q, gate = q.view(B, S, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)  # [B, S, nh, D] each
                gate = gate.reshape(B, S, self.num_heads * self.head_dim)  # [B, S, nh*D]
        if self.qk_norm_whole:  # OLMo 2: over all heads at once, before the split
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.num_heads, self.head_dim)  # [B, S, nh, D]
        k = k.view(B, S, self.num_kv_heads, self.head_dim)  # [B, S, nkv, D]
        if self.qk_norm:  # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, nh, S, D], [B, nkv, S, D]
        v = v.view(B, S, self.num_kv_heads, self.head_dim)  # [B, S, nkv, D]
        if self.v_norm:  # Gemma 4: each value head normed, without a weight
            v = (v.float() * torch.pow(v.float().pow(2).mean(-1, keepdim=True) + self.eps, -0.5)).type_as(v)
        v = v.transpose(1, 2)  # [B, nkv, S, D]
        if cos is not None:  # (a SmolLM3 layer without position encoding)
            q, k = apply_rope(q, cos, sin, self.rope_interleaved), apply_rope(k, cos, sin, self.rope_interleaved)
            q, k = q.to(v.dtype), k.to(v.dtype)  # fp32 tables (OLMo 2) turn in fp32; back to the dtype
            if self.qk_l2_norm:
                q, k = l2_norm(q, self.eps), l2_norm(k, self.eps)
        if q_scale is not None:  # (Ministral 3: cast first, as transformers; Llama 4: cast after)
            q = (q * q_scale).to(q.dtype) if self.q_scale_fp32 else q * q_scale.to(q.dtype)
        if cache is not None:
            k, v = cache.extend(layer_id, k, v)  # [B, nkv, T, D]: the cached tokens' too
        y = self._attend(q, k, v, mask, gate)
        return (y, (k, v)) if self.keeps_kv else y

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, gate: Tensor | None) -> Tensor:
        """o_proj of the attention of q [B, nh, S, D] to k, v [B, nkv, T, D]."""
        B, _, S, _ = q.shape
        scale = self.scale
        if self.has_sinks:  # (+1 key, +8 dims: the scale must be the real head size's; mask: sink_masks')
            scale = self.head_dim ** -0.5 if scale is None else scale
            q, k, v = with_sink_key(q, k, v, self.sinks, scale)
        n_rep = self.num_heads // self.num_kv_heads
        if self.softcap is not None:
            y = softcapped_attention(q, k, v, mask, scale, self.softcap)
        elif mask is None and _SDPA_HAS_GQA and self.head_dim <= GQA_MAX_HEAD_DIM:
            # The causal kernels read grouped K/V natively (FlashAttention up to heads of 256;
            # beyond, only the memory-efficient kernel runs, and not with grouped K/V: SDPA
            # would fall back to plain math, [S, S] scores per head, as on Gemma 4's full layers).
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=n_rep > 1)
        else:
            # With an explicit mask the memory-efficient kernel is the one that applies, and
            # it wants as many K/V heads as query heads.
            if n_rep > 1:
                k = k.repeat_interleave(n_rep, dim=1)  # [B, nh, S, D]
                v = v.repeat_interleave(n_rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
        if self.has_sinks:
            y = y[..., :self.head_dim]  # the padded dims' outputs are zero: v is padded with zeros
        y = y.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim)  # [B, S, nh*D]
        if gate is not None:
            y = y * torch.sigmoid(gate)
        return self.o_proj(y)


# Gemma 4 E2B/E4B: a decoder layer's per-layer input gate, its projection back and the norm of that
PER_LAYER_INPUT_MODULES = ("per_layer_input_gate", "per_layer_projection", "post_per_layer_input_norm")


def l2_norm(x: Tensor, eps: float) -> Tensor:
    """Llama 4's weightless norm of each head (Llama4TextL2Norm): in fp32, then cast."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


GQA_MAX_HEAD_DIM = 256  # the largest head FlashAttention takes (SDPA's grouped-K/V path needs it)
SINK_PAD = 8  # the sink's extra query/key dim, padded so that D stays a multiple of 8 for SDPA's kernels


def with_sink_key(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """GPT-OSS's attention sinks as one more key that SDPA's kernels can take: a head's softmax
    gets exp(sinks[h]) added to its denominator, as if a key with score sinks[h] and a zero value
    were there. q [B, nh, S, D]; k, v [B, nkv, T, D]; sinks [nh]; scale: the attention's (SDPA
    must be given it: D grows). The mask must show every query the sink (sink_masks).

    The sink key is a unit vector in an extra dimension, in which each query holds its head's
    sink / scale: q'.k'_sink * scale = sinks[h], and every real key is 0 there, so no real score
    changes. The sink's value is zero. Unlike an additive bias (a float mask per head, [B, nh, S,
    T+1]), this adds only a key and D -> D + 8 (the extra dim, padded for SDPA's kernels: 12.5%
    more attention FLOPs at D = 64). The mask is explicit on every layer, so K/V are repeated to
    the query heads as with any explicit mask (Attention.forward), and FlashAttention, which
    takes no mask, does not apply on CUDA (the memory-efficient kernel does).
    Returns (q' [B, nh, S, D+8], k' [B, nkv, T+1, D+8], v' [B, nkv, T+1, D+8]); the output's first
    D dims are the attention, its others zero."""
    B, nh, S, D = q.shape
    nkv = k.shape[1]
    logit = (sinks.to(q.dtype) / scale).view(1, nh, 1, 1).expand(B, nh, S, 1)  # [B, nh, S, 1]
    q = torch.cat([q, logit, q.new_zeros(B, nh, S, SINK_PAD - 1)], dim=-1)  # [B, nh, S, D+8]
    sink_key = k.new_zeros(B, nkv, 1, D + SINK_PAD)
    sink_key[..., D] = 1.0
    k = torch.cat([F.pad(k, (0, SINK_PAD)), sink_key], dim=2)  # [B, nkv, T+1, D+8]
    v = F.pad(v, (0, SINK_PAD, 0, 1))  # [B, nkv, T+1, D+8]: the sink's value is zero
    return q, k, v


def sink_masks(masks: dict[int, Tensor | None], S: int, T: int, device: torch.device) -> dict[int, Tensor]:
    """The layers' masks with a last key column that every query sees (the sink of with_sink_key):
    bool [B or 1, 1, S, T+1]; a None mask (causal: the last S of T keys) made explicit. Built once
    per distinct mask and forward, not per layer."""
    padded: dict[int, Tensor] = {}
    out = {}
    for i, mask in masks.items():
        if id(mask) not in padded:
            if mask is None:
                mask = torch.ones(S, T, dtype=torch.bool, device=device).tril(T - S)[None, None]  # [1, 1, S, T]
            padded[id(masks[i])] = F.pad(mask, (0, 1), value=True)
        out[i] = padded[id(masks[i])]
    return out


def softcapped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None,
                         cap: float) -> Tensor:
    """Attention with Gemma 2's scores cap * tanh(s / cap), in the ops and dtypes of HF's eager
    path (scores in the dtype, softmax in fp32). q [B, nh, S, D]; k, v [B, nkv, T, D]; mask
    bool [B or 1, 1, S, T] (True = may attend) or None (causal, the last S of T keys).
    Returns [B, nh, S, D]. It keeps [B, nh, S, T] scores for the backward: memory grows with
    the square of the length, unlike SDPA's kernels."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)  # [B, nh, T, D]
        v = v.repeat_interleave(n_rep, dim=1)
    S, T = q.shape[2], k.shape[2]
    scores = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # [B, nh, S, T]
    scores = torch.tanh(scores / cap) * cap
    if mask is None:
        mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(T - S)  # [S, T]
    # HF adds the dtype's minimum where a key is hidden; a row with no visible key (a pad
    # query) then spreads evenly instead of giving NaN.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, intermediate_size: int | None = None, fused: bool | None = None):
        """fused: gate and up as one gate_up_proj (None: as args.fused_gate_up says; Gemma 4
        26B-A4B's experts are fused while its dense MLP is not)."""
        super().__init__()
        inter = args.intermediate_size if intermediate_size is None else intermediate_size  # (an MoE expert's own)
        self.fused = args.fused_gate_up if fused is None else fused
        if self.fused:  # Phi-3, GLM, ChatGLM: [gate; up] in one projection
            self.gate_up_proj = nn.Linear(args.hidden_size, 2 * inter, bias=args.mlp_bias)
        else:
            self.gate_proj = nn.Linear(args.hidden_size, inter, bias=args.mlp_bias)
            self.up_proj = nn.Linear(args.hidden_size, inter, bias=args.mlp_bias)
        self.down_proj = nn.Linear(inter, args.hidden_size, bias=args.mlp_bias)
        self.gelu = args.hidden_act == "gelu_tanh"
        self.interleaved = args.gate_up_interleaved  # GPT-OSS: gate, up, gate, up, ... columns
        self.limit, self.alpha = args.glu_limit, args.glu_alpha

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            gate, up = self.split(self.gate_up_proj(x))
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.glu(gate, up))

    def split(self, gate_up: Tensor) -> tuple[Tensor, Tensor]:
        """[..., 2I] of a fused gate_up_proj -> (gate, up) [..., I] each."""
        if self.interleaved:  # GPT-OSS: gate, up, gate, up, ... columns
            return gate_up[..., ::2], gate_up[..., 1::2]
        return gate_up.chunk(2, dim=-1)

    def glu(self, gate: Tensor, up: Tensor) -> Tensor:
        """down_proj's input from the gate and up projections (also models/moe.grouped_experts')."""
        if self.limit:  # GPT-OSS's clamped GLU, as transformers writes it
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)  # GeGLU / SwiGLU
        return act * up


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.sliding_window = args.sliding_window[layer_id]
        self.linear = args.is_linear(layer_id)
        if self.linear:  # Qwen3.5: linear attention (its mask argument is then a LinearMixerInputs)
            self.linear_attn = GatedDeltaNet(args)
        else:
            self.self_attn = LatentAttention(args, RMSNorm) if args.mla else Attention(args, layer_id)
        # (Llama 4's routed experts: each one's gate and up as one gate_up_proj [2I, H], gate rows
        # first, as transformers and PEFT hold them, so that an adapter's LoRA on an expert is one
        # on the whole of it; its shared expert keeps gate_proj and up_proj, as PEFT's modules)
        self.mlp = (SparseMoE(args, lambda size: MLP(args, size),
                              (lambda size: MLP(args, size, fused=True)) if args.experts_named else None)
                    if args.moe_layers[layer_id] else MLP(args, args.mlp_size_of(layer_id)))
        # HF's names of (attention input, attention output, MLP input, MLP output) norms, by the
        # layout: LLaMA norms each sublayer's input; Gemma 2/3 and GLM-4-0414 also its output
        # before the residual add; OLMo 2/3 only its output.
        self.norms = args.norm_names
        for name in self.norms:
            if name is not None:
                setattr(self, name, RMSNorm.of(args, args.hidden_size))
        self.residual_multiplier = args.residual_multiplier  # Granite
        self.moe_beside_mlp = args.moe_beside_mlp
        if self.moe_beside_mlp:  # Gemma 4 26B-A4B: routed experts beside the dense MLP, three norms around them
            self.router = Gemma4Router(args)
            # Each expert's gate and up as one gate_up_proj [2I, H] (gate rows first), as transformers
            # and PEFT hold them: an adapter's LoRA on an expert is one on the whole of it (lora_moe.py)
            self.experts = nn.ModuleList(MLP(args, args.moe_intermediate_size, fused=True)
                                         for _ in range(args.num_experts))
            # Set by lora.inject_lora (lora_moe.ExpertRouting), as on a SparseMoE: each adapter's
            # LoRA on an expert applies to its own tokens among those routed there
            self.routing_hook = None
            for name in BESIDE_NORMS:
                setattr(self, name, RMSNorm.of(args, args.hidden_size))
        if args.layer_scalar:  # Gemma 4: the stream times a stored scalar after the layer (frozen, loaded)
            self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)
        if args.per_layer_input_size:  # Gemma 4 E2B/E4B: its per-layer input, gated into the stream
            self.per_layer_input_gate = nn.Linear(args.hidden_size, args.per_layer_input_size, bias=False)
            self.per_layer_projection = nn.Linear(args.per_layer_input_size, args.hidden_size, bias=False)
            self.post_per_layer_input_norm = RMSNorm.of(args, args.hidden_size)

    def _norm(self, which: int, x: Tensor) -> Tensor:
        name = self.norms[which]
        return x if name is None else getattr(self, name)(x)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | LinearMixerInputs | None,
                cache: KVCache | None = None, q_scale: Tensor | None = None, per_layer_input: Tensor | None = None,
                shared_k: Tensor | None = None,
                shared_v: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Gemma 4 E2B/E4B: per_layer_input [B, S, P] this layer's slice of the per-layer inputs;
        shared_k, shared_v the source layer's keys and values of a KV-shared layer. A source layer
        returns (output, keys, values)."""
        kv = None
        if self.linear:
            mixed = self.linear_attn(self._norm(0, x), mask, cache, self.layer_id)
        else:
            mixed = self.self_attn(self._norm(0, x), cos, sin, mask, cache, self.layer_id, q_scale,
                                   *(() if shared_k is None else ((shared_k, shared_v),)))
            if isinstance(mixed, tuple):
                mixed, kv = mixed
        attn = self._norm(1, mixed)  # [B, S, H]
        h = x + (attn if self.residual_multiplier == 1.0 else attn * self.residual_multiplier)
        mlp = self.mlp(self._norm(2, h))
        if self.moe_beside_mlp:  # (the router reads the stream h, the experts its own norm of it)
            B, S, H = h.shape
            flat = h.reshape(-1, H)
            routed = run_experts(self.experts, self.pre_feedforward_layernorm_2(flat), *self.router(flat),
                                 self.routing_hook, S)
            mlp = self.post_feedforward_layernorm_1(mlp) + self.post_feedforward_layernorm_2(routed.view(B, S, H))
        mlp = self._norm(3, mlp)
        out = h + (mlp if self.residual_multiplier == 1.0 else mlp * self.residual_multiplier)
        if per_layer_input is not None:  # (the gate's activation is the MLP's: GELU, tanh-approximated)
            gated = F.gelu(self.per_layer_input_gate(out), approximate="tanh") * per_layer_input  # [B, S, P]
            out = out + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        out = out * self.layer_scalar if hasattr(self, "layer_scalar") else out
        return out if kv is None else (out, *kv)


class CausalLM(nn.Module):
    """The whole decoder, or one pipeline stage of it (`parts`, see `module_sequence`).

    Submodules exist only for the stage's parts; their names are HF's, so
    `model.layers.4.mlp.up_proj` is the same in a stage holding layers 3..5 as in the
    whole model."""

    def __init__(self, args: ModelArgs, parts: Sequence[str] | None = None):
        super().__init__()
        self.args = args
        self.parts = _check_parts(args, parts)
        self.layer_ids = [int(p.split(".")[1]) for p in self.parts if p.startswith("layer.")]
        self.has_embed, self.has_norm, self.has_head = ("embed" in self.parts, "norm" in self.parts,
                                                        "head" in self.parts)

        self.model = nn.Module()  # holds HF's `model.` prefix
        if self.has_embed:
            self.model.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        P = args.per_layer_input_size  # Gemma 4 E2B/E4B: every layer's input of its own, from the embedding stage
        if P and self.has_embed:
            self.model.embed_tokens_per_layer = nn.Embedding(args.per_layer_vocab_size, args.num_layers * P)
            self.model.per_layer_model_projection = nn.Linear(args.hidden_size, args.num_layers * P, bias=False)
            self.model.per_layer_projection_norm = RMSNorm.of(args, P)
        if P and self.layer_ids and not self.has_embed:
            raise ValueError("a stage without the embedding cannot hold Gemma 4's layers with per-layer inputs")
        away = [i for i in self.layer_ids if args.kv_source(i) not in (None, *self.layer_ids)]
        if away:
            raise ValueError(f"layer {away[0]} shares the keys and values of layer {args.kv_source(away[0])}, "
                             "which is not in this stage")
        if self.layer_ids:
            self.model.layers = nn.ModuleDict({str(i): DecoderLayer(args, i) for i in self.layer_ids})
        if self.has_norm:
            self.model.norm = RMSNorm.of(args, args.hidden_size)
        if self.has_head:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()
        # Activation checkpointing of each decoder layer while grad is enabled (the trainer
        # sets it from the config). `rng_generators`: the generators a layer's forward draws
        # from besides torch's global RNG (the adapters' LoRA dropout generators), by layer
        # index ({i: [...]}, adapter.layer_generators) or one list for every layer, so the
        # recomputation can replay exactly the same random masks.
        self.recompute = False
        self.rng_generators: dict[int, list[torch.Generator]] | list[torch.Generator] = []

    def rope_tables(self, h: Tensor, past: int, attention_mask: Tensor | None, position_ids: Tensor | None,
                    document_ids: Tensor | None, cached: bool = False) -> dict:
        """{RopeArgs (None: no RoPE) -> (cos, sin)} for this stage's layers and the S new tokens
        of h [B, S, H]: [S, R] for shared positions past.., else [B, 1, S, R]. cached: the
        forward fills a KV cache (generation)."""
        S = h.shape[1]
        pos = None if position_ids is None else position_ids.to(h.device)
        dtype = torch.float32 if self.args.rope_fp32 else h.dtype
        tables = {None: (None, None)}
        for rope in self.args.ropes_of(self.layer_ids):
            dim = rope.dim or self.args.rope_dim  # (Gemma 4's layer types turn heads of two sizes)
            if rope.type == "longrope":  # factors by each sequence's own length
                lengths = upload(sequence_lengths(attention_mask, position_ids, document_ids, B=h.shape[0],
                                                  T=past + S), h.device)
                tables[rope] = longrope_cos_sin(rope, dim, lengths, past, S, pos, dtype)
            elif rope.type == "dynamic" and cached and attention_mask is not None:
                # Dynamic NTK's frequencies change as the sequence grows while the cached keys keep
                # the ones they were turned with, so past the trained context a query's angle to
                # its keys is not relative: a left-padded row turned by the batch's columns and
                # length gave other logits than the row alone. Each row turns by its own positions
                # (from its first real token) and its own length, as transformers' generate turns
                # the row alone (as LongRoPE picks its factors per row).
                tables[rope] = dynamic_cos_sin_per_row(rope, dim, attention_mask, S, h.device, dtype)
            elif pos is None:
                cos, sin = rope_cos_sin(rope, dim, past + S, h.device, dtype)  # [T, R]
                tables[rope] = cos[past:], sin[past:]
            else:
                tables[rope] = rope_cos_sin_at(rope, dim, pos, dtype)
        return tables

    def query_scale(self, h: Tensor, past: int, position_ids: Tensor | None,
                    attention_mask: Tensor | None) -> Tensor | None:
        """Ministral 3's factor on each query (transformers' get_llama_4_attn_scale), fp32:
        1 + beta * log(1 + floor(position / period)) for the S new tokens of h [B, S, H], [S, 1]
        at positions past.. or [B, 1, S, 1] at position_ids; Llama 4's (its NoPE layers'
        attn_temperature_tuning) log1p(floor((position + 1) / period)) * beta + 1, as
        transformers writes it; None for the other families.

        The first scale of an absolute position: a row's tokens are counted from its first real
        one (attention_mask [B, past + S]), so that left padding, which depends on the other rows
        of a batch, changes nothing (RoPE, relative, never minded it). transformers' generate
        counts them so for Ministral 3 (by position_ids); its Llama 4 counts columns, in its
        forward and in generate alike (left padding shifts a row's scale)."""
        if not self.args.query_scale_beta:
            return None
        S = h.shape[1]
        if position_ids is not None:
            pos = position_ids.to(h.device, torch.float32)[:, None, :, None]  # [B, 1, S, 1]
        elif attention_mask is not None:  # (real tokens counted: equal to the columns without left padding)
            pos = real_positions(attention_mask.to(h.device))[:, -S:].float()[:, None, :, None]  # [B, 1, S, 1]
        else:
            pos = torch.arange(past, past + S, device=h.device, dtype=torch.float32)[:, None]  # [S, 1]
        if self.args.query_scale_offset:  # Llama 4: floor((position + 1) / period), log1p (one ulp apart from log)
            floor = torch.floor((pos + self.args.query_scale_offset) / self.args.query_scale_period)
            return torch.log1p(floor) * self.args.query_scale_beta + 1.0
        return 1 + self.args.query_scale_beta * torch.log(1 + torch.floor(pos / self.args.query_scale_period))

    def per_layer_inputs(self, ids: Tensor, h: Tensor) -> Tensor:
        """Gemma 4 E2B/E4B's per-layer inputs [B, S, L, P] of input_ids [B, S] and the (scaled)
        embedding output h [B, S, H], as transformers rounds them: the table's rows times sqrt(P)
        (cast to the dtype), plus the normed projection of h times H^-0.5, both times 2^-0.5."""
        B, S = ids.shape
        P, L = self.args.per_layer_input_size, self.args.num_layers
        table = self.model.embed_tokens_per_layer(ids)  # [B, S, L P]
        table = table * torch.tensor(P ** 0.5, dtype=torch.float32).to(table.dtype)
        proj = self.model.per_layer_model_projection(h) * self.args.hidden_size ** -0.5  # [B, S, L P]
        proj = self.model.per_layer_projection_norm(proj.view(B, S, L, P))
        return (proj + table.view(B, S, L, P)) * 2.0 ** -0.5

    def tie_weights(self) -> None:
        """Share the embedding with the head when both live here (a head-only stage of a tied
        model keeps its own copy, loaded from `model.embed_tokens.weight`)."""
        if self.args.tie_word_embeddings and self.has_embed and self.has_head:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                document_ids: Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False, head: bool = True) -> Tensor:
        """x: input_ids [B, S] if the stage has the embedding, else hidden states [B, S, H].
        attention_mask [B, S]: 1 = real token (None = all real).
        position_ids [B, S] int64: RoPE positions (None = 0..S-1 in every row); packed rows
        restart at 0 for each sequence.
        document_ids [B, S] int: a token attends only to earlier tokens with the same id (None =
        the whole row is one sequence); padding carries an id of its own.
        cache: keys and values of the tokens before x (KVCache, for generation): x holds the
        next S tokens of every row, at positions cache.length.., and attention_mask covers the
        cached tokens too [B, cache.length + S]; the cache takes x's keys and values.
        last_only: the norm and head run on the last position only (generation needs no more;
        a long prompt's [B, S, V] logits would be most of its memory).
        head: False stops after the final norm, so that the loss can run the head a few tokens
        at a time (loss.py: a batch's [N, V] logits never exist whole); see `logits`.
        Returns logits [B, S, V] (S = 1 with last_only) if the stage has the head and `head`,
        else hidden states [B, S, H].

        Under torch.inference_mode it runs as under no_grad instead: what the forward makes once
        and keeps (the LoRA ops' device constants and weight casts, the experts' stacks) would
        otherwise be inference tensors, which a later training forward cannot save."""
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return self.forward(x, attention_mask, position_ids, document_ids, cache, last_only, head)
        h = self.model.embed_tokens(x) if self.has_embed else x  # [B, S, H]
        if self.has_embed and self.args.embed_scale:
            # sqrt(H) as HF rounds it: an fp32 scalar cast to the dtype (55.4 -> 55.5 in bf16)
            h = h * torch.tensor(self.args.hidden_size ** 0.5, dtype=torch.float32).to(h.dtype)
        if self.has_embed and self.args.embedding_multiplier != 1.0:  # Granite, as HF: times a Python float
            h = h * self.args.embedding_multiplier
        per_layer = self.per_layer_inputs(x, h) if self.has_embed and self.args.per_layer_input_size else None
        if self.layer_ids:
            S = h.shape[1]
            past = 0 if cache is None else cache.length
            if cache is not None and (position_ids is not None or document_ids is not None):
                raise ValueError("a KV cache takes neither position_ids nor document_ids (packed rows)")
            if cache is not None and self.recompute and torch.is_grad_enabled():
                raise ValueError("a KV cache does not go with recompute under autograd (generation runs without grad)")
            tables = self.rope_tables(h, past, attention_mask, position_ids, document_ids, cached=cache is not None)
            q_scale = self.query_scale(h, past, position_ids, attention_mask)
            if past:
                masks = cached_masks(self.args, self.layer_ids, attention_mask, past, S, h.device)
            elif document_ids is None:
                masks = attention_masks(self.args, self.layer_ids, attention_mask, S, h.device)
            else:
                masks = document_masks(self.args, self.layer_ids, document_ids.to(h.device), attention_mask,
                                       None if position_ids is None else position_ids.to(h.device))
            if any(self.args.is_linear(i) for i in self.layer_ids):
                # Qwen3.5's linear-attention layers take the pads and documents instead of a mask
                pads = None if attention_mask is None else attention_mask[:, -S:].to(h.device, torch.bool)
                mixer_inputs = LinearMixerInputs(pads, None if document_ids is None else document_ids.to(h.device))
                masks.update({i: mixer_inputs for i in self.layer_ids if self.args.is_linear(i)})
            if self.args.attn_sinks:  # GPT-OSS: every query sees the sink key too (with_sink_key)
                masks = sink_masks(masks, S, past + S, h.device)
            if self.args.alibi:  # the bool masks become float ones carrying the biases
                biases = {}
                for i, mask in masks.items():
                    if id(mask) not in biases:  # one per distinct mask (layers share them)
                        biases[id(mask)] = alibi_bias(self.args.num_heads, mask, past, S, h.device, h.dtype)
                    masks[i] = biases[id(mask)]
            recompute = self.recompute and torch.is_grad_enabled()
            kv: dict[int, tuple[Tensor, Tensor]] = {}  # Gemma 4: source layers' keys and values, to share
            for i in self.layer_ids:
                layer = self.model.layers[str(i)]
                cos, sin = tables[self.args.rope_of(i)]
                # (Gemma 4 E2B/E4B: the layer's per-layer input [B, S, P], a shared layer's keys and values)
                more = (() if per_layer is None and not kv else
                        (None if per_layer is None else per_layer[:, :, i],
                         *kv.get(self.args.kv_source(i), (None, None))))
                scale = q_scale if self.args.query_scaled(i) else None  # (Llama 4: its NoPE layers only)
                if recompute:
                    gens = self.rng_generators
                    gens = gens.get(i, []) if isinstance(gens, dict) else gens
                    h = checkpointed_layer(layer, gens, h, cos, sin, masks[i], None, scale, *more)
                else:
                    h = layer(h, cos, sin, masks[i], cache, scale, *more)
                if isinstance(h, tuple):  # (a source layer: its keys and values too)
                    h, kv[i] = h[0], h[1:]
            if cache is not None:
                cache.length += S
        if last_only:
            h = h[:, -1:]  # [B, 1, H]
        if self.has_norm:
            h = self.model.norm(h)
        if self.has_head and head:
            h = self.logits(h)  # [B, S, V]
        return h

    def logits(self, h: Tensor) -> Tensor:
        """The head: logits [..., V] of final-normed hidden states h [..., H], with Gemma 2's
        soft cap and Granite's scaling, in the model's dtype."""
        h = self.lm_head(h)
        cap = self.args.final_softcap
        if cap is not None:  # Gemma 2
            h = torch.tanh(h / cap) * cap
        if self.args.logits_scaling != 1.0:  # Granite
            h = h / self.args.logits_scaling
        return h
