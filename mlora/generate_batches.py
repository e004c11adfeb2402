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
"""

from __future__ import annotations

import sys
from typing import Callable

from tqdm import tqdm

from mlora.errors import UserError
from mlora.memory import _OOM_ERRORS, free_device_memory


def generate_in_batches(num_lines: int, batch_size: int, run_batch: Callable[[range], None],
                        progress: bool = True) -> None:
    """run_batch(lines) for consecutive ranges of line numbers covering 0..num_lines - 1 in
    order, batch_size lines each (the last fewer): it generates and prints those lines, all or
    nothing (it prints once their generation ended). A range that runs out of device memory is
    run again from its first line in batches of half its size, and so are the lines after it:
    no batch as large as one that ran out runs again. One line that runs out ends the command
    with one line. A bar on stderr counts the lines done (on a terminal only, and not with
    progress=False)."""
    size = batch_size
    bar = tqdm(total=num_lines, desc="generate", unit="line", disable=None if progress else True, leave=False,
               file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    try:
        start = 0
        while start < num_lines:
            lines = range(start, min(start + size, num_lines))
            if not ran_out_of_memory(run_batch, lines):
                bar.update(len(lines))
                start = lines.stop
                continue
            if len(lines) == 1:
                raise UserError(f"out of device memory generating line {start + 1} alone (its prompt through "
                                f"one adapter, and the bare base with --base); give a shorter prompt or fewer "
                                f"--max_new_tokens, or free device memory")
            size = (len(lines) + 1) // 2
            free_device_memory()
            tqdm.write(f"mlora: out of device memory on a batch of {len(lines)} lines; running them and the lines "
                       f"after them in batches of {size}", file=sys.stderr)
    finally:
        bar.close()


def ran_out_of_memory(run_batch: Callable[[range], None], lines: range) -> bool:
    """run_batch(lines); True when it ran out of device memory. The error is dropped here, and
    with it its traceback, whose frames hold that attempt's tensors, before memory is freed."""
    try:
        run_batch(lines)
    except _OOM_ERRORS:
        return True
    return False
