"""mlora.data: loading rows, prompt templates, tokenization, label masking, padding."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mlora.data import (
    IGNORE_INDEX,
    Example,
    encode_row,
    encode_rows,
    load_rows,
    load_template,
    null_keys_error,
    pad_batch,
    pad_rows,
    row_prompt,
    row_shape,
    unread_keys_note,
)
from mlora.errors import UserError

MLORA_TEMPLATE = {
    "description": "m-LoRA style: the output sits inside the template.",
    "prompt": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Output:\n{output}\n",
    "prompt_no_input": "### Instruction:\n{instruction}\n\n### Output:\n{output}\n",
}


@pytest.fixture(scope="module")
def alpaca():
    return load_template("alpaca")


def trained(example: Example) -> list[int]:
    return [t for t in example.labels if t != IGNORE_INDEX]


def encode(row, tokenizer, template=None, cutoff_len=1024, train_on_inputs=False):
    template = template or load_template("alpaca")
    return encode_row(row, tokenizer, template, cutoff_len, train_on_inputs)


# --------------------------------------------------------------------------- load_rows


def test_load_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert load_rows(path) == [{"text": "a"}, {"text": "b"}]


def test_load_jsonl_breaks_lines_at_newlines_only(tmp_path):
    """U+2028, U+2029 and U+0085 may stand as they are in a JSON string (json.dumps with
    ensure_ascii=False leaves them): str.splitlines() broke such rows in two, "malformed JSON"."""
    rows = [{"text": "a\u2028b"}, {"instruction": "c\u2029d", "output": "e\x85f"}, {"text": "g"}]
    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps(rows[0], ensure_ascii=False) + "\r\n" + json.dumps(rows[1], ensure_ascii=False)
                      + "\r" + json.dumps(rows[2]) + "\n").encode())
    assert load_rows(path) == rows


def test_load_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, {"instruction": "x", "output": "y"}], indent=2))
    assert load_rows(str(path)) == [{"text": "a"}, {"instruction": "x", "output": "y"}]


def test_json_suffix_with_object_lines_reads_as_jsonl(tmp_path):
    # The format follows the content: a .json file whose first char is not '[' is JSONL.
    path = tmp_path / "d.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert len(load_rows(path)) == 2


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=rf"^{path}:4: malformed JSON \(") as err:
        load_rows(path)
    assert "\n" not in str(err.value)


def test_json_array_syntax_error_reports_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text" "b"}\n]\n')
    with pytest.raises(UserError, match=rf"^{path}:3:11: malformed JSON"):
        load_rows(path)


def test_parquet_rows_are_the_json_rows(tmp_path, tokenizer):
    """A Parquet table (Hugging Face datasets' format) gives the rows a JSONL file of them gives:
    Arrow's nulls for what a row lacks (a column it has not, a message field it has not) are
    dropped, so nothing reads or notes them; a null message stays, and is named."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "output": "e"},
            {"messages": [{"role": "user", "content": "hi", "name": "bob"}, {"role": "assistant", "content": "yo"}]}]
    columns = ("instruction", "input", "output", "messages")  # (as datasets writes them: every row every column)
    pq.write_table(pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows]),
                   tmp_path / "rows.parquet")
    got = load_rows(tmp_path / "rows.parquet")
    assert got == rows
    (tmp_path / "rows.parquet").rename(tmp_path / "ROWS.PARQUET")  # (its suffix in any case)
    assert load_rows(tmp_path / "ROWS.PARQUET") == rows
    assert unread_keys_note(got, tokenizer) == unread_keys_note(rows, tokenizer)
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": "hi"}, None]}]),
                   tmp_path / "null.parquet")
    with pytest.raises(UserError, match=r"messages\[1\] must be an object, got null"):
        encode(load_rows(tmp_path / "null.parquet")[0], tokenizer)
    (tmp_path / "fake.parquet").write_text('{"text": "a"}\n')
    with pytest.raises(UserError, match=r"fake\.parquet: cannot read it as Parquet \(") as err:
        load_rows(tmp_path / "fake.parquet")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="empty"):
        pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("text", pa.string())])), tmp_path / "empty.parquet")
        load_rows(tmp_path / "empty.parquet")


def test_json_nulls_are_what_a_row_lacks_as_parquet_nulls_are(tmp_path, tokenizer):
    """datasets' and pandas' JSON exports (Dataset.to_json, DataFrame.to_json(orient="records"))
    write every column in every row, null where the row has none: those rows were refused as
    mixing shapes, where the Parquet file of the same table trained. Null members are dropped
    as Parquet's are, at every depth; a null in a list stays (a message that is not an object),
    and a key twice is still named, null or not."""
    rows = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "output": "e"},
            {"messages": [{"role": "user", "content": "hi", "name": "bob"}, {"role": "assistant", "content": "yo"}]}]
    columns = ("instruction", "input", "output", "messages")
    exported = [{key: row.get(key) for key in columns} for row in rows]
    for row in exported[2:]:
        row["messages"] = [{"name": None, **m} for m in row["messages"]]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in exported))
    (tmp_path / "rows.json").write_text(json.dumps(exported, indent=1))
    for name in ("rows.jsonl", "rows.json"):
        got = load_rows(tmp_path / name)
        assert got == rows
        assert encode_rows(got, tokenizer, load_template("alpaca"), 1024, False) == \
            encode_rows(rows, tokenizer, load_template("alpaca"), 1024, False)
    (tmp_path / "null.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, null]}\n')
    with pytest.raises(UserError, match=r"messages\[1\] must be an object, got null"):
        encode(load_rows(tmp_path / "null.jsonl")[0], tokenizer)
    (tmp_path / "twice.jsonl").write_text('{"text": "a"}\n{"text": "a", "text": null}\n')
    with pytest.raises(UserError, match=r"twice\.jsonl:2: key 'text' appears twice"):
        load_rows(tmp_path / "twice.jsonl")


def test_a_row_unread_for_a_null_says_so(tmp_path, tokenizer, alpaca):
    """A null is what a row lacks, so {"text": null} was a row of no keys, refused as "unknown row
    shape (keys: none)", and an alpaca row's null output "missing 'output'": each names the null
    key, in the file and the row, from a JSONL file, a JSON array and a Parquet table alike. A
    file of questions (generate) may lack the answer: its null output is no error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cases = [({"text": None}, "'text' is null (a null counts as a missing key): the row is empty"),
             ({"text": None, "id": 4}, "'text' is null (a null counts as a missing key)"),  # (Parquet: no id read)
             ({"instruction": None, "input": "a", "output": "b"}, "'instruction' is null (a null counts as a missing "
                                                                  "key), and without it the row is of no shape"),
             ({"messages": None, "conversations": None, "text": None}, "'messages', 'conversations' and 'text' are "
                                                                        "null (a null counts as a missing key): the "
                                                                        "row is empty"),
             ({"instruction": "a", "output": None}, "'output' is null (a null counts as a missing key): the row "
                                                    "has no answer to learn"),
             ({"prompt": "a", "completion": None}, "'completion' is null")]
    for row, said in cases:
        rows = [{"text": "fine"}, row]
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in rows))
        (tmp_path / "d.json").write_text(json.dumps(rows))
        pq.write_table(pa.Table.from_pylist([row]), tmp_path / "d.parquet")  # (its columns: the row's)
        for name, place in (("d.jsonl", ":3"), ("d.json", ": row 2"), ("d.parquet", ": row 1")):
            path = tmp_path / name
            with pytest.raises(UserError) as err:
                encode_rows(load_rows(path), tokenizer, alpaca, 64, False, source=str(path))
            assert str(err.value).startswith(f"{path}{place}: {said}"), (name, str(err.value))
    assert null_keys_error({"instruction": "a"}, ("output",), answered=False) is None
    assert null_keys_error({"text": "a"}, ("instruction",)) is None  # (a text row: its null instruction is not read)


def test_parquet_reads_only_the_columns_a_row_shape_reads(tmp_path, monkeypatch, tokenizer):
    """A wide Parquet file (here an image and an embedding beside alpaca rows) loads the rows its
    text columns give, without reading the others (what pyarrow is asked for is spied on); the
    note still names them as it names a JSON row's unread keys (a misspelt "inptu" with its
    hint). A file of no column any shape reads is read whole: encoding's error shows its keys."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    from mlora.data import ROW_KEYS, unread_columns

    rows = [{"instruction": "a", "inptu": "b", "output": "c"}, {"instruction": "d", "inptu": "f", "output": "e"}]
    wide = [{**row, "image": bytes(4096), "embedding": [0.5] * 64} for row in rows]
    pq.write_table(pa.Table.from_pylist(wide), tmp_path / "wide.parquet")
    asked = []
    read_table = pq.read_table
    monkeypatch.setattr(pq, "read_table",
                        lambda path, columns=None: asked.append(columns) or read_table(path, columns=columns))
    got = load_rows(tmp_path / "wide.parquet")
    assert asked == [["instruction", "output"]]
    assert got == [{"instruction": "a", "output": "c"}, {"instruction": "d", "output": "e"}]
    assert unread_columns(tmp_path / "wide.parquet") == ["inptu", "image", "embedding"]
    json_rows = [{k: v for k, v in row.items() if v is not None} for row in wide]
    assert (unread_keys_note(got, tokenizer, unread_columns(tmp_path / "wide.parquet"))
            == unread_keys_note(json_rows, tokenizer))
    assert "'inptu' (2 rows; did you mean 'input'?)" in unread_keys_note(json_rows, tokenizer)
    assert set(ROW_KEYS) == {"instruction", "input", "output", "messages", "conversations", "prompt", "completion",
                             "text"}

    pq.write_table(pa.Table.from_pylist([{"question": "a", "answer": "b"}]), tmp_path / "odd.parquet")
    assert load_rows(tmp_path / "odd.parquet") == [{"question": "a", "answer": "b"}] and asked[-1] is None
    assert unread_columns(tmp_path / "odd.parquet") == []
    # input and output are read keys, but name no shape: a capitalised instruction beside them
    # reads the file whole, the error's keys and hint those of its JSON rows (they were input,
    # output only, no 'did you mean')
    odd = {"Instruction": "a", "input": "", "output": "b", "image": b"x"}
    pq.write_table(pa.Table.from_pylist([odd]), tmp_path / "capital.parquet")
    errors = []
    for rows in (load_rows(tmp_path / "capital.parquet"), [odd]):
        with pytest.raises(UserError) as err:
            row_shape(rows[0])
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "keys: Instruction, input, output, image" in errors[0], errors
    assert asked[-1] is None and unread_columns(tmp_path / "capital.parquet") == []
    # a column null in every row (Arrow's null type, or a typed one) is in no row the whole table
    # gives: not noted (it was, for every row); one null in some rows is, and a nested one (its
    # footer counts its leaves' nulls, not its rows')
    sparse = pa.table({"text": ["a", "b", "c"], "inptu": [None] * 3, "extra": pa.array([None] * 3, pa.string()),
                       "source": ["s", None, None],
                       "turns": pa.array([None] * 3, pa.list_(pa.struct([("role", pa.string())])))})
    pq.write_table(sparse, tmp_path / "sparse.parquet", row_group_size=2)
    assert unread_columns(tmp_path / "sparse.parquet") == ["source", "turns"]
    note = unread_keys_note(load_rows(tmp_path / "sparse.parquet"), tokenizer, ["source", "turns"])
    assert "inptu" not in note and "'source'" in note
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n')
    assert unread_columns(tmp_path / "rows.jsonl") == []


def test_a_parquet_prompt_files_adapter_column_is_read(tmp_path):
    """A --prompt_file row may name its adapter ("adapter"): a Parquet file's column of it is
    read as a JSON row's key is (only the shapes' columns were, and every row of the file went
    through every chosen adapter); a row whose adapter is null names none."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [{"instruction": "say hi", "adapter": "upper"}, {"instruction": "say bye"}]
    pq.write_table(pa.Table.from_pylist([{**row, "image": b"x"} for row in rows]), tmp_path / "prompts.parquet")
    assert load_rows(tmp_path / "prompts.parquet") == rows


def test_a_damaged_parquet_file_is_one_line(tmp_path, monkeypatch):
    """pyarrow's message for a damaged page spans lines (what it said for a file whose page
    bytes were overwritten); mlora's stays one line."""
    pq = pytest.importorskip("pyarrow.parquet")

    import pyarrow as pa

    def damaged(path, columns=None):
        raise OSError("Couldn't deserialize thrift: TProtocolException: Invalid data\nDeserializing page header "
                      "failed.\n")

    pq.write_table(pa.Table.from_pylist([{"text": "a"}]), tmp_path / "rows.parquet")  # (its footer reads)
    monkeypatch.setattr(pq, "read_table", damaged)
    with pytest.raises(UserError) as err:
        load_rows(tmp_path / "rows.parquet")
    assert str(err.value) == (f"{tmp_path / 'rows.parquet'}: cannot read it as Parquet (OSError: Couldn't "
                              "deserialize thrift: TProtocolException: Invalid data; "
                              "Deserializing page header failed.)")


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch):
    import sys

    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as without pyarrow
    with pytest.raises(UserError, match=r"rows\.parquet: reading Parquet files needs pyarrow \(pip install pyarrow\)"):
        load_rows(tmp_path / "rows.parquet")


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl: no such file"):
        load_rows(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("content", ["", "\n  \n", "[]"])
def test_empty_dataset(tmp_path, content):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(UserError, match=rf"^{path}: .*empty"):
        load_rows(path)


def test_non_object_rows(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(UserError, match=rf"^{jsonl}:2: expected a JSON object, got an array"):
        load_rows(jsonl)
    array = tmp_path / "d.json"
    array.write_text('[{"text": "a"}, "b"]')
    with pytest.raises(UserError, match=rf"^{array}: row 2: expected a JSON object, got a string"):
        load_rows(array)


DUPLICATES = [  # (file name, content, where the message places the duplicate)
    ("d.jsonl", '{"text": "a"}\n\n{"instruction": "a", "instruction": "b", "output": "c"}\n',
     ":3: key 'instruction'"),
    ("d.jsonl", '{"messages": [{"role": "user", "content": "a"},'
                ' {"role": "assistant", "content": "b", "content": "c"}]}\n', ":1: messages[1]: key 'content'"),
    ("d.json", '[{"text": "a"},\n {"instruction": "a", "output": "b", "output": "c"}]', ": row 2: key 'output'"),
    ("d.json", '[{"text": "a"}, {"text": "b", "meta": {"k": 1}},\n'
               ' {"messages": [{"role": "user", "role": "x", "content": "a"}]}]', ": row 3: messages[0]: key 'role'"),
    # a duplicate inside the value json then drops for a later one of the same key: the outer one
    ("d.json", '[{"text": "a"}, {"text": "b", "meta": {"k": 1, "k": 2}, "meta": 3}]', ": row 2: key 'meta'"),
    ("d.jsonl", '{"text": "b", "m": [{"n": {"k": 1, "k": 2}, "n": 0}], "m": 3}\n', ":1: key 'm'"),
]


@pytest.mark.parametrize("name,content,where", DUPLICATES)
def test_a_key_twice_in_one_object_is_an_error(tmp_path, name, content, where):
    """json keeps the last of two equal keys without a word: the row would train on one of them."""
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError) as err:
        load_rows(path)
    assert str(err.value) == f"{path}{where} appears twice in the same JSON object"


def test_equal_keys_in_different_objects_are_no_duplicate(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"instruction": "a", "input": "b", "output": "c", "meta": {"instruction": 1, "output": [{"output": 2}]}}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    assert load_rows(path) == rows


# --------------------------------------------------------------------------- templates


def test_builtin_alpaca_template(alpaca):
    assert alpaca.prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert alpaca.prompt.endswith("### Input:\n{input}\n\n### Response:\n")
    assert "{input}" not in alpaca.prompt_no_input
    assert alpaca.prompt_no_input.endswith("### Instruction:\n{instruction}\n\n### Response:\n")
    prompt, suffix = alpaca.render("Say hi", "")
    assert prompt.endswith("### Instruction:\nSay hi\n\n### Response:\n") and suffix == ""
    prompt, _ = alpaca.render("Say hi", "to Bob")
    assert "### Input:\nto Bob\n\n### Response:\n" in prompt


def test_a_builtin_name_is_the_builtin_wherever_mlora_runs(tmp_path, monkeypatch, alpaca):
    """A file named "alpaca" in the working directory does not replace the builtin (the config
    takes the name as the builtin and resolves no path for it); as a path it still can."""
    import json

    from mlora.data import load_template

    (tmp_path / "alpaca").write_text(json.dumps({"prompt": "X {instruction} {input}",
                                                 "prompt_no_input": "X {instruction}"}))
    monkeypatch.chdir(tmp_path)
    assert load_template("alpaca") == alpaca
    assert load_template("./alpaca").prompt.startswith("X ")


def test_mlora_template_file_with_output_placeholder(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(MLORA_TEMPLATE))
    template = load_template(str(path))
    assert template.prompt == MLORA_TEMPLATE["prompt"]
    assert template.render("do it", None) == ("### Instruction:\ndo it\n\n### Output:\n", "\n")
    assert template.render("do it", "with x") == (
        "### Instruction:\ndo it\n\n### Input:\nwith x\n\n### Output:\n", "\n")


def test_alpaca_lora_keys_accepted(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"prompt_input": "I: {instruction} N: {input} R:",
                                "prompt_no_input": "I: {instruction} R:", "response_split": "R:"}))
    assert load_template(str(path)).prompt == "I: {instruction} N: {input} R:"


def test_template_errors(tmp_path):
    with pytest.raises(UserError, match="no-such-template"):
        load_template("no-such-template")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"prompt": ')
    with pytest.raises(UserError, match=rf"^{bad_json}:1:\d+: malformed JSON"):
        load_template(str(bad_json))
    missing = tmp_path / "missing.json"
    missing.write_text('{"prompt": "{instruction} {input}"}')
    with pytest.raises(UserError, match=rf"^{missing}: .*prompt_no_input"):
        load_template(str(missing))
    twice = tmp_path / "twice.json"
    twice.write_text('{"prompt": "{instruction} {input}", "prompt_no_input": "{instruction}", '
                     '"prompt": "{instruction}"}')
    with pytest.raises(UserError) as err:
        load_template(str(twice))
    assert str(err.value) == f"{twice}: key 'prompt' appears twice in the same JSON object"


def test_a_misspelt_placeholder_is_refused(tmp_path):
    """{inptu} or {Output} stayed in every rendered prompt as text, without a word (alpaca-lora's
    and m-LoRA's str.format fail on it); a braced word unlike the placeholders stays literal."""
    for key, text, word, meant in (("prompt", "{instruction} {inptu} {input}", "inptu", "input"),
                                   ("prompt_no_input", "{instruction}\n{Output}", "Output", "output")):
        template = {"prompt": "{instruction} {input}", "prompt_no_input": "{instruction}", key: text}
        path = tmp_path / f"{word}.json"
        path.write_text(json.dumps(template))
        with pytest.raises(UserError) as err:
            load_template(str(path))
        assert str(err.value) == (f"{path}: '{key}' has a placeholder {{{word}}}; did you mean {{{meant}}}? (the "
                                  "placeholders are {instruction}, {input} and {output})")
    literal = tmp_path / "literal.json"
    literal.write_text(json.dumps({"prompt": "{instruction} {input} {name}", "prompt_no_input": "{instruction} {x}"}))
    assert load_template(str(literal)).render("a", "b")[0] == "a b {name}"


def test_braces_in_user_text_stay_literal(tokenizer, alpaca):
    row = {"instruction": "fill {input} and {0} and {", "input": "x {instruction} }",
           "output": "{output} {}"}
    prompt, suffix = alpaca.render(row["instruction"], row["input"])
    assert "### Instruction:\nfill {input} and {0} and {\n\n### Input:\nx {instruction} }\n" in prompt
    example = encode(row, tokenizer, alpaca)
    assert tokenizer.decode(trained(example)) == "{output} {}</s>"


def test_a_template_renders_as_str_format_renders_it(tmp_path):
    """alpaca-lora and m-LoRA render these templates with str.format, where "{{" and "}}" are one
    brace and "{{input}}" is the text "{input}"; mlora kept them doubled (and filled or split at
    "{{input}}", "{{output}}"), so the same template trained on other tokens here."""
    instruction, input = "do {x}", "with }{ {input}"  # (the row's braces stay as written)
    for prompt, no_input in (("{{{instruction}}} {{input}}: {input}", "JSON: {{{{\"a\": {instruction}}}}}"),
                             ("{instruction}{{output}}\n{input}}}{{", "{{instruction}} {instruction}"),
                             ("{{x}} {instruction} {input}", "{{inptu}} {instruction}")):
        path = tmp_path / "t.json"
        path.write_text(json.dumps({"prompt": prompt, "prompt_no_input": no_input}))
        template = load_template(str(path))
        assert template.render(instruction, input) == (prompt.format(instruction=instruction, input=input), "")
        assert template.render(instruction, None) == (no_input.format(instruction=instruction), "")
    path.write_text(json.dumps({"prompt": "{instruction} {input} {{output}} {output}.{{}}",
                                "prompt_no_input": "{instruction}"}))
    assert load_template(str(path)).render("a", "b") == ("a b {output} ", ".{}")
    for prompt, missing in (("{{instruction}} {input}", "instruction"), ("{instruction} {{input}}", "input")):
        path.write_text(json.dumps({"prompt": prompt, "prompt_no_input": "{instruction}"}))
        with pytest.raises(UserError, match=rf"'prompt' has no {{{missing}}} placeholder"):
            load_template(str(path))


def test_a_conversion_or_format_spec_applies_as_str_format_applies_it(tmp_path, tokenizer):
    """{input!r} or {instruction:.20} stayed in every prompt as text, where alpaca-lora's and
    m-LoRA's str.format apply them: rendered as str.format renders them, on both sides of the
    {output} split (the labels train the answer and what follows it, exactly); one that str.format
    refuses, or one on {output} (the answer's place, not a value), is one line naming it."""
    instruction, input = "do {x} \u00fc", "with 'q' }{"
    path = tmp_path / "t.json"
    for prompt, no_input in (("{instruction!r} {input:>30}|", "{instruction:.3}"),
                             ("{input!a:*^30} {instruction!s:<12}.{input:}", "{instruction!r:_>20}"),
                             ("{{input:>3}} {instruction} {input!r}", "{{instruction!r}} {instruction}")):
        path.write_text(json.dumps({"prompt": prompt, "prompt_no_input": no_input}))
        template = load_template(str(path))
        assert template.render(instruction, input) == (prompt.format(instruction=instruction, input=input), "")
        assert template.render(instruction, None) == (no_input.format(instruction=instruction), "")
    prompt = "### {instruction!r:.6}\n{input:>14}\n### Answer: {output}\n({input!a})"
    path.write_text(json.dumps({"prompt": prompt, "prompt_no_input": "{instruction}"}))
    template = load_template(str(path))
    before, after = (part.format(instruction=instruction, input=input) for part in prompt.split("{output}"))
    assert template.render(instruction, input) == (before, after)
    example = encode({"instruction": instruction, "input": input, "output": "yes"}, tokenizer, template)
    assert tokenizer.decode(example.input_ids, skip_special_tokens=True) == prompt.format(
        instruction=instruction, input=input, output="yes")
    assert example.input_ids[:len(tokenizer(before).input_ids)] == tokenizer(before).input_ids
    assert tokenizer.decode(trained(example)) == f"yes{after}</s>"
    for written, said in (("{output!r}", "{output} marks where the answer goes"),
                          ("{input!x}", "the conversion must be !r, !s or !a"),
                          ("{input:d}", "Unknown format code 'd'"),
                          ("{input: e.g. this}", "not a format spec str.format takes for text")):
        path.write_text(json.dumps({"prompt": "{instruction} {input} " + written, "prompt_no_input": "{instruction}"}))
        with pytest.raises(UserError) as err:
            load_template(str(path))
        message = str(err.value)
        assert message.startswith(f"{path}: 'prompt' has {written}: ") and said in message and "\n" not in message


@pytest.mark.parametrize("written,said", [
    ("{input:{w}}", "a format spec cannot hold a field (str.format's nested fields); write the spec out, as in "
                    "{input:>20}"),
    ("{instruction!r:{input}}", "a format spec cannot hold a field"),
    ("{input.upper}", "mlora fills a placeholder by its name alone, and str.format would read an attribute of the "
                      "row's text; write {input}"),
    ("{input.__class__}", "str.format would read an attribute of the row's text; write {input}"),
    ("{instruction[0]}", "str.format would read an index of the row's text; write {instruction}"),
    ("{output[-1]}", "str.format would read an index of the row's text; write {output}"),
])
def test_a_placeholders_attribute_index_or_nested_spec_is_refused(tmp_path, written, said):
    """str.format reads a placeholder's attribute or index off the row's text ({input.upper},
    {input[0]}) and fills a field nested in a format spec ({input:{w}}); mlora left each in every
    prompt as text ({input:{w}}'s {input} unfilled), where alpaca-lora's and m-LoRA's str.format
    read them. One line names the file, the key and the field as written, before a missing
    placeholder is (the only {instruction} may be the one written so)."""
    path = tmp_path / "t.json"
    for key in ("prompt", "prompt_no_input"):
        template = {"prompt": "{instruction} {input}", "prompt_no_input": "{instruction}"}
        template[key] += f"\n{written}!"
        path.write_text(json.dumps(template))
        with pytest.raises(UserError) as err:
            load_template(str(path))
        assert str(err.value).startswith(f"{path}: '{key}' has {written}: ") and said in str(err.value)
        assert "\n" not in str(err.value)
    path.write_text(json.dumps({"prompt": f"{written} {{input}}", "prompt_no_input": "{instruction}"}))
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: 'prompt' has {re.escape(written)}: "):
        load_template(str(path))


def test_positional_fields_stay_as_written_and_are_named_where_placeholders_lack(tmp_path):
    """{}, {0} or {:>9} is a positional field in str.format, which mlora does not fill: it stays as
    written, as other braced words do ({} is also JSON's empty object in an example); a template of
    them (Unsloth writes its alpaca prompt so, filled in order) lacks {instruction} or {input},
    and that error names them and says to name the placeholders."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"prompt": "{instruction} {input} {} {0} {:>9} {0.real} {[0]}",
                                "prompt_no_input": "{instruction} {1!r}"}))
    template = load_template(str(path))
    assert template.render("a", "b") == ("a b {} {0} {:>9} {0.real} {[0]}", "")
    assert template.render("a", None) == ("a {1!r}", "")
    unsloth = "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}"
    path.write_text(json.dumps({"prompt": unsloth, "prompt_no_input": "{instruction}"}))
    with pytest.raises(UserError) as err:
        load_template(str(path))
    assert str(err.value) == (f"{path}: 'prompt' has no {{instruction}} placeholder ({{}} is a positional field, "
                              "which mlora does not fill: name the placeholders {instruction}, {input} and {output})")
    path.write_text(json.dumps({"prompt": "{instruction} {0} {1:>3}", "prompt_no_input": "{instruction}"}))
    with pytest.raises(UserError) as err:
        load_template(str(path))
    assert str(err.value).startswith(f"{path}: 'prompt' has no {{input}} placeholder ({{0}}, {{1:>3}} are "
                                     "positional fields, which mlora does not fill: name the placeholders")


def test_braced_text_that_names_no_placeholder_stays_as_written(tmp_path):
    """Only a placeholder's attribute, index or nested spec is refused: other braced text, an
    escaped field and an unclosed one stay as written, as {name} does."""
    path = tmp_path / "t.json"
    prompt = "{instruction} {input} {x.y} {x[0]} {x:{y}} {{input.upper}} {{0}} {input x} {input"
    path.write_text(json.dumps({"prompt": prompt, "prompt_no_input": "{instruction} {{}}"}))
    template = load_template(str(path))
    assert template.render("a", "b") == ("a b {x.y} {x[0]} {x:{y}} {input.upper} {0} {input x} {input", "")
    assert template.render("a", None) == ("a {}", "")


def test_a_lone_brace_in_a_template_stays_as_written(tmp_path):
    """str.format refuses a lone "{" or "}"; mlora keeps it, as it keeps other braced words, so a
    template with JSON or code in its text still loads (and renders as it did before)."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"prompt": 'Reply {"a": 1} } {instruction} {input}',
                                "prompt_no_input": "{ {instruction}"}))
    template = load_template(str(path))
    assert template.render("x", "y") == ('Reply {"a": 1} } x y', "")
    assert template.render("x", None) == ("{ x", "")


# --------------------------------------------------------------------------- alpaca rows


def test_alpaca_labels_mask_exactly_the_prompt(tokenizer, alpaca):
    row = {"instruction": "reverse the words", "input": "the lazy dog", "output": "dog lazy the"}
    example = encode(row, tokenizer, alpaca)
    prompt_text, _ = alpaca.render(row["instruction"], row["input"])
    prompt_ids = tokenizer(prompt_text).input_ids
    target_ids = tokenizer("dog lazy the", add_special_tokens=False).input_ids
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert example.input_ids == prompt_ids + target_ids + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + target_ids + [tokenizer.eos_token_id]
    assert example.labels[-1] == tokenizer.eos_token_id
    assert example.num_label_tokens == len(target_ids) + 1


def sentencepiece_style_tokenizer():
    """A tokenizer spelling a word's start with "▁" as Llama 2's does (its normalizer prepends
    one to the text and turns spaces into it; byte fallback for the newline), built here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([load_template("alpaca").prompt_no_input, "Bonjour the quick brown fox"] * 10,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_alpaca_output_is_tokenized_as_it_follows_the_prompt(tokenizer, alpaca, tmp_path):
    """The output's tokens are those of the whole row past the prompt's (alpaca-lora tokenizes the
    row whole): tokenized alone, a SentencePiece tokenizer began it with a word-start "▁", and
    every answer was trained as "\n▁Bonjour". Where the join merges tokens across the prompt's
    end (a template ending in a space), the prompt keeps its own tokens: what generation feeds."""
    sp = sentencepiece_style_tokenizer()
    row = {"instruction": "Translate to French.", "output": "Bonjour"}
    prompt_text = alpaca.render(row["instruction"], None)[0]
    prompt_ids, whole = sp(prompt_text).input_ids, sp(prompt_text + "Bonjour").input_ids
    assert whole[:len(prompt_ids)] == prompt_ids and sp.convert_ids_to_tokens(whole[len(prompt_ids)])[0] != "▁"
    example = encode(row, sp, alpaca)
    assert example.input_ids == whole + [sp.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + whole[len(prompt_ids):] + [sp.eos_token_id]
    # a template ending in a space: " the" is one token of the whole; the prompt stays its own
    path = tmp_path / "spaced.json"
    path.write_text(json.dumps({"prompt": "Q: {instruction} {input} A: ", "prompt_no_input": "Q: {instruction} A: "}))
    spaced = load_template(str(path))
    prompt_ids = tokenizer("Q: add A: ").input_ids
    assert tokenizer("Q: add A: the").input_ids[:len(prompt_ids)] != prompt_ids  # (the join merges)
    example = encode({"instruction": "add", "output": "the"}, tokenizer, spaced)
    assert example.input_ids[:len(prompt_ids)] == prompt_ids
    assert trained(example) == tokenizer("the", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def test_alpaca_output_ending_in_eos_gets_no_second_one(tokenizer, alpaca):
    """An output written ending in the EOS token (a dataset made for a Llama 2 model, "...</s>")
    ends in one EOS, trained, as alpaca-lora and TRL's completions have it; it got a second."""
    plain = encode({"instruction": "count", "output": "one two"}, tokenizer, alpaca)
    ending = encode({"instruction": "count", "output": "one two" + tokenizer.eos_token}, tokenizer, alpaca)
    assert ending == plain and ending.input_ids.count(tokenizer.eos_token_id) == 1


def test_alpaca_without_input_uses_no_input_prompt(tokenizer, alpaca):
    for row in ({"instruction": "count", "output": "one two"},
                {"instruction": "count", "input": "", "output": "one two"}):
        example = encode(row, tokenizer, alpaca)
        text = tokenizer.decode(example.input_ids)
        assert "### Input:" not in text
        assert text.endswith("### Response:\none two</s>")


def test_alpaca_train_on_inputs(tokenizer, alpaca):
    row = {"instruction": "reverse", "input": "a b", "output": "b a"}
    example = encode(row, tokenizer, alpaca, train_on_inputs=True)
    assert example.labels == example.input_ids
    assert example.num_label_tokens == len(example.input_ids) - 1


def test_mlora_template_suffix_is_trained(tokenizer, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(MLORA_TEMPLATE))
    example = encode({"instruction": "add", "input": "1 2", "output": "3"}, tokenizer,
                     load_template(str(path)))
    assert tokenizer.decode(trained(example)) == "3\n</s>"
    assert tokenizer.decode(example.input_ids).endswith("### Output:\n3\n</s>")


def test_alpaca_field_types_checked(tokenizer, alpaca):
    with pytest.raises(UserError, match="'output'"):
        encode({"instruction": "x"}, tokenizer, alpaca)
    with pytest.raises(UserError, match="'input' must be a string"):
        encode({"instruction": "x", "input": 3, "output": "y"}, tokenizer, alpaca)


# --------------------------------------------------------------------------- chat rows

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "one two"},
    {"role": "assistant", "content": "three four"},
    {"role": "user", "content": "five six"},
    {"role": "assistant", "content": "seven eight"},
]


def trained_segments(tokenizer, example: Example) -> list[str]:
    """Decode each maximal run of trained tokens."""
    runs, current = [], []
    for tok, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == tok
            current.append(tok)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_chat_trains_only_assistant_turns(tokenizer):
    example = encode({"messages": CHAT}, tokenizer)
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    # The whole rendering, untouched (no BOS added), then the appended EOS.
    assert example.input_ids[:-1] == tokenizer(text, add_special_tokens=False).input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert trained_segments(tokenizer, example) == [
        "three four<|im_end|>\n",
        "seven eight<|im_end|>\n</s>",
    ]
    decoded_masked = tokenizer.decode([t for t, l in zip(example.input_ids, example.labels)
                                       if l == IGNORE_INDEX])
    assert "be brief" in decoded_masked and "one two" in decoded_masked and "five six" in decoded_masked


def test_chat_single_turn(tokenizer):
    messages = CHAT[1:3]
    example = encode({"messages": messages}, tokenizer)
    assert trained_segments(tokenizer, example) == ["three four<|im_end|>\n</s>"]
    assert example.labels[0] == IGNORE_INDEX


def test_chat_no_eos_when_last_turn_is_not_assistant(tokenizer):
    example = encode({"messages": CHAT[:4]}, tokenizer)
    assert example.input_ids[-1] != tokenizer.eos_token_id
    assert trained_segments(tokenizer, example) == ["three four<|im_end|>\n"]


def test_chat_no_extra_eos_when_template_writes_it(tokenizer):
    # A template whose end-of-turn token is EOS itself (as in Qwen's <|im_end|>) needs no extra EOS.
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    example = encode({"messages": CHAT[1:3]}, tok)
    assert trained_segments(tok, example) == ["three four</s>"]
    assert trained(example).count(tok.eos_token_id) == 1
    assert example.input_ids[-2:] != [tok.eos_token_id] * 2


def test_chat_train_on_inputs(tokenizer):
    example = encode({"messages": CHAT}, tokenizer, train_on_inputs=True)
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_chat_errors(tokenizer):
    with pytest.raises(UserError, match=r"messages\[1\]\.content must be a string"):
        encode({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]},
               tokenizer)
    with pytest.raises(UserError, match="non-empty list"):
        encode({"messages": []}, tokenizer)
    # Was the template's own "empty conversation" error, naming nothing the user wrote.
    with pytest.raises(UserError, match=r"messages\[0\] is an assistant turn"):
        encode({"messages": [{"role": "assistant", "content": "hi"}]}, tokenizer)
    assert encode({"messages": [{"role": "assistant", "content": "hi"}]}, tokenizer, train_on_inputs=True)
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        encode({"messages": CHAT}, tok)



def test_sharegpt_rows_are_chat_rows_under_other_names(tokenizer):
    """ShareGPT's {"conversations": [{"from", "value"}]}, its keys renamed as TRL renames them,
    and "human" -> user, "gpt" -> assistant (TRL keeps those names), other roles as they are,
    other keys kept: the tokens and labels of the same conversation as a chat row."""
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    turns = [{"from": names[m["role"]], "value": m["content"]} for m in CHAT]
    for train_on_inputs in (False, True):
        got = encode({"conversations": turns}, tokenizer, train_on_inputs=train_on_inputs)
        assert got == encode({"messages": CHAT}, tokenizer, train_on_inputs=train_on_inputs)
    # roles spelt as chat messages spell them pass through
    spelt = [{"from": m["role"], "value": m["content"]} for m in CHAT]
    assert encode({"conversations": spelt}, tokenizer) == encode({"messages": CHAT}, tokenizer)
    with pytest.raises(UserError, match=r"conversations\[1\]\.value must be a string, got a number"):
        encode({"conversations": [turns[1], {"from": "gpt", "value": 5}]}, tokenizer)
    with pytest.raises(UserError, match=r"conversations\[0\]\.from must be a string, got nothing"):
        encode({"conversations": [{"role": "user", "value": "a"}]}, tokenizer)
    with pytest.raises(UserError, match="'conversations' must be a non-empty list"):
        encode({"conversations": []}, tokenizer)
    # named as the row names it (it said messages[0], a key the row has not)
    with pytest.raises(UserError, match=r"^conversations\[0\] \(from 'gpt'\) is an assistant turn"):
        encode({"conversations": turns[2:]}, tokenizer)


def test_prompt_completion_strings_are_tokenized_as_trl_does(tokenizer):
    """TRL's prompt-completion row: the completion gets the EOS token unless it ends with it,
    prompt + completion are tokenized together, and the tokens past the prompt's own tokens are
    trained (SFTTrainer with completion_only_loss)."""
    eos = tokenizer.eos_token
    for prompt, completion in (("the quick brown", " fox jumps"), ("reverse the words", " please" + eos),
                               ("the quick bro", "wn fox")):  # (the last: the join merges tokens; TRL cuts anyway)
        full = completion if completion.endswith(eos) else completion + eos
        ids = tokenizer(prompt + full).input_ids
        cut = len(tokenizer(prompt).input_ids)
        got = encode({"prompt": prompt, "completion": completion}, tokenizer)
        assert got.input_ids == ids and got.labels == [IGNORE_INDEX] * cut + ids[cut:]
        assert got.input_ids.count(tokenizer.eos_token_id) == 1
        assert encode({"prompt": prompt, "completion": completion}, tokenizer, train_on_inputs=True).labels == ids
    with pytest.raises(UserError, match="missing 'completion'"):
        encode({"prompt": "a"}, tokenizer)
    with pytest.raises(UserError, match="'completion' must be a string, got a number"):
        encode({"prompt": "a", "completion": 3}, tokenizer)


def test_prompt_completion_messages_train_the_completions_turns(tokenizer):
    """Two lists of messages: the prompt's rendering with the generation prompt is not trained,
    the rest of the conversation's is (TRL's cut); one assistant turn trains exactly as that
    chat row does (the EOS appended after it too), several completion turns all train."""
    got = encode({"prompt": CHAT[:2], "completion": CHAT[2:3]}, tokenizer)
    assert got == encode({"messages": CHAT[:3]}, tokenizer)
    whole = encode({"prompt": CHAT[:2], "completion": CHAT[2:]}, tokenizer)
    assert trained_segments(tokenizer, whole) == ["three four<|im_end|>\n<|im_start|>user\nfive six<|im_end|>\n"
                                                  "<|im_start|>assistant\nseven eight<|im_end|>\n</s>"]
    assert encode({"prompt": CHAT[:2], "completion": CHAT[2:]}, tokenizer, train_on_inputs=True).labels == \
        whole.input_ids
    with pytest.raises(UserError, match="'completion' must be a non-empty list of {role, content} objects like the "
                                        "other one, got a string"):
        encode({"prompt": CHAT[:2], "completion": "three four"}, tokenizer)
    with pytest.raises(UserError, match=r"prompt\[1\]\.content must be a string"):
        encode({"prompt": [CHAT[0], {"role": "user"}], "completion": CHAT[2:3]}, tokenizer)

def test_prompt_completion_messages_refuse_a_prompt_the_whole_does_not_start_with(tokenizer):
    """A template whose generation prompt is not how it starts an answered turn (DeepSeek-R1's adds
    "<think>\n" to the one, not the other): the prompt's tokens are no prefix of the whole, and the
    cut at their count took the completion's first tokens off its labels without a word. Refused
    in one line, as the chat row of the same conversation is."""
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    with pytest.raises(UserError, match="does not render the prompt .* as a prefix of the whole conversation"):
        encode({"prompt": CHAT[1:2], "completion": CHAT[2:3]}, tok)
    with pytest.raises(UserError, match="does not render earlier turns as a prefix"):
        encode({"messages": CHAT[1:3]}, tok)
    # every token trained: nothing to locate
    whole = encode({"prompt": CHAT[1:2], "completion": CHAT[2:3]}, tok, train_on_inputs=True)
    assert whole.labels == whole.input_ids


# A ChatML template that renders the last assistant turn with an (empty) think block and earlier
# ones without, as Qwen3's does (its generation prompt without thinking too), and marks what the
# assistant says with {% generation %}.
QWEN3_LIKE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}"
    "{% if loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
)
SMOLLM2 = Path("/root/.cache/mlora/smollm2-135m-instruct")


@pytest.fixture(params=["tiny", "smollm2"])
def real_tokenizers(request, tokenizer):
    """The tests' tokenizer (EOS </s>, not its end-of-turn token) and the demo base's (SmolLM2's
    ChatML, whose EOS is <|im_end|>), where it is on this machine."""
    if request.param == "tiny":
        return tokenizer
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"{SMOLLM2} is not on this machine (mlora demo fetches it)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM2)


def test_a_generation_tagged_template_trains_transformers_assistant_mask(real_tokenizers):
    """A template with {% generation %} blocks: the trained tokens are those transformers'
    apply_chat_template(return_assistant_tokens_mask=True) marks, every other label ignored (an
    EOS appended and trained where no trained token is EOS, as for any chat row). A multi-turn
    conversation whose template renders earlier answers otherwise than the last (Qwen3's think
    block) is refused without the tags and trains with them; ShareGPT and prompt/completion rows
    of the conversation are that chat row."""
    tok = real_tokenizers
    tagged = copy.copy(tok)
    tagged.chat_template = QWEN3_LIKE
    untagged = copy.copy(tok)
    untagged.chat_template = re.sub(r"\{% (end)?generation %\}", "", QWEN3_LIKE)
    with pytest.raises(UserError, match="does not render earlier turns as a prefix"):
        encode({"messages": CHAT}, untagged)
    reference = tagged.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(reference["input_ids"]), reference["assistant_masks"]
    example = encode({"messages": CHAT}, tagged)
    eos = tok.eos_token_id
    appended = [] if any(i == eos and m for i, m in zip(ids, mask)) else [eos]
    assert example.input_ids == ids + appended
    assert example.labels == [i if m else IGNORE_INDEX for i, m in zip(ids, mask)] + appended
    assert trained_segments(tok, example) == ["three four<|im_end|>",
                                              "<think>\n\n</think>\n\nseven eight<|im_end|>" + tok.decode(appended)]
    # every token trained: the mask is not asked for
    assert encode({"messages": CHAT}, tagged, train_on_inputs=True).labels == ids + appended
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    sharegpt = [{"from": names[m["role"]], "value": m["content"]} for m in CHAT]
    assert encode({"conversations": sharegpt}, tagged) == example
    assert encode({"prompt": CHAT[:2], "completion": CHAT[2:]}, tagged) == example
    # A prompt holding answers: theirs are not trained, the completion's are (its marked tokens only)
    for cut in (3, 4):  # (3: its last answer renders otherwise in the whole: no prefix of it)
        got = encode({"prompt": CHAT[:cut], "completion": CHAT[cut:]}, tagged)
        assert got.input_ids == example.input_ids
        assert trained_segments(tok, got) == trained_segments(tok, example)[1:]
    # two answers marked as one stretch (blocks back to back): which is the completion's cannot be told
    joined = copy.copy(tok)
    joined.chat_template = QWEN3_LIKE.replace("{% endgeneration %}\n", "{% endgeneration %}").replace(
        "<|im_start|>assistant\n{% generation %}", "{% generation %}<|im_start|>assistant\n")
    with pytest.raises(UserError, match=r"^the \{% generation %\} blocks of the chat template mark 1 stretch of "
                                        r"tokens for the conversation's 2 assistant turns"):
        encode({"prompt": CHAT[1:3], "completion": CHAT[2:3]}, joined)
    with pytest.raises(UserError, match=r"messages\[0\] is an assistant turn"):
        encode({"messages": CHAT[2:]}, tagged)


def test_a_generation_tagged_completion_without_an_answer_trains_nothing(tokenizer):
    """A prompt/completion row whose prompt holds answers and whose completion holds none (a user
    turn): no marked token is the completion's, so none is trained (as where the prompt holds no
    answer either), and no EOS is appended (the row ends with a user turn); not an IndexError."""
    tagged = copy.copy(tokenizer)
    tagged.chat_template = QWEN3_LIKE
    completion = [{"role": "user", "content": "nine ten"}]
    for prompt in (CHAT[:3], CHAT[:2]):  # (answers in the prompt; none)
        got = encode({"prompt": prompt, "completion": completion}, tagged)
        assert got.input_ids == list(tagged.apply_chat_template(prompt + completion, tokenize=True,
                                                                return_dict=True)["input_ids"])
        assert got.labels == [IGNORE_INDEX] * len(got.input_ids)


def test_an_empty_answer_a_generation_block_marks_nothing_of_is_named(tokenizer, tmp_path):
    """A template whose {% generation %} block holds the answer's text alone marks nothing of an
    empty answer, so a prompt holding one has a stretch fewer than answers: the one-line error
    names that turn, the template's file and its adapter (encode_rows adds the data file and
    row), not a count of stretches."""
    from mlora.chat_template import with_chat_template
    from mlora.data import encode_rows, load_template

    path = tmp_path / "text_only.jinja"
    path.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                    "{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
                    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    own = with_chat_template(tokenizer, str(path), ["a"])
    empty = [*CHAT[:2], dict(CHAT[2], content="")]
    with pytest.raises(UserError) as err:
        encode_rows([{"prompt": empty, "completion": CHAT[3:]}], own, load_template("alpaca"), 128, False,
                    source="chat.jsonl")
    assert str(err.value) == (
        f"chat.jsonl: row 1: prompt[2] is an empty assistant turn, of which the chat template {path} of adapter 'a' "
        "marks no token with {% generation %}, so the completion's answers cannot be told from the prompt's (give "
        "it content or leave it out, or set train_on_inputs)")
    assert encode({"prompt": CHAT[:3], "completion": CHAT[3:]}, own).labels.count(IGNORE_INDEX) > 0  # (with content)


def test_errors_of_an_adapters_chat_template_name_its_file(tokenizer, tmp_path):
    """Adapters may share a data file and render it through different templates: where an
    adapter's own chat_template rejects a conversation, or renders earlier turns otherwise than
    the whole, the one-line error names that file (train's rows and generate's prompts alike);
    the tokenizer's own template is "the chat template" still."""
    from mlora.chat_template import with_chat_template
    from mlora.data import prompt_tokens, row_prompt

    rejecting, unmarked = tmp_path / "rejecting.jinja", tmp_path / "unmarked.jinja"
    rejecting.write_text("{{ raise_exception('no such turns') }}")
    unmarked.write_text(re.sub(r"\{% (end)?generation %\}", "", QWEN3_LIKE))
    own = with_chat_template(tokenizer, str(rejecting))
    said = f"the chat template {rejecting} rejected the messages (TemplateError: no such turns)"
    for call in (lambda: encode({"messages": CHAT}, own), lambda: row_prompt({"messages": CHAT}, own, None),
                 lambda: prompt_tokens("hi", "chat", own, None)):
        with pytest.raises(UserError) as err:
            call()
        assert str(err.value) == said
    with pytest.raises(UserError, match=rf"^the chat template {re.escape(str(unmarked))} does not render earlier"):
        encode({"messages": CHAT}, with_chat_template(tokenizer, str(unmarked)))
    with pytest.raises(UserError, match=rf"^the chat template {re.escape(str(unmarked))} does not render the prompt"):
        encode({"prompt": CHAT[:3], "completion": CHAT[3:]}, with_chat_template(tokenizer, str(unmarked)))
    tokens = copy.copy(tokenizer)
    tokens.chat_template = rejecting.read_text()
    with pytest.raises(UserError, match=r"^the chat template rejected the messages"):
        encode({"messages": CHAT}, tokens)


@pytest.mark.parametrize("row,culprit", [
    ({"text": "ok \ud800"}, "'text'"),
    ({"instruction": "x\udc80", "output": "y"}, "'instruction'"),
    ({"instruction": "x", "input": "\udfff", "output": "y"}, "'input'"),
    ({"messages": [{"role": "user", "content": "a\ud83d"}, {"role": "assistant", "content": "b"}]},
     r"messages\[0\]\.content"),
])
def test_unpaired_surrogates_are_named(tokenizer, alpaca, row, culprit):
    """JSON may escape half of a surrogate pair; the tokenizer then failed with a TypeError
    naming nothing (a traceback from `mlora train`)."""
    with pytest.raises(UserError, match=f"{culprit} is not valid Unicode text: character \\d+ is an unpaired"):
        encode(row, tokenizer, alpaca)


def test_unpaired_surrogates_in_a_template_or_a_prompt(tmp_path, tokenizer, alpaca):
    from mlora.data import prompt_tokens

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"prompt": "{instruction} {input} \udc00", "prompt_no_input": "{instruction}"}))
    with pytest.raises(UserError, match="'prompt' is not valid Unicode text"):
        load_template(str(path))
    # (a command line's bytes that are not UTF-8 arrive as such halves: surrogateescape)
    with pytest.raises(UserError, match="the prompt 'hi\\\\udcff' is not valid Unicode text"):
        prompt_tokens("hi\udcff", "text", tokenizer, alpaca)


# --------------------------------------------------------------------------- text rows



def test_a_rows_prompt_is_what_training_fed_before_its_last_answer(tokenizer, alpaca):
    """row_prompt (mlora generate --prompt_file): a row's prompt tokens are exactly the tokens
    its training encoding has before its last run of trained tokens (a prompt/completion row of
    messages: before its first, the whole completion being trained), and its reference is that
    answer's text, for every shape that has one; a text row has none (one line)."""
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    rows = [{"instruction": "x", "input": "y", "output": "z"}, {"instruction": "say hi", "output": "hi"},
            {"messages": CHAT}, {"messages": CHAT[:3]},
            {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in CHAT]},
            {"prompt": "the quick", "completion": " brown fox"},
            {"prompt": CHAT[:2], "completion": CHAT[2:3]}, {"prompt": CHAT[:2], "completion": CHAT[2:]}]
    references = ["z", "hi", "seven eight", "three four", "seven eight", " brown fox", "three four", "three four"]
    shown = ["x\ny", "say hi", "five six", "one two", "five six", "the quick", "one two", "one two"]
    for row, reference, asked in zip(rows, references, shown):
        example = encode(row, tokenizer)
        trained_at = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
        start = max(i for i in trained_at if i - 1 not in trained_at)
        if "completion" in row and isinstance(row["prompt"], list):
            start = trained_at[0]
        got = row_prompt(row, tokenizer, alpaca)
        assert got.ids == example.input_ids[:start], row
        assert (got.reference, got.shown) == (reference, asked), row
    with pytest.raises(UserError, match="a text row has no prompt"):
        row_prompt({"text": "a"}, tokenizer, alpaca)
    with pytest.raises(UserError, match="the conversation is one assistant turn"):
        row_prompt({"messages": CHAT[2:3]}, tokenizer, alpaca)


def test_a_row_that_only_asks_is_a_prompt_without_reference(tokenizer, alpaca):
    """A file of questions (generate --prompt_file): a row without its answer gives the prompt
    of the same row with one (an alpaca row without output, a conversation ending in a user
    turn: the whole of it, a prompt/completion row without completion), and no reference."""
    for asking, answered in (({"instruction": "x", "input": "y"}, {"instruction": "x", "input": "y", "output": "z"}),
                             ({"messages": CHAT[:4]}, {"messages": CHAT}),
                             ({"conversations": [{"from": "human", "value": "one two"}]},
                              {"messages": [CHAT[1], CHAT[2]]}),
                             ({"prompt": "the quick"}, {"prompt": "the quick", "completion": " fox"}),
                             ({"prompt": CHAT[:2]}, {"prompt": CHAT[:2], "completion": CHAT[2:3]})):
        got, want = row_prompt(asking, tokenizer, alpaca), row_prompt(answered, tokenizer, alpaca)
        assert (got.ids, got.shown, got.reference) == (want.ids, want.shown, None), asking


def test_a_prompt_that_renders_empty_is_refused(tokenizer, alpaca, monkeypatch):
    """A generation prompt that renders as nothing but whitespace has nothing to complete from
    (a lone BOS, or no token at all), whatever made it so: a prompt/completion row's prompt, a
    template that keeps nothing of the instruction (--prompt too), a chat template that renders
    nothing. An empty instruction through a template with text of its own is a prompt."""
    from mlora.data import PromptTemplate, prompt_tokens

    nothing = PromptTemplate(prompt="{instruction:.0}{input:.0}", prompt_no_input="{instruction:.0}")
    with pytest.raises(UserError, match="^its prompt is empty: nothing to complete from$"):
        row_prompt({"prompt": " \n", "completion": "x"}, tokenizer, alpaca)
    for row in ({"instruction": "hi"}, {"instruction": "", "input": ""}):
        with pytest.raises(UserError, match=r"^its prompt is empty \(rendered through the adapter's prompt template\)"):
            row_prompt(row, tokenizer, nothing)
    with pytest.raises(UserError,
                       match=r"^the prompt 'hi' is empty \(rendered through the adapter's prompt template\)"):
        prompt_tokens("hi", "alpaca", tokenizer, nothing)
    assert row_prompt({"instruction": ""}, tokenizer, alpaca).ids == tokenizer(alpaca.render("", None)[0]).input_ids
    monkeypatch.setattr(tokenizer, "chat_template", "{{ '' }}")
    with pytest.raises(UserError, match=r"^its prompt is empty \(rendered through the chat template\)"):
        row_prompt({"messages": CHAT[:2]}, tokenizer, alpaca)


def test_text_row_is_exactly_the_tokenizer_encoding(tokenizer):
    text = "the quick brown fox jumps over the lazy dog"
    example = encode({"text": text}, tokenizer)
    assert example.input_ids == tokenizer(text).input_ids
    assert example.input_ids[0] == tokenizer.bos_token_id
    assert example.input_ids[-1] != tokenizer.eos_token_id  # nothing appended
    assert example.labels == example.input_ids
    assert example.num_label_tokens == len(example.input_ids) - 1


def test_cutoff_truncates(tokenizer, alpaca):
    text = "one two three four five six seven eight nine ten"
    full = tokenizer(text).input_ids
    example = encode({"text": text}, tokenizer, cutoff_len=5)
    assert example.input_ids == full[:5] and example.labels == full[:5]
    row = {"instruction": "count", "output": text}
    long = encode(row, tokenizer, alpaca)
    short = encode(row, tokenizer, alpaca, cutoff_len=len(long.input_ids) - 3)
    assert short.input_ids == long.input_ids[:-3] and short.labels == long.labels[:-3]
    assert len(encode({"messages": CHAT}, tokenizer, cutoff_len=7).labels) == 7


# --------------------------------------------------------------------------- shapes, source


def test_unknown_and_mixed_row_shapes(tokenizer, alpaca):
    rows = [{"text": "a"}, {"question": "a", "answer": "b"}]
    with pytest.raises(UserError, match=r"^data\.jsonl: row 2: unknown row shape") as err:
        encode_rows(rows, tokenizer, alpaca, 64, False, source="data.jsonl")
    assert "\n" not in str(err.value) and "did you mean" not in str(err.value)
    with pytest.raises(UserError) as err:  # a misspelt identifying key: the likely one is named
        encode_rows([{"instrution": "a", "input": "b", "output": "c"}], tokenizer, alpaca, 64, False, source="d")
    assert str(err.value) == ("d: row 1: unknown row shape (keys: instrution, input, output); expected "
                              "'instruction'/'input'/'output', 'messages', 'conversations', 'prompt'/'completion', "
                              "or 'text' "
                              "(did you mean 'instruction'?)")
    with pytest.raises(UserError, match=r"^d: row 1: row mixes shapes"):
        encode_rows([{"text": "a", "messages": CHAT}], tokenizer, alpaca, 64, False, source="d")


def test_a_bad_row_is_placed_as_an_editor_counts(tmp_path, tokenizer, alpaca):
    """A row's error names it from 1, as the file's malformed-JSON errors do: a JSONL row by its
    line, blank lines counted (path:3); a JSON array's or Parquet file's by its row (row 2).
    They said the 0-based index (row 1) of either, a line off even without blank lines."""
    good, bad = {"instruction": "a", "output": "b"}, {"instruction": "c"}
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    array = tmp_path / "d.json"
    array.write_text(json.dumps([good, bad]))
    pq = pytest.importorskip("pyarrow.parquet")  # (a test dependency)
    import pyarrow as pa

    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([good, bad]), parquet)
    for path, where, said in ((jsonl, f"{jsonl}:3", "missing 'output'"), (array, f"{array}: row 2", "missing 'output'"),
                              # (a table gives every row every column: the row's is null)
                              (parquet, f"{parquet}: row 2", "'output' is null (a null counts as a missing key): "
                                                             "the row has no answer to learn")):
        with pytest.raises(UserError) as err:
            encode_rows(load_rows(path), tokenizer, alpaca, 64, False, source=str(path))
        assert str(err.value) == f"{where}: {said}", path
    with pytest.raises(UserError, match=r"^row 2: missing 'output'$"):  # (rows of no file)
        encode_rows([good, bad], tokenizer, alpaca, 64, False)


def test_encode_rows(tokenizer, alpaca):
    rows = [{"text": "one two"}, {"instruction": "x", "output": "y"}, {"messages": CHAT[1:3]}]
    examples = encode_rows(rows, tokenizer, alpaca, 64, False, source="d")
    assert [e.input_ids for e in examples] == [encode(r, tokenizer, alpaca, 64).input_ids for r in rows]


def test_keys_that_no_row_shape_reads_are_noted(tokenizer):
    """A misspelt key trains every row without it; extra columns are common and only told.
    Likely misspellings come first, then by rows; a row counts once however many messages."""
    rows = ([{"instruction": "a", "inptu": "b", "output": "c", "source": "s"}] * 2
            + [{"instruction": "a", "input": "b", "output": "c", "source": "s", "outputs": "d"}]
            + [{"messages": [{"role": "user", "contnet": "a"},
                             {"role": "assistant", "contnet": "b", "content": "c"}]}]
            + [{"text": "a", "id": 7}])
    assert unread_keys_note(rows, tokenizer) == (
        "keys not read: 'inptu' (2 rows; did you mean 'input'?), 'contnet' in messages (1 row; did you mean "
        "'content'?), 'source' (3 rows), 'id' (1 row), 'outputs' (1 row); alpaca rows read instruction, input, "
        "output; text rows read text; chat messages read role, content and the keys the chat template names")


def test_a_chat_row_with_a_prompt_beside_is_a_chat_row(tokenizer):
    """UltraChat's and No Robots' rows: "prompt" (the first user turn) and "prompt_id" beside
    "messages", no completion. They are chat rows, encoded as the bare chat row, the prompt an
    unread key (as before prompt/completion rows were read); with a completion too, two shapes."""
    row = {"prompt": CHAT[1]["content"], "prompt_id": "f00d", "messages": CHAT}
    assert row_shape(row) == "chat"
    assert encode(row, tokenizer) == encode({"messages": CHAT}, tokenizer)
    assert unread_keys_note([row], tokenizer) == ("keys not read: 'prompt' (1 row), 'prompt_id' (1 row); chat rows "
                                                  "read messages")
    with pytest.raises(UserError, match="row mixes shapes"):
        row_shape({**row, "completion": "x"})


def test_keys_of_sharegpt_and_prompt_completion_rows_are_noted(tokenizer):
    rows = [{"conversations": [{"from": "human", "valeu": "a"}], "id": 1},
            {"prompt": [{"role": "user", "contnet": "a"}], "completion": CHAT[2:3]},
            {"prompt": "a", "completoin": "b"}]
    assert unread_keys_note(rows, tokenizer) == (
        "keys not read: 'contnet' in messages (1 row; did you mean 'content'?), 'completoin' (1 row; did you mean "
        "'completion'?), 'valeu' in conversations (1 row; did you mean 'value'?), 'id' (1 row); sharegpt rows read "
        "conversations; prompt/completion rows read prompt, completion; chat messages read role, content and the "
        "keys the chat template names; ShareGPT turns read from, value and the keys the chat template names")


def test_message_keys_the_chat_template_names_are_read(tokenizer):
    """Templates read more of a message than role and content (a tool call's name, reasoning),
    but a row's own "tools" never reaches apply_chat_template."""
    rows = [{"messages": [{"role": "user", "content": "a", "name": "bob", "reasoning_content": "r"}], "tools": []}]
    named = SimpleNamespace(chat_template=tokenizer.chat_template + "{{ m.name }}{{ m['reasoning_content'] }}")
    assert unread_keys_note(rows, named) == "keys not read: 'tools' (1 row); chat rows read messages"
    assert "'name' in messages (1 row)" in unread_keys_note(rows, tokenizer)
    assert "'reasoning_content' in messages (1 row)" in unread_keys_note(rows, tokenizer)


def test_no_note_when_every_key_is_read(tokenizer):
    rows = [{"text": "a"}, {"instruction": "a", "input": "b", "output": "c"}, {"instruction": "a", "output": "c"},
            {"messages": CHAT}]
    assert unread_keys_note(rows, tokenizer) is None


def test_tokenizer_without_eos(tokenizer, alpaca):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.eos_token = None
    with pytest.raises(UserError, match="EOS"):
        encode({"text": "a"}, tok, alpaca)


# --------------------------------------------------------------------------- padding


def make(ids, labels=None):
    return Example(list(ids), list(labels if labels is not None else ids))


def test_pad_batch_right():
    ex = [make([5, 6, 7], [IGNORE_INDEX, 6, 7]), make([8])]
    ids, labels, mask = pad_batch(ex, 4, pad_id=0)
    assert ids.dtype == torch.long and labels.dtype == torch.long and mask.dtype == torch.bool
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert labels.tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX], [8] + [IGNORE_INDEX] * 3]
    assert mask.tolist() == [[True, True, True, False], [True, False, False, False]]


def test_pad_batch_left():
    ids, labels, mask = pad_batch([make([5, 6, 7]), make([8])], 3, pad_id=2, side="left")
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]]
    assert labels.tolist() == [[5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_pad_rows_mixed_sides():
    ids, labels, mask = pad_rows([make([5, 6]), make([7, 8])], ["right", "left"], 4, pad_id=0)
    assert ids.tolist() == [[5, 6, 0, 0], [0, 0, 7, 8]]
    assert labels.tolist() == [[5, 6, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]]
    assert mask.tolist() == [[True, True, False, False], [False, False, True, True]]


def test_pad_rejects_too_short_length_and_bad_side():
    with pytest.raises(AssertionError):
        pad_batch([make([1, 2, 3])], 2, pad_id=0)
    with pytest.raises(ValueError):
        pad_batch([make([1])], 2, pad_id=0, side="middle")


def test_num_label_tokens_ignores_position_zero():
    assert make([1, 2, 3]).num_label_tokens == 2
    assert make([1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 3]).num_label_tokens == 1


def test_example_tensors_and_label_count_are_made_once():
    """Fused batches copy an example's tokens from tensors made once (torch.tensor on a list
    converts value by value, milliseconds per batch with the GPU waiting), and its label
    count is counted once; both equal what the lists say."""
    from mlora.data import IGNORE_INDEX, Example

    ex = Example([5, 6, 7, 8], [5, IGNORE_INDEX, 7, 8])
    ids, labels = ex.tensors()
    assert ids.dtype == labels.dtype == torch.long
    assert ids.tolist() == [5, 6, 7, 8] and labels.tolist() == [5, IGNORE_INDEX, 7, 8]
    assert ex.tensors()[0] is ids
    assert ex.num_label_tokens == 2  # position 0 is never a target
    assert Example([1], [1]).num_label_tokens == 0
    empty = Example([], [])
    assert empty.tensors()[0].shape == (0,) and empty.num_label_tokens == 0
    assert ex == Example([5, 6, 7, 8], [5, IGNORE_INDEX, 7, 8])  # the caches take no part in equality
