"""Sequence packing: the packer's invariants, packed logits == each sequence alone (llama,
mistral with a sliding window, qwen2, qwen3, gemma 2 and 3, phi-3), a packed training step == the unpacked one, and a
`packing: true` run trains the same adapters as `packing: false`."""

from __future__ import annotations

import json
import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import GEMMA4_E2B, make_tiny_model
from mlora.adapter import Adapter
from mlora.batching import MicroBatch, fuse
from mlora.cli import main
from mlora.config import AdapterConfig, parse_config
from mlora.data import IGNORE_INDEX, Example
from mlora.errors import UserError
from mlora.loader import load_model
from mlora.lora import BatchLayout, inject_lora
from mlora.loss import fused_loss_sums
from mlora.packing import PAD_DOCUMENT, pack_bins, pack_examples, packed_shape
from mlora.strategies import Candidate, padded_tokens

from test_train import make_config, rel_diff

PAD = 2


def random_examples(n: int, seed: int, lo: int = 1, hi: int = 20, vocab: int = 400) -> list[Example]:
    """Examples of random lengths whose labels mask a random prompt prefix (as alpaca rows do)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = rng.randint(0, length)
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        out.append(Example(ids, labels))
    return out


def training_pairs_unpacked(examples) -> Counter:
    """(context, target) of every trained token: labels[t] predicted from ids[:t]."""
    return Counter((tuple(ex.input_ids[:t]), ex.labels[t])
                   for ex in examples for t in range(1, len(ex.input_ids)) if ex.labels[t] != IGNORE_INDEX)


def training_pairs_packed(packed) -> Counter:
    """The same from packed rows: the context of position t is the earlier tokens of its document."""
    pairs = Counter()
    for r in range(packed.input_ids.shape[0]):
        ids, labels = packed.input_ids[r].tolist(), packed.labels[r].tolist()
        docs = packed.document_ids[r].tolist()
        for t in range(1, len(ids)):
            if labels[t] == IGNORE_INDEX:
                continue
            start = t
            while start > 0 and docs[start - 1] == docs[t]:
                start -= 1
            pairs[(tuple(ids[start:t]), labels[t])] += 1
    return pairs


# ----------------------------------------------------------------------------- the packer


@pytest.mark.parametrize("seed,max_len", [(0, 20), (1, 32), (2, 7), (3, 64)])
def test_pack_examples_invariants(seed, max_len):
    examples = random_examples(23, seed)
    packed = pack_examples(examples, max_len, PAD)
    longest = max(len(ex) for ex in examples)
    capacity = max(max_len, longest)
    # Every example exactly once, and never split.
    assert sorted(i for row in packed.bins for i in row) == list(range(len(examples)))
    R, L = packed.input_ids.shape
    assert (R, L) == packed_shape(examples, max_len) and L <= capacity
    for r, row in enumerate(packed.bins):
        assert sum(len(examples[i]) for i in row) <= capacity
        col = 0
        for doc, i in enumerate(row):
            ex, n = examples[i], len(examples[i])
            assert packed.input_ids[r, col:col + n].tolist() == ex.input_ids
            assert packed.position_ids[r, col:col + n].tolist() == list(range(n))  # RoPE restarts
            assert (packed.document_ids[r, col:col + n] == doc).all()
            assert packed.labels[r, col].item() == IGNORE_INDEX  # boundary: never a target
            assert packed.labels[r, col + 1:col + n].tolist() == ex.labels[1:]
            col += n
        # Padding: its own document, no labels.
        assert (packed.document_ids[r, col:] == PAD_DOCUMENT).all()
        assert (packed.labels[r, col:] == IGNORE_INDEX).all()
        assert (packed.input_ids[r, col:] == PAD).all()
    # Exactly the unpacked run's training pairs, and so the same label-token count.
    assert training_pairs_packed(packed) == training_pairs_unpacked(examples)
    count = int((packed.labels[:, 1:] != IGNORE_INDEX).sum())
    assert count == sum(ex.num_label_tokens for ex in examples)


def test_pack_bins_first_fit_decreasing():
    assert pack_bins([3, 8, 5, 2, 6], 10) == [[1, 3], [4, 0], [2]]
    assert pack_bins([12, 3], 10) == [[0], [1]]  # longer than max_len: a row of its own (12 wide)
    assert pack_bins([4, 4, 4], 4) == [[0], [1], [2]]
    assert pack_bins([], 10) == []
    # Far fewer rows than examples for short sequences: that is the point.
    assert len(pack_bins([5] * 40, 100)) == 2


def test_fuse_packed_keeps_adapters_apart_and_contiguous():
    a, b = random_examples(7, 10), random_examples(5, 11)
    parts = [MicroBatch("a", a, 0, 0, 1, True, "right"), MicroBatch("b", b, 0, 0, 1, True, "left")]
    batch = fuse(parts, PAD, pack_len=24)
    ra, rb = batch.rows
    assert (ra.name, ra.start) == ("a", 0) and (rb.name, rb.start, rb.end) == ("b", ra.end, batch.input_ids.shape[0])
    assert ra.end == packed_shape(a, 24)[0]
    assert batch.attention_mask is None
    assert batch.position_ids.shape == batch.document_ids.shape == batch.input_ids.shape
    S = batch.input_ids.shape[1]
    assert S == max(packed_shape(a, 24)[1], packed_shape(b, 24)[1])
    assert training_pairs_packed(_slice(batch, ra)) == training_pairs_unpacked(a)
    assert training_pairs_packed(_slice(batch, rb)) == training_pairs_unpacked(b)
    moved = batch.to(torch.device("cpu"))
    assert moved.position_ids is not None and moved.document_ids is not None


def _slice(batch, rows):
    """One adapter's rows of a packed fused batch, shaped like PackedRows for training_pairs_packed."""
    cut = slice(rows.start, rows.end)
    return SimpleNamespace(input_ids=batch.input_ids[cut], labels=batch.labels[cut],
                           document_ids=batch.document_ids[cut])


def test_strategy_cost_counts_packed_rows():
    a = [Example([5] * n, [5] * n) for n in (10, 9, 3, 2, 1)]
    part = MicroBatch("a", a, 0, 0, 1, True, "right")
    assert padded_tokens([part]) == 5 * 10
    rows, longest = packed_shape(a, 16)  # [10, 3, 2, 1] and [9]: 2 rows, the longest 16
    assert (rows, longest) == (2, 16)
    assert padded_tokens([part], pack_len=16) == 2 * 16
    c = Candidate.of(part, 0, 0, pack_len=16)
    assert (c.rows, c.longest, c.useful) == (2, 16, 25)


# ----------------------------------------------------------------------------- the model


def _packed_vs_alone(path, max_len=24, seed=0):
    model = load_model(path, "cpu", torch.float32).eval()
    examples = random_examples(9, seed, lo=2, hi=14, vocab=model.args.vocab_size)
    packed = pack_examples(examples, max_len, PAD)
    assert packed.input_ids.shape[0] < len(examples)  # several sequences per row
    with torch.no_grad():
        out = model(packed.input_ids, position_ids=packed.position_ids,
                    document_ids=packed.document_ids)  # [R, L, V]
        assert torch.isfinite(out).all()  # padding rows/queries too
        worst = 0.0
        for r, row in enumerate(packed.bins):
            col = 0
            for i in row:
                n = len(examples[i])
                alone = model(torch.tensor([examples[i].input_ids]))[0]  # [n, V]
                worst = max(worst, (out[r, col:col + n] - alone).abs().max().item())
                col += n
    return worst


@pytest.mark.parametrize("family,overrides", [
    ("llama", {}),  # GQA 4/2
    ("mistral", dict(sliding_window=4)),  # a window shorter than most sequences
    ("qwen2", {}),  # q/k/v biases
    ("qwen2", dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),  # mixed layers
    ("llama", dict(max_position_embeddings=8,  # dynamic NTK: depends on the longest sequence
                   rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0))),
    ("qwen3", dict(head_dim=32)),  # per-head q/k norms
    ("gemma2", {}),  # soft-capped attention in plain ops, with document masks
    ("gemma3_text", {}),  # a sliding layer with its own RoPE, a full one
    ("phi3", dict(partial_rotary_factor=0.5, sliding_window=4)),  # fused projections, partial rotary
    ("smollm3", dict(no_rope_layers=[0, 1])),  # a layer without RoPE: positions only through masks
    ("chatglm", {}),  # RoPE on pairs of half of each head, fused projections, own tensor names
    ("baichuan", dict(position_embedding="alibi")),  # ALiBi: biases by column distance in each document
    ("olmo3", dict(sliding_window=3)),  # q/k norms over whole projections, a window, a RoPE per layer type
    # linear attention, whose conv and state restart at each document (transformers' do not)
    ("qwen3_5_text", {}),
    ("qwen3_next", {}),  # the same, from fused projections (and experts)
    # Gemma 4 E2B/E4B: per-layer inputs, layers attending to earlier layers' keys and values
    ("gemma4_text", GEMMA4_E2B),
    ("llama4_text", {}),  # chunks of 4 and the NoPE layers' query scale by each document's positions
], ids=["llama", "mistral_window4", "qwen2", "qwen2_mixed_window", "llama_rope_dynamic", "qwen3", "gemma2",
        "gemma3", "phi3", "smollm3", "chatglm", "baichuan_alibi", "olmo3", "qwen3_5", "qwen3_next", "gemma4_e2b",
        "llama4_text"])
def test_packed_logits_equal_each_sequence_alone(tmp_path, family, overrides):
    path = make_tiny_model(tmp_path, family, **overrides)
    if family == "llama" and "rope_parameters" in overrides:
        # Alone, each sequence sets its own NTK base; packed, the batch's longest sequence
        # does (as in an unpacked padded batch), so compare a batch of equal-length sequences.
        model = load_model(path, "cpu", torch.float32).eval()
        examples = random_examples(4, 5, lo=11, hi=11, vocab=model.args.vocab_size)
        packed = pack_examples(examples, 22, PAD)
        with torch.no_grad():
            out = model(packed.input_ids, position_ids=packed.position_ids, document_ids=packed.document_ids)
            ids = torch.tensor([ex.input_ids for ex in examples])
            alone = model(ids)
        for r, row in enumerate(packed.bins):
            for j, i in enumerate(row):
                assert (out[r, 11 * j:11 * (j + 1)] - alone[i]).abs().max().item() < 1e-5
        return
    # (Gemma 4 E2B's five layers, scaled by up to 1.5 each, and its per-layer inputs round more: 1.3e-5)
    assert _packed_vs_alone(path) < (3e-5 if family == "gemma4_text" else 1e-5)


def test_trivial_positions_and_one_document_equal_fast_path(tiny_llama):
    model = load_model(tiny_llama, "cpu", torch.float32).eval()
    ids = torch.randint(3, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model(ids)
        slow = model(ids, position_ids=torch.arange(13).expand(2, 13),
                     document_ids=torch.zeros(2, 13, dtype=torch.long))
    assert (fast - slow).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------- training step


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# Three adapters of different ranks, targets and padding sides.
SPECS = {"a": (4, ["q_proj", "v_proj"], "right"), "b": (8, ALL, "left"), "c": (2, ["k_proj", "down_proj"], "right")}


def three_adapters(tiny_llama, dropout: float, seed: int, b_seed: int, specs=None):
    """tiny_llama (or another base) with the SPECS (or `specs`) adapters, B drawn from
    N(0, 0.1^2) (B = 0 would hide half of the gradient); returns (model, layout, {name: Adapter})."""
    model = load_model(tiny_llama, "cpu", torch.float32)
    layout = BatchLayout()
    wrappers = inject_lora(model, layout)
    adapters = {}
    for k, (name, (r, targets, side)) in enumerate((specs or SPECS).items()):
        cfg = AdapterConfig(name=name, data="", r=r, alpha=2 * r, dropout=dropout, target_modules=targets,
                            expand_side=side)
        adapter = Adapter(cfg, wrappers, seed, torch.device("cpu"))
        g = torch.Generator().manual_seed(b_seed + k)
        with torch.no_grad():
            for w in adapter.weights.values():
                w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=g) * 0.1)
        adapters[name] = adapter
    return model, layout, adapters


def lora_grads(adapters) -> dict[str, torch.Tensor]:
    """{'<adapter>.<module path>.lora_A|B': a copy of its gradient}."""
    return {f"{name}.{n}": p.grad.clone() for name, a in adapters.items() for n, p in a.named_parameters()}


def _step(tiny_llama, pack_len):
    """One fused forward + backward of three adapters; returns their losses and LoRA grads."""
    torch.manual_seed(0)
    model, layout, adapters = three_adapters(tiny_llama, dropout=0.0, seed=7, b_seed=100)
    parts = []
    for k, (name, (_, _, side)) in enumerate(SPECS.items()):
        examples = random_examples(5 + k, 20 + k, lo=2, hi=15, vocab=model.args.vocab_size)
        tokens = sum(ex.num_label_tokens for ex in examples) + 7  # as if the step had more micro-batches
        parts.append(MicroBatch(name, examples, 0, 0, tokens, True, side))
    model.train()
    batch = fuse(parts, PAD, pack_len=pack_len)
    sums = fused_loss_sums(model, layout, batch)
    losses = {p.adapter: sums[p.adapter][0] / p.step_label_tokens for p in parts}
    sum(losses.values()).backward()
    grads = lora_grads(adapters)
    counts = {name: c for name, (_, c) in sums.items()}
    return {k: v.item() for k, v in losses.items()}, counts, grads, batch.input_ids.numel()


def test_gemma4_kv_sharing_fused_equals_solo_and_packed_equals_unpacked(tmp_path):
    """Gemma 4 E2B/E4B (per-layer inputs, KV-shared layers without k/v_proj and their LoRA, a
    double-wide MLP): a fused batch of three adapters (one on k_proj and v_proj, which the shared
    layers lack) gives each adapter the losses and gradients it gets alone, packed or not."""
    base = make_tiny_model(tmp_path, "gemma4_text", **GEMMA4_E2B)

    def step(names, pack_len):
        model, layout, adapters = three_adapters(base, dropout=0.0, seed=7, b_seed=100)
        parts = []
        for k, (name, (_, _, side)) in enumerate(SPECS.items()):
            examples = random_examples(3 + k, 20 + k, lo=2, hi=12, vocab=model.args.vocab_size)
            if name in names:
                parts.append(MicroBatch(name, examples, 0, 0, sum(ex.num_label_tokens for ex in examples), True, side))
        model.train()
        sums = fused_loss_sums(model, layout, fuse(parts, PAD, pack_len=pack_len))
        sum(sums[p.adapter][0] / p.step_label_tokens for p in parts).backward()
        assert "model.layers.3.self_attn.k_proj" not in adapters["c"].weights  # (a KV-shared layer)
        return {n: (sums[n][0].item(), lora_grads({n: adapters[n]})) for n in names}

    fused, packed = step(SPECS, None), step(SPECS, 24)
    for name in SPECS:
        for other in (step([name], None)[name], packed[name]):
            assert other[0] == pytest.approx(fused[name][0], rel=1e-5)
            # (layer 0's gradients come back through five layers of scalars and gates: 1.5e-5 off in
            # fp32 where the dense model's are 1.6e-6; the wrong keys would be off by far more)
            assert all((other[1][k] - g).abs().max().item() <= 1e-4 * max(1.0, g.abs().max().item())
                       for k, g in fused[name][1].items())


def test_packed_step_equals_unpacked(tiny_llama):
    losses, counts, grads, cost = _step(tiny_llama, None)
    p_losses, p_counts, p_grads, p_cost = _step(tiny_llama, 24)
    assert p_cost < cost  # packing did remove padding
    assert p_counts == counts
    for name in losses:
        assert p_losses[name] == pytest.approx(losses[name], rel=1e-5, abs=1e-6)
    assert grads.keys() == p_grads.keys()
    for k in grads:
        assert grads[k].abs().max() > 0, k
        assert (p_grads[k] - grads[k]).abs().max().item() <= 1e-5 * max(1.0, grads[k].abs().max().item()), k


# ----------------------------------------------------------------------------- end to end


def train_variants(tmp_path, base, names, variants: dict, **adapter_overrides) -> dict:
    """Train test_train's adapters `names` once per {label: global config overrides}, each
    adapter updated with `adapter_overrides`; returns {label: output dir}."""
    outs = {}
    for label, overrides in variants.items():
        out = tmp_path / f"out_{label}"
        cfg = make_config(tmp_path, names, out, **overrides)
        obj = json.loads(cfg.read_text())
        for adapter in obj["lora"]:
            adapter.update(adapter_overrides)
        cfg.write_text(json.dumps(obj))
        assert main(["train", "--base_model", str(base), "--config", str(cfg), "--no_progress"]) == 0
        outs[label] = out
    return outs


def assert_same_adapters(got, ref, names, tol: float) -> None:
    """The adapters saved under `got` equal those under `ref`, which training really moved."""
    for name in names:
        plain = load_file(ref / name / "adapter_model.safetensors")
        assert all(v.abs().max() > 0 for k, v in plain.items() if "lora_B" in k)
        assert rel_diff(load_file(got / name / "adapter_model.safetensors"), plain) <= tol


def test_train_with_packing_equals_without(tmp_path, tiny_llama):
    # cutoff_len 160: rows of ~50 tokens pack three to a row. fast-fit with a budget also
    # exercises the strategies' packed-row cost (the strategy never changes the result).
    # Adapter a is right-, c left-padded; dropout 0.
    packed = dict(packing=True, train_strategy="fast-fit", max_tokens_per_batch=400)
    outs = train_variants(tmp_path, tiny_llama, ["a", "c"], {"plain": dict(cutoff_len=160),
                                                             "packed": dict(cutoff_len=160, **packed)},
                          num_epochs=1, batch_size=4, micro_batch_size=4)
    assert_same_adapters(outs["packed"], outs["plain"], ["a", "c"], 1e-4)


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("key", ["packing", "recompute"])
def test_bad_value_is_one_line_error_naming_the_key(tmp_path, monkeypatch, key):
    (tmp_path / "train.json").write_text('[{"instruction": "hi", "output": "hello"}]')
    monkeypatch.chdir(tmp_path)
    lora = [{"name": "a", "data": "train.json"}]
    assert getattr(parse_config({"lora": lora}, "cfg.json"), key) is False
    assert getattr(parse_config({"lora": lora, key: True}, "cfg.json"), key) is True
    for bad in ("yes", 1, None):
        with pytest.raises(UserError) as info:
            parse_config({"lora": lora, key: bad}, "cfg.json")
        message = str(info.value)
        assert "\n" not in message and f"'{key}'" in message and message.startswith("cfg.json: ")



def test_left_padding_never_predicts_a_first_token_from_a_pad():
    # A text row trains every token, position 0 included; left-padded, that label must still
    # not count (unpacked, packed and the step normaliser agree on the targets).
    ex = [Example([5, 6, 7, 8], [5, 6, 7, 8]), Example([9, 10], [9, 10])]
    batch = fuse([MicroBatch("a", ex, 0, 0, 1, True, "left")], PAD)
    assert batch.labels.tolist() == [[5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 10]]
    assert int((batch.labels[:, 1:] != IGNORE_INDEX).sum()) == sum(e.num_label_tokens for e in ex)


@pytest.mark.parametrize("pack_len", [None, 24])
def test_fused_batch_counts_its_loss_targets_on_the_host(pack_len):
    """fuse counts each adapter's loss targets from its examples, so the loss reads no count
    back from the device; the counts equal the labels' own (after the one-token shift), left
    or right padded, packed or not."""
    from mlora.batching import label_token_counts

    a, b = random_examples(7, 20), random_examples(5, 21)
    parts = [MicroBatch("a", a, 0, 0, 1, True, "right"), MicroBatch("b", b, 0, 0, 1, True, "left")]
    batch = fuse(parts, PAD, pack_len=pack_len)
    assert batch.label_counts == label_token_counts(batch.labels, batch.rows)
    assert batch.label_counts == {"a": sum(ex.num_label_tokens for ex in a), "b": sum(ex.num_label_tokens for ex in b)}
    moved = batch.to(torch.device("meta"))  # a stand-in for a GPU: nothing is read from it
    assert moved.label_counts == batch.label_counts and moved.input_ids.device.type == "meta"
    # The attention mask stays on the host, where the model checks whether it is needed.
    assert moved.attention_mask is batch.attention_mask
