"""The README stays true to the code where a drift can be caught by reading both: every config
key the code accepts is documented with its default and every documented key is accepted (LR
schedules and their kwargs too), every flag of every command is named and every flag it names is
taken, its command lines parse (launch/torchrun.sh's through the script), the flag defaults it
states are the parser's, every file it names exists, the Design section names every module, the
families table every model_type, its sample config parses, and its sample lines (a config error,
training's eval lines) are the code's. (What it says of behaviour is held by the other tests.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from mlora import config as config_module
from mlora.cli import build_parser
from mlora.config import AdapterConfig, TrainConfig, parse_config
from mlora.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the README's `## title` section, up to the next `## ` heading."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else len(README)]


def paragraph(text: str, first: str, last: str) -> str:
    """The stretch of `text` from `first` to the end of `last` (both must be there)."""
    start = text.index(first)
    return text[start:text.index(last, start) + len(last)]


CONFIG = section("Config")
GLOBAL_KEYS = paragraph(CONFIG, "Global keys:", "`lora` (the adapters).")
ADAPTER_KEYS = paragraph(CONFIG, "Per adapter (defaults in brackets):", "any other value is an error).")


def default_of(cls, key: str):
    field = next(f for f in fields(cls) if f.name == key)
    return field.default_factory() if field.default is MISSING else field.default


def literal(text: str):
    """A default as the README writes it ("256", "false", "null", "none", "0.05", "`trivial`",
    '"output"'), or MISSING for prose ("adapters active at once", "= batch_size")."""
    text = text.strip()
    if re.fullmatch(r"[`\"][^`\"]*[`\"]", text):
        return text[1:-1]
    if text in ("null", "none"):
        return None
    if text in ("true", "false"):
        return text == "true"
    try:
        return float(text)
    except ValueError:
        return MISSING


def test_every_global_key_is_documented_with_its_default():
    documented = dict(re.findall(r"`(\w+)`\s\(([^;,:)=]*)", GLOBAL_KEYS))
    assert set(documented) == {f.name for f in fields(TrainConfig)}
    for key, text in documented.items():
        value = literal(text)
        if value is not MISSING:
            assert value == default_of(TrainConfig, key), f"README's default of {key!r}: {text!r}"


def test_every_adapter_key_is_documented_with_its_default():
    # (`key` [default...], or `key` (required) / `key`, listed bare: name, data, test_data, ...)
    bracketed = dict(re.findall(r"`(\w+)`\s\[([^;:|\]]*)", ADAPTER_KEYS))
    named = set(re.findall(r"`(\w+)`", ADAPTER_KEYS))
    accepted = {f.name for f in fields(AdapterConfig)} | set(config_module._UNSUPPORTED_KEYS)
    assert accepted <= named, f"adapter keys the README's Config does not name: {sorted(accepted - named)}"
    assert set(bracketed) <= accepted, f"documented but not accepted: {sorted(set(bracketed) - accepted)}"
    checked = 0
    for key, text in bracketed.items():
        default = default_of(AdapterConfig, key)
        if key == "target_modules":
            assert [m.strip() for m in text.split(",")] == default
            continue
        value = literal(text)
        if value is MISSING and isinstance(default, str):  # (a choice: [adamw | sgd], [constant; ...])
            value = text.strip()
        if value is not MISSING:
            assert value == default, f"README's default of {key!r}: {text!r}, the code's {default!r}"
            checked += 1
    assert checked >= 15  # (the pattern still finds the defaults)


def test_m_loras_aliases_are_documented_and_accepted():
    intro = CONFIG[:CONFIG.index("```json")]
    aliases = {"lora_alpha", "lora_dropout", "early_stop_test_step"}
    for alias in aliases:
        assert f"`{alias}`" in intro
    cfg = parse_config({"early_stop_test_step": 2, "lora": [{"name": "a", "data": "x", "test_data": "y",
                                                             "lora_alpha": 4, "lora_dropout": 0.1}]},
                       reads="generate")
    assert (cfg.eval_step, cfg.lora[0].alpha, cfg.lora[0].dropout) == (2, 4.0, 0.1)


def test_the_config_sample_parses():
    sample = re.search(r"```json\n(.*?)```", CONFIG, re.S).group(1)
    cfg = parse_config(json.loads(sample), reads="generate")  # (its data files are examples: not read)
    assert [a.name for a in cfg.lora] == ["summaries", "chat"]


def test_the_sample_config_error_is_the_codes_line():
    line = re.search(r"mlora: error: config\.json: (lora\[1\] .*)", README).group(1)
    with pytest.raises(UserError) as err:
        parse_config({"lora": [{"name": "a", "data": "x"}, {"name": "b", "data": "x", "lrr": 1}]}, "config.json",
                     reads="generate")
    assert str(err.value) == f"config.json: {line}"


def command_flags() -> dict[str, set[str]]:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    return {name: {o for a in sub._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
            for name, sub in commands.items()}


def test_every_flag_of_every_command_is_in_the_readme():
    for command, flags in command_flags().items():
        missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", README))
        assert not missing, f"mlora {command}'s flags the README never names: {missing}"


def test_every_flag_the_readme_names_exists():
    known = set().union(*command_flags().values())
    # (the scripts' and benchmarks' own flags: launch/torchrun.sh, scripts/trans_to_safetensors.py, ...)
    elsewhere = "\n".join(p.read_text(encoding="utf-8") for folder in ("launch", "scripts", "benchmarks")
                          for p in sorted((ROOT / folder).iterdir()) if p.suffix in (".py", ".sh"))
    named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", README)) - {"--help"}
    unknown = sorted(f for f in named - known if not re.search(re.escape(f) + r"(?![\w-])", elsewhere))
    assert not unknown, f"flags the README names that nothing takes: {unknown}"


def test_every_file_the_readme_names_exists():
    named = set(re.findall(r"(?<![\w./~-])((?:mlora|tests|benchmarks|launch|config|scripts|docs)/[\w./-]*\w)", README))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"files the README names that do not exist: {missing}"


def test_the_design_section_names_every_module():
    design = section("Design")
    files = sorted(p.relative_to(ROOT / "mlora").as_posix() for p in (ROOT / "mlora").rglob("*.py"))
    for module in files:  # named by its file name, as `models/llama.py` or `session.py`
        if not Path(module).name.startswith("__"):
            assert f"`{Path(module).name}`" in design or f"`{module}`" in design, f"mlora/{module}"
    for named in re.findall(r"`([\w/]+\.py)`", design):
        assert any(m == named or Path(m).name == named for m in files), f"Design names {named}, which is gone"


def test_the_families_table_lists_every_model_type():
    from mlora.models.args import FAMILIES

    rows = re.findall(r"^\| (`\w+`(?:, `\w+`)*) \|", README, re.M)
    listed = {name for row in rows for name in re.findall(r"`(\w+)`", row)} - {"model_type"}
    assert listed == set(FAMILIES)


def test_the_environment_variables_it_names_are_read():
    named = set(re.findall(r"\bMLORA_[A-Z_]+\b", README))
    code = "\n".join(p.read_text(encoding="utf-8") for folder in ("mlora", "launch", "tests")
                     for p in sorted((ROOT / folder).rglob("*")) if p.suffix in (".py", ".sh"))
    read = set(re.findall(r"""(?:environ(?:\.get)?[(\[]\s*["']|\$\{?)(MLORA_[A-Z_]+)""", code))
    assert named == read


def test_the_kernel_choices_are_the_codes():
    from mlora.loss import CROSS_ENTROPY_CHOICES
    from mlora.lora import KERNELS

    listed = re.search(r"`MLORA_LORA_KERNEL=([\w|]+)`", README).group(1).split("|")
    assert {"auto", *listed} == set(KERNELS)
    for choice in CROSS_ENTROPY_CHOICES:
        assert f"`MLORA_CROSS_ENTROPY={choice}`" in README or f"`{choice}`" in section("Config")


def test_generate_format_help_says_what_the_readme_does():
    # README: `chat` renders a prompt "as a user turn of the adapter's chat template (its `chat_template`,
    # else the tokenizer's)"; --help said the tokenizer's only
    said = "`chat` as a user turn of the\n  adapter's chat template (its `chat_template`, else the tokenizer's)"
    assert said in README
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    help_text = next(a.help for a in generate._actions if "--format" in a.option_strings)
    assert "chat_template, else the tokenizer's" in help_text


def test_every_lr_schedule_and_its_kwargs_are_documented():
    from mlora.lr_schedule import NOT_A_FUNCTION_OF_THE_STEP, SAME_AS, SCHEDULES

    schedules = paragraph(CONFIG, "LR schedules, as transformers' Trainer names them", "\n\n")
    for name in (*SCHEDULES, *SAME_AS, *NOT_A_FUNCTION_OF_THE_STEP):
        assert f"`{name}`" in schedules, name
    kwargs = paragraph(schedules, "`lr_scheduler_kwargs` is an object", "any other")
    for kind, takes in config_module._SCHEDULER_KWARGS.items():
        for key in takes:  # (each named after its schedule, in the order of the code's table)
            assert re.search(rf"`{key}`", kwargs), f"{kind}'s {key!r}"
    documented = set(re.findall(r"`(\w+)` \[", kwargs)) | set(re.findall(r"`(\w+)` \(", kwargs))
    known = {key for takes in config_module._SCHEDULER_KWARGS.values() for key in takes}
    assert documented - {"lr"} <= known, sorted(documented - known)


def fenced_commands(program: str) -> list[str]:
    """The README's command lines in code blocks (indented ones too) that run `program`, a
    prompt's `$ ` and a `cd DIR && ` dropped, continuation lines joined, a trailing `&` dropped,
    and its optional parts taken (`[--quant_type nf4|fp4]`: `--quant_type nf4`)."""
    commands, in_block = [], False
    lines = iter(README.splitlines())
    for line in lines:
        if line.strip().startswith("```"):
            in_block = not in_block
            continue
        text = re.sub(r"^\s*(\$ )?(cd \S+ && )?", "", line) if in_block else ""
        if not text.startswith(program + " ") or re.match(rf"{re.escape(program)}:? \S*:", text):  # (output)
            continue
        while text.endswith("\\"):
            text = text[:-1] + next(lines).strip()
        text = re.sub(r"\s*&$", "", text.split("  # ")[0].strip())
        text = re.sub(r"\[([^\]]*)\]", r"\1", text)
        commands.append(re.sub(r"(\S+)\|\S+", r"\1", text))
    return commands


def test_the_readmes_mlora_commands_parse():
    commands = fenced_commands("mlora")
    assert len(commands) >= 10
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])  # (argparse's exit 2 on a flag it refuses)
        assert args.command in ("train", "eval", "generate", "demo"), command


def test_the_readmes_torchrun_commands_reach_mlora(tmp_path):
    commands = fenced_commands("launch/torchrun.sh")
    assert len(commands) >= 4
    echo = tmp_path / "torchrun"  # a TORCHRUN that prints what torchrun would run
    echo.write_text("#!/bin/sh\necho \"$@\"\n")
    echo.chmod(0o755)
    for command in commands:
        run = subprocess.run(["bash", *shlex.split(command)], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "TORCHRUN": str(echo), "PYTHON": sys.executable})
        assert run.returncode == 0, f"{command}: {run.stderr}"
        argv = run.stdout.split()
        args = build_parser().parse_args(argv[argv.index("mlora") + 1:])
        assert args.pipeline, command


def shape(line: str) -> str:
    """A printed line with its numbers and its adapter's name left out, to compare with the README's samples."""
    return re.sub(r"\d+(\.\d+)?", "N", re.sub(r"^\[[^\]]+\]", "[NAME]", line.strip()))


def test_the_lines_training_prints_are_the_readmes(tmp_path, tiny_llama, capsys):
    from mlora.cli import main

    output = section("Output")
    samples = [line for line in re.search(r"```\n(\[.*?)```", output, re.S).group(1).splitlines() if line]
    assert len(samples) == 2
    rows = "".join(json.dumps({"instruction": f"say {w}", "output": w}) + "\n" for w in "a b c d e f".split())
    (tmp_path / "rows.jsonl").write_text(rows)
    # a threshold no eval can beat: the third evaluation stops the adapter, after 2 (the README's)
    config = {"eval_step": 1, "lora": [{"name": "chat", "data": str(tmp_path / "rows.jsonl"),
                                        "test_data": str(tmp_path / "rows.jsonl"), "batch_size": 1, "max_steps": 5,
                                        "early_stopping_patience": 2, "early_stopping_threshold": 100}]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(tmp_path / "config.json"),
                 "--output_dir", str(tmp_path / "out"), "--no_progress"]) == 0
    printed = {shape(line) for line in capsys.readouterr().out.splitlines()}
    for sample in samples:
        assert shape(sample) in printed, sample


def test_mlora_runs_offline_as_the_readme_says(monkeypatch, tmp_path):
    from mlora.cli import main

    assert "`mlora` runs with `HF_HUB_OFFLINE=1` unless the environment sets it otherwise" in README
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["train", "--base_model", str(tmp_path), "--config", str(tmp_path / "none.json")]) == 2
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("command,flag,said,default", [
    ("generate", "--max_new_tokens", "(defaults: 64 new tokens at most", 64),
    ("generate", "--repetition_penalty", "`--repetition_penalty` 1 = off", 1.0),
    ("generate", "--batch_size", "The lines run `--batch_size` at a time (default 16;", 16),
    ("generate", "--format", "`alpaca` through the adapter's prompt template (the default)", "alpaca"),
    ("train", "--transport", "`--transport torch` (default:", "torch"),
    ("train", "--connect_timeout", "`--connect_timeout` seconds (default 300)", 300),
    ("train", "--peer_timeout", "within `--peer_timeout` seconds\n  (default 30)", 30),
])
def test_the_flag_defaults_it_states_are_the_parsers(command, flag, said, default):
    assert said in README
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    assert next(a.default for a in parser._actions if flag in a.option_strings) == default
