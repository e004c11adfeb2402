"""Per-adapter token cross-entropy over a fused batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlora.batching import label_token_counts
from mlora.data import IGNORE_INDEX
from mlora.lora import AdapterRows, BatchLayout


def fused_loss_sums(model: torch.nn.Module, layout: BatchLayout,
                    batch) -> dict[str, tuple[torch.Tensor, int]]:
    """Forward a fused batch (`batching.FusedBatch`): every adapter's rows through its own LoRA
    (`layout` tells the wrappers which rows are whose), packed rows with their positions and
    documents; returns `token_loss_sums` of the logits."""
    layout.rows = batch.rows
    logits = model(batch.input_ids, batch.attention_mask, position_ids=batch.position_ids,
                   document_ids=batch.document_ids)  # [B, S, V]
    return token_loss_sums(logits, batch.labels, batch.rows, batch.label_counts)


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor, rows: list[AdapterRows],
                    counts: dict[str, int] | None = None) -> dict[str, tuple[torch.Tensor, int]]:
    """For each adapter: (sum of next-token cross-entropy over its label tokens, token count).

    logits [B, S, V], labels [B, S] aligned with the inputs (HF convention): position t
    predicts labels[t + 1]. Summing here and dividing by the optimizer step's token total
    later makes gradient accumulation exact, whatever the micro-batch split.

    counts: the token counts, when the caller counted them on the host (a FusedBatch's
    label_counts); otherwise they are read back from labels' device, which
    waits for everything queued on it (on a GPU, mid-step: the host loses its lead).
    """
    shift_logits = logits[:, :-1].float()  # [B, S-1, V]
    shift_labels = labels[:, 1:]  # [B, S-1]
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)
    per_row = ce.sum(dim=1)  # [B]
    if counts is None:
        counts = label_token_counts(labels, rows)
    return {r.name: (per_row[r.start:r.end].sum(), counts[r.name]) for r in rows}
