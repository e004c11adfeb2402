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
from typing import Sequence

from mlora.errors import UserError

# transformers' own test for a template that supports the assistant mask (apply_chat_template)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def is_inline(value: str) -> bool:
    """Whether an adapter's `chat_template` holds the Jinja text itself (as tokenizer_config.json's
    does) rather than a file's path: text holding `{{` or `{%`. A template must hold one to render
    any message at all, and a path seldom does; the config refuses a value that is both (a file
    whose name holds one), so the rule never picks the wrong one without a word."""
    return "{{" in value or "{%" in value


def read_chat_template(path: str | Path) -> str:
    """The template text of the Jinja file `path`, compiled as transformers compiles it (its
    `generation` tag included: a plain Jinja environment does not know it), so that a syntax
    error is one line naming the file and the line before anything loads. A file read already
    and unchanged since (its size and modification time) is not read and compiled again: the
    config checks it, then every command puts it in the tokenizer's place."""
    try:
        stat = Path(path).stat()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _READ:
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
        except OSError as err:
            raise UserError(f"{path}: cannot read ({err.strerror})") from None
        _READ[key] = _checked(text, str(path))
    return _READ[key]


_READ: dict[tuple[str, int, int], str] = {}  # (path, mtime, size) -> its text, checked


def inline_chat_template(text: str) -> str:
    """`text`, an adapter's `chat_template` holding the Jinja itself, checked as a file's text is."""
    return _checked(text, "its Jinja text", inline=True)


def _checked(text: str, named: str, inline: bool = False) -> str:
    from jinja2 import TemplateSyntaxError

    if not text.strip():
        raise UserError(f"{named}: the chat template is empty")
    try:
        _compile(text)
    except TemplateSyntaxError as err:
        where = f"line {err.lineno} of {named}" if inline else f"{named}:{err.lineno}"
        raise UserError(f"{where}: Jinja syntax error ({err.message})") from None
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


def with_chat_template(tokenizer, value: str | None, owners: Sequence[str] = ()):
    """`tokenizer`, or where `value` (an adapter's chat_template: a file's path, or the Jinja
    itself, is_inline) is given a shallow copy of it whose chat template is that one: the
    vocabulary and the tokenizing backend are shared, and everything that renders a chat
    (apply_chat_template, the unread-keys note) reads the copy's. owners: the adapters whose
    template it is, which errors name (template_named)."""
    if value is None:
        return tokenizer
    own = copy.copy(tokenizer)
    inline = is_inline(value)
    own.chat_template = inline_chat_template(value) if inline else read_chat_template(value)
    named = "the inline chat template" if inline else f"the chat template {value}"
    if owners:
        quoted = [repr(name) for name in owners]
        named += (f" of adapter {quoted[0]}" if len(quoted) == 1
                  else f" of adapters {', '.join(quoted[:-1])} and {quoted[-1]}")
    own.mlora_chat_template_named = named  # (template_named: errors say whose template it is)
    return own


def template_named(tokenizer) -> str:
    """The tokenizer's chat template as an error names it: an adapter's own by its file (or as
    inline) and its adapters (adapters that share a data file render its rows through different
    templates), else the tokenizer's."""
    return getattr(tokenizer, "mlora_chat_template_named", "the chat template")


def active_template(tokenizer) -> str | None:
    """The template apply_chat_template renders with (mlora passes it no tools): the tokenizer's
    chat_template, or of a dict of named ones (tokenizer_config.json's {"default": ...,
    "tool_use": ...}) the one named "default", as transformers' get_chat_template picks it.
    None where it has none (or a dict without "default", which apply_chat_template refuses)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None


def marks_generation(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks the assistant's text with {% generation %}."""
    template = active_template(tokenizer)
    return template is not None and _GENERATION_TAG.search(template) is not None


# A short conversation each template can render (some require a system turn: the second), whose
# answer is a word no template rewrites; what follows it is how the template ends the turn.
_ANSWER = "Sure."
_PROBES = ([{"role": "user", "content": "Hello."}, {"role": "assistant", "content": _ANSWER}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello."},
            {"role": "assistant", "content": _ANSWER}])


def end_of_turn_ids(tokenizer) -> set[int]:
    """The special token the tokenizer's chat template ends an assistant turn with (ChatML's
    <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>), as a set: empty where it ends it
    with no special token (an alpaca-like "\n\n### Instruction:") or renders no probe.
    Found by rendering a short conversation and reading what follows the answer: its tokens up
    to the first special one, past any whitespace; text there means the turn ends otherwise."""
    found = _end_of_turn(tokenizer)
    return set() if found is None else {found[0]}


def unmarked_end_of_turn(tokenizer) -> str | None:
    """Where the chat template marks answers with {% generation %} but its end-of-turn token
    (end_of_turn_ids) falls outside the marks, that token as text (the model would never learn
    to end a turn with it: training appends and trains an EOS at the row's end instead, after
    the template's own end of turn); else None."""
    found = _end_of_turn(tokenizer) if marks_generation(tokenizer) else None
    if found is None:
        return None
    token, messages = found
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    except Exception:  # (a slow tokenizer, say: training refuses it in its own words)
        return None
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    if not marked or token in marked:
        return None
    return tokenizer.convert_ids_to_tokens(token)


def _end_of_turn(tokenizer) -> tuple[int, list[dict]] | None:
    """(the end-of-turn token's id, the probe conversation it was found in), or None."""
    if active_template(tokenizer) is None:
        return None
    special = set(getattr(tokenizer, "all_special_ids", ()))
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    for messages in _PROBES:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # a template that refuses this conversation (roles, order): try the next
            continue
        at = text.rfind(_ANSWER)
        if at < 0:
            continue
        for token in tokenizer(text[at + len(_ANSWER):], add_special_tokens=False).input_ids:
            if token in special:
                return token, messages
            if tokenizer.decode([token]).strip():
                return None
        return None
    return None
