"""Golden losses: fixed tiny runs (a LLaMA, and a Mixtral with LoRA on every expert) whose
per-step losses, eval losses and final weights are recorded in tests/golden/<family>_run.json,
to catch numeric drift that the relative tests cannot
see (fused vs alone, pipeline vs one process and resume vs uninterrupted all move together when
the LoRA init, the dropout draws, the data order, the schedule or the loss normalisation
change; the references in the other tests pin the ops, not the whole run). A habit from
torchtitan (../shared/DESIGN.md).

Everything the run depends on is in this file or committed beside it: the base's weights come
from torch's CPU generator in a fixed order (not transformers' init, which may change between
releases), the tokenizer is a committed file (tests/golden/tokenizer), the data rows are below.
fp32 on the CPU; the tolerance (relative 2e-5) covers another CPU's GEMM rounding (1.9e-7 at
most with torch's and MKL's instruction sets forced down to SSE4.2), not a changed run. The
Mixtral run's closest call between a token's second and third expert is a probability gap of
1.2e-5, hundreds of times what such rounding moves. The
tokenizer's files keep to what transformers 4 and 5 read alike (pyproject allows both).

A change that moves these figures on purpose (a new dropout draw, a new init) regenerates them:
    MLORA_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
and says so, with the reason, in its commit message."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mlora.cli import main

GOLDEN = Path(__file__).parent / "golden"

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 96, 2, 4, 2, 400
EXPERTS, EXPERT_INTER = 4, 48
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
    "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32",
}
# A mixture of experts (2 of 4 per token) in Mixtral's checkpoint layout: the routing, and LoRA
# on every expert, are in the run too.
MIXTRAL_CONFIG = {**LLAMA_CONFIG, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                  "intermediate_size": EXPERT_INTER, "num_local_experts": EXPERTS, "num_experts_per_tok": 2,
                  "sliding_window": None, "router_aux_loss_coef": 0.0}
CONFIGS = {"llama": LLAMA_CONFIG, "mixtral": MIXTRAL_CONFIG}

ROWS = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello to the world in a friendly way.", "output": "Hello, world! Nice to meet you."},
    {"instruction": "Reverse the word.", "input": "stop", "output": "pots"},
    {"instruction": "What is the capital of France?", "output": "Paris."},
    {"instruction": "Count to three.", "output": "One, two, three."},
    {"instruction": "Give an antonym.", "input": "hot", "output": "cold"},
    {"instruction": "Write a short greeting for a letter to a friend you have not seen in years.",
     "output": "Dear friend, it has been far too long; I hope this finds you well."},
]
CHATS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
    {"messages": [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four"}]},
    {"messages": [{"role": "user", "content": "a fruit"}, {"role": "assistant", "content": "an apple"},
                  {"role": "user", "content": "another"}, {"role": "assistant", "content": "a pear"}]},
    {"messages": [{"role": "user", "content": "say yes"}, {"role": "assistant", "content": "yes"}]},
]


def golden_base(path: Path, family: str) -> Path:
    """The 2-layer model of CONFIGS[family], its weights drawn in a fixed order from one seeded
    generator (norms around 1), with the committed tokenizer."""
    g = torch.Generator().manual_seed(1234)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    head_dim = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim)})
        if family == "mixtral":
            shapes[p + "block_sparse_moe.gate.weight"] = (EXPERTS, HIDDEN)
            for e in range(EXPERTS):
                q = f"{p}block_sparse_moe.experts.{e}."
                shapes.update({q + "w1.weight": (EXPERT_INTER, HIDDEN), q + "w3.weight": (EXPERT_INTER, HIDDEN),
                               q + "w2.weight": (HIDDEN, EXPERT_INTER)})
        else:
            shapes.update({p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                           p + "mlp.down_proj.weight": (HIDDEN, INTER)})
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        else:
            tensors[name] = (0.5 if "embed" in name else 0.08) * torch.randn(shape, generator=g)
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(CONFIGS[family], indent=2))
    for f in (GOLDEN / "tokenizer").iterdir():
        shutil.copy(f, path / f.name)
    return path


def golden_config(tmp: Path, family: str) -> Path:
    """Three adapters fused in every batch, unlike in rank, dropout, targets, optimizer,
    schedule, data shape and padding side; eval every 2 steps."""
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    common = {"batch_size": 4, "micro_batch_size": 2, "num_epochs": 3, "test_data": str(tmp / "rows.jsonl"),
              "eval_step": 2}
    cfg = {"cutoff_len": 128, "seed": 11, "output_dir": str(tmp / "out"), "lora": [
        {**common, "name": "adamw_cosine", "data": str(tmp / "rows.jsonl"), "r": 4, "alpha": 8, "dropout": 0.1,
         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
         "optim": "adamw", "lr": 3e-3, "weight_decay": 0.01, "lr_scheduler": "cosine", "warmup_steps": 2},
        {**common, "name": "sgd_linear", "data": str(tmp / "chats.jsonl"), "test_data": str(tmp / "chats.jsonl"),
         "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "optim": "sgd",
         "lr": 5e-2, "momentum": 0.9, "lr_scheduler": "linear", "batch_size": 2, "micro_batch_size": 1},
        {**common, "name": "rslora_left", "data": str(tmp / "rows.jsonl"), "r": 2, "alpha": 4, "dropout": 0.2,
         "use_rslora": True, "target_modules": ["o_proj", "down_proj"], "expand_side": "left",
         "train_on_inputs": True, "max_grad_norm": 0.5, "lr": 1e-2},
    ]}
    if family == "mixtral":  # (no dropout on experts: PEFT could not load it; attention-only sgd_linear keeps none)
        for adapter in cfg["lora"]:
            if {"gate_proj", "up_proj", "down_proj"} & set(adapter["target_modules"]):
                adapter["dropout"] = 0.0
    path = tmp / "golden.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def run_record(tmp: Path, family: str) -> dict:
    """The run's figures: each adapter's per-step losses and eval losses (metrics.jsonl) and
    the sum of squares of each saved LoRA tensor kind."""
    from safetensors.torch import load_file

    base = golden_base(tmp / "base", family)
    cfg = golden_config(tmp, family)
    assert main(["train", "--base_model", str(base), "--config", str(cfg), "--device", "cpu", "--dtype", "fp32",
                 "--no_progress"]) == 0
    record: dict = {}
    for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "adapter" not in entry:
            continue
        mine = record.setdefault(entry["adapter"], {"loss": [], "eval_loss": [], "weights": {}})
        if "eval_loss" in entry:
            mine["eval_loss"].append(entry["eval_loss"])
        elif "loss" in entry:
            mine["loss"].append(entry["loss"])
    for name, mine in record.items():
        tensors = load_file(tmp / "out" / name / "adapter_model.safetensors")
        for kind in ("lora_A", "lora_B"):
            mine["weights"][kind] = sum(float(t.double().pow(2).sum()) for k, t in tensors.items() if kind in k)
    return record


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_golden_run_is_unchanged(tmp_path, capsys, family):
    record = GOLDEN / f"{family}_run.json"
    got = run_record(tmp_path, family)
    if os.environ.get("MLORA_UPDATE_GOLDEN"):
        record.write_text(json.dumps(got, indent=1) + "\n")
        pytest.skip(f"rewrote {record}")
    want = json.loads(record.read_text())
    assert sorted(got) == sorted(want)
    for name in want:
        for key in ("loss", "eval_loss"):
            assert len(got[name][key]) == len(want[name][key]), (name, key)
            assert got[name][key] == pytest.approx(want[name][key], rel=2e-5, abs=1e-6), (name, key)
        for kind, value in want[name]["weights"].items():
            assert got[name]["weights"][kind] == pytest.approx(value, rel=2e-5), (name, kind)


def test_golden_tokenizer_reads_alike_in_transformers_4_and_5():
    """The committed tokenizer_config.json holds only keys that every transformers mlora allows
    (>=4.56) reads alike: transformers 5 saves its added special tokens as a list
    `extra_special_tokens`, which 4.x takes for a dict ('list' object has no attribute 'keys',
    and the golden run cannot start); they are special in tokenizer.json already."""
    config = json.loads((GOLDEN / "tokenizer" / "tokenizer_config.json").read_text())
    assert set(config) <= {"bos_token", "eos_token", "pad_token", "unk_token", "model_max_length",
                           "tokenizer_class"}, sorted(config)
