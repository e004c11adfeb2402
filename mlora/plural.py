"""A count and its noun in words: "1 step", "3 steps", "2 batches" (messages said "1 steps")."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """`n` and `noun`, in the plural unless `n` is 1 (English counts 0 in the plural): "1 row",
    "0 rows"."""
    return f"{n} {noun if n == 1 else plural(noun)}"


def plural(noun: str) -> str:
    """The plural of the nouns mlora's messages count (regular ones): "batch" -> "batches",
    "entry" -> "entries", "step" -> "steps"."""
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u"):
        return noun[:-1] + "ies"
    return noun + "s"
