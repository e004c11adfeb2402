"""An adapter's own chat template (its config key `chat_template`): a Jinja file read and checked
before the model loads, then put in the tokenizer's place for that adapter's rows, in training,
evaluation, the dry run and generation alike, so that a prompt is rendered as training rendered it.

A template that marks the assistant's text with `{% generation %}...{% endgeneration %}` (TRL's and
axolotl's convention) lets transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)`
tell which tokens to train; data.py then needs no rendering of conversation prefixes, which a
template rendering earlier turns otherwise than the last (Qwen3's `<think>` block) defeats.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

from mlora.errors import UserError

# transformers' own test for a template that supports the assistant mask (apply_chat_template)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def read_chat_template(path: str | Path) -> str:
    """The template text of the Jinja file `path`, compiled as transformers compiles it (its
    `generation` tag included: a plain Jinja environment does not know it), so that a syntax
    error is one line naming the file and the line before anything loads."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    if not text.strip():
        raise UserError(f"{path}: the chat template is empty")
    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as err:
        raise UserError(f"{path}:{err.lineno}: Jinja syntax error ({err.message})") from None
    return text


def with_chat_template(tokenizer, path: str | None):
    """`tokenizer`, or where `path` (an adapter's chat_template) is given a shallow copy of it
    whose chat template is that file's: the vocabulary and the tokenizing backend are shared, and
    everything that renders a chat (apply_chat_template, the unread-keys note) reads the copy's."""
    if path is None:
        return tokenizer
    own = copy.copy(tokenizer)
    own.chat_template = read_chat_template(path)
    return own


def marks_generation(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks the assistant's text with {% generation %}."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and _GENERATION_TAG.search(template) is not None
