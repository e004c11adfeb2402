"""An adapter's own chat_template beyond rendering its rows (test_data, test_config and
test_train test that): the end-of-turn token its rows stop at in generation, the Jinja given
inline, a tokenizer's dict of named templates, the notes it changes, and the file read once."""

from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch
from test_data import CHAT, QWEN3_LIKE, encode

from mlora.chat_template import (
    end_of_turn_ids,
    is_inline,
    marks_generation,
    unmarked_end_of_turn,
    with_chat_template,
)
from mlora.config import AdapterConfig
from mlora.data import IGNORE_INDEX
from mlora.errors import UserError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# QWEN3_LIKE with only the answer's text marked: its <|im_end|> falls outside the block
CONTENT_ONLY = QWEN3_LIKE.replace("<|im_end|>{% endgeneration %}", "{% endgeneration %}<|im_end|>")


def with_template(tokenizer, template):
    own = copy.copy(tokenizer)
    own.chat_template = template
    return own


def after_answer(tokenizer, messages) -> int:
    """The reference: the first token transformers' own tokenized rendering puts after the last
    answer's text (apply_chat_template(tokenize=True), the answer's tokens located in it)."""
    ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    answer = tokenizer(messages[-1]["content"], add_special_tokens=False).input_ids
    at = max(i for i in range(len(ids) - len(answer) + 1) if ids[i:i + len(answer)] == answer)
    return ids[at + len(answer)]


def test_the_end_of_turn_token_is_the_special_token_the_template_puts_after_an_answer(tokenizer):
    """ChatML on a base whose EOS is </s>: <|im_end|>, the token transformers' rendering puts
    after the answer; a template that ends turns with EOS: EOS; one that needs a system turn is
    rendered with one; one that ends turns with text (alpaca-like) or renders nothing
    answerable: none (no single token ends its turns)."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    probe = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Sure."}]
    for template in (CHATML, QWEN3_LIKE, CONTENT_ONLY):
        own = with_template(tokenizer, template)
        assert end_of_turn_ids(own) == {after_answer(own, probe)} == {im_end}
    eos_ended = with_template(tokenizer, "{% for m in messages %}{{ m['content'] }} </s>{% endfor %}")
    assert end_of_turn_ids(eos_ended) == {tokenizer.eos_token_id}
    needs_system = with_template(tokenizer, "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system "
                                            "first') }}{% endif %}" + CHATML)
    assert end_of_turn_ids(needs_system) == {im_end}
    for template in ("{% for m in messages %}{{ m['content'] }}\n\n### Instruction:\n{% endfor %}",
                     "{{ raise_exception('never') }}", "{% for m in messages %}x{% endfor %}"):
        assert end_of_turn_ids(with_template(tokenizer, template)) == set()


def test_a_dict_of_named_templates_renders_through_its_default_as_transformers_does(tokenizer):
    """tokenizer_config.json may hold {"default": ..., "tool_use": ...}: transformers renders
    through "default" (no tools given), so its {% generation %} tags choose the trained tokens,
    those transformers' assistant mask marks; the tool_use one's tags do not."""
    untagged = re.sub(r"\{% (end)?generation %\}", "", QWEN3_LIKE)
    named = with_template(tokenizer, {"default": QWEN3_LIKE, "tool_use": untagged})
    assert marks_generation(named)
    reference = named.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(reference["input_ids"]), reference["assistant_masks"]
    example = encode({"messages": CHAT}, named)
    assert example.input_ids == ids + [tokenizer.eos_token_id]
    assert example.labels == [i if m else IGNORE_INDEX for i, m in zip(ids, mask)] + [tokenizer.eos_token_id]
    assert not marks_generation(with_template(tokenizer, {"default": untagged, "tool_use": QWEN3_LIKE}))
    assert not marks_generation(with_template(tokenizer, {"tool_use": QWEN3_LIKE}))  # (transformers refuses it)


def test_an_end_of_turn_outside_the_generation_block_is_found(tokenizer):
    """A template whose {% generation %} block holds the answer's text but not the <|im_end|>
    after it (transformers' mask leaves it out: checked) never trains the end of the turn."""
    own = with_template(tokenizer, CONTENT_ONLY)
    out = own.apply_chat_template(CHAT[:3], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert im_end in out["input_ids"] and marked and im_end not in marked
    assert unmarked_end_of_turn(own) == "<|im_end|>"
    for marked in (QWEN3_LIKE, CHATML):  # (the end inside the block; no block at all)
        assert unmarked_end_of_turn(with_template(tokenizer, marked)) is None


def test_inline_jinja_renders_as_the_same_text_in_a_file(tokenizer, tmp_path):
    """chat_template holding the Jinja itself (it holds {{ or {%) renders rows as the file of the
    same text does; errors name it as inline and its adapter."""
    path = tmp_path / "qwen3.jinja"
    path.write_text(QWEN3_LIKE)
    assert is_inline(QWEN3_LIKE) and not is_inline(str(path))
    inline, from_file = with_chat_template(tokenizer, QWEN3_LIKE, ["a"]), with_chat_template(tokenizer, str(path))
    for row in ({"messages": CHAT}, {"prompt": CHAT[:2], "completion": CHAT[2:]}):
        assert encode(row, inline) == encode(row, from_file)
    with pytest.raises(UserError, match=r"^the inline chat template of adapter 'a' rejected the messages"):
        encode({"messages": CHAT}, with_chat_template(tokenizer, "{{ raise_exception('no') }}", ["a"]))


class _AlwaysSays:
    """A model whose next token is always `token`, for every row (greedy_generate's interface)."""

    args = SimpleNamespace(rope=SimpleNamespace(type="default"))

    def __init__(self, token: int, vocab: int):
        self.token, self.vocab = token, vocab

    def eval(self):
        return self

    def __call__(self, ids, mask, cache=None, last_only=False):
        logits = torch.zeros(ids.shape[0], 1, self.vocab)  # [B, 1, V]
        logits[..., self.token] = 1.0
        return logits


def test_an_adapters_rows_stop_at_its_templates_end_of_turn(tokenizer, tmp_path):
    """An adapter whose chat_template ends turns with <|im_end|> on a base whose EOS is </s>:
    its rows stop there, as at EOS; the bare base's rows and an adapter's without its own
    template run on (greedy_generate, as `mlora generate` and the demo run it)."""
    from mlora.generate import adapter_stop_ids, greedy_generate

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    (tmp_path / "chatml.jinja").write_text(CHATML)
    cfg = SimpleNamespace(lora=[AdapterConfig("a", "d", chat_template=str(tmp_path / "chatml.jinja")),
                                AdapterConfig("b", "d")])
    session = SimpleNamespace(cfg=cfg, base_dir=tmp_path, tokenizer=tokenizer, pad_id=tokenizer.eos_token_id,
                              device=torch.device("cpu"), model=_AlwaysSays(im_end, len(tokenizer)),
                              layout=SimpleNamespace(rows=[]))
    assert adapter_stop_ids(session) == {"a": {im_end}}
    out = greedy_generate(session, [("a", [5, 6]), (None, [5, 6]), ("b", [5, 6])], max_new_tokens=3)
    assert out == [[], [im_end] * 3, [im_end] * 3]
    # (a template ending turns with EOS adds nothing: EOS stops every row already)
    (tmp_path / "chatml.jinja").write_text(CHATML.replace("<|im_end|>", "</s>"))
    assert adapter_stop_ids(session) == {}


def test_the_unread_keys_note_is_per_chat_template(tokenizer, tmp_path, capsys):
    """A data file read by two adapters whose templates read other message keys: each adapter's
    note says what its own template leaves unread, whichever reads the file first; a note the
    same for both is said once."""
    from mlora.session import encode_file

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "one two", "name": "x"},
                                             {"role": "assistant", "content": "three"}]}) + "\n")
    names = tmp_path / "names.jinja"
    names.write_text(CHATML.replace("{{ m['role'] }}", "{{ m['role'] }}{{ m.get('name', '') }}"))
    reads_name, plain = with_chat_template(tokenizer, str(names), ["a"]), with_chat_template(tokenizer, None)
    noted = set()
    for own in (reads_name, plain, plain):
        encode_file(str(data), own, "alpaca", 64, False, noted)
    assert capsys.readouterr().err.splitlines() == [
        f"mlora: note: {data}: keys not read: 'name' in messages (1 row); chat messages read role, content and the "
        f"keys the chat template names"]
    data.write_text(json.dumps({"messages": CHAT[:2], "id": 3}) + "\n")
    noted = set()
    for own in (reads_name, plain):
        encode_file(str(data), own, "alpaca", 64, False, noted)
    assert capsys.readouterr().err.count("keys not read: 'id'") == 1


def session_config(tmp_path, template: str, **adapter) -> str:
    """A config of one adapter `a` whose chat_template is the file chat.jinja holding `template`."""
    (tmp_path / "chat.jinja").write_text(template)
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"cutoff_len": 128, "output_dir": str(tmp_path / "out"), "lora": [
        {"name": "a", "data": "chat.jsonl", "chat_template": "chat.jinja", **adapter}]}))
    return str(cfg)


def test_training_notes_an_end_of_turn_the_generation_block_leaves_out(tiny_llama, tmp_path, capsys):
    """An adapter's template marks the answer's text but not the <|im_end|> ending it: training
    says so once at start, naming the adapter, its template and the fix; not with the end inside
    the block, nor where train_on_inputs trains every token, nor in generate."""
    from mlora.session import open_session

    cfg = session_config(tmp_path, CONTENT_ONLY)
    open_session(tiny_llama, cfg, device="cpu", load_base=False)
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"mlora: note: the chat template {tmp_path / 'chat.jinja'} of adapter 'a' marks the answers with "
        "{% generation %} but not the <|im_end|> that ends them, so the adapter never learns to end its turn; put "
        "<|im_end|> inside the block (before {% endgeneration %})")
    for cfg, reads in ((session_config(tmp_path, CONTENT_ONLY, train_on_inputs=True), "train"),
                       (session_config(tmp_path, CONTENT_ONLY), "generate"),
                       (session_config(tmp_path, QWEN3_LIKE), "train")):
        open_session(tiny_llama, cfg, device="cpu", load_base=False, reads=reads)
        assert "never learns" not in capsys.readouterr().err


def test_the_template_file_is_read_and_compiled_once(tiny_llama, tmp_path, monkeypatch):
    """The config's check and the tokenizer's copy read one file once (unchanged between them);
    a file changed since is read again."""
    import mlora.chat_template as chat_template
    from mlora.session import open_session

    compiled = []
    compile_ = chat_template._compile
    monkeypatch.setattr(chat_template, "_compile", lambda text: compiled.append(text) or compile_(text))
    cfg = session_config(tmp_path, QWEN3_LIKE + "{# once #}")
    open_session(tiny_llama, cfg, device="cpu", load_base=False)
    assert len(compiled) == 1
    (tmp_path / "chat.jinja").write_text(QWEN3_LIKE + "{# twice #}")
    open_session(tiny_llama, cfg, device="cpu", load_base=False)
    assert len(compiled) == 2 and compiled[-1].endswith("{# twice #}")
