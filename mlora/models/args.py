"""A base model's config.json read into the plain arguments mlora's decoder is built from.

`args_from_hf_config` reads a transformers config (or the plain dict of a config.json) into a
`ModelArgs`: each family's switches follow what transformers' modeling file of that family
actually does, not just which config fields exist.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mlora.errors import UserError
from mlora.plural import counted

FAMILIES = ("llama", "mistral", "ministral", "ministral3", "mistral3", "qwen2", "qwen3", "gemma", "gemma2",
            "gemma3_text", "gemma3", "gemma4_text", "gemma4", "phi3", "smollm3", "glm", "glm4", "chatglm",
            "baichuan", "granite", "olmo2", "olmo3", "qwen3_5_text", "qwen3_5", "mixtral", "qwen2_moe", "qwen3_moe",
            "olmoe", "gpt_oss", "glm4_moe", "deepseek_v2", "deepseek_v3", "mistral4", "qwen3_5_moe_text",
            "qwen3_5_moe", "qwen3_next", "llama4_text", "llama4")
# Families whose decoder layers route each token to a few of many MLP experts (models/moe.py)
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "glm4_moe", "deepseek_v2", "deepseek_v3",
                "mistral4", "qwen3_5_moe_text", "qwen3_next", "llama4_text")
# Qwen3.5's text models: Gated DeltaNet linear attention in 3 of 4 layers (models/gdn.py)
QWEN3_5_FAMILIES = ("qwen3_5_text", "qwen3_5_moe_text")
# ... and Qwen3-Next, from which Qwen3.5 descends: the same layers, but its linear attention's
# input projections fused (in_proj_qkvz, in_proj_ba; models/gdn.py)
GATED_DELTANET_FAMILIES = (*QWEN3_5_FAMILIES, "qwen3_next")
# Families with multi-head latent attention (models/mla.py); DeepSeek-V2's and V3's config keys
# (Mistral Small 4's too, with Ministral 3's query scale and a router of its own)
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3", "mistral4")
# How a router turns its logits into the chosen experts' weights (models/moe.SparseMoE.route):
# softmax, then the top k (Mixtral, Qwen-MoE, OLMoE); the top k logits, then their softmax
# (GPT-OSS); DeepSeek-V3's sigmoid scores, the top k of them plus a per-expert correction bias
# within the best groups of experts, scaled (GLM-4.5); DeepSeek-V2's softmax, the top k within
# the groups of the best single scores, scaled and never renormalized; Mistral Small 4's softmax
# in the model's dtype, the top k within the groups whose two best scores sum highest,
# renormalized (norm_topk_prob) and scaled.
# Llama 4's: the top k logits, then their sigmoid (in fp32, cast to the dtype), which scales the
# chosen experts' input, not their output (experts_input_weighted).
ROUTERS = ("softmax", "topk_softmax", "sigmoid", "grouped_softmax", "grouped_softmax_top2", "topk_sigmoid")
# Image-text checkpoints whose language model (text_config) mlora trains; the vision tower is
# not loaded. Gemma 3 4B/12B/27B (a gemma3_text model); Mistral Small 3.x, Ministral 3 and Mistral
# Small 4 (a mistral, ministral3 or mistral4 one, Mistral3ForConditionalGeneration); Qwen3.5 (all its releases).
IMAGE_TEXT_FAMILIES = {"gemma3": ("gemma3_text",), "gemma4": ("gemma4_text",),
                       "mistral3": ("mistral", "ministral3", "mistral4"),
                       "qwen3_5": ("qwen3_5_text",), "qwen3_5_moe": ("qwen3_5_moe_text",),
                       "llama4": ("llama4_text",)}
# Their outer tie_word_embeddings (which decides the head) when a config.json leaves it out
# (Qwen3.5's and Llama 4's heads follow text_config's flag: args_from_hf_config)
_IMAGE_TEXT_TIED = {"gemma3": True, "gemma4": True, "mistral3": True}
# Image-text families whose head is tied by text_config's flag: transformers' causal LM of a
# Qwen3.5 checkpoint is the text model; Llama4ForConditionalGeneration's head is its
# language_model's (a Llama4ForCausalLM of text_config), which ties by that config alone
TEXT_CONFIG_TIES = ("qwen3_5", "qwen3_5_moe", "llama4")
# Families whose config.json only their own remote code reads (auto_map): mlora reads the plain
# dict, and their safetensors names are not LLaMA's (models/naming.py).
REMOTE_CODE_FAMILIES = ("chatglm", "baichuan")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope", "yarn", "proportional")
# The norms of a decoder layer, by HF's names: (attention input, attention output, MLP input,
# MLP output), None where the layout has none. Gemma 2/3 and GLM-4-0414 norm each sublayer's
# input and output (the same design under other names); OLMo 2/3 only the outputs.
NORM_LAYOUTS = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
    "glm4": ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"),
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
}


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
    attention_factor: float = 1.0  # longrope, yarn: cos and sin are scaled by it
    beta_fast: float = 32.0  # yarn: the ramp between extrapolated and interpolated frequencies
    beta_slow: float = 1.0
    truncate: bool = True  # yarn: round the ramp's ends outwards
    # GLM / ChatGLM: RoPE turns adjacent pairs (0, 1), (2, 3), ... instead of the two halves
    interleaved: bool = False
    # Gemma 4's full layers ("proportional"): the first `partial` of each half of the head
    # turns, by the frequencies a whole head would have; the rest keeps still
    partial: float = 1.0
    dim: int = 0  # the head size the tables cover (0: ModelArgs.rope_dim; Gemma 4's layer types differ)


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
    qk_norm_per_head: bool = True  # False (OLMo 2/3): over the whole q and k projections (weights [nh D], [nkv D])
    hidden_act: str = "silu"  # or "gelu_tanh" (Gemma's gelu_pytorch_tanh)
    # Gemma 3: norms scale by (1 + w) in fp32; the embedding output is multiplied by sqrt(H)
    # (rounded to the dtype); each sublayer's output is normed too, before the residual add
    # (post_attention_layernorm, post_feedforward_layernorm; the MLP's input norm is then
    # pre_feedforward_layernorm); attention scales by attn_scale instead of 1 / sqrt(D).
    gemma_norms: bool = False
    embed_scale: bool = False
    norm_layout: str = "pre"  # a key of NORM_LAYOUTS
    # OLMo 2/3, ChatGLM, GPT-OSS: RMSNorm multiplies by its weight in fp32, then casts (LLaMA casts first)
    norm_weight_fp32: bool = False
    # OLMo 2/3, DeepSeek-V2: q and k turn in fp32 (cos/sin are not cast to the dtype), then are cast back
    rope_fp32: bool = False
    attn_scale: float | None = None
    # Ministral 3 (rope_parameters' llama_4_scaling_beta): each query, after RoPE, times
    # 1 + beta * log(1 + floor(position / period)), period the RoPE's original context length;
    # exactly 1 below it (0: no scaling)
    query_scale_beta: float = 0.0
    query_scale_period: int = 0
    # Llama 4 (attn_temperature_tuning): floor((position + 1) / period) (query_scale_offset 1),
    # on the layers without RoPE only (query_scale_nope_only), the product taken in fp32
    query_scale_offset: int = 0
    query_scale_nope_only: bool = False
    # Llama 4: its RoPE layers L2-norm each query and key head after RoPE, without a weight
    # (use_qk_norm), and attend within chunks of attention_chunk positions (None: no chunks)
    qk_l2_norm: bool = False
    attention_chunk: list[int | None] = field(default_factory=list)  # per layer
    # Llama 4: the router's weights scale each chosen expert's input, not its output
    experts_input_weighted: bool = False
    # Gemma 2: attention scores and the final logits pass through cap * tanh(x / cap). SDPA
    # cannot do that to the scores, so those layers compute attention in plain ops.
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # Phi-3, ChatGLM, Baichuan: q/k/v as one qkv_proj [q_dim + 2 kv_dim, H]; Phi-3, GLM,
    # ChatGLM: gate/up as one gate_up_proj [2 I, H] (gate first). RoPE may turn only the first
    # rotary_dim dims of each head (Phi-3, GLM, ChatGLM).
    fused_qkv: bool = False
    fused_gate_up: bool = False
    rotary_dim: int | None = None  # None: the whole head_dim
    # SmolLM3: the layers that turn q and k with RoPE (the others use no position encoding)
    rope_layers: list[bool] = field(default_factory=list)  # per layer; empty: all
    rope: RopeArgs = field(default_factory=RopeArgs)
    local_rope: RopeArgs | None = None  # Gemma 3: the RoPE of the sliding-window layers
    sliding_window: list[int | None] = field(default_factory=list)  # per layer; None = full attention
    max_position_embeddings: int = 2048
    # Baichuan 2: the head's rows are normalized to unit length (its NormHead), done once at load
    normalized_head: bool = False
    # Baichuan 13B: ALiBi (alibi.py) instead of RoPE; no layer turns q and k
    alibi: bool = False
    # Granite: the embedding output times embedding_multiplier, each sublayer's output times
    # residual_multiplier before the residual add, the logits divided by logits_scaling
    # (attention scales by attention_multiplier: attn_scale)
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS, GLM-4.5, DeepSeek-V3;
    # models/moe.py): the MLP of a sparse layer sends each token to num_experts_per_tok of
    # num_experts SwiGLU experts of moe_intermediate_size, picked by a linear router (`router`),
    # and sums their outputs weighted by the router's weights (renormalized over the chosen ones
    # with norm_topk_prob). Mixtral, GLM-4.5 and DeepSeek-V3 weigh in fp32
    # (routing_weights_fp32), the others in the dtype. Qwen2-MoE adds a shared expert
    # (shared_expert_intermediate_size) scaled by a sigmoid gate; GLM-4.5's and DeepSeek-V3's
    # have no gate (shared_expert_gated). moe_layers: which layers are sparse (Qwen's
    # mlp_only_layers and decoder_sparse_step, GLM-4.5's and DeepSeek-V3's first_k_dense_replace
    # keep some dense, with intermediate_size).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    routing_weights_fp32: bool = False
    shared_expert_intermediate_size: int = 0
    shared_expert_gated: bool = True
    moe_layers: list[bool] = field(default_factory=list)  # per layer; empty: all sparse iff num_experts
    # router: one of ROUTERS. GLM-4.5, DeepSeek-V3: the sigmoid router's weights and correction
    # bias stay in fp32 (router_params_fp32), its experts come in router_groups groups of which
    # each token may use the router_topk_groups best, and the chosen weights are scaled by
    # routed_scaling.
    router: str = "softmax"
    router_params_fp32: bool = False
    router_groups: int = 1
    router_topk_groups: int = 1
    routed_scaling: float = 1.0
    # Checkpoint layers past num_layers that no forward uses (GLM-4.5's and DeepSeek-V3's
    # multi-token prediction)
    extra_layers: int = 0
    # GPT-OSS: the router has a bias and takes the softmax of the top k logits (router
    # "topk_softmax") instead of the top k of the softmax; each expert's gate_up_proj interleaves gate and up
    # columns (gate_up_interleaved) and its GLU is clamped: (clamp(up, +-limit) + 1) *
    # g * sigmoid(alpha * g), g = min(gate, limit) (glu_limit, glu_alpha; 0: plain SwiGLU);
    # attention adds a learnt logit per head to each softmax's denominator (attn_sinks).
    router_bias: bool = False
    gate_up_interleaved: bool = False
    glu_limit: float = 0.0
    glu_alpha: float = 1.0
    attn_sinks: bool = False
    # DeepSeek-V3: multi-head latent attention (models/mla.py). head_dim is then the RoPE part
    # of each query and key head (qk_rope_head_dim), as in transformers' config.
    mla: bool = False
    q_lora_rank: int = 0  # 0: q_proj; else q_a_proj -> norm -> q_b_proj through this rank
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    # Qwen3.5: hybrid layers. layer_kinds[i] is "attention" (softmax attention, whose output is
    # gated per channel by sigmoid(gate) when attn_output_gate: q_proj then gives each head's
    # query and gate, [q_h | gate_h]) or "linear" (Gated DeltaNet linear attention,
    # models/gdn.py, of linear_num_key_heads key heads of linear_key_head_dim,
    # linear_num_value_heads value heads of linear_value_head_dim, and a causal depthwise conv
    # of linear_conv_kernel taps).
    layer_kinds: list[str] = field(default_factory=list)  # per layer; empty: all attention
    attn_output_gate: bool = False
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0
    # Qwen3-Next: the linear attention's input projections are two fused ones, in_proj_qkvz and
    # in_proj_ba, their outputs laid out per key-head group (Qwen3.5: in_proj_qkv/z/b/a)
    linear_fused_projections: bool = False
    # Gemma 4: its full-attention layers (layer_kinds "global_attention") have heads of
    # global_head_dim and global_num_kv_heads K/V heads, and with attn_k_eq_v no v_proj (the
    # values are k_proj's output); every layer norms its values per head without a weight
    # (v_norm) and scales the residual stream by a stored scalar after it (layer_scalar)
    global_head_dim: int = 0
    global_num_kv_heads: int = 0
    attn_k_eq_v: bool = False
    v_norm: bool = False
    layer_scalar: bool = False
    # Gemma 4 26B-A4B (enable_moe_block): every layer runs num_experts_per_tok of num_experts
    # GeGLU experts (moe_intermediate_size) beside its dense MLP (models/moe.py's Gemma4Router,
    # run_experts): the router and experts hang off the layer itself, three more norms around
    # them. moe_layers stays all False: a layer's `mlp` is its dense MLP, which takes LoRA as on
    # a dense model; the experts take it by their own target names (config.EXPERT_TARGET_MODULES).
    moe_beside_mlp: bool = False
    # Gemma 4 E2B/E4B: per-layer inputs, one [per_layer_input_size] slice per layer of a second
    # embedding (per_layer_vocab_size rows) plus a projection of the embedding output, gated into
    # the stream after the MLP; the last kv_shared_layers layers have no k/v projections and
    # attend to the keys and values of the last earlier layer of their kind (kv_source), and
    # with double_wide_mlp their MLPs are twice as wide
    per_layer_input_size: int = 0
    per_layer_vocab_size: int = 0
    kv_shared_layers: int = 0
    double_wide_mlp: bool = False

    def __post_init__(self):
        if not self.sliding_window:
            self.sliding_window = [None] * self.num_layers
        if not self.rope_layers:
            self.rope_layers = [True] * self.num_layers
        if not self.moe_layers:
            self.moe_layers = [self.num_experts > 0] * self.num_layers
        if not self.layer_kinds:
            self.layer_kinds = ["attention"] * self.num_layers
        if not any(self.attention_chunk):  # (also after a dataclasses.replace of num_layers)
            self.attention_chunk = [None] * self.num_layers

    def query_scaled(self, layer_id: int) -> bool:
        """Whether the layer's queries take the position-dependent scale (Ministral 3's all,
        Llama 4's NoPE layers)."""
        return bool(self.query_scale_beta) and not (self.query_scale_nope_only and self.rope_layers[layer_id])

    def head_dim_of(self, layer_id: int) -> int:
        """The query/key/value head size of a layer (Gemma 4's full layers have their own)."""
        return self.global_head_dim if self.layer_kinds[layer_id] == "global_attention" else self.head_dim

    def kv_heads_of(self, layer_id: int) -> int:
        return self.global_num_kv_heads if self.layer_kinds[layer_id] == "global_attention" else self.num_kv_heads

    def values_from_keys(self, layer_id: int) -> bool:
        """Gemma 4's full layers with attention_k_eq_v: no v_proj, the values are k_proj's output."""
        return self.attn_k_eq_v and self.layer_kinds[layer_id] == "global_attention"

    def kv_source(self, layer_id: int) -> int | None:
        """Gemma 4's KV sharing: the layer whose keys and values this one attends to (the last
        layer before the shared ones of the same kind), or None: its own."""
        first = self.num_layers - self.kv_shared_layers
        if layer_id < first:
            return None
        return max(i for i in range(first) if self.layer_kinds[i] == self.layer_kinds[layer_id])

    def mlp_size_of(self, layer_id: int) -> int:
        """A dense MLP's width: Gemma 4's KV-shared layers' is doubled with double_wide_mlp."""
        wide = self.double_wide_mlp and self.kv_source(layer_id) is not None
        return self.intermediate_size * (2 if wide else 1)

    def is_linear(self, layer_id: int) -> bool:
        """Whether the layer mixes its tokens by linear attention (Qwen3.5's Gated DeltaNet)."""
        return self.layer_kinds[layer_id] == "linear"

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    @property
    def mlp_lora_on_experts(self) -> bool:
        """Whether an MoE model's MLP targets are its routed experts (its dense MLPs and shared
        experts then take none); Llama 4's are its dense MLPs and shared expert instead, which
        PEFT's target_modules reach there (its experts are stacked parameters)."""
        return self.model_type not in ("llama4_text", "llama4")

    @property
    def experts_named(self) -> bool:
        """Whether the routed experts take LoRA by names of their own (config.EXPERT_TARGET_MODULES:
        experts.gate_up_proj, experts.down_proj, PEFT's target_parameters for them), each expert's
        gate and up one gate_up_proj (one LoRA on it, as PEFT's): Gemma 4 26B-A4B's beside its
        dense MLP, and Llama 4's, whose plain MLP names target its dense MLPs and shared expert."""
        return self.moe_beside_mlp or (self.is_moe and not self.mlp_lora_on_experts)

    @property
    def qk_head_dim(self) -> int:
        """A query's and key's head size: head_dim, or with latent attention nope + rope part."""
        return self.qk_nope_head_dim + self.head_dim if self.mla else self.head_dim

    @property
    def values_padded(self) -> bool:
        """Latent attention's values, narrower than its keys, zero-padded to their size (mla.py)."""
        return self.mla and self.v_head_dim < self.qk_head_dim

    @property
    def rope_dim(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def rope_of(self, layer_id: int) -> RopeArgs | None:
        """The RoPE of a layer: Gemma 3's and OLMo 3's sliding layers have their own; None for
        SmolLM3's layers without position encoding (and every layer with ALiBi)."""
        if not self.rope_layers[layer_id]:
            return None
        local = self.local_rope is not None and self.sliding_window[layer_id] is not None
        return self.local_rope if local else self.rope

    def ropes_of(self, layers) -> set[RopeArgs]:
        """The distinct RoPEs of these layers (None, no RoPE, left out)."""
        return {self.rope_of(i) for i in layers} - {None}

    @property
    def norm_names(self) -> tuple[str | None, str | None, str | None, str | None]:
        """A decoder layer's norms: (attention input, attention output, MLP input, MLP output)."""
        return NORM_LAYOUTS[self.norm_layout]

    @property
    def num_norms(self) -> int:
        """RMSNorms over the hidden size per decoder layer."""
        return sum(name is not None for name in self.norm_names)


def _raw(cfg: Any, key: str, default: Any) -> Any:
    """A config's value as it is, null included (`default` only when the key is absent)."""
    return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


def _getter(cfg: Any):
    """get(key, default): a config object's attribute or a config.json dict's key, where null
    counts as absent."""
    def get(key, default=None):
        value = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)
        return default if value is None else value

    return get


def args_from_hf_config(cfg: Any) -> ModelArgs:
    """Read a transformers config (or the plain dict of a config.json) into ModelArgs.

    Each switch follows what transformers' modeling file of that family actually does, not
    just which config fields exist: e.g. Qwen2 always has q/k/v biases whatever the config
    says, and Mistral ignores `layer_types`."""
    get = _getter(cfg)
    model_type = get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    if model_type in IMAGE_TEXT_FAMILIES:
        # Gemma 3 4B/12B/27B, Gemma 4, Mistral Small 3.x, Ministral 3, Qwen3.5 are image-text
        # checkpoints: mlora trains their language model (its tensors under another prefix:
        # models/naming.py)
        text = get("text_config")
        if text is None:
            raise UserError(f"{model_type} config has no text_config")
        inner = IMAGE_TEXT_FAMILIES[model_type]
        text_type = (text.get("model_type") if isinstance(text, Mapping) else getattr(text, "model_type", None)) \
            or inner[0]  # (Gemma3Config's is always gemma3_text; Mistral3Config's default is mistral)
        if text_type not in inner:
            raise UserError(f"{model_type} config text_config model_type {text_type!r} is not supported "
                            f"(supported: {', '.join(inner)})")
        text = {**text, "model_type": text_type} if isinstance(text, Mapping) else text
        text_args = args_from_hf_config(text)
        # The image-text model ties its head by the outer config's flag; but Qwen3.5's and Llama 4's
        # by text_config's (TEXT_CONFIG_TIES)
        tied = (text_args.tie_word_embeddings if model_type in TEXT_CONFIG_TIES
                else bool(get("tie_word_embeddings", _IMAGE_TEXT_TIED[model_type])))
        return replace(text_args, model_type=model_type, tie_word_embeddings=tied)
    if model_type == "gemma4_text" and not isinstance(cfg, Mapping):
        # (Gemma4TextConfig refuses to read per-layer attributes such as head_dim as a whole)
        cfg = cfg.to_dict()
        get = _getter(cfg)
    if model_type in REMOTE_CODE_FAMILIES:
        if not isinstance(cfg, Mapping):
            cfg = cfg.to_dict()
        cfg = _chatglm_keys(cfg) if model_type == "chatglm" else _baichuan_keys(cfg)
        get = _getter(cfg)
    # A config.json leaves out what equals its config class's default, and those classes
    # differ; a key that is there, null included, says what it says (a config object always
    # has every key).
    family_defaults = _CONFIG_DEFAULTS.get(model_type, {}) if isinstance(cfg, Mapping) else {}
    plain_get = get

    def get(key, default=None):
        if key in family_defaults and key not in cfg:
            return family_defaults[key]
        return plain_get(key, default)

    if model_type in ("gemma2", "gemma3_text", "gemma4_text"):
        if get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise UserError(f"hidden_activation {get('hidden_activation')!r} is not supported (only gelu_pytorch_tanh)")
    elif model_type == "gemma":
        # GemmaConfig turns the original releases' "gelu" into the tanh approximation they meant.
        if get("hidden_act", "gelu_pytorch_tanh") not in ("gelu", "gelu_pytorch_tanh"):
            raise UserError(f"hidden_act {get('hidden_act')!r} is not supported (only gelu_pytorch_tanh)")
    elif get("hidden_act", "silu") not in ("silu", "swish"):  # transformers maps both names to SiLU
        raise UserError(f"hidden_act {get('hidden_act')!r} is not supported (only silu)")

    # Sizes of 0 or below built tensors of negative size (a traceback) or a model of no layers
    # (then blamed on target_modules); transformers' config classes do not check them.
    num_layers = _positive_int(get("num_hidden_layers"), f"{model_type} config num_hidden_layers")
    hidden = _positive_int(get("hidden_size"), f"{model_type} config hidden_size")
    heads = _positive_int(get("num_attention_heads"), f"{model_type} config num_attention_heads")
    kv_heads = _positive_int(get("num_key_value_heads", heads), f"{model_type} config num_key_value_heads")
    if heads % kv_heads:
        raise UserError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    max_pos = int(get("max_position_embeddings", 2048))

    # (Gemma 4's "vision" lets image tokens see each other: on text, attention stays causal)
    if model_type.startswith("gemma") and get("use_bidirectional_attention", False) and not (
            model_type == "gemma4_text" and get("use_bidirectional_attention") == "vision"):
        raise UserError("use_bidirectional_attention is not supported (mlora trains causal decoders)")
    gemma4 = _gemma4_args(get, num_layers, kv_heads) if model_type == "gemma4_text" else {}
    llama4 = _llama4_args(get, num_layers) if model_type == "llama4_text" else {}
    rope_layers: list[bool] = []  # every layer turns q and k, but SmolLM3's (and none with ALiBi)
    alibi = model_type == "baichuan" and bool(get("alibi", False))  # set by _baichuan_keys
    if alibi:
        rope_layers = [False] * num_layers
    if model_type in ("llama", "granite"):
        qkv_bias = o_bias = bool(get("attention_bias", False))
        mlp_bias = bool(get("mlp_bias", False))
        windows = [None] * num_layers
    elif model_type in ("olmo2", "olmo3"):  # `attention_bias` on all four attention projections
        qkv_bias = o_bias = bool(get("attention_bias", False))
        mlp_bias = False
        windows = ([None] * num_layers if model_type == "olmo2" else _windows_by_type(
            get("layer_types") or _every_nth_full(num_layers, 4), num_layers, get("sliding_window"), required=True))
    elif model_type in ("mistral", "ministral3", "phi3", "mixtral"):
        # Mistral, Ministral 3, Phi-3 and Mixtral mask every layer with `config.sliding_window`
        # when it is set.
        qkv_bias = o_bias = mlp_bias = False
        windows = [get("sliding_window")] * num_layers
    elif model_type == "ministral":  # Mistral with a window on its sliding_attention layers only
        qkv_bias = o_bias = mlp_bias = False
        window = get("sliding_window")
        windows = _windows_by_type(get("layer_types") or [("full_attention" if window is None else "sliding_attention")]
                                   * num_layers, num_layers, window, required=True)
    elif model_type == "qwen2":  # q/k/v always biased, o_proj and MLP never
        qkv_bias, o_bias, mlp_bias = True, False, False
        windows = _qwen_windows(get, num_layers)
    elif model_type == "qwen3":  # `attention_bias` on q/k/v and o_proj alike, no MLP bias
        qkv_bias = o_bias = bool(get("attention_bias", False))
        mlp_bias = False
        windows = _qwen_windows(get, num_layers)
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        # Qwen2-MoE: `qkv_bias` on q/k/v; Qwen3-MoE: `attention_bias` on q/k/v and o_proj
        qkv_bias = bool(get("qkv_bias", True)) if model_type == "qwen2_moe" else bool(get("attention_bias", False))
        o_bias = model_type == "qwen3_moe" and qkv_bias
        mlp_bias = False
        if get("use_sliding_window", False):  # the released models use none; their layout is odd
            raise UserError(f"{model_type} config use_sliding_window is true: sliding windows are not supported "
                            "on Qwen MoE models")
        _refuse_sliding_layers_without_use_sliding_window(get)
        windows = [None] * num_layers
    elif model_type == "gpt_oss":  # `attention_bias` on all four attention projections; biased experts
        qkv_bias = o_bias = bool(get("attention_bias", True))
        mlp_bias = True
        windows = _windows_by_type(get("layer_types") or _every_nth_full(num_layers, 2), num_layers,
                                   get("sliding_window"), required=False)  # (null: every layer full)
    elif model_type == "glm4_moe":  # `attention_bias` on q/k/v only
        qkv_bias, o_bias, mlp_bias = bool(get("attention_bias", False)), False, False
        windows = [None] * num_layers
    elif model_type in MLA_FAMILIES:  # `attention_bias` on q_a_proj, kv_a_proj_with_mqa and o_proj
        qkv_bias = o_bias = bool(get("attention_bias", False))
        mlp_bias = False
        if model_type == "deepseek_v2" and get("mlp_bias", False):  # (transformers: on the dense MLPs only)
            raise UserError("deepseek_v2 config mlp_bias is true: biased MLPs are not supported")
        windows = [None] * num_layers
    elif model_type == "llama4_text":  # `attention_bias` on all four attention projections
        qkv_bias = o_bias = bool(get("attention_bias", False))
        mlp_bias = False
        windows = [None] * num_layers
        rope_layers = llama4.pop("rope_layers")
    elif model_type in GATED_DELTANET_FAMILIES:  # `attention_bias` on q/k/v and o_proj (never on linear attention)
        qkv_bias = o_bias = bool(get("attention_bias", False))
        mlp_bias = False
        windows = [None] * num_layers
    elif model_type == "olmoe":
        if get("clip_qkv") is not None:
            raise UserError("olmoe config clip_qkv is set: clipping q, k and v is not supported")
        qkv_bias = o_bias = bool(get("attention_bias", False))
        mlp_bias = False
        windows = [None] * num_layers
    elif model_type == "smollm3":
        qkv_bias = o_bias = bool(get("attention_bias", False))
        mlp_bias = bool(get("mlp_bias", False))
        rope_layers = _smollm3_rope_layers(get, num_layers)
        layer_types = get("layer_types") or [
            "sliding_attention" if get("use_sliding_window", False) and get("sliding_window") is not None
            and not rope_layers[i] else "full_attention" for i in range(num_layers)]
        # SmolLM3Model masks each layer by its layer type, with config.sliding_window for the
        # sliding ones whatever use_sliding_window says (eager and SDPA attention)
        windows = _windows_by_type(layer_types, num_layers, get("sliding_window"), required=True)
    elif model_type == "gemma":
        qkv_bias = o_bias = bool(get("attention_bias", False))
        mlp_bias = False
        windows = [None] * num_layers
    elif model_type in ("glm", "glm4", "chatglm", "baichuan"):
        # GLM: `attention_bias` on q/k/v only; ChatGLM's add_bias_linear (read into linear_bias)
        # on every projection
        qkv_bias = bool(get("attention_bias", False))
        o_bias = mlp_bias = bool(get("linear_bias", False))
        windows = [None] * num_layers
    elif model_type == "gemma4_text":  # `attention_bias` on all four projections
        qkv_bias = o_bias = bool(get("attention_bias", False))
        mlp_bias = False
        windows = gemma4.pop("windows")
    else:  # gemma2, gemma3_text
        qkv_bias = o_bias = bool(get("attention_bias", False))
        mlp_bias = False
        windows = _gemma_windows(get, num_layers, 2 if model_type == "gemma2" else 6)

    head_dim = (_positive_int(get("qk_rope_head_dim"), f"{model_type} config qk_rope_head_dim")
                if model_type in MLA_FAMILIES else
                _positive_int(get("head_dim", hidden // heads), f"{model_type} config head_dim"))
    rope_params = get("rope_parameters") or {}
    partial = float(rope_params.get("partial_rotary_factor") or get("partial_rotary_factor", 1.0))
    rotary_dim = None
    if model_type == "mistral4":  # (head_dim is already the RoPE part; Mistral4Config's partial factor
        # says which part of nope + rope that is, by default the right one)
        if rope_params.get("partial_rotary_factor") is not None:
            _check_mistral4_partial_rotary(get, head_dim, float(rope_params["partial_rotary_factor"]))
    elif partial != 1.0:
        if model_type not in _PARTIAL_ROTARY:  # the other families' attention turns whole heads
            raise UserError(f"partial_rotary_factor other than 1.0 is not supported for {model_type}")
        rotary_dim = int(head_dim * partial)
    gemma3 = model_type == "gemma3_text"
    gemma = model_type in ("gemma", "gemma2", "gemma3_text")
    qwen3_5 = model_type in GATED_DELTANET_FAMILIES  # (Qwen3.5 and Qwen3-Next)
    sandwich = model_type in ("gemma2", "gemma3_text", "gemma4_text")
    attn_cap, final_cap = (None if get(k) is None else float(get(k))
                           for k in ("attn_logit_softcapping", "final_logit_softcapping"))
    if model_type == "gemma4_text":  # (Gemma 4 caps its logits only; its config has no attention cap)
        attn_cap = None
    if model_type not in ("gemma2", "gemma4_text") and (attn_cap is not None or final_cap is not None):
        raise UserError(f"logit soft-capping is not supported for {model_type} (only Gemma 2 and 4 have it)")
    rope_dim = head_dim if rotary_dim is None else rotary_dim
    if gemma3:  # the sliding layers' own theta, 1e4 by default
        full_rope, local_rope = _per_type_ropes(get, max_pos, rope_dim, get("rope_theta", 1_000_000.0),
                                                get("rope_local_base_freq", 10_000.0))
    elif gemma4:  # per layer type, each over its layers' head size
        full_rope, local_rope = gemma4.pop("full_rope"), gemma4.pop("local_rope")
    elif model_type == "olmo3":  # a RoPE per layer type; Olmo3Config gives a transformers-4
        # config.json's rope_theta to the full layers only (the sliding ones keep 500000)
        full_rope, local_rope = _per_type_ropes(get, max_pos, rope_dim, get("rope_theta", 500_000.0), 500_000.0)
    else:
        full_rope, local_rope = _rope_args(get, max_pos, rope_dim), None
    # (DeepSeek-V3: rope_interleave null means no interleaving, as in transformers; DeepSeek-V2
    # always turns adjacent pairs, as complex numbers)
    if (model_type in ("glm", "glm4", "chatglm", "deepseek_v2", "llama4_text")
            or (model_type in ("deepseek_v3", "mistral4") and _raw(cfg, "rope_interleave", True))):
        full_rope = replace(full_rope, interleaved=True)
    mla, mla_scale = (_mla_args(get, model_type, head_dim, rope_params or get("rope_scaling") or {})
                      if model_type in MLA_FAMILIES else ({}, None))
    return ModelArgs(
        model_type=model_type,
        vocab_size=_positive_int(get("vocab_size"), f"{model_type} config vocab_size"),
        hidden_size=hidden,
        # (Qwen3.5-MoE has no dense MLP, nor its width; Llama 4's dense MLPs are intermediate_size_mlp wide)
        intermediate_size=(_positive_int(get("intermediate_size_mlp"), "llama4_text config intermediate_size_mlp")
                           if model_type == "llama4_text" else
                           _positive_int(get("intermediate_size", get("moe_intermediate_size") if qwen3_5 else None),
                                         f"{model_type} config intermediate_size")),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_positive_number(float(get("rms_norm_eps", 1e-6)), f"{model_type} config rms_norm_eps"),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        o_proj_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=(model_type in ("qwen3", "gemma3_text", "gemma4_text", "olmo2", "olmo3", "qwen3_moe", "olmoe",
                                *GATED_DELTANET_FAMILIES)
                 or (model_type == "glm4_moe" and bool(get("use_qk_norm", False)))),
        qk_norm_per_head=model_type not in ("olmo2", "olmo3", "olmoe"),
        hidden_act="gelu_tanh" if gemma or gemma4 else "silu",
        gemma_norms=gemma or qwen3_5,  # (Qwen3.5's norms scale by 1 + w too; Gemma 4's by w)
        embed_scale=gemma or bool(gemma4),
        norm_layout=("sandwich" if sandwich else "glm4" if model_type == "glm4"
                     else "post" if model_type in ("olmo2", "olmo3") else "pre"),
        norm_weight_fp32=model_type in ("olmo2", "olmo3", "chatglm", "gpt_oss", "gemma4_text"),
        # (DeepSeek-V2 turns q and k as fp32 complex numbers)
        rope_fp32=(model_type in ("olmo2", "olmo3", "deepseek_v2", "llama4_text")
                   or (model_type == "baichuan" and bool(get("rope_fp32")))),
        attn_scale=(1.0 if gemma4 else float(get("query_pre_attn_scalar", 256)) ** -0.5 if sandwich
                    else float(get("attention_multiplier", 1.0)) if model_type == "granite"
                    else mla_scale),
        attn_softcap=attn_cap,
        final_softcap=final_cap,
        fused_qkv=model_type in ("phi3", "chatglm", "baichuan"),
        fused_gate_up=model_type in ("phi3", "glm", "glm4", "chatglm", "gpt_oss"),
        rotary_dim=rotary_dim,
        rope_layers=rope_layers,
        rope=full_rope,
        local_rope=local_rope,
        # (a window of 0 or less let a token attend to no key at all, without a word)
        sliding_window=[None if w is None else _positive_int(w, f"{model_type} config sliding_window")
                        for w in windows],
        max_position_embeddings=max_pos,
        normalized_head=model_type == "baichuan" and bool(get("normalized_head", False)),  # _baichuan_keys
        alibi=alibi,
        embedding_multiplier=float(get("embedding_multiplier", 1.0)) if model_type == "granite" else 1.0,
        residual_multiplier=float(get("residual_multiplier", 1.0)) if model_type == "granite" else 1.0,
        logits_scaling=(_positive_number(float(get("logits_scaling", 1.0)), "granite config logits_scaling")
                        if model_type == "granite" else 1.0),
        attn_sinks=model_type == "gpt_oss",
        **(_query_scale_args(rope_params, model_type) if model_type in ("ministral3", "mistral4") else {}),
        **(_linear_attention_args(get, num_layers, model_type) if qwen3_5 else {}),
        **llama4,
        **gemma4,
        **(_gemma4_moe_args(get, num_layers) if gemma4 and get("enable_moe_block", False) else {}),
        **mla,
        **(_moe_args(get, model_type, num_layers) if model_type in MOE_FAMILIES else {}),
    )


def _moe_args(get, model_type: str, num_layers: int) -> dict:
    """The ModelArgs of a mixture-of-experts family's sparse layers, as its modeling file reads
    its config (the expert count is num_local_experts for Mixtral and GPT-OSS, n_routed_experts
    for GLM-4.5 and DeepSeek-V2/V3, num_experts elsewhere)."""
    qwen = model_type in ("qwen2_moe", "qwen3_moe", "qwen3_next")  # (Qwen3-Next: Qwen2-MoE's sparse block)
    qwen3_5 = model_type == "qwen3_5_moe_text"  # every layer sparse, a gated shared expert, renormalized weights
    deepseek = model_type in ("glm4_moe", "deepseek_v2", "deepseek_v3", "mistral4")  # DeepSeek's MoE layout and keys
    experts_key = ("num_local_experts" if model_type in ("mixtral", "gpt_oss", "llama4_text")
                   else "n_routed_experts" if deepseek else "num_experts")
    experts = _positive_int(get(experts_key), f"{model_type} config {experts_key}")
    top_k = _positive_int(get("num_experts_per_tok"), f"{model_type} config num_experts_per_tok")
    if top_k > experts:
        raise UserError(f"{model_type} config num_experts_per_tok ({top_k}) exceeds the number of experts ({experts})")
    if model_type == "mixtral" and get("router_jitter_noise", 0.0):
        raise UserError("mixtral config router_jitter_noise is not 0: the router's training noise is not supported")
    own_width = qwen or qwen3_5 or deepseek  # experts narrower than the dense MLPs
    expert_size = get("moe_intermediate_size") if own_width else get("intermediate_size")
    expert_size = _positive_int(expert_size, f"{model_type} config {'moe_' if own_width else ''}intermediate_size")
    sparse = [True] * num_layers
    if qwen:  # a layer is dense if listed in mlp_only_layers or off the decoder_sparse_step grid
        step = _positive_int(get("decoder_sparse_step", 1), f"{model_type} config decoder_sparse_step")
        dense = set(get("mlp_only_layers") or [])
        sparse = [i not in dense and (i + 1) % step == 0 for i in range(num_layers)]
    shared = 0
    if model_type in ("qwen2_moe", "qwen3_5_moe_text", "qwen3_next"):
        shared = _positive_int(get("shared_expert_intermediate_size"),
                               f"{model_type} config shared_expert_intermediate_size")
    family = {}
    if model_type == "gpt_oss":
        family = dict(router_bias=True, router="topk_softmax", gate_up_interleaved=True,
                      glu_limit=_positive_number(get("swiglu_limit", 7.0), "gpt_oss config swiglu_limit"),
                      glu_alpha=_positive_number(get("swiglu_alpha", 1.702), "gpt_oss config swiglu_alpha"))
    if deepseek:
        family, n_shared, sparse = _deepseek_router_args(get, model_type, experts, top_k, num_layers)
        shared = expert_size * n_shared
    if model_type == "llama4_text":  # an ungated shared expert as wide as each routed one
        family = dict(router="topk_sigmoid", shared_expert_gated=False, experts_input_weighted=True)
        shared = expert_size
        sparse = _llama4_moe_layers(get, num_layers)
    return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=expert_size,
                # (Qwen3.5-MoE's router always renormalizes, whatever the config says)
                norm_topk_prob=model_type in ("mixtral", "qwen3_5_moe_text") or bool(get("norm_topk_prob", False)),
                routing_weights_fp32=model_type == "mixtral" or (deepseek and model_type != "mistral4"),
                shared_expert_intermediate_size=shared,
                moe_layers=sparse, **family)


def _llama4_moe_layers(get, num_layers: int) -> list[bool]:
    """Llama 4's sparse layers: moe_layers, else every interleave_moe_layer_step-th layer (Llama4TextConfig)."""
    listed = get("moe_layers")
    if listed is None:
        step = _positive_int(get("interleave_moe_layer_step", 1), "llama4_text config interleave_moe_layer_step")
        listed = range(step - 1, num_layers, step)
    elif not isinstance(listed, (list, tuple)) or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers for i in listed):
        raise UserError(f"llama4_text config moe_layers must list layer indices below {num_layers}, got {listed!r}")
    return [i in set(listed) for i in range(num_layers)]


def _llama4_args(get, num_layers: int) -> dict:
    """Llama 4's attention (Llama4TextConfig): no_rope_layers (1: RoPE, 0: none; by default every
    no_rope_layer_interval-th layer without), the RoPE layers' weightless L2 norm of each query and
    key head after RoPE (use_qk_norm) and their attention within chunks of attention_chunk_size
    positions (layer_types chunked_attention), and the NoPE layers' queries scaled by
    1 + attn_scale * log(1 + floor((position + 1) / floor_scale)) (attn_temperature_tuning)."""
    flags = get("no_rope_layers") or None  # (Llama4TextConfig: an empty list means the default)
    if flags is None:
        interval = _positive_int(get("no_rope_layer_interval", 4), "llama4_text config no_rope_layer_interval")
        flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    if not isinstance(flags, (list, tuple)) or len(flags) < num_layers or any(f not in (0, 1) for f in flags):
        raise UserError(f"llama4_text config no_rope_layers must hold a 0 or 1 for every layer "
                        f"({counted(num_layers, 'layer')}), got {flags!r}")
    rope_layers = [bool(f) for f in flags[:num_layers]]
    chunk = get("attention_chunk_size")
    types = get("layer_types") or ["chunked_attention" if rope and chunk is not None else "full_attention"
                                   for rope in rope_layers]
    if len(types) != num_layers or any(t not in ("full_attention", "chunked_attention") for t in types):
        raise UserError(f"llama4_text config layer_types must list full_attention or chunked_attention for every "
                        f"layer ({counted(num_layers, 'layer')}), got {types!r}")
    if "chunked_attention" in types:
        chunk = _positive_int(chunk, "llama4_text config attention_chunk_size")
    tuning = bool(get("attn_temperature_tuning", True))
    beta = get("attn_scale", 0.1)
    if tuning and beta != 0:  # (attn_scale 0: every scale is 1, as tuning off)
        beta = _positive_number(beta, "llama4_text config attn_scale")
    scale = dict(query_scale_beta=beta,
                 query_scale_period=_positive_int(get("floor_scale", 8192), "llama4_text config floor_scale"),
                 query_scale_offset=1, query_scale_nope_only=True) if tuning and beta != 0 else {}
    return dict(rope_layers=rope_layers, qk_l2_norm=bool(get("use_qk_norm", True)),
                attention_chunk=[chunk if t == "chunked_attention" else None for t in types], **scale)


def _deepseek_router_args(get, model_type: str, experts: int, top_k: int,
                          num_layers: int) -> tuple[dict, int, list[bool]]:
    """(ModelArgs of DeepSeek-V3's router, which GLM-4.5 shares: sigmoid scores in fp32, a
    correction bias that only picks, group-limited top k, scaled weights; or of DeepSeek-V2's:
    softmax scores in fp32, top k within the best groups by `topk_method`, scaled weights; and of
    their ungated shared experts; the number of shared experts; which layers are sparse: all but
    the first first_k_dense_replace). Mistral Small 4's: softmax scores in the model's dtype (its
    router has no fp32 weights), top k within the groups whose two best scores sum highest,
    renormalized by norm_topk_prob and scaled."""
    v2, mistral4 = model_type == "deepseek_v2", model_type == "mistral4"
    if v2:
        _check_deepseek_v2_router(get)
    grouped = not v2 or get("topk_method", "greedy") == "group_limited_greedy"  # (V2's greedy: one group)
    groups = _positive_int(get("n_group", 1), f"{model_type} config n_group") if grouped else 1
    topk_groups = _positive_int(get("topk_group", 1), f"{model_type} config topk_group") if grouped else 1
    # (Mistral Small 4 sums each group's two best scores even with one group)
    if experts % groups or topk_groups > groups or ((groups > 1 or mistral4) and experts // groups < 2):
        raise UserError(f"{model_type} config n_group ({groups}) and topk_group ({topk_groups}) do not fit "
                        f"{counted(experts, 'expert')}")
    if top_k > experts // groups * topk_groups:
        raise UserError(f"{model_type} config num_experts_per_tok ({top_k}) exceeds the experts of topk_group groups")
    counts = {}
    for key in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
        counts[key] = get(key, 0)
        if mistral4 and key == "num_nextn_predict_layers":  # (Mistral4Config has none: no MTP layers)
            counts[key] = 0
        if isinstance(counts[key], bool) or not isinstance(counts[key], int) or counts[key] < 0:
            raise UserError(f"{model_type} config {key} must be a non-negative integer, got {counts[key]!r}")
    scaling = _positive_number(get("routed_scaling_factor", 1.0), f"{model_type} config routed_scaling_factor")
    router = dict(router="grouped_softmax" if v2 else "grouped_softmax_top2" if mistral4 else "sigmoid",
                  router_params_fp32=not mistral4, router_groups=groups,
                  router_topk_groups=topk_groups,
                  routed_scaling=scaling, shared_expert_gated=False, extra_layers=counts["num_nextn_predict_layers"])
    return router, counts["n_shared_experts"], [i >= counts["first_k_dense_replace"] for i in range(num_layers)]


def _gemma4_args(get, num_layers: int, kv_heads: int) -> dict:
    """Gemma 4's text model (Gemma4TextConfig): sliding layers (heads of head_dim,
    num_key_value_heads) and full ones (global_head_dim, and with attention_k_eq_v
    num_global_key_value_heads and no v_proj), whose RoPEs differ: the full layers' is
    "proportional" over a quarter of each half-head; E2B's and E4B's per-layer inputs, KV
    sharing and double-wide MLPs (_gemma4_small_args). The MoE block beside the MLP (26B-A4B):
    _gemma4_moe_args. Returns ModelArgs keys, plus windows / full_rope / local_rope for the caller."""
    types = list(get("layer_types") or ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                        for i in range(num_layers)])
    if len(types) != num_layers or any(t not in ("full_attention", "sliding_attention") for t in types):
        raise UserError(f"gemma4_text config layer_types must list full_attention or sliding_attention for every "
                        f"layer ({counted(num_layers, 'layer')}), got {types!r}")
    types[-1] = "full_attention"  # (as Gemma4TextConfig: the last layer is always full)
    windows = _windows_by_type(types, num_layers, get("sliding_window"), required=True)
    full = next(i for i, t in enumerate(types) if t == "full_attention")
    # transformers 5.24's form: {"<layer>": {"head_dim": ...}}, the layers zero-padded to one width ("05")
    per_layer = get("per_layer_config") or {}
    if isinstance(per_layer, Mapping):
        per_layer = {int(layer): entry for layer, entry in per_layer.items()}
    entry = per_layer.get(full) if isinstance(per_layer, Mapping) else per_layer[full]
    entry = entry if isinstance(entry, Mapping) else vars(entry) if entry is not None else {}
    global_dim = _positive_int(entry.get("head_dim") or get("global_head_dim", 512),
                               "gemma4_text config global_head_dim")
    k_eq_v = bool(get("attention_k_eq_v", False))
    global_kv = ((entry.get("num_key_value_heads") or get("num_global_key_value_heads") or kv_heads) if k_eq_v
                 else kv_heads)
    head_dim = _positive_int(get("head_dim", 256), "gemma4_text config head_dim")
    params = get("rope_parameters") or {}
    full_params = dict(params.get("full_attention") or {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                         "rope_theta": 1e6})
    local_params = dict(params.get("sliding_attention") or {"rope_type": "default", "rope_theta": 1e4})
    max_pos = int(get("max_position_embeddings", 131072))
    ropes = []
    for rope_params, dim in ((full_params, global_dim), (local_params, head_dim)):
        if (rope_params.get("rope_type") or "default") == "proportional":
            partial = float(rope_params.get("partial_rotary_factor", 1.0))
            rope = RopeArgs("proportional", float(rope_params.get("rope_theta", 1e4)),
                            factor=float(rope_params.get("factor", 1.0)), partial=partial)
        else:
            rope = _rope_args(get, max_pos, dim, rope_params, yarn_truncate=True)
        ropes.append(replace(rope, dim=dim))
    global_kv = _positive_int(global_kv, "gemma4_text config num_global_key_value_heads")
    if int(get("num_attention_heads")) % global_kv:
        raise UserError(f"gemma4_text config num_attention_heads ({get('num_attention_heads')}) is not a multiple of "
                        f"num_global_key_value_heads ({global_kv})")
    return dict(windows=windows, full_rope=ropes[0], local_rope=ropes[1],
                layer_kinds=["global_attention" if t == "full_attention" else "attention" for t in types],
                global_head_dim=global_dim, global_num_kv_heads=global_kv, attn_k_eq_v=k_eq_v, v_norm=True,
                layer_scalar=True, **_gemma4_small_args(get, num_layers, types))


def _gemma4_small_args(get, num_layers: int, types: list[str]) -> dict:
    """Gemma 4 E2B/E4B: per-layer inputs (hidden_size_per_layer_input wide, from a table of
    vocab_size_per_layer_input rows), the last num_kv_shared_layers layers attending to the keys
    and values of the last earlier layer of their type, their MLPs double-wide with use_double_wide_mlp."""
    size = int(get("hidden_size_per_layer_input") or 0)
    if size < 0:
        raise UserError(f"gemma4_text config hidden_size_per_layer_input must be >= 0, got {size}")
    vocab = int(get("vocab_size"))
    per_layer_vocab = int(get("vocab_size_per_layer_input", vocab)) if size else 0
    if size and per_layer_vocab < vocab:  # (transformers would index past its table)
        raise UserError(f"gemma4_text config vocab_size_per_layer_input ({per_layer_vocab}) is smaller than "
                        f"vocab_size ({vocab}): every token needs a per-layer embedding")
    shared = int(get("num_kv_shared_layers") or 0)
    if not 0 <= shared < num_layers:
        raise UserError(f"gemma4_text config num_kv_shared_layers must be in 0..{num_layers - 1} (a layer must "
                        f"compute the keys and values the others share), got {shared}")
    missing = set(types[num_layers - shared:]) - set(types[:num_layers - shared])
    if shared and missing:
        raise UserError(f"gemma4_text config num_kv_shared_layers ({shared}) leaves no earlier "
                        f"{sorted(missing)[0]} layer to share keys and values with")
    return dict(per_layer_input_size=size, per_layer_vocab_size=per_layer_vocab, kv_shared_layers=shared,
                double_wide_mlp=bool(get("use_double_wide_mlp", False)) and shared > 0)


def _gemma4_moe_args(get, num_layers: int) -> dict:
    """Gemma 4 26B-A4B's experts beside every layer's dense MLP (Gemma4TextRouter,
    Gemma4TextExperts): top_k_experts of num_experts, each of moe_intermediate_size; the router's
    softmax in fp32, its top k renormalized, then times per_expert_scale (weights kept in fp32)."""
    experts = _positive_int(get("num_experts"), "gemma4_text config num_experts")
    top_k = _positive_int(get("top_k_experts"), "gemma4_text config top_k_experts")
    if top_k > experts:
        raise UserError(f"gemma4_text config top_k_experts ({top_k}) exceeds num_experts ({experts})")
    return dict(num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True, routing_weights_fp32=True,
                moe_intermediate_size=_positive_int(get("moe_intermediate_size"),
                                                    "gemma4_text config moe_intermediate_size"),
                moe_layers=[False] * num_layers, moe_beside_mlp=True)


def _linear_attention_args(get, num_layers: int, model_type: str = "qwen3_5_text") -> dict:
    """Qwen3.5's hybrid layers (Qwen3_5TextConfig), and Qwen3-Next's (Qwen3NextConfig, the same
    keys): `layer_types` (else every 4th layer full attention, full_attention_interval), the
    Gated DeltaNet's sizes, the gated attention output; Qwen3-Next's fused input projections."""
    family = "qwen3_next" if model_type == "qwen3_next" else "qwen3_5"  # (as the errors name it)
    interval = _positive_int(get("full_attention_interval", 4), f"{family} config full_attention_interval")
    types = get("layer_types") or ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                   for i in range(num_layers)]
    kinds = {"full_attention": "attention", "linear_attention": "linear"}
    if len(types) != num_layers or any(t not in kinds for t in types):
        raise UserError(f"{family} config layer_types must list full_attention or linear_attention for every layer "
                        f"({counted(num_layers, 'layer')}), got {types!r}")
    sizes = {key: _positive_int(get(key), f"{family} config {key}")
             for key in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                         "linear_value_head_dim", "linear_conv_kernel_dim")}
    if sizes["linear_conv_kernel_dim"] < 2:  # (its conv state holds the K - 1 tokens before)
        raise UserError(f"{family} config linear_conv_kernel_dim must be at least 2")
    if sizes["linear_num_value_heads"] % sizes["linear_num_key_heads"]:
        raise UserError(f"{family} config linear_num_value_heads ({sizes['linear_num_value_heads']}) is not a "
                        f"multiple of linear_num_key_heads ({sizes['linear_num_key_heads']})")
    return dict(layer_kinds=[kinds[t] for t in types], attn_output_gate=True,
                linear_num_key_heads=sizes["linear_num_key_heads"],
                linear_num_value_heads=sizes["linear_num_value_heads"],
                linear_key_head_dim=sizes["linear_key_head_dim"], linear_value_head_dim=sizes["linear_value_head_dim"],
                linear_conv_kernel=sizes["linear_conv_kernel_dim"],
                linear_fused_projections=model_type == "qwen3_next")


def _query_scale_args(rope_params: Mapping, model_type: str) -> dict:
    """Ministral 3's and Mistral Small 4's position-dependent query scale (transformers'
    get_llama_4_attn_scale): its beta and period from rope_parameters, both required
    (transformers fails without them)."""
    beta, period = rope_params.get("llama_4_scaling_beta"), rope_params.get("original_max_position_embeddings")
    if beta is None or period is None:
        raise UserError(f"{model_type} config rope_parameters needs llama_4_scaling_beta and "
                        "original_max_position_embeddings (the queries' position-dependent scale)")
    beta = float(beta)
    if not math.isfinite(beta) or beta < 0:
        raise UserError(f"{model_type} config rope_parameters llama_4_scaling_beta must be >= 0, got {beta!r}")
    return dict(query_scale_beta=beta,
                query_scale_period=_positive_int(period, f"{model_type} config rope_parameters "
                                                         "original_max_position_embeddings"))


def _check_mistral4_partial_rotary(get, rope_dim: int, partial: float) -> None:
    """Mistral4Config's head_dim is nope + rope and its RoPE turns int(head_dim * partial) dims
    (by default partial = rope / head_dim); transformers fails on any other count than the
    queries' and keys' rope part (qk_rope_head_dim), which mlora turns."""
    head_dim = _positive_int(get("qk_nope_head_dim"), "mistral4 config qk_nope_head_dim") + rope_dim
    if int(head_dim * partial) != rope_dim:
        raise UserError(f"mistral4 config rope_parameters partial_rotary_factor ({partial}) must be qk_rope_head_dim / "
                        f"(qk_nope_head_dim + qk_rope_head_dim) = {rope_dim}/{head_dim}")


def _check_deepseek_v2_router(get) -> None:
    """DeepSeek-V2's config keys that transformers' DeepseekV2Moe does not read but its original
    remote code does: refused where they would change the model, so that both agree."""
    method = get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise UserError(f"deepseek_v2 config topk_method {method!r} is not supported (greedy, group_limited_greedy)")
    if get("scoring_func", "softmax") != "softmax":
        raise UserError(f"deepseek_v2 config scoring_func {get('scoring_func')!r} is not supported (only softmax)")
    if get("norm_topk_prob", False):  # (the original code then renormalizes instead of scaling)
        raise UserError("deepseek_v2 config norm_topk_prob is true: renormalized expert weights are not supported "
                        "(transformers ignores the flag; DeepSeek-V2's releases set it false)")
    if get("moe_layer_freq", 1) != 1:
        raise UserError(f"deepseek_v2 config moe_layer_freq {get('moe_layer_freq')!r} is not supported (only 1)")


def _mla_args(get, model_type: str, rope_dim: int, rope_params: Mapping) -> tuple[dict, float]:
    """(DeepSeek-V2/V3's latent attention's ModelArgs, its softmax scale): 1 / sqrt(nope + rope),
    times YaRN's mscale(factor, mscale_all_dim)^2 (transformers' yarn_apply_mscale)."""
    sizes = {key: _positive_int(get(key), f"{model_type} config {key}")
             for key in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim")}
    q_rank = get("q_lora_rank")
    q_rank = 0 if q_rank is None else _positive_int(q_rank, f"{model_type} config q_lora_rank (null: one q_proj)")
    scale = (sizes["qk_nope_head_dim"] + rope_dim) ** -0.5
    if (rope_params.get("rope_type") or rope_params.get("type") or "default") != "default" and rope_params.get(
            "mscale_all_dim"):
        mscale_all_dim = _positive_number(rope_params["mscale_all_dim"], f"{model_type} rope mscale_all_dim")
        factor = _positive_number(rope_params.get("factor") or 1.0, f"{model_type} rope factor")
        mscale = 1.0 if factor <= 1 else 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= mscale * mscale
    return dict(mla=True, q_lora_rank=q_rank, **sizes), scale


_PARTIAL_ROTARY = ("phi3", "glm", "glm4", "chatglm", "glm4_moe", *GATED_DELTANET_FAMILIES)
_GEMMA_DEFAULTS = {"head_dim": 256, "tie_word_embeddings": True}
_GLM_DEFAULTS = {"num_key_value_heads": 2, "head_dim": 128, "attention_bias": True, "rms_norm_eps": 1.5625e-07,
                 "max_position_embeddings": 131072, "partial_rotary_factor": 0.5}
_QWEN3_5_DEFAULTS = {"vocab_size": 248320, "num_attention_heads": 16, "head_dim": 256, "max_position_embeddings": 32768,
                     "partial_rotary_factor": 0.25, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
                     "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32}
_CONFIG_DEFAULTS = {"mistral": {"sliding_window": 4096}, "qwen3": {"head_dim": 128},
                    # Llama4TextConfig's (Llama 4 Scout's shape)
                    "llama4_text": {"vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192,
                                    "intermediate_size_mlp": 16384, "num_hidden_layers": 48,
                                    "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
                                    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                                    "num_experts_per_tok": 1, "num_local_experts": 16, "rope_theta": 500_000.0,
                                    "attention_chunk_size": 8192},
                    "ministral": {"sliding_window": 4096, "num_key_value_heads": 8, "max_position_embeddings": 131072},
                    # Ministral3Config's (Ministral 3 8B's shape and YaRN)
                    "ministral3": {"head_dim": 128, "rms_norm_eps": 1e-5, "num_key_value_heads": 8,
                                   "max_position_embeddings": 262144,
                                   "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                                                       "original_max_position_embeddings": 16384,
                                                       "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                                                       "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}},
                    "smollm3": {"tie_word_embeddings": True, "rope_theta": 2_000_000.0, "num_key_value_heads": 4},
                    "gemma": _GEMMA_DEFAULTS,
                    "gemma2": {**_GEMMA_DEFAULTS, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                               "final_logit_softcapping": 30.0},
                    "gemma3_text": {**_GEMMA_DEFAULTS, "sliding_window": 4096},
                    "glm": _GLM_DEFAULTS, "glm4": _GLM_DEFAULTS, "olmo2": {"rms_norm_eps": 1e-5},
                    "olmo3": {"rms_norm_eps": 1e-5, "sliding_window": 4096, "rope_theta": 500_000.0},
                    # the MoE config classes' defaults (Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B, OLMoE-1B-7B, Mixtral 8x7B)
                    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
                                "num_key_value_heads": 8, "rope_theta": 1e6, "max_position_embeddings": 131072},
                    "qwen2_moe": {"num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                                  "shared_expert_intermediate_size": 5632, "num_key_value_heads": 16,
                                  "max_position_embeddings": 32768},
                    "qwen3_moe": {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                                  "num_key_value_heads": 4, "max_position_embeddings": 32768},
                    "olmoe": {"num_experts": 64, "num_experts_per_tok": 8, "rms_norm_eps": 1e-5,
                              "max_position_embeddings": 4096},
                    # (gpt-oss-120b's, and the YaRN RoPE GptOssConfig fills in)
                    "gpt_oss": {"num_local_experts": 128, "num_experts_per_tok": 4, "rms_norm_eps": 1e-5,
                                "num_key_value_heads": 8, "head_dim": 64, "sliding_window": 128,
                                "max_position_embeddings": 131072, "attention_bias": True, "rope_theta": 150_000.0,
                                # (as rope_scaling: a transformers-4 config.json's rope_scaling or a
                                # transformers-5 one's rope_parameters still wins)
                                "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                 "beta_slow": 1.0, "truncate": False,
                                                 "original_max_position_embeddings": 4096}},
                    # (GLM-4.5-Air's shape is GLM-4.5's; Glm4MoeConfig's defaults)
                    "glm4_moe": {"n_routed_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1408,
                                 "n_shared_experts": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
                                 "n_group": 1, "topk_group": 1, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
                                 "max_position_embeddings": 131072, "partial_rotary_factor": 0.5,
                                 "num_nextn_predict_layers": 1},
                    # Gemma4TextConfig's
                    "gemma4_text": {**_GEMMA_DEFAULTS, "sliding_window": 512, "hidden_size_per_layer_input": 256,
                                    "vocab_size_per_layer_input": 262144, "max_position_embeddings": 131072},
                    # Qwen3_5TextConfig's and Qwen3_5MoeTextConfig's (Qwen3.5-9B's, Qwen3.5-35B-A3B's shapes)
                    "qwen3_5_text": {**_QWEN3_5_DEFAULTS, "hidden_size": 4096, "intermediate_size": 12288,
                                     "num_hidden_layers": 32, "num_key_value_heads": 4},
                    "qwen3_5_moe_text": {**_QWEN3_5_DEFAULTS, "hidden_size": 2048, "num_hidden_layers": 40,
                                         "num_key_value_heads": 2, "num_experts": 256, "num_experts_per_tok": 8,
                                         "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512},
                    # Qwen3NextConfig's (Qwen3-Next-80B-A3B's shape but 10 of 512 experts; its RoPE's theta
                    # is 1e4 by default, the release's config.json says 1e7)
                    "qwen3_next": {**_QWEN3_5_DEFAULTS, "vocab_size": 151936, "hidden_size": 2048,
                                   "intermediate_size": 5632, "num_hidden_layers": 48, "num_key_value_heads": 2,
                                   "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
                                   "shared_expert_intermediate_size": 512, "norm_topk_prob": True,
                                   "decoder_sparse_step": 1},
                    # DeepseekV2Config's (DeepSeek-V2's shape, without its top k: no default)
                    "deepseek_v2": {"n_routed_experts": 64, "moe_intermediate_size": 1407, "n_shared_experts": 2,
                                    "first_k_dense_replace": 0, "norm_topk_prob": False,
                                    "routed_scaling_factor": 1.0, "topk_method": "greedy", "kv_lora_rank": 512,
                                    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
                                    "v_head_dim": 128, "intermediate_size": 11008},
                    # DeepseekV3Config's (DeepSeek-V3's own shape)
                    "deepseek_v3": {"n_routed_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
                                    "n_shared_experts": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
                                    "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
                                    "num_key_value_heads": 128, "max_position_embeddings": 4096,
                                    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
                                    "qk_nope_head_dim": 128, "v_head_dim": 128, "num_nextn_predict_layers": 1},
                    # Mistral4Config's (Mistral Small 4's shape; its YaRN and query scale)
                    "mistral4": {"vocab_size": 131072, "hidden_size": 4096, "intermediate_size": 12288,
                                 "moe_intermediate_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 32,
                                 "num_key_value_heads": 32, "n_shared_experts": 1, "n_routed_experts": 128,
                                 "routed_scaling_factor": 1.0, "kv_lora_rank": 256, "q_lora_rank": 1024,
                                 "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 64, "n_group": 1,
                                 "topk_group": 1, "num_experts_per_tok": 4, "first_k_dense_replace": 0,
                                 "norm_topk_prob": True, "max_position_embeddings": 1048576,
                                 "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 128.0,
                                                     "original_max_position_embeddings": 8192, "beta_fast": 32.0,
                                                     "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                                                     "llama_4_scaling_beta": 0.1}}}


# ChatGLMConfig's defaults (configuration_chatglm.py), for keys a config.json leaves out
_CHATGLM_DEFAULTS = {"num_layers": 28, "padded_vocab_size": 65024, "hidden_size": 4096, "ffn_hidden_size": 13696,
                     "kv_channels": 128, "num_attention_heads": 32, "seq_length": 2048, "layernorm_epsilon": 1e-5,
                     "rmsnorm": True, "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
                     "add_bias_linear": False, "add_qkv_bias": False, "multi_query_attention": False,
                     "multi_query_group_num": 1, "rope_ratio": 1, "quantization_bit": 0}
# How a ChatGLM's code applies rope_ratio, which its config does not say: ChatGLM2 (6b-32k)
# divides the positions by it, ChatGLM3 and GLM-4 multiply the RoPE base. The loader reads the
# model's modeling_chatglm.py as text (it never runs it); config.json may say it instead.
ROPE_RATIO_SCALES = ("positions", "base")


def _chatglm_keys(cfg: Mapping) -> dict:
    """A ChatGLM2 / ChatGLM3 / GLM-4 (remote-code, model_type chatglm) config.json in the keys
    the other families use. Its architecture is GLM's (transformers' GlmForCausalLM, converted
    from these very checkpoints): RMSNorm, grouped queries, a fused query_key_value with biases,
    RoPE on the first half of each head in adjacent pairs, its base or positions scaled by
    rope_ratio (see ROPE_RATIO_SCALES)."""
    def get(key):
        return _CHATGLM_DEFAULTS.get(key) if cfg.get(key) is None else cfg[key]

    if "inner_hidden_size" in cfg or cfg.get("position_encoding_2d"):
        raise UserError("the first ChatGLM (ChatGLM-6B, 2D position encoding) is not supported; "
                        "ChatGLM2, ChatGLM3 and GLM-4 are")
    if cfg.get("vision_config") is not None:
        raise UserError("ChatGLM config has a vision_config: image-text models (GLM-4V) are not supported")
    refused = {"rmsnorm": (True, "LayerNorm models"), "post_layer_norm": (True, "models without a final norm"),
               "apply_residual_connection_post_layernorm": (False, "residuals taken after the norm"),
               # without it, query_key_value interleaves q, k, v per head; the released models all set it
               "multi_query_attention": (True, "query_key_value laid out per head")}
    for key, (supported, what) in refused.items():
        if bool(get(key)) != supported:
            raise UserError(f"ChatGLM config {key}={get(key)!r} is not supported ({what})")
    if cfg.get("pre_seq_len") is not None:
        raise UserError("ChatGLM config pre_seq_len is set: P-tuning v2 prefixes are not supported")
    if get("quantization_bit"):
        raise UserError("ChatGLM config quantization_bit is set: ChatGLM's own quantized checkpoints are not "
                        "supported (load the full-precision model; mlora quantizes with bitsandbytes)")
    sizes = {key: _positive_int(get(key), f"ChatGLM config {key}") for key in (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "multi_query_group_num",
        "kv_channels", "padded_vocab_size", "seq_length")}
    ratio = _positive_number(get("rope_ratio"), "ChatGLM config rope_ratio")
    rope: dict = {"rope_type": "default", "rope_theta": 10000.0}
    if ratio != 1:
        scales = cfg.get("rope_ratio_scales")
        if scales is not None and scales not in ROPE_RATIO_SCALES:
            raise UserError(f'ChatGLM config rope_ratio_scales {scales!r} is not "positions" or "base"')
        if scales is None:
            raise UserError(f"ChatGLM config rope_ratio is {ratio:g}, which ChatGLM2 applies to the positions and "
                            "ChatGLM3 / GLM-4 to the RoPE base: keep the model's modeling_chatglm.py beside its "
                            'config.json, or set "rope_ratio_scales": "positions" or "base" in it')
        rope = ({"rope_type": "linear", "factor": ratio, "rope_theta": 10000.0} if scales == "positions"
                else {"rope_type": "default", "rope_theta": 10000.0 * ratio})
    linear_bias = bool(get("add_bias_linear"))
    return {
        "model_type": "chatglm",
        "num_hidden_layers": sizes["num_layers"],
        "hidden_size": sizes["hidden_size"],
        "intermediate_size": sizes["ffn_hidden_size"],
        "num_attention_heads": sizes["num_attention_heads"],
        "num_key_value_heads": sizes["multi_query_group_num"],
        "head_dim": sizes["kv_channels"],
        "vocab_size": sizes["padded_vocab_size"],
        "rms_norm_eps": _positive_number(get("layernorm_epsilon"), "ChatGLM config layernorm_epsilon"),
        "rope_parameters": rope,
        "partial_rotary_factor": 0.5,
        "max_position_embeddings": sizes["seq_length"],
        "tie_word_embeddings": False,  # ChatGLM's output_layer is never tied
        "attention_bias": linear_bias or bool(get("add_qkv_bias")),
        "linear_bias": linear_bias,
        "hidden_dropout": cfg.get("hidden_dropout"),
        "attention_dropout": cfg.get("attention_dropout"),
    }


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return value


def _positive_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise UserError(f"{what} must be a positive number, got {value!r}")
    return float(value)


BAICHUAN2_VOCAB = 125696


def _baichuan_keys(cfg: Mapping) -> dict:
    """A Baichuan / Baichuan 2 (remote-code, model_type baichuan) config.json in the keys the
    other families use: LLaMA with q/k/v fused into W_pack, the 13B models with ALiBi instead of
    RoPE. Its config does not say which position encoding or head the model's code uses; as
    vLLM does, mlora takes the models with hidden_size 4096 (7B) for RoPE ones and the others
    (13B) for ALiBi ones, and Baichuan 2 (vocab_size 125696) for a NormHead one.
    `position_embedding` ("rope" or "alibi") and `normalized_head` in config.json override that."""
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        _positive_int(cfg.get(key), f"Baichuan config {key}")
    if cfg.get("z_loss_weight"):
        raise UserError("Baichuan config z_loss_weight is not 0: Baichuan 2's z-loss is not supported")
    # Baichuan's code fixes these: base 10000 without scaling, head_dim = hidden / heads, as
    # many K/V heads as queries; mlora does not read them from its config either
    out = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling", "rope_parameters", "head_dim",
                                                     "num_key_value_heads", "partial_rotary_factor")}
    position = cfg.get("position_embedding") or ("rope" if cfg["hidden_size"] == 4096 else "alibi")
    if position not in ("rope", "alibi"):
        raise UserError(f"Baichuan config position_embedding {position!r} is not 'rope' or 'alibi'")
    out["alibi"] = position == "alibi"
    out["max_position_embeddings"] = _positive_int(
        cfg.get("max_position_embeddings") or cfg.get("model_max_length") or 4096,
        "Baichuan config max_position_embeddings")
    baichuan2 = cfg.get("vocab_size") == BAICHUAN2_VOCAB
    if cfg.get("normalized_head") is None:
        out["normalized_head"] = baichuan2
    out["rope_fp32"] = baichuan2 and not out["alibi"]  # Baichuan2-7B turns q and k in fp32
    out["tie_word_embeddings"] = False
    return out


def _smollm3_rope_layers(get, num_layers: int) -> list[bool]:
    """SmolLM3's no_rope_layers (1 = RoPE, 0 = none), by default every 4th layer without."""
    flags = get("no_rope_layers")
    if flags is None:
        interval = int(get("no_rope_layer_interval", 4))
        flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(flags) != num_layers:
        raise UserError(f"no_rope_layers has {counted(len(flags), 'entry')} but num_hidden_layers is {num_layers}")
    return [bool(f) for f in flags]


def _windows_by_type(layer_types, num_layers: int, window: int | None, required: bool) -> list[int | None]:
    """Each layer's window: `window` on the sliding_attention layers, None elsewhere. required:
    a sliding layer must have a window (else the config nulls it on purpose: gpt-oss)."""
    if len(layer_types) != num_layers:
        raise UserError(f"layer_types has {counted(len(layer_types), 'entry')} but num_hidden_layers is {num_layers}")
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UserError(f"layer_types {unknown} are not supported (full_attention, sliding_attention)")
    if required and window is None and "sliding_attention" in layer_types:
        raise UserError("layer_types has sliding_attention layers but sliding_window is not set")
    return [window if t == "sliding_attention" else None for t in layer_types]


def _qwen_windows(get, num_layers: int) -> list[int | None]:
    """Qwen2/Qwen3: the config nulls sliding_window unless use_sliding_window; layer_types then
    picks the sliding layers (by default those from max_window_layers on)."""
    window = get("sliding_window") if get("use_sliding_window", False) else None
    _refuse_sliding_layers_without_use_sliding_window(get)
    layer_types = get("layer_types") or [
        "sliding_attention" if window is not None and i >= get("max_window_layers", 28) else "full_attention"
        for i in range(num_layers)
    ]
    return _windows_by_type(layer_types, num_layers, window, required=True)


def _refuse_sliding_layers_without_use_sliding_window(get) -> None:
    """Qwen's configs (Qwen2Config, Qwen3Config, Qwen2MoeConfig, Qwen3MoeConfig) keep sliding
    layer_types when use_sliding_window is false, and null the window (Qwen2-MoE's to 0): their
    models fail on it (a TypeError or a shape mismatch as the cache or mask is built; without a
    cache Qwen2-MoE windows by 0, eager and SDPA unalike). Ignoring the sliding layers would
    train another model."""
    layer_types = get("layer_types")
    if layer_types and "sliding_attention" in layer_types and not get("use_sliding_window", False):
        raise UserError(f"{get('model_type')} config layer_types lists sliding_attention layers but "
                        "use_sliding_window is false")


def _gemma_windows(get, num_layers: int, default_pattern: int) -> list[int | None]:
    """Gemma 2 / 3: every `sliding_window_pattern`-th layer (2nd / 6th by default) has full
    attention, the others a window, unless the config lists layer_types."""
    pattern = int(get("sliding_window_pattern", default_pattern))
    layer_types = get("layer_types") or _every_nth_full(num_layers, pattern)
    return _windows_by_type(layer_types, num_layers, get("sliding_window"), required=True)


def _every_nth_full(num_layers: int, n: int) -> list[str]:
    """layer_types with every n-th layer full attention and the others sliding."""
    return ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(num_layers)]


def _per_type_ropes(get, max_pos: int, rope_dim: int, full_theta: float | None,
                    local_theta: float | None) -> tuple[RopeArgs, RopeArgs]:
    """The RoPEs of Gemma 3 and OLMo 3: full-attention layers (full_theta and any scaling by
    default) and sliding layers (local_theta, never scaled by default). transformers 5 keeps
    them in rope_parameters by layer type; a transformers-4 config.json has rope_theta,
    rope_scaling (the full layers') and Gemma 3's rope_local_base_freq."""
    params = get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = dict(get("rope_scaling") or {})
        local = {}
    full.setdefault("rope_theta", full_theta)
    local.setdefault("rope_theta", local_theta)
    # transformers reads YaRN's `truncate` from the top level of rope_parameters, where a
    # per-type RoPE has none: such a YaRN always truncates
    return (_rope_args(get, max_pos, rope_dim, full, yarn_truncate=True),
            _rope_args(get, max_pos, rope_dim, local, yarn_truncate=True))


def _rope_args(get, max_pos: int, rope_dim: int, params: Mapping | None = None,
               yarn_truncate: bool | None = None) -> RopeArgs:
    # transformers 5 folds `rope_theta` + `rope_scaling` into `rope_parameters`; a raw
    # config.json from transformers 4 still has the two separate fields.
    # yarn_truncate: YaRN's truncate (None: from params)
    if params is None:
        params = get("rope_parameters") or get("rope_scaling") or {}
    params = dict(params)
    if any(isinstance(v, Mapping) for v in params.values()):
        raise UserError("per-layer-type rope_parameters are not supported")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    # (a theta of 0 fell through to the top-level one, or 10000, without a word; a negative one
    # or a factor of 0 made every step's loss non-finite, each skipped, the adapter saved untrained)
    theta = params.get("rope_theta")
    theta = _positive_number(get("rope_theta", 10000.0) if theta is None else theta, "config.json's rope_theta")

    def need(key):
        if params.get(key) is None:
            raise UserError(f"rope type {rope_type!r} needs {key!r} in rope_parameters")
        return _positive_number(params[key], f"config.json's rope_parameters {key}")

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
    if rope_type == "yarn":
        truncate = params.get("truncate", True) if yarn_truncate is None else yarn_truncate
        return _yarn_args(get, params, theta, max_pos, truncate=truncate)
    raise UserError(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")


def _yarn_args(get, params: Mapping, theta: float, max_pos: int, truncate: bool) -> RopeArgs:
    """YaRN (Qwen2.5 and Qwen3 long context, OLMo 3, DeepSeek), as transformers computes it:
    frequencies blended between extrapolated and interpolated (by `factor`) along a ramp set by
    beta_fast / beta_slow, and cos/sin scaled by attention_factor (by default 0.1 ln(factor) + 1,
    or from mscale / mscale_all_dim)."""
    original = int(get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or max_pos)
    factor = float(params.get("factor") or max_pos / original)

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
                     else get_mscale(factor))
    return RopeArgs("yarn", theta, factor=factor, original_max_position_embeddings=original,
                    attention_factor=float(attention), beta_fast=float(params.get("beta_fast") or 32),
                    beta_slow=float(params.get("beta_slow") or 1), truncate=bool(truncate))


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
            raise UserError(f"rope type 'longrope' needs {key} as a list of {counted(rope_dim // 2, 'number')}")
        factors[key] = tuple(float(v) for v in value)
    factor = float(params.get("factor") or max_pos / original)
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeArgs("longrope", theta, factor=factor, original_max_position_embeddings=original,
                    attention_factor=float(attention), **factors)
