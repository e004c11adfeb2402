"""Which rows go together: each adapter's data order, its micro-batches and optimizer steps,
and the fused batch that carries several adapters' micro-batches through the base at once.

An adapter's stream of micro-batches depends only on its own data, its own config and the
seed, never on the other adapters: that is what lets a fused run equal a solo run.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from mlora.config import AdapterConfig
from mlora.data import IGNORE_INDEX, Example, pad_rows
from mlora.device import upload
from mlora.early_stopping import never_stops_note
from mlora.errors import UserError
from mlora.lora import AdapterRows
from mlora.packing import pack_examples, packed_shape
from mlora.plural import counted

# group_by_length sorts rows by length inside "megabatches" of up to this many optimizer batches,
# as transformers' LengthGroupedSampler does (get_length_grouped_indices): padding falls, while
# the order stays random.
LENGTH_GROUP_BATCHES = 50
# What the fingerprint of a run that groups by length records (checkpoint.run_fingerprint): a
# checkpoint of an mlora that grouped otherwise would resume into other rows mid-epoch. (The
# grouping of mlora before it, windows of 50 micro-batches, records none.)
LENGTH_GROUPING = "megabatches of up to 50 batches, as transformers' LengthGroupedSampler"


@dataclass
class MicroBatch:
    """Up to micro_batch_size rows of one adapter, part of one of its optimizer steps."""

    adapter: str
    examples: list[Example]
    epoch: int
    step: int  # 0-based optimizer step of this adapter
    step_label_tokens: int  # label tokens of the whole optimizer step: the loss normaliser
    last_in_step: bool
    side: str  # padding side, "right" or "left"

    @property
    def label_tokens(self) -> int:
        return sum(ex.num_label_tokens for ex in self.examples)


def epoch_order(lengths: Sequence[int], seed: int, epoch: int, group_by_length: bool,
                batch_size: int) -> list[int]:
    """A permutation of the rows for one epoch, from the adapter's seed and the epoch only."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    return length_grouped(order, lengths, batch_size) if group_by_length else order


def length_grouped(order: list[int], lengths: Sequence[int], batch_size: int) -> list[int]:
    """`order` grouped by length as transformers' Trainer groups a shuffle with group_by_length
    (get_length_grouped_indices, its batch_size the optimizer's: per-device batch times gradient
    accumulation, mlora's batch_size): cut into megabatches of LENGTH_GROUP_BATCHES batches (fewer
    where the data has less than 4 such megabatches, so that a small dataset is not sorted whole
    every epoch, at least one batch), each sorted longest first (stable: ties keep the shuffled
    order), and the longest row of all swapped to the front, so that a batch too large for the
    device shows in the first step. Windows of 50 micro-batches, as mlora grouped before, were
    a few batches for a config ported from transformers with gradient accumulation."""
    per_megabatch = max(min(len(order) // (batch_size * 4), LENGTH_GROUP_BATCHES), 1)
    size = per_megabatch * batch_size
    megabatches = [sorted(order[i:i + size], key=lambda row: -lengths[row]) for i in range(0, len(order), size)]
    if megabatches:
        longest = max(range(len(megabatches)), key=lambda m: lengths[megabatches[m][0]])  # (the first of ties)
        megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [row for megabatch in megabatches for row in megabatch]


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    return math.ceil(num_rows / batch_size)


def total_steps(num_rows: int, cfg: AdapterConfig) -> int:
    """Optimizer steps the adapter will take (a short last batch of an epoch still steps)."""
    steps = steps_per_epoch(num_rows, cfg.batch_size) * cfg.num_epochs
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def prepare_examples(examples: Sequence[Example]) -> None:
    """Make the tensors fused batches copy from (Example.tensors) before training starts, not
    in its first epoch: only where batches are built (one process, or a pipeline's rank 0),
    as they cost 16 bytes a token of host memory."""
    for ex in examples:
        ex.tensors()


def check_trainable(examples: Sequence[Example], cfg: AdapterConfig, cutoff_len: int) -> None:
    """An adapter whose data has no token to learn would train on nothing, its loss 0 and its
    weights unchanged, and look like a success: refuse it in one line."""
    if not any(ex.num_label_tokens for ex in examples):
        raise UserError(f"adapter {cfg.name!r}: no row of {cfg.data} has a token to learn within cutoff_len "
                        f"{cutoff_len} (rows too long, empty, or without an output/assistant turn"
                        + ("" if cfg.train_on_inputs else "; only outputs are learned unless train_on_inputs")
                        + ")")


def rows_without_labels(examples: Sequence[Example]) -> int:
    """The rows with no token to learn (no label within cutoff_len after the shift)."""
    return sum(1 for ex in examples if not ex.num_label_tokens)


def unlearnable_rows_note(cfg: AdapterConfig, without: int, rows: int, cutoff_len: int) -> str | None:
    """A note when `without` of the adapter's `rows` training rows have no token to learn (when
    all have none, check_trainable refuses it): each costs its forward and backward and
    teaches nothing, and nothing else would tell. They are kept: dropping them would change
    the rows of every later step (and so equality with a PEFT run of the same data)."""
    if not without:
        return None
    one = without == 1
    return (f"mlora: note: adapter {cfg.name!r}: {without} of {counted(rows, 'row')} of {cfg.data} "
            f"{'has' if one else 'have'} no token to learn within cutoff_len {cutoff_len} (the answer starts past it, "
            f"or there is none); {'it is' if one else 'they are'} trained on but {'teaches' if one else 'teach'} "
            f"nothing: raise cutoff_len or shorten the prompts")


def start_notes(cfg: AdapterConfig, examples: Sequence[Example], cutoff_len: int) -> list[str]:
    """What training says of an adapter before its first step, in one process and on a
    pipeline's first rank alike: its rows with no token to learn, and an early stopping that
    can never stop it."""
    notes = (unlearnable_rows_note(cfg, rows_without_labels(examples), len(examples), cutoff_len),
             never_stops_note(cfg, total_steps(len(examples), cfg)))
    return [note for note in notes if note is not None]


def check_evaluable(examples: Sequence[Example], cfg: AdapterConfig, cutoff_len: int) -> None:
    """An adapter evaluated mid-run (eval_step) on test rows without a token to score would log
    every eval loss as null, save no best and, with early stopping, stop after its patience, as
    no loss ever improves: refuse it in one line, as check_trainable refuses such training rows."""
    if cfg.eval_step and cfg.test_data and not any(ex.num_label_tokens for ex in examples):
        raise UserError(f"adapter {cfg.name!r}: no row of {cfg.test_data} has a token to evaluate within cutoff_len "
                        f"{cutoff_len} (rows too long, empty, or without an output/assistant turn), so each eval "
                        f"of its eval_step would measure nothing")


def adapter_stream(examples: Sequence[Example], cfg: AdapterConfig, seed: int,
                   start_step: int = 0) -> Iterator[MicroBatch]:
    """Yield the adapter's micro-batches in training order, from optimizer step `start_step`."""
    lengths = [len(ex.input_ids) for ex in examples]
    per_epoch = steps_per_epoch(len(examples), cfg.batch_size)
    last = total_steps(len(examples), cfg)
    step = 0
    for epoch in range(cfg.num_epochs):
        order = epoch_order(lengths, seed, epoch, cfg.group_by_length, cfg.batch_size)
        for k in range(per_epoch):
            if step >= last:
                return
            if step < start_step:
                step += 1
                continue
            rows = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
            step_tokens = sum(examples[i].num_label_tokens for i in rows)
            chunks = [rows[j:j + cfg.micro_batch_size] for j in range(0, len(rows), cfg.micro_batch_size)]
            for j, chunk in enumerate(chunks):
                yield MicroBatch(cfg.name, [examples[i] for i in chunk], epoch, step, step_tokens,
                                 last_in_step=(j == len(chunks) - 1), side=cfg.expand_side)
            step += 1


def round_robin(streams: dict[str, Iterator[MicroBatch]], candidate_num: int,
                simultaneously_num: int, stopped: set[str] | None = None) -> Iterator[list[MicroBatch]]:
    """The `trivial` strategy: each fused batch takes the next micro-batch of up to
    `simultaneously_num` active adapters, in rotation. At most `candidate_num` adapters are
    active; when one runs out of data the next queued adapter (config order) starts."""
    queued = deque(streams)
    active: deque[str] = deque()

    def admit() -> None:
        while queued and len(active) < candidate_num:
            active.append(queued.popleft())

    admit()
    while active:
        parts: list[MicroBatch] = []
        used: set[str] = set()
        while len(parts) < simultaneously_num:
            name = next((n for n in active if n not in used), None)
            if name is None:
                break
            # `stopped` may grow while this runs (an adapter taken out after a NaN).
            part = None if stopped and name in stopped else next(streams[name], None)
            if part is None:  # finished: its slot goes to the next queued adapter
                active.remove(name)
                admit()
                continue
            parts.append(part)
            used.add(name)
        # Rotate: the adapters that just ran go to the back of the line.
        active = deque([n for n in active if n not in used] + [n for n in active if n in used])
        if parts:
            yield parts


@dataclass
class FusedBatch:
    """Rows of several adapters padded to one length; each adapter owns a contiguous range.

    With packing (see packing.py) a row holds several sequences of one adapter, and
    position_ids / document_ids tell the model where each sequence starts."""

    input_ids: torch.Tensor  # [B, S] long
    labels: torch.Tensor  # [B, S] long, IGNORE_INDEX where not trained
    attention_mask: torch.Tensor | None  # [B, S] bool, None when every row is right-padded
    rows: list[AdapterRows]
    parts: list[MicroBatch]
    position_ids: torch.Tensor | None = None  # [B, S] long, packed rows only
    document_ids: torch.Tensor | None = None  # [B, S] long, packed rows only
    # {adapter: its label tokens (targets of the loss)}, counted on the host where the batch
    # is built, so the loss never reads a count back from the device (which waits for it).
    label_counts: dict[str, int] | None = None
    # [M] long: the positions whose next token is a target (trained_positions), found on the
    # host by `to`, so that only they go through the head (loss.head_loss_sums)
    target_positions: torch.Tensor | None = None

    def to(self, device: torch.device, with_positions: bool = True) -> "FusedBatch":
        """The batch on `device` (the attention mask stays on the host); with_positions False:
        without target_positions (a pipeline's rank 0, whose last stage gets them as runs)."""
        # Through pinned memory (device.upload): a copy from pageable memory to a GPU waits
        # for everything queued there, a second synchronisation per step besides the trainer's
        # one read (benchmarks/gpu_checks.py counts them).
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else upload(t, device)

        counts = self.label_counts if self.label_counts is not None else label_token_counts(self.labels, self.rows)
        positions = self.target_positions if with_positions else None
        if with_positions and positions is None and self.labels.device.type == "cpu":  # (on a GPU it would wait)
            positions = trained_positions(self.labels, self.rows)
        # The attention mask stays here: the model checks on it whether the rows need a mask at
        # all (no read back from the device) and moves it itself.
        return FusedBatch(move(self.input_ids), move(self.labels), self.attention_mask, self.rows,
                          self.parts, move(self.position_ids), move(self.document_ids), counts, move(positions))


def trained_positions(labels: torch.Tensor, rows: Sequence[AdapterRows]) -> torch.Tensor:
    """[M] long: the flat positions b * S + t of labels [B, S] whose next label is a loss
    target (labels[b, t + 1] != IGNORE_INDEX), adapter by adapter in the order of `rows`, each
    adapter's ascending; so adapter i's are the i-th of the runs label_token_counts counts."""
    S = labels.shape[1]
    trained = torch.nn.functional.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1))  # [B, S]: position t predicts t + 1
    return torch.cat([trained[r.start:r.end].flatten().nonzero().squeeze(1) + r.start * S for r in rows]
                     or [torch.zeros(0, dtype=torch.long)])


def label_token_counts(labels: torch.Tensor, rows: Sequence[AdapterRows]) -> dict[str, int]:
    """{adapter: number of its loss targets}: labels [B, S] other than IGNORE_INDEX after the
    one-token shift (position t predicts labels[t + 1]), over its rows. Read from `labels`'
    device (a batch built by `fuse` has them already)."""
    targets = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()  # [B]
    return {r.name: int(sum(targets[r.start:r.end])) for r in rows}


def fuse(parts: Sequence[MicroBatch], pad_id: int, pack_len: int | None = None) -> FusedBatch:
    """Concatenate micro-batches (one per adapter) into one padded batch.

    pack_len: None = one example per row; else each micro-batch is packed on its own into
    rows of at most pack_len tokens (see packing.py), so no row mixes two adapters."""
    if pack_len is not None:
        return _fuse_packed(parts, pad_id, pack_len)
    examples = [ex for part in parts for ex in part.examples]
    sides = [part.side for part in parts for _ in part.examples]
    length = max(len(ex.input_ids) for ex in examples)
    input_ids, labels, mask = pad_rows(examples, sides, length, pad_id)
    for row, (ex, side) in enumerate(zip(examples, sides)):
        if side == "left" and len(ex.input_ids) < length:
            # A left-padded row's first token sits after a pad, so the loss's shift would
            # predict it from that pad. Alone it is never a target (nothing precedes it; see
            # Example.num_label_tokens, the step's normaliser), so it must not be here either.
            labels[row, length - len(ex.input_ids)] = IGNORE_INDEX
    rows, start = [], 0
    for part in parts:
        own = max(len(ex.input_ids) for ex in part.examples)  # its length alone (dropout's layout)
        rows.append(AdapterRows(part.adapter, start, start + len(part.examples), own, part.side == "left"))
        start += len(part.examples)
    # The mask travels with right padding too: attention still takes the fast is_causal path
    # (every pad key sits after every real query; attention_masks sees that on the host), and
    # LongRoPE reads each row's own length from it (models/rope.py sequence_lengths).
    return FusedBatch(input_ids, labels, mask, rows, list(parts), label_counts=_label_counts(parts))


def _label_counts(parts: Sequence[MicroBatch]) -> dict[str, int]:
    """The loss targets of each adapter, from the examples: the same tokens as its rows'
    labels count, padded or packed (label_token_counts; tests/test_packing.py holds them
    equal), and no tensor is read."""
    return {part.adapter: part.label_tokens for part in parts}


def _fuse_packed(parts: Sequence[MicroBatch], pad_id: int, pack_len: int) -> FusedBatch:
    # Packed rows are always right-padded: the adapter's expand_side has nothing to pad.
    widths = [packed_shape(part.examples, pack_len)[1] for part in parts]  # each alone
    width = max(widths)
    packed = [pack_examples(part.examples, pack_len, pad_id, length=width) for part in parts]
    rows, start = [], 0
    for part, p, own in zip(parts, packed, widths):
        n = p.input_ids.shape[0]
        rows.append(AdapterRows(part.adapter, start, start + n, own))
        start += n

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in packed])  # [B, S]

    return FusedBatch(cat("input_ids"), cat("labels"), None, rows, list(parts),
                      cat("position_ids"), cat("document_ids"), _label_counts(parts))
