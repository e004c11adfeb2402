"""Levels 3, 4 and 6 of the correctness ladder, through the real `mlora train` / `mlora eval`:
fused equals solo, saved adapters load in PEFT with the same logits and eval loss, and every
adapter's loss falls on a learnable task."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GEMMA4_E2B, GEMMA4_MOE
from mlora import checkpoint
from mlora.cli import main
from mlora.errors import UserError
from mlora.lora import AdapterRows
from mlora.metrics import read_metrics

WORDS = "the quick brown fox jumps over the lazy dog one two three four five six seven".split()


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def alpaca_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 5))
        rows.append({"instruction": "reverse the words", "input": " ".join(words),
                     "output": " ".join(reversed(words))})
    return rows


def chat_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 4))
        rows.append({"messages": [{"role": "user", "content": "upper: " + " ".join(words)},
                                  {"role": "assistant", "content": " ".join(words).upper()}]})
    return rows


def text_rows(n, seed):
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))} for _ in range(n)]


ADAPTERS = {
    # Different r, targets, lr, optimizer, schedule and padding side on purpose.
    "a": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], optim="adamw", lr=1e-2,
              batch_size=4, micro_batch_size=2, lr_scheduler="cosine", warmup_steps=1),
    "b": dict(r=8, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                            "up_proj", "down_proj"],
              optim="sgd", momentum=0.9, lr=5e-2, batch_size=3, micro_batch_size=1),
    "c": dict(r=2, alpha=4, target_modules=["k_proj", "o_proj", "down_proj"], optim="adamw",
              lr=2e-2, weight_decay=0.1, batch_size=2, expand_side="left", lr_scheduler="linear"),
}


def make_template(tmp: Path) -> str:
    """m-LoRA's template format, short enough for a small cutoff_len."""
    template = tmp / "template.json"
    template.write_text(json.dumps({"prompt": "### Instruction:\n{instruction}\n### Input:\n{input}\n"
                                              "### Output:\n{output}\n",
                                    "prompt_no_input": "### Instruction:\n{instruction}\n### Output:\n{output}\n"}))
    return str(template)


def split_moved(alpaca_file: Path, template: str) -> list[dict]:
    """The alpaca rows of `alpaca_file` as rendered by `template`, written as prompt-completion
    rows whose prompt also takes the answer's first word: the same tokens, one fewer learnt."""
    from mlora.data import load_template

    rows = []
    for row in map(json.loads, alpaca_file.read_text().splitlines()):
        prompt, suffix = load_template(template).render(row["instruction"], row["input"])
        first, rest = row["output"].split(" ", 1)
        rows.append({"prompt": prompt + first, "completion": f" {rest}{suffix}"})
    return rows


def make_config(tmp: Path, names, out: Path, **global_overrides) -> Path:
    data = {"a": alpaca_rows(10, 1), "b": text_rows(9, 2), "c": chat_rows(6, 3)}
    template = make_template(tmp)
    lora = []
    for name in names:
        lora.append({"name": name, "data": write_jsonl(tmp / f"{name}.jsonl", data[name]),
                     "prompt": template, "dropout": 0.0, "num_epochs": 2, "max_grad_norm": 1.0,
                     **ADAPTERS[name]})
    cfg = {"cutoff_len": 64, "seed": 3, "output_dir": str(out), "lora": lora, **global_overrides}
    path = tmp / f"config_{''.join(names)}_{out.name}.json"
    path.write_text(json.dumps(cfg))
    return path


def rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).norm().item() / max(b[k].norm().item(), 1e-12) for k in a)


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("fused")
    out = tmp / "out"
    cfg = make_config(tmp, ["a", "b", "c"], out)
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 0
    return tmp, out, cfg


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_fused_equals_solo(fused_run, tiny_llama, tmp_path, name):
    _, fused_out, _ = fused_run
    solo_out = tmp_path / "solo"
    cfg = make_config(tmp_path, [name], solo_out)
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 0
    fused = load_file(fused_out / name / "adapter_model.safetensors")
    solo = load_file(solo_out / name / "adapter_model.safetensors")
    # Sanity: training moved B away from its zero init, so the comparison means something.
    assert all(v.abs().max() > 0 for k, v in solo.items() if "lora_B" in k)
    assert rel_diff(fused, solo) <= 1e-5
    fused_losses = [m["loss"] for m in read_metrics(fused_out / "metrics.jsonl") if m["adapter"] == name]
    solo_losses = [m["loss"] for m in read_metrics(solo_out / "metrics.jsonl") if m["adapter"] == name]
    assert fused_losses == pytest.approx(solo_losses, rel=1e-5)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_fused_equals_solo_with_dropout(tmp_path, tiny_llama, packing):
    """Dropout 0.1 on every adapter, rows of different lengths, c left-padded: each adapter of
    the fused run equals its solo run. Its masks come from its own generator, drawn over its
    rows padded to its own length, wherever the batch (padded to the longest adapter's) puts
    them."""
    from test_packing import assert_same_adapters, train_variants

    overrides = dict(packing=True, cutoff_len=160) if packing else {}
    fused = train_variants(tmp_path, tiny_llama, ["a", "b", "c"], {"fused": overrides}, dropout=0.1)["fused"]
    for name in ("a", "b", "c"):
        solo = train_variants(tmp_path, tiny_llama, [name], {f"solo_{name}": overrides}, dropout=0.1)[f"solo_{name}"]
        # Packed, the fused and the solo batch have rows of other shapes, so their matmuls
        # round differently, and AdamW's first steps magnify that (measured: 1.0e-5 on an
        # Intel CPU, 2.1e-5 on an AMD EPYC one, whose BLAS blocks otherwise; a wrong dropout
        # mask or row is off by 1e-2 and more).
        assert_same_adapters(fused, solo, [name], 5e-5 if packing else 1e-5)
        fused_losses = [m["loss"] for m in read_metrics(fused / "metrics.jsonl") if m["adapter"] == name]
        solo_losses = [m["loss"] for m in read_metrics(solo / "metrics.jsonl") if m["adapter"] == name]
        assert fused_losses == pytest.approx(solo_losses, rel=1e-5)


def test_adapters_really_differ(fused_run):
    _, out, _ = fused_run
    a = load_file(out / "a" / "adapter_model.safetensors")
    c = load_file(out / "c" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    assert key not in a and key in c


def test_metrics_have_one_line_per_step(fused_run):
    _, out, _ = fused_run
    records = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    for name, steps in {"a": 6, "b": 6, "c": 6}.items():
        mine = [m for m in records if m["adapter"] == name]
        assert [m["step"] for m in mine] == list(range(1, steps + 1))
        for m in mine:
            assert {"adapter", "step", "loss", "lr", "tokens", "time"} <= m.keys()
            assert m["tokens"] > 0 and m["loss"] > 0


def _mlora_logits(tiny_llama, adapter_dir: Path, name: str, input_ids: torch.Tensor) -> torch.Tensor:
    from mlora.adapter import Adapter
    from mlora.config import AdapterConfig
    from mlora.loader import load_model
    from mlora.lora import BatchLayout, inject_lora

    from mlora.models.naming import naming_for

    model = load_model(tiny_llama, torch.device("cpu"), torch.float32)
    layout = BatchLayout()
    wrappers = inject_lora(model, layout)
    peft_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    naming = naming_for(model.args.model_type)
    # the projections the adapter holds, by mlora's names (its config may name them otherwise)
    keys = load_file(adapter_dir / "adapter_model.safetensors")
    targets = sorted({naming.from_module(k[len("base_model.model."):].rsplit(".", 2)[0]).rsplit(".", 1)[-1]
                      for k in keys if ".experts." not in k or "target_parameters" not in peft_cfg})
    # GPT-OSS's stacked experts (mlp.experts.gate_up_proj: mlora's gate_up_proj), Gemma 4 26B-A4B's
    # (experts.gate_up_proj) and Llama 4's (feed_forward.experts.gate_up_proj: mlora's experts.gate_up_proj)
    targets += [p.removeprefix("mlp.experts.").removeprefix("feed_forward.")
                for p in peft_cfg.get("target_parameters") or []]
    cfg = AdapterConfig(name=name, data="", r=peft_cfg["r"], alpha=peft_cfg["lora_alpha"], target_modules=targets)
    adapter = Adapter(cfg, wrappers, 0, torch.device("cpu"), naming=naming)
    adapter.load_peft(adapter_dir)
    layout.rows = [AdapterRows(name, 0, input_ids.shape[0])]
    model.eval()
    with torch.no_grad():
        return model(input_ids)


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_saved_adapter_loads_in_peft_with_same_logits(fused_run, tiny_llama, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out, _ = fused_run
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out / name).eval()
    input_ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids).logits
    got = _mlora_logits(tiny_llama, out / name, name, input_ids)
    assert (got - expected).abs().max().item() < 1e-4
    with peft_model.disable_adapter(), torch.no_grad():  # and the adapter matters
        bare = peft_model(input_ids).logits
    assert (bare - expected).abs().max().item() > 1e-4


def test_eval_equals_transformers_plus_peft(fused_run, tiny_llama, capsys, tokenizer):
    tmp, out, cfg_path = fused_run
    capsys.readouterr()
    assert main(["eval", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--no_progress"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["adapter"] for line in lines] == ["a", "b", "c"]
    cfg = json.loads(cfg_path.read_text())
    for line, adapter_cfg in zip(lines, cfg["lora"]):
        loss, count = peft_eval_loss(tiny_llama, out / adapter_cfg["name"], adapter_cfg, cfg["cutoff_len"], tokenizer)
        assert line["tokens"] == count
        assert line["loss"] == pytest.approx(loss, rel=1e-5)


def peft_eval_loss(tiny_llama, adapter_dir, adapter_cfg, cutoff_len, tokenizer) -> tuple[float, int]:
    """(mean token cross-entropy, label tokens) of transformers + PEFT with the adapter saved in
    `adapter_dir` over the adapter's training rows: what `mlora eval` must print."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlora.data import encode_rows, load_rows, load_template

    rows = load_rows(adapter_cfg["data"])
    examples = encode_rows(rows, tokenizer, load_template(adapter_cfg["prompt"]), cutoff_len, False)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:  # one row at a time: no padding in the reference
            ids = torch.tensor([ex.input_ids])
            labels = torch.tensor([ex.labels])
            logits = model(ids).logits[0, :-1]
            target = labels[0, 1:]
            ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
            total += ce.item()
            count += int((target != -100).sum())
    return total / count, count



def test_eval_notes_an_output_dir_that_does_not_exist(fused_run, tiny_llama, capsys, tmp_path):
    """A mistyped --output_dir evaluates every adapter on the bare base ("weights": "base", as
    documented): a note says so up front; none when the directory exists."""
    _, out, cfg_path = fused_run
    for where, note in ((tmp_path / "typo", True), (out, False)):
        capsys.readouterr()
        assert main(["eval", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--output_dir", str(where),
                     "--no_progress"]) == 0
        captured = capsys.readouterr()
        weights = {json.loads(line)["weights"] for line in captured.out.splitlines()}
        assert (weights == {"base"}) == note
        assert captured.err.strip().splitlines() == (
            [f"mlora: note: output_dir {where} does not exist: every adapter is evaluated on the bare base"] * note)

def test_eval_and_generate_on_adapters_renamed_or_retargeted_since_training(fused_run, tiny_llama, capsys, tmp_path):
    """An output_dir trained under a config that has changed since: an adapter renamed (the
    new name has nothing saved: eval evaluates it on the bare base, as documented, and now
    says so, naming the saved adapters the config no longer names; generate refuses it, as
    before, naming them too), an adapter removed (its saved weights are not read: nothing
    said when nothing is left unsaved), and one whose target_modules changed (eval and generate
    refuse it in one line naming both sides, before any output; its r: test_eval_prints_nothing...)."""
    _, out, cfg_path = fused_run
    cfg = json.loads(cfg_path.read_text())
    a, b, c = cfg["lora"]

    def run(command: str, lora: list[dict]) -> tuple[int, str, list[str]]:
        path = tmp_path / "changed.json"
        path.write_text(json.dumps({**cfg, "lora": lora}))
        extra = ["--prompt", "hi", "--max_new_tokens", "1"] if command == "generate" else []
        capsys.readouterr()
        code = main([command, "--base_model", str(tiny_llama), "--config", str(path), "--no_progress", *extra])
        captured = capsys.readouterr()
        return code, captured.out, captured.err.strip().splitlines()

    code, stdout, err = run("eval", [{**a, "name": "renamed"}, b])  # (c removed)
    assert code == 0 and [json.loads(line)["weights"] for line in stdout.splitlines()] == ["base", str(out / "b")]
    assert err == [f"mlora: note: adapter 'renamed' has nothing saved in {out}: evaluated on the bare base; {out} "
                   f"holds saved adapters the config does not name: 'a', 'c' (renamed?)"]
    assert run("eval", [b])[2] == []  # removed alone: nothing evaluated wrongly, nothing to say
    assert run("generate", [{**a, "name": "renamed"}, b])[1:] == (
        "", [f"mlora: error: adapter 'renamed': nothing saved in {out / 'renamed'} (train it first, or point "
             f"--output_dir at where it was saved); {out} holds saved adapters the config does not name: 'a', 'c' "
             "(renamed?)"])
    for command in ("eval", "generate"):
        code, stdout, err = run(command, [{**a, "target_modules": ["q_proj", "k_proj"]}, b])
        assert (code, stdout, len(err)) == (2, "", 1), err
        assert err[0].startswith(f"mlora: error: adapter {out / 'a'}: ") and err[0].endswith(
            "(the adapter's target_modules must match: its adapter_config.json has q_proj, v_proj, adapter 'a' has "
            "k_proj, q_proj in the config)"), err


def test_eval_and_generate_given_an_adapters_own_directory_as_output_dir(fused_run, tiny_llama, capsys):
    """--output_dir out/a where out was meant: the adapters are looked for inside out/a, where
    nothing is; eval's note (the bare base's loss, as documented) and generate's line said only
    that nothing was saved there. Both now say that out/a is itself an adapter's directory."""
    _, out, cfg_path = fused_run
    hint = f"; {out / 'a'} is itself a saved adapter's directory: --output_dir takes the one holding the adapters' " \
           f"directories ({out}?)"
    for command, code, extra in (("eval", 0, []), ("generate", 2, ["--prompt", "hi", "--adapters", "a"])):
        capsys.readouterr()
        assert main([command, "--base_model", str(tiny_llama), "--config", str(cfg_path), "--output_dir",
                     str(out / "a"), "--no_progress", *extra]) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].endswith(hint), err


def test_eval_into_a_closed_pipe_stops_quietly(fused_run, tiny_llama):
    """`mlora eval ... | head -1`: the reader leaves before the output is written; mlora stops
    with 128 + SIGPIPE and no traceback (it printed a BrokenPipeError one)."""
    import os
    import subprocess
    import sys

    _, _, cfg_path = fused_run
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mlora", "eval", "--base_model", str(tiny_llama), "--config",
                             str(cfg_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before mlora writes its first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_an_error_into_a_closed_pipe_keeps_its_exit_code(tmp_path):
    """`mlora train ... 2>&1 | head -0`: the one-line error cannot be written either; the exit
    code still says what happened (2), not a traceback's 1."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as usual
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "mlora", "train", "--base_model", str(tmp_path / "nowhere"),
                             "--config", str(tmp_path / "missing.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    proc.stdout.close()
    assert proc.wait(timeout=120) == 2
    # Output still buffered when the error comes: its flush at exit failed too (exit 120).
    script = ("import sys; from mlora import cli; from mlora.errors import UserError\n"
              "def boom(args):\n    print('a line of results')\n    raise UserError('late')\n"
              "cli.COMMANDS['eval'] = boom\nsys.exit(cli.main(['eval', '--base_model', 'x', '--config', 'y']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    proc.stdout.close()
    assert proc.wait(timeout=120) == 2


def test_eval_refuses_an_adapter_saved_with_another_scale(fused_run, tiny_llama, capsys, tmp_path):
    """The scale the weights were trained with (r, lora_alpha, use_rslora) is read back: a
    config that says otherwise is one line naming the field, not a silently different loss;
    so is a damaged adapter_config.json. An adapter with no token to score says null."""
    import shutil

    _, out, cfg_path = fused_run
    cfg = json.loads(cfg_path.read_text())
    saved = out / cfg["lora"][0]["name"]
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy / saved.name)
    cases = [({"alpha": 1000}, None, "lora_alpha"), ({"use_rslora": True}, None, "use_rslora"),
             ({}, {"r": "abc"}, "'r' must be a positive integer"), ({}, [1, 2], "expected a JSON object"),
             # (read as plain LoRA before: PEFT applies them to a changed base, or adds a magnitude)
             ({}, {"init_lora_weights": "pissa_niter_4"}, "init_lora_weights is 'pissa_niter_4', which changes"),
             ({}, {"init_lora_weights": "olora"}, "path_initial_model_for_weight_conversion"),
             ({}, {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}},
              "init_lora_weights is 'loftq': a LoftQ adapter is right only on the base weights LoftQ replaced"),
             ({}, {"use_dora": True}, "a DoRA adapter (use_dora) is not supported")]
    for change, damage, fragment in cases:
        adapter_cfg = json.loads((saved / "adapter_config.json").read_text())
        if damage is not None:
            adapter_cfg = damage if isinstance(damage, list) else {**adapter_cfg, **damage}
        (copy / saved.name / "adapter_config.json").write_text(json.dumps(adapter_cfg))
        mine = tmp_path / "cfg.json"
        mine.write_text(json.dumps({**cfg, "lora": [{**cfg["lora"][0], **change}]}))
        capsys.readouterr()
        assert main(["eval", "--base_model", str(tiny_llama), "--config", str(mine),
                     "--output_dir", str(copy)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err, err
        if damage is None:
            assert err.startswith(f"mlora: error: adapter {copy / saved.name}"), err

    empty = tmp_path / "nothing.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    (copy / saved.name / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    mine.write_text(json.dumps({**cfg, "lora": [{**cfg["lora"][0], "test_data": str(empty)}]}))
    capsys.readouterr()
    assert main(["eval", "--base_model", str(tiny_llama), "--config", str(mine), "--output_dir", str(copy)]) == 0
    line = capsys.readouterr().out.strip()
    assert json.loads(line)["loss"] is None and "NaN" not in line


def test_eval_prints_nothing_when_a_later_adapter_is_refused(fused_run, tiny_llama, capsys, tmp_path):
    """Every saved adapter is checked before the first line: a mismatch in the last one used to
    come after the others' lines (exit 2 with a partial result on stdout)."""
    import shutil

    _, out, cfg_path = fused_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    adapter_cfg = json.loads((copy / "c" / "adapter_config.json").read_text())
    (copy / "c" / "adapter_config.json").write_text(json.dumps({**adapter_cfg, "r": adapter_cfg["r"] + 1}))
    capsys.readouterr()
    assert main(["eval", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--output_dir", str(copy),
                 "--no_progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "its r is" in captured.err and len(captured.err.strip().splitlines()) == 1


def test_eval_reads_an_adapter_saved_in_fp8(fused_run, tiny_llama, capsys, tmp_path):
    """An adapter whose tensors are float8 (torch has no isfinite for them): eval copies them
    into its fp32 weights, as PEFT does, and gives the loss of those values saved in fp32 (it
    ended in a NotImplementedError traceback)."""
    _, out, cfg_path = fused_run
    cfg = json.loads(cfg_path.read_text())
    name = cfg["lora"][0]["name"]
    tensors = load_file(out / name / "adapter_model.safetensors")
    losses = []
    for dtype in (torch.float8_e4m3fn, torch.float32):
        saved = tmp_path / str(dtype) / name
        saved.mkdir(parents=True)
        (saved / "adapter_config.json").write_text((out / name / "adapter_config.json").read_text())
        save_file({k: v.to(torch.float8_e4m3fn).to(dtype) for k, v in tensors.items()},
                  saved / "adapter_model.safetensors")
        capsys.readouterr()
        assert main(["eval", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--output_dir",
                     str(saved.parent), "--no_progress"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert lines[0]["weights"] == str(saved)
        losses.append(lines[0]["loss"])
    assert losses[0] == losses[1]


def save_as_peft_bin(adapter_dir: Path, target: Path, tiny_llama) -> Path:
    """The adapter of `adapter_dir` saved again by PEFT into `target` with
    safe_serialization=False: adapter_model.bin, as older adapters on the Hub are."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    PeftModel.from_pretrained(base, adapter_dir).save_pretrained(target, safe_serialization=False)
    assert (target / "adapter_model.bin").is_file() and not (target / "adapter_model.safetensors").exists()
    return target


def test_eval_and_generate_read_an_adapter_peft_saved_as_bin(fused_run, tiny_llama, capsys, tmp_path, tokenizer):
    """An adapter saved by PEFT with safe_serialization=False (adapter_model.bin) evaluates to
    PEFT's own loss from that directory and generates what its safetensors copy does; beside an
    adapter_model.safetensors, the .bin is not read (PEFT reads the safetensors one too)."""
    import shutil

    _, out, cfg_path = fused_run
    cfg = json.loads(cfg_path.read_text())
    adapter_cfg = next(a for a in cfg["lora"] if a["name"] == "b")  # every target module
    mine = tmp_path / "cfg.json"
    mine.write_text(json.dumps({**cfg, "lora": [adapter_cfg]}))
    pickled = save_as_peft_bin(out / "b", tmp_path / "pickled" / "b", tiny_llama)
    both = tmp_path / "both" / "b"
    shutil.copytree(out / "b", both)  # the trained safetensors, and a .bin whose B are all zero
    torch.save({k: torch.zeros_like(v) if "lora_B" in k else v
                for k, v in load_file(out / "b" / "adapter_model.safetensors").items()}, both / "adapter_model.bin")
    for saved in (pickled, both):
        capsys.readouterr()
        assert main(["eval", "--base_model", str(tiny_llama), "--config", str(mine), "--output_dir",
                     str(saved.parent), "--no_progress"]) == 0
        line = json.loads(capsys.readouterr().out)
        loss, count = peft_eval_loss(tiny_llama, saved, adapter_cfg, cfg["cutoff_len"], tokenizer)
        assert line["weights"] == str(saved) and line["tokens"] == count
        assert line["loss"] == pytest.approx(loss, rel=1e-5)
    outputs = []
    for where in (out, pickled.parent):
        capsys.readouterr()
        assert main(["generate", "--base_model", str(tiny_llama), "--config", str(mine), "--output_dir", str(where),
                     "--max_new_tokens", "6", "--base", "--prompt", "count to three please"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and outputs[0]["output"] != outputs[0]["base_output"]


def test_init_from_an_adapter_peft_saved_as_bin_starts_from_its_weights(fused_run, tiny_llama, tmp_path):
    _, out, cfg_path = fused_run
    cfg = json.loads(cfg_path.read_text())
    start = save_as_peft_bin(out / "a", tmp_path / "start", tiny_llama)
    lora = {**cfg["lora"][0], "init_from": str(start), "lr": 1e-12, "max_steps": 1}
    mine = tmp_path / "cfg.json"
    mine.write_text(json.dumps({**cfg, "output_dir": str(tmp_path / "out"), "lora": [lora]}))
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(mine), "--no_progress"]) == 0
    trained = load_file(out / "a" / "adapter_model.safetensors")
    assert rel_diff(load_file(tmp_path / "out" / "a" / "adapter_model.safetensors"), trained) < 1e-6


class RunsCodeWhenUnpickled:
    """What a malicious adapter_model.bin may hold: unpickled without weights_only, it creates
    the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("saved_as", ["object", "nested", "damaged", "directory"])
def test_eval_generate_and_init_from_refuse_weights_they_cannot_read(fused_run, tiny_llama, capsys, tmp_path,
                                                                     saved_as):
    """An adapter_model.bin holding an object that weights_only refuses (never run), a nested
    dict or damaged bytes, or a directory named adapter_model.safetensors: one line naming it
    (eval gave the bare base's loss for both, generate said to train it first)."""
    import shutil

    _, out, cfg_path = fused_run
    cfg = json.loads(cfg_path.read_text())
    name = cfg["lora"][0]["name"]
    saved = tmp_path / "out" / name
    shutil.copytree(out / name, saved)
    weights = saved / "adapter_model.safetensors"
    tensors = load_file(weights)
    weights.unlink()
    pickled = saved / "adapter_model.bin"
    marker = tmp_path / "unpickled"
    if saved_as == "object":
        torch.save({**tensors, "x": RunsCodeWhenUnpickled(marker)}, pickled)
        fragment = f"{pickled}: not a file of tensors alone (Unsupported global: GLOBAL io.open"
    elif saved_as == "nested":
        torch.save({"base_model.model": tensors}, pickled)
        fragment = f"{pickled}: 'base_model.model' holds a dict, not a tensor"
    elif saved_as == "damaged":
        torch.save(tensors, pickled)
        pickled.write_bytes(pickled.read_bytes()[:100])
        fragment = f"{pickled}: cannot read ("
    else:
        weights.mkdir()
        fragment = f"{weights} is not a file"
    mine = tmp_path / "cfg.json"
    mine.write_text(json.dumps({**cfg, "lora": cfg["lora"][:1]}))
    training = tmp_path / "train.json"
    training.write_text(json.dumps({**cfg, "output_dir": str(tmp_path / "trained"),
                                    "lora": [{**cfg["lora"][0], "init_from": str(saved)}]}))
    for command, config, extra in (("eval", mine, ["--output_dir", str(saved.parent)]),
                                   ("generate", mine, ["--output_dir", str(saved.parent), "--prompt", "hi"]),
                                   ("train", training, [])):
        capsys.readouterr()
        assert main([command, "--base_model", str(tiny_llama), "--config", str(config), "--no_progress",
                     *extra]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert captured.out == "" and len(err) == 1 and err[0].startswith(f"mlora: error: {fragment}"), err
    assert not marker.exists() and not (tmp_path / "trained").exists()


@pytest.mark.parametrize("fmt", ["alpaca", "chat", "text"])
def test_generate_equals_transformers_plus_peft_greedy(fused_run, tiny_llama, capsys, tokenizer, fmt):
    """`mlora generate`: every adapter completes every prompt, all rows in one fused batch
    (left-padded to one length, each row its adapter's), and each completion is what
    transformers + PEFT's greedy generate gives for that adapter and prompt; --base adds the
    bare base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlora.data import load_template, prompt_tokens

    _, out, cfg_path = fused_run
    cfg = json.loads(cfg_path.read_text())
    prompts = ["say hi", "count to three please"]
    capsys.readouterr()
    assert main(["generate", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--format", fmt,
                 "--max_new_tokens", "6", "--base", "--adapters", "a,c",
                 *sum((["--prompt", p] for p in prompts), [])]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["adapter"], line["prompt"]) for line in lines] == [(n, p) for n in ("a", "c") for p in prompts]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out / "a", adapter_name="a").eval()
    model.load_adapter(out / "c", adapter_name="c")
    for line in lines:
        adapter_cfg = next(a for a in cfg["lora"] if a["name"] == line["adapter"])
        ids = torch.tensor([prompt_tokens(line["prompt"], fmt, tokenizer, load_template(adapter_cfg["prompt"]))])
        model.set_adapter(line["adapter"])
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
            with model.disable_adapter():
                bare = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        assert line["output"] == tokenizer.decode(expected, skip_special_tokens=True), line
        assert line["base_output"] == tokenizer.decode(bare, skip_special_tokens=True), line
    assert any(line["output"] != line["base_output"] for line in lines)  # the adapters matter


def test_generate_with_a_repetition_penalty_equals_transformers_plus_peft(fused_run, tiny_llama, capsys, tokenizer):
    """--repetition_penalty: the greedy completions of rows of two lengths in one left-padded
    batch are transformers + PEFT's generate with that penalty, each row alone (its pads not
    counted as seen), and the penalty changes them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlora.data import prompt_tokens

    _, out, cfg_path = fused_run

    def generate(prompts, *extra):
        capsys.readouterr()
        assert main(["generate", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--format", "text",
                     "--max_new_tokens", "8", "--adapters", "a", *sum((["--prompt", p] for p in prompts), []),
                     *extra]) == 0
        return [json.loads(line)["output"] for line in capsys.readouterr().out.splitlines()]

    # Prompts that end in what the model goes on with unpenalized: a penalty that left the
    # prompt's tokens out would pick them again.
    prompts = ["say hi", "count to three please, one two"]
    prompts = [p + o for p, o in zip(prompts, generate(prompts))]
    penalized = generate(prompts, "--repetition_penalty", "1.8")
    assert penalized != generate(prompts)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out / "a").eval()
    for prompt, output in zip(prompts, penalized):
        ids = torch.tensor([prompt_tokens(prompt, "text", tokenizer, None)])
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=8, do_sample=False, repetition_penalty=1.8,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        assert output == tokenizer.decode(want[0, ids.shape[1]:], skip_special_tokens=True), prompt


def test_generate_needs_no_data_file(fused_run, tiny_llama, capsys, tmp_path):
    """A trained adapter generates after its data files moved away (generate reads none)."""
    _, out, cfg_path = fused_run
    cfg = json.loads(cfg_path.read_text())
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps({**cfg, "output_dir": str(out),
                                 "lora": [{**a, "data": str(tmp_path / "gone.jsonl")} for a in cfg["lora"]]}))
    outputs = []
    for path in (cfg_path, moved):
        capsys.readouterr()
        assert main(["generate", "--base_model", str(tiny_llama), "--config", str(path), "--adapters", "a",
                     "--prompt", "say hi", "--max_new_tokens", "4"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0]


def test_eval_reads_the_test_data_only(fused_run, tiny_llama, capsys, tmp_path):
    """With test_data, eval does not read the training rows (they may be millions, or gone);
    its lines are as with them there. Without test_data it evaluates the training rows, so a
    missing data file is still one line naming it."""
    _, out, cfg_path = fused_run
    cfg = json.loads(cfg_path.read_text())
    lines = []
    for i, data in enumerate((None, str(tmp_path / "gone.jsonl"))):
        lora = [{**a, "test_data": a["data"], **({"data": data} if data else {})} for a in cfg["lora"]]
        path = tmp_path / f"eval{i}.json"
        path.write_text(json.dumps({**cfg, "output_dir": str(out), "lora": lora}))
        capsys.readouterr()
        assert main(["eval", "--base_model", str(tiny_llama), "--config", str(path), "--no_progress"]) == 0
        lines.append(capsys.readouterr().out)
    assert lines[0] == lines[1] and len(lines[0].splitlines()) == 3
    path.write_text(json.dumps({**cfg, "output_dir": str(out),
                                "lora": [{**a, "data": str(tmp_path / "gone.jsonl")} for a in cfg["lora"]]}))
    assert main(["eval", "--base_model", str(tiny_llama), "--config", str(path), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'data': file" in err and "gone.jsonl" in err, err


def test_sampling_warps_as_transformers_does():
    """Sampling's distribution is the softmax of transformers' temperature, top-k and top-p
    warpers applied in its order; penalize_repetition is its RepetitionPenaltyLogitsProcessor."""
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    from mlora.generate import Sampling, penalize_repetition

    torch.manual_seed(0)
    logits = torch.randn(50) * 3  # [V]
    logits[7] = logits[8]  # a tie, at the top-k cut for some k
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.9, 8, 0.5), (2.0, 20, 0.95)]:
        scores = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        want = torch.softmax(scores[0].double(), -1)
        got = Sampling(temperature, top_p, top_k=top_k).probabilities(logits)
        assert torch.equal(got > 0, want > 0), (temperature, top_k, top_p)
        assert torch.allclose(got, want, atol=1e-6), (temperature, top_k, top_p)
    ids = torch.tensor([[3, 9, 9, 41], [0, 1, 2, 3]])
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter_(1, ids, True)
    batch = torch.randn(2, 50)
    assert torch.equal(penalize_repetition(batch, seen, 1.3), RepetitionPenaltyLogitsProcessor(1.3)(ids, batch.clone()))


def test_generate_sampling(fused_run, tiny_llama, capsys):
    """--temperature > 0 samples: reproducible for a seed, another seed draws otherwise, and
    a top_p so small that only the most likely token is left gives the greedy completion."""
    _, _, cfg_path = fused_run

    def generate(*extra):
        capsys.readouterr()
        assert main(["generate", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--adapters", "a",
                     "--prompt", "say hi", "--prompt", "count", "--max_new_tokens", "8", *extra]) == 0
        return [json.loads(line)["output"] for line in capsys.readouterr().out.splitlines()]

    greedy = generate()
    sampled = generate("--temperature", "1.5", "--seed", "3")
    assert sampled == generate("--temperature", "1.5", "--seed", "3")
    assert sampled != generate("--temperature", "1.5", "--seed", "4")
    assert sampled != greedy
    assert generate("--temperature", "1.5", "--top_p", "1e-9") == greedy
    # A row's draws do not depend on the rows beside it.
    capsys.readouterr()
    assert main(["generate", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--adapters", "a",
                 "--prompt", "say hi", "--max_new_tokens", "8", "--temperature", "1.5", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == sampled[0]




def test_generate_prompts_from_a_data_file(fused_run, tiny_llama, capsys, tmp_path):
    """--prompt_file: each row's prompt (an alpaca row through the adapter's template, a chat
    row's turns before its last answer) completes as the same prompt given as --prompt does, in
    file order after the --prompt ones, and each line carries the row's expected answer; a row
    without a prompt (text) or no prompt at all is one line."""
    _, _, cfg_path = fused_run
    rows = [{"instruction": "say hi", "output": "hi"},
            {"messages": [{"role": "user", "content": "count"}, {"role": "assistant", "content": "one two"}]}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def generate(*extra):
        capsys.readouterr()
        code = main(["generate", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--adapters", "a,b",
                     "--max_new_tokens", "6", *extra])
        captured = capsys.readouterr()
        return code, [json.loads(line) for line in captured.out.splitlines()], captured.err

    code, lines, _ = generate("--prompt", "extra", "--prompt_file", str(data))
    assert code == 0
    assert [(x["adapter"], x["prompt"], x.get("reference")) for x in lines] == [
        ("a", "extra", None), ("a", "say hi", "hi"), ("a", "count", "one two"),
        ("b", "extra", None), ("b", "say hi", "hi"), ("b", "count", "one two")]
    _, alpaca, _ = generate("--prompt", "extra", "--prompt", "say hi")
    _, chat, _ = generate("--prompt", "count", "--format", "chat")
    outputs = {(x["adapter"], x["prompt"]): x["output"] for x in alpaca + chat}
    assert [x["output"] for x in lines] == [outputs[x["adapter"], x["prompt"]] for x in lines]
    (tmp_path / "text.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"text": "a"}) + "\n")
    for extra, line in ((["--prompt_file", str(tmp_path / "text.jsonl")],
                         f"mlora: error: --prompt_file {tmp_path / 'text.jsonl'}:2: a text row has no prompt to "
                         f"complete (its every token is trained)"),
                        ([], "mlora: error: nothing to complete: give --prompt TEXT (repeat for several) or "
                             "--prompt_file FILE")):
        code, out, err = generate(*extra)
        assert (code, out, err.strip()) == (2, [], line)


def test_generate_rows_naming_their_adapter(fused_run, tiny_llama, capsys, tmp_path):
    """A --prompt_file row's "adapter" completes it through that adapter only (base_output too),
    one fused batch for all; a row without one through every chosen adapter. Each line is what
    that adapter alone prints for that row, adapter by adapter, each in file order. A name
    that is not an adapter, not among --adapters, or not a string is one line, exit 2."""
    _, _, cfg_path = fused_run
    rows = [{"instruction": "say hi", "output": "hi", "adapter": "b"},
            {"instruction": "count"},
            {"instruction": "say bye", "adapter": "a"},
            {"instruction": "spell cat", "adapter": "b"}]
    data = tmp_path / "prompts.jsonl"

    def generate(file_rows, *extra):
        data.write_text("".join(json.dumps(r) + "\n" for r in file_rows))
        capsys.readouterr()
        code = main(["generate", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--max_new_tokens", "6",
                     "--base", "--no_progress", "--prompt_file", str(data), *extra])
        captured = capsys.readouterr()
        return code, [json.loads(line) for line in captured.out.splitlines()], captured.err

    code, lines, _ = generate(rows, "--adapters", "a,b")
    assert code == 0
    assert [(x["adapter"], x["prompt"], x.get("reference")) for x in lines] == [
        ("a", "count", None), ("a", "say bye", None),
        ("b", "say hi", "hi"), ("b", "count", None), ("b", "spell cat", None)]
    plain = [{k: v for k, v in row.items() if k != "adapter"} for row in rows]
    alone = {}
    for name in ("a", "b"):
        code, solo, _ = generate(plain, "--adapters", name)
        assert code == 0
        alone.update({(x["adapter"], x["prompt"]): x for x in solo})
    assert lines == [alone[x["adapter"], x["prompt"]] for x in lines]
    assert len({x["output"] for x in lines}) > 1
    # Without --adapters, every adapter completes the unnamed row, and only the named ones run.
    code, every, _ = generate(rows)
    assert code == 0 and [(x["adapter"], x["prompt"]) for x in every] == [
        ("a", "count"), ("a", "say bye"), ("b", "say hi"), ("b", "count"), ("b", "spell cat"), ("c", "count")]
    assert every[:5] == lines
    place = f"{data}:2"
    for row, extra, line in (
            ({"instruction": "x", "adapter": "z"}, [],
             f"mlora: error: --prompt_file {place}: its adapter 'z' is not an adapter of {cfg_path} "
             f"(its adapters: a, b, c)"),
            ({"instruction": "x", "adapter": "c"}, ["--adapters", "a,b"],
             f"mlora: error: --prompt_file {place}: its adapter 'c' is not among --adapters a,b"),
            ({"instruction": "x", "adapter": ["a"]}, [],
             f"mlora: error: --prompt_file {place}: its \"adapter\" is [\"a\"], not the name of an adapter")):
        code, out, err = generate([rows[1], row], *extra)
        assert (code, out, err.strip()) == (2, [], line)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_generate_reads_a_prompt_file_that_is_a_pipe(fused_run, tiny_llama, capsys, tmp_path):
    """`--prompt_file <(printf ...)` hands mlora /dev/fd/63, a pipe, which was refused as "not a
    file": a named FIFO and a /dev/fd pipe are read, once, to their end (a writer thread blocks
    until mlora reads: its rows outgrow the pipe's buffer); a directory, a missing path or a
    device (which may never end) is still one line."""
    import threading

    _, _, cfg_path = fused_run
    rows = [{"instruction": "say hi", "output": "hi"}, {"instruction": "count", "output": "one two"}]

    def generate(prompt_file: str):
        capsys.readouterr()
        code = main(["generate", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--adapters", "a",
                     "--max_new_tokens", "2", "--no_progress", "--prompt_file", prompt_file])
        captured = capsys.readouterr()
        return code, captured.out, captured.err.strip()

    def write_in_a_thread(open_writer, text: str) -> threading.Thread:
        def write():
            with open_writer() as f:
                f.write(text)
        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        return thread

    fifo = tmp_path / "prompts.jsonl"
    os.mkfifo(fifo)
    writer = write_in_a_thread(lambda: open(fifo, "w"), "".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = generate(str(fifo))
    writer.join(timeout=30)
    assert code == 0, err
    assert [(x["prompt"], x["reference"]) for x in map(json.loads, out.splitlines())] == [("say hi", "hi"),
                                                                                          ("count", "one two")]
    read, write = os.pipe()  # (what bash's process substitution gives)
    many = "".join(json.dumps(rows[0]) + "\n" for _ in range(3000)) + json.dumps({"text": "a"}) + "\n"
    assert len(many) > 65536  # (more than a pipe holds: the writer waits for mlora to read)
    writer = write_in_a_thread(lambda: open(write, "w"), many)
    try:
        code, out, err = generate(f"/dev/fd/{read}")
    finally:
        writer.join(timeout=30)
        os.close(read)
    assert (code, out, err) == (2, "", f"mlora: error: --prompt_file /dev/fd/{read}:3001: a text row has no prompt "
                                       f"to complete (its every token is trained)")
    for path, said in ((tmp_path, "not a file"), (tmp_path / "missing.jsonl", "no such file"),
                       ("/dev/zero", "cannot read (a character device, not a file or a pipe: reading it may never "
                                     "end)")):  # (/dev/zero was read until memory ran out)
        assert generate(str(path)) == (2, "", f"mlora: error: {path}: {said}")


def bare_template_config(cfg_path: Path, tmp_path: Path) -> Path:
    """fused_run's config with adapter a's prompt template {instruction} (and {input}) alone:
    an empty instruction renders as nothing at all."""
    bare = tmp_path / "bare_template.json"
    bare.write_text(json.dumps({"prompt": "{instruction}{input}", "prompt_no_input": "{instruction}"}))
    raw = json.loads(cfg_path.read_text())
    raw["lora"][0]["prompt"] = str(bare)
    path = tmp_path / "bare_config.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no_bos"])
def test_generate_refuses_a_data_file_row_whose_prompt_renders_empty(fused_run, tiny_llama, capsys, tmp_path,
                                                                     monkeypatch, bos):
    """A --prompt_file row whose prompt renders as nothing but whitespace (a prompt/completion
    row's "", an empty instruction through a template of {instruction} alone) is one line naming
    the file and the row (exit 2, before the model loads), as `--prompt ""` is, whether or not
    the tokenizer adds a BOS: with one, the model completed a lone BOS, nothing in particular;
    without, there was no token to start from (alone a RuntimeError in the first forward, beside
    other rows a row of nothing but padding). An empty instruction through a template with text
    of its own is a prompt, the template's, and completes."""
    import shutil

    import mlora.session

    _, _, cfg_path = fused_run
    base = tiny_llama
    if not bos:
        base = tmp_path / "no_bos"
        shutil.copytree(tiny_llama, base)
        tokenizer = json.loads((base / "tokenizer.json").read_text())
        tokenizer["post_processor"] = None  # (the tiny tokenizer's only BOS)
        (base / "tokenizer.json").write_text(json.dumps(tokenizer))
    bare = bare_template_config(cfg_path, tmp_path)
    data = tmp_path / "prompts.jsonl"

    def generate(config: Path, rows: list[dict], *extra: str):
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        capsys.readouterr()
        code = main(["generate", "--base_model", str(base), "--config", str(config), "--adapters", "a",
                     "--max_new_tokens", "2", "--no_progress", "--prompt_file", str(data), *extra])
        captured = capsys.readouterr()
        return code, captured.out, captured.err.strip()

    with monkeypatch.context() as patch:
        patch.setattr(mlora.session.Session, "load_base", lambda self: pytest.fail("the model loaded"))
        for rows, line in (
                ([{"prompt": "hello", "completion": " x"}, {"prompt": "", "completion": "x"}],
                 f"{data}:2: its prompt is empty: nothing to complete from"),
                ([{"prompt": " \n"}], f"{data}:1: its prompt is empty: nothing to complete from"),
                ([{"instruction": "say hi"}, {"instruction": ""}],
                 f"{data}:2: its prompt is empty (rendered through the adapter's prompt template): nothing to "
                 f"complete from")):
            assert generate(bare, rows) == (2, "", f"mlora: error: --prompt_file {line}")
        assert generate(bare, [{"instruction": "say hi"}], "--prompt", "") == (
            2, "", "mlora: error: the prompt is empty")
    code, out, err = generate(cfg_path, [{"instruction": ""}])
    assert code == 0, err
    assert [(x["adapter"], x["prompt"]) for x in map(json.loads, out.splitlines())] == [("a", "")]


def test_generate_renders_a_row_through_its_own_adapters_template_only(fused_run, tiny_llama, capsys, tmp_path):
    """A --prompt_file row naming its adapter is rendered through that adapter's prompt template
    only: another chosen adapter's template, which would render it empty (and refuse it), does
    not end the command, and every line is what its adapter alone prints for its row. A row
    naming no adapter goes through every chosen adapter's template, and is refused there."""
    _, _, cfg_path = fused_run
    bare = bare_template_config(cfg_path, tmp_path)  # (a: {instruction} alone; b: the fused run's template)
    data = tmp_path / "prompts.jsonl"

    def generate(rows: list[dict], adapters: str):
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        capsys.readouterr()
        code = main(["generate", "--base_model", str(tiny_llama), "--config", str(bare), "--adapters", adapters,
                     "--max_new_tokens", "4", "--no_progress", "--prompt_file", str(data)])
        captured = capsys.readouterr()
        return code, [json.loads(line) for line in captured.out.splitlines()], captured.err.strip()

    code, lines, err = generate([{"instruction": "", "adapter": "b"}, {"instruction": "say hi"}], "a,b")
    assert code == 0, err
    assert [(x["adapter"], x["prompt"]) for x in lines] == [("a", "say hi"), ("b", ""), ("b", "say hi")]
    alone = []
    for rows, name in (([{"instruction": "say hi"}], "a"), ([{"instruction": ""}, {"instruction": "say hi"}], "b")):
        code, solo, err = generate(rows, name)
        assert code == 0, err
        alone += solo
    assert lines == alone
    assert generate([{"instruction": ""}, {"instruction": "say hi"}], "a,b") == (
        2, [], f"mlora: error: --prompt_file {data}:1: its prompt is empty (rendered through the adapter's prompt "
               f"template): nothing to complete from")


def batch_prompt_file(tmp_path) -> Path:
    """A --prompt_file of 5 rows of prompts of different lengths (so batches pad differently)."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"instruction": "say " + "very " * (3 * i % 7) + f"hi {i}", "output": "hi"})
                            + "\n" for i in range(5)))
    return data


def test_generate_in_batches_prints_what_one_batch_prints(fused_run, tiny_llama, capsys, tmp_path, monkeypatch):
    """--batch_size N: the lines (here 2 adapters x 5 rows of a --prompt_file, with --base) run N
    at a time, greedy or sampled, and print exactly what all of them in one batch print (fp32),
    in the same order; each batch's lines are printed before the next batch starts."""
    import mlora.generate

    _, _, cfg_path = fused_run
    data = batch_prompt_file(tmp_path)
    real = mlora.generate.greedy_generate

    def lines_of(batch_size, *extra):
        """The lines printed, and how many were printed before each batch after the first
        started and after the last ended: each batch's own."""
        printed = []  # every line, as read at each batch's start and at the end
        counts = []

        def reading(session, prompts, *args, **kwargs):
            new = capsys.readouterr().out.splitlines()
            printed.extend(new)
            counts.append(len(new))
            return real(session, prompts, *args, **kwargs)

        monkeypatch.setattr(mlora.generate, "greedy_generate", reading)
        capsys.readouterr()
        assert main(["generate", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--adapters", "a,c",
                     "--base", "--max_new_tokens", "6", "--prompt_file", str(data), "--batch_size", str(batch_size),
                     "--no_progress", *extra]) == 0
        new = capsys.readouterr().out.splitlines()
        printed.extend(new)
        return [json.loads(line) for line in printed], counts[1:] + [len(new)]

    whole, counts = lines_of(10)
    assert counts == [10]
    assert [(x["adapter"], x["prompt"]) for x in whole] == [
        (n, f"say {'very ' * (3 * i % 7)}hi {i}") for n in ("a", "c") for i in range(5)]
    assert len({x["output"] for x in whole}) > 2 and any(x["output"] != x["base_output"] for x in whole)
    for size, want_counts in ((1, [1] * 10), (2, [2] * 5), (3, [3, 3, 3, 1])):
        lines, counts = lines_of(size)
        assert lines == whole, size
        assert counts == want_counts, size  # each batch printed before the next one ran
    sampled = ["--temperature", "1.5", "--seed", "3"]
    assert lines_of(3, *sampled)[0] == lines_of(10, *sampled)[0] != whole


def test_generate_interrupted_keeps_the_lines_printed(fused_run, tiny_llama, capsys, tmp_path, monkeypatch):
    """Ctrl-C during the second batch: the first batch's lines stay printed, whole, and the
    command ends with one line and exit 130, no traceback."""
    import mlora.generate

    _, _, cfg_path = fused_run
    argv = ["generate", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--adapters", "a,c", "--base",
            "--max_new_tokens", "3", "--prompt_file", str(batch_prompt_file(tmp_path)), "--batch_size", "4"]
    capsys.readouterr()
    assert main(argv) == 0
    whole = capsys.readouterr().out.splitlines()
    real, calls = mlora.generate.greedy_generate, []

    def interrupted_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mlora.generate, "greedy_generate", interrupted_at_the_second)
    code = main(argv)
    captured = capsys.readouterr()
    assert (code, captured.out.splitlines(), captured.err) == (130, whole[:4], "mlora: interrupted\n")


class Terminal:
    """stdout and stderr both on one terminal: one stream of what a person sees."""

    def __init__(self):
        self.text = ""

    def stream(self):
        terminal = self

        class Side:
            def write(self, s):
                terminal.text += s
                return len(s)

            def flush(self):
                pass

            def isatty(self):
                return True

        return Side()


def test_generate_writes_each_batch_whole(fused_run, tiny_llama, tmp_path, monkeypatch):
    """A batch's lines reach stdout in one write, newlines included: an interrupt, which Python
    handles between its steps, leaves whole batches (each line was two writes, a line then its
    newline, so Ctrl-C could leave a line without its newline or half a batch)."""
    import sys

    _, _, cfg_path = fused_run
    writes = []

    class Recording:
        def write(self, s):
            writes.append(s)
            return len(s)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Recording())
    assert main(["generate", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--adapters", "a,c",
                 "--max_new_tokens", "2", "--prompt_file", str(batch_prompt_file(tmp_path)), "--batch_size", "4"]) == 0
    assert [s.count("\n") for s in writes] == [4, 4, 2]
    assert all(s.endswith("\n") and all(json.loads(line) for line in s.splitlines()) for s in writes)


def test_generate_progress_bar_leaves_the_lines_whole_on_a_terminal(fused_run, tiny_llama, tmp_path, monkeypatch):
    """On a terminal the bar (stderr) stands on the line where the next JSON line (stdout) is
    printed: each line starts at the start of a terminal line, the bar cleared first (it was
    glued after the bar: 'generate:  40%|...| 4/10 [...]{"adapter": ...}'), and redrawn after."""
    import sys

    _, _, cfg_path = fused_run
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal.stream())
    monkeypatch.setattr(sys, "stderr", terminal.stream())
    assert main(["generate", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--adapters", "a,c",
                 "--max_new_tokens", "2", "--prompt_file", str(batch_prompt_file(tmp_path)), "--batch_size", "4"]) == 0
    assert "generate:" in terminal.text  # (the bar was shown)
    starts = [i for i in range(len(terminal.text)) if terminal.text.startswith('{"adapter"', i)]
    assert len(starts) == 10
    assert all(i == 0 or terminal.text[i - 1] in "\r\n" for i in starts), terminal.text


def test_generate_out_of_device_memory_halves_the_batch(fused_run, tiny_llama, capsys, tmp_path, monkeypatch):
    """A batch that runs out of device memory (a fake CUDA OOM above 2 rows) runs again from its
    first line in batches of half its size, and so do the lines after it: no batch as large as
    one that ran out runs again (the right half of a split, waiting at that size, ran out again
    and said so again). The lines are those of a run that fits, and a note says so. Out of
    memory on a single line is one line naming it (a traceback before)."""
    import mlora.generate

    _, _, cfg_path = fused_run
    data = batch_prompt_file(tmp_path)
    real = mlora.generate.greedy_generate
    sizes = []

    def out_of_memory_above(limit, error=lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate "
                                                                          "80.00 GiB")):
        def generate(session, prompts, *args, **kwargs):
            sizes.append(len(prompts))
            if len(prompts) > limit:
                raise error()
            return real(session, prompts, *args, **kwargs)
        return generate

    def generate(*extra):
        sizes.clear()
        capsys.readouterr()
        code = main(["generate", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--adapters", "a,b",
                     "--prompt", "extra", "--prompt_file", str(data), "--max_new_tokens", "4", *extra])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    fits = generate("--batch_size", "12")
    monkeypatch.setattr(mlora.generate, "greedy_generate", out_of_memory_above(2))
    code, out, err = generate("--batch_size", "5")
    assert (code, out) == (0, fits[1])
    # 12 lines: 5 fails, then 3 fails, then batches of 2
    assert sizes == [5, 3, 2, 2, 2, 2, 2, 2]
    assert err.strip() == ("mlora: out of device memory on a batch of 5 lines; running them and the lines after them "
                           "in batches of 3\nmlora: out of device memory on a batch of 3 lines; running them and the "
                           "lines after them in batches of 2")
    code, out, err = generate("--batch_size", "8")
    assert (code, out) == (0, fits[1])
    assert sizes == [8, 4, 2, 2, 2, 2, 2, 2]  # (8's right half, 4 lines, ran out again after 4 did: 8, 4, 2, 2, 4, ...)
    assert len(err.strip().splitlines()) == 2
    # cuBLAS's allocation failure (a RuntimeError) is running out of memory too
    from test_memory import cublas_out_of_memory

    monkeypatch.setattr(mlora.generate, "greedy_generate", out_of_memory_above(2, cublas_out_of_memory))
    code, out, err = generate("--batch_size", "5")
    assert (code, out, sizes) == (0, fits[1], [5, 3, 2, 2, 2, 2, 2, 2])
    monkeypatch.setattr(mlora.generate, "greedy_generate", out_of_memory_above(1))
    code, out, err = generate("--batch_size", "1", "--base")  # (a line is 2 rows with --base)
    assert (code, out, err.strip()) == (
        2, "", "mlora: error: out of device memory generating line 1 alone (its prompt through one adapter, and the "
               "bare base with --base); give a shorter prompt or fewer --max_new_tokens, or free device memory")


def test_generate_notes_the_bases_sampling_defaults(fused_run, tiny_llama, capsys, tmp_path):
    """A base whose generation_config.json samples (transformers' generate takes its settings
    as defaults): mlora stays greedy without --temperature, and a note gives the flags that
    sample as transformers would (its own reading of the file, defaults included); none with
    --temperature, or for a file that does not sample."""
    import shutil

    from transformers import GenerationConfig

    from mlora.generate import base_sampling

    _, _, cfg_path = fused_run
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    for written in ({"do_sample": True, "temperature": 0.6, "top_p": 0.9}, {"do_sample": True},
                    {"do_sample": True, "top_k": 0, "temperature": 0.7, "repetition_penalty": 1.05},
                    {"do_sample": False, "temperature": 0.6}):
        (base / "generation_config.json").write_text(json.dumps(written))
        hf = GenerationConfig.from_pretrained(base)
        defaults = GenerationConfig._get_default_generation_params()  # what generate fills unset values with
        used = {key: defaults[key] if getattr(hf, key) is None else getattr(hf, key)
                for key in ("temperature", "top_p", "top_k", "repetition_penalty")}
        no_effect = {"top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}  # (as transformers' warpers skip them)
        want = None if not hf.do_sample else {key: value for key, value in used.items()
                                              if no_effect.get(key) != value}
        assert base_sampling(base) == want, written

    def generate(*extra):
        capsys.readouterr()
        assert main(["generate", "--base_model", str(base), "--config", str(cfg_path), "--adapters", "a",
                     "--prompt", "say hi", "--max_new_tokens", "8", *extra]) == 0
        captured = capsys.readouterr()
        return [json.loads(line)["output"] for line in captured.out.splitlines()], captured.err

    (base / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    greedy, err = generate()
    assert err.strip().splitlines() == [
        f"mlora: note: the base's {base / 'generation_config.json'} samples by default, which transformers' generate "
        f"follows; mlora generates greedily unless given --temperature (to sample as it would: --temperature 0.6 "
        f"--top_p 0.9 --top_k 50)"], err
    assert generate("--temperature", "0") == (greedy, "")
    assert generate("--temperature", "0.6", "--top_p", "0.9", "--top_k", "50", "--seed", "1")[1] == ""

def test_generate_stops_at_the_generation_configs_eos(fused_run, tiny_llama, capsys, tmp_path):
    """An instruct model ends its turns with a token other than the tokenizer's EOS (Llama 3's
    <|eot_id|>, Gemma's <end_of_turn>), listed in generation_config.json: a row stops there,
    as transformers' generate does (it ran to max_new_tokens)."""
    import shutil

    from mlora.generate import greedy_generate
    from mlora.session import open_session

    _, _, cfg_path = fused_run
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    session = open_session(base, cfg_path, device="cpu", reads="generate")
    prompt = [(None, [5, 6, 7, 8])]
    before = greedy_generate(session, prompt, max_new_tokens=6)[0]
    assert len(before) == 6
    generation = json.loads((base / "generation_config.json").read_text())
    generation["eos_token_id"] = [session.tokenizer.eos_token_id, before[2]]
    (base / "generation_config.json").write_text(json.dumps(generation))
    assert greedy_generate(session, prompt, max_new_tokens=6)[0] == before[:before.index(before[2])]
    (base / "generation_config.json").write_text(json.dumps(dict(generation, eos_token_id="x")))
    capsys.readouterr()
    assert main(["generate", "--base_model", str(base), "--config", str(cfg_path), "--adapters", "a",
                 "--prompt", "say hi"]) == 2
    assert "eos_token_id must be a token id" in capsys.readouterr().err


def test_an_adapters_chat_template_renders_its_rows_in_train_eval_and_generate(tiny_llama, tokenizer, tmp_path):
    """chat_template: an adapter's chat rows, training and test rows, render through its own
    template (generation-tagged: multi-turn rows its think block refused train), another adapter's
    through the tokenizer's; `mlora generate` renders its prompts (--format chat, a --prompt_file
    conversation) through the template it trained with."""
    import copy

    from test_data import CHAT, QWEN3_LIKE

    from mlora.cli import build_parser, generate_job
    from mlora.data import encode_rows, load_template, prompt_tokens
    from mlora.session import open_session

    (tmp_path / "qwen3.jinja").write_text(QWEN3_LIKE)
    rows = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"cutoff_len": 128, "output_dir": str(tmp_path / "out"), "lora": [
        {"name": "a", "data": "chat.jsonl", "test_data": "chat.jsonl", "chat_template": "qwen3.jinja"},
        {"name": "b", "data": "chat.jsonl"}]}))
    own = copy.copy(tokenizer)
    own.chat_template = QWEN3_LIKE
    alpaca = load_template("alpaca")
    session = open_session(tiny_llama, cfg, device="cpu", load_base=False)
    assert session.data["a"].train == session.data["a"].test == encode_rows(rows, own, alpaca, 128, False)
    assert session.data["b"].train == encode_rows(rows, tokenizer, alpaca, 128, False) != session.data["a"].train
    assert session.tokenizer.chat_template == tokenizer.chat_template  # (the base's stays the others')
    assert open_session(tiny_llama, cfg, device="cpu", load_base=False, reads="eval").data["a"].test == \
        session.data["a"].test
    args = build_parser().parse_args(["generate", "--base_model", str(tiny_llama), "--config", str(cfg),
                                      "--format", "chat", "--prompt", "hi", "--prompt_file", str(data)])
    job = generate_job(args, open_session(tiny_llama, cfg, device="cpu", load_base=False, reads="generate"))
    asked = own.apply_chat_template(CHAT[:4], add_generation_prompt=True, tokenize=False)
    assert [(name, ids) for name, _, ids, _ in job.rows if name == "a"] == [
        ("a", prompt_tokens("hi", "chat", own, alpaca)), ("a", own(asked, add_special_tokens=False).input_ids),
        ("a", prompt_tokens("one two", "chat", own, alpaca))]
    assert [ids for name, _, ids, _ in job.rows if name == "b"][0] == prompt_tokens("hi", "chat", tokenizer, alpaca)
    assert prompt_tokens("hi", "chat", own, alpaca) != prompt_tokens("hi", "chat", tokenizer, alpaca)
    # a's rows stop at its template's <|im_end|> too (the base's EOS is </s>); b's template is the tokenizer's
    assert job.adapter_stop == {"a": {tokenizer.convert_tokens_to_ids("<|im_end|>")}}


def test_stop_tokens_come_from_generation_config_else_config_else_its_text_config(tmp_path):
    """Without generation_config.json, an image-text checkpoint's config.json nests its EOS ids
    in text_config (Gemma 3's end_of_turn among them): they stop a row too."""
    from types import SimpleNamespace

    from mlora.generate import stop_token_ids

    tokenizer = SimpleNamespace(eos_token_id=1)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": [1, 106]}}))
    assert stop_token_ids(tmp_path, tokenizer) == {1, 106}
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7, "text_config": {"eos_token_id": 106}}))
    assert stop_token_ids(tmp_path, tokenizer) == {1, 7}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 9]}))
    assert stop_token_ids(tmp_path, tokenizer) == {1, 9}
    (tmp_path / "generation_config.json").write_text("[" * 100_000)  # json's RecursionError: one line
    with pytest.raises(UserError, match="generation_config.json is not a JSON object"):
        stop_token_ids(tmp_path, tokenizer)


def test_a_peft_config_nested_too_deeply_is_one_line(tmp_path):
    from mlora.adapter import read_peft_config

    (tmp_path / "adapter_config.json").write_text("[" * 100_000)
    with pytest.raises(UserError, match="JSON nested too deeply to read"):
        read_peft_config(tmp_path)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    from mlora.generate import Sampling

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    draws = {Sampling(top_p=0.75).pick(logits, torch.Generator().manual_seed(i)) for i in range(200)}
    assert draws == {0, 1}  # 0.5 falls short of 0.75, 0.5 + 0.3 reaches it
    assert {Sampling(top_p=0.85).pick(logits, torch.Generator().manual_seed(i)) for i in range(200)} == {0, 1, 2}
    # A temperature near 0 is greedy, not NaN probabilities.
    assert Sampling(temperature=1e-39).pick(torch.tensor([1.0, 3.0, 2.0]), torch.Generator()) == 1


def test_row_seeds_do_not_overlap():
    from mlora.generate import row_seed

    seeds = {row_seed(seed, row) for seed in range(50) for row in range(50)}
    assert len(seeds) == 2500 and all(0 <= s < 2**63 for s in seeds)
    # --seed takes 0..2**63-1: seeds 2**61-1 apart drew alike (Python's hash of an int is
    # modulo 2**61-1, so hash((s, row)) was hash((s + 2**61 - 1, row)))
    for seed in (0, 7, 2**61 - 2):
        assert row_seed(seed, 0) != row_seed(seed + 2**61 - 1, 0) != row_seed(seed + 2 * (2**61 - 1), 0)


def test_generate_bad_input(fused_run, tiny_llama, capsys, tmp_path):
    _, out, cfg_path = fused_run
    for extra, fragment in ((["--adapters", "zz"], "'zz' is not an adapter"), (["--prompt", " "], "prompt is empty"),
                            (["--adapters", "a,b, a"], "--adapters: 'a' is named twice"),
                            (["--output_dir", str(tmp_path / "nowhere")], "nothing saved")):
        capsys.readouterr()
        code = main(["generate", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--prompt", "hi", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    for flag in ("--top_p 0.9", "--top_k 5", "--seed 3", "--seed 3 --top_k 5"):  # greedy would ignore them
        capsys.readouterr()
        code = main(["generate", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--prompt", "hi",
                     *flag.split()])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "apply when sampling (--temperature above 0)" in err, err
    for flag, value in (("--max_new_tokens", "0"), ("--temperature", "-1"), ("--top_p", "0"), ("--top_p", "1.5"),
                        ("--top_k", "-1"), ("--repetition_penalty", "0"), ("--batch_size", "0")):
        with pytest.raises(SystemExit):
            main(["generate", "--base_model", str(tiny_llama), "--config", str(cfg_path), "--prompt", "hi",
                  flag, value])


@pytest.mark.parametrize("spoil", ["nan", "loftq"])
def test_init_from_non_finite_weights_is_refused(fused_run, tiny_llama, capsys, tmp_path, spoil):
    """An adapter with NaN weights would skip every step (or make every output NaN), a LoftQ
    one start from another model than the base it is put on: one line."""
    import shutil

    _, out, cfg_path = fused_run
    cfg = json.loads(cfg_path.read_text())
    bad = tmp_path / "bad"
    shutil.copytree(out / cfg["lora"][0]["name"], bad)
    if spoil == "nan":
        tensors = load_file(bad / "adapter_model.safetensors")
        first = sorted(tensors)[0]
        tensors[first] = torch.full_like(tensors[first], float("nan"))
        save_file(tensors, bad / "adapter_model.safetensors")
        fragments = ["non-finite", first]
    else:
        peft = json.loads((bad / "adapter_config.json").read_text())
        peft.update(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
        (bad / "adapter_config.json").write_text(json.dumps(peft))
        fragments = [f"{bad / 'adapter_config.json'}: init_lora_weights is 'loftq'"]
    mine = tmp_path / "cfg.json"
    mine.write_text(json.dumps({**cfg, "output_dir": str(tmp_path / "out"),
                                "lora": [{**cfg["lora"][0], "init_from": str(bad)}]}))
    capsys.readouterr()
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(mine), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(f in err for f in fragments), err
    assert not (tmp_path / "out").exists()  # refused before anything was written: no directory left


def test_every_adapters_loss_goes_down(tmp_path, tiny_llama):
    rows = [{"text": "one two three four five six seven eight nine ten"}] * 4
    lora = [{"name": f"x{i}", "data": write_jsonl(tmp_path / f"x{i}.jsonl", rows), "r": 4 + 4 * i,
             "lr": 3e-2, "batch_size": 4, "num_epochs": 12, "dropout": 0.1,
             "target_modules": ["q_proj", "v_proj", "down_proj"]} for i in range(3)]
    cfg = tmp_path / "learn.json"
    cfg.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "lora": lora}))
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 0
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    for i in range(3):
        losses = [m["loss"] for m in records if m["adapter"] == f"x{i}"]
        assert len(losses) == 12
        assert losses[-1] < 0.6 * losses[0], losses


def test_save_step_writes_checkpoints_and_init_from_resumes_weights(tmp_path, tiny_llama):
    rows = text_rows(8, 5)
    lora = [{"name": "s", "data": write_jsonl(tmp_path / "s.jsonl", rows), "batch_size": 2,
             "num_epochs": 1, "dropout": 0.0, "lr": 1e-2}]
    cfg = tmp_path / "save.json"
    cfg.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "save_step": 2, "lora": lora}))
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 0
    ckpts = sorted(p.name for p in (tmp_path / "out" / "s").iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    final = load_file(tmp_path / "out" / "s" / "adapter_model.safetensors")
    last = load_file(tmp_path / "out" / "s" / "checkpoint-4" / "adapter_model.safetensors")
    assert rel_diff(final, last) == 0
    # init_from: a zero-step-like start from the checkpoint gives its weights back.
    lora[0]["init_from"] = str(tmp_path / "out" / "s" / "checkpoint-2")
    lora[0]["lr"] = 1e-12
    lora[0]["max_steps"] = 1
    cfg.write_text(json.dumps({"output_dir": str(tmp_path / "out2"), "lora": lora}))
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 0
    restarted = load_file(tmp_path / "out2" / "s" / "adapter_model.safetensors")
    start = load_file(tmp_path / "out" / "s" / "checkpoint-2" / "adapter_model.safetensors")
    assert rel_diff(restarted, start) < 1e-6


def test_micro_batch_split_does_not_change_the_result(tmp_path, tiny_llama):
    """The loss is normalised over the whole optimizer step's label tokens, so accumulating
    4 micro-batches of 1 row equals one micro-batch of 4 rows."""
    rows = alpaca_rows(8, 9)
    results = {}
    for mbs in (1, 4):
        lora = [{"name": "g", "data": write_jsonl(tmp_path / "g.jsonl", rows), "batch_size": 4,
                 "micro_batch_size": mbs, "num_epochs": 1, "dropout": 0.0, "lr": 1e-2,
                 "prompt": make_template(tmp_path)}]
        cfg = tmp_path / f"acc{mbs}.json"
        cfg.write_text(json.dumps({"cutoff_len": 64, "output_dir": str(tmp_path / f"out{mbs}"), "lora": lora}))
        assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 0
        results[mbs] = load_file(tmp_path / f"out{mbs}" / "g" / "adapter_model.safetensors")
    assert rel_diff(results[1], results[4]) <= 1e-5


def rows_past_cutoff(n: int) -> list[dict]:
    """Alpaca rows whose prompt alone is longer than cutoff_len 64: no token to learn."""
    return [{"instruction": " ".join(["the quick brown fox jumps over the lazy dog"] * 4), "input": "",
             "output": "dog"}] * n


def unlearnable_steps_config(tmp: Path, names, out: Path) -> Path:
    """Adapter "a" (make_config's) and "z": 2 rows to learn and 3 past cutoff_len, one a step,
    under AdamW with weight decay (which moves weights on a zero gradient too), saved after
    every step."""
    z_rows = alpaca_rows(2, 7) + rows_past_cutoff(3)
    lora = {"a": {"name": "a", "data": write_jsonl(tmp / "a.jsonl", alpaca_rows(10, 1)), "prompt": make_template(tmp),
                  "dropout": 0.0, "num_epochs": 2, "max_grad_norm": 1.0, **ADAPTERS["a"]},
            "z": {"name": "z", "data": write_jsonl(tmp / "z.jsonl", z_rows), "prompt": make_template(tmp),
                  "dropout": 0.0, "num_epochs": 1, "batch_size": 1, "r": 4, "alpha": 8, "optim": "adamw",
                  "lr": 1e-2, "weight_decay": 0.1, "target_modules": ["q_proj", "v_proj"]}}
    path = tmp / f"unlearnable_{''.join(names)}.json"
    path.write_text(json.dumps({"cutoff_len": 64, "seed": 5, "save_step": 1, "output_dir": str(out),
                                "lora": [lora[n] for n in names]}))
    return path


def test_a_step_with_no_token_to_learn_leaves_the_adapter_as_it_was(tmp_path, tiny_llama):
    """A step of z whose only row has no token to learn: z's weights and optimizer state after
    it are those before it (no AdamW momentum, no weight decay), it counts as a step (the next
    steps keep their numbers and LRs) and logs its loss and gradient norm as null with 0 tokens
    (its gradient norm was 0.0, as if it had a gradient); fused with "a",
    both adapters train as they do alone."""
    outs = {}
    for names in (["a", "z"], ["a"], ["z"]):
        out = outs["".join(names)] = tmp_path / "".join(names)
        cfg = unlearnable_steps_config(tmp_path, names, out)
        assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 0
    solo = outs["z"]
    lines = [m for m in read_metrics(solo / "metrics.jsonl") if m["adapter"] == "z"]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    empty = [m["step"] for m in lines if m["tokens"] == 0]
    assert len(empty) == 3 and all(m["loss"] is None and m["grad_norm"] is None for m in lines if m["step"] in empty)
    assert all(m["loss"] > 0 and m["grad_norm"] > 0 for m in lines if m["step"] not in empty)
    assert any(step > 1 for step in empty)
    # (solo, an iteration is a step: checkpoints/iter-<step> hold the optimizer state after it)
    states = {step: torch.load(path / "state.pt", weights_only=True)["adapters"]["z"]
              for step, path in checkpoint.list_checkpoints(solo)}
    for step in (s for s in empty if s > 1):
        before = load_file(solo / "z" / f"checkpoint-{step - 1}" / "adapter_model.safetensors")
        after = load_file(solo / "z" / f"checkpoint-{step}" / "adapter_model.safetensors")
        assert all(torch.equal(before[k], after[k]) for k in before), step
        assert _same_tree(states[step - 1]["optimizer"], states[step]["optimizer"]), step
        assert states[step]["steps_done"] == states[step - 1]["steps_done"] + 1
    for name in ("a", "z"):
        fused = load_file(outs["az"] / name / "adapter_model.safetensors")
        assert rel_diff(fused, load_file(outs[name] / name / "adapter_model.safetensors")) <= 1e-5, name
        fused_lines = [m for m in read_metrics(outs["az"] / "metrics.jsonl") if m["adapter"] == name]
        solo_lines = [m for m in read_metrics(outs[name] / "metrics.jsonl") if m["adapter"] == name]
        assert [m["step"] for m in fused_lines] == [m["step"] for m in solo_lines]
        assert_same_losses([m["loss"] for m in fused_lines], [m["loss"] for m in solo_lines])


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split_for_memory"])
def test_nan_activations_on_rows_with_no_token_to_learn_do_not_cost_the_other_adapter_its_step(
        tmp_path, tiny_llama, monkeypatch, capsys, split):
    """z's rows with no token to learn have non-finite activations (from the embedding on, fp16
    overflow's mark). Their loss is 0 whatever they hold: only their gradient shows it, and the
    fused kernel's 0 x NaN shares it with "a", fused with them. "a" must run again without z
    (said once), not lose its step as an overflow of its own: it trains as alone, and z's steps
    with nothing to learn still take no update. In a batch split for memory, which cannot run
    again, "a" skips those steps as no fault of its own, naming z (no loss scale back-off)."""
    import mlora.lora
    import mlora.trainer

    monkeypatch.setattr(mlora.lora, "kernel", "auto")  # (fused on CPU: each adapter's grads over every row)
    solo = tmp_path / "solo"
    assert main(["train", "--base_model", str(tiny_llama), "--config",
                 str(unlearnable_steps_config(tmp_path, ["a"], solo)), "--no_progress", "--dtype", "fp16"]) == 0
    real = mlora.trainer.fused_loss_sums

    def nan_on_z_rows(model, layout, batch):
        def hook(module, inputs, out):  # out [B, S, H]
            out = out.clone()
            for rows in batch.rows:
                if rows.name == "z" and not batch.label_counts["z"]:
                    out[rows.start:rows.end] = float("nan")
            return out

        handle = model.model.embed_tokens.register_forward_hook(hook)
        try:
            return real(model, layout, batch)
        finally:
            handle.remove()

    monkeypatch.setattr(mlora.trainer, "fused_loss_sums", nan_on_z_rows)
    if split:
        def in_halves(run_part, items, on_split):  # as run_splitting_on_oom after an OOM: nothing kept
            if len(items) < 2:
                return [run_part(items)]
            on_split(items[:1], items[1:])
            return [run_part(items[:1]), run_part(items[1:])]

        monkeypatch.setattr(mlora.trainer, "run_splitting_on_oom", in_halves)
    capsys.readouterr()
    fused = tmp_path / "fused"
    cfg = unlearnable_steps_config(tmp_path, ["a", "z"], fused)
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress",
                 "--dtype", "fp16"]) == 0
    records = read_metrics(fused / "metrics.jsonl")
    skipped = [m for m in records if m["adapter"] == "a" and m.get("skipped")]
    if split:
        assert skipped and all(m["reason"] == "non-finite values of another adapter" and m["culprits"] == ["z"]
                               for m in skipped), skipped
    else:
        assert not skipped, skipped
    z_lines = [m for m in records if m["adapter"] == "z" and "eval_loss" not in m]
    assert [m["tokens"] == 0 for m in z_lines].count(True) == 3
    assert all(m["loss"] is None and m["grad_norm"] is None and not m.get("skipped")
               for m in z_lines if m["tokens"] == 0), z_lines
    if not split:
        assert rel_diff(load_file(fused / "a" / "adapter_model.safetensors"),
                        load_file(solo / "a" / "adapter_model.safetensors")) <= 1e-5
        assert "non-finite activations of 'z' reached the gradients of 'a'" in capsys.readouterr().err


def assert_same_losses(losses: list, reference: list, rel: float = 1e-5) -> None:
    """Step losses equal up to `rel`, a null (a step with no token to learn) only to a null."""
    assert [v is None for v in losses] == [v is None for v in reference]
    assert ([v for v in losses if v is not None]
            == pytest.approx([v for v in reference if v is not None], rel=rel))


def _same_tree(a, b) -> bool:
    """Whether two optimizer state dicts hold equal values (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return a == b


def test_rows_with_no_token_to_learn_are_noted_once_per_adapter(tmp_path, tiny_llama, capsys):
    """Training an adapter some of whose rows have no token to learn within cutoff_len tells
    so, once, naming the adapter, the count and the file; an adapter without such rows says
    nothing."""
    cfg = unlearnable_steps_config(tmp_path, ["a", "z"], tmp_path / "out")
    settings = json.loads(cfg.read_text())
    for adapter in settings["lora"]:
        adapter["max_steps"] = 1
    cfg.write_text(json.dumps(settings))
    capsys.readouterr()
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 0
    err = capsys.readouterr().err
    note = (f"mlora: note: adapter 'z': 3 of 5 rows of {tmp_path / 'z.jsonl'} have no token to learn within "
            f"cutoff_len 64 (the answer starts past it, or there is none); they are trained on but teach nothing: "
            f"raise cutoff_len or shorten the prompts")
    assert err.count(note) == 1
    assert "adapter 'a'" not in err


def test_eval_step_logs_the_validation_loss(tmp_path, tiny_llama, capsys):
    lora = [{"name": "e", "data": write_jsonl(tmp_path / "e.jsonl", text_rows(8, 4)),
             "test_data": write_jsonl(tmp_path / "e_test.jsonl", text_rows(3, 5)),
             "batch_size": 2, "num_epochs": 1, "eval_step": 2, "lr": 1e-2, "dropout": 0.0}]
    cfg = tmp_path / "ev.json"
    cfg.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "lora": lora}))
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 0
    evals = [m for m in read_metrics(tmp_path / "out" / "metrics.jsonl") if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2, 4]
    capsys.readouterr()
    assert main(["eval", "--base_model", str(tiny_llama), "--config", str(cfg)]) == 0
    final = json.loads(capsys.readouterr().out.strip())
    assert final["loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)
    assert final["tokens"] == evals[-1]["eval_tokens"]


def _assert_peft_gives_mlora_logits(peft_model, base: Path, adapter_dir: Path, forward=None) -> None:
    """PEFT's logits with the adapter equal mlora's, and differ from the bare base's. forward: what
    runs PEFT's model on text (by default the model itself)."""
    input_ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    forward = forward or peft_model
    with torch.no_grad():
        expected = forward(input_ids).logits
        with peft_model.disable_adapter():
            bare = forward(input_ids).logits
    got = _mlora_logits(base, adapter_dir, adapter_dir.name, input_ids)
    assert (got - expected).abs().max().item() < 1e-4
    assert (bare - expected).abs().max().item() > 1e-4


PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
GLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
# Qwen3.5: its softmax-attention layers' projections, its linear-attention layers', the MLP's
QWEN3_5_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
                   "out_proj", "gate_proj", "up_proj", "down_proj"]
# Qwen3-Next: its softmax-attention layers' projections, its linear-attention layers' (two fused input ones)
QWEN3_NEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj"]
MLA_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("family,overrides", [("qwen3", dict(head_dim=32)), ("gemma", {}), ("gemma2", {}),
                                              ("gemma3_text", {}), ("phi3", dict(partial_rotary_factor=0.5)),
                                              ("smollm3", dict(no_rope_layers=[1, 0])), ("glm", {}),
                                              ("glm4", {}), ("granite", {}), ("olmo2", {}), ("olmo3", {}),
                                              ("gemma3", {}), ("qwen3_moe", dict(mlp_only_layers=[1])),
                                              ("qwen2_moe", {}), ("gpt_oss", {}), ("glm4_moe", {}),
                                              ("deepseek_v3", {}), ("deepseek_v2", {}), ("mistral4", {}),
                                              ("ministral", {}),
                                              ("mistral3", dict(text_family="ministral3")),
                                              ("mistral3", dict(text_family="mistral4")), ("qwen3_5", {}),
                                              ("qwen3_5_moe", {}), ("qwen3_next", {}), ("gemma4", {}),
                                              ("gemma4_text", dict(attention_k_eq_v=True,
                                                                   num_global_key_value_heads=1)),
                                              ("gemma4_text", GEMMA4_MOE), ("gemma4_text", GEMMA4_E2B),
                                              ("llama4_text", {}), ("llama4", {})],
                         ids=lambda v: v if isinstance(v, str) else "e2b" if v is GEMMA4_E2B else None)
def test_other_families_train_and_load_in_peft(tmp_path, tokenizer_dir, family, overrides):
    """Qwen3 (per-head q/k norms, head_dim != hidden / heads), Gemma 1, 2 (soft-capped scores and
    logits) and 3 (sandwich norms, two RoPEs, a sliding layer), Phi-3 (fused qkv_proj and
    gate_up_proj, partial rotary), SmolLM3 (a layer without RoPE), GLM-4 (fused gate_up_proj,
    RoPE on adjacent pairs; GLM-4-0414's extra norms), Granite (multipliers), OLMo 2 / 3 (norms
    after the sublayers, q/k norms over whole projections; a sliding layer), Gemma 3's image-text
    layout (the vision tower's q/k/v_proj left alone), Qwen3-MoE (LoRA on every expert; a dense
    layer without), Qwen2-MoE (its attention), GLM-4.5 (its router, a shared expert and a dense
    layer without LoRA on their MLPs), DeepSeek-V2/V3 and Mistral Small 4 (latent attention's five
    projections; Mistral Small 4's queries scaled by position), GPT-OSS (attention sinks; LoRA on its stacked
    experts as PEFT's target_parameters), Gemma 4 26B-A4B (LoRA on its experts, as PEFT's
    target_parameters, and on the dense MLP beside them): mlora trains an adapter on every projection, and PEFT
    on transformers' model gives the saved adapter's logits."""
    from peft import PeftModel

    from conftest import load_reference, make_tiny_model

    base = make_tiny_model(tmp_path / family, family, tokenizer_dir, **overrides)
    out = tmp_path / "out"
    cfg = make_config(tmp_path, ["b"], out)
    if family in ("phi3", "glm", "glm4", "gpt_oss", "deepseek_v2", "deepseek_v3", "mistral4") or (
            overrides.get("text_family") == "mistral4"):
        raw = json.loads(cfg.read_text())
        # (Mistral Small 4, text-only or image-text: its latent attention only, PEFT loads no LoRA on its experts)
        raw["lora"][0]["target_modules"] = {"phi3": PHI3_TARGETS, "deepseek_v2": MLA_TARGETS,
                                            "deepseek_v3": MLA_TARGETS, "mistral4": MLA_TARGETS[:5],
                                            "mistral3": MLA_TARGETS[:5]}.get(family, GLM_TARGETS)
        cfg.write_text(json.dumps(raw))
    # (PEFT loads no LoRA on those MoE models' experts)
    if family in ("qwen2_moe", "qwen3_5", "qwen3_5_moe", "qwen3_next", "llama4_text", "llama4"):
        raw = json.loads(cfg.read_text())
        raw["lora"][0]["target_modules"] = (["q_proj", "k_proj", "v_proj", "o_proj"] if family == "qwen2_moe"
                                            else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"] if family in ("llama4_text", "llama4")
                                            else QWEN3_NEXT_TARGETS if family == "qwen3_next"
                                            else QWEN3_5_TARGETS[:9 if family == "qwen3_5_moe" else None])
        cfg.write_text(json.dumps(raw))
    if overrides is GEMMA4_MOE or family.startswith("llama4"):  # (26B-A4B, Llama 4: their experts too, as PEFT's
        # target_parameters name them)
        raw = json.loads(cfg.read_text())
        raw["lora"][0]["target_modules"] += ["experts.gate_up_proj", "experts.down_proj"]
        cfg.write_text(json.dumps(raw))
    assert main(["train", "--base_model", str(base), "--config", str(cfg), "--no_progress"]) == 0
    losses = [m["loss"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 6 and sum(losses[3:]) < sum(losses[:3])  # the second epoch's loss is lower
    if family == "llama4":  # the image-text model, whose forward fails on text alone in transformers 5.24: its
        # language model runs, with PEFT's LoRA in it
        from transformers import Llama4ForConditionalGeneration

        peft_model = PeftModel.from_pretrained(Llama4ForConditionalGeneration.from_pretrained(str(base)),
                                               out / "b").eval()
        _assert_peft_gives_mlora_logits(peft_model, base, out / "b", peft_model.base_model.model.language_model)
    else:
        # (Mistral 3: the image-text model)
        peft_model = PeftModel.from_pretrained(load_reference(base), out / "b").eval()
        _assert_peft_gives_mlora_logits(peft_model, base, out / "b")
    # PEFT puts LoRA exactly where mlora trained it (not also in Gemma 3's or Mistral 3's vision tower; on an
    # MoE model, one LoRA per stacked projection of each layer's experts)
    lora_modules = [name for name, _ in peft_model.named_modules() if name.endswith(".lora_A")]
    saved = [k for k in load_file(out / "b" / "adapter_model.safetensors") if ".lora_A." in k]
    if family in ("qwen3_moe", "glm4_moe", "deepseek_v2", "deepseek_v3"):
        # layer 0's / 1's experts: gate_up_proj (gate and up of each) and down_proj
        experts = 4 if family == "qwen3_moe" else 8
        assert sum(".experts." in k for k in saved) == 3 * experts and sum(".experts." in n for n in lora_modules) == 2
        saved = [k for k in saved if ".experts." not in k] + ["gate_up", "down"]
    if family.startswith("llama4"):  # layers 1 and 3's shared expert, layers 0 and 2's dense MLP
        assert (sum(".shared_expert." in k for k in saved)
                == sum(".feed_forward.down_proj." in k for k in saved) * 3 == 6)
    if family in ("gpt_oss", "llama4_text", "llama4") or overrides is GEMMA4_MOE:  # each (sparse) layer's experts:
        # gate_up_proj and down_proj, each one stacked LoRA
        assert sum(".experts." in k for k in saved) == 2 * 2 and sum(".experts." in n for n in lora_modules) == 2 * 2
    assert len(lora_modules) == len(saved)


# ChatGLM's and Baichuan's own projection names, as their PEFT users write them
REMOTE_TARGETS = {"chatglm": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                  "baichuan": ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def _as_reference_adapter(adapter_dir: Path, family: str, ref_config: dict, out: Path) -> Path:
    """The adapter of a ChatGLM / Baichuan checkpoint rewritten for transformers' GLM / LLaMA
    twin of the base (conftest.reference_dir): the same modules under the twin's names, and
    a fused qkv LoRA as three LoRAs that share A (B A x split by rows is B_q A x, B_k A x, B_v A x)."""
    import re

    from safetensors.torch import load_file, save_file

    head_dim = ref_config.get("head_dim") or ref_config["hidden_size"] // ref_config["num_attention_heads"]
    q_dim = ref_config["num_attention_heads"] * head_dim
    kv_dim = ref_config["num_key_value_heads"] * head_dim
    renames = ([(r"transformer\.encoder\.layers\.(\d+)\.self_attention\.dense\.", r"model.layers.\1.self_attn.o_proj."),
                (r"transformer\.encoder\.layers\.(\d+)\.self_attention\.query_key_value\.",
                 r"model.layers.\1.self_attn.qkv."),
                (r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"model.layers.\1.mlp.gate_up_proj."),
                (r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"model.layers.\1.mlp.down_proj.")]
               if family == "chatglm" else [(r"\.self_attn\.W_pack\.", ".self_attn.qkv.")])
    tensors = {}
    for name, value in load_file(adapter_dir / "adapter_model.safetensors").items():
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
        if ".self_attn.qkv." not in name:
            tensors[name] = value
            continue
        parts = [value.clone() for _ in range(3)] if ".lora_A." in name else value.split([q_dim, kv_dim, kv_dim])
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts):
            tensors[name.replace(".qkv.", f".{proj}.")] = part.contiguous()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["target_modules"] = GLM_TARGETS if family == "chatglm" else [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    out.mkdir()
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("family,overrides", [("chatglm", {}), ("baichuan", {}),
                                              ("baichuan", dict(position_embedding="alibi"))],
                         ids=["chatglm", "baichuan", "baichuan_alibi"])
def test_chatglm_and_baichuan_adapters_use_their_own_names(tmp_path, tokenizer_dir, family, overrides, capsys):
    """ChatGLM2/3 and Baichuan checkpoints name their tensors otherwise than LLaMA: an adapter
    trained on one targets the projections by their own names and is saved under the names
    PEFT sees on the real (remote-code) model, so it loads there; rewritten for transformers'
    GLM / LLaMA twin of the base, PEFT gives mlora's logits (Baichuan 13B's ALiBi too). `mlora
    eval` reads it back."""
    from peft import PeftModel
    from safetensors import safe_open

    from conftest import load_reference, make_tiny_model, reference_dir

    base = make_tiny_model(tmp_path / family, family, tokenizer_dir, **overrides)
    out = tmp_path / "out"
    cfg = make_config(tmp_path, ["b"], out)
    raw = json.loads(cfg.read_text())
    raw["lora"][0]["target_modules"] = REMOTE_TARGETS[family]
    cfg.write_text(json.dumps(raw))
    assert main(["train", "--base_model", str(base), "--config", str(cfg), "--no_progress"]) == 0
    saved = json.loads((out / "b" / "adapter_config.json").read_text())
    assert saved["target_modules"] == REMOTE_TARGETS[family]
    with safe_open(str(out / "b" / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    layer0 = ("base_model.model.transformer.encoder.layers.0.self_attention.query_key_value" if family == "chatglm"
              else "base_model.model.model.layers.0.self_attn.W_pack")
    assert {f"{layer0}.lora_A.weight", f"{layer0}.lora_B.weight"} <= keys
    assert len(keys) == 2 * 2 * len(REMOTE_TARGETS[family])  # A and B, two layers

    ref_dir = reference_dir(base)
    converted = _as_reference_adapter(out / "b", family, json.loads((ref_dir / "config.json").read_text()),
                                      tmp_path / "converted")
    peft_model = PeftModel.from_pretrained(load_reference(base), converted).eval()
    _assert_peft_gives_mlora_logits(peft_model, base, out / "b")
    capsys.readouterr()
    assert main(["eval", "--base_model", str(base), "--config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out.strip())["adapter"] == "b"


def test_targets_in_some_layers_only_are_noted(tmp_path, capsys):
    """Qwen3.5's q/k/v/o_proj are in its softmax-attention layers only, an MoE model's MLP
    targets in its sparse layers only: LoRA reaches those layers alone (as with PEFT), which
    the default q_proj, v_proj hides; a note on stderr says so. None where every layer gets
    some (Gemma 4's v_proj is not in its global layers with attention_k_eq_v, but its q_proj
    is), nor for LLaMA."""
    from conftest import make_tiny_model

    from mlora.config import AdapterConfig, TrainConfig
    from mlora.loader import read_model_config
    from mlora.session import note_partial_targets, resolve_targets

    def note(family: str, targets: list[str], **overrides) -> str:
        _, args = read_model_config(make_tiny_model(tmp_path / family, family, **overrides))
        adapter = AdapterConfig(name="a", data="d.json", target_modules=targets, dropout=0.0)
        cfg = resolve_targets(TrainConfig(lora=[adapter]), args)
        capsys.readouterr()
        note_partial_targets(cfg, args)
        return capsys.readouterr().err.strip()

    assert note("qwen3_5_text", ["q_proj", "v_proj"]) == (  # layers: linear, linear, attention, linear
        "mlora: note: adapter 'a': its target_modules are in 1 of this qwen3_5_text model's 4 layers only; LoRA "
        "goes there (the other layers' LoRA targets: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj, "
        "gate_proj, up_proj, down_proj)")
    assert "in 3 of this qwen3_5_text model's 4 layers" in note("qwen3_5_text", ["in_proj_qkv"])
    assert note("qwen3_5_text", ["q_proj", "in_proj_qkv"]) == ""
    assert note("gemma4_text", ["q_proj", "v_proj"], attention_k_eq_v=True) == ""
    # Gemma 4 E2B/E4B: its last two layers share earlier layers' keys and values (no k/v_proj)
    assert note("gemma4_text", ["k_proj", "v_proj"], **GEMMA4_E2B) == (
        "mlora: note: adapter 'a': its target_modules are in 3 of this gemma4_text model's 5 layers only; LoRA "
        "goes there (the other layers' LoRA targets: q_proj, o_proj, gate_proj, up_proj, down_proj)")
    assert note("gemma4_text", ["q_proj", "v_proj"], **GEMMA4_E2B) == ""
    assert note("llama", ["q_proj", "v_proj"]) == ""
    # GLM-4.5's first layer is dense: its MLP takes no LoRA (only the experts' do)
    assert note("glm4_moe", ["gate_proj", "up_proj", "down_proj"]) == (
        "mlora: note: adapter 'a': its target_modules are in 1 of this glm4_moe model's 2 layers only; LoRA goes "
        "there (the other layers' LoRA targets: q_proj, k_proj, v_proj, o_proj)")
    assert note("glm4_moe", ["q_proj", "down_proj"]) == ""


def test_targets_must_be_projections_of_the_base(tmp_path, tokenizer_dir, tiny_llama, capsys):
    """Phi-3 has qkv_proj and gate_up_proj where LLaMA has q/k/v_proj and gate/up_proj: an
    adapter naming the other layout's projections is a one-line error naming them, before
    anything is written (it would have trained nothing there)."""
    from conftest import make_tiny_model

    phi3 = make_tiny_model(tmp_path / "phi3", "phi3", tokenizer_dir)
    out = tmp_path / "out"
    cfg = make_config(tmp_path, ["a"], out)  # q_proj, v_proj
    capsys.readouterr()
    assert main(["train", "--base_model", str(phi3), "--config", str(cfg), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mlora: error: adapter 'a': target_modules q_proj, v_proj not in this phi3 model "
                   "(its projections: qkv_proj, o_proj, gate_up_proj, down_proj) (q_proj, v_proj is the default: "
                   "set target_modules)")
    assert not out.exists()
    raw = json.loads(cfg.read_text())
    raw["lora"][0]["target_modules"] = ["qkv_proj"]
    cfg.write_text(json.dumps(raw))
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 2
    assert "target_modules qkv_proj not in this llama model" in capsys.readouterr().err
    # ChatGLM's and Baichuan's own names are theirs only (on LLaMA, "dense" would have been o_proj)
    for names, culprit in ((["dense", "q_proj"], "dense"), (["W_pack"], "W_pack")):
        raw["lora"][0]["target_modules"] = names
        cfg.write_text(json.dumps(raw))
        assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 2
        assert f"target_modules {culprit} not in this llama model" in capsys.readouterr().err
    # m-LoRA's w1/w2/w3 are named as written (w2_proj is Phi-3's down_proj; it said gate_proj)
    raw["lora"][0]["target_modules"] = ["w1_proj", "w2_proj"]
    cfg.write_text(json.dumps(raw))
    assert main(["train", "--base_model", str(phi3), "--config", str(cfg), "--no_progress"]) == 2
    assert "target_modules w1_proj not in this phi3 model" in capsys.readouterr().err
    chatglm = make_tiny_model(tmp_path / "chatglm", "chatglm", tokenizer_dir)
    raw["lora"][0]["target_modules"] = ["W_pack"]
    cfg.write_text(json.dumps(raw))
    capsys.readouterr()
    assert main(["train", "--base_model", str(chatglm), "--config", str(cfg), "--no_progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mlora: error: adapter 'a': target_modules W_pack not in this chatglm model (its projections: "
        "query_key_value (qkv_proj), dense (o_proj), dense_h_to_4h (gate_up_proj), dense_4h_to_h (down_proj))")
    assert not out.exists()


def test_generate_past_the_longrope_switch_equals_transformers(tmp_path, tokenizer_dir):
    """A LongRoPE model (Phi-3 128k's kind) turns a sequence longer than
    original_max_position_embeddings with its long factors, every position of it: when a row
    grows past that length in generation, the KV cache is rebuilt, as transformers' Phi-3 does
    (the cached keys kept the short factors and the tokens went elsewhere)."""
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_model
    from mlora.generate import greedy_generate
    from mlora.session import open_session
    from test_model import LONGROPE

    base = make_tiny_model(tmp_path / "phi3", "phi3", tokenizer_dir, **LONGROPE)
    cfg = make_config(tmp_path, ["b"], tmp_path / "out")
    raw = json.loads(cfg.read_text())
    raw["lora"][0]["target_modules"] = PHI3_TARGETS
    cfg.write_text(json.dumps(raw))
    session = open_session(base, cfg, device="cpu", reads="generate")
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]  # 5 and 3 tokens: each crosses 8 at another step
    ours = greedy_generate(session, [(None, p) for p in prompts], max_new_tokens=10)
    for prompt, got in zip(prompts, ours):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                           eos_token_id=session.tokenizer.eos_token_id,
                           pad_token_id=session.tokenizer.eos_token_id)[0, len(prompt):].tolist()
        if want and want[-1] == session.tokenizer.eos_token_id:
            want = want[:-1]
        assert got == want
        assert len(prompt) + len(got) > 9  # it did grow past the switch


def test_longrope_fused_equals_solo(tmp_path, tokenizer_dir):
    """LongRoPE picks its factors by each row's own length: an adapter of short rows (under
    the switch at 8 tokens) fused beside one of long rows trains as it does alone. The rows
    are right-padded, the default, where the fused batch used to carry no attention mask and
    every row turned by the longest one."""
    from conftest import make_tiny_model
    from test_model import LONGROPE

    base = make_tiny_model(tmp_path / "phi3", "phi3", tokenizer_dir, **LONGROPE)
    rng = random.Random(5)
    short = [{"text": " ".join(rng.choice(WORDS) for _ in range(2))} for _ in range(4)]
    long = [{"text": " ".join(rng.choice(WORDS) for _ in range(12))} for _ in range(4)]

    def run(names, out):
        lora = [{"name": n, "data": write_jsonl(tmp_path / f"{n}.jsonl", rows), "target_modules": PHI3_TARGETS,
                 "r": 4, "alpha": 8, "dropout": 0.0, "optim": "sgd", "lr": 5e-2, "batch_size": 2}
                for n, rows in (("s", short), ("l", long)) if n in names]
        cfg = tmp_path / f"{out}.json"
        cfg.write_text(json.dumps({"cutoff_len": 64, "seed": 3, "output_dir": str(tmp_path / out), "lora": lora}))
        assert main(["train", "--base_model", str(base), "--config", str(cfg), "--no_progress"]) == 0
        return load_file(tmp_path / out / "s" / "adapter_model.safetensors")

    # SGD: AdamW's first steps magnify the padded batch's other rounding (4e-5 here); with
    # the long rows' factors on the short rows it was 0.24
    assert rel_diff(run(["s", "l"], "fused"), run(["s"], "solo")) <= 1e-5


def test_dropout_inside_the_base_is_named_when_set(tmp_path, tokenizer_dir, capsys):
    """transformers drops out inside the base in training when its config says so; mlora runs
    the frozen base without: a config that sets a rate gets a one-line warning naming it."""
    from conftest import make_tiny_model

    base = make_tiny_model(tmp_path / "phi3", "phi3", tokenizer_dir, resid_pdrop=0.1)
    cfg = make_config(tmp_path, ["b"], tmp_path / "out")
    raw = json.loads(cfg.read_text())
    raw["lora"][0]["target_modules"] = PHI3_TARGETS
    raw["lora"][0]["max_steps"] = 1
    cfg.write_text(json.dumps(raw))
    capsys.readouterr()
    assert main(["train", "--base_model", str(base), "--config", str(cfg), "--no_progress"]) == 0
    err = capsys.readouterr().err
    assert "mlora: warning: the base model's resid_pdrop=0.1 is not applied" in err
    assert "attention_dropout" not in err  # 0.0: no word


@pytest.mark.parametrize("family", ["gemma3", "mistral3", "qwen3_5_moe", "llama4"])
def test_image_text_base_settings_are_read_from_text_config(capsys, family):
    """An image-text checkpoint keeps its language model's dropout and router settings in
    text_config, where the outer config does not answer for them: still named."""
    import transformers

    from mlora.session import warn_unapplied_dropout

    moe = family in ("qwen3_5_moe", "llama4")
    text = dict(attention_dropout=0.2, **(dict(output_router_logits=True) if moe else {}))
    warn_unapplied_dropout(transformers.AutoConfig.for_model(family, text_config=text))
    err = capsys.readouterr().err
    assert "the base model's attention_dropout=0.2 is not applied" in err
    assert ("output_router_logits is set" in err) == moe


def test_a_rate_transformers_does_not_apply_is_no_warning(capsys):
    """Phi-3's embd_pdrop is in its config class, but transformers' Phi3Model drops out nothing
    after the embedding: mlora runs as transformers does there, and says nothing."""
    import transformers

    from mlora.session import warn_unapplied_dropout

    warn_unapplied_dropout(transformers.Phi3Config(embd_pdrop=0.1))
    assert capsys.readouterr().err == ""


def test_qwen3_5_generate_equals_transformers_plus_peft(tmp_path, tokenizer_dir):
    """Qwen3.5's linear-attention layers carry a conv and a recurrent state from token to token
    in generation: a trained adapter and the bare base, prompts of several lengths in one
    left-padded batch, give PEFT's greedy `generate` on transformers' model."""
    from peft import PeftModel

    from conftest import load_reference, make_tiny_model
    from mlora.adapter import Adapter
    from mlora.generate import greedy_generate
    from mlora.session import open_session

    base = make_tiny_model(tmp_path / "qwen3_5", "qwen3_5", tokenizer_dir)
    out = tmp_path / "out"
    cfg = make_config(tmp_path, ["b"], out)
    raw = json.loads(cfg.read_text())
    raw["lora"][0]["target_modules"] = QWEN3_5_TARGETS
    cfg.write_text(json.dumps(raw))
    assert main(["train", "--base_model", str(base), "--config", str(cfg), "--no_progress"]) == 0
    session = open_session(base, cfg, device="cpu", reads="generate")
    # (as `mlora generate` does; the adapter under the image-text model's module names, as PEFT
    # on Qwen3_5ForConditionalGeneration saves it, reads the same)
    renamed = tmp_path / "image_text_names"
    renamed.mkdir()
    (renamed / "adapter_config.json").write_text((out / "b" / "adapter_config.json").read_text())
    save_file({k.replace("model.model.layers.", "model.model.language_model.layers."): v
               for k, v in load_file(out / "b" / "adapter_model.safetensors").items()},
              renamed / "adapter_model.safetensors")
    assert all(".language_model." in k for k in load_file(renamed / "adapter_model.safetensors"))
    Adapter(session.cfg.lora[0], session.wrappers, session.cfg.seed, session.device,
            naming=session.naming).load_peft(renamed, label="adapter")
    prompts = [("b", [5, 6, 7, 8, 9, 10, 11]), ("b", [12, 13]), (None, [14, 15, 16])]
    ours = greedy_generate(session, prompts, max_new_tokens=8)
    peft_model = PeftModel.from_pretrained(load_reference(base), out / "b").eval()
    eos = session.tokenizer.eos_token_id
    for (name, prompt), got in zip(prompts, ours):
        with torch.no_grad():
            if name is None:
                with peft_model.disable_adapter():
                    want = peft_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                               eos_token_id=eos, pad_token_id=eos)
            else:
                want = peft_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                           eos_token_id=eos, pad_token_id=eos)
        want = want[0, len(prompt):].tolist()
        if want and want[-1] == eos:
            want = want[:-1]
        assert got == want, (name, prompt)
    assert ours[0] != greedy_generate(session, [(None, prompts[0][1])], max_new_tokens=8)[0]  # the adapter matters


def test_the_summary_counts_steps_in_words(tmp_path, tiny_llama, capsys):
    """Each adapter's last line counts its steps: "1 step" for one ("1 steps" before), "2 steps"."""
    from mlora.cli import main

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"cutoff_len": 32, "output_dir": str(tmp_path / "out"), "lora": [
        {"name": "one", "data": write_jsonl(tmp_path / "one.jsonl", text_rows(2, 1)), "batch_size": 2, "r": 2},
        {"name": "two", "data": write_jsonl(tmp_path / "two.jsonl", text_rows(4, 2)), "batch_size": 2, "r": 2}]}))
    capsys.readouterr()
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("one: 1 step, last loss ") and lines[-1].startswith("two: 2 steps, last loss "), lines
