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

    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    if not text.strip():
        raise UserError(f"{path}: the chat template is empty")
    try:
        _compile(text)
    except TemplateSyntaxError as err:
        raise UserError(f"{path}:{err.lineno}: Jinja syntax error ({err.message})") from None
    return text


def _compile(text: str) -> None:
    """Compile `text` as transformers compiles a chat template (TemplateSyntaxError where it is
    not Jinja). transformers' compiler is a private helper: where a release renames it, changes
    its arguments or refuses the installed jinja2 in it, a sandboxed environment with the same
    tag, extension and settings compiles the template instead, so the check never turns into a
    traceback (rendering goes through apply_chat_template, transformers' public API, anyway)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        pass
    else:
        try:
            _compile_jinja_template(text)
            return
        except (ImportError, TypeError):
            pass
    _fallback_environment().from_string(text)


def _fallback_environment():
    """A Jinja environment that compiles chat templates as transformers' does: sandboxed, blocks
    trimmed, loop controls, and `{% generation %}...{% endgeneration %}` parsed (rendering its body)."""
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                         extensions=[GenerationTag, jinja2.ext.loopcontrols])


def with_chat_template(tokenizer, path: str | None):
    """`tokenizer`, or where `path` (an adapter's chat_template) is given a shallow copy of it
    whose chat template is that file's: the vocabulary and the tokenizing backend are shared, and
    everything that renders a chat (apply_chat_template, the unread-keys note) reads the copy's."""
    if path is None:
        return tokenizer
    own = copy.copy(tokenizer)
    own.chat_template = read_chat_template(path)
    own.mlora_chat_template_file = str(path)  # (template_named: errors say whose template it is)
    return own


def template_named(tokenizer) -> str:
    """The tokenizer's chat template as an error names it: an adapter's own by its file (adapters
    that share a data file render its rows through different templates), else the tokenizer's."""
    path = getattr(tokenizer, "mlora_chat_template_file", None)
    return "the chat template" if path is None else f"the chat template {path}"


def marks_generation(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks the assistant's text with {% generation %}."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and _GENERATION_TAG.search(template) is not None
