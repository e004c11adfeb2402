"""Evaluation: mean token cross-entropy of one adapter (or the bare base) over a dataset."""

from __future__ import annotations

import math
import sys
from typing import Sequence

import torch
from tqdm import tqdm

from mlora.batching import MicroBatch, fuse
from mlora.data import Example
from mlora.errors import UserError
from mlora.json_line import json_line
from mlora.lora import clear_lora_caches
from mlora.loss import fused_loss_sums
from mlora.memory import UnsplittableOOM, run_splitting_on_oom
from mlora.plural import counted


def eval_line(name: str, loss: float, tokens: int, weights: str) -> str:
    """The JSON line `mlora eval` prints for one adapter (one process and pipeline alike).
    weights: the adapter's saved folder, or "base". JSON has no NaN: no label token (or
    non-finite weights) gives null, as metrics.jsonl does."""
    return json_line({"adapter": name, "loss": loss if math.isfinite(loss) else None, "tokens": tokens,
                      "weights": weights})


@torch.no_grad()
def evaluate_adapter(session, name: str, examples: Sequence[Example],
                     use_adapter: bool = True, progress: bool = False) -> tuple[float, int]:
    """(mean CE over all label tokens of all rows, number of label tokens).

    With use_adapter=False the rows run through the bare base (the wrappers skip a name they
    do not hold, so the same code path serves both).

    A batch of test_batch_size rows that runs out of device memory is split in halves and
    retried (the result is a sum over rows, so it does not change).
    """
    cfg = next(a for a in session.cfg.lora if a.name == name)
    model = session.model
    model.eval()
    row_name = name if use_adapter else f"\0bare:{name}"

    def run(chunk: list[Example]) -> tuple[float, int]:
        part = MicroBatch(row_name, chunk, 0, 0, 0, True, cfg.expand_side)
        batch = fuse([part], session.pad_id).to(session.device)
        try:
            ce_sum, n = fused_loss_sums(model, session.layout, batch)[row_name]
        except BaseException:
            clear_lora_caches(session.wrappers)  # a retry must not keep this attempt's inputs
            raise
        return ce_sum.item(), n

    total, count = 0.0, 0
    # A bar on a terminal only (disable=None): `mlora eval` of a large test set, not the
    # trainer's eval_step, whose own bars are on screen.
    bar = tqdm(total=len(examples), desc=f"eval {name}", unit="row", disable=None if progress else True,
               leave=False, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    try:
        for start in range(0, len(examples), cfg.test_batch_size):
            chunk = list(examples[start:start + cfg.test_batch_size])
            try:
                results = run_splitting_on_oom(run, chunk)
            except UnsplittableOOM as err:
                longest = max(len(ex.input_ids) for ex in err.items)
                raise UserError(f"evaluating adapter {name!r}: out of device memory on a single row "
                                f"(up to {counted(longest, 'token')}); lower cutoff_len or free device "
                                f"memory") from None
            total += sum(ce for ce, _ in results)
            count += sum(n for _, n in results)
            bar.update(len(chunk))
    finally:
        bar.close()
        session.layout.rows = []
    return (total / count if count else float("nan")), count
