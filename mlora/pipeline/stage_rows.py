"""One training micro-batch's forward and backward on one pipeline stage, run again in halves of
its rows (halves of halves..., down to one row) when the stage's device runs out of memory,
without the other ranks knowing.

Why no other rank needs to learn of it: rows do not mix in a stage (a decoder layer attends
within a row; the loss is a sum over rows), so the stage's output for rows [a, b) run alone
is the whole micro-batch's output there, and the loss of the last stage is a CE *sum* divided
by the step's label-token total, so the halves' losses add up to the whole one. What the rank
sends on is then what it sends unsplit: the activation [B, S, H] (the halves' outputs
concatenated), the gradient of its input x.grad [B, S, H] (the halves backward into slices of
the one leaf x, so x.grad is whole), and the loss sums.

- Forward (`forward`): an out-of-memory error drops what the failed attempt made, rewinds the
  adapter's dropout generators (memory.generators_restored_on_error) and runs the rows in
  halves (memory.run_splitting_on_oom). Each half is a `Piece` with its own row layout, kept
  until the backward, which runs each piece under its own layout: with recompute the layers
  run again then and must see that piece's rows.
- Backward (`backward`): the graph of a piece cannot be split. An out-of-memory error there
  leaves no gradient behind (memory.grads_restored_on_error, x.grad included), drops the
  piece's graph, and runs the piece's rows again, forward and backward, in halves, from its
  kept input (`StageInputs`), with the generators rewound to where they were before its
  forward (and put back afterwards: later micro-batches drew since).

With dropout, a half draws its masks over its own rows, not the whole micro-batch's: a
statistically equal run, not the same one. A single row that still runs out raises
memory.UnsplittableOOM (an out-of-memory error), which ends the run with one line (run.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mlora import memory
from mlora.device import upload
from mlora.lora import AdapterRows, clear_lora_caches
from mlora.loss import head_loss_sums
from mlora.plural import counted
from mlora.session import Session


@dataclass
class StageInputs:
    """What a micro-batch's stage forward reads, kept until its backward (a rerun in halves
    reads it again)."""

    adapter: str
    x: torch.Tensor  # token ids [B, S] (first stage), or the received hidden states [B, S, H], a leaf with grad
    mask: torch.Tensor | None  # host attention mask [B, S] (None: every token real)
    labels: torch.Tensor  # [B, S]
    positions: torch.Tensor | None  # packed rows' RoPE positions [B, S]
    documents: torch.Tensor | None  # packed rows' document ids [B, S]
    targets: torch.Tensor | None  # last stage: the flat positions b * S + t the loss reads [M], on the host
    step_tokens: int  # the adapter's label tokens over its whole optimizer step: the loss normaliser
    scale: float  # the adapter's fp16 loss scale (1: none)

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    def grad_leaves(self) -> list[torch.Tensor]:
        """The input, when gradients flow back to it (every stage but the first)."""
        return [self.x] if self.x.requires_grad else []


@dataclass
class Piece:
    """Rows [begin, end) of a micro-batch run forward on this stage."""

    begin: int
    end: int
    out: torch.Tensor  # hidden states [b, S, H]; on the last stage the scaled loss (a scalar)
    layout: list[AdapterRows]  # its row layout (recompute runs its layers again under it)
    draws: list[torch.Tensor]  # the adapter's dropout generators' states before its forward
    loss: torch.Tensor | None = None  # last stage: its share of the step's loss, unscaled (a device scalar)


class StageRows:
    """Runs micro-batches forward and backward through this rank's stage, in halves on OOM."""

    def __init__(self, session: Session, rank: int, last: bool, params: Callable[[str], list[torch.Tensor]],
                 generators: Callable[[str], Iterable[torch.Generator]]):
        self.session = session
        self.rank, self.last = rank, last
        self.params = params  # adapter -> its parameters on this stage
        self.generators = lambda adapter: list(generators(adapter))  # adapter -> its dropout generators here

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: StageInputs, mb: int) -> list[Piece]:
        """The micro-batch's pieces in row order (one, unless the device ran out of memory)."""
        return memory.run_splitting_on_oom(lambda rows: self._forward_rows(inputs, rows[0], rows[-1] + 1),
                                           range(inputs.rows), on_split=self._note(mb, "forward"))

    def _forward_rows(self, inputs: StageInputs, begin: int, end: int) -> Piece:
        """Rows [begin, end) forward (all or nothing for the dropout generators)."""
        session, whole = self.session, (begin, end) == (0, inputs.rows)
        generators = self.generators(inputs.adapter)
        draws = [g.get_state() for g in generators]
        layout = [AdapterRows(inputs.adapter, 0, end - begin)]
        session.layout.rows = layout

        def rows_of(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or whole else t[begin:end]

        with memory.generators_restored_on_error(generators):
            try:
                # hidden states [b, S, H] (final-normed on the last stage, whose loss runs the head a
                # chunk at a time); packed rows carry their RoPE positions and document ids.
                out = session.model(rows_of(inputs.x), rows_of(inputs.mask), position_ids=rows_of(inputs.positions),
                                    document_ids=rows_of(inputs.documents), head=False)
                if not self.last:
                    return Piece(begin, end, out, layout, draws)
                S = out.shape[1]
                targets = inputs.targets
                if not whole:  # [m] its rows' positions, counted from its first row
                    targets = targets[(targets >= begin * S) & (targets < end * S)] - begin * S
                ce_sum, _ = head_loss_sums(session.model, out, rows_of(inputs.labels), layout,
                                               {inputs.adapter: targets.numel()},
                                               upload(targets, out.device))[inputs.adapter]
                loss = ce_sum / max(1, inputs.step_tokens)
                scaled = loss if inputs.scale == 1.0 else loss * inputs.scale  # what the backward starts from
                return Piece(begin, end, scaled, layout, draws, loss)
            except BaseException:
                clear_lora_caches(session.wrappers)  # a rerun in halves must not keep this attempt's inputs
                raise

    # ------------------------------------------------------------------ backward
    def backward(self, inputs: StageInputs, pieces: list[Piece], grad: torch.Tensor | None, mb: int) -> None:
        """Each piece's backward, from the gradient of the stage's output grad [B, S, H] (None on
        the last stage, whose pieces end in their loss); `pieces` is emptied as they go (a
        piece's graph is freed as soon as it is done or has failed)."""
        pieces.reverse()  # popped from the end: in row order
        while pieces:
            piece = pieces.pop()
            begin, end, draws = piece.begin, piece.end, piece.draws
            ran_out = not self._backward_piece(inputs, piece, grad)
            del piece  # its graph: the failed attempt's goes before the rerun
            if ran_out:
                self._rerun_in_halves(inputs, begin, end, draws, grad, mb)

    def _backward_piece(self, inputs: StageInputs, piece: Piece, grad: torch.Tensor | None) -> bool:
        """Whether the piece's backward ran; False (no gradient left behind) when it ran out of
        device memory."""
        self.session.layout.rows = piece.layout
        if not piece.out.requires_grad:  # an embedding-only first stage has nothing to train
            return True
        try:
            with memory.grads_restored_on_error(self.params(inputs.adapter) + inputs.grad_leaves()):
                piece.out.backward(self._grad_of(inputs, grad, piece.begin, piece.end))
        except Exception as err:
            if not memory.is_out_of_memory(err):
                raise
            return False
        return True

    def _rerun_in_halves(self, inputs: StageInputs, begin: int, end: int, draws: list[torch.Tensor],
                         grad: torch.Tensor | None, mb: int) -> None:
        """Rows [begin, end), whose backward ran out of memory, forward and backward again in
        halves, drawing from where the adapter's generators stood before their forward."""
        if end - begin <= 1:
            raise memory.UnsplittableOOM(f"out of memory in the backward of a single row of micro-batch {mb}")
        memory.free_device_memory()
        note = self._note(mb, "backward")
        note(range(begin, (begin + end + 1) // 2), range((begin + end + 1) // 2, end))
        generators = self.generators(inputs.adapter)
        now = [g.get_state() for g in generators]
        for g, state in zip(generators, draws):
            g.set_state(state)
        params = self.params(inputs.adapter) + inputs.grad_leaves()

        def forward_backward(rows: list[int]) -> None:
            first, stop = rows[0], rows[-1] + 1
            with memory.generators_restored_on_error(generators), memory.grads_restored_on_error(params):
                piece = self._forward_rows(inputs, first, stop)
                if piece.out.requires_grad:
                    piece.out.backward(self._grad_of(inputs, grad, first, stop))

        try:
            half = (begin + end + 1) // 2
            for rows in (range(begin, half), range(half, end)):
                memory.run_splitting_on_oom(forward_backward, rows, on_split=note)
        finally:  # later micro-batches drew since this one's forward
            for g, state in zip(generators, now):
                g.set_state(state)

    @staticmethod
    def _grad_of(inputs: StageInputs, grad: torch.Tensor | None, begin: int, end: int) -> torch.Tensor | None:
        """The slice of the output's gradient [B, S, H] for rows [begin, end) (None: a loss)."""
        return grad if grad is None or (begin, end) == (0, inputs.rows) else grad[begin:end]

    def _note(self, mb: int, where: str) -> Callable[[Iterable, Iterable], None]:
        def note(left, right) -> None:
            rows = len(left) + len(right)
            tqdm.write(f"mlora: rank {self.rank}: out of memory on {counted(rows, 'row')} of micro-batch {mb} in its "
                       f"stage's {where}; retrying in halves", file=sys.stderr)
        return note
