"""Level 1 of the correctness ladder: the LoRA op against plain autograd, dropout included."""

import pytest
import torch

from mlora.lora import (AdapterRows, BatchLayout, LoraLinear, LoraWeights, dropout_mask,
                        lora_scale)


def _weights(in_f, out_f, r, alpha, p, seed):
    w = LoraWeights(in_f, out_f, r, alpha, p, False, seed)
    with torch.no_grad():  # B = 0 would hide every bug in the B path
        w.lora_B.normal_(0, 0.3)
    return w


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_fused_lora_matches_naive_autograd_with_the_same_mask(p):
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10, bias=True).requires_grad_(False)
    layout = BatchLayout()
    lin = LoraLinear(base, layout)
    wa, wb = _weights(12, 10, 4, 8.0, p, 1), _weights(12, 10, 2, 3.0, p, 2)
    wa.generator = torch.Generator().manual_seed(11)
    wb.generator = torch.Generator().manual_seed(22)
    lin.adapters.update(a=wa, b=wb)
    layout.rows = [AdapterRows("a", 0, 3), AdapterRows("b", 3, 5)]  # row 5 has no adapter
    lin.train()

    x = torch.randn(6, 7, 12, requires_grad=True)
    y = lin(x)
    gy = torch.randn_like(y)
    y.backward(gy)

    # Reference: the formula written out with plain autograd, masks regenerated from the
    # same generator states.
    x2 = x.detach().clone().requires_grad_(True)
    A = {n: w.lora_A.detach().clone().requires_grad_(True) for n, w in (("a", wa), ("b", wb))}
    B = {n: w.lora_B.detach().clone().requires_grad_(True) for n, w in (("a", wa), ("b", wb))}
    gens = {"a": torch.Generator().manual_seed(11), "b": torch.Generator().manual_seed(22)}
    ref = x2 @ base.weight.T + base.bias
    pieces = []
    for name, (s, e), r, alpha in (("a", (0, 3), 4, 8.0), ("b", (3, 5), 2, 3.0)):
        xr = x2[s:e]
        if p > 0:
            xr = xr * dropout_mask(xr, p, gens[name])
        pieces.append(ref[s:e] + lora_scale(r, alpha) * (xr @ A[name].T @ B[name].T))
    pieces.append(ref[5:])
    ref = torch.cat(pieces)
    ref.backward(gy)

    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for name, w in (("a", wa), ("b", wb)):
        torch.testing.assert_close(w.lora_A.grad, A[name].grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.lora_B.grad, B[name].grad, rtol=1e-5, atol=1e-5)
    if p > 0:  # the mask really was applied: without it the gradient differs
        assert not torch.allclose(wa.lora_A.grad,
                                  torch.einsum("bso,or,bsi->ri", gy[0:3], B["a"].detach(), x.detach()[0:3])
                                  * lora_scale(4, 8.0), atol=1e-4)


def test_dropout_is_off_in_eval_mode():
    base = torch.nn.Linear(8, 8).requires_grad_(False)
    layout = BatchLayout([AdapterRows("a", 0, 2)])
    lin = LoraLinear(base, layout)
    w = _weights(8, 8, 2, 4.0, 0.5, 0)
    w.generator = torch.Generator().manual_seed(0)
    lin.adapters["a"] = w
    lin.eval()
    x = torch.randn(2, 3, 8)
    expected = base(x) + lora_scale(2, 4.0) * (x @ w.lora_A.T @ w.lora_B.T)
    torch.testing.assert_close(lin(x), expected)


def test_init_matches_peft_distribution_and_is_seeded():
    w1 = LoraWeights(64, 32, 8, 16, 0.0, False, seed=5)
    w2 = LoraWeights(64, 32, 8, 16, 0.0, False, seed=5)
    w3 = LoraWeights(64, 32, 8, 16, 0.0, False, seed=6)
    assert torch.equal(w1.lora_A, w2.lora_A) and not torch.equal(w1.lora_A, w3.lora_A)
    assert torch.count_nonzero(w1.lora_B) == 0
    assert w1.lora_A.abs().max() <= 1 / 64 ** 0.5
    assert lora_scale(16, 32, use_rslora=True) == pytest.approx(8.0)
