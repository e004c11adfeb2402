"""Memory-aware admission in pipeline mode: each stage holds at most as many micro-batches in
flight as the memory model says fit its device (worker.in_flight_bounds), the same bounds on
every rank, or every rank stops with one UserError when a stage cannot hold even one.
The device's free memory is faked per rank (threads named rank<r> by run_threads)."""

from __future__ import annotations

import threading

import pytest
import torch

import mlora.pipeline.worker as worker
from mlora import memory
from mlora.errors import UserError
from mlora.pipeline.plan import check_plan

from test_pipeline import assert_same_as_single, launch_ranks
from test_memory import TINYLLAMA
from test_pipeline_inprocess import run_threads

GiB = 2**30
BALANCE = [3, 2, 2]  # embed+2 layers | 2 layers | norm+head: 1F1B bounds 3, 2, 1


def test_micro_batches_in_flight_counts_activations_per_micro_batch_and_the_rest_once():
    args, parts = TINYLLAMA, ["layer.3", "layer.4", "layer.5"]
    kw = dict(rows=4, seq_len=512, dtype=torch.bfloat16, lora=[(8, ("q_proj", "v_proj"))], parts=parts)
    est = memory.estimate_peak_bytes(args, **kw)
    once = est.total - est.weights - est.activations
    for k in (1, 2, 5):
        free = once + k * est.activations  # exactly k fit in fraction 1
        fit = memory.micro_batches_in_flight(args, free_bytes=free, fraction=1.0, **kw)
        assert (fit.fits, fit.per_micro_batch, fit.once, fit.need(k)) == (k, est.activations, once, free)
        assert memory.micro_batches_in_flight(args, free_bytes=free - 1, fraction=1.0, **kw).fits == k - 1
    assert memory.micro_batches_in_flight(args, free_bytes=once, fraction=1.0, **kw).fits == 0
    assert memory.micro_batches_in_flight(args, free_bytes=(once + 3 * est.activations) / 0.9, **kw).fits == 3


def peak_in_flight(actions) -> int:
    live = peak = 0
    for a in actions:
        live += 1 if a.op == "F" else -1
        peak = max(peak, live)
    return peak


def thread_rank() -> int:
    return int(threading.current_thread().name.removeprefix("rank"))


@pytest.fixture
def fake_device(monkeypatch):
    """free[rank]: what device_free_bytes says on that rank; fits[rank]: the InFlightFit it got;
    plans[rank]: (max_in_flight, plan) of every build_plan call there."""
    free, fits, plans = {}, {}, {}
    real_fit, real_plan = memory.micro_batches_in_flight, worker.build_plan

    def fit(*args, **kwargs):
        fits[thread_rank()] = real_fit(*args, **kwargs)
        return fits[thread_rank()]

    def plan(num_stages, streams, costs=None, max_in_flight=None, candidate_num=None):
        result = real_plan(num_stages, streams, costs, max_in_flight, candidate_num)
        plans.setdefault(thread_rank(), []).append((max_in_flight, result))
        check_plan(result, streams, max_in_flight, candidate_num)
        return result

    monkeypatch.setattr(memory, "device_free_bytes", lambda device: free[thread_rank()])
    monkeypatch.setattr(memory, "micro_batches_in_flight", fit)
    monkeypatch.setattr(worker, "build_plan", plan)
    return free, fits, plans


def test_stage_bounds_follow_free_memory_and_training_is_unchanged(tmp_path, pipe_model, single_runs, fake_device,
                                                                   capsys):
    free, fits, plans = fake_device
    _, cfg, single_out = single_runs(2)
    capsys.readouterr()
    # (a) ample memory: 1F1B's bounds, and stage 0 does hold several micro-batches at once
    free.update({r: 1000 * GiB for r in range(3)})
    run_threads(pipe_model, cfg, tmp_path / "ample", 3, BALANCE)
    assert {r: [b for b, _ in plans[r]] for r in range(3)} == {r: [[3, 2, 1]] for r in range(3)}
    default_plan = plans[0][0][1]
    assert peak_in_flight(default_plan.stages[0]) == 3
    assert "lowered" not in capsys.readouterr().err
    # (b) room for just one micro-batch (and a half) on stage 0: its bound is 1 on every rank
    f = fits[0]
    free[0] = int((f.once + 1.5 * f.per_micro_batch) / 0.9)
    plans.clear()
    run_threads(pipe_model, cfg, tmp_path / "tight", 3, BALANCE)
    assert fits[0].fits == 1 and fits[1].fits > 2
    assert {r: [b for b, _ in plans[r]] for r in range(3)} == {r: [[1, 2, 1]] for r in range(3)}
    assert plans[0][0][1] == plans[1][0][1] == plans[2][0][1] != default_plan
    assert peak_in_flight(plans[0][0][1].stages[0]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "lowered" in line]
    assert len(lines) == 1 and "stage 0: 1 (1F1B: 3;" in lines[0] and "stage 1" not in lines[0], err
    assert_same_as_single(single_out, tmp_path / "tight", 2)


def test_a_stage_without_room_for_one_micro_batch_stops_every_rank(tmp_path, pipe_model, single_runs, fake_device):
    free, _, plans = fake_device
    _, cfg, _ = single_runs(2)
    free.update({0: 1000 * GiB, 1: 2**20, 2: 1000 * GiB})  # 1 MiB: below even the fixed workspace
    errors = run_threads(pipe_model, cfg, tmp_path / "out", 3, BALANCE, allow_errors=True)
    assert sorted(r for r, _ in errors) == [0, 1, 2] and not plans  # before any plan is built
    messages = {str(e) for _, e in errors}
    assert all(isinstance(e, UserError) for _, e in errors) and len(messages) == 1
    message = messages.pop()
    assert "\n" not in message and "rank 1 (layer.2..layer.3)" in message and "rank 0" not in message
    assert "1 MiB free" in message
    for fix in ("micro_batch_size", "cutoff_len", "recompute", "more stages"):
        assert fix in message


# device_free_bytes faked in real processes: 1 MiB on rank 1, plenty elsewhere.
FAKE_FREE = ("import sys; import mlora.memory as m; rank = sys.argv[sys.argv.index('--rank') + 1]; "
             "m.device_free_bytes = lambda device: 2**20 if rank == '1' else 2**40; "
             "from mlora.cli import main; sys.exit(main(sys.argv[1:]))")


def test_every_process_exits_with_the_one_line_error(tmp_path, pipe_model, single_runs):
    _, cfg, _ = single_runs(2)
    results = launch_ranks(pipe_model, cfg, tmp_path / "out", 2, "zmq", [4, 3], entry=("-c", FAKE_FREE),
                           timeout=120)
    for r in results:
        assert r.returncode == 2, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        lines = [line for line in r.stderr.splitlines() if line.startswith("mlora:")]
        assert len(lines) == 1 and lines[0].startswith("mlora: error: not even one micro-batch"), r.stderr
        assert "rank 1 (layer.3..head)" in lines[0]
