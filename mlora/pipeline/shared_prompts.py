"""`mlora generate --pipeline`'s prompts: rank 0 alone reads --prompt and --prompt_file, and
sends them to the other ranks. Under torchrun every rank gets the same arguments, and a
`--prompt_file <(...)` pipe (or a file on rank 0's host only) read by every rank would be split
between them, or read as empty: so the other ranks read neither flag. Each rank still renders
the prompts through its own templates and tokenizer, and the ranks' requests are compared at
start-up as before."""

from __future__ import annotations

import argparse
import pickle
import sys

from mlora.data import Rows, load_rows


def read_on_rank_0(args) -> dict:
    """What rank 0 sends: its --prompt values, and its --prompt_file's name and rows. The rows
    travel pickled, which every value a file gives survives as it is: msgpack refuses an integer
    past 64 bits, and JSON text turned a Parquet binary or date value into its repr, a prompt
    the ranks completed where one process refuses the row. Every rank, rank 0 too, takes them
    back from the same bytes, so all render (or refuse) the same. (The ranks of one run trust
    each other: they exchange activations and adapters already.)"""
    rows = load_rows(args.prompt_file) if args.prompt_file else Rows()
    return {"prompt": list(args.prompt), "prompt_file": args.prompt_file,
            "rows": pickle.dumps(list(rows)), "lines": rows.lines,
            "nulls": [[i, sorted(keys)] for i, keys in rows.nulls.items()]}


def share(transport, mine: dict | None, args) -> tuple[argparse.Namespace, Rows]:
    """Rank 0's prompts on every rank (a collective; `mine`: read_on_rank_0's on rank 0, None
    elsewhere): `args` with rank 0's --prompt and --prompt_file, and that file's rows."""
    sent = transport.exchange(mine)[0]
    if mine is None:
        note_ignored(transport.rank, args, sent)
    asked = argparse.Namespace(**{**vars(args), "prompt": sent["prompt"], "prompt_file": sent["prompt_file"]})
    return asked, Rows(pickle.loads(sent["rows"]), sent["lines"], {i: set(keys) for i, keys in sent["nulls"]})


def note_ignored(rank: int, args, sent: dict) -> None:
    """A rank other than 0 started with other --prompt or --prompt_file values than rank 0's:
    they are not read (rank 0's are completed), which was silent; said once on its stderr."""
    differ = [flag for flag, given, used in (("--prompt", list(args.prompt), sent["prompt"]),
                                             ("--prompt_file", args.prompt_file, sent["prompt_file"]))
              if given and given != used]
    if differ:
        print(f"mlora: note: rank {rank} was given other {' and '.join(differ)} values than rank 0; every rank "
              f"completes rank 0's (rank 0 alone reads them)", file=sys.stderr)
