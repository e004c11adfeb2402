"""The fused LoRA kernel (lora_fused.py) against the autograd-composed dense kernel, over the
layouts a batch can take: adapters on different subsets of a group's members, rows in any
order with gaps, an adapter with zero rows, one adapter on every row, mixed dropout rates;
in train and eval mode, with an input that needs no gradient, an unused output, one token
per row, a strided input, and in bf16/fp16 (as close to fp32 as dense)."""

from __future__ import annotations

import pytest
import torch

import mlora.lora as lora
from mlora.lora import AdapterRows, BatchLayout, InputGroup, LoraLinear, LoraWeights
from mlora.lora_fused import FusedGroupLoRA

R = AdapterRows


@pytest.fixture(autouse=True)
def _restore_kernel(monkeypatch):
    """_step sets the module's kernel; put it back after each test."""
    monkeypatch.setattr(lora, "kernel", lora.kernel)


def _group(in_f, outs, biases, adapters, rows, dtype=torch.float32):
    """adapters: {name: (dropout, {member: (r, alpha)})}; one generator per adapter."""
    torch.manual_seed(0)
    layout, group = BatchLayout(list(rows)), InputGroup()
    members = [LoraLinear(torch.nn.Linear(in_f, o, bias=b).requires_grad_(False).to(dtype), layout, group)
               for o, b in zip(outs, biases)]
    for k, (name, (p, targets)) in enumerate(adapters.items()):
        gen = torch.Generator().manual_seed(100 + k)
        for m, (r, alpha) in targets.items():
            w = LoraWeights(in_f, outs[m], r, alpha, p, False, 10 * k + m)
            with torch.no_grad():
                w.lora_B.normal_(0, 0.3)
            w.generator = gen
            members[m].adapters[name] = w
    return members


def _step(kernel, members, x, gys, train=True):
    """Forward + backward of every member; returns outputs, x grad and every LoRA grad (None
    read as zeros). Generator states are rewound afterwards, so the next kernel draws the same masks."""
    gens = {id(w.generator): w.generator for m in members for w in m.adapters.values()}
    states = {k: g.get_state() for k, g in gens.items()}
    lora.kernel = kernel
    x = x.detach().clone().requires_grad_(x.requires_grad)
    for m in members:
        m.train(train)
        for w in m.adapters.values():
            w.lora_A.grad = w.lora_B.grad = None
    ys = [m(x) for m in members]
    used = [(y, g) for y, g in zip(ys, gys) if g is not None and y.requires_grad]
    torch.autograd.backward([y for y, _ in used], [g for _, g in used])
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for m in members for w in m.adapters.values() for p in (w.lora_A, w.lora_B)]
    for k, g in gens.items():
        g.set_state(states[k])
    return [y.detach() for y in ys], x.grad, grads


def _assert_fused_equals_dense(members, x, gys, train=True, tol=1e-5):
    calls = []
    real = FusedGroupLoRA.apply
    FusedGroupLoRA.apply = lambda *a: (calls.append(1), real(*a))[1]
    try:
        fused = _step("fused", members, x, gys, train)
    finally:
        FusedGroupLoRA.apply = real
        lora.kernel = "auto"
    assert calls, "the fused kernel did not run"
    dense = _step("dense", members, x, gys, train)
    for a, b in zip(fused[0] + fused[2], dense[0] + dense[2]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    if x.requires_grad:
        torch.testing.assert_close(fused[1], dense[1], rtol=tol, atol=tol)
    else:
        assert fused[1] is None


CASES = {
    # a on q and v, b only on k, the 4th member has no adapter; row 4 has none either
    "subsets": ({"a": (0.2, {0: (4, 8.0), 2: (2, 4.0)}), "b": (0.0, {1: (8, 16.0)})},
                [R("a", 0, 2), R("b", 2, 4)]),
    "late rows, gap first": ({"a": (0.2, {0: (4, 8.0), 2: (2, 4.0)}), "b": (0.0, {1: (8, 16.0)})},
                             [R("b", 1, 2), R("a", 3, 5)]),
    "one adapter, non-zero start": ({"a": (0.3, {0: (4, 8.0), 1: (4, 8.0)})}, [R("a", 2, 4)]),
    "one adapter, every row": ({"a": (0.3, {0: (4, 8.0), 1: (4, 8.0), 3: (2, 1.0)})}, [R("a", 0, 5)]),
    "adapter with zero rows": ({"a": (0.3, {0: (4, 8.0)}), "b": (0.1, {0: (2, 2.0), 1: (2, 2.0)})},
                               [R("a", 1, 1), R("b", 0, 3)]),
    "three rates, rows out of order": ({"a": (0.5, {0: (4, 8.0), 1: (3, 8.0)}), "b": (0.0, {0: (2, 2.0), 2: (5, 2.0)}),
                                        "c": (0.1, {1: (1, 1.0), 2: (6, 3.0)})},
                                       [R("c", 4, 5), R("a", 0, 2), R("b", 2, 3)]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["train", "eval", "x_no_grad", "k_unused", "S=1"])
def test_fused_equals_dense(case, mode):
    adapters, rows = CASES[case]
    outs, S = (16, 8, 8, 12), 1 if mode == "S=1" else 3
    members = _group(16, outs, (True, False, True, True), adapters, rows)
    x = torch.randn(5, S, 16, requires_grad=mode != "x_no_grad")
    gys = [None if mode == "k_unused" and m == 1 else torch.randn(5, S, o) for m, o in enumerate(outs)]
    _assert_fused_equals_dense(members, x, gys, train=mode != "eval")


def test_fused_equals_dense_strided_input():
    adapters, rows = CASES["three rates, rows out of order"]
    members = _group(16, (16, 8, 8), (True, False, True), adapters, rows)
    x = torch.randn(16, 3, 5).permute(2, 1, 0).requires_grad_(True)  # [5, 3, 16], not contiguous
    _assert_fused_equals_dense(members, x, [torch.randn(5, 3, o) for o in (16, 8, 8)])


def test_factor_cache_train_then_eval_then_train():
    """The cached column factor differs between train (1/(1-p) folded in) and eval."""
    adapters, rows = CASES["subsets"]
    members = _group(16, (16, 8, 8), (True, False, True), adapters, rows)
    x = torch.randn(5, 3, 16, requires_grad=True)
    gys = [torch.randn(5, 3, o) for o in (16, 8, 8)]
    for train in (True, False, True, False):
        _assert_fused_equals_dense(members, x, gys, train=train)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_fused_as_close_to_fp32_as_dense(dtype):
    adapters, rows = CASES["three rates, rows out of order"]
    outs = (64, 32, 32)
    res = {}
    for kd, kernel in ((dtype, "fused"), (dtype, "dense"), (torch.float32, "dense")):
        members = _group(64, outs, (True, False, True), adapters, rows, kd)
        x = torch.randn(5, 7, 64, generator=torch.Generator().manual_seed(1)).to(kd).requires_grad_(True)
        gys = [torch.randn(5, 7, o, generator=torch.Generator().manual_seed(o)).to(kd) for o in outs]
        res[(kd, kernel)] = _step(kernel, members, x, gys)
    ref = res[(torch.float32, "dense")]

    def err(run):
        pairs = list(zip(run[0] + [run[1]] + run[2], ref[0] + [ref[1]] + ref[2]))
        return max(((a.float() - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in pairs)

    assert err(res[(dtype, "fused")]) <= 1.5 * err(res[(dtype, "dense")]) + 1e-3
