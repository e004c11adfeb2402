"""The pipeline worker driven in one process: each rank is a thread, and a queue stands in for
the network. Fast enough to cover many (ranks, adapters, balance) combinations in the default
suite; the real transports are covered by test_pipeline.py with real processes."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mlora.errors import PipelineError
from mlora.loader import load_model
from mlora.lora import inject_lora
from mlora.metrics import read_metrics
from mlora.pipeline.run import plan_stages
from mlora.pipeline.worker import StageWorker, check_same_everywhere, fingerprint
from mlora.session import open_session

from test_pipeline import NUM_LAYERS, assert_same_as_single, pipe_model, single_runs, write_config  # noqa: F401
from test_train import rel_diff


class QueueTransport:
    """In-memory stand-in for mlora.pipeline.transport: FIFO per (src, dst) pair."""

    def __init__(self, rank: int, world: int, hub: dict):
        self.rank, self.world_size, self.hub = rank, world, hub

    def send(self, dst, header, tensors=()):
        # Copies, as a network would: the receiver must not share the sender's autograd graph.
        self.hub[(self.rank, dst)].put((dict(header), [t.detach().clone() for t in tensors]))

    def recv(self, src):
        try:
            return self.hub[(src, self.rank)].get(timeout=60)
        except queue.Empty:
            raise PipelineError(f"rank {src} was lost (test timeout)") from None

    def exchange(self, value):
        self.hub["gather"][self.rank] = value
        self.hub["barrier"].wait(timeout=60)
        return [self.hub["gather"][r] for r in range(self.world_size)]

    def close(self):
        pass


def run_threads(base: Path, cfg: Path, out: Path, world: int, balance):
    stages = plan_stages(str(base), world, balance)
    hub = {(a, b): queue.Queue() for a in range(world) for b in range(world)}
    hub["gather"], hub["barrier"] = {}, threading.Barrier(world)
    errors = []

    def rank_main(rank):
        try:
            session = open_session(base, cfg, output_dir=str(out), device="cpu", load_base=False)
            transport = QueueTransport(rank, world, hub)
            check_same_everywhere(transport, fingerprint(session, stages, "queue"))
            session.model = load_model(session.base_dir, session.device, session.dtype, parts=stages[rank])
            session.wrappers = inject_lora(session.model, session.layout)
            StageWorker(session, transport, progress=False).run()
        except BaseException as err:  # reported to the test thread
            errors.append((rank, err))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return stages


CASES = [(1, 2, None), (2, 1, [4, 3]), (2, 4, [1, 3]), (3, 2, [1, 1, 2]), (3, 4, [2, 2, 3]), (4, 4, None)]


@pytest.mark.parametrize("world,adapters,balance", CASES,
                         ids=[f"{w}ranks-{a}adapters-{b}" for w, a, b in CASES])
def test_threaded_pipeline_equals_single_process(tmp_path, pipe_model, single_runs, world, adapters, balance):
    _, cfg, single_out = single_runs(adapters)
    run_threads(pipe_model, cfg, tmp_path / "out", world, balance)
    assert_same_as_single(single_out, tmp_path / "out", adapters)


def test_threaded_pipeline_checkpoints(tmp_path, pipe_model, single_runs):
    _, cfg, single_out = single_runs(2, save_step=2)
    run_threads(pipe_model, cfg, tmp_path / "out", 3, [3, 2, 2])
    for name in ("p0", "p1"):
        single = sorted(p.name for p in (single_out / name).glob("checkpoint-*"))
        mine = sorted(p.name for p in (tmp_path / "out" / name).glob("checkpoint-*"))
        assert mine == single and mine
        for ckpt in mine:
            assert rel_diff(load_file(tmp_path / "out" / name / ckpt / "adapter_model.safetensors"),
                            load_file(single_out / name / ckpt / "adapter_model.safetensors")) <= 1e-5
    assert any(m.get("kind") == "pipeline_stage" for m in read_metrics(tmp_path / "out" / "metrics.jsonl"))
