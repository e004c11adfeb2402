"""Host work of the fused LoRA op per input group call (lora_fused.py, lora_triton.py): what
depends only on the batch layout and the weights' casts is worked out once, not per call.
On a GPU the host must queue a step's ~4,000 kernels faster than the device runs them; with
a small model it does not (benchmarks/THROUGHPUT.md, "Host time"). Counted, not timed: the
spec and tables built, and mlora's own Python calls per group call."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

import mlora.lora as lora
from mlora import kernel_fallback, lora_fused, lora_triton
from mlora.lora import AdapterRows, BatchLayout, InputGroup, LoraLinear, LoraWeights

MLORA = str(Path(lora.__file__).resolve().parent)
SEQ, IN, OUTS, ADAPTERS = 8, 16, (16, 8, 8), 4  # q, k, v of one attention layer


class _NoLaunch:
    """A Triton kernel whose launch does nothing: the Python around it is what is counted (the
    kernels themselves would run under Triton's interpreter here, in mlora's own files)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def group(monkeypatch):
    monkeypatch.setattr(lora, "kernel", "triton")
    stub = _NoLaunch()
    monkeypatch.setattr(lora_triton, "_kernels", lambda: types.SimpleNamespace(
        down_kernel=stub, up_masked_kernel=stub, grad_a_kernel=stub))
    torch.manual_seed(0)
    layout, group = BatchLayout([AdapterRows(f"a{i}", i, i + 1) for i in range(ADAPTERS)]), InputGroup()
    members = [LoraLinear(torch.nn.Linear(IN, out, bias=False).requires_grad_(False), layout, group)
               for out in OUTS]
    for i in range(ADAPTERS):
        generator = torch.Generator().manual_seed(i)
        for m, member in enumerate(members):
            w = LoraWeights(IN, OUTS[m], 4, 8.0, 0.1, False, 10 * i + m)
            w.generator = generator
            member.adapters[f"a{i}"] = w
    return members


def _step(members) -> None:
    x = torch.randn(ADAPTERS, SEQ, IN, requires_grad=True)
    sum(m(x).sum() for m in members).backward()


def _mlora_calls(fn) -> int:
    """Python calls into mlora's own code while `fn` runs (functions, comprehensions)."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event == "call" and frame.f_code.co_filename.startswith(MLORA):
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def test_a_layout_builds_its_spec_and_tables_once(group, monkeypatch):
    _step(group)  # the layout's first step builds them
    built, tables = [], []
    real_post_init, real_tables = lora_fused.FusedGroupSpec.__post_init__, lora_triton.tables
    monkeypatch.setattr(lora_fused.FusedGroupSpec, "__post_init__", lambda s: (built.append(1), real_post_init(s)))
    monkeypatch.setattr(lora_triton, "tables", lambda *a: (tables.append(1), real_tables(*a))[1])
    _step(group)  # a later micro-batch: the same layout, the weights unchanged
    assert not built and not tables
    with torch.no_grad():  # an optimizer step: new casts, so one new spec (which makes its tables)
        group[0].adapters["a0"].lora_A.add_(1.0)
    _step(group)
    assert len(built) == 1 and len(tables) == 1
    spec = group[0].group._plan.spec
    assert spec.casts is group[0].group._casts


def test_a_kept_spec_serves_only_calls_that_run_its_kernel(group, monkeypatch):
    """The spec is kept across calls, and a forward whose triton kernel failed sets its
    philox False (the call's mask is torch's): a later call that runs triton (auto after its
    failures are forgotten, a recomputation replaying a forward that ran triton) gets a spec
    of its own, as does a triton call after a fused one, not the kept one's torch mask."""
    real_down, downs = lora_triton.down, []

    def down(*args, fail=False):
        downs.append(fail)
        if fail:
            raise RuntimeError("PassManager::run failed")
        return real_down(*args)

    monkeypatch.setattr(lora, "kernel", "fused")
    monkeypatch.setattr(lora_triton, "down", down)
    _step(group)
    monkeypatch.setattr(lora, "kernel", "triton")  # the same layout and casts, the kernel named
    _step(group)
    assert downs == [False]
    monkeypatch.setattr(lora, "kernel", "auto")
    monkeypatch.setattr(lora, "auto_kernel", lambda device: "triton")
    monkeypatch.setattr(lora_triton, "down", lambda *args: down(*args, fail=True))
    kernel_fallback.forget()
    try:
        _step(group)  # fails: this call and its spec torch's from here on
        spec = group[0].group._plan.spec
        assert not spec.philox and kernel_fallback.failure(kernel_fallback.LORA)
        monkeypatch.setattr(lora_triton, "down", down)
        kernel_fallback.forget()  # auto chooses triton again
        _step(group)
    finally:
        kernel_fallback.forget()
    assert downs == [False, True, False]
    assert group[0].group._plan.spec is not spec

def test_mlora_python_calls_per_group_call(group):
    """The fused op's call for one q/k/v group of 4 adapters with dropout, forward and backward,
    a layout seen before: 178 Python calls into mlora (a generator's every resumption counts)
    before the spec, tables and launch settings were kept per layout; 65 since. A rise means
    per-call work crept back in: raise the bound only for work that must be done per call."""
    _step(group)
    assert _mlora_calls(lambda: _step(group)) <= 65
