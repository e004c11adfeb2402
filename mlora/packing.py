"""Sequence packing: several short sequences of ONE adapter share a row of the fused batch.

A padded batch costs rows x longest row, however short most rows are. Packing puts an
adapter's sequences end to end into rows of at most `max_len` tokens (first-fit decreasing,
never splitting a sequence), so almost every position holds a real token. Three things keep
the result equal to the unpacked run, token for token:

- `document_ids`: the model lets a token attend only to earlier tokens of its own sequence;
- `position_ids`: RoPE positions restart at 0 for each sequence;
- labels: the first token of each sequence gets IGNORE_INDEX. The loss predicts labels[t]
  from position t - 1 (HF's shift), and for a sequence's first token position t - 1 is the
  previous sequence's last token; in the unpacked run nothing precedes it, so it is never a
  target there either (Example.num_label_tokens does not count it).

Rows of different adapters never share a row: the fused batch packs each adapter's
micro-batch on its own, so each adapter still owns a contiguous row range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from mlora.data import IGNORE_INDEX, Example

PAD_DOCUMENT = -1  # document id of padding: no real token shares it


def pack_bins(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """First-fit decreasing: the indices of `lengths`, grouped into rows whose lengths sum to
    at most max(max_len, longest length) (a longer sequence gets a row of its own and is never
    split). Deterministic: equal lengths keep their input order."""
    if not lengths:
        return []
    capacity = max(max_len, max(lengths))
    rows: list[list[int]] = []
    free: list[int] = []  # room left in each row
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def packed_shape(examples: Sequence[Example], max_len: int) -> tuple[int, int]:
    """(rows, longest row) of `examples` once packed: what a packed micro-batch costs."""
    lengths = [len(ex.input_ids) for ex in examples]
    bins = pack_bins(lengths, max_len)
    return len(bins), max((sum(lengths[i] for i in row) for row in bins), default=0)


@dataclass
class PackedRows:
    """One adapter's examples packed into rows, right-padded to one width L."""

    input_ids: Tensor  # [R, L] long; pad_id on padding
    labels: Tensor  # [R, L] long; IGNORE_INDEX on padding and on each sequence's first token
    position_ids: Tensor  # [R, L] long; 0.. within each sequence, 0 on padding
    document_ids: Tensor  # [R, L] long; 0.. per sequence within a row, PAD_DOCUMENT on padding
    bins: list[list[int]]  # the example indices in each row, in the order they sit there


def pack_examples(examples: Sequence[Example], max_len: int, pad_id: int,
                  length: int | None = None) -> PackedRows:
    """Pack `examples` (one adapter's micro-batch) into rows of at most max_len tokens (or the
    longest example, when longer), right-padded to `length` (default: the longest row)."""
    lengths = [len(ex.input_ids) for ex in examples]
    bins = pack_bins(lengths, max_len)
    widest = max((sum(lengths[i] for i in row) for row in bins), default=0)
    length = widest if length is None else length
    assert length >= widest, f"packed rows of {widest} tokens do not fit in length {length}"
    shape = (len(bins), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)  # [R, L]
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)  # [R, L]
    position_ids = torch.zeros(shape, dtype=torch.long)  # [R, L]
    document_ids = torch.full(shape, PAD_DOCUMENT, dtype=torch.long)  # [R, L]
    for r, row in enumerate(bins):
        col = 0
        for doc, i in enumerate(row):
            ex, n = examples[i], lengths[i]
            assert len(ex.labels) == n, "labels and input_ids differ in length"
            ids, labs = ex.tensors()  # made once per example (Example.tensors)
            input_ids[r, col:col + n] = ids
            labels[r, col:col + n] = labs
            labels[r, col] = IGNORE_INDEX  # never predicted from the previous sequence's end
            position_ids[r, col:col + n] = torch.arange(n)
            document_ids[r, col:col + n] = doc
            col += n
    return PackedRows(input_ids, labels, position_ids, document_ids, bins)
