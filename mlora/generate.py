"""Generation (greedy or sampled) for a fused batch: every row may use a different adapter (or none).

Decoding with a KV cache (models.llama.KVCache): the left-padded prompts run once, then one
token per row and step, every row through its own adapter; greedy, or sampled with a
temperature, top-k and top-p (Sampling), either after an optional repetition penalty. Serves
`mlora generate` and the demo; no beam search.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from mlora.data import Example, pad_rows
from mlora.errors import UserError
from mlora.lora import AdapterRows
from mlora.models.llama import KVCache


@dataclass(frozen=True)
class Sampling:
    """Draw each next token instead of taking the most likely one: from the softmax of the
    logits / temperature, cut to the top_k most likely tokens (0: all), then to the smallest
    set whose probability (among those left) reaches top_p (nucleus sampling): transformers'
    warpers in its order. Row i of a request draws from its own generator, seeded from
    (seed, i), so its tokens do not depend on the rows generated beside it."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution [V] (float64) a token is drawn from, for logits [V] (on the CPU)."""
        # float64, shifted by the maximum: a tiny temperature must not overflow to inf (NaN probabilities).
        probs = torch.softmax((logits.double() - logits.max()) / self.temperature, dim=-1)  # [V]
        if 0 < self.top_k < probs.numel():
            kth = probs.topk(self.top_k).values[-1]
            probs = torch.where(probs < kth, 0.0, probs)  # ties with the k-th stay, as in transformers
            probs = probs / probs.sum()
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each
            sorted_probs[before >= self.top_p] = 0.0  # the most likely token always stays
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            probs = probs / probs.sum()
        return probs

    def pick(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        """One token id from logits [V] (fp32, on the CPU)."""
        return int(torch.multinomial(self.probabilities(logits), 1, generator=generator))


class NonFiniteScores(UserError):
    """A row's next-token logits are not finite (Decoding.check_finite). request_id: its number
    in the whole request; name: its adapter (None: the bare base); token: the new token it was
    to pick (from 1). `where` replaces "request N" in the message by what a user knows it as."""

    def __init__(self, request_id: int, name: str | None, token: int, where: str | None = None):
        self.request_id, self.name, self.token = request_id, name, token
        who = f"adapter {name!r}" if name is not None else "the bare base"
        super().__init__(f"the model's next-token scores are not finite (NaN or inf) for {who} on "
                         f"{where or f'request {request_id + 1}'} at new token {token}: its numbers overflowed "
                         f"(with --dtype fp16, try bf16 or fp32)")


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [B, V] with every token a row has seen (seen [B, V] bool: its prompt, pads not
    included, and what it generated) made less likely: a positive logit divided by `penalty`,
    a negative one multiplied (CTRL's rule, transformers' RepetitionPenaltyLogitsProcessor)."""
    logits = logits.float()
    penalized = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    # A penalty far below 1 (which makes seen tokens more likely) overflows a positive logit to
    # inf, and softmax then gives NaN: sampling could not draw. Kept at fp32's largest instead,
    # the choice stays what the overflow meant (those tokens first; greedy picks as before).
    top = torch.finfo(torch.float32).max
    return penalized.clamp(-top, top)


def non_finite_rows(last: torch.Tensor) -> torch.Tensor:
    """Which rows of the logits last [B, V] are not scores to pick by: a NaN or +inf, or none
    above -inf (the model overflowed: an fp16 base, most often). [B] bool, on last's device."""
    return torch.isnan(last).any(-1) | torch.isposinf(last).any(-1) | torch.isneginf(last).all(-1)


def row_seed(seed: int, row: int) -> int:
    """A generator seed for row `row` of a request: distinct rows and seeds do not share draws
    (seed + row would: seed 4's row 0 would draw as seed 3's row 1; and so would Python's hash
    of the pair, which reduces an int modulo 2**61 - 1: --seed takes 0..2**63-1, and seed 0
    drew as seed 2**61 - 1). A digest of both as 8-byte integers: the same in every run and
    on every platform."""
    digest = hashlib.blake2b(seed.to_bytes(8, "little") + row.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def stop_token_ids(base_dir: str | Path, tokenizer) -> set[int]:
    """The tokens that end a row: the tokenizer's EOS (what training appends to every answer)
    and the EOS ids of the model's generation_config.json (else its config.json, or the
    text_config an image-text checkpoint's config.json nests them in), as transformers'
    generate stops: an instruct model often ends its turns with another token (Llama 3's
    <|eot_id|>, Gemma's <end_of_turn>)."""
    ids = {tokenizer.eos_token_id}
    for name in ("generation_config.json", "config.json"):
        path = Path(base_dir) / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
            eos = raw.get("eos_token_id")
            if eos is None and isinstance(raw.get("text_config"), dict):
                eos = raw["text_config"].get("eos_token_id")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
            raise UserError(f"{path} is not a JSON object") from None
        if eos is None:
            continue
        listed = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in listed):
            raise UserError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
        return ids | set(listed)
    return ids


def adapter_stop_ids(session, names: Sequence[str] | None = None,
                     base: set[int] | None = None) -> dict[str, set[int]]:
    """The tokens that also end the rows of each adapter with its own chat_template (of those
    in `names`; None: every one): the special token that template ends an assistant turn with
    (chat_template.end_of_turn_ids), where it is no stop token of the base's already (ChatML's
    <|im_end|> on a base whose EOS is </s>): the adapter learnt to end its answers with it.
    base: the base's stop tokens, where the caller has read them already (stop_token_ids)."""
    from mlora.chat_template import end_of_turn_ids, with_chat_template

    if base is None:
        base = stop_token_ids(session.base_dir, session.tokenizer)
    stops = {}
    for a in session.cfg.lora:
        if a.chat_template is not None and (names is None or a.name in names):
            own = end_of_turn_ids(with_chat_template(session.tokenizer, a.chat_template, (a.name,))) - base
            if own:
                stops[a.name] = own
    return stops


def base_sampling(base_dir: str | Path) -> dict[str, float | int] | None:
    """When the base's generation_config.json samples by default (do_sample true), what
    transformers' generate would sample with, as mlora generate's flags take them:
    {"temperature": T, "top_p": P, "top_k": K, "repetition_penalty": R}, with transformers'
    defaults for what the file leaves unset (1.0, 1.0, 50, 1.0) and without the values that
    change nothing (top_p 1, top_k 0, repetition_penalty 1). Else None; so too for a file that
    is missing or unreadable, or values the flags cannot take (this only feeds a note)."""
    path = Path(base_dir) / "generation_config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(raw, dict) or raw.get("do_sample") is not True:
        return None
    defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
    settings = {key: default if raw.get(key) is None else raw[key] for key, default in defaults.items()}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in settings.values()):
        return None
    if not (settings["temperature"] > 0 and 0 < settings["top_p"] <= 1 and settings["top_k"] >= 0
            and settings["repetition_penalty"] > 0):
        return None
    neutral = {"top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    return {key: value for key, value in settings.items() if key not in neutral or value != neutral[key]}


class Decoding:
    """The bookkeeping of one generation request, apart from running the model: the rows (in
    the fused-batch order: rows of one adapter contiguous, the bare base's first), their
    left-padded prompts and mask, each row's tokens, which rows are done, and the choice of each
    next token. One process (greedy_generate) and a pipeline (mlora.pipeline.run, where every
    rank keeps one and only the last stage picks) drive the same code.

    prompts: (adapter name or None for the bare base, prompt token ids). stop: the token ids
    that end a row (stop_token_ids). adapter_stop: those that also end the rows of one adapter
    (adapter_stop_ids: its chat template's end-of-turn token). sampling: draw tokens (Sampling)
    instead of taking the most likely one. repetition_penalty: above 1, the tokens a row has seen are made less likely
    first (penalize_repetition). switch_at: LongRoPE's original_max_position_embeddings (None
    for other RoPE): a row growing past it makes the whole batch run again (`advance`).
    request_ids: each prompt's number in the whole request when this is one batch of it (default
    0, 1, ...): a sampled row draws from the generator of its number, so the batch it runs in
    does not change its tokens."""

    def __init__(self, prompts: Sequence[tuple[str | None, list[int]]], pad_id: int, stop: set[int],
                 sampling: Sampling | None = None, repetition_penalty: float = 1.0,
                 switch_at: int | None = None, request_ids: Sequence[int] | None = None,
                 adapter_stop: Mapping[str, set[int]] | None = None):
        self.order = sorted(range(len(prompts)), key=lambda i: (prompts[i][0] is not None, str(prompts[i][0])))
        self.num_prompts = len(prompts)
        names = [prompts[i][0] for i in self.order]
        self.names = names  # each row's adapter (None: the bare base), for messages
        self.seqs = [list(prompts[i][1]) for i in self.order]
        self.new_tokens: list[list[int]] = [[] for _ in self.order]
        self.done = [False] * len(self.order)
        self.pad_id = pad_id
        adapter_stop = adapter_stop or {}
        self.row_stop = [stop | adapter_stop.get(name, set()) for name in names]  # each row's stop tokens
        self.sampling, self.repetition_penalty, self.switch_at = sampling, repetition_penalty, switch_at
        self.rows, start = [], 0
        for i, name in enumerate(names + [object()]):  # sentinel closes the last run
            if i == len(names) or (i > start and names[i] != names[start]):
                if names[start] is not None:
                    self.rows.append(AdapterRows(names[start], start, i))
                start = i
        # The prompts, left-padded, fill the cache; then each step runs one new token per row.
        # mask [B, L] stays on the host (the model checks it there and uploads it)
        self.ids, _, self.mask = pad_rows([Example(s, s) for s in self.seqs], ["left"] * len(self.seqs),
                                          max(len(s) for s in self.seqs), pad_id)  # [B, L]
        self.fed = self.ids  # [B, T]: every token given so far, pads included
        request_ids = range(len(prompts)) if request_ids is None else request_ids
        self.request_ids = [request_ids[i] for i in self.order]  # each row's number in the whole request
        self.generators = None if sampling is None else [
            torch.Generator().manual_seed(row_seed(sampling.seed, request_ids[i])) for i in self.order]
        self.seen = None  # [B, V] with a repetition penalty: the tokens each row has seen

    def pick(self, last: torch.Tensor) -> list[int]:
        """The next token of every row (done ones too) from the logits [B, V] of its last
        position: greedy or sampled, after the repetition penalty. Non-finite logits of a row
        not done are a UserError (non_finite_rows, check_finite)."""
        bad = non_finite_rows(last)  # [B], on last's device: read with the picks, not on its own
        if self.repetition_penalty != 1.0:
            if self.seen is None:  # the tokens of each row's prompt (its pads are not)
                self.seen = torch.zeros(last.shape[0], last.shape[-1], dtype=torch.bool)
                for r, seq in enumerate(self.seqs):
                    self.seen[r, seq] = True
                self.seen = self.seen.to(last.device)
            last = penalize_repetition(last, self.seen, self.repetition_penalty)
        if self.sampling is None:
            # one copy to the host per token, as before the check: each copy waits for the device
            next_ids, bad_rows = torch.stack([last.argmax(dim=-1), bad.long()]).tolist()  # [2, B]
            self.check_finite(bad_rows)
        else:
            last = last.float().cpu()  # [B, V]
            self.check_finite(bad.tolist())  # (after last's copy: nothing left on the device to wait for)
            next_ids = [self.sampling.pick(last[r], self.generators[r]) for r in range(len(self.seqs))]
        if self.seen is not None:
            self.seen[torch.arange(len(next_ids)), torch.tensor(next_ids)] = True
        return next_ids

    def check_finite(self, bad_rows: Sequence[bool]) -> None:
        """NonFiniteScores (a UserError) for the first row not done whose scores are not finite
        (bad_rows: non_finite_rows's, on the host). Its argmax would be a token picked by no
        score (the first NaN's), printed as if the adapter had said it, and a sampled row
        could not draw at all."""
        row = next((r for r, bad in enumerate(bad_rows) if bad and not self.done[r]), None)
        if row is not None:
            raise NonFiniteScores(self.request_ids[row], self.names[row], len(self.new_tokens[row]) + 1)

    def record(self, next_ids: Sequence[int]) -> None:
        """Each row not done takes its token, or stops at a stop token."""
        for r, token in enumerate(next_ids):
            if self.done[r]:
                continue
            if token in self.row_stop[r]:
                self.done[r] = True
                continue
            self.seqs[r].append(token)
            self.new_tokens[r].append(token)

    def finished(self, step: int, max_new_tokens: int) -> bool:
        return all(self.done) or step == max_new_tokens - 1

    def advance(self) -> tuple[torch.Tensor, bool]:
        """The next column [B, 1] to run (a done row's is a pad), with the mask and `fed` grown
        by it, and whether the whole batch must run again from a fresh cache instead (`fed`):
        LongRoPE turns a sequence longer than original_max_position_embeddings with other
        factors, all of its positions, so when a row grows past that length its cached keys are
        stale (as transformers' Phi-3 drops its cache there)."""
        column = torch.tensor([self.pad_id if self.done[r] else self.seqs[r][-1]
                               for r in range(len(self.seqs))])[:, None]
        # (a stopped row crossing it changes nothing that is kept)
        grows_past = self.switch_at is not None and bool(
            ((self.mask.sum(-1) == self.switch_at) & ~torch.tensor(self.done)).any())
        self.mask = torch.cat([self.mask, torch.ones(len(self.seqs), 1, dtype=torch.bool)], dim=1)  # [B, T + 1]
        self.fed = torch.cat([self.fed, column], dim=1)  # [B, T + 1]
        return column, grows_past

    def result(self) -> list[list[int]]:
        """The new tokens of each prompt, in the order given."""
        result: list[list[int]] = [[] for _ in range(self.num_prompts)]
        for position, i in enumerate(self.order):
            result[i] = self.new_tokens[position]
        return result


def longrope_switch(model_args) -> int | None:
    """Where LongRoPE switches factors (Decoding's switch_at), None for other RoPE."""
    rope = model_args.rope
    return rope.original_max_position_embeddings if rope.type == "longrope" else None


@torch.no_grad()
def greedy_generate(session, prompts: Sequence[tuple[str | None, list[int]]],
                    max_new_tokens: int = 32, sampling: Sampling | None = None,
                    repetition_penalty: float = 1.0, request_ids: Sequence[int] | None = None,
                    adapter_stop: Mapping[str, set[int]] | None = None) -> list[list[int]]:
    """prompts: (adapter name or None for the bare base, prompt token ids).

    Rows are left-padded so every row's next token is predicted at the last position; rows of
    one adapter are kept contiguous (the fused-batch layout) and the results are returned in
    the order given. A row stops at an EOS token (stop_token_ids), an adapter's row also at its
    chat template's end of turn (adapter_stop: adapter_stop_ids's, worked out here when None).
    sampling: draw tokens (Sampling) instead of taking the most likely one. repetition_penalty: above 1, the tokens
    a row has seen are made less likely first (penalize_repetition). request_ids: the prompts'
    numbers in a larger request this batch is part of (Decoding). The bookkeeping is
    Decoding's, shared with `mlora generate --pipeline`.
    """
    model = session.model
    model.eval()
    stop = stop_token_ids(session.base_dir, session.tokenizer)
    if adapter_stop is None:
        adapter_stop = adapter_stop_ids(session, {name for name, _ in prompts if name is not None}, stop)
    state = Decoding(prompts, session.pad_id, stop, sampling, repetition_penalty, longrope_switch(model.args),
                     request_ids, adapter_stop)
    try:
        session.layout.rows = state.rows
        cache = KVCache()
        logits = model(state.ids.to(session.device), state.mask, cache=cache, last_only=True)  # [B, 1, V]
        for step in range(max_new_tokens):
            state.record(state.pick(logits[:, -1]))
            if state.finished(step, max_new_tokens):
                break
            column, rerun = state.advance()
            if rerun:
                cache = KVCache()
                logits = model(state.fed.to(session.device), state.mask, cache=cache, last_only=True)  # [B, 1, V]
            else:
                logits = model(column.to(session.device), state.mask, cache=cache)  # [B, 1, V]
    finally:
        session.layout.rows = []
    return state.result()


def prompt_ids(example: Example) -> list[int]:
    """The prompt part of an encoded example: the tokens before its first label."""
    for i, label in enumerate(example.labels):
        if i > 0 and label != -100:
            return example.input_ids[:i]
    return list(example.input_ids)
