"""LoRA on the experts of a mixture-of-experts layer (models/moe.py) in a fused batch.

An expert sees only the tokens routed to it, gathered from every row of the batch: n tokens
that the sparse MLP hands it as n rows of one token. Its projections are ordinary `LoraLinear`
wrappers, each expert with a `BatchLayout` of its own; before the experts run, the sparse MLP
calls `ExpertRouting` with the routing, which writes into each expert's layout which of its
tokens belong to which adapter. The tokens of an expert come ordered by batch position, and an
adapter's rows are one contiguous run of the batch, so each adapter's tokens are one contiguous
run of the expert's too: the same `AdapterRows` the rest of the LoRA code works with, counted
in tokens. (Gemma 4 26B-A4B's experts run beside the dense MLP, off the decoder layer, which
holds the routing hook instead of a sparse MLP: `layers.{i}.experts.{e}.gate_up_proj`.)

An adapter that targets the experts has no LoRA dropout (session.resolve_targets refuses it):
PEFT cannot load such an adapter on transformers 5's stacked experts. Without dropout there is
no random mask, so the fused batch equals each adapter's solo run whatever the routing.

Where the experts run as grouped GEMMs (models/moe.grouped_experts), their LoRA does too
(`GroupedExpertLoRA`): per projection, every adapter's A of every expert stacked into
[E, C, in] (C: the adapters' ranks side by side) and B, scaled in fp32, into [E, out, C]; a
token's h keeps only its own adapter's columns. That is C/r times the LoRA FLOPs of one
adapter (still small next to the frozen expert), in 2 grouped GEMMs instead of 2 per expert
and adapter, and with no wait for the host: the per-expert layouts above are not needed.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from mlora.device import upload
from mlora.lora import _GROUPED_MM, AdapterRows, BatchLayout, LoraLinear, _device_constant
from mlora.lora_fused import _accumulate

_EXPERT_PATH = re.compile(r"^(?P<moe>.+)\.experts\.(?P<e>\d+)\.(?P<proj>[^.]+)$")


class ExpertRouting:
    """A sparse MLP's routing hook: the batch's layout, restated per expert."""

    def __init__(self, layout: BatchLayout, expert_layouts: list[BatchLayout], wrappers: list[LoraLinear],
                 by_projection: dict[str, list[LoraLinear | None]] | None = None):
        self.layout = layout
        self.expert_layouts = expert_layouts
        self.wrappers = wrappers  # the experts' (to know whether any adapter is on them)
        # {projection name: its wrapper in each expert, None where that expert's is not wrapped}
        self.by_projection = by_projection or {}
        # Built from the adapters on the experts (a pass over every expert's wrappers), which
        # change only when an adapter is attached or detached (forget_adapters), not with the
        # routing: kept across forwards. The plans are keyed on the batch's adapter names.
        self._on_experts: frozenset[str] | None = None
        self._plans: tuple[tuple[str, ...], dict[str, _ExpertLoRAPlan] | None | bool] | None = None  # (names, plans)

    def forget_adapters(self) -> None:
        """An adapter joined or left the experts (InputGroup.adapters_changed): drop what was
        built from them, which would miss a new adapter, or apply and hold a departed one's weights."""
        self._on_experts = None
        self._plans = None

    def _adapters_on_experts(self) -> frozenset[str]:
        if self._on_experts is None:
            self._on_experts = frozenset(name for w in self.wrappers for name in w.adapters)
        return self._on_experts

    def _rows_on_experts(self) -> list[AdapterRows]:
        """The batch's non-empty rows of adapters on the experts, by start."""
        on_experts = self._adapters_on_experts()
        return sorted((r for r in self.layout.rows if r.end > r.start and r.name in on_experts), key=lambda r: r.start)

    def grouped(self, tokens: torch.Tensor, S: int, N: int) -> "GroupedExpertLoRA | None | bool":
        """For grouped experts: the LoRA of this batch's adapters on them (None: no adapter of
        the batch is on them), or False where it cannot be grouped (an adapter on some experts'
        projection but not all, ranks that differ between experts, or dropout): then the
        experts run one at a time. tokens [M]: each routed token's
        batch position (row * S + t), ordered by expert; N: tokens in the batch."""
        rows = self._rows_on_experts()
        if not rows:
            return None
        names = tuple(dict.fromkeys(r.name for r in rows))  # the batch's adapters on the experts, in row order
        plans = self._plans_for(names)
        if not plans:  # (None: no adapter of the batch on any projection; False: cannot be grouped)
            return plans
        # Each batch row's adapter (its index in names; len(names): none), then each token's.
        row_of = [len(names)] * (N // S)
        for r in rows:
            row_of[r.start:r.end] = [names.index(r.name)] * (r.end - r.start)
        row_adapter = _device_constant(tuple(row_of), torch.int32, tokens.device)  # [rows]
        token_adapter = row_adapter.index_select(0, torch.div(tokens, S, rounding_mode="floor"))  # [M]
        return GroupedExpertLoRA(plans, token_adapter, len(names))

    def _plans_for(self, names: tuple[str, ...]) -> "dict[str, _ExpertLoRAPlan] | None | bool":
        """_build_plans(names), made again only when the names or the adapters on the experts
        change: the plans do not depend on the routing, nor on where the adapters' rows lie."""
        if self._plans is None or self._plans[0] != names:
            self._plans = (names, self._build_plans(names))
        return self._plans[1]

    def _build_plans(self, names: tuple[str, ...]) -> "dict[str, _ExpertLoRAPlan] | None | bool":
        """{projection: the LoRA of the adapters `names` on it}, None where none is on any, False
        where one cannot be grouped (see grouped)."""
        plans = {}
        for proj, wrappers in self.by_projection.items():
            present = [n for n in names if any(w is not None and n in w.adapters for w in wrappers)]
            if not present:
                continue
            weights = [[w.adapters.get(n) if w is not None else None for w in wrappers] for n in present]
            for ws in weights:
                if any(w is None or w.dropout > 0 or w.r != ws[0].r for w in ws):
                    return False
            plans[proj] = _ExpertLoRAPlan([names.index(n) for n in present], weights)
        return plans or None

    def __call__(self, experts: torch.Tensor, tokens: torch.Tensor, counts: list[int], S: int, N: int) -> None:
        """experts, tokens [N*k]: each routed token's expert and batch position (row * S + t),
        ordered by expert and then position; counts: tokens per expert; S: tokens per row; N:
        tokens in the batch."""
        rows = self._rows_on_experts()
        if not rows:  # (no adapter of this batch is on the experts: nothing to read back)
            for layout in self.expert_layouts:
                layout.rows = []
            return
        # (expert, position) as one ascending key; where each adapter's first and last row
        # start in it, per expert, is one searchsorted (and one read back to the host).
        key = experts * N + tokens  # [N*k] ascending
        bounds = upload(torch.tensor([b for r in rows for b in (r.start * S, r.end * S)]), key.device)  # [2G]
        starts = torch.arange(len(self.expert_layouts), device=key.device)[:, None] * N  # [E, 1]
        at = torch.searchsorted(key, starts + bounds[None, :]).tolist()  # [E, 2G]
        first = 0  # the expert's first position in the ordering
        for e, layout in enumerate(self.expert_layouts):
            ends = [p - first for p in at[e]]
            layout.rows = [AdapterRows(r.name, ends[2 * g], ends[2 * g + 1])
                           for g, r in enumerate(rows) if ends[2 * g + 1] > ends[2 * g]]
            first += counts[e]


@dataclass
class _ExpertLoRAPlan:
    """One expert projection's LoRA in a batch: the adapters on it (their indices among the
    batch's adapters on the experts) and their weights, weights[g][e] for adapter g, expert e.

    A plan lives as long as the adapters on the experts stay (ExpertRouting keeps it), and a
    LoraWeights' parameters, rank and scale are set once (flat_params moves a parameter's
    .data, not the parameter): what the op needs of it besides the routing is made once."""

    adapters: list[int]
    weights: list[list]  # [G][E] LoraWeights
    # {(adapters, dtype, device): (table, params)}, see operands
    _operands: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @functools.cached_property
    def ranks(self) -> list[int]:
        return [ws[0].r for ws in self.weights]

    def operands(self, adapters: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, tuple]:
        """(table, params) of _GroupedExpertLoRAOp for `adapters` adapters in the batch: made
        once per plan, as neither depends on the routing."""
        key = (adapters, dtype, device)
        if key not in self._operands:
            self._operands[key] = (self._keep_table(adapters, dtype, device), self._params(dtype))
        return self._operands[key]

    def _keep_table(self, adapters: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[adapters + 1, C]: 1 on each adapter's own columns (the last row: no adapter; the
        padding columns: 0)."""
        C = self.columns(dtype)
        table = [[0.0] * C for _ in range(adapters + 1)]
        c0 = 0
        for g, r in zip(self.adapters, self.ranks):
            table[g][c0:c0 + r] = [1.0] * r
            c0 += r
        return _device_constant(tuple(map(tuple, table)), dtype, device)

    def _params(self, dtype: torch.dtype) -> tuple:
        """(A list, B list, ranks, scales, C), the lists adapter-major, then expert. The scales
        go into B in fp32 before its cast, as one expert at a time has them (LoraLinear): in
        the dtype a scale such as alpha / sqrt(r) would be rounded."""
        a_params = [w.lora_A for ws in self.weights for w in ws]
        b_params = [w.lora_B for ws in self.weights for w in ws]
        scales = [ws[0].scale for ws in self.weights]
        return a_params, b_params, self.ranks, scales, self.columns(dtype)

    def columns(self, dtype: torch.dtype) -> int:
        """The adapters' ranks side by side, padded with zero columns to 16 bytes (what
        torch._grouped_mm wants of h's rows, read transposed in the weight gradients)."""
        align = 16 // torch.empty(0, dtype=dtype).element_size()
        return -(-sum(self.ranks) // align) * align


class GroupedExpertLoRA:
    """lora(name, x, ends): the LoRA delta [M, out] of the experts' projection `name` for x
    [M, in] (each expert's tokens a run ending at ends [E], each token's adapter token_adapter
    [M]), or None where no adapter of the batch is on it."""

    def __init__(self, plans: dict[str, _ExpertLoRAPlan], token_adapter: torch.Tensor, adapters: int):
        self.plans, self.token_adapter, self.adapters = plans, token_adapter, adapters

    def __call__(self, name: str, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor | None:
        plan = self.plans.get(name)
        if plan is None:
            return None
        table, params = plan.operands(self.adapters, x.dtype, x.device)  # table [adapters + 1, C]
        a_params, b_params = params[0], params[1]
        # (looked up every call: which parameters need a gradient may change between forwards)
        anchor = next((p for p in itertools.chain(a_params, b_params) if p.requires_grad), a_params[0])
        return _GroupedExpertLoRAOp.apply(x, ends, self.token_adapter, table, params, anchor)


def _stacked_casts(params: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [E, C, in], B [E, out, C]) in dtype: each adapter's A and B of every expert stacked,
    the adapters side by side, each B times its adapter's scale in fp32 before the cast, and
    zero columns after them up to C (params: A and B lists adapter-major, then expert; the
    ranks; the scales; C)."""
    a_params, b_params, ranks, scales, C = params
    E, pad = len(a_params) // len(ranks), C - sum(ranks)
    a_blocks = [torch.stack(a_params[g * E:(g + 1) * E]) for g in range(len(ranks))]  # [E, r, in] each
    b_blocks = [torch.stack(b_params[g * E:(g + 1) * E]) for g in range(len(ranks))]  # [E, out, r] fp32 each
    for b, s in zip(b_blocks, scales):
        b.mul_(s)  # (a new tensor: the stack's)
    if pad:
        a_blocks.append(a_blocks[0].new_zeros(E, pad, a_blocks[0].shape[2]))
        b_blocks.append(b_blocks[0].new_zeros(E, b_blocks[0].shape[1], pad))
    a = torch.cat(a_blocks, dim=1).to(dtype) if len(a_blocks) > 1 else a_blocks[0].to(dtype)
    b = torch.cat(b_blocks, dim=2).to(dtype) if len(b_blocks) > 1 else b_blocks[0].to(dtype)
    return a, b


class _GroupedExpertLoRAOp(torch.autograd.Function):
    """delta [M, out] = ((x @ A_e^T) * keep) @ B_e^T per expert e's run of rows, for every adapter
    at once: A_e [C, in] and B_e [out, C] hold the adapters' weights side by side (B_e scaled
    in fp32, then both cast to x's dtype here), keep = table[token_adapter] [M, C] zeroes the
    columns of other adapters. The backward casts the weights again and gathers keep again rather
    than keeping them: all experts' LoRA of a layer in the dtype would be kept per projection.
    Like lora_fused.FusedGroupLoRA, it adds the parameters' gradients into their .grad itself
    (`anchor`: one of them, so that autograd runs it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ends: torch.Tensor, token_adapter: torch.Tensor, table: torch.Tensor,
                params: tuple, anchor: torch.Tensor):
        a, b = _stacked_casts(params, x.dtype)
        keep = table.index_select(0, token_adapter)  # [M, C]
        h = _GROUPED_MM(x, a.transpose(1, 2), offs=ends).mul_(keep)  # [M, C]
        ctx.save_for_backward(x, ends, token_adapter, table, h)
        ctx.params = params
        return _GROUPED_MM(h, b.transpose(1, 2), offs=ends)  # [M, out]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d: torch.Tensor):
        x, ends, token_adapter, table, h = ctx.saved_tensors
        a_params, b_params, ranks, scales, _ = ctx.params
        a, b = _stacked_casts(ctx.params, x.dtype)
        d = d.contiguous()  # [M, out]
        dh = _GROUPED_MM(d, b, offs=ends).mul_(table.index_select(0, token_adapter))  # [M, C]
        dx = _GROUPED_MM(dh, a, offs=ends) if ctx.needs_input_grad[0] else None  # [M, in]
        anchor_node = ctx.next_functions[-1][0]  # None: no LoRA parameter needs a gradient
        if anchor_node is not None and torch._C._will_engine_execute_node(anchor_node):
            # The experts' runs split the token dimension: one [C, in] (and [C, out]) per expert.
            # An expert without tokens gets zeros, written here: torch's grouped GEMM on sm100
            # was reported to leave such groups of this form unwritten (pytorch/pytorch#172439).
            empty = (torch.diff(ends, prepend=ends.new_zeros(1)) == 0)[:, None, None]  # [E, 1, 1]
            d_a = _GROUPED_MM(dh.t(), x, offs=ends).masked_fill_(empty, 0).float()  # [E, C, in]
            d_bt = _GROUPED_MM(h.t(), d, offs=ends).masked_fill_(empty, 0)  # [E, C, out]
            E, out = d_bt.shape[0], d_bt.shape[2]
            grads_a, grads_b, c0 = [], [], 0
            for r, s in zip(ranks, scales):
                grads_a += d_a[:, c0:c0 + r].unbind(0)  # [r, in] each, contiguous
                # d(B * s) in the dtype, then times s in fp32: as autograd through the cast
                g_b = torch.empty(E, out, r, dtype=torch.float32, device=d.device)
                g_b.copy_(d_bt[:, c0:c0 + r].transpose(1, 2))
                grads_b += (g_b.mul_(s) if s != 1.0 else g_b).unbind(0)  # [out, r] each
                c0 += r
            _accumulate(list(a_params) + list(b_params), grads_a + grads_b)
        return dx, None, None, None, None, None


def attach_expert_routing(model: nn.Module, layout: BatchLayout, wrappers: dict[str, LoraLinear]) -> None:
    """Give the LoRA wrappers of every expert a layout of their own, kept up to date by their
    sparse MLP's routing hook (wrappers as inject_lora made them, by module path)."""
    per_moe: dict[str, dict[int, list[LoraLinear]]] = {}
    per_projection: dict[str, dict[str, list[LoraLinear | None]]] = {}
    for path, wrapper in wrappers.items():
        m = _EXPERT_PATH.match(path)
        if m and hasattr(model.get_submodule(m["moe"]), "routing_hook"):
            per_moe.setdefault(m["moe"], {}).setdefault(int(m["e"]), []).append(wrapper)
            E = len(model.get_submodule(m["moe"]).experts)
            per_projection.setdefault(m["moe"], {}).setdefault(m["proj"], [None] * E)[int(m["e"])] = wrapper
    for moe_path, by_expert in per_moe.items():
        moe = model.get_submodule(moe_path)
        if isinstance(moe.routing_hook, ExpertRouting):  # attached already (inject_lora called again)
            continue
        expert_layouts = [BatchLayout() for _ in moe.experts]
        routing = ExpertRouting(layout, expert_layouts, [w for ws in by_expert.values() for w in ws],
                                per_projection[moe_path])
        for e, members in by_expert.items():
            for wrapper in members:
                wrapper.layout = expert_layouts[e]
                wrapper.group.transient = True
                if routing.forget_adapters not in wrapper.group.on_adapters_changed:  # (gate and up share one)
                    wrapper.group.on_adapters_changed.append(routing.forget_adapters)
        moe.routing_hook = routing
