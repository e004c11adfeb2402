"""LoRA on the experts of a mixture-of-experts layer (models/moe.py) in a fused batch.

An expert sees only the tokens routed to it, gathered from every row of the batch: n tokens
that the sparse MLP hands it as n rows of one token. Its projections are ordinary `LoraLinear`
wrappers, each expert with a `BatchLayout` of its own; before the experts run, the sparse MLP
calls `ExpertRouting` with the routing, which writes into each expert's layout which of its
tokens belong to which adapter. The tokens of an expert come ordered by batch position, and an
adapter's rows are one contiguous run of the batch, so each adapter's tokens are one contiguous
run of the expert's too: the same `AdapterRows` the rest of the LoRA code works with, counted
in tokens.

An adapter that targets the experts has no LoRA dropout (session.resolve_targets refuses it):
PEFT cannot load such an adapter on transformers 5's stacked experts. Without dropout there is
no random mask, so the fused batch equals each adapter's solo run whatever the routing.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mlora.device import upload
from mlora.lora import AdapterRows, BatchLayout, LoraLinear

_EXPERT_PATH = re.compile(r"^(?P<moe>.+)\.experts\.(?P<e>\d+)\.[^.]+$")


class ExpertRouting:
    """A sparse MLP's routing hook: the batch's layout, restated per expert."""

    def __init__(self, layout: BatchLayout, expert_layouts: list[BatchLayout], wrappers: list[LoraLinear]):
        self.layout = layout
        self.expert_layouts = expert_layouts
        self.wrappers = wrappers  # the experts' (to know whether any adapter is on them)

    def __call__(self, experts: torch.Tensor, tokens: torch.Tensor, counts: list[int], S: int, N: int) -> None:
        """experts, tokens [N*k]: each routed token's expert and batch position (row * S + t),
        ordered by expert and then position; counts: tokens per expert; S: tokens per row; N:
        tokens in the batch."""
        on_experts = {name for w in self.wrappers for name in w.adapters}
        rows = sorted((r for r in self.layout.rows if r.end > r.start and r.name in on_experts), key=lambda r: r.start)
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


def attach_expert_routing(model: nn.Module, layout: BatchLayout, wrappers: dict[str, LoraLinear]) -> None:
    """Give the LoRA wrappers of every expert a layout of their own, kept up to date by their
    sparse MLP's routing hook (wrappers as inject_lora made them, by module path)."""
    per_moe: dict[str, dict[int, list[LoraLinear]]] = {}
    for path, wrapper in wrappers.items():
        m = _EXPERT_PATH.match(path)
        if m and hasattr(model.get_submodule(m["moe"]), "routing_hook"):
            per_moe.setdefault(m["moe"], {}).setdefault(int(m["e"]), []).append(wrapper)
    for moe_path, by_expert in per_moe.items():
        moe = model.get_submodule(moe_path)
        if isinstance(moe.routing_hook, ExpertRouting):  # attached already (inject_lora called again)
            continue
        expert_layouts = [BatchLayout() for _ in moe.experts]
        for e, members in by_expert.items():
            for wrapper in members:
                wrapper.layout = expert_layouts[e]
                wrapper.group.transient = True
        moe.routing_hook = ExpertRouting(layout, expert_layouts, [w for ws in by_expert.values() for w in ws])
