"""launch/torchrun.sh runs the same job as the single process: one node with 2 processes, and
two "nodes" (two torchrun agents with c10d rendezvous) simulated on this host; so does
launch/manual.sh (one process per rank, started by the script)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import free_port
from test_train import rel_diff

ROOT = Path(__file__).resolve().parent.parent


# One torch thread per rank, as launch_ranks gives them: two ranks of two threads each spin
# against each other on 2 cores (torchrun sets it itself only for --nproc above 1).
ONE_THREAD = dict(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def standalone_port() -> list[str]:
    """The ranks' port under one-node torchrun (--standalone): by default the one after torchrun's
    own, which the kernel picks and no free_port claim protects from a suite running beside."""
    return ["--master_port", str(free_port())]


def torchrun(args: list[str], out: Path, *mlora_args: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable, **ONE_THREAD)
    return subprocess.Popen(["bash", str(ROOT / "launch" / "torchrun.sh"), *args, "--", "--output_dir", str(out),
                             "--no_progress", "--device", "cpu", *mlora_args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def check_same(out: Path, single_out: Path) -> None:
    for name in ("p0", "p1"):
        assert rel_diff(load_file(out / name / "adapter_model.safetensors"),
                        load_file(single_out / name / "adapter_model.safetensors")) <= 1e-5


def test_torchrun_one_node(tmp_path, pipe_model, single_runs):
    _, cfg, single_out = single_runs(2)
    proc = torchrun(["--nproc", "2", "--balance", "3 4", "--base_model", str(pipe_model), "--config", str(cfg)],
                    tmp_path / "out", *standalone_port())
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    check_same(tmp_path / "out", single_out)


def test_torchrun_two_nodes_on_one_host(tmp_path, pipe_model, single_runs):
    _, cfg, single_out = single_runs(2)
    endpoint = f"127.0.0.1:{free_port(span=2)}"  # (the ranks meet at the port after the rendezvous')
    procs = [torchrun(["--nproc", "1", "--nnodes", "2", "--node_rank", str(n), "--rdzv_endpoint", endpoint,
                       "--balance", "2 2", "--base_model", str(pipe_model), "--config", str(cfg)], tmp_path / "out")
             for n in (0, 1)]
    for p in procs:
        output, _ = p.communicate(timeout=240)
        assert p.returncode == 0, output[-3000:]
    check_same(tmp_path / "out", single_out)


def test_manual_two_ranks(tmp_path, pipe_model, single_runs):
    """Under the interpreter PYTHON names (it ran python3, which need not be the one that has
    mlora and torch)."""
    _, cfg, single_out = single_runs(2)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable, BASE=str(pipe_model), CONFIG=str(cfg),
               BALANCE="3 4", DEVICE_PREFIX="cpu", MASTER_PORT=str(free_port()), **ONE_THREAD)
    proc = subprocess.run(["bash", str(ROOT / "launch" / "manual.sh"), "--output_dir", str(tmp_path / "out"),
                           "--no_progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    check_same(tmp_path / "out", single_out)


def one_process_eval(base: Path, cfg: Path, out: Path) -> list[dict]:
    import json

    proc = subprocess.run([sys.executable, "-m", "mlora", "eval", "--base_model", str(base), "--config", str(cfg),
                           "--output_dir", str(out), "--device", "cpu", "--no_progress"],
                          capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def assert_same_eval(stdout: str, single: list[dict]) -> None:
    import json

    import pytest

    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [list(m) for m in lines] == [list(s) for s in single]
    assert [(m["adapter"], m["tokens"], m["weights"]) for m in lines] == \
        [(s["adapter"], s["tokens"], s["weights"]) for s in single]
    assert [m["loss"] for m in lines] == pytest.approx([s["loss"] for s in single], rel=1e-5)


@pytest.mark.slow
def test_torchrun_eval_one_node(pipe_model, single_runs):
    """launch/torchrun.sh --command eval: rank and world from torchrun's environment; the only
    lines on stdout are rank 0's, those one-process eval prints."""
    _, cfg, single_out = single_runs(2)
    single = one_process_eval(pipe_model, cfg, single_out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "--command", "eval", "--nproc", "2",
                           "--balance", "3 4", "--base_model", str(pipe_model), "--config", str(cfg), "--",
                           "--output_dir", str(single_out), "--no_progress", "--device", "cpu", *standalone_port()],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_eval(proc.stdout, single)


@pytest.mark.slow
def test_manual_eval_two_ranks(pipe_model, single_runs):
    """launch/manual.sh with COMMAND=eval."""
    _, cfg, single_out = single_runs(2)
    single = one_process_eval(pipe_model, cfg, single_out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable, BASE=str(pipe_model), CONFIG=str(cfg),
               BALANCE="3 4", DEVICE_PREFIX="cpu", MASTER_PORT=str(free_port()), COMMAND="eval")
    proc = subprocess.run(["bash", str(ROOT / "launch" / "manual.sh"), "--output_dir", str(single_out),
                           "--no_progress"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_eval(proc.stdout, single)


def one_process_generate(base: Path, cfg: Path, out: Path, *flags: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "mlora", "generate", "--base_model", str(base), "--config", str(cfg),
                           "--output_dir", str(out), "--device", "cpu", *flags],
                          capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


GENERATE_FLAGS = ["--prompt", "hi", "--prompt", "count to three", "--base", "--max_new_tokens", "6",
                  "--repetition_penalty", "1.5"]


@pytest.mark.slow
def test_torchrun_generate_one_node(pipe_model, single_runs):
    """launch/torchrun.sh --command generate: rank 0's lines are one-process generate's, the
    only lines on stdout."""
    _, cfg, single_out = single_runs(2)
    single = one_process_generate(pipe_model, cfg, single_out, *GENERATE_FLAGS)
    assert len(single.splitlines()) == 4
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "--command", "generate", "--nproc", "2",
                           "--balance", "3 4", "--base_model", str(pipe_model), "--config", str(cfg), "--",
                           "--output_dir", str(single_out), "--device", "cpu", *GENERATE_FLAGS, *standalone_port()],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == single


@pytest.mark.slow
def test_torchrun_generate_reads_the_prompt_file_once_on_rank_0(tmp_path, pipe_model, single_runs):
    """`--prompt_file /dev/stdin` under torchrun: both ranks inherit the one stdin; rank 0 alone
    reads it (each rank read it, and one found it empty) and prints one process's lines."""
    import json

    _, cfg, single_out = single_runs(2)
    rows = "".join(json.dumps({"instruction": text, "output": "x"}) + "\n" for text in ("say hi", "count to three"))
    data = tmp_path / "prompts.jsonl"
    data.write_text(rows)
    flags = ["--base", "--max_new_tokens", "6"]
    single = one_process_generate(pipe_model, cfg, single_out, "--prompt_file", str(data), *flags)
    assert len(single.splitlines()) == 4  # (2 rows, 2 adapters; base_output in each line)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "--command", "generate", "--nproc", "2",
                           "--balance", "3 4", "--base_model", str(pipe_model), "--config", str(cfg), "--",
                           "--output_dir", str(single_out), "--device", "cpu", "--prompt_file", "/dev/stdin", *flags,
                           *standalone_port()],
                          input=rows, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == single


@pytest.mark.slow
def test_manual_generate_two_ranks(pipe_model, single_runs):
    """launch/manual.sh with COMMAND=generate."""
    _, cfg, single_out = single_runs(2)
    single = one_process_generate(pipe_model, cfg, single_out, *GENERATE_FLAGS)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable, BASE=str(pipe_model), CONFIG=str(cfg),
               BALANCE="3 4", DEVICE_PREFIX="cpu", MASTER_PORT=str(free_port()), COMMAND="generate")
    proc = subprocess.run(["bash", str(ROOT / "launch" / "manual.sh"), "--output_dir", str(single_out),
                           *GENERATE_FLAGS], capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == single


@pytest.mark.parametrize("args, message", [
    (["--base_model", "m", "--config", "c", "--command"], "--command needs a value"),
    (["--base_model", "m", "--config"], "--config needs a value"),
    (["--base_model", "m", "--config", "c", "--command", "serve"], "--command must be train, eval or generate"),
    (["--config", "c"], "--base_model and --config are required"),
    (["--base_model", "m", "--config", "c", "--nnodes", "two"],
     "--nnodes must be a number of nodes (or MIN:MAX), not two"),
    (["--base_model", "m", "--config", "c", "--nnodes", "0"], "--nnodes must be a number of nodes (or MIN:MAX), not 0"),
    (["--base_model", "m", "--config", "c", "--nnodes", "2", "--node_rank", "-1"],
     "--node_rank must be a whole number, not -1"),
])
def test_torchrun_script_bad_options_are_one_line(args, message):
    """(A value-less last option was bash's "unbound variable" under set -u.)"""
    done = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON="false"), cwd=ROOT)
    assert done.returncode == 2 and done.stderr.strip() == f"launch/torchrun.sh: {message}" + (
        "" if "--command must be" not in message else ", not serve"), done.stderr


@pytest.mark.parametrize("script", ["manual.sh", "torchrun.sh"])
@pytest.mark.parametrize("case", ["python3 without mlora", "python3 with mlora", "through a link"])
def test_scripts_choose_their_python(tmp_path, script, case):
    """Without PYTHON the scripts run this checkout's .venv/bin/python (make setup's), not the
    first python3 on PATH where it has no mlora (a make-setup user's: 'No module named torch');
    but one that has mlora (an activated environment mlora was pip-installed into) wins over a
    .venv in the checkout, which it was silently overruled by. Run through a link to it
    (~/bin/x -> launch/x), a script looked for .venv beside the link: a ~/.venv of another
    project."""
    venv_python = ROOT / ".venv" / "bin" / "python"
    if not venv_python.exists():
        pytest.skip("no .venv in this checkout (make setup makes it)")
    fake = tmp_path / "bin"
    fake.mkdir()
    # a python3 without mlora fails; one with it is this interpreter, saying it ran
    run_on = f"exec {sys.executable} \"$@\"" if case == "python3 with mlora" else "exit 3"
    (fake / "python3").write_text(f"#!/bin/sh\necho 'the python3 on PATH ran' >&2\n{run_on}\n")
    (fake / "python3").chmod(0o755)
    script_path = ROOT / "launch" / script
    if case == "through a link":  # (beside the link, a .venv whose python is not the checkout's)
        (tmp_path / "launch").mkdir()
        (tmp_path / "launch" / script).symlink_to(script_path)
        script_path = tmp_path / "launch" / script
        (tmp_path / ".venv" / "bin").mkdir(parents=True)
        (tmp_path / ".venv" / "bin" / "python").write_text("#!/bin/sh\necho 'the wrong .venv ran' >&2\nexit 3\n")
        (tmp_path / ".venv" / "bin" / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "TORCHRUN")}
    env.update(PATH=f"{fake}:{env['PATH']}", HF_HUB_OFFLINE="1", **ONE_THREAD)
    missing = str(tmp_path / "missing.json")
    if script == "manual.sh":
        cmd, env = ["bash", str(script_path)], dict(env, BASE=str(tmp_path), CONFIG=missing, BALANCE="1",
                                                   DEVICE_PREFIX="cpu")
    else:  # (torchrun's own agent runs under the same interpreter)
        cmd = ["bash", str(script_path), "--base_model", str(tmp_path), "--config", missing]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert ("the python3 on PATH ran" in done.stderr) == (case == "python3 with mlora"), done.stderr
    assert "the wrong .venv ran" not in done.stderr
    assert done.returncode != 0 and f"mlora: error: {missing}: config file not found" in done.stderr, done.stderr


@pytest.mark.slow
def test_manual_without_balance_splits_over_nproc(pipe_model, single_runs):
    """Without BALANCE, NUM_RANKS ranks each get --world_size and compute the same split, the one
    plan_stages makes without a balance (seen here through each rank's dry run of its stage)."""
    import json

    from mlora.pipeline.run import plan_stages

    _, cfg, _ = single_runs(2)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable, BASE=str(pipe_model), CONFIG=str(cfg),
               NUM_RANKS="2", DEVICE_PREFIX="cpu", **ONE_THREAD)
    env.pop("BALANCE", None)
    proc = subprocess.run(["bash", str(ROOT / "launch" / "manual.sh"), "--dry_run", "--no_progress"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = sorted((stage for line in proc.stdout.splitlines() for stage in json.loads(line)["stages"]),
                    key=lambda stage: stage["rank"])
    assert [stage["rank"] for stage in stages] == [0, 1]
    assert [stage["modules"] for stage in stages] == plan_stages(str(pipe_model), 2, None)


@pytest.mark.parametrize("env, split", [
    (dict(NUM_RANKS="3"), "--world_size 3"),
    (dict(BALANCE="1 2"), "--balance 1 2"),
    (dict(BALANCE=" 1  2 ", NUM_RANKS="2"), "--balance 1 2"),
    (dict(), "--world_size 2"),  # one rank per GPU that nvidia-smi lists
    (dict(CUDA_VISIBLE_DEVICES="1"), "--world_size 1"),  # ... or that CUDA_VISIBLE_DEVICES leaves
    (dict(CUDA_VISIBLE_DEVICES="GPU-a,GPU-b,GPU-c"), "--world_size 3"),
])
def test_manual_script_ranks(tmp_path, env, split):
    """What each rank is told: its rank and device, and the split: BALANCE's, else the world
    size (NUM_RANKS's, else the GPUs') from which every rank computes the same split."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: H200 (UUID: a)'\necho 'GPU 1: H200 (UUID: b)'\n")
    (fake / "python").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/rank.$6\n")
    for tool in fake.iterdir():
        tool.chmod(0o755)
    base = {k: v for k, v in os.environ.items()
            if k not in ("BALANCE", "NUM_RANKS", "DEVICE_PREFIX", "CUDA_VISIBLE_DEVICES")}
    done = subprocess.run(["bash", str(ROOT / "launch" / "manual.sh"), "--no_progress"], capture_output=True,
                          text=True, timeout=60,
                          env=dict(base, PATH=f"{fake}:{base['PATH']}", PYTHON=str(fake / "python"), BASE="b",
                                   CONFIG="c", MASTER_PORT="29999", **env))
    assert done.returncode == 0, done.stderr
    ranks = sorted(tmp_path.glob("rank.*"))
    assert [r.read_text() for r in ranks] == [
        f"-m mlora train --pipeline --rank {rank} --device cuda:{rank} {split} --transport torch "
        f"--master_addr 127.0.0.1 --master_port 29999 --base_model b --config c --no_progress\n"
        for rank in range(len(ranks))]
    assert len(ranks) == (int(split.split()[-1]) if "world" in split else len(split.split()) - 1)


@pytest.mark.parametrize("env, message", [
    (dict(BALANCE="1 2", NUM_RANKS="3"), 'BALANCE "1 2" has 2 entries, one per rank, but NUM_RANKS is 3'),
    (dict(NUM_RANKS="0"), "NUM_RANKS must be a positive whole number, not 0"),
    (dict(NUM_RANKS="two"), "NUM_RANKS must be a positive whole number, not two"),
    (dict(), "no GPU found (nvidia-smi --list-gpus); set NUM_RANKS to the number of ranks, or BALANCE"),
    (dict(CUDA_VISIBLE_DEVICES=""),
     "CUDA_VISIBLE_DEVICES leaves no GPU; set NUM_RANKS to the number of ranks, or BALANCE"),
])
def test_manual_script_bad_ranks_are_one_line(tmp_path, env, message):
    """launch/manual.sh refuses a rank count it cannot use in one line, before any rank starts
    (no GPU here: nvidia-smi is made to list none)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (fake / "nvidia-smi").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("BALANCE", "NUM_RANKS", "CUDA_VISIBLE_DEVICES")}
    done = subprocess.run(["bash", str(ROOT / "launch" / "manual.sh")], capture_output=True, text=True,
                          env=dict(base, PATH=f"{fake}:{base['PATH']}", BASE="x", CONFIG="y", **env), timeout=60)
    assert done.returncode == 2 and done.stderr == f"launch/manual.sh: {message}\n", done.stderr


FAKE_RANK = """
import signal, sys, time
from pathlib import Path
rank = sys.argv[sys.argv.index("--rank") + 1]
out = Path(sys.argv[sys.argv.index("--output_dir") + 1])
(out / f"ready.{rank}").write_text(str(signal.getsignal(signal.SIGINT) is signal.SIG_IGN))
try:
    time.sleep(60)
except KeyboardInterrupt:  # (a rank stopping at a checkpoint takes a while to write it)
    time.sleep(1)
    (out / f"stopped.{rank}").write_text("")
    sys.exit(130)
"""


def test_manual_script_ctrl_c_stops_every_rank_and_waits_for_them(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) reaches every rank the script started:
    a background command of a script would ignore it and train on after the script ended. The
    script waits for the ranks to stop and exits with their status."""
    import signal
    import time

    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nshift 2\nexec {sys.executable} {tmp_path / 'rank.py'} \"$@\"\n")
    fake.chmod(0o755)
    (tmp_path / "rank.py").write_text(FAKE_RANK)
    script = subprocess.Popen(["bash", str(ROOT / "launch" / "manual.sh"), "--output_dir", str(tmp_path)],
                              env=dict(os.environ, PYTHON=str(fake), BASE="b", CONFIG="c", NUM_RANKS="2"),
                              start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("ready.*"))) < 2:
            assert time.monotonic() < deadline and script.poll() is None, script.communicate()
            time.sleep(0.05)
        assert [p.read_text() for p in sorted(tmp_path.glob("ready.*"))] == ["False", "False"]
        os.killpg(script.pid, signal.SIGINT)  # what Ctrl-C does
        script.communicate(timeout=30)
        assert script.returncode == 130
        assert len(list(tmp_path.glob("stopped.*"))) == 2  # (the script ended after its ranks)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script.pid, signal.SIGKILL)
