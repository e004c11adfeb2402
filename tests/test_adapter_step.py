"""An adapter's optimizer step queued without reading anything back from the device
(Adapter.step_on_device), against the host-decided step, and the trainer's one read per
fused batch."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from mlora.adapter import Adapter
from mlora.config import AdapterConfig
from mlora.lora import TARGET_MODULES, BatchLayout, inject_lora


def _adapter(max_grad_norm=1.0, seed=1, **overrides):
    from transformers import LlamaConfig

    from mlora.models.llama import CausalLM, args_from_hf_config

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    model = CausalLM(args_from_hf_config(config)).requires_grad_(False)
    wrappers = inject_lora(model, BatchLayout())
    cfg = AdapterConfig(name="a", data="<test>", r=4, alpha=8, dropout=0.0, target_modules=list(TARGET_MODULES),
                        lr=0.05, weight_decay=0.01, max_grad_norm=max_grad_norm, lr_scheduler="cosine",
                        warmup_steps=1, **overrides)
    return Adapter(cfg, wrappers, seed=seed, device=torch.device("cpu"), total_steps=6)


def _set_grads(adapter, step, scale):
    g = torch.Generator().manual_seed(100 + step)
    for p in adapter.parameters():
        p.grad = torch.randn(p.shape, generator=g) * scale


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.3, None])
def test_step_on_device_equals_the_host_step_bit_for_bit(max_grad_norm):
    """Clipped steps (gradient norm above the limit), unclipped ones and no clipping at all:
    the same weights, optimizer state and norms, to the last bit. (0.3: a limit that is not a
    power of two, where limit / tensor, a reciprocal times the limit, rounds twice.)"""
    host, device = _adapter(max_grad_norm), _adapter(max_grad_norm)
    norms = []
    for step, scale in enumerate([0.001, 0.05, 0.002, 0.3, 0.0005]):
        _set_grads(host, step, scale)
        _set_grads(device, step, scale)
        lr_h, norm_h = host.step()
        lr_d, sq = device.step_on_device()
        assert lr_h == lr_d and norm_h == math.sqrt(sq.item())
        assert device.steps_done == host.steps_done == step + 1
        norms.append(norm_h)
    limit = max_grad_norm or 1.0
    assert min(norms) < limit < max(norms)  # both sides of the clipping limit
    for (name, p), q in zip(host.named_parameters(), device.parameters()):
        assert torch.equal(p, q), name
        assert q.grad is None
    host_state, device_state = host.optimizer.state[host.flat.param], device.optimizer.state[device.flat.param]
    assert set(host_state) == set(device_state) == {"step", "exp_avg", "exp_avg_sq"}
    for key, value in host_state.items():
        assert torch.equal(value, device_state[key]), key


@pytest.mark.parametrize("poison", ["nan_grad", "inf_grad", "bad_loss"])
def test_step_on_device_skips_a_non_finite_step_on_the_device(poison):
    """A non-finite gradient norm, or `bad` (a non-finite loss), leaves the weights and the
    optimizer state as they were; the gradients are dropped and the step is counted, as
    skip_step does; the next finite step goes on as if the bad one had not happened."""
    adapter, reference = _adapter(), _adapter()
    for a in (adapter, reference):
        _set_grads(a, 0, 0.01)
        a.step_on_device()
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    state = {k: v.clone() for k, v in adapter.optimizer.state[adapter.flat.param].items()}
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    _set_grads(adapter, 1, 0.01)
    bad = None
    if poison == "bad_loss":
        bad = torch.tensor(True)
    else:
        adapter.parameters()[3].grad[0, 0] = float("nan") if poison == "nan_grad" else float("inf")
    _, sq = adapter.step_on_device(bad)
    assert (poison == "bad_loss") == bool(torch.isfinite(sq))
    assert adapter.steps_done == 2 and all(p.grad is None for p in adapter.parameters())
    for n, p in adapter.named_parameters():
        assert torch.equal(p, before[n]), n
    for k, v in adapter.optimizer.state[adapter.flat.param].items():
        assert torch.equal(v, state[k]), k
    reference.skip_step()
    for a in (adapter, reference):  # and on from there alike
        _set_grads(a, 2, 0.01)
        a.step_on_device()
    for p, q in zip(adapter.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_the_trainer_reads_the_device_once_per_fused_batch(tmp_path, tiny_llama, monkeypatch):
    """Forward, loss, backward and every adapter's optimizer step of a fused batch are queued
    without reading anything back from the device; the losses and gradient norms come back
    in one read at the end. (On a GPU each read waits for the queue to drain, and the GPU
    idles until the host queues more: the step used to read three times per adapter.) Two
    AdamW adapters and an SGD one, whose step the host takes after the read (SGD cannot skip
    a step on the device's word), with the norm that read brought. (And the batch's NaN
    culprits, Trainer._culprits, are worked out once, not again for _nan_victims.)"""
    from test_train import make_config

    from mlora.cli import main
    from mlora.trainer import Trainer

    reads, inside = [], [False]
    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            # The model's check of the attention mask reads the host's copy (FusedBatch.to
            # leaves the mask there), not the device's: on the CPU the two look alike.
            if inside[0] and sys._getframe(1).f_code.co_name != "attention_masks":
                reads[-1].append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    train_on, culprits, culprit_calls, culprit_counts = Trainer._train_on, Trainer._culprits, [], []

    def counted_culprits(*args):
        culprit_calls.append(1)
        return culprits(*args)

    monkeypatch.setattr(Trainer, "_culprits", staticmethod(counted_culprits))

    def counted(self, parts):
        if inside[0]:  # a rerun after a NaN (none here) counts with its batch
            return train_on(self, parts)
        reads.append([])
        culprit_calls.clear()
        inside[0] = True
        try:
            return train_on(self, parts)
        finally:
            inside[0] = False
            reads[-1] = (reads[-1], [p.adapter for p in parts if p.last_in_step])
            culprit_counts.append(len(culprit_calls))

    monkeypatch.setattr(Trainer, "_train_on", counted)
    cfg = make_config(tmp_path, ["a", "b", "c"], tmp_path / "out")
    assert main(["train", "--base_model", str(tiny_llama), "--config", str(cfg), "--no_progress"]) == 0
    assert reads
    assert any("b" in stepping for _, stepping in reads)  # test_train's b is the SGD adapter
    for names, stepping in reads:
        assert names == ["tolist"], (names, stepping)
    assert set(culprit_counts) == {1}  # a batch's culprits are worked out once


def test_a_resumed_older_state_steps_on_the_device(tmp_path):
    """An older mlora stepped AdamW unfused on the CPU; loading such a state brings back its
    `fused=None`, which would make step_on_device's found_inf fail: restoring sets it fused."""
    adapter = _adapter()
    _set_grads(adapter, 0, 0.01)
    adapter.step()
    state = adapter.state_for_checkpoint()
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = None
    again = _adapter()
    again.restore_from_checkpoint(state)
    assert again.steps_on_device
    _set_grads(again, 1, 0.01)
    again.step_on_device(torch.tensor(False))
    assert again.steps_done == 2


def test_the_device_clip_factor_is_the_host_one_where_rounding_could_split_them():
    """Norms that put limit / (norm + 1e-6) right between two fp32 values, where one rounding
    more (limit / tensor is a reciprocal times the limit) lands on the other neighbour."""
    import random
    import struct

    from mlora.adapter import clip_factor

    rng = random.Random(1)
    for limit in (0.3, 1.0, 5.0):
        for _ in range(20000):
            f32 = struct.unpack("f", struct.pack("f", rng.uniform(0.01, 0.99)))[0]
            bits = struct.unpack("I", struct.pack("f", f32))[0]
            midpoint = (f32 + struct.unpack("f", struct.pack("I", bits + 1))[0]) / 2
            norm = limit / midpoint - 1e-6
            host = torch.tensor(limit / (norm + 1e-6), dtype=torch.float64).float()
            device = clip_factor(torch.tensor(norm, dtype=torch.float64), limit)
            assert torch.equal(device, host), (limit, norm)


def test_nan_victims_rule():
    """Which parts of a fused batch run again after a NaN (Trainer._nan_victims): with a
    non-finite loss, the others whose gradient is non-finite, together; with none but several
    non-finite gradients, each of those alone; one non-finite gradient is that adapter's own."""
    from mlora.trainer import Trainer

    nan, inf = float("nan"), float("inf")
    assert Trainer._nan_victims([1.0, nan, 2.0], {0: nan, 1: nan, 2: 0.5}) == ([0], True)
    assert Trainer._nan_victims([1.0, 2.0, 3.0], {0: inf, 1: 0.1, 2: nan}) == ([0, 2], False)
    assert Trainer._nan_victims([1.0, 2.0], {0: nan, 1: 0.1}) == ([], False)
    assert Trainer._nan_victims([nan, 2.0], {0: nan, 1: 0.1}) == ([], False)
    # A part whose step has no token to learn (its loss 0 whatever its rows hold) is a culprit
    # by its non-finite gradient, and never runs again.
    assert Trainer._nan_victims([1.0, 0.0], {0: nan, 1: nan}, unlearnable={1}) == ([0], True)
    assert Trainer._nan_victims([nan, 0.0], {1: nan}, unlearnable={1}) == ([], False)
    assert Trainer._nan_victims([1.0, 0.0, 0.0], {1: nan, 2: inf}, unlearnable={1, 2}) == ([], False)


def test_an_r_above_either_side_of_a_projection_is_refused_in_one_line():
    """r may exceed the smaller side of a projection (PEFT allows it; Qwen3.5's in_proj_b is 32
    outputs wide under an r of 64), but not both sides: weights beyond the projection's own."""
    from transformers import LlamaConfig

    from mlora.errors import UserError
    from mlora.models.llama import CausalLM, args_from_hf_config

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=1, vocab_size=64)  # k_proj: 8 x 32
    wrappers = inject_lora(CausalLM(args_from_hf_config(config)).requires_grad_(False), BatchLayout())

    def adapter(r):
        cfg = AdapterConfig(name="a", data="<test>", r=r, alpha=8, dropout=0.0, target_modules=["k_proj"])
        return Adapter(cfg, wrappers, seed=1, device=torch.device("cpu"))

    assert adapter(16).weights["model.layers.0.self_attn.k_proj"].lora_A.shape == (16, 32)
    with pytest.raises(UserError, match=r"adapter 'a': r=33 is more than either side of "
                                        r"model\.layers\.0\.self_attn\.k_proj \(8 x 32\)"):
        adapter(33)
