"""What a checkpointed decoder layer's recomputation (`recompute`, llama.checkpointed_layer) must
choose as its forward chose: the LoRA kernel each input group ran where `auto` chose triton.

Why. `auto` runs the triton LoRA kernel, and torch's ops (fused) from the first failure of its
Triton kernels on (kernel_fallback.py). The two draw their dropout masks differently (Philox in
the kernel, torch's bernoulli), so a failure between a layer's forward and its recomputation (in
a later layer's forward, or in a backward kernel) made the recomputation draw other masks than
the forward used: wrong gradients for that step, or a CheckpointError where the two kernels
save a different number of tensors. So the forward notes, in order, what each group ran (fused
where its kernel failed) and the recomputation runs the same. (The adapters' generators are
rewound by checkpointed_layer itself; a triton call that ran in the forward runs again on the
same shapes, compiled already. One that ran there and fails only in the recomputation would
take torch's mask, another: not covered.)

The notes live per thread: a recomputation runs in the backward's thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ForwardChoices:
    """The choices of one checkpointed forward, in the order it made them."""

    def __init__(self):
        self.made: list = []
        self.replayed = 0  # how many of them the recomputation running now has taken


_active = threading.local()  # .choices: the ForwardChoices being noted or replayed; .replaying


@contextmanager
def _set(choices: ForwardChoices, replaying: bool) -> Iterator[None]:
    outer = getattr(_active, "choices", None), getattr(_active, "replaying", False)
    _active.choices, _active.replaying = choices, replaying
    try:
        yield
    finally:
        _active.choices, _active.replaying = outer


def noting(choices: ForwardChoices):
    """Within: a checkpointed layer's forward; note() appends to `choices`."""
    return _set(choices, replaying=False)


def replaying(choices: ForwardChoices):
    """Within: its recomputation; replayed() takes `choices` in order, from the first."""
    choices.replayed = 0
    return _set(choices, replaying=True)


def replayed(choice):
    """`choice`, or within a recomputation the choice its forward noted at this point."""
    choices = getattr(_active, "choices", None)
    if choices is None or not getattr(_active, "replaying", False) or choices.replayed >= len(choices.made):
        return choice
    choices.replayed += 1
    return choices.made[choices.replayed - 1]


def note(choice) -> None:
    """Within a checkpointed layer's forward: remember `choice` for its recomputation."""
    choices = getattr(_active, "choices", None)
    if choices is not None and not getattr(_active, "replaying", False):
        choices.made.append(choice)
