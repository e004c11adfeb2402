"""early_stopping_patience: an adapter stops after that many evaluations in a row without an
eval loss improvement above early_stopping_threshold, as HF's EarlyStoppingCallback decides; it
ends as if its run ended there (the weights of a run with max_steps at that step), its slot goes
to the next queued adapter, the others train on as alone; the same across a kill and --resume
and on a 2-rank pipeline."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlora import checkpoint
from mlora.cli import main
from mlora.config import parse_config
from mlora.early_stopping import Patience
from mlora.errors import UserError
from mlora.metrics import read_metrics

from test_pipeline import write_config
from test_pipeline_inprocess import run_pipeline_cli, train_argv
from test_save_best import kill_after_step
from test_train import rel_diff

# p0 stops after its second evaluation: the first sets its lowest loss, the second cannot beat
# it by the threshold (a loss goes down by far less than 10 in a step).
EARLY = {"early_stopping_patience": 1, "early_stopping_threshold": 10.0}
STOP_STEP = 2


def early_config(tmp: Path, out: Path, num_adapters: int = 3, save_step: int = 0, **top) -> Path:
    """test_pipeline's first adapters (p0: 4 steps, p1: 6, p2: 6), evaluated at every step, p0
    with EARLY; `top`: more global keys."""
    path = write_config(tmp, num_adapters, out, save_step=save_step, eval_step=1)
    cfg = json.loads(path.read_text())
    cfg["lora"][0].update(EARLY)
    cfg.update(top)
    path.write_text(json.dumps(cfg))
    return path


def train(base: Path, cfg: Path, out: Path | None = None, *extra: str) -> str:
    """`mlora train` (into `out`, else the config's output_dir); its stdout."""
    argv = ["train", "--base_model", str(base), "--config", str(cfg), "--no_progress", *extra]
    if out is not None:
        argv += ["--output_dir", str(out)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return stdout.getvalue()


def variant(cfg: Path, name: str, keep: list[str], **changes) -> Path:
    """A copy of the config with only the adapters `keep`, each changed by `changes`."""
    obj = json.loads(cfg.read_text())
    obj["lora"] = [dict(a, **changes) for a in obj["lora"] if a["name"] in keep]
    obj.pop("train_lora_candidate_num", None)
    path = cfg.parent / f"{name}.json"
    path.write_text(json.dumps(obj))
    return path


def weights(out: Path, name: str) -> dict:
    return load_file(out / name / "adapter_model.safetensors")


def records(out: Path, name: str) -> list[dict]:
    return [m for m in read_metrics(out / "metrics.jsonl") if m.get("adapter") == name]


@pytest.fixture(scope="module")
def queued(tmp_path_factory, pipe_model):
    """Three adapters, two at a time (train_lora_candidate_num 2): p0 and p1 start, p2 waits
    for a slot. (config, output dir, stdout)."""
    tmp = tmp_path_factory.mktemp("early_queued")
    cfg = early_config(tmp, tmp / "out", train_lora_candidate_num=2)
    return cfg, tmp / "out", train(pipe_model, cfg)


def test_patience_counts_as_hf_early_stopping_callback():
    """The evaluation that stops an adapter is the one HF's EarlyStoppingCallback stops at, fed
    the same eval losses (its Trainer keeps best_metric after the callback runs, with its own
    _determine_best_metric), non-finite ones and a first one that is not finite too."""
    from types import SimpleNamespace

    from transformers import EarlyStoppingCallback, Trainer, TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir="unused", metric_for_best_model="eval_loss", greater_is_better=False,
                             report_to=[])
    nan, inf = float("nan"), float("inf")
    cases = [([3.0, 2.0, 2.5, 2.4, 2.6], 2, 0.0), ([3.0, 2.95, 2.9, 2.0, 1.0], 2, 0.1),
             ([3.0, nan, 2.0, 2.1, 2.2, 2.3], 3, 0.0), ([5.0, 4.0, 3.0, 2.0], 1, 0.5),
             ([nan, 3.0, 3.1], 1, 0.0), ([nan, nan, 3.0], 1, 0.0), ([inf, 3.0, 3.0], 1, 0.0),
             ([3.0, 2.9, 2.85], 1, 0.1)]  # (3.0 - 2.9 rounds above 0.1)
    for losses, patience, threshold in cases:
        hf = EarlyStoppingCallback(early_stopping_patience=patience, early_stopping_threshold=threshold)
        state, control = TrainerState(), TrainerControl()
        trainer = SimpleNamespace(args=args, state=state)  # all that _determine_best_metric reads
        hf_stop = mine_stop = None
        tally = Patience()
        for i, loss in enumerate(losses):
            hf.on_evaluate(args, state, control, metrics={"eval_loss": loss})
            Trainer._determine_best_metric(trainer, metrics={"eval_loss": loss}, trial=None)
            if control.should_training_stop and hf_stop is None:
                hf_stop = i
            tally.observe(loss, threshold)
            if tally.exhausted(patience) and mine_stop is None:
                mine_stop = i
        assert mine_stop == hf_stop, (losses, patience, threshold)


@pytest.mark.parametrize("lora, top, message", [
    ({"early_stopping_patience": 2}, {},
     "lora[0] (name 'a'): 'early_stopping_patience' is 2 but no 'test_data' is given"),
    ({"early_stopping_patience": 2, "test_data": "T"}, {},
     "lora[0] (name 'a'): 'early_stopping_patience' is 2 but no 'eval_step' is given"),
    ({"early_stopping_patience": 0}, {}, "lora[0] (name 'a'): 'early_stopping_patience' must be > 0, got 0"),
    ({"early_stopping_threshold": -1}, {}, "'early_stopping_threshold' must be >= 0, got -1"),
    ({"early_stoping_patience": 2}, {},
     "unknown key 'early_stoping_patience'; did you mean 'early_stopping_patience'?"),
    ({}, {"early_stopping_patience": 2, "eval_step": 1},
     "config: 'early_stopping_patience' is 2 but no adapter is evaluated"),
])
def test_config_refuses_early_stopping_without_evaluation(tmp_path, lora, top, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "x", "output": "y"}\n')
    lora = {k: str(data) if v == "T" else v for k, v in lora.items()}
    with pytest.raises(UserError) as err:
        parse_config({"lora": [{"name": "a", "data": str(data), **lora}], **top}, "config")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_tally_from_before_it_kept_whether_evaluated_counts_as_evaluated():
    """A checkpoint's tally written without `evaluated`: an adapter with a lowest loss or a
    count was evaluated, so its next evaluation counts (HF skips only the first)."""
    assert Patience.from_state({"lowest": 2.0, "waited": 0}).evaluated
    assert Patience.from_state({"lowest": None, "waited": 1}).evaluated
    assert not Patience.from_state({"lowest": None, "waited": 0}).evaluated
    assert not Patience.from_state(None).evaluated


def test_config_global_default_applies_to_evaluated_adapters(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "x", "output": "y"}\n')
    cfg = parse_config({"eval_step": 2, "early_stopping_patience": 3, "early_stopping_threshold": 0.5, "lora": [
        {"name": "a", "data": str(data), "test_data": str(data)},
        {"name": "b", "data": str(data)},  # not evaluated: no early stopping either
        {"name": "c", "data": str(data), "test_data": str(data), "early_stopping_patience": None},
        {"name": "d", "data": str(data), "test_data": str(data), "early_stopping_patience": 1,
         "early_stopping_threshold": 0},
    ]})
    assert [(a.early_stopping_patience, a.early_stopping_threshold) for a in cfg.lora] == [
        (3, 0.5), (None, 0.5), (None, 0.5), (1, 0.0)]


def test_early_stop_frees_the_slot_and_ends_as_a_shorter_run(queued, pipe_model, tmp_path):
    """p0 stops after step 2: its eval line says so, its weights are a run of it with max_steps
    2, the summary line says so; p2 takes its slot in the next fused batch; p1 and p2 end as
    they do alone."""
    cfg, out, stdout = queued
    p0 = records(out, "p0")
    assert [m["step"] for m in p0 if "loss" in m] == [1, 2]
    assert [m.get("early_stopped", False) for m in p0 if "eval_loss" in m] == [False, True]
    line = next(line for line in stdout.splitlines() if line.startswith("p0: "))
    assert line.startswith(f"p0: {STOP_STEP} steps, ") and line.endswith(
        f"(stopped early after step {STOP_STEP}: its eval loss stopped improving)"), line

    # p2 was queued behind p0 and p1 (candidate_num 2) and enters the batch right after p0's
    # stop: p0's steps take 2 fused batches each (ending at batches 2 and 4), p1's 3 (3 and 6),
    # p2's one, so its first step (batch 5) comes before p1's second.
    lines = [m["adapter"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert lines[:5] == ["p0", "p1", "p0", "p2", "p1"]

    short = tmp_path / "short"
    train(pipe_model, variant(cfg, "short", ["p0"], max_steps=STOP_STEP, early_stopping_patience=None), short)
    assert rel_diff(weights(out, "p0"), weights(short, "p0")) <= 1e-5
    for name in ("p1", "p2"):
        solo = tmp_path / name
        train(pipe_model, variant(cfg, name, [name]), solo)
        assert rel_diff(weights(out, name), weights(solo, name)) <= 1e-5, name
        assert [m["step"] for m in records(out, name) if "loss" in m] == list(range(1, 7))


@pytest.mark.parametrize("killed_after", [3, 4])
def test_a_killed_run_resumes_to_the_same_early_stop(pipe_model, tmp_path, monkeypatch, killed_after):
    """p1, evaluated every 2 steps, stops after step 4 (its second evaluation). Killed after
    its step 3's checkpoint, between the two evaluations, the resumed run still stops there:
    the tally of the evaluation before the kill rides in the checkpoint. Killed after step 4's,
    once stopped, the resumed run keeps it stopped and says so."""
    reference = tmp_path / "ref"
    cfg = early_config(tmp_path, reference, num_adapters=2, save_step=1)
    obj = json.loads(cfg.read_text())
    obj["lora"][0].update(early_stopping_patience=None)
    obj["lora"][1].update(EARLY, eval_step=2)
    cfg.write_text(json.dumps(obj))
    train(pipe_model, cfg)
    assert [m["step"] for m in records(reference, "p1") if m.get("early_stopped")] == [4]

    out = tmp_path / "out"
    kill_after_step(["train", "--base_model", str(pipe_model), "--config", str(cfg), "--output_dir", str(out),
                     "--no_progress"], monkeypatch, "p1", killed_after)
    assert any(m.get("early_stopped") for m in records(out, "p1")) == (killed_after == 4)
    stdout = train(pipe_model, cfg, out, "--resume")
    assert "p1: 4 steps, " in stdout and "(stopped early after step 4: its eval loss stopped improving)" in stdout
    for name in ("p0", "p1"):
        assert ([(m["step"], "eval_loss" in m, m.get("early_stopped")) for m in records(out, name)]
                == [(m["step"], "eval_loss" in m, m.get("early_stopped")) for m in records(reference, name)]), name
        assert rel_diff(weights(out, name), weights(reference, name)) <= 1e-6, name


def test_pipeline_stops_at_the_same_step_as_one_process(queued, pipe_model, tmp_path, monkeypatch):
    """Two ranks: every rank learns p0's eval losses at the cut, all stop it after the same step,
    and the plan of the segments left gives its slot to p2; the weights are one process's. Then
    taken back to the checkpoint of the cut p0 stopped at, as if killed there, and resumed: the
    resumed ranks leave p0 out of the segments left as well; and to the cut before it: the
    resumed ranks stop p0 at the same step from the tally in the checkpoint."""
    cfg, single_out, _ = queued
    obj = json.loads(cfg.read_text())
    cfg = tmp_path / "checkpointed.json"  # (save_step changes no result: one process's run stays the reference)
    cfg.write_text(json.dumps({**obj, "save_step": 1}))
    out = tmp_path / "pipe"

    def run_and_compare(*extra: str) -> None:
        ranks = run_pipeline_cli(monkeypatch, [train_argv(pipe_model, cfg, out, *extra)] * 2, [3, 4], "torch")
        assert [code for code, _, _ in ranks] == [0, 0], ranks
        assert f"p0: saved to {out / 'p0'} (stopped early after step {STOP_STEP}: its eval loss stopped " \
               "improving)" in ranks[0][1].splitlines()
        for name in ("p0", "p1", "p2"):
            mine, theirs = records(out, name), records(single_out, name)
            assert [(m["step"], "eval_loss" in m, m.get("early_stopped")) for m in mine] == \
                [(m["step"], "eval_loss" in m, m.get("early_stopped")) for m in theirs], name
            assert rel_diff(weights(out, name), weights(single_out, name)) <= 1e-5, name

    run_and_compare()
    root = checkpoint.checkpoint_root(out)
    # Back to the cut after segment 2, p0's last step; then to the one before it, between p0's
    # two evaluations, where only the tally in the checkpoint makes its second one stop it.
    for cut in (STOP_STEP, STOP_STEP - 1):
        for path in root.iterdir():
            if path.name.startswith("FINISHED") or int(path.name.split("-")[1]) > cut:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        run_and_compare("--resume")


def alone_config(tmp: Path, name: str, patience: int | None) -> Path:
    """p0 alone, evaluated and checkpointed at every step, with `patience` (threshold 10:
    patience 1 stops it after step 2, 2 after step 3, none lets it run its 4 steps); its
    output_dir is tmp/name."""
    cfg = early_config(tmp, tmp / name, num_adapters=1, save_step=1)
    obj = json.loads(cfg.read_text())
    obj["lora"][0]["early_stopping_patience"] = patience
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize("before, after", [(2, 1), (1, None)])
def test_patience_changed_at_resume_counts_from_the_next_eval(pipe_model, tmp_path, monkeypatch, before, after):
    """p0 alone, evaluated at every step (patience 1 stops it after step 2, 2 after step 3,
    none lets it run its 4). Killed after step 1 and resumed with another patience, it ends
    as a run with that patience from the start: the tally in the checkpoint goes on under it."""
    def config(name: str, patience: int | None) -> Path:
        return alone_config(tmp_path, name, patience)

    reference = tmp_path / "reference"
    train(pipe_model, config("reference", after))
    assert [m["step"] for m in records(reference, "p0") if m.get("early_stopped")] == ([2] if after else [])
    out = tmp_path / "out"
    kill_after_step(["train", "--base_model", str(pipe_model), "--config", str(config("killed", before)),
                     "--output_dir", str(out), "--no_progress"], monkeypatch, "p0", 1)
    train(pipe_model, config("resumed", after), out, "--resume")
    assert ([(m["step"], "eval_loss" in m, m.get("early_stopped")) for m in records(out, "p0")]
            == [(m["step"], "eval_loss" in m, m.get("early_stopped")) for m in records(reference, "p0")])
    assert rel_diff(weights(out, "p0"), weights(reference, "p0")) <= 1e-6


def test_a_checkpoint_from_before_early_stopping_resumes_with_a_fresh_tally(pipe_model, tmp_path, monkeypatch):
    """A checkpoint as an mlora without early stopping wrote it (no tally in its state; the keys
    are no part of the fingerprint, then or now) resumes: the tally starts at the next evaluation,
    which, its first, does not count, so patience 1 stops p0 one evaluation later (step 3)."""
    cfg = alone_config(tmp_path, "out", 1)
    out = tmp_path / "out"
    argv = ["train", "--base_model", str(pipe_model), "--config", str(cfg), "--no_progress"]
    kill_after_step(argv, monkeypatch, "p0", 1)
    (iteration, newest), = checkpoint.list_checkpoints(out)[-1:]
    state = torch.load(newest / "state.pt", weights_only=True)
    for saved in state["adapters"].values():
        del saved["patience"], saved["early_stopped"]
    fingerprint = json.loads((newest / "manifest.json").read_text())["fingerprint"]
    assert "early_stopping_patience" not in json.dumps(fingerprint)  # (no part of it, as before)
    shutil.rmtree(newest)
    checkpoint.write_checkpoint(out, iteration, state, fingerprint, None)
    stdout = train(pipe_model, cfg, None, "--resume")
    assert "(stopped early after step 3: its eval loss stopped improving)" in stdout
    assert [m["step"] for m in records(out, "p0") if m.get("early_stopped")] == [3]


@pytest.mark.parametrize("patience, stops_at", [(2, 3), (3, None)])
def test_a_patience_the_run_cannot_reach_is_noted(tmp_path, pipe_model, capsys, patience, stops_at):
    """p0 (4 steps, evaluated at each) has 2 evaluations that may stop it: those of steps 2 and 3
    (the first never counts, the last step ends it anyway). Patience 2 stops it after step 3
    with no note; patience 3 cannot be reached: a note says so up front (and in the dry run's
    plan), and it trains its 4 steps."""
    from mlora.early_stopping import evaluations_that_may_stop

    assert evaluations_that_may_stop(1, 4) == 2 and evaluations_that_may_stop(2, 4) == 0
    assert evaluations_that_may_stop(2, 5) == 1 and evaluations_that_may_stop(0, 5) == 0
    cfg = variant(early_config(tmp_path, tmp_path / "out", num_adapters=1), "p0", ["p0"],
                  early_stopping_patience=patience)
    note = (f"mlora: note: adapter 'p0': early_stopping_patience {patience} cannot stop it: of its evaluations "
            f"(eval_step 1, 4 steps) 2 come after its first and before its last step; it trains to the end")
    capsys.readouterr()
    assert main(["train", "--dry_run", "--base_model", str(pipe_model), "--config", str(cfg)]) == 0
    assert (f"  {note.removeprefix('mlora: ')}" in capsys.readouterr().err.splitlines()) == (stops_at is None)
    train(pipe_model, cfg, tmp_path / "out")
    err = capsys.readouterr().err
    assert (note in err.splitlines()) == (stops_at is None), err
    stopped = [m["step"] for m in records(tmp_path / "out", "p0") if m.get("early_stopped")]
    assert stopped == ([] if stops_at is None else [stops_at])
    assert max(m["step"] for m in records(tmp_path / "out", "p0")) == (4 if stops_at is None else stops_at)


def test_a_pipeline_notes_an_unreachable_patience_once(tmp_path, pipe_model, monkeypatch):
    """On a pipeline rank 0 (the rank that builds the batches) tells, the other ranks do not."""
    cfg = variant(early_config(tmp_path, tmp_path / "out", num_adapters=1), "p0", ["p0"], early_stopping_patience=3)
    ranks = run_pipeline_cli(monkeypatch, [train_argv(pipe_model, cfg, tmp_path / "pipe")] * 2, [3, 4], "torch")
    assert [code for code, _, _ in ranks] == [0, 0], ranks
    said = ["early_stopping_patience 3 cannot stop it" in stderr for _, _, stderr in ranks]
    assert said == [True, False], ranks



@pytest.mark.parametrize("how", ["early", "on_nan", "pipeline"])
def test_a_stopped_adapters_bar_says_it_stopped(tmp_path, pipe_model, capsys, monkeypatch, how):
    """An adapter that stops (early, or on_nan "stop" at a NaN) leaves its progress bar
    part-filled while the others train on (here p1, 6 steps): the bar now says it stopped, not
    only the line written above it, so the bar does not read as a stall; in a pipeline too (its
    last rank's bars)."""
    changes = {"alpha": 1e30, "optim": "sgd", "lr": 1.0, "on_nan": "stop"} if how == "on_nan" else {}
    cfg = early_config(tmp_path, tmp_path / "out", num_adapters=2)
    obj = json.loads(cfg.read_text())
    obj["lora"][0].update(changes)
    cfg.write_text(json.dumps(obj))
    argv = ["train", "--base_model", str(pipe_model), "--config", str(cfg), "--output_dir", str(tmp_path / "out"),
            "--device", "cpu"]
    if how == "pipeline":
        ranks = run_pipeline_cli(monkeypatch, [argv] * 2, [3, 4], "torch")
        assert [code for code, _, _ in ranks] == [0, 0], ranks
        err = ranks[1][2]
    else:
        capsys.readouterr()
        assert main(argv) == 0
        err = capsys.readouterr().err
    renders = err.replace("\r", "\n").splitlines()
    p0 = [line for line in renders if line.startswith("p0")]
    label, steps = ("p0 (stopped: non-finite gradient)", 1) if how == "on_nan" else ("p0 (stopped early)", STOP_STEP)
    assert p0 and p0[-1].startswith(f"{label}: ") and f" {steps}/4 " in p0[-1], p0[-3:]
    assert not any("stopped" in line for line in renders if line.startswith("p1"))
