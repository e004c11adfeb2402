"""save_best: <output_dir>/<name>/best holds the adapter's weights at its lowest eval loss, and
that eval's metrics line says "best": true; the same in one process, in a pipeline, and across
a kill and --resume."""

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
from mlora.metrics import read_metrics
from mlora.trainer import Trainer

from test_pipeline import write_config
from test_pipeline_inprocess import run_pipeline_cli, train_argv
from test_train import rel_diff

# High enough that p0's last eval (step 4) is worse than the one before: not every eval improves.
LRS = (2e-1, 1.0)
NAMES = ("p0", "p1")


def write_best_config(tmp: Path, out: Path) -> Path:
    """test_pipeline's two adapters (4 and 6 steps), evaluated and checkpointed at every step."""
    path = write_config(tmp, 2, out, save_step=1, eval_step=1)
    cfg = json.loads(path.read_text())
    for adapter, lr in zip(cfg["lora"], LRS):
        adapter.update(lr=lr, save_best=True)
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory, pipe_model):
    """One process's run: (config, output dir, stdout)."""
    tmp = tmp_path_factory.mktemp("best_single")
    cfg = write_best_config(tmp, tmp / "out")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["train", "--base_model", str(pipe_model), "--config", str(cfg), "--no_progress"]) == 0
    return cfg, tmp / "out", stdout.getvalue()


def evals(out: Path, name: str) -> list[tuple[int, float, bool]]:
    """(step, eval_loss, whether marked best) of the adapter's eval lines, in order."""
    return [(m["step"], m["eval_loss"], m.get("best", False)) for m in read_metrics(out / "metrics.jsonl")
            if m.get("adapter") == name and "eval_loss" in m]


def improving(records: list[tuple[int, float, bool]]) -> list[int]:
    """The steps whose eval loss is below every earlier one."""
    steps, lowest = [], float("inf")
    for step, loss, _ in records:
        if loss < lowest:
            steps.append(step)
            lowest = loss
    return steps


def lowest(records: list[tuple[int, float, bool]]) -> tuple[int, float]:
    step, loss, _ = min(records, key=lambda r: r[1])
    return step, loss


def best_weights(out: Path, name: str, sub: str = "best") -> dict[str, torch.Tensor]:
    return load_file(out / name / sub / "adapter_model.safetensors")


def assert_best_is_its_checkpoint(out: Path, name: str) -> int:
    """<name>/best is exactly the checkpoint-<step> dir of the lowest eval loss; returns that step."""
    step, _ = lowest(evals(out, name))
    best, ckpt = best_weights(out, name), best_weights(out, name, f"checkpoint-{step}")
    assert best.keys() == ckpt.keys() and all(torch.equal(best[k], ckpt[k]) for k in best), (name, step)
    assert ((out / name / "best" / "adapter_config.json").read_text()
            == (out / name / f"checkpoint-{step}" / "adapter_config.json").read_text())
    return step


def test_best_holds_the_checkpoint_of_the_lowest_eval_loss(single):
    _, out, stdout = single
    records = evals(out, "p0")
    assert [s for s, _, best in records if best] == improving(records) == [1, 2, 3]  # step 4 is worse
    assert assert_best_is_its_checkpoint(out, "p0") == 3
    assert rel_diff(best_weights(out, "p0"), load_file(out / "p0" / "adapter_model.safetensors")) > 1e-3
    for name in NAMES:
        records = evals(out, name)
        assert [s for s, _, best in records if best] == improving(records)
        step, loss = lowest(records)
        assert assert_best_is_its_checkpoint(out, name) == step
        line = next(line for line in stdout.splitlines() if line.startswith(f"{name}: "))
        assert line.endswith(f", saved to {out / name}, best eval loss {loss:.4f} at step {step} "
                             f"saved to {out / name / 'best'}"), line


def test_pipeline_saves_the_best_of_one_process_and_resumes_to_it(single, pipe_model, tmp_path, monkeypatch):
    """Two ranks over a real transport: the last rank's eval loss reaches every rank, each
    sends its part of the best weights to rank 0 (ranks 0 and 1 hold different layers). Then
    the run is taken back to its checkpoint after step 3, p0's best, as if killed there, and
    resumed: its step-4 eval must not count as an improvement."""
    cfg, single_out, _ = single
    out = tmp_path / "pipe"
    ranks = run_pipeline_cli(monkeypatch, [train_argv(pipe_model, cfg, out)] * 2, [3, 4], "torch")
    assert [code for code, _, _ in ranks] == [0, 0], ranks

    def assert_same_as_single():
        for name in NAMES:
            mine, theirs = evals(out, name), evals(single_out, name)
            assert [(s, b) for s, _, b in mine] == [(s, b) for s, _, b in theirs], name
            assert [v for _, v, _ in mine] == pytest.approx([v for _, v, _ in theirs], rel=1e-5)
            assert assert_best_is_its_checkpoint(out, name) == lowest(theirs)[0]
            # (1e-4, not the 1e-5 of the other pipeline tests: learning rates of 0.2 and 1, which
            # make an eval get worse, magnify the ranks' other fp32 summation orders; 1.07e-5 seen)
            assert rel_diff(best_weights(out, name), best_weights(single_out, name)) <= 1e-4, name

    assert_same_as_single()
    for name in NAMES:
        step, loss = lowest(evals(out, name))
        assert f"{name}: saved to {out / name}, best eval loss {loss:.4f} at step {step} saved to " \
               f"{out / name / 'best'}" in ranks[0][1].splitlines()

    root = checkpoint.checkpoint_root(out)
    for path in root.iterdir():  # back to the cut after step 3 (segment 3): as if killed after it
        if path.name.startswith("FINISHED") or int(path.name.split("-")[1]) > 3:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    ranks = run_pipeline_cli(monkeypatch, [train_argv(pipe_model, cfg, out, "--resume")] * 2, [3, 4], "torch")
    assert [code for code, _, _ in ranks] == [0, 0], ranks
    assert_same_as_single()


class Killed(Exception):
    pass


def kill_after_p0_step_3(argv: list[str], monkeypatch) -> None:
    """Runs `mlora train` killed right after the checkpoint that follows p0's step 3."""
    kill_after_step(argv, monkeypatch, "p0", 3)


def kill_after_step(argv: list[str], monkeypatch, name: str, step: int) -> None:
    """Runs `mlora train` killed right after the checkpoint that follows the adapter's step."""
    write = Trainer._write_checkpoint

    def write_then_die(self):
        path = write(self)
        if self.runs[name].adapter.steps_done == step:
            raise Killed
        return path

    monkeypatch.setattr(Trainer, "_write_checkpoint", write_then_die)
    with pytest.raises(Killed):
        main(argv)
    monkeypatch.undo()


def test_a_killed_run_resumes_to_the_same_best(single, pipe_model, tmp_path, monkeypatch):
    """Killed right after the checkpoint of p0's step 3, its best so far (its step 4 is worse):
    the resumed run keeps that best, ending as the uninterrupted run did. A checkpoint from
    before save_best (no best loss in it) still resumes, its tally starting afresh."""
    _, single_out, _ = single
    out = tmp_path / "out"
    cfg = write_best_config(tmp_path, out)
    argv = ["train", "--base_model", str(pipe_model), "--config", str(cfg), "--no_progress"]
    kill_after_p0_step_3(argv, monkeypatch)
    assert [s for s, _, best in evals(out, "p0") if best] == [1, 2, 3]
    shutil.copytree(out, tmp_path / "old")
    assert main([*argv, "--resume"]) == 0
    for name in NAMES:
        mine, theirs = evals(out, name), evals(single_out, name)
        assert [(s, b) for s, _, b in mine] == [(s, b) for s, _, b in theirs], name
        assert [v for _, v, _ in mine] == pytest.approx([v for _, v, _ in theirs], rel=1e-6)
        assert rel_diff(best_weights(out, name), best_weights(single_out, name)) <= 1e-6, name

    # The same checkpoint as an older mlora wrote it: no "best" in its state, no save_best in its
    # fingerprint.
    old = tmp_path / "old"
    (iteration, newest), = checkpoint.list_checkpoints(old)[-1:]
    state = torch.load(newest / "state.pt", weights_only=True)
    for saved in state["adapters"].values():
        del saved["best"]
    fingerprint = json.loads((newest / "manifest.json").read_text())["fingerprint"]
    for adapter in fingerprint["adapters"].values():  # (nor the key in its fingerprint)
        adapter.pop("save_best", None)
    shutil.rmtree(newest)
    checkpoint.write_checkpoint(old, iteration, state, fingerprint, None)
    assert main([*argv, "--output_dir", str(old), "--resume"]) == 0
    # p0's first eval after the resume, at step 4, is the first it knows of
    assert [s for s, _, best in evals(old, "p0") if best] == [1, 2, 3, 4]


def test_save_best_turned_on_at_resume_saves_what_it_names(pipe_model, tmp_path, monkeypatch):
    """save_best may be turned on at --resume (it is no part of the fingerprint). The run before
    kept no best weights, so its evals must not count: a best (eval loss, step) tallied then, here
    p0's step 3, was named by the end line with no <name>/best written (step 4's eval is worse)."""
    out = tmp_path / "out"
    cfg = write_best_config(tmp_path, out)
    on = json.loads(cfg.read_text())
    off = json.loads(cfg.read_text())
    for adapter in off["lora"]:
        adapter["save_best"] = False
    cfg.write_text(json.dumps(off))
    argv = ["train", "--base_model", str(pipe_model), "--config", str(cfg), "--no_progress"]
    kill_after_p0_step_3(argv, monkeypatch)
    assert not any(best for name in NAMES for _, _, best in evals(out, name))
    cfg.write_text(json.dumps(on))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*argv, "--resume"]) == 0
    records = evals(out, "p0")
    assert [s for s, _, best in records if best] == [4]  # the first eval after the resume
    for name in NAMES:  # the line names the last eval marked best, whose weights <name>/best holds
        step, loss, _ = [r for r in evals(out, name) if r[2]][-1]
        line = next(line for line in stdout.getvalue().splitlines() if line.startswith(f"{name}: "))
        assert line.endswith(f"best eval loss {loss:.4f} at step {step} saved to {out / name / 'best'}"), line
        best, ckpt = best_weights(out, name), best_weights(out, name, f"checkpoint-{step}")
        assert all(torch.equal(best[k], ckpt[k]) for k in ckpt), name


def test_a_fresh_run_removes_an_earlier_runs_best_a_resume_keeps_it(pipe_model, tmp_path, monkeypatch, capsys):
    """<name>/best and <name>/checkpoint-<step> are the run's own: a resume keeps those written
    before it (even with save_best now off), a fresh start removes an earlier run's (here with
    save_best off and save_step 0, so it writes none: the old ones passed for its own), in one
    process and on a pipeline's rank 0; but a `best` or `checkpoint-<step>` that is not a
    directory mlora wrote (a file of someone else's in it) stays, and so does a directory under
    a name mlora never writes."""
    out = tmp_path / "out"
    cfg = write_best_config(tmp_path, out)
    argv = ["train", "--base_model", str(pipe_model), "--config", str(cfg), "--no_progress"]
    kill_after_p0_step_3(argv, monkeypatch)
    assert assert_best_is_its_checkpoint(out, "p0") == 3
    off = json.loads(cfg.read_text())
    for adapter in off["lora"]:
        adapter["save_best"] = False
    cfg.write_text(json.dumps(off))
    assert main([*argv, "--resume"]) == 0  # the run killed above, to its end
    assert assert_best_is_its_checkpoint(out, "p0") == 3
    assert sorted(p.name for p in (out / "p0").glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, 5)]

    earlier = tmp_path / "earlier-checkpoint-3"
    shutil.copytree(out / "p0" / "checkpoint-3", earlier)  # (to leave it again for the pipeline below)
    shutil.copytree(earlier, out / "p0" / "checkpoint-03")  # a name mlora never writes
    (out / "p1" / "best" / "notes.txt").write_text("mine")
    (out / "p1" / "checkpoint-2" / "notes.txt").write_text("mine")
    for adapter in off["lora"]:  # (a fresh run may change anything: a short one, without evals)
        adapter.update(num_epochs=1, eval_step=None)
    cfg.write_text(json.dumps({**off, "save_step": 0}))
    capsys.readouterr()
    assert main(argv) == 0  # a fresh run over the finished one
    assert not (out / "p0" / "best").exists()
    assert sorted(p.name for p in (out / "p0").glob("checkpoint-*")) == ["checkpoint-03"]
    assert sorted(p.name for p in (out / "p1").glob("checkpoint-*")) == ["checkpoint-2"]
    for kept in ("best", "checkpoint-2"):
        assert (out / "p1" / kept / "notes.txt").read_text() == "mine"
        assert (out / "p1" / kept / "adapter_model.safetensors").is_file()
    err = capsys.readouterr().err
    assert f"mlora: note: {out / 'p1' / 'best'} is not an adapter directory mlora wrote" in err
    assert (f"mlora: note: {out / 'p1' / 'checkpoint-2'} is not an adapter directory mlora wrote (an earlier "
            "run's save_step checkpoint); left as it is") in err
    assert "checkpoint-03" not in err

    for left in ("best", "checkpoint-3"):  # as an earlier run would leave them
        shutil.copytree(earlier, out / "p0" / left)
    ranks = run_pipeline_cli(monkeypatch, [train_argv(pipe_model, cfg, out)] * 2, [3, 4], "torch")
    assert [code for code, _, _ in ranks] == [0, 0], ranks
    assert not (out / "p0" / "best").exists() and not (out / "p0" / "checkpoint-3").exists()
    assert (out / "p0" / "checkpoint-03").is_dir()
    assert (out / "p1" / "best" / "notes.txt").read_text() == "mine"


def test_a_run_removes_what_killed_saves_left_in_its_adapter_directories(pipe_model, tmp_path):
    """A run killed while writing a best, a checkpoint-<step> or the final adapter left a hidden
    temporary beside it for ever (a directory, or a whole safetensors file); the next run's
    saves delete them. A hidden name that no save of mlora's gives stays."""
    out = tmp_path / "out"
    cfg = write_best_config(tmp_path, out)
    adapter_dir = out / "p0"
    adapter_dir.mkdir(parents=True)
    killed = [".best.abcdefgh", ".checkpoint-7.abcdefgh", ".adapter_model.safetensors.abcdefgh",
              ".adapter_config.json.abcdefgh"]
    for name in killed[:2]:
        (adapter_dir / name).mkdir()
        (adapter_dir / name / "adapter_model.safetensors").write_text("half")
    for name in killed[2:]:
        (adapter_dir / name).write_text("half")
    (adapter_dir / ".notes.abcdefgh").write_text("mine")
    assert main(["train", "--base_model", str(pipe_model), "--config", str(cfg), "--no_progress"]) == 0
    assert sorted(p.name for p in adapter_dir.iterdir() if p.name.startswith(".")) == [".notes.abcdefgh"]
