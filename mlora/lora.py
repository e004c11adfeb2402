"""BatchLoRA: frozen linear layers shared by several LoRA adapters in one fused batch.

A fused batch holds the rows of several adapters, each adapter a contiguous row range
(`AdapterRows`). `LoraLinear` runs the frozen base matmul once for all rows and adds
`scale * B(A(dropout(x)))` to each adapter's own rows only.

Making the LoRA side cheap (measured in benchmarks/THROUGHPUT.md): the cost of LoRA is not
its FLOPs (about 1% of the base at r=16) but memory traffic and kernel launches. So:

* Projections that read the same input (q/k/v of attention, gate/up of the MLP) form one
  `InputGroup`: the input is dropped out once per adapter, read once, and multiplied by all
  members' A matrices in one matmul; each member then applies its own B. **One dropout mask
  per adapter is shared by the projections of a group** (PEFT draws one per projection); it
  is still inverted dropout on each LoRA input, and it avoids a masked copy of the
  activation per projection. The 1/(1-p) rescaling is folded into the LoRA scale.
* When every adapter of the batch has the same rank and targets, all adapters' matmuls of a
  group run as one grouped matmul (`torch._grouped_mm`, per-adapter row offsets) instead of
  a Python loop over adapters: the launch count no longer grows with the adapter count.
* The B product is added to the base output inside the base GEMM (`addmm` with the LoRA
  delta as the accumulator) instead of a separate read-modify-write of the output.
* LoRA weights stay fp32 (the optimizer's master copy); matmuls run in the activation dtype.

The default kernel, "fused" (lora_fused.py), runs one input group - base GEMMs included - as
one autograd op with a hand-written backward; "triton" is that op with its dropout side in
Triton kernels that draw the mask in the forward's pass over the input and keep it as bits
(lora_triton.py); the others are
composed of torch ops whose gradients autograd derives. Either way the mask that scaled the
forward is the one the backward uses, so gradients are exact with dropout > 0
(tests/test_lora.py holds every kernel to plain autograd with the same masks).

The model code knows nothing of LoRA: `inject_lora` swaps the target `nn.Linear` modules for
`LoraLinear` wrappers after the model is built, and the trainer tells all wrappers which rows
belong to which adapter through one shared `BatchLayout` before each forward.
"""

from __future__ import annotations

import functools
import math
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mlora import forward_choices, kernel_fallback, lora_triton
from mlora.config import TARGET_MODULES as CONFIG_TARGET_MODULES
from mlora.device import upload
from mlora.lora_fused import (DropoutRows, FusedGroupLoRA, FusedGroupSpec, WeightCasts, build_column_factor,
                               build_row_owner, clear_factor_cache, column_factor, draw_keep_mask, row_owner)

# The seven projections of a LLaMA-style decoder layer, in PEFT/HF naming and canonical order.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Every projection a LoRA may target (Phi-3's fused qkv_proj and gate_up_proj too), canonical order.
ALL_TARGET_MODULES = CONFIG_TARGET_MODULES
# The MLP's projections (on an MoE model: its experts').
MLP_MODULES = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")
# An expert's projection that config.EXPERT_TARGET_MODULES may name: Gemma 4 26B-A4B's experts
# hang off the decoder layer itself (`layers.3.experts.5.down_proj`), Llama 4's off its sparse
# MLP as other families' do (`layers.3.mlp.experts.5.down_proj`).
_EXPERT = re.compile(r"\blayers\.\d+\.(?P<mlp>mlp\.)?experts\.\d+\.(?P<proj>gate_up_proj|down_proj)$")


def target_name(path: str, experts_named: bool = False) -> str:
    """The target_modules entry that selects the projection at `path`: its own name ('q_proj',
    'model.layers.0.mlp.experts.5.down_proj' -> 'down_proj'), but 'experts.down_proj' for the
    experts of a model whose experts are named so (ModelArgs.experts_named: Llama 4's
    'model.layers.1.mlp.experts.5.down_proj'), as Gemma 4's beside its dense MLP always are
    ('model.layers.0.experts.5.down_proj')."""
    m = _EXPERT.search(path)
    if m and (experts_named or not m["mlp"]):
        return f"experts.{m['proj']}"
    return path.rsplit(".", 1)[-1]


# Projections of one parent module that read the same input tensor.
# (DeepSeek-V3: q_proj or q_a_proj, and kv_a_proj_with_mqa, read the layer's normed input; so
# do Qwen3.5's linear-attention input projections, and Qwen3-Next's two fused ones.)
INPUT_GROUPS = (("q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa"),
                ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "in_proj_qkvz", "in_proj_ba"),
                ("gate_proj", "up_proj"))

# How the adapters of one batch share a matmul (benchmarks/THROUGHPUT.md measures each):
#   "fused":   the dense math as one hand-written autograd op per input group, base GEMMs
#              included (lora_fused.py): a bool dropout mask, the input gradient
#              accumulated inside the GEMMs, one autograd node per group. A base it cannot
#              run itself (a quantized layer) runs outside with its own autograd, and the
#              op's LoRA delta is added to its output.
#   "dense":   one ordinary GEMM for all adapters' A (and one per member for B) over all rows,
#              with each row's other adapters' columns zeroed: G times the (tiny) LoRA FLOPs,
#              but one well-tuned cuBLAS call; any ranks, targets and row layout.
#   "grouped": torch._grouped_mm with per-adapter row offsets: exact FLOPs, one launch; needs
#              equal ranks and targets, rows tiling the batch, bf16 on CUDA.
#   "loop":    a Python loop over adapters (the reference; launches grow with adapters).
#   "triton":  fused, with the dropout mask drawn inside a Triton kernel and kept as bits
#              (lora_triton.py): no dropped-out copy, no masking pass. CUDA only
#              (and the CPU under Triton's interpreter, for tests). On one H200 it was a few
#              % faster than fused with about a tenth less memory (benchmarks/RESULTS.md), equal to
#              torch and fused == solo there (gpu_checks.py).
#   "auto":    up to DENSE_MAX_ADAPTERS adapters triton on CUDA devices of compute
#              capability 9.0 and up (where it was measured; fused from the first failure
#              of its Triton kernels there on, kernel_fallback.py), else fused; beyond, grouped
#              where allowed, else loop. (The cap is named for what fused and dense share:
#              every row times every adapter's columns.)
# MLORA_LORA_KERNEL sets it.
KERNELS = ("auto", "fused", "triton", "dense", "loop", "grouped")
DENSE_MAX_ADAPTERS = 8
kernel = os.environ.get("MLORA_LORA_KERNEL", "auto")
_GROUPED_MM = getattr(torch, "_grouped_mm", None)


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on a contiguous gradient: torch._grouped_mm's backward
    wants 16-byte aligned strides, and a projection whose output is read transposed (Qwen3.5's
    in_proj_qkv, through its conv) or per head (in_proj_b, in_proj_a; Qwen3-Next's in_proj_qkvz
    and in_proj_ba, split per key head) gets its gradient strided."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


@functools.cache
def auto_kernel(device: torch.device) -> str:
    """The kernel `auto` runs batches of up to DENSE_MAX_ADAPTERS adapters with on `device`:
    triton on CUDA devices of compute capability 9.0 and up (Hopper on; measured on an H200)
    whose blocks may have the shared memory its kernels need (not consumer Blackwell's 99 KiB),
    where Triton is installed; fused elsewhere."""
    if device.type != "cuda" or lora_triton.unavailable(device) is not None:
        return "fused"
    return "triton" if torch.cuda.get_device_capability(device) >= (9, 0) else "fused"


def auto_kernel_now(device: torch.device) -> str:
    """The kernel `auto` runs batches of up to DENSE_MAX_ADAPTERS adapters with on `device` from
    now on: auto_kernel's, but fused once the triton kernel failed in this process
    (kernel_fallback.py). The forward asks it, and so does the memory model
    (memory._effective_kernel): an estimate after the fallback counts what then runs."""
    choice = auto_kernel(device)
    if choice == "triton" and kernel_fallback.failure(kernel_fallback.LORA) is not None:
        return "fused"
    return choice


@functools.lru_cache(maxsize=512)
def _device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor on `device`, made once: building it per call would copy from
    host memory in every layer, and such a copy waits for the GPU to drain its queue."""
    return upload(torch.tensor(values, dtype=dtype), device)


@dataclass(frozen=True)
class AdapterRows:
    """Rows [start, end) of a fused batch belong to adapter `name`.

    length: how long its rows would be padded alone (its own longest row; None: the batch's
    length), and left: whether they are left-padded. Dropout draws an adapter's masks in that
    own layout and places them at its tokens, so they do not depend on how far the other
    adapters' rows made the batch pad: fused equals solo with dropout too."""

    name: str
    start: int
    end: int
    length: int | None = None
    left: bool = False


@dataclass
class BatchLayout:
    """Which rows of the current fused batch belong to which adapter; shared by all wrappers."""

    rows: list[AdapterRows] = field(default_factory=list)


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def dropout_mask(like: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted-dropout mask shaped like `like`: 0 with probability p, else 1 / (1 - p).

    Draws exactly what `LoraLinear` draws for an adapter's rows (a `bernoulli_(1 - p)` over a
    tensor of that shape), so a reference can regenerate the mask from the same generator."""
    keep = torch.empty_like(like).bernoulli_(1.0 - p, generator=generator)
    return keep.div_(1.0 - p)


class LoraWeights(nn.Module):
    """One adapter's A and B for one target linear, initialised as PEFT initialises a linear's
    (A Kaiming-uniform, B = 0; on Llama 4's stacked experts PEFT, which takes them as [E, out, in],
    zeroes the input side instead: mlora keeps the usual start there too)."""

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


@dataclass
class _Hidden:
    """What an InputGroup computed for one input: every adapter's `A(dropout(x))`, or with
    the fused kernel every member's whole output (base GEMM included) in `outputs`.

    grouped: `hidden` [members, N, R], one contiguous [N, R] block per member, and `offsets`
    (int32 [G], the end token of each adapter's rows) for the grouped B matmul.
    loop: `per_adapter` {adapter: (rows, h [n, sum of ranks over its members])} and
    `columns` {(adapter, member): first column of that member's block in h}."""

    x: torch.Tensor
    served: int = 0  # members that took their part, of `users` (those with adapters)
    users: int = 0
    # dense: `hidden` [N, C] with other adapters' columns zeroed; member m owns columns
    # dense_cols[m] = (start, end) and its adapters are dense_weights[m] in column order.
    dense_cols: dict[int, tuple[int, int]] = field(default_factory=dict)
    dense_weights: dict[int, list[str]] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    adapters: list[str] = field(default_factory=list)
    per_adapter: dict[str, tuple[AdapterRows, torch.Tensor]] = field(default_factory=dict)
    columns: dict[tuple[str, int], int] = field(default_factory=dict)
    # fused: each member's whole output [N, out] (base + LoRA), by member index; for the
    # members in `delta_only` (a base the op did not run) only the LoRA delta.
    outputs: dict[int, torch.Tensor] | None = None
    delta_only: set[int] = field(default_factory=set)


@dataclass
class _FusedPlan:
    """What the fused op needs for one batch layout besides the input: the members it runs,
    their adapters' parameters in column order, the column factor, the bases it runs inline
    and the dropout ranges. Valid while `key` (layout, shapes, mode, dtype, device and the
    attached LoraWeights) is unchanged and every inline base stays frozen."""

    key: tuple
    a_params: list[torch.Tensor]
    b_params: list[torch.Tensor]
    counts: list[int]
    cols: list[tuple[int, int]]
    members: list[int]
    factor: torch.Tensor
    bases: list[nn.Linear | None]
    delta_only: set[int]
    dropout: list[DropoutRows]
    everywhere: bool
    spec: FusedGroupSpec | None = None  # the last call's (see spec_for)

    def spec_for(self, casts: WeightCasts, philox: bool, fallback: bool) -> FusedGroupSpec:
        """The op's spec for this layout and these weight casts: one for every call until the
        casts change (an optimizer step) or the call asks for another kernel (philox: a failed
        triton forward sets its spec's False; fallback), so a call does not build one (and what
        it works out once: lora_fused.FusedGroupSpec) again."""
        spec = self.spec
        if spec is None or spec.casts is not casts or spec.philox != philox or spec.fallback != fallback:
            spec = self.spec = FusedGroupSpec(self.bases, self.cols, self.counts, self.factor, casts, self.dropout,
                                              self.everywhere, philox, fallback, self.a_params, self.b_params)
        return spec

    def still_inline(self) -> bool:
        """The bases the op runs itself are still frozen (the op computes no base gradient)."""
        for base in self.bases:  # (asked every call: a loop, not a generator's resumptions)
            if base is not None and (base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)):
                return False
        return True


class InputGroup:
    """Target projections of one module that read the same input (see the module docstring).

    The first member called with an input computes the hidden states of all members (fused:
    their complete outputs) and caches them until every member has used them; a member called
    with another input (a recomputation, a new batch) starts over."""

    def __init__(self):
        self.members: list[LoraLinear] = []
        self._cache: _Hidden | None = None
        self._casts: WeightCasts | None = None  # fused: the weights in the activation dtype
        self._plan: _FusedPlan | None = None  # fused: what a batch layout asks of the op
        # An MoE expert's group (lora_moe.py): its tokens change with every routing, so a plan
        # is never reused, and keeping it (and the casts) would hold them for every expert of
        # every layer; its factors bypass the shared cache.
        self.transient = False
        # What keeps plans built from the members' adapters outside this group (an MoE layer's
        # routing: lora_moe.ExpertRouting.forget_adapters), called when those adapters change.
        self.on_adapters_changed: list[Callable[[], None]] = []

    def clear(self) -> None:
        """Drop a cached input (after a failed forward, so an OOM retry does not keep it
        alive) and the fused op's plan (it holds the layout's [N, C] factor, and its kept spec
        the weight casts and dropout tables)."""
        self._cache = None
        self._plan = None

    def forget_weights(self) -> None:
        """Drop everything that holds adapters' weights (the plan, the casts: an adapter's
        whole buffer and cast, flat_params.py; plans kept elsewhere: adapters_changed), when an
        adapter leaves: they are rebuilt for the next batch, and the departed adapter's memory
        is freed now, not at this group's next call with another layout."""
        self.clear()
        self._casts = None
        self.adapters_changed()

    def adapters_changed(self) -> None:
        """An adapter joined or left a member: plans kept elsewhere from the members' adapters
        (on_adapters_changed) are dropped, as they key on the batch's adapter names only. Code
        that edits a member's `adapters` itself, not through mlora.adapter.Adapter, calls this."""
        for drop in self.on_adapters_changed:
            drop()

    def hidden_for(self, member: "LoraLinear", x: torch.Tensor) -> _Hidden | None:
        cache = self._cache
        if cache is None or cache.x is not x:
            cache = self._compute(x)
            self._cache = cache
            if cache is not None:  # counted once per input, not per member's call
                cache.users = len([m for m in self.members if m.adapters])
        if cache is None:
            return None
        cache.served += 1
        if cache.served >= cache.users:
            self._cache = None  # every member has its block: do not keep x alive
        return cache

    def _compute(self, x: torch.Tensor) -> _Hidden | None:
        layout = self.members[0].layout
        # (every group call of a step asks: one set of the members' adapter names, not a
        # generator per batch row and member)
        attached = set().union(*[m.adapters for m in self.members])
        active = [rows for rows in layout.rows if rows.name in attached and rows.end > rows.start]
        if not active:
            return None
        training = self.members[0].training
        B, S = x.shape[0], x.shape[1]
        x2d = x.reshape(-1, x.shape[-1])  # [N = B*S, in]
        choice = kernel
        if choice == "auto":
            choice = auto_kernel_now(x.device) if len(active) <= DENSE_MAX_ADAPTERS else "grouped"
        if choice in ("fused", "triton"):
            return self._compute_fused(x, x2d, active, S, training, philox=choice == "triton",
                                       fallback=kernel == "auto")
        dropout, everywhere = self._dropout_rows(x2d.shape[0], active, S) if training else ([], False)
        mask = draw_keep_mask(x2d, dropout, everywhere) if dropout else None
        dropped = x2d if mask is None else x2d * mask  # [N, in], 0/1 mask: 1/(1-p) is in the scale
        if choice == "dense":
            return self._compute_dense(x, dropped, active, S)
        if choice == "grouped" and self._grouped_ok(x, active, B):
            return self._compute_grouped(x, dropped, active, S)
        out = _Hidden(x)
        for rows in active:
            blocks, col = [], 0
            for m, member in enumerate(self.members):
                w = member.adapters.get(rows.name)
                if w is not None:
                    out.columns[(rows.name, m)] = col
                    blocks.append(w.lora_A)
                    col += w.r
            a_cat = torch.cat(blocks) if len(blocks) > 1 else blocks[0]  # [sum r, in] fp32
            h = F.linear(dropped[rows.start * S:rows.end * S], a_cat.to(x.dtype))  # [n, sum r]
            out.per_adapter[rows.name] = (rows, h)
        return out

    def _dropout_rows(self, N: int, active: list[AdapterRows], S: int) -> tuple[list[DropoutRows], bool]:
        """The token ranges that drop out, each with its adapter's rate, generator and own
        layout (its rows padded to its own length: AdapterRows.length), and whether they cover
        every token (see draw_keep_mask)."""
        # An adapter has one dropout rate and one generator for all of its modules.
        first = {rows.name: next(m.adapters[rows.name] for m in self.members if rows.name in m.adapters)
                 for rows in active}
        dropout = []
        for rows in active:
            w = first[rows.name]
            if w.dropout > 0:
                own = S if rows.length is None else min(rows.length, S)
                dropout.append(DropoutRows(rows.start * S, rows.end * S, w.dropout, w.generator,
                                           S, own, S - own if rows.left else 0))
        covered = sum((rows.end - rows.start) * S for rows in active) == N
        return dropout, covered and len(dropout) == len(active)

    def _compute_fused(self, x, x2d, active, S, training, philox=False, fallback=False) -> _Hidden:
        # The plan depends only on the batch layout and the adapters attached; building it is
        # Python work (~60 us a group on a CPU host, more than the op's own launches), so it
        # is built once per layout and reused by every step that keeps the layout.
        weights = tuple([member.adapters.get(rows.name) for member in self.members for rows in active])
        key = (tuple(active), S, x2d.shape[0], training, x.dtype, x.device, weights)
        plan = self._plan
        if plan is None or plan.key != key or not plan.still_inline():
            plan = self._plan = self._fused_plan(key, x, active, S, training)
        self._casts = WeightCasts.of(self._casts, plan.a_params, plan.b_params, plan.counts, x.dtype)
        if fallback:  # (auto's choice) a recomputation runs what its forward ran (forward_choices.py)
            philox = forward_choices.replayed(philox)
        spec = plan.spec_for(self._casts, philox, fallback)
        anchor = next((p for p in spec.params if p.requires_grad), plan.a_params[0])
        ys = FusedGroupLoRA.apply(x2d, spec, anchor)
        if fallback:
            forward_choices.note(spec.philox)  # (False where the triton kernel failed)
        if self.transient:  # (autograd keeps what the backward needs)
            self._plan = self._casts = None
        return _Hidden(x, outputs=dict(zip(plan.members, ys)), delta_only=plan.delta_only)

    def _fused_plan(self, key, x, active, S, training) -> "_FusedPlan":
        a_params, b_params, owners, scales, members, cols, counts = [], [], [], [], [], [], []
        for m, member in enumerate(self.members):
            ws = [(i, member.adapters[rows.name]) for i, rows in enumerate(active) if rows.name in member.adapters]
            if not ws:
                continue
            start = len(owners)
            for i, w in ws:
                a_params.append(w.lora_A)
                b_params.append(w.lora_B)
                owners += [i] * w.r
                scales += [member._scale(w)] * w.r
            members.append(m)
            cols.append((start, len(owners)))
            counts.append(len(ws))
        N = key[2]
        build = functools.partial(build_column_factor, cached=False) if self.transient else column_factor
        factor = build(tuple((r.start, r.end) for r in active), S, tuple(owners), tuple(scales), N,
                       torch.float32, x.device)
        bases = [self.members[m].base if self.members[m].base_inline(x) else None for m in members]
        dropout, everywhere = self._dropout_rows(N, active, S) if training else ([], False)
        return _FusedPlan(key, a_params, b_params, counts, cols, members, factor, bases,
                          {m for m, base in zip(members, bases) if base is None}, dropout, everywhere)

    def _compute_dense(self, x, dropped, active, S) -> _Hidden:
        out = _Hidden(x)
        blocks, owners, col = [], [], 0
        for m, member in enumerate(self.members):
            names = [rows.name for rows in active if rows.name in member.adapters]
            if not names:
                continue
            start = col
            for i, rows in enumerate(active):
                w = member.adapters.get(rows.name)
                if w is not None:
                    blocks.append(w.lora_A)
                    owners += [i] * w.r
                    col += w.r
            out.dense_cols[m] = (start, col)
            out.dense_weights[m] = names
        a_all = torch.cat(blocks) if len(blocks) > 1 else blocks[0]  # [C, in] fp32, member-major
        h = F.linear(dropped, a_all.to(x.dtype))  # [N, C]: every adapter's A on every row
        if len(active) > 1 or active[0].start != 0 or active[0].end * S != h.shape[0]:
            # Keep only each row's own adapter's columns (and none on rows without an adapter).
            owners_of = build_row_owner if self.transient else row_owner  # (experts: uncached)
            owner = owners_of(tuple((r.start, r.end) for r in active), S, h.shape[0], x.device)  # [N]
            col_owner = _device_constant(tuple(owners), torch.int32, x.device)  # [C]
            h = h * (owner[:, None] == col_owner[None, :])
        out.hidden = h
        return out

    def _grouped_ok(self, x: torch.Tensor, active: list[AdapterRows], batch_rows: int) -> bool:
        if _GROUPED_MM is None:
            return False
        # Rows must tile the batch from 0 in layout order (grouped offsets are cumulative).
        end = 0
        for rows in active:
            if rows.start != end:
                return False
            end = rows.end
        if end != batch_rows:
            return False
        # Same rank and the same targeted members for every adapter: one stacked weight.
        first = [m.adapters.get(active[0].name) for m in self.members]
        for rows in active[1:]:
            ws = [m.adapters.get(rows.name) for m in self.members]
            if any((a is None) != (b is None) or (a is not None and a.r != b.r) for a, b in zip(first, ws)):
                return False
        # The kernel wants every row of every operand 16-byte aligned.
        r = next(w.r for w in first if w is not None)
        dims = [x.shape[-1], r] + [m.out_features for m in self.members]
        if any(d * x.element_size() % 16 for d in dims):
            return False
        if x.device.type == "cuda":
            return x.dtype == torch.bfloat16  # the CUDA kernel's only dtype
        return True

    def _compute_grouped(self, x, dropped, active, S) -> _Hidden:
        names = [rows.name for rows in active]
        present = [m for m, member in enumerate(self.members) if names[0] in member.adapters]
        r = self.members[present[0]].adapters[names[0]].r
        # A of every (adapter, member) in one tensor: [G, M*r, in] fp32 -> activation dtype.
        a_all = torch.cat([self.members[m].adapters[n].lora_A for n in names for m in present])
        a_all = a_all.to(x.dtype).view(len(names), len(present) * r, -1)
        ends = tuple(rows.end * S for rows in active)
        # (an expert's ends change with every routing: uploaded, not cached)
        offsets = (upload(torch.tensor(ends, dtype=torch.int32), x.device) if self.transient
                   else _device_constant(ends, torch.int32, x.device))
        h = _GROUPED_MM(dropped, a_all.transpose(1, 2), offs=offsets)  # [N, M*r]
        # One contiguous [N, r] block per member for the B matmuls.
        hidden = h.view(h.shape[0], len(present), r).permute(1, 0, 2).contiguous()  # [M, N, r]
        out = _Hidden(x, hidden=hidden, offsets=offsets, adapters=names)
        out.columns = {(n, m): i for n in names for i, m in enumerate(present)}
        return out


class LoraLinear(nn.Module):
    """A frozen linear plus any number of adapters, each applied to its rows of the batch."""

    def __init__(self, base: nn.Module, layout: BatchLayout, group: InputGroup | None = None, target: str = ""):
        """target: the target_modules entry that selects this projection (target_name)."""
        super().__init__()
        self.base = base
        self.target = target
        self.layout = layout
        # A plain dict, not a ModuleDict: adapter names may contain dots, and the adapters'
        # weights belong to their `Adapter` objects, not to the base model's state dict.
        self.adapters: dict[str, LoraWeights] = {}
        group = group if group is not None else InputGroup()
        group.members.append(self)
        self._index = len(group.members) - 1
        self.group = group  # a plain object: the siblings are not registered as children

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def _scale(self, w: LoraWeights) -> float:
        # The dropout mask is 0/1; inverted dropout's 1/(1-p) is applied here instead.
        return w.scale / (1.0 - w.dropout) if self.training and w.dropout > 0 else w.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, S, in]
        hidden = self.group.hidden_for(self, x) if self.adapters else None
        if hidden is None:
            return self.base(x)
        if hidden.outputs is not None:
            y = hidden.outputs.get(self._index)  # [N, out]; None: the batch's adapters skip this member
            if y is None:
                return self.base(x)
            if self._index in hidden.delta_only:  # a base the op did not run: add it here
                return self._add_base(x, y)
            return y.view(*x.shape[:-1], -1)  # base + LoRA
        if hidden.offsets is not None:
            return self._forward_grouped(x, hidden)
        if hidden.hidden is not None:
            return self._forward_dense(x, hidden)
        return self._forward_loop(x, hidden)

    def _forward_dense(self, x: torch.Tensor, hidden: _Hidden) -> torch.Tensor:
        cols = hidden.dense_cols.get(self._index)
        if cols is None:
            return self.base(x)
        ws = [self.adapters[n] for n in hidden.dense_weights[self._index]]
        # Every adapter's B side by side, each scaled: [out, C_m] in the activation dtype.
        scales = _device_constant(tuple(self._scale(w) for w in ws for _ in range(w.r)), torch.float32, x.device)
        b_all = torch.cat([w.lora_B for w in ws], dim=1) if len(ws) > 1 else ws[0].lora_B
        b_all = (b_all * scales).to(x.dtype)
        delta = F.linear(hidden.hidden[:, cols[0]:cols[1]], b_all)  # [N, out]
        return self._add_base(x, delta)

    def _forward_grouped(self, x: torch.Tensor, hidden: _Hidden) -> torch.Tensor:
        slot = hidden.columns.get((hidden.adapters[0], self._index))
        if slot is None:  # the batch's adapters do not target this member
            return self.base(x)
        ws = [self.adapters[n] for n in hidden.adapters]
        scales = _device_constant(tuple(self._scale(w) for w in ws), torch.float32, x.device)
        b_all = torch.stack([w.lora_B for w in ws]) * scales[:, None, None]  # [G, out, r] fp32
        b_all = b_all.to(x.dtype).transpose(1, 2)  # [G, r, out]
        delta = _GROUPED_MM(hidden.hidden[slot], b_all, offs=hidden.offsets)  # [N, out]
        return self._add_base(x, _ContiguousGrad.apply(delta))

    def _forward_loop(self, x: torch.Tensor, hidden: _Hidden) -> torch.Tensor:
        S = x.shape[1]
        delta = None
        for name, (rows, h) in hidden.per_adapter.items():
            w = self.adapters.get(name)
            col = hidden.columns.get((name, self._index))
            if w is None or col is None:
                continue
            if delta is None:
                delta = x.new_zeros(x.shape[0] * S, self.out_features)  # [N, out]
            b = (w.lora_B * self._scale(w)).to(x.dtype)  # [out, r]
            # In place on one zero buffer: no concatenation of per-adapter pieces.
            delta[rows.start * S:rows.end * S] += F.linear(h[:, col:col + w.r], b)
        if delta is None:
            return self.base(x)
        return self._add_base(x, delta)

    def base_inline(self, x: torch.Tensor) -> bool:
        """The fused op may run this projection's base GEMM itself: a plain linear in x's
        dtype, frozen (the op's backward computes no weight or bias gradient)."""
        base = self.base
        return (type(base) is nn.Linear and base.weight.dtype == x.dtype and not base.weight.requires_grad
                and (base.bias is None or not base.bias.requires_grad))

    def _add_base(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """base(x) + delta; delta [N, out] in x's dtype. A plain linear adds it inside its GEMM."""
        base = self.base
        if type(base) is nn.Linear and base.weight.dtype == x.dtype:
            if base.bias is not None:
                delta = delta + base.bias
            x2d = x.reshape(-1, x.shape[-1])
            # In place when autograd allows it: torch.addmm would first copy delta into a new
            # output (a full-width device copy). A view made by a custom Function (the grouped
            # kernel's) must not be modified in place.
            y = delta.addmm_(x2d, base.weight.t()) if not delta._is_view() else torch.addmm(delta, x2d, base.weight.t())
            return y.view(*x.shape[:-1], -1)
        y = base(x)  # a quantized layer: its own kernel, then one add
        return y + delta.view_as(y).to(y.dtype)


def check_kernel(device: torch.device | None = None) -> None:
    """The kernel named by MLORA_LORA_KERNEL (or set in code) must be one of KERNELS and able
    to run on `device` (None: not checked)."""
    from mlora.errors import UserError

    if kernel not in KERNELS:
        raise UserError(f"MLORA_LORA_KERNEL={kernel!r} is not a LoRA kernel (use one of: {', '.join(KERNELS)})")
    if kernel == "triton":
        why = lora_triton.unavailable(device)
        if why:
            raise UserError(f"MLORA_LORA_KERNEL=triton: {why}")


def clear_lora_caches(wrappers: dict[str, LoraLinear]) -> None:
    """Forget every input group's cached input (see InputGroup.clear)."""
    for wrapper in wrappers.values():
        wrapper.group.clear()
    clear_factor_cache()
    lora_triton.clear_caches()


def module_seed(adapter_seed: int, module_path: str) -> int:
    """Seed for one adapter's weights in one module, stable across processes and stages."""
    return (adapter_seed ^ (zlib.crc32(module_path.encode()) * 0x9E3779B1)) % (2**63)


def inject_lora(model: nn.Module, layout: BatchLayout) -> dict[str, LoraLinear]:
    """Wrap every target projection of `model` in a LoraLinear sharing `layout`; projections
    of one parent that read the same input (`INPUT_GROUPS`) share an `InputGroup`.

    Returns {module path (HF name, e.g. 'model.layers.0.self_attn.q_proj'): wrapper}. Calling
    it again returns the wrappers already in place. The projections of a mixture-of-experts
    layer's experts are wrapped too (lora_moe.py)."""
    wrappers: dict[str, LoraLinear] = {}
    groups: dict[tuple[str, int], InputGroup] = {}
    args = getattr(model, "args", None)
    experts_only = args is not None and args.is_moe and args.mlp_lora_on_experts
    experts_named = args is not None and args.experts_named  # (Gemma 4 26B-A4B's, Llama 4's: experts.*)
    for path, module in list(model.named_modules()):
        leaf = path.rsplit(".", 1)[-1]
        if leaf not in ALL_TARGET_MODULES:
            continue
        if experts_only and leaf in MLP_MODULES and ".experts." not in path:
            # An MoE model's MLP targets are its routed experts only, as PEFT on transformers 5
            # has them: the shared experts (Qwen2-MoE, GLM-4.5, DeepSeek-V3) and the dense layers
            # stay without LoRA.
            continue
        if isinstance(module, LoraLinear):
            wrappers[path] = module
            continue
        parent_path = path.rsplit(".", 1)[0] if "." in path else ""
        parent = model.get_submodule(parent_path) if parent_path else model
        shared = next((i for i, g in enumerate(INPUT_GROUPS) if leaf in g), None)
        group = None
        if shared is not None:
            group = groups.setdefault((parent_path, shared), InputGroup())
        wrapper = LoraLinear(module, layout, group, target_name(path, experts_named))
        setattr(parent, leaf, wrapper)
        wrappers[path] = wrapper
    # The experts of a sparse MLP see gathered tokens, not the batch's rows: they get layouts of
    # their own (imported here: lora_moe builds on this module's classes).
    from mlora.lora_moe import attach_expert_routing

    attach_expert_routing(model, layout, wrappers)
    return wrappers
