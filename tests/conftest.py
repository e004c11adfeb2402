"""Shared fixtures: a tiny offline tokenizer and tiny random HF models saved as safetensors.

Nothing downloads: the tokenizer is a byte-level BPE trained here on a few sentences, and
the models are built with transformers' own config classes.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import socket
import tempfile
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


# ------------------------------------------------------------------ the garbage collector
# A full collection scans every object the process holds (torch's, transformers', sympy's, the
# session's fixtures: some 600,000), 0.1-0.3 s each. The trainer runs one whenever it retries a
# batch that ran out of memory (memory.free_device_memory), which many tests make it do, and
# Python runs more as the heap grows: about a third of the CPU time of test_memory, test_oom
# and test_early_stopping. So at each test module's start, after a collection (no garbage is
# kept), what is alive is moved out of the collector's sight (gc.freeze), and collections scan
# only what the module's tests made; those are collected as before. Reference counting still
# frees frozen objects; only one that later becomes garbage inside a reference cycle waits for
# the session's end (sessionfinish unfreezes).
_gc_frozen_at = [None]  # the module whose start froze the heap


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    module = getattr(item, "module", None)
    if module is not _gc_frozen_at[0]:  # (before the module's own fixtures are made)
        _gc_frozen_at[0] = module
        gc.collect()
        gc.freeze()


def pytest_sessionfinish(session):
    gc.unfreeze()  # (so that the interpreter's exit frees what it would otherwise)


def _port_range(setting: str = "/proc/sys/net/ipv4/ip_local_port_range") -> range:
    """Ports outside the kernel's ephemeral range (`setting`: its "low high"), which it never
    hands out by itself (to a bind of port 0 or an outgoing connection): up to 12,000 below it,
    or above it where it starts too low to leave a thousand below; any unprivileged port where
    it spans them all, as a host tuned to "1024 65535" has it (no port was left below it, and
    every suite failed at this import: the claims still keep concurrent suites apart there)."""
    try:
        with open(setting) as f:
            low, high = map(int, f.read().split()[:2])
    except (OSError, ValueError):
        low, high = 32768, 60999  # (Linux's default)
    for ports in (range(max(1024, low - 12000), low), range(high + 1, min(65536, high + 1 + 12000))):
        if len(ports) >= 1000:  # (a whole suite takes a few hundred)
            return ports
    return range(1024, 65536)


_PORTS = _port_range()
_next_port = [os.getpid() * 613 % len(_PORTS)]  # concurrent suites start their search apart


def _open_port_claims() -> int:
    """The file with one byte per port, locked by the test process that took the port (POSIX
    record locks end with the process, and are not inherited by the ranks it starts)."""
    path = os.path.join(tempfile.gettempdir(), "mlora-test-ports.lock")
    try:
        claims = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's, kept from us: then this user's suites alone agree
        return os.open(f"{path}.{os.getuid()}", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(claims, 0o666)  # (the umask took the other users' write access)
    except OSError:  # (not ours: its owner made it)
        pass
    return claims


_port_claims = _open_port_claims()


def free_port(span: int = 1) -> int:
    """A TCP port for a test's rank 0 to listen on, this process's alone for its lifetime.
    Binding port 0 and closing the socket gave a port that was free only until then: a suite
    running at the same time (or the kernel, for any connection) could take it before rank 0
    bound it ("Address already in use"). These come from below the ephemeral range, each
    claimed by a lock that concurrent test processes on this host respect, and free now (no
    other program listens there). span: claim that many consecutive ports from the one
    returned (torchrun's rendezvous at PORT puts mlora's ranks at PORT + 1)."""
    for _ in range(len(_PORTS)):
        port = _PORTS[_next_port[0] % len(_PORTS)]
        _next_port[0] += 1
        if port + span - 1 not in _PORTS:
            continue
        try:
            fcntl.lockf(_port_claims, fcntl.LOCK_EX | fcntl.LOCK_NB, span, port)
        except OSError:  # another test process took one of them
            continue
        for each in range(port, port + span):
            with socket.socket() as probe:
                try:
                    probe.bind(("", each))
                except OSError:  # some other program holds it (the claim stays: no one else tries it)
                    break
        else:
            _next_port[0] += span - 1  # (this process's own locks never refuse it: skip them)
            return port
    raise RuntimeError(f"no {span} free port{'s' if span > 1 else ''} in {_PORTS.start}..{_PORTS.stop - 1}")


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


# Gemma 4 26B-A4B's form (a make_tiny_model override of gemma4_text or gemma4): 2 of 4 experts,
# narrower than the dense MLP, beside it in every layer
GEMMA4_MOE = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=48)


# Gemma 4 E2B/E4B's features on the tiny gemma4_text model: per-layer inputs of 8, the last two
# of five layers (sliding 3, full 4) attending to the keys and values of layers 2 and 1 (the last
# earlier layer of each kind: not the first, layer 0, for the sliding one), their MLPs double-wide
GEMMA4_E2B = dict(num_hidden_layers=5, hidden_size_per_layer_input=8, num_kv_shared_layers=2, use_double_wide_mlp=True,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                               "full_attention"])


# Mixture-of-experts sizes: 4 experts, 2 per token (the expert width differs from the dense
# one where the family has both; Qwen2-MoE's shared expert differs again)
MOE_TINY = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=80),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=48),
    # GPT-OSS: a sliding layer 0 and a full layer 1, its YaRN (without truncation) on a short
    # context, and a GLU clamp that bites on tiny random weights (the real one: 7)
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48, head_dim=16, sliding_window=4,
                    swiglu_limit=0.5, rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4, beta_fast=32.0,
                                                           beta_slow=1.0, original_max_position_embeddings=64,
                                                           truncate=False)),
    # GLM-4.5: 8 experts in 2 groups (a token uses the experts of its best group), a shared
    # expert, layer 0 dense, per-head q/k norms, half of each head turned, scaled weights
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=1,
                     first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, use_qk_norm=True,
                     attention_bias=True, head_dim=16),
    # DeepSeek-V2: DeepSeek-V3's latent attention (RoPE on adjacent pairs, as complex numbers), a
    # softmax router limited to the group of each token's best expert, scaled weights
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=1,
                        first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=2, topk_group=1,
                        routed_scaling_factor=2.5, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                        rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4,
                                             original_max_position_embeddings=64, mscale=0.707, mscale_all_dim=0.707,
                                             beta_fast=32.0, beta_slow=1.0)),
    # DeepSeek-V3: latent attention (queries through a rank-24 bottleneck, keys and values from a
    # rank-16 latent, values narrower than keys, interleaved RoPE, YaRN scaling the softmax), and
    # GLM-4.5's router, shared expert and dense first layer
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                        num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                        v_head_dim=12, rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4,
                                                            original_max_position_embeddings=64, mscale=1.0,
                                                            mscale_all_dim=1.0, beta_fast=32.0, beta_slow=1.0)),
    # Mistral Small 4: DeepSeek-V3's latent attention (RoPE over the rope part only: partial rotary)
    # with Ministral 3's query scale on an original context of 8, so that queries past position 8
    # are scaled (the released: 8192); its own router (softmax in the dtype, groups by their two
    # best scores, renormalized, scaled), a shared expert, layer 0 dense
    "mistral4": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=1,
                     first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                     norm_topk_prob=True, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
                     qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                     rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4,
                                          original_max_position_embeddings=8, mscale=1.0, mscale_all_dim=1.0,
                                          beta_fast=32.0, beta_slow=1.0, llama_4_scaling_beta=0.1,
                                          partial_rotary_factor=0.5)),
    # Llama 4: layers 0, 1 RoPE (chunks of 4 positions, L2-normed q/k), 2, 3 NoPE (queries scaled by
    # position from 3 on: floor_scale 4, the released 8192); 1, 3 sparse (2 of 4 experts, their
    # input weighted by the sigmoid of the top logits, and a shared expert), 0, 2 dense and wider
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48, intermediate_size_mlp=96,
                        num_hidden_layers=4, head_dim=16, no_rope_layers=[1, 1, 0, 0], interleave_moe_layer_step=2,
                        attention_chunk_size=4, floor_scale=4, attn_scale=0.5, rope_theta=1e4),
}


def reference_dir(path: Path) -> Path:
    """Where transformers' own model of a tiny model lives: the model itself, or for ChatGLM and
    Baichuan (remote-code checkpoints) its twin in transformers' layout (see make_tiny_model)."""
    twin = Path(str(path) + "-hf")
    return twin if twin.is_dir() else Path(path)


def make_tiny_model(path: Path, family: str = "llama", tokenizer_dir: Path | None = None,
                    seed: int = 0, **overrides) -> Path:
    """Build a random HF model of `family` (llama | mistral | ministral | ministral3 | qwen2 |
    qwen3 | gemma | gemma2 | gemma3_text | gemma3 | mistral3 (text_family: mistral or ministral3)
    | phi3 | smollm3 | glm | glm4 | granite | olmo2 | olmo3 | chatglm | baichuan | mixtral |
    qwen2_moe | qwen3_moe | olmoe | gpt_oss | glm4_moe | deepseek_v2 | deepseek_v3 | mistral4 | qwen3_5_text |
    qwen3_5_moe_text | qwen3_5 | qwen3_5_moe | qwen3_next), save it as safetensors
    (plus the tiny tokenizer when given) into `path`, and return `path`.

    chatglm and baichuan have no model class in transformers: their checkpoint is written in
    their own layout (names, fused projections, config keys) from a GLM / LLaMA model built by
    transformers, which is kept beside it (reference_dir) as the reference. The conversion is
    the one transformers' GLM conversion and vLLM's Baichuan loader apply, written here
    independently of mlora's naming.py. Baichuan 2 (vocab_size 125696) gets an un-normalized
    head in its file and the normalized one (its NormHead) in the reference."""
    if family in ("chatglm", "baichuan"):
        return _make_remote_code_model(Path(path), family, tokenizer_dir, seed, **overrides)
    # image-text: a vision tower beside a text model
    if family in ("gemma3", "gemma4", "mistral3", "qwen3_5", "qwen3_5_moe", "llama4"):
        return _make_image_text_model(Path(path), family, tokenizer_dir, seed, **overrides)
    import transformers

    cls_config, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "ministral": (transformers.MinistralConfig, transformers.MinistralForCausalLM),
        "ministral3": (transformers.Ministral3Config, transformers.Ministral3ForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "gemma4_text": (transformers.Gemma4TextConfig, transformers.Gemma4ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "smollm3": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM),
        "glm": (transformers.GlmConfig, transformers.GlmForCausalLM),
        "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM),
        "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM),
        "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM),
        "olmo3": (transformers.Olmo3Config, transformers.Olmo3ForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
        "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM),
        "glm4_moe": (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM),
        "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
        "qwen3_5_text": (transformers.Qwen3_5TextConfig, transformers.Qwen3_5ForCausalLM),
        "qwen3_5_moe_text": (transformers.Qwen3_5MoeTextConfig, transformers.Qwen3_5MoeForCausalLM),
        "qwen3_next": (transformers.Qwen3NextConfig, transformers.Qwen3NextForCausalLM),
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
        "mistral4": (transformers.Mistral4Config, transformers.Mistral4ForCausalLM),
        "llama4_text": (transformers.Llama4TextConfig, transformers.Llama4ForCausalLM),
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
    if family == "gemma4_text":  # a sliding layer of heads of 16, a full one of heads of 32 (with a quarter
        # turned), a logit cap that bites (the released: 30); no per-layer inputs, KV sharing or experts
        kwargs.update(head_dim=16, global_head_dim=32, sliding_window=4, final_logit_softcapping=3.0,
                      layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
                      vocab_size_per_layer_input=kwargs["vocab_size"])
    if family == "gemma2":  # caps that bite on tiny random weights (the real ones: 50 and 30)
        kwargs.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=4, attn_logit_softcapping=2.0,
                      final_logit_softcapping=3.0)
    if family in ("glm", "glm4"):  # their defaults are GLM-4-9B's head_dim 128
        kwargs.update(head_dim=16)
    if family == "granite":  # multipliers that bite (granite-3.x: 12, 0.22, 1/128, 8)
        kwargs.update(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
                      logits_scaling=2.5)
    if family == "ministral":  # a sliding layer 0 and a full layer 1 (its attention needs head_dim set)
        kwargs.update(head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    if family == "ministral3":  # its default head_dim is 128; YaRN on an original context of 8, so that
        # queries past position 8 get the position-dependent scale (the released: 16384)
        kwargs.update(head_dim=16, rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                                        original_max_position_embeddings=8, beta_fast=32.0,
                                                        beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                                        llama_4_scaling_beta=0.1))
    if family in ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"):
        # linear attention in layers 0, 1 and 3, full attention (its output gated) in layer 2; 2
        # key and 4 value heads of 16; RoPE on a quarter of each head (by default)
        kwargs.update(num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                      linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                      layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"])
    if family == "qwen3_5_moe_text":
        kwargs.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=80)
    if family == "qwen3_next":  # Qwen3.5's layers with fused linear-attention projections; layer 1's MLP dense
        # (mlp_only_layers), the others 2 of 4 experts and a gated shared expert, renormalized weights
        kwargs.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=80, mlp_only_layers=[1], norm_topk_prob=True)
    if family == "olmo3":  # a sliding layer 0, a full layer 1 (by default every 4th is full)
        kwargs.update(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    if family in MOE_TINY:
        kwargs.update(MOE_TINY[family])
    kwargs.update(overrides)
    config = cls_config(**kwargs)
    torch.manual_seed(seed)
    model = cls_model(config).eval()
    # HF's init (std 0.02) gives near-uniform logits; larger weights make parity tests sharper.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() in (2, 3):  # (transformers 5 stacks an MoE layer's experts: 3D)
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
            elif "sinks" in name:  # GPT-OSS's attention sinks: logits on the scale of the scores
                p.normal_(0.0, 1.0)
            elif "q_norm" in name or "k_norm" in name:  # Qwen3's / OLMo 2's q/k norms start at ones
                p.normal_(1.0, 0.2)
            if "norm" in name and (family.startswith("gemma") or family.startswith(("qwen3_5", "qwen3_next"))) and not (
                    "linear_attn.norm" in name or family == "gemma4_text"):  # (1 + w) norms: w starts at zeros
                p.normal_(0.0, 0.2)
            elif "norm" in name and family == "gemma4_text":  # (plain w, multiplied in fp32: bf16 tells)
                p.normal_(1.0, 0.2)
            elif name.endswith(("router.scale", "router.per_expert_scale")):  # Gemma 4's router: from ones,
                p.uniform_(0.5, 1.5) if "per_expert" in name else p.uniform_(4.0, 8.0)  # logits that differ
            elif "linear_attn.norm" in name:  # Qwen3.5's gated norm: plain w, from ones
                p.normal_(1.0, 0.2)
            elif name.endswith(("A_log", "dt_bias")):  # decay rates from slow to fast (exp(A_log) in 0.5 .. 4)
                p.uniform_(-0.7, 1.4) if name.endswith("A_log") else p.normal_(0.0, 0.5)
            elif ("layernorm" in name and family in ("glm4", "olmo2", "olmo3")  # a misplaced norm must show
                  or "norm" in name and family == "gpt_oss"):  # (GPT-OSS's norms scale in fp32: bf16 tells)
                p.normal_(1.0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # GLM-4.5's router: it must change the choice
                b.normal_(0.0, 0.1)
            elif name.endswith("layer_scalar"):  # Gemma 4: the stream's scale after each layer (stored)
                b.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return Path(path)


def _make_image_text_model(path: Path, family: str, tokenizer_dir: Path | None, seed: int,
                           text_family: str | None = None, **overrides) -> Path:
    """An image-text checkpoint: Gemma 3 4B/12B/27B's layout (Gemma3ForConditionalGeneration,
    a gemma3_text language model) or Mistral Small 3.x's / Ministral 3's
    (Mistral3ForConditionalGeneration, a mistral or ministral3 one: text_family). Its language
    model is built here, and saved with a two-layer vision tower."""
    import transformers
    from safetensors.torch import load_file, save_file

    text_family = text_family or {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "mistral3": "mistral",
                                  "qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text",
                                  "llama4": "llama4_text"}[family]
    text_dir = Path(str(path) + "-text")
    make_tiny_model(text_dir, text_family, tokenizer_dir, seed, **overrides)
    text_config = json.loads((text_dir / "config.json").read_text())
    tie = text_config.get("tie_word_embeddings", family == "gemma3")
    if family == "gemma3":
        config = transformers.Gemma3Config(
            text_config=text_config, mm_tokens_per_image=4, tie_word_embeddings=tie,
            vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                               image_size=28, patch_size=14))
        model = transformers.Gemma3ForConditionalGeneration
    elif family == "gemma4":  # (a vision tower, no audio)
        config = transformers.Gemma4Config(
            text_config=text_config, tie_word_embeddings=tie, audio_config=None,
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=2, head_dim=16))
        model = transformers.Gemma4ForConditionalGeneration
    elif family in ("qwen3_5", "qwen3_5_moe"):  # (its outer tie flag: False by default)
        moe = family == "qwen3_5_moe"
        config = (transformers.Qwen3_5MoeConfig if moe else transformers.Qwen3_5Config)(
            text_config=text_config, tie_word_embeddings=text_config.get("tie_word_embeddings", False),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14,
                               out_hidden_size=text_config["hidden_size"]))
        model = transformers.Qwen3_5MoeForConditionalGeneration if moe else transformers.Qwen3_5ForConditionalGeneration
    elif family == "llama4":  # (its language model's tensors: language_model.model.*, language_model.lm_head)
        config = transformers.Llama4Config(
            text_config=text_config, tie_word_embeddings=tie,
            vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                               projector_output_dim=32))
        model = transformers.Llama4ForConditionalGeneration
    else:  # (a Pixtral vision tower)
        config = transformers.Mistral3Config(
            text_config=text_config, tie_word_embeddings=tie,
            vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=2, head_dim=16, image_size=56, patch_size=14))
        model = transformers.Mistral3ForConditionalGeneration
    torch.manual_seed(seed)
    model(config).eval().save_pretrained(path, safe_serialization=True)
    # the language model's weights: the text model's, under the image-text model's names
    # (Qwen3.5's: model.language_model.layers..., lm_head unprefixed; the others' language_model.model...)
    qwen = family.startswith("qwen3_5") or family == "gemma4"  # (Gemma 4's: model.language_model. too)
    tensors = load_file(path / "model.safetensors")
    for name, value in load_file(text_dir / "model.safetensors").items():
        name = (name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name) if qwen \
            else "language_model." + name
        assert name in tensors, name
        tensors[name] = value
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    for extra in text_dir.iterdir():  # the tokenizer
        if extra.name not in ("config.json", "model.safetensors", "generation_config.json"):
            (path / extra.name).write_bytes(extra.read_bytes())
    return path


def load_reference(path: Path, dtype: torch.dtype = torch.float32):
    """transformers' own model of the tiny model in `path` (reference_dir), in eval mode. A
    Baichuan 13B (ALiBi) one runs as transformers' LlamaForCausalLM without RoPE (its rotary
    frequencies zeroed: cos 1, sin 0) and with an attention that adds ALiBi biases, whose
    slopes come from transformers' Bloom; like Baichuan's own code it adds slope * key
    position, where mlora adds slope * (key - query)."""
    from transformers import AutoModelForCausalLM

    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("model_type") == "mistral3":  # (no causal-LM class: the image-text model, on text)
        from transformers import Mistral3ForConditionalGeneration

        return Mistral3ForConditionalGeneration.from_pretrained(str(path), dtype=dtype).eval()
    if config.get("model_type") == "llama4":  # the image-text model's language model (transformers 5.24's
        # Llama4ForConditionalGeneration fails on text alone: its output has no image_outputs)
        from transformers import Llama4ForConditionalGeneration

        return Llama4ForConditionalGeneration.from_pretrained(str(path), dtype=dtype).language_model.eval()
    if config.get("model_type") == "mistral4":  # (transformers 5.24's AutoModelForCausalLM does not map it)
        from transformers import Mistral4ForCausalLM

        return Mistral4ForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    if config.get("position_embedding") != "alibi":
        # Gemma 2's soft-capped attention scores run only in the eager attention: transformers 5.17
        # picks SDPA for it, which drops the cap (5.24 no longer offers SDPA for Gemma 2)
        extra = {"attn_implementation": "eager"} if config.get("model_type") == "gemma2" else {}
        return AutoModelForCausalLM.from_pretrained(str(reference_dir(path)), dtype=dtype, **extra).eval()
    _register_alibi_attention()
    model = AutoModelForCausalLM.from_pretrained(str(reference_dir(path)), dtype=dtype,
                                                 attn_implementation="alibi_eager").eval()
    model.model.rotary_emb.inv_freq.zero_()
    model.model.rotary_emb.original_inv_freq.zero_()
    return model


def _register_alibi_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    def alibi_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        B, nh, S, D = query.shape
        T = key.shape[2]
        ones = torch.ones(1, T, device=query.device)
        alibi = build_alibi_tensor(ones, nh, torch.float32).view(1, nh, 1, T)  # slope * key position
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling + alibi.to(query.dtype)
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, :T]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs

    AttentionInterface.register("alibi_eager", alibi_eager)
    ALL_MASK_ATTENTION_FUNCTIONS.register("alibi_eager", eager_mask)


def _make_remote_code_model(path: Path, family: str, tokenizer_dir: Path | None, seed: int,
                            position_embedding: str = "rope", **overrides) -> Path:
    from safetensors.torch import load_file, save_file

    reference = Path(str(path) + "-hf")
    if family == "chatglm":
        overrides.setdefault("attention_bias", True)  # ChatGLM2/3's add_qkv_bias
        make_tiny_model(reference, "glm", tokenizer_dir, seed, **overrides)
    else:  # Baichuan: LLaMA without grouped K/V
        heads = overrides.get("num_attention_heads", TINY["num_attention_heads"])
        make_tiny_model(reference, "llama", tokenizer_dir, seed, **{"num_key_value_heads": heads, **overrides})
    hf = json.loads((reference / "config.json").read_text())
    weights = load_file(reference / "model.safetensors")
    layers = range(hf["num_hidden_layers"])
    qkv = {}
    for i in layers:
        p = f"model.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            parts = [weights.get(f"{p}{x}_proj.{kind}") for x in "qkv"]
            if parts[0] is not None:
                qkv[(i, kind)] = torch.cat(parts)  # [q_dim + 2 kv_dim, ...]: q, then k, then v
    if family == "chatglm":
        rope = hf.get("rope_parameters") or {}
        # ChatGLM2 scales the positions by rope_ratio (linear RoPE scaling), ChatGLM3 and GLM-4
        # the base; the loader tells them apart by the model's code, stood in for by one line
        if rope.get("rope_type") == "linear":
            rope_ratio, code = rope["factor"], "seq_idx = torch.arange(seq_len, dtype=torch.float) / self.rope_ratio"
        else:
            rope_ratio, code = rope.get("rope_theta", 10000.0) / 10000.0, "base = base * self.rope_ratio"
        if rope_ratio != 1:
            path.mkdir(parents=True, exist_ok=True)
            (path / "modeling_chatglm.py").write_text(f"# {family}'s RoPE, in short\n{code}\n")
        config = {
            "model_type": "chatglm", "architectures": ["ChatGLMModel"],
            "num_layers": hf["num_hidden_layers"], "hidden_size": hf["hidden_size"],
            "ffn_hidden_size": hf["intermediate_size"], "kv_channels": hf["head_dim"],
            "num_attention_heads": hf["num_attention_heads"], "multi_query_attention": True,
            "multi_query_group_num": hf["num_key_value_heads"], "padded_vocab_size": hf["vocab_size"],
            "layernorm_epsilon": hf["rms_norm_eps"], "rmsnorm": True, "post_layer_norm": True,
            "apply_residual_connection_post_layernorm": False, "add_bias_linear": False,
            "add_qkv_bias": hf["attention_bias"], "rope_ratio": rope_ratio,
            "seq_length": hf["max_position_embeddings"], "original_rope": True, "hidden_dropout": 0.0,
            "attention_dropout": 0.0, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32",
        }
        stored = {"transformer.embedding.word_embeddings.weight": weights["model.embed_tokens.weight"],
                  "transformer.encoder.final_layernorm.weight": weights["model.norm.weight"],
                  "transformer.output_layer.weight": weights["lm_head.weight"],
                  # real checkpoints carry it; mlora computes its own
                  "transformer.rotary_pos_emb.inv_freq": torch.zeros(hf["head_dim"] // 4)}
        for i in layers:
            src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
            for kind in ("weight", "bias"):
                if (i, kind) in qkv:
                    stored[f"{dst}self_attention.query_key_value.{kind}"] = qkv[(i, kind)]
            stored[f"{dst}self_attention.dense.weight"] = weights[f"{src}self_attn.o_proj.weight"]
            stored[f"{dst}mlp.dense_h_to_4h.weight"] = weights[f"{src}mlp.gate_up_proj.weight"]
            stored[f"{dst}mlp.dense_4h_to_h.weight"] = weights[f"{src}mlp.down_proj.weight"]
            for norm in ("input_layernorm", "post_attention_layernorm"):
                stored[f"{dst}{norm}.weight"] = weights[f"{src}{norm}.weight"]
    else:
        config = {k: hf[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "rms_norm_eps", "vocab_size", "max_position_embeddings", "hidden_act")}
        config.update(model_type="baichuan", architectures=["BaichuanForCausalLM"], tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, torch_dtype="float32")
        # said outright: by its size rule a tiny model would be taken for a 13B, ALiBi one
        config["position_embedding"] = position_embedding  # "alibi": the reference is load_reference's
        stored = {k: v for k, v in weights.items() if not any(f".{x}_proj." in k for x in "qkv")}
        for (i, kind), w in qkv.items():
            stored[f"model.layers.{i}.self_attn.W_pack.{kind}"] = w
        if hf["vocab_size"] == 125696:  # Baichuan 2: the reference computes with unit-length rows
            head = torch.nn.functional.normalize(weights["lm_head.weight"], dim=-1)
            save_file({**weights, "lm_head.weight": head}, reference / "model.safetensors", metadata={"format": "pt"})
            scales = torch.rand(head.shape[0], 1, generator=torch.Generator().manual_seed(seed)) + 0.5
            stored["lm_head.weight"] = head * scales
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in stored.items()}, path / "model.safetensors", metadata={"format": "pt"})
    for extra in reference.iterdir():  # the tokenizer, generation_config.json
        if extra.name not in ("config.json", "model.safetensors"):
            (path / extra.name).write_bytes(extra.read_bytes())
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer LLaMA (GQA 4/2) with the tiny tokenizer; shared read-only by many tests."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama", tokenizer_dir)


# ------------------------------------------------------------------ the pipeline tests' model
# Session-wide: five test modules use them, and only read them.

@pytest.fixture(scope="session")
def pipe_model(tmp_path_factory, tokenizer_dir):
    """A 4-layer LLaMA with tied embeddings, split into stages by the pipeline tests."""
    from test_pipeline import NUM_LAYERS

    return make_tiny_model(tmp_path_factory.mktemp("pipe_llama"), "llama", tokenizer_dir,
                           num_hidden_layers=NUM_LAYERS, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def single_runs(tmp_path_factory, pipe_model):
    """The single-process reference of test_pipeline.write_config's runs, by (adapters,
    save_step, eval_step): (its folder, config, output dir), each trained once."""
    from mlora.cli import main
    from test_pipeline import write_config

    cache = {}

    def get(num_adapters: int, save_step: int = 0, eval_step: int = 0):
        key = (num_adapters, save_step, eval_step)
        if key not in cache:
            tmp = tmp_path_factory.mktemp(f"single{num_adapters}_{save_step}_{eval_step}")
            cfg = write_config(tmp, num_adapters, tmp / "out", save_step, eval_step)
            assert main(["train", "--base_model", str(pipe_model), "--config", str(cfg), "--no_progress"]) == 0
            cache[key] = (tmp, cfg, tmp / "out")
        return cache[key]

    return get
