"""One input group's base projections and all its adapters' LoRA as ONE autograd op.

lora.py's "dense" kernel composes the LoRA path from ordinary torch ops and lets autograd
record each of them. That costs, per input group and step (measured in
benchmarks/THROUGHPUT.md): the 0/1 dropout mask *and* the dropped-out copy kept for the
backward (two [N, in] activations), a bool [N, C] column mask, a cast/concat/scale node per
weight, and a separate read-modify-write of the input gradient for every projection that
reads the input (q, k, v, and the LoRA path). This op writes the backward by hand instead:

* the dropout mask is drawn and kept as bool (1 byte a value, not 2 in bf16), and the
  dropped-out input is one mixed-dtype multiply: half a [N, in] activation less per group,
  about 9% of TinyLlama's peak at 4 adapters x 8 rows with dropout 0.05. (Redrawing the
  mask in the backward from saved generator states would save all of it, but costs one
  bernoulli launch per adapter and group more, about 22 us each on the H200.)
* the input gradient is accumulated inside the GEMMs: dx = ((dh @ A) * mask) is computed
  first, then every projection adds dy @ W into it with `addmm_` (beta=1), so no separate
  add kernel reads and writes dx per projection (autograd's accumulation does);
* the per-row "which adapter" mask and the per-column LoRA scale are one cached fp32 [N, C]
  factor shared by every layer (`column_factor`), applied once forward and once backward
  (fp32: a scale rounded to bf16 would bias every value of its column alike, up to 0.2 %);
* autograd records one node per group instead of about thirty, and none per parameter: the
  backward adds the LoRA gradients into the parameters' .grad itself (`_accumulate`), where
  autograd would keep an accumulation node and check every gradient it returns (24
  parameters in a group of 4 adapters: more host time than the op's own launches).
With `spec.philox` (the "triton" kernel) the dropout side runs in Triton kernels: the forward
draws the mask in its pass over the input and keeps it as bits, and no dropped-out copy
exists (lora_triton.py).

The math is the dense kernel's (lora.py), so every adapter's rows see only its own A and B:
    dropped = x * mask                       [N, in]   (mask 0/1; 1/(1-p) is in the scale)
    h       = (dropped @ A_all^T) * factor   [N, C]    (C = all adapters' ranks, per member)
    y_m     = x @ W_m^T + bias_m + h[:, cols_m] @ B_m^T          for each member m
(a member whose base the op cannot run - a quantized layer - gets only h[:, cols_m] @ B_m^T,
and its base runs outside the op under autograd)
and the backward, for dy_m = dL/dy_m:
    dh      = cat_m(dy_m @ B_m) * factor                         [N, C]
    dA_all  = dh^T @ dropped;  dB_m = dy_m^T @ h[:, cols_m]
    dx      = (dh @ A_all) * mask + sum_m dy_m @ W_m             [N, in] (inline bases)
Weights are fp32 parameters; the matmuls run in the activation dtype, as in the dense kernel.
"""

from __future__ import annotations

import functools
import itertools
import operator
from dataclasses import dataclass, field

import torch
from torch import nn

from mlora import kernel_fallback, lora_triton  # (lora_triton imports triton only when its kernels first run)
from mlora.device import upload
from mlora.flat_params import cast_of


@dataclass(frozen=True)
class DropoutRows:
    """Token rows [start, end) of the flattened batch drop out with probability p, drawn from
    `generator` (the adapter's own).

    The batch's rows are `seq` tokens long (0: one draw over the whole range); the adapter's
    own rows only `length` (what they would be padded to alone), its tokens starting at
    `offset` in each row (0 right-padded, seq - length left-padded). Masks are drawn for that
    own layout and placed there, the padding around them kept: the same draws as alone."""

    start: int
    end: int
    p: float
    generator: torch.Generator | None
    seq: int = 0
    length: int = 0
    offset: int = 0

    @property
    def partial(self) -> bool:
        """The adapter's own rows are shorter than the batch's."""
        return 0 < self.length < self.seq


def draw_keep_mask(x2d: torch.Tensor, dropout: list[DropoutRows], everywhere: bool,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """0/1 keep-mask [N, in] shaped like x2d (in `dtype`, default x2d's): each DropoutRows
    range drawn from its own generator with `bernoulli_(1 - p)` over the adapter's own layout
    [rows, length, in] (see DropoutRows), ones elsewhere. The draws do not depend on the
    dtype, nor on whether the target is a strided slice: the CPU and CUDA kernels draw a float
    uniform per value in logical order (equal on CPU in tests; benchmarks/gpu_checks.py
    compares them on CUDA). `everywhere`: the ranges cover every token, so no ones-fill of the
    whole mask, only of the padding around a shorter adapter's tokens."""
    dtype = x2d.dtype if dtype is None else dtype
    mask = torch.empty_like(x2d, dtype=dtype) if everywhere else torch.ones_like(x2d, dtype=dtype)
    for d in dropout:
        block = mask[d.start:d.end]  # [n, in]
        if d.partial:  # its tokens only: [rows, length, in], a strided slice of [rows, seq, in]
            rows = block.view(-1, d.seq, block.shape[-1])
            if everywhere:  # the padding keeps, as rows of no adapter do
                rows[:, :d.offset].fill_(1)
                rows[:, d.offset + d.length:].fill_(1)
            block = rows[:, d.offset:d.offset + d.length]
        block.bernoulli_(1.0 - d.p, generator=d.generator)
    return mask


def build_row_owner(ranges: tuple, S: int, N: int, device: torch.device) -> torch.Tensor:
    """[N] int32: for each token row of the flattened batch, the index of its adapter in
    `ranges` (batch-row ranges, S tokens a row), or -1 for rows no adapter owns."""
    owner = torch.full((N,), -1, dtype=torch.int32)
    for i, (start, end) in enumerate(ranges):
        owner[start * S:end * S] = i
    return upload(owner, device)


row_owner = functools.lru_cache(maxsize=64)(build_row_owner)


def build_column_factor(row_ranges: tuple, S: int, owners: tuple, scales: tuple, N: int,
                        dtype: torch.dtype, device: torch.device, cached: bool = True) -> torch.Tensor:
    """The factor h is multiplied by: column c's LoRA scale on the rows of the adapter that
    owns c (owners[c], an index into row_ranges of batch rows), 0 elsewhere. `dtype` is
    fp32 for the fused op: the product is computed in fp32 and rounded once.

    [C] when one adapter owns every row (a plain per-column scale), else [N, C]. Cached: every
    layer's group of one kind asks for the same factor, and building it per call costs two
    kernels forward and two backward. Eight entries hold the four groups of a LLaMA layer for
    two batch layouts; older layouts fall out. An MoE expert's factor (its tokens change with
    every routing) is built uncached (cached=False), so that it pushes no other factor out."""
    scale = upload(torch.tensor(scales, dtype=dtype), device)
    if len(row_ranges) == 1 and row_ranges[0][0] == 0 and row_ranges[0][1] * S == N:
        return scale
    owner = (row_owner if cached else build_row_owner)(row_ranges, S, N, device)
    own = owner[:, None] == upload(torch.tensor(owners, dtype=torch.int32), device)
    return torch.where(own, scale[None, :], 0.0)  # [N, C]


column_factor = functools.lru_cache(maxsize=8)(build_column_factor)


def clear_factor_cache() -> None:
    column_factor.cache_clear()


_VERSION = operator.attrgetter("_version")  # a tensor's version counter (moves with every in-place write)
_GRAD = operator.attrgetter("grad")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


@dataclass
class WeightCasts:
    """A group's LoRA weights as the op uses them: A of every (member, adapter) stacked
    [C, in] and each member's B side by side [out, C_m], in the activation dtype. Kept until
    a parameter changes (an optimizer step, a restore: in-place, so their versions move), so
    the micro-batches of one optimizer step (gradient accumulation) and a recomputed forward
    reuse them. The casts themselves are views of the adapters' own casts (an adapter casts
    all its weights at once: flat_params.cast_of), so after a step this costs a concatenation
    per weight kind and member only where the group has several adapters, and nothing for one
    adapter's A of q, k and v, which lie side by side. (An adapter's optimizer writes the
    weights without moving their versions; Adapter moves them after every step. Code that
    steps the weights another way must do the same.)"""

    params: tuple[torch.Tensor, ...]  # held, so no id can be reused while this is cached
    versions: tuple[int, ...]
    b_counts: tuple[int, ...]
    dtype: torch.dtype
    a_all: torch.Tensor
    b_alls: list[torch.Tensor]

    @classmethod
    def of(cls, previous: "WeightCasts | None", a_params: list[torch.Tensor], b_params: list[torch.Tensor],
           b_counts: list[int], dtype: torch.dtype) -> "WeightCasts":
        params = (*a_params, *b_params)
        # (asked by every group call: map, not generator expressions, keeps it to C loops)
        versions = tuple(map(_VERSION, params))
        if (previous is not None and previous.dtype == dtype and previous.versions == versions
                and previous.b_counts == tuple(b_counts) and len(previous.params) == len(params)
                and all(map(operator.is_, previous.params, params))):
            return previous
        with torch.no_grad():  # the op returns the parameters' gradients itself
            # Each weight as a view of its adapter's one cast (flat_params.cast_of: one launch
            # per adapter and step, not one per weight kind and group), side by side.
            a_casts = [cast_of(p, dtype) for p in a_params]
            a_all = _side_by_side(a_casts)
            if a_all is None:
                a_all = torch.cat(a_casts)
            b_alls, i = [], 0
            for count in b_counts:
                bs = [cast_of(p, dtype) for p in b_params[i:i + count]]
                i += count
                b_alls.append(torch.cat(bs, dim=1) if count > 1 else bs[0])
        return cls(params, versions, tuple(b_counts), dtype, a_all, b_alls)


def _side_by_side(rows: list[torch.Tensor]) -> torch.Tensor | None:
    """torch.cat(rows) without a copy when the 2-D contiguous `rows` already lie one after
    another in one storage (one adapter's A of q, k and v in its cast: Adapter lays them out
    so), else None."""
    first = rows[0]
    if len(rows) == 1:
        return first
    storage, offset, width = first.untyped_storage().data_ptr(), first.storage_offset(), first.shape[1]
    for t in rows:
        if (not t.is_contiguous() or t.dim() != 2 or t.shape[1] != width or t.dtype != first.dtype
                or t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset):
            return None
        offset += t.numel()
    return first.as_strided((sum(t.shape[0] for t in rows), width), (width, 1), first.storage_offset())


@dataclass
class FusedGroupSpec:
    """What the op needs besides tensors: the members' frozen linears, each member's columns
    of the hidden, how many A/B parameters belong to each, the factor and the dropout plan."""

    bases: list[nn.Linear | None]  # None: the base runs outside the op, which returns the LoRA delta
    cols: list[tuple[int, int]]  # member -> [start, end) columns of h
    b_counts: list[int]  # member -> number of its B parameters (the adapters, in column order)
    factor: torch.Tensor  # [C] or [N, C], fp32
    casts: WeightCasts  # the parameters in the activation dtype, as the op uses them
    dropout: list[DropoutRows] = field(default_factory=list)
    everywhere: bool = False
    # draw the dropout mask inside a Triton kernel (lora_triton.py), kept as bits; set False by a
    # forward whose kernel failed (its mask then torch's)
    philox: bool = False
    # philox chosen by `auto`: a Triton kernel that fails hands its work to torch's ops
    # (kernel_fallback.py) instead of raising
    fallback: bool = False
    a_params: list[torch.Tensor] = field(default_factory=list)  # column order; their .grad gets dA
    b_params: list[torch.Tensor] = field(default_factory=list)  # likewise dB
    # philox: the layout's dropout tables (lora_triton.tables), made at the first forward. A
    # spec serves every call of one batch layout and weight cast (InputGroup keeps it), so
    # what depends only on those is worked out here once, not per call.
    tables: tuple | None = None

    def __post_init__(self):
        self.params = self.a_params + self.b_params  # what the backward's gradients go to, in order
        self.a_rows = [a.shape[0] for a in self.a_params]  # dA's row blocks, one per A
        self.b_cols = [b.shape[1] for b in self.b_params]  # dB's column blocks, one per B


class FusedGroupLoRA(torch.autograd.Function):
    """outputs = FusedGroupLoRA.apply(x2d, spec, anchor): one [N, out_m] per member.

    spec.a_params in column order (member-major, then adapter), spec.b_params likewise; the
    backward accumulates their gradients into their .grad and returns none for `anchor` (one
    of them that needs a gradient). So torch.autograd.grad cannot ask this op for a LoRA
    gradient, and hooks on the LoRA parameters do not fire; mlora uses neither. See the
    module docstring for the math."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, spec: FusedGroupSpec, anchor: torch.Tensor):
        # The parameters' gradients are accumulated into their .grad by the backward itself
        # (see _accumulate); `anchor`, one of them, only makes autograd run it when the input
        # needs no gradient (layer 0). The math uses the parameters' casts (spec.casts).
        a_all = spec.casts.a_all  # [C, in]

        bits = mask = None
        if spec.dropout and spec.philox:  # the kernel draws the mask and keeps it as bits
            plan = None
            try:
                if spec.tables is None:
                    spec.tables = lora_triton.tables(spec.dropout, x2d.shape[0], x2d.device)
                # (none drawn if it raises)
                plan = lora_triton.draw(spec.dropout, x2d.shape[0], x2d.device, spec.tables)
                h, bits = lora_triton.down(x2d, a_all, spec.factor, plan)  # [N, C], scaled, other adapters' 0
                dropped = x2d  # the backward's kernels mask it again, from the bits
            except Exception as err:  # (a Triton that cannot compile or launch it)
                if plan is not None:  # torch's mask, below, drawn from the generators' state
                    plan.undraw()  # before the seeds: what a recomputation draws (it runs fused)
                _fall_back(spec, err)
                spec.philox = False  # this call's mask is torch's (lora.py: its recomputation's too)
        if bits is None:
            mask = draw_keep_mask(x2d, spec.dropout, spec.everywhere, torch.bool) if spec.dropout else None
            dropped = x2d if mask is None else x2d * mask  # [N, in] in x's dtype; mask bool [N, in]
            h = torch.mm(dropped, a_all.t()).mul_(spec.factor)  # [N, C], scaled, other adapters' 0
        outputs, b_alls = [], spec.casts.b_alls
        for base, (c0, c1), b_all in zip(spec.bases, spec.cols, b_alls):  # b_all [out, C_m]
            delta = torch.mm(h[:, c0:c1], b_all.t())  # [N, out]
            if base is None:
                outputs.append(delta)
                continue
            if base.bias is not None:
                delta.add_(base.bias)
            # The base GEMM adds delta in place (beta = 1): torch.addmm(delta, ...) would first
            # copy delta into a new output, a full-width device copy per projection (~6 ms of
            # TinyLlama's 240 ms step on the H200).
            outputs.append(delta.addmm_(x2d, base.weight.t()))
        if not ctx.needs_input_grad[0]:  # x needs no gradient (layer 0): mask and A serve only dx
            mask = a_all = None
        ctx.save_for_backward(dropped, mask, bits, h, a_all, *b_alls)
        ctx.spec = spec
        return tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the A/B casts made in forward are not in a graph
    def backward(ctx, *dys: torch.Tensor):
        dropped, mask, bits, h, a_all, *b_alls = ctx.saved_tensors
        spec = ctx.spec
        # dh: each member's columns from its own output gradient, written in place (cuBLAS
        # writes a column block of a row-major matrix directly: no concatenation pass), then
        # the factor (scale, owner).
        if len(dys) == 1:
            dh = torch.mm(dys[0], b_alls[0])  # [N, C]
        else:
            dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)  # [N, C]
            for dy, b_all, (c0, c1) in zip(dys, b_alls, spec.cols):
                torch.mm(dy, b_all, out=dh[:, c0:c1])  # [N, C_m]
        dh.mul_(spec.factor)

        dx = None
        if ctx.needs_input_grad[0]:
            if bits is not None:
                try:
                    dx = lora_triton.up_masked(dh, a_all, bits)  # [N, in]: the LoRA path, masked
                except Exception as err:
                    _fall_back(spec, err)
                    dx = torch.mm(dh, a_all).mul_(lora_triton.unpack(bits, a_all.shape[1]))
            else:
                dx = torch.mm(dh, a_all)  # [N, in]: the LoRA path, before the dropout mask
                if mask is not None:
                    dx.mul_(mask)
            for dy, base in zip(dys, spec.bases):
                if base is not None:
                    dx.addmm_(dy, base.weight)  # + dy @ W, accumulated inside the GEMM

        if bits is not None:
            try:
                d_a = lora_triton.grad_a(dh, dropped, bits)  # [C, in] fp32; `dropped` is x here
            except Exception as err:
                _fall_back(spec, err)
                keep = lora_triton.unpack(bits, dropped.shape[1])  # [N, in] bool
                d_a = _mm_fp32(dh.t(), dropped * keep).float()
        else:
            d_a = _mm_fp32(dh.t(), dropped).float()  # [C, in]; rows per adapter: contiguous views
        grads_a = list(d_a.split_with_sizes(spec.a_rows))  # (torch.split's Python wrapper: host time)
        grads_b, i = [], 0
        for dy, (c0, c1), count in zip(dys, spec.cols, spec.b_counts):
            d_b = _mm_fp32(dy.t(), h[:, c0:c1])  # [out, C_m]: adapters side by side
            grads_b += _contiguous_fp32_blocks(d_b, spec.b_cols[i:i + count])  # (a cast, where d_b is not fp32)
            i += count
        # Only when this backward reaches the parameters (not for torch.autograd.grad(loss, x)
        # or backward(inputs=[x])): the anchor's accumulation node says whether it does.
        anchor_node = ctx.next_functions[-1][0]  # None: no LoRA parameter needs a gradient
        if anchor_node is not None and torch._C._will_engine_execute_node(anchor_node):
            _accumulate(spec.params, grads_a + grads_b)
        return dx, None, None


def _fall_back(spec: FusedGroupSpec, err: Exception) -> None:
    """A Triton kernel of the op raised `err`: raised again unless `auto` chose the kernel
    (spec.fallback), which then runs fused from now on and this call's work in torch's ops
    (kernel_fallback.py). (A forward whose kernel failed puts its seeds back first, so that
    torch's mask is the one the fused kernel draws: a recomputation draws it again.)"""
    kernel_fallback.record(kernel_fallback.LORA, err, chosen_by_auto=spec.fallback)  # (named, out of memory: raised)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a weight's gradient: fp32 where the GEMM can write it from 16-bit inputs (CUDA:
    its fp32 accumulator never rounded to the inputs' dtype, and no cast launch after it), else
    in the inputs' dtype, for the caller to cast (the CPU has no such GEMM; a copy into the
    parameters' layout casts on the way)."""
    if a.dtype != torch.float32 and a.device.type == "cuda" and _writes_fp32(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b)


@functools.cache
def _writes_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm(out_dtype=float32) runs for `dtype` inputs on `device` (torch 2.8 and
    later, on CUDA): tried once on a tiny product."""
    try:
        one = torch.ones(1, 1, dtype=dtype, device=device)
        return torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _accumulate(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """param.grad += grad, as autograd's accumulation would (a first gradient is taken as it
    is), without an autograd node and its bookkeeping per parameter: a group of 4 adapters has
    24 parameters, and that bookkeeping cost more host time than the op's own launches."""
    # Checked in C loops (map), not a Python loop over the parameters, the case of every
    # micro-batch of a step but its first: every parameter trained and holding a gradient.
    if all(map(_REQUIRES_GRAD, params)):
        olds = list(map(_GRAD, params))
        if not any(map(operator.is_, olds, itertools.repeat(None))):
            torch._foreach_add_(olds, grads)
            return
    olds, news = [], []
    for p, g in zip(params, grads):
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = g
        else:
            olds.append(p.grad)
            news.append(g)
    if olds:
        torch._foreach_add_(olds, news)


def _contiguous_fp32_blocks(d: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    """Column blocks of d [out, sum(widths)] as contiguous fp32 [out, w] tensors, in one copy
    when the widths are equal. A column slice is not contiguous, and autograd would copy each
    one into the parameter's layout (two launches per adapter and member, a third of all
    launches of this op before)."""
    out, G = d.shape[0], len(widths)
    if G == 1:
        return [d.float()]  # (no copy when d is fp32 already)
    if len(set(widths)) == 1:
        blocks = torch.empty(G, out, widths[0], dtype=torch.float32, device=d.device)  # [G, out, r]
        blocks.copy_(d.view(out, G, widths[0]).permute(1, 0, 2))
        return list(blocks.unbind(0))
    return [block.float().contiguous() for block in torch.split(d, widths, dim=1)]
