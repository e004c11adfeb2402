"""Data order, micro-batches, optimizer-step boundaries and the round-robin fusing."""

from __future__ import annotations

import itertools

import torch

import pytest

from mlora.batching import (adapter_stream, epoch_order, fuse, label_token_counts, round_robin, total_steps,
                            trained_positions)
from mlora.config import AdapterConfig
from mlora.data import Example
from mlora.lora import AdapterRows


def examples(n, offset=0):
    # Row i has i + 2 tokens, all trained; the first token of a row is never a label.
    return [Example(list(range(offset, offset + i + 2)), list(range(offset, offset + i + 2))) for i in range(n)]


def cfg(name="a", **kw):
    base = dict(name=name, data="", batch_size=4, micro_batch_size=2, num_epochs=2,
                group_by_length=False, eval_step=0)
    base.update(kw)
    return AdapterConfig(**base)


def test_epoch_order_is_a_seeded_permutation():
    lengths = list(range(37))
    a = epoch_order(lengths, seed=5, epoch=0, group_by_length=False, batch_size=2)
    assert sorted(a) == lengths
    assert a == epoch_order(lengths, 5, 0, False, 2)
    assert a != epoch_order(lengths, 5, 1, False, 2)  # a new shuffle every epoch
    assert a != epoch_order(lengths, 6, 0, False, 2)


def test_group_by_length_groups_as_transformers_does():
    """group_by_length sorts rows longest first within megabatches of 50 optimizer batches
    (batch_size rows: per-device batch times gradient accumulation in transformers), fewer where
    the data holds less than 4 of them, the longest row of all first: what transformers' Trainer
    does (its get_length_grouped_indices, given the same shuffle, gives the same order). mlora's
    windows were 50 micro-batches: 8 times smaller here, with 8 micro-batches a step."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = [(i * 7919) % 613 + (i % 3) for i in range(2000)]  # (ties too)
    for n, batch_size in ((2000, 8), (2000, 3), (300, 4), (10, 4), (5, 8), (1, 1)):
        for seed, epoch in ((1, 0), (7, 3)):
            shuffle = torch.Generator().manual_seed(seed + epoch)
            assert epoch_order(lengths[:n], seed, epoch, True, batch_size) == \
                get_length_grouped_indices(lengths[:n], batch_size, generator=shuffle), (n, batch_size)
    # micro-batches of one row, optimizer batches of 8: windows of 50 x 8 rows, each sorted but its
    # first row (the longest of all went first, the first window's longest where it came from)
    rows = [Example([0] * n, [0] * n) for n in lengths]
    index = {id(ex): i for i, ex in enumerate(rows)}
    order = [index[id(ex)] for p in adapter_stream(rows, cfg(batch_size=8, micro_batch_size=1, num_epochs=1,
                                                             group_by_length=True), seed=1) for ex in p.examples]
    assert sorted(order) == list(range(2000)) and lengths[order[0]] == max(lengths)
    for start in range(0, 2000, 400):
        window = [lengths[i] for i in order[start + 1:start + 400]]
        assert window == sorted(window, reverse=True), start
    # few rows: megabatches of a quarter of the data (300 // (4 x 4) = 18 batches of 4), not all of it
    order = epoch_order(lengths[:300], 1, 0, True, batch_size=4)
    assert [lengths[i] for i in order[73:144]] == sorted((lengths[i] for i in order[73:144]), reverse=True)
    assert [lengths[i] for i in order[:144]] != sorted((lengths[i] for i in order[:144]), reverse=True)


@pytest.mark.parametrize("n,bs,mbs", [(10, 4, 2), (9, 3, 1), (8, 8, 8), (5, 4, 4)])
def test_every_row_once_per_epoch_and_step_tokens(n, bs, mbs):
    rows = examples(n)
    c = cfg(batch_size=bs, micro_batch_size=mbs, num_epochs=2)
    parts = list(adapter_stream(rows, c, seed=3))
    for epoch in (0, 1):
        seen = [id(ex) for p in parts if p.epoch == epoch for ex in p.examples]
        assert sorted(seen) == sorted(id(ex) for ex in rows)
    steps = {}
    for p in parts:
        assert len(p.examples) <= mbs
        steps.setdefault(p.step, []).append(p)
    assert len(steps) == total_steps(n, c)
    for step, group in steps.items():
        assert [p.last_in_step for p in group] == [False] * (len(group) - 1) + [True]
        assert all(p.step_label_tokens == sum(q.label_tokens for q in group) for p in group)


def test_max_steps_and_start_step():
    rows = examples(10)
    c = cfg(max_steps=3)
    assert total_steps(10, c) == 3
    parts = list(adapter_stream(rows, c, seed=0))
    assert max(p.step for p in parts) == 2
    later = list(adapter_stream(rows, cfg(), seed=0, start_step=4))
    full = list(adapter_stream(rows, cfg(), seed=0))
    assert [p.examples for p in later] == [p.examples for p in full if p.step >= 4]


def _streams(sizes):
    return {name: adapter_stream(examples(n), cfg(name, batch_size=2, micro_batch_size=1, num_epochs=1), 0)
            for name, n in sizes.items()}


def test_round_robin_fuses_every_active_adapter_by_default():
    batches = list(round_robin(_streams({"a": 4, "b": 2, "c": 6}), 3, 3))
    assert [[p.adapter for p in b] for b in batches][:2] == [["a", "b", "c"], ["a", "b", "c"]]
    counts = {n: sum(p.adapter == n for b in batches for p in b) for n in "abc"}
    assert counts == {"a": 4, "b": 2, "c": 6}


def test_round_robin_admission_follows_the_candidate_limit():
    batches = list(round_robin(_streams({"a": 2, "b": 4, "c": 2}), candidate_num=2, simultaneously_num=2))
    names = [[p.adapter for p in b] for b in batches]
    # c waits until a finishes, and never more than 2 adapters are active at once.
    first_c = next(i for i, b in enumerate(names) if "c" in b)
    last_a = max(i for i, b in enumerate(names) if "a" in b)
    assert first_c > last_a
    assert all(len(b) <= 2 for b in names)


def test_round_robin_rotates_when_fewer_slots_than_adapters():
    batches = list(round_robin(_streams({"a": 4, "b": 4, "c": 4}), 3, 1))
    names = [b[0].adapter for b in batches]
    assert names[:6] == ["a", "b", "c", "a", "b", "c"]


def test_fuse_gives_each_adapter_a_contiguous_range():
    s = _streams({"a": 2, "b": 2})
    parts = [next(s["a"]), next(s["b"])]
    batch = fuse(parts, pad_id=0)
    assert [(r.name, r.start, r.end) for r in batch.rows] == [("a", 0, 1), ("b", 1, 2)]
    # Right padding only: the mask goes with the batch (LongRoPE reads the rows' lengths from
    # it), and attention takes the causal path anyway.
    from mlora.models.llama import ModelArgs, attention_masks

    args = ModelArgs("llama", 400, 64, 96, 2, 4, 2, 16)
    S = batch.input_ids.shape[1]
    assert batch.attention_mask is not None and batch.attention_mask.device.type == "cpu"
    assert attention_masks(args, [0, 1], batch.attention_mask, S, torch.device("cpu")) == {0: None, 1: None}
    left = list(itertools.islice(adapter_stream(examples(3), cfg("l", expand_side="left"), 0), 1))
    mixed = fuse(left + parts, 0)
    masks = attention_masks(args, [0], mixed.attention_mask, mixed.input_ids.shape[1], torch.device("cpu"))
    assert masks[0] is not None


def test_moving_a_batch_to_the_device_goes_through_upload(monkeypatch):
    """FusedBatch.to moves every tensor with device.upload (through pinned memory on CUDA: a
    plain copy from pageable memory would wait for the GPU, a second sync per step besides
    the trainer's one read), the trained positions too, found on the host; the attention mask
    stays on the host, where the model reads it."""
    import mlora.batching as batching

    moved = []
    monkeypatch.setattr(batching, "upload", lambda t, device: moved.append(t) or t.to(device))
    s = _streams({"a": 2, "b": 2})
    batch = fuse([next(s["a"]), next(s["b"])], pad_id=0)
    on_device = batch.to(torch.device("cpu"))
    assert [id(t) for t in moved[:2]] == [id(batch.input_ids), id(batch.labels)]
    assert len(moved) == 3 and moved[2] is on_device.target_positions
    assert torch.equal(on_device.target_positions, trained_positions(batch.labels, batch.rows))
    assert on_device.attention_mask is batch.attention_mask
    packed = fuse([next(s["a"])], pad_id=0, pack_len=64)
    moved.clear()
    packed.to(torch.device("cpu"))
    assert len(moved) == 5  # input_ids, labels, position_ids, document_ids, target positions
    moved.clear()  # a pipeline's rank 0: its last stage rebuilds the positions from the header
    assert batch.to(torch.device("cpu"), with_positions=False).target_positions is None and len(moved) == 2


def test_trained_positions_follow_the_rows_and_the_shift():
    """Flat positions b * S + t whose next label is trained, adapter by adapter in the rows'
    order; as many as label_token_counts counts for each."""
    labels = torch.tensor([[5, -100, 7, 8], [-100, -100, 6, -100], [1, 2, 3, 4]])
    rows = [AdapterRows("b", 2, 3), AdapterRows("a", 0, 2)]
    assert trained_positions(labels, rows).tolist() == [8, 9, 10, 1, 2, 5]
    assert label_token_counts(labels, rows) == {"b": 3, "a": 3}
    assert trained_positions(labels, []).numel() == 0
