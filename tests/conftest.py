"""Shared fixtures: a tiny offline tokenizer and tiny random HF models saved as safetensors.

Nothing downloads: the tokenizer is a byte-level BPE trained here on a few sentences, and
the models are built with transformers' own config classes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The `triton` LoRA kernel's tests run its kernels on the CPU through Triton's interpreter,
# which must be on before the kernels are first compiled (tests/test_lora_triton.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "reverse the words of this sentence please",
    "upper case letters and lower case letters",
    "one two three four five six seven eight nine ten plus minus equals",
    "### Instruction:\n### Input:\n### Response:\nBelow is an instruction that describes a task.",
    "0123456789 + - = ? ! . , : ; ' \" ( ) [ ] { }",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz",
]


def build_tokenizer():
    """A ~400-token byte-level BPE with LLaMA-like special tokens (BOS prepended) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def make_tiny_model(path: Path, family: str = "llama", tokenizer_dir: Path | None = None,
                    seed: int = 0, **overrides) -> Path:
    """Build a random HF model of `family` (llama | mistral | qwen2 | qwen3 | gemma | gemma2 | gemma3_text | phi3 | smollm3), save it as safetensors
    (plus the tiny tokenizer when given) into `path`, and return `path`."""
    import transformers

    cls_config, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "smollm3": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM),
    }[family]
    vocab = 400
    if tokenizer_dir is not None:
        vocab = len(json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())["model"]["vocab"])
        vocab = max(vocab, 400)
    kwargs = dict(TINY, vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family == "gemma3_text":  # its defaults are a real model's: head_dim 256, windows of 4096
        kwargs.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                      layer_types=["sliding_attention", "full_attention"])
    if family == "gemma":
        kwargs.update(head_dim=16)
    if family == "gemma2":  # caps that bite on tiny random weights (the real ones: 50 and 30)
        kwargs.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=4, attn_logit_softcapping=2.0,
                      final_logit_softcapping=3.0)
    kwargs.update(overrides)
    config = cls_config(**kwargs)
    torch.manual_seed(seed)
    model = cls_model(config).eval()
    # HF's init (std 0.02) gives near-uniform logits; larger weights make parity tests sharper.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
            elif "q_norm" in name or "k_norm" in name:  # Qwen3's per-head norms start at ones
                p.normal_(1.0, 0.2)
            if "norm" in name and family.startswith("gemma"):  # (1 + w) norms: w starts at zeros
                p.normal_(0.0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer LLaMA (GQA 4/2) with the tiny tokenizer; shared read-only by many tests."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama", tokenizer_dir)
