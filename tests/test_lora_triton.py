"""The `triton` LoRA kernel (lora_triton.py, philox_kernels.py), run on the CPU through
Triton's interpreter (conftest sets TRITON_INTERPRET=1): its keep-mask, each kernel against
torch with that mask written out, the input group against plain autograd, and at model level
fused equals solo and recompute equals plain, dropout > 0 throughout."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # a test dependency on Linux x86-64 (pyproject); CI installs it

import mlora.lora as lora  # noqa: E402
from mlora import lora_triton  # noqa: E402

if lora_triton.unavailable(torch.device("cpu")):  # an older interpreter (a CUDA box's pinned triton)
    pytest.skip(lora_triton.unavailable(torch.device("cpu")), allow_module_level=True)
from mlora.errors import UserError  # noqa: E402
from mlora.lora import AdapterRows, BatchLayout, LoraLinear  # noqa: E402
from mlora.lora_fused import DropoutRows  # noqa: E402

from test_lora import _assert_matches_reference, _group, _weights  # noqa: E402


def _plan(ranges, n, seed=0):
    """A draw plan over token rows [0, n) for ((start, end, p), ...), each range its own generator."""
    drops = [DropoutRows(s, e, p, torch.Generator().manual_seed(seed + i)) for i, (s, e, p) in enumerate(ranges)]
    return lora_triton.draw(drops, n, torch.device("cpu"))


# ----------------------------------------------------------------------------- the mask


def test_keep_mask_rate_rows_and_position_independence():
    n, k = 96, 200
    plan = _plan([(0, 40, 0.25), (50, 96, 0.5)], n)
    keep = lora_triton.keep_mask(plan, n, k)
    assert keep[40:50].all()  # rows of no dropping adapter keep everything
    for rows, p in ((slice(0, 40), 0.25), (slice(50, 96), 0.5)):
        rate = 1 - keep[rows].float().mean().item()
        sd = (p * (1 - p) / keep[rows].numel()) ** 0.5
        assert abs(rate - p) < 5 * sd
    # Not one pattern repeated: rows and columns differ.
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 8])
    # An adapter's mask depends on its own rows only, not on where the batch puts them:
    # the same generator gives the same mask at rows 50.. of a fused batch and at 0.. alone.
    alone = lora_triton.draw([DropoutRows(0, 46, 0.5, torch.Generator().manual_seed(1))], 46, torch.device("cpu"))
    assert torch.equal(lora_triton.keep_mask(alone, 46, k), keep[50:96])
    # The next call draws a new seed from the adapter's generator: a new mask.
    g = torch.Generator().manual_seed(3)
    first = lora_triton.keep_mask(lora_triton.draw([DropoutRows(0, 8, 0.5, g)], 8, torch.device("cpu")), 8, k)
    second = lora_triton.keep_mask(lora_triton.draw([DropoutRows(0, 8, 0.5, g)], 8, torch.device("cpu")), 8, k)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_masks_follow_the_adapters_own_layout(left):
    """Rows padded to 5 alone, to 8 in a fused batch: the kernels' masks on its tokens are
    the same (the padding around them keeps), and so are draw_keep_mask's (the torch kernels)."""
    from mlora.lora_fused import draw_keep_mask

    k, rows = 24, 3
    offset = 3 if left else 0
    alone = [DropoutRows(0, rows * 5, 0.5, torch.Generator().manual_seed(4), 5, 5, 0)]
    fused = [DropoutRows(2 * 8, (2 + rows) * 8, 0.5, torch.Generator().manual_seed(4), 8, 5, offset)]
    x_alone, x_fused = torch.zeros(rows * 5, k), torch.zeros((2 + rows) * 8, k)
    torch_alone = draw_keep_mask(x_alone, alone, True, torch.bool).view(rows, 5, k)
    torch_fused = draw_keep_mask(x_fused, fused, False, torch.bool)[16:].view(rows, 8, k)
    plan_alone = lora_triton.draw([DropoutRows(0, rows * 5, 0.5, torch.Generator().manual_seed(4), 5, 5, 0)],
                                  rows * 5, torch.device("cpu"))
    plan_fused = lora_triton.draw([DropoutRows(16, 16 + rows * 8, 0.5, torch.Generator().manual_seed(4), 8, 5, offset)],
                                  16 + rows * 8, torch.device("cpu"))
    triton_alone = lora_triton.keep_mask(plan_alone, rows * 5, k).view(rows, 5, k)
    triton_fused = lora_triton.keep_mask(plan_fused, 16 + rows * 8, k)[16:].view(rows, 8, k)
    tokens = slice(offset, offset + 5)
    for got, want in ((torch_fused, torch_alone), (triton_fused, triton_alone)):
        assert torch.equal(got[:, tokens], want)
        assert not want.all()  # something dropped: the comparison means something
    pads = torch.ones(rows, 8, dtype=torch.bool)
    pads[:, tokens] = False
    assert torch_fused[pads].all() and triton_fused[pads].all()  # the padding keeps, as rows of no adapter do
    # Every token of the batch is an adapter's (no ones-fill of the whole mask): the same.
    only = [DropoutRows(0, rows * 8, 0.5, torch.Generator().manual_seed(4), 8, 5, offset)]
    torch_only = draw_keep_mask(torch.zeros(rows * 8, k), only, True, torch.bool).view(rows, 8, k)
    assert torch.equal(torch_only[:, tokens], torch_alone) and torch_only[pads].all()


def test_threshold_is_the_rate_on_16_bits():
    assert lora_triton.threshold(0.0) == 0
    assert lora_triton.threshold(0.05) == 3277
    assert lora_triton.threshold(0.5) == 32768
    assert lora_triton.threshold(0.99999999) == 65535  # never a threshold no draw reaches


# ----------------------------------------------------------------------------- each kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("factor_rows", [False, True], ids=["factor[C]", "factor[N,C]"])
@pytest.mark.parametrize("c", [24, 300], ids=["one C tile", "several C tiles"])
def test_kernels_match_torch_with_the_written_mask(dtype, factor_rows, c):
    """Several C tiles: each draws the mask, the first writes its bits."""
    _check_kernels(dtype, factor_rows, c, n=70, k=100)  # no dimension a multiple of a tile


def test_kernels_match_torch_over_several_output_tiles():
    """bf16's backward tiles are large (up_masked 128 x 256, grad_a 128 columns of x): rows and
    columns over several of them, neither a multiple of one."""
    _check_kernels(torch.bfloat16, True, 40, n=300, k=530)


def _check_kernels(dtype, factor_rows, c, n, k):
    torch.manual_seed(0)
    x = torch.randn(n, k + 12)[:, 5:5 + k].to(dtype)  # strided: a column slice
    a = torch.randn(c, k).to(dtype)
    factor = torch.rand(n, c) if factor_rows else torch.rand(c)
    plan = _plan([(3, 40, 0.3), (40, n, 0.5)], n)
    keep = lora_triton.keep_mask(plan, n, k)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)

    h, bits = lora_triton.down(x, a, factor, plan)
    torch.testing.assert_close(h.float(), ((x.float() * keep) @ a.float().t()) * factor, **tol)
    assert h.dtype == dtype
    # The mask down applied, kept as bits for the backward: the one the plan draws.
    assert bits.shape == (n, -(-k // 8)) and bits.dtype == torch.uint8
    assert torch.equal(lora_triton.unpack(bits, k), keep)

    dh = torch.randn(n, c).to(dtype)
    dx = lora_triton.up_masked(dh, a, bits)
    torch.testing.assert_close(dx.float(), (dh.float() @ a.float()) * keep, **tol)
    assert dx.dtype == dtype and (dx[~keep] == 0).all()

    ref = dh.float().t() @ (x.float() * keep)
    for splits in (None, 1, 3):
        d_a = lora_triton.grad_a(dh, x, bits, splits=splits)
        assert d_a.dtype == torch.float32
        torch.testing.assert_close(d_a, ref, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- the input group


def _triton_reference_masks(rows, seq, in_f, p):
    """{adapter: its inverted-dropout mask [rows, seq, in]}: what the group drew from each
    adapter's generator (seed 7 + i, as test_lora._run_group sets), written out."""
    masks = {}
    for i, rr in enumerate(rows):
        n = (rr.end - rr.start) * seq
        plan = lora_triton.draw([DropoutRows(0, n, p, torch.Generator().manual_seed(7 + i))], n, torch.device("cpu"))
        masks[rr.name] = lora_triton.keep_mask(plan, n, in_f).view(rr.end - rr.start, seq, in_f) / (1 - p)
    return masks


@pytest.mark.parametrize("ranks", [[4, 4, 4], [2, 8, 4]])
def test_input_group_matches_autograd_with_its_masks(monkeypatch, ranks):
    """q/k/v-like group, three adapters (one row without an adapter), dropout 0.2: outputs, the
    input gradient and every LoRA gradient equal plain autograd with the kernels' masks."""
    monkeypatch.setattr(lora, "kernel", "triton")
    p, seq, in_f = 0.2, 3, 16
    rows = [AdapterRows("a", 0, 2), AdapterRows("b", 2, 3), AdapterRows("c", 4, 6)]
    torch.manual_seed(0)
    layout = BatchLayout(rows)
    members = _group(in_f, (16, 8, 8), layout)
    weights = {}
    for i, r in enumerate(ranks):
        for m, lin in enumerate(members):
            w = _weights(in_f, lin.out_features, r, 2.0 * r, p, 100 * i + m)
            w.generator = torch.Generator().manual_seed(7 + i)
            lin.adapters[rows[i].name] = weights[(rows[i].name, m)] = w
    x = torch.randn(6, seq, in_f, requires_grad=True)
    ys = [lin(x) for lin in members]
    grads = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, grads)

    masks = _triton_reference_masks(rows, seq, in_f, p)
    _assert_matches_reference(ys, grads, x, weights, members, rows, p, masks)


@pytest.mark.parametrize("p, train", [(0.0, True), (0.2, False)], ids=["p=0", "eval"])
def test_without_dropout_it_is_the_fused_kernel(monkeypatch, p, train):
    """p = 0, or eval mode with p > 0: no mask to draw, and the op runs no Triton kernel."""
    calls = []
    monkeypatch.setattr(lora_triton, "down", lambda *a: calls.append("down"))
    monkeypatch.setattr(lora, "kernel", "triton")
    layout = BatchLayout([AdapterRows("a", 0, 2)])
    members = _group(16, (16, 8, 8), layout)
    for m, lin in enumerate(members):
        lin.adapters["a"] = _weights(16, lin.out_features, 4, 8.0, p, m)
        lin.train(train)
    x = torch.randn(2, 3, 16, requires_grad=True)
    sum(lin(x).sum() for lin in members).backward()
    assert calls == [] and members[0].adapters["a"].lora_A.grad is not None


def _group_grads(monkeypatch, x_grad=True, trainable_bias=False, dtype=torch.float32):
    """One triton step of a q/k/v-like group, two adapters, dropout 0.3: the outputs and the
    LoRA gradients (fresh generators each call, so the masks repeat)."""
    monkeypatch.setattr(lora, "kernel", "triton")
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
    return [y.detach() for y in ys], grads, members


def test_input_without_grad_and_base_outside_the_op_give_the_same_lora_grads(monkeypatch):
    """Layer 0 (the input needs no gradient: no dx kernel) and a base the op cannot run (here
    a trainable bias; a quantized layer in practice: the op returns the delta only) give the
    LoRA gradients and outputs of the plain triton path."""
    ref_ys, ref, _ = _group_grads(monkeypatch)
    for kwargs in (dict(x_grad=False), dict(trainable_bias=True)):
        ys, grads, members = _group_grads(monkeypatch, **kwargs)
        for y, r in zip(ys, ref_ys):
            torch.testing.assert_close(y, r, rtol=1e-6, atol=1e-6)
        for key in ref:
            for g, r in zip(grads[key], ref[key]):
                torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)
    assert members[0].base.bias.grad is not None


def test_bf16_stays_close_to_fp32(monkeypatch):
    """bf16 activations (LoRA weights fp32) against the same step in fp32: the same masks, the
    LoRA gradients within bf16 rounding."""
    _, ref, _ = _group_grads(monkeypatch)
    _, grads, _ = _group_grads(monkeypatch, dtype=torch.bfloat16)
    for key in ref:
        for g, r in zip(grads[key], ref[key]):
            assert g.dtype == torch.float32
            assert (g - r).norm() <= 2e-2 * r.norm()


def test_caches_are_cleared_with_the_lora_caches(monkeypatch):
    monkeypatch.setattr(lora, "kernel", "triton")
    _plan([(0, 4, 0.5)], 4)
    assert lora_triton._tables.cache_info().currsize > 0
    lora.clear_lora_caches({})
    assert lora_triton._tables.cache_info().currsize == 0


# ----------------------------------------------------------------------------- at model level


@pytest.mark.parametrize("kernel", ["triton", "fused"])
def test_fused_batch_equals_each_adapter_alone(monkeypatch, tiny_llama, kernel):
    """Three adapters with dropout 0.1 in one batch give each adapter the loss and gradients of
    a batch of its rows alone: its masks come from its own generator, drawn over its own
    layout (its rows padded to its own longest). The torch kernel too (draw_keep_mask)."""
    from mlora.batching import MicroBatch, fuse
    from mlora.loss import fused_loss_sums

    from test_packing import PAD, SPECS, lora_grads, random_examples, three_adapters

    monkeypatch.setattr(lora, "kernel", kernel)

    def step(names):
        model, layout, adapters = three_adapters(tiny_llama, dropout=0.1, seed=5, b_seed=300)
        model.train()
        parts = []
        for k, name in enumerate(SPECS):
            # Lengths differ between adapters, so the fused batch pads further than each
            # alone; b is left-padded. Its masks follow its own layout, not the batch's.
            examples = random_examples(3 + k, 40 + k, lo=2, hi=6 + 4 * k, vocab=model.args.vocab_size)
            if name in names:
                tokens = sum(ex.num_label_tokens for ex in examples)
                parts.append(MicroBatch(name, examples, 0, 0, tokens, True, adapters[name].cfg.expand_side))
        sums = fused_loss_sums(model, layout, fuse(parts, PAD))
        losses = {p.adapter: sums[p.adapter][0] / p.step_label_tokens for p in parts}
        sum(losses.values()).backward()
        grads = {k: g for k, g in lora_grads({n: adapters[n] for n in names}).items()}
        return {k: v.item() for k, v in losses.items()}, grads

    fused_losses, fused_grads = step(list(SPECS))
    assert all(g.abs().max() > 0 for g in fused_grads.values())
    for name in SPECS:
        losses, grads = step([name])
        assert losses[name] == pytest.approx(fused_losses[name], rel=1e-5)
        for key, g in grads.items():
            torch.testing.assert_close(g, fused_grads[key], rtol=1e-4, atol=1e-6)


def test_recompute_redraws_the_same_masks(monkeypatch, tiny_llama):
    """Activation checkpointing replays each adapter's generator, so the recomputed forward
    draws the same seeds: recompute equals plain, as with the torch kernels."""
    from test_recompute import STEPS, _max_diff, _run

    monkeypatch.setattr(lora, "kernel", "triton")
    ref, ref_states, _ = _run(tiny_llama, recompute=False)
    got, states, calls = _run(tiny_llama, recompute=True)
    assert calls == 2 * STEPS
    assert _max_diff(got, ref) <= 1e-6
    assert all(torch.equal(s, r) for s, r in zip(states, ref_states))
    # And the masks are not torch's bernoulli draws: the fused kernel gives other gradients.
    monkeypatch.setattr(lora, "kernel", "fused")
    fused, _, _ = _run(tiny_llama, recompute=False)
    assert _max_diff(fused, ref) > 1e-4


# ----------------------------------------------------------------------------- where it runs


def test_unavailable_device_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(lora, "kernel", "triton")
    lora.check_kernel(torch.device("cpu"))  # the interpreter is on in the tests
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(UserError, match="MLORA_LORA_KERNEL=triton: it runs on CUDA devices, not cpu"):
        lora.check_kernel(torch.device("cpu"))
    lora.check_kernel(None)  # the package is there; the device is not known yet
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(lora_triton.importlib.metadata, "version", lambda name: "3.6.0")
    with pytest.raises(UserError, match="interpreter needs triton >= 3.9 to run it on the cpu, not 3.6.0"):
        lora.check_kernel(torch.device("cpu"))
