"""How much device memory one training step on a fused batch needs, and what to do when a
batch turns out not to fit after all.

`estimate_peak_bytes` is a first-principles model of *this* implementation (models/llama.py,
lora.py, loss.py, trainer.py's `_train_on`): for every op of a decoder layer it counts what
autograd keeps for the backward, then adds the head's cross-entropy peak, the backward's
working set, the frozen weights and the adapters' trainable state. `choose_token_budget`
inverts it: the most tokens per fused batch whose estimate fits the free memory, and
`plan_token_budget` is what the trainer makes of that for a config (the automatic budget of
fast-fit / optimal-fit on CUDA, or a warning).
`run_splitting_on_oom` is the safety net for what a model cannot foresee (fragmentation,
another process on the GPU): a batch that runs out of memory is halved and run again.

Notation used in the shape comments: N = rows * seq_len tokens of the fused batch, H hidden
size, I intermediate size, nh / nkv query / key-value heads of D dims, V vocabulary, r a LoRA
rank, e the bytes of one element of the activation dtype (2 for bf16/fp16, 4 for fp32).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

import mlora.lora
from mlora.config import EXPERT_TARGET_MODULES
from mlora.errors import UserError
from mlora.loss import chunk_tokens
from mlora.models.llama import GQA_MAX_HEAD_DIM, SINK_PAD, ModelArgs, module_sequence
from mlora.plural import counted

GiB = 2**30

# What the allocator hands out beyond the tensors the model accounts for: cuBLAS keeps a
# workspace per handle, and the backward runs on its own thread, so with its own handle (32 MiB
# each on Hopper by default); plus the small tensors nobody counts (scalars, RNG state, indices).
WORKSPACE_BYTES = 128 * 2**20

# 4-bit blocks of bitsandbytes (mlora.quant.BLOCKSIZE_4BIT) and its double quantization of the
# absmax values in blocks of 256.
_BLOCK_4BIT = 64
_BLOCK_ABSMAX = 256
QUANT_KINDS = ("nf4", "fp4", "int8")

# `enable_gqa` arrived in torch 2.5; llama.py repeats K/V on older builds (and with an explicit mask).
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)

# Target projections that read one input tensor: the LoRA op saves that input (or its dropped-out
# copy and the dropout mask) once per group when groups share inputs (lora.py's InputGroup).
_INPUT_GROUPS = (
    ("attn_in", ("q_proj", "k_proj", "v_proj")),  # input_layernorm output [N, H]
    ("q_latent", ("q_b_proj",)),  # DeepSeek-V3: q_a_layernorm output [N, q_lora_rank]
    ("kv_latent", ("kv_b_proj",)),  # DeepSeek-V3: kv_a_layernorm output [N, kv_lora_rank]
    ("attn_out", ("o_proj",)),  # SDPA output [N, nh*D]
    # Qwen3.5 (Qwen3-Next: in_proj_qkvz, in_proj_ba): input_layernorm output [N, H]
    ("linear_in", ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "in_proj_qkvz", "in_proj_ba")),
    ("linear_out", ("out_proj",)),  # Qwen3.5: the gated norm's output [N, Hv*Dv]
    ("mlp_in", ("gate_proj", "up_proj")),  # post_attention_layernorm output [N, H]
    ("mlp_act", ("down_proj",)),  # silu(gate) * up [N, I]
)

def _input_groups(args: ModelArgs) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """_INPUT_GROUPS of this model: Phi-3 reads the same inputs with one fused projection each,
    ChatGLM and Baichuan with a fused qkv_proj, GLM with a fused gate_up_proj; DeepSeek-V3's
    latent attention reads the layer's input with q_proj (or q_a_proj) and kv_a_proj_with_mqa."""
    fused = {"attn_in": (("q_a_proj" if args.q_lora_rank else "q_proj", "kv_a_proj_with_mqa") if args.mla
                         else ("qkv_proj",) if args.fused_qkv else None),
             "mlp_in": ("gate_up_proj",) if args.fused_gate_up else None}
    return tuple((group, fused.get(group) or members) for group, members in _INPUT_GROUPS)
# Inputs that autograd keeps anyway, for a reason other than LoRA: SDPA saves its output.
_SAVED_ANYWAY = {"attn_out"}


def projection_shapes(args: ModelArgs, kind: str | None = None, kv_shared: bool = False,
                      sparse: bool = True, named_experts: bool = True) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of a decoder layer: LLaMA's seven, or
    with q/k/v fused into qkv_proj and/or gate/up into gate_up_proj. Its keys are the model's
    LoRA targets; on a mixture-of-experts model the MLP's are one expert's (each sparse layer
    has num_experts of them, and its dense layers' MLPs are no LoRA targets: lora.inject_lora).
    kind: a layer kind (ModelArgs.layer_kinds: Qwen3.5's "linear" layers, Gemma 4's
    "global_attention" ones), that kind's layers' projections; None, those of every layer (a
    projection's shape is then the first kind's, in sorted order). kv_shared: a Gemma 4 KV-shared
    layer's (no k/v projections; its MLP double-wide with double_wide_mlp). sparse=False: a dense
    layer's MLP (Llama 4's take LoRA; a sparse layer's MLP targets are its shared expert's, as wide
    as an expert). Gemma 4 26B-A4B's experts, beside every layer's dense MLP, and Llama 4's, in
    its sparse layers, add one expert's experts.gate_up_proj and experts.down_proj
    (config.EXPERT_TARGET_MODULES: ModelArgs.experts_named), unless named_experts is False (the
    layer's other projections only)."""
    H = args.hidden_size
    I = args.moe_intermediate_size if args.is_moe and sparse else args.intermediate_size  # (MoE: each expert's)
    I *= 2 if kv_shared and args.double_wide_mlp else 1
    mixers: dict[str, tuple[int, int]] = {}
    for k in sorted(set(args.layer_kinds) if kind is None else {kind}):
        shapes = linear_projection_shapes(args) if k == "linear" else _attention_shapes(args, k)
        mixers |= {name: shape for name, shape in shapes.items() if name not in mixers and not (
            kv_shared and name in ("k_proj", "v_proj"))}
    mlp = {"gate_up_proj": (H, 2 * I)} if args.fused_gate_up else {"gate_proj": (H, I), "up_proj": (H, I)}
    experts = {}
    # one expert's (num_experts per layer): Gemma 4 26B-A4B's beside the dense MLP, Llama 4's in a sparse layer
    if args.experts_named and named_experts and (args.moe_beside_mlp or sparse):
        Ie = args.moe_intermediate_size
        experts = {"experts.gate_up_proj": (H, 2 * Ie), "experts.down_proj": (Ie, H)}
    return {**mixers, **mlp, "down_proj": (I, H), **experts}


def layer_signature(args: ModelArgs, i: int) -> tuple[bool, str, bool]:
    """What sets a decoder layer's shapes and what it keeps: (sparse MLP, layer kind, Gemma 4
    KV-shared)."""
    return args.moe_layers[i], args.layer_kinds[i], args.kv_source(i) is not None


def _attention_shapes(args: ModelArgs, kind: str) -> dict[str, tuple[int, int]]:
    """The attention projections of a layer of `kind` ("attention", or Gemma 4's "global_attention",
    whose heads, K/V heads and v_proj are its own)."""
    H = args.hidden_size
    D, nkv = args.head_dim, args.num_kv_heads
    if kind == "global_attention":
        D, nkv = args.global_head_dim, args.global_num_kv_heads
    q_dim, kv_dim = args.num_heads * D, nkv * D
    attn = ({"qkv_proj": (H, q_dim + 2 * kv_dim)} if args.fused_qkv
            else {"q_proj": (H, q_dim), "k_proj": (H, kv_dim), "v_proj": (H, kv_dim)})
    if kind == "global_attention" and args.attn_k_eq_v:  # (the values are k_proj's output)
        del attn["v_proj"]
    o_in = q_dim
    if args.mla:  # DeepSeek-V3 (models/mla.py)
        nh, qk, r = args.num_heads, args.qk_head_dim, args.q_lora_rank
        attn = ({"q_a_proj": (H, r), "q_b_proj": (r, nh * qk)} if r else {"q_proj": (H, nh * qk)})
        attn |= {"kv_a_proj_with_mqa": (H, args.kv_lora_rank + args.head_dim),
                 "kv_b_proj": (args.kv_lora_rank, nh * (args.qk_nope_head_dim + args.v_head_dim))}
        o_in = nh * args.v_head_dim
    if args.attn_output_gate:  # Qwen3.5: each head's query and its output gate
        attn["q_proj"] = (H, 2 * q_dim)
    return {**attn, "o_proj": (o_in, H)}


def linear_projection_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """Qwen3.5's linear-attention projections (models/gdn.py): q, k, v together; the output
    gate z; beta and the decay input a (one per value head); the output. Qwen3-Next's: q, k, v
    and z in one, b and a in another; the output."""
    H = args.hidden_size
    keys = args.linear_num_key_heads * args.linear_key_head_dim
    values = args.linear_num_value_heads * args.linear_value_head_dim
    heads = args.linear_num_value_heads
    if args.linear_fused_projections:
        return {"in_proj_qkvz": (H, 2 * keys + 2 * values), "in_proj_ba": (H, 2 * heads), "out_proj": (values, H)}
    return {"in_proj_qkv": (H, 2 * keys + values), "in_proj_z": (H, values), "in_proj_b": (H, heads),
            "in_proj_a": (H, heads), "out_proj": (values, H)}


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class LoraShape:
    """What the memory model needs to know of one adapter."""

    r: int
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    optimizer_moments: int = 2  # AdamW: exp_avg + exp_avg_sq; SGD: 1 with momentum, else 0

    @classmethod
    def of(cls, adapter: Any) -> LoraShape:
        """From a LoraShape, an `AdapterConfig` (or anything with `r` and `target_modules`), or
        an `(r, target_modules)` / `(r, target_modules, dropout)` tuple."""
        if isinstance(adapter, LoraShape):
            return adapter
        if isinstance(adapter, tuple):
            return cls(adapter[0], tuple(adapter[1]), *adapter[2:])
        optim = getattr(adapter, "optim", "adamw")
        moments = 2 if optim == "adamw" else int(bool(getattr(adapter, "momentum", 0.0)))
        return cls(int(adapter.r), tuple(adapter.target_modules), float(getattr(adapter, "dropout", 0.0)),
                   moments)


def _quant_kind(quant: Any, double_quant: bool) -> tuple[str | None, bool]:
    """(None | 'nf4' | 'fp4' | 'int8', double quantization) from a name or a QuantConfig."""
    if quant is None:
        return None, False
    if isinstance(quant, str):
        if quant not in QUANT_KINDS:
            raise ValueError(f"quant must be one of {QUANT_KINDS} or None, got {quant!r}")
        return quant, double_quant and quant != "int8"
    if quant.bits == 8:  # mlora.quant.QuantConfig
        return "int8", False
    return quant.quant_type, bool(quant.double_quant)


@dataclass(frozen=True)
class _Stage:
    """Which parts of the model live on this device (all of them without pipelining)."""

    layers: list[int]
    has_embed: bool
    has_norm: bool
    has_head: bool

    @classmethod
    def of(cls, args: ModelArgs, parts: Sequence[str] | None) -> _Stage:
        parts = list(parts) if parts is not None else module_sequence(args)
        return cls([int(p.split(".")[1]) for p in parts if p.startswith("layer.")],
                   "embed" in parts, "norm" in parts, "head" in parts)


# ----------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training step on a fused batch keeps on the device, by kind.

    The peak is reached either in the head's chunked cross-entropy at the end of the forward
    (every layer's saved activations and one chunk's logits with their gradients) or in the
    backward of the last layer (activations and one layer's working set):

        total = weights + lora_state + activations + max(head, layer_backward) + workspace
    """

    weights: int  # the frozen base: projections (maybe quantized), embedding, norms, head
    lora_state: int  # fp32 A/B of every adapter + their gradients + optimizer moments + their cast
    activations: int  # kept for the backward at the end of the forward: all layers of the stage, the head
    head: int  # one chunk of the head and its cross-entropy, at its peak: see `_head_bytes`
    layer_backward: int  # one layer's backward working set (+ its recomputed activations)
    workspace: int  # fixed: cuBLAS workspaces and small tensors
    per_layer: dict[str, int]  # activations of one decoder layer, by what keeps them (bytes)

    @property
    def total(self) -> int:
        transient = max(self.head, self.layer_backward)
        return self.weights + self.lora_state + self.activations + transient + self.workspace

    @property
    def peak_phase(self) -> str:
        """Where the peak is: 'head' (a chunk of the cross-entropy) or 'layers' (the backward)."""
        return "head" if self.head >= self.layer_backward else "layers"

    def gib(self) -> dict[str, float]:
        """The fields in GiB, rounded, for printing."""
        fields = ("weights", "lora_state", "activations", "head", "layer_backward", "workspace", "total")
        return {f: round(getattr(self, f) / GiB, 2) for f in fields}


def estimate_peak_bytes(args: ModelArgs, *, rows: int, seq_len: int, dtype: torch.dtype,
                        lora: Iterable[Any] = (), recompute: bool = False, quant: Any = None,
                        double_quant: bool = False, parts: Sequence[str] | None = None,
                        shared_lora_inputs: bool = True, explicit_mask: bool | None = None,
                        active_adapters: int | None = None, lora_kernel: str | None = None,
                        device: torch.device | None = None) -> MemoryEstimate:
    """Peak device memory of forward + loss + backward of one fused batch of `rows` rows of
    `seq_len` tokens (padding included), by this implementation, on CUDA.

    lora: every adapter resident on the device (LoraShape, AdapterConfig or (r, targets));
    each may own any rows of the batch, so per-token LoRA costs take the costliest adapter.
    With no adapter, the layers still save what they would for a backward to their input (as
    a frozen model with `enable_input_require_grads` does) - a useful reference point.
    recompute: each decoder layer runs under activation checkpointing (llama.py).
    quant: 'nf4' | 'fp4' | 'int8' | a mlora.quant.QuantConfig | None for the projections.
    parts: the module parts of a pipeline stage (see models/llama.py); None = whole model.
    shared_lora_inputs: projections reading one input (q/k/v, gate/up) share one saved input
    and one dropout mask (lora.py's InputGroup); False models one per projection and adapter.
    explicit_mask: SDPA gets a mask tensor (left padding, packed rows, a sliding window shorter
    than the sequence): K/V are repeated to all heads and a float mask is saved per layer.
    (ALiBi models always give SDPA a float mask, made once for all layers, per row with an
    explicit mask, else one for the batch.)
    None = only when a layer's sliding window is shorter than `seq_len`.
    active_adapters: the most adapters one fused batch holds (train_lora_simultaneously_num);
    None = all of `lora`. Only the fused and dense LoRA kernels' cost depends on it (see below).
    lora_kernel: lora.py's kernel choice ('auto', 'fused', 'triton', 'dense', 'grouped', 'loop'); None =
    the one lora.py uses now (`mlora.lora.kernel`, from MLORA_LORA_KERNEL). 'auto' is fused, on a
    quantized base too (its layers run outside the op; the LoRA tensors are the same).
    device: where the run is; 'auto' runs its batches with the triton kernel on CUDA devices
    of compute capability 9.0 and up (lora.auto_kernel), which keeps less, and is counted so
    there, unless that kernel failed in this process (lora.auto_kernel_now: fused from then
    on). None: counted as fused (an overestimate there: 16 % on the H200's TinyLlama run).

    What one decoder layer keeps for the backward, per token (flash SDPA, right padding):
      RMSNorm x2        fp32 copy of its input [N, H] (4H; in fp32 the input itself) + rsqrt [N] (4)
                        (the weight multiply keeps only the frozen weight)
      frozen projections  nothing: F.linear/addmm keep their input only for a weight gradient
                        (an 8-bit bitsandbytes layer does keep its input; 4-bit does not)
      LoRA, per input group (see _INPUT_GROUPS): no dropout -> the input itself [N, in]
                        (shared with whatever else keeps it); dropout -> the dropped-out copy
                        [N, in] and the 0/1 mask [N, in], in the dtype (bool with the fused
                        kernel; the triton kernel keeps the input itself and the mask as bits,
                        [N, in / 8] bytes); plus the hidden A(x), kept for B's gradient,
                        and the weights cast to the activation dtype (per layer).
                        The hidden depends on the kernel (lora.py): the loop and grouped
                        kernels keep each row's own adapter's [N, r] per target (the costliest
                        adapter bounds it); the fused (and triton) and dense kernels (auto: up to
                        DENSE_MAX_ADAPTERS adapters in a batch) multiply every row by every
                        adapter's A, so they keep [N, C] with C = the sum of r x targets over
                        the batch's adapters; dense also keeps, with more than one adapter, the
                        bool [N, C] mask that zeroes the other adapters' columns (fused has one
                        cached fp32 [N, C] factor for all layers, counted with the batch).
      RoPE              only cos/sin (shared): rotate_half/cat/mul keep no activation
      SDPA              q [N, nh*D], k, v [N, nkv*D] (nh*D when repeated), out [N, nh*D] (the
                        o_proj input, a view), logsumexp fp32 [nh, N] (+ the float mask
                        [B, 1, S, S] with an explicit mask)
      SwiGLU            gate, silu(gate), up: 3 x [N, I] (the product is down_proj's input)
      residual adds     nothing
    Layer 0 keeps a little less (its input needs no gradient); that is not subtracted.

    The head (loss.py) runs a chunk of tokens at a time and keeps only the hidden states'
    gradient [N, H] for the backward; a chunk peaks at about 12 bytes per token and vocabulary
    entry (`_head_bytes`). Before the chunking (2026-11-30) the whole [N, V] logits peaked at
    N*V*(e + 12) bytes, usually the step's peak: the H200 measurements below are of that loss,
    and tests/test_memory.py checks them with that head.

    Checked on one H200 (torch 2.11) against torch.cuda.max_memory_allocated of the trainer's
    forward + loss + backward (and, for the later points, whole steps with AdamW): never below
    the measured peak over 33 shapes, adapter counts, kernels and settings
    (tests/test_memory.py::H200_MEASURED), 0.4-2.4% above it for all but the first series'
    small multi-adapter points with recompute (3-9% above: that series took no optimizer
    step, so it lacks the AdamW moments the estimate counts, a large share of a small peak).

    Not modelled: the optimizer step's temporaries (taken after the activations are freed);
    several micro-batches in flight on a pipeline stage (multiply `activations` by them);
    allocator fragmentation (why `choose_token_budget` keeps a margin).
    """
    if rows < 0 or seq_len < 0:
        raise ValueError("rows and seq_len must be >= 0")
    adapters = [LoraShape.of(a) for a in lora]
    unknown = {m for a in adapters for m in a.target_modules} - set(projection_shapes(args))
    if unknown:
        raise ValueError(f"unknown target modules {sorted(unknown)}")
    kind, dq = _quant_kind(quant, double_quant)
    stage = _Stage.of(args, parts)
    e = torch.empty((), dtype=dtype).element_size()
    N = rows * seq_len
    L = len(stage.layers)
    # the caller's padding or packing (or sinks) gives every kind of layer a mask; else only
    # the layers whose window or chunk cuts something at this length get one
    every_kind_masked = bool(explicit_mask) or args.attn_sinks
    if explicit_mask is None:  # (a window or chunk (Llama 4) that cuts something at this length)
        explicit_mask = _distinct_masks(args, stage.layers, seq_len, every_kind=False) > 0
    explicit_mask = explicit_mask or args.attn_sinks  # (llama.with_sink_key: always a mask)

    lora_kernel = _effective_kernel(lora_kernel, shared_lora_inputs, device)
    # One layer's activations, by kind: an MoE model's sparse and dense layers keep different
    # things, and so do Qwen3.5's attention and linear-attention layers. (sparse, mixer) -> terms
    by_kind: dict[tuple[bool, str, bool], dict[str, int]] = {}
    kinds = sorted({layer_signature(args, i) for i in stage.layers}
                   or {(args.is_moe, args.layer_kinds[0] if args.layer_kinds else "attention", False)})
    for sparse, mixer, kv_shared in kinds:
        layer = _layer_saved_per_token(args, e, adapters, shared=shared_lora_inputs, quant=kind,
                                       explicit_mask=explicit_mask or args.alibi, seq_len=seq_len,
                                       active=active_adapters, kernel=lora_kernel, sparse=sparse, mixer=mixer,
                                       kv_shared=kv_shared)
        grouped = (sparse or args.moe_beside_mlp) and _experts_grouped(args, dtype, device, kind)
        for factor in ("lora_expert_factor", "experts_lora_expert_factor"):  # (the latter: named experts')
            if grouped and factor in layer:
                # grouped experts keep each routed token's adapter (int32) instead of factors
                layer[factor] = 4 * args.num_experts_per_tok
        terms = {name: math.ceil(v * N) for name, v in layer.items()}
        terms["lora_casts"] = _lora_cast_bytes(args, e, adapters, sparse, mixer, kv_shared, experts=not grouped)
        if args.gemma_norms:  # each norm keeps its fp32 (1 + w) for the backward
            terms["norm_weights"] = (args.num_norms * args.hidden_size
                                     + (_qk_norm_width(args, mixer) if mixer != "linear" else 0)) * 4
        by_kind[sparse, mixer, kv_shared] = terms
    per_layer = max(by_kind.values(), key=lambda terms: sum(terms.values()))  # the costliest kind
    one_layer = sum(per_layer.values())
    all_layers = sum(sum(by_kind[layer_signature(args, i)].values()) for i in stage.layers)

    masks = _distinct_masks(args, stage.layers, seq_len, every_kind_masked) if explicit_mask else 0
    batch = _batch_bytes_per_token(args, e, masks, seq_len, stage.layers) * N
    if stage.layers and args.per_layer_input_size:  # Gemma 4 E2B/E4B: every layer's input [N, L P], kept by their gates
        batch += args.num_layers * args.per_layer_input_size * e * N
    if args.alibi and L:
        # alibi.py's float mask, shared by every layer: [B, nh, S, S'] (S' = S rounded up to
        # 16), or [1, nh, S, S'] when causality is all there is to hide
        batch += (rows if explicit_mask else min(rows, 1)) * args.num_heads * seq_len * _round_up(seq_len, 16) * e
    in_batch = _adapters_in_batch(len(adapters), active_adapters)
    # LoRA that every layer's groups share or keep: on an MoE model, the experts' LoRA keeps
    # nothing beyond its call (lora.InputGroup.transient), and the dense layers' MLPs have none
    kept = _without_mlp(adapters) if args.is_moe and args.mlp_lora_on_experts else adapters
    kept = _without_named_experts(kept) if args.experts_named else kept  # (as an MoE model's experts)
    if lora_kernel in ("auto", "auto_triton", "fused", "triton") and L and in_batch > 1:
        # lora_fused.column_factor: one cached fp32 [N, C] per input group for all layers
        # (with one adapter on every row it is a [C] scale).
        batch += _dense_columns(kept, active_adapters, lora_kernel) * 4 * N
    final_norm = (4 * args.hidden_size + 4) * N if stage.has_norm else 0  # fp32 copy + rsqrt
    final_norm += 4 * args.hidden_size * (stage.has_norm and args.gemma_norms)  # fp32 (1 + w)
    stage_output = 0 if stage.has_head else args.hidden_size * e * N  # held to be sent onwards
    head_saved, head = _head_bytes(args, e, N) if stage.has_head else (0, 0)
    if recompute:
        # Each checkpointed layer keeps only its input [N, H]; the layer being back-propagated
        # is recomputed in full and is part of the backward's working set. Each input group
        # keeps its weights' casts between calls (the other layers' too).
        # (Gemma 4: a source layer's keys and values are kept as the inputs of the layers sharing them)
        sources = {args.kv_source(i) for i in stage.layers} - {None}
        activations = (L * args.hidden_size * e * N + batch + final_norm + stage_output + head_saved
                       + max(L - 1, 0) * _lora_cast_bytes(args, e, kept)
                       + sum(2 * args.kv_heads_of(i) * args.head_dim_of(i) * e * N for i in sources))
    else:
        activations = all_layers + batch + final_norm + stage_output + head_saved

    backward = 0
    if L:
        # (the backward's working set is larger grouped: on an unknown device, grouped wherever
        # the dtype could group, as on the CPU)
        may_group = (args.is_moe or args.moe_beside_mlp) and _experts_grouped(
            args, dtype, device if device is not None else torch.device("cpu"), kind)
        backward += (max(_layer_backward_per_token(args, e, seq_len, *layer_kind, grouped=may_group)
                         for layer_kind in by_kind) * N
                     + _dequant_bytes(args, e, kind, N))
        if may_group and args.is_moe and args.mlp_lora_on_experts and any(args.moe_layers[i] for i in stage.layers):
            backward += _grouped_expert_lora_buffers(args, e, adapters, active_adapters)
        # (Gemma 4 26B-A4B's experts beside the dense MLP, Llama 4's)
        if may_group and args.experts_named and (args.moe_beside_mlp or any(args.moe_layers[i] for i in stage.layers)):
            backward += _grouped_expert_lora_buffers(_named_experts_as_sparse(args), e,
                                                     _on_named_experts(adapters), active_adapters)
        backward += one_layer if recompute else 0
    if not stage.has_head:
        backward += args.hidden_size * e * N  # the gradient of the stage output, received

    return MemoryEstimate(
        weights=weight_bytes(args, dtype, quant=kind, double_quant=dq, parts=parts),
        lora_state=lora_state_bytes(args, adapters, layers=stage.layers, dtype=dtype),
        activations=math.ceil(activations),
        head=head,
        layer_backward=math.ceil(backward),
        workspace=WORKSPACE_BYTES,
        per_layer=per_layer,
    )


def _layer_saved_per_token(args: ModelArgs, e: int, adapters: list[LoraShape], *, shared: bool,
                           quant: str | None, explicit_mask: bool, seq_len: int,
                           active: int | None = None, kernel: str | None = None,
                           sparse: bool = False, mixer: str = "attention", kv_shared: bool = False) -> dict[str, float]:
    """Bytes per token that one decoder layer keeps for the backward, by what keeps them.
    sparse: a mixture-of-experts layer (models/moe.py), whose k experts per token each keep
    what a dense MLP of their width keeps, over the tokens routed to them. mixer: the layer's
    kind: "attention", Gemma 4's "global_attention" (heads of their own), or "linear" for
    Qwen3.5's linear-attention layers (models/gdn.py). kv_shared: a Gemma 4 layer attending to
    another's keys and values (no k/v projections nor norms; its MLP double-wide with
    double_wide_mlp; their keys and values counted again, a bound)."""
    H, D = args.hidden_size, args.head_dim
    I = args.intermediate_size * (2 if kv_shared and args.double_wide_mlp else 1)
    k = args.num_experts_per_tok if sparse else 1  # MLP passes per token
    if sparse:
        I = args.moe_intermediate_size
    nh, nkv = args.num_heads, args.num_kv_heads
    if mixer == "global_attention":
        D, nkv = args.global_head_dim, args.global_num_kv_heads
    # (K/V repeated to every head with an explicit mask, and for heads FlashAttention does not
    # take: llama.GQA_MAX_HEAD_DIM)
    repeat_kv = explicit_mask or not _SDPA_HAS_GQA or D > GQA_MAX_HEAD_DIM
    kv_heads = nh if repeat_kv else nkv
    out = {
        # fp32 input copy [N, H] + rsqrt [N], per norm: two, or four with Gemma 3's sandwich
        "norms": args.num_norms * (4 * H + 4),
        # q, k, v as SDPA got them (after RoPE; K/V repeated to nh heads with a mask) + output;
        # Phi-3's v, unless repeated, is a view of the whole qkv_proj output and keeps it alive
        "attention": (2 * nh * D + kv_heads * D
                      + ((nh + 2 * nkv) * D if args.fused_qkv and (not repeat_kv or nh == nkv)
                         else kv_heads * D)) * e,
        # logsumexp fp32 [B, nh, S]; the memory-efficient kernel pads S to a multiple of 32
        "attention_lse": 4 * nh * (_round_up(seq_len, 32) / max(seq_len, 1) if explicit_mask else 1),
        "mlp": 3 * k * I * e,  # gate (for silu), silu(gate) and up (for the product)
    }
    if args.glu_limit:
        # GPT-OSS's clamped GLU: the [2I] projection output (clamp keeps its two strided views),
        # the sigmoid's output, the clamped gate, the shifted up and the GLU: 6 [n, I] per pass
        out["mlp"] = 6 * k * I * e
    if args.mla:
        # q and k as concatenated [nope | rope] per head, v (padded to their size when narrower,
        # else a view that keeps the kv_b_proj output alive) and the output; the q and kv
        # latents' norms (fp32 copy + rsqrt)
        dqk, dv = args.qk_head_dim, args.v_head_dim
        v = nh * dqk if args.values_padded else nh * (args.qk_nope_head_dim + dv)
        out["attention"] = (2 * nh * dqk + v + nh * max(dv, dqk)) * e
        out["latent_norms"] = (args.q_lora_rank + args.kv_lora_rank) * 4 + 8
    if args.attn_sinks:
        # with_sink_key: q, K/V (repeated, the mask is explicit) and the output at D + 8 dims
        # (out is then sliced and copied: o_proj's input is no longer SDPA's output, kept with a LoRA)
        Dp = D + SINK_PAD
        out["attention"] = 4 * nh * Dp * e
    if sparse:
        # the router: its logits and softmax's fp32 output [N, E] (measured: three [N, E] fp32
        # tensors); top-k's indices, the (token, slot) order and its inverse (int64 [N, k] each);
        # the renormalization's fp32 inputs; the pairs' weights; the experts' outputs [N k, H],
        # kept by the product with their weights
        out["moe_routing"] = _routing_saved_per_token(args, e)
        if args.shared_expert_intermediate_size:  # a dense MLP (Qwen2-MoE: and its sigmoid gate)
            out["mlp"] += 3 * args.shared_expert_intermediate_size * e + (H * e + e) * args.shared_expert_gated
    if args.moe_beside_mlp:  # Gemma 4 26B-A4B: experts beside the dense MLP (their LoRA: below)
        out["norms"] += 3 * (4 * H + 4)  # (their input's, the dense MLP's output's and theirs)
        out["mlp"] += 3 * args.num_experts_per_tok * args.moe_intermediate_size * e  # each pass's gate, act and up
        out["moe_routing"] = _routing_saved_per_token(args, e) + 4 * H + 8 + args.num_experts_per_tok * e
    if args.v_norm and not kv_shared:  # Gemma 4: each value head normed without a weight: its fp32 copy,
        # the power's in and out
        out["v_norm"] = nkv * (4 * D + 8)
    if args.qk_norm:  # Qwen3's per-head RMSNorm of q and k: fp32 input copy + rsqrt per head
        # (OLMo 2's over the whole q and k: one rsqrt each)
        out["qk_norms"] = (nh + nkv) * (4 * D + 4) if args.qk_norm_per_head else (nh + nkv) * 4 * D + 2 * 4
        out["qk_norms"] -= kv_shared * nkv * (4 * D + 4)  # (Gemma 4's KV-shared layers: no k norm)
    if args.qk_l2_norm:  # Llama 4's weightless L2 norm of each q and k head after RoPE: fp32 copy + rsqrt per
        # head (on its RoPE layers; counted on every layer, a bound)
        out["qk_norms"] = (nh + nkv) * (4 * D + 4)
    if args.per_layer_input_size:  # Gemma 4 E2B/E4B: the gate's GELU input and output [N, P], the norm after
        out["per_layer_input"] = 2 * args.per_layer_input_size * e + 4 * H + 4
    if explicit_mask and not args.alibi:
        # SDPA turns the bool mask into an additive one in the dtype on every call, and the
        # memory-efficient kernel keeps it: [B, 1, S, S] (S padded to 16), per token S values.
        # (ALiBi's float mask is made once for all layers: counted with the batch.)
        out["attention_mask"] = _round_up(seq_len + args.attn_sinks, 16) * e
    if args.attn_softcap is not None:
        # Gemma 2's softcapped_attention in plain ops: q, K/V repeated to nh heads and the
        # output, plus per query and head S scores three times: tanh's output and the
        # probabilities in the dtype, softmax's output in fp32; the bool mask if explicit.
        out["attention"] = 4 * nh * D * e
        out["attention_scores"] = nh * seq_len * (2 * e + 4)
        del out["attention_lse"]
        if explicit_mask:
            out["attention_mask"] = seq_len
    if args.attn_output_gate:
        # Qwen3.5: o_proj's input is SDPA's output (copied out of its heads' layout) times
        # sigmoid(gate): the product keeps both [N, nh*D]
        out["attention_gate"] = 2 * nh * D * e
    if mixer == "linear":  # no softmax attention in this layer, linear attention instead
        for name in ("attention", "attention_lse", "qk_norms", "attention_mask", "attention_gate"):
            out.pop(name, None)
        out["linear_attention"] = _linear_attention_saved_per_token(args, e, seq_len)
    # an expert's LoRA keeps its gathered input [n, H] and product [n, I]: k per token (Llama 4's
    # MLP LoRA is on the shared expert, as wide as an expert, or the dense MLP: one per token)
    experts = args.mlp_lora_on_experts
    k = k if experts else 1
    widths = {"attn_in": H, "attn_out": nh * (args.v_head_dim if args.mla else D), "mlp_in": k * H, "mlp_act": k * I,
              "q_latent": args.q_lora_rank, "kv_latent": args.kv_lora_rank, "linear_in": H,
              "linear_out": args.linear_num_value_heads * args.linear_value_head_dim}
    # an MoE model's dense MLPs are no targets
    on_layer = adapters if sparse or not args.is_moe or not experts else _without_mlp(adapters)
    # (Gemma 4 26B-A4B's and Llama 4's experts: counted below, as a sparse MLP's)
    here = projection_shapes(args, mixer, kv_shared, named_experts=False)
    on_layer = [replace(a, target_modules=tuple(m for m in a.target_modules if m in here)) for a in on_layer]
    # auto runs a batch of more adapters than DENSE_MAX_ADAPTERS grouped or loop, which keep a
    # dropped-out copy and a mask of each input (counting fused's or triton's underestimated it)
    many = (kernel in ("auto", "auto_triton")
            and _adapters_in_batch(len(adapters), active) > mlora.lora.DENSE_MAX_ADAPTERS)
    for group, members in _input_groups(args):
        if not set(members) & set(here):
            continue
        out[f"lora_{group}"] = _group_input_per_token(group, members, widths[group], e, on_layer,
                                                      shared, quant, "grouped" if many else kernel,
                                                      o_proj_input_copied=(args.attn_sinks or args.values_padded
                                                                           or args.attn_output_gate))
    out.update(_lora_hidden_per_token(on_layer, e, active, kernel, k))
    if sparse and experts and kernel in ("auto", "auto_triton", "fused", "triton") and len(adapters) > 1:
        # the fused op of each expert keeps its own [n, C] fp32 column factor (lora_fused.column_factor):
        # the batch's shared one is per layer here
        out["lora_expert_factor"] = _dense_columns(adapters, active, kernel, k, mlp_only=True) * 4
    on_experts = _on_named_experts(adapters) if args.experts_named and (args.moe_beside_mlp or sparse) else []
    if on_experts:  # Gemma 4 26B-A4B, Llama 4: the experts' LoRA keeps what a sparse MLP's LoRA does
        named = _layer_saved_per_token(_named_experts_as_sparse(args), e, on_experts, shared=shared, quant=quant,
                                        explicit_mask=explicit_mask, seq_len=seq_len, active=active, kernel=kernel,
                                        sparse=True, mixer=mixer)
        out.update({f"experts_{name}": v for name, v in named.items() if name.startswith("lora_")})
    return out


def _named_experts_as_sparse(args: ModelArgs) -> ModelArgs:
    """The experts named by config.EXPERT_TARGET_MODULES (ModelArgs.experts_named: Gemma 4
    26B-A4B's beside each layer's dense MLP, Llama 4's; gate and up fused) as the sparse MLP of
    an MoE model whose MLP targets are its experts (a model type other than Llama 4's:
    mlp_lora_on_experts), without a shared expert: what their LoRA keeps and builds is counted
    as that one's."""
    return replace(args, model_type="experts", moe_layers=[True] * args.num_layers, moe_beside_mlp=False,
                   fused_gate_up=True, shared_expert_intermediate_size=0)


def _on_named_experts(adapters: list[LoraShape]) -> list[LoraShape]:
    """The adapters on the experts named by config.EXPERT_TARGET_MODULES, with those targets
    only, named as a sparse MLP's ('experts.gate_up_proj' -> 'gate_up_proj': _named_experts_as_sparse)."""
    on = [LoraShape(a.r, tuple(m.removeprefix("experts.") for m in a.target_modules if m in EXPERT_TARGET_MODULES),
                    a.dropout, a.optimizer_moments) for a in adapters]
    return [a for a in on if a.target_modules]


def _without_named_experts(adapters: list[LoraShape]) -> list[LoraShape]:
    on = [replace(a, target_modules=tuple(m for m in a.target_modules if m not in EXPERT_TARGET_MODULES))
          for a in adapters]
    return [a for a in on if a.target_modules]


_MLP_TARGETS = mlora.lora.MLP_MODULES


def _routing_saved_per_token(args: ModelArgs, e: int) -> int:
    """What routing keeps per token (models/moe.py): the router's logits and softmax's fp32
    output [N, E] (measured: three [N, E] fp32 tensors); top-k's indices, the (token, slot) order
    and its inverse (int64 [N, k] each); the renormalization's fp32 inputs; the pairs' weights;
    the experts' outputs [N k, H], kept by the product with their weights. (Gemma 4's router
    adds its norm's fp32 input and the per-expert scales it gathers: the caller's.)"""
    H, E, k = args.hidden_size, args.num_experts, args.num_experts_per_tok
    return (3 * 4 * E + 3 * 8 * k + (4 * k + 4) * args.norm_topk_prob + k * (4 if args.routing_weights_fp32 else e)
            + k * H * e)


def _columns(a: LoraShape, k: int = 1, mlp_only: bool = False) -> int:
    """The hidden's columns one adapter adds per token of a layer: r per target, k times on the
    MLP's targets (an MoE layer's experts per token); mlp_only: those targets' only."""
    return a.r * sum(k if m in _MLP_TARGETS else 0 if mlp_only else 1 for m in a.target_modules)


def _without_mlp(adapters: list[LoraShape]) -> list[LoraShape]:
    return [a for a in (LoraShape(a.r, tuple(m for m in a.target_modules if m not in _MLP_TARGETS), a.dropout,
                                  a.optimizer_moments) for a in adapters) if a.target_modules]


def _effective_kernel(kernel: str | None, shared: bool, device: torch.device | None = None) -> str:
    """The kernel lora.py runs for `kernel`. 'auto' stays 'auto' (or 'auto_triton' where it
    runs triton on `device`): it runs batches of up to DENSE_MAX_ADAPTERS adapters fused (or
    triton), and _dense_columns caps its columns there, where an explicit 'fused' or 'triton'
    takes every adapter of a batch."""
    kernel = mlora.lora.kernel if kernel is None else kernel
    if kernel not in mlora.lora.KERNELS:
        raise ValueError(f"lora_kernel must be one of {mlora.lora.KERNELS}, got {kernel!r}")
    if not shared:
        return "loop"  # the per-projection LoRA op before InputGroup: one [n, r] per adapter's rows
    # (auto_kernel_now: fused again after the triton kernel failed here, as the forward then runs)
    if kernel == "auto" and device is not None and mlora.lora.auto_kernel_now(torch.device(device)) == "triton":
        return "auto_triton"
    return kernel


def _adapters_in_batch(resident: int, active: int | None) -> int:
    """How many of `resident` adapters one fused batch holds: at most `active`
    (train_lora_simultaneously_num; None: all of them)."""
    return resident if active is None else max(1, min(active, resident))


def _dense_columns(adapters: list[LoraShape], active: int | None, kernel: str, k: int = 1,
                   mlp_only: bool = False) -> int:
    """C: the hidden's columns per token of one layer when every row is multiplied by every
    adapter of the batch (fused, dense), over the costliest adapters a batch can hold; 0 for
    the kernels that keep only each row's own adapter. k: passes of each token through the
    MLP's targets (an MoE layer's experts per token); mlp_only: those targets' columns only."""
    columns = sorted((_columns(a, k, mlp_only) for a in adapters), reverse=True)  # per adapter
    in_batch = _adapters_in_batch(len(columns), active)
    # Every batch is dense under an explicit 'dense', 'fused' or 'triton'; auto's dense (fused)
    # batches hold up to DENSE_MAX_ADAPTERS (larger ones go grouped or loop, which keep less).
    capped = min(in_batch, mlora.lora.DENSE_MAX_ADAPTERS)
    dense = {"dense": in_batch, "fused": in_batch, "triton": in_batch,
             "auto": capped, "auto_triton": capped}.get(kernel, 0)
    return sum(columns[:dense])


def _lora_hidden_per_token(adapters: list[LoraShape], e: int, active: int | None,
                           kernel: str, k: int = 1) -> dict[str, int]:
    """The LoRA hidden A(x) that the B matmuls keep for their weight gradient, and the dense
    kernel's column mask, bytes per token of one layer (summed over its input groups; k: an
    MoE layer's experts per token, each with its LoRA on the MLP targets)."""
    if not adapters:
        return {"lora_hidden": 0, "lora_mask": 0}
    width = _dense_columns(adapters, active, kernel, k)
    if width == 0:
        # Each row's own adapter's [N, r] per target: the costliest adapter bounds the batch.
        return {"lora_hidden": max(_columns(a, k) for a in adapters) * e, "lora_mask": 0}
    # [N, C] over every row for the batch's (costliest) adapters; dense, with more than one
    # of them, also keeps the bool [N, C] mask its product saves for the backward.
    several = _adapters_in_batch(len(adapters), active) > 1
    return {"lora_hidden": width * e, "lora_mask": width if kernel == "dense" and several else 0}


def _group_input_per_token(group: str, members: tuple[str, ...], width: int, e: int,
                           adapters: list[LoraShape], shared: bool, quant: str | None, kernel: str,
                           o_proj_input_copied: bool = False) -> int:
    """What keeps the input of one input group alive for the backward, bytes per token.
    o_proj_input_copied: o_proj's input is a copy of SDPA's output, not the output (GPT-OSS's
    sinks, DeepSeek-V3's padded values: extra dims are sliced off)."""
    targeting = [a for a in adapters if set(a.target_modules) & set(members)]
    dropped = [a for a in targeting if a.dropout > 0]
    mask_bits = 0
    if shared:
        # When any adapter drops out: one dropped-out copy and one 0/1 mask over all rows of
        # the batch (the other adapters' rows get ones), the mask in the dtype, or bool (1
        # byte) with fused; else the LoRA matmuls keep the input.
        if kernel in ("triton", "auto_triton"):  # the input itself is kept, and the mask as bits (8 a byte)
            copies, lora_keeps_input = 0, bool(targeting)
            mask_bits = -(-width // 8) if dropped else 0
        else:
            copies = ((1 + 1 / e) if kernel in ("auto", "fused") else 2) if dropped else 0
            lora_keeps_input = bool(targeting) and not dropped
    else:
        # A mask and a dropped-out copy per projection and adapter, over that adapter's rows;
        # the dropout-free adapters' rows keep views of the input itself.
        copies = max((2 * len(set(a.target_modules) & set(members)) for a in dropped), default=0)
        lora_keeps_input = any(a.dropout == 0 for a in targeting)
    # An 8-bit base layer keeps its input itself (bitsandbytes' MatMul8bitLt ctx.tensors).
    keeps_input = (lora_keeps_input or quant == "int8") and (o_proj_input_copied or group not in _SAVED_ANYWAY)
    return (copies + keeps_input) * width * e + mask_bits


def _lora_cast_bytes(args: ModelArgs, e: int, adapters: list[LoraShape], sparse: bool = False,
                     kind: str | None = None, kv_shared: bool = False, experts: bool = True) -> int:
    """A and B of every adapter cast to the activation dtype, kept for the input gradient (one
    layer, of `kind`: Qwen3.5's layers have either kind's projections; None: the costlier). In
    fp32 some casts are the parameters themselves; counting them is conservative. kv_shared:
    a Gemma 4 KV-shared layer's (None kind: those count too, their MLPs maybe double-wide).
    experts False: the experts' casts are not kept (grouped experts cast again in the backward)."""
    if kind is None:
        return max(_lora_cast_bytes(args, e, adapters, sparse, k, shared, experts)
                   for k, shared in {layer_signature(args, i)[1:] for i in range(args.num_layers)})
    shapes = projection_shapes(args, kind, kv_shared, sparse)
    copies = {m: _lora_copies(args, m, sparse) for m in shapes}  # (an expert target's: num_experts)
    return sum(a.r * (shapes[m][0] + shapes[m][1]) * e * copies[m]
               for a in adapters for m in a.target_modules if m in shapes and (experts or copies[m] <= 1))


def _experts_grouped(args: ModelArgs, dtype: torch.dtype, device: torch.device | None, quant: str | None) -> bool:
    """Whether a sparse layer's experts run as grouped GEMMs (models/moe.grouped_stacks, and
    lora_moe.ExpertRouting.grouped for their LoRA), from the shapes: unquantized experts,
    16-byte aligned rows, and a dtype torch groups on `device` (None:
    unknown, counted as one expert at a time, which keeps more). Their LoRA groups whatever the
    adapters' ranks (its columns are padded to 16 bytes: lora_moe._ExpertLoRAPlan.columns)."""
    from mlora.models import moe

    if (device is None or not moe.GROUPED_EXPERTS or quant is not None
            or not moe.grouped_mm_runs(dtype, torch.device(device))):
        return False
    e = torch.empty((), dtype=dtype).element_size()
    return all(d * e % 16 == 0 for d in (args.hidden_size, args.moe_intermediate_size))  # (2I: too)


def _grouped_expert_lora_buffers(args: ModelArgs, e: int, adapters: list[LoraShape], active: int | None) -> int:
    """What grouped experts' LoRA (lora_moe._GroupedExpertLoRAOp) builds for one projection of
    one layer in its backward, not per token: every expert's A [E, C, in] and B [E, out, C]
    stacked in fp32 and cast, and their gradients (in the dtype, then fp32), for the costliest
    projection; C: the batch's costliest adapters' ranks side by side, padded to 16 bytes."""
    shapes = projection_shapes(args)
    per_adapter = {m: sorted((a.r for a in adapters if m in a.target_modules), reverse=True) for m in _MLP_TARGETS}
    align = 16 // e
    most = 0
    for m, ranks in per_adapter.items():
        if m not in shapes or not ranks:
            continue
        C = _round_up(sum(ranks[:_adapters_in_batch(len(ranks), active)]), align)
        fan_in, fan_out = shapes[m]
        most = max(most, args.num_experts * C * (fan_in + fan_out) * (2 * e + 8))
    return most


def _lora_copies(args: ModelArgs, target: str, sparse: bool) -> int:
    """LoRA modules of one adapter for `target` in one layer: one, or on an MoE model one per
    expert of a sparse layer and none in a dense layer's MLP (Llama 4: one, on the shared expert
    or the dense MLP; its experts.* one per expert of a sparse layer)."""
    if target in EXPERT_TARGET_MODULES:  # Gemma 4 26B-A4B's experts, in every layer; Llama 4's, in its sparse ones
        return args.num_experts  # (projection_shapes offers them there only)
    if not args.is_moe or target not in _MLP_TARGETS or not args.mlp_lora_on_experts:
        return 1
    return args.num_experts if sparse else 0


def _distinct_masks(args: ModelArgs, layers: Sequence[int], seq_len: int, every_kind: bool) -> int:
    """How many bool [B, 1, S, S] masks the layers' attention gets (llama.py builds one per
    distinct window and chunk, a window or chunk no shorter than the sequence being none):
    every kind's with padding or packing (every_kind), else those of windows or chunks that cut."""
    kinds = set()
    for i in layers:
        window, chunk = args.sliding_window[i], args.attention_chunk[i]
        kinds.add((window if window is not None and window < seq_len else None,
                   chunk if chunk is not None and chunk < seq_len else None))
    return len(kinds) if every_kind else sum(kind != (None, None) for kind in kinds)


def _batch_bytes_per_token(args: ModelArgs, e: int, masks: int, seq_len: int,
                           layers: Sequence[int]) -> float:
    """The fused batch itself and what the model derives from it once for all layers (masks:
    how many bool [B, 1, S, S] attention masks, _distinct_masks)."""
    ids = 8 * 5  # input_ids, labels, attention_mask, position_ids, document_ids: int64
    # cos, sin: [S, R], or [B, 1, S, R] per token, for each distinct RoPE of the stage's layers
    # (Gemma 3's and OLMo 3's sliding layers may have their own); fp32 for OLMo 2
    ropes = args.ropes_of(layers)
    rope = 2 * sum(r.dim or args.rope_dim for r in ropes) * (4 if args.rope_fp32 else e)
    return ids + rope + masks * seq_len  # (a bool [B, 1, S, S] mask: S bytes a token)


def _head_bytes(args: ModelArgs, e: int, N: int) -> tuple[int, int]:
    """(kept from the forward to the backward, the peak of one chunk) of the head and loss.py's
    chunked cross-entropy, which takes the hidden states' gradient in the forward.

    kept: that gradient [N, H] in the dtype (the loss's saved state, held until its backward
    like any activation: so counted per micro-batch in flight on a pipeline's last stage).
    chunk, c = min(loss.chunk_tokens(V), N) tokens at a time: the chunk's fp32 logits, then
    log_softmax's fp32 output (kept for the chunk's backward), and in that backward nll_loss's
    gradient and log_softmax's input gradient while the output is still alive: three fp32
    [c, V] (the dtype's logits die in the upcast), plus the chunk's gradient [c, H]. Gemma 2's
    soft cap keeps tanh's output [c, V] in the dtype besides. And two [N, H] in the dtype: the
    final norm's output, alive through the loss, and the trained positions' hidden states
    gathered from it for the head (the trainer's batches; at most N of them); and per token
    the targets in int64, shifted and gathered, and the loss in fp32 (20 bytes).
    Measured on the CPU with every allocation tracked (tests/test_memory.py), bf16 and fp32,
    with and without the soft cap: within 5 %, the [c, H] term and, without the gathering, one
    [N, H] being over. On CUDA the chunk's cross-entropy runs in loss_kernels' kernel, which
    overwrites the dtype's [c, V] logits with their gradient and makes no fp32 copy: the 12
    bytes an entry are then an overestimate (by about 0.6 GiB at TinyLlama's chunk), kept as
    the bound until a GPU measures the kernel's peak."""
    c = min(chunk_tokens(args.vocab_size), N)
    kept = N * args.hidden_size * e
    per_entry = 12 + (e if args.final_softcap is not None else 0)
    return kept, c * args.vocab_size * per_entry + (c + 2 * N) * args.hidden_size * e + 20 * N


def _qk_norm_width(args: ModelArgs, kind: str = "attention") -> int:
    """Elements of the q and k norms' weights: [D] each (per head), or [nh D] and [nkv D]
    (D: the head size of a layer of `kind`)."""
    if not args.qk_norm:
        return 0
    D = args.global_head_dim if kind == "global_attention" else args.head_dim
    return 2 * D if args.qk_norm_per_head else (args.num_heads + args.num_kv_heads) * D


def _linear_attention_saved_per_token(args: ModelArgs, e: int, seq_len: int) -> float:
    """What one Gated DeltaNet layer (models/gdn.py) keeps for the backward, bytes per token:
    the conv's input and output; q and k (repeated to the value heads) and v in fp32, several
    times over as the chunked delta rule derives them; the chunks' [C, C] decay and attention
    matrices per value head; the recurrent state of every chunk; the gated norm's tensors. The
    chunked tensors cover the sequence rounded up to whole chunks of 64."""
    Hv, Dk, Dv = args.linear_num_value_heads, args.linear_key_head_dim, args.linear_value_head_dim
    conv = 2 * args.linear_num_key_heads * Dk + Hv * Dv
    chunk = 64
    padded = _round_up(max(seq_len, 1), chunk) / max(seq_len, 1)  # chunked tensors per real token
    keys, values = Hv * Dk, Hv * Dv
    core = (8 * keys + 4 * values + 5 * Hv * chunk) * 4 * padded + 2 * Hv * Dk * Dv * 4 / chunk * padded
    norm = values * (2 * e + 2 * 4)  # w * normed in the dtype, its product, silu(z) and z in fp32
    return 2 * conv * e + core + norm + 16 * Hv


def _layer_backward_per_token(args: ModelArgs, e: int, seq_len: int, sparse: bool = False,
                              mixer: str = "attention", kv_shared: bool = False, grouped: bool = False) -> int:
    """Bytes per token that one decoder layer's backward allocates beyond what the forward
    kept: the gradients in flight, at the costliest moment. grouped: the sparse layer's experts
    run as grouped GEMMs (models/moe.grouped_experts), whose backward covers every routed token
    at once."""
    H, D, nh = args.hidden_size, args.head_dim, args.num_heads
    I = args.intermediate_size * (2 if kv_shared and args.double_wide_mlp else 1)
    residual = 2 * H * e  # the gradient of the layer output + the residual stream's sum
    # down_proj's input gradient (base + LoRA, and through the dropout mask), then the
    # gradients of silu(gate) and up, then of gate: about 6 [N, I] at once.
    # (GPT-OSS's clamped GLU: about 8)
    glu = 8 if args.glu_limit else 6
    mlp = glu * I * e
    k = args.num_experts_per_tok
    # grouped: every expert at once over the N k routed tokens: the GLU's gradients [N k, I],
    # the experts' output gradient in fp32 and in the dtype, and their input's [N k, H]
    experts = (glu * k * args.moe_intermediate_size * e + k * H * (3 * e + 4) if grouped
               else glu * args.moe_intermediate_size * e)  # (else one expert at a time, at most every token)
    if sparse:
        # and the [N, H] input gradient the gather scatters into, summed with the others'
        mlp = max(experts, glu * args.shared_expert_intermediate_size * e) + 2 * H * 4
    if args.moe_beside_mlp:  # (Gemma 4: the dense MLP's, or the experts' beside it)
        mlp = max(mlp, experts + 2 * H * 4)
    # flash backward: grad_out, dq, dk/dv expanded to nh heads, an fp32 dq accumulator, and
    # softmax_d fp32 [B, nh, S]; the memory-efficient kernel needs about the same.
    D = args.qk_head_dim  # (latent attention's: nope + rope parts)
    if mixer == "global_attention":  # (Gemma 4's full layers' heads)
        D = args.global_head_dim
    attention = nh * (D + SINK_PAD * args.attn_sinks) * (4 * e + 4) + 4 * nh
    if args.attn_softcap is not None:
        # softcapped_attention: the gradients of softmax's fp32 input and output, then of the
        # scores in the dtype twice (through the cast and the tanh), per query and head S each
        attention = nh * seq_len * (8 + 2 * e) + 3 * nh * D * e
    if mixer == "linear":
        # the chunked delta rule's backward: a gradient for each fp32 tensor it kept, about as
        # many bytes at its peak as the forward kept
        attention = math.ceil(_linear_attention_saved_per_token(args, e, seq_len))
    norm = 3 * H * 4  # RMSNorm's backward works in fp32: grads of the upcast input and products
    return residual + max(mlp, attention, norm)


def _dequant_bytes(args: ModelArgs, e: int, quant: str | None, N: int) -> int:
    """Quantized layers rebuild a full-precision weight for every matmul (bitsandbytes' 4-bit
    gemm for more than one row, and the 8-bit backward's `CB.to(dtype) * SCB`); the 8-bit
    forward also quantizes its input (an fp16 copy and an int8 one)."""
    if quant is None:
        return 0
    shapes = list(projection_shapes(args).values())
    if args.is_moe:  # a dense layer's or a shared expert's MLP may be wider than an expert's
        width = max(args.intermediate_size if not all(args.moe_layers) else 0, args.shared_expert_intermediate_size)
        shapes += [(args.hidden_size, width), (width, args.hidden_size)]
    if args.double_wide_mlp:  # (Gemma 4's KV-shared layers' MLPs: twice as wide)
        shapes += [(args.hidden_size, 2 * args.intermediate_size), (2 * args.intermediate_size, args.hidden_size)]
    largest = max(i * o for i, o in shapes)
    extra = 2 * largest * e  # the dequantized weight and the copy a dtype change makes
    if quant == "int8":
        extra += N * max(i for i, _ in shapes) * (2 + 1)
    return extra


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# ----------------------------------------------------------------------------- weights and state


def weight_bytes(args: ModelArgs, dtype: torch.dtype, *, quant: Any = None, double_quant: bool = False,
                 parts: Sequence[str] | None = None) -> int:
    """Bytes of the frozen base (or of a stage's `parts`) on the device: projections in the
    dtype or quantized (bitsandbytes' packed weight + its quantization state, as
    `mlora.quant.linear_weight_bytes` counts it), biases, norms, embedding and head in the dtype."""
    kind, dq = _quant_kind(quant, double_quant)
    stage = _Stage.of(args, parts)
    e = torch.empty((), dtype=dtype).element_size()
    H, V = args.hidden_size, args.vocab_size
    mixer = {}
    # (Gemma 4's full layers: their own sizes; its KV-shared layers: no k/v projections nor k norm)
    for layer_kind, kv_shared in {layer_signature(args, i)[1:] for i in range(args.num_layers)} - {("linear", False)}:
        # (Gemma 4 26B-A4B's experts: `beside`, below; Llama 4's: `sparse`)
        shapes = projection_shapes(args, layer_kind, kv_shared, named_experts=False)
        attention = sum(_projection_bytes(i, o, e, kind, dq) for m, (i, o) in shapes.items() if m not in _MLP_TARGETS)
        # (the biases of q/k/v_proj or qkv_proj, and o_proj)
        biases = sum(o for m, (_, o) in shapes.items() if m not in {*_MLP_TARGETS, "o_proj"}) * args.attention_bias
        biases += H * args.o_proj_bias
        norms = args.num_norms * H + _qk_norm_width(args, layer_kind) // (2 if kv_shared else 1)
        # Gemma 4 E2B/E4B: the per-layer input's gate, its projection and the norm after
        norms += args.per_layer_input_size and 2 * H * args.per_layer_input_size + H
        if args.mla:  # biases on q_a_proj and kv_a_proj_with_mqa (and o_proj); the latents' norms
            biases = (args.q_lora_rank + args.kv_lora_rank + args.head_dim) * args.attention_bias + H * args.o_proj_bias
            norms += args.q_lora_rank + args.kv_lora_rank
        sinks = args.num_heads * args.attn_sinks  # GPT-OSS: a logit per head
        scalar = int(args.layer_scalar)  # Gemma 4's scalar after each layer
        mixer[layer_kind, kv_shared] = attention + (biases + norms + sinks + scalar) * e  # biases + RMSNorm weights
    if "linear" in args.layer_kinds:  # Qwen3.5's linear attention: its projections, conv, decays, gated norm
        Hv, Dv = args.linear_num_value_heads, args.linear_value_head_dim
        conv_channels = 2 * args.linear_num_key_heads * args.linear_key_head_dim + Hv * Dv  # (q, k, v)
        mixer["linear", False] = (sum(_projection_bytes(i, o, e, kind, dq)
                                      for i, o in linear_projection_shapes(args).values())
                           + (conv_channels * args.linear_conv_kernel + 2 * Hv + Dv + args.num_norms * H) * e)

    def mlp(width: int, fused: bool = args.fused_gate_up) -> int:  # one SwiGLU's projections (gate and
        # up fused or not: the same bytes unquantized, but a quantized one has one quantization
        # state, code book included, per projection) and their biases
        gate_up = ([_projection_bytes(H, 2 * width, e, kind, dq)] if fused
                   else [_projection_bytes(H, width, e, kind, dq)] * 2)
        return sum(gate_up) + _projection_bytes(width, H, e, kind, dq) + (2 * width + H) * args.mlp_bias * e

    beside = 0  # Gemma 4 26B-A4B: every expert beside the dense MLP, the router (proj, scale,
    if args.moe_beside_mlp:  # per_expert_scale), 3 norms
        # (each expert's gate and up are one gate_up_proj, quantized as one, while the dense
        # MLP's are two: llama.DecoderLayer)
        beside = (args.num_experts * mlp(args.moe_intermediate_size, fused=True)
                  + (args.num_experts * (H + 1) + 4 * H) * e)
    if args.is_moe:  # every expert, the router; the shared expert (and Qwen2-MoE's gate)
        # the router's weight, bias and correction bias (GLM-4.5: in fp32)
        router = (args.num_experts * (H + args.router_bias + (args.router == "sigmoid"))
                  * (4 if args.router_params_fp32 else e))
        # (Llama 4's experts hold gate and up as one gate_up_proj, quantized as one: llama.DecoderLayer)
        sparse = (args.num_experts * mlp(args.moe_intermediate_size, fused=args.fused_gate_up or args.experts_named)
                  + router)
        if args.shared_expert_intermediate_size:
            sparse += mlp(args.shared_expert_intermediate_size) + H * e * args.shared_expert_gated
    # (a dense layer's MLP: Gemma 4's KV-shared layers' maybe double-wide)
    total = sum(mixer[layer_signature(args, i)[1:]]
                + (sparse if args.moe_layers[i] else mlp(args.mlp_size_of(i)) + beside)
                for i in stage.layers)
    total += V * H * e * stage.has_embed + H * e * stage.has_norm
    if stage.has_embed and args.per_layer_input_size:  # Gemma 4 E2B/E4B: the per-layer inputs' table, projection, norm
        LP = args.num_layers * args.per_layer_input_size
        total += (args.per_layer_vocab_size * LP + H * LP + args.per_layer_input_size) * e
    if stage.has_head and not (args.tie_word_embeddings and stage.has_embed):
        total += V * H * e
    return total


def _projection_bytes(in_f: int, out_f: int, e: int, quant: str | None, double_quant: bool) -> int:
    n = in_f * out_f
    if quant is None:
        return n * e
    if quant == "int8":
        return n + 4 * out_f  # int8 weight + fp32 absmax per output row (SCB)
    blocks = math.ceil(n / _BLOCK_4BIT)
    packed = math.ceil(n / 2)  # two 4-bit codes per byte
    code = 16 * 4  # the 16-value fp32 code book (nf4 or fp4)
    if not double_quant:
        return packed + blocks * 4 + code  # fp32 absmax per block of 64
    # absmax quantized to uint8 in blocks of 256, each with an fp32 absmax, its own 256-value
    # code book and one fp32 offset
    return packed + blocks + math.ceil(blocks / _BLOCK_ABSMAX) * 4 + 256 * 4 + 4 + code


def lora_state_bytes(args: ModelArgs, lora: Iterable[Any], num_layers: int | None = None,
                     layers: Sequence[int] | None = None, dtype: torch.dtype | None = None) -> int:
    """fp32 A and B of every adapter on the decoder layers `layers` (or the first `num_layers`;
    default: all), with their gradients (alive across gradient accumulation) and optimizer
    moments; with a 16-bit activation `dtype`, also the adapter's weights cast to it, kept
    between steps (flat_params.FlatParameters.cast_of: one cast of the whole adapter, which
    the fused op's groups view)."""
    e = 0 if dtype is None else torch.empty((), dtype=dtype).element_size()
    cast = e if e < 4 else 0
    shapes = {sig: projection_shapes(args, sig[1], sig[2], sig[0]) for sig in
              {layer_signature(args, i) for i in range(args.num_layers)}}
    if layers is None:
        layers = range(args.num_layers if num_layers is None else num_layers)
    total = 0
    for a in map(LoraShape.of, lora):
        for i in layers:
            # (Qwen3.5: a layer has one kind's projections; Gemma 4's KV-shared ones no k/v_proj; Llama 4's
            # dense MLPs their own width)
            here = shapes[layer_signature(args, i)]
            params = sum(a.r * (here[m][0] + here[m][1]) * _lora_copies(args, m, args.moe_layers[i])
                         for m in a.target_modules if m in here)
            total += params * (4 * (2 + a.optimizer_moments) + cast)
    return total


# ----------------------------------------------------------------------------- budgets


def choose_token_budget(args: ModelArgs, *, free_bytes: int, seq_len: int, dtype: torch.dtype,
                        lora: Iterable[Any] = (), fraction: float = 0.9, recompute: bool = False,
                        quant: Any = None, weights_resident: bool = True, **estimate_kwargs) -> int:
    """The most tokens (rows * seq_len, in whole rows) whose estimated peak fits in
    `fraction * free_bytes`; 0 when not even one row fits.

    weights_resident: `free_bytes` was read after the base was loaded, so the weights are not
    counted again (the adapters' state is, whole: its gradients and moments come later).
    The fraction leaves room for what the estimate does not see, above all fragmentation.
    `estimate_kwargs` go to `estimate_peak_bytes` (parts, shared_lora_inputs, ...)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    lora = list(lora)
    budget = fraction * free_bytes

    def need(rows: int) -> int:
        est = estimate_peak_bytes(args, rows=rows, seq_len=seq_len, dtype=dtype, lora=lora,
                                  recompute=recompute, quant=quant, **estimate_kwargs)
        return est.total - (est.weights if weights_resident else 0)

    if need(1) > budget:
        return 0
    fits, too_many = 1, 2  # the estimate grows with rows: double, then bisect
    while need(too_many) <= budget:
        fits, too_many = too_many, too_many * 2
    while too_many - fits > 1:
        mid = (fits + too_many) // 2
        fits, too_many = (mid, too_many) if need(mid) <= budget else (fits, mid)
    return fits * seq_len


@dataclass(frozen=True)
class BudgetPlan:
    """What the trainer does about memory before it starts: the fused batches' token budget
    (None = no limit) and, maybe, one line to print on stderr about it."""

    max_tokens: int | None
    note: str | None = None


FITTED_STRATEGIES = ("fast-fit", "optimal-fit")


def explicit_mask_of(cfg: Any) -> bool | None:
    """`estimate_peak_bytes`' explicit_mask for a run: left-padded and packed rows give SDPA an
    explicit mask (None: only where a sliding window asks for one)."""
    return True if cfg.packing or any(a.expand_side == "left" for a in cfg.lora) else None


def run_estimate_kwargs(cfg: Any, *, dtype: torch.dtype, quant: Any = None, parts: Sequence[str] | None = None,
                        device: torch.device | None = None) -> dict:
    """`estimate_peak_bytes`' arguments for a run of `cfg` (a TrainConfig), but for the batch's
    shape (rows, seq_len): every adapter resident, up to train_lora_simultaneously_num of them
    in one batch. The budget (plan_token_budget) and `mlora train --dry_run` use these alike."""
    lora = [LoraShape.of(a) for a in cfg.lora]
    active = cfg.train_lora_simultaneously_num or len(lora)
    return dict(dtype=dtype, lora=lora, recompute=cfg.recompute, quant=quant, parts=parts,
                explicit_mask=explicit_mask_of(cfg), active_adapters=active, device=device)


def plan_token_budget(cfg: Any, args: ModelArgs, *, free_bytes: int | None, dtype: torch.dtype,
                      quant: Any = None, parts: Sequence[str] | None = None,
                      device: torch.device | None = None) -> BudgetPlan:
    """Memory-aware admission for a run of `cfg` (a TrainConfig) on a base of shape `args`.

    free_bytes: what the device can still allocate with the base loaded and no adapter yet
    (`device_free_bytes`); None (not CUDA) leaves everything as configured.
    fast-fit / optimal-fit with no `max_tokens_per_batch`: the budget is the most tokens
    (whole rows of cutoff_len) whose estimated peak fits `memory_fraction` of the free memory;
    a UserError when not even one row fits. With a configured budget, or with `trivial` (which
    has no budget), a warning when the largest batch may not fit: split-and-retry will catch
    it. Every adapter of the config counts as resident (the trainer builds them all), and a
    fused batch holds up to train_lora_simultaneously_num of them. device: the run's (what
    kernel `auto` runs there, see estimate_peak_bytes)."""
    configured = cfg.max_tokens_per_batch
    if free_bytes is None:
        return BudgetPlan(configured)
    fraction = cfg.memory_fraction
    common = dict(seq_len=cfg.cutoff_len, **run_estimate_kwargs(cfg, dtype=dtype, quant=quant, parts=parts,
                                                                 device=device))
    where = f"{fraction:.0%} of {format_size(free_bytes)} free"
    micro_rows = sorted((a.micro_batch_size or a.batch_size for a in cfg.lora), reverse=True)

    def need(rows: int) -> int:  # the weights are resident already: free_bytes is net of them
        est = estimate_peak_bytes(args, rows=rows, **common)
        return est.total - est.weights

    if cfg.train_strategy in FITTED_STRATEGIES:
        tokens = choose_token_budget(args, free_bytes=free_bytes, fraction=fraction, **common)
        if configured is None:
            if tokens == 0:
                fixes = "lower cutoff_len" if cfg.recompute else "set \"recompute\": true, lower cutoff_len"
                raise UserError(
                    f"memory_fraction {fraction}: not even one row of cutoff_len {counted(cfg.cutoff_len, 'token')} "
                    f"is estimated to fit in {where} (one row needs about {format_size(need(1))}); "
                    f"{fixes}, train fewer adapters at once, or raise memory_fraction")
            note = f"mlora: token budget {tokens} (estimated to fit {where})"
            if micro_rows[0] * cfg.cutoff_len > tokens:
                note += (f"; a micro-batch of more than {counted(tokens // cfg.cutoff_len, 'full row')} runs alone, "
                         f"split and retried if it runs out of memory")
            return BudgetPlan(tokens, note)
        if configured > tokens:
            return BudgetPlan(configured, (
                f"mlora: warning: max_tokens_per_batch {configured} is above the {counted(tokens, 'token')} estimated "
                f"to fit {where}; a batch that runs out of memory will be split and retried"))
        return BudgetPlan(configured)
    # trivial: the largest fused batch takes the micro-batches of the `active` adapters with
    # the most rows, every row cutoff_len tokens (packed rows are no longer than that).
    rows = sum(micro_rows[:common["active_adapters"]])
    needed = need(rows)
    if needed > fraction * free_bytes:
        return BudgetPlan(configured, (
            f"mlora: warning: the largest fused batch ({counted(rows, 'row')} of {counted(cfg.cutoff_len, 'token')}) "
            f"is estimated to need {format_size(needed)}, more than {where}; batches that run out of memory will be "
            f"split and retried (train_strategy fast-fit or optimal-fit would size batches to fit)"))
    return BudgetPlan(configured)


def format_size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def device_free_bytes(device: torch.device | str) -> int | None:
    """Bytes this process can still allocate on a CUDA device: the driver's free memory plus
    what PyTorch's caching allocator holds but has not handed out. None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


# ----------------------------------------------------------------------------- OOM split-and-retry

T = TypeVar("T")
R = TypeVar("R")

# torch.OutOfMemoryError is torch.cuda.OutOfMemoryError on current torch; older builds have
# only the latter. Both exist (as classes) on a CPU build too.
_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {c for c in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
     if isinstance(c, type)})
_OOM_BASE = _OOM_ERRORS[0] if _OOM_ERRORS else MemoryError
# cuBLAS reports a device out of memory (its handle or workspace allocation, at a matmul) as a
# plain RuntimeError carrying this status, not as torch.OutOfMemoryError.
_CUBLAS_OUT_OF_MEMORY = "CUBLAS_STATUS_ALLOC_FAILED"


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` says the device ran out of memory: torch's OutOfMemoryError, or cuBLAS's
    allocation failure (a RuntimeError that names it). Every handler that splits, halves or
    retries on OOM asks this; it catches broadly and re-raises (bare `raise`) what this refuses,
    so any other error goes on unchanged."""
    return isinstance(err, _OOM_ERRORS) or (isinstance(err, RuntimeError) and _CUBLAS_OUT_OF_MEMORY in str(err))


class UnsplittableOOM(_OOM_BASE):  # type: ignore[misc, valid-type]
    """Out of memory on a chunk that may not be split further (`items`). A
    torch.OutOfMemoryError, so a generic OOM handler still sees it; `run_splitting_on_oom`
    never splits around it."""

    items: list = []


def free_device_memory() -> None:
    """Drop unreachable Python objects (tensors in reference cycles) and hand PyTorch's cached
    CUDA blocks back, so a retry starts from as much free memory as possible."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def run_splitting_on_oom(run_part: Callable[[list[T]], R], items: Sequence[T], *, min_items: int = 1,
                         on_split: Callable[[list[T], list[T]], None] | None = None) -> list[R]:
    """`[run_part(items)]`, or, when that runs out of device memory, the results of running
    each half (recursively, halves of halves...) in order: the chunks always cover `items`
    exactly once, in order, and the results come in chunk order.

    items are whatever run_part can run a subset of: the trainer's per-adapter MicroBatches of
    one fused batch, or the examples of one adapter's micro-batch. A chunk of `min_items` or
    fewer that still runs out of memory raises UnsplittableOOM (chained to the original error).
    on_split(left, right) is called before the halves run (the trainer logs there).

    Why splitting is exact for training: the trainer's loss is each adapter's CE *sum* divided
    by its whole optimizer step's label-token count (`MicroBatch.step_label_tokens`,
    loss.py), so the backward of two halves adds up to the backward of the whole, exactly as
    gradient accumulation over micro-batches does. run_part must be all-or-nothing: an OOM in
    the middle of a backward leaves the gradients of the layers already done accumulated, and
    the dropout generators advanced (see `grads_restored_on_error`, `generators_restored_on_error`).

    No leak: the failed attempt's exception, whose traceback holds that attempt's frames and so
    its tensors, is dropped before memory is freed and the halves run.
    """
    if min_items < 1:
        raise ValueError(f"min_items must be >= 1, got {min_items}")
    results: list[R] = []
    pending = [list(items)]  # a stack: the next chunk to run is the last one
    while pending:
        chunk = pending.pop()
        done, result = _attempt(run_part, chunk, min_items)
        if done:
            results.append(result)
            continue
        free_device_memory()
        half = (len(chunk) + 1) // 2
        left, right = chunk[:half], chunk[half:]
        if on_split is not None:
            on_split(left, right)
        pending += [right, left]
    return results


def _attempt(run_part: Callable[[list[T]], R], chunk: list[T], min_items: int) -> tuple[bool, R | None]:
    """(True, result), or (False, None) after an OOM on a chunk that may be split. The
    exception is not kept: Python deletes the `except ... as` name when the block ends."""
    try:
        return True, run_part(chunk)
    except UnsplittableOOM:
        raise  # a nested split gave up on a single item: halving around it cannot help
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        if len(chunk) <= min_items:
            unsplittable = UnsplittableOOM(f"out of memory on {counted(len(chunk), 'item')}, which cannot be split "
                                           f"further (min_items={min_items}): {_first_line(err)}")
            unsplittable.items = chunk
            raise unsplittable from err
    return False, None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextmanager
def grads_restored_on_error(params: Iterable[torch.Tensor], before: dict | None = None) -> Iterator[None]:
    """Make a forward + backward all-or-nothing for the gradients of `params`: if the block
    raises (an OOM halfway through the backward, say), every `.grad` is put back as it was, so
    a retry does not count the layers already back-propagated twice.

    Nothing is copied: the gradients accumulated so far are set aside (`.grad = None`), the
    block's backward writes fresh ones, and on success each is added into the set-aside one in
    place - the very `old += new` that autograd's accumulation would have done, so the result
    is bit-identical to running the block unprotected. The cost: when gradients were already
    accumulated (not at the first micro-batch of an optimizer step, when every `.grad` is
    None), the block's fresh gradients live until it ends instead of being added in one by one.
    They pile up as the backward goes down the layers, while those layers' activations, far
    larger, are freed, so the step's peak (in the head or the last layer) does not move.

    before: a dict that, on success, gets each parameter's gradient from before the block (None:
    none yet) unless it has one already (so over several blocks it keeps the first's); the sum
    is then made out of place, leaving those gradients intact for the caller to put back. That
    is one copy of the accumulated gradients more, for as long as the caller keeps the dict."""
    params = list(params)
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    except BaseException:
        for p, old in zip(params, saved):
            p.grad = old
        raise
    else:
        olds, news, summed_into = [], [], []
        for p, old in zip(params, saved):
            if before is not None:
                before.setdefault(p, old)
            if old is None:
                continue  # the block's gradient (or still none) is the whole gradient
            if p.grad is not None:
                olds.append(old)
                news.append(p.grad)
                summed_into.append(p)
            p.grad = old
        if olds and before is None:
            torch._foreach_add_(olds, news)  # one fused launch for hundreds of LoRA tensors
        elif olds:  # the same sums, into new tensors: the old ones stay as they were
            for p, total in zip(summed_into, torch._foreach_add(olds, news)):
                p.grad = total
    finally:
        del saved


@contextmanager
def generators_restored_on_error(generators: Iterable[torch.Generator]) -> Iterator[None]:
    """Put the adapters' dropout generators back where they were if the block raises: the
    halves a failed batch is retried in then draw the masks it would have drawn. Each
    adapter draws over its own rows (lora.AdapterRows.length), so a split that keeps every
    adapter's micro-batch whole (across adapters) trains exactly as the unsplit batch would;
    a micro-batch cut into pieces draws over other layouts, a statistically equal run."""
    generators = list(dict.fromkeys(generators))  # adapters may share none, but be safe
    states = [g.get_state() for g in generators]
    try:
        yield
    except BaseException:
        for g, state in zip(generators, states):
            g.set_state(state)
        raise


# ----------------------------------------------------------------------------- pipeline stages


@dataclass(frozen=True)
class InFlightFit:
    """How many micro-batches a pipeline stage can hold forwarded but not yet backwarded.

    A stage keeps each such micro-batch's activations until its backward; the rest of what a
    step adds is there once however many are in flight (the adapters' state, one backward's
    working set or the head's cross-entropy, the workspace). So k in flight need about
    `once + k * per_micro_batch` bytes beyond the resident weights."""

    fits: int  # the most in flight within the budget; 0: not even one
    per_micro_batch: int  # bytes each one in flight keeps: its activations
    once: int  # bytes counted once, whatever the number in flight
    budget: int  # fraction * free bytes

    def need(self, count: int) -> int:
        return self.once + count * self.per_micro_batch


def micro_batches_in_flight(args: ModelArgs, *, free_bytes: int, rows: int, seq_len: int,
                            dtype: torch.dtype, fraction: float = 0.9, **estimate_kwargs) -> InFlightFit:
    """The most micro-batches of `rows` rows of `seq_len` tokens that a pipeline stage may hold
    in flight within `fraction * free_bytes`, by `estimate_peak_bytes` (its `parts`, `lora`,
    `recompute`, `quant`... come in `estimate_kwargs`).

    free_bytes is read with the stage's weights resident, so they are not counted; everything
    else of the estimate but the activations is counted once (see `InFlightFit`):

        fits = floor((fraction * free_bytes - once) / activations), 0 when negative
        once = total - weights - activations"""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    est = estimate_peak_bytes(args, rows=rows, seq_len=seq_len, dtype=dtype, **estimate_kwargs)
    per = est.activations
    once = est.total - est.weights - per
    budget = int(fraction * free_bytes)
    fits = max(0, (budget - once) // max(per, 1))  # (a stage that keeps nothing: any number fits)
    return InFlightFit(fits, per, once, budget)
