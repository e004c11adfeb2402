"""`mlora train --dry_run`: its plan equals what the real `mlora train` then does (steps,
tokens, fused batches and their shapes, the memory model's peak of the largest), it reads no
weights, writes nothing, and refuses what train refuses with train's own line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import mlora.trainer
from mlora.batching import fuse
from mlora.cli import main
from mlora.config import load_config
from mlora.errors import UserError
from mlora.loader import read_model_config
from mlora.memory import LoraShape, estimate_peak_bytes
from mlora.metrics import read_metrics
from mlora.output_lock import output_dir_lock
from test_train import make_config

PAD_ID = 2  # the tiny tokenizer's pad (its EOS)


def dry_run(capsys, base, cfg, *extra) -> tuple[int, dict | None, str]:
    """(exit code, the JSON line, stderr) of `mlora train --dry_run`."""
    capsys.readouterr()
    code = main(["train", "--dry_run", "--base_model", str(base), "--config", str(cfg), *extra])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    return code, json.loads(lines[-1]) if lines else None, captured.err


# Batches of different sizes and shapes under each strategy: a (2-row micro-batches of up to 54
# tokens), b (1-row ones), c (left-padded); optimal-fit packs its rows
STRATEGIES = {
    "trivial": dict(),
    "fast-fit": dict(train_strategy="fast-fit", train_lora_simultaneously_num=2, max_tokens_per_batch=160),
    "optimal-fit": dict(train_strategy="optimal-fit", train_lora_candidate_num=2, train_lora_simultaneously_num=2,
                        max_tokens_per_batch=100, packing=True),
    # one adapter admitted at a time, a stopping mid-epoch (max_steps 4 of 3 a epoch), c after 1 step
    "max_steps": dict(train_strategy="fast-fit", train_lora_candidate_num=1, train_lora_simultaneously_num=1,
                      max_tokens_per_batch=120),
}
MAX_STEPS = {"a": 4, "c": 1}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plan_is_what_training_does(tiny_llama, tmp_path, capsys, monkeypatch, strategy):
    out = tmp_path / "out"
    cfg_path = make_config(tmp_path, ["a", "b", "c"], out, **STRATEGIES[strategy])
    if strategy == "max_steps":
        raw = json.loads(cfg_path.read_text())
        for a in raw["lora"]:
            a["max_steps"] = MAX_STEPS.get(a["name"])
        cfg_path.write_text(json.dumps(raw))
    code, plan, err = dry_run(capsys, tiny_llama, cfg_path)
    assert code == 0, err
    if strategy == "max_steps":
        assert [(a["steps"], a["epochs"]) for a in plan["adapters"]] == [(4, 2), (6, 2), (1, 1)]
        assert "(fast-fit, up to 1 adapter each)" in err
    assert not out.exists()  # nothing written, not even the directory
    assert "fused batches" in err and "estimated peak memory" in err

    cfg = load_config(cfg_path)
    real = mlora.trainer.fused_batches
    shapes = []  # [rows, seq_len] of every fused batch the trainer trains on, as fuse builds it

    def spy(*args, **kwargs):
        for parts in real(*args, **kwargs):
            shapes.append(tuple(fuse(parts, PAD_ID, cfg.cutoff_len if cfg.packing else None).input_ids.shape))
            yield parts

    monkeypatch.setattr(mlora.trainer, "fused_batches", spy)
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--no_progress"]) == 0
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    by_name = {a["name"]: a for a in plan["adapters"]}
    for a in cfg.lora:
        mine = [r for r in steps if r["adapter"] == a.name]
        assert by_name[a.name]["steps"] == len(mine) == max(r["step"] for r in mine)
        assert by_name[a.name]["trained_tokens"] == sum(r["tokens"] for r in mine)
        assert by_name[a.name]["epochs"] == 1 + max(r["epoch"] for r in mine)
    assert plan["batches"] == len(shapes)
    assert plan["padded_tokens"] == sum(rows * seq_len for rows, seq_len in shapes)
    assert plan["token_budget"] == cfg.max_tokens_per_batch if strategy != "trivial" else plan["token_budget"] is None

    # The peak: memory.py's estimate of the costliest batch that ran, for this run's adapters
    # (fp32 on the CPU; adapter c pads on the left, and packing too gives SDPA a mask)
    model_args = read_model_config(tiny_llama)[1]
    estimates = {shape: estimate_peak_bytes(model_args, rows=shape[0], seq_len=shape[1], dtype=torch.float32,
                                            lora=[LoraShape.of(a) for a in cfg.lora], explicit_mask=True,
                                            active_adapters=cfg.train_lora_simultaneously_num,
                                            device=torch.device("cpu")).total
                 for shape in shapes}
    assert plan["peak_bytes"] == max(estimates.values())
    assert estimates[(plan["largest_batch"]["rows"], plan["largest_batch"]["seq_len"])] == plan["peak_bytes"]


def base_without_weights(tiny_llama: Path, where: Path, weights: bytes | None) -> Path:
    """A copy of the tiny base with its config.json and tokenizer, and the given bytes (or no
    file) as model.safetensors."""
    shutil.copytree(tiny_llama, where, ignore=shutil.ignore_patterns("*.safetensors"))
    if weights is not None:
        (where / "model.safetensors").write_bytes(weights)
    return where


@pytest.mark.parametrize("weights", [None, b"\x07not a safetensors file"], ids=["missing", "corrupt"])
def test_plans_without_reading_the_weights(tiny_llama, tmp_path, capsys, weights):
    base = base_without_weights(tiny_llama, tmp_path / "base", weights)
    cfg_path = make_config(tmp_path, ["a", "b"], tmp_path / "runs" / "out")
    code, plan, err = dry_run(capsys, base, cfg_path)
    assert code == 0, err
    assert [a["steps"] for a in plan["adapters"]] == [6, 6]
    assert not (tmp_path / "runs").exists()
    # (the real run does read them, and says what is wrong with them)
    assert main(["train", "--base_model", str(base), "--config", str(cfg_path), "--no_progress"]) == 2
    assert "safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["trivial", "fast-fit"])
def test_a_budget_trivial_does_not_use_is_said(tiny_llama, tmp_path, capsys, strategy):
    """trivial fuses without a token budget: a max_tokens_per_batch given with it was ignored
    without a word. Training notes it at its start (not a --resume of a finished run, which trains
    nothing), and the plan's budget line says so."""
    out = tmp_path / "out"
    cfg_path = make_config(tmp_path, ["b"], out, train_strategy=strategy, max_tokens_per_batch=100)
    code, plan, err = dry_run(capsys, tiny_llama, cfg_path)
    assert code == 0, err
    unused = strategy == "trivial"
    assert ("token budget: none (train_strategy trivial fuses without one; its max_tokens_per_batch 100 is not "
            "used)" in err) == unused
    assert plan["token_budget"] == (None if unused else 100)
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--no_progress"]) == 0
    note = ("mlora: note: max_tokens_per_batch 100 is not used: train_strategy trivial fuses the active adapters' "
            "next micro-batches without a token budget (fast-fit and optimal-fit keep to one)")
    assert (note in capsys.readouterr().err.splitlines()) == unused
    # a --resume of the finished run trains nothing: nothing to note of its batches
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--no_progress",
                 "--resume"]) == 0
    said = capsys.readouterr()
    assert "nothing to resume: the run in" in said.out and "max_tokens_per_batch" not in said.err


def test_plan_notes_that_early_stopping_may_end_adapters_sooner(tiny_llama, tmp_path, capsys):
    """A plan evaluates nothing: its steps are those of a run that never stops early, which it says."""
    cfg_path = make_config(tmp_path, ["a", "b"], tmp_path / "out")
    cfg = json.loads(cfg_path.read_text())
    cfg["lora"][1].update(test_data=cfg["lora"][1]["data"], eval_step=2, early_stopping_patience=1)
    cfg_path.write_text(json.dumps(cfg))
    code, plan, err = dry_run(capsys, tiny_llama, cfg_path)
    assert code == 0, err
    assert [a["steps"] for a in plan["adapters"]] == [6, 6]
    assert "  note: early stopping may stop b before the steps planned here (their slots then go to queued " \
           "adapters sooner)" in err.splitlines()


@pytest.mark.parametrize("pipeline", [False, True], ids=["one_process", "pipeline"])
def test_plan_counts_and_notes_rows_with_no_token_to_learn(tiny_llama, tmp_path, capsys, pipeline):
    """Each adapter's rows with no token to learn within cutoff_len: counted in its JSON entry
    (0 where none) and noted under the table with training's note, for a pipeline too."""
    from test_train import unlearnable_steps_config

    cfg_path = unlearnable_steps_config(tmp_path, ["a", "z"], tmp_path / "out")
    code, plan, err = dry_run(capsys, tiny_llama, cfg_path, *(["--pipeline", "--world_size", "2"] if pipeline else []))
    assert code == 0, err
    assert [(a["name"], a["rows"], a["rows_without_labels"]) for a in plan["adapters"]] == [("a", 10, 0), ("z", 5, 3)]
    assert (f"  note: adapter 'z': 3 of 5 rows of {tmp_path / 'z.jsonl'} have no token to learn within cutoff_len 64 "
            f"(the answer starts past it, or there is none); they are trained on but teach nothing: raise "
            f"cutoff_len or shorten the prompts") in err.splitlines()
    assert "adapter 'a':" not in err


@pytest.mark.parametrize("pipeline", [False, True])
def test_json_line_keeps_names_as_written(tiny_llama, tmp_path, capsys, pipeline):
    """An adapter's name prints as written in the JSON line, as eval's and generate's lines print
    it (json_line), not \\u-escaped; one process and a pipeline's plan alike."""
    cfg_path = make_config(tmp_path, ["a"], tmp_path / "out")
    cfg = json.loads(cfg_path.read_text())
    cfg["lora"][0]["name"] = "日本語"
    cfg_path.write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["train", "--dry_run", "--base_model", str(tiny_llama), "--config", str(cfg_path),
                 *(["--pipeline", "--world_size", "2"] if pipeline else [])]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert '"name": "日本語"' in line and json.loads(line)["adapters"][0]["name"] == "日本語"


def test_plans_with_an_init_from_that_fits(tiny_llama, tmp_path, capsys):
    """An init_from is read and checked against the adapter built on the meta device, as the
    trainer checks it: one that fits plans (no values are copied there)."""
    cfg_path = make_config(tmp_path, ["a", "b"], tmp_path / "out")
    cfg = json.loads(cfg_path.read_text())
    cfg["lora"][0]["init_from"] = str(saved_adapter(tiny_llama, cfg_path, tmp_path / "init"))
    cfg_path.write_text(json.dumps(cfg))
    code, plan, err = dry_run(capsys, tiny_llama, cfg_path)
    assert code == 0, err
    assert [a["steps"] for a in plan["adapters"]] == [6, 6]


@pytest.mark.parametrize("family,targets", [("chatglm", ["qkv_proj", "down_proj"]),
                                            ("gpt_oss", ["q_proj", "gate_up_proj", "down_proj"])])
def test_plans_with_an_init_from_in_the_bases_own_names(tmp_path, tokenizer_dir, capsys, family, targets):
    """An init_from of a base whose PEFT files name modules their own way (ChatGLM's
    query_key_value, ...) or stack the experts' LoRA (GPT-OSS): read with the base's naming, as
    the trainer reads it once the base is loaded (the unloaded session's default naming found
    every tensor missing)."""
    from conftest import make_tiny_model
    from mlora.adapter import Adapter
    from mlora.lora import BatchLayout, inject_lora
    from mlora.models import family_for
    from mlora.models.naming import naming_for
    from mlora.session import resolve_targets

    base = make_tiny_model(tmp_path / "base", family, tokenizer_dir)
    cfg_path = make_config(tmp_path, ["a"], tmp_path / "out")
    raw = json.loads(cfg_path.read_text())
    raw["lora"][0]["target_modules"] = targets
    cfg_path.write_text(json.dumps(raw))
    model_args = read_model_config(base)[1]
    with torch.device("meta"):
        model = family_for(model_args.model_type).CausalLM(model_args)
    adapter = Adapter(resolve_targets(load_config(cfg_path), model_args).lora[0], inject_lora(model, BatchLayout()), 0,
                      torch.device("cpu"), naming=naming_for(model_args.model_type))
    raw["lora"][0]["init_from"] = str(adapter.save(tmp_path / "init", str(base)))
    cfg_path.write_text(json.dumps(raw))
    code, plan, err = dry_run(capsys, base, cfg_path)
    assert code == 0, err


def refusal(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def saved_adapter(tiny_llama: Path, cfg_path: Path, where: Path) -> Path:
    """A PEFT directory of the config's first adapter, as initialized (an init_from for it)."""
    from mlora.adapter import Adapter
    from mlora.lora import BatchLayout, inject_lora
    from mlora.models import family_for

    model_args = read_model_config(tiny_llama)[1]
    with torch.device("meta"):
        model = family_for(model_args.model_type).CausalLM(model_args)
    adapter = Adapter(load_config(cfg_path).lora[0], inject_lora(model, BatchLayout()), 0, torch.device("cpu"))
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    return adapter.save(where, str(tiny_llama))


@pytest.mark.parametrize("setup", ["output_dir_is_a_file", "output_dir_under_a_file", "adapter_dir_is_a_file",
                                   "r_too_large", "missing_data", "output_dir_in_use", "unfinished_run",
                                   "init_from_of_other_r", "init_from_not_finite", "disk_too_small",
                                   "chat_template_not_jinja"])
def test_refuses_what_train_refuses_with_its_line(tiny_llama, tmp_path, capsys, monkeypatch, setup):
    out = tmp_path / "out"
    overrides = {}
    if setup == "output_dir_is_a_file":
        out.write_text("")
    elif setup == "output_dir_under_a_file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    elif setup == "adapter_dir_is_a_file":
        out.mkdir()
        (out / "a").write_text("")
    elif setup == "unfinished_run":  # (a checkpoint and no FINISHED.json: --resume forgotten?)
        (out / "checkpoints" / "iter-00000003").mkdir(parents=True)
    cfg_path = make_config(tmp_path, ["a", "b"], out, **overrides)
    cfg = json.loads(cfg_path.read_text())
    if setup == "r_too_large":  # (checked once the base is built: train refuses it after loading the weights)
        cfg["lora"][1]["r"] = 1000
    if setup == "missing_data":
        cfg["lora"][0]["data"] = str(tmp_path / "nowhere.jsonl")
    if setup == "chat_template_not_jinja":  # (read with the config: before the tokenizer, the base, the rows)
        (tmp_path / "chat.jinja").write_text("{% for m in messages %}{{ m.content }}")
        cfg["lora"][1]["chat_template"] = str(tmp_path / "chat.jinja")
    if setup.startswith("init_from"):  # (checked as the trainer builds the adapters: after the weights' load)
        init = saved_adapter(tiny_llama, cfg_path, tmp_path / "init")
        if setup == "init_from_of_other_r":
            peft = json.loads((init / "adapter_config.json").read_text())
            (init / "adapter_config.json").write_text(json.dumps({**peft, "r": 8}))
        else:
            from safetensors.torch import load_file, save_file

            tensors = load_file(init / "adapter_model.safetensors")
            tensors[sorted(tensors)[-1]][0, 0] = float("nan")
            save_file(tensors, init / "adapter_model.safetensors")
        cfg["lora"][0]["init_from"] = str(init)
    if setup == "disk_too_small":  # (the trainer's check, once it built the adapters)
        monkeypatch.setattr(mlora.trainer.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 0))
    cfg_path.write_text(json.dumps(cfg))
    argv = ["train", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--no_progress"]
    if setup == "output_dir_in_use":
        out.mkdir()
        with output_dir_lock(out):
            expected, planned = refusal(capsys, argv), refusal(capsys, [*argv, "--dry_run"])
    else:
        expected, planned = refusal(capsys, argv), refusal(capsys, [*argv, "--dry_run"])
    assert expected[0] == 2 and expected[1].startswith("mlora: error: ")
    assert planned == expected
    if setup == "chat_template_not_jinja":
        assert expected[1].endswith(f"lora[1] (name 'b'): 'chat_template': {tmp_path / 'chat.jinja'}:1: Jinja syntax "
                                    f"error (Unexpected end of template. Jinja was looking for the following tags: "
                                    f"'endfor' or 'else'. The innermost block that needs to be closed is 'for'.)")
    if setup == "unfinished_run":  # a fresh start that would delete them is planned, and deletes nothing
        assert main([*argv, "--dry_run", "--overwrite"]) == 0
        assert (out / "checkpoints" / "iter-00000003").is_dir() and not (out / "metrics.jsonl").exists()


def test_refuses_resume_in_one_line(tiny_llama, tmp_path, capsys):
    cfg_path = make_config(tmp_path, ["a"], tmp_path / "out")
    argv = ["train", "--dry_run", "--base_model", str(tiny_llama), "--config", str(cfg_path)]
    for extra in ([], ["--pipeline", "--balance", "3", "1"]):
        code, line = refusal(capsys, [*argv, *extra, "--resume"])
        assert code == 2 and "--resume" in line and line.startswith("mlora: error: --dry_run")
    assert not (tmp_path / "out").exists()


def test_a_long_walk_shows_a_progress_bar_unless_no_progress(tiny_llama, tmp_path, capsys, monkeypatch):
    """A walk that lasts PROGRESS_DELAY_S (made 0 here) shows a bar of the run's optimizer steps
    on stderr, cleared before the plan; with --no_progress none, nor for a walk shorter than the
    delay (this one, at the default: the README's plans print as they did). stdout's JSON line
    and the plan on stderr are the same in all three."""
    import re

    import mlora.dry_run

    cfg_path = make_config(tmp_path, ["a", "b"], tmp_path / "out")
    runs = {"short": dry_run(capsys, tiny_llama, cfg_path)}
    monkeypatch.setattr(mlora.dry_run, "PROGRESS_DELAY_S", 0)
    runs["long"] = dry_run(capsys, tiny_llama, cfg_path)
    runs["no_progress"] = dry_run(capsys, tiny_llama, cfg_path, "--no_progress")
    bar = "dry run: walking the fused batches"
    assert [(code, bar in err) for code, _, err in runs.values()] == [(0, False), (0, True), (0, False)]
    code, plan, err = runs["long"]
    assert f"/{sum(a['steps'] for a in plan['adapters'])} [" in err  # (the bar's total: every adapter's steps)
    assert plan == runs["short"][1] == runs["no_progress"][1]
    # (the bar, cleared: its lines start and end in a carriage return; the seconds the plan took vary)
    plans = [re.sub(r"\([0-9.]+ s\)", "(s)", re.sub(r"\r[^\n]*\r", "", err)) for _, _, err in runs.values()]
    assert plans[0] == plans[1] == plans[2] and plans[1].startswith("mlora: dry run of")


def test_a_long_pipeline_plan_shows_a_progress_bar_unless_no_progress(pipe_model, tmp_path, capsys, monkeypatch):
    """As the one-process walk's (the test above): the pipeline's dry run, planning for
    PROGRESS_DELAY_S (made 0 here), shows a bar of the run's optimizer steps, counted as their
    segments are planned, cleared before the plan; none with --no_progress or for a plan shorter
    than the delay. stdout's JSON line and the plan on stderr are the same in all three."""
    import re

    import mlora.dry_run

    cfg_path = pipe_config(tmp_path)
    runs = {"short": pipe_dry_run(capsys, pipe_model, cfg_path)}
    monkeypatch.setattr(mlora.dry_run, "PROGRESS_DELAY_S", 0)
    shown, made = [], mlora.dry_run.progress_bar
    monkeypatch.setattr(mlora.dry_run, "progress_bar", lambda *args: shown.append(made(*args)) or shown[-1])
    runs["long"] = pipe_dry_run(capsys, pipe_model, cfg_path)
    runs["no_progress"] = pipe_dry_run(capsys, pipe_model, cfg_path, "--no_progress")
    bar = "dry run: planning the pipeline's segments"
    assert [(code, bar in err) for code, _, err in runs.values()] == [(0, False), (0, True), (0, False)]
    code, plan, err = runs["long"]
    steps = sum(a["steps"] for a in plan["adapters"])
    assert f"/{steps} [" in err  # (the bar's total: every adapter's steps)
    assert plan["segments"] > 1 and shown[0].n == steps  # (counted as each segment was planned)
    assert plan == runs["short"][1] == runs["no_progress"][1]
    plans = [re.sub(r"\([0-9.]+ s\)", "(s)", re.sub(r"\r[^\n]*\r", "", err)) for _, _, err in runs.values()]
    assert plans[0] == plans[1] == plans[2] and plans[1].startswith("mlora: dry run of")


def test_automatic_budget_is_the_trainers(tiny_llama, tmp_path, capsys):
    """On CUDA fast-fit without max_tokens_per_batch gets memory.plan_token_budget's budget, from
    the device's memory less the weights; seen here on the CPU through token_budget itself."""
    from mlora.dry_run import token_budget
    from mlora.memory import choose_token_budget, run_estimate_kwargs, weight_bytes
    from mlora.session import open_session

    cfg_path = make_config(tmp_path, ["a", "b"], tmp_path / "out", train_strategy="fast-fit")
    session = open_session(tiny_llama, cfg_path, device="cpu", load_base=False)
    model_args = read_model_config(tiny_llama)[1]
    device_bytes = 160 * 2**20
    free = device_bytes - weight_bytes(model_args, torch.float32)
    budget, source, why = token_budget(session, model_args, device_bytes)
    kwargs = run_estimate_kwargs(session.cfg, dtype=torch.float32, device=session.device)
    assert budget == choose_token_budget(model_args, free_bytes=free, seq_len=64, fraction=0.9, **kwargs) > 0
    assert source == "memory_fraction" and "memory_fraction 0.9" in why
    assert token_budget(session, model_args, None)[:2] == (None, "none")  # (the CPU: no budget, as the trainer)
    with pytest.raises(UserError, match="its weights .* do not fit"):  # (the run would fail loading them)
        token_budget(session, model_args, weight_bytes(model_args, torch.float32))


def test_plan_against_a_device_memory(tiny_llama, tmp_path, capsys, monkeypatch):
    """What a CUDA device's plan says (its memory stood in for on the CPU): the automatic budget
    in force and the peak against the memory free on the device, as the trainer measures it
    (memory.device_free_bytes: not the device's total, which other processes may be using)."""
    import mlora.memory

    monkeypatch.setattr(mlora.memory, "device_free_bytes", lambda device: 160 * 2**20)
    cfg_path = make_config(tmp_path, ["a", "b"], tmp_path / "out", train_strategy="fast-fit")
    code, plan, err = dry_run(capsys, tiny_llama, cfg_path)
    assert code == 0, err
    assert plan["budget_source"] == "memory_fraction" and plan["free_bytes"] == 160 * 2**20
    assert plan["token_budget"] > 0 and plan["token_budget"] % 64 == 0  # (whole rows of cutoff_len)
    assert f"token budget: {plan['token_budget']} (automatic: memory_fraction 0.9 of the" in err
    assert f"of the 160 MiB free on cpu ({plan['peak_bytes'] / (160 * 2**20):.0%})" in err


# ------------------------------------------------------------------ --pipeline
# pipe_model (4 layers, tied embeddings) in 3 stages: embed + 2 layers | 2 layers | norm + head,
# 1F1B bounds 3, 2, 1; test_pipeline.write_config's 2 adapters, cut every 2 steps (3 segments)
PIPE_BALANCE = [3, 2, 2]


def pipe_config(tmp_path: Path, num_adapters: int = 2) -> Path:
    from test_pipeline import write_config

    return write_config(tmp_path, num_adapters, tmp_path / "out", save_step=2)


def pipe_dry_run(capsys, base, cfg, *extra):
    return dry_run(capsys, base, cfg, "--pipeline", "--balance", *map(str, PIPE_BALANCE), *extra)


def stage_weights(base: Path, stages) -> list[int]:
    from mlora.memory import weight_bytes

    return [weight_bytes(read_model_config(base)[1], torch.float32, parts=parts) for parts in stages]


def stage_0_estimate(base: Path, cfg_path: Path, shape: tuple[int, int]):
    """Stage 0's estimate of a micro-batch of `shape`, by the memory model as the ranks priced a
    micro-batch before the pipeline's dry run (the arguments of memory.micro_batches_in_flight
    in worker.py then)."""
    from mlora.memory import explicit_mask_of
    from mlora.pipeline.run import plan_stages

    cfg = load_config(cfg_path)
    parts = plan_stages(str(base), len(PIPE_BALANCE), PIPE_BALANCE)[0]
    return estimate_peak_bytes(read_model_config(base)[1], rows=shape[0], seq_len=shape[1], dtype=torch.float32,
                               lora=cfg.lora, recompute=cfg.recompute, parts=parts,
                               explicit_mask=explicit_mask_of(cfg), active_adapters=1, device=torch.device("cpu"))


def fake_rank_memory(monkeypatch, free: int, weights: list[int]) -> None:
    """Each in-process rank's device with `free` bytes before it loads anything, less what a CUDA
    device would see allocated when the rank reads it: its slice's weights and its adapters' fp32
    A and B (its StageWorker builds them before it plans)."""
    import mlora.memory
    import mlora.pipeline.worker as worker
    from test_pipeline_memory import thread_rank

    adapters: dict[int, int] = {}
    real_stage_memory = worker.stage_memory

    def stage_memory(session, micro_batches, pack_len):
        adapters[thread_rank()] = sum(4 * (w.lora_A.numel() + w.lora_B.numel()) for wrapper in session.wrappers.values()
                                      for w in wrapper.adapters.values())
        return real_stage_memory(session, micro_batches, pack_len)

    monkeypatch.setattr(worker, "stage_memory", stage_memory)
    monkeypatch.setattr(mlora.memory, "device_free_bytes",
                        lambda device: free - weights[thread_rank()] - adapters.get(thread_rank(), 0))


def free_lowering_stage_0(base: Path, cfg_path: Path, shape: tuple[int, int]) -> int:
    """Free memory (before the weights load) on which stage 0 holds 2 micro-batches (1F1B: 3),
    but would hold 3 were its weights not counted, and the other stages their 1F1B bounds."""
    est = stage_0_estimate(base, cfg_path, shape)
    return est.weights + int((est.total - est.weights + 1.9 * est.activations) / load_config(cfg_path).memory_fraction)


# (bounds, in flight) of the stages: 2 adapters on a device with room for 2 micro-batches of
# stage 0 (1F1B: 3); 1 adapter, ample memory, but its steps of 2 micro-batches each, the next
# fed once the last is back (plan.py's Rule), keep stage 0 below its bound
PIPE_CASES = {"lowered": (2, [2, 2, 1], [2, 2, 1]), "below_bound": (1, [3, 2, 1], [2, 2, 1])}


@pytest.mark.parametrize("case", PIPE_CASES)
def test_pipeline_plan_is_what_the_pipeline_computes(pipe_model, tmp_path, capsys, monkeypatch, case):
    """`--dry_run --pipeline` plans every stage in one process, joining no rank (the transport
    flags are ignored), and its plan is what the ranks of the real run then compute: the split,
    the micro-batches, each stage's bound on micro-batches in flight (lowered by the memory of a
    device faked here, or 1F1B's), the most in flight the plans hold there, and the memory
    model's figures of that (InFlightFit.need of that many, beside the weights)."""
    import mlora.memory
    import mlora.pipeline.worker as worker
    from mlora.pipeline.run import plan_stages
    from test_pipeline_inprocess import run_threads
    from test_pipeline_memory import peak_in_flight, thread_rank

    num_adapters, expected_bounds, expected_in_flight = PIPE_CASES[case]
    cfg_path = pipe_config(tmp_path, num_adapters)
    code, plan, err = pipe_dry_run(capsys, pipe_model, cfg_path)  # (the CPU: the largest micro-batch's shape)
    assert code == 0, err
    shape = (plan["largest_batch"]["rows"], plan["largest_batch"]["seq_len"])
    free = free_lowering_stage_0(pipe_model, cfg_path, shape) if case == "lowered" else 2**40
    monkeypatch.setattr(mlora.memory, "device_free_bytes", lambda device: free)
    code, plan, err = pipe_dry_run(capsys, pipe_model, cfg_path, "--transport", "zmq", "--master_addr", "192.0.2.1",
                                   "--master_port", "1", "--connect_timeout", "1")
    assert code == 0, err
    assert not (tmp_path / "out").exists()

    # the real run, each rank's device with that much free before its slice loaded
    fits, plans, shapes = {}, {}, []
    real_fit, real_plan, real_fuse = mlora.memory.micro_batches_in_flight, worker.build_plan, worker.fuse

    def fit(*args, **kwargs):
        fits[thread_rank()] = (real_fit(*args, **kwargs), (kwargs["rows"], kwargs["seq_len"]))
        return fits[thread_rank()][0]

    def build_plan(num_stages, streams, costs=None, max_in_flight=None, candidate_num=None):
        plan = real_plan(num_stages, streams, costs, max_in_flight, candidate_num)
        plans.setdefault(thread_rank(), []).append((max_in_flight, streams, plan))
        return plan

    def fuse(parts, pad_id, pack_len=None):
        batch = real_fuse(parts, pad_id, pack_len)
        shapes.append(tuple(batch.input_ids.shape))
        return batch

    stages = plan_stages(str(pipe_model), 3, PIPE_BALANCE)
    weights = stage_weights(pipe_model, stages)
    fake_rank_memory(monkeypatch, free, weights)
    monkeypatch.setattr(mlora.memory, "micro_batches_in_flight", fit)
    monkeypatch.setattr(worker, "build_plan", build_plan)
    monkeypatch.setattr(worker, "fuse", fuse)
    worker_stages = run_threads(pipe_model, cfg_path, tmp_path / "out", 3, PIPE_BALANCE)
    real_err = capsys.readouterr().err

    assert [s["modules"] for s in plan["stages"]] == worker_stages == stages
    bounds = {tuple(b) for r in range(3) for b, _, _ in plans[r]}
    assert bounds == {tuple(expected_bounds)}  # (as free_lowering_stage_0 meant)
    assert [s["in_flight_bound"] for s in plan["stages"]] == expected_bounds
    assert plan["segments"] == len(plans[0]) == (3 if num_adapters == 2 else 2)
    for s, stage in enumerate(plan["stages"]):
        fit_s, fit_shape = fits[s]
        assert stage["rank"] == s and stage["device"] == "cpu" and stage["free_bytes"] == free
        assert stage["in_flight"] == max(peak_in_flight(p.stages[s]) for _, _, p in plans[0])
        assert stage["weights_bytes"] == weights[s]
        assert stage["peak_bytes"] == weights[s] + fit_s.need(stage["in_flight"])
        assert fit_shape == shape
    assert [s["in_flight"] for s in plan["stages"]] == expected_in_flight
    assert plan["peak_bytes"] == max(s["peak_bytes"] for s in plan["stages"]) == plan["stages"][0]["peak_bytes"]
    assert (plan["device"], plan["free_bytes"], plan["token_budget"], plan["budget_source"]) == ("cpu", free, None,
                                                                                                   "none")
    lowered = [line for line in real_err.splitlines() if "lowered" in line]
    assert [f"  {line.removeprefix('mlora: ')}" for line in lowered] == [line for line in err.splitlines()
                                                                        if "lowered to fit" in line]
    bound = "bound 2, lowered from 1F1B's 3 to fit" if case == "lowered" else "bound 3, 1F1B's"
    assert f"  stage 0 (embed..layer.1, 2 layers) on cpu: at most 2 micro-batches in flight ({bound}); estimated " \
           f"peak" in err

    # the micro-batches rank 0 fused, and what the last rank logged of each adapter's steps
    micro = {a["name"]: sum(len(streams.get(a["name"], [])) for _, streams, _ in plans[0]) for a in plan["adapters"]}
    assert plan["batches"] == len(shapes) == sum(micro.values())
    assert plan["padded_tokens"] == sum(rows * seq_len for rows, seq_len in shapes)
    steps = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    for a in plan["adapters"]:
        mine = [r for r in steps if r["adapter"] == a["name"]]
        assert a["micro_batches"] == micro[a["name"]]
        assert a["steps"] == len(mine) == max(r["step"] for r in mine)
        assert a["trained_tokens"] == sum(r["tokens"] for r in mine)
        assert a["epochs"] == 1 + max(r["epoch"] for r in mine)


def test_pipeline_bound_counts_the_adapters_a_rank_holds_when_it_reads_its_memory(pipe_model, tmp_path, capsys,
                                                                                   monkeypatch):
    """A rank reads its free memory with its slice and its adapters' A and B resident: on a
    device where stage 0 has room for 2 micro-batches less half of those adapters' bytes, the
    ranks lower its bound to 1, and so does the plan (which once counted the slice alone)."""
    import mlora.memory
    import mlora.pipeline.worker as worker
    from mlora.memory import projection_shapes
    from mlora.pipeline.run import plan_stages
    from test_pipeline_inprocess import run_threads

    cfg_path = pipe_config(tmp_path)
    code, plan, err = pipe_dry_run(capsys, pipe_model, cfg_path)
    assert code == 0, err
    shape = (plan["largest_batch"]["rows"], plan["largest_batch"]["seq_len"])
    est, cfg = stage_0_estimate(pipe_model, cfg_path, shape), load_config(cfg_path)
    shapes = projection_shapes(read_model_config(pipe_model)[1])
    stages = plan_stages(str(pipe_model), 3, PIPE_BALANCE)
    layers = sum(m.startswith("layer.") for m in stages[0])
    adapters = layers * sum(4 * a.r * sum(shapes[m][0] + shapes[m][1] for m in a.target_modules) for a in cfg.lora)
    once = est.total - est.weights - est.activations
    free = est.weights + -(-(once + 2 * est.activations) // cfg.memory_fraction) + adapters // 2
    monkeypatch.setattr(mlora.memory, "device_free_bytes", lambda device: int(free))
    code, plan, err = pipe_dry_run(capsys, pipe_model, cfg_path)
    assert code == 0, err

    real_bounds, real_in_flight_bounds = [], worker.in_flight_bounds

    def in_flight_bounds(*args):
        real_bounds.append(real_in_flight_bounds(*args))
        return real_bounds[-1]

    monkeypatch.setattr(worker, "in_flight_bounds", in_flight_bounds)
    fake_rank_memory(monkeypatch, int(free), stage_weights(pipe_model, stages))
    run_threads(pipe_model, cfg_path, tmp_path / "out", 3, PIPE_BALANCE)
    assert real_bounds[0][0] == 1 and all(bounds == real_bounds[0] for bounds in real_bounds)
    assert [s["in_flight_bound"] for s in plan["stages"]] == real_bounds[0]


def test_pipeline_plan_of_one_rank_is_its_stage(pipe_model, tmp_path, capsys, monkeypatch):
    """With a rank (--rank, or torchrun's RANK) the plan is that stage's alone, against its own
    device; the same as in the plan of every stage when no other stage's memory lowers its
    bound (here stage 0's own does). On the CPU there is nothing to compare with: 1F1B's
    bounds. The JSON line has the one-process dry run's keys, and the stages and segments."""
    import mlora.memory

    cfg_path = pipe_config(tmp_path)
    code, on_cpu, err = pipe_dry_run(capsys, pipe_model, cfg_path)
    assert code == 0, err
    assert [(s["in_flight_bound"], s["free_bytes"]) for s in on_cpu["stages"]] == [(3, None), (2, None), (1, None)]
    assert err.count("as a CUDA device would hold it (cpu has no device memory to compare with)") == 3
    code, one_process, _ = dry_run(capsys, pipe_model, cfg_path)
    assert code == 0
    assert set(on_cpu) - set(one_process) == {"stages", "segments"} and set(one_process) <= set(on_cpu)

    shape = (on_cpu["largest_batch"]["rows"], on_cpu["largest_batch"]["seq_len"])
    free = free_lowering_stage_0(pipe_model, cfg_path, shape)
    monkeypatch.setattr(mlora.memory, "device_free_bytes", lambda device: free)
    code, every, err = pipe_dry_run(capsys, pipe_model, cfg_path)
    assert code == 0, err
    code, first, err = pipe_dry_run(capsys, pipe_model, cfg_path, "--rank", "0")
    assert code == 0, err
    assert first["stages"] == every["stages"][:1] and first["stages"][0]["in_flight_bound"] == 2
    assert "mlora: dry run of " in err and "stage 0 of a pipeline of 3" in err
    assert "  the other stages are their own ranks' to check (--rank on their hosts); planned here at 1F1B's " \
           "bounds" in err.splitlines()
    monkeypatch.setenv("RANK", "2")
    code, last, err = pipe_dry_run(capsys, pipe_model, cfg_path)
    assert code == 0, err
    assert last["stages"] == every["stages"][2:]
    assert {k: v for k, v in last.items() if k not in ("stages", "peak_bytes")} == \
        {k: v for k, v in every.items() if k not in ("stages", "peak_bytes")}
    assert last["peak_bytes"] == every["stages"][2]["peak_bytes"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setup", ["balance", "rank", "world_size", "device", "no_room", "weights"])
def test_pipeline_plan_refuses_what_the_pipeline_refuses(pipe_model, tmp_path, capsys, monkeypatch, setup):
    """What `train --pipeline` refuses at start-up, with its line and exit code (a bad
    --balance: the line every rank gives; a stage without room for one micro-batch on a device
    faked here: the line every rank of a real run gives); besides, weights larger than a
    stage's free memory (the load would fail), and a --device of one GPU for every stage."""
    import mlora.memory
    from mlora.pipeline.run import plan_stages
    from test_pipeline_inprocess import run_threads

    cfg_path = pipe_config(tmp_path)
    argv = ["train", "--pipeline", "--base_model", str(pipe_model), "--config", str(cfg_path)]
    balance = ["--balance", *map(str, PIPE_BALANCE)]
    stages = plan_stages(str(pipe_model), 3, PIPE_BALANCE)
    weights = stage_weights(pipe_model, stages)
    if setup == "balance":
        with pytest.raises(UserError) as refused:
            plan_stages(str(pipe_model), 3, [3, 2, 3])
        expected = (2, f"mlora: error: {refused.value}")
        planned = refusal(capsys, [*argv, "--dry_run", "--balance", "3", "2", "3"])
    elif setup in ("rank", "world_size"):  # (refused by every rank before it starts)
        flags = [*balance, "--rank", "3"] if setup == "rank" else ["--rank", "0"]
        expected, planned = refusal(capsys, [*argv, *flags]), refusal(capsys, [*argv, *flags, "--dry_run"])
    elif setup == "device":
        expected = (2, "mlora: error: --device cuda:0: a dry run of every stage puts stage s on cuda:s; give "
                       "--device cuda, or plan one stage with --rank")
        planned = refusal(capsys, [*argv, *balance, "--device", "cuda:0", "--dry_run"])
    elif setup == "no_room":  # 1 MiB beside each stage's weights: less than a micro-batch needs anywhere
        free = max(weights) + 2**20
        monkeypatch.setattr(mlora.memory, "device_free_bytes", lambda device: free)
        planned = refusal(capsys, [*argv, *balance, "--dry_run"])
        fake_rank_memory(monkeypatch, free, weights)
        errors = run_threads(pipe_model, cfg_path, tmp_path / "out", 3, PIPE_BALANCE, allow_errors=True)
        assert len(errors) == 3 and len({str(e) for _, e in errors}) == 1
        expected = (2, f"mlora: error: {errors[0][1]}")
        assert "rank 0 (embed..layer.1)" in expected[1] and "rank 2 (norm..head)" in expected[1]
    else:  # less free than the slices of stages 0 and 1 weigh
        monkeypatch.setattr(mlora.memory, "device_free_bytes", lambda device: weights[1] - 1)
        planned = refusal(capsys, [*argv, *balance, "--dry_run"])
        assert planned[0] == 2 and planned[1].startswith(f"mlora: error: base_model {pipe_model} in float32: "
                                                         f"rank 0's slice (embed..layer.1) is about ")
        assert "rank 1's slice (layer.2..layer.3)" in planned[1] and "rank 2" not in planned[1]
        assert planned[1].endswith("; quantize it (--load_4bit, --load_8bit) or split it over more stages")
        return
    assert planned == expected
    assert not (tmp_path / "out").exists()
