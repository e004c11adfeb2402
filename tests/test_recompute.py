"""`recompute`: activation checkpointing per decoder layer gives the same losses, gradients
and trained weights as no recomputation, LoRA dropout included (its masks come from the
adapters' own generators, which torch's checkpoint does not replay by itself)."""

from __future__ import annotations

import pytest
import torch

from mlora.adapter import layer_generators
from mlora.batching import MicroBatch, fuse
from mlora.loader import load_model
from mlora.loss import fused_loss_sums

from test_packing import PAD, assert_same_adapters, lora_grads, random_examples, three_adapters, train_variants

STEPS = 3


def _count_forwards(layer) -> list[int]:
    """Counts calls of layer.forward (module hooks do not fire in checkpoint's recomputation)."""
    calls, forward = [0], layer.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    layer.forward = counted
    return calls


def _run(tiny_llama, recompute: bool, register_generators: bool = True, pack_len=None, specs=None,
         steps: int = STEPS):
    """`steps` forward/backward passes of three adapters (test_packing's SPECS, or `specs`) with
    dropout 0.1; per step the losses and every LoRA gradient, plus the generators' final states
    and the layer-0 forward count."""
    model, layout, adapters = three_adapters(tiny_llama, dropout=0.1, seed=11, b_seed=200, specs=specs)
    model.recompute = recompute
    model.rng_generators = layer_generators(adapters.values()) if register_generators else []
    calls = _count_forwards(model.model.layers["0"])
    model.train()
    history = []
    for step in range(steps):
        parts = []
        for k, (name, a) in enumerate(adapters.items()):
            examples = random_examples(3 + k, 10 * step + k, lo=2, hi=12, vocab=model.args.vocab_size)
            tokens = sum(ex.num_label_tokens for ex in examples)
            parts.append(MicroBatch(name, examples, 0, step, tokens, True, a.cfg.expand_side))
        batch = fuse(parts, PAD, pack_len=pack_len)
        sums = fused_loss_sums(model, layout, batch)
        losses = {p.adapter: sums[p.adapter][0] / p.step_label_tokens for p in parts}
        sum(losses.values()).backward()
        grads = lora_grads(adapters)
        with torch.no_grad():  # a plain SGD step, so the next step sees other weights
            for a in adapters.values():
                for p in a.parameters():
                    p.sub_(0.1 * p.grad)
                    p.grad = None
        history.append(({k: v.item() for k, v in losses.items()}, grads))
    states = [g.get_state() for a in adapters.values() for g in a.dropout_generators.values()]
    return history, states, calls[0]


def _max_diff(run, ref) -> float:
    worst = 0.0
    for (losses, grads), (ref_losses, ref_grads) in zip(run, ref):
        worst = max(worst, *(abs(losses[k] - ref_losses[k]) for k in ref_losses))
        worst = max(worst, *((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads))
    return worst


@pytest.mark.parametrize("pack_len", [None, 24], ids=["padded", "packed"])
def test_recompute_equals_plain_with_dropout(tiny_llama, pack_len):
    ref, ref_states, ref_calls = _run(tiny_llama, recompute=False, pack_len=pack_len)
    got, states, calls = _run(tiny_llama, recompute=True, pack_len=pack_len)
    assert ref_calls == STEPS and calls == 2 * STEPS  # each layer really ran again in the backward
    assert all(g.abs().max() > 0 for _, grads in ref for g in grads.values())
    assert _max_diff(got, ref) <= 1e-6
    # The generators end where they would without recompute: later steps draw the same masks.
    assert all(torch.equal(s, r) for s, r in zip(states, ref_states))


@pytest.mark.parametrize("family, pack_len", [("qwen3_5_text", None), ("qwen3_5_text", 24), ("qwen3_next", 24)],
                         ids=["padded", "packed", "qwen3_next-packed"])
def test_recompute_equals_plain_on_linear_attention(tmp_path, family, pack_len):
    """Qwen3.5's linear-attention layers (their pad mask and packed documents an input of the
    checkpointed layer) recompute to the same losses and gradients, LoRA dropout included; so do
    Qwen3-Next's (fused projections; its MLPs take no LoRA)."""
    from conftest import make_tiny_model

    base = make_tiny_model(tmp_path / family, family)
    specs = {"a": (4, ["in_proj_qkv", "in_proj_b", "out_proj"], "right"),
             "b": (8, ["q_proj", "o_proj", "in_proj_z", "in_proj_a", "up_proj"], "left"),
             "c": (2, ["in_proj_qkv", "down_proj"], "right")}
    if family == "qwen3_next":
        specs = {"a": (4, ["in_proj_qkvz", "out_proj"], "right"), "b": (8, ["q_proj", "o_proj", "in_proj_ba"], "left"),
                 "c": (2, ["in_proj_qkvz", "in_proj_ba"], "right")}
    ref, ref_states, _ = _run(base, recompute=False, pack_len=pack_len, specs=specs)
    got, states, calls = _run(base, recompute=True, pack_len=pack_len, specs=specs)
    assert calls == 2 * STEPS and all(g.abs().max() > 0 for _, grads in ref for g in grads.values())
    assert _max_diff(got, ref) <= 1e-6
    assert all(torch.equal(s, r) for s, r in zip(states, ref_states))


def test_recompute_equals_plain_on_gemma4_kv_sharing(tmp_path):
    """Gemma 4 E2B/E4B: a KV-shared layer takes its source layer's keys and values as inputs of
    its checkpoint (the source layer hands them on as outputs of its own), and each layer its
    per-layer input: recomputed, the same losses and gradients, LoRA dropout included."""
    from conftest import GEMMA4_E2B, make_tiny_model

    base = make_tiny_model(tmp_path / "gemma4", "gemma4_text", **GEMMA4_E2B)
    specs = {"a": (4, ["k_proj", "v_proj"], "right"), "b": (8, ["q_proj", "o_proj", "up_proj"], "left"),
             "c": (2, ["v_proj", "down_proj"], "right")}
    ref, ref_states, _ = _run(base, recompute=False, pack_len=24, specs=specs)
    got, states, calls = _run(base, recompute=True, pack_len=24, specs=specs)
    assert calls == 2 * STEPS and all(g.abs().max() > 0 for _, grads in ref for g in grads.values())
    assert _max_diff(got, ref) <= 1e-6
    assert all(torch.equal(s, r) for s, r in zip(states, ref_states))


def test_unregistered_generators_would_break_dropout(tiny_llama):
    """The test above can fail: without replaying the adapters' generators the recomputed
    masks differ from the forward's, and so do the gradients."""
    ref, ref_states, _ = _run(tiny_llama, recompute=False)
    got, states, _ = _run(tiny_llama, recompute=True, register_generators=False)
    assert _max_diff(got, ref) > 1e-3


def test_recompute_only_while_grad_is_enabled(tiny_llama):
    model = load_model(tiny_llama, "cpu", torch.float32)
    model.recompute = True
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    calls = _count_forwards(model.model.layers["0"])
    with torch.no_grad():
        plain = model(ids)
    assert calls[0] == 1
    model.recompute = False
    with torch.no_grad():
        assert torch.equal(model(ids), plain)


def test_train_with_recompute_equals_without(tmp_path, tiny_llama):
    outs = train_variants(tmp_path, tiny_llama, ["a", "b"], {False: dict(recompute=False), True: dict(recompute=True)},
                          dropout=0.1, num_epochs=1)
    assert_same_adapters(outs[True], outs[False], ["a", "b"], 1e-6)
