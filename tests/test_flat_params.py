"""An adapter's weights as views of one fp32 buffer (flat_params.py): the optimizer steps it as
one tensor exactly as it stepped each weight, older per-weight optimizer states resume, and
the fused op's casts are views of one cast per adapter that follows every write."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch._utils import _unflatten_dense_tensors
from torch.utils._python_dispatch import TorchDispatchMode

import mlora.lora as lora
from mlora.adapter import Adapter
from mlora.config import AdapterConfig
from mlora.flat_params import FlatParameters, cast_of, owner_of
from mlora.lora import TARGET_MODULES, AdapterRows, BatchLayout, inject_lora


def _model(dtype=torch.float32, layers=2):
    from transformers import LlamaConfig

    from mlora.models.llama import CausalLM, args_from_hf_config

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    return CausalLM(args_from_hf_config(config)).requires_grad_(False).to(dtype)


def _adapter(wrappers, name="a", optim="adamw", max_grad_norm=None, seed=1):
    cfg = AdapterConfig(name=name, data="<test>", r=4, alpha=8, dropout=0.0, target_modules=list(TARGET_MODULES),
                        optim=optim, lr=0.05, weight_decay=0.01, momentum=0.9, max_grad_norm=max_grad_norm,
                        lr_scheduler="cosine", warmup_steps=1)
    return Adapter(cfg, wrappers, seed=seed, device=torch.device("cpu"), total_steps=8)


def _grads(params, step, missing=(), scale=0.01):
    g = torch.Generator().manual_seed(100 + step)
    return [None if i in missing else torch.randn(p.shape, generator=g) * scale for i, p in enumerate(params)]


def test_weights_become_views_of_one_buffer_with_their_values():
    params = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7)),
              torch.nn.Parameter(torch.randn(2, 2, 2))]
    values = [p.detach().clone() for p in params]
    flat = FlatParameters(params)
    assert flat.param.shape == (15 + 7 + 8,)
    offsets = [0, 15, 22]  # (each one after the one before)
    for p, v, o in zip(params, values, offsets):
        assert torch.equal(p, v) and p.is_leaf and p.requires_grad
        assert p.data_ptr() == flat.param.data_ptr() + 4 * o
    with torch.no_grad():
        flat.param.add_(1.0)  # what the optimizer does
    for p, v in zip(params, values):
        assert torch.equal(p, v + 1)
    assert owner_of(params[1]) == (flat, 1)
    assert owner_of(copy.deepcopy(params[1])) is None  # a copy is not the buffer's
    with pytest.raises(ValueError):
        FlatParameters([torch.nn.Parameter(torch.randn(2, dtype=torch.float64))])


def test_a_dropped_adapter_frees_its_buffer_and_cast(monkeypatch):
    """`mlora eval` builds, uses and drops one adapter after another: each one's fp32 buffer
    and 16-bit cast must go with it, not stay reachable from flat_params' registry, nor from
    the fused op's cached plans and casts of the batch it last ran in."""
    monkeypatch.setattr(lora, "kernel", "fused")
    model = _model(torch.bfloat16)
    layout = BatchLayout()
    wrappers = inject_lora(model, layout)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    for name in "ab":
        adapter = _adapter(wrappers, name)
        layout.rows = [AdapterRows(name, 0, 2)]
        with torch.no_grad():
            model(ids)  # the groups now keep the batch's plan and casts
        layout.rows = []
        buffer, cast = weakref.ref(adapter.flat.param), weakref.ref(adapter.flat._cast)
        adapter.detach_from(wrappers)
        del adapter
        gc.collect()
        assert buffer() is None and cast() is None


def test_the_gradient_is_gathered_by_the_step_only():
    """grad_sq (a pipeline stage reads it, then runs other micro-batches until the step) makes
    nothing the size of the gradient: the adapter holds its gradient once until the step,
    which gathers it, steps, and lets it go."""
    adapter = _adapter(inject_lora(_model(), BatchLayout()))
    params = adapter.parameters()
    grads = _grads(params, 0, missing={3})
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    total = adapter.flat.param.numel()
    gathered = []
    real_cat = torch.cat

    def cat(tensors, *args, **kwargs):
        out = real_cat(tensors, *args, **kwargs)
        if out.numel() == total:
            gathered.append(weakref.ref(out))
        return out

    torch.cat = cat
    try:
        sq = adapter.grad_sq()
        assert not gathered
        expected = sum(float((g.double() ** 2).sum()) for g in grads if g is not None)
        assert float(sq) == pytest.approx(expected, rel=1e-5)
        adapter.step_on_device(sq=sq)
    finally:
        torch.cat = real_cat
    gc.collect()
    assert len(gathered) == 1 and gathered[0]() is None  # the step's, gone with it
    assert adapter.flat.param.grad is None and all(p.grad is None for p in params)


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_the_one_tensor_step_is_the_per_weight_step(optim):
    """The adapter's steps (clipped and not, a weight without a gradient in one step) give
    the weights and optimizer state that the same optimizer stepping each weight gives."""
    adapter = _adapter(inject_lora(_model(), BatchLayout()), optim=optim, max_grad_norm=0.1)
    params = adapter.parameters()
    reference = [p.detach().clone().requires_grad_() for p in params]
    cfg = adapter.cfg
    if optim == "adamw":
        ref_opt = torch.optim.AdamW(reference, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    else:
        ref_opt = torch.optim.SGD(reference, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    clipped = 0
    for step, scale in enumerate([0.0005, 0.01, 0.001, 0.02]):  # norms below and above the limit
        missing = {3, 8} if step == 1 else set()  # (an MoE expert without tokens: a zero gradient)
        grads = _grads(params, step, missing, scale)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        lr, norm = adapter.step()
        # the reference: the norm over every weight's gradient, the same clipping, a zero
        # gradient for a weight without one
        full = [torch.zeros_like(p) if g is None else g.clone() for p, g in zip(params, grads)]
        ref_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in full])).item()
        assert norm == pytest.approx(ref_norm, rel=1e-6)
        if norm > cfg.max_grad_norm:
            clipped += 1
            for g in full:
                g.mul_(cfg.max_grad_norm / (norm + 1e-6))
        for group in ref_opt.param_groups:
            group["lr"] = lr
        for r, g in zip(reference, full):
            r.grad = g
        ref_opt.step()
        ref_opt.zero_grad()
    assert 0 < clipped < 4
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
        assert p.grad is None
    state = adapter.optimizer.state[adapter.flat.param]
    for key in ("exp_avg", "exp_avg_sq") if optim == "adamw" else ("momentum_buffer",):
        for p, r in zip(params, reference):
            mine = _unflatten_dense_tensors(state[key], adapter.flat.params)[owner_of(p)[1]]
            torch.testing.assert_close(mine, ref_opt.state[r][key], rtol=1e-6, atol=1e-9)


def test_a_per_weight_optimizer_state_of_an_older_mlora_resumes():
    """A checkpoint of an mlora before flat_params.py holds one optimizer state per weight:
    restoring it gives the state of one tensor, and the run goes on as the per-weight one."""
    adapter = _adapter(inject_lora(_model(), BatchLayout()))
    params = adapter.parameters()
    # what the older mlora did: fused AdamW over the weights themselves
    old = [p.detach().clone().requires_grad_() for p in params]
    old_opt = torch.optim.AdamW(old, lr=0.05, weight_decay=0.01, fused=True)
    for step in range(2):
        for r, g in zip(old, _grads(params, step)):
            r.grad = g
        old_opt.step()
    saved = adapter.state_for_checkpoint()
    saved["params"] = {n: r.detach().clone() for (n, _), r in zip(adapter.named_parameters(), old)}
    saved["optimizer"] = old_opt.state_dict()
    saved["steps_done"] = 2
    assert len(saved["optimizer"]["state"]) == len(params) > 1
    resumed = _adapter(inject_lora(_model(), BatchLayout()))
    resumed.restore_from_checkpoint(saved)
    for group in old_opt.param_groups:
        group["lr"] = resumed.current_lr()
    for r, g in zip(old, _grads(params, 2)):
        r.grad = g
    old_opt.step()
    for p, g in zip(resumed.parameters(), _grads(params, 2)):
        p.grad = g
    resumed.step_on_device()
    for p, r in zip(resumed.parameters(), old):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)


class _Casts(TorchDispatchMode):
    """Counts fp32 -> 16-bit casts."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 and out.dtype == torch.bfloat16:
            self.count += 1
        return out


def test_the_fused_ops_casts_are_one_cast_per_adapter_that_follows_every_write(monkeypatch):
    """bf16: after a step the fused op's weights are views of one cast per adapter (a cast per
    weight kind and input group before), equal to each weight's own cast, also after an
    in-place write to one weight outside the optimizer."""
    monkeypatch.setattr(lora, "kernel", "fused")
    model = _model(torch.bfloat16, layers=3)
    layout = BatchLayout()
    wrappers = inject_lora(model, layout)
    adapters = [_adapter(wrappers, name) for name in "ab"]
    ids = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(0))

    def casts(rows):
        layout.rows = rows
        with _Casts() as counting:
            logits = model(ids)
        return counting.count, logits

    model.train()
    base_casts, _ = casts([])
    both = [AdapterRows("a", 0, 2), AdapterRows("b", 2, 4)]
    for step in range(2):
        count, logits = casts(both)
        assert count - base_casts == 2  # one per adapter
        logits.float().logsumexp(-1).mean().backward()
        for a in adapters:
            a.step_on_device()
    count, _ = casts(both)
    assert count - base_casts == 2
    for a in adapters:
        for p in a.parameters():
            assert torch.equal(cast_of(p, torch.bfloat16), p.detach().bfloat16())
    w = adapters[1].weights["model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        w.lora_B.add_(0.5)  # a write the optimizer did not make
    count, _ = casts(both)
    assert count - base_casts == 1  # b's, again
    assert torch.equal(cast_of(w.lora_B, torch.bfloat16), w.lora_B.detach().bfloat16())
    # one adapter: the op reads the cast itself, no concatenation
    casts([AdapterRows("a", 0, 4)])
    group = wrappers["model.layers.0.self_attn.q_proj"].group
    cast = adapters[0].flat._cast
    assert group._casts.a_all.untyped_storage().data_ptr() == cast.untyped_storage().data_ptr()
