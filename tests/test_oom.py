"""Running out of device memory: the trainer splits a fused batch that does not fit and
retries the halves (exactly: the weights equal those of a run that never ran out), a single
example that does not fit is a one-line error, and on CUDA fast-fit/optimal-fit size their
batches from the memory model (memory.plan_token_budget, tested here with explicit free bytes).

CPU only: the out-of-memory errors are raised by patches in the forward and backward paths."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file

import mlora.trainer
from mlora.cli import main
from mlora.config import AdapterConfig, TrainConfig
from mlora.errors import UserError
from mlora.memory import BudgetPlan, GiB, estimate_peak_bytes, plan_token_budget
from mlora.metrics import read_metrics
from mlora.models.llama import CausalLM, DecoderLayer, ModelArgs

from test_memory import cublas_out_of_memory
from test_train import ADAPTERS, alpaca_rows, chat_rows, make_template, rel_diff, text_rows, write_jsonl

NAMES = ["a", "b", "c"]  # micro-batches of 2, 1 and 2 rows (c left-padded): fused batches of 5 rows


def make_config(tmp, out, dropout=0.0, **global_overrides):
    """test_train's three adapters (different ranks, targets, optimizers, padding sides), on
    less data and for one epoch: every fused batch may run as five single examples here."""
    data = {"a": alpaca_rows(6, 1), "b": text_rows(4, 2), "c": chat_rows(4, 3)}
    template = make_template(tmp)
    lora = [{"name": n, "data": write_jsonl(tmp / f"{n}.jsonl", data[n]), "prompt": template, "dropout": dropout,
             "num_epochs": 1, **ADAPTERS[n]} for n in NAMES]
    path = tmp / f"config_{out.name}.json"
    path.write_text(json.dumps({"cutoff_len": 64, "seed": 3, "output_dir": str(out), "lora": lora,
                                **global_overrides}))
    return path


def train(run: "Run") -> int:
    return main(["train", "--base_model", str(run.base), "--config", str(run.path), "--no_progress"])


class Run:
    def __init__(self, tmp, base, name, **overrides):
        self.out = tmp / name
        self.path = make_config(tmp, self.out, **overrides)
        self.base = base

    def weights(self, name):
        return load_file(self.out / name / "adapter_model.safetensors")

    def metrics(self):
        return [m for m in read_metrics(self.out / "metrics.jsonl") if "loss" in m]


def assert_same_training(run: Run, ref: Run):
    for name in NAMES:
        assert rel_diff(run.weights(name), ref.weights(name)) <= 1e-5
    # Per adapter in step order: another strategy may interleave the adapters differently.
    order = lambda m: (m["adapter"], m["step"])  # noqa: E731
    mine, theirs = sorted(run.metrics(), key=order), sorted(ref.metrics(), key=order)
    key = lambda m: (m["adapter"], m["step"], m["epoch"], m["tokens"], m["input_tokens"])  # noqa: E731
    assert [key(m) for m in mine] == [key(m) for m in theirs]  # bookkeeping unchanged by splits
    assert [m["loss"] for m in mine] == pytest.approx([m["loss"] for m in theirs], rel=1e-5)


def oom(rows: int) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 1.00 GiB (a batch of {rows} rows)")


@pytest.fixture
def oom_in_forward(monkeypatch):
    """A model whose forward 'runs out of memory' on more than `limit[0]` rows; records the
    row count of every forward."""
    limit, calls = [None], []
    forward = CausalLM.forward

    def patched(self, x, *args, **kwargs):
        rows = x.shape[0]
        if torch.is_grad_enabled():
            calls.append(rows)
            if limit[0] is not None and rows > limit[0]:
                raise oom(rows)
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(CausalLM, "forward", patched)
    return limit, calls


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama):
    run = Run(tmp_path_factory.mktemp("oom_reference"), tiny_llama, "ref")
    assert train(run) == 0
    # Training moved every B away from its zero init, so comparing weights means something.
    assert all(v.abs().max() > 0 for n in NAMES for k, v in run.weights(n).items() if "lora_B" in k)
    return run


def test_oom_in_forward_splits_down_to_single_examples(tmp_path, tiny_llama, reference, oom_in_forward, capsys):
    limit, calls = oom_in_forward
    limit[0] = 1  # every fused batch is split until each example runs alone
    run = Run(tmp_path, tiny_llama, "split")
    assert train(run) == 0
    assert max(calls) == 5 and calls.count(1) > calls.count(5)
    assert_same_training(run, reference)
    err = capsys.readouterr().err
    assert "mlora: out of memory on a batch of 5 rows; retrying in halves" in err
    assert "mlora: out of memory on a batch of 2 rows; retrying in halves" in err


def test_cublas_running_out_of_memory_splits_as_torchs_error_does(tmp_path, tiny_llama, reference, monkeypatch,
                                                                  capsys):
    """cuBLAS's allocation failure (a RuntimeError, not torch.OutOfMemoryError) at a matmul of a
    batch of more than 2 rows: the batch is split and retried as for torch's error (it ended
    the run with a traceback), and the training equals one that never ran out."""
    forward = CausalLM.forward

    def patched(self, x, *args, **kwargs):
        if torch.is_grad_enabled() and x.shape[0] > 2:
            raise cublas_out_of_memory()
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(CausalLM, "forward", patched)
    run = Run(tmp_path, tiny_llama, "cublas")
    assert train(run) == 0
    assert_same_training(run, reference)
    assert "mlora: out of memory on a batch of 5 rows; retrying in halves" in capsys.readouterr().err


def test_oom_split_across_adapters_redraws_the_same_dropout(tmp_path, tiny_llama, monkeypatch, capsys):
    """Dropout 0.1: a 5-row batch runs out of memory after its first decoder layer (whose
    masks are drawn by then) and is retried as 3 + 2 rows, each adapter's micro-batch whole.
    The failed attempt's draws are rewound, and each adapter draws over its own rows, so the
    run equals one that never ran out of memory."""
    ref = Run(tmp_path, tiny_llama, "ref_dropout", dropout=0.1)
    assert train(ref) == 0
    forward = DecoderLayer.forward

    def patched(self, x, cos, sin, mask, *cache):
        out = forward(self, x, cos, sin, mask, *cache)
        if torch.is_grad_enabled() and out.shape[0] > 3:
            raise oom(out.shape[0])
        return out

    monkeypatch.setattr(DecoderLayer, "forward", patched)
    run = Run(tmp_path, tiny_llama, "split_dropout", dropout=0.1)
    assert train(run) == 0
    err = capsys.readouterr().err
    # Halves of 5 rows are 3 + 2, whole micro-batches (a: 2, b: 1; c: 2); none is split again.
    assert "out of memory on a batch of 5 rows; retrying in halves" in err
    assert "a batch of 3 rows" not in err and "a batch of 2 rows" not in err
    assert_same_training(run, ref)


def test_oom_in_backward_does_not_count_gradients_twice(tmp_path, tiny_llama, reference, monkeypatch):
    """The error comes up in the middle of the backward, after the upper layer's LoRA gradients
    have been accumulated: the retried halves must not add them a second time."""
    forward, calls = DecoderLayer.forward, []

    def patched(self, x, cos, sin, mask, *cache):
        out = forward(self, x, cos, sin, mask, *cache)
        if getattr(self, "probe", False) and out.requires_grad and out.shape[0] > 2:
            calls.append(out.shape[0])

            def fail(grad):
                raise oom(out.shape[0])

            out.register_hook(fail)  # layer 0's output: reached after layer 1's backward
        return out

    model_forward = CausalLM.forward

    def mark_first_layer(self, *args, **kwargs):
        self.model.layers["0"].probe = True
        return model_forward(self, *args, **kwargs)

    monkeypatch.setattr(DecoderLayer, "forward", patched)
    monkeypatch.setattr(CausalLM, "forward", mark_first_layer)
    run = Run(tmp_path, tiny_llama, "backward")
    assert train(run) == 0
    assert calls  # the backward did fail, and more than once
    assert_same_training(run, reference)

    # The same without putting the gradients back: the upper layer's count twice, and the
    # weights differ, so the comparison above would have caught it.
    monkeypatch.setattr(mlora.trainer, "grads_restored_on_error", lambda params, before=None: nullcontext())
    broken = Run(tmp_path, tiny_llama, "unprotected")
    assert train(broken) == 0
    assert max(rel_diff(broken.weights(n), reference.weights(n)) for n in NAMES) > 1e-3


def test_oom_with_packing(tmp_path, tiny_llama, reference, oom_in_forward, capsys):
    """Packed rows split by their sequences; packing and fast-fit change no adapter's result,
    so the run still equals the unpacked, unsplit reference."""
    limit, calls = oom_in_forward
    limit[0] = 1
    run = Run(tmp_path, tiny_llama, "packed_split", packing=True, train_strategy="fast-fit",
              max_tokens_per_batch=400)
    assert train(run) == 0
    assert max(calls) > 1
    assert_same_training(run, reference)
    assert "sequences; retrying in halves" in capsys.readouterr().err


def test_a_single_example_that_does_not_fit_is_a_one_line_error(tmp_path, tiny_llama, oom_in_forward, capsys):
    limit, _ = oom_in_forward
    limit[0] = 0
    run = Run(tmp_path, tiny_llama, "never_fits")
    assert train(run) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mlora: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    line = lines[0]
    assert "out of device memory on a single example of adapter 'a'" in line
    assert "cutoff_len 64" in line and '"recompute": true' in line
    assert "CUDA out of memory" in line  # what the device said
    assert err.count("retrying in halves") == 3  # 5 rows -> 3 -> 2 -> 1 (a's first example) fails


# ----------------------------------------------------------------------------- token budgets

TINYLLAMA = ModelArgs("llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                      num_heads=32, num_kv_heads=4, head_dim=64)
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config(n=4, strategy="fast-fit", **overrides) -> TrainConfig:
    """n TinyLlama adapters (r=16 on all seven projections, 8 rows per micro-batch), 512 tokens."""
    lora = [AdapterConfig(name=f"a{i}", data="/x", r=16, target_modules=ALL7, batch_size=8, micro_batch_size=8)
            for i in range(n)]
    settings = dict(cutoff_len=512, train_strategy=strategy, train_lora_candidate_num=n,
                    train_lora_simultaneously_num=n)
    return TrainConfig(lora=lora, **{**settings, **overrides})


def plan(cfg, free_gib, **kw):
    return plan_token_budget(cfg, TINYLLAMA, free_bytes=int(free_gib * GiB), dtype=torch.bfloat16, **kw)


def test_budget_grows_with_free_memory_and_is_said():
    small, large = plan(config(), 40), plan(config(), 80)
    assert 0 < small.max_tokens < large.max_tokens
    assert large.max_tokens % 512 == 0  # whole rows of cutoff_len
    assert large.note == f"mlora: token budget {large.max_tokens} (estimated to fit 90% of 80.0 GiB free)"
    # The estimate of the chosen batch fits the fraction; one more row would not.
    rows = large.max_tokens // 512

    def need(r):
        e = estimate_peak_bytes(TINYLLAMA, rows=r, seq_len=512, dtype=torch.bfloat16,
                                lora=[(16, ALL7, 0.05)] * 4, active_adapters=4)
        return e.total - e.weights

    assert need(rows) <= 0.9 * 80 * GiB < need(rows + 1)
    assert plan(config(memory_fraction=0.5), 80).max_tokens < large.max_tokens
    assert plan(config(recompute=True), 80).max_tokens > 3 * large.max_tokens
    assert plan(config(strategy="optimal-fit"), 80).max_tokens == large.max_tokens
    # A micro-batch larger than the whole budget still runs (alone), and the note says so.
    tight = plan(config(), 8)
    assert 0 < tight.max_tokens < 8 * 512
    assert f"; a micro-batch of more than {tight.max_tokens // 512} full rows runs alone" in tight.note
    # Fewer adapters per batch: the fused LoRA kernel keeps less, so more rows fit.
    assert plan(config(n=8, train_lora_simultaneously_num=2), 80).max_tokens > \
        plan(config(n=8), 80).max_tokens


def test_nothing_fits_is_a_user_error():
    with pytest.raises(UserError) as info:
        plan(config(), 1)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("memory_fraction 0.9: not even one row of cutoff_len 512 tokens")
    assert '"recompute": true' in message and "lower cutoff_len" in message
    with pytest.raises(UserError) as info:
        plan(config(recompute=True), 0.5)
    assert "recompute" not in str(info.value).split(";")[1]  # already on: not suggested


def test_configured_budgets_and_cpu_are_left_alone():
    assert plan_token_budget(config(), TINYLLAMA, free_bytes=None, dtype=torch.float32).max_tokens is None
    cpu = plan_token_budget(config(max_tokens_per_batch=1000), TINYLLAMA, free_bytes=None, dtype=torch.float32)
    assert (cpu.max_tokens, cpu.note) == (1000, None)
    assert plan(config(max_tokens_per_batch=4096), 80) == BudgetPlan(4096)  # fits: nothing to say
    over = plan(config(max_tokens_per_batch=10**6), 80)
    assert over.max_tokens == 10**6
    assert over.note.startswith("mlora: warning: max_tokens_per_batch 1000000 is above the ")
    assert "split and retried" in over.note


def test_trivial_warns_when_its_largest_batch_may_not_fit():
    fits = plan(config(strategy="trivial"), 80)  # 4 x 8 rows of 512
    assert (fits.max_tokens, fits.note) == (None, None)
    tight = plan(config(strategy="trivial"), 30)
    assert tight.max_tokens is None
    assert tight.note.startswith("mlora: warning: the largest fused batch (32 rows of 512 tokens) is "
                                 "estimated to need ")
    assert "more than 90% of 30.0 GiB free" in tight.note and "split and retried" in tight.note
    assert "\n" not in tight.note
    # The largest batch takes the adapters with the biggest micro-batches, as many as run at once.
    cfg = config(strategy="trivial", train_lora_simultaneously_num=2)
    cfg.lora[0].micro_batch_size = 16
    assert "(24 rows of 512 tokens)" in plan(cfg, 10).note


def test_the_trainer_sets_the_budget_on_a_cuda_device(tmp_path, tiny_llama, monkeypatch, capsys):
    """On CPU the trainer never asks (no free memory to read): pretend to be on a device with
    little free memory and check that the budget it plans is the one the batches get and the
    one the checkpoints keep."""
    free = 145 * 2**20  # 128 MiB of it are the estimate's fixed workspace
    monkeypatch.setattr(mlora.trainer, "device_free_bytes", lambda device: free)
    seen = []
    fused = mlora.trainer.fused_batches

    def recording(strategy, streams, cand, sim, max_tokens=None, *args, **kwargs):
        seen.append(max_tokens)
        return fused(strategy, streams, cand, sim, max_tokens, *args, **kwargs)

    monkeypatch.setattr(mlora.trainer, "fused_batches", recording)
    run = Run(tmp_path, tiny_llama, "auto", train_strategy="fast-fit", save_step=2)
    assert train(run) == 0
    from mlora.config import load_config
    from mlora.loader import read_model_config

    cfg = load_config(run.path)
    _, args = read_model_config(tiny_llama)
    expected = plan_token_budget(cfg, args, free_bytes=free, dtype=torch.float32)
    # Binding: 2 rows of cutoff_len, where the untrimmed fused batches hold 5 rows.
    assert expected.max_tokens == 2 * 64 and seen == [expected.max_tokens]
    assert expected.note in capsys.readouterr().err
    from mlora.checkpoint import list_checkpoints

    found = list_checkpoints(run.out)
    assert len(found) > 1
    for _, directory in found:
        state = torch.load(directory / "state.pt", weights_only=True)
        assert state["max_tokens_per_batch"] == expected.max_tokens

    # Resume from the first checkpoint with more memory free: the batches must replay with the
    # budget the run had, or the adapters would land elsewhere.
    finished = {n: run.weights(n) for n in NAMES}
    (run.out / "checkpoints" / "FINISHED.json").unlink()
    for _, directory in found[1:]:
        shutil.rmtree(directory)
    monkeypatch.setattr(mlora.trainer, "device_free_bytes", lambda device: 4 * free)
    seen.clear()
    assert main(["train", "--base_model", str(run.base), "--config", str(run.path), "--no_progress",
                 "--resume"]) == 0
    assert seen == [expected.max_tokens]
    assert f"mlora: token budget {expected.max_tokens} (as the run being resumed)" in capsys.readouterr().err
    for name in NAMES:
        assert rel_diff(run.weights(name), finished[name]) <= 1e-6


# ----------------------------------------------------------------------------- evaluation


def test_evaluation_splits_a_batch_that_does_not_fit(tmp_path, tiny_llama, monkeypatch):
    """Evaluation sums over rows, so a split batch gives the same loss; a single row that does
    not fit is a one-line UserError."""
    from mlora.evaluate import evaluate_adapter
    from mlora.session import open_session

    session = open_session(tiny_llama, make_config(tmp_path, tmp_path / "out"))
    examples = session.data["a"].train  # test_batch_size 16: one batch of all 6 rows
    expected = evaluate_adapter(session, "a", examples)
    limit, calls = [1], []
    forward = CausalLM.forward

    def patched(self, x, *args, **kwargs):
        calls.append(x.shape[0])
        if x.shape[0] > limit[0]:
            raise oom(x.shape[0])
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(CausalLM, "forward", patched)
    loss, count = evaluate_adapter(session, "a", examples)
    assert count == expected[1] and loss == pytest.approx(expected[0], rel=1e-6)
    assert calls[0] == len(examples) and calls.count(1) == len(examples)
    limit[0] = 0
    with pytest.raises(UserError, match="out of device memory on a single row") as info:
        evaluate_adapter(session, "a", examples)
    assert "\n" not in str(info.value)
