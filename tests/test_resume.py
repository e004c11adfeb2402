"""Resilience: kill -9 and --resume replays exactly, SIGTERM checkpoints, a NaN adapter never
touches the others, damaged or mismatched checkpoints are clear errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mlora.checkpoint import list_checkpoints
from mlora.cli import main
from mlora.metrics import read_metrics

from test_train import alpaca_rows, make_template, rel_diff, split_moved, text_rows, write_jsonl


def write_config(tmp: Path, out: Path, extra_adapter=None, **global_overrides) -> Path:
    template = make_template(tmp)
    lora = [
        # dropout > 0 and accumulation over micro-batches: the RNG state and half-finished
        # steps must survive the restart too.
        {"name": "a", "data": write_jsonl(tmp / "a.jsonl", alpaca_rows(12, 1)), "prompt": template,
         "r": 4, "dropout": 0.2, "batch_size": 4, "micro_batch_size": 2, "num_epochs": 6, "lr": 1e-2,
         "lr_scheduler": "cosine", "warmup_steps": 2},
        {"name": "b", "data": write_jsonl(tmp / "b.jsonl", text_rows(9, 2)), "r": 8, "dropout": 0.1,
         "batch_size": 3, "micro_batch_size": 1, "num_epochs": 5, "optim": "sgd", "momentum": 0.9,
         "lr": 3e-2, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]},
    ]
    if extra_adapter:
        lora.append(extra_adapter)
    cfg = {"cutoff_len": 64, "seed": 5, "save_step": 3, "output_dir": str(out), "lora": lora, **global_overrides}
    path = tmp / f"config_{out.name}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = write_config(tmp, tmp / "out")
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 0
    return tmp / "out"


def assert_same_run(out: Path, ref: Path, tol=1e-6):
    for name in ("a", "b"):
        assert rel_diff(load_file(out / name / "adapter_model.safetensors"),
                        load_file(ref / name / "adapter_model.safetensors")) <= tol
        mine = [(m["step"], m["loss"]) for m in read_metrics(out / "metrics.jsonl") if m["adapter"] == name]
        theirs = [(m["step"], m["loss"]) for m in read_metrics(ref / "metrics.jsonl") if m["adapter"] == name]
        assert [s for s, _ in mine] == [s for s, _ in theirs]  # every step once, in order
        assert [v for _, v in mine] == pytest.approx([v for _, v in theirs], rel=1e-6)


def start_training(base, cfg) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "mlora", "train", "--base_model", str(base),
                             "--config", str(cfg), "--no_progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_lines(proc, metrics: Path, lines: int, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        if metrics.exists() and metrics.read_text().count("\n") >= lines:
            return
        assert proc.poll() is None, f"finished before line {lines}: " + proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)


@pytest.mark.parametrize("kill_after_lines", [8, 22])
def test_kill_9_then_resume_equals_uninterrupted(tmp_path, tiny_llama, reference, kill_after_lines):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out)
    proc = start_training(tiny_llama, cfg)
    try:
        wait_for_lines(proc, out / "metrics.jsonl", kill_after_lines)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert list_checkpoints(out), "a checkpoint should exist by now"
    assert not (out / "a" / "adapter_model.safetensors").exists()
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress", "--resume"]) == 0
    assert_same_run(out, reference)


def test_sigterm_writes_a_checkpoint_and_resumes(tmp_path, tiny_llama, reference):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out, save_step=0)  # no periodic checkpoints: the signal makes one
    proc = start_training(tiny_llama, cfg)
    try:
        wait_for_lines(proc, out / "metrics.jsonl", 6)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "resume with: mlora train" in stderr and "--resume" in stderr
    assert len(list_checkpoints(out)) == 1
    # Resume with recompute on and another memory_fraction (what a user does after running out
    # of memory): neither changes results, so the checkpoint accepts them.
    cfg = write_config(tmp_path, out, save_step=0, recompute=True, memory_fraction=0.5)
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress", "--resume"]) == 0
    ref_cfg = json.loads((tmp_path / f"config_{out.name}.json").read_text())
    assert ref_cfg["save_step"] == 0 and ref_cfg["recompute"] is True
    for name in ("a", "b"):  # save_step differs from the reference run, the training does not
        assert rel_diff(load_file(out / name / "adapter_model.safetensors"),
                        load_file(reference / name / "adapter_model.safetensors")) <= 1e-6


def test_resume_edge_cases(tmp_path, tiny_llama, reference, capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out)
    args = ["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress", "--resume"]
    capsys.readouterr()
    assert main(args) == 2  # nothing there yet
    assert "nothing to resume" in capsys.readouterr().err
    assert main(args[:-1]) == 0
    capsys.readouterr()
    assert main(args) == 0  # the run finished
    assert "nothing to resume" in capsys.readouterr().out


def test_a_fresh_start_over_an_unfinished_run_is_refused_unless_overwrite(tmp_path, tiny_llama, reference, capsys):
    """Starting again without --resume would delete the checkpoints of a run that did not
    finish (hours of work, when --resume was only forgotten): one line, nothing touched."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "checkpoints" / "FINISHED.json").unlink()  # as a run killed after its last checkpoint
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    newest = list_checkpoints(out)[-1][1].name
    args = ["train", "--base_model", str(tiny_llama), "--config", str(write_config(tmp_path, out)), "--no_progress"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"mlora: error: output_dir {out} holds an unfinished run (newest checkpoint: {newest}); "
                   f"continue it with --resume, or start over with --overwrite (deletes its checkpoints and each "
                   f"adapter's best and checkpoint-<step>)")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(SystemExit) as exit_:  # the two contradict each other: argparse's one line
        main([*args, "--resume", "--overwrite"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert_same_run(out, reference)
    assert main(args) == 0  # over a finished run: a fresh start (its adapters are replaced)


def test_save_total_limit_keeps_the_newest(tmp_path, tiny_llama):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out, save_total_limit=2)
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 0
    kept = list_checkpoints(out)
    assert len(kept) == 2 and kept[-1][0] > kept[0][0]


@pytest.fixture(scope="module")
def _killed_once(tmp_path_factory, tiny_llama):
    """One run killed (-9) after 10 metrics lines, with checkpoints; a copy of its output kept."""
    tmp = tmp_path_factory.mktemp("interrupted")
    out = tmp / "out"
    cfg = write_config(tmp, out)
    proc = start_training(tiny_llama, cfg)
    try:
        wait_for_lines(proc, out / "metrics.jsonl", 10)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    shutil.copytree(out, tmp / "as_killed")
    return out, cfg, cfg.read_bytes()


@pytest.fixture
def interrupted(_killed_once):
    """(output dir, config) of the killed run as it was left: the tests damage either, so each
    gets them back, in place. One killed training for them all, not one each."""
    out, cfg, config = _killed_once
    shutil.rmtree(out)
    shutil.copytree(out.parent / "as_killed", out)
    cfg.write_bytes(config)
    return out, cfg


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_damaged_checkpoint_is_a_clear_error(interrupted, tiny_llama, capsys, damage):
    out, cfg = interrupted
    newest = list_checkpoints(out)[-1][1]
    state = newest / "state.pt"
    data = bytearray(state.read_bytes())
    if damage == "truncate":
        state.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    else:
        (newest / "manifest.json").write_text("{ not json")
    capsys.readouterr()
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(newest) in err
    assert ("corrupt" in err) if damage != "manifest" else ("manifest" in err)


def test_a_manifest_of_the_wrong_shape_is_a_clear_error(interrupted, tiny_llama, capsys):
    """manifest.json is JSON but not what mlora wrote (a list, no fingerprint, a fingerprint
    of the wrong shape, not UTF-8, a number of more digits than Python reads): one line naming the
    checkpoint, never a traceback."""
    out, cfg = interrupted
    newest = list_checkpoints(out)[-1][1]
    good = json.loads((newest / "manifest.json").read_text())
    damages = [b"[1]", json.dumps({k: v for k, v in good.items() if k != "fingerprint"}).encode(),
               json.dumps({**good, "fingerprint": {**good["fingerprint"], "adapters": {"a": 5}}}).encode(),
               json.dumps({**good, "iteration": "3"}).encode(), b'{"format": "' + bytes([0xFF, 0xFE]) + b'"}',
               b'{"iteration": ' + b"9" * 5000 + b"}"]
    for damage in damages:
        (newest / "manifest.json").write_bytes(damage)
        capsys.readouterr()
        assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress", "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(newest) in err and "Traceback" not in err, (damage, err)


def test_mismatched_checkpoint_names_the_difference(interrupted, tiny_llama, capsys):
    out, cfg = interrupted
    changed = json.loads(cfg.read_text())
    changed["lora"][1]["lr"] = 0.5
    cfg.write_text(json.dumps(changed))
    capsys.readouterr()
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "adapter 'b'" in err and "'lr'" in err and "0.5" in err


def test_a_run_whose_files_moved_resumes(interrupted, tiny_llama, reference, tmp_path, capsys):
    """The checkpoint holds what the adapters' files hold, not where they are: a project moved
    (or its data mounted elsewhere on the node a requeued job lands on) resumes to the
    uninterrupted run; so does one given a test_data it does not evaluate mid-run (no eval_step:
    training never reads it). Evaluated test rows are compared (the test below)."""
    out, cfg = interrupted
    moved = tmp_path / "moved project"
    moved.mkdir()
    config = json.loads(cfg.read_text())
    for adapter in config["lora"]:
        for key in ("data", "prompt"):
            if key in adapter:
                adapter[key] = shutil.copy(adapter[key], moved)
    cfg.write_text(json.dumps({**config, "lora": [{**config["lora"][0], "test_data": config["lora"][1]["data"]},
                                                  config["lora"][1]]}))
    args = ["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress", "--resume"]
    assert main(args) == 0
    assert_same_run(out, reference)


def test_test_rows_count_for_a_resume_only_where_training_evaluates_them(tmp_path):
    """An adapter evaluated mid-run (eval_step) resumes only onto its own test rows (its evals,
    best and early stops are measured on them); one without an eval_step never reads them in
    training, so a test file edited since (for a later `mlora eval`) resumes, also from a
    checkpoint that holds a digest of them (as mlora wrote for a while)."""
    from types import SimpleNamespace

    from mlora.checkpoint import describe_difference, run_fingerprint
    from mlora.config import parse_config

    (tmp_path / "config.json").write_text("{}")
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(2, 1))
    write_jsonl(tmp_path / "test.jsonl", alpaca_rows(2, 2))

    def fingerprint(test_labels, **keys):
        cfg = parse_config({"lora": [{"name": "a", "data": "train.jsonl", "test_data": "test.jsonl", **keys}]},
                           base_dir=tmp_path)
        rows = SimpleNamespace(train=[SimpleNamespace(input_ids=[1, 2, 3], labels=[-100, 2, 3])],
                               test=[SimpleNamespace(input_ids=[4, 5, 6], labels=test_labels)])
        return run_fingerprint(SimpleNamespace(cfg=cfg, base_dir=tmp_path, data={"a": rows}, dtype="fp32", quant=None))

    evaluated = fingerprint([-100, 5, 6], eval_step=2)
    assert describe_difference(evaluated, fingerprint([-100, 5, 6], eval_step=2)) is None
    assert describe_difference(evaluated, fingerprint([-100, -100, 6], eval_step=2)) == \
        "adapter 'a': its test data differs"
    assert describe_difference(fingerprint([-100, 5, 6]), fingerprint([-100, -100, 6])) is None
    digested = fingerprint([-100, 5, 6])
    digested["test_data"]["a"] = evaluated["test_data"]["a"]
    assert describe_difference(digested, fingerprint([-100, -100, 6])) is None


def test_a_chat_templates_place_is_not_part_of_the_run(tmp_path):
    """chat_template, as the adapters' other files: what it makes of the rows counts (their tokens
    and labels are compared), not where it is; and a checkpoint written before the key existed
    (its adapters' settings without it) resumes a run that gives none."""
    from types import SimpleNamespace

    from mlora.checkpoint import describe_difference, run_fingerprint
    from mlora.config import parse_config

    (tmp_path / "config.json").write_text("{}")
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(2, 1))
    (tmp_path / "moved").mkdir()
    for place in (tmp_path / "chat.jinja", tmp_path / "moved" / "chat.jinja"):
        place.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def fingerprint(**keys):
        cfg = parse_config({"lora": [{"name": "a", "data": "train.jsonl", **keys}]}, base_dir=tmp_path)
        rows = SimpleNamespace(train=[SimpleNamespace(input_ids=[1, 2, 3], labels=[-100, 2, 3])], test=[])
        return run_fingerprint(SimpleNamespace(cfg=cfg, base_dir=tmp_path, data={"a": rows}, dtype="fp32", quant=None))

    assert describe_difference(fingerprint(chat_template="chat.jinja"),
                               fingerprint(chat_template="moved/chat.jinja")) is None
    assert "chat_template" not in fingerprint()["adapters"]["a"]


def test_a_checkpoint_of_an_older_length_grouping_is_refused(tmp_path):
    """group_by_length now groups as transformers does: a checkpoint of a run that grouped rows in
    mlora's older windows would resume mid-epoch into other rows without a word. It records no
    grouping, and is refused in words; a run that groups no rows records none, and resumes as
    before."""
    from types import SimpleNamespace

    from mlora.checkpoint import describe_difference, run_fingerprint
    from mlora.config import parse_config

    (tmp_path / "config.json").write_text("{}")
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(2, 1))

    def fingerprint(**keys):
        cfg = parse_config({"lora": [{"name": "a", "data": "train.jsonl", **keys}]}, base_dir=tmp_path)
        rows = SimpleNamespace(train=[SimpleNamespace(input_ids=[1, 2, 3], labels=[-100, 2, 3])], test=[])
        return run_fingerprint(SimpleNamespace(cfg=cfg, base_dir=tmp_path, data={"a": rows}, dtype="fp32", quant=None))

    grouped = fingerprint(group_by_length=True)
    assert describe_difference(grouped, fingerprint(group_by_length=True)) is None
    older = {key: value for key, value in grouped.items() if key != "length_grouping"}
    assert describe_difference(older, grouped) == (
        "group_by_length orders rows in megabatches of up to 50 batches, as transformers' LengthGroupedSampler, "
        "where the mlora that wrote the checkpoint ordered them in windows of 50 micro-batches: the resumed epoch "
        "would train other rows (finish the run with that mlora, or start over with --overwrite)")
    assert "length_grouping" not in fingerprint()


def test_a_checkpoint_of_another_dtype_says_which_to_resume_with(interrupted, tiny_llama, capsys):
    """The default dtype follows the device (fp16 on GPUs older than compute capability 8.0, bf16
    on newer, fp32 on the CPU): a checkpoint of another default is refused naming the --dtype
    that resumes it."""
    out, cfg = interrupted
    capsys.readouterr()
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress", "--resume",
                 "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "dtype was torch.float32, now torch.bfloat16 (resume it with --dtype fp32)" in err


def test_a_resume_refuses_the_same_tokens_with_other_labels(interrupted, tiny_llama, capsys):
    """Adapter a's rows with their prompt/answer split moved (its template's rendering, turned
    into prompt-completion rows whose prompt takes the answer's first word): its tokens are the
    same, its labels are not, and the resume is refused naming that (it used to resume and train
    on the other labels)."""
    out, cfg = interrupted
    config = json.loads(cfg.read_text())
    data = Path(config["lora"][0]["data"])
    moved = data.with_name("a_moved.jsonl")
    config["lora"][0]["data"] = write_jsonl(moved, split_moved(data, config["lora"][0]["prompt"]))
    cfg.write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.endswith("does not match this run: adapter 'a': its training rows' labels differ: the same tokens, "
                        "others learnt (its prompt template, or where its rows split prompt from answer, changed)")


def test_a_checkpoint_without_a_digest_of_the_labels_resumes(interrupted, tiny_llama, reference):
    """A checkpoint of an mlora before the labels' digest (none in its fingerprint) resumes, to
    the uninterrupted run."""
    out, cfg = interrupted
    for _, path in list_checkpoints(out):
        manifest = json.loads((path / "manifest.json").read_text())
        del manifest["fingerprint"]["labels"]
        (path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress", "--resume"]) == 0
    assert_same_run(out, reference)


POISONS = {
    # A learning rate of 1e30 blows the adapter's weights up; RMSNorm keeps the numbers finite.
    "lr-1e30": ({"lr": 1e30, "optim": "adamw"}, None),
    # alpha = 1e30 makes the adapter's own rows overflow: NaN loss and gradients.
    "nan-skip": ({"alpha": 1e30, "optim": "sgd", "lr": 1.0, "on_nan": "skip"}, "skip"),
    "nan-stop": ({"alpha": 1e30, "optim": "sgd", "lr": 1.0, "on_nan": "stop"}, "stop"),
    # AdamW skips on the device (Adapter.step_on_device), SGD on the host's word.
    "nan-skip-adamw": ({"alpha": 1e30, "optim": "adamw", "lr": 1.0, "on_nan": "skip"}, "skip"),
    "nan-stop-adamw": ({"alpha": 1e30, "optim": "adamw", "lr": 1.0, "on_nan": "stop"}, "stop"),
    # Two micro-batches a step and a NaN loss (the test makes it): the first micro-batch's
    # non-finite loss is known on the host when the step comes, and the trainer skips it there.
    # The loop kernel, which reduces each adapter's gradients over its own rows (see
    # test_a_nan_in_one_adapters_rows_does_not_reach_the_others for the fused one).
    "nan-loss-accumulated": ({"optim": "adamw", "lr": 1e-2, "on_nan": "skip", "micro_batch_size": 1}, "skip"),
}


@pytest.mark.parametrize("kind", sorted(POISONS))
def test_a_poisoned_adapter_never_touches_the_others(tmp_path, tiny_llama, reference, kind, monkeypatch, capsys):
    settings, policy = POISONS[kind]
    if kind == "nan-loss-accumulated":
        import mlora.lora

        monkeypatch.setattr(mlora.lora, "kernel", "loop")
        _poison_the_loss(monkeypatch, "poison")
    out = _train_beside_a_poison(tmp_path, tiny_llama, reference, {"max_grad_norm": None, **settings})
    records = [m for m in read_metrics(out / "metrics.jsonl") if m["adapter"] == "poison"]
    flagged = [m for m in records if m.get("skipped")]
    if policy is None:
        return
    assert flagged and all(m["action"] == policy for m in flagged)
    assert all(m["reason"].startswith("non-finite") for m in flagged)
    if policy == "stop":
        assert records[-1].get("skipped") and len(flagged) == 1
        # Its last line says why it stopped, whichever went non-finite (here the gradient; the
        # loss may be finite: it said "non-finite loss" then too).
        poison_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("poison:"))
        assert poison_line.endswith("(stopped after a non-finite loss or gradient)"), poison_line
    else:
        assert len(records) == 18  # every step is logged, the bad ones as skipped
    if kind == "nan-loss-accumulated":
        assert all(m["reason"] == "non-finite loss" for m in flagged)
    # Every step was non-finite, so none was taken: the weights are the initial ones (B = 0).
    assert len(flagged) == len(records)
    saved = load_file(out / "poison" / "adapter_model.safetensors")
    assert all(not v.any() for k, v in saved.items() if "lora_B" in k)


def _train_beside_a_poison(tmp_path, tiny_llama, reference, settings: dict):
    """Train the reference's adapters a and b beside an adapter "poison" (`settings` on top of
    its defaults); a and b must come out as without it. Returns the output directory."""
    poison = {"name": "poison", "data": write_jsonl(tmp_path / "p.jsonl", text_rows(6, 9)), "r": 4,
              "batch_size": 2, "num_epochs": 6, **settings}
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out, extra_adapter=poison)
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 0
    for name in ("a", "b"):
        # The dropout masks of a and b come from their own generators: same as without poison.
        assert rel_diff(load_file(out / name / "adapter_model.safetensors"),
                        load_file(reference / name / "adapter_model.safetensors")) <= 1e-5
    return out


def _poison_the_loss(monkeypatch, name: str) -> None:
    """Adapter `name`'s CE sum becomes NaN in every fused batch (and so does the gradient that
    flows back through its rows)."""
    import mlora.trainer

    real = mlora.trainer.fused_loss_sums

    def poisoned(*args):
        sums = real(*args)
        if name in sums:
            ce, count = sums[name]
            sums[name] = (ce * float("nan"), count)
        return sums

    monkeypatch.setattr(mlora.trainer, "fused_loss_sums", poisoned)


@pytest.mark.parametrize("kernel,policy", [("auto", "skip"), ("auto", "stop"), ("dense", "skip")])
def test_a_nan_in_one_adapters_rows_does_not_reach_the_others(tmp_path, tiny_llama, reference, monkeypatch,
                                                             capsys, kernel, policy):
    """A NaN loss (non-finite activations) on one adapter's rows in every batch. The fused and
    dense kernels reduce each adapter's weight gradients over every row of the batch, so the
    NaN reaches the gradients of the adapters fused with it (0 x NaN); the trainer then runs
    those again without the culprit (Trainer._nan_victims), and they train exactly as
    without it: a (which accumulates two micro-batches a step) and b (SGD)."""
    import mlora.lora
    import mlora.trainer

    monkeypatch.setattr(mlora.lora, "kernel", kernel)
    _poison_the_loss(monkeypatch, "poison")
    batches = []
    train_on = mlora.trainer.Trainer._train_on
    monkeypatch.setattr(mlora.trainer.Trainer, "_train_on",
                        lambda self, parts: batches.append([p.adapter for p in parts]) or train_on(self, parts))
    out = _train_beside_a_poison(tmp_path, tiny_llama, reference, {"optim": "adamw", "on_nan": policy})
    assert_same_run(out, reference, tol=1e-5)  # steps, losses and weights of a and b
    records = [m for m in read_metrics(out / "metrics.jsonl") if m["adapter"] == "poison"]
    assert records and all(m.get("skipped") and m["reason"] == "non-finite loss" for m in records)
    assert len(records) == (1 if policy == "stop" else 18)
    assert any("poison" not in names and len(names) > 1 for names in batches)  # a and b did run again
    assert "non-finite activations of 'poison' reached the gradients of" in capsys.readouterr().err


def test_a_nan_in_a_batch_split_for_memory_skips_the_others_step_as_no_fault_of_theirs(
        tmp_path, tiny_llama, monkeypatch, capsys):
    """A batch split for memory keeps no gradients to run its adapters again from, so those a
    NaN loss's activations reached (a piece shared with the culprit) skip that step. It is
    not theirs: under on_nan "stop" they train on, and under fp16 their loss scale does not
    back off (a back-off would log "fp16 gradient overflow")."""
    import mlora.trainer

    _poison_the_loss(monkeypatch, "poison")

    def split_once(run_part, items, on_split):
        if len(items) < 2:
            return [run_part(items)]
        on_split(items[:1], items[1:])  # as run_splitting_on_oom after an OOM: halves, nothing kept
        return [run_part(items[:1]), run_part(items[1:])]

    monkeypatch.setattr(mlora.trainer, "run_splitting_on_oom", split_once)
    poison = {"name": "poison", "data": write_jsonl(tmp_path / "p.jsonl", text_rows(6, 9)), "r": 4,
              "batch_size": 2, "num_epochs": 6}
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out, extra_adapter=poison)
    raw = json.loads(cfg.read_text())
    cfg.write_text(json.dumps(dict(raw, lora=[dict(a, on_nan="stop", num_epochs=2) for a in raw["lora"]])))
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress",
                 "--dtype", "fp16"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    tainted = [m for m in records if m.get("reason") == "non-finite values of another adapter"]
    assert tainted and {m["adapter"] for m in tainted} <= {"a", "b"}
    assert all(m["culprits"] == ["poison"] and m["action"] == "skip" for m in tainted)
    assert not any(m.get("action") == "stop" or "overflow" in m.get("reason", "")
                   for m in records if m["adapter"] != "poison")
    for name in ("a", "b"):  # every step logged, none stopped
        steps = [m["step"] for m in records if m["adapter"] == name and "loss" in m]
        assert steps == list(range(1, len(steps) + 1))
        assert len(steps) > len([m for m in tainted if m["adapter"] == name])
    captured = capsys.readouterr()
    assert "reached its gradient in a batch split for memory; step skipped" in captured.out + captured.err


def test_steps_tainted_in_a_batch_split_for_memory_do_not_run_again_later(tmp_path, tiny_llama, monkeypatch, capsys):
    """Only the first fused batch is split for memory; it taints the steps of a and b, whose
    gradients stay NaN through their next micro-batches (fp16 watches both mid-step). Two
    non-finite gradients in a batch of no culprit made each run again alone, for nothing (a
    NaN from before the batch stays) and said so; the steps are skipped as tainted either way."""
    import mlora.trainer

    _poison_the_loss(monkeypatch, "poison")
    batches = []

    def split_the_first(run_part, items, on_split):
        batches.append(len(items))
        if len(batches) > 1 or len(items) < 2:
            return [run_part(items)]
        on_split(items[:1], items[1:])  # as run_splitting_on_oom after an OOM: halves, nothing kept
        return [run_part(items[:1]), run_part(items[1:])]

    monkeypatch.setattr(mlora.trainer, "run_splitting_on_oom", split_the_first)
    poison = {"name": "poison", "data": write_jsonl(tmp_path / "p.jsonl", text_rows(2, 9)), "r": 4,
              "batch_size": 2, "on_nan": "stop"}
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out, extra_adapter=poison)
    raw = json.loads(cfg.read_text())
    cfg.write_text(json.dumps(dict(raw, lora=[dict(a, num_epochs=1, max_steps=1) for a in raw["lora"]])))
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress",
                 "--dtype", "fp16"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    tainted = {m["adapter"] for m in records if m.get("reason") == "non-finite values of another adapter"}
    assert tainted == {"a", "b"}, records
    err = capsys.readouterr().err
    assert "ran again" not in err, err
    assert len(batches) == 3, batches  # a and b's three fused batches (b: 3 micro-batches a step), no rerun


def test_too_little_disk_is_an_error_before_training(tmp_path, tiny_llama, capsys, monkeypatch):
    import shutil

    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out)
    capsys.readouterr()
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "MiB free" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing written, and the directory it made removed


def test_dropout_generators_are_saved_per_layer_and_an_older_state_is_refused(tiny_llama):
    """An adapter's checkpoint state holds one dropout generator state per decoder layer, and
    restoring it puts each back; a state of an older mlora (one generator per adapter) is a
    one-line error, not a silently different run."""
    import torch

    from mlora.adapter import Adapter
    from mlora.config import AdapterConfig
    from mlora.errors import UserError
    from mlora.loader import load_model
    from mlora.lora import BatchLayout, inject_lora

    model = load_model(tiny_llama, "cpu", torch.float32)
    wrappers = inject_lora(model, BatchLayout())
    cfg = AdapterConfig(name="a", data="", r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "down_proj"])
    adapter = Adapter(cfg, wrappers, 3, torch.device("cpu"))
    layers = {p.rsplit(".", 2)[0] for p in wrappers}
    assert set(adapter.dropout_generators) == layers and len(layers) > 1
    # Different layers draw different streams.
    first, second = (g.get_state() for g in list(adapter.dropout_generators.values())[:2])
    assert not torch.equal(first, second)
    saved = adapter.state_for_checkpoint()
    for g in adapter.dropout_generators.values():
        torch.empty(8).bernoulli_(0.5, generator=g)  # draws move every generator on
    adapter.restore_from_checkpoint(saved)
    assert all(torch.equal(g.get_state(), saved["generators"][layer])
               for layer, g in adapter.dropout_generators.items())
    old = {k: v for k, v in saved.items() if k != "generators"}
    old["generator"] = saved["generators"][sorted(layers)[0]]
    with pytest.raises(UserError, match="adapter 'a' has other dropout generators"):
        adapter.restore_from_checkpoint(old)


def test_resuming_onto_a_shortened_metrics_log_pads_it_with_nothing(tmp_path, capsys):
    """A metrics.jsonl emptied or replaced since the checkpoint (shorter than the offset the
    checkpoint saved) used to be padded with NUL bytes up to that offset, and read_metrics then
    failed on it; now the resumed run's lines follow its whole lines, and a note says so."""
    from mlora.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"adapter": "a", "step": 1}\n{"adapter": "a", "st')  # its last line cut short
    log = MetricsLog(path, truncate_to=10_000)
    log.write({"adapter": "a", "step": 2})
    log.close()
    assert b"\0" not in path.read_bytes()
    assert [m["step"] for m in read_metrics(path)] == [1, 2]
    assert "holds 48 bytes, 10000 when the checkpoint was written" in capsys.readouterr().err
    log = MetricsLog(path, truncate_to=len('{"adapter": "a", "step": 1}\n'))  # the usual case: cut to the offset
    log.close()
    assert [m["step"] for m in read_metrics(path)] == [1]
