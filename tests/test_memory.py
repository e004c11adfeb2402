"""mlora.memory: the peak-memory model of a fused training step, the token budget, and OOM
split-and-retry. All on CPU; the estimator's GPU anchors are measurements recorded below."""

from __future__ import annotations

import dataclasses
import importlib.util
import weakref
from pathlib import Path

import pytest
import torch

import mlora.lora
import mlora.models.moe
from mlora import memory
from mlora.config import AdapterConfig
from mlora.lora import AdapterRows, BatchLayout, LoraWeights, TARGET_MODULES, inject_lora
from mlora.memory import (GiB, LoraShape, UnsplittableOOM, choose_token_budget, device_free_bytes,
                          estimate_peak_bytes, grads_restored_on_error, lora_state_bytes,
                          run_splitting_on_oom, weight_bytes)
from mlora.models import llama
from mlora.models.llama import CausalLM, ModelArgs

BF16 = torch.bfloat16
TINYLLAMA = ModelArgs("llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                      num_heads=32, num_kv_heads=4, head_dim=64)
LLAMA2_7B = ModelArgs("llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32, head_dim=128)
ALL7 = TARGET_MODULES


def est(args=TINYLLAMA, rows=32, seq_len=512, dtype=BF16, **kw):
    return estimate_peak_bytes(args, rows=rows, seq_len=seq_len, dtype=dtype, **kw)


# ----------------------------------------------------------------------------- the estimator


def test_monotone_in_rows_seq_len_rank_and_adapters():
    lora = [LoraShape(16, ALL7, 0.05)]
    base = est(lora=lora).total
    assert est(rows=33, lora=lora).total > base
    assert est(seq_len=513, lora=lora).total > base
    assert est(lora=[LoraShape(32, ALL7, 0.05)]).total > base
    assert est(lora=lora * 2).total > base
    assert est(lora=lora * 2).activations >= est(lora=lora).activations
    assert est(lora=[LoraShape(16, ("q_proj", "v_proj"), 0.05)]).total < base
    assert est(lora=[LoraShape(16, ALL7, 0.0)]).activations < est(lora=lora).activations  # no mask/copies
    assert est(lora=[]).total < base


def test_recompute_keeps_only_each_layers_input():
    lora = [LoraShape(16, ALL7, 0.05)] * 4
    full, rec = est(lora=lora), est(lora=lora, recompute=True)
    N, H = 32 * 512, TINYLLAMA.hidden_size
    layer_inputs = TINYLLAMA.num_layers * N * H * 2
    assert layer_inputs <= rec.activations < layer_inputs * 1.5
    assert rec.activations < full.activations / 10
    # ...but the layer being back-propagated is recomputed whole
    assert rec.layer_backward >= sum(full.per_layer.values())
    assert rec.total < full.total


def test_quantized_projection_weights():
    layers = [f"layer.{i}" for i in range(TINYLLAMA.num_layers)]  # no embedding/head: they stay bf16
    bf16 = weight_bytes(TINYLLAMA, BF16, parts=layers)
    nf4 = weight_bytes(TINYLLAMA, BF16, quant="nf4", parts=layers)
    nf4_dq = weight_bytes(TINYLLAMA, BF16, quant="nf4", double_quant=True, parts=layers)
    int8 = weight_bytes(TINYLLAMA, BF16, quant="int8", parts=layers)
    assert 0.27 < nf4 / bf16 < 0.29  # 4 bits + an fp32 absmax per 64 weights = 4.5 bits of 16
    assert 0.25 < nf4_dq / bf16 < nf4 / bf16
    assert 0.5 <= int8 / bf16 < 0.51  # 8 bits + an fp32 scale per output row
    whole = est(quant="nf4", lora=[LoraShape(16, ALL7)])
    assert whole.weights == weight_bytes(TINYLLAMA, BF16, quant="nf4")
    assert whole.weights < est(lora=[LoraShape(16, ALL7)]).weights / 2


@pytest.mark.parametrize("kind", ["nf4", "fp4-double", "int8"])
def test_quantized_weights_equal_what_bitsandbytes_allocates(kind):
    pytest.importorskip("bitsandbytes")
    from mlora.quant import QuantConfig, quantize_model

    cfg = {"nf4": QuantConfig(4, "nf4"), "fp4-double": QuantConfig(4, "fp4", double_quant=True),
           "int8": QuantConfig(8)}[kind]
    args = ModelArgs("llama", vocab_size=400, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16)
    layers = ["layer.0", "layer.1"]
    model = CausalLM(args, parts=layers).to(BF16)
    projections = quantize_model(model, cfg, "cpu")
    norms = 2 * 2 * args.hidden_size * 2  # two RMSNorm weights per layer, bf16
    assert weight_bytes(args, BF16, quant=cfg, parts=layers) == projections + norms


def test_lora_state_is_fp32_weights_grads_and_moments():
    r, H, I = 16, TINYLLAMA.hidden_size, TINYLLAMA.intermediate_size
    params = TINYLLAMA.num_layers * r * ((H + I) * 3)  # gate, up, down
    mlp = ("gate_proj", "up_proj", "down_proj")
    assert lora_state_bytes(TINYLLAMA, [LoraShape(r, mlp)]) == params * 4 * 4  # AdamW
    assert lora_state_bytes(TINYLLAMA, [LoraShape(r, mlp, optimizer_moments=0)]) == params * 4 * 2  # SGD
    cfg = AdapterConfig(name="a", data="/x", r=r, target_modules=list(mlp), optim="sgd", momentum=0.9)
    assert LoraShape.of(cfg) == LoraShape(r, mlp, 0.05, 1)
    assert LoraShape.of((r, mlp)) == LoraShape(r, mlp)
    with pytest.raises(ValueError, match="unknown target"):
        est(lora=[LoraShape(4, ("qkv",))])


def test_pipeline_stage_counts_only_its_parts():
    first = ["embed"] + [f"layer.{i}" for i in range(11)]
    last = [f"layer.{i}" for i in range(11, 22)] + ["norm", "head"]
    lora = [LoraShape(16, ALL7, 0.05)]
    a, b, whole = est(parts=first, lora=lora), est(parts=last, lora=lora), est(lora=lora)
    assert a.head == 0 and b.head == whole.head
    assert a.weights + b.weights == whole.weights
    assert a.lora_state + b.lora_state == whole.lora_state
    assert a.total < whole.total and b.total < whole.total


# Sanity anchors: published peaks on an H200 with HF transformers (not this implementation,
# so only rough; HF's loss runs on the whole logits, so the estimate is compared with that
# head): TinyLlama frozen base forward+backward 32x512: 29.1 GiB; HF + PEFT r=16 on all seven
# projections, 32x512: 59.2 GiB; Llama-2-7B frozen base 8x512: 32.4 GiB.
def test_published_hf_anchors_are_in_range():
    frozen = est(lora=[])  # a frozen model back-propagating to its input, like HF's
    assert 0.9 * 29.1 < with_whole_logits(frozen, TINYLLAMA, 32) < 1.15 * 29.1
    ours = est(lora=[LoraShape(16, ALL7, 0.05)])
    assert 29.1 < with_whole_logits(ours, TINYLLAMA, 32) < 59.2  # LoRA saves more than a frozen base, less than PEFT
    frozen_7b = est(LLAMA2_7B, rows=8, lora=[])
    assert 0.85 * 32.4 < with_whole_logits(frozen_7b, LLAMA2_7B, 8) < 1.15 * 32.4
    # the chunked head: 16 K tokens of a 32 K vocabulary no longer peak at 6.8 GiB of logits
    assert frozen.total / GiB < with_whole_logits(frozen, TINYLLAMA, 32) - 5


# torch.cuda.max_memory_allocated of this implementation's forward + loss (whole logits, then) +
# backward, as trainer._train_on runs them (two iterations, so the LoRA gradients exist; no
# optimizer step, so no moments), bf16, r=16 on all seven projections unless noted, one H200,
# torch 2.11, with lora.py's shared-input LoRA op: (shape, rows, adapters, dropout, recompute,
# targets, explicit mask) -> GiB.
H200_MEASURED = [
    ("tinyllama", 32, 1, 0.05, False, ALL7, False, 44.875),
    ("tinyllama", 32, 1, 0.05, True, ALL7, False, 10.532),
    ("tinyllama", 32, 4, 0.05, False, ALL7, False, 45.252),
    ("tinyllama", 32, 4, 0.05, True, ALL7, False, 10.832),
    ("tinyllama", 8, 1, 0.05, False, ALL7, False, 12.892),
    ("tinyllama", 8, 4, 0.05, True, ALL7, False, 4.581),
    ("tinyllama", 32, 1, 0.0, False, ALL7, False, 35.657),
    ("tinyllama", 32, 2, 0.0, False, ("q_proj", "v_proj"), False, 30.360),
    ("tinyllama", 32, 1, 0.05, False, ALL7, True, 47.625),  # left padding: an explicit mask
    ("tinyllama", 91, 4, 0.05, False, ALL7, False, 123.830),
    ("llama2-7b", 8, 1, 0.05, False, ALL7, False, 42.145),
    ("llama2-7b", 8, 1, 0.05, True, ALL7, False, 15.683),
    ("llama2-7b", 8, 4, 0.05, False, ALL7, False, 43.284),
    ("llama2-7b", 8, 4, 0.05, True, ALL7, False, 16.596),
    ("llama2-7b", 16, 4, 0.05, False, ALL7, False, 72.435),
    ("llama2-7b", 8, 1, 0.0, False, ALL7, False, 35.489),
    ("llama2-7b", 8, 1, 0.05, False, ALL7, True, 42.270),
    # From benchmarks/bench_throughput.py on the H200, 2026-11-28 (benchmarks/results/
    # throughput.json): the peak over whole training steps INCLUDING the optimizer steps (fused
    # AdamW on CUDA, so the moments are allocated), 512 tokens per row, rows = all adapters'
    # rows together (n adapters x rows each), LoRA kernel 'auto' (dense up to 8 adapters). The
    # 8-adapter TinyLlama point is the one the estimate missed (89.54 GiB) before it modelled
    # the dense kernel's [N, C] hidden and its bool mask.
    ("tinyllama", 64, 8, 0.05, False, ALL7, False, 90.352),
    ("tinyllama", 32, 4, 0.05, False, ALL7, False, 45.788),
    ("tinyllama", 16, 2, 0.05, False, ALL7, False, 23.842),
    ("tinyllama", 32, 1, 0.05, False, ALL7, False, 44.918),
    ("tinyllama", 8, 1, 0.05, False, ALL7, False, 12.938),
    ("tinyllama", 32, 4, 0.0, False, ALL7, False, 36.574),
    ("llama2-7b", 32, 8, 0.05, False, ALL7, False, 134.634),
    ("llama2-7b", 16, 4, 0.05, False, ALL7, False, 73.292),
    ("llama2-7b", 8, 2, 0.05, False, ALL7, False, 42.870),
    ("llama2-7b", 16, 1, 0.05, False, ALL7, False, 71.448),
    ("llama2-7b", 4, 1, 0.05, False, ALL7, False, 27.866),
    ("llama2-7b", 16, 4, 0.0, False, ALL7, False, 59.982),
]
# The same benchmark's kernel ablation (4 adapters, dropout 0.05, with optimizer steps): the
# grouped and loop kernels keep only each row's own adapter's hidden. (shape, rows, kernel, GiB)
H200_MEASURED_KERNELS = [
    ("tinyllama", 32, "grouped", 45.412),
    ("tinyllama", 32, "loop", 45.405),
    ("llama2-7b", 16, "grouped", 73.015),
    ("llama2-7b", 16, "loop", 73.011),
]


def with_whole_logits(estimate, args: ModelArgs, rows: int, seq_len: int = 512, e: int = 2) -> float:
    """The total, in GiB, of `estimate` with the head as it was when H200_MEASURED and
    H200_MEASURED_KERNELS were taken: the loss on the whole [N, V] logits, which the trainer held
    (e bytes an entry) through the backward, with three fp32 [N, V] at the cross-entropy
    backward's peak, and no hidden-state gradient kept. Those measurements validate every other
    term of the estimate."""
    N, V = rows * seq_len, args.vocab_size
    kept, _ = memory._head_bytes(args, e, N)
    held, peak = N * V * e, N * V * (e + 12)
    return (estimate.weights + estimate.lora_state + estimate.activations - kept
            + max(peak, held + estimate.layer_backward) + estimate.workspace) / GiB


@pytest.mark.parametrize("shape, rows, n, p, recompute, targets, mask, measured", H200_MEASURED)
def test_estimate_covers_h200_measurements(shape, rows, n, p, recompute, targets, mask, measured):
    args = {"tinyllama": TINYLLAMA, "llama2-7b": LLAMA2_7B}[shape]
    estimate = est(args, rows=rows, lora=[LoraShape(16, targets, p)] * n, recompute=recompute,
                   explicit_mask=mask or None, lora_kernel="dense")  # auto was dense then
    total = with_whole_logits(estimate, args, rows)
    assert measured <= total <= 1.25 * measured


@pytest.mark.parametrize("shape, rows, kernel, measured", H200_MEASURED_KERNELS)
def test_estimate_covers_h200_kernel_ablation(shape, rows, kernel, measured):
    args = {"tinyllama": TINYLLAMA, "llama2-7b": LLAMA2_7B}[shape]
    lora = [LoraShape(16, ALL7, 0.05)] * 4
    total = with_whole_logits(est(args, rows=rows, lora=lora, lora_kernel=kernel), args, rows)
    assert measured <= total <= 1.25 * measured
    # dense keeps more
    assert total < with_whole_logits(est(args, rows=rows, lora=lora, lora_kernel="dense"), args, rows)


def test_dense_kernel_hidden_grows_with_the_adapters_in_a_batch():
    one = LoraShape(16, ALL7, 0.05)
    rT = 16 * 7
    assert est(lora=[one], lora_kernel="dense").per_layer["lora_mask"] == 0  # one adapter: no mask
    eight = est(lora=[one] * 8, lora_kernel="dense").per_layer
    N = 32 * 512
    assert eight["lora_hidden"] == 8 * rT * 2 * N and eight["lora_mask"] == 8 * rT * N
    # train_lora_simultaneously_num bounds the adapters of one batch; beyond DENSE_MAX_ADAPTERS
    # a batch goes grouped/loop, so the dense cost tops out at 8 adapters.
    assert est(lora=[one] * 8, active_adapters=2, lora_kernel="dense").per_layer["lora_hidden"] == 2 * rT * 2 * N
    assert est(lora=[one] * 20, lora_kernel="auto").per_layer["lora_hidden"] == 8 * rT * 2 * N
    assert est(lora=[one] * 20, lora_kernel="dense").per_layer["lora_hidden"] == 20 * rT * 2 * N
    # An explicit fused or triton kernel takes every adapter of a batch (auto caps at 8).
    for kernel in ("fused", "triton"):
        assert est(lora=[one] * 20, lora_kernel=kernel).per_layer["lora_hidden"] == 20 * rT * 2 * N
    loop = est(lora=[one] * 8, lora_kernel="loop").per_layer
    assert loop["lora_hidden"] == rT * 2 * N and loop["lora_mask"] == 0
    with pytest.raises(ValueError, match="lora_kernel"):
        est(lora=[one], lora_kernel="fast")


def test_auto_is_counted_as_the_kernel_it_runs_on_the_device(monkeypatch):
    """Given the device, 'auto' is counted as what it runs there: triton where lora.auto_kernel
    says so (CUDA, compute capability 9.0 and up), its columns still capped at 8 adapters; fused
    without a device (the budget's fallback, an overestimate on Hopper) or where it runs fused."""
    import mlora.lora

    one = LoraShape(16, ALL7, 0.05)
    cuda = torch.device("cuda", 0)
    for runs in ("triton", "fused"):
        monkeypatch.setattr(mlora.lora, "auto_kernel", lambda device, runs=runs: runs)
        on_device = est(lora=[one] * 4, lora_kernel="auto", device=cuda).total
        assert on_device == est(lora=[one] * 4, lora_kernel=runs).total
    monkeypatch.setattr(mlora.lora, "auto_kernel", lambda device: "triton")
    assert est(lora=[one] * 4, lora_kernel="auto").total == est(lora=[one] * 4, lora_kernel="fused").total
    assert est(lora=[one] * 4, lora_kernel="auto", device=cuda).total < est(lora=[one] * 4, lora_kernel="fused").total
    twenty = est(lora=[one] * 20, lora_kernel="auto", device=cuda).per_layer["lora_hidden"]
    assert twenty == est(lora=[one] * 8, lora_kernel="triton").per_layer["lora_hidden"]
    # A batch of more than 8 adapters runs grouped (or loop), which keeps a dropped-out copy and
    # a mask of each input group's input: so counted, on any device (fused's or triton's was less).
    for device in (None, cuda):
        nine = est(lora=[one] * 9, lora_kernel="auto", device=device).per_layer
        grouped = est(lora=[one] * 9, lora_kernel="grouped").per_layer
        assert all(nine[k] == grouped[k] for k in nine if k.startswith("lora_") and k != "lora_hidden")
    assert est(lora=[one] * 9, lora_kernel="auto", active_adapters=8, device=cuda).total < \
        est(lora=[one] * 9, lora_kernel="auto", device=cuda).total


def test_auto_is_counted_as_fused_after_the_triton_kernel_failed_here(monkeypatch, capsys):
    """Once auto's triton kernel failed in this process (kernel_fallback.py), the forward runs
    fused: an estimate from then on counts fused's larger footprint, not triton's, so a budget
    planned after the fallback does not admit batches only triton would fit."""
    import mlora.lora
    from mlora import kernel_fallback

    one = LoraShape(16, ALL7, 0.05)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(mlora.lora, "auto_kernel", lambda device: "triton")
    triton = est(lora=[one] * 4, lora_kernel="auto", device=cuda).total
    try:
        kernel_fallback.record(kernel_fallback.LORA, RuntimeError("PassManager::run failed"), chosen_by_auto=True)
        after = est(lora=[one] * 4, lora_kernel="auto", device=cuda).total
        assert mlora.lora.auto_kernel_now(cuda) == "fused"
    finally:
        kernel_fallback.forget()
    assert after == est(lora=[one] * 4, lora_kernel="fused").total > triton
    assert est(lora=[one] * 4, lora_kernel="auto", device=cuda).total == triton  # (the failure forgotten)


def test_fused_kernel_keeps_a_bool_dropout_mask_and_no_column_mask():
    """Fused (auto) keeps dense's hidden, its dropout mask as bool instead of bf16, and no
    per-layer column mask: one [N, C] factor serves all layers (counted once, with the batch)."""
    one = LoraShape(16, ALL7, 0.05)
    dense, fused = est(lora=[one] * 4, lora_kernel="dense"), est(lora=[one] * 4, lora_kernel="auto")
    N, H, I = 32 * 512, TINYLLAMA.hidden_size, TINYLLAMA.intermediate_size
    assert fused.per_layer["lora_hidden"] == dense.per_layer["lora_hidden"] and fused.per_layer["lora_mask"] == 0
    for group, width in (("attn_in", H), ("mlp_in", H), ("mlp_act", I)):
        assert dense.per_layer[f"lora_{group}"] - fused.per_layer[f"lora_{group}"] == width * (2 - 1) * N
    assert fused.activations < dense.activations
    # A quantized base runs fused too (its layers outside the op): the same LoRA tensors.
    nf4 = est(lora=[one] * 4, quant="nf4").per_layer
    assert all(nf4[k] == fused.per_layer[k] for k in nf4 if k.startswith("lora_"))


# ----------------------------------------------------------------------------- against autograd

SMALL = ModelArgs("llama", vocab_size=400, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16)
# lora.py's InputGroup shares one saved input (and one dropout mask) among q/k/v and gate/up.
SHARED = hasattr(mlora.lora, "InputGroup")


def frozen_storages(model: torch.nn.Module, wrappers) -> set[int]:
    """The storages of the model's parameters and its adapters' LoRA weights (not activations)."""
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return frozen | {t.untyped_storage().data_ptr() for w in wrappers.values() for lw in w.adapters.values()
                     for t in (lw.lora_A, lw.lora_B)}


def saved_tensor_bytes(model: torch.nn.Module, input_ids: torch.Tensor, frozen: set[int], **inputs) -> int:
    """Bytes of the distinct storages autograd saves for the backward during
    `model(input_ids, **inputs)`, leaving out the parameters (they are weights / LoRA state, not
    activations)."""
    storages: dict[int, int] = {}
    # Grouped experts stack their weights on first use (models/moe.grouped_stacks), freeing the
    # old ones, whose addresses activations could then take: stacked before measuring, and the
    # parameters' storages taken again.
    before = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.no_grad():
        model(input_ids, **inputs)
    frozen = (frozen - before) | {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in frozen:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids, **inputs)
    return sum(storages.values())


def _model_with_adapters(dtype, adapters, targets, args=SMALL):
    """SMALL (or `args`) with LoRA adapters a0, a1, ... of (r, dropout) on `targets`."""
    torch.manual_seed(0)
    model = CausalLM(args).to(dtype).requires_grad_(False)
    if args.router_params_fp32:  # GLM-4.5's router stays in fp32, as the loader keeps it
        for layer in model.model.layers.values():
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.float()
    layout = BatchLayout()
    wrappers = inject_lora(model, layout)
    for path, wrapper in wrappers.items():
        if wrapper.target in targets:  # (Gemma 4's and Llama 4's experts: experts.gate_up_proj, experts.down_proj)
            for a, (r, p) in enumerate(adapters):
                weights = LoraWeights(wrapper.in_features, wrapper.out_features, r, 2 * r, p, False, a)
                weights.generator = torch.Generator().manual_seed(a)
                wrapper.adapters[f"a{a}"] = weights
    return model, layout, wrappers


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("adapters, targets", [
    ([(4, 0.0)], ALL7),
    ([(4, 0.1)], ALL7),
    ([(4, 0.0), (8, 0.1)], ALL7),
    ([(4, 0.1), (4, 0.1)], ALL7),
    ([(8, 0.1)], ("q_proj", "v_proj")),
    ([(4, 0.0)], ("o_proj", "down_proj")),
])
def test_activations_bound_what_autograd_saves(dtype, adapters, targets):
    model, layout, wrappers = _model_with_adapters(dtype, adapters, targets)
    rows, seq_len = 4, 32
    per = rows // len(adapters)
    layout.rows = [AdapterRows(f"a{a}", a * per, (a + 1) * per) for a in range(len(adapters))]
    model.train()
    params = frozen_storages(model, wrappers)
    measured = saved_tensor_bytes(model, torch.randint(0, SMALL.vocab_size, (rows, seq_len)), params)

    estimate = estimate_peak_bytes(SMALL, rows=rows, seq_len=seq_len, dtype=dtype,
                                   lora=[LoraShape(r, targets, p) for r, p in adapters],
                                   shared_lora_inputs=SHARED)
    # Without shared inputs, mixed dropout rates are bounded per adapter, not per row range.
    assert measured <= estimate.activations <= (1.5 if SHARED else 1.6) * measured


GEMMA3 = dataclasses.replace(SMALL, model_type="gemma3_text", qk_norm=True, hidden_act="gelu_tanh", gemma_norms=True,
                             embed_scale=True, norm_layout="sandwich", attn_scale=0.2,
                             local_rope=llama.RopeArgs("default", 1e4))  # no window: the same attention as SMALL


OLMO2 = dataclasses.replace(SMALL, model_type="olmo2", qk_norm=True, qk_norm_per_head=False, norm_layout="post",
                            norm_weight_fp32=True, rope_fp32=True)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "olmo2"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_norms_of_other_families_are_counted(dtype, family):
    """Qwen3's per-head q/k RMSNorms (and Gemma 3's four norms per layer too; OLMo 2's q/k norms
    over the whole projections, its norms after the sublayers, fp32 RoPE) keep fp32 copies
    for the backward: the estimate's extra over the same LLaMA covers what autograd saves
    extra, and the bound still holds; the weights count the norms' weights."""
    other = {"qwen3": dataclasses.replace(SMALL, model_type="qwen3", qk_norm=True), "gemma3_text": GEMMA3,
             "olmo2": OLMO2}[family]
    rows, seq_len, adapters = 2, 32, [(4, 0.1)]
    measured, estimated = {}, {}
    for args in (SMALL, other):
        model, layout, wrappers = _model_with_adapters(dtype, adapters, ALL7, args)
        layout.rows = [AdapterRows("a0", 0, rows)]
        model.train()
        params = frozen_storages(model, wrappers)
        measured[args.model_type] = saved_tensor_bytes(model, torch.randint(0, 400, (rows, seq_len)), params)
        estimated[args.model_type] = estimate_peak_bytes(args, rows=rows, seq_len=seq_len, dtype=dtype,
                                                         lora=[LoraShape(4, ALL7, 0.1)]).activations
    extra = measured[family] - measured["llama"]
    if family == "olmo2":
        # LLaMA's layer 0 records no input norm (its input, the frozen embedding's output, needs
        # no gradient): a slack of one norm in LLaMA's estimate that OLMo 2, whose first norm
        # reads the attention's output, does not have
        extra -= rows * seq_len * (4 * SMALL.hidden_size + 4)
    assert extra > 0
    assert extra <= estimated[family] - estimated["llama"] <= 1.1 * extra
    assert measured[family] <= estimated[family] <= 1.5 * measured[family]
    for args in (SMALL, other):  # every parameter of the model, the norms' included
        assert weight_bytes(args, dtype) == sum(p.numel() * p.element_size()
                                                for p in CausalLM(args).to(dtype).parameters())


def test_each_distinct_rope_of_packed_rows_is_counted():
    """Packed rows turn by per-token positions: each distinct RoPE (OLMo 3's and Gemma 3's
    sliding layers have their own) keeps fp32 (OLMo) cos and sin [B, 1, S, R] for the
    backward, and the estimate counts each (one fell 5% short with head_dim 64)."""
    olmo3 = dataclasses.replace(OLMO2, model_type="olmo3", head_dim=64, num_heads=4, num_kv_heads=2,
                                hidden_size=64, sliding_window=[4, None], local_rope=llama.RopeArgs(theta=1e4),
                                rope=llama.RopeArgs("yarn", 5e5, factor=4.0, original_max_position_embeddings=8,
                                                    attention_factor=1.1))
    rows, seq_len = 2, 32
    model, layout, wrappers = _model_with_adapters(BF16, [(4, 0.0)], ALL7, olmo3)
    layout.rows = [AdapterRows("a0", 0, rows)]
    model.train()
    position_ids = torch.arange(seq_len).remainder(11).repeat(rows, 1)  # [B, S]: documents of 11 tokens
    document_ids = torch.arange(seq_len).div(11, rounding_mode="floor").repeat(rows, 1)
    measured = saved_tensor_bytes(model, torch.randint(0, 400, (rows, seq_len)), frozen_storages(model, wrappers),
                                  position_ids=position_ids, document_ids=document_ids)
    estimate = estimate_peak_bytes(olmo3, rows=rows, seq_len=seq_len, dtype=BF16, lora=[LoraShape(4, ALL7, 0.0)],
                                   explicit_mask=True)
    assert measured <= estimate.activations <= 1.5 * measured


@pytest.mark.parametrize("windows", [[None, None], [4, None]], ids=["causal", "sliding_layer"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_gemma2_softcapped_attention_bounds_what_autograd_saves(dtype, windows):
    """Gemma 2's attention runs in plain ops and keeps [B, nh, S, S] scores: the estimate bounds
    what autograd saves, and counts them (a model of SDPA's saved tensors falls short)."""
    # (final_softcap's tanh of the logits is the head's, counted in the head's chunk)
    gemma2 = dataclasses.replace(SMALL, model_type="gemma2", hidden_act="gelu_tanh", gemma_norms=True,
                                 embed_scale=True, norm_layout="sandwich", attn_scale=0.25, attn_softcap=2.0,
                                 sliding_window=windows)
    rows, seq_len = 2, 64
    model, layout, wrappers = _model_with_adapters(dtype, [(4, 0.1)], ALL7, gemma2)
    layout.rows = [AdapterRows("a0", 0, rows)]
    model.train()
    params = frozen_storages(model, wrappers)
    measured = saved_tensor_bytes(model, torch.randint(0, 400, (rows, seq_len)), params)
    estimate = estimate_peak_bytes(gemma2, rows=rows, seq_len=seq_len, dtype=dtype, lora=[LoraShape(4, ALL7, 0.1)])
    assert measured <= estimate.activations <= 1.5 * measured
    scores = estimate.per_layer["attention_scores"] * gemma2.num_layers
    assert estimate.activations - scores < measured  # without the scores it would not bound


FUSED = {  # the fused layouts: Phi-3 (both), ChatGLM (both, RoPE on pairs, q/k/v biases),
    # GLM-4-0414 (gate_up only, four norms), Baichuan (qkv only)
    "phi3": (dict(fused_qkv=True, fused_gate_up=True), ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "chatglm": (dict(fused_qkv=True, fused_gate_up=True, attention_bias=True,
                     rope=llama.RopeArgs(interleaved=True)), ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "glm4": (dict(fused_gate_up=True, attention_bias=True, norm_layout="glm4", rope=llama.RopeArgs(interleaved=True)),
             ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")),
    "baichuan": (dict(fused_qkv=True), ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    # Baichuan 13B: no RoPE, a float ALiBi mask shared by the layers
    "baichuan_alibi": (dict(fused_qkv=True, alibi=True, rope_layers=[False, False]),
                       ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}


@pytest.mark.parametrize("family", FUSED)
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("windows", [[None, None], [4, 4]], ids=["causal", "sliding"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_fused_projections_bound_what_autograd_saves(dtype, windows, kv_heads, family):
    """Fused qkv_proj and/or gate_up_proj (each alone in its input group), partial rotary: the
    estimate bounds what autograd saves (v, a view of the whole qkv output unless K/V are
    repeated, keeps all of it alive: with a mask too when there is nothing to repeat), and the
    weights are the model's parameters."""
    switches, targets = FUSED[family]
    phi3 = dataclasses.replace(SMALL, model_type=family, rotary_dim=8, sliding_window=windows, num_kv_heads=kv_heads,
                               **switches)
    rows, seq_len = 2, 32
    model, layout, wrappers = _model_with_adapters(dtype, [(4, 0.1), (4, 0.0)], targets, phi3)
    assert sorted({path.rsplit(".", 1)[-1] for path in wrappers}) == sorted(targets)
    layout.rows = [AdapterRows("a0", 0, 1), AdapterRows("a1", 1, 2)]
    model.train()
    params = frozen_storages(model, wrappers)
    measured = saved_tensor_bytes(model, torch.randint(0, 400, (rows, seq_len)), params)
    estimate = estimate_peak_bytes(phi3, rows=rows, seq_len=seq_len, dtype=dtype,
                                   lora=[LoraShape(4, targets, 0.1), LoraShape(4, targets, 0.0)])
    assert measured <= estimate.activations <= 1.5 * measured
    assert weight_bytes(phi3, dtype) == sum(p.numel() * p.element_size() for p in CausalLM(phi3).to(dtype).parameters())


def _saved_per_kernel(monkeypatch, adapters, targets, kernels):
    """Bytes autograd saves in one bf16 forward of SMALL, per LoRA kernel: two rows per adapter
    of 16 tokens. Returns ({kernel: bytes}, rows, seq_len)."""
    model, layout, wrappers = _model_with_adapters(BF16, adapters, targets)
    rows, seq_len = 2 * len(adapters), 16
    layout.rows = [AdapterRows(f"a{a}", 2 * a, 2 * a + 2) for a in range(len(adapters))]
    model.train()
    params = frozen_storages(model, wrappers)
    ids = torch.randint(0, SMALL.vocab_size, (rows, seq_len))
    saved = {}
    for kernel in kernels:
        monkeypatch.setattr(mlora.lora, "kernel", kernel)
        saved[kernel] = saved_tensor_bytes(model, ids, params)
    return saved, rows, seq_len


@pytest.mark.parametrize("adapters, targets", [
    ([(4, 0.0)] * 4, ALL7),
    ([(4, 0.1), (4, 0.0), (4, 0.1)], ("q_proj", "v_proj", "down_proj")),
])
def test_dense_kernel_extra_is_what_autograd_saves(monkeypatch, adapters, targets):
    """The dense kernel saves more than the loop kernel by the [N, C] hidden and the bool mask
    the estimate adds for it (bf16: in fp32 the loop kernel saves some A/B casts that are the
    parameters themselves, which the estimate counts anyway; equal ranks: with unequal ones the
    loop kernel keeps less than its bound, the costliest adapter on every row)."""
    saved, rows, seq_len = _saved_per_kernel(monkeypatch, adapters, targets, ("dense", "loop"))
    lora = [LoraShape(r, targets, p) for r, p in adapters]
    layers = {k: estimate_peak_bytes(SMALL, rows=rows, seq_len=seq_len, dtype=BF16, lora=lora,
                                     lora_kernel=k).per_layer for k in ("dense", "loop")}
    extra = SMALL.num_layers * sum(layers["dense"][k] - layers["loop"][k] for k in ("lora_hidden", "lora_mask"))
    assert extra > 0
    # ...give or take the dense kernel's per-column LoRA scales (one small fp32 constant per
    # distinct member layout, shared by the layers), which its B product saves.
    assert 0 <= saved["dense"] - saved["loop"] - extra <= 4 * sum(r for r, _ in adapters) * 7


def test_protected_accumulation_can_keep_the_gradients_of_before():
    """With `before`, the gradients from before the first block are handed back untouched (the
    trainer puts them back for an adapter it runs again after a NaN), and the sums are still
    the plain accumulation's, bit for bit."""
    torch.manual_seed(0)
    xs = [torch.randn(8, 64) for _ in range(3)]
    plain = torch.nn.Parameter(torch.randn(64, 64))
    guarded = torch.nn.Parameter(plain.detach().clone())
    untouched = torch.nn.Parameter(torch.ones(2))
    untouched.grad = torch.ones(2)
    (plain @ xs[0].T).sin().sum().backward()
    (guarded @ xs[0].T).sin().sum().backward()
    first, before = guarded.grad.clone(), {}
    for x in xs[1:]:
        (plain @ x.T).sin().sum().backward()
        with grads_restored_on_error([guarded, untouched], before):
            (guarded @ x.T).sin().sum().backward()
    assert torch.equal(guarded.grad, plain.grad)
    assert torch.equal(before[guarded], first) and torch.equal(untouched.grad, torch.ones(2))
    assert before[untouched] is untouched.grad


@pytest.mark.parametrize("adapters, targets", [
    ([(4, 0.1)] * 3, ALL7),
    ([(4, 0.1), (8, 0.0)], ("q_proj", "v_proj", "down_proj")),
])
def test_fused_kernel_saving_is_what_autograd_saves(monkeypatch, adapters, targets):
    """What fused keeps less than dense (the dropout masks, dense's bool column mask) is what
    the estimate subtracts. In layer 0 neither keeps a dropout mask (its input needs no
    gradient), which the estimate does not subtract; the weight casts differ a little
    (bounded by one layer's casts)."""
    saved, rows, seq_len = _saved_per_kernel(monkeypatch, adapters, targets, ("dense", "fused"))
    lora = [LoraShape(r, targets, p) for r, p in adapters]
    estimates = {k: estimate_peak_bytes(SMALL, rows=rows, seq_len=seq_len, dtype=BF16, lora=lora, lora_kernel=k)
                 for k in ("dense", "fused")}
    N = rows * seq_len
    # The estimate adds fused's shared column factor to the batch; autograd does not see it.
    factor = N * sum(r * len(targets) for r, _ in adapters) * 4  # fp32
    estimated = estimates["dense"].activations - estimates["fused"].activations + factor
    measured = saved["dense"] - saved["fused"]
    layer0_mask = SMALL.hidden_size * (2 - 1) * N if any(p > 0 for _, p in adapters) else 0
    assert 0 < measured <= estimated <= measured + layer0_mask + estimates["fused"].per_layer["lora_casts"]


def test_sharing_inputs_never_costs_more():
    for lora in ([LoraShape(16, ALL7, 0.05)], [LoraShape(16, ALL7, 0.0), LoraShape(8, ALL7, 0.1)]):
        assert est(lora=lora).activations <= est(lora=lora, shared_lora_inputs=False).activations


# ----------------------------------------------------------------------------- budgets


def test_token_budget_is_the_largest_fitting_row_count():
    lora = [LoraShape(16, ALL7, 0.05)] * 4
    free = 80 * GiB
    tokens = choose_token_budget(TINYLLAMA, free_bytes=free, seq_len=512, dtype=BF16, lora=lora)
    rows = tokens // 512
    assert tokens == rows * 512 and rows > 1

    def need(r):
        e = est(rows=r, lora=lora)
        return e.total - e.weights

    assert need(rows) <= 0.9 * free < need(rows + 1)
    counted = choose_token_budget(TINYLLAMA, free_bytes=free, seq_len=512, dtype=BF16, lora=lora,
                                  weights_resident=False)
    assert counted < tokens
    assert choose_token_budget(TINYLLAMA, free_bytes=GiB, seq_len=512, dtype=BF16, lora=lora) == 0
    assert device_free_bytes("cpu") is None


# ----------------------------------------------------------------------------- split and retry


def cublas_out_of_memory() -> RuntimeError:
    """What a matmul raises when cuBLAS cannot allocate its handle or workspace on a full device:
    a plain RuntimeError, not torch.OutOfMemoryError."""
    return RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")


def torch_out_of_memory() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")


# the ways a device says it ran out of memory, each split and retried alike
OUT_OF_MEMORY = [torch_out_of_memory, cublas_out_of_memory]


def oom_above(limit: int, calls: list, error=torch_out_of_memory):
    """A run_part that 'runs out of memory' (error()) on more than `limit` items."""

    def run_part(items):
        calls.append(list(items))
        if len(items) > limit:
            raise error()
        return list(items)

    return run_part


def test_what_counts_as_out_of_memory():
    assert memory.is_out_of_memory(torch_out_of_memory()) and memory.is_out_of_memory(cublas_out_of_memory())
    assert memory.is_out_of_memory(UnsplittableOOM("out of memory on 1 item(s)"))
    # another cuBLAS failure, or the status outside a RuntimeError, is no shortage of memory
    assert not memory.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling "
                                                    "`cublasGemmEx( handle, ...)`"))
    assert not memory.is_out_of_memory(ValueError("CUBLAS_STATUS_ALLOC_FAILED"))


@pytest.mark.parametrize("error", OUT_OF_MEMORY)
@pytest.mark.parametrize("n, limit", [(1, 1), (8, 8), (8, 3), (7, 2), (9, 1)])
def test_split_covers_every_item_once_in_order(n, limit, error):
    calls, splits = [], []
    results = run_splitting_on_oom(oom_above(limit, calls, error), list(range(n)),
                                   on_split=lambda left, right: splits.append((left, right)))
    assert [i for chunk in results for i in chunk] == list(range(n))
    assert all(len(chunk) <= limit for chunk in results)
    assert len(splits) == sum(1 for c in calls if len(c) > limit)
    for left, right in splits:
        assert 0 <= len(left) - len(right) <= 1


@pytest.mark.parametrize("error", OUT_OF_MEMORY)
def test_a_single_item_that_does_not_fit_gives_a_clear_error(error):
    with pytest.raises(UnsplittableOOM, match="out of memory on 1 item") as info:
        run_splitting_on_oom(oom_above(0, [], error), ["a", "b", "c"])
    assert isinstance(info.value, torch.OutOfMemoryError)  # generic OOM handlers still see it
    assert type(info.value.__cause__) is type(error())
    with pytest.raises(UnsplittableOOM, match="2 item"):
        run_splitting_on_oom(oom_above(1, []), [1, 2, 3, 4], min_items=2)


def test_other_errors_and_nested_give_ups_are_not_split():
    calls = []

    def broken(items):
        calls.append(items)
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        run_splitting_on_oom(broken, [1, 2, 3, 4])
    assert len(calls) == 1
    # a RuntimeError that is not cuBLAS's allocation failure goes on as it is, unsplit
    other = RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, ...)`")

    def failing(items):
        calls.append(items)
        raise other

    calls.clear()
    with pytest.raises(RuntimeError) as info:
        run_splitting_on_oom(failing, [1, 2, 3, 4])
    assert info.value is other and len(calls) == 1

    # items = micro-batches, each split into its examples when it alone does not fit
    def run_micro_batch(examples):
        return run_splitting_on_oom(oom_above(0, []), examples)  # not even one example fits

    outer = []

    def run_fused_batch(parts):
        outer.append(parts)
        return [run_micro_batch(p) for p in parts]

    with pytest.raises(UnsplittableOOM):
        run_splitting_on_oom(run_fused_batch, [[1, 2], [3, 4]])
    assert outer == [[[1, 2], [3, 4]]]  # the outer split did not try halves around it


def test_the_failed_attempts_tensors_are_freed_before_the_retry():
    refs = []

    def run_part(items):
        assert all(r() is None for r in refs), "a failed attempt's tensor is still alive"
        activation = torch.empty(1024)
        refs.append(weakref.ref(activation))
        if len(items) > 1:
            raise torch.OutOfMemoryError("out of memory")
        return len(items)

    assert run_splitting_on_oom(run_part, [1, 2, 3, 4]) == [1, 1, 1, 1]


def test_grads_are_restored_when_a_backward_fails_halfway():
    done = torch.nn.Parameter(torch.ones(3))
    done.grad = torch.full((3,), 2.0)
    fresh = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(torch.OutOfMemoryError):
        with grads_restored_on_error([done, fresh]):
            (done * 5 + fresh).sum().backward()
            raise torch.OutOfMemoryError("out of memory in a lower layer")
    assert torch.equal(done.grad, torch.full((3,), 2.0)) and fresh.grad is None
    with grads_restored_on_error([done]):
        (done * 5).sum().backward()
    assert torch.equal(done.grad, torch.full((3,), 7.0))


def test_protected_accumulation_is_bit_identical_to_plain_accumulation():
    torch.manual_seed(0)
    xs = [torch.randn(8, 64) for _ in range(3)]
    plain = torch.nn.Parameter(torch.randn(64, 64))
    guarded = torch.nn.Parameter(plain.detach().clone())
    untouched = torch.nn.Parameter(torch.ones(2))  # no gradient in the block: stays as it was
    untouched.grad = torch.ones(2)
    for x in xs:
        (plain @ x.T).sin().sum().backward()
        with grads_restored_on_error([guarded, untouched]):
            (guarded @ x.T).sin().sum().backward()
    assert torch.equal(guarded.grad, plain.grad)
    assert torch.equal(untouched.grad, torch.ones(2))


@pytest.mark.parametrize("adapters, targets", [
    ([(4, 0.1)] * 3, ALL7),
    ([(4, 0.1), (8, 0.0)], ("q_proj", "v_proj", "down_proj")),
])
def test_triton_kernel_saving_is_what_autograd_saves(monkeypatch, adapters, targets):
    """The triton kernel keeps the input itself and the mask as bits where fused keeps a
    dropped-out copy and a bool mask; the estimate subtracts exactly that (layer 0 keeps no mask under fused: its input
    needs no gradient; the estimate does not subtract it there)."""
    pytest.importorskip("triton")
    from mlora.lora_triton import unavailable

    if unavailable(torch.device("cpu")):
        pytest.skip(unavailable(torch.device("cpu")))
    saved, rows, seq_len = _saved_per_kernel(monkeypatch, adapters, targets, ("fused", "triton"))
    lora = [LoraShape(r, targets, p) for r, p in adapters]
    estimates = {k: estimate_peak_bytes(SMALL, rows=rows, seq_len=seq_len, dtype=BF16, lora=lora, lora_kernel=k)
                 for k in ("fused", "triton")}
    estimated = estimates["fused"].activations - estimates["triton"].activations
    measured = saved["fused"] - saved["triton"]
    layer0_qkv_dropout_mask = SMALL.hidden_size * rows * seq_len  # fused's bool [N, H], not kept in layer 0
    assert measured > 0 and estimated == measured + layer0_qkv_dropout_mask


# Mixture of experts: 4 experts of width 48, 2 per token; layer 1 dense in the Qwen variants
# (moe_layers given: SMALL's own, all dense, would carry over)
MIXTRAL = dataclasses.replace(SMALL, model_type="mixtral", num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=48, norm_topk_prob=True, routing_weights_fp32=True,
                              moe_layers=[True, True])
QWEN2_MOE = dataclasses.replace(SMALL, model_type="qwen2_moe", attention_bias=True, num_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                                moe_layers=[True, False])
QWEN3_MOE = dataclasses.replace(SMALL, model_type="qwen3_moe", qk_norm=True, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=48, norm_topk_prob=True, moe_layers=[False, True])
# GPT-OSS: attention sinks (an explicit mask on every layer), q/k/v/o biases, a sliding layer;
# biased experts with a fused, interleaved gate_up_proj and a clamped GLU; a biased router
GPT_OSS = dataclasses.replace(SMALL, model_type="gpt_oss", attention_bias=True, o_proj_bias=True, mlp_bias=True,
                              attn_sinks=True, sliding_window=[8, None], num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=48, fused_gate_up=True, gate_up_interleaved=True, glu_limit=7.0,
                              glu_alpha=1.702, router_bias=True, router="topk_softmax", moe_layers=[True, True])
GPT_OSS_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
# GLM-4.5: a sigmoid router in fp32 with a correction bias and 2 groups, an ungated shared
# expert, layer 0 dense, q/k/v biases and norms
GLM4_MOE = dataclasses.replace(SMALL, model_type="glm4_moe", attention_bias=True, qk_norm=True, num_experts=8,
                               num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                               routing_weights_fp32=True, router="sigmoid", router_params_fp32=True, router_groups=2,
                               routed_scaling=2.5, shared_expert_intermediate_size=32, shared_expert_gated=False,
                               moe_layers=[False, True])
# DeepSeek-V3: latent attention (a rank-24 query bottleneck, a rank-16 kv latent, values of 12
# against keys of 8 + 8) on GLM-4.5's MoE
DEEPSEEK_V3 = dataclasses.replace(GLM4_MOE, model_type="deepseek_v3", attention_bias=False, qk_norm=False, head_dim=8,
                                  mla=True, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=12,
                                  num_kv_heads=4, attn_scale=0.3)
# DeepSeek-V2: the latent attention with queries straight from q_proj, a softmax router limited to
# the best group's experts, scaled and not renormalized
DEEPSEEK_V2 = dataclasses.replace(DEEPSEEK_V3, model_type="deepseek_v2", q_lora_rank=0, router="grouped_softmax",
                                  norm_topk_prob=False)
MLA_ALL = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Mistral Small 4: DeepSeek-V3's latent attention with queries scaled past position 8, its router in
# the model's dtype (groups by their two best scores, renormalized), LoRA on attention only (PEFT
# loads none on its experts)
MISTRAL4 = dataclasses.replace(DEEPSEEK_V3, model_type="mistral4", router="grouped_softmax_top2",
                               router_params_fp32=False, routing_weights_fp32=False, query_scale_beta=0.1,
                               query_scale_period=8)

# Llama 4: a RoPE layer (adjacent pairs in fp32, weightless q/k norms after RoPE, chunks of 4: an
# explicit mask) with 2 of 4 experts whose input the router's sigmoid weights, and a shared expert;
# a NoPE layer with its queries scaled in fp32, a dense MLP (wider: intermediate_size)
LLAMA4 = dataclasses.replace(SMALL, model_type="llama4_text", num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=48, shared_expert_intermediate_size=48, shared_expert_gated=False,
                             router="topk_sigmoid", experts_input_weighted=True, moe_layers=[True, False],
                             rope_layers=[True, False], qk_l2_norm=True, rope_fp32=True,
                             rope=llama.RopeArgs(interleaved=True), attention_chunk=[4, None], query_scale_beta=0.5,
                             query_scale_period=4, query_scale_offset=1, query_scale_nope_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("args, adapters, targets", [
    (MIXTRAL, [(4, 0.0)], ALL7),
    (MIXTRAL, [(4, 0.0), (8, 0.0)], ALL7),
    (MIXTRAL, [(8, 0.1)], ("q_proj", "v_proj")),
    (QWEN2_MOE, [(4, 0.0)], ("q_proj", "k_proj", "v_proj", "o_proj")),
    (QWEN3_MOE, [(4, 0.0), (4, 0.0)], ALL7),
    (GPT_OSS, [(4, 0.0)], GPT_OSS_ALL),
    (GPT_OSS, [(4, 0.0), (8, 0.0)], GPT_OSS_ALL),
    (GPT_OSS, [(8, 0.1)], ("q_proj", "v_proj")),
    (GLM4_MOE, [(4, 0.0), (4, 0.0)], ALL7),
    (DEEPSEEK_V3, [(4, 0.0), (8, 0.0)], MLA_ALL),
    (DEEPSEEK_V3, [(8, 0.1)], ("q_b_proj", "kv_b_proj", "o_proj")),
    (DEEPSEEK_V2, [(4, 0.0), (8, 0.0)], ("q_proj", *MLA_ALL[2:])),
    (MISTRAL4, [(4, 0.0), (8, 0.1)], MLA_ALL[:5]),
    (LLAMA4, [(4, 0.0), (8, 0.1)], ALL7),  # (LoRA on its shared expert and dense MLP)
], ids=["mixtral", "mixtral_two", "mixtral_attention", "qwen2_moe_shared", "qwen3_moe_dense_layer", "gpt_oss",
        "gpt_oss_two", "gpt_oss_attention", "glm4_moe", "deepseek_v3", "deepseek_v3_latents", "deepseek_v2",
        "mistral4", "llama4"])
def test_moe_layers_bound_what_autograd_saves(dtype, args, adapters, targets):
    """A mixture-of-experts layer keeps per routed token what a dense MLP of the expert's width
    keeps, plus the router's and the dispatch's tensors; with LoRA on the experts, each expert's
    gathered input, hidden and (several adapters) column factor. The estimate bounds what
    autograd saves, and the weights and LoRA state are every parameter's bytes."""
    wrappers = _assert_layer_kinds_bounded(dtype, args, adapters, targets, seq_len=32)
    # (gate_up_proj, down_proj) or (gate, up, down); Llama 4's experts are wrapped, with LoRA where
    # experts.* are targeted (test_expert_lora_beside_other_mlp_lora_is_bounded)
    per_expert = 2 if args.fused_gate_up or args.experts_named else 3
    experts = per_expert * args.num_experts * sum(args.moe_layers)
    assert args.is_moe and sum(".experts." in p for p in wrappers) == experts


# Qwen3.5: a linear-attention layer (Gated DeltaNet: 2 key heads and 4 value heads of 16, a
# 4-tap conv) and a softmax-attention one whose output is gated; (1 + w) norms; and its MoE
QWEN3_5 = dataclasses.replace(SMALL, model_type="qwen3_5_text", qk_norm=True, gemma_norms=True, rotary_dim=4,
                              layer_kinds=["linear", "attention"], attn_output_gate=True, linear_num_key_heads=2,
                              linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                              linear_conv_kernel=4)
QWEN3_5_MOE = dataclasses.replace(QWEN3_5, model_type="qwen3_5_moe_text", num_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=32, norm_topk_prob=True, shared_expert_intermediate_size=48)
# Qwen3-Next: Qwen3.5-MoE's layers with the linear attention's input projections fused (in_proj_qkvz,
# in_proj_ba), the softmax-attention layer's MLP dense (mlp_only_layers)
QWEN3_NEXT = dataclasses.replace(QWEN3_5_MOE, model_type="qwen3_next", linear_fused_projections=True,
                                 moe_layers=[True, False])
QWEN3_NEXT_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj", "gate_proj",
                  "up_proj", "down_proj")
QWEN3_5_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj",
               "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("args, adapters, targets, seq_len", [
    (QWEN3_5, [(4, 0.0)], QWEN3_5_ALL, 32),
    (QWEN3_5, [(4, 0.0), (8, 0.1)], QWEN3_5_ALL, 70),  # two chunks of 64, the second padded
    (QWEN3_5, [(8, 0.0)], ("in_proj_qkv", "out_proj"), 64),
    (QWEN3_5_MOE, [(4, 0.0)], QWEN3_5_ALL[:9], 32),
    (QWEN3_5, [(4, 0.0), (8, 0.1)], QWEN3_5_ALL, "packed"),  # rows of several documents and pads
    (QWEN3_NEXT, [(4, 0.0), (8, 0.1)], QWEN3_NEXT_ALL[:7], 70),
], ids=["qwen3_5", "qwen3_5_two_chunks", "qwen3_5_linear_only", "qwen3_5_moe", "qwen3_5_packed", "qwen3_next"])
def test_linear_attention_layers_bound_what_autograd_saves(dtype, args, adapters, targets, seq_len):
    """Qwen3.5's Gated DeltaNet layers keep far more per token than softmax attention (fp32
    copies of q, k, v as the chunked delta rule derives them, [64, 64] matrices per chunk and
    value head, a state per chunk): the estimate bounds what autograd saves, each layer kind
    its own projections' LoRA (packed rows too: no document padded to another's length), and the
    weights and LoRA state are every parameter's bytes."""
    inputs = {}
    if seq_len == "packed":  # 96 tokens a row: documents of 10 .. 70 tokens, a few pads at the end
        seq_len, rows = 96, 4
        lengths = [[10, 70, 12], [30, 30, 30], [90], [5, 17, 41, 20]]
        ids, positions, mask = (torch.zeros(rows, seq_len, dtype=torch.long) for _ in range(3))
        for r, row in enumerate(lengths):
            ids[r], start = -1, 0
            for d, n in enumerate(row):
                ids[r, start:start + n], positions[r, start:start + n], mask[r, start:start + n] = d, torch.arange(n), 1
                start += n
        inputs = dict(attention_mask=mask, position_ids=positions, document_ids=ids)
    _assert_layer_kinds_bounded(dtype, args, adapters, targets, seq_len, inputs=inputs)


def _assert_layer_kinds_bounded(dtype, args, adapters, targets, seq_len: int, rows: int = 4, inputs=None):
    """The estimate of a model (layers of several kinds, MoE layers) bounds what autograd saves
    (within 1.5x), and its weights and LoRA state are the parameters' bytes; with Llama 4's q/k L2
    norms, their term is exactly what they add. Returns the LoRA wrappers."""
    model, layout, wrappers = _model_with_adapters(dtype, adapters, targets, args)
    per = rows // len(adapters)
    layout.rows = [AdapterRows(f"a{a}", a * per, (a + 1) * per) for a in range(len(adapters))]
    model.train()
    measured = saved_tensor_bytes(model, torch.randint(0, args.vocab_size, (rows, seq_len)),
                                  frozen_storages(model, wrappers), **(inputs or {}))
    # (packed rows: the attention layers' document masks, as memory.explicit_mask_of says)
    # (device: the CPU, where a sparse layer's experts run grouped, as they do here)
    estimate = estimate_peak_bytes(args, rows=rows, seq_len=seq_len, dtype=dtype,
                                   lora=[LoraShape(r, targets, p) for r, p in adapters],
                                   explicit_mask=True if inputs else None, device=torch.device("cpu"))
    assert measured <= estimate.activations <= 1.5 * measured
    assert weight_bytes(args, dtype) == sum(p.numel() * p.element_size() for p in model.parameters())
    lora_params = sum(t.numel() for w in wrappers.values() for lw in w.adapters.values()
                      for t in (lw.lora_A, lw.lora_B))
    assert lora_state_bytes(args, [LoraShape(r, targets, p, 0) for r, p in adapters]) == lora_params * 4 * 2
    if args.qk_l2_norm:  # (Llama 4: its RoPE layer's q/k L2 norms keep an fp32 copy and an rsqrt per head)
        plain, plain_layout, plain_wrappers = _model_with_adapters(dtype, adapters, targets,
                                                                   dataclasses.replace(args, qk_l2_norm=False))
        plain_layout.rows = layout.rows
        plain.train()
        without = saved_tensor_bytes(plain, torch.randint(0, args.vocab_size, (rows, seq_len)),
                                     frozen_storages(plain, plain_wrappers))
        assert measured - without == estimate.per_layer["qk_norms"] * args.rope_layers.count(True)
    return wrappers


# Gemma 4: a sliding layer (heads of 16, 2 K/V heads) and a full one (heads of 32; with
# attention_k_eq_v one K/V head and no v_proj), values normed per head, plain-w norms in fp32,
# sandwich norms, a scalar after each layer
GEMMA4 = dataclasses.replace(SMALL, model_type="gemma4_text", qk_norm=True, hidden_act="gelu_tanh", embed_scale=True,
                             norm_layout="sandwich", norm_weight_fp32=True, attn_scale=1.0, sliding_window=[4, None],
                             layer_kinds=["attention", "global_attention"], global_head_dim=32, global_num_kv_heads=2,
                             v_norm=True, layer_scalar=True,
                             rope=llama.RopeArgs("proportional", 1e6, partial=0.25, dim=32),
                             local_rope=llama.RopeArgs("default", 1e4, dim=16))
GEMMA4_K_EQ_V = dataclasses.replace(GEMMA4, global_num_kv_heads=1, attn_k_eq_v=True)
# 26B-A4B's form: 2 of 4 experts (of 48) beside each layer's dense MLP, their router on the stream
GEMMA4_MOE = dataclasses.replace(GEMMA4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                 norm_topk_prob=True, routing_weights_fp32=True, moe_beside_mlp=True)


@pytest.mark.parametrize("kind", ["nf4", "fp4-double", "int8"])
@pytest.mark.parametrize("args", [GEMMA4_MOE, LLAMA4], ids=["gemma4_moe", "llama4"])
def test_quantized_fused_experts_weights_equal_what_bitsandbytes_allocates(kind, args):
    """Gemma 4 26B-A4B's and Llama 4's experts hold gate and up as one gate_up_proj, quantized as
    one layer (one quantization state, code book included), while their dense MLPs' (and Llama
    4's shared expert's) are two: weight_bytes counted the experts' as two (a code book too many
    per expert and layer)."""
    pytest.importorskip("bitsandbytes")
    from mlora.quant import QuantConfig, linear_weight_bytes, quantize_model

    cfg = {"nf4": QuantConfig(4, "nf4"), "fp4-double": QuantConfig(4, "fp4", double_quant=True),
           "int8": QuantConfig(8)}[kind]
    model = CausalLM(args).to(BF16)
    others = weight_bytes(args, BF16) - linear_weight_bytes(model)  # (exact unquantized: tested above)
    projections = quantize_model(model, cfg, "cpu")
    assert weight_bytes(args, BF16, quant=cfg, double_quant=cfg.double_quant) == others + projections


# E2B/E4B: per-layer inputs of 8; layers 2 (sliding) and 3 (full) attend to layers 0's and 1's
# keys and values, with MLPs twice as wide
GEMMA4_E2B = dataclasses.replace(GEMMA4, num_layers=4, sliding_window=[4, None, 4, None],
                                 layer_kinds=["attention", "global_attention"] * 2, moe_layers=[False] * 4,
                                 rope_layers=[True] * 4, per_layer_input_size=8,
                                 per_layer_vocab_size=SMALL.vocab_size + 16, kv_shared_layers=2, double_wide_mlp=True)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("args", [GEMMA4, GEMMA4_K_EQ_V, GEMMA4_MOE, GEMMA4_E2B],
                         ids=["gemma4", "gemma4_k_eq_v", "gemma4_moe", "gemma4_e2b"])
def test_gemma4_layers_bound_what_autograd_saves(dtype, args):
    """Gemma 4's two layer kinds keep what their own head sizes make them keep (plus the values'
    norm): the estimate bounds what autograd saves, and the weights and LoRA state are every
    parameter's bytes (a full layer with attention_k_eq_v has no v_proj, nor its LoRA; with
    26B-A4B's experts, the router's and the experts' activations, weights and norms, their
    LoRA on the dense MLP only; E2B/E4B's KV-shared layers no k/v_proj, their MLPs double-wide,
    the per-layer inputs' table and gates)."""
    wrappers = _assert_layer_kinds_bounded(dtype, args, [(4, 0.0), (8, 0.1)], ALL7, seq_len=32)
    assert ("model.layers.1.self_attn.v_proj" in wrappers) == (not args.attn_k_eq_v)
    assert "model.layers.1.mlp.down_proj" in wrappers and not any(".experts." in path for path, w in wrappers.items()
                                                                  if w.adapters)
    assert args.num_layers < 4 or ("model.layers.3.self_attn.k_proj" in wrappers) == (not args.kv_shared_layers)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "one_at_a_time"])
@pytest.mark.parametrize("args, experts, mlp", [
    (GEMMA4_MOE, "model.layers.1.experts", "model.layers.1.mlp"),
    (LLAMA4, "model.layers.0.mlp.experts", "model.layers.0.mlp.shared_expert"),
], ids=["gemma4_moe", "llama4"])
def test_expert_lora_beside_other_mlp_lora_is_bounded(monkeypatch, dtype, grouped, args, experts, mlp):
    """26B-A4B with LoRA on its experts (experts.gate_up_proj, experts.down_proj) and on the dense
    MLP beside them in the same layers, Llama 4 on its experts and on the shared expert beside
    them (and its dense layer's MLP): the estimate bounds what autograd saves, grouped or one
    expert at a time, and the LoRA state is every expert's A and B."""
    monkeypatch.setattr(mlora.models.moe, "GROUPED_EXPERTS", grouped)
    targets = (*ALL7, "experts.gate_up_proj", "experts.down_proj")
    wrappers = _assert_layer_kinds_bounded(dtype, args, [(4, 0.0), (8, 0.0)], targets, seq_len=32)
    assert wrappers[f"{experts}.3.gate_up_proj"].adapters and wrappers[f"{mlp}.up_proj"].adapters
    # what the experts' LoRA adds is counted (the bound above has room for it to be left out):
    # within 10% (bf16's grouped hidden rounds its columns up to 16 bytes: 6% more than counted)
    added = {}
    for on in (targets, ALL7):
        model, layout, wrappers = _model_with_adapters(dtype, [(4, 0.0), (8, 0.0)], on, args)
        layout.rows = [AdapterRows("a0", 0, 2), AdapterRows("a1", 2, 4)]
        model.train()
        # (the same tokens in both runs, so the same routing)
        measured = saved_tensor_bytes(model, torch.randint(0, args.vocab_size, (4, 32), generator=torch.Generator()),
                                      frozen_storages(model, wrappers))
        estimate = estimate_peak_bytes(args, rows=4, seq_len=32, dtype=dtype, lora=[LoraShape(4, on), LoraShape(8, on)],
                                       device=torch.device("cpu")).activations
        added[on] = (measured, estimate)
    measured, estimate = (added[targets][i] - added[ALL7][i] for i in (0, 1))
    assert 0.9 * measured <= estimate <= 1.5 * measured


def test_gemma4_kv_sharing_under_recompute_is_bounded():
    """Under recompute a KV-shared layer keeps its source layer's keys and values as its inputs
    (and each layer its slice of the per-layer inputs): counted."""
    model, layout, wrappers = _model_with_adapters(torch.float32, [(4, 0.0)], ALL7, GEMMA4_E2B)
    layout.rows = [AdapterRows("a0", 0, 4)]
    model.train()
    model.recompute = True
    measured = saved_tensor_bytes(model, torch.randint(0, SMALL.vocab_size, (4, 32)), frozen_storages(model, wrappers))
    estimate = estimate_peak_bytes(GEMMA4_E2B, rows=4, seq_len=32, dtype=torch.float32, lora=[LoraShape(4, ALL7, 0.0)],
                                   recompute=True)
    assert measured <= estimate.activations <= 1.5 * measured


def test_gemma4_recompute_counts_the_double_wide_mlps_lora_casts():
    """Under recompute every layer keeps its LoRA casts; with targets on the MLP, a KV-shared
    layer's (double-wide) are the costliest, and the layer-kind-free figure is theirs."""
    from mlora.memory import _lora_cast_bytes

    mlp_only = [LoraShape(16, ("gate_proj", "up_proj", "down_proj"), 0.0)]
    shared = _lora_cast_bytes(GEMMA4_E2B, 2, mlp_only, False, "attention", True)
    assert shared > _lora_cast_bytes(GEMMA4_E2B, 2, mlp_only, False, "attention", False)
    assert _lora_cast_bytes(GEMMA4_E2B, 2, mlp_only) == shared


def test_heads_beyond_flash_attention_count_repeated_kv():
    """Gemma 4's full layers have heads of 512, which FlashAttention does not take: SDPA then
    gets K/V repeated to every head (llama.GQA_MAX_HEAD_DIM), and the estimate counts them so;
    the sliding layers' heads of 256 keep grouped K/V."""
    from mlora.memory import _layer_saved_per_token

    args = dataclasses.replace(GEMMA4, head_dim=256, global_head_dim=512, global_num_kv_heads=1, num_heads=4,
                               num_kv_heads=2)

    def attention(mixer):
        return _layer_saved_per_token(args, 2, [], shared=True, quant=None, explicit_mask=False, seq_len=64,
                                      mixer=mixer)["attention"]

    assert attention("global_attention") == 4 * 4 * 512 * 2  # q, output, k and v on all 4 heads
    assert attention("attention") == (2 * 4 + 2 * 2) * 256 * 2  # k and v on their 2 heads


def test_grouped_experts_estimate_bounds_a_batch_of_one_adapter():
    """Two adapters of rank 4 on the experts in bf16: their 8 columns together are 16 bytes and
    group, either alone is 8 and runs one expert at a time, keeping each expert's LoRA casts
    (64 experts here: more than the grouped estimate counted). A batch may hold one adapter
    alone, so the estimate of the two bounds that batch too."""
    args = dataclasses.replace(MIXTRAL, num_experts=64)
    adapters, rows, seq_len = [(4, 0.0), (4, 0.0)], 2, 8
    estimate = estimate_peak_bytes(args, rows=rows, seq_len=seq_len, dtype=BF16,
                                   lora=[LoraShape(r, ALL7, p) for r, p in adapters], device=torch.device("cpu"))
    for layout_rows in ([AdapterRows("a0", 0, 1), AdapterRows("a1", 1, 2)], [AdapterRows("a0", 0, 2)]):
        model, layout, wrappers = _model_with_adapters(BF16, adapters, ALL7, args)
        layout.rows = layout_rows
        model.train()
        measured = saved_tensor_bytes(model, torch.randint(0, args.vocab_size, (rows, seq_len)),
                                      frozen_storages(model, wrappers))
        assert measured <= estimate.activations, (layout_rows, measured, estimate.activations)


def test_grouped_experts_backward_working_set_covers_every_routed_token(monkeypatch):
    """Grouped experts (models/moe.grouped_experts) run their backward over all N k routed
    tokens at once, not one expert's at a time: the layer's backward working set holds the
    GLU's gradients of every routed token, [N k, I] six times, and the [N k, H] ones; on an
    unknown device it is counted so wherever the experts could group; with them off it is one
    expert's."""
    import mlora.models.moe as moe

    args, rows, seq = QWEN3_MOE, 4, 32
    e, k, N = 2, args.num_experts_per_tok, 4 * 32
    grouped_term = N * (6 * k * args.moe_intermediate_size * e + k * args.hidden_size * (3 * e + 4))
    # and, not per token, every expert's LoRA stacked and cast, and its gradients, for the widest
    # projection (gate/up: [E, 16, H] and [E, I, 16] in fp32 and bf16, gradients likewise)
    buffers = args.num_experts * 16 * (args.hidden_size + args.moe_intermediate_size) * (2 * e + 8)
    for device in (None, torch.device("cpu")):
        est = estimate_peak_bytes(args, rows=rows, seq_len=seq, dtype=BF16, lora=[LoraShape(16, ALL7, 0.0)],
                                  device=device)
        assert est.layer_backward >= grouped_term + buffers
    monkeypatch.setattr(moe, "GROUPED_EXPERTS", False)
    off = estimate_peak_bytes(args, rows=rows, seq_len=seq, dtype=BF16, lora=[LoraShape(16, ALL7, 0.0)])
    assert off.layer_backward < grouped_term


@pytest.mark.parametrize("args", [LLAMA4, dataclasses.replace(GEMMA3, sliding_window=[4, None])],
                         ids=["llama4", "gemma3_windowed"])
@pytest.mark.parametrize("seq_len", [3, 8, 32])
def test_batch_counts_each_distinct_attention_mask(args, seq_len):
    """The estimate's masks are the distinct ones llama.py builds for the stage's layers: with
    left padding one per kind of layer (a chunked or windowed one and a full one: two, or one
    where the chunk or window is no shorter than the sequence), without it only those whose
    window or chunk cuts something at this length. (Packed rows: llama.document_masks keys its
    masks the same way.)"""
    from mlora.memory import _distinct_masks

    layers = list(range(args.num_layers))
    left_padded = torch.ones(2, seq_len, dtype=torch.long)
    left_padded[0, :2] = 0
    for attention_mask, every in ((left_padded, True), (None, False)):
        built = llama.attention_masks(args, layers, attention_mask, seq_len, torch.device("cpu"))
        distinct = {id(m) for m in built.values() if m is not None}
        assert _distinct_masks(args, layers, seq_len, every) == len(distinct), (attention_mask is not None, built)


def live_bytes_tracker():
    """benchmarks/bench_loss.py's LiveBytes: the most bytes of new storages alive at once among
    those made under it (the CPU's stand-in for max_memory_allocated)."""
    spec = importlib.util.spec_from_file_location("bench_loss", Path(__file__).resolve().parents[1] / "benchmarks"
                                                  / "bench_loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LiveBytes()


@pytest.mark.parametrize("trained_only", [True, False], ids=["trained_positions", "every_position"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "gemma2_softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_head_estimate_is_the_chunked_losss_peak(monkeypatch, dtype, softcap, trained_only):
    """What loss.py's chunked head allocates, tracked allocation by allocation on the CPU: the
    forward's peak (the trained positions' hidden states, one chunk's logits and gradients,
    beside the hidden states' gradient it keeps) is what `_head_bytes` counts (both its parts;
    every position trained, as here, is its worst case), and what the forward leaves for the
    backward is its `kept`."""
    import mlora.loss as loss
    from mlora.batching import trained_positions

    monkeypatch.setattr(loss, "CHUNK_LOGITS_BYTES", 64 * 2048 * 4)  # chunks of 64 tokens
    args = dataclasses.replace(SMALL, vocab_size=2048, final_softcap=softcap)
    model = CausalLM(args).to(dtype).requires_grad_(False)
    rows, seq_len = 3, 80  # 240 tokens (237 trained): chunks of 64, 64, 64, 48 (45)
    h = torch.randn(rows, seq_len, args.hidden_size, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, args.vocab_size, (rows, seq_len))
    layout = [AdapterRows("a", 0, rows)]
    positions = trained_positions(labels, layout) if trained_only else None
    with live_bytes_tracker() as tracked:
        sums = loss.head_loss_sums(model, h, labels, layout, {"a": rows * (seq_len - 1)}, positions)
        forward_peak, kept_measured = tracked.peak, tracked.live
        sums["a"][0].backward()
    e = torch.finfo(dtype).bits // 8
    kept, chunk = memory._head_bytes(args, e, rows * seq_len)
    assert kept_measured - 16 <= kept <= kept_measured + 3 * args.hidden_size * e  # (the sums; 3 untrained)
    assert tracked.peak == forward_peak  # the backward scales what the forward kept: no new peak
    forward_peak += h.numel() * e  # (the final norm's output: made before the tracking here)
    assert forward_peak <= kept + chunk <= 1.05 * forward_peak
