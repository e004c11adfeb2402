"""fp16 loss scaling (loss_scale.py): without it fp16 LoRA gradients underflow at realistic step
sizes; with it they equal fp32's to fp16's rounding; overflows skip a step and halve the scale,
in one process as in the pipeline; the scale is exact to divide out and survives a checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

import mlora.loss as loss
from mlora.adapter import Adapter
from mlora.loss_scale import GROWTH_INTERVAL, MIN_TOKEN_SCALE, LossScale, needs_loss_scaling
from mlora.metrics import read_metrics
from mlora.quant import QuantConfig

from test_adapter_step import _adapter, _set_grads
from test_loss import batch, model_with_lora


def lora_grads(dtype: torch.dtype, step_tokens: int, scale: float = 1.0) -> list[torch.Tensor]:
    """test_loss's two adapters' LoRA gradients in fp32, their CE sums divided by `step_tokens`
    (the trainer's normaliser), the loss multiplied by `scale` and the gradients divided by it."""
    model, layout, params = model_with_lora("plain", dtype)
    ids, labels, rows = batch()
    layout.rows = rows
    sums = loss.head_loss_sums(model, model(ids, head=False), labels, rows)
    (sum(ce for ce, _ in sums.values()) / step_tokens * scale).backward()
    return [p.grad.float() / scale for p in params]


def worst_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(((g - r).norm() / r.norm()).item() for g, r in zip(got, ref))


@pytest.mark.parametrize("step_tokens", [10**4, 10**5, 10**6])
def test_fp16_lora_gradients_need_the_loss_scale(step_tokens):
    """A step of 10^4 to 10^6 label tokens (16 rows of 512 to a 2K-row step): unscaled, fp16's
    range loses much or all of the LoRA gradients (measured: 41 %, 100 %, 115 % error); with
    the scale the adapter starts at, they are fp32's to fp16's rounding (measured 0.0013-0.0017)."""
    ref = lora_grads(torch.float32, step_tokens)
    assert worst_error(lora_grads(torch.float16, step_tokens), ref) > 0.3
    scale = LossScale().for_step(step_tokens)
    assert worst_error(lora_grads(torch.float16, step_tokens, scale), ref) < 5e-3


def test_the_scale_follows_each_steps_size_halves_on_overflow_and_grows():
    s = LossScale()
    assert s.for_step(2500) == 2048.0 and s.for_step(3000) == 4096.0  # 2^round(log2 T): per token ~1
    assert s.for_step(0) == 1.0 and s.for_step(1) == 1.0 and s.for_step(3) == 4.0
    assert s.back_off() and s.per_token == 0.5 and s.for_step(2500) == 1024.0
    for _ in range(GROWTH_INTERVAL - 1):
        s.stepped()
    assert s.per_token == 0.5
    s.stepped()
    assert s.per_token == 1.0 and s.clean_steps == 0
    s.stepped()
    assert s.back_off() and s.per_token == 0.5 and s.clean_steps == 0  # an overflow restarts the count
    low = LossScale(2 * MIN_TOKEN_SCALE)
    assert low.back_off() and low.per_token == MIN_TOKEN_SCALE
    assert not low.back_off() and low.per_token == MIN_TOKEN_SCALE  # no further: a non-finite gradient
    assert LossScale.from_state(s.state()) == s


def test_only_an_fp16_backward_is_scaled():
    assert needs_loss_scaling(torch.float16)
    assert not needs_loss_scaling(torch.bfloat16) and not needs_loss_scaling(torch.float32)
    assert needs_loss_scaling(torch.bfloat16, QuantConfig(4, compute_dtype=torch.float16))
    assert not needs_loss_scaling(torch.bfloat16, QuantConfig(4))
    assert not needs_loss_scaling(torch.bfloat16, QuantConfig(8))  # (its backward runs in bf16)


def scaled(adapter: Adapter, step_tokens: int) -> float:
    adapter.loss_scale = LossScale()
    return adapter.loss_scale_for(step_tokens)


@pytest.mark.parametrize("on_device", [False, True], ids=["host_step", "step_on_device"])
@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_a_scaled_gradient_steps_exactly_as_the_unscaled_one(on_device, max_grad_norm):
    """Gradients multiplied by the scale (a power of two) give the same norms, clipping, weights
    and optimizer state as the unscaled ones, to the last bit, in both step paths."""
    plain, scaled_one = _adapter(max_grad_norm), _adapter(max_grad_norm)
    scale = scaled(scaled_one, 2500)
    for step, size in enumerate([0.001, 0.3, 0.02]):  # below and above the clipping limit
        _set_grads(plain, step, size)
        _set_grads(scaled_one, step, size)
        for p in scaled_one.parameters():
            p.grad.mul_(scale)
        assert scaled_one.grad_sq().item() == plain.grad_sq().item()
        if on_device:
            (_, a), (_, b) = plain.step_on_device(), scaled_one.step_on_device()
            assert a.item() == b.item()
        else:
            assert plain.step() == scaled_one.step()
        assert not scaled_one.update_loss_scale(True) and scaled_one.loss_scale_for(2500) == scale
    for p, q in zip(plain.parameters(), scaled_one.parameters()):
        assert torch.equal(p, q)
    for key, value in plain.optimizer.state[plain.flat.param].items():
        assert torch.equal(value, scaled_one.optimizer.state[scaled_one.flat.param][key]), key


def test_the_scale_is_part_of_the_checkpoint():
    adapter, again = _adapter(), _adapter()
    scaled(adapter, 2500)
    scaled(again, 50)
    adapter.update_loss_scale(False)
    adapter.update_loss_scale(True)
    again.restore_from_checkpoint(adapter.state_for_checkpoint())
    assert again.loss_scale == adapter.loss_scale == LossScale(0.5, 1)
    assert again._unscale() == adapter._unscale() == 1 / 2048  # the step in progress's scale


def test_unscaled_gradients_stay_flagged_through_a_checkpoint_before_their_next_micro_batch():
    """Gradients of a half-finished step restored from a checkpoint without "loss_scale" are
    unscaled until the step's next micro-batch scales them. A checkpoint written before that
    micro-batch (other adapters' batches ran, then save_step or a signal) must say so: resumed
    from it, the step must still scale them, not divide its scale out of gradients that never
    had it."""
    old = _adapter(None)
    _set_grads(old, 0, 0.01)
    unscaled = [p.grad.clone() for p in old.parameters()]
    saved = old.state_for_checkpoint()  # (no loss scaling: "loss_scale" None, as before it existed)
    resumed, again = _adapter(None), _adapter(None)
    scaled(resumed, 2500)
    resumed.restore_from_checkpoint(saved)
    scaled(again, 2500)
    again.restore_from_checkpoint(resumed.state_for_checkpoint())  # before the step's next micro-batch
    scale = again.loss_scale_for(2500)
    assert scale == 2048.0
    for p, g in zip(again.parameters(), unscaled):
        assert torch.equal(p.grad, g * scale)
    assert again.grad_sq().item() == old.grad_sq().item()


@pytest.fixture
def overflowing_start(monkeypatch):
    """Every adapter starts at a scale of 2^15 per token, where the tiny model's fp16 gradients
    overflow (they stop near 2^13)."""
    import functools

    import mlora.adapter

    monkeypatch.setattr(mlora.adapter, "LossScale", functools.partial(LossScale, 2.0 ** 15))


def train_steps(out) -> dict[str, list[tuple]]:
    """{adapter: [(step, skip reason or None, loss scale when skipped)]} from metrics.jsonl."""
    steps = {}
    for m in read_metrics(out / "metrics.jsonl"):
        if "loss" in m:
            steps.setdefault(m["adapter"], []).append((m["step"], m.get("reason"), m.get("loss_scale")))
    return steps


def test_fp16_overflows_skip_the_step_and_halve_the_scale_in_one_process_and_the_pipeline(
        tmp_path, pipe_model, overflowing_start, capsys):
    """Overflowing steps are skipped with the scale halved each time and no on_nan (the adapters
    say "stop"), then training goes on; a 2-rank pipeline, whose ranks each keep the scale, skips
    the same steps at the same scales and ends with the same adapters."""
    from mlora.cli import main

    from test_pipeline import write_config
    from test_pipeline_inprocess import run_threads
    from test_train import rel_diff
    from safetensors.torch import load_file

    cfg_path = write_config(tmp_path, 2, tmp_path / "single")
    cfg = json.loads(cfg_path.read_text())
    for adapter in cfg["lora"]:
        adapter["on_nan"] = "stop"
    cfg_path.write_text(json.dumps(cfg))
    assert main(["train", "--base_model", str(pipe_model), "--config", str(cfg_path), "--no_progress",
                 "--dtype", "fp16"]) == 0
    said = capsys.readouterr()
    assert "[p0] step 1: fp16 gradient overflow; step skipped, loss scale now 16384 per token" in said.out + said.err
    single = train_steps(tmp_path / "single")
    for name, steps in single.items():
        skipped = [s for s in steps if s[1] is not None]
        assert skipped and all(reason == "fp16 gradient overflow" for _, reason, _ in skipped), name
        assert [scale for *_, scale in skipped] == [2.0 ** (14 - i) for i in range(len(skipped))], name
        assert steps[len(skipped):] and all(reason is None for _, reason, _ in steps[len(skipped):]), name
        assert [step for step, *_ in steps] == list(range(1, len(steps) + 1)), name
    run_threads(pipe_model, cfg_path, tmp_path / "pipe", 2, [3, 4], dtype="fp16")
    assert train_steps(tmp_path / "pipe") == single
    for name in single:
        pipe = load_file(tmp_path / "pipe" / name / "adapter_model.safetensors")
        one = load_file(tmp_path / "single" / name / "adapter_model.safetensors")
        assert rel_diff(pipe, one) <= 5e-3, name  # (fp16: one process fuses the rows, the pipeline not)
        assert math.isfinite(sum(t.float().abs().sum().item() for t in one.values()))


def test_a_first_step_without_label_tokens_sets_no_later_scale(tmp_path, pipe_model, monkeypatch):
    """A first step whose rows have no label tokens (all cut off by cutoff_len) has a zero loss
    and a scale of 1; the later steps' scales follow their own label tokens, in one process and
    in the pipeline. (A first design set the scale once, from the first step: at 1 here, where
    fp16 would underflow from then on.)"""
    from mlora.cli import main

    from test_pipeline_inprocess import run_threads
    from test_train import alpaca_rows, make_template, write_jsonl

    calls = []  # (step tokens asked for, scale returned)
    start = LossScale.for_step

    def spy(self, step_tokens):
        scale = start(self, step_tokens)
        calls.append((step_tokens, scale))
        return scale

    monkeypatch.setattr(LossScale, "for_step", spy)
    long = [{"instruction": "reverse the words", "input": " ".join(["tea"] * 80), "output": "tea"}] * 2
    adapter = {"name": "z", "data": write_jsonl(tmp_path / "z.jsonl", long + alpaca_rows(4, 1)),
               "prompt": make_template(tmp_path), "r": 4, "dropout": 0.0, "batch_size": 1, "micro_batch_size": 1,
               "num_epochs": 1, "group_by_length": True}  # the longest row (no label left) first
    cfg_path = tmp_path / "zero.json"
    cfg_path.write_text(json.dumps({"cutoff_len": 64, "seed": 11, "output_dir": str(tmp_path / "single"),
                                    "lora": [adapter]}))
    for run in ("single", "pipe"):
        calls.clear()
        if run == "single":
            assert main(["train", "--base_model", str(pipe_model), "--config", str(cfg_path), "--no_progress",
                         "--dtype", "fp16"]) == 0
        else:
            run_threads(pipe_model, cfg_path, tmp_path / "pipe", 2, [3, 4], dtype="fp16")
        assert calls[0][0] <= 1, calls  # the first step has no label token
        later = [scale for tokens, scale in calls if tokens >= 2]
        assert later and all(scale > 1 for scale in later), (run, calls)


def test_resuming_a_checkpoint_from_before_loss_scaling_mid_step(tmp_path, tiny_llama):
    """A checkpoint of an mlora before loss scaling holds no "loss_scale", and its gradients of a
    half-finished step are unscaled: the scale the step's next micro-batch sets must be applied to
    them too, or the step divides it out of gradients that never had it. Made here from a
    checkpoint of this mlora (its gradients divided by their scale, the key removed): the run
    resumed from it ends exactly where the uninterrupted one did."""
    import hashlib
    import io
    import shutil

    from mlora.checkpoint import list_checkpoints
    from mlora.cli import main
    from safetensors.torch import load_file

    from test_resume import write_config
    from test_train import rel_diff

    out, old = tmp_path / "out", tmp_path / "old"
    cfg = write_config(tmp_path, out)
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress",
                 "--dtype", "fp16"]) == 0
    shutil.copytree(out, old)
    (old / "checkpoints" / "FINISHED.json").unlink()
    made = False
    for _, path in list_checkpoints(old):
        if made:
            shutil.rmtree(path)
            continue
        state = torch.load(path / "state.pt", weights_only=True)
        mid_step = [s for s in state["adapters"].values() if s["grads"]]
        if not mid_step:
            continue
        for saved in state["adapters"].values():
            scale = saved.pop("loss_scale")["step_scale"]
            saved["grads"] = {n: g / scale for n, g in saved["grads"].items()}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        (path / "state.pt").write_bytes(payload)
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["files"]["state.pt"] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
        (path / "manifest.json").write_text(json.dumps(manifest))
        made = True
    assert made, "no checkpoint was written mid-step"
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress",
                 "--dtype", "fp16", "--output_dir", str(old), "--resume"]) == 0
    for name in ("a", "b"):
        assert rel_diff(load_file(old / name / "adapter_model.safetensors"),
                        load_file(out / name / "adapter_model.safetensors")) <= 1e-6, name


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_fp16_on_the_cpu_says_it_is_slow(tmp_path, tiny_llama, capsys, dtype):
    from mlora.session import open_session

    from test_train import make_config

    session = open_session(tiny_llama, make_config(tmp_path, ["a"], tmp_path / "out"), device="cpu", dtype=dtype,
                           load_base=False)
    assert session.loss_scaling == (dtype == "fp16")
    assert ("fp16 on the CPU is slow" in capsys.readouterr().err) == (dtype == "fp16")


def test_a_4bit_compute_dtype_is_noted_on_its_own(tmp_path, tiny_llama, capsys):
    """--compute_dtype fp16 on the CPU under an fp32 run gets the note too, naming its flag."""
    pytest.importorskip("bitsandbytes")  # (a 4-bit base's session needs it)
    from mlora.session import open_session

    from test_train import make_config

    config = make_config(tmp_path, ["a"], tmp_path / "out")
    open_session(tiny_llama, config, device="cpu", dtype="fp32", load_base=False,
                 quant=QuantConfig(bits=4, compute_dtype=torch.float16))
    assert "fp16 on the CPU is slow" in capsys.readouterr().err
    open_session(tiny_llama, config, device="cpu", dtype="fp32", load_base=False,
                 quant=QuantConfig(bits=4, compute_dtype=torch.float32))
    assert capsys.readouterr().err == ""
