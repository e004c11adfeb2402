"""Batch strategies: which adapters' next micro-batches travel through the base together.

A fused batch is padded to its longest row, so it costs (rows) x (longest row) tokens of
compute and memory whatever the rows really hold. `trivial` fuses the active adapters in
rotation regardless of length; `fast-fit` and `optimal-fit` pick, for each fused batch, the
micro-batches that fit a token budget with little padding. With `packing: true` each
micro-batch is first packed into rows of up to cutoff_len tokens (packing.py), and the cost
counts those packed rows instead: (packed rows) x (longest packed row).

Every strategy only ever takes an adapter's NEXT micro-batch: what changes is which adapters
share a batch, never the order of one adapter's own micro-batches, so each adapter's result
is the same as training it alone. Every choice is a pure function of the streams and the
`stopped` set, so a resumed run replays exactly the same batches.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from mlora.batching import MicroBatch, round_robin
from mlora.packing import packed_shape

STRATEGIES = ("trivial", "fast-fit", "optimal-fit")
# optimal-fit tries every subset of the other candidates: 2**11 = 2048 at most, which stays
# cheap next to a forward pass; beyond this it would not, and fast-fit takes over.
EXACT_SEARCH_LIMIT = 12


def unused_budget_note(strategy: str, max_tokens: int | None) -> str | None:
    """A note for a config that gives `trivial` a max_tokens_per_batch: it fuses without a budget
    (fused_batches), so the key was ignored without a word by a user who set it to bound batches."""
    if strategy != "trivial" or max_tokens is None:
        return None
    return (f"mlora: note: max_tokens_per_batch {max_tokens} is not used: train_strategy trivial fuses the active "
            f"adapters' next micro-batches without a token budget (fast-fit and optimal-fit keep to one)")


def batch_shape(parts: Sequence[MicroBatch], pack_len: int | None = None) -> tuple[int, int]:
    """(rows, seq_len) of the fused batch `batching.fuse` builds of `parts`: every row is padded
    to the longest one. With packing (pack_len = the packed row length, i.e. cutoff_len) the
    rows are the packed rows."""
    if pack_len is not None:
        shapes = [packed_shape(p.examples, pack_len) for p in parts]
        return sum(rows for rows, _ in shapes), max(longest for _, longest in shapes)
    return sum(len(p.examples) for p in parts), max(len(ex.input_ids) for p in parts for ex in p.examples)


def padded_tokens(parts: Sequence[MicroBatch], pack_len: int | None = None) -> int:
    """What a fused batch costs: rows x seq_len (`batch_shape`), pads included."""
    rows, seq_len = batch_shape(parts, pack_len)
    return rows * seq_len


def useful_tokens(parts: Sequence[MicroBatch]) -> int:
    """The real (non-pad) tokens of a fused batch."""
    return sum(len(ex.input_ids) for p in parts for ex in p.examples)


def padding_stats(batches: Iterable[Sequence[MicroBatch]], max_tokens: int | None = None,
                  pack_len: int | None = None) -> dict:
    """Totals over a stream of fused batches; `over_budget` counts batches above max_tokens
    (only a lone micro-batch larger than the budget can be, for fast-fit and optimal-fit).
    `head_fraction`: the share of the padded tokens that predict a target, the only ones the
    head runs on (loss.py; the others are pads and untrained prompt tokens)."""
    n = useful = padded = over = largest = labels = 0
    for parts in batches:
        cost = padded_tokens(parts, pack_len)
        n += 1
        useful += useful_tokens(parts)
        labels += sum(part.label_tokens for part in parts)
        padded += cost
        largest = max(largest, cost)
        over += max_tokens is not None and cost > max_tokens
    return {"batches": n, "useful_tokens": useful, "padded_tokens": padded,
            "padding_fraction": 1 - useful / padded if padded else 0.0,
            "head_fraction": labels / padded if padded else 0.0,
            "max_batch_tokens": largest, "over_budget": over}


@dataclass(frozen=True)
class Candidate:
    """One active adapter's next micro-batch, as the pickers see it."""

    name: str
    index: int  # position in the config (dict order): the last tie-breaker
    rows: int  # rows it adds to the fused batch (packed rows with packing)
    longest: int  # its longest row (packed row with packing)
    useful: int
    last_ran: int  # fused-batch number it last ran in (or was admitted at): smaller waited longer

    @classmethod
    def of(cls, part: MicroBatch, index: int, last_ran: int, pack_len: int | None = None) -> "Candidate":
        if pack_len is None:
            rows, longest = len(part.examples), max(len(ex.input_ids) for ex in part.examples)
        else:
            rows, longest = packed_shape(part.examples, pack_len)
        return cls(part.adapter, index, rows, longest, useful_tokens([part]), last_ran)


def _fits(rows: int, longest: int, max_tokens: int | None) -> bool:
    return max_tokens is None or rows * longest <= max_tokens


def _anchor(cands: Sequence[Candidate]) -> Candidate:
    """The adapter that has waited longest: it always runs, so none can starve (each active
    adapter runs at least once every len(active) batches)."""
    return min(cands, key=lambda c: (c.last_ran, c.index))


def fast_fit_pick(cands: Sequence[Candidate], simultaneously_num: int,
                  max_tokens: int | None) -> list[Candidate]:
    """Greedy: the longest-waiting adapter, then the others closest to its length first (rows
    of similar length pad little), each taken if the batch still fits."""
    anchor = _anchor(cands)
    chosen, rows, longest = [anchor], anchor.rows, anchor.longest
    others = sorted((c for c in cands if c is not anchor),
                    key=lambda c: (abs(c.longest - anchor.longest), c.last_ran, c.index))
    for c in others:
        if len(chosen) >= simultaneously_num:
            break
        # A lone anchor above the budget fits nothing else and so runs alone.
        if _fits(rows + c.rows, max(longest, c.longest), max_tokens):
            chosen.append(c)
            rows, longest = rows + c.rows, max(longest, c.longest)
    return chosen


def optimal_fit_pick(cands: Sequence[Candidate], simultaneously_num: int,
                     max_tokens: int | None) -> list[Candidate]:
    """Exact: of all subsets that hold the longest-waiting adapter and fit, the one with the
    most useful tokens; ties go to less padding, then to adapters earlier in the config."""
    if len(cands) > EXACT_SEARCH_LIMIT:
        return fast_fit_pick(cands, simultaneously_num, max_tokens)
    anchor = _anchor(cands)
    others = sorted((c for c in cands if c is not anchor), key=lambda c: c.index)
    # rest[j]: useful tokens of others[j:], an upper bound on what a branch can still add.
    rest = [0] * (len(others) + 1)
    for j in range(len(others) - 1, -1, -1):
        rest[j] = rest[j + 1] + others[j].useful
    best: list = [None, None]  # key, subset

    def visit(start: int, chosen: list[Candidate], rows: int, longest: int, useful: int) -> None:
        key = (-useful, rows * longest - useful, sorted(c.index for c in chosen))
        if best[0] is None or key < best[0]:
            best[0], best[1] = key, list(chosen)
        if len(chosen) >= simultaneously_num:
            return
        for j in range(start, len(others)):
            # Strictly less: a branch that can only tie may still win on padding.
            if useful + rest[j] < -best[0][0]:
                return
            c = others[j]
            # The cost only grows as rows are added, so a subset over the budget has no
            # superset under it: skipping the branch loses nothing.
            if _fits(rows + c.rows, max(longest, c.longest), max_tokens):
                chosen.append(c)
                visit(j + 1, chosen, rows + c.rows, max(longest, c.longest), useful + c.useful)
                chosen.pop()

    visit(0, [anchor], anchor.rows, anchor.longest, anchor.useful)
    return best[1]


PICKERS = {"fast-fit": fast_fit_pick, "optimal-fit": optimal_fit_pick}


def fused_batches(strategy: str, streams: dict[str, Iterator[MicroBatch]], candidate_num: int,
                  simultaneously_num: int, max_tokens: int | None = None,
                  stopped: set[str] | None = None, pack_len: int | None = None) -> Iterator[list[MicroBatch]]:
    """Yield fused batches (lists of micro-batches, at most one per adapter, in config order).

    At most `candidate_num` adapters are active; when one's stream ends or its name enters
    `stopped` (which may grow while this runs), the next queued adapter in config order takes
    its place. At most `simultaneously_num` active adapters share a batch. `max_tokens` (None:
    no limit) bounds a batch's padded tokens for fast-fit and optimal-fit; `trivial` is
    batching.round_robin exactly and ignores it. `pack_len` (packing on: cutoff_len) makes the
    budget count the packed rows that `fuse(..., pack_len)` will build, rows x longest row.
    """
    if strategy == "trivial":
        return round_robin(streams, candidate_num, simultaneously_num, stopped)
    if strategy not in PICKERS:
        raise ValueError(f"unknown train_strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if candidate_num < 1 or simultaneously_num < 1:
        raise ValueError("candidate_num and simultaneously_num must be >= 1")
    return _fitted(PICKERS[strategy], streams, candidate_num, simultaneously_num, max_tokens, stopped, pack_len)


def _fitted(pick, streams: dict[str, Iterator[MicroBatch]], candidate_num: int, simultaneously_num: int,
            max_tokens: int | None, stopped: set[str] | None,
            pack_len: int | None = None) -> Iterator[list[MicroBatch]]:
    index = {name: i for i, name in enumerate(streams)}
    queued = deque(streams)
    heads: dict[str, MicroBatch] = {}  # active adapter -> its next micro-batch, already drawn
    last_ran: dict[str, int] = {}
    batch_no = 0
    while True:
        # `stopped` is read only after the consumer has trained on the previous batch (here
        # and when drawing the next micro-batches below): that is when the trainer adds to
        # it, live and when replaying for a resume alike.
        for name in [n for n in heads if stopped and n in stopped]:
            del heads[name]
        while queued and len(heads) < candidate_num:
            name = queued.popleft()
            part = None if stopped and name in stopped else next(streams[name], None)
            if part is not None:  # an empty stream is finished before it starts
                heads[name] = part
                last_ran[name] = batch_no  # waiting starts at admission
        if not heads:
            return
        cands = [Candidate.of(part, index[name], last_ran[name], pack_len) for name, part in heads.items()]
        names = sorted((c.name for c in pick(cands, simultaneously_num, max_tokens)), key=index.get)
        yield [heads[name] for name in names]
        batch_no += 1
        for name in names:
            last_ran[name] = batch_no
            part = None if stopped and name in stopped else next(streams[name], None)
            if part is None:  # finished or stopped: its slot goes to the next queued adapter
                del heads[name]
            else:
                heads[name] = part
