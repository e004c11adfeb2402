"""Level 1 of the correctness ladder: the LoRA op against plain autograd, dropout included."""

import pytest
import torch

import mlora.lora
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


# ----------------------------------------------------------------------------- input groups


def _group(in_f, outs, layout):
    """Three projections reading one input, like q/k/v, wrapped the way inject_lora does."""
    from mlora.lora import InputGroup

    group = InputGroup()
    bases = [torch.nn.Linear(in_f, o, bias=i == 0).requires_grad_(False) for i, o in enumerate(outs)]
    return [LoraLinear(b, layout, group) for b in bases]


def _group_grads(monkeypatch, x_grad=True, trainable_bias=False, dtype=torch.float32, kernel="triton"):
    """One step of a q/k/v-like group under `kernel`, two adapters, dropout 0.3: the outputs,
    the LoRA gradients (fresh generators each call, so the masks repeat), the members and the
    input's gradient."""
    monkeypatch.setattr(mlora.lora, "kernel", kernel)
    torch.manual_seed(0)
    rows = [AdapterRows("a", 0, 2), AdapterRows("b", 2, 4)]
    members = _group(16, (16, 8, 8), BatchLayout(rows))
    for i, rr in enumerate(rows):
        for m, lin in enumerate(members):
            w = _weights(16, lin.out_features, 4, 8.0, 0.3, 10 * i + m)
            w.generator = torch.Generator().manual_seed(7 + i)
            lin.adapters[rr.name] = w
    if trainable_bias:
        members[0].base.bias.requires_grad_(True)  # that base runs outside the op
    for lin in members:
        lin.to(dtype)
        for w in lin.adapters.values():
            w.float()  # LoRA weights stay fp32
    x = torch.randn(4, 3, 16, dtype=dtype, requires_grad=x_grad)
    ys = [lin(x) for lin in members]
    torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
    grads = {(n, m): (w.lora_A.grad.clone(), w.lora_B.grad.clone())
             for m, lin in enumerate(members) for n, w in lin.adapters.items()}
    return [y.detach() for y in ys], grads, members, x.grad


def _run_group(kernel, monkeypatch, p, ranks, rows, batch=5, seq=3, in_f=16, outs=(16, 8, 8)):
    """Forward+backward of a q/k/v-like group; returns outputs, x grad, LoRA grads, and
    which kernel ran: 'grouped', 'fused' or 'other' (dense, loop)."""
    import mlora.lora as lora

    monkeypatch.setattr(lora, "kernel", kernel)
    calls = []
    real_grouped, real_fused = lora._GROUPED_MM, lora.FusedGroupLoRA.apply

    def spy_grouped(*args, **kwargs):
        calls.append("grouped")
        return real_grouped(*args, **kwargs)

    def spy_fused(*args):
        calls.append("fused")
        return real_fused(*args)

    monkeypatch.setattr(lora, "_GROUPED_MM", spy_grouped)
    monkeypatch.setattr(lora.FusedGroupLoRA, "apply", spy_fused)
    torch.manual_seed(0)
    layout = BatchLayout(rows)
    members = _group(in_f, outs, layout)
    weights = {}
    for i, r in enumerate(ranks):
        name = rows[i].name
        for m, lin in enumerate(members):
            w = _weights(in_f, lin.out_features, r, 2.0 * r, p, 100 * i + m)
            w.generator = torch.Generator().manual_seed(7 + i)  # one generator per adapter
            lin.adapters[name] = w
            weights[(name, m)] = w
        for lin in members:
            lin.train()
    x = torch.randn(batch, seq, in_f, requires_grad=True)
    ys = [lin(x) for lin in members]
    grads = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, grads)
    return ys, grads, x, weights, members, calls[0] if calls else "other"


def _reference(x, grads, weights, members, rows, p, masks=None):
    """The group's math in plain autograd: one inverted-dropout mask per adapter shared by the
    members; `masks` {adapter: [rows, S, in]}, default the bernoulli draws of the adapter's
    generator (seed 7 + its index, as _run_group sets)."""
    x2 = x.detach().clone().requires_grad_(True)
    params = {k: (w.lora_A.detach().clone().requires_grad_(True), w.lora_B.detach().clone().requires_grad_(True))
              for k, w in weights.items()}
    if masks is None:
        masks = {}
        for i, rr in enumerate(rows):
            gen = torch.Generator().manual_seed(7 + i)
            xr = x2[rr.start:rr.end]
            masks[rr.name] = dropout_mask(xr, p, gen) if p > 0 else torch.ones_like(xr)
    outs = []
    for m, lin in enumerate(members):
        y = lin.base(x2)
        delta = torch.zeros_like(y)  # rows without an adapter get none
        for rr in rows:
            A, Bm = params[(rr.name, m)]
            w = weights[(rr.name, m)]
            delta[rr.start:rr.end] = w.scale * ((x2[rr.start:rr.end] * masks[rr.name]) @ A.T @ Bm.T)
        outs.append(y + delta)
    torch.autograd.backward(outs, grads)
    return outs, x2, params


def _assert_matches_reference(ys, grads, x, weights, members, rows, p, masks=None):
    ref, x2, params = _reference(x, grads, weights, members, rows, p, masks)
    for y, r in zip(ys, ref):
        torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for key, w in weights.items():
        torch.testing.assert_close(w.lora_A.grad, params[key][0].grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.lora_B.grad, params[key][1].grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("kernel", ["loop", "grouped", "dense", "fused", "auto"])
def test_input_group_matches_autograd_with_one_mask_per_adapter(monkeypatch, p, kernel):
    rows = [AdapterRows("a", 0, 2), AdapterRows("b", 2, 3), AdapterRows("c", 3, 5)]
    ys, grads, x, weights, members, ran = _run_group(kernel, monkeypatch, p, [4, 4, 4], rows)
    assert ran == {"grouped": "grouped", "fused": "fused", "auto": "fused"}.get(kernel, "other")
    _assert_matches_reference(ys, grads, x, weights, members, rows, p)


@pytest.mark.parametrize("kernel", ["fused", "dense", "grouped", "loop"])
def test_mixed_ranks_and_rows_without_adapter(monkeypatch, kernel):
    """Ranks differ and the last row has no adapter: fused and dense handle it themselves,
    grouped falls back to the loop; all must equal the reference."""
    gap = [AdapterRows("a", 0, 2), AdapterRows("b", 2, 4)]  # row 4 has no adapter
    ys, grads, x, weights, members, ran = _run_group(kernel, monkeypatch, 0.3, [4, 8], gap)
    assert ran == ("fused" if kernel == "fused" else "other")
    _assert_matches_reference(ys, grads, x, weights, members, gap, 0.3)


def test_grouped_kernel_only_where_the_batch_allows_it(monkeypatch):
    tiled = [AdapterRows("a", 0, 2), AdapterRows("b", 2, 5)]
    assert _run_group("grouped", monkeypatch, 0.1, [4, 4], tiled)[-1] == "grouped"  # same ranks, tiled rows
    assert _run_group("grouped", monkeypatch, 0.1, [4, 8], tiled)[-1] == "other"  # ranks differ: loop
    gap = [AdapterRows("a", 0, 2), AdapterRows("b", 2, 4)]
    assert _run_group("grouped", monkeypatch, 0.1, [4, 4], gap)[-1] == "other"  # a row without adapter
    assert _run_group("grouped", monkeypatch, 0.1, [2, 2], tiled)[-1] == "other"  # 8-byte rows: unaligned
    assert _run_group("auto", monkeypatch, 0.1, [4, 4], tiled)[-1] == "fused"  # auto: fused for few adapters


def test_group_members_share_one_mask_but_adapters_do_not():
    """Dropping the same input positions for q, k and v: a zero of the mask shows up as
    the same zero column pattern in every member's A gradient input."""
    from mlora.lora import InputGroup

    layout = BatchLayout([AdapterRows("a", 0, 1)])
    group = InputGroup()
    members = [LoraLinear(torch.nn.Linear(16, 16).requires_grad_(False), layout, group) for _ in range(2)]
    for m, lin in enumerate(members):
        w = _weights(16, 16, 4, 4.0, 0.5, m)
        w.generator = torch.Generator().manual_seed(3)
        lin.adapters["a"] = w
        lin.train()
    x = torch.randn(1, 64, 16)
    hidden = group.hidden_for(members[0], x)
    assert hidden is group.hidden_for(members[1], x)  # computed once for both
    assert group._cache is None  # released once every member has it


@pytest.mark.parametrize("kernel", ["fused", "dense", "loop"])
def test_bf16_compute_with_fp32_weights_stays_close_to_fp32(monkeypatch, kernel):
    """LoRA weights stay fp32 (the optimizer's copy); the matmuls run in the activation dtype.
    In bf16 the LoRA gradients stay within 1% (relative norm) of an all-fp32 run (0.4% here,
    bf16's 8-bit mantissa); fused and solo bf16 runs on the H200 differed by 0."""
    import mlora.lora as lora

    monkeypatch.setattr(lora, "kernel", kernel)
    rows = [AdapterRows("a", 0, 3), AdapterRows("b", 3, 6)]
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        layout = BatchLayout(rows)
        members = _group(64, (64, 32, 32), layout)
        for m in members:
            m.base.to(dtype)
        for i, name in enumerate(("a", "b")):
            for m, lin in enumerate(members):
                w = _weights(64, lin.out_features, 8, 16.0, 0.0, 10 * i + m)
                lin.adapters[name] = w
        x = torch.randn(6, 16, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
        outs = [lin(x) for lin in members]
        sum((o.float() ** 2).sum() for o in outs).backward()
        grads[dtype] = torch.cat([p.grad.flatten() for lin in members for w in lin.adapters.values()
                                  for p in (w.lora_A, w.lora_B)])
        assert all(p.dtype == torch.float32 for lin in members for w in lin.adapters.values()
                   for p in (w.lora_A, w.lora_B))
    err = ((grads[torch.bfloat16] - grads[torch.float32]).norm() / grads[torch.float32].norm()).item()
    assert err < 1e-2, err


def _two_steps(kernel, monkeypatch, x_grad, retain=False):
    """Two forward+backward passes of a q/k/v-like group with dropout (the adapters'
    generators advance between them); returns the outputs and gradients of both."""
    import mlora.lora as lora

    monkeypatch.setattr(lora, "kernel", kernel)
    torch.manual_seed(0)
    layout = BatchLayout([AdapterRows("a", 0, 2), AdapterRows("b", 2, 4)])
    members = _group(16, (16, 8, 8), layout)
    for i, name in enumerate(("a", "b")):
        gen = torch.Generator().manual_seed(5 + i)
        for m, lin in enumerate(members):
            w = _weights(16, lin.out_features, 4, 8.0, 0.3, 10 * i + m)
            w.generator = gen
            lin.adapters[name] = w
            lin.train()
    results = []
    for step in range(2):
        x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(step), requires_grad=x_grad)
        ys = [lin(x) for lin in members]
        gys = [torch.randn(y.shape, generator=torch.Generator().manual_seed(9)) for y in ys]
        torch.autograd.backward(ys, gys, retain_graph=retain)
        grads = [p.grad.clone() for lin in members for w in lin.adapters.values() for p in (w.lora_A, w.lora_B)]
        if retain:  # a second backward of the same graph
            x.grad = None
            for lin in members:
                for w in lin.adapters.values():
                    w.lora_A.grad = w.lora_B.grad = None
            torch.autograd.backward(ys, gys)
            again = [p.grad for lin in members for w in lin.adapters.values() for p in (w.lora_A, w.lora_B)]
            assert all(torch.equal(a, b) for a, b in zip(grads, again))
        results.append(([y.detach() for y in ys], x.grad, grads))
        for lin in members:
            for w in lin.adapters.values():
                w.lora_A.grad = w.lora_B.grad = None
    return results


@pytest.mark.parametrize("x_grad", [True, False])
def test_fused_equals_dense_over_steps(monkeypatch, x_grad):
    """The fused op draws from the adapters' generators exactly as dense does (so a second
    step sees the same masks), gives the same gradients in a second, retained backward, and
    skips the input gradient when the input needs none (layer 0)."""
    fused = _two_steps("fused", monkeypatch, x_grad, retain=True)
    dense = _two_steps("dense", monkeypatch, x_grad)
    for (ys_f, gx_f, g_f), (ys_d, gx_d, g_d) in zip(fused, dense):
        for a, b in zip(ys_f + g_f, ys_d + g_d):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        if x_grad:
            torch.testing.assert_close(gx_f, gx_d, rtol=1e-5, atol=1e-5)
        else:
            assert gx_f is None



def test_fused_scale_is_applied_in_fp32():
    """The fused op's column factor is fp32: in bf16, alpha/r = 16/12 rounded to bf16 (1.3359
    for 1.3333) would make every LoRA delta of that column 0.2% too large."""
    import mlora.lora as lora

    torch.manual_seed(0)
    base = torch.nn.Linear(256, 256, bias=False).requires_grad_(False).to(torch.bfloat16)
    x = torch.randn(4, 512, 256)
    w = LoraWeights(256, 256, 12, 16.0, 0.0, False, 0)
    with torch.no_grad():
        w.lora_B.normal_(0, 0.3)
    exact = (x @ w.lora_A.T @ w.lora_B.T) * w.scale
    lin = LoraLinear(base, BatchLayout([AdapterRows("a", 0, 4)]))
    lin.adapters["a"] = w
    lin.eval()
    assert lora.kernel == "auto"  # fused
    with torch.no_grad():
        delta = lin(x.bfloat16()).float() - base(x.bfloat16()).float()
    ratio = (delta * exact).sum().item() / (exact * exact).sum().item()
    assert abs(ratio - 1) < 5e-4, ratio


def test_fused_runs_a_trainable_base_outside_the_op():
    """The fused backward computes no base weight or bias gradient, so a base with a trainable
    bias runs outside the op, under autograd, and the op adds only the LoRA delta."""
    base = torch.nn.Linear(8, 8)
    base.weight.requires_grad_(False)
    lin = LoraLinear(base, BatchLayout([AdapterRows("a", 0, 2)]))
    lin.adapters["a"] = LoraWeights(8, 8, 2, 4.0, 0.0, False, 0)
    lin(torch.randn(2, 3, 8)).sum().backward()
    assert base.bias.grad is not None


def test_fused_writes_lora_gradients_only_when_the_backward_asks_for_them():
    """The fused op adds the LoRA gradients into .grad itself: a backward that asks only for the
    input's gradient (torch.autograd.grad, backward(inputs=[x])) must leave them alone, a full
    one must write them, and a frozen parameter gets none."""
    layout = BatchLayout([AdapterRows("a", 0, 2), AdapterRows("b", 2, 4)])
    members = _group(16, (16, 8, 8), layout)
    for i, name in enumerate("ab"):
        for m, lin in enumerate(members):
            lin.adapters[name] = _weights(16, lin.out_features, 4, 8.0, 0.0, 10 * i + m)
    params = [p for lin in members for w in lin.adapters.values() for p in (w.lora_A, w.lora_B)]
    x = torch.randn(4, 3, 16, requires_grad=True)

    def loss():
        return sum(lin(x).square().sum() for lin in members)

    (gx,) = torch.autograd.grad(loss(), x)
    loss().backward(inputs=[x])
    assert gx.abs().sum() > 0 and all(p.grad is None for p in params)
    members[0].adapters["a"].lora_A.requires_grad_(False)  # the first one: not the anchor then
    loss().backward()
    assert members[0].adapters["a"].lora_A.grad is None
    assert all(p.grad is not None for p in params if p.requires_grad)


def test_fused_refuses_double_backward():
    """create_graph through the hand-written backward raises instead of returning a
    second-order gradient that misses the weight casts made inside the forward."""
    lin = LoraLinear(torch.nn.Linear(8, 8).requires_grad_(False), BatchLayout([AdapterRows("a", 0, 2)]))
    lin.adapters["a"] = _weights(8, 8, 2, 4.0, 0.0, 0)
    x = torch.randn(2, 3, 8, requires_grad=True)
    (gx,) = torch.autograd.grad(lin(x).square().sum(), x, create_graph=True)
    for wrt in (x, lin.adapters["a"].lora_B):  # no second-order path at all: an error, not a number
        with pytest.raises(RuntimeError):
            torch.autograd.grad(gx.square().sum(), wrt, retain_graph=True)


def test_fused_weight_casts_are_kept_until_a_parameter_changes():
    """The fused op's bf16 casts of the LoRA weights serve every forward of one optimizer step
    (gradient accumulation, recompute) and are rebuilt once a parameter changes in place (an
    optimizer step, a restore); the outputs always equal dense's."""
    import mlora.lora as lora

    torch.manual_seed(0)
    rows = [AdapterRows("a", 0, 2), AdapterRows("b", 2, 4)]
    members = _group(16, (16, 8, 8), BatchLayout(rows))
    for m in members:
        m.base.to(torch.bfloat16)
    for i, name in enumerate("ab"):
        for m, lin in enumerate(members):
            lin.adapters[name] = _weights(16, lin.out_features, 4, 8.0, 0.0, 10 * i + m)
    params = [p for lin in members for w in lin.adapters.values() for p in (w.lora_A, w.lora_B)]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    group = members[0].group
    x = torch.randn(4, 3, 16).bfloat16()

    def outputs(kernel):
        previous, lora.kernel = lora.kernel, kernel
        try:
            ys = [lin(x) for lin in members]
        finally:
            lora.kernel = previous
        return ys

    def check():
        for got, want in zip(outputs("fused"), outputs("dense")):
            torch.testing.assert_close(got, want, rtol=0, atol=0)

    check()
    casts = group._casts
    sum(y.float().sum() for y in outputs("fused")).backward()
    assert group._casts is casts  # a second forward of the same step: the same casts
    optimizer.step()
    check()
    assert group._casts is not casts  # the step moved the parameters' versions
    casts = group._casts
    with torch.no_grad():
        members[1].adapters["b"].lora_B.copy_(torch.ones_like(members[1].adapters["b"].lora_B))
    check()
    assert group._casts is not casts


def test_fused_plan_is_kept_per_layout_and_rebuilt_when_it_changes(monkeypatch):
    """The fused op's plan (parameters in column order, factor, dropout ranges, inline bases)
    is built once per batch layout: kept while the layout, the mode and the attached adapters
    stay, rebuilt when any of them changes or a base becomes trainable; the outputs always
    equal dense's."""
    import mlora.lora as lora

    torch.manual_seed(0)
    layout = BatchLayout([AdapterRows("a", 0, 2), AdapterRows("b", 2, 4)])
    members = _group(16, (16, 8, 8), layout)
    for i, name in enumerate("ab"):
        for m, lin in enumerate(members):
            lin.adapters[name] = _weights(16, lin.out_features, 4, 8.0, 0.0, 10 * i + m)
    group = members[0].group
    x = torch.randn(4, 3, 16)

    def outputs(kernel):
        monkeypatch.setattr(lora, "kernel", kernel)
        with torch.no_grad():
            return [lin(x) for lin in members]

    def plan_after_check():
        for got, want in zip(outputs("fused"), outputs("dense")):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        return group._plan

    first = plan_after_check()
    assert plan_after_check() is first  # same layout: kept
    layout.rows = [AdapterRows("b", 0, 2), AdapterRows("a", 2, 4)]
    swapped = plan_after_check()
    assert swapped is not first
    members[1].adapters["c"] = members[1].adapters.pop("a")  # a leaves k_proj
    layout.rows = [AdapterRows("b", 0, 2), AdapterRows("a", 2, 4)]
    assert plan_after_check() is not swapped
    kept = plan_after_check()
    for lin in members:
        lin.eval()
    assert plan_after_check() is not kept  # eval: no dropout, another scale
    kept = plan_after_check()
    members[2].base.weight.requires_grad_(True)  # now the op must not run v_proj's base
    assert plan_after_check() is not kept and group._plan.bases[-1] is None


@pytest.mark.parametrize("optim,on_device", [("adamw", False), ("adamw", True), ("sgd", False)])
def test_the_forward_after_an_adapter_step_runs_on_the_stepped_weights(monkeypatch, optim, on_device):
    """The fused op keeps its casts of the weights until their version counters move, and
    torch's fused AdamW (mlora's optimizer) writes the weights without moving them:
    Adapter's step moves them itself. Without that, every forward after the first step ran
    on the first step's weights (B = 0: no LoRA at all) while the optimizer went on."""
    import mlora.lora as lora
    from transformers import LlamaConfig

    from mlora.adapter import Adapter
    from mlora.config import AdapterConfig
    from mlora.lora import TARGET_MODULES, inject_lora
    from mlora.models.llama import CausalLM, args_from_hf_config

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    model = CausalLM(args_from_hf_config(config)).requires_grad_(False)
    layout = BatchLayout([AdapterRows("a", 0, 2)])
    wrappers = inject_lora(model, layout)
    cfg = AdapterConfig(name="a", data="<test>", r=4, alpha=8, dropout=0.0, target_modules=list(TARGET_MODULES),
                        optim=optim, lr=0.05, max_grad_norm=1.0)
    adapter = Adapter(cfg, wrappers, seed=1, device=torch.device("cpu"), total_steps=10)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(ids).float().logsumexp(-1).mean().backward()
        adapter.step_on_device() if on_device else adapter.step()
    assert all(w.lora_B.abs().max() > 0 for w in adapter.weights.values())  # the steps moved B

    def logits(kernel):
        monkeypatch.setattr(lora, "kernel", kernel)
        with torch.no_grad():
            return model(ids)

    torch.testing.assert_close(logits("fused"), logits("loop"), rtol=1e-5, atol=1e-5)


def test_ci_runs_the_triton_kernel_tests():
    """In CI, Triton's interpreter must be able to run the triton kernel: its tests
    (test_lora_triton.py, and the triton cases of test_memory and test_bench_throughput) skip
    without it, and a skip would pass silently. (.ci/run sets CI.)"""
    import os

    if os.environ.get("CI"):
        from mlora.lora_triton import unavailable

        assert unavailable(torch.device("cpu")) is None


def test_auto_runs_triton_on_hopper_and_later_gpus_only(monkeypatch):
    """`auto` picks the triton kernel on CUDA devices of compute capability 9.0 and up (where it
    was measured faster and leaner than fused, and checked), fused on older ones, on the CPU,
    and where Triton is missing."""
    from mlora import lora_triton

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(lora_triton, "unavailable", lambda device=None: None)
    for capability, expected in (((9, 0), "triton"), ((10, 0), "triton"), ((8, 0), "fused")):
        mlora.lora.auto_kernel.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert mlora.lora.auto_kernel(cuda) == expected
    mlora.lora.auto_kernel.cache_clear()
    monkeypatch.setattr(lora_triton, "unavailable", lambda device=None: "no triton")
    assert mlora.lora.auto_kernel(cuda) == "fused"
    mlora.lora.auto_kernel.cache_clear()
    assert mlora.lora.auto_kernel(torch.device("cpu")) == "fused"
    mlora.lora.auto_kernel.cache_clear()


def test_triton_is_unavailable_where_a_block_lacks_its_shared_memory(monkeypatch):
    """Consumer Blackwell (compute capability 12.0, 99 KiB of shared memory per block) would
    fail to launch the triton kernel's tiles: `auto` runs fused there, and an explicit
    kernel=triton says why in one line; an H200 (227 KiB) runs it."""
    from types import SimpleNamespace

    from mlora import lora_triton

    if lora_triton.unavailable() is not None:
        pytest.skip(lora_triton.unavailable())
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    for name, shared, expected in (("RTX 5090", 99 * 1024, "fused"), ("H200", 227 * 1024, "triton")):
        props = SimpleNamespace(name=name, shared_memory_per_block_optin=shared)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None, p=props: p)
        mlora.lora.auto_kernel.cache_clear()
        assert mlora.lora.auto_kernel(cuda) == expected
    assert lora_triton.unavailable(cuda) is None
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(name="RTX 5090", shared_memory_per_block_optin=99 * 1024))
    assert lora_triton.unavailable(cuda) == ("its kernels need 150 KiB of shared memory per block and RTX 5090 "
                                             "offers 99 KiB")
    # ROCm's properties have no opt-in figure: a block's whole LDS is shared_memory_per_block
    # (MI300X: 64 KiB, and compute capability 9.4, which would otherwise pick triton)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(name="AMD Instinct MI300X",
                                                            shared_memory_per_block=64 * 1024))
    mlora.lora.auto_kernel.cache_clear()
    assert mlora.lora.auto_kernel(cuda) == "fused"
    assert lora_triton.unavailable(cuda) == ("its kernels need 150 KiB of shared memory per block and AMD Instinct "
                                             "MI300X offers 64 KiB")
    mlora.lora.auto_kernel.cache_clear()


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_training_after_an_inference_mode_forward(family):
    """A forward under torch.inference_mode runs as under no_grad: what the model makes once and
    keeps (the LoRA ops' device constants and weight casts, grouped experts' stacks) stays
    usable by a later training step, whose gradients equal a model's that never ran one.
    (Before, that step failed: inference tensors cannot be saved for backward.)"""
    from transformers import LlamaConfig, MixtralConfig

    from mlora.adapter import Adapter
    from mlora.config import AdapterConfig
    from mlora.models.llama import CausalLM, args_from_hf_config

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100)
    cfg = LlamaConfig(**shape) if family == "llama" else MixtralConfig(**shape, num_local_experts=4)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))

    def grads(inference_first: bool):
        torch.manual_seed(0)
        model = CausalLM(args_from_hf_config(cfg)).requires_grad_(False)
        layout = BatchLayout()
        wrappers = mlora.lora.inject_lora(model, layout)
        adapter = Adapter(AdapterConfig(name="a", data="<test>", r=4, alpha=8, dropout=0.0,
                                        target_modules=list(mlora.lora.TARGET_MODULES)), wrappers, seed=0,
                          device=torch.device("cpu"))
        with torch.no_grad():
            for p in adapter.parameters():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        layout.rows = [AdapterRows("a", 0, 2)]
        model.train()
        if inference_first:
            with torch.inference_mode():
                out = model(ids)
            assert not out.is_inference()
        (model(ids) * torch.linspace(-1, 1, 100)).sum().backward()
        return torch.cat([p.grad.flatten() for p in adapter.parameters()])

    assert torch.equal(grads(True), grads(False))
