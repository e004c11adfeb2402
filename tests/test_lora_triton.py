"""The `triton` LoRA kernel (lora_triton.py, philox_kernels.py), run on the CPU through
Triton's interpreter (conftest sets TRITON_INTERPRET=1): its keep-mask, each kernel against
torch with that mask written out, the input group against plain autograd, and at model level
fused equals solo and recompute equals plain, dropout > 0 throughout."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")  # a test dependency on Linux x86-64 (pyproject); CI installs it

import mlora.lora as lora  # noqa: E402
from mlora import lora_triton  # noqa: E402

if lora_triton.unavailable(torch.device("cpu")):  # an older interpreter (a CUDA box's pinned triton)
    pytest.skip(lora_triton.unavailable(torch.device("cpu")), allow_module_level=True)
from mlora.errors import UserError  # noqa: E402
from mlora.lora import AdapterRows, BatchLayout  # noqa: E402
from mlora.lora_fused import DropoutRows  # noqa: E402

from test_lora import _assert_matches_reference, _group, _group_grads, _weights  # noqa: E402


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


class _OffsetGenerator:
    """Stands in for a CUDA generator (no GPU here): a seed and a Philox offset, host state
    only, with the calls lora_triton.draw_seed makes and the state recompute, OOM retries and
    checkpoints save and restore (a CUDA generator's get_state holds seed and offset)."""

    device = torch.device("cuda")

    def __init__(self, seed: int, offset: int = 0):
        self.seed, self.offset = seed, offset

    def initial_seed(self) -> int:
        return self.seed

    def get_offset(self) -> int:
        return self.offset

    def set_offset(self, offset: int) -> None:
        assert offset % 4 == 0, "CUDA's set_offset refuses offsets that are not multiples of 4"
        self.offset = offset

    def get_state(self) -> tuple[int, int]:
        return self.seed, self.offset

    def set_state(self, state: tuple[int, int]) -> None:
        self.seed, self.offset = state


def test_a_cuda_generators_seed_comes_from_its_state_on_the_host():
    g = _OffsetGenerator(1234)
    seeds = [lora_triton.draw_seed(g) for _ in range(3)]
    assert g.offset == 3 * lora_triton.OFFSET_STEP == 12  # offsets move in multiples of 4
    assert len(set(seeds)) == 3 and all(0 <= s < 1 << 62 for s in seeds)
    # The state decides the seed: the same state, the same seed; a restored state (recompute,
    # an OOM retry, a resumed checkpoint) redraws the same seeds.
    assert lora_triton.draw_seed(_OffsetGenerator(1234, 4)) == seeds[1]
    g.set_state((1234, 0))
    assert [lora_triton.draw_seed(g) for _ in range(3)] == seeds
    # Another seed (another adapter or layer), other seeds.
    assert not {lora_triton.draw_seed(_OffsetGenerator(1235, o)) for o in (0, 4, 8)} & set(seeds)
    # Seeds of neighbouring offsets share no obvious bits (the mixer): about half differ.
    flips = [bin(a ^ b).count("1") for a, b in zip(seeds, seeds[1:])]
    assert all(16 <= f <= 46 for f in flips), flips


def test_a_cpu_generators_seed_is_the_draw_the_kernel_made_before():
    """CPU generators (the tests) draw the seed a device launch drew before seeds moved to the
    host: the masks of the CPU tests are those of earlier versions, bit for bit."""
    seeds = [lora_triton.draw_seed(torch.Generator().manual_seed(s)) for s in (0, 1, 2)]
    before = [torch.empty(1, dtype=torch.int64).random_(0, 1 << 62, generator=torch.Generator().manual_seed(s))
              for s in (0, 1, 2)]
    assert seeds == [int(b) for b in before]
    g = torch.Generator().manual_seed(5)
    assert lora_triton.draw_seed(g) != lora_triton.draw_seed(g)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_draw_makes_no_tensor_op_up_to_8_adapters_and_recompute_redraws():
    """Drawing the seeds of up to 8 adapters from CUDA generators is host work (no launch); the
    kernels get them as scalars; a restored state redraws the same masks."""
    cpu = torch.device("cpu")
    drops = lambda gens: [DropoutRows(4 * i, 4 * i + 4, 0.5, g) for i, g in enumerate(gens)]  # noqa: E731
    gens = [_OffsetGenerator(100 + i) for i in range(lora_triton.SCALAR_SEEDS)]
    lora_triton.draw(drops(gens), 32, cpu)  # the per-layout tables, made once per layout
    states = [g.get_state() for g in gens]
    with _CountOps() as count:
        plan = lora_triton.draw(drops(gens), 32, cpu)
        args = plan.args()
    assert count.ops == []
    assert plan.seed_table is None and not plan.many_seeds
    scalars = args[-lora_triton.SCALAR_SEEDS:]
    assert all(isinstance(s, int) and s >> 62 == 1 for s in scalars)  # tagged: one i64 signature
    assert [s & ~lora_triton.SEED_TAG for s in scalars] == list(plan.seeds)
    keep = lora_triton.keep_mask(plan, 32, 24)
    assert not keep.all() and not torch.equal(keep[:4], keep[4:8])
    for g, state in zip(gens, states):
        g.set_state(state)
    assert torch.equal(lora_triton.keep_mask(lora_triton.draw(drops(gens), 32, cpu), 32, 24), keep)
    assert not torch.equal(lora_triton.keep_mask(lora_triton.draw(drops(gens), 32, cpu), 32, 24), keep)


def test_seeds_do_not_change_the_kernels_specialisation():
    """Triton compiles a kernel per specialisation of its arguments, which for integers depends
    on the value (i32 or i64, == 1, divisible by 16): seeds that change every call must all
    land in one, or each call would compile anew. The specialisation Triton's runtime computes
    for a launch (its JIT cache key's), for plans of very different seeds, is one."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from mlora import philox_kernels

    owner, table = lora_triton._tables(((0, 4, 0.5, 1, 0), (4, 8, 0.5, 1, 0)), 1, 8, torch.device("cpu"))
    for name in ("down_kernel", "mask_kernel"):
        kernel = getattr(philox_kernels, name)  # the interpreter's wrapper here: the kernel as compiled
        unspecialised = getattr(kernel, "kwargs", {}).get("do_not_specialize") or kernel.do_not_specialize
        fn = JITFunction(getattr(kernel, "fn", kernel), do_not_specialize=unspecialised)
        bind = create_function_from_signature(fn.signature, fn.params, BaseBackend)
        keys = set()
        for seeds in ((0, 1), (16, 5), (1 << 40, (1 << 62) - 1), (123456789, 2 ** 31)):
            args = lora_triton.PhiloxDropout(owner, table, seeds, 1).args()
            bound = dict(zip(fn.arg_names[fn.arg_names.index("owner_ptr"):], args))
            _, specialisation, _ = bind(**{arg: bound.get(arg, 0) for arg in fn.arg_names})
            keys.add(str(specialisation))
        assert len(keys) == 1, keys
        # ...which the seeds' tag makes so: untagged, a seed under 2**31 is an i32, one above an i64.
        raw = {str(bind(**{arg: s if arg == "seed0" else 0 for arg in fn.arg_names})[1]) for s in (1, 5, 1 << 31)}
        assert len(raw) == 2, raw


def test_more_than_8_adapters_get_the_masks_they_get_alone():
    """9 adapters, over the kernels' scalar seeds: the seeds go to the kernels as one tensor, and
    each adapter's mask (rows padded to 6 in the batch, to its own length alone) is the one it
    draws alone, in keep_mask and in down's bits alike."""
    k, seq, rows, cpu = 24, 6, 2, torch.device("cpu")
    lengths = [6, 5, 3, 6, 4, 6, 2, 5, 6]

    def rows_of(i, seed):
        start = (1 + rows * i) * seq  # batch row 0 has no adapter
        return DropoutRows(start, start + rows * seq, 0.3 + 0.05 * i, torch.Generator().manual_seed(seed), seq,
                           lengths[i], seq - lengths[i] if i % 2 else 0)

    n = (1 + rows * len(lengths)) * seq
    plan = lora_triton.draw([rows_of(i, 40 + i) for i in range(len(lengths))], n, cpu)
    assert plan.many_seeds and plan.seed_table.shape == (len(lengths),)
    keep = lora_triton.keep_mask(plan, n, k)
    assert keep[:seq].all()
    x = torch.randn(n, k)
    _, bits = lora_triton.down(x, torch.randn(16, k), torch.ones(16), plan)
    assert torch.equal(lora_triton.unpack(bits, k), keep)
    for i, length in enumerate(lengths):
        alone = lora_triton.draw([DropoutRows(0, rows * length, 0.3 + 0.05 * i, torch.Generator().manual_seed(40 + i),
                                              length, length, 0)], rows * length, cpu)
        want = lora_triton.keep_mask(alone, rows * length, k).view(rows, length, k)
        got = keep[(1 + rows * i) * seq:(1 + rows * (i + 1)) * seq].view(rows, seq, k)
        tokens = slice(seq - length, seq) if i % 2 else slice(0, length)
        assert torch.equal(got[:, tokens], want) and not want.all()


def test_threshold_is_the_rate_on_16_bits():
    assert lora_triton.threshold(0.0) == 0
    assert lora_triton.threshold(0.05) == 3277
    assert lora_triton.threshold(0.5) == 32768
    assert lora_triton.threshold(0.99999999) == 65535  # never a threshold no draw reaches


# ----------------------------------------------------------------------------- each kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
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
    # fp32: sums of up to C products of N(0,1) values, ~sqrt(C) in size, summed by the kernel in
    # another order than torch's matmul: a few fp32 ulps of that size, not of the result (1.05e-5
    # on a result of 0.03 on an AVX2-only EPYC, under 1e-5 on AVX-512 hosts), hence atol 5e-5.
    tol = dict(rtol=1e-5, atol=5e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)

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


@pytest.mark.parametrize("ranks", [[4, 4, 4], [2, 8, 4], [2] * 9], ids=["3 adapters", "mixed ranks", "9 adapters"])
def test_input_group_matches_autograd_with_its_masks(monkeypatch, ranks):
    """q/k/v-like group, three adapters (one row without an adapter), dropout 0.2: outputs, the
    input gradient and every LoRA gradient equal plain autograd with the kernels' masks, each
    adapter's those it draws alone. Also for 9 adapters, whose seeds the kernel reads from a
    tensor (over lora_triton.SCALAR_SEEDS)."""
    monkeypatch.setattr(lora, "kernel", "triton")
    p, seq, in_f = 0.2, 3, 16
    rows = [AdapterRows("a", 0, 2), AdapterRows("b", 2, 3), AdapterRows("c", 4, 6)]
    if len(ranks) > 3:  # one row each, row 3 without an adapter
        rows = [AdapterRows(f"a{i}", i + (i >= 3), i + 1 + (i >= 3)) for i in range(len(ranks))]
    torch.manual_seed(0)
    layout = BatchLayout(rows)
    members = _group(in_f, (16, 8, 8), layout)
    weights = {}
    for i, r in enumerate(ranks):
        for m, lin in enumerate(members):
            w = _weights(in_f, lin.out_features, r, 2.0 * r, p, 100 * i + m)
            w.generator = torch.Generator().manual_seed(7 + i)
            lin.adapters[rows[i].name] = weights[(rows[i].name, m)] = w
    x = torch.randn(rows[-1].end, seq, in_f, requires_grad=True)
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


def test_input_without_grad_and_base_outside_the_op_give_the_same_lora_grads(monkeypatch):
    """Layer 0 (the input needs no gradient: no dx kernel) and a base the op cannot run (here
    a trainable bias; a quantized layer in practice: the op returns the delta only) give the
    LoRA gradients and outputs of the plain triton path."""
    ref_ys, ref, _, _ = _group_grads(monkeypatch)
    for kwargs in (dict(x_grad=False), dict(trainable_bias=True)):
        ys, grads, members, _ = _group_grads(monkeypatch, **kwargs)
        for y, r in zip(ys, ref_ys):
            torch.testing.assert_close(y, r, rtol=1e-6, atol=1e-6)
        for key in ref:
            for g, r in zip(grads[key], ref[key]):
                torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)
    assert members[0].base.bias.grad is not None


def test_bf16_stays_close_to_fp32(monkeypatch):
    """bf16 activations (LoRA weights fp32) against the same step in fp32: the same masks, the
    LoRA gradients within bf16 rounding."""
    _, ref, _, _ = _group_grads(monkeypatch)
    _, grads, _, _ = _group_grads(monkeypatch, dtype=torch.bfloat16)
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
    from test_recompute import _max_diff, _run

    steps = 2  # (interpreted kernels) the second step draws from where the first's recompute left them
    monkeypatch.setattr(lora, "kernel", "triton")
    ref, ref_states, _ = _run(tiny_llama, recompute=False, steps=steps)
    got, states, calls = _run(tiny_llama, recompute=True, steps=steps)
    assert calls == 2 * steps
    assert _max_diff(got, ref) <= 1e-6
    assert all(torch.equal(s, r) for s, r in zip(states, ref_states))
    # And the masks are not torch's bernoulli draws: the fused kernel gives other gradients.
    monkeypatch.setattr(lora, "kernel", "fused")
    fused, _, _ = _run(tiny_llama, recompute=False, steps=steps)
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
