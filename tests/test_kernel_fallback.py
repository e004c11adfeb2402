"""kernel_fallback.py: a Triton kernel that `auto` chose and that fails here (a Triton release
that cannot compile or launch it, an API its launch needs missing from the torch installed) hands
its work to torch's ops, with the same results, says so once and is not chosen again; one chosen
by name raises its error, and running out of memory is raised as it is."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import mlora.lora as lora
import mlora.loss as loss
from mlora import kernel_fallback, lora_triton
from mlora.data import IGNORE_INDEX
from mlora.models.llama import CausalLM, ModelArgs

from test_lora import _group_grads
from test_memory import cublas_out_of_memory
from test_recompute import _max_diff, _run as recompute_run


@pytest.fixture(autouse=True)
def no_failures_before_or_after():
    kernel_fallback.forget()
    yield
    kernel_fallback.forget()


# ----------------------------------------------------------------------------- the head's cross-entropy


def _failing_loss_kernels(monkeypatch, error: BaseException) -> list:
    """loss_kernels replaced by a module whose kernel raises `error` (no triton imported);
    returns the list its calls go to."""
    calls = []

    def cross_entropy_grad_(*args, **kwargs):
        calls.append(1)
        raise error

    monkeypatch.setitem(sys.modules, "mlora.loss_kernels",
                        types.SimpleNamespace(cross_entropy_grad_=cross_entropy_grad_))
    return calls


def _head_ce(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token CE of a random plain head over 20 tokens in chunks of 8 (some targets
    ignored), and the gradient of a weighted sum of it with respect to the hidden states."""
    args = ModelArgs("llama", vocab_size=96, hidden_size=16, intermediate_size=16, num_layers=0, num_heads=1,
                     num_kv_heads=1, head_dim=16)
    torch.manual_seed(0)
    model = CausalLM(args, parts=["norm", "head"]).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(20, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 96, (20,), generator=g)
    targets[::5] = IGNORE_INDEX
    ce = loss._ChunkedHeadCrossEntropy.apply(h, targets, model, 8, True, fused)  # [20]
    (ce * torch.linspace(0.5, 2.0, 20)).sum().backward()
    return ce.detach(), h.grad


def test_a_failing_cross_entropy_kernel_under_auto_runs_torchs_ops(monkeypatch, capsys):
    monkeypatch.setattr(loss, "cross_entropy", "auto")
    ref_ce, ref_grad = _head_ce(fused=False)
    calls = _failing_loss_kernels(monkeypatch, RuntimeError("PassManager::run failed\n(details)"))
    ce, grad = _head_ce(fused=True)
    assert torch.equal(ce, ref_ce) and torch.equal(grad, ref_grad)
    assert calls == [1]  # the first chunk tried it; the rest of the call ran torch's ops
    assert kernel_fallback.failure(kernel_fallback.CROSS_ENTROPY) == "RuntimeError: PassManager::run failed"
    _head_ce(fused=True)  # (a call that was already told to: fails again, said no more)
    err = capsys.readouterr().err
    assert err.count("the cross-entropy kernel failed here (RuntimeError: PassManager::run failed)") == 1
    assert "MLORA_CROSS_ENTROPY=torch" in err


def test_a_cross_entropy_kernel_named_raises_and_running_out_of_memory_is_raised(monkeypatch):
    monkeypatch.setattr(loss, "cross_entropy", "triton")
    _failing_loss_kernels(monkeypatch, RuntimeError("PassManager::run failed"))
    with pytest.raises(RuntimeError, match="PassManager"):
        _head_ce(fused=True)
    monkeypatch.setattr(loss, "cross_entropy", "auto")
    _failing_loss_kernels(monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.OutOfMemoryError):
        _head_ce(fused=True)
    # cuBLAS's way of running out of memory too: raised as it is, for the retry in halves
    _failing_loss_kernels(monkeypatch, cublas_out_of_memory())
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_ALLOC_FAILED"):
        _head_ce(fused=True)
    assert kernel_fallback.failures() == {}


# ----------------------------------------------------------------------------- the triton LoRA kernel


def _group_step(monkeypatch, kernel: str) -> tuple[list, dict]:
    """test_lora's group step under `kernel`, `auto` choosing triton (as on a Hopper GPU): the
    outputs and the input gradient, and every LoRA gradient."""
    monkeypatch.setattr(lora, "auto_kernel", lambda device: "triton")
    ys, grads, _, x_grad = _group_grads(monkeypatch, kernel=kernel)
    return ys + [x_grad], grads


def _raises(calls: list, name: str):
    def kernel(*args, **kwargs):
        calls.append(name)
        raise AttributeError("'torch._C.Generator' object has no attribute 'get_offset'")
    return kernel


def test_a_failing_triton_forward_under_auto_runs_the_fused_kernel(monkeypatch, capsys):
    """The forward's draw or kernel fails: that call and every later one are the fused
    kernel's (the same masks, from the same generators), said once."""
    ref_outs, ref_grads = _group_step(monkeypatch, "fused")
    calls = []
    monkeypatch.setattr(lora_triton, "draw", _raises(calls, "draw"))
    outs, grads = _group_step(monkeypatch, "auto")
    assert calls == ["draw"]
    for got, want in zip(outs, ref_outs):
        assert torch.equal(got, want)
    for key, pair in grads.items():
        assert all(torch.equal(g, r) for g, r in zip(pair, ref_grads[key])), key
    assert kernel_fallback.failure(kernel_fallback.LORA).startswith("AttributeError")
    _group_step(monkeypatch, "auto")  # auto runs fused from now on: no Triton call at all
    assert calls == ["draw"]
    assert capsys.readouterr().err.count("the triton kernel failed here") == 1


def test_a_triton_kernel_named_raises(monkeypatch):
    monkeypatch.setattr(lora_triton, "draw", _raises([], "draw"))
    with pytest.raises(AttributeError, match="get_offset"):
        _group_step(monkeypatch, "triton")
    assert kernel_fallback.failures() == {}


@pytest.mark.skipif(lora_triton.unavailable(torch.device("cpu")) is not None,
                    reason="the triton kernel's interpreter run needs triton >= 3.9")
def test_failing_triton_backward_kernels_under_auto_use_the_forwards_mask_in_torchs_ops(monkeypatch):
    """The forward's kernel ran (its mask kept as bits) and the backward's fail: the input and
    LoRA gradients are the triton kernel's, computed by torch's ops from the same bits."""
    ref_outs, ref_grads = _group_step(monkeypatch, "triton")
    calls = []
    monkeypatch.setattr(lora_triton, "up_masked", _raises(calls, "up_masked"))
    monkeypatch.setattr(lora_triton, "grad_a", _raises(calls, "grad_a"))
    outs, grads = _group_step(monkeypatch, "auto")
    assert calls == ["up_masked", "grad_a"]  # (one input group, one backward)
    for got, want in zip(outs, ref_outs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for key, pair in grads.items():
        for g, r in zip(pair, ref_grads[key]):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the triton LoRA kernel under recompute


def _fails_on(monkeypatch, name: str, when) -> list:
    """lora_triton.`name` replaced by one that raises a compile error where when(*args) holds
    (a Triton that cannot build one of its variants) and runs the real kernel elsewhere;
    returns the list of the calls it failed."""
    real, failed = getattr(lora_triton, name), []

    def kernel(*args, **kwargs):
        if when(*args):
            failed.append(name)
            raise RuntimeError("PassManager::run failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_triton, name, kernel)
    return failed


def _auto_triton_run(monkeypatch, tiny_llama, recompute: bool):
    """test_recompute's steps (dropout 0.1, two steps) with `auto` choosing triton, as on a
    Hopper GPU, from a clean slate of failures."""
    monkeypatch.setattr(lora, "kernel", "auto")
    monkeypatch.setattr(lora, "auto_kernel", lambda device: "triton")
    kernel_fallback.forget()
    return recompute_run(tiny_llama, recompute=recompute, steps=2)


def _assert_recompute_equals_plain(monkeypatch, tiny_llama) -> list:
    """With recompute, the same losses, LoRA gradients and final generator states as without:
    the recomputed layers drew the very masks their forwards used. Returns the run."""
    ref, ref_states, _ = _auto_triton_run(monkeypatch, tiny_llama, recompute=False)
    got, states, calls = _auto_triton_run(monkeypatch, tiny_llama, recompute=True)
    assert calls == 4  # (two steps, each layer run again in the backward)
    assert kernel_fallback.failure(kernel_fallback.LORA) == "RuntimeError: PassManager::run failed"
    assert _max_diff(got, ref) <= 1e-6
    assert all(torch.equal(s, r) for s, r in zip(states, ref_states))
    return got


INTERMEDIATE = 96  # conftest's tiny LLaMA: only down_proj's input is this wide


@pytest.mark.skipif(lora_triton.unavailable(torch.device("cpu")) is not None,
                    reason="the triton kernel's interpreter run needs triton >= 3.9")
@pytest.mark.parametrize("fails", ["everywhere", "one variant"])
def test_a_triton_forward_failing_after_its_seeds_recomputes_the_forwards_masks(monkeypatch, tiny_llama, fails):
    """The forward's kernel fails after drawing its seeds: at its first call (every group runs
    fused), or only in layer 0's down_proj group (one variant of the kernel does not build: its
    earlier groups ran triton, layer 1 runs fused). Recomputed, every group draws its forward's
    mask again, a failed one torch's from the same generator state."""
    when = (lambda *args: True) if fails == "everywhere" else (lambda x2d, *rest: x2d.shape[1] == INTERMEDIATE)
    failed = _fails_on(monkeypatch, "down", when)
    got = _assert_recompute_equals_plain(monkeypatch, tiny_llama)
    assert failed
    if fails == "everywhere":  # every mask torch's, from where fused draws it: a fused run's step
        monkeypatch.setattr(lora, "kernel", "fused")
        fused, _, _ = recompute_run(tiny_llama, recompute=False, steps=2)
        assert _max_diff(got, fused) <= 1e-6


@pytest.mark.skipif(lora_triton.unavailable(torch.device("cpu")) is not None,
                    reason="the triton kernel's interpreter run needs triton >= 3.9")
def test_triton_backward_kernels_failing_recompute_the_forwards_masks(monkeypatch, tiny_llama):
    """Every forward ran triton; the backward's kernels fail at the last layer's backward:
    the layers recomputed after that still draw their forwards' (triton's) masks."""
    failed = _fails_on(monkeypatch, "grad_a", lambda *args: True)
    _assert_recompute_equals_plain(monkeypatch, tiny_llama)
    assert failed


class _OffsetGenerator:
    """What draw_seed reads of a CUDA generator (its seed and Philox offset), on the CPU; with
    broken=True it lacks get_offset, as torch builds without it do."""

    device = torch.device("cuda")

    def __init__(self, seed: int, broken: bool = False):
        self.seed, self.offset, self.broken = seed, 8, broken

    def initial_seed(self) -> int:
        return self.seed

    def get_offset(self) -> int:
        if self.broken:
            raise AttributeError("'torch._C.Generator' object has no attribute 'get_offset'")
        return self.offset

    def set_offset(self, offset: int) -> None:
        self.offset = offset


def test_undrawn_seeds_leave_the_generators_where_they_were():
    """A failed call puts its seeds back (lora_fused._fall_back then draws torch's mask from
    there): a plan's undraw, and a draw that fails at its second generator, for CUDA-like
    generators (offsets) and CPU ones (states)."""
    from mlora.lora_fused import DropoutRows

    cpu = torch.Generator().manual_seed(3)
    first, cpu_state = _OffsetGenerator(5), cpu.get_state()
    rows = [DropoutRows(0, 6, 0.1, first, 3), DropoutRows(6, 12, 0.1, cpu, 3)]
    plan = lora_triton.draw(rows, 12, torch.device("cpu"))
    assert first.offset == 8 + lora_triton.OFFSET_STEP and not torch.equal(cpu.get_state(), cpu_state)
    plan.undraw()
    assert first.offset == 8 and torch.equal(cpu.get_state(), cpu_state)
    assert lora_triton.draw(rows, 12, torch.device("cpu")).seeds == plan.seeds  # drawn again: the same
    first.offset = 8
    rows = [DropoutRows(0, 6, 0.1, first, 3), DropoutRows(6, 12, 0.1, _OffsetGenerator(6, broken=True), 3)]
    with pytest.raises(AttributeError):
        lora_triton.draw(rows, 12, torch.device("cpu"))
    assert first.offset == 8
