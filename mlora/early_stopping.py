"""Per-adapter early stopping (HF Trainer's EarlyStoppingCallback): an adapter stops after
`early_stopping_patience` evaluations in a row whose eval loss did not improve on its lowest one
by more than `early_stopping_threshold`.

One process (trainer.py) and every pipeline rank (pipeline/worker.py) keep the same tally the
same way, from the same eval losses, so all of them stop an adapter after the same evaluation.
The tally rides in the resumable checkpoints, so a resumed run stops where the uninterrupted
one does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from mlora.plural import counted


@dataclass
class Patience:
    """One adapter's tally: its lowest finite eval loss so far, the evaluations since one
    improved on it by more than the threshold, and whether it was evaluated at all."""

    lowest: float | None = None
    waited: int = 0
    evaluated: bool = False

    def observe(self, eval_loss: float | None, threshold: float) -> None:
        """Count one evaluation. As HF's callback: the first evaluation never counts, whatever
        its loss (HF's best_metric is still None then); after it, the lowest loss follows every
        improvement, but only one by more than `threshold` restarts the count; a missing or
        non-finite loss never improves."""
        finite = eval_loss is not None and math.isfinite(eval_loss)
        # (the drop, lowest - loss, against the threshold: as HF compares it; `loss < lowest -
        # threshold` rounds otherwise, 2.9 < 3.0 - 0.1 is false where 3.0 - 2.9 > 0.1 is true)
        if not self.evaluated or (finite and (self.lowest is None or self.lowest - eval_loss > threshold)):
            self.waited = 0
        else:
            self.waited += 1
        if finite and (self.lowest is None or eval_loss < self.lowest):
            self.lowest = eval_loss
        self.evaluated = True

    def exhausted(self, patience: int | None) -> bool:
        """Whether the adapter stops now (patience None: early stopping is off)."""
        return patience is not None and self.waited >= patience

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, saved: dict | None) -> "Patience":
        """From a checkpoint's state; one without (written before early stopping existed, or
        with it off) starts the tally afresh. (One written before `evaluated` was kept: an
        adapter with a lowest loss or a count was evaluated.)"""
        if not saved:
            return cls()
        return cls(**{"evaluated": saved.get("lowest") is not None or saved.get("waited", 0) > 0, **saved})


def stops_early(patience: int | None, tally: Patience, eval_loss: float | None, threshold: float,
                step: int, total_steps: int) -> bool:
    """Count the eval loss after `step` (when early stopping is on) and say whether the adapter
    stops there; at its last step it finishes anyway, which is no early stop."""
    if patience is None:
        return False
    tally.observe(eval_loss, threshold)
    return tally.exhausted(patience) and step < total_steps


def evaluations_that_may_stop(eval_step: int, total_steps: int) -> int:
    """How many of an adapter's evaluations may stop it: those before its last step (at which it
    ends anyway), less its first (which never counts)."""
    return max(0, (total_steps - 1) // eval_step - 1) if eval_step else 0


def never_stops_note(a, total_steps: int) -> str | None:
    """A note when adapter config `a`'s early_stopping_patience can never be reached in its
    `total_steps`: patience evaluations in a row must fail to improve, after its first and
    before its last step. Such a run trains to its end as if early stopping were off; the user
    set it believing otherwise (a patience sized for another eval_step or dataset)."""
    if a.early_stopping_patience is None:
        return None
    chances = evaluations_that_may_stop(a.eval_step, total_steps)
    if chances >= a.early_stopping_patience:
        return None
    return (f"mlora: note: adapter {a.name!r}: early_stopping_patience {a.early_stopping_patience} cannot stop it: "
            f"of its evaluations (eval_step {a.eval_step}, {counted(total_steps, 'step')}) {chances} "
            f"{'comes' if chances == 1 else 'come'} after its first and "
            f"before its last step; it trains to the end")
