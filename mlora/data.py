"""Datasets -> token ids: loading rows, prompt templates, tokenization, label masking, padding.

A dataset is a JSON array, a JSONL file or a Parquet table of rows. Five row shapes are understood:

* alpaca  {"instruction", "input"?, "output"}  rendered through a PromptTemplate;
* chat    {"messages": [{"role", "content"}, ...]}  rendered by the chat template (the tokenizer's,
  or the adapter's own: chat_template.py), its answers found by rendering the conversation's
  prefixes, or marked by the template's {% generation %} blocks;
* sharegpt  {"conversations": [{"from", "value"}, ...]}  a chat row under ShareGPT's names
  (from "human" / "gpt" = role "user" / "assistant": TRL renames the keys but keeps the names);
* prompt/completion  {"prompt", "completion"}  TRL's shape: two strings (the completion, with
  EOS, trained), or two lists of messages (the completion's turns trained);
* text    {"text"}  tokenized as is (plain language modelling; also used by evaluation).

A key that appears twice in one JSON object is an error (json keeps the last silently); a null
member is what the row lacks, in JSON as in Parquet (exports write every column, null where a row
has none); keys that no row shape reads are ignored, and unread_keys_note tells which (a misspelt "inptu" would
otherwise train every row without its input).

Every row becomes an Example: input_ids plus labels aligned with them (HF convention: the
model's loss shifts labels by one), with IGNORE_INDEX on tokens that are not trained.
"""

from __future__ import annotations

import difflib
import gc
import json
import re
import sys
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from mlora.chat_template import marks_generation, template_named
from mlora.errors import INTEGER_TOO_LONG, UserError
from mlora.pipe_read import read_without_waiting
from mlora.plural import counted

IGNORE_INDEX = -100

TEMPLATES_DIR = Path(__file__).parent / "templates"

# The key that identifies each row shape.
_SHAPE_KEYS = {"alpaca": "instruction", "chat": "messages", "sharegpt": "conversations",
               "prompt/completion": "prompt", "text": "text"}
# The keys each row shape reads (a chat message's: _MESSAGE_KEYS, and what its template names).
_READ_KEYS = {"alpaca": ("instruction", "input", "output"), "chat": ("messages",), "sharegpt": ("conversations",),
              "prompt/completion": ("prompt", "completion"), "text": ("text",)}
# Every key of a row that some shape reads: a Parquet file's other columns are not read at all.
ROW_KEYS = tuple(dict.fromkeys(key for keys in _READ_KEYS.values() for key in keys))
_ROW_KEY_SET = frozenset(ROW_KEYS)
# A --prompt_file row's own adapter (cli.rows_own_adapters): no shape reads it, but generate
# does, so a Parquet file's column of it is read too (left unread, every row of the file went
# through every chosen adapter).
ADAPTER_KEY = "adapter"
_MESSAGE_KEYS = ("role", "content")
# ShareGPT's message keys (renamed as TRL's maybe_convert_to_chatml renames them) and role names (which
# TRL keeps, though chat templates know user and assistant); other roles pass as they are.
_SHAREGPT_KEYS = ("from", "value")
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


@dataclass
class Example:
    input_ids: list[int]
    # Same length as input_ids; IGNORE_INDEX where the token is not trained.
    labels: list[int]
    _label_count: int | None = field(default=None, init=False, repr=False, compare=False)
    _tensors: tuple[Tensor, Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def tensors(self) -> tuple[Tensor, Tensor]:
        """(input_ids, labels) as long tensors [n], made once: torch.tensor converts a Python
        list value by value (0.2 ms for 512 tokens), and fusing a batch of 32 such rows that
        way took 14 ms per step, time in which a GPU waits for the next step's first kernel.
        The lists must not change afterwards (nothing in mlora changes an Example's)."""
        if self._tensors is None:
            self._tensors = (_long_tensor(self.input_ids), _long_tensor(self.labels))
        return self._tensors

    @property
    def num_label_tokens(self) -> int:
        """Tokens that contribute to the loss. Position 0 is never predicted (nothing precedes
        it), so its label does not count even when set. Counted once: every fused batch asks
        (a Python pass over the labels, 1 ms for 32 rows of 512 tokens)."""
        if self._label_count is None:
            self._label_count = len(self.labels[1:]) - self.labels[1:].count(IGNORE_INDEX)
        return self._label_count

    def __len__(self) -> int:
        return len(self.input_ids)


def _long_tensor(values: list[int]) -> Tensor:
    """A long tensor of `values` through a flat buffer: about 2x faster than torch.tensor."""
    if not values:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(array("q", values), dtype=torch.long)


# --------------------------------------------------------------------------- loading rows


class Rows(list):
    """A dataset file's rows (load_rows), with what places each in the file for `row_place`:
    `lines`, a JSONL row's line number (blank lines are skipped, so it is not its index + 1);
    None for a JSON array's or a Parquet file's rows. `nulls`: {row index: the keys some row
    shape reads that the file gave as null}, for the rows that had any (null_keys_error)."""

    def __init__(self, rows: Iterable[dict] = (), lines: list[int] | None = None,
                 nulls: dict[int, Collection[str]] | None = None):
        super().__init__(rows)
        self.lines = lines
        self.nulls = nulls if nulls is not None else {}


def row_place(source: str, i: int, lines: list[int] | None = None) -> str:
    """Where the `i`th row (from 0) of `source` is, for a message about it, counted from 1 as
    an editor does: a JSONL row by its line, as the file's malformed-JSON errors name it
    ("data.jsonl:3"); a JSON array's or Parquet file's by its row ("data.json: row 3")."""
    if lines is not None:
        return f"{source}:{lines[i]}" if source else f"line {lines[i]}"
    return f"{source}: row {i + 1}" if source else f"row {i + 1}"


def load_rows(path: str | Path) -> Rows:
    """Read a dataset file: JSONL (one object per non-blank line), a JSON array of objects, or
    (ending in .parquet) a Parquet table, as Hugging Face datasets are published."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":  # (DATA.PARQUET too: read as JSON, it was "not UTF-8 text")
        return _read_parquet(path)
    text = _read_text(path)
    stripped = text.lstrip()
    # Without the cyclic garbage collector while parsing: JSON makes no cycles, and its passes
    # over the growing rows took most of the time (50,000 chat rows as an array: 614 ms, 206
    # without), more of it with _DuplicateKeys's extra objects.
    collecting = gc.isenabled()
    gc.disable()
    try:
        if path.suffix == ".jsonl" or not stripped.startswith("["):
            rows = _parse_jsonl(path, text)
        else:
            rows = _parse_json_array(path, text)
    finally:
        if collecting:
            gc.enable()
    if not rows:
        raise UserError(f"{path}: the dataset is empty (no rows)")
    return rows


def _read_parquet(path: Path) -> Rows:
    """A Parquet file's rows as JSON rows would give them. Arrow gives every row every column,
    and a list of structs (messages) every struct field of the column, so what a row lacks comes
    as null: dropped, as TRL drops them (`remove_none_values`), or a chat template would see a
    message's `tool_calls: null` and a note every key of every row. Only the columns some row
    shape reads are read (`_parquet_columns`): a dataset's images or embeddings beside its text
    cost neither the time nor the memory of reading them."""
    if not path.is_file():
        raise UserError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet files needs pyarrow (pip install pyarrow), "
                        f"or convert it to JSONL") from None
    try:
        rows = pq.read_table(path, columns=_parquet_columns(pq.read_schema(path).names)).to_pylist()
    except Exception as err:  # pyarrow's own error types for a file that is not Parquet, or damaged
        # (a damaged page's message spans lines: "Couldn't deserialize thrift: ...\nDeserializing
        # page header failed.\n")
        said = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise UserError(f"{path}: cannot read it as Parquet ({type(err).__name__}: {said})") from None
    nulls = {i: keys for i, row in enumerate(rows) if (keys := _null_row_keys(row))}
    rows = [_without_nulls(row) for row in rows]
    if not rows:
        raise UserError(f"{path}: the dataset is empty (no rows)")
    return Rows(rows, nulls=nulls)


def _null_row_keys(obj: dict, kept: dict | None = None) -> set[str]:
    """The keys some row shape reads (ROW_KEYS) that are null in `obj` (kept: `obj` without its
    nulls, if made already; set operations, made in C: a JSON export may hold nulls in every row)."""
    if kept is None:
        kept = {k: v for k, v in obj.items() if v is not None}
    return (obj.keys() - kept.keys()) & _ROW_KEY_SET


def _parquet_columns(names: list[str]) -> list[str] | None:
    """Which of a Parquet file's columns to read: those some row shape reads (ROW_KEYS) and a
    row's own adapter (ADAPTER_KEY); None (every column) when no column names a shape
    (_SHAPE_KEYS: "Instruction", "input", "output" has input and output), so the rows show all
    their keys in encoding's unknown-shape error, and its "did you mean 'instruction'?". (Not
    also those that look like a misspelling of one: "image" looks like "messages".)"""
    if not any(key in names for key in _SHAPE_KEYS.values()):
        return None
    return [name for name in names if name in ROW_KEYS or name == ADAPTER_KEY]


def unread_columns(path: str | Path) -> list[str]:
    """The columns of a Parquet file that load_rows did not read (none of another file), for
    unread_keys_note: its rows do not hold them. Not one null in every row: the whole table's
    rows held none of it (nulls are dropped), and a note named it for every row."""
    path = Path(path)
    if path.suffix.lower() != ".parquet":
        return []
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)  # (the file load_rows has read: its footer only)
    read = _parquet_columns(schema.names)
    if read is None:
        return []
    empty = _null_columns(pq.read_metadata(path), schema)
    return [name for name in schema.names if name not in read and name not in empty]


def _null_columns(meta, schema) -> set[str]:
    """The columns null in every row, as a Parquet file's footer tells them: of Arrow's null
    type (what an all-None column becomes), or flat ones whose statistics count a null in every
    row (a nested column's count its leaves' nulls, not its rows')."""
    import pyarrow as pa

    nulls, uncounted = Counter(), set()
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            if column.statistics is None or not column.statistics.has_null_count:
                uncounted.add(column.path_in_schema)
            else:
                nulls[column.path_in_schema] += column.statistics.null_count
    return {field.name for field in schema if pa.types.is_null(field.type)
            or (field.name not in uncounted and nulls.get(field.name) == meta.num_rows)}


def _without_nulls(value):
    """`value` with every null member of its objects dropped, recursively (a null in a list
    stays: it is a message that is not an object, which encoding names)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _read_text(path: Path) -> str:
    """The file's text, with "\r\n" and "\r" read as "\n" (as Path.read_text reads them). A
    pipe is read too, once (`--prompt_file <(printf ...)` is /dev/fd/63, a FIFO: it was refused
    as not a file)."""
    try:
        data = read_without_waiting(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: not a file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError:  # a NUL in the path
        raise UserError(f"{str(path)!r} is not a valid path") from None
    try:
        # utf-8-sig: files saved by some editors start with a byte-order mark.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


class _DuplicateKeys:
    """json's object_pairs_hook: builds each object as json does, and keeps the first one that
    names a key twice (json would keep the last value without a word), so that the caller can
    say which row holds it; for rows (drop_nulls) it also leaves out null members, the rule
    _without_nulls applies to a Parquet table's rows, here in the pass json makes anyway.
    Flagging rather than raising: the hook sees objects innermost first and cannot tell which
    row of an array it is in. The pairs and a Python call per object cost
    ~1 µs an object: load_rows reads 50,000 alpaca rows as an array in ~120 ms instead of ~87,
    as JSONL or chat rows no slower than without it (its GC pass is saved); tokenizing them
    takes ~30 s."""

    def __init__(self, drop_nulls: bool = False) -> None:
        self.found: tuple[dict, str] | None = None  # (the object, its repeated key)
        # (an object, its null keys that a row shape reads), for every object that had one: the
        # rows' are the Rows' nulls (a dropped "text": null left a row of no shape, "unknown row
        # shape (keys: none)"). The objects themselves, not their ids: an object json drops (a
        # repeated key's first value) is freed, and its id could be a later row's.
        self.nulled: list[tuple[dict, set[str]]] = []
        # Rows: a null member is what the row lacks, as a Parquet table's nulls are (_without_nulls):
        # datasets' and pandas' JSON exports write every column in every row, null where a row has
        # none, and such rows were refused as mixing shapes, or gave a chat template a message's
        # `tool_calls: null`, where the Parquet file of the same table trained.
        self.drop_nulls = drop_nulls

    def __call__(self, pairs: list[tuple[str, object]]) -> dict:
        obj = dict(pairs)
        repeated = len(obj) != len(pairs)
        if repeated:
            # This object's repeat replaces the one flagged so far where that one sits in a value
            # this object drops ({"m": {"k": 1, "k": 2}, "m": 3}): it is in no row, nowhere to name.
            dropped = [v for k, v in pairs if obj[k] is not v]
            repeated = self.found is None or any(_path_to(v, self.found[0]) is not None for v in dropped)
        if self.drop_nulls and None in obj.values():  # (a C-level scan: most objects hold no null)
            kept = {k: v for k, v in obj.items() if v is not None}
            if nulled := _null_row_keys(obj, kept):
                self.nulled.append((kept, nulled))
            obj = kept
        if repeated:
            seen: set[str] = set()
            self.found = (obj, next(k for k, _ in pairs if k in seen or seen.add(k)))
        return obj

    def nulls_of(self, rows: Sequence[dict]) -> dict[int, set[str]]:
        """{i: its null keys} for the `rows` among the objects that had some (Rows.nulls)."""
        nulled = {id(obj): keys for obj, keys in self.nulled}
        return {i: nulled[id(row)] for i, row in enumerate(rows) if id(row) in nulled} if nulled else {}

    def message(self, row: dict) -> str:
        """The duplicate, placed in `row` (which holds the flagged object)."""
        obj, key = self.found
        where = _path_to(row, obj)
        return f"{where + ': ' if where else ''}key {key!r} appears twice in the same JSON object"


def _path_to(root, target) -> str | None:
    """Where the object `target` sits inside `root` ("messages[1]"; "" for root itself; None if
    nowhere). Iterative: a row may nest as deep as json's recursion limit allowed."""
    stack = [(root, "")]
    while stack:
        value, where = stack.pop()
        if value is target:
            return where
        if isinstance(value, dict):
            stack += [(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return None


def _parse_jsonl(path: Path, text: str) -> Rows:
    rows = Rows(lines=[])
    duplicates = _DuplicateKeys(drop_nulls=True)
    decoder = json.JSONDecoder(object_pairs_hook=duplicates)
    # At "\n" only (_read_text's universal newlines made "\r\n" and "\r" ones): str.splitlines()
    # also breaks at U+2028, U+2029 and U+0085, which a JSON string may hold as they are
    # (json.dumps(ensure_ascii=False) writes them so), and a valid row was "malformed JSON".
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = decoder.decode(line)
        except json.JSONDecodeError as e:
            whole = _one_json_value(text)
            if isinstance(whole, (dict, list)):  # valid JSON, but not rows one per line
                raise UserError(f"{path}: {_not_jsonl(whole, path)}") from None
            raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        except RecursionError:  # json's decoder recurses per level: ~1000 nested brackets end the stack
            raise UserError(f"{path}:{lineno}: JSON nested too deeply to read") from None
        except ValueError:  # (after JSONDecodeError, one too) Python's cap on an integer's digits
            raise UserError(f"{path}:{lineno}: {INTEGER_TOO_LONG}") from None
        if duplicates.found:
            raise UserError(f"{path}:{lineno}: {duplicates.message(row)}")
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {_json_type(row)}")
        if duplicates.nulled:  # (the row is the line's last object made: json makes the innermost first)
            if duplicates.nulled[-1][0] is row:
                rows.nulls[len(rows)] = duplicates.nulled[-1][1]
            duplicates.nulled.clear()
        rows.append(row)
        rows.lines.append(lineno)
    return rows


def _one_json_value(text: str):
    """The whole text as one JSON value, or None when it is not one (for a message only)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # (JSONDecodeError is a ValueError)
        return None


def _not_jsonl(value: dict | list, path: Path) -> str:
    """What to say of a file read as JSONL that is one JSON object or array over several lines:
    its first line used to be "malformed JSON (Expecting value)" unless it was a lone "{"."""
    if isinstance(value, list):  # (a .jsonl name; a .json file starting with "[" is read as an array)
        return (f"expected one object per line (JSONL, as its {path.suffix} name says); the file is one JSON "
                f"array over several lines: name it .json")
    keys = ", ".join(map(repr, list(value)[:5])) + (", ..." if len(value) > 5 else "")
    listed = next((key for key, v in value.items() if isinstance(v, list) and v and isinstance(v[0], dict)), None)
    hint = f": its {listed!r} holds {len(value[listed])} objects, which could be the file's rows" if listed else ""
    return (f"expected a JSON array of row objects or one object per line (JSONL); the file is one multi-line "
            f"object (keys {keys or 'none'}){hint}")


def _parse_json_array(path: Path, text: str) -> Rows:
    duplicates = _DuplicateKeys(drop_nulls=True)
    try:
        data = json.JSONDecoder(object_pairs_hook=duplicates).decode(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to read") from None
    except ValueError:  # (after JSONDecodeError, one too) Python's cap on an integer's digits
        raise UserError(f"{path}: {INTEGER_TOO_LONG}") from None
    if duplicates.found:  # (the text starts with "[": data is a list, and a row holds the object)
        i = next(i for i, row in enumerate(data) if _path_to(row, duplicates.found[0]) is not None)
        raise UserError(f"{row_place(str(path), i)}: {duplicates.message(data[i])}")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects, got {_json_type(data)}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{row_place(str(path), i)}: expected a JSON object, got {_json_type(row)}")
    return Rows(data, nulls=duplicates.nulls_of(data))


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- prompt templates


@dataclass
class PromptTemplate:
    prompt: str            # with {instruction} and {input}; may also contain {output}
    prompt_no_input: str   # with {instruction}; may also contain {output}

    def render(self, instruction: str, input: str | None) -> tuple[str, str]:
        """Return (prompt_text, suffix): the untrained prompt, and the text that follows the
        output (trained with it) when the template places {output} explicitly."""
        template = self.prompt if input else self.prompt_no_input
        values = {"instruction": instruction, "input": input or ""}
        output = next((m for m in _TOKEN.finditer(template) if m.group(1) == "output"), None)
        if output is None:
            return _fill(template, values), ""
        # (Both halves split at a token's edge, so each scans into the same tokens as the whole.)
        return _fill(template[:output.start()], values), _fill(template[output.end():], values)


_PLACEHOLDERS = ("instruction", "input", "output")
# A template's text scans left to right as str.format scans it (alpaca-lora and m-LoRA render
# these templates with it): "{{" and "}}" are escaped braces, so "{{input}}" is the text
# "{input}" and no placeholder; any other braced word ({name}) stays as written, where
# str.format would fail (but for the fields str.format fills and mlora refuses: _unfilled_field).
# A lone "{" or "}" stays as written too (str.format fails on it).
# A placeholder's conversion and format spec ({input!r}, {instruction:.200}: groups 2 and 3)
# apply as str.format applies them (they stayed in every prompt as text).
_TOKEN = re.compile(r"\{\{|\}\}|\{(\w+)(?:!([^{}:]*))?(?::([^{}]*))?\}")
_CONVERSIONS = {"r": repr, "s": str, "a": ascii}


def _placeholders(template: str) -> list[str]:
    """The braced words of `template` outside escaped braces, placeholders or not, in order."""
    return [m.group(1) for m in _TOKEN.finditer(template) if m.group(1)]


def _fill(template: str, values: dict[str, str]) -> str:
    # One pass over the template, so braces or "{input}" inside user text stay literal
    # (str.format would choke on them, chained str.replace would substitute into them).
    def token_text(m: re.Match) -> str:
        if m.group(1) is None:
            return m.group(0)[0]  # "{{" -> "{", "}}" -> "}"
        if m.group(1) not in values:
            return m.group(0)
        return _formatted(values[m.group(1)], m.group(2), m.group(3))

    return _TOKEN.sub(token_text, template)


def _formatted(value: str, conversion: str | None, spec: str | None) -> str:
    """`value` through a placeholder's conversion (r, s or a) and format spec, as str.format
    puts it: format(conversion(value), spec)."""
    if conversion is not None:
        value = _CONVERSIONS[conversion](value)
    return format(value, spec or "")


def _check_placeholder(m: re.Match) -> None:
    """Refuse a placeholder's conversion or format spec that str.format would fail on (or that
    {output}, the answer's place, cannot take): UserError naming the placeholder as written."""
    word, conversion, spec = m.groups()
    if conversion is None and spec is None:
        return
    if word == "output":
        raise UserError(f"{m.group(0)}: {{output}} marks where the answer goes; it takes no conversion or format "
                        f"spec")
    if conversion is not None and conversion not in _CONVERSIONS:
        raise UserError(f"{m.group(0)}: the conversion must be !r, !s or !a (as in str.format)")
    try:
        _formatted("", conversion, spec)  # (a spec's validity does not depend on the text)
    except ValueError as e:
        raise UserError(f"{m.group(0)}: not a format spec str.format takes for text ({e})") from None


# Every field str.format would read, as it scans: an unescaped "{", the field name's first part
# (group 1: a word, or nothing), what follows it up to the next brace (group 2) and that brace
# (group 3: "{", "}", or "" at the end). To tell the fields that _TOKEN leaves as text although
# str.format reads them (_fields_left_unread).
_FIELD = re.compile(r"\{\{|\}\}|\{(\w*)([^{}]*)(?=([{}]?))")
# A field's whole text as written: its name's attribute and index parts (an index may hold any
# character but "]"), its conversion and its format spec with fields nested in it.
_WRITTEN_FIELD = re.compile(r"\{\w*(?:\.[^.\[!:{}]*|\[[^\]]*\])*(?:![^:{}]*)?(?::[^{}]*(?:\{[^{}]*\}[^{}]*)*)?\}")


def _fields_left_unread(template: str) -> tuple[str | None, list[str]]:
    """The fields of `template` that str.format reads and mlora does not fill: (what is wrong with
    the first that names a placeholder, in words that start with it as written, or None; the
    positional ones, as written). A placeholder's attribute or index ({input.upper}, {input[0]}:
    str.format reads them off the row's text) or a format spec holding a field ({input:{w}}) is
    refused. Positional fields ({}, {0}, {:>9}) stay as written, as other braced words do ({name},
    {x.y}): `{}` is also JSON's empty object in a prompt's example; but a template of them, as
    Unsloth writes its alpaca prompt (filled in order), lacks the placeholders, whose error names them."""
    positional_fields = []
    for m in _FIELD.finditer(template):
        name, rest, brace = m.groups()
        if name is None or brace == "":  # "{{" or "}}"; or a "{" never closed: braced text, as written
            continue
        positional = name == "" or name.isdigit()
        if not positional and name not in _PLACEHOLDERS:
            continue
        written = _WRITTEN_FIELD.match(template, m.start())
        field = written.group(0) if written else m.group(0)
        if positional:
            if rest[:1] in ("", "!", ":", ".", "["):  # ("{ x}": braced text)
                positional_fields.append(field)
        elif rest[:1] in (".", "["):
            what = "an index" if rest[0] == "[" else "an attribute"
            return (f"{field}: mlora fills a placeholder by its name alone, and str.format would read {what} of the "
                    f"row's text; write {{{name}}}"), positional_fields
        elif brace == "{" and rest[:1] in ("!", ":") and ":" in rest:
            return (f"{field}: a format spec cannot hold a field (str.format's nested fields); write the spec out, "
                    f"as in {{{name}:>20}}"), positional_fields
    return None, positional_fields


def _named_fields_hint(positional: list[str]) -> str:
    """What an error of a missing placeholder adds of a template's positional fields ({} or {0}
    stays as written: `_fields_left_unread`)."""
    fields = list(dict.fromkeys(positional))
    if not fields:
        return ""
    are = "is a positional field" if len(fields) == 1 else "are positional fields"
    return (f" ({', '.join(fields)} {are}, which mlora does not fill: name the placeholders {{instruction}}, "
            f"{{input}} and {{output}})")


def builtin_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.json"))


def load_template(spec: str) -> PromptTemplate:
    """`spec` is a builtin template name ("alpaca") or a path to a JSON template file with
    `prompt` (or alpaca-lora's `prompt_input`) and `prompt_no_input`."""
    path = Path(spec)
    # A builtin name is always the builtin (config.py takes it so and resolves no path for it):
    # a file of that name in the working directory made the prompts depend on where mlora ran.
    if spec in builtin_templates():
        path = TEMPLATES_DIR / f"{spec}.json"
    elif not path.is_file():
        raise UserError(f"prompt template {spec!r}: no such file, and not a builtin "
                        f"template (builtin: {', '.join(builtin_templates())})")
    return _parse_template(path)


def _parse_template(path: Path) -> PromptTemplate:
    duplicates = _DuplicateKeys()  # (two "prompt"s: which one trains would be json's choice)
    try:
        data = json.JSONDecoder(object_pairs_hook=duplicates).decode(_read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to read") from None
    except ValueError:  # (after JSONDecodeError, one too) Python's cap on an integer's digits
        raise UserError(f"{path}: {INTEGER_TOO_LONG}") from None
    if duplicates.found:
        raise UserError(f"{path}: {duplicates.message(data)}")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a prompt template must be a JSON object, got {_json_type(data)}")
    prompt = data.get("prompt", data.get("prompt_input"))
    no_input = data.get("prompt_no_input")
    if prompt is None or no_input is None:
        raise UserError(f"{path}: a prompt template needs the keys 'prompt' (or 'prompt_input') "
                        f"and 'prompt_no_input'")
    positional: dict[str, list[str]] = {}  # (each key's positional fields)
    for key, value in (("prompt", prompt), ("prompt_no_input", no_input)):
        if not isinstance(value, str):
            raise UserError(f"{path}: '{key}' must be a string")
        words = _placeholders(value)
        unread, positional[key] = _fields_left_unread(value)
        if unread:
            raise UserError(f"{path}: '{key}' has {unread}")
        if "instruction" not in words:
            raise UserError(f"{path}: '{key}' has no {{instruction}} placeholder{_named_fields_hint(positional[key])}")
        if words.count("output") > 1:
            raise UserError(f"{path}: '{key}' has more than one {{output}} placeholder")
        for m in _TOKEN.finditer(value):
            if m.group(1) in _PLACEHOLDERS:
                try:
                    _check_placeholder(m)
                except UserError as e:
                    raise UserError(f"{path}: '{key}' has {e}") from None
        for word in (w for w in words if w not in _PLACEHOLDERS):
            # A misspelt placeholder ({inptu}, {Output}) stayed in every prompt as text; the
            # tools whose templates these are (alpaca-lora's and m-LoRA's str.format) fail on it.
            # Other braced words ({name}) may be the template's own text: they stay literal.
            if guess := _near(word, _PLACEHOLDERS):
                raise UserError(f"{path}: '{key}' has a placeholder {{{word}}}; did you mean {{{guess[0]}}}? "
                                f"(the placeholders are {{instruction}}, {{input}} and {{output}})")
        try:
            check_unicode(value, f"'{key}'")
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    if "input" not in _placeholders(prompt):
        # Without it every row's input would be dropped silently.
        raise UserError(f"{path}: 'prompt' has no {{input}} placeholder{_named_fields_hint(positional['prompt'])}")
    return PromptTemplate(prompt=prompt, prompt_no_input=no_input)


# --------------------------------------------------------------------------- encoding rows


def _shapes(keys: Collection[str]) -> list[str]:
    """The shapes whose identifying key is among `keys` (a row, or its keys). A "prompt" without
    a "completion" beside another shape's key is that row's unread key, not a second shape:
    UltraChat's and No Robots' chat rows hold their first user turn as "prompt" beside "messages"
    (they were chat rows before prompt/completion rows were read, and were then refused)."""
    shapes = [shape for shape, key in _SHAPE_KEYS.items() if key in keys]
    if len(shapes) > 1 and "prompt/completion" in shapes and "completion" not in keys:
        shapes.remove("prompt/completion")
    return shapes


def row_shape(row: dict) -> str:
    """One of _SHAPE_KEYS' shapes, detected by the row's keys; UserError if none or several."""
    shapes = _shapes(row)
    if not shapes:
        guesses = dict.fromkeys(near[0] for key in map(str, row) if (near := _near(key, _SHAPE_KEYS.values())))
        hint = f" (did you mean {' or '.join(map(repr, guesses))}?)" if guesses else ""
        raise UserError(f"unknown row shape (keys: {', '.join(map(str, row)) or 'none'}); expected "
                        f"'instruction'/'input'/'output', 'messages', 'conversations', 'prompt'/'completion', "
                        f"or 'text'{hint}")
    if len(shapes) > 1:
        keys = ", ".join(repr(_SHAPE_KEYS[s]) for s in shapes)
        raise UserError(f"row mixes shapes ({' and '.join(shapes)}: keys {keys}); use one")
    return shapes[0]


# The keys a row of each shape must hold besides its identifying one, to be trained.
_ANSWER_KEYS = {"alpaca": ("output",), "prompt/completion": ("completion",)}


def null_keys_error(row: dict, nulled: Collection[str], answered: bool = True) -> str | None:
    """What to say of a row that cannot be read for a key the file gave as null (`nulled`: its
    null keys some shape reads, Rows.nulls; load_rows drops them as what the row lacks): an
    identifying key, the row then of no shape ({"text": null} was "unknown row shape (keys:
    none)"), or (answered: the row is trained) its answer's. None when its nulls are not why."""
    shapes = _shapes(row)
    if not shapes:
        keys = [key for key in _SHAPE_KEYS.values() if key in nulled]
    elif len(shapes) == 1 and answered:
        keys = [key for key in _ANSWER_KEYS.get(shapes[0], ()) if key in nulled]
    else:
        keys = []
    if not keys:
        return None
    named = " and ".join(filter(None, (", ".join(map(repr, keys[:-1])), repr(keys[-1]))))
    said = f"{named} {'is' if len(keys) == 1 else 'are'} null (a null counts as a missing key)"
    if shapes:
        return f"{said}: the row has no answer to learn"
    if not row:
        return f"{said}: the row is empty"
    return f"{said}, and without {'it' if len(keys) == 1 else 'them'} the row is of no shape"


def unread_keys_note(rows: Sequence[dict], tokenizer, columns: Sequence[str] = ()) -> str | None:
    """What a note about `rows` should say of their keys that nothing reads, or None when every
    key is read: each such key with the number of rows holding it, likely misspellings of a key
    the row lacks first ("did you mean 'input'?"). Real datasets carry extra columns (ids,
    sources), so this is a note, not an error. A chat message's keys other than role and content
    reach the tokenizer's chat template, which may read any of them (name, tool_calls,
    reasoning_content...): only those its source never names are told. Rows of no single shape
    are skipped (encoding names them). columns: keys every row holds though the rows lack them
    (a Parquet file's columns that load_rows did not read: unread_columns), counted in every row."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates
        template = "\n".join(template.values())

    def row_layout(keys: tuple[str, ...]) -> tuple[str | None, dict[str, list[str]]]:
        """The shape of rows with these keys (None: none or several) and their unread keys, each
        with the key it may be a misspelling of."""
        shapes = _shapes(keys)
        if len(shapes) != 1:
            return None, {}
        read = _READ_KEYS[shapes[0]]
        absent = [k for k in read if k not in keys]
        return shapes[0], {k: _near(k, absent) for k in keys if k not in read}

    def message_layout(keys: tuple[str, ...], read: tuple[str, ...]) -> dict[str, list[str]]:
        absent = [k for k in read if k not in keys]
        return {k: _near(k, absent) for k in keys if k not in read
                and not re.search(rf"(?<!\w){re.escape(k)}(?!\w)", template)}

    counts: dict[tuple[str, str], int] = {}  # (where: "row" or "message", key) -> rows holding it
    hints: dict[tuple[str, str], set[str]] = {}  # -> keys it may be a misspelling of
    told: set[str] = set()  # the shapes (and "message") whose keys are told

    def tally(where: str, strays: dict[str, list[str]], n: int) -> None:
        for key, near in strays.items():
            counts[where, key] = counts.get((where, key), 0) + n
            hints.setdefault((where, key), set()).update(near)

    # Rows share a few key layouts, each worked out once: counting them is C's work (~20 ms for
    # 50,000 rows, against tens of seconds to tokenize them).
    for keys, n in Counter(tuple(row) + tuple(columns) for row in rows).items():
        shape, strays = row_layout(keys)
        if strays:
            told.add(shape)
            tally("row", strays, n)
    # A chat row counts once however many of its messages hold a key.
    conversations = Counter((read, frozenset(tuple(m) for m in messages if isinstance(m, dict)))
                            for read, messages in _row_messages(rows) if isinstance(messages, list))
    for (read, layouts), n in conversations.items():
        strays = {}
        for keys in layouts:
            for key, near in message_layout(keys, read).items():
                strays.setdefault(key, []).extend(near)
        if strays:
            where = "turn" if read == _SHAREGPT_KEYS else "message"
            told.add(where)
            tally(where, strays, n)
    if not counts:
        return None
    order = sorted(counts, key=lambda wk: (not hints[wk], -counts[wk], wk))  # misspellings, then most rows
    shown = []
    for where, key in order[:8]:
        n = counts[where, key]
        hint = "".join(f"; did you mean {h!r}?" for h in sorted(hints[where, key])[:1])
        inside = {"message": " in messages", "turn": " in conversations"}.get(where, "")
        shown.append(f"{key!r}{inside} ({counted(n, 'row')}{hint})")
    if len(order) > 8:
        shown.append(f"and {len(order) - 8} more")
    reads = [f"{shape} rows read {', '.join(_READ_KEYS[shape])}" for shape in _READ_KEYS if shape in told]
    if "message" in told:
        reads.append(f"chat messages read {', '.join(_MESSAGE_KEYS)} and the keys {template_named(tokenizer)} names")
    if "turn" in told:
        reads.append(f"ShareGPT turns read {', '.join(_SHAREGPT_KEYS)} and the keys {template_named(tokenizer)} names")
    return f"keys not read: {', '.join(shown)}; {'; '.join(reads)}"


def _row_messages(rows: Sequence[dict]) -> Iterable[tuple[tuple[str, ...], object]]:
    """(the message keys read, a list of messages) of every row of one shape that holds
    messages: a chat row's, a ShareGPT row's, a prompt/completion row's two lists (as one)."""
    for row in rows:
        shapes = _shapes(row)
        if shapes == ["chat"]:
            yield _MESSAGE_KEYS, row["messages"]
        elif shapes == ["sharegpt"]:
            yield _SHAREGPT_KEYS, row["conversations"]
        elif shapes == ["prompt/completion"] and isinstance(row["prompt"], list):
            completion = row.get("completion")
            yield _MESSAGE_KEYS, row["prompt"] + (completion if isinstance(completion, list) else [])


def _near(key: str, candidates: Iterable[str]) -> list[str]:
    """The candidate `key` may be a misspelling of (as config.py's hints find them), if any."""
    return difflib.get_close_matches(key.lower(), list(candidates), n=1)


def encode_row(row: dict, tokenizer, template: PromptTemplate, cutoff_len: int,
               train_on_inputs: bool) -> Example:
    """Tokenize one row and mask its labels; the result is truncated to cutoff_len tokens."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token (eos_token_id is None)")
    if cutoff_len < 1:
        raise UserError(f"cutoff_len must be at least 1, got {cutoff_len}")
    shape = row_shape(row)
    if shape == "alpaca":
        example = _encode_alpaca(row, tokenizer, template, train_on_inputs)
    elif shape == "chat":
        example = _encode_chat(row["messages"], tokenizer, train_on_inputs, "messages[0]")
    elif shape == "sharegpt":
        messages = _sharegpt_messages(row["conversations"])  # (checked: conversations[0] is an object)
        example = _encode_chat(messages, tokenizer, train_on_inputs,
                               f"conversations[0] (from {row['conversations'][0]['from']!r})")
    elif shape == "prompt/completion":
        example = _encode_prompt_completion(row, tokenizer, train_on_inputs)
    else:
        example = _encode_text(row, tokenizer)
    if not example.input_ids:
        raise UserError("the row encodes to no tokens")
    # Truncation comes last so that a text row is exactly tokenizer(text).input_ids[:cutoff_len].
    return Example(example.input_ids[:cutoff_len], example.labels[:cutoff_len])


def encode_rows(rows: Iterable[dict], tokenizer, template: PromptTemplate, cutoff_len: int,
                train_on_inputs: bool, source: str = "") -> list[Example]:
    """encode_row over a dataset; errors name `source` (usually the file) and the row's place
    in it (row_place; load_rows' Rows know a JSONL row's line). A large one shows a progress
    bar on a terminal (tokenizing 5,000 chat rows takes seconds)."""
    examples = []
    lines, nulls = (rows.lines, rows.nulls) if isinstance(rows, Rows) else (None, {})
    rows = list(rows)
    bar = tqdm(rows, desc=f"encoding {Path(source).name if source else 'rows'}", unit="row", leave=False,
               disable=None if len(rows) >= 2000 else True, file=sys.stderr, mininterval=0.5)
    try:
        for i, row in enumerate(bar):
            where = row_place(source, i, lines)
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object, got {_json_type(row)}")
            if i in nulls and (said := null_keys_error(row, nulls[i])):
                raise UserError(f"{where}: {said}")
            try:
                examples.append(encode_row(row, tokenizer, template, cutoff_len, train_on_inputs))
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
    finally:
        bar.close()
    return examples


def _string_field(row: dict, key: str, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None:
        if required:
            raise UserError(f"missing {key!r}")
        return None
    if not isinstance(value, str):
        raise UserError(f"{key!r} must be a string, got {_json_type(value)}")
    check_unicode(value, repr(key))
    return value


def check_unicode(text: str, what: str) -> None:
    """Refuse text that is not valid Unicode: JSON's escapes may spell half of a surrogate pair
    ("\\ud800"), and Python's command line turns bytes that are not UTF-8 into such halves;
    the tokenizer fails on them with a TypeError that names nothing."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} is not valid Unicode text: character {e.start} is an unpaired surrogate "
                        f"{text[e.start]!r} (from a lone \\u escape, or bytes that are not UTF-8)") from None


def _encode_alpaca(row: dict, tokenizer, template: PromptTemplate, train_on_inputs: bool) -> Example:
    instruction = _string_field(row, "instruction")
    input_text = _string_field(row, "input", required=False)
    output = _string_field(row, "output")
    prompt_text, suffix = template.render(instruction, input_text)
    # The prompt gets the tokenizer's default special tokens (e.g. BOS), as a generation prompt
    # gets them (prompt_tokens); the target ends in EOS so the adapter learns to stop, one EOS:
    # an output written ending in it (a dataset made for Llama 2, "...</s>") got a second one
    # (alpaca-lora appends it only where the row does not end with it, as TRL does a completion).
    # (one call for both: a fast tokenizer's per-call overhead is much of its cost, and the prompt
    # tokenized twice in two calls took 3,000 rows of ~170 tokens about twice as long to encode as
    # the prompt and output apart; in one call, about as long)
    prompt_ids, whole = tokenizer([prompt_text, prompt_text + output + suffix]).input_ids
    target_ids = _tokens_after(tokenizer, prompt_ids, whole, output + suffix)
    if target_ids[-1:] != [tokenizer.eos_token_id]:
        target_ids.append(tokenizer.eos_token_id)
    input_ids = prompt_ids + target_ids
    if train_on_inputs:
        return Example(input_ids, list(input_ids))
    return Example(input_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids)


def _tokens_after(tokenizer, prompt_ids: list[int], whole: list[int], text: str) -> list[int]:
    """`text`'s tokens as they follow a prompt whose tokens are `prompt_ids`: those of the two
    tokenized whole (`whole`, as alpaca-lora tokenizes a row) past the prompt's, where the whole
    starts with the prompt's tokens. Tokenized on its own, `text` starts a text, which a
    SentencePiece tokenizer (Llama 2's, Mistral's) spells with a word-start "▁": every answer was
    trained as "\n▁Bonjour", a space after the template's newline that no text has. Where the join
    merges the prompt's last token with the text's first (a template ending in a space), it keeps
    its own tokens, so that the prompt stays what generation feeds."""
    if whole[:len(prompt_ids)] == prompt_ids:
        return whole[len(prompt_ids):]
    return tokenizer(text, add_special_tokens=False).input_ids


def _encode_text(row: dict, tokenizer) -> Example:
    text = _string_field(row, "text")
    # Exactly the tokenizer's own encoding, nothing appended: evaluation relies on this.
    input_ids = tokenizer(text).input_ids
    return Example(input_ids, list(input_ids))


def _encode_chat(messages, tokenizer, train_on_inputs: bool, first: str = "messages[0]") -> Example:
    """first: the row's first turn as the user wrote it, for a message about it (a ShareGPT row's
    is conversations[0], whose "gpt" is the assistant)."""
    _check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("chat rows ('messages') need a tokenizer with a chat template, "
                        "and this tokenizer has none")
    if not train_on_inputs and marks_generation(tokenizer):
        # The template marks what the assistant says: no prefix rendering, so none is required.
        _check_answers_follow_a_turn(messages, first)
        input_ids, trained = _assistant_mask(tokenizer, messages)
        labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, trained)]
        return _with_trained_eos(tokenizer, messages, input_ids, labels)
    text = _render_chat(tokenizer, messages)
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise UserError("chat rows need a fast tokenizer (one that reports character offsets)") from None
    input_ids = list(encoding.input_ids)
    if train_on_inputs:
        trained = [True] * len(input_ids)
    else:
        spans = _assistant_spans(tokenizer, messages, text, first)
        trained = [any(lo <= start < hi for lo, hi in spans) for start, _ in encoding.offset_mapping]
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, trained)]
    return _with_trained_eos(tokenizer, messages, input_ids, labels)


def _with_trained_eos(tokenizer, messages, input_ids: list[int], labels: list[int], since: int = 0) -> Example:
    """The row, with a trained EOS appended after a final assistant turn when no label from
    `since` on is EOS: templates whose end-of-turn token is not EOS (ChatML with a </s> EOS, say)
    would never teach the model to stop."""
    eos = tokenizer.eos_token_id
    if messages[-1]["role"] == "assistant" and eos not in labels[since:]:
        input_ids, labels = input_ids + [eos], labels + [eos]
    return Example(input_ids, labels)


def _assistant_mask(tokenizer, messages) -> tuple[list[int], list[bool]]:
    """The conversation's token ids and which of them the template's {% generation %} blocks
    mark as the assistant's, as transformers' apply_chat_template returns them (the rendering
    tokenized without special tokens added, as _encode_chat tokenizes it otherwise)."""
    if not getattr(tokenizer, "is_fast", False):  # (the mask is made of a fast tokenizer's offsets)
        raise UserError("chat rows need a fast tokenizer (one that reports character offsets)")
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    except Exception as e:  # jinja raises its own errors (e.g. raise_exception for bad role order)
        raise UserError(f"{template_named(tokenizer)} rejected the messages ({type(e).__name__}: {e})") from None
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


def _sharegpt_messages(conversations) -> list[dict]:
    """A ShareGPT conversation as chat messages: "from" -> role ("human" -> user, "gpt" ->
    assistant, other names as they are; TRL renames the keys only), "value" -> content, other
    keys kept."""
    _check_messages(conversations, "conversations", _SHAREGPT_KEYS)
    messages = []
    for turn in conversations:
        rest = {k: v for k, v in turn.items() if k not in _SHAREGPT_KEYS + _MESSAGE_KEYS}
        messages.append({"role": _SHAREGPT_ROLES.get(turn["from"], turn["from"]), "content": turn["value"], **rest})
    return messages


def _encode_prompt_completion(row: dict, tokenizer, train_on_inputs: bool) -> Example:
    """TRL's prompt-completion row (SFTTrainer's tokenization, its completion_only_loss): two
    strings, the completion ended by the EOS token unless it ends so already, the two tokenized
    together, and trained from the length of the prompt's own tokens on; or two lists of
    messages, the prompt's rendering with the generation prompt untrained and the rest of the
    whole conversation's trained (plus a trained EOS, as chat rows get one, when the template
    ends the turn otherwise; a template that does not start the whole with that rendering is
    refused, as chat rows refuse it). A template that marks the answers with {% generation %}:
    the marked tokens of the completion's answers (the prompt's answers' untrained)."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, list) or not value:
                raise UserError(f"{key!r} must be a non-empty list of {{role, content}} objects like "
                                f"the other one, got {_json_type(value) if key in row else 'nothing'}")
        _check_messages(prompt, "prompt")
        _check_messages(completion, "completion")
        messages = prompt + completion
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("prompt/completion rows of messages need a tokenizer with a chat template, "
                            "and this tokenizer has none")
        if not train_on_inputs and marks_generation(tokenizer):
            # The template marks the answers: the completion's are those after the prompt's.
            input_ids, trained = _assistant_mask(tokenizer, messages)
            trained = _past_answers(trained, messages, sum(m["role"] == "assistant" for m in prompt), tokenizer,
                                    len(prompt))
            labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, trained)]
            return _with_trained_eos(tokenizer, messages, input_ids, labels)
        prompt_text = _render_chat(tokenizer, prompt, add_generation_prompt=True)
        text = _render_chat(tokenizer, messages)
        if not train_on_inputs and not text.startswith(prompt_text):
            # A template whose generation prompt the answered turn does not start with (DeepSeek-R1's
            # "<think>\n") cut the completion's first tokens off its labels without a word.
            raise UserError(f"{template_named(tokenizer)} does not render the prompt (with its generation prompt) as a "
                            "prefix of the whole conversation, so the completion cannot be located for label "
                            "masking (set train_on_inputs, or use another template)")
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
        input_ids = tokenizer(text, add_special_tokens=False).input_ids
        cut = min(len(prompt_ids), len(input_ids))
        labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * cut + input_ids[cut:]
        return _with_trained_eos(tokenizer, messages, input_ids, labels, since=cut)
    prompt = _string_field(row, "prompt")
    completion = _string_field(row, "completion")
    eos = tokenizer.eos_token
    if not completion.endswith(eos):
        completion += eos
    prompt_ids = tokenizer(prompt).input_ids
    input_ids = tokenizer(prompt + completion).input_ids
    if train_on_inputs:
        return Example(input_ids, list(input_ids))
    cut = min(len(prompt_ids), len(input_ids))  # (TRL's cut, also where the join merged two tokens)
    return Example(input_ids, [IGNORE_INDEX] * cut + input_ids[cut:])


def _check_messages(messages, name: str = "messages", keys: tuple[str, ...] = _MESSAGE_KEYS) -> None:
    """`messages` (the row's key `name`) is a non-empty list of objects whose `keys` (a chat
    message's role and content; a ShareGPT turn's from and value) are strings."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{name!r} must be a non-empty list of {{{', '.join(keys)}}} objects")
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{name}[{j}] must be an object, got {_json_type(message)}")
        for key in keys:
            if not isinstance(message.get(key), str):
                raise UserError(f"{name}[{j}].{key} must be a string, got "
                                f"{_json_type(message.get(key)) if key in message else 'nothing'}")
            check_unicode(message[key], f"{name}[{j}].{key}")


PROMPT_FORMATS = ("alpaca", "chat", "text")


def prompt_tokens(text: str, fmt: str, tokenizer, template: PromptTemplate) -> list[int]:
    """A generation prompt's token ids, made the way training made a row's prompt part:
    "alpaca" renders `text` as the instruction through the adapter's template (BOS and all);
    "chat" as a user turn through the tokenizer's chat template, with the assistant's
    generation prompt after it; "text" tokenizes it as it is (a text row's start)."""
    if not text.strip():
        raise UserError("the prompt is empty")
    named = f"the prompt {text[:40] + '...' if len(text) > 40 else text!r}"
    check_unicode(text, named)
    if fmt == "alpaca":
        rendered = template.render(text, None)[0]
        _check_not_empty(rendered, named, _THROUGH_TEMPLATE)
        return tokenizer(rendered).input_ids
    if fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--format chat: the base model's tokenizer has no chat template")
        rendered = _render_chat(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False).input_ids
    if fmt == "text":
        return tokenizer(text).input_ids
    raise UserError(f"prompt format {fmt!r} is not one of {', '.join(PROMPT_FORMATS)}")


@dataclass
class RowPrompt:
    """What a data row asks for, for generation: `shown` (its instruction or last user turn, for
    people), `ids` (the tokens training fed before the first trained token: the row's prompt)
    and `reference` (what training taught it to answer; None for a row that only asks)."""
    shown: str
    ids: list[int]
    reference: str | None


def row_prompt(row: dict, tokenizer, template: PromptTemplate) -> RowPrompt:
    """A row of any shape but text as a generation prompt, rendered as training rendered it
    (`encode_row`): an alpaca row through `template`; a chat or ShareGPT conversation up to its
    final assistant turn (all of it when it ends with another turn), a prompt/completion row's
    prompt of messages, each with the chat template's generation prompt; a prompt/completion
    row's prompt string as is. The answer (output, completion, final assistant turn) may be
    absent: a file of questions only. UserError naming what is wrong."""
    shape = row_shape(row)
    if shape == "alpaca":
        instruction, input_text = _string_field(row, "instruction"), _string_field(row, "input", required=False)
        output = _string_field(row, "output", required=False)
        shown = instruction if not input_text else f"{instruction}\n{input_text}"
        rendered = template.render(instruction, input_text)[0]
        _check_not_empty(rendered, "its prompt", _THROUGH_TEMPLATE)
        return RowPrompt(shown, tokenizer(rendered).input_ids, output)
    if shape == "text":
        raise UserError("a text row has no prompt to complete (its every token is trained)")
    if shape == "prompt/completion" and not isinstance(row.get("prompt"), list):
        prompt, completion = _string_field(row, "prompt"), _string_field(row, "completion", required=False)
        _check_not_empty(prompt, "its prompt")
        return RowPrompt(prompt, tokenizer(prompt).input_ids, completion)
    if shape == "prompt/completion":  # (trained from the prompt's end on: the prompt is the prompt)
        _check_messages(row["prompt"], "prompt")
        if row.get("completion") is not None:
            _check_messages(row["completion"], "completion")
        prompt, answer = row["prompt"], (row.get("completion") or [None])[0]
    else:  # everything before the final assistant turn, or all of a conversation that ends asking
        messages = row["messages"] if shape == "chat" else _sharegpt_messages(row["conversations"])
        _check_messages(messages)
        answered = messages[-1]["role"] == "assistant"
        prompt, answer = (messages[:-1], messages[-1]) if answered else (messages, None)
        if not prompt:
            raise UserError("the conversation is one assistant turn: no prompt before it to complete")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("rows of messages need a tokenizer with a chat template, and this tokenizer has none")
    asked = next((m["content"] for m in reversed(prompt) if m["role"] != "assistant"), "")
    rendered = _render_chat(tokenizer, prompt, add_generation_prompt=True)
    _check_not_empty(rendered, "its prompt", f" (rendered through {template_named(tokenizer)})")
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    return RowPrompt(asked, ids, None if answer is None else answer["content"])


_THROUGH_TEMPLATE = " (rendered through the adapter's prompt template)"


def _check_not_empty(rendered: str, what: str, how: str = "") -> None:
    """Refuse a generation prompt that renders to nothing but whitespace (`what`: the prompt as
    the user knows it; `how`: how it was rendered), as `--prompt ""` is refused: from a BOS
    alone, where the tokenizer adds one, the model completes nothing in particular, and where
    it adds none there is no token to start from."""
    if not rendered.strip():
        raise UserError(f"{what} is empty{how}: nothing to complete from")


def _render_chat(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises its own errors (e.g. raise_exception for bad role order)
        raise UserError(f"{template_named(tokenizer)} rejected the messages ({type(e).__name__}: {e})") from None


def _assistant_spans(tokenizer, messages, text: str, first: str = "messages[0]") -> list[tuple[int, int]]:
    """Character spans [lo, hi) of the assistant turns in `text`, end-of-turn markup included.

    A turn starts where the rendering of the conversation before it plus the generation prompt
    ends, and ends where the rendering up to and including it ends. That holds only if the
    template renders each conversation prefix as a prefix of the full text; we check it rather
    than silently train on the wrong tokens.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:  # nothing before it to render (a template rejects an empty conversation)
            _check_answers_follow_a_turn(messages, first)
        before = _render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render_chat(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise UserError(f"{template_named(tokenizer)} does not render earlier turns as a prefix of the "
                            "whole conversation, so assistant turns cannot be located for label "
                            "masking (set train_on_inputs, or use another template)")
        spans.append((len(before), len(through)))
    return spans


def _past_answers(marked: list[bool], messages, skipped: int, tokenizer, prompt_len: int) -> list[bool]:
    """`marked` (the assistant mask of `messages`, a prompt of `prompt_len` messages and its
    completion) without its first `skipped` runs of marked tokens: those of the prompt's answers.
    Each run is one answer's {% generation %} block (a user turn's tokens lie between two
    answers); a template whose runs are not one per assistant turn cannot tell which answers are
    the completion's, and is refused (naming the empty answer where one is why: a block around
    the content alone marks nothing of it)."""
    if not skipped:
        return marked
    answers = sum(m["role"] == "assistant" for m in messages)
    if skipped == answers:  # a completion of no answer (a user turn, say): nothing of it is marked
        return [False] * len(marked)
    starts = [i for i, on in enumerate(marked) if on and (i == 0 or not marked[i - 1])]
    if len(starts) != answers:
        empty = next((i for i, m in enumerate(messages) if m["role"] == "assistant" and not m["content"]), None)
        if empty is not None and len(starts) < answers:
            where = f"prompt[{empty}]" if empty < prompt_len else f"completion[{empty - prompt_len}]"
            raise UserError(f"{where} is an empty assistant turn, of which {template_named(tokenizer)} marks no token "
                            f"with {{% generation %}}, so the completion's answers cannot be told from the prompt's "
                            f"(give it content or leave it out, or set train_on_inputs)")
        raise UserError(f"the {{% generation %}} blocks of {template_named(tokenizer)} mark "
                        f"{counted(len(starts), 'stretch')} of tokens for the conversation's "
                        f"{counted(answers, 'assistant turn')}, so the completion's answers cannot be told from the "
                        f"prompt's (set train_on_inputs, or use another template)")
    return [False] * starts[skipped] + marked[starts[skipped]:]


def _check_answers_follow_a_turn(messages, first: str) -> None:
    """Refuse a conversation that opens with an assistant turn (`first`: that turn as the row names it)."""
    if messages[0]["role"] == "assistant":
        raise UserError(f"{first} is an assistant turn: a conversation starts with a user (or system) "
                        "turn, the prompt its answers are learnt for (or set train_on_inputs)")


# --------------------------------------------------------------------------- padding


def pad_rows(examples: Sequence[Example], sides: Sequence[str], length: int,
             pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pad each example to `length` on its own side ("right" or "left").

    Rows of one fused batch may belong to adapters configured with different padding sides.
    Returns input_ids [B, length] long, labels [B, length] long (IGNORE_INDEX on padding) and
    attention_mask [B, length] bool (True on real tokens).
    """
    assert len(sides) == len(examples), f"{len(sides)} sides for {len(examples)} examples"
    starts = []
    for example, side in zip(examples, sides):
        n = len(example.input_ids)
        assert n <= length, f"example of {n} tokens does not fit in length {length}"
        assert len(example.labels) == n, "labels and input_ids differ in length"
        if side not in ("right", "left"):
            raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
        starts.append(0 if side == "right" else length - n)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # [B, L]
    for row, (example, start) in enumerate(zip(examples, starts)):
        ids, labs = example.tensors()
        input_ids[row, start:start + len(ids)] = ids
        labels[row, start:start + len(labs)] = labs
    begin = torch.tensor(starts, dtype=torch.long)[:, None]  # [B, 1]
    end = begin + torch.tensor([len(ex.input_ids) for ex in examples], dtype=torch.long)[:, None]
    cols = torch.arange(length)[None, :]  # [1, L]
    attention_mask = (cols >= begin) & (cols < end)  # [B, L] bool
    return input_ids, labels, attention_mask


def pad_batch(examples: Sequence[Example], length: int, pad_id: int,
              side: str = "right") -> tuple[Tensor, Tensor, Tensor]:
    """pad_rows with one side for every row."""
    return pad_rows(examples, [side] * len(examples), length, pad_id)
