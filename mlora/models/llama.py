"""mlora's own LLaMA-family decoder: LLaMA 1/2/3, Mistral, Qwen2, Qwen3, Gemma 1/2/3 and Phi-3
in one readable file.

The families differ only in switches (biases, sliding windows, RoPE scaling, Qwen3's RMSNorm
of each query and key head; Gemma's (1 + w) norm weights, scaled embeddings and GELU; Gemma 2
and 3's norms around both sublayers; Gemma 2's soft-capped attention scores and logits; Gemma
3's RoPE of its own on the sliding layers; Phi-3's fused qkv_proj and gate_up_proj, partial
rotary dimensions and LongRoPE),
which `args_from_hf_config` reads from a transformers config into a plain `ModelArgs`.
Module names equal Hugging Face's, so a state-dict key is exactly the safetensors tensor
name (`model.layers.3.self_attn.q_proj.weight`), and the seven projections are plain
`nn.Linear` attributes that the LoRA code swaps out by name; nothing here knows about LoRA.

A `CausalLM` may hold the whole model or one pipeline stage: a contiguous run of the
module sequence `["embed", "layer.0", ..., "layer.{L-1}", "norm", "head"]`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from mlora.device import upload
from mlora.errors import UserError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")

# `enable_gqa` arrived in torch 2.5; older builds (a user's CUDA torch) repeat K/V instead.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


# ----------------------------------------------------------------------------- arguments


@dataclass(frozen=True)
class RopeArgs:
    type: str = "default"  # one of ROPE_TYPES
    theta: float = 10000.0
    factor: float = 1.0  # linear, dynamic, llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    # llama3: the pretraining context length; dynamic: the length beyond which the base grows;
    # longrope: the length beyond which long_factor replaces short_factor.
    original_max_position_embeddings: int | None = None
    short_factor: tuple[float, ...] | None = None  # longrope: per-frequency divisors
    long_factor: tuple[float, ...] | None = None
    attention_factor: float = 1.0  # longrope: cos and sin are scaled by it


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v_proj
    o_proj_bias: bool = False  # bias on o_proj (LLaMA's `attention_bias` sets both; Qwen2 only q/k/v)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3: an RMSNorm over each query and key head (weights [D]) before RoPE
    hidden_act: str = "silu"  # or "gelu_tanh" (Gemma's gelu_pytorch_tanh)
    # Gemma 3: norms scale by (1 + w) in fp32; the embedding output is multiplied by sqrt(H)
    # (rounded to the dtype); each sublayer's output is normed too, before the residual add
    # (post_attention_layernorm, post_feedforward_layernorm; the MLP's input norm is then
    # pre_feedforward_layernorm); attention scales by attn_scale instead of 1 / sqrt(D).
    gemma_norms: bool = False
    embed_scale: bool = False
    sandwich_norms: bool = False
    attn_scale: float | None = None
    # Gemma 2: attention scores and the final logits pass through cap * tanh(x / cap). SDPA
    # cannot do that to the scores, so those layers compute attention in plain ops.
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # Phi-3: q/k/v as one qkv_proj [q_dim + 2 kv_dim, H] and gate/up as one gate_up_proj
    # [2 I, H] (gate first); RoPE may turn only the first rotary_dim dims of each head.
    fused_projections: bool = False
    rotary_dim: int | None = None  # None: the whole head_dim
    rope: RopeArgs = field(default_factory=RopeArgs)
    local_rope: RopeArgs | None = None  # Gemma 3: the RoPE of the sliding-window layers
    sliding_window: list[int | None] = field(default_factory=list)  # per layer; None = full attention
    max_position_embeddings: int = 2048

    def __post_init__(self):
        if not self.sliding_window:
            self.sliding_window = [None] * self.num_layers

    @property
    def rope_dim(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim


def args_from_hf_config(cfg: Any) -> ModelArgs:
    """Read a transformers config (or the plain dict of a config.json) into ModelArgs.

    Each switch follows what transformers' modeling file of that family actually does, not
    just which config fields exist: e.g. Qwen2 always has q/k/v biases whatever the config
    says, and Mistral ignores `layer_types`."""
    if isinstance(cfg, Mapping):
        def get(key, default=None):
            value = cfg.get(key, default)
            return default if value is None else value
    else:
        def get(key, default=None):
            value = getattr(cfg, key, default)
            return default if value is None else value

    model_type = get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    # A config.json leaves out what equals its config class's default; those classes differ.
    family_defaults = _CONFIG_DEFAULTS.get(model_type, {})
    plain_get = get

    def get(key, default=None):
        return plain_get(key, family_defaults.get(key, default))

    if model_type in ("gemma2", "gemma3_text"):
        if get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise UserError(f"hidden_activation {get('hidden_activation')!r} is not supported (only gelu_pytorch_tanh)")
    elif model_type == "gemma":
        # GemmaConfig turns the original releases' "gelu" into the tanh approximation they meant.
        if get("hidden_act", "gelu_pytorch_tanh") not in ("gelu", "gelu_pytorch_tanh"):
            raise UserError(f"hidden_act {get('hidden_act')!r} is not supported (only gelu_pytorch_tanh)")
    elif get("hidden_act", "silu") not in ("silu", "swish"):  # transformers maps both names to SiLU
        raise UserError(f"hidden_act {get('hidden_act')!r} is not supported (only silu)")

    num_layers = int(get("num_hidden_layers"))
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    kv_heads = int(get("num_key_value_heads", heads))
    if heads % kv_heads:
        raise UserError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    max_pos = int(get("max_position_embeddings", 2048))

    if model_type == "llama":
        qkv_bias = o_bias = bool(get("attention_bias", False))
        mlp_bias = bool(get("mlp_bias", False))
        windows = [None] * num_layers
    elif model_type in ("mistral", "phi3"):
        # MistralModel and Phi3Model mask every layer with `config.sliding_window` when it is set.
        qkv_bias = o_bias = mlp_bias = False
        windows = [get("sliding_window")] * num_layers
    elif model_type == "qwen2":  # q/k/v always biased, o_proj and MLP never
        qkv_bias, o_bias, mlp_bias = True, False, False
        windows = _qwen_windows(get, num_layers)
    elif model_type == "qwen3":  # `attention_bias` on q/k/v and o_proj alike, no MLP bias
        qkv_bias = o_bias = bool(get("attention_bias", False))
        mlp_bias = False
        windows = _qwen_windows(get, num_layers)
    elif model_type == "gemma":
        if get("use_bidirectional_attention", False):
            raise UserError("use_bidirectional_attention is not supported (mlora trains causal decoders)")
        qkv_bias = o_bias = bool(get("attention_bias", False))
        mlp_bias = False
        windows = [None] * num_layers
    else:  # gemma2, gemma3_text
        if get("use_bidirectional_attention", False):
            raise UserError("use_bidirectional_attention is not supported (mlora trains causal decoders)")
        qkv_bias = o_bias = bool(get("attention_bias", False))
        mlp_bias = False
        windows = _gemma_windows(get, num_layers, 2 if model_type == "gemma2" else 6)

    head_dim = int(get("head_dim", hidden // heads))
    rope_params = get("rope_parameters") or {}
    partial = float(rope_params.get("partial_rotary_factor") or get("partial_rotary_factor", 1.0))
    rotary_dim = None
    if partial != 1.0:
        if model_type != "phi3":  # the other families' attention turns whole heads
            raise UserError(f"partial_rotary_factor other than 1.0 is not supported for {model_type}")
        rotary_dim = int(head_dim * partial)
    gemma3 = model_type == "gemma3_text"
    gemma = model_type in ("gemma", "gemma2", "gemma3_text")
    sandwich = model_type in ("gemma2", "gemma3_text")
    softcaps = {key: get(key) for key in ("attn_logit_softcapping", "final_logit_softcapping")}
    if model_type != "gemma2" and any(v is not None for v in softcaps.values()):
        raise UserError(f"logit soft-capping is not supported for {model_type} (only Gemma 2 has it)")
    rope_dim = head_dim if rotary_dim is None else rotary_dim
    full_rope, local_rope = (_gemma3_ropes(get, max_pos, rope_dim) if gemma3
                             else (_rope_args(get, max_pos, rope_dim), None))
    return ModelArgs(
        model_type=model_type,
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(get("intermediate_size")),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        o_proj_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        hidden_act="gelu_tanh" if gemma else "silu",
        gemma_norms=gemma,
        embed_scale=gemma,
        sandwich_norms=sandwich,
        attn_scale=float(get("query_pre_attn_scalar", 256)) ** -0.5 if sandwich else None,
        attn_softcap=None if softcaps["attn_logit_softcapping"] is None else float(softcaps["attn_logit_softcapping"]),
        final_softcap=None if softcaps["final_logit_softcapping"] is None else float(softcaps["final_logit_softcapping"]),
        fused_projections=model_type == "phi3",
        rotary_dim=rotary_dim,
        rope=full_rope,
        local_rope=local_rope,
        sliding_window=[int(w) if w is not None else None for w in windows],
        max_position_embeddings=max_pos,
    )


_GEMMA_DEFAULTS = {"head_dim": 256, "tie_word_embeddings": True}
_CONFIG_DEFAULTS = {"qwen3": {"head_dim": 128}, "gemma": _GEMMA_DEFAULTS, "gemma2": _GEMMA_DEFAULTS,
                    "gemma3_text": _GEMMA_DEFAULTS}


def _check_layer_types(layer_types, num_layers: int) -> None:
    if len(layer_types) != num_layers:
        raise UserError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {num_layers}")
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UserError(f"layer_types {unknown} are not supported (full_attention, sliding_attention)")


def _qwen_windows(get, num_layers: int) -> list[int | None]:
    """Qwen2/Qwen3: the config nulls sliding_window unless use_sliding_window; layer_types then
    picks the sliding layers (by default those from max_window_layers on)."""
    window = get("sliding_window") if get("use_sliding_window", False) else None
    layer_types = get("layer_types") or [
        "sliding_attention" if window is not None and i >= get("max_window_layers", 28) else "full_attention"
        for i in range(num_layers)
    ]
    _check_layer_types(layer_types, num_layers)
    return [window if t == "sliding_attention" else None for t in layer_types]


def _gemma_windows(get, num_layers: int, default_pattern: int) -> list[int | None]:
    """Gemma 2 / 3: every `sliding_window_pattern`-th layer (2nd / 6th by default) has full
    attention, the others a window, unless the config lists layer_types."""
    pattern = int(get("sliding_window_pattern", default_pattern))
    layer_types = get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    _check_layer_types(layer_types, num_layers)
    window = get("sliding_window")
    if window is None and "sliding_attention" in layer_types:
        raise UserError("layer_types has sliding_attention layers but sliding_window is not set")
    return [window if t == "sliding_attention" else None for t in layer_types]


def _gemma3_ropes(get, max_pos: int, rope_dim: int) -> tuple[RopeArgs, RopeArgs]:
    """Gemma 3's two RoPEs: full-attention layers (rope_theta 1e6 and any scaling by default)
    and sliding layers (rope_local_base_freq 1e4, never scaled). transformers 5 keeps them in
    rope_parameters by layer type; a transformers-4 config.json has rope_theta, rope_scaling and
    rope_local_base_freq."""
    params = get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = dict(get("rope_scaling") or {})
        local = {}
    full.setdefault("rope_theta", get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", get("rope_local_base_freq", 10_000.0))
    return _rope_args(get, max_pos, rope_dim, full), _rope_args(get, max_pos, rope_dim, local)


def _rope_args(get, max_pos: int, rope_dim: int, params: Mapping | None = None) -> RopeArgs:
    # transformers 5 folds `rope_theta` + `rope_scaling` into `rope_parameters`; a raw
    # config.json from transformers 4 still has the two separate fields.
    if params is None:
        params = get("rope_parameters") or get("rope_scaling") or {}
    params = dict(params)
    if any(isinstance(v, Mapping) for v in params.values()):
        raise UserError("per-layer-type rope_parameters are not supported")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta") or get("rope_theta", 10000.0))

    def need(key):
        if params.get(key) is None:
            raise UserError(f"rope type {rope_type!r} needs {key!r} in rope_parameters")
        return float(params[key])

    if rope_type == "default":
        return RopeArgs("default", theta)
    if rope_type == "linear":
        return RopeArgs("linear", theta, factor=need("factor"))
    if rope_type == "dynamic":
        # HF's dynamic NTK grows the base past `max_position_embeddings` (it ignores any
        # original_max_position_embeddings for this type).
        return RopeArgs("dynamic", theta, factor=need("factor"), original_max_position_embeddings=max_pos)
    if rope_type == "llama3":
        original = get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos
        return RopeArgs("llama3", theta, factor=need("factor"), low_freq_factor=need("low_freq_factor"),
                        high_freq_factor=need("high_freq_factor"), original_max_position_embeddings=int(original))
    if rope_type == "longrope":
        return _longrope_args(get, params, theta, max_pos, rope_dim)
    raise UserError(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")


def _longrope_args(get, params: Mapping, theta: float, max_pos: int, rope_dim: int) -> RopeArgs:
    """Phi-3's LongRoPE, as transformers computes it: per-frequency divisors, short_factor up to
    original_max_position_embeddings and long_factor beyond, and cos/sin scaled by
    attention_factor (by default from the ratio of max_position_embeddings to the original)."""
    original = params.get("original_max_position_embeddings") or get("original_max_position_embeddings")
    if original is None:
        raise UserError("rope type 'longrope' needs original_max_position_embeddings")
    original = int(original)
    factors = {}
    for key in ("short_factor", "long_factor"):
        value = params.get(key)
        if not isinstance(value, (list, tuple)) or len(value) != rope_dim // 2:
            raise UserError(f"rope type 'longrope' needs {key} as a list of {rope_dim // 2} numbers")
        factors[key] = tuple(float(v) for v in value)
    factor = float(params.get("factor") or max_pos / original)
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeArgs("longrope", theta, factor=factor, original_max_position_embeddings=original,
                    attention_factor=float(attention), **factors)


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
        elif part == "norm":
            names.append("model.norm.weight")
        elif part == "head":
            names.append("model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight")
        else:
            p = f"model.layers.{part.split('.')[1]}."
            attn = ("qkv",) if args.fused_projections else ("q", "k", "v")
            for proj, bias in [*((a, args.attention_bias) for a in attn), ("o", args.o_proj_bias)]:
                names += [p + f"self_attn.{proj}_proj.weight"] + ([p + f"self_attn.{proj}_proj.bias"] if bias else [])
            if args.qk_norm:
                names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
            for proj in ("gate_up", "down") if args.fused_projections else ("gate", "up", "down"):
                names += [p + f"mlp.{proj}_proj.weight"] + ([p + f"mlp.{proj}_proj.bias"] if args.mlp_bias else [])
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            if args.sandwich_norms:
                names += [p + "pre_feedforward_layernorm.weight", p + "post_feedforward_layernorm.weight"]
    return list(dict.fromkeys(names))  # drop the duplicate of a tied embed + head


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(rope: RopeArgs, head_dim: int, seq_len: int) -> Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, computed exactly as transformers does."""
    theta = rope.theta
    if rope.type == "longrope":
        ext = rope.long_factor if seq_len > rope.original_max_position_embeddings else rope.short_factor
        shape = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (torch.tensor(ext, dtype=torch.float32) * theta ** shape)
    if rope.type == "dynamic" and seq_len > rope.original_max_position_embeddings:
        # NTK-aware: stretch the base as the sequence outgrows the trained context.
        scale = rope.factor * seq_len / rope.original_max_position_embeddings - (rope.factor - 1)
        theta = theta * scale ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.type == "linear":
        # Position interpolation: pos / factor, folded into the frequencies like HF does.
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the
        # band in between blended smoothly.
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(rope: RopeArgs, head_dim: int, seq_len: int, device: torch.device,
                 dtype: torch.dtype, freq_len: int | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin [S, head_dim] for positions 0..S-1; fp32 math, then cast (cheap, so no cache).
    freq_len: the length the frequencies are chosen for (dynamic, longrope), else seq_len."""
    inv_freq = upload(rope_inv_freq(rope, head_dim, seq_len if freq_len is None else freq_len), device)  # [D/2]
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]  # [S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, D]
    return _scaled(emb.cos(), rope, dtype), _scaled(emb.sin(), rope, dtype)


def _scaled(table: Tensor, rope: RopeArgs, dtype: torch.dtype) -> Tensor:
    """LongRoPE scales cos and sin in fp32 before the cast; the other types leave them."""
    return (table if rope.attention_factor == 1.0 else table * rope.attention_factor).to(dtype)


def rope_cos_sin_at(rope: RopeArgs, head_dim: int, position_ids: Tensor,
                    dtype: torch.dtype, freq_len: int | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, S, head_dim] for arbitrary per-token positions (packed rows, where each
    sequence restarts at 0). The same fp32 products as `rope_cos_sin`, so a token at position
    p gets bit-identical values whichever row it sits in."""
    seq_len = position_ids.shape[-1]
    if freq_len is not None:
        seq_len = freq_len
    elif rope.type in ("dynamic", "longrope"):
        # Dynamic NTK depends on the length; HF takes max(position) + 1, which for packed rows
        # is the longest sequence, as the padded unpacked batch would have. Only this type
        # pays for the host sync (LongRoPE chooses per sequence: longrope_cos_sin).
        seq_len = int(position_ids.max()) + 1
    inv_freq = upload(rope_inv_freq(rope, head_dim, seq_len), position_ids.device)  # [D/2]
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, D]: broadcasts over heads
    return _scaled(emb.cos(), rope, dtype), _scaled(emb.sin(), rope, dtype)


def sequence_lengths(attention_mask: Tensor | None, position_ids: Tensor | None, document_ids: Tensor | None,
                     B: int, T: int) -> Tensor:
    """How long the sequence of each new token is, [B, S] or [B, 1] int64: a padded row's real
    tokens (the cached ones included), a packed row's document. LongRoPE picks its factors by
    this length per sequence, so a row's rotation never depends on the rows beside it (HF
    picks by the batch's longest row; for one sequence alone both agree)."""
    if position_ids is None:
        if attention_mask is None:
            return torch.full((B, 1), T, dtype=torch.int64)
        return attention_mask.to(torch.int64).sum(-1, keepdim=True)  # [B, 1]
    if document_ids is None:  # one sequence per row
        return position_ids.amax(-1, keepdim=True).to(torch.int64) + 1
    ids = document_ids
    change = torch.ones_like(ids, dtype=torch.bool)
    change[:, 1:] = ids[:, 1:] != ids[:, :-1]  # documents are contiguous runs of one id
    segment = change.to(torch.int64).cumsum(-1) - 1  # [B, S]: 0, 1, ... per row
    counts = torch.zeros(segment.shape, dtype=torch.int64, device=segment.device)
    counts.scatter_add_(1, segment, torch.ones_like(segment))
    return counts.gather(1, segment)  # [B, S]


def longrope_cos_sin(rope: RopeArgs, head_dim: int, lengths: Tensor, past: int, S: int,
                     position_ids: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, S, R] of LongRoPE: each token turns with the long factors when its
    sequence (lengths [B, S] or [B, 1]) is longer than original_max_position_embeddings, with
    the short ones otherwise. position_ids [B, S] or None (past..past+S-1 in every row)."""
    tables = []
    for seq_len in (0, rope.original_max_position_embeddings + 1):  # short, then long factors
        if position_ids is None:
            cos, sin = rope_cos_sin(rope, head_dim, past + S, lengths.device, dtype, freq_len=seq_len)
            tables.append((cos[past:][None, None], sin[past:][None, None]))  # [1, 1, S, R]
        else:
            tables.append(rope_cos_sin_at(rope, head_dim, position_ids, dtype, freq_len=seq_len))  # [B, 1, S, R]
    (cos_s, sin_s), (cos_l, sin_l) = tables
    long = (lengths > rope.original_max_position_embeddings)[:, None, :, None]  # [B, 1, S or 1, 1]
    return torch.where(long, cos_l, cos_s), torch.where(long, sin_l, sin_s)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x [B, heads, S, D]; cos/sin [S, R] (shared positions) or [B, 1, S, R] (per-token
    # positions), broadcast over batch and/or heads. R < D (Phi-3's partial rotary): the
    # first R dims turn, the rest pass through.
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


# ----------------------------------------------------------------------------- masks


def attention_masks(args: ModelArgs, layer_ids: Sequence[int], attention_mask: Tensor | None,
                    seq_len: int, device: torch.device) -> dict[int, Tensor | None]:
    """The SDPA mask of each layer in `layer_ids` (shared between layers with the same
    window): bool [B or 1, 1, S, S], True = may attend; None = plain causal.

    SDPA's `is_causal=True` (fastest kernels, no mask in memory) is exact unless a key must
    be hidden from a query that causality alone would show it: a pad token with real tokens
    after it (left padding) or a token beyond an active sliding window. Right padding is
    fine: real queries never look right, and pad queries feed only ignored positions."""
    key_ok = None  # [B, 1, 1, S]
    if attention_mask is not None:
        # Checked where the mask is: a mask on the host (the trainer's) costs no read back
        # from the device, which would wait for everything queued there.
        am = attention_mask.to(dtype=torch.bool)  # [B, S]
        right_padded_only = bool((am[:, 1:] <= am[:, :-1]).all())  # ones then zeros, per row
        if not right_padded_only:
            key_ok = upload(am, device)[:, None, None, :]  # a plain copy would wait for the device
    by_window: dict[int | None, Tensor | None] = {}
    out: dict[int, Tensor | None] = {}
    for i in layer_ids:
        window = args.sliding_window[i]
        if window is not None and window >= seq_len:
            window = None  # the window cannot cut anything at this length
        if window not in by_window:
            by_window[window] = _build_mask(window, key_ok, seq_len, device)
        out[i] = by_window[window]
    return out


def _build_mask(window: int | None, key_ok: Tensor | None, seq_len: int, device: torch.device) -> Tensor | None:
    if window is None and key_ok is None:
        return None
    q = torch.arange(seq_len, device=device)[:, None]  # [S, 1]
    k = torch.arange(seq_len, device=device)[None, :]  # [1, S]
    allowed = k <= q  # [S, S]
    if window is not None:
        allowed = allowed & (q - k < window)
    allowed = allowed[None, None]  # [1, 1, S, S]
    if key_ok is not None:
        # A query always sees itself, so an all-pad row still has one key and never NaN.
        allowed = (allowed & key_ok) | (q == k)  # [B, 1, S, S]
    return allowed


def document_masks(args: ModelArgs, layer_ids: Sequence[int], document_ids: Tensor,
                   attention_mask: Tensor | None) -> dict[int, Tensor]:
    """Masks for packed rows: bool [B, 1, S, S], True = may attend. A query sees the earlier
    keys of its own document only (and, on a sliding-window layer, only the last `window` of
    them), so several sequences share a row without seeing each other.

    document_ids [B, S]: one id per packed sequence, a separate id for padding. Positions in
    one document are consecutive columns, so the column distance q - k of two tokens of the
    same document is their position distance, and the window needs no position ids."""
    B, S = document_ids.shape
    device = document_ids.device
    q = torch.arange(S, device=device)[:, None]  # [S, 1]
    k = torch.arange(S, device=device)[None, :]  # [1, S]
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # [B, S(q), S(k)]
    base = same_doc & (k <= q)  # [B, S, S]
    if attention_mask is not None:
        base = base & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]  # hide pad keys
    by_window: dict[int | None, Tensor] = {}
    out: dict[int, Tensor] = {}
    for i in layer_ids:
        window = args.sliding_window[i]
        if window is not None and window >= S:
            window = None  # the window cannot cut anything at this length
        if window not in by_window:
            allowed = base if window is None else base & (q - k < window)  # [B, S, S]
            # A query always sees itself, so no row is all-False (SDPA would give NaN).
            by_window[window] = (allowed | (q == k))[:, None]  # [B, 1, S, S]
        out[i] = by_window[window]
    return out


# ----------------------------------------------------------------------------- KV cache


@dataclass
class KVCache:
    """Keys and values of the tokens a model has seen, per decoder layer, so generation runs
    each new token alone instead of the whole sequence again. Rows are the batch's rows; all
    rows share one length (left-padded prompts, one new token per row and step)."""

    layers: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # [B, nkv, T, D] each, after RoPE
    length: int = 0  # T: tokens cached per row

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
    out, by_window = {}, {}
    for i in layer_ids:
        window = args.sliding_window[i]
        if window not in by_window:
            allowed = k <= q  # [S, T]
            if window is not None:
                allowed = allowed & (q - k < window)
            allowed = allowed[None] if key_ok is None else (allowed[None] & key_ok) | (q == k)[None]  # [B, S, T]
            by_window[window] = upload(allowed[:, None], device)  # [B, 1, S, T]
        out[i] = by_window[window]
    return out


# ----------------------------------------------------------------------------- recompute


def checkpointed_layer(layer: nn.Module, generators: Sequence[torch.Generator], *inputs: Tensor) -> Tensor:
    """Run `layer(*inputs)` under activation checkpointing (non-reentrant): its activations
    are dropped after the forward and recomputed during the backward.

    torch's checkpoint replays the global CPU/CUDA RNG, but LoRA dropout draws from the
    adapters' own generators (`generators`), which it does not know. So: snapshot them before
    the first forward; rewind them to that snapshot for the recomputation, which then draws
    the very masks the first forward used; and afterwards put them back where they were just
    before the recomputation, so the draws of later layers and later steps are untouched."""
    before = [g.get_state() for g in generators]
    first = True

    def run(*args: Tensor) -> Tensor:
        nonlocal first
        if first:
            first = False
            return layer(*args)
        now = [g.get_state() for g in generators]
        for g, state in zip(generators, before):
            g.set_state(state)
        try:
            return layer(*args)
        finally:  # also when checkpoint's early stop ends the recomputation midway
            for g, state in zip(generators, now):
                g.set_state(state)

    return torch.utils.checkpoint.checkpoint(run, *inputs, use_reentrant=False)


# ----------------------------------------------------------------------------- modules


_RMS_NORM = getattr(F, "rms_norm", None)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))
        self.eps = eps
        self.gemma = gemma  # scale by (1 + w) in fp32, then cast (HF's Gemma3RMSNorm)

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
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        q_dim, kv_dim = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.fused = args.fused_projections
        if self.fused:  # Phi-3: one projection, split into q, k, v
            self.qkv_proj = nn.Linear(args.hidden_size, q_dim + 2 * kv_dim, bias=args.attention_bias)
            self.splits = (q_dim, kv_dim, kv_dim)
        else:
            self.q_proj = nn.Linear(args.hidden_size, q_dim, bias=args.attention_bias)
            self.k_proj = nn.Linear(args.hidden_size, kv_dim, bias=args.attention_bias)
            self.v_proj = nn.Linear(args.hidden_size, kv_dim, bias=args.attention_bias)
        self.o_proj = nn.Linear(q_dim, args.hidden_size, bias=args.o_proj_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps, args.gemma_norms)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps, args.gemma_norms)
        self.qk_norm = args.qk_norm
        self.scale = args.attn_scale  # None: SDPA's 1 / sqrt(D)
        self.softcap = args.attn_softcap

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None = None, layer_id: int = 0) -> Tensor:
        B, S, _ = x.shape  # x [B, S, H]
        if self.fused:
            q, k, v = self.qkv_proj(x).split(self.splits, dim=-1)  # [B, S, nh*D], [B, S, nkv*D] x 2
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, S, self.num_heads, self.head_dim)  # [B, S, nh, D]
        k = k.view(B, S, self.num_kv_heads, self.head_dim)  # [B, S, nkv, D]
        if self.qk_norm:  # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, nh, S, D], [B, nkv, S, D]
        v = v.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, nkv, S, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(layer_id, k, v)  # [B, nkv, T, D]: the cached tokens' too
        n_rep = self.num_heads // self.num_kv_heads
        if self.softcap is not None:
            y = softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        elif mask is None and _SDPA_HAS_GQA:
            # The causal kernels read grouped K/V natively.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=n_rep > 1)
        else:
            # With an explicit mask the memory-efficient kernel is the one that applies, and
            # it wants as many K/V heads as query heads.
            if n_rep > 1:
                k = k.repeat_interleave(n_rep, dim=1)  # [B, nh, S, D]
                v = v.repeat_interleave(n_rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim)  # [B, S, nh*D]
        return self.o_proj(y)


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
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fused = args.fused_projections
        if self.fused:  # Phi-3: [gate; up] in one projection
            self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        else:
            self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
            self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)
        self.gelu = args.hidden_act == "gelu_tanh"

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [B, S, I] each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)  # GeGLU / SwiGLU
        return self.down_proj(act * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.sliding_window = args.sliding_window[layer_id]
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        g = args.gemma_norms
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, g)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, g)
        self.sandwich = args.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, g)
            self.post_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, g)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None = None) -> Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.layer_id)  # [B, S, H]
        if not self.sandwich:
            h = x + attn
            return h + self.mlp(self.post_attention_layernorm(h))
        # Gemma 3: post_attention_layernorm norms the attention's output; the MLP has its own
        # input and output norms.
        h = x + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


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
        if self.layer_ids:
            self.model.layers = nn.ModuleDict({str(i): DecoderLayer(args, i) for i in self.layer_ids})
        if self.has_norm:
            self.model.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.gemma_norms)
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

    def rope_of(self, layer_id: int) -> RopeArgs:
        """The RoPE of a layer: Gemma 3's sliding layers have their own."""
        local = self.args.local_rope is not None and self.args.sliding_window[layer_id] is not None
        return self.args.local_rope if local else self.args.rope

    def tie_weights(self) -> None:
        """Share the embedding with the head when both live here (a head-only stage of a tied
        model keeps its own copy, loaded from `model.embed_tokens.weight`)."""
        if self.args.tie_word_embeddings and self.has_embed and self.has_head:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                document_ids: Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> Tensor:
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
        Returns logits [B, S, V] (S = 1 with last_only) if the stage has the head, else hidden
        states [B, S, H]."""
        h = self.model.embed_tokens(x) if self.has_embed else x  # [B, S, H]
        if self.has_embed and self.args.embed_scale:
            # sqrt(H) as HF rounds it: an fp32 scalar cast to the dtype (55.4 -> 55.5 in bf16)
            h = h * torch.tensor(self.args.hidden_size ** 0.5, dtype=torch.float32).to(h.dtype)
        if self.layer_ids:
            S = h.shape[1]
            past = 0 if cache is None else cache.length
            if cache is not None and (position_ids is not None or document_ids is not None):
                raise ValueError("a KV cache takes neither position_ids nor document_ids (packed rows)")
            if cache is not None and self.recompute and torch.is_grad_enabled():
                raise ValueError("a KV cache does not go with recompute under autograd (generation runs without grad)")
            tables = {}  # RopeArgs -> (cos, sin): [S, D] (the new tokens' positions) or [B, 1, S, D]
            for rope in {self.rope_of(i) for i in self.layer_ids}:
                if rope.type == "longrope":
                    lengths = upload(sequence_lengths(attention_mask, position_ids, document_ids, B=h.shape[0],
                                                      T=past + S), h.device)
                    tables[rope] = longrope_cos_sin(rope, self.args.rope_dim, lengths, past, S,
                                                    None if position_ids is None else position_ids.to(h.device),
                                                    h.dtype)
                elif position_ids is None:
                    cos, sin = rope_cos_sin(rope, self.args.rope_dim, past + S, h.device, h.dtype)  # [T, R]
                    tables[rope] = cos[past:], sin[past:]
                else:
                    tables[rope] = rope_cos_sin_at(rope, self.args.rope_dim, position_ids.to(h.device), h.dtype)
            if past:
                masks = cached_masks(self.args, self.layer_ids, attention_mask, past, S, h.device)
            elif document_ids is None:
                masks = attention_masks(self.args, self.layer_ids, attention_mask, S, h.device)
            else:
                masks = document_masks(self.args, self.layer_ids, document_ids.to(h.device), attention_mask)
            recompute = self.recompute and torch.is_grad_enabled()
            for i in self.layer_ids:
                layer = self.model.layers[str(i)]
                cos, sin = tables[self.rope_of(i)]
                if recompute:
                    gens = self.rng_generators
                    gens = gens.get(i, []) if isinstance(gens, dict) else gens
                    h = checkpointed_layer(layer, gens, h, cos, sin, masks[i])
                else:
                    h = layer(h, cos, sin, masks[i], cache)
            if cache is not None:
                cache.length += S
        if last_only:
            h = h[:, -1:]  # [B, 1, H]
        if self.has_norm:
            h = self.model.norm(h)
        if self.has_head:
            h = self.lm_head(h)  # [B, S, V]
            cap = self.args.final_softcap
            if cap is not None:  # Gemma 2
                h = torch.tanh(h / cap) * cap
        return h
