"""Evaluation: mean token cross-entropy of one adapter (or the bare base) over a dataset."""

from __future__ import annotations

from typing import Sequence

import torch

from mlora.batching import MicroBatch, fuse
from mlora.data import Example
from mlora.loss import token_loss_sums


@torch.no_grad()
def evaluate_adapter(session, name: str, examples: Sequence[Example],
                     use_adapter: bool = True) -> tuple[float, int]:
    """(mean CE over all label tokens of all rows, number of label tokens).

    With use_adapter=False the rows run through the bare base (the wrappers skip a name they
    do not hold, so the same code path serves both).
    """
    cfg = next(a for a in session.cfg.lora if a.name == name)
    model = session.model
    model.eval()
    total, count = 0.0, 0
    row_name = name if use_adapter else f"\0bare:{name}"
    try:
        for start in range(0, len(examples), cfg.test_batch_size):
            chunk = list(examples[start:start + cfg.test_batch_size])
            part = MicroBatch(row_name, chunk, 0, 0, 0, True, cfg.expand_side)
            batch = fuse([part], session.pad_id).to(session.device)
            session.layout.rows = batch.rows
            logits = model(batch.input_ids, batch.attention_mask)  # [B, S, V]
            ce_sum, n = token_loss_sums(logits, batch.labels, batch.rows)[row_name]
            total += ce_sum.item()
            count += n
    finally:
        session.layout.rows = []
    return (total / count if count else float("nan")), count
