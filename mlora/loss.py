"""Per-adapter token cross-entropy over a fused batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlora.data import IGNORE_INDEX
from mlora.lora import AdapterRows


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor,
                    rows: list[AdapterRows]) -> dict[str, tuple[torch.Tensor, int]]:
    """For each adapter: (sum of next-token cross-entropy over its label tokens, token count).

    logits [B, S, V], labels [B, S] aligned with the inputs (HF convention): position t
    predicts labels[t + 1]. Summing here and dividing by the optimizer step's token total
    later makes gradient accumulation exact, whatever the micro-batch split.
    """
    shift_logits = logits[:, :-1].float()  # [B, S-1, V]
    shift_labels = labels[:, 1:]  # [B, S-1]
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)
    per_row = ce.sum(dim=1)  # [B]
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)  # [B]
    return {r.name: (per_row[r.start:r.end].sum(), int(counts[r.start:r.end].sum()))
            for r in rows}
