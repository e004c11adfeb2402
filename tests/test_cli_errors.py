"""Bad input: one line naming the culprit, exit code 2, no traceback, nothing in output_dir."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlora.cli import main

from conftest import free_port

GOOD_ROWS = [{"instruction": "say hi", "output": "hi"}, {"text": "plain text row"}]


@pytest.fixture()
def setup(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD_ROWS))
    out = tmp_path / "out"

    def config(adapter_overrides=None, drop=(), **global_overrides):
        adapter = {"name": "a", "data": str(data), "batch_size": 2, "micro_batch_size": 1}
        adapter.update(adapter_overrides or {})
        for key in drop:
            adapter.pop(key)
        cfg = {"output_dir": str(out), "lora": [adapter], **global_overrides}
        path = tmp_path / "config.json"
        path.write_text(json.dumps(cfg))
        return path

    return tmp_path, data, out, config


def run_train(capsys, base, cfg, *extra):
    capsys.readouterr()
    code = main(["train", "--base_model", str(base), "--config", str(cfg), "--no_progress", *extra])
    err = capsys.readouterr().err.strip()
    return code, err


def check(code, err, out: Path, *fragments):
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("mlora: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not out.exists() or not any(out.iterdir()), "output_dir must stay untouched"


def linked_base(model: Path, base: Path, *leaving_out: str) -> Path:
    """A base directory at `base` of links to `model`'s files but those `leaving_out`, which a
    test writes damaged in their place."""
    base.mkdir()
    for file in model.iterdir():
        if file.name not in leaving_out:
            (base / file.name).symlink_to(file)
    return base


CASES = [
    ("unknown key", dict(adapter_overrides={"lrr": 0.1}), ("'lrr'", "'lr'", "name 'a'")),
    ("wrong type", dict(adapter_overrides={"r": "8"}), ("'r'", "integer")),
    ("r <= 0", dict(adapter_overrides={"r": 0}), ("'r'",)),
    ("dropout >= 1", dict(adapter_overrides={"dropout": 1.0}), ("'dropout'",)),
    ("dropout < 0", dict(adapter_overrides={"dropout": -0.1}), ("'dropout'",)),
    ("batch not multiple", dict(adapter_overrides={"batch_size": 3, "micro_batch_size": 2}),
     ("batch_size", "micro_batch_size")),
    ("missing data", dict(adapter_overrides={"data": "/nonexistent/data.json"}), ("/nonexistent/data.json",)),
    ("unknown target", dict(adapter_overrides={"target_modules": ["q_proj", "qq_proj"]}), ("qq_proj", "q_proj")),
    ("unknown global", dict(cutof_len=3), ("cutof_len", "cutoff_len")),
    ("bad strategy", dict(train_strategy="fastest"), ("train_strategy", "fastest")),
    # (each step scaled the weights by 1 - 3e-4 * 1e300: inf at once, saved as the trained adapter)
    ("weight decay times lr", dict(adapter_overrides={"weight_decay": 1e300}),
     ("'weight_decay' (1e+300) times 'lr' (0.0003) must be below 1",)),
    ("loraplus ratio not positive", dict(adapter_overrides={"loraplus_lr_ratio": 0}),
     ("'loraplus_lr_ratio' must be > 0, got 0", "name 'a'")),
]


@pytest.mark.parametrize("label,kwargs,fragments", CASES, ids=[c[0] for c in CASES])
def test_config_errors(setup, tiny_llama, capsys, label, kwargs, fragments):
    _, _, out, config = setup
    code, err = run_train(capsys, tiny_llama, config(**kwargs))
    check(code, err, out, *fragments)


def test_duplicate_names(setup, tiny_llama, capsys):
    tmp, data, out, _ = setup
    cfg = tmp / "dup.json"
    cfg.write_text(json.dumps({"output_dir": str(out), "lora": [{"name": "x", "data": str(data)},
                                                               {"name": "x", "data": str(data)}]}))
    check(*run_train(capsys, tiny_llama, cfg), out, "'x'")


@pytest.mark.parametrize("first,second", [("reverse", "Reverse"), ("caf\u00e9", "cafe\u0301")])
def test_names_one_directory_on_a_case_insensitive_file_system(setup, tiny_llama, capsys, first, second):
    """Two adapters whose names differ only in case (or in Unicode form) trained here into two
    directories, but on macOS or Windows into one: the second's weights overwrote the first's."""
    tmp, data, out, _ = setup
    cfg = tmp / "case.json"
    cfg.write_text(json.dumps({"output_dir": str(out), "lora": [{"name": first, "data": str(data)},
                                                               {"name": second, "data": str(data)}]}))
    check(*run_train(capsys, tiny_llama, cfg), out, f"adapter names {first!r} (lora[0]) and {second!r} (lora[1]) "
          "differ only in case or Unicode form")


def test_empty_adapter_list(setup, tiny_llama, capsys):
    tmp, _, out, _ = setup
    cfg = tmp / "empty.json"
    cfg.write_text(json.dumps({"output_dir": str(out), "lora": []}))
    check(*run_train(capsys, tiny_llama, cfg), out, "lora")


def test_config_not_json(setup, tiny_llama, capsys):
    tmp, _, out, _ = setup
    cfg = tmp / "bad.json"
    cfg.write_text("{ this is not json")
    check(*run_train(capsys, tiny_llama, cfg), out, str(cfg))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_config_that_is_a_fifo_or_empty_or_no_path(setup, tiny_llama, capsys, tmp_path):
    """A FIFO no process writes to made the command wait forever to open it; an empty path was
    "'': is a directory" (Path("") is "."). A pipe that is written to (`--config <(jq ...)`,
    here /dev/fd/N of a pipe) is still read."""
    import signal

    tmp, _, out, config = setup
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    empty = tmp_path / "empty.json"
    empty.write_text(" \n")

    def hung(signum, frame):
        raise TimeoutError("mlora waited on the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        check(*run_train(capsys, tiny_llama, fifo), out, f"{fifo}: the config file is empty")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    check(*run_train(capsys, tiny_llama, empty), out, f"{empty}: the config file is empty")
    check(*run_train(capsys, tiny_llama, ""), out, "the config file's path is empty")
    check(*run_train(capsys, tiny_llama, "con\0fig.json"), out, "'con\\x00fig.json' is not a valid path")
    read, write = os.pipe()
    try:
        os.write(write, b'{"lora": []}')  # (its line shows the text was read)
        os.close(write)
        check(*run_train(capsys, tiny_llama, f"/dev/fd/{read}"), out, "'lora' must list at least one adapter")
    finally:
        os.close(read)


@pytest.mark.skipif(not os.path.exists("/dev/zero") or not hasattr(os, "openpty"), reason="POSIX devices")
def test_a_config_that_is_a_device_is_one_line_and_a_terminal_is_read(setup, tiny_llama, capsys):
    """--config /dev/zero was read to its end, which it has not: memory filled until the command
    was killed. A device is one line; a terminal (--config /dev/stdin, typed, ended by Ctrl-D)
    is still read, as are pipes (above)."""
    _, _, out, _ = setup
    check(*run_train(capsys, tiny_llama, "/dev/zero"), out,
          "/dev/zero: cannot read config file: a character device, not a file or a pipe: reading it may never end")
    # /dev/null ends at once: read, as empty (not "may never end")
    check(*run_train(capsys, tiny_llama, "/dev/null"), out, "/dev/null: the config file is empty")
    typist, terminal = os.openpty()
    try:
        os.write(typist, b'{"lora": []}\n\x04')  # (a line, then Ctrl-D: the end of the input)
        check(*run_train(capsys, tiny_llama, f"/dev/fd/{terminal}"), out, "'lora' must list at least one adapter")
    finally:
        os.close(typist)
        os.close(terminal)


def test_malformed_jsonl_names_the_line(setup, tiny_llama, capsys):
    tmp, data, out, config = setup
    data.write_text(json.dumps(GOOD_ROWS[0]) + "\n" + json.dumps(GOOD_ROWS[1]) + "\n{oops\n")
    check(*run_train(capsys, tiny_llama, config()), out, f"{data}:3")


def test_malformed_json_array_names_the_line(setup, tiny_llama, capsys):
    tmp, _, out, config = setup
    data = tmp / "rows.json"
    data.write_text('[\n  {"text": "a"},\n  {"text": "b",,}\n]\n')
    check(*run_train(capsys, tiny_llama, config({"data": str(data)})), out, f"{data}:3")


def test_base_model_without_config(setup, capsys, tmp_path):
    _, _, out, config = setup
    empty = tmp_path / "empty_base"
    empty.mkdir()
    check(*run_train(capsys, empty, config()), out, "config.json")


@pytest.mark.parametrize("text,fragment", [
    ("[1, 2]", "config.json is not a valid JSON config: expected an object, got list"),
    ("null", "config.json is not a valid JSON config: expected an object, got null"),
    ('{"model_type": ["llama"]}', "model_type ['llama'] in"),
])
def test_base_config_json_of_the_wrong_kind(setup, capsys, tmp_path, text, fragment):
    """A config.json that is JSON but not an object said "'list' object has no attribute 'get'";
    a model_type that is a list was a TypeError traceback (unhashable)."""
    _, _, out, config = setup
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(text)
    check(*run_train(capsys, base, config()), out, fragment)


@pytest.mark.parametrize("unreadable", ["config.json", "model.safetensors.index.json"])
def test_a_base_file_that_cannot_be_read(setup, capsys, tmp_path, tiny_llama, monkeypatch, unreadable):
    """A config.json or shard index this user may not read was a PermissionError traceback (the
    test plays the refusal: root, which runs the tests here, passes every permission check)."""
    import errno
    import pathlib

    _, _, out, config = setup
    base = linked_base(tiny_llama, tmp_path / "base", "model.safetensors")
    (base / "model.safetensors.index.json").write_text("{}")
    read_text = pathlib.Path.read_text

    def refuse(self, *args, **kwargs):
        if self == base / unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", refuse)
    check(*run_train(capsys, base, config()), out, f"{base / unreadable}: cannot read it (Permission denied)")


def test_base_model_without_a_tokenizer(setup, capsys, tmp_path, tiny_llama):
    """It said "cannot load its tokenizer (Couldn't instantiate the backend tokenizer from one of:)",
    the first line of transformers' error."""
    _, _, out, config = setup
    base = linked_base(tiny_llama, tmp_path / "base", "tokenizer.json", "tokenizer_config.json")
    check(*run_train(capsys, base, config()), out, f"base_model {base}: no tokenizer in it (none of tokenizer.json, "
          "tokenizer_config.json, tokenizer.model, vocab.json)")


def test_base_model_without_weights(setup, capsys, tmp_path, tiny_llama):
    _, _, out, config = setup
    base = tmp_path / "no_weights"
    base.mkdir()
    (base / "config.json").write_text((tiny_llama / "config.json").read_text())
    check(*run_train(capsys, base, config()), out, str(base))


def test_device_that_does_not_exist(setup, capsys, tiny_llama):
    _, _, out, config = setup
    check(*run_train(capsys, tiny_llama, config(), "--device", "cuda:99"), out, "cuda:99")


def test_output_dir_is_a_file(setup, capsys, tiny_llama, tmp_path):
    _, _, _, config = setup
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    code, err = run_train(capsys, tiny_llama, config(output_dir=str(blocker)))
    assert code == 2 and str(blocker) in err and len(err.splitlines()) == 1
    # eval evaluated every adapter as the bare base then, exit 0
    code = main(["eval", "--base_model", str(tiny_llama), "--config", str(config(output_dir=str(blocker))),
                 "--no_progress"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured.out
    assert captured.err.strip() == f"mlora: error: output_dir {blocker} is not a directory (eval reads the adapters " \
                                   "saved in it)", captured.err


def test_real_process_prints_no_traceback(setup, tiny_llama):
    """The same path as a user's shell: a subprocess, exit status 2, one stderr line."""
    _, _, out, config = setup
    cfg = config({"r": -1})
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "mlora", "train", "--base_model", str(tiny_llama),
                           "--config", str(cfg)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "'r'" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def test_unknown_lora_kernel_names_the_variable(setup, capsys, tiny_llama, monkeypatch):
    import mlora.lora

    _, _, out, config = setup
    monkeypatch.setattr(mlora.lora, "kernel", "fast")
    code, err = run_train(capsys, tiny_llama, config())
    assert code == 2 and "MLORA_LORA_KERNEL='fast'" in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("value, fragment", [
    ("fast", "MLORA_CROSS_ENTROPY='fast' is not one of"),
    ("triton", "MLORA_CROSS_ENTROPY=triton: it runs on CUDA devices, not cpu")])
def test_unknown_or_impossible_cross_entropy_names_the_variable(setup, capsys, tiny_llama, monkeypatch, value,
                                                                 fragment):
    import mlora.loss

    _, _, out, config = setup
    monkeypatch.setattr(mlora.loss, "cross_entropy", value)
    # (whether it is or not: the device is the culprit)
    monkeypatch.setattr(mlora.loss, "_triton_installed", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, err = run_train(capsys, tiny_llama, config())
    assert code == 2 and fragment in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("name,fragment", [("metrics.jsonl", "taken by mlora"), ("checkpoints", "taken by mlora"),
                                           ("Checkpoints", "taken by mlora"),
                                           ("x" * 256, "255 bytes")])
def test_adapter_names_that_cannot_be_written(setup, tiny_llama, capsys, name, fragment):
    """Names that clash with mlora's own outputs, or that no file system takes, fail before
    training (they used to fail with a traceback when the adapter was saved at the end)."""
    _, _, out, config = setup
    check(*run_train(capsys, tiny_llama, config({"name": name})), out, fragment)


def test_tokenizer_larger_than_the_model_vocabulary(setup, capsys, tmp_path, tokenizer_dir):
    """A tokenizer that is not the model's makes ids past the embedding: one line before
    anything is written (it used to fail mid-run, after clearing the output's checkpoints)."""
    from conftest import make_tiny_model

    _, data, out, config = setup
    base = make_tiny_model(tmp_path / "small_vocab", "llama", tokenizer_dir, vocab_size=100)
    check(*run_train(capsys, base, config()), out, "vocab_size 100", "'a'")


def test_a_generate_prompt_past_the_model_vocabulary(setup, capsys, tmp_path, tokenizer_dir):
    """generate checks its prompts' ids as training checks the data: one line, not an index
    error in the embedding."""
    from conftest import make_tiny_model

    _, _, out, config = setup
    base = make_tiny_model(tmp_path / "small_vocab", "llama", tokenizer_dir, vocab_size=100)
    (out / "a").mkdir(parents=True)
    (out / "a" / "adapter_model.safetensors").write_bytes(b"")  # "saved": the prompt is checked first
    capsys.readouterr()
    code = main(["generate", "--base_model", str(base), "--config", str(config()), "--prompt", "hello there"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--prompt 'hello there' tokenizes to id" in err, err
    assert "vocab_size 100" in err
    # a --prompt_file row's line names the file and the row, not a --prompt never given
    rows = out.parent / "prompts.jsonl"
    rows.write_text(json.dumps({"instruction": "hello there", "output": "x"}) + "\n")
    code = main(["generate", "--base_model", str(base), "--config", str(config()), "--prompt_file", str(rows)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"mlora: error: --prompt_file {rows}:1: its prompt tokenizes to id "), err
    assert "vocab_size 100" in err, err


@pytest.mark.parametrize("rows,extra", [
    ([{"text": ""}], {}),
    ([{"messages": [{"role": "user", "content": "only a question"}]}], {}),
    ([{"instruction": "a long instruction " * 20, "output": "x"}], {"cutoff_len": 8}),
])
def test_data_without_a_token_to_learn(setup, tiny_llama, capsys, rows, extra):
    """Training on nothing used to 'succeed' with loss 0 and an untrained adapter."""
    tmp, data, out, config = setup
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    check(*run_train(capsys, tiny_llama, config(**extra)), out, "no row of", "token to learn")


def test_test_data_without_a_token_to_evaluate(setup, tiny_llama, capsys):
    """Evaluated mid-run on questions only, every eval loss was null: no best saved, and early
    stopping stopped the adapter after its patience, as no loss ever improved. `mlora eval`
    reports such a set as loss null (not evaluated mid-run: no error)."""
    tmp, data, out, config = setup
    questions = tmp / "questions.jsonl"
    questions.write_text(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    cfg = config({"test_data": str(questions), "eval_step": 1, "early_stopping_patience": 1})
    for extra in ((), ("--dry_run",)):
        check(*run_train(capsys, tiny_llama, cfg, *extra), out, f"no row of {questions}", "token to evaluate",
              "eval_step")
    assert main(["eval", "--base_model", str(tiny_llama), "--config", str(config({"test_data": str(questions)}))]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] is None


def test_data_that_is_not_valid_unicode(setup, tiny_llama, capsys):
    """A lone \\u escape (half of a surrogate pair) used to reach the tokenizer, whose TypeError
    was a traceback."""
    tmp, data, out, config = setup
    data.write_text(json.dumps(GOOD_ROWS[0]) + "\n" + '{"text": "caf\\ud800"}\n')
    check(*run_train(capsys, tiny_llama, config()), out, f"{data}:2: 'text' is not valid Unicode", "'\\ud800'")


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("rank", [None, 0, 1])
def test_keys_no_row_shape_reads_are_noted_once_per_file(setup, tiny_llama, capsys, command, rank):
    """The note comes before encoding, so it explains the error a misspelling leads to; adapters
    reading one file (also as test data) hear of it once, and of a pipeline's ranks, which all
    read it, rank 0 tells."""
    tmp, shared, out, config = setup
    shared.write_text(json.dumps({"instruction": "say hi", "inptu": "now", "output": "hi"}) + "\n")
    bad = tmp / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "say hi", "outptu": "hi"}) + "\n")
    cfg = config()
    adapters = json.loads(cfg.read_text())
    adapters["lora"] += [{**adapters["lora"][0], "name": "b", "test_data": str(shared)},
                         {**adapters["lora"][0], "name": "c", "data": str(bad)}]
    cfg.write_text(json.dumps(adapters))
    # (a pipeline rank alone: its failed start waits a second for the other rank, which never comes)
    pipeline = () if rank is None else ("--pipeline", "--rank", str(rank), "--world_size", "2",
                                        "--master_port", str(free_port()), "--connect_timeout", "1")
    capsys.readouterr()
    code = main([command, "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress", *pipeline])
    err = capsys.readouterr().err.strip()
    notes = [f"mlora: note: {shared}: keys not read: 'inptu' (1 row; did you mean 'input'?); alpaca rows read "
             "instruction, input, output",
             f"mlora: note: {bad}: keys not read: 'outptu' (1 row; did you mean 'output'?); alpaca rows read "
             "instruction, input, output"]
    error = f"mlora: error: {bad}:1: missing 'output'"
    waits = [f"mlora: note: rank {rank} cannot start ({error.removeprefix('mlora: error: ')}); it waits up to 1 s "
             "for the other ranks to connect, to tell them"] * (rank is not None)
    assert code == 2 and err.splitlines() == notes * (rank != 1) + waits + [error], err


@pytest.mark.parametrize("flag,value,fragment", [("--master_port", "99999", "1..65535"),
                                                ("--peer_timeout", "0", "more than 0"),
                                                ("--connect_timeout", "-1", "more than 0"),
                                                ("--seed", "-1", "seed")])
def test_pipeline_flags_out_of_range(setup, tiny_llama, capsys, flag, value, fragment):
    _, _, out, config = setup
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--base_model", str(tiny_llama), "--config", str(config()), "--pipeline", "--rank", "0",
              "--world_size", "2", flag, value])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv,line", [
    ([], "mlora: error: the following arguments are required: command (see mlora --help)"),
    (["bogus"], "mlora: error: argument command: invalid choice: 'bogus'"),
    (["train"], "mlora train: error: the following arguments are required: --base_model, --config"),
    # (the command's parser names it: `mlora --help` lists the commands, not eval's flags)
    (["eval", "--base_model", "m", "--config", "c", "--bogus"], "mlora eval: error: unrecognized arguments: --bogus "
                                                                "(see mlora eval --help)"),
    (["train", "--bogus", "--base_model", "m", "--config", "c"], "mlora train: error: unrecognized arguments: "
                                                                 "--bogus (see mlora train --help)"),
    (["demo", "--short", "--device"], "mlora demo: error: argument --device: expected one argument"),
])
def test_argparse_errors_are_one_line(capsys, argv, line):
    """A missing, unknown or mistyped flag: argparse's one line, without the dozen lines of usage
    it prints above it by default (they buried the culprit)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(line), err


def test_a_pipeline_that_never_connects_leaves_no_output_dir(setup, tiny_llama, capsys):
    """Rank 0 alone (rank 1 never starts): one line, exit 3, and the output directory it had
    created is gone again (it used to stay behind, empty)."""
    _, _, out, config = setup
    nested = out / "deeper"
    capsys.readouterr()
    code = main(["train", "--base_model", str(tiny_llama), "--config", str(config()), "--pipeline", "--rank", "0",
                 "--world_size", "2", "--device", "cpu", "--transport", "zmq", "--master_addr", "127.0.0.1",
                 "--master_port", str(free_port()), "--connect_timeout", "1", "--output_dir", str(nested),
                 "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_undoing_directories_another_rank_undid_in_part_goes_on():
    """Two pipeline ranks on one host may both have created part of output_dir's path (one
    `new`, the other `new/out` beside it) and undo their parts at once: a directory the other
    already removed is no reason to stop (`new` stayed behind, a flaky test found)."""
    import tempfile

    from mlora.cli import prepare_output_dir, remove_if_still_empty

    with tempfile.TemporaryDirectory() as tmp:
        created = prepare_output_dir(str(Path(tmp) / "new" / "out"))
        assert created == [Path(tmp) / "new" / "out", Path(tmp) / "new"]
        created[0].rmdir()  # the other rank's part, undone first
        remove_if_still_empty(created)
        assert not (Path(tmp) / "new").exists()
        (Path(tmp) / "kept" / "out").mkdir(parents=True)
        (Path(tmp) / "kept" / "file").write_text("")
        remove_if_still_empty([Path(tmp) / "kept" / "out", Path(tmp) / "kept"])
        assert (Path(tmp) / "kept" / "file").exists()  # (only empty directories go)


def test_empty_output_dir_or_base_model_flag(setup, tiny_llama, capsys, monkeypatch, tmp_path):
    _, _, out, config = setup
    monkeypatch.chdir(tmp_path)
    check(*run_train(capsys, tiny_llama, config(), "--output_dir", ""), out, "--output_dir")
    # (the config's made a directory named "   " in the working directory)
    check(*run_train(capsys, tiny_llama, config(output_dir="   ")), out, "'output_dir' is blank")
    assert not (tmp_path / "   ").exists()
    check(*run_train(capsys, "", config()), out, "--base_model is empty")  # (it named '.', the working directory)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "a").exists()


def test_demo_with_a_bad_device_or_output_dir_writes_nothing(tmp_path, capsys, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["demo", "--device", "tpu"]) == 2
    assert "tpu" in capsys.readouterr().err and not list(tmp_path.iterdir())
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["demo", "--output_dir", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a directory" in err




def test_demo_with_a_cache_that_cannot_be_created_leaves_no_output_dir(tmp_path, capsys, monkeypatch):
    """MLORA_CACHE naming a file: os.mkdir's FileExistsError traceback, and the empty output_dir
    the demo had made before it stayed behind."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("MLORA_CACHE", str(blocker))
    out = tmp_path / "new" / "out"
    assert main(["demo", "--short", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"mlora: error: the demo's model cache {blocker} cannot be created (File exists); set MLORA_CACHE "
                   "to a directory that can be written"), err
    assert not (tmp_path / "new").exists()

def test_demo_into_an_output_dir_a_run_is_using_is_refused(tmp_path, capsys, monkeypatch):
    """`demo --output_dir D` trains into D/out, clearing it: while a train run holds D/out's
    lock, one line naming it, before the base is even looked for."""
    from mlora import demo
    from mlora.output_lock import output_dir_lock

    monkeypatch.setattr(demo, "smollm2_base_dir", lambda: pytest.fail("the demo went on"))
    (tmp_path / "d" / "out").mkdir(parents=True)
    with output_dir_lock(tmp_path / "d" / "out"):
        assert main(["demo", "--output_dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{tmp_path / 'd' / 'out'} is in use" in err

def test_rank_larger_than_a_projection(setup, tiny_llama, capsys):
    """An absurd r used to fail inside torch's allocator with a traceback. eval refuses it too,
    even with no saved weights (it used to print the base's loss for it and exit 0)."""
    _, _, out, config = setup
    code, err = run_train(capsys, tiny_llama, config({"r": 10**9}))
    assert code == 2 and len(err.splitlines()) == 1 and "r=1000000000" in err and "Traceback" not in err
    code = main(["eval", "--base_model", str(tiny_llama), "--config", str(config({"r": 1000})), "--no_progress"])
    captured = capsys.readouterr()
    check(code, captured.err.strip(), out, "adapter 'a'", "r=1000", "q_proj")
    assert captured.out == ""


def test_a_pretty_printed_object_is_not_called_malformed(setup, tiny_llama, capsys):
    tmp, _, out, config = setup
    data = tmp / "one.json"
    data.write_text(json.dumps(GOOD_ROWS[0], indent=2))
    check(*run_train(capsys, tiny_llama, config({"data": str(data)})), out, "multi-line object")


@pytest.mark.parametrize("layout", ["object holding the rows", "array named .jsonl"])
def test_a_json_value_over_several_lines_is_not_called_malformed(setup, tiny_llama, capsys, layout):
    """A file that is valid JSON but neither rows one per line nor an array read as one: an
    object whose first line is not a lone "{" ({"data": [ ...), or an array in a .jsonl file.
    Its first line was "malformed JSON (Expecting value)"."""
    tmp, _, out, config = setup
    if layout == "array named .jsonl":
        data = tmp / "rows.jsonl"
        data.write_text("[" + ",\n".join(json.dumps(row) for row in GOOD_ROWS) + "]\n")
        fragments = [f"{data}: expected one object per line (JSONL, as its .jsonl name says); the file is one JSON "
                     "array over several lines: name it .json"]
    else:
        data = tmp / "rows.json"
        data.write_text('{"data": [\n' + ",\n".join(json.dumps(row) for row in GOOD_ROWS) + "\n]}\n")
        fragments = [f"{data}: expected a JSON array of row objects or one object per line (JSONL); the file is "
                     f"one multi-line object (keys 'data'): its 'data' holds {len(GOOD_ROWS)} objects"]
    check(*run_train(capsys, tiny_llama, config({"data": str(data)})), out, *fragments)


def test_base_model_that_is_a_file(setup, capsys, tmp_path):
    _, data, out, config = setup
    check(*run_train(capsys, data, config()), out, "is a file, not a directory")


def test_a_tokenizer_shipped_as_code_needs_trust_remote_code(setup, capsys, tmp_path, tokenizer_dir):
    """ChatGLM's and Baichuan's tokenizers are Python files in the model directory: without
    --trust_remote_code, one line saying so and nothing written; with it, the run works (mlora
    never runs the checkpoint's model code, only the tokenizer's)."""
    from conftest import make_tiny_model

    base = make_tiny_model(tmp_path / "glm", "chatglm", tokenizer_dir)
    (base / "tokenization_tiny.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class TinyRemoteTokenizer(PreTrainedTokenizerFast):\n"
        "    \"\"\"Stands in for a model's own tokenizer code.\"\"\"\n")
    tok_config = json.loads((base / "tokenizer_config.json").read_text())
    tok_config.update(tokenizer_class="TinyRemoteTokenizer",
                      auto_map={"AutoTokenizer": [None, "tokenization_tiny.TinyRemoteTokenizer"]})
    (base / "tokenizer_config.json").write_text(json.dumps(tok_config))
    _, _, out, config = setup
    cfg = config({"target_modules": ["query_key_value"], "num_epochs": 1})
    code, err = run_train(capsys, base, cfg)
    check(code, err, out, "its tokenizer is code shipped with the model", "--trust_remote_code")
    code, err = run_train(capsys, base, cfg, "--trust_remote_code")
    assert code == 0, err
    assert "model of type" not in err  # transformers' warning that it has no class for chatglm
    assert json.loads((out / "a" / "adapter_config.json").read_text())["target_modules"] == ["query_key_value"]


@pytest.mark.parametrize("family,changes,fragment", [
    ("baichuan", dict(rms_norm_eps="x"), "could not convert string to float: 'x'"),
    ("baichuan", dict(rms_norm_eps=-1), "baichuan config rms_norm_eps must be a positive number, got -1"),
    ("baichuan", dict(num_hidden_layers=None),
     "Baichuan config num_hidden_layers must be a positive integer, got None"),
    ("chatglm", dict(num_attention_heads=0), "ChatGLM config num_attention_heads must be a positive integer, got 0"),
    ("chatglm", dict(seq_length="long"), "ChatGLM config seq_length must be a positive integer, got 'long'"),
    ("chatglm", dict(rope_ratio=16, rope_ratio_scales="foo"), "rope_ratio_scales 'foo' is not"),
    ("llama", dict(rope_parameters=dict(rope_type="linear", factor=0, rope_theta=1e4)),
     "config.json's rope_parameters factor must be a positive number, got 0"),
    ("llama", dict(rope_parameters=dict(rope_type="default", rope_theta=-1.0)),
     "config.json's rope_theta must be a positive number, got -1.0"),
    ("mistral", dict(sliding_window=0), "mistral config sliding_window must be a positive integer, got 0"),
    ("granite", dict(embedding_multiplier="x"), "cannot read"),
    ("granite", dict(logits_scaling=0), "granite config logits_scaling must be a positive number, got 0"),
    ("gemma3", dict(text_config=None), "a gemma3 config needs its text_config"),
    # (transformers divides by it where layer_types is left out)
    ("qwen3_5_text", dict(full_attention_interval=0, layer_types=None),
     "full_attention_interval must be an integer >= 1"),
    ("qwen3_next", dict(full_attention_interval=0, layer_types=None),
     "full_attention_interval must be an integer >= 1"),
])
def test_bad_values_in_a_config(setup, capsys, tmp_path, tokenizer_dir, family, changes, fragment):
    """A value of the wrong kind in config.json (ChatGLM's and Baichuan's are read as plain JSON,
    not by transformers; a RoPE factor of 0 or a negative rope_theta, which transformers only
    warns of) is one line naming the file or the key, never a traceback nor a run whose every
    step is skipped."""
    from conftest import make_tiny_model

    base = make_tiny_model(tmp_path / family, family, tokenizer_dir)
    raw = json.loads((base / "config.json").read_text())
    raw.update(changes)
    (base / "config.json").write_text(json.dumps(raw))
    _, _, out, config = setup
    code, err = run_train(capsys, base, config())
    check(code, err, out, fragment)


def test_missing_layers_are_told_before_the_model_is_built(setup, capsys, tmp_path, tiny_llama, monkeypatch):
    """A config.json with more layers than the checkpoint (num_hidden_layers 100000: a typo, or
    the wrong file) built every layer on the meta device first, minutes of it, before saying
    that their tensors were missing."""
    import mlora.models.llama

    _, _, out, config = setup
    base = linked_base(tiny_llama, tmp_path / "base", "config.json")
    raw = json.loads((tiny_llama / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(dict(raw, num_hidden_layers=4)))
    def never(self, *args, **kwargs):
        raise AssertionError("the model was built before its tensors were checked")

    monkeypatch.setattr(mlora.models.llama.CausalLM, "__init__", never)
    check(*run_train(capsys, base, config()), out, "tensor 'model.layers.2.self_attn.q_proj.weight' is missing")


def test_weights_that_do_not_fit_the_config_leave_no_output_dir(setup, capsys, tmp_path, tokenizer_dir):
    """A mismatch found only when the weights load (here a vocabulary larger in config.json than
    in the file) is one line, and the output directory made just before is removed again."""
    from conftest import make_tiny_model

    base = make_tiny_model(tmp_path / "glm", "chatglm", tokenizer_dir)
    raw = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(dict(raw, padded_vocab_size=raw["padded_vocab_size"] + 100)))
    _, _, out, config = setup
    check(*run_train(capsys, base, config({"target_modules": ["query_key_value"]})), out,
          "transformer.embedding.word_embeddings.weight", "has shape")
    assert not out.exists()


@pytest.mark.parametrize("dtype", ["int32", "bool"])
def test_a_base_tensor_that_is_not_floating_point(setup, capsys, tmp_path, tiny_llama, dtype):
    """An integer tensor where a weight goes loaded, and the first matmul failed: a traceback
    mid-run, with metrics.jsonl begun in output_dir."""
    import torch
    from safetensors.torch import load_file, save_file

    _, _, out, config = setup
    base = linked_base(tiny_llama, tmp_path / "base", "model.safetensors")
    tensors = load_file(tiny_llama / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(getattr(torch, dtype))
    save_file(tensors, base / "model.safetensors")
    check(*run_train(capsys, base, config()), out, f"tensor {name!r} holds {dtype} values")
    assert not out.exists()


@pytest.mark.parametrize("in_the_way,fragment", [
    ("a", "out/a is a file, but mlora writes adapter 'a' there (a directory)"),
    ("metrics.jsonl/", "out/metrics.jsonl is a directory, but mlora writes its metrics log there (a file)"),
    ("checkpoints", "out/checkpoints is a file, but mlora writes its resumable checkpoints there"),
    ("a/adapter_model.safetensors/", "adapter_model.safetensors is a directory, but mlora writes the weights of 'a'"),
    ("a@", "out/a is a symbolic link to nothing, but mlora writes adapter 'a' there (a directory)"),
    ("checkpoints@", "out/checkpoints is a symbolic link to nothing, but mlora writes its resumable checkpoints"),
    ("metrics.jsonl|", "out/metrics.jsonl is neither a file nor a directory, but mlora writes its metrics log there"),
    ("a/best", "out/a/best is a file, but mlora writes the best weights of 'a' (save_best) there (a directory)"),
    ("a/best@", "out/a/best is a symbolic link to nothing, but mlora writes the best weights of 'a' (save_best)"),
    ("a/checkpoint-1", "out/a/checkpoint-1 is a file, but mlora writes a save_step checkpoint of 'a' there"),
    ("a/best/notes.txt", "out/a/best holds files mlora did not write (notes.txt), but mlora replaces it with the "
                         "best weights of 'a' (save_best)"),
    ("a/checkpoint-1/notes.txt", "out/a/checkpoint-1 holds files mlora did not write (notes.txt), but mlora "
                                 "replaces it with a save_step checkpoint of 'a'"),
])
def test_something_in_the_way_in_output_dir(setup, tiny_llama, capsys, in_the_way, fragment):
    """A file where an adapter's directory goes (or a directory where a file goes) used to let
    the whole run train and then fail with a traceback when it saved, the training lost; so did
    a symbolic link to nothing (@; exists() says False), and a FIFO (|) where metrics.jsonl goes
    failed at the start of training, output_dir in use; so did a file where save_best's
    <name>/best or save_step's <name>/checkpoint-<step> goes, at its first save, mid-run; and
    a directory there holding someone else's files was deleted at that save."""
    _, data, out, config = setup
    config = functools.partial(config, {"save_best": True, "test_data": str(data), "eval_step": 1}, save_step=1)
    place = out / in_the_way.rstrip("/@|")
    place.parent.mkdir(parents=True, exist_ok=True)
    if in_the_way.endswith("@"):
        place.symlink_to(out / "nowhere")
    elif in_the_way.endswith("|"):
        os.mkfifo(place)
    else:
        place.mkdir() if in_the_way.endswith("/") else place.write_text("x")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, err = run_train(capsys, tiny_llama, config())
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written


def test_a_peft_saved_best_is_refused_naming_what_mlora_did_not_write(setup, tiny_llama, capsys):
    """A best holding a PEFT save_pretrained's adapter (its two files and the README.md PEFT
    writes beside them) is someone else's: refused, by train and by --dry_run with the same line,
    which names the file mlora did not write (it named the first three, mlora's own among them)."""
    import torch

    from mlora.adapter import save_checkpoint_dir

    _, data, out, config = setup
    config = config({"save_best": True, "test_data": str(data), "eval_step": 1})
    save_checkpoint_dir(out / "a" / "best", {"w": torch.zeros(2)}, {"r": 1})
    (out / "a" / "best" / "README.md").write_text("---\nlibrary_name: peft\n---\n")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    lines = []
    for extra in ((), ("--dry_run",)):
        code, err = run_train(capsys, tiny_llama, config, *extra)
        assert code == 2 and len(err.splitlines()) == 1, err
        lines.append(err)
    assert lines[0] == lines[1]
    assert "out/a/best holds files mlora did not write (README.md), but mlora replaces it" in lines[0]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written


def test_only_a_directory_mlora_wrote_is_replaced_whole(tmp_path):
    """Where the run replaces a directory whole (save_best's <name>/best, a checkpoint-<step>
    it will save): one mlora wrote (its two PEFT files, or what is left of them) or an empty
    one passes; a link to a
    directory, whose rmtree failed mid-run, is refused before training."""
    import torch

    from mlora.adapter import save_checkpoint_dir
    from mlora.cli import prepare_output_dir
    from mlora.errors import UserError

    out = tmp_path / "out"
    best = [("a/best", "the best weights of 'a' (save_best)")]
    save_checkpoint_dir(out / "a" / "best", {"w": torch.zeros(2)}, {"r": 1})
    (out / "a" / "checkpoint-1").mkdir()
    assert prepare_output_dir(str(out), ["a"], [*best, ("a/checkpoint-1", "a save_step checkpoint of 'a'")]) == []
    # one of its files gone (a deletion of it cut short): still mlora's
    (out / "a" / "best" / "adapter_model.safetensors").unlink()
    assert prepare_output_dir(str(out), ["a"], best) == []
    (out / "a" / "best").rename(tmp_path / "elsewhere")
    (out / "a" / "best").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match=r"out/a/best is a symbolic link, but mlora replaces it with the best weights"):
        prepare_output_dir(str(out), ["a"], best)


def test_a_checkpoint_name_the_run_never_saves_is_left_alone(setup, tiny_llama, capsys):
    """Only the checkpoint-<step> directories the run will save are looked at: here one step,
    so checkpoint-2 (and what is not a step) stays as it is, and the run trains."""
    _, _, out, config = setup
    (out / "a").mkdir(parents=True)
    for name in ("checkpoint-2", "checkpoint-01", "checkpoint-x"):
        (out / "a" / name).write_text("x")
    code, err = run_train(capsys, tiny_llama, config(save_step=1))
    assert code == 0, err
    assert (out / "a" / "checkpoint-1").is_dir() and (out / "a" / "checkpoint-2").read_text() == "x"


@pytest.mark.parametrize("output_dir", ["out\u0000x", "out\ud800"])
def test_an_output_dir_no_file_system_names(setup, tiny_llama, capsys, output_dir):
    """A NUL, or half a surrogate pair (JSON's "\\ud800"), in the config's output_dir: one line,
    not os.mkdir's ValueError traceback."""
    tmp, _, out, config = setup
    check(*run_train(capsys, tiny_llama, config(output_dir=str(tmp / output_dir))), out, "is not a valid path")


@pytest.mark.parametrize("where", ["data", "base_model", "output_dir", "eval"])
def test_a_name_longer_than_the_file_system_takes(setup, tiny_llama, capsys, where):
    """pathlib's exists() raises ENAMETOOLONG (it returns False only for a path that is not
    there): a name of over 255 bytes in a path of the config or a flag was a traceback."""
    tmp, _, out, config = setup
    long = tmp / ("x" * 300)
    if where == "eval":
        capsys.readouterr()
        code = main(["eval", "--base_model", str(tiny_llama), "--config", str(config(output_dir=str(long))),
                     "--no_progress"])
        err = capsys.readouterr().err.strip()
    else:
        cfg = config({"data": str(long)} if where == "data" else None)
        base = long if where == "base_model" else tiny_llama
        code, err = run_train(capsys, base, cfg, *(["--output_dir", str(long)] if where == "output_dir" else []))
    check(code, err, out, f"{long}", "File name too long")


def test_the_printed_resume_command_resumes(setup, tiny_llama, capsys, monkeypatch, tmp_path):
    """After SIGINT/SIGTERM mlora prints the command that resumes the run: it used to leave out
    --trust_remote_code (a ChatGLM or Baichuan base's tokenizer then fails to load) and to paste
    paths unquoted (one with a space became two arguments)."""
    import shlex
    import signal

    import mlora.trainer

    def interrupted(session, progress, resume):
        raise mlora.trainer.Interrupted(signal.SIGTERM, Path(session.cfg.output_dir) / "checkpoints" / "iter-1")

    monkeypatch.setattr(mlora.trainer, "train", interrupted)
    _, _, out, config = setup
    base = tmp_path / "my base"
    base.symlink_to(tiny_llama)
    code, err = run_train(capsys, base, config(), "--trust_remote_code", "--seed", "7")
    assert code == 128 + signal.SIGTERM
    command = err.splitlines()[-1].removeprefix("mlora: resume with: ")
    assert shlex.split(command) == ["mlora", "train", "--base_model", str(base), "--config", str(config()),
                                    "--output_dir", str(out), "--seed", "7", "--trust_remote_code", "--no_progress",
                                    "--resume"]


@pytest.mark.parametrize("key,value", [("num_attention_heads", -4), ("num_hidden_layers", 0), ("hidden_size", 0),
                                       ("intermediate_size", 0), ("head_dim", 0), ("num_key_value_heads", -2)])
def test_sizes_below_one_in_the_base_config(setup, capsys, tmp_path, tiny_llama, key, value):
    """transformers' config classes let these through: negative heads made tensors of negative
    size (a traceback), no layers was blamed on target_modules, and a size of 0 added torch's
    warning about zero-element tensors to the error."""
    _, _, out, config = setup
    base = linked_base(tiny_llama, tmp_path / "base", "config.json")
    raw = json.loads((tiny_llama / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(dict(raw, **{key: value})))
    check(*run_train(capsys, base, config()), out, f"llama config {key} must be a positive integer, got {value}")


@pytest.mark.parametrize("where", ["config", "jsonl", "json"])
def test_json_nested_too_deeply(setup, tiny_llama, capsys, where):
    """json's decoder recurses once per bracket: a config or data file nested some thousands
    deep was a RecursionError traceback."""
    tmp, data, out, config = setup
    deep = "[" * 100_000 + "]" * 100_000
    if where == "config":
        cfg = tmp / "deep.json"
        cfg.write_text(deep)
        check(*run_train(capsys, tiny_llama, cfg), out, f"{cfg}: JSON nested too deeply")
        return
    data = tmp / f"deep.{where}"
    data.write_text(f'{{"text": {deep}}}\n' if where == "jsonl" else deep)
    check(*run_train(capsys, tiny_llama, config({"data": str(data)})), out, f"{data}", "nested too deeply")


@pytest.mark.parametrize("where", ["config", "jsonl", "json", "template", "config.json", "index", "adapter_config"])
def test_an_integer_of_more_digits_than_python_reads(setup, tiny_llama, capsys, tmp_path, where):
    """json turns a number of over 4300 digits into a ValueError (Python's cap on int()), not a
    JSONDecodeError: a traceback from every JSON file mlora reads, the base's files and a saved
    adapter's too."""
    tmp, data, out, config = setup
    huge = "9" * 5000
    if where == "config":
        cfg = tmp / "huge.json"
        cfg.write_text(f'{{"seed": {huge}, "lora": []}}')
        check(*run_train(capsys, tiny_llama, cfg), out, f"{cfg}: an integer of more than 4300 digits")
        return
    if where in ("config.json", "index"):
        base = linked_base(tiny_llama, tmp_path / "base", "config.json", "model.safetensors")
        raw = (tiny_llama / "config.json").read_text()
        if where == "index":
            (base / "config.json").write_text(raw)
            (base / "model.safetensors.index.json").write_text(f'{{"metadata": {{"total_size": {huge}}}}}')
            check(*run_train(capsys, base, config()), out,
                  "model.safetensors.index.json is not a valid safetensors index")
        else:
            (base / "config.json").write_text(raw.replace('"hidden_size": 64', f'"hidden_size": {huge}'))
            check(*run_train(capsys, base, config()), out, f"{base / 'config.json'}: an integer of more than 4300")
        return
    if where == "adapter_config":
        (out / "a").mkdir(parents=True)
        (out / "a" / "adapter_config.json").write_text(f'{{"r": {huge}}}')
        (out / "a" / "adapter_model.safetensors").write_bytes(b"")
        capsys.readouterr()
        code = main(["eval", "--base_model", str(tiny_llama), "--config", str(config()), "--no_progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"{out / 'a' / 'adapter_config.json'}: an integer of more than 4300 digits" in err, err
        return
    path = tmp / f"huge.{where}"
    if where == "template":
        path = tmp / "template.json"
        path.write_text(f'{{"prompt": "{{instruction}} {{input}}", "prompt_no_input": "{{instruction}}", "v": {huge}}}')
        cfg = config({"prompt": str(path)})
    else:
        path.write_text(f'{{"text": "a", "n": {huge}}}\n' if where == "jsonl" else f'[{{"text": "a", "n": {huge}}}]')
        cfg = config({"data": str(path)})
    line = ":1" if where == "jsonl" else ""
    check(*run_train(capsys, tiny_llama, cfg), out, f"{path}{line}: an integer of more than 4300 digits")


def test_a_tilde_in_output_dir_is_the_home_directory(setup, tiny_llama, capsys, monkeypatch, tmp_path):
    """The config's data paths expand "~"; its output_dir made a directory literally named "~"
    in the working directory (one `rm -rf ~` away from the real one)."""
    _, _, _, config = setup
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    code, err = run_train(capsys, tiny_llama, config(output_dir="~/runs"))
    assert code == 0, err
    assert (home / "runs" / "a" / "adapter_model.safetensors").is_file() and not any(work.iterdir())
    code, err = run_train(capsys, tiny_llama, config(), "--output_dir=~/flag")
    assert code == 0 and (home / "flag" / "a").is_dir() and not any(work.iterdir()), err


def test_a_second_run_into_an_output_dir_in_use_is_refused(setup, tiny_llama, capsys):
    """While a run holds its output_dir (a one-process run exclusively, a pipeline's ranks
    shared), `mlora train` into it is one line and writes nothing; once it is free, it trains."""
    from mlora.output_lock import output_dir_lock

    _, _, out, config = setup
    cfg = config()
    out.mkdir()
    for shared in (False, True):
        with output_dir_lock(out, shared=shared):
            code, err = run_train(capsys, tiny_llama, cfg)
            check(code, err, out, f"output_dir {out} is in use by another mlora train run")
    with output_dir_lock(out, shared=True), output_dir_lock(out, shared=True):
        pass  # a pipeline's ranks 0 and last, threads of one process in the tests, share it
    code, err = run_train(capsys, tiny_llama, cfg)
    assert code == 0, err
    code, err = run_train(capsys, tiny_llama, cfg, "--resume")  # the finished run let it go
    assert code == 0 and "in use" not in err, err


def test_an_output_dir_that_is_a_link_to_nothing(setup, tiny_llama, capsys, tmp_path):
    _, _, _, config = setup
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    code, err = run_train(capsys, tiny_llama, config(output_dir=str(link)))
    assert code == 2 and err == f"mlora: error: output_dir {link} is a symbolic link to nothing; remove it or choose " \
                                "another output_dir", err  # (it said "cannot create it (File exists)")


def test_an_output_dir_that_cannot_be_opened_for_reading_is_not_locked(tmp_path, monkeypatch):
    """A directory the user may write into but not list (mode 0333: a drop box) takes a run,
    but no lock: opening it failed with PermissionError's traceback (os.open is what refuses
    a non-root user there; the test plays it, as root passes every permission check)."""
    import errno

    from mlora import output_lock

    out = tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def open_but_not_out(path, flags, *rest, **kw):
        if os.fspath(path) == str(out):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *rest, **kw)

    monkeypatch.setattr(output_lock.os, "open", open_but_not_out)
    for shared in (False, True):
        with output_lock.output_dir_lock(out, shared=shared):
            (out / "written").write_text("x")
    assert (out / "written").read_text() == "x"


def test_a_full_disk_mid_run_is_one_line_and_the_run_resumes(setup, tiny_llama, capsys, monkeypatch):
    """No space left while writing the second checkpoint: one line naming the file and what to
    do (the first checkpoint is whole), and --resume finishes the run."""
    import errno

    import mlora.checkpoint

    _, _, out, config = setup
    cfg = config({"num_epochs": 3}, save_step=1)
    write = mlora.checkpoint.write_checkpoint
    calls = []

    def full_disk(output_dir, iteration, *args, **kwargs):
        calls.append(iteration)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", f"{output_dir}/checkpoints/x")
        return write(output_dir, iteration, *args, **kwargs)

    monkeypatch.setattr(mlora.checkpoint, "write_checkpoint", full_disk)
    code, err = run_train(capsys, tiny_llama, cfg)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "checkpoints/x: No space left on device; free space" in err and "--resume" in err
    monkeypatch.setattr(mlora.checkpoint, "write_checkpoint", write)
    code, err = run_train(capsys, tiny_llama, cfg, "--resume")
    assert code == 0 and f"resumed from iteration {calls[0]} " in err, err  # the whole checkpoint before


def test_ctrl_c_while_the_base_loads_leaves_no_output_dir(setup, tiny_llama, capsys, monkeypatch):
    import mlora.session

    _, _, out, config = setup

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlora.session.Session, "load_base", interrupted)
    code, err = run_train(capsys, tiny_llama, config())
    assert code == 130 and err == "mlora: interrupted" and not out.exists()


def test_transport_zmq_without_pyzmq_is_one_line_naming_it(setup, tiny_llama, capsys, monkeypatch):
    """Where pyzmq is not installed (`import zmq` fails), --transport zmq says so and names the
    alternative, exit 2; the output directory the rank had created goes again."""
    _, _, out, config = setup
    monkeypatch.setitem(sys.modules, "zmq", None)
    monkeypatch.delitem(sys.modules, "mlora.pipeline.zmq_transport", raising=False)
    capsys.readouterr()
    code = main(["train", "--base_model", str(tiny_llama), "--config", str(config()), "--pipeline", "--rank", "0",
                 "--world_size", "2", "--device", "cpu", "--transport", "zmq", "--master_port", str(free_port()),
                 "--connect_timeout", "1", "--no_progress"])
    check(code, capsys.readouterr().err.strip(), out, "--transport zmq needs pyzmq", "--transport torch")


@pytest.mark.parametrize("command", ["train", "generate"])
def test_a_template_field_mlora_does_not_fill_is_one_line_before_the_model_loads(setup, capsys, tmp_path, tiny_llama,
                                                                                monkeypatch, command):
    """A prompt template's {input.upper} (str.format would read an attribute of the row's text) is
    refused naming the template file and the field, before the base loads (here it may not)."""
    from mlora.session import Session

    _, _, out, config = setup
    base = tiny_llama

    def load_base(self):
        raise AssertionError("the base loaded before the template was checked")

    monkeypatch.setattr(Session, "load_base", load_base)
    template = tmp_path / "template.json"
    template.write_text(json.dumps({"prompt": "{instruction} {input.upper}", "prompt_no_input": "{instruction}"}))
    cfg = config({"prompt": str(template)})
    if command == "train":
        code, err = run_train(capsys, base, cfg)
    else:
        capsys.readouterr()
        code = main(["generate", "--base_model", str(base), "--config", str(cfg), "--prompt", "hi", "--no_progress"])
        err = capsys.readouterr().err.strip()
    check(code, err, out, f"{template}: 'prompt' has {{input.upper}}: mlora fills a placeholder by its name alone")


def test_a_prompt_file_row_unread_for_a_null_says_so(setup, capsys, tiny_llama):
    """A --prompt_file row whose instruction is null was "unknown row shape (keys: input)": the
    line names the null key, its file and row; a null output is a question without its answer."""
    _, _, out, config = setup
    (out / "a").mkdir(parents=True)
    (out / "a" / "adapter_model.safetensors").write_bytes(b"")  # "saved": the prompts are checked first
    rows = out.parent / "prompts.jsonl"
    rows.write_text('{"instruction": "hi", "output": null}\n{"instruction": null, "input": "x"}\n')
    capsys.readouterr()
    code = main(["generate", "--base_model", str(tiny_llama), "--config", str(config()), "--prompt_file", str(rows)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == (f"mlora: error: --prompt_file {rows}:2: 'instruction' is null (a null counts as a missing key), "
                   f"and without it the row is of no shape"), err
