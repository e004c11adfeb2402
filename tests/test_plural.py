"""Counts in messages: "1 step", never "1 steps" (plural.counted, and the messages that use it)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from mlora.errors import UserError
from mlora.plural import counted


@pytest.mark.parametrize("n,noun,said", [
    (1, "step", "1 step"), (0, "step", "0 steps"), (2, "step", "2 steps"), (1, "batch", "1 batch"),
    (3, "batch", "3 batches"), (2, "micro-batch", "2 micro-batches"), (2, "entry", "2 entries"),
    (2, "stretch", "2 stretches"), (2, "CUDA device", "2 CUDA devices"), (2, "byte", "2 bytes"),
    (2, "assistant turn", "2 assistant turns"), (2, "day", "2 days"),
])
def test_a_count_and_its_noun(n, noun, said):
    assert counted(n, noun) == said


def test_notes_count_one_in_the_singular(capsys):
    """A note of one row, one step, one line said "1 of 5 rows ... have", "(eval_step 1, 1 steps)",
    "1 of 1 lines ...; they run on"."""
    from mlora.batching import unlearnable_rows_note
    from mlora.cli import note_past_positions
    from mlora.early_stopping import never_stops_note

    cfg = SimpleNamespace(name="a", data="d.jsonl")
    assert unlearnable_rows_note(cfg, 1, 5, 64) == (
        "mlora: note: adapter 'a': 1 of 5 rows of d.jsonl has no token to learn within cutoff_len 64 (the answer "
        "starts past it, or there is none); it is trained on but teaches nothing: raise cutoff_len or shorten the "
        "prompts")
    assert "2 of 5 rows of d.jsonl have no token" in unlearnable_rows_note(cfg, 2, 5, 64)
    note = never_stops_note(SimpleNamespace(name="a", early_stopping_patience=2, eval_step=1), 1)
    assert "(eval_step 1, 1 step) 0 come after its first" in note
    note = never_stops_note(SimpleNamespace(name="a", early_stopping_patience=2, eval_step=1), 3)
    assert "(eval_step 1, 3 steps) 1 comes after its first" in note
    note_past_positions([("a", "p", [1] * 250, None)], 7, 256)
    err = capsys.readouterr().err
    assert "note: 1 of 1 line may run past" in err and "is 250 tokens); it runs on, but" in err


def test_a_rank_outside_a_world_of_one(monkeypatch):
    from mlora.pipeline.run import resolve_place

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace(rank=1, world_size=None, balance=[4], device=None)
    with pytest.raises(UserError) as err:
        resolve_place(args)
    assert str(err.value) == "--rank 1 is outside the world of 1 rank (0..0)"
    with pytest.raises(UserError, match=r"--world_size 2 but --balance has 1 entry$"):
        resolve_place(argparse.Namespace(rank=0, world_size=2, balance=[4], device=None))
