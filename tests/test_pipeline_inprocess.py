"""The pipeline worker driven in one process: each rank is a thread, and a queue stands in for
the network. Fast enough to cover many (ranks, adapters, balance) combinations in the default
suite; the real transports are covered by test_pipeline.py with real processes, and here by
threads joined over a real transport (run_threads' `transport`) where what is tested is what
survives msgpack and the sockets: about a second a run, where two processes take about fifteen
(each imports torch and loads its stage)."""

from __future__ import annotations

import re
import queue
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlora.errors import PipelineError
from mlora.metrics import read_metrics
from mlora.pipeline.run import plan_stages, start_stage
from mlora.pipeline.transport import connect
from mlora.pipeline.worker import check_same_everywhere, fingerprint
from mlora.session import open_session

from conftest import free_port
from test_memory import cublas_out_of_memory
from test_pipeline import NUM_LAYERS, assert_same_as_single, write_config
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
        everyone = [self.hub["gather"][r] for r in range(self.world_size)]
        self.hub["barrier"].wait(timeout=60)  # no rank writes the next round before all have read
        return everyone

    def close(self):
        pass


def run_threads(base: Path, cfg: Path, out: Path, world: int, balance, quant=None, allow_errors=False,
                dtype: str | None = None, transport: str = "queue", signals: dict | None = None):
    """Every rank in a thread named rank<r>; returns the stages, or with allow_errors the
    (rank, exception) of the ranks that failed. dtype: as `--dtype` (default fp32 on the CPU).
    transport: "queue" (QueueTransport), or "torch" or "zmq": the ranks join on 127.0.0.1 as
    separate processes would, and every message is serialized and sent. signals: {rank: a
    trainer.SignalFlag stand-in} (threads receive no signals)."""
    stages = plan_stages(str(base), world, balance)
    hub = {(a, b): queue.Queue() for a in range(world) for b in range(world)}
    hub["gather"], hub["barrier"] = {}, threading.Barrier(world)
    port = free_port()
    errors = []

    def rank_main(rank):
        link = None
        try:
            session = open_session(base, cfg, output_dir=str(out), device="cpu", quant=quant, load_base=False,
                                   dtype=dtype)
            link = (QueueTransport(rank, world, hub) if transport == "queue" else
                    connect(transport, rank, world, "127.0.0.1", port, session.device, peer_timeout=20,
                            connect_timeout=60))
            check_same_everywhere(link, fingerprint(session, stages, transport))
            start_stage(session, stages[rank], link, progress=False, signals=(signals or {}).get(rank)).run()
        except BaseException as err:  # reported to the test thread
            errors.append((rank, err))
        finally:
            if link is not None:
                link.close()

    threads = [threading.Thread(target=rank_main, args=(r,), name=f"rank{r}") for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    if allow_errors:
        return errors
    assert not errors, errors
    return stages


CASES = [(1, 2, None), (2, 1, [4, 3]), (2, 4, [1, 3]), (3, 2, [1, 1, 2]), (3, 4, [2, 2, 3]), (4, 4, None),
         (2, 2, [1, 6])]  # [1, 6]: rank 0 holds the embedding alone (nothing to train there)


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


def test_trains_from_converted_bin_shards_single_and_pipeline(tmp_path, tokenizer_dir):
    """trans_to_safetensors turns .bin shards into a base that mlora trains from, in
    single-process and pipeline mode, with the same result."""
    from conftest import make_tiny_model
    from mlora.cli import main
    from test_trans_to_safetensors import conv, save_bin

    src = make_tiny_model(tmp_path / "src", "llama", tokenizer_dir, num_hidden_layers=NUM_LAYERS,
                          tie_word_embeddings=True)
    bins = save_bin(src, tmp_path / "bins", shard_bytes=120_000)
    assert conv.main(["--model_path", str(bins)]) == 0
    assert (bins / "model.safetensors.index.json").is_file()
    cfg = write_config(tmp_path, 2, tmp_path / "single")
    assert main(["train", "--base_model", str(bins), "--config", str(cfg), "--no_progress"]) == 0
    run_threads(bins, cfg, tmp_path / "pipe", 2, [3, 4])
    assert_same_as_single(tmp_path / "single", tmp_path / "pipe", 2)


@pytest.mark.parametrize("flag", ["--load_4bit", "--load_8bit"])
def test_quantized_pipeline_equals_quantized_single_process(tmp_path, pipe_model, flag):
    """Each rank quantizes only its slice; bitsandbytes quantizes a weight the same way
    wherever it is, so a 2-rank 4-bit (8-bit) run equals the single-process one."""
    from mlora.cli import main
    from mlora.quant import QuantConfig

    cfg = write_config(tmp_path, 2, tmp_path / "single")
    assert main(["train", "--base_model", str(pipe_model), "--config", str(cfg), "--no_progress", flag]) == 0
    quant = QuantConfig(bits=4) if flag == "--load_4bit" else QuantConfig(bits=8)
    run_threads(pipe_model, cfg, tmp_path / "pipe", 2, [3, 4], quant=quant)
    assert_same_as_single(tmp_path / "single", tmp_path / "pipe", 2)


def test_pipeline_applies_lora_dropout(tmp_path, pipe_model, single_runs):
    """Stages run in training mode: with dropout > 0 the result must move away from the
    dropout-0 run (a stage left in eval mode would silently train without dropout)."""
    import json

    _, cfg_path, single_out = single_runs(2)
    cfg = json.loads(cfg_path.read_text())
    for adapter in cfg["lora"]:
        adapter["dropout"] = 0.3
    dropped = tmp_path / "dropout.json"
    dropped.write_text(json.dumps(cfg))
    run_threads(pipe_model, dropped, tmp_path / "out", 2, [3, 4])
    for name in ("p0", "p1"):
        assert rel_diff(load_file(tmp_path / "out" / name / "adapter_model.safetensors"),
                        load_file(single_out / name / "adapter_model.safetensors")) > 1e-3


@pytest.mark.parametrize("world, balance", [(2, [3, 4]), (3, [3, 2, 2])])
def test_pipeline_equals_single_process_with_dropout(tmp_path, pipe_model, world, balance):
    """Dropout 0.3 on three adapters of different lengths and padding sides: every stage draws
    for its layers what one process draws for them (a generator per adapter and layer), each
    adapter over its own rows (its micro-batch padded alone here, fused with others there)."""
    import json

    from mlora.cli import main

    cfg_path = write_config(tmp_path, 3, tmp_path / "single")
    cfg = json.loads(cfg_path.read_text())
    for adapter in cfg["lora"]:
        adapter["dropout"] = 0.3
    cfg_path.write_text(json.dumps(cfg))
    assert main(["train", "--base_model", str(pipe_model), "--config", str(cfg_path), "--no_progress"]) == 0
    run_threads(pipe_model, cfg_path, tmp_path / "pipe", world, balance)
    assert_same_as_single(tmp_path / "single", tmp_path / "pipe", 3)


def test_pipeline_recompute_equals_no_recompute_with_dropout(tmp_path, pipe_model, single_runs, monkeypatch):
    """Each stage checkpoints its layers; the recomputation runs in a micro-batch's backward,
    after later micro-batches of the same adapter drew their masks, and must still replay
    exactly the masks of its own forward."""
    import json

    import mlora.models.llama as llama

    _, cfg_path, _ = single_runs(2)
    cfg = json.loads(cfg_path.read_text())
    for adapter in cfg["lora"]:
        adapter["dropout"] = 0.3
    outs = {}
    calls = []
    real = llama.checkpointed_layer
    monkeypatch.setattr(llama, "checkpointed_layer", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for recompute in (False, True):
        path = tmp_path / f"recompute_{recompute}.json"
        path.write_text(json.dumps({**cfg, "recompute": recompute}))
        run_threads(pipe_model, path, tmp_path / f"out_{recompute}", 3, [3, 2, 2])
        outs[recompute] = tmp_path / f"out_{recompute}"
        assert bool(calls) == recompute
    for name in ("p0", "p1"):
        assert rel_diff(load_file(outs[True] / name / "adapter_model.safetensors"),
                        load_file(outs[False] / name / "adapter_model.safetensors")) <= 1e-6


def test_pipeline_with_packing_equals_single_process_with_packing(tmp_path, pipe_model, single_runs, monkeypatch):
    """Packed rows travel through the stages with their positions and document ids: a 3-rank
    pipeline with packing trains what one process with packing trains (dropout 0)."""
    import json

    import mlora.pipeline.worker as worker
    from mlora.cli import main

    _, cfg_path, _ = single_runs(2)
    cfg = json.loads(cfg_path.read_text())
    cfg.update(packing=True, cutoff_len=256)
    packed_cfg = tmp_path / "packed.json"
    packed_cfg.write_text(json.dumps({**cfg, "output_dir": str(tmp_path / "single")}))
    assert main(["train", "--base_model", str(pipe_model), "--config", str(packed_cfg), "--no_progress"]) == 0
    rows = []  # (examples, packed rows) of each micro-batch rank 0 fused
    real = worker.fuse
    monkeypatch.setattr(worker, "fuse", lambda parts, pad, pack_len=None: (
        lambda b: (rows.append((len(parts[0].examples), b.input_ids.shape[0])), b)[1])(real(parts, pad, pack_len)))
    run_threads(pipe_model, packed_cfg, tmp_path / "pipe", 3, [3, 2, 2])
    assert any(packed < examples for examples, packed in rows), rows  # rows really were packed
    assert_same_as_single(tmp_path / "single", tmp_path / "pipe", 2)


def test_each_rank_reads_the_device_once_per_optimizer_step(tmp_path, pipe_model, single_runs, monkeypatch):
    """A pipeline rank reads nothing back from its device per micro-batch: the loss count
    comes from rank 0's host, the loss is summed on the device, the attention mask travels as
    runs of real tokens (the left-padded adapter p2 has one), and the busy time comes from
    device events. Each rank reads once per optimizer step of an adapter, its part of the
    gradient norm with (on the last stage) the step's loss; the result is the single
    process's. (A read waits for the device's queue to drain; on a CPU the reads that would
    be device reads are counted where they happen.)"""
    import sys

    from mlora.pipeline import stage_rows
    from mlora.pipeline import worker as worker_module

    reads: dict[str, list[str]] = {}
    host_checks = {"attention_masks", "mask_runs", "position_runs"}  # they read host tensors by design
    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            where = threading.current_thread().name
            if where in reads and sys._getframe(1).f_code.co_name not in host_checks:
                reads[where].append(f"{_name} in {sys._getframe(1).f_code.co_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    run = worker_module.StageWorker.run

    def counted(self):
        reads[threading.current_thread().name] = []
        try:
            return run(self)
        finally:
            reads[threading.current_thread().name + " done"] = reads.pop(threading.current_thread().name)

    monkeypatch.setattr(worker_module.StageWorker, "run", counted)
    head_tokens = []  # (the last stage's head: the trained positions rank 0 sent, one per label token)
    loss_sums = stage_rows.head_loss_sums

    def recorded(model, h, labels, rows, counts, positions):
        head_tokens.append((positions.numel(), sum(counts.values()), h.shape[0] * h.shape[1]))
        return loss_sums(model, h, labels, rows, counts, positions)

    monkeypatch.setattr(stage_rows, "head_loss_sums", recorded)
    _, cfg, single_out = single_runs(3)
    run_threads(pipe_model, cfg, tmp_path / "out", 3, [3, 2, 2])
    assert_same_as_single(single_out, tmp_path / "out", 3)
    assert head_tokens and all(m == labels < tokens for m, labels, tokens in head_tokens), head_tokens
    steps = [m for m in read_metrics(tmp_path / "out" / "metrics.jsonl") if "step" in m and "adapter" in m]
    assert len(steps) > 6
    for rank in range(3):
        assert reads[f"rank{rank} done"] == ["tolist in read_step_figures"] * len(steps), rank


def test_mask_runs_round_trip():
    from mlora.pipeline.worker import mask_from_runs, mask_runs

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    runs = mask_runs(mask)
    assert runs == [[2, 5], [0, 3], [0, 0], [0, 5]]
    assert torch.equal(mask_from_runs(runs, 5), mask)
    assert mask_runs(None) is None and mask_from_runs(None, 5) is None
    with pytest.raises(AssertionError):
        mask_runs(torch.tensor([[1, 0, 1]], dtype=torch.bool))


def test_position_runs_round_trip():
    from mlora.pipeline.worker import position_runs, positions_from_runs

    positions = torch.tensor([2, 3, 4, 9, 11, 12])
    assert position_runs(positions) == [[2, 5], [9, 10], [11, 13]]
    assert torch.equal(positions_from_runs(position_runs(positions)), positions)
    empty = torch.zeros(0, dtype=torch.long)
    assert position_runs(empty) == [] and torch.equal(positions_from_runs([]), empty)


def test_pipeline_init_from_equals_single_process(tmp_path, pipe_model, single_runs):
    """init_from a saved (whole-model) adapter: each stage loads its own layers' tensors and
    leaves the others' to their stages (it used to refuse them as unexpected), and the run
    equals the single process started from the same adapter."""
    import json

    from mlora.cli import main

    _, cfg_path, single_out = single_runs(2)
    cfg = json.loads(cfg_path.read_text())
    for adapter in cfg["lora"]:
        adapter["init_from"] = str(single_out / adapter["name"])
    cfg["output_dir"] = str(tmp_path / "single")
    path = tmp_path / "init_from.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", "--base_model", str(pipe_model), "--config", str(path), "--no_progress"]) == 0
    run_threads(pipe_model, path, tmp_path / "pipe", 3, [3, 2, 2])
    assert_same_as_single(tmp_path / "single", tmp_path / "pipe", 2)
    first = load_file(single_out / "p0" / "adapter_model.safetensors")  # where both started
    assert rel_diff(load_file(tmp_path / "pipe" / "p0" / "adapter_model.safetensors"), first) > 1e-4


def test_pipeline_init_from_refuses_a_tensor_of_no_stage(tmp_path, pipe_model, single_runs):
    """An init_from adapter with a tensor of decoder layer 9 in a 4-layer model: one process
    refuses it as unexpected; a pipeline trained on without it, every stage skipping it as
    another stage's (eval --pipeline refused it already). Every rank refuses it now."""
    import json
    import shutil

    from safetensors.torch import save_file

    from mlora.errors import UserError

    _, cfg_path, single_out = single_runs(2)
    bad = tmp_path / "p0"
    shutil.copytree(single_out / "p0", bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if ".layers.3." in k)
    tensors[key.replace(".layers.3.", ".layers.9.")] = tensors[key].clone()
    save_file(tensors, bad / "adapter_model.safetensors")
    cfg = json.loads(cfg_path.read_text())
    cfg["lora"] = [dict(cfg["lora"][0], init_from=str(bad))]
    path = tmp_path / "init_from.json"
    path.write_text(json.dumps(cfg))
    errors = run_threads(pipe_model, path, tmp_path / "pipe", 2, [3, 4], allow_errors=True)
    assert sorted(rank for rank, _ in errors) == [0, 1], errors
    for _, err in errors:
        assert isinstance(err, UserError) and "unexpected tensor" in str(err) and ".layers.9." in str(err), err


@pytest.mark.parametrize("save_step", [0, 2])
def test_pipeline_eval_step_equals_single_process(tmp_path, pipe_model, save_step):
    """eval_step in pipeline mode (it used to be refused): at drained cuts every rank runs the
    due adapters' test data forward and the last rank logs the eval loss, the records one
    process writes (different eval_step per adapter, the last step included), next to
    save_step checkpoints; training itself is unchanged."""
    import json

    from mlora.cli import main

    from test_train import text_rows, write_jsonl

    cfg_path = write_config(tmp_path, 3, tmp_path / "single", save_step=save_step)
    cfg = json.loads(cfg_path.read_text())
    for i, (adapter, every) in enumerate(zip(cfg["lora"], (2, 4, None))):
        if every:
            adapter["eval_step"] = every
            adapter["test_data"] = write_jsonl(tmp_path / f"test{i}.jsonl", text_rows(5, 20 + i))
            adapter["test_batch_size"] = 2
    cfg_path.write_text(json.dumps(cfg))
    assert main(["train", "--base_model", str(pipe_model), "--config", str(cfg_path), "--no_progress"]) == 0
    run_threads(pipe_model, cfg_path, tmp_path / "pipe", 3, [3, 2, 2])
    assert_same_as_single(tmp_path / "single", tmp_path / "pipe", 3)

    # p2 has no eval_step; p1 takes 6 steps: its last step is evaluated too
    assert assert_same_evals(tmp_path / "single", tmp_path / "pipe") == {"p0": [2, 4], "p1": [4, 6]}
    if save_step:  # no save_best: no best eval loss in a checkpoint, which a resume turning it on
        # would take for a best whose weights were never written
        import torch

        from mlora import checkpoint

        (_, newest), = checkpoint.list_checkpoints(tmp_path / "single")[-1:]
        state = torch.load(newest / "state.pt", weights_only=True)
        assert [saved["best"] for saved in state["adapters"].values()] == [None] * 3
        for rank in range(3):
            (_, newest), = checkpoint.list_checkpoints(tmp_path / "pipe", tag=f"rank{rank}")[-1:]
            assert torch.load(newest / "state.pt", weights_only=True)["best"] == {}, rank


def assert_same_evals(single_out: Path, pipe_out: Path) -> dict[str, list[int]]:
    """The pipeline logged the eval records one process logged: the same adapters, steps and
    eval_tokens, eval_loss to 1e-5. Returns the steps each adapter was evaluated at."""
    def evals(out):
        return sorted((m["adapter"], m["step"], m["eval_tokens"], m["eval_loss"])
                      for m in read_metrics(out / "metrics.jsonl") if "eval_loss" in m)

    single, pipe = evals(single_out), evals(pipe_out)
    assert [r[:3] for r in pipe] == [r[:3] for r in single]
    assert [r[3] for r in pipe] == pytest.approx([r[3] for r in single], rel=1e-5)
    steps = {}
    for name, step, _, _ in single:
        steps.setdefault(name, []).append(step)
    return steps


# eval_step 3: p0 (4 steps) is evaluated at 3 and at its last step, p1 and p2 (6 steps) at 3 and 6;
# p2 pads its test chunks on the left, where the attention mask changes the loss
EVALUATED = {"p0": [3, 4], "p1": [3, 6], "p2": [3, 6]}


def test_one_rank_pipeline_evaluates_as_one_process(tmp_path, pipe_model, single_runs):
    """`mlora train --pipeline` as a single rank that holds the whole model (a balance of all 4
    decoder layers; the default transport): the rank is both first and last, so it builds each
    test chunk and computes its loss itself, and logs the eval records one process logs."""
    from mlora.cli import main

    _, cfg, single_out = single_runs(3, eval_step=3)
    out = tmp_path / "pipe"
    assert main(["train", "--pipeline", "--rank", "0", "--balance", str(NUM_LAYERS), "--device", "cpu",
                 "--master_port", str(free_port()), "--base_model", str(pipe_model), "--config", str(cfg),
                 "--output_dir", str(out), "--no_progress"]) == 0
    assert_same_as_single(single_out, out, 3)
    assert assert_same_evals(single_out, out) == EVALUATED


@pytest.mark.parametrize("transport", ["torch", "zmq"])
def test_pipeline_eval_over_a_real_transport_equals_one_process(tmp_path, pipe_model, single_runs, transport):
    """Test chunks travel as E messages (header with the mask's and the targets' runs, then the
    activation and the labels) through msgpack and the transport's tensor path, which the
    queue of the other eval tests skips."""
    _, cfg, single_out = single_runs(3, eval_step=3)
    run_threads(pipe_model, cfg, tmp_path / "pipe", 2, [3, 4], transport=transport)
    assert_same_as_single(single_out, tmp_path / "pipe", 3)
    assert assert_same_evals(single_out, tmp_path / "pipe") == EVALUATED


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_pipeline_eval_step_skips_what_one_process_skips(tmp_path, pipe_model, policy):
    """An adapter whose steps are skipped (a non-finite gradient) or that on_nan stopped is
    not evaluated after them, in one process as in the pipeline (where a skipped step still
    moves its step count)."""
    import json

    from mlora.cli import main

    from test_train import text_rows, write_jsonl

    cfg_path = write_config(tmp_path, 2, tmp_path / "single")
    cfg = json.loads(cfg_path.read_text())
    cfg["lora"][0].update(alpha=1e30, optim="sgd", lr=1.0, on_nan=policy, max_grad_norm=None, momentum=0.0)
    for i, adapter in enumerate(cfg["lora"]):
        adapter.update(eval_step=2, test_batch_size=2,
                       test_data=write_jsonl(tmp_path / f"test{i}.jsonl", text_rows(3, 20 + i)))
    cfg_path.write_text(json.dumps(cfg))
    assert main(["train", "--base_model", str(pipe_model), "--config", str(cfg_path), "--no_progress"]) == 0
    run_threads(pipe_model, cfg_path, tmp_path / "pipe", 2, [4, 3])

    def evals(out):
        return sorted((m["adapter"], m["step"]) for m in read_metrics(out / "metrics.jsonl") if "eval_loss" in m)

    single = evals(tmp_path / "single")
    assert single and all(name == "p1" for name, _ in single)  # p0 never took a step
    assert evals(tmp_path / "pipe") == single

    def skips(out):  # each skipped step and why, and whether its gradient norm was finite (NaN: null)
        return [(m["adapter"], m["step"], m["reason"], m.get("action"), m["grad_norm"] is not None)
                for m in read_metrics(out / "metrics.jsonl") if m.get("skipped")]

    assert skips(tmp_path / "single") and skips(tmp_path / "pipe") == skips(tmp_path / "single")


@pytest.mark.parametrize("transport", ["queue", "torch", "zmq"])
def test_pipeline_skips_a_non_finite_loss_as_one_process_does(tmp_path, pipe_model, monkeypatch, transport):
    """A NaN loss in every step of one adapter: the last stage, the only rank that sees the
    loss, tells the others, and every rank skips the step as one process does, logged with the
    same reason ("non-finite loss", not "non-finite gradient"); the other adapter trains as in
    one process. Over the real transports the verdict and the (step, norm, loss_ok) triples go
    through msgpack: a B header's loss_ok back to rank 0, then a step's triple forward in the F
    header of the adapter's next micro-batch ("norm"), the last step's in END's "norms", each
    with a NaN norm."""
    import mlora.pipeline.stage_rows
    import mlora.trainer

    def poisoned(real):
        def sums(*args):
            result = real(*args)
            if "p0" in result:
                ce, count = result["p0"]
                result["p0"] = (ce * float("nan"), count)
            return result
        return sums

    monkeypatch.setattr(mlora.trainer, "fused_loss_sums", poisoned(mlora.trainer.fused_loss_sums))
    monkeypatch.setattr(mlora.pipeline.stage_rows, "head_loss_sums",
                        poisoned(mlora.pipeline.stage_rows.head_loss_sums))
    from mlora.cli import main

    cfg_path = write_config(tmp_path, 2, tmp_path / "single")
    assert main(["train", "--base_model", str(pipe_model), "--config", str(cfg_path), "--no_progress"]) == 0
    run_threads(pipe_model, cfg_path, tmp_path / "pipe", 2, [3, 4], transport=transport)

    def skips(out):
        return [(m["adapter"], m["step"], m["reason"], m["action"])
                for m in read_metrics(out / "metrics.jsonl") if m.get("skipped")]

    single = skips(tmp_path / "single")
    assert single and all(name == "p0" and reason == "non-finite loss" for name, _, reason, _ in single)
    assert skips(tmp_path / "pipe") == single
    pipe_p1 = load_file(tmp_path / "pipe" / "p1" / "adapter_model.safetensors")
    assert rel_diff(pipe_p1, load_file(tmp_path / "single" / "p1" / "adapter_model.safetensors")) <= 1e-5


def test_pipeline_leaves_a_step_with_no_token_to_learn_as_one_process_does(tmp_path, pipe_model, capsys):
    """z's steps whose only row has no token to learn: every rank leaves z's weights and
    optimizer state as they were, counts the step and the last stage logs its loss and gradient
    norm as null, as one process does (test_train's test of it); the other adapter trains as in
    one process; rank 0 alone notes z's rows without a token to learn."""
    from mlora.cli import main

    from test_train import assert_same_losses, unlearnable_steps_config

    cfg = unlearnable_steps_config(tmp_path, ["a", "z"], tmp_path / "single")
    assert main(["train", "--base_model", str(pipe_model), "--config", str(cfg), "--no_progress"]) == 0
    capsys.readouterr()
    run_threads(pipe_model, cfg, tmp_path / "pipe", 2, [3, 4])
    assert capsys.readouterr().err.count("mlora: note: adapter 'z': 3 of 5 rows of ") == 1
    for name in ("a", "z"):
        single = [m for m in read_metrics(tmp_path / "single" / "metrics.jsonl") if m.get("adapter") == name
                  and "loss" in m]
        pipe = [m for m in read_metrics(tmp_path / "pipe" / "metrics.jsonl") if m.get("adapter") == name
                and "loss" in m]
        assert [(m["step"], m["tokens"]) for m in pipe] == [(m["step"], m["tokens"]) for m in single]
        assert_same_losses([m["loss"] for m in pipe], [m["loss"] for m in single])
        # (a step with no token to learn has no gradient norm either: null, as its loss)
        assert [m["grad_norm"] is None for m in pipe] == [m["tokens"] == 0 for m in pipe]
        # (z's AdamW magnifies rounding: one process's fused run and its solo run of z, which a
        # pipeline's micro-batches of one adapter each match, differ by 2.0e-5 at checkpoint-4;
        # a step that moved the weights differs by 1e-3 and more)
        for directory in sorted(p.name for p in (tmp_path / "single" / name).iterdir() if p.is_dir()) + [""]:
            assert rel_diff(load_file(tmp_path / "pipe" / name / directory / "adapter_model.safetensors"),
                            load_file(tmp_path / "single" / name / directory / "adapter_model.safetensors")) <= 5e-5
    assert any(m["loss"] is None for m in read_metrics(tmp_path / "pipe" / "metrics.jsonl") if m.get("adapter") == "z")


def test_last_stage_summary_names_every_adapter():
    """The last stage's "last loss" lines name every adapter in the config's order; one that took
    no step with a token to learn (no loss recorded) is "n/a", as one process prints it (it
    was left out)."""
    from mlora.pipeline.run import last_loss_lines

    assert last_loss_lines(["a", "z", "b"], {"b": 0.5, "a": 1.23456}) == [
        "a: last loss 1.2346", "z: last loss n/a", "b: last loss 0.5000"]


def test_segments_cut_at_multiples_of_each_period():
    """Cuts after every multiple of save_step or of an eval_step (not of their gcd: 4 and 6
    would otherwise drain after every second step), none after the last step."""
    from mlora.pipeline.plan import MicroBatchRef
    from mlora.pipeline.worker import segments_of

    streams = {"a": [MicroBatchRef(i, "a", i, True) for i in range(13)],
               "b": [MicroBatchRef(100 + i, "b", i // 2, i % 2 == 1) for i in range(10)]}  # 5 steps
    segments, cuts = segments_of(streams, [4, 6])
    assert cuts == [4, 6, 8, 12]
    assert [[r.step for r in seg.get("a", [])] for seg in segments] == [
        [0, 1, 2, 3], [4, 5], [6, 7], [8, 9, 10, 11], [12]]
    assert [sorted({r.step for r in seg.get("b", [])}) for seg in segments] == [[0, 1, 2, 3], [4], [], [], []]
    assert segments_of(streams, []) == ([streams], [])


def test_ranks_must_agree_on_evaluated_test_data(tmp_path, pipe_model):
    """Every rank walks an evaluated adapter's test rows chunk by chunk: ranks whose test
    data differ are refused at start-up (they would hang or log a partial loss)."""
    import json

    from mlora.pipeline.worker import fingerprint as stage_fingerprint
    from test_train import text_rows, write_jsonl

    prints = []
    for rows in (3, 4):
        cfg_path = write_config(tmp_path, 1, tmp_path / "out")
        cfg = json.loads(cfg_path.read_text())
        cfg["lora"][0].update(eval_step=2, test_data=write_jsonl(tmp_path / f"t{rows}.jsonl", text_rows(rows, 7)))
        cfg["lora"][0]["test_data"] = str(tmp_path / "test.jsonl")
        (tmp_path / "test.jsonl").write_text((tmp_path / f"t{rows}.jsonl").read_text())  # same path, other rows
        cfg_path.write_text(json.dumps(cfg))
        session = open_session(pipe_model, cfg_path, device="cpu", load_base=False)
        prints.append(stage_fingerprint(session, [["embed"]], "queue"))
    assert prints[0]["config"] == prints[1]["config"] and prints[0]["data"] != prints[1]["data"]


def test_ranks_must_agree_on_the_labels_of_their_rows(tmp_path, pipe_model):
    """The same tokens split otherwise into prompt and answer on one host (p0's alpaca rows as
    prompt-completion rows whose prompt takes the answer's first word, in the same file): ranks
    training on them, or evaluating them as test rows, are refused at start-up."""
    import json

    from mlora.pipeline.worker import fingerprint as stage_fingerprint
    from test_train import split_moved, write_jsonl

    cfg_path = write_config(tmp_path, 1, tmp_path / "out")
    cfg = json.loads(cfg_path.read_text())
    data = Path(cfg["lora"][0]["data"])
    cfg["lora"][0]["test_data"] = str(data)
    cfg_path.write_text(json.dumps(cfg))
    moved = split_moved(data, cfg["lora"][0]["prompt"])
    prints, rows = [], []
    for edit in (lambda: None, lambda: write_jsonl(data, moved)):
        edit()
        session = open_session(pipe_model, cfg_path, device="cpu", load_base=False)
        rows.append([(ex.input_ids, ex.labels) for ex in session.data["p0"].train])
        prints.append((stage_fingerprint(session, [["embed"]], "queue"),
                       stage_fingerprint(session, [["embed"]], "queue", evaluating=True)))
    assert [ids for ids, _ in rows[0]] == [ids for ids, _ in rows[1]] and rows[0] != rows[1]
    (train0, eval0), (train1, eval1) = prints
    assert train0["config"] == train1["config"] and train0["data"] != train1["data"]
    assert eval0["config"] == eval1["config"] and eval0["data"] != eval1["data"]


def test_pipeline_candidate_num_admits_adapters_in_turn(tmp_path, pipe_model, single_runs, monkeypatch):
    """train_lora_candidate_num in pipeline mode (it used to be ignored): with 1, every rank's
    plan feeds the adapters one after another in config order, and each still equals its
    single-process result."""
    import json

    import mlora.pipeline.worker as worker

    plans = []

    def recording_build_plan(world, streams, **kwargs):
        plan = worker.build_plan.__wrapped__(world, streams, **kwargs)
        plans.append((plan, streams))
        return plan

    recording_build_plan.__wrapped__ = worker.build_plan
    monkeypatch.setattr(worker, "build_plan", recording_build_plan)
    _, cfg_path, single_out = single_runs(2)
    cfg = json.loads(cfg_path.read_text())
    cfg["train_lora_candidate_num"] = 1
    path = tmp_path / "one_at_a_time.json"
    path.write_text(json.dumps(cfg))
    run_threads(pipe_model, path, tmp_path / "out", 3, [3, 2, 2])
    assert_same_as_single(single_out, tmp_path / "out", 2)
    assert len(plans) == 3  # one per rank, one segment each
    for plan, streams in plans:
        assert plan.feed_order == [mb.id for name in ("p0", "p1") for mb in streams[name]]


def test_gemma4_per_layer_inputs_and_kv_sharing_refuse_stages(tmp_path):
    """Gemma 4 E2B/E4B: every layer's per-layer input comes from the first stage's embedding, and
    a KV-shared layer needs its source layer's keys: --pipeline is refused in one line naming the
    keys, and a stage that would separate them is never built."""
    from dataclasses import replace

    from conftest import GEMMA4_E2B, make_tiny_model
    from mlora.errors import UserError
    from mlora.loader import read_model_config
    from mlora.models.llama import CausalLM, module_sequence

    base = make_tiny_model(tmp_path / "gemma4", "gemma4_text", **GEMMA4_E2B)
    with pytest.raises(UserError, match=r"^--pipeline: this Gemma 4 model's hidden_size_per_layer_input and "
                                        r"num_kv_shared_layers \(E2B/E4B\) are not split into stages"):
        plan_stages(str(base), 2, None)
    _, args = read_model_config(base)
    assert plan_stages(str(base), 1, None) == [module_sequence(args)]  # (one stage: the whole model)
    with pytest.raises(ValueError, match="stage without the embedding"):
        CausalLM(args, ["layer.2", "layer.3"])
    with pytest.raises(ValueError, match="layer 4 shares the keys and values of layer 1"):
        CausalLM(replace(args, per_layer_input_size=0), ["layer.2", "layer.3", "layer.4"])


@pytest.mark.parametrize("family", ["chatglm", "gemma3", "mixtral", "gpt_oss", "deepseek_v3", "qwen3_5", "gemma4",
                                    "qwen3_next", "llama4"])
def test_pipeline_with_other_names_equals_single_process(tmp_path, tokenizer_dir, family):
    """ChatGLM's own tensor names, Gemma 3's image-text layout (its language model's tensors
    and modules under other prefixes, which differ) and Mixtral's experts (block_sparse_moe,
    w1/w3/w2; LoRA on every expert), GPT-OSS's stacked experts (each rank reads its layers'
    slices; their LoRA saved stacked), DeepSeek-V3 (latent attention, shared_experts) and Qwen3.5
    (image-text tensor names, module names of the text model; linear-attention layers), Qwen3-Next
    (fused linear-attention projections, a dense layer among sparse ones), Gemma 4 26B-A4B (its
    experts' stacked tensors and router per layer, LoRA on them, saved stacked, and on the dense
    MLP beside them), Llama 4's
    image-text checkpoint (language_model.model.*, feed_forward, stacked experts read transposed, LoRA
    on the shared experts and dense MLPs, and on the experts, saved stacked): each
    rank reads its layers under the checkpoint's names,
    the ranks' adapter pieces merge into one PEFT file with the model's module names, and the
    run equals one process (an init_from adapter under those names too)."""
    import json

    from conftest import GEMMA4_MOE, make_tiny_model
    from mlora.cli import main

    # (Gemma 4's in 26B-A4B's form: experts beside each layer's dense MLP, both with LoRA)
    base = make_tiny_model(tmp_path / family, family, tokenizer_dir, num_hidden_layers=4,
                           **({"layer_types": ["sliding_attention", "full_attention"] * 2}
                              if family in ("gemma3", "gemma4") else {}), **(GEMMA4_MOE if family == "gemma4" else {}))
    cfg = write_config(tmp_path, 2, tmp_path / "single")
    raw = json.loads(cfg.read_text())
    if family == "chatglm":
        raw["lora"][0]["target_modules"] = ["query_key_value", "dense_4h_to_h"]
        raw["lora"][1]["target_modules"] = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    elif family in ("gemma3", "gemma4"):
        raw["lora"][1]["target_modules"] = ["q_proj", "o_proj", "up_proj", "down_proj"]
        if family == "gemma4":
            raw["lora"][1]["target_modules"] += ["experts.gate_up_proj", "experts.down_proj"]
            # Gemma 4 norms each query, key and value head: the output does not change with a
            # head's scale, so q/k/v_proj's LoRA gets gradients with components near zero, which
            # AdamW divides by their square root and so magnifies fp32 rounding (8e-5 apart on
            # v_proj; SGD: 2e-6)
            for adapter in raw["lora"]:
                adapter.update(optim="sgd")
    elif family == "gpt_oss":
        raw["lora"][1]["target_modules"] = ["q_proj", "o_proj", "gate_up_proj", "down_proj"]
    elif family == "qwen3_5":  # layers 0, 1, 3 linear attention, 2 softmax attention
        raw["lora"][0]["target_modules"] = ["in_proj_qkv", "out_proj"]
        raw["lora"][1]["target_modules"] = ["q_proj", "o_proj", "in_proj_z", "in_proj_b", "up_proj", "down_proj"]
    elif family == "qwen3_next":  # as Qwen3.5's layers; its experts and dense MLP take no LoRA
        raw["lora"][0]["target_modules"] = ["in_proj_qkvz", "out_proj"]
        raw["lora"][1]["target_modules"] = ["q_proj", "o_proj", "in_proj_ba"]
    elif family == "deepseek_v3":  # latent attention; shared_experts named otherwise (no LoRA), a dense layer 0
        raw["lora"][0]["target_modules"] = ["q_b_proj", "kv_b_proj"]
        raw["lora"][1]["target_modules"] = ["q_a_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    elif family == "llama4":  # NoPE and chunked RoPE layers; the MLP targets on the dense MLPs and shared experts,
        # experts.* on the sparse layers' experts
        raw["lora"][0]["target_modules"] = ["q_proj", "v_proj"]
        raw["lora"][1]["target_modules"] = ["q_proj", "o_proj", "up_proj", "down_proj", "experts.gate_up_proj",
                                            "experts.down_proj"]
    else:  # Mixtral's own names of the experts' projections
        raw["lora"][1]["target_modules"] = ["q_proj", "o_proj", "w1", "w3", "w2"]
    cfg.write_text(json.dumps(raw))
    assert main(["train", "--base_model", str(base), "--config", str(cfg), "--no_progress"]) == 0
    run_threads(base, cfg, tmp_path / "pipe", 2, [3, 4])
    # (Gemma 4: 1.03e-5 on q_proj with SGD and momentum, the rounding its normed heads magnify)
    assert_same_as_single(tmp_path / "single", tmp_path / "pipe", 2, tol=3e-5 if family == "gemma4" else 1e-5)
    keys = load_file(tmp_path / "pipe" / "p1" / "adapter_model.safetensors")
    prefix = {"chatglm": "base_model.model.transformer.encoder.layers.",
              "gemma3": "base_model.model.model.language_model.layers.",
              "gemma4": "base_model.model.model.language_model.layers.",
              "mixtral": "base_model.model.model.layers.", "gpt_oss": "base_model.model.model.layers.",
              "deepseek_v3": "base_model.model.model.layers.", "qwen3_5": "base_model.model.model.layers.",
              "qwen3_next": "base_model.model.model.layers.",
              "llama4": "base_model.model.language_model.model.layers."}[family]
    # q_proj, o_proj and three per expert (Mixtral), or one stacked gate_up_proj and down_proj (GPT-OSS)
    per_layer = 2 + 3 * 4 if family == "mixtral" else 6 if family == "gemma4" else 4
    modules = 4 * per_layer
    if family == "deepseek_v3":  # q_a_proj and o_proj in 4 layers, 3 per expert (8) in the 3 sparse layers
        modules = 4 * 2 + 3 * 8 * 3
    if family == "qwen3_5":  # q_proj and o_proj in layer 2, in_proj_z and in_proj_b in the others; the MLP's two
        modules = 2 + 3 * 2 + 4 * 2
    if family == "qwen3_next":  # q_proj and o_proj in layer 2, in_proj_ba in the other three
        modules = 2 + 3
    if family == "llama4":  # and the stacked experts' gate_up_proj and down_proj in the sparse layers 1 and 3
        modules += 2 * 2
    assert len(keys) == modules * 2 and all(k.startswith(prefix) for k in keys)
    if family == "mixtral":
        assert sum(".block_sparse_moe.experts." in k for k in keys) == 4 * 3 * 4 * 2
    if family == "gpt_oss":
        assert sum(".mlp.experts.base_layer.lora_" in k for k in keys) == 4 * 2
    if family == "gemma4":  # (the experts beside the dense MLP: `layers.{i}.experts`, stacked)
        assert sum(re.search(r"layers\.\d+\.experts\.(base_layer\.)?lora_", k) is not None for k in keys) == 4 * 2 * 2
    if family == "llama4":
        assert {re.search(r"layers\.(\d+)\.feed_forward\.experts\.(base_layer\.)?lora_", k)[1]
                for k in keys if ".experts." in k} == {"1", "3"}
    # a trained adapter as init_from: every rank takes its layers' tensors from the one file
    raw["lora"] = [dict(raw["lora"][1], init_from=str(tmp_path / "single" / "p1"), num_epochs=1)]
    cfg.write_text(json.dumps(raw))
    assert main(["train", "--base_model", str(base), "--config", str(cfg), "--no_progress",
                 "--output_dir", str(tmp_path / "single2")]) == 0
    run_threads(base, cfg, tmp_path / "pipe2", 2, [2, 5])
    assert rel_diff(load_file(tmp_path / "pipe2" / "p1" / "adapter_model.safetensors"),
                    load_file(tmp_path / "single2" / "p1" / "adapter_model.safetensors")) <= 1e-5


def test_ranks_of_different_dtypes_are_told_to_pass_the_same_dtype():
    """The default dtype follows each rank's GPU (bf16 from compute capability 8.0, fp16 below),
    so ranks on mixed GPUs disagree unless --dtype is given: the error says so."""
    class Everyone:  # rank 0 was started with `first`, rank 1 (this one) with what it passes
        def __init__(self, first):
            self.first = first

        def exchange(self, mine):
            return [self.first, mine]

    rank0 = {"config": "c", "dtype": "torch.bfloat16"}
    with pytest.raises(PipelineError, match="rank 1 was started with a different dtype than rank 0; "
                                            "pass every rank the same --dtype"):
        check_same_everywhere(Everyone(rank0), {"config": "c", "dtype": "torch.float16"})
    with pytest.raises(PipelineError, match="different config .* same --config, --balance and --base_model"):
        check_same_everywhere(Everyone(rank0), {"config": "d", "dtype": "torch.bfloat16"})
    check_same_everywhere(Everyone(rank0), dict(rank0))


# ------------------------------------------------------------------ mlora eval --pipeline

class ThreadStreams:
    """A stand-in for sys.stdout or sys.stderr that keeps what each thread writes apart (by
    the thread's name): ranks run as threads of this process, and each must be seen alone."""

    def __init__(self):
        self.parts: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.parts.setdefault(threading.current_thread().name, []).append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def text(self, thread: str) -> str:
        with self.lock:
            return "".join(self.parts.get(thread, []))


def run_cli_threads(monkeypatch, argvs: dict[str, list[str]]) -> dict[str, tuple[int, str, str]]:
    """`mlora` (cli.main) once per {thread name: argv}, each in its thread, all at once:
    {name: (exit code, stdout, stderr)}."""
    from mlora.cli import main

    out, err = ThreadStreams(), ThreadStreams()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    codes = {}

    def run(name):
        try:
            codes[name] = main(argvs[name])
        except BaseException as e:  # a traceback: the test names it
            codes[name] = e

    threads = [threading.Thread(target=run, args=(name,), name=name) for name in argvs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    monkeypatch.undo()
    return {name: (codes[name], out.text(name), err.text(name)) for name in argvs}


def eval_argv(base: Path, cfg: Path, out: Path) -> list[str]:
    return ["eval", "--base_model", str(base), "--config", str(cfg), "--output_dir", str(out), "--device", "cpu",
            "--no_progress"]


def run_pipeline_cli(monkeypatch, argvs: list[list[str]], balance: list[int],
                     transport: str) -> list[tuple[int, str, str]]:
    """`mlora` with argvs[r] --pipeline as rank r of len(balance), each rank a thread joined
    over a real transport: each rank's (exit code, stdout, stderr)."""
    port = free_port()
    results = run_cli_threads(monkeypatch, {
        f"rank{r}": [*argv, "--pipeline", "--rank", str(r), "--balance", *map(str, balance), "--transport", transport,
                     "--master_addr", "127.0.0.1", "--master_port", str(port), "--peer_timeout", "20",
                     "--connect_timeout", "60"]
        for r, argv in enumerate(argvs)})
    return [results[f"rank{r}"] for r in range(len(argvs))]


def test_pipeline_fresh_start_over_an_unfinished_run_is_refused_on_every_rank(tmp_path, pipe_model, single_runs,
                                                                              monkeypatch, capsys):
    """As in one process: without --resume, a start that would delete any rank's checkpoints
    of an unfinished run is one line on every rank naming that rank, until --overwrite; and
    ranks must agree on --resume (one resuming beside one starting afresh would exchange out
    of step). A one-process start over a pipeline rank's unfinished part is refused too, and
    --overwrite clears it."""
    from mlora.cli import main

    _, cfg, _ = single_runs(2, save_step=2)
    outs = [tmp_path / "out0", tmp_path / "out1"]  # (as on two hosts)

    def argv(out: Path, *extra: str) -> list[str]:
        return ["train", "--base_model", str(pipe_model), "--config", str(cfg), "--output_dir", str(out),
                "--device", "cpu", "--no_progress", *extra]

    def train(*extra: str, ranks=(0, 1)) -> list[tuple[int, str, str]]:
        return run_pipeline_cli(monkeypatch, [argv(outs[r], *(extra if r in ranks else ())) for r in range(2)],
                                [3, 4], "torch")

    def files() -> dict[Path, bytes]:
        return {p: p.read_bytes() for out in outs for p in out.rglob("*") if p.is_file()}

    assert [code for code, _, _ in train()] == [0, 0]
    (outs[1] / "checkpoints" / "FINISHED-rank1.json").unlink()  # rank 1's part: a run that did not finish
    before = files()
    newest = max(p.name for p in (outs[1] / "checkpoints").glob("iter-*-rank1"))
    line = (f"output_dir {outs[1]} holds an unfinished run (newest checkpoint: {newest}); "
            f"continue it with --resume, or start over with --overwrite (deletes its checkpoints and each "
            f"adapter's best and checkpoint-<step>)")
    assert [(code, err.strip()) for code, _, err in train()] == [(2, f"mlora: error: rank 1: {line}"),
                                                                 (2, f"mlora: error: {line}")]
    assert files() == before
    for code, _, err in train("--resume", ranks=(0,)):
        assert code == 3 and "rank 1 was started with a different --resume than rank 0; start every rank " \
                             "with --resume, or none" in err
    capsys.readouterr()
    assert main(argv(outs[1])) == 2  # one process over the pipeline's part: --resume alone would find none
    assert capsys.readouterr().err.strip() == "mlora: error: " + line.replace(
        "continue it with --resume,", "continue it with --pipeline --resume on every rank,")
    assert files() == before
    assert main(argv(outs[1], "--overwrite")) == 0  # one process's run replaces the pipeline's
    assert not list((outs[1] / "checkpoints").glob("*rank*"))
    assert [code for code, _, _ in train("--overwrite")] == [0, 0]
    assert (outs[1] / "checkpoints" / "FINISHED-rank1.json").is_file()
    assert not (outs[1] / "checkpoints" / "FINISHED.json").exists()  # (the one-process run's, cleared)


def test_a_resume_of_the_wrong_kind_or_world_says_what_the_checkpoints_are(tmp_path, pipe_model, single_runs,
                                                                          monkeypatch, capsys):
    """Each kind of run looks for its own checkpoints: one process for untagged ones, a pipeline
    rank for its own part. Resumed with the other kind, or with more ranks than wrote them,
    each said there was nothing to resume, and a fresh start over them said to continue with
    --resume, which then found nothing. Each line now says what is there and how to resume it."""
    import shutil

    from mlora.cli import main

    _, cfg, single_out = single_runs(2, save_step=2)
    one = tmp_path / "one"  # one process's run, killed after its last checkpoint
    shutil.copytree(single_out, one)
    (one / "checkpoints" / "FINISHED.json").unlink()
    for extra, line in ((("--resume",), "no checkpoint that every rank holds"), ((), "holds an unfinished run")):
        ranks = run_pipeline_cli(monkeypatch, [train_argv(pipe_model, cfg, one, *extra)] * 2, [3, 4], "torch")
        for code, _, err in ranks:
            assert code == 2 and line in one_line(err), err
            assert "--resume, without --pipeline" in one_line(err), err
    piped = tmp_path / "piped"  # a 2-rank pipeline's, killed after its last checkpoint
    ranks = run_pipeline_cli(monkeypatch, [train_argv(pipe_model, cfg, piped)] * 2, [3, 4], "torch")
    assert [code for code, _, _ in ranks] == [0, 0], ranks
    for finished in (piped / "checkpoints").glob("FINISHED-*"):
        finished.unlink()
    capsys.readouterr()
    assert main(train_argv(pipe_model, cfg, piped, "--resume")) == 2
    assert capsys.readouterr().err.strip().endswith(
        "; it holds a pipeline's checkpoints (parts of ranks 0, 1): resume them with --pipeline --resume on every rank")
    assert main(train_argv(pipe_model, cfg, piped)) == 2
    assert "continue it with --pipeline --resume on every rank," in capsys.readouterr().err
    ranks = run_pipeline_cli(monkeypatch, [train_argv(pipe_model, cfg, piped, "--resume")] * 3, [3, 2, 2], "torch")
    for code, _, err in ranks:
        assert code == 2 and one_line(err).endswith(
            "it holds parts of ranks 0, 1 but none of rank 2 of these 3: resume with the ranks and --balance of the "
            "run that wrote them, each rank finding its parts in its output_dir"), err
    assert len(list((piped / "checkpoints").glob("iter-*"))) == 2 * 2  # (nothing deleted)


def test_pipeline_save_total_limit_1_survives_a_kill_between_two_ranks_writes(tmp_path, pipe_model, single_runs,
                                                                              monkeypatch):
    """save_total_limit 1: rank 0 wrote the newest cut and dropped the one before while rank 1 was
    killed before writing it; each rank keeps one part more, so a cut every rank holds remains
    and --resume ends where the uninterrupted run did (with one part each, rank 0 would hold
    only the newest cut and rank 1 only the one before: nothing to resume)."""
    import json
    import shutil

    _, cfg, single_out = single_runs(2, save_step=2)
    limited = tmp_path / "limited.json"
    limited.write_text(json.dumps({**json.loads(cfg.read_text()), "save_total_limit": 1}))
    out = tmp_path / "out"
    argv = train_argv(pipe_model, limited, out)
    assert [code for code, _, _ in run_pipeline_cli(monkeypatch, [argv] * 2, [3, 4], "torch")] == [0, 0]
    root = out / "checkpoints"
    parts = {r: sorted(p.name for p in root.glob(f"iter-*-rank{r}")) for r in range(2)}
    assert [len(parts[r]) for r in range(2)] == [2, 2] and parts[0][0].split("-")[1] == parts[1][0].split("-")[1]
    for r in range(2):
        (root / f"FINISHED-rank{r}.json").unlink()
    shutil.rmtree(root / parts[1][-1])  # killed before it wrote the newest cut: rank 0 alone holds it
    ranks = run_pipeline_cli(monkeypatch, [[*argv, "--resume"]] * 2, [3, 4], "torch")
    assert [code for code, _, _ in ranks] == [0, 0], ranks
    assert_same_as_single(single_out, out, 2)


def pipeline_eval(monkeypatch, base: Path, cfg: Path, outs: list[Path], balance: list[int],
                  transport: str = "torch") -> list[tuple[int, str, str]]:
    """`mlora eval --pipeline` over len(balance) ranks (outs: each rank's --output_dir)."""
    return run_pipeline_cli(monkeypatch, [eval_argv(base, cfg, outs[r]) for r in range(len(balance))], balance,
                            transport)


@pytest.fixture(scope="module")
def eval_job(tmp_path_factory, single_runs):
    """The adapters one process trained (3 of them; p2 pads on the left; 5 test rows in chunks of
    2, so the last chunk has 1 row), a 4th adapter never saved (evaluated on the base), and what
    one-process `mlora eval` prints for them: (config, output_dir, its stdout lines)."""
    import json
    import shutil

    _, cfg_path, single_out = single_runs(3, eval_step=3)
    tmp = tmp_path_factory.mktemp("eval_job")
    out = tmp / "out"
    shutil.copytree(single_out, out)
    cfg = json.loads(Path(cfg_path).read_text())
    cfg["lora"].append({**cfg["lora"][0], "name": "unsaved"})
    cfg_path = tmp / "eval.json"
    cfg_path.write_text(json.dumps(cfg))
    return cfg_path, out


def single_eval(monkeypatch, base: Path, cfg: Path, out: Path) -> tuple[int, str, str]:
    return run_cli_threads(monkeypatch, {"single": eval_argv(base, cfg, out)})["single"]


def assert_same_lines(single: str, pipe: str) -> None:
    import json

    mine, theirs = [json.loads(line) for line in pipe.splitlines()], [json.loads(line) for line in single.splitlines()]
    assert [list(m) for m in mine] == [list(t) for t in theirs]  # the same keys in the same order
    assert [(m["adapter"], m["tokens"], m["weights"]) for m in mine] == \
        [(t["adapter"], t["tokens"], t["weights"]) for t in theirs]
    assert [m["loss"] for m in mine] == pytest.approx([t["loss"] for t in theirs], rel=1e-5)


EVAL_CASES = [([3, 4], "torch"), ([1, 6], "zmq"), ([3, 2, 2], "torch"), ([NUM_LAYERS], "torch")]


@pytest.mark.parametrize("balance,transport", EVAL_CASES, ids=[f"{b}-{t}" for b, t in EVAL_CASES])
def test_pipeline_eval_prints_what_one_process_prints(tmp_path, pipe_model, eval_job, monkeypatch, balance,
                                                      transport):
    """`mlora eval --pipeline` (1, 2, 3 ranks; rank 0 holding the embedding alone in [1, 6]):
    rank 0 prints exactly the lines one process prints (same keys in the same order, losses to
    1e-5, the same token counts and weights), the other ranks print nothing."""
    cfg, out = eval_job
    code, single, _ = single_eval(monkeypatch, pipe_model, cfg, out)
    assert code == 0 and len(single.splitlines()) == 4 and '"weights": "base"' in single.splitlines()[-1]
    ranks = pipeline_eval(monkeypatch, pipe_model, cfg, [out] * len(balance), balance, transport)
    assert [code for code, _, _ in ranks] == [0] * len(balance), ranks
    assert_same_lines(single, ranks[0][1])
    assert [stdout for _, stdout, _ in ranks[1:]] == [""] * (len(balance) - 1)



def test_eval_prints_non_ascii_names_as_they_are(tmp_path, pipe_model, eval_job, monkeypatch):
    """An adapter's name and its weights' path print as written, not \\u-escaped, as `mlora
    generate` prints its lines: in one process and from a pipeline's rank 0 alike."""
    import json
    import shutil

    cfg_path, saved = eval_job
    out = tmp_path / "résultats"
    shutil.copytree(saved, out)
    cfg = json.loads(cfg_path.read_text())
    cfg["lora"][-1]["name"] = "日本語"  # (never saved: evaluated on the base)
    cfg_path = tmp_path / "eval.json"
    cfg_path.write_text(json.dumps(cfg))
    code, single, err = single_eval(monkeypatch, pipe_model, cfg_path, out)
    assert code == 0, err
    ranks = pipeline_eval(monkeypatch, pipe_model, cfg_path, [out, out], [3, 4])
    assert [code for code, _, _ in ranks] == [0, 0], ranks
    for printed in (single, ranks[0][1]):
        lines = printed.splitlines()
        assert f'"weights": "{out / cfg["lora"][0]["name"]}"' in lines[0] and '"adapter": "日本語"' in lines[-1]
        assert [json.loads(line)["adapter"] for line in lines] == [a["name"] for a in cfg["lora"]]


def test_pipeline_eval_notes_an_output_dir_that_does_not_exist(tmp_path, pipe_model, eval_job, monkeypatch):
    """As one process: rank 0 notes that its output_dir is missing (every adapter evaluated on
    the bare base), or which adapters have nothing saved in it (here p0 renamed 'old' since it
    was trained, and one never saved), and prints one process's lines; the other rank says nothing."""
    import shutil

    cfg, out = eval_job
    missing, renamed = tmp_path / "typo", tmp_path / "renamed"
    shutil.copytree(out, renamed)
    (renamed / "p0").rename(renamed / "old")
    for where, note in ((missing, f"mlora: note: output_dir {missing} does not exist: every adapter is evaluated "
                                  "on the bare base"),
                        (renamed, f"mlora: note: adapters 'p0', 'unsaved' have nothing saved in {renamed}: evaluated "
                                  f"on the bare base; {renamed} holds saved adapters the config does not name: 'old' "
                                  "(renamed?)")):
        code, single, single_err = single_eval(monkeypatch, pipe_model, cfg, where)
        assert code == 0 and single_err.strip().splitlines() == [note]
        ranks = pipeline_eval(monkeypatch, pipe_model, cfg, [where, where], [3, 4])
        assert [(code, err.strip().splitlines()) for code, _, err in ranks] == [(0, [note]), (0, [])], ranks
        assert_same_lines(single, ranks[0][1])

def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if not line.startswith("mlora: note:")]
    assert len(lines) == 1, stderr
    return lines[0]


def copy_without_p1(out: Path, other: Path) -> Path:
    """A copy of output_dir `out` at `other` without adapter p1's saved files: another host's."""
    import shutil

    shutil.copytree(out, other)
    shutil.rmtree(other / "p1")
    return other


def test_pipeline_eval_refuses_an_adapter_saved_on_some_ranks_only(tmp_path, pipe_model, eval_job, monkeypatch):
    """Each rank loads its part of an adapter from its own output_dir: one where rank 1 lacks
    p1 (pipeline training writes adapters on rank 0's host only) would mix p1's first layers
    with the base's last ones. Every rank says so in one line, none prints a result."""
    cfg, out = eval_job
    other = copy_without_p1(out, tmp_path / "other")
    ranks = pipeline_eval(monkeypatch, pipe_model, cfg, [out, other], [3, 4])
    for code, stdout, stderr in ranks:
        assert (code, stdout) == (3, "")
        assert one_line(stderr) == ("mlora: pipeline error: rank 1 has no saved weights of adapter 'p1' in its "
                                    "output_dir, rank 0 has; every rank loads its part of each adapter from its own "
                                    "output_dir/<adapter>: give every rank the same files (pipeline training writes "
                                    "them on rank 0's host only)")


def pickled_copy(out: Path, target: Path) -> Path:
    """A copy of output_dir `out` at `target` whose adapters hold their weights as PEFT's pickled
    adapter_model.bin (safe_serialization=False) instead of adapter_model.safetensors."""
    import shutil

    shutil.copytree(out, target)
    for weights in target.glob("*/adapter_model.safetensors"):
        torch.save(load_file(weights), weights.with_name("adapter_model.bin"))
        weights.unlink()
    return target


def test_pipeline_eval_reads_and_compares_pickled_adapters(tmp_path, pipe_model, eval_job, monkeypatch):
    """Adapters saved as adapter_model.bin: the pipeline prints what one process prints of their
    safetensors copies; a rank whose p1.bin holds other weights is refused (the ranks compared a
    digest of the missing safetensors file, the same for any two .bin adapters)."""
    cfg, out = eval_job
    pickled = pickled_copy(out, tmp_path / "pickled")
    code, single, _ = single_eval(monkeypatch, pipe_model, cfg, out)
    ranks = pipeline_eval(monkeypatch, pipe_model, cfg, [pickled, pickled], [3, 4])
    assert [code for code, _, _ in ranks] == [0, 0], ranks
    assert_same_lines(single.replace(str(out), str(pickled)), ranks[0][1])
    other = pickled_copy(out, tmp_path / "other")
    tensors = torch.load(other / "p1" / "adapter_model.bin", weights_only=True)
    torch.save({k: v * 2 for k, v in tensors.items()}, other / "p1" / "adapter_model.bin")
    ranks = pipeline_eval(monkeypatch, pipe_model, cfg, [pickled, other], [3, 4])
    for code, stdout, stderr in ranks:
        assert (code, stdout) == (3, "")
        assert one_line(stderr).startswith("mlora: pipeline error: rank 1 has other saved weights of adapter 'p1' "
                                           "than rank 0")


def assert_rank_1s_line_on_every_rank(ranks: list[tuple[int, str, str]], line: str) -> None:
    """Rank 1 failed with `line` (mlora's one line), rank 0 with the same line naming rank 1."""
    assert one_line(ranks[1][2]) == line
    assert one_line(ranks[0][2]) == line.replace("mlora: error: ", "mlora: error: rank 1: ")


def copy_with_a_nan_in_layer_3(out: Path, bad: Path) -> tuple[Path, str]:
    """A copy of the output directory `out` at `bad` whose adapter p1 has a NaN in a tensor of
    decoder layer 3 (which only a later rank loads); returns it and the tensor's name."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(out, bad)
    tensors = load_file(bad / "p1" / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if ".layers.3." in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bad / "p1" / "adapter_model.safetensors")
    return bad, key


def test_pipeline_eval_fails_every_rank_when_one_cannot_load(tmp_path, pipe_model, eval_job, monkeypatch):
    """A non-finite tensor in decoder layer 3, which only rank 1 loads: rank 1 refuses it with
    the line one process prints, rank 0 with the same line naming rank 1 (it would otherwise
    send its test chunks to a rank that has given up); exit 2 on both, nothing on stdout."""
    cfg, out = eval_job
    bad, key = copy_with_a_nan_in_layer_3(out, tmp_path / "bad")
    code, stdout, stderr = single_eval(monkeypatch, pipe_model, cfg, bad)
    assert (code, stdout) == (2, "") and key in one_line(stderr)
    ranks = pipeline_eval(monkeypatch, pipe_model, cfg, [bad, bad], [3, 4])
    assert [(code, stdout) for code, stdout, _ in ranks] == [(2, ""), (2, "")], ranks
    assert_rank_1s_line_on_every_rank(ranks, one_line(stderr))


def train_argv(base: Path, cfg: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--base_model", str(base), "--config", str(cfg), "--output_dir", str(out), "--device", "cpu",
            "--no_progress", *extra]


def init_from_a_nan_in_layer_3(tmp_path: Path, cfg_path: Path, single_out: Path) -> tuple[Path, str]:
    """A config of adapter p1 alone, started from a copy of `single_out`'s p1 with a NaN in a
    tensor of decoder layer 3 (which only a later rank loads): the config and the tensor's name."""
    import json

    bad, key = copy_with_a_nan_in_layer_3(single_out, tmp_path / "init")
    cfg = json.loads(cfg_path.read_text())
    cfg["lora"] = [dict(cfg["lora"][1], init_from=str(bad / "p1"))]
    path = tmp_path / "bad_init_from.json"
    path.write_text(json.dumps(cfg))
    return path, key


@pytest.mark.parametrize("transport", ["torch", "zmq"])
def test_pipeline_train_fails_every_rank_when_one_cannot_load(tmp_path, pipe_model, single_runs, monkeypatch,
                                                              transport):
    """An init_from tensor of decoder layer 3 with a NaN, which only rank 1 loads: rank 1
    refuses it with the line one process prints, rank 0 with the same line naming rank 1 (it
    used to learn only that rank 1 closed its connection, and leave its output_dir behind);
    exit 2 on both, and no output_dir left, as one process leaves none."""
    _, cfg_path, single_out = single_runs(2)
    cfg, key = init_from_a_nan_in_layer_3(tmp_path, cfg_path, single_out)
    code, _, stderr = run_cli_threads(monkeypatch,
                                      {"single": train_argv(pipe_model, cfg, tmp_path / "single")})["single"]
    assert code == 2 and key in one_line(stderr) and not (tmp_path / "single").exists()
    ranks = run_pipeline_cli(monkeypatch, [train_argv(pipe_model, cfg, tmp_path / "pipe")] * 2, [3, 4], transport)
    assert [code for code, _, _ in ranks] == [2, 2], ranks
    assert_rank_1s_line_on_every_rank(ranks, one_line(stderr))
    assert not (tmp_path / "pipe").exists()


@pytest.mark.parametrize("command,transport,culprit", [("train", "torch", "config"), ("train", "zmq", "device"),
                                                       ("eval", "zmq", "config"), ("generate", "torch", "device")])
def test_pipeline_start_up_failure_before_connecting_fails_every_rank(tmp_path, pipe_model, single_runs,
                                                                       monkeypatch, command, transport, culprit):
    """Rank 1 fails before it connects (its config is missing, or its --device does not exist:
    then it joins over the CPU): it still joins, and rank 0 fails at once with rank 1's line
    naming it, where it used to wait out --connect_timeout to learn only that rank 1 did not
    join; exit 2 on both, and no output_dir left by train."""
    _, cfg, out = single_runs(2)
    argv = {"train": lambda: train_argv(pipe_model, cfg, tmp_path / "pipe"),
            "eval": lambda: eval_argv(pipe_model, cfg, out),
            "generate": lambda: generate_argv(pipe_model, cfg, out)}[command]
    bad = [*argv(), *({"config": ["--config", str(tmp_path / "missing.json")],
                       "device": ["--device", "cuda:99"]}[culprit])]
    code, _, stderr = run_cli_threads(monkeypatch, {"single": bad})["single"]
    assert code == 2 and one_line(stderr).startswith("mlora: error: "), stderr
    ranks = run_pipeline_cli(monkeypatch, [argv(), bad], [3, 4], transport)
    assert [(code, stdout) for code, stdout, _ in ranks] == [(2, ""), (2, "")], ranks
    assert_rank_1s_line_on_every_rank(ranks, one_line(stderr))
    assert not (tmp_path / "pipe").exists()


@pytest.mark.parametrize("rank0", ["loads", "refuses"])
def test_pipeline_train_start_that_breaks_on_one_rank_loses_it(tmp_path, pipe_model, monkeypatch, rank0):
    """Only a UserError is exchanged: a bug (or an interrupt) while rank 1 loads keeps its own
    exception there (a traceback), and rank 0 learns at once that rank 1 was lost; or, when its
    own load was refused meanwhile, says why in its own line (rank 1's loss would hide it)."""
    from mlora.errors import UserError
    from mlora.pipeline import run

    real = run.inject_lora

    def breaking(model, layout):
        if threading.current_thread().name == "rank1":
            raise RuntimeError("a bug")
        if rank0 == "refuses":
            raise UserError("rank 0's own reason")
        return real(model, layout)

    monkeypatch.setattr(run, "inject_lora", breaking)
    cfg = write_config(tmp_path, 1, tmp_path / "out")
    errors = dict(run_threads(pipe_model, cfg, tmp_path / "out", 2, [3, 4], allow_errors=True, transport="torch"))
    assert isinstance(errors[1], RuntimeError) and str(errors[1]) == "a bug", errors
    if rank0 == "loads":
        assert isinstance(errors[0], PipelineError) and "rank 1" in str(errors[0]), errors
    else:
        assert type(errors[0]) is UserError and str(errors[0]) == "rank 0's own reason", errors


def test_pipeline_train_start_broken_on_one_rank_leaves_no_output_dir(tmp_path, pipe_model, monkeypatch):
    """A bug (not a UserError: no exchange) while rank 1 loads: rank 1 keeps its exception, rank
    0 reports rank 1 lost, and the output_dir they created, still empty, goes again (it stayed
    behind on every path but a UserError's)."""
    from mlora.pipeline import run

    real = run.inject_lora

    def breaking(model, layout):
        if threading.current_thread().name == "rank1":
            raise RuntimeError("a bug")
        return real(model, layout)

    monkeypatch.setattr(run, "inject_lora", breaking)
    out = tmp_path / "new" / "out"
    cfg = write_config(tmp_path, 1, out)
    (code0, _, err0), (code1, _, _) = run_pipeline_cli(monkeypatch, [train_argv(pipe_model, cfg, out)] * 2, [3, 4],
                                                       "torch")
    assert code0 == 3 and "rank 1" in err0 and isinstance(code1, RuntimeError)
    assert not (tmp_path / "new").exists()


def test_pipeline_resume_that_cannot_load_keeps_the_checkpoints(tmp_path, pipe_model, single_runs, monkeypatch):
    """A resume whose init_from no longer loads on rank 1 (a NaN in its layer 3): every rank
    fails with one line, and the checkpoints to resume from stay."""
    import json
    import shutil

    from mlora import checkpoint

    _, cfg_path, single_out = single_runs(2)
    cfg, key = init_from_a_nan_in_layer_3(tmp_path, cfg_path, single_out)
    raw = json.loads(cfg.read_text())
    raw["save_step"] = 1
    cfg.write_text(json.dumps(raw))
    shutil.copy(single_out / "p1" / "adapter_model.safetensors", tmp_path / "init" / "p1")  # a good one first
    out = tmp_path / "pipe"
    ranks = run_pipeline_cli(monkeypatch, [train_argv(pipe_model, cfg, out)] * 2, [3, 4], "torch")
    assert [code for code, _, _ in ranks] == [0, 0], ranks
    for finished in checkpoint.checkpoint_root(out).glob("FINISHED-*"):  # as if stopped after the last one
        finished.unlink()
    saved = {r: checkpoint.list_checkpoints(out, f"rank{r}") for r in range(2)}
    assert all(saved.values()), saved
    copy_with_a_nan_in_layer_3(single_out, tmp_path / "nan")
    shutil.copy(tmp_path / "nan" / "p1" / "adapter_model.safetensors", tmp_path / "init" / "p1")
    ranks = run_pipeline_cli(monkeypatch, [train_argv(pipe_model, cfg, out, "--resume")] * 2, [3, 4], "torch")
    assert [code for code, _, _ in ranks] == [2, 2], ranks
    assert [key in one_line(stderr) for _, _, stderr in ranks] == [True, True], ranks
    assert one_line(ranks[0][2]).startswith("mlora: error: rank 1: ")
    assert {r: checkpoint.list_checkpoints(out, f"rank{r}") for r in range(2)} == saved


def test_eval_ranks_must_agree_on_every_adapters_test_rows(tmp_path, pipe_model):
    """`mlora eval --pipeline` walks every adapter's test rows (not only those of adapters
    with an eval_step, which training compares): ranks whose rows differ are refused."""
    import json

    from mlora.pipeline.worker import fingerprint as stage_fingerprint
    from test_train import text_rows, write_jsonl

    prints = []
    for rows in (3, 4):
        cfg_path = write_config(tmp_path, 1, tmp_path / "out")
        cfg = json.loads(cfg_path.read_text())
        write_jsonl(tmp_path / f"t{rows}.jsonl", text_rows(rows, 7))
        cfg["lora"][0]["test_data"] = str(tmp_path / "test.jsonl")  # no eval_step
        (tmp_path / "test.jsonl").write_text((tmp_path / f"t{rows}.jsonl").read_text())  # same path, other rows
        cfg_path.write_text(json.dumps(cfg))
        session = open_session(pipe_model, cfg_path, device="cpu", load_base=False)
        prints.append((stage_fingerprint(session, [["embed"]], "queue"),
                       stage_fingerprint(session, [["embed"]], "queue", evaluating=True)))
    (train0, eval0), (train1, eval1) = prints
    assert train0 == train1  # training never walks these rows
    assert eval0["config"] == eval1["config"] and eval0["data"] != eval1["data"]


def test_pipeline_eval_refuses_a_tensor_of_no_stage(tmp_path, pipe_model, eval_job, monkeypatch):
    """A tensor of decoder layer 9 in a 4-layer model: one process refuses it as unexpected;
    in a pipeline no stage holds that layer, and every rank refuses it with the same line
    (each used to skip it as another stage's)."""
    import shutil

    from safetensors.torch import save_file

    cfg, out = eval_job
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    tensors = load_file(bad / "p0" / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if ".layers.3." in k)
    tensors[key.replace(".layers.3.", ".layers.9.")] = tensors[key].clone()
    save_file(tensors, bad / "p0" / "adapter_model.safetensors")
    code, stdout, stderr = single_eval(monkeypatch, pipe_model, cfg, bad)
    assert (code, stdout) == (2, "") and "unexpected tensor" in one_line(stderr)
    ranks = pipeline_eval(monkeypatch, pipe_model, cfg, [bad, bad], [3, 4])
    assert [(code, stdout, one_line(stderr)) for code, stdout, stderr in ranks] == [(2, "", one_line(stderr))] * 2


# ------------------------------------------------------------------ mlora generate --pipeline

GEN_PENALTY = 2.0
GEN_PROMPTS = ["hi", "write a much longer prompt than the others, with many more words in it", "count to three"]


def generate_argv(base: Path, cfg: Path, out: Path, *extra: str) -> list[str]:
    argv = ["generate", "--base_model", str(base), "--config", str(cfg), "--output_dir", str(out), "--device", "cpu",
            "--max_new_tokens", "8"]
    for prompt in GEN_PROMPTS:
        argv += ["--prompt", prompt]
    return argv + list(extra)


def pipeline_generate(monkeypatch, base: Path, cfg: Path, outs: list[Path], balance: list[int], *extra: str,
                      transport: str = "torch", per_rank: dict[int, list[str]] | None = None):
    """`mlora generate --pipeline` over len(balance) ranks. per_rank: more flags for some ranks."""
    return run_pipeline_cli(monkeypatch, [generate_argv(base, cfg, outs[r], *extra, *(per_rank or {}).get(r, []))
                                          for r in range(len(balance))], balance, transport)


def single_generate(monkeypatch, base: Path, cfg: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli_threads(monkeypatch, {"single": generate_argv(base, cfg, out, *extra)})["single"]


@pytest.fixture(scope="module")
def generate_job(tmp_path_factory, pipe_model, single_runs):
    """3 adapters one process trained, and a copy of the base whose generation_config.json
    lists two more stop tokens, picked from what greedy generation makes without them so that
    the rows (3 prompts of different lengths through each adapter and the bare base) stop at
    different steps, some not at all: (base, config, output_dir)."""
    import json
    import shutil

    from mlora.adapter import Adapter
    from mlora.cli import build_parser, generate_job as job_of
    from mlora.generate import greedy_generate
    from dataclasses import replace

    _, cfg, out = single_runs(3, eval_step=3)
    base = tmp_path_factory.mktemp("gen_base") / "base"
    shutil.copytree(pipe_model, base)

    def outputs():
        args = build_parser().parse_args(generate_argv(base, cfg, out, "--base"))
        session = open_session(base, cfg, output_dir=str(out), device="cpu", reads="generate")
        job = job_of(args, session)
        for a in session.cfg.lora:
            Adapter(replace(a, init_from=None), session.wrappers, session.cfg.seed, session.device,
                    naming=session.naming).load_peft(out / a.name, label="adapter")
        # (the penalty varies each row's tokens: the tiny model repeats one token)
        return greedy_generate(session, job.requests, max_new_tokens=8, repetition_penalty=GEN_PENALTY)

    free = outputs()
    # Two tokens that stop rows at the most distinct steps (a row stops at the first it makes).
    def lengths_with(stop):
        return [next((i for i, t in enumerate(o) if t in stop), len(o)) for o in free]

    tokens = sorted({t for o in free for t in o})
    stops = max(([a, b] for a in tokens for b in tokens if a < b),
                key=lambda s: (len(set(lengths_with(s))), 8 in lengths_with(s)))
    generation_config = base / "generation_config.json"
    raw = json.loads(generation_config.read_text()) if generation_config.is_file() else {}
    raw["eos_token_id"] = [raw.get("eos_token_id", 0), *stops]
    generation_config.write_text(json.dumps(raw))
    lengths = [len(o) for o in outputs()]
    assert len(set(lengths)) >= 3 and 8 in lengths and min(lengths) < 8, lengths
    return base, cfg, out


GENERATE_CASES = [([3, 4], "torch", True), ([1, 6], "zmq", True), ([3, 2, 2], "torch", True),
                  ([NUM_LAYERS], "torch", True), ([3, 4], "zmq", False)]


@pytest.mark.parametrize("balance,transport,penalty", GENERATE_CASES,
                         ids=[f"{b}-{t}{'-penalty' if p else ''}" for b, t, p in GENERATE_CASES])
def test_pipeline_generate_prints_what_one_process_prints(pipe_model, generate_job, monkeypatch, balance,
                                                          transport, penalty):
    """`mlora generate --pipeline` (1, 2, 3 ranks; rank 0 holding the embedding alone in [1,
    6]), greedy, 3 adapters and --base, prompts of different lengths; with a repetition penalty
    the rows stop at the stop tokens at different steps: rank 0 prints exactly what one process
    prints, the other ranks nothing."""
    base, cfg, out = generate_job
    extra = ["--base", *(["--repetition_penalty", str(GEN_PENALTY)] if penalty else [])]
    code, single, _ = single_generate(monkeypatch, base, cfg, out, *extra)
    assert code == 0 and len(single.splitlines()) == 9 and '"base_output"' in single
    ranks = pipeline_generate(monkeypatch, base, cfg, [out] * len(balance), balance, *extra, transport=transport)
    assert [code for code, _, _ in ranks] == [0] * len(balance), ranks
    assert ranks[0][1] == single
    assert [stdout for _, stdout, _ in ranks[1:]] == [""] * (len(balance) - 1)


@pytest.mark.parametrize("transport", ["torch", "zmq"])
def test_pipeline_generate_samples_what_one_process_samples(pipe_model, generate_job, monkeypatch, transport):
    """Sampling with a seed, top-k and a repetition penalty, two of the adapters: the last
    stage draws with the generators one process draws with, and rank 0 prints the same."""
    base, cfg, out = generate_job
    extra = ["--adapters", "p2,p0", "--temperature", "1.5", "--top_k", "40", "--seed", "7",
             "--repetition_penalty", "1.3"]
    code, single, _ = single_generate(monkeypatch, base, cfg, out, *extra)
    greedy = single_generate(monkeypatch, base, cfg, out, "--adapters", "p2,p0")[1]
    assert code == 0 and len(single.splitlines()) == 6 and single != greedy
    ranks = pipeline_generate(monkeypatch, base, cfg, [out, out], [2, 5], *extra, transport=transport)
    assert [(code, stdout) for code, stdout, _ in ranks] == [(0, single), (0, "")], ranks


def test_pipeline_generate_stops_an_adapters_rows_at_its_own_stop_tokens(pipe_model, generate_job, monkeypatch):
    """The tokens that end one adapter's rows only (its chat template's end of turn:
    mlora.generate.adapter_stop_ids, here every token, so p1's rows stop at once): the pipeline's
    last stage stops those rows where one process does, and rank 0 prints the same."""
    import json

    import mlora.generate

    def stop_p1_at_once():  # (again before each run: run_cli_threads undoes the test's patches)
        monkeypatch.setattr(mlora.generate, "adapter_stop_ids", lambda session, names=None: {"p1": set(range(512))})

    base, cfg, out = generate_job
    stop_p1_at_once()
    code, single, _ = single_generate(monkeypatch, base, cfg, out, "--adapters", "p1,p2")
    lines = [json.loads(line) for line in single.splitlines()]
    assert code == 0 and [line["adapter"] for line in lines] == ["p1"] * 3 + ["p2"] * 3
    assert [line["output"] for line in lines[:3]] == [""] * 3 and any(line["output"] for line in lines[3:]), single
    stop_p1_at_once()
    ranks = pipeline_generate(monkeypatch, base, cfg, [out, out], [3, 4], "--adapters", "p1,p2")
    assert [(code, stdout) for code, stdout, _ in ranks] == [(0, single), (0, "")], ranks


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_pipeline_generate_in_batches_prints_what_one_batch_prints(pipe_model, generate_job, monkeypatch, sampled):
    """--batch_size 2 over two ranks (9 lines, with --base: batches of 2 and a last of 1, their
    rows stopping at different steps): rank 0 prints what one process prints in one batch."""
    base, cfg, out = generate_job
    extra = ["--base", "--repetition_penalty", str(GEN_PENALTY),
             *(["--temperature", "1.5", "--seed", "7"] if sampled else [])]
    code, single, _ = single_generate(monkeypatch, base, cfg, out, *extra)
    assert code == 0 and len(single.splitlines()) == 9
    ranks = pipeline_generate(monkeypatch, base, cfg, [out, out], [3, 4], *extra, "--batch_size", "2")
    assert [(code, stdout) for code, stdout, _ in ranks] == [(0, single), (0, "")], ranks


def test_pipeline_generate_prompts_from_a_data_file(tmp_path, pipe_model, generate_job, monkeypatch):
    """--prompt_file over two ranks: rank 0 prints what one process prints, references included,
    a row naming its adapter (p1) through that adapter only."""
    import json

    base, cfg, out = generate_job
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"instruction": "say hi", "output": "hi"}) + "\n"
                    + json.dumps({"instruction": "say bye", "adapter": "p1"}) + "\n")
    extra = ["--adapters", "p0,p1", "--prompt_file", str(data)]
    code, single, _ = single_generate(monkeypatch, base, cfg, out, *extra)
    assert code == 0 and '"reference": "hi"' in single
    assert [json.loads(line)["adapter"] for line in single.splitlines() if "say bye" in line] == ["p1"]
    assert len(single.splitlines()) == 2 * (len(GEN_PROMPTS) + 1) + 1
    ranks = pipeline_generate(monkeypatch, base, cfg, [out, out], [3, 4], *extra)
    assert [(code, stdout) for code, stdout, _ in ranks] == [(0, single), (0, "")], ranks


@pytest.mark.parametrize("transport,where", [("torch", "pipe"), ("zmq", "pipe"), ("torch", "rank 0's host")])
def test_pipeline_generate_rank_0_alone_reads_the_prompts(tmp_path, pipe_model, generate_job, monkeypatch,
                                                          transport, where):
    """Rank 0 reads --prompt and --prompt_file and sends them to the other ranks, which read
    neither: every rank given one pipe (torchrun's ranks share `--prompt_file <(...)`), written
    once, or a file rank 1's host lacks and other --prompt values there. Each rank read them
    itself: the pipe went to one rank, the other read it empty ("the dataset is empty"), or rank
    1 found no file. Rank 0 prints what one process prints from the file."""
    import json
    import os
    import threading

    base, cfg, out = generate_job
    rows = (json.dumps({"instruction": "say hi", "output": "hi"}) + "\n"
            + json.dumps({"instruction": "say bye", "adapter": "p1"}) + "\n")
    data = tmp_path / "prompts.jsonl"
    data.write_text(rows)
    code, single, _ = single_generate(monkeypatch, base, cfg, out, "--adapters", "p0,p1", "--prompt_file", str(data))
    assert code == 0 and '"reference": "hi"' in single
    if where == "pipe":
        pipe = tmp_path / "pipe"
        os.mkfifo(pipe)

        def write_once() -> None:
            with open(pipe, "w") as f:  # (waits for a reader)
                f.write(rows)

        writer = threading.Thread(target=write_once, daemon=True)
        writer.start()
        per_rank = {rank: ["--prompt_file", str(pipe)] for rank in (0, 1)}
    else:
        per_rank = {0: ["--prompt_file", str(data)], 1: ["--prompt_file", str(tmp_path / "absent.jsonl"),
                                                         "--prompt", "more"]}
    ranks = pipeline_generate(monkeypatch, base, cfg, [out, out], [3, 4], "--adapters", "p0,p1",
                              transport=transport, per_rank=per_rank)
    if where == "pipe" and writer.is_alive():  # (no rank opened it: let the writer go)
        with open(pipe):
            writer.join(10)
    assert [(code, stdout) for code, stdout, _ in ranks] == [(0, single), (0, "")], ranks


def test_rank_0s_prompt_rows_reach_every_rank_as_they_are(monkeypatch):
    """The rows rank 0 read reach every rank as the file gave them, values JSON lacks included (a
    Parquet binary or date column, an integer past 64 bits): sent as JSON text they became their
    repr, a prompt the ranks completed where one process refuses the row. Their keys the file gave
    as null come too (what a row refused for one says). The exchange below takes the transport's
    msgpack round trip."""
    import argparse
    import datetime

    import msgpack

    from mlora.data import Rows
    from mlora.pipeline import shared_prompts
    from mlora.pipeline.messages import unpack

    rows = [{"instruction": b"\x00raw", "when": datetime.date(2026, 12, 1), "n": 1 << 70, "adapter": "p1"},
            {"instruction": "say hi"}]
    monkeypatch.setattr(shared_prompts, "load_rows", lambda path: Rows(rows, [1, 3], {1: {"output", "text"}}))

    class OneRank:
        def exchange(self, value):
            return [unpack(msgpack.packb(value, use_bin_type=True))]

    args = argparse.Namespace(prompt=["more"], prompt_file="prompts.parquet", batch_size=2)
    asked, got = shared_prompts.share(OneRank(), shared_prompts.read_on_rank_0(args), args)
    assert (list(got), got.lines, got.nulls) == (rows, [1, 3], {1: {"output", "text"}})
    assert (asked.prompt, asked.prompt_file, asked.batch_size) == (["more"], "prompts.parquet", 2)


@pytest.mark.parametrize("prompt,prompt_file,said", [
    (["say hi"], None, None),  # rank 0's own (as under torchrun, every rank given the same)
    ([], None, None),  # none given: nothing ignored
    (["say bye"], None, "--prompt"),
    ([], "other.jsonl", "--prompt_file"),
    (["say bye"], "other.jsonl", "--prompt and --prompt_file"),
])
def test_a_rank_given_other_prompts_than_rank_0_says_they_are_not_read(capsys, prompt, prompt_file, said):
    """Rank 1 started by hand with its own --prompt or --prompt_file: rank 0's were completed,
    silently; now rank 1 notes it once (it still reads neither)."""
    import argparse
    import pickle

    from mlora.pipeline import shared_prompts

    class RankOne:
        rank = 1

        def exchange(self, value):
            assert value is None
            return [{"prompt": ["say hi"], "prompt_file": None, "rows": pickle.dumps([]), "lines": [], "nulls": []},
                    None]

    args = argparse.Namespace(prompt=prompt, prompt_file=prompt_file)
    asked, rows = shared_prompts.share(RankOne(), None, args)
    assert (asked.prompt, asked.prompt_file, list(rows)) == (["say hi"], None, [])
    err = capsys.readouterr().err
    if said is None:
        assert err == ""
    else:
        assert err == (f"mlora: note: rank 1 was given other {said} values than rank 0; every rank completes rank "
                       "0's (rank 0 alone reads them)\n")


def test_pipeline_generate_refuses_an_adapter_saved_on_some_ranks_only(tmp_path, generate_job, monkeypatch):
    """Each rank loads its part of an adapter from its own output_dir: every rank says in one
    line that rank 1 lacks p1, none prints a completion."""
    base, cfg, out = generate_job
    other = copy_without_p1(out, tmp_path / "other")
    ranks = pipeline_generate(monkeypatch, base, cfg, [out, other], [3, 4])
    for code, stdout, stderr in ranks:
        assert (code, stdout) == (3, "")
        assert one_line(stderr).startswith("mlora: pipeline error: rank 1 has no saved weights of adapter 'p1' in "
                                           "its output_dir, rank 0 has;")


@pytest.mark.parametrize("differs", ["--format", "--batch_size"])
def test_pipeline_generate_ranks_must_agree_on_the_request(generate_job, monkeypatch, differs):
    """Ranks rendering rank 0's prompts otherwise (another --format) or given other flags
    (another --batch_size would batch other rows) would run other rows: one line per rank naming
    the flags to check."""
    base, cfg, out = generate_job
    per_rank = {1: ["--format", "text"] if differs == "--format" else ["--batch_size", "2"]}
    ranks = pipeline_generate(monkeypatch, base, cfg, [out, out], [3, 4], per_rank=per_rank)
    for code, stdout, stderr in ranks:
        assert (code, stdout) == (3, "")
        assert one_line(stderr) == ("mlora: pipeline error: rank 1 was started with a different generation request "
                                    "than rank 0; start every rank with the same --format, --adapters, --base, "
                                    "--max_new_tokens, --batch_size and sampling flags (rank 0's prompts are every "
                                    "rank's, each rendering them through its own prompt templates and tokenizer)")


def test_pipeline_generate_fails_every_rank_when_one_cannot_load(tmp_path, generate_job, monkeypatch):
    """A non-finite tensor in decoder layer 3, which only rank 1 loads: rank 1 says what one
    process says, rank 0 the same naming rank 1; exit 2 on both, nothing on stdout."""
    base, cfg, out = generate_job
    bad, key = copy_with_a_nan_in_layer_3(out, tmp_path / "bad")
    code, stdout, stderr = single_generate(monkeypatch, base, cfg, bad)
    assert (code, stdout) == (2, "") and key in one_line(stderr)
    ranks = pipeline_generate(monkeypatch, base, cfg, [bad, bad], [3, 4])
    assert [(code, stdout) for code, stdout, _ in ranks] == [(2, ""), (2, "")], ranks
    assert_rank_1s_line_on_every_rank(ranks, one_line(stderr))


def test_pipeline_generate_non_finite_scores_are_the_line_one_process_prints(generate_job, monkeypatch):
    """Scores that overflowed (NaN) on one row at its third token: the last rank, which picks
    the tokens, says what one process says (naming the output line and its prompt, not its
    number in the request), exit 2; rank 0 that the rank failed, exit 3, as when a rank dies
    mid-run (see the out-of-memory test below); nothing on stdout."""
    from mlora.generate import Decoding

    base, cfg, out = generate_job
    pick = Decoding.pick

    def overflowing(self, last):  # [B, V]: request 4's row NaN from its third new token on
        row = self.request_ids.index(4)
        if len(self.new_tokens[row]) == 2:
            last = last.clone()
            last[row] = float("nan")
        return pick(self, last)

    monkeypatch.setattr(Decoding, "pick", overflowing)
    code, stdout, stderr = single_generate(monkeypatch, base, cfg, out, "--max_new_tokens", "4")
    line = one_line(stderr)
    assert (code, stdout) == (2, "") and "output line 5 (prompt " in line and "at new token 3" in line, line
    monkeypatch.setattr(Decoding, "pick", overflowing)  # (run_cli_threads undid it)
    ranks = pipeline_generate(monkeypatch, base, cfg, [out, out], [3, 4], "--max_new_tokens", "4")
    assert [(code, stdout) for code, stdout, _ in ranks] == [(3, ""), (2, "")], ranks
    assert one_line(ranks[1][2]) == line
    assert one_line(ranks[0][2]) == \
        "mlora: pipeline error: rank 1 closed its connection while rank 0 was waiting for it"


@pytest.mark.parametrize("rope", ["longrope", "dynamic"])
def test_pipeline_generate_past_the_rope_switch(tmp_path, tokenizer_dir, monkeypatch, rope):
    """RoPE that changes as a row grows past 8 tokens. LongRoPE: a row growing past its switch
    makes one process run the whole batch again from a fresh cache; in a pipeline every stage
    does (rank 0 sends every token so far). Dynamic NTK: each stage turns every row by its own
    length and positions, from the mask every rank keeps. Rank 0 prints what one process
    prints: prompts of --format text whose rows cross 8 at different steps, an adapter whose B
    is not zero, and the bare base."""
    import json

    from conftest import make_tiny_model
    from mlora.adapter import Adapter
    from test_model import CASES as MODEL_CASES, LONGROPE
    from test_train import PHI3_TARGETS, make_config

    family, overrides = ("phi3", LONGROPE) if rope == "longrope" else MODEL_CASES["rope_dynamic"]
    base = make_tiny_model(tmp_path / family, family, tokenizer_dir, num_hidden_layers=2, **overrides)
    out = tmp_path / "out"
    cfg = make_config(tmp_path, ["b"], out)
    raw = json.loads(cfg.read_text())
    if family == "phi3":
        raw["lora"][0]["target_modules"] = PHI3_TARGETS
    cfg.write_text(json.dumps(raw))
    session = open_session(base, cfg, device="cpu", reads="generate")
    adapter = Adapter(session.cfg.lora[0], session.wrappers, 0, session.device, naming=session.naming)
    torch.manual_seed(0)
    with torch.no_grad():
        for _, p in adapter.named_parameters():
            p.normal_(0, 0.5)
    adapter.save(out / "b", str(base))
    argv = ["generate", "--base_model", str(base), "--config", str(cfg), "--device", "cpu", "--format", "text",
            "--prompt", "a b c d e", "--prompt", "a b", "--max_new_tokens", "10", "--base"]
    code, single, _ = run_cli_threads(monkeypatch, {"single": argv})["single"]
    assert code == 0 and len(single.splitlines()) == 2
    port = free_port()
    results = run_cli_threads(monkeypatch, {
        f"rank{r}": [*argv, "--pipeline", "--rank", str(r), "--balance", "2", "3", "--master_addr", "127.0.0.1",
                     "--master_port", str(port), "--peer_timeout", "20", "--connect_timeout", "60"]
        for r in range(2)})
    assert [results[f"rank{r}"][:2] for r in range(2)] == [(0, single), (0, "")], results


def test_pipeline_resume_from_a_damaged_checkpoint_on_one_rank_fails_every_rank(tmp_path, pipe_model, single_runs,
                                                                                 monkeypatch):
    """Rank 1's part of the checkpoint to resume is truncated: rank 1 says so in the line one
    process prints, rank 0 in the same line naming rank 1 (it went on to load its stage alone
    and learnt only that rank 1 closed its connection); exit 2 on both, nothing deleted."""
    from mlora import checkpoint

    _, cfg, _ = single_runs(2, save_step=2)
    out = tmp_path / "out"
    ranks = run_pipeline_cli(monkeypatch, [train_argv(pipe_model, cfg, out)] * 2, [3, 4], "torch")
    assert [code for code, _, _ in ranks] == [0, 0], ranks
    for finished in checkpoint.checkpoint_root(out).glob("FINISHED-*"):  # as if killed after the last one
        finished.unlink()
    newest = checkpoint.list_checkpoints(out, "rank1")[-1][1]
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[:-1])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    ranks = run_pipeline_cli(monkeypatch, [train_argv(pipe_model, cfg, out, "--resume")] * 2, [3, 4], "torch")
    assert [code for code, _, _ in ranks] == [2, 2], ranks
    assert one_line(ranks[1][2]).startswith(f"mlora: error: checkpoint {newest}: state.pt is corrupt")
    assert_rank_1s_line_on_every_rank(ranks, one_line(ranks[1][2]))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_pipeline_resume_with_nothing_to_resume_leaves_no_output_dir(tmp_path, pipe_model, monkeypatch):
    """--resume into an output_dir that does not exist: every rank says there is nothing to
    resume, and the directory ranks 0 and 1 created is gone again, as one process (which
    checks before creating it) leaves none."""
    out = tmp_path / "new" / "out"
    ranks = run_pipeline_cli(monkeypatch, [train_argv(pipe_model, write_config(tmp_path, 1, out), out, "--resume")] * 2,
                             [3, 4], "torch")
    assert [(code, one_line(err).split(": ")[:3]) for code, _, err in ranks] == [(2, ["mlora", "error",
                                                                                   "nothing to resume"])] * 2
    assert not (tmp_path / "new").exists()


# the ways a device says it ran out of memory: torch's error, cuBLAS's allocation failure (a RuntimeError)
SIMULATED_OOM = {"torch": lambda: torch.OutOfMemoryError("CUDA out of memory (simulated)"),
                 "cublas": cublas_out_of_memory}


@pytest.mark.parametrize("oom", SIMULATED_OOM)
def test_pipeline_generate_out_of_memory_where_ranks_cannot_agree_is_one_line_on_every_rank(generate_job,
                                                                                             monkeypatch, oom):
    """Running out of memory outside the stage's forward, where the ranks cannot agree on a
    rerun (here as rank 1's generate_forward starts, where it receives the hidden states: see
    StageLink.generate_forward), ends the run: rank 1 running out in its second batch is its
    one line (exit 2), rank 0's is one naming rank 1 (exit 3, as when a rank dies), no rank
    hangs, and the first batch's lines are printed already, as one process prints them."""
    import threading

    from mlora.pipeline.worker import StageLink

    base, cfg, out = generate_job
    forward, batches_seen = StageLink.generate_forward, []

    def running_out(self, x, mask, cache, step, pick):
        if threading.current_thread().name == "rank1" and step == 0:
            batches_seen.append(x.shape[0])
            if len(batches_seen) == 2:
                raise SIMULATED_OOM[oom]()
        return forward(self, x, mask, cache, step, pick)

    monkeypatch.setattr(StageLink, "generate_forward", running_out)
    whole = single_generate(monkeypatch, base, cfg, out, "--batch_size", "3", "--no_progress")
    monkeypatch.setattr(StageLink, "generate_forward", running_out)  # (single_generate undid it)
    batches_seen.clear()
    ranks = pipeline_generate(monkeypatch, base, cfg, [out, out], [3, 4], "--batch_size", "3", "--no_progress")
    assert [code for code, _, _ in ranks] == [3, 2], ranks  # (3: another rank failed, as when one dies)
    assert one_line(ranks[1][2]) == ("mlora: error: rank 1: out of device memory generating on its stage; give a "
                                     "smaller --batch_size or fewer --max_new_tokens, or split the model over more "
                                     "stages")
    assert one_line(ranks[0][2]) == ("mlora: pipeline error: rank 1 closed its connection while rank 0 was waiting "
                                     "for it")
    first_batch = whole[1].splitlines()[:3]
    assert ranks[0][1].splitlines() == first_batch and ranks[1][1] == ""


def run_out_of_memory_in_forward(monkeypatch, thread: str, too_big, oom: str = "torch") -> None:
    """The model's forward in the thread named `thread` (a rank, or "single") raises CUDA's
    out-of-memory error (SIMULATED_OOM[oom]) when too_big(x, cache) (x: token ids [B, S] or
    hidden states [B, S, H]), as a device would: inside the stage's forward, where a pipeline
    rank catches it."""
    from mlora.models.llama import CausalLM

    forward = CausalLM.forward

    def running_out(self, x, *args, cache=None, **kwargs):
        if threading.current_thread().name == thread and too_big(x, cache):
            raise SIMULATED_OOM[oom]()
        return forward(self, x, *args, cache=cache, **kwargs)

    monkeypatch.setattr(CausalLM, "forward", running_out)


def rerun_notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "out of device memory on a batch" in line]


# (balance, the rank that runs out, whether at the prompts or a later step, transport, its error)
RERUN_CASES = [([3, 4], 1, "later", "torch", "torch"), ([3, 4], 0, "prompts", "zmq", "torch"),
               ([3, 2, 2], 0, "later", "torch", "torch"), ([3, 2, 2], 1, "prompts", "torch", "torch"),
               ([3, 4], 1, "later", "torch", "cublas")]


@pytest.mark.parametrize("balance,rank,when,transport,oom", RERUN_CASES,
                         ids=[f"{b}-rank{r}-{w}-{t}-{o}" for b, r, w, t, o in RERUN_CASES])
def test_pipeline_generate_reruns_a_batch_that_runs_out_of_memory_in_halves(generate_job, monkeypatch, balance, rank,
                                                                            when, transport, oom):
    """One rank (the first, a middle one, the last) runs out of device memory on every batch
    of more than 2 rows, at the prompts' forward or a later step: every rank learns of it at
    that step, and all run the batch of 4 lines and the lines after it in batches of 2, as one
    process does. Rank 0 prints the lines one process prints (with no shortage), and notes
    the rerun once, naming the rank; every rank ends with exit 0."""
    base, cfg, out = generate_job
    extra = ["--repetition_penalty", str(GEN_PENALTY), "--no_progress"]
    code, single, _ = single_generate(monkeypatch, base, cfg, out, *extra)
    assert code == 0 and len(single.splitlines()) == 9
    run_out_of_memory_in_forward(monkeypatch, f"rank{rank}",
                                 lambda x, cache: x.shape[0] > 2 and (cache.length > 0) == (when == "later"), oom)
    ranks = pipeline_generate(monkeypatch, base, cfg, [out] * len(balance), balance, *extra, "--batch_size", "4",
                              transport=transport)
    assert [(code, stdout) for code, stdout, _ in ranks] == [(0, single)] + [(0, "")] * (len(balance) - 1), ranks
    assert rerun_notes(ranks[0][2]) == [f"mlora: rank {rank}: out of device memory on a batch of 4 lines; running "
                                        f"them and the lines after them in batches of 2"]
    assert [rerun_notes(stderr) for _, _, stderr in ranks[1:]] == [[]] * (len(balance) - 1)


@pytest.mark.parametrize("rank", [0, 1])
def test_pipeline_generate_a_line_that_runs_out_of_memory_alone_is_one_line(generate_job, monkeypatch, rank):
    """Rank 0 or 1 of two runs out of device memory on the long prompt's forward, alone as
    well: the batch of 2 holding it runs again in batches of 1 (one note), the lines before it
    are printed as one process prints them, and its line ends the run: one line naming the
    line and the rank, exit 2 there and 3 on the other rank (as when a rank fails); no hang."""
    base, cfg, out = generate_job
    extra = ["--adapters", "p0", "--batch_size", "2", "--no_progress"]
    code, single, _ = single_generate(monkeypatch, base, cfg, out, *extra)
    assert code == 0 and len(single.splitlines()) == 3
    run_out_of_memory_in_forward(monkeypatch, f"rank{rank}", lambda x, cache: x.shape[1] > 40)  # (its 67 tokens)
    ranks = pipeline_generate(monkeypatch, base, cfg, [out, out], [3, 4], *extra)
    line = ("rank {}: out of device memory generating line 2 alone (its prompt through one adapter, and the bare base "
            "with --base); give a shorter prompt or fewer --max_new_tokens, free device memory there, or split the "
            "model over more stages").format(rank)
    assert [code for code, _, _ in ranks] == [2 if r == rank else 3 for r in range(2)], ranks
    for r, (_, _, stderr) in enumerate(ranks):
        lines = [entry for entry in stderr.splitlines() if entry not in rerun_notes(stderr)]
        assert lines == [f"mlora: error: {line}" if r == rank else f"mlora: pipeline error: {line}"], stderr
    assert rerun_notes(ranks[0][2]) == [f"mlora: rank {rank}: out of device memory on a batch of 2 lines; running "
                                        f"them and the lines after them in batches of 1"]
    assert ranks[0][1].splitlines() == single.splitlines()[:1] and ranks[1][1] == ""


# (balance, the rank that runs out, its error)
EVAL_RERUN_CASES = [([3, 4], 0, "torch"), ([3, 4], 1, "torch"), ([3, 2, 2], 1, "torch"), ([3, 4], 1, "cublas")]


@pytest.mark.parametrize("balance,rank,oom", EVAL_RERUN_CASES,
                         ids=[f"{b}-rank{r}-{o}" for b, r, o in EVAL_RERUN_CASES])
def test_pipeline_eval_runs_a_chunk_that_runs_out_of_memory_in_halves(pipe_model, eval_job, monkeypatch, balance,
                                                                       rank, oom):
    """One rank (the first, a middle one, the last) runs out of device memory on every test
    chunk of more than one row (chunks of 2 here): it runs them a row at a time, as one
    process splits a chunk, and rank 0 prints the lines one process prints (with no
    shortage); every rank ends with exit 0."""
    cfg, out = eval_job
    code, single, _ = single_eval(monkeypatch, pipe_model, cfg, out)
    assert code == 0
    halved = []

    def too_big(x, cache):
        halved.append(x.shape[0] > 1)
        return halved[-1]

    run_out_of_memory_in_forward(monkeypatch, f"rank{rank}", too_big, oom)
    ranks = pipeline_eval(monkeypatch, pipe_model, cfg, [out] * len(balance), balance)
    assert [code for code, _, _ in ranks] == [0] * len(balance), ranks
    assert_same_lines(single, ranks[0][1])
    assert any(halved)


@pytest.mark.parametrize("rank", [0, 1])
def test_pipeline_eval_a_row_that_runs_out_of_memory_alone_is_one_line(pipe_model, eval_job, monkeypatch, rank):
    """A rank that runs out of device memory on a single test row: one line naming the rank,
    the adapter and the row's tokens (exit 2), the other rank's names it as a rank that left
    (exit 3); nothing printed, no hang."""
    cfg, out = eval_job
    run_out_of_memory_in_forward(monkeypatch, f"rank{rank}", lambda x, cache: True)
    ranks = pipeline_eval(monkeypatch, pipe_model, cfg, [out, out], [3, 4])
    assert [(code, stdout) for code, stdout, _ in ranks] == [(2 if r == rank else 3, "") for r in range(2)], ranks
    assert re.fullmatch(rf"mlora: error: rank {rank}: evaluating adapter 'p0': out of device memory on a single row "
                        rf"\(\d+ tokens\) on its stage; lower cutoff_len, free device memory there, or split the model "
                        rf"over more stages", one_line(ranks[rank][2]))
    other = 1 - rank
    assert one_line(ranks[other][2]) == (f"mlora: pipeline error: rank {rank} closed its connection while rank "
                                         f"{other} was waiting for it")


@pytest.mark.parametrize("oom", SIMULATED_OOM)
def test_pipeline_eval_out_of_memory_receiving_a_chunk_is_one_line_on_every_rank(pipe_model, eval_job, monkeypatch,
                                                                                   oom):
    """Running out of device memory outside the forward that runs in halves (here as rank 1
    receives its second test chunk, where NCCL would hold a tensor no one takes) is not rerun:
    one line naming the rank (exit 2), the other rank's names it as a rank that left (exit 3);
    nothing printed, no hang."""
    from mlora.pipeline.worker import StageLink

    cfg, out = eval_job
    receive, chunks = StageLink.receive_batch, []

    def running_out(self, kind, mb):
        if threading.current_thread().name == "rank1":
            chunks.append(kind)
            if len(chunks) == 2:
                raise SIMULATED_OOM[oom]()
        return receive(self, kind, mb)

    monkeypatch.setattr(StageLink, "receive_batch", running_out)
    ranks = pipeline_eval(monkeypatch, pipe_model, cfg, [out, out], [3, 4])
    assert [(code, stdout) for code, stdout, _ in ranks] == [(3, ""), (2, "")], ranks
    assert one_line(ranks[1][2]) == ("mlora: error: rank 1: out of device memory evaluating the test data of its "
                                     "stage; lower test_batch_size or cutoff_len, or split the model over more stages")
    assert one_line(ranks[0][2]) == ("mlora: pipeline error: rank 1 closed its connection while rank 0 was waiting "
                                     "for it")


def run_out_of_memory_training(monkeypatch, rank: int, phase: str, too_many: int, oom: str = "torch") -> list[int]:
    """Rank `rank`'s stage runs out of device memory (SIMULATED_OOM[oom]) in the training
    forward (phase "forward") or backward ("backward") of more than `too_many` rows, as a
    device would: the forward as the stage's model starts; the backward once the stage's first
    decoder layer is reached, when the later layers' LoRA gradients (and x.grad's route) are
    partly done. Returns the row counts of the attempts that ran out, as they happen."""
    from mlora.models.llama import CausalLM, DecoderLayer

    forward, layer_forward = CausalLM.forward, DecoderLayer.forward
    thread, ran_out, first_layer = f"rank{rank}", [], {}

    def stage_forward(self, x, *args, **kwargs):
        if threading.current_thread().name == thread and torch.is_grad_enabled():
            first_layer[thread] = min(self.layer_ids, default=None)
            if phase == "forward" and x.shape[0] > too_many:
                ran_out.append(x.shape[0])
                raise SIMULATED_OOM[oom]()
        return forward(self, x, *args, **kwargs)

    def layer(self, x, *args, **kwargs):
        out = layer_forward(self, x, *args, **kwargs)
        rows = x.shape[0]
        if (threading.current_thread().name == thread and phase == "backward" and torch.is_grad_enabled()
                and out.requires_grad and rows > too_many and self.layer_id == first_layer.get(thread)):
            def running_out(grad):
                ran_out.append(rows)
                raise SIMULATED_OOM[oom]()
            out.register_hook(running_out)
        return out

    monkeypatch.setattr(CausalLM, "forward", stage_forward)
    monkeypatch.setattr(DecoderLayer, "forward", layer)
    return ran_out


def sent_messages(monkeypatch) -> dict[str, list]:
    """Records what every rank of run_threads sends: {thread: [(destination, header, tensors)]}."""
    sent: dict[str, list] = {}
    send = QueueTransport.send

    def recording(self, dst, header, tensors=()):
        sent.setdefault(threading.current_thread().name, []).append(
            (dst, dict(header), [t.detach().clone() for t in tensors]))
        return send(self, dst, header, tensors)

    monkeypatch.setattr(QueueTransport, "send", recording)
    return sent


def assert_same_messages(mine: dict[str, list], reference: dict[str, list], tol: float = 1e-5,
                         values: bool = True) -> None:
    """Every rank sent the same messages: destinations, kinds, micro-batches, header keys and
    tensor shapes exactly; numbers and tensors to `tol` (relative), unless values is False."""
    assert mine.keys() == reference.keys()
    for thread in reference:
        assert len(mine[thread]) == len(reference[thread]), thread
        for (dst, header, tensors), (ref_dst, ref_header, ref_tensors) in zip(mine[thread], reference[thread]):
            assert (dst, header.get("kind"), header.get("mb"), sorted(header)) == (
                ref_dst, ref_header.get("kind"), ref_header.get("mb"), sorted(ref_header)), thread
            assert [t.shape for t in tensors] == [t.shape for t in ref_tensors], (thread, header)
            if not values:
                continue
            for t, ref in zip(tensors, ref_tensors):
                if ref.is_floating_point():
                    assert (t - ref).norm() <= tol * max(ref.norm(), 1e-12), (thread, header)
                else:
                    assert torch.equal(t, ref), (thread, header)
            numbers = {k: v for k, v in ref_header.items() if isinstance(v, float)}
            assert {k: header[k] for k in numbers} == pytest.approx(numbers, rel=tol, nan_ok=True), (thread, header)


def split_notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.endswith("; retrying in halves")]


@pytest.fixture(scope="module")
def oom_job(tmp_path_factory, pipe_model):
    """Two adapters, p0 in micro-batches of 4 rows (halves of halves in a split), p1 of one row,
    without and with dropout: {dropout: (config, one process's output)}; and each one's clean
    pipeline runs, by balance, with every rank's messages (clean_run)."""
    import json

    from mlora.cli import main
    from test_pipeline import write_config

    tmp = tmp_path_factory.mktemp("oom")
    jobs = {}
    for dropout in (0.0, 0.3):
        cfg_path = write_config(tmp, 2, tmp / f"single_{dropout}")
        cfg = json.loads(cfg_path.read_text())
        cfg["lora"][0].update(batch_size=4, micro_batch_size=4)
        for adapter in cfg["lora"]:
            adapter["dropout"] = dropout
        cfg_path = tmp / f"oom_{dropout}.json"
        cfg_path.write_text(json.dumps(cfg))
        if dropout == 0.0:
            assert main(["train", "--base_model", str(pipe_model), "--config", str(cfg_path), "--no_progress"]) == 0
        jobs[dropout] = (cfg_path, tmp / f"single_{dropout}")
    clean = {}

    def clean_run(dropout: float, balance: list[int]):
        """(output dir, messages) of the pipeline run that never runs out."""
        key = (dropout, tuple(balance))
        if key not in clean:
            out = tmp / f"clean_{dropout}_{'-'.join(map(str, balance))}"
            with pytest.MonkeyPatch.context() as patch:
                sent = sent_messages(patch)
                run_threads(pipe_model, jobs[dropout][0], out, len(balance), balance)
            clean[key] = (out, sent)
        return clean[key]

    return jobs, clean_run


# (balance, the rank that runs out, in its forward or backward, its error, recompute)
TRAIN_RERUN_CASES = [([3, 4], 0, "forward", "torch", False), ([3, 2, 2], 1, "forward", "cublas", False),
                     ([3, 4], 1, "forward", "torch", False), ([3, 4], 0, "backward", "cublas", False),
                     ([3, 2, 2], 1, "backward", "torch", False), ([3, 4], 1, "backward", "torch", False),
                     ([3, 2, 2], 1, "forward", "torch", True), ([3, 4], 1, "backward", "torch", True)]


@pytest.mark.parametrize("balance,rank,phase,oom,recompute", TRAIN_RERUN_CASES,
                         ids=[f"{b}-rank{r}-{p}-{o}" + ("-recompute" if c else "")
                              for b, r, p, o, c in TRAIN_RERUN_CASES])
def test_pipeline_training_reruns_a_micro_batch_that_runs_out_of_memory_in_halves(
        tmp_path, pipe_model, oom_job, monkeypatch, capsys, balance, rank, phase, oom, recompute):
    """A rank (the first, a middle one, the last) runs out of device memory in its stage's
    forward or backward of every micro-batch of more than one row (p0's 4 rows: halves, then
    halves of halves): it runs them again in halves on its own, and every rank sends exactly
    the messages (shapes; values to 1e-5) of the run that never runs out, so no other rank
    learns of it; the adapters are one process's to 1e-5 (dropout 0: the same sums in another
    order), with recompute too (each half recomputes under its own row layout). The rank says
    so on stderr at each split."""
    import json

    jobs, clean_run = oom_job
    cfg_path, single_out = jobs[0.0]
    if recompute:
        cfg_path = tmp_path / "recompute.json"
        cfg_path.write_text(json.dumps({**json.loads(jobs[0.0][0].read_text()), "recompute": True}))
    _, reference = clean_run(0.0, balance)
    capsys.readouterr()
    ran_out = run_out_of_memory_training(monkeypatch, rank, phase, 1, oom)
    sent = sent_messages(monkeypatch)
    run_threads(pipe_model, cfg_path, tmp_path / "out", len(balance), balance)
    assert 4 in ran_out and 2 in ran_out, ran_out  # p0's micro-batches, then their halves
    assert_same_as_single(single_out, tmp_path / "out", 2)
    assert_same_messages(sent, reference)
    notes = split_notes(capsys.readouterr().err)
    assert notes and all(note.startswith(f"mlora: rank {rank}: out of memory on ") and f"stage's {phase};" in note
                         for note in notes), notes
    assert any(" on 4 rows " in note for note in notes) and any(" on 2 rows " in note for note in notes), notes


@pytest.mark.parametrize("phase,recompute", [("forward", False), ("backward", False), ("forward", True),
                                             ("backward", True)])
def test_pipeline_training_halves_with_dropout_train_on(tmp_path, pipe_model, oom_job, monkeypatch, phase,
                                                        recompute):
    """With dropout 0.3, a micro-batch cut into halves draws its masks half by half, in row
    order, from where the adapter's generators stood before the whole micro-batch's forward
    (a backward rerun rewinds them there, and puts them back after). The run completes with
    finite weights, every rank sends messages of the same shapes as the run that never runs
    out, and p1, whose one-row micro-batches are never cut, trains exactly as there. On the
    CPU, whose kernel draws one uniform per value in logical order, the halves even draw the
    whole micro-batch's masks, so p0 trains as there too (to 1e-5: the same sums in another
    order); CUDA's Philox offsets make no such promise. With recompute, each half's layers run
    again under its own row layout, replaying its own masks."""
    import json

    jobs, clean_run = oom_job
    clean_out, reference = clean_run(0.3, [3, 2, 2])
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({**json.loads(jobs[0.3][0].read_text()), "recompute": recompute}))
    ran_out = run_out_of_memory_training(monkeypatch, 1, phase, 1)
    sent = sent_messages(monkeypatch)
    run_threads(pipe_model, cfg_path, tmp_path / "out", 3, [3, 2, 2])
    assert 4 in ran_out, ran_out
    assert_same_messages(sent, reference, values=False)
    p0 = load_file(tmp_path / "out" / "p0" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in p0.values())
    assert rel_diff(p0, load_file(clean_out / "p0" / "adapter_model.safetensors")) <= 1e-5
    assert rel_diff(load_file(tmp_path / "out" / "p1" / "adapter_model.safetensors"),
                    load_file(clean_out / "p1" / "adapter_model.safetensors")) <= 1e-6


@pytest.mark.parametrize("phase,oom", [("forward", "torch"), ("forward", "cublas"), ("backward", "torch")])
def test_pipeline_training_out_of_memory_on_one_row_is_one_line_on_every_rank(pipe_model, tmp_path, monkeypatch,
                                                                             phase, oom):
    """A rank that runs out of device memory in a training micro-batch's forward or backward
    even on a single row (after it split the micro-batch of 2 rows in halves, said on its
    stderr): one line naming the rank and the fixes (exit 2), the other rank names it as a
    rank that left (exit 3); no hang."""
    from test_pipeline import write_config

    cfg = write_config(tmp_path, 1, tmp_path / "out")
    run_out_of_memory_training(monkeypatch, 1, phase, 0, oom)
    ranks = run_pipeline_cli(monkeypatch, [train_argv(pipe_model, cfg, tmp_path / "out")] * 2, [3, 4], "torch")
    assert [code for code, _, _ in ranks] == [3, 2], ranks
    notes = split_notes(ranks[1][2])
    assert notes == [f"mlora: rank 1: out of memory on 2 rows of micro-batch 0 in its stage's {phase}; retrying in "
                     "halves"], ranks[1][2]
    assert one_line("\n".join(line for line in ranks[1][2].splitlines() if line not in notes)) == (
        "mlora: error: rank 1: out of device memory training on its stage; lower micro_batch_size or cutoff_len, "
        "lower memory_fraction (fewer micro-batches in flight), set \"recompute\": true, or split the model over "
        "more stages")
    assert one_line(ranks[0][2]) == ("mlora: pipeline error: rank 1 closed its connection while rank 0 was waiting "
                                     "for it")


def test_pipeline_ranks_agree_on_files_kept_at_other_places(pipe_model, tmp_path, monkeypatch):
    """Ranks on two hosts keep the same config, data, template and init_from adapter in other
    directories: they compared the files' absolute paths and refused to start ("a different
    config"); now what the files hold is compared, so they train, and an init_from whose
    weights differ on one host is still refused."""
    import json
    import shutil

    from test_pipeline import write_config

    host_a, host_b = tmp_path / "a", tmp_path / "b"
    host_a.mkdir()
    cfg_a = write_config(host_a, 1, tmp_path / "out")
    start = host_a / "start"  # an init_from adapter: a copy of one mlora wrote
    from mlora.adapter import save_peft

    save_peft(start, {}, {})
    shutil.copytree(host_a, host_b)
    cfg_b = host_b / cfg_a.name
    cfg_b.write_text(cfg_a.read_text().replace(str(host_a), str(host_b)))
    argvs = [train_argv(pipe_model, cfg_a, tmp_path / "out"), train_argv(pipe_model, cfg_b, tmp_path / "out_b")]
    ranks = run_pipeline_cli(monkeypatch, argvs, [3, 4], "torch")
    assert [code for code, _, _ in ranks] == [0, 0], ranks

    for host, cfg in ((host_a, cfg_a), (host_b, cfg_b)):
        obj = json.loads(cfg.read_text())
        obj["lora"][0]["init_from"] = str(host / "start")
        cfg.write_text(json.dumps(obj))
    (host_b / "start" / "adapter_config.json").write_text('{"r": 9}')
    ranks = run_pipeline_cli(monkeypatch, [[*argv, "--overwrite"] for argv in argvs], [3, 4], "torch")
    assert [code for code, _, _ in ranks] == [3, 3], ranks
    assert one_line(ranks[1][2]).startswith("mlora: pipeline error: rank 1 was started with a different config "
                                            "than rank 0")


@pytest.mark.parametrize("save_step", [100, 1])
def test_a_signal_after_the_last_cut_is_said_once_and_the_run_ends(tmp_path, pipe_model, capsys, save_step):
    """A SIGTERM on rank 1 (a SignalFlag stand-in that holds it from the start). save_step 100:
    no cut lies ahead, so the run trained to its end without a word of it; now rank 1 says so,
    once, and the run still ends and saves. save_step 1: a cut lies ahead, every rank stops
    there (as before), and nothing is said of a late signal."""
    import signal
    from types import SimpleNamespace

    from mlora.trainer import Interrupted

    cfg = write_config(tmp_path, 1, tmp_path / "out", save_step=save_step)
    errors = run_threads(pipe_model, cfg, tmp_path / "out", 2, [3, 4], allow_errors=True,
                         signals={1: SimpleNamespace(signum=signal.SIGTERM)})
    said = [line for line in capsys.readouterr().err.splitlines() if "after the last checkpoint cut" in line]
    if save_step == 1:
        assert sorted((rank, type(err)) for rank, err in errors) == [(0, Interrupted), (1, Interrupted)]
        assert said == []
        return
    assert errors == []
    assert (tmp_path / "out" / "p0" / "adapter_model.safetensors").is_file()
    assert said == ["mlora: rank 1: SIGTERM after the last checkpoint cut: the run trains to its end and saves; a "
                    "second one stops this rank now (the others then stop too; --resume starts again at the last "
                    "checkpoint)"]
