"""`mlora generate` a batch at a time.

All of a --prompt_file's rows in one fused batch ran out of device memory, or crawled, for a
test set of thousands. The output lines (one per prompt and adapter, in the order printed) run
--batch_size at a time, in that order, so each batch's lines can be printed as soon as it ends:
a long run shows results as it goes, and an interrupted one keeps what it printed. (Sorting
the lines by prompt length would pad less, but a batch could then print only after every
earlier line had run: the first line's batch might be the last.)

A batch that runs out of device memory runs again from its first line in batches of half its
size, the lines after it too: the memory they need is about the same. (Not
memory.run_splitting_on_oom, the trainer's splitter of one batch that must run whole: the
right half, left waiting at the size that ran out, ran out again.) The batch size changes no
line in fp32 (tested): each row is decoded apart from the rows beside it (left-padded, its
pads masked), and a sampled one draws from the generator of its number in the whole request
(generate.Decoding's request_ids). In bf16 or fp16 a row may round differently beside other
rows, so a near-tie may go otherwise.

A pipeline (mlora.pipeline.run) runs the same loop on every rank: its ranks agree at the step
where one of them ran out, and each raises RankOutOfMemory naming it, so every rank halves
alike; rank 0 alone gives the note.
"""

from __future__ import annotations

import sys
from typing import Callable, NamedTuple

from tqdm import tqdm

from mlora.errors import PipelineError, UserError
from mlora.memory import _OOM_BASE, free_device_memory, is_out_of_memory


class RankOutOfMemory(_OOM_BASE):  # type: ignore[misc, valid-type]
    """A pipeline's rank `rank` ran out of device memory generating a batch, raised on every
    rank at the same step (they agree on it: mlora.pipeline.run), so that all run it again
    alike. here: this process is that rank."""

    def __init__(self, rank: int, here: bool):
        super().__init__(f"rank {rank} ran out of device memory")
        self.rank, self.here = rank, here


class Shortage(NamedTuple):
    """Where a batch ran out of device memory: a pipeline's rank (None in one process), and
    whether this process is where it did."""

    rank: int | None = None
    here: bool = True


def generate_in_batches(num_lines: int, batch_size: int, run_batch: Callable[[range], None],
                        progress: bool = True, notes: bool = True) -> None:
    """run_batch(lines) for consecutive ranges of line numbers covering 0..num_lines - 1 in
    order, batch_size lines each (the last fewer): it generates and prints those lines, all or
    nothing (it prints once their generation ended). A range that runs out of device memory is
    run again from its first line in batches of half its size, and so are the lines after it:
    no batch as large as one that ran out runs again. One line that runs out ends the command
    with one line (on a pipeline's other ranks a PipelineError naming the rank that ran out).
    A bar on stderr counts the lines done (on a terminal only, and not with progress=False);
    notes=False leaves out the note of a rerun (a pipeline's ranks but rank 0)."""
    size = batch_size
    bar = tqdm(total=num_lines, desc="generate", unit="line", disable=None if progress else True, leave=False,
               file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    try:
        start = 0
        while start < num_lines:
            lines = range(start, min(start + size, num_lines))
            shortage = ran_out_of_memory(run_batch, lines)
            if shortage is None:
                bar.update(len(lines))
                start = lines.stop
                continue
            if len(lines) == 1:
                raise alone_error(start + 1, shortage)
            size = (len(lines) + 1) // 2
            free_device_memory()
            if notes:
                where = "" if shortage.rank is None else f"rank {shortage.rank}: "
                tqdm.write(f"mlora: {where}out of device memory on a batch of {len(lines)} lines; running them and "
                           f"the lines after them in batches of {size}", file=sys.stderr)
    finally:
        bar.close()


def alone_error(line: int, shortage: Shortage) -> Exception:
    """The one line for line number `line` (from 1) running out of device memory alone: the
    culprit's own error (exit 2); a pipeline's other ranks name it in a PipelineError (exit 3,
    as when a rank fails)."""
    what = (f"out of device memory generating line {line} alone (its prompt through one adapter, and the bare "
            f"base with --base); give a shorter prompt or fewer --max_new_tokens")
    if shortage.rank is None:
        return UserError(f"{what}, or free device memory")
    message = f"rank {shortage.rank}: {what}, free device memory there, or split the model over more stages"
    return UserError(message) if shortage.here else PipelineError(message)


def ran_out_of_memory(run_batch: Callable[[range], None], lines: range) -> Shortage | None:
    """run_batch(lines); where it ran out of device memory, or None when it ran. The error is
    dropped here, and with it its traceback, whose frames hold that attempt's tensors, before
    memory is freed."""
    try:
        run_batch(lines)
    except RankOutOfMemory as err:
        return Shortage(err.rank, err.here)
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        return Shortage()
    return None
