"""Greedy generation for a fused batch: every row may use a different adapter (or none).

Greedy decoding with a KV cache (models.llama.KVCache): the left-padded prompts run once,
then one token per row and step, every row through its own adapter. Serves `mlora generate`
and the demo; no sampling, no beam search.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mlora.data import Example
from mlora.lora import AdapterRows
from mlora.models.llama import KVCache


@torch.no_grad()
def greedy_generate(session, prompts: Sequence[tuple[str | None, list[int]]],
                    max_new_tokens: int = 32) -> list[list[int]]:
    """prompts: (adapter name or None for the bare base, prompt token ids).

    Rows are left-padded so every row's next token is predicted at the last position; rows of
    one adapter are kept contiguous (the fused-batch layout) and the results are returned in
    the order given. A row stops at the tokenizer's EOS.
    """
    model, tok = session.model, session.tokenizer
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: (prompts[i][0] is not None, str(prompts[i][0])))
    names = [prompts[i][0] for i in order]
    seqs = [list(prompts[i][1]) for i in order]
    new_tokens: list[list[int]] = [[] for _ in order]
    done = [False] * len(order)
    rows, start = [], 0
    for i, name in enumerate(names + [object()]):  # sentinel closes the last run
        if i == len(names) or (i > start and names[i] != names[start]):
            if names[start] is not None:
                rows.append(AdapterRows(names[start], start, i))
            start = i
    try:
        session.layout.rows = rows
        # The prompts, left-padded, fill the cache; then each step runs one new token per row.
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), session.pad_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros((len(seqs), length), dtype=torch.bool)  # [B, L], on the host (the model uploads it)
        for r, s in enumerate(seqs):
            ids[r, length - len(s):] = torch.tensor(s)
            mask[r, length - len(s):] = True
        cache = KVCache()
        logits = model(ids.to(session.device), mask, cache=cache)  # [B, L, V]
        for step in range(max_new_tokens):
            next_ids = logits[:, -1].argmax(dim=-1).tolist()  # [B]
            for r, token in enumerate(next_ids):
                if done[r]:
                    continue
                if token == tok.eos_token_id:
                    done[r] = True
                    continue
                seqs[r].append(token)
                new_tokens[r].append(token)
            if all(done) or step == max_new_tokens - 1:
                break
            column = [session.pad_id if done[r] else seqs[r][-1] for r in range(len(seqs))]
            mask = torch.cat([mask, torch.ones(len(seqs), 1, dtype=torch.bool)], dim=1)  # [B, T + 1]
            logits = model(torch.tensor(column)[:, None].to(session.device), mask, cache=cache)  # [B, 1, V]
    finally:
        session.layout.rows = []
    result: list[list[int]] = [[] for _ in prompts]
    for position, i in enumerate(order):
        result[i] = new_tokens[position]
    return result


def prompt_ids(example: Example) -> list[int]:
    """The prompt part of an encoded example: the tokens before its first label."""
    for i, label in enumerate(example.labels):
        if i > 0 and label != -100:
            return example.input_ids[:i]
    return list(example.input_ids)
