"""Level 5 of the correctness ladder: a pipeline of 2-4 processes on 127.0.0.1 equals the
single process (same per-step losses, same adapter weights), over both transports and both
balance conventions; plus balance parsing, slice loading and the failure of a rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlora.cli import main
from mlora.errors import UserError
from mlora.metrics import read_metrics
from mlora.pipeline.balance import module_costs, split_by_balance, split_by_cost
from mlora.pipeline.run import plan_stages

from conftest import free_port
from test_train import alpaca_rows, chat_rows, make_template, rel_diff, text_rows, write_jsonl

NUM_LAYERS = 4  # pipe_model's (conftest.py)
MODULES = ["embed"] + [f"layer.{i}" for i in range(NUM_LAYERS)] + ["norm", "head"]


ADAPTER_SETTINGS = [
    dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], optim="adamw", lr=1e-2, batch_size=4,
         micro_batch_size=2, lr_scheduler="cosine", warmup_steps=1, max_grad_norm=0.5),
    dict(r=8, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
         optim="sgd", momentum=0.9, lr=5e-2, batch_size=3, micro_batch_size=1),
    dict(r=2, alpha=4, target_modules=["k_proj", "o_proj", "down_proj"], optim="adamw", lr=2e-2,
         batch_size=2, expand_side="left", lr_scheduler="linear"),
    dict(r=4, alpha=4, target_modules=["up_proj", "down_proj"], optim="adamw", lr=1e-2, batch_size=2,
         max_grad_norm=None),
]


def write_config(tmp: Path, num_adapters: int, out: Path, save_step: int = 0, eval_step: int = 0) -> Path:
    """eval_step: every adapter evaluates 5 test rows that often (2 a batch, so some padded)."""
    makers = [lambda: alpaca_rows(8, 1), lambda: text_rows(9, 2), lambda: chat_rows(6, 3), lambda: text_rows(6, 4)]
    template = make_template(tmp)
    lora = []
    for i in range(num_adapters):
        lora.append({"name": f"p{i}", "data": write_jsonl(tmp / f"p{i}.jsonl", makers[i]()), "prompt": template,
                     "dropout": 0.0, "num_epochs": 2, **ADAPTER_SETTINGS[i]})
        if eval_step:
            lora[-1].update(eval_step=eval_step, test_batch_size=2,
                            test_data=write_jsonl(tmp / f"test{i}.jsonl", text_rows(5, 20 + i)))
    path = tmp / f"pipe_{num_adapters}.json"
    path.write_text(json.dumps({"cutoff_len": 64, "seed": 11, "save_step": save_step,
                                "output_dir": str(out), "lora": lora}))
    return path


def launch_ranks(base: Path, cfg: Path, out: Path, world: int, transport: str, balance: list[int] | None,
                 extra: tuple = (), timeout: float = 240,
                 entry: tuple = ("-m", "mlora")) -> list[subprocess.CompletedProcess]:
    """Every rank as a process: `python <entry> train --pipeline ...` (entry: how to start mlora's CLI)."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = []
    for rank in range(world):
        cmd = [sys.executable, *entry, "train", "--pipeline", "--rank", str(rank), "--device", "cpu",
               "--base_model", str(base), "--config", str(cfg), "--output_dir", str(out), "--no_progress",
               "--transport", transport, "--master_addr", "127.0.0.1", "--master_port", str(port),
               "--peer_timeout", "20", "--connect_timeout", "120", *extra]
        cmd += ["--balance", *map(str, balance)] if balance else ["--world_size", str(world)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def assert_same_as_single(single_out: Path, pipe_out: Path, num_adapters: int, tol: float = 1e-5) -> None:
    single_metrics = [m for m in read_metrics(single_out / "metrics.jsonl") if "loss" in m]
    pipe_metrics = read_metrics(pipe_out / "metrics.jsonl")
    for i in range(num_adapters):
        name = f"p{i}"
        a = load_file(pipe_out / name / "adapter_model.safetensors")
        b = load_file(single_out / name / "adapter_model.safetensors")
        assert rel_diff(a, b) <= tol, name
        assert (json.loads((pipe_out / name / "adapter_config.json").read_text())
                == json.loads((single_out / name / "adapter_config.json").read_text()))
        single_losses = [(m["step"], m["loss"]) for m in single_metrics if m["adapter"] == name]
        pipe_losses = [(m["step"], m["loss"]) for m in pipe_metrics if m.get("adapter") == name and "loss" in m]
        assert [s for s, _ in pipe_losses] == [s for s, _ in single_losses]
        assert [v for _, v in pipe_losses] == pytest.approx([v for _, v in single_losses], rel=1e-5)
    stages = [m for m in pipe_metrics if m.get("kind") == "pipeline_stage"]
    assert sorted(m["rank"] for m in stages) == list(range(len(stages)))
    for m in stages:
        assert 0 <= m["busy_fraction"] <= 1 and abs(m["busy_fraction"] + m["bubble_fraction"] - 1) < 1e-9


DEFAULT_CASES = [  # (world, adapters, transport, balance)
    (2, 2, "torch", [3, 4]),  # module convention: embed+2 layers | 2 layers+norm+head
    (3, 4, "zmq", [2, 1, 1]),  # decoder layers only: the embedding joins rank 0, norm+head rank 2
]
# 4 ranks and the split by cost run in-process in the default suite (test_pipeline_inprocess.py);
# with real processes they are in the slow matrix.
FULL_MATRIX = [(w, a, t, b) for w in (2, 3, 4) for a in (1, 2, 4) for t in ("torch", "zmq")
               for b in ("modules", "layers", "cost")]


def _balance(world: int, convention: str) -> list[int] | None:
    if convention == "cost":
        return None
    total = len(MODULES) if convention == "modules" else NUM_LAYERS
    base = [total // world] * world
    for i in range(total % world):
        base[i] += 1
    return base


def _run_case(tmp_path, pipe_model, single_runs, world, adapters, transport, balance):
    _, cfg, single_out = single_runs(adapters)
    out = tmp_path / "pipe_out"
    results = launch_ranks(pipe_model, cfg, out, world, transport, balance)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    assert_same_as_single(single_out, out, adapters)
    return results


@pytest.mark.parametrize("world,adapters,transport,balance", DEFAULT_CASES,
                         ids=[f"{w}ranks-{a}adapters-{t}-{b}" for w, a, t, b in DEFAULT_CASES])
def test_pipeline_equals_single_process(tmp_path, pipe_model, single_runs, world, adapters, transport, balance):
    results = _run_case(tmp_path, pipe_model, single_runs, world, adapters, transport, balance)
    assert all("busy" in r.stderr and "bubble" in r.stderr for r in results)


@pytest.mark.slow
@pytest.mark.parametrize("world,adapters,transport,convention", FULL_MATRIX,
                         ids=[f"{w}ranks-{a}adapters-{t}-{b}" for w, a, t, b in FULL_MATRIX])
def test_pipeline_full_matrix(tmp_path, pipe_model, single_runs, world, adapters, transport, convention):
    _run_case(tmp_path, pipe_model, single_runs, world, adapters, transport, _balance(world, convention))


@pytest.mark.slow
def test_pipeline_checkpoints_equal_single_process(tmp_path, pipe_model, single_runs):
    _, cfg, single_out = single_runs(2, save_step=2)
    out = tmp_path / "pipe_ckpt"
    results = launch_ranks(pipe_model, cfg, out, 2, "zmq", [4, 3])
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    for name in ("p0", "p1"):
        single = sorted(p.name for p in (single_out / name).glob("checkpoint-*"))
        pipe = sorted(p.name for p in (out / name).glob("checkpoint-*"))
        assert pipe == single and pipe
        for ckpt in pipe:
            assert rel_diff(load_file(out / name / ckpt / "adapter_model.safetensors"),
                            load_file(single_out / name / ckpt / "adapter_model.safetensors")) <= 1e-5


@pytest.mark.parametrize("transport", ["torch", "zmq"])
def test_killing_a_rank_stops_the_others(tmp_path, pipe_model, transport):
    rows = text_rows(40, 7)
    lora = [{"name": f"k{i}", "data": write_jsonl(tmp_path / f"k{i}.jsonl", rows), "batch_size": 2,
             "num_epochs": 200, "dropout": 0.0} for i in range(2)]
    cfg = tmp_path / "long.json"
    cfg.write_text(json.dumps({"cutoff_len": 32, "output_dir": str(tmp_path / "out"), "lora": lora}))
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "mlora", "train", "--pipeline", "--rank", str(r),
                               "--device", "cpu", "--base_model", str(pipe_model), "--config", str(cfg),
                               "--no_progress", "--transport", transport, "--master_port", str(port),
                               "--balance", "2", "2", "3", "--peer_timeout", "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(3)]
    try:
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline, "training never started"
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        for r in (0, 2):
            _, stderr = procs[r].communicate(timeout=60)
            elapsed = time.monotonic() - killed_at
            assert procs[r].returncode == 3, stderr[-2000:]  # (not an abort after its line)
            assert elapsed < 4 + 15, elapsed  # peer_timeout plus slack
            lines = [line for line in stderr.splitlines() if line.startswith("mlora:") and "error" in line]
            assert lines and "rank 1" in lines[-1], stderr[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


# ------------------------------------------------------------------ no processes needed
def test_balance_conventions():
    assert split_by_balance(MODULES, NUM_LAYERS, [3, 4]) == [MODULES[:3], MODULES[3:]]
    assert split_by_balance(MODULES, NUM_LAYERS, [2, 1, 1]) == [
        ["embed", "layer.0", "layer.1"], ["layer.2"], ["layer.3", "norm", "head"]]
    # norm and head may sit on different ranks
    assert split_by_balance(MODULES, NUM_LAYERS, [6, 1])[1] == ["head"]
    for bad in ([3, 3], [7, 1], [0, 7]):
        with pytest.raises(UserError) as err:
            split_by_balance(MODULES, NUM_LAYERS, bad)
        assert "--balance" in str(err.value) and "\n" not in str(err.value)


def test_split_by_cost_balances_the_heaviest_stage():
    modules = ["embed"] + [f"layer.{i}" for i in range(32)] + ["norm", "head"]
    costs = module_costs(modules, 4096, 11008, 32000, 32, 32, 128)
    stages = split_by_cost(modules, costs, 4)
    assert [m for s in stages for m in s] == modules and all(stages)
    loads = [sum(costs[modules.index(m)] for m in s) for s in stages]
    assert max(loads) <= 1.15 * sum(loads) / 4  # within 15% of a perfect split
    layers = [sum(m.startswith("layer.") for m in s) for s in stages]
    assert "head" in stages[-1] and layers[-1] == min(layers)  # the head costs about 0.65 layer here


def test_each_rank_loads_exactly_its_tensors(pipe_model):
    from mlora.loader import load_model
    from mlora.models.llama import tensor_names
    from mlora.loader import read_model_config

    _, args = read_model_config(pipe_model)
    for balance in ([3, 4], [2, 1, 1], [1, 2, 2, 2], None):
        stages = plan_stages(str(pipe_model), len(balance) if balance else 3, balance)
        seen = []
        for parts in stages:
            model = load_model(pipe_model, torch.device("cpu"), torch.float32, parts=parts)
            assert model.loaded_tensor_names == sorted(tensor_names(args, parts))
            seen.extend(model.loaded_tensor_names)
        # every tensor is read by some rank; only the tied embedding may be read twice
        dupes = {n for n in seen if seen.count(n) > 1}
        assert dupes <= {"model.embed_tokens.weight"}
        assert set(seen) == set(tensor_names(args, None))


def test_bad_rank_and_world_are_clear_errors(tmp_path, pipe_model, capsys):
    cfg = write_config(tmp_path, 1, tmp_path / "out")
    capsys.readouterr()
    code = main(["train", "--pipeline", "--rank", "5", "--balance", "3", "4", "--base_model", str(pipe_model),
                 "--config", str(cfg), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--rank 5" in err and len(err.splitlines()) == 1
    # (a rank whose start fails waits for the others to tell them: here none comes, after 1 s)
    code = main(["train", "--pipeline", "--rank", "0", "--balance", "3", "3", "--base_model", str(pipe_model),
                 "--config", str(cfg), "--device", "cpu", "--master_port", str(free_port()), "--connect_timeout", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "sums to 6" in err.splitlines()[0] and "sums to 6" in err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_ranks_with_different_balances_fail_on_every_rank(tmp_path, pipe_model):
    cfg = write_config(tmp_path, 1, tmp_path / "out")
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, "-m", "mlora", "train", "--pipeline", "--rank", str(r),
                               "--device", "cpu", "--base_model", str(pipe_model), "--config", str(cfg),
                               "--transport", "zmq", "--master_port", str(port), "--balance", *bal,
                               "--peer_timeout", "10", "--connect_timeout", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r, bal in ((0, ["3", "4"]), (1, ["4", "3"]))]
    for p in procs:
        _, stderr = p.communicate(timeout=120)
        assert p.returncode == 3, stderr[-2000:]
        assert "balance" in stderr.strip().splitlines()[-1]


def stop_resume_config(tmp: Path) -> Path:
    """2 adapters for 6 epochs, a checkpoint at every step."""
    cfg_path = write_config(tmp, 2, tmp / "unused", save_step=1)
    cfg = json.loads(cfg_path.read_text())
    for adapter in cfg["lora"]:
        adapter["num_epochs"] = 6
    cfg_path.write_text(json.dumps(cfg))
    return cfg_path


@pytest.fixture(scope="module")
def stop_resume_reference(tmp_path_factory, pipe_model):
    """The uninterrupted run of stop_resume_config, ranks in threads (the same code path);
    one for every way of stopping."""
    from test_pipeline_inprocess import run_threads

    tmp = tmp_path_factory.mktemp("stop_resume_reference")
    run_threads(pipe_model, stop_resume_config(tmp), tmp / "reference", 2, [3, 4])
    return tmp / "reference"


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_pipeline_stop_then_resume(tmp_path, pipe_model, stop_resume_reference, how):
    """kill -9 one rank mid-run (the others stop with a lost-rank error), or SIGTERM one rank
    (every rank stops at the next drained cut and checkpoints); every rank restarted with
    --resume picks up at the newest checkpoint all ranks hold; the result equals the
    uninterrupted run."""
    cfg_path = stop_resume_config(tmp_path)
    reference = stop_resume_reference
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    def start(rank, port, *extra):
        return subprocess.Popen([sys.executable, "-m", "mlora", "train", "--pipeline", "--rank", str(rank),
                                 "--device", "cpu", "--base_model", str(pipe_model), "--config", str(cfg_path),
                                 "--output_dir", str(out), "--no_progress", "--transport", "zmq",
                                 "--master_port", str(port), "--balance", "3", "4", "--peer_timeout", "5", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    port = free_port()
    procs = [start(r, port) for r in range(2)]
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 12):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.01)
        if how == "kill -9":
            procs[1].send_signal(signal.SIGKILL)
            procs[0].communicate(timeout=60)
            assert procs[0].returncode == 3
        else:
            procs[1].send_signal(signal.SIGTERM)  # not rank 0: the request must travel back
            for p in procs:
                _, stderr = p.communicate(timeout=60)
                assert p.returncode == 128 + signal.SIGTERM, stderr[-2000:]
                assert "--resume" in stderr
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    port = free_port()
    procs = [start(r, port, "--resume") for r in range(2)]
    for p in procs:
        _, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr[-3000:]
        assert "resumed at segment" in stderr
    for name in ("p0", "p1"):
        assert rel_diff(load_file(out / name / "adapter_model.safetensors"),
                        load_file(reference / name / "adapter_model.safetensors")) <= 1e-6
        mine = [(m["step"], m["loss"]) for m in read_metrics(out / "metrics.jsonl") if m.get("adapter") == name]
        theirs = [(m["step"], m["loss"]) for m in read_metrics(reference / "metrics.jsonl") if m.get("adapter") == name]
        assert [s for s, _ in mine] == [s for s, _ in theirs]
        assert [v for _, v in mine] == pytest.approx([v for _, v in theirs], rel=1e-6)
