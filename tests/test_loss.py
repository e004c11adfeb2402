"""loss.py: the head and cross-entropy run a chunk of tokens at a time equal the whole-logits loss
(values and gradients, through the model and its LoRA), for every head variant."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import mlora.loss as loss
from mlora.data import IGNORE_INDEX
from mlora.lora import AdapterRows, BatchLayout, LoraWeights, inject_lora
from mlora.models.llama import CausalLM, ModelArgs

SMALL = ModelArgs("llama", vocab_size=400, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16)
HEADS = {
    "plain": {},
    "gemma2_softcap": {"final_softcap": 3.0},
    "granite_scaling": {"logits_scaling": 4.0},
}


def whole_logits_sums(logits: torch.Tensor, labels: torch.Tensor, rows: list[AdapterRows]) -> dict[str, torch.Tensor]:
    """The reference: every adapter's CE sum from the whole logits [B, S, V], upcast, shifted."""
    ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                         ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape[0], -1)
    return {r.name: ce[r.start:r.end].sum() for r in rows}


def model_with_lora(head: str, dtype: torch.dtype, compute: torch.dtype | None = None
                    ) -> tuple[CausalLM, BatchLayout, list[torch.Tensor]]:
    """SMALL with `head`'s variant and two adapters (dropout 0) on q_proj and down_proj, its
    weights rounded to `dtype` and computing in `compute` (default: dtype)."""
    torch.manual_seed(0)
    model = CausalLM(dataclasses.replace(SMALL, **HEADS[head])).to(dtype).to(compute or dtype).requires_grad_(False)
    layout = BatchLayout()
    wrappers = inject_lora(model, layout)
    params = []
    for path, wrapper in wrappers.items():
        if path.rsplit(".", 1)[-1] in ("q_proj", "down_proj"):
            for name in ("a", "b"):
                weights = LoraWeights(wrapper.in_features, wrapper.out_features, 4, 8, 0.0, False, 0)
                torch.nn.init.normal_(weights.lora_B, std=0.02)  # (B starts at zero: no gradient to A)
                wrapper.adapters[name] = weights
                params += [weights.lora_A, weights.lora_B]
    return model, layout, params


def batch(B: int = 4, S: int = 24) -> tuple[torch.Tensor, torch.Tensor, list[AdapterRows]]:
    """ids, labels with ignored prompt tokens (and a whole ignored row), two adapters' rows."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SMALL.vocab_size, (B, S), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    labels[1] = IGNORE_INDEX
    return ids, labels, [AdapterRows("a", 0, 1), AdapterRows("b", 1, B)]


def losses_and_grads(model, layout, params, chunked: bool):
    """Each adapter's CE sum and every LoRA gradient, the adapters' sums weighted differently
    (as the trainer divides each by its own step tokens), the head chunked or whole."""
    ids, labels, rows = batch()
    layout.rows = rows
    weights = {"a": 1 / 19, "b": 1 / 57}
    for p in params:
        p.grad = None
    if chunked:
        sums = {k: v[0] for k, v in loss.head_loss_sums(model, model(ids, head=False), labels, rows).items()}
    else:
        sums = whole_logits_sums(model(ids), labels, rows)
    sum(sums[k] * w for k, w in weights.items()).backward()
    return torch.stack([sums[k].detach() for k in weights]), [p.grad.clone() for p in params]


@pytest.mark.parametrize("chunk_bytes", [256 * 2**20, 64 * 400 * 4], ids=["one_chunk", "chunks_of_64"])
@pytest.mark.parametrize("head", list(HEADS))
def test_chunked_loss_and_lora_gradients_equal_the_whole_logits_fp32(monkeypatch, head, chunk_bytes):
    """fp32: every adapter's loss and every LoRA gradient equal the whole-logits loss's to rounding."""
    monkeypatch.setattr(loss, "CHUNK_LOGITS_BYTES", chunk_bytes)
    model, layout, params = model_with_lora(head, torch.float32)
    sums, grads = losses_and_grads(model, layout, params, chunked=True)
    ref_sums, ref_grads = losses_and_grads(model, layout, params, chunked=False)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-6, atol=0)
    for g, ref in zip(grads, ref_grads):
        assert ref.abs().max() > 0
        assert (g - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("head", list(HEADS))
def test_chunked_loss_in_bf16_is_as_close_to_fp32_as_the_whole_logits(monkeypatch, head):
    """bf16: against the same weights computing in fp32, the chunked loss and its LoRA gradients
    are as close as the whole-logits loss's: the losses within 1.1x its error, the gradients'
    largest and mean relative errors (each gradient's largest difference over its largest
    entry, about 1 % either way) within 1.5x and 1.2x (the chunked backward rounds once more,
    the per-token scale applied after the head's GEMM)."""
    monkeypatch.setattr(loss, "CHUNK_LOGITS_BYTES", 64 * 400 * 4)
    exact_sums, exact_grads = losses_and_grads(*model_with_lora(head, torch.bfloat16, torch.float32), chunked=False)
    model, layout, params = model_with_lora(head, torch.bfloat16)
    errors = {}
    for chunked in (True, False):
        sums, grads = losses_and_grads(model, layout, params, chunked=chunked)
        grad_errors = torch.stack([(g - e).abs().max() / e.abs().max() for g, e in zip(grads, exact_grads)])
        errors[chunked] = ((sums - exact_sums).abs() / exact_sums.abs()).max(), grad_errors.max(), grad_errors.mean()
    (loss_err, grad_max, grad_mean), (ref_loss_err, ref_grad_max, ref_grad_mean) = errors[True], errors[False]
    assert loss_err <= 1.1 * ref_loss_err + 1e-6
    assert grad_max <= 1.5 * ref_grad_max and grad_mean <= 1.2 * ref_grad_mean, (errors)


def test_chunks_split_the_tokens_and_the_gradient_is_per_token(monkeypatch):
    """Chunks of 64 tokens over 130 (three chunks, the last short): every token's loss and its
    gradient with respect to h match a per-token weighted whole-logits reference exactly in fp32."""
    monkeypatch.setattr(loss, "CHUNK_LOGITS_BYTES", 64 * SMALL.vocab_size * 4)
    torch.manual_seed(0)
    model = CausalLM(SMALL).requires_grad_(False)
    h = torch.randn(130, SMALL.hidden_size, requires_grad=True)
    targets = torch.randint(0, SMALL.vocab_size, (130,))
    targets[::7] = IGNORE_INDEX
    upstream = torch.rand(130)
    ce = loss.chunked_head_cross_entropy(model, h, targets)
    (grad,) = torch.autograd.grad(ce, h, upstream)
    h_ref = h.detach().requires_grad_()
    ref = F.cross_entropy(model.logits(h_ref), targets, ignore_index=IGNORE_INDEX, reduction="none")
    (grad_ref,) = torch.autograd.grad(ref, h_ref, upstream)
    torch.testing.assert_close(ce, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)
    assert (ce[::7] == 0).all() and (grad[::7] == 0).all()


def test_without_autograd_no_gradient_is_taken(monkeypatch):
    """Under no_grad (evaluation) the chunks take no gradient, even of hidden states that
    require one: no hidden-state gradient is made."""
    model = CausalLM(SMALL).requires_grad_(False)
    h = torch.randn(2, 8, SMALL.hidden_size, requires_grad=True)
    calls = []
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1))
    with torch.no_grad():
        sums = loss.head_loss_sums(model, h, torch.randint(0, SMALL.vocab_size, (2, 8)), [AdapterRows("a", 0, 2)])
    assert calls == [] and torch.isfinite(sums["a"][0]) and sums["a"][1] == 2 * 7


def test_a_trainable_head_is_refused():
    """The per-token gradient trick holds for a frozen head only: a head with a gradient is refused."""
    model = CausalLM(SMALL)  # parameters require grad
    with pytest.raises(ValueError, match="frozen head"):
        loss.chunked_head_cross_entropy(model, torch.randn(4, SMALL.hidden_size), torch.zeros(4, dtype=torch.long))


def test_chunk_sizes():
    assert loss.chunk_tokens(32000) == 2048  # 256 MiB of fp32 logits: 2,097 tokens, whole tiles
    assert loss.chunk_tokens(128256) == 512
    assert loss.chunk_tokens(151936) == 384
    assert loss.chunk_tokens(10**9) == loss.CHUNK_MULTIPLE  # at least one tile


def alpaca_like_parts() -> list:
    """Two adapters' micro-batches of rows of uneven length whose first ~40 % (the prompt) is
    not trained, one padded on the left."""
    from mlora.batching import MicroBatch
    from mlora.data import Example

    g = torch.Generator().manual_seed(3)
    parts = []
    for name, n, side in (("a", 2, "right"), ("b", 3, "left")):
        examples = []
        for _ in range(n):
            length = int(torch.randint(6, 20, (1,), generator=g))
            ids = torch.randint(3, SMALL.vocab_size, (length,), generator=g).tolist()
            prompt = max(1, int(0.4 * length))
            examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
        parts.append(MicroBatch(name, examples, 0, 0, sum(ex.num_label_tokens for ex in examples), True, side))
    return parts


@pytest.mark.parametrize("pack_len", [None, 24], ids=["padded", "packed"])
def test_only_trained_positions_go_through_the_head(monkeypatch, pack_len):
    """A batch moved by FusedBatch.to carries its trained positions, found on the host: the head
    sees exactly the label tokens (no prompt token, pad or last position), and every adapter's
    loss and every LoRA gradient equal those of the head on every position."""
    from mlora.batching import fuse

    model, layout, params = model_with_lora("plain", torch.float32)
    parts = alpaca_like_parts()
    batch = fuse(parts, 0, pack_len=pack_len)
    moved = batch.to(torch.device("cpu"))
    assert moved.target_positions is not None and batch.target_positions is None
    seen = []
    logits = model.logits
    monkeypatch.setattr(model, "logits", lambda h: seen.append(h.shape[0]) or logits(h))

    def run(b):
        for p in params:
            p.grad = None
        sums = loss.fused_loss_sums(model, layout, b)
        sum(ce / (i + 1) for i, (ce, _) in enumerate(sums.values())).backward()
        return {k: (v[0].detach(), v[1]) for k, v in sums.items()}, [p.grad.clone() for p in params]

    sums, grads = run(moved)
    assert sum(seen) == sum(p.label_tokens for p in parts) == moved.target_positions.numel()
    seen.clear()
    ref_sums, ref_grads = run(batch)  # every position
    assert sum(seen) == batch.input_ids.numel()
    for name, (ce, count) in ref_sums.items():
        assert sums[name][1] == count
        torch.testing.assert_close(sums[name][0], ce, rtol=1e-6, atol=0)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-8)


def test_an_ignored_position_passes_back_no_gradient_even_from_non_finite_logits():
    """The head on every position (no trained positions given) runs the ignored ones too: a
    non-finite hidden state there (a row's last position, a pad) leaves the loss finite and its
    gradient exactly 0 (log_softmax's backward alone would make it NaN)."""
    model = CausalLM(SMALL).requires_grad_(False)
    h = torch.randn(2, 8, SMALL.hidden_size)
    h[1, 7] = float("nan")  # row 1's last position: it predicts nothing
    h[0, 2] = float("inf")  # a prompt token
    h.requires_grad_()
    labels = torch.randint(0, SMALL.vocab_size, (2, 8))
    labels[0, 3] = IGNORE_INDEX
    sums = loss.head_loss_sums(model, h, labels, [AdapterRows("a", 0, 2)])
    sums["a"][0].backward()
    assert torch.isfinite(sums["a"][0]) and torch.isfinite(h.grad).all()
    assert (h.grad[1, 7] == 0).all() and (h.grad[0, 2] == 0).all() and (h.grad[0, 1] != 0).any()


def test_positions_without_counts_are_refused():
    model = CausalLM(SMALL).requires_grad_(False)
    with pytest.raises(ValueError, match="label counts"):
        loss.head_loss_sums(model, torch.randn(1, 4, SMALL.hidden_size), torch.zeros(1, 4, dtype=torch.long),
                            [AdapterRows("a", 0, 1)], None, torch.arange(3))


def test_positions_that_disagree_with_the_counts_are_refused():
    model = CausalLM(SMALL).requires_grad_(False)
    h = torch.randn(2, 8, SMALL.hidden_size)
    labels = torch.randint(0, SMALL.vocab_size, (2, 8))
    with pytest.raises(ValueError, match="3 trained positions for 14 label tokens"):
        loss.head_loss_sums(model, h, labels, [AdapterRows("a", 0, 2)], {"a": 14}, torch.arange(3))


def test_a_batch_without_any_target_has_zero_loss():
    """Every token a prompt: nothing goes through the head, and the loss is 0 with a gradient."""
    model = CausalLM(SMALL).requires_grad_(False)
    h = torch.randn(2, 8, SMALL.hidden_size, requires_grad=True)
    labels = torch.full((2, 8), IGNORE_INDEX)
    sums = loss.head_loss_sums(model, h, labels, [AdapterRows("a", 0, 2)], {"a": 0},
                               torch.zeros(0, dtype=torch.long))
    sums["a"][0].backward()
    assert sums["a"][0].item() == 0 and (h.grad == 0).all()


def _kernel_unavailable() -> str | None:
    from mlora import lora_triton

    return lora_triton.unavailable(torch.device("cpu"))  # (Triton's interpreter, as the triton LoRA kernel's tests)


needs_triton = pytest.mark.skipif(_kernel_unavailable() is not None, reason=str(_kernel_unavailable()))


@needs_triton
@pytest.mark.parametrize("vocab", [400, 5000], ids=["one_block", "two_blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_kernel_equals_torch(dtype, vocab):
    """loss_kernels' kernel: each row's cross-entropy (0 when ignored) and, over the logits, its
    gradient (exactly 0 when ignored) equal torch's log_softmax + nll_loss and their autograd
    gradient rounded to the dtype; without the gradient the logits are left as they are."""
    from mlora.loss_kernels import cross_entropy_grad_

    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(37, vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, (37,), generator=g)
    targets[::5] = IGNORE_INDEX
    targets[1] = vocab - 1  # (the last entry of a partial block)
    if vocab > 4096:  # a first block of -inf only (its shift must not be -inf), the target after it
        logits[2, :4096] = -float("inf")
        targets[2] = 4500
    exact = logits.float().requires_grad_()
    ref = F.cross_entropy(exact, targets, ignore_index=IGNORE_INDEX, reduction="none")
    ref.sum().backward()
    untouched = logits.clone()
    loss = cross_entropy_grad_(untouched, targets, IGNORE_INDEX, with_grad=False)
    assert torch.equal(untouched, logits)
    grad = logits.clone()
    torch.testing.assert_close(cross_entropy_grad_(grad, targets, IGNORE_INDEX), ref.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-5)
    assert (loss[::5] == 0).all() and (grad[::5] == 0).all()
    # (the same value computed another way: in bf16 it may round to the neighbour, one ulp)
    ulp = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(grad.float(), exact.grad.to(dtype).float(), rtol=ulp, atol=1e-6)


@needs_triton
def test_the_kernel_through_the_model_equals_torchs_ops(monkeypatch):
    """The chunks with loss_kernels' kernel give the losses and LoRA gradients of torch's ops
    (fp32); a soft-capped or scaled head keeps torch's ops (its logits are not the head's output)."""
    monkeypatch.setattr(loss, "CHUNK_LOGITS_BYTES", 0)  # chunks of 64 tokens
    model, layout, params = model_with_lora("plain", torch.float32)
    monkeypatch.setattr(loss, "cross_entropy", "torch")
    ref_sums, ref_grads = losses_and_grads(model, layout, params, chunked=True)
    monkeypatch.setattr(loss, "cross_entropy", "triton")
    h = torch.zeros(1, SMALL.hidden_size)
    assert loss._fused_cross_entropy(model, h)
    sums, grads = losses_and_grads(model, layout, params, chunked=True)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-6, atol=0)
    for g, ref in zip(grads, ref_grads):
        assert (g - ref).abs().max() <= 1e-5 * ref.abs().max()
    for head in ("gemma2_softcap", "granite_scaling"):
        assert not loss._fused_cross_entropy(model_with_lora(head, torch.float32)[0], h)
    monkeypatch.setattr(loss, "cross_entropy", "auto")
    assert not loss._fused_cross_entropy(model, h)  # (auto: on CUDA only)
