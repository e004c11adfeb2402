"""mlora's own decoder against transformers' reference implementations, on tiny random weights."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import GEMMA4_E2B, GEMMA4_MOE, load_reference, make_tiny_model
from mlora.errors import UserError
from mlora.loader import load_model, read_model_config
from mlora.models import SUPPORTED, family_for, llama

B, S = 3, 12
TOL = 1e-4

CASES = {
    "llama_gqa": ("llama", {}),  # 4 heads / 2 kv heads
    "llama_mqa": ("llama", dict(num_key_value_heads=1)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_head_dim": ("llama", dict(head_dim=32)),  # != hidden / heads = 16
    "llama_bias": ("llama", dict(attention_bias=True, mlp_bias=True)),  # o_proj biased too
    "qwen2_qkv_bias": ("qwen2", {}),
    "qwen2_sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "mistral_sliding": ("mistral", dict(sliding_window=4)),
    "qwen3_qk_norm": ("qwen3", dict(head_dim=32)),  # q/k heads normed before RoPE; head_dim != H / nh
    "qwen3_bias_sliding": ("qwen3", dict(attention_bias=True, use_sliding_window=True, sliding_window=4,
                                         max_window_layers=1)),  # o_proj biased too
    # sliding layer 0 with its own RoPE (theta 1e4), full layer 1 (theta 1e6), sandwich and
    # (1 + w) norms, q/k norms, scaled embedding, GELU, query_pre_attn_scalar 16 (not D)
    "gemma": ("gemma", {}),  # (1 + w) norms, scaled embedding, GELU; head_dim 16
    "gemma_legacy_gelu_mqa": ("gemma", dict(hidden_act="gelu", num_key_value_heads=1)),  # means tanh GELU
    # sliding layer 0, full layer 1; attention scores and logits soft-capped (caps 2 and 3)
    "gemma2": ("gemma2", {}),
    "gemma2_no_caps_mqa": ("gemma2", dict(attn_logit_softcapping=None, final_logit_softcapping=None,
                                          num_key_value_heads=1)),
    "gemma3": ("gemma3_text", {}),
    # Gemma 3 4B/12B/27B: an image-text checkpoint, its language model under another prefix
    "gemma3_image_text": ("gemma3", {}),
    "phi3": ("phi3", {}),  # fused qkv_proj (GQA 4/2) and gate_up_proj
    # layer 1 without RoPE (and windowed), biases on all four attention projections and the MLP
    "smollm3": ("smollm3", dict(no_rope_layers=[1, 0], use_sliding_window=True, sliding_window=4,
                                attention_bias=True, mlp_bias=True)),
    # transformers' eager/SDPA path windows a sliding layer whatever use_sliding_window says
    "smollm3_layer_types": ("smollm3", dict(layer_types=["full_attention", "sliding_attention"], sliding_window=4,
                                            use_sliding_window=False)),
    "phi3_partial_sliding": ("phi3", dict(partial_rotary_factor=0.5, sliding_window=4)),
    "gemma3_scaled_rope_bias": ("gemma3_text", dict(
        attention_bias=True, query_pre_attn_scalar=24, layer_types=["full_attention", "sliding_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                         "sliding_attention": dict(rope_type="default", rope_theta=1e4)})),
    # GLM-4: q/k/v biases, fused gate_up_proj, RoPE on adjacent pairs of the first half of each head
    "glm": ("glm", {}),
    "glm4": ("glm4", dict(num_key_value_heads=1)),  # GLM-4-0414: norms after both sublayers too
    # ChatGLM2/3, GLM-4 in their own layout (fused query_key_value), against GlmForCausalLM
    "chatglm": ("chatglm", {}),
    # ChatGLM3 / GLM-4's rope_ratio scales the base (here 50), ChatGLM2-32k's the positions (here 16)
    "chatglm_mqa_rope_ratio": ("chatglm", dict(num_key_value_heads=1, rope_parameters=dict(rope_theta=5e5))),
    "chatglm2_rope_ratio": ("chatglm", dict(rope_parameters=dict(rope_type="linear", factor=16.0, rope_theta=1e4))),
    "baichuan": ("baichuan", {}),  # W_pack, against LlamaForCausalLM
    "baichuan2_norm_head": ("baichuan", dict(vocab_size=125696)),  # Baichuan 2's normalized head
    # Baichuan 13B: ALiBi instead of RoPE; 6 heads: slopes of 4 heads, then every other of 8
    "baichuan_alibi": ("baichuan", dict(position_embedding="alibi", hidden_size=48, num_attention_heads=6)),
    "granite": ("granite", dict(attention_bias=True)),  # embedding, residual, attention and logit multipliers
    # OLMo 2: norms after each sublayer only, q/k norms over the whole projections, fp32 norm weights
    "olmo2": ("olmo2", {}),
    "olmo3": ("olmo3", {}),  # OLMo 2 with a sliding layer and a full one, each with its RoPE
    "olmo3_yarn": ("olmo3", dict(rope_parameters={  # YaRN on the full layers, not the sliding ones
        # (transformers reads `truncate` at the top level only: here it is ignored)
        "full_attention": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8, rope_theta=5e5,
                               truncate=False),
        "sliding_attention": dict(rope_type="default", rope_theta=1e4)})),
    "qwen2_yarn": ("qwen2", dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4,
                                                      original_max_position_embeddings=16))),
    "llama_yarn_mscale": ("llama", dict(rope_parameters=dict(  # DeepSeek's attention factor, no truncation
        rope_type="yarn", factor=8.0, rope_theta=1e4, original_max_position_embeddings=32, mscale=0.707,
        mscale_all_dim=0.8, beta_fast=16, beta_slow=2, truncate=False))),
    # Mixture of experts: 4 experts, 2 per token; Mixtral renormalizes the chosen probabilities
    # and weighs in fp32, its sparse MLP is block_sparse_moe with experts' w1/w3/w2
    "mixtral": ("mixtral", {}),
    "mixtral_sliding": ("mixtral", dict(sliding_window=4, num_experts_per_tok=1)),
    # Qwen2-MoE: q/k/v biases, a shared expert behind a sigmoid gate, layer 1 dense (mlp_only_layers)
    "qwen2_moe": ("qwen2_moe", dict(mlp_only_layers=[1])),
    # Qwen3-MoE: per-head q/k norms, renormalized top-k, every 2nd layer sparse (layer 0 dense)
    "qwen3_moe": ("qwen3_moe", dict(norm_topk_prob=True, decoder_sparse_step=2)),
    "olmoe": ("olmoe", {}),  # q/k norms over the whole projections, probabilities not renormalized
    # GPT-OSS: attention sinks, q/k/v/o biases, sliding and full layers, YaRN; a biased router
    # whose top-k logits get the softmax, biased experts with a clamped GLU over interleaved gate/up
    "gpt_oss": ("gpt_oss", {}),
    # GLM-4.5: a sigmoid router with a correction bias, groups of experts, scaled weights, an
    # ungated shared expert, a dense first layer, partial rotary, per-head q/k norms
    "glm4_moe": ("glm4_moe", {}),
    "deepseek_v3": ("deepseek_v3", {}),
    "deepseek_v2": ("deepseek_v2", {}),
    # Mistral Small 4: DeepSeek-V3's latent attention with queries scaled by position past the
    # original context (8 here) as Ministral 3's; its router (softmax in the dtype, 2 groups
    # ranked by their two best scores, renormalized and scaled); experts stacked in the checkpoint
    "mistral4": ("mistral4", {}),
    # queries straight from q_proj, RoPE on the two halves, one group, weights not renormalized,
    # no dense layer, two shared experts
    "mistral4_q_proj": ("mistral4", dict(q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1,
                                         norm_topk_prob=False, first_k_dense_replace=0, n_shared_experts=2)),
    # Ministral: a window on its sliding_attention layers only; Ministral 3: YaRN, and queries
    # scaled by position past the original context (8 here); both as Mistral 3 image-text models
    "ministral": ("ministral", {}),
    "ministral3": ("ministral3", {}),
    "ministral3_tied": ("ministral3", dict(tie_word_embeddings=True)),
    "mistral3": ("mistral3", dict(sliding_window=4)),
    "mistral3_ministral3": ("mistral3", dict(text_family="ministral3")),
    # Mistral Small 4's release: a Mistral 3 image-text model around a mistral4 one (experts stacked)
    "mistral3_mistral4": ("mistral3", dict(text_family="mistral4")),
    # Llama 4 (conftest's MOE_TINY: NoPE and RoPE layers, chunks of 4, queries scaled past position 2,
    # dense and sparse layers); without the scale, the q/k norm, with top 1 and chunks of 5 (left
    # padding compared in one batch: transformers counts chunks from a row's first real token too),
    # default NoPE layers (layer 3), listed sparse layers, a tied head, Scout's llama3 RoPE scaling (its low
    # and high frequency factors equal) on an original context of 8; the image-text checkpoint
    "llama4_text": ("llama4_text", {}),
    "llama4_plain": ("llama4_text", dict(attn_temperature_tuning=False, use_qk_norm=False, num_experts_per_tok=1,
                                         attention_chunk_size=5, no_rope_layers=[], moe_layers=[0, 2],
                                         tie_word_embeddings=True,
                                         rope_parameters=dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0,
                                                              high_freq_factor=1.0, rope_theta=1e4,
                                                              original_max_position_embeddings=8))),
    "llama4": ("llama4", {}),
    # Qwen3.5: Gated DeltaNet linear attention in layers 0, 1, 3 (GQA-like key heads, a causal
    # conv, decays, a gated norm), gated softmax attention in layer 2, (1 + w) norms, RoPE on a
    # quarter of each head; its MoE (a gated shared expert, renormalized weights); the
    # image-text checkpoints of both (model.language_model.*)
    # Gemma 4: plain-w norms in fp32, sandwich norms, a sliding layer (heads of 16, default RoPE)
    # and a full one (heads of 32, proportional RoPE over a quarter of each half), values normed
    # per head, attention unscaled, each layer's output scaled by a stored scalar, capped logits;
    # with attention_k_eq_v the full layer's values are its keys (one K/V head); the image-text model
    "gemma4_text": ("gemma4_text", {}),
    "gemma4_k_eq_v": ("gemma4_text", dict(attention_k_eq_v=True, num_global_key_value_heads=1)),
    "gemma4": ("gemma4", {}),
    # 12 layers (full ones at 5 and 11: transformers writes their sizes under keys "05", "11")
    "gemma4_12_layers": ("gemma4", dict(num_hidden_layers=12, layer_types=None, attention_k_eq_v=True,
                                        num_global_key_value_heads=1)),
    # Gemma 4 26B-A4B's form: 2 of 4 experts beside each layer's dense MLP (their router on the
    # stream, softmax in fp32, renormalized, times per_expert_scale; stacked in the checkpoint);
    # the image-text model with k_eq_v too
    "gemma4_moe": ("gemma4_text", GEMMA4_MOE),
    "gemma4_moe_image_text": ("gemma4", dict(GEMMA4_MOE, attention_k_eq_v=True, num_global_key_value_heads=1)),
    # E2B/E4B: per-layer inputs, KV-shared layers (from the last earlier layer of their kind), their
    # MLPs double-wide (conftest.GEMMA4_E2B); the image-text form, k_eq_v on the full layers too
    "gemma4_e2b": ("gemma4_text", GEMMA4_E2B),
    "gemma4_e2b_image_text": ("gemma4", dict(GEMMA4_E2B, attention_k_eq_v=True, num_global_key_value_heads=1)),
    "qwen3_5_text": ("qwen3_5_text", {}),
    "qwen3_5_moe_text": ("qwen3_5_moe_text", {}),
    "qwen3_5": ("qwen3_5", {}),
    "qwen3_5_moe": ("qwen3_5_moe", {}),
    # Qwen3-Next: Qwen3.5's layers with the linear attention's fused in_proj_qkvz and in_proj_ba
    # (laid out per key head), MoE layers beside a dense one (mlp_only_layers); without
    # renormalized weights, and every other layer sparse (decoder_sparse_step)
    "qwen3_next": ("qwen3_next", {}),
    "qwen3_next_sparse_step": ("qwen3_next", dict(mlp_only_layers=[], decoder_sparse_step=2, norm_topk_prob=False)),
    # DeepSeek-V2-Lite's: queries straight from q_proj, every expert open to every token (greedy),
    # two shared experts, no dense layer, plain RoPE
    "deepseek_v2_lite": ("deepseek_v2", dict(q_lora_rank=None, topk_method="greedy", n_group=None, topk_group=None,
                                             n_shared_experts=2, first_k_dense_replace=0, routed_scaling_factor=1.0,
                                             rope_parameters=dict(rope_type="default", rope_theta=1e4))),
    # queries straight from q_proj, RoPE on the two halves, no YaRN
    "deepseek_v3_q_proj": ("deepseek_v3", dict(q_lora_rank=None, rope_interleave=False,
                                               rope_parameters=dict(rope_type="default", rope_theta=1e4))),
    "glm4_moe_no_groups": ("glm4_moe", dict(n_group=1, topk_group=1, use_qk_norm=False, norm_topk_prob=False,
                                            n_shared_experts=0, first_k_dense_replace=0)),
    "gpt_oss_mqa_top1": ("gpt_oss", dict(num_key_value_heads=1, num_experts_per_tok=1,
                                         layer_types=["full_attention", "full_attention"])),
    "mistral_mqa_tied": ("mistral", dict(num_key_value_heads=1, tie_word_embeddings=True, sliding_window=None)),
    "rope_linear": ("llama", dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0))),
    # max_position_embeddings 8 < S: the NTK base grows
    "rope_dynamic": ("llama", dict(max_position_embeddings=8,
                                   rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0))),
    # wavelengths 6.3 .. 4e4 against a 64-token context cover the kept, smoothed and slowed bands
    "rope_llama3": ("llama", dict(rope_parameters=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0, rope_theta=10000.0,
                                                       original_max_position_embeddings=64))),
}


def _masks() -> dict[str, torch.Tensor | None]:
    right = torch.ones(B, S, dtype=torch.long)
    right[1, 9:] = 0
    right[2, 5:] = 0
    mixed = torch.ones(B, S, dtype=torch.long)
    mixed[1, 8:] = 0  # right padding
    mixed[2, :4] = 0  # left padding
    return {"none": None, "right": right, "mixed": mixed}


def _hf(path):
    return load_reference(path)


def _assert_close_on_real(ours, ref, mask):
    real = torch.ones(ours.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    diff = (ours - ref).abs()[real].max().item()
    assert diff < TOL, diff


def _compare(path, seq_lens=(S,)):
    ours = load_model(path, "cpu", torch.float32)
    ref = _hf(path)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for seq_len in seq_lens:
            ids = torch.randint(3, ours.args.vocab_size, (B, seq_len), generator=gen)
            for name, mask in _masks().items():
                mask = None if mask is None else mask[:, :seq_len]
                out = ours(ids, mask)
                assert out.shape == (B, seq_len, ours.args.vocab_size)
                assert torch.isfinite(out).all(), name  # pad rows too: no NaN from empty rows
                extra = {}
                if ours.args.query_scale_nope_only and mask is not None:
                    # Llama 4's NoPE layers scale queries by position, which transformers counts in
                    # columns (left padding shifts them) and mlora from a row's first real token
                    _assert_close_on_real(out, _each_row_alone(ref, ids, mask), mask)
                    continue
                if ours.args.query_scale_beta and mask is not None:
                    # Ministral 3's query scale counts a left-padded row's positions from its
                    # first real token, as transformers' generate does (its plain forward does not)
                    extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
                _assert_close_on_real(out, ref(input_ids=ids, attention_mask=mask, **extra).logits, mask)


def _each_row_alone(ref, ids, mask):
    """transformers' logits of each row's real tokens run alone, where they are in the row."""
    rows = []
    for r in range(ids.shape[0]):
        real = mask[r].bool()
        logits = ref(input_ids=ids[r:r + 1, real]).logits[0]
        rows.append(torch.zeros(ids.shape[1], logits.shape[-1]).index_copy(0, real.nonzero()[:, 0], logits))
    return torch.stack(rows)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    family, overrides = CASES[case]
    path = make_tiny_model(tmp_path, family, **overrides)
    # dynamic: also a short sequence after the long one (HF resets its cached frequencies)
    _compare(path, seq_lens=(S, 6) if case == "rope_dynamic" else (S,))


@pytest.mark.parametrize("case", ["llama_gqa", "qwen2_sliding", "mistral_sliding", "rope_llama3",
                                  "qwen3_bias_sliding", "gemma2", "gemma3", "phi3_partial_sliding", "smollm3",
                                  "glm4", "chatglm", "baichuan_alibi", "olmo3", "granite", "mixtral_sliding",
                                  "qwen2_moe", "gpt_oss", "glm4_moe", "deepseek_v3", "deepseek_v2_lite", "mistral4",
                                  "ministral", "mistral3_ministral3", "qwen3_5_text", "qwen3_5_moe", "gemma4_k_eq_v",
                                  "qwen3_next", "gemma4_moe", "gemma4_e2b", "llama4_text", "llama4_plain"])
def test_kv_cache_steps_equal_the_whole_sequence(case, tmp_path):
    """Generation's KV cache: a prefix, then one token at a time (and a chunk of two), gives
    every position the logits of one forward over the whole sequence, with left-padded rows
    (the pad keys hidden) and sliding windows that cut the cached keys."""
    family, overrides = CASES[case]
    model = load_model(make_tiny_model(tmp_path, family, **overrides), "cpu", torch.float32)
    ids = torch.randint(3, model.args.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[2, :6] = False
    with torch.no_grad():
        whole = model(ids, mask)  # [B, S, V]
        cache = llama.KVCache()
        pieces = [model(ids[:, :5], mask[:, :5], cache=cache)]
        for start, end in ((5, 6), (6, 8), *((t, t + 1) for t in range(8, S))):
            pieces.append(model(ids[:, start:end], mask[:, :end], cache=cache))
    # (Qwen3.5's linear-attention layers carry states instead of keys and values; Gemma 4's KV-shared
    # layers read their source layer's)
    linear = {i for i in range(model.args.num_layers) if model.args.is_linear(i)}
    shared = {i for i in range(model.args.num_layers) if model.args.kv_source(i) is not None}
    assert cache.length == S and (cache.layers.keys(), cache.states.keys()) == (
        set(range(model.args.num_layers)) - linear - shared, linear)
    _assert_close_on_real(torch.cat(pieces, dim=1), whole, mask)
    with torch.no_grad():  # last_only: the head on the last position alone
        last = model(ids, mask, cache=llama.KVCache(), last_only=True)
    assert last.shape == (B, 1, model.args.vocab_size)
    assert (last[:, 0] - whole[:, -1]).abs().max().item() < TOL
    with pytest.raises(ValueError):
        model(ids[:, :1], position_ids=torch.zeros(B, 1, dtype=torch.long), cache=cache)


# LongRoPE: short factors up to 8 tokens, long ones beyond, cos/sin scaled by
# sqrt(1 + ln(64 / 8) / ln(8)); a quarter of each head turns.
LONGROPE = dict(max_position_embeddings=64, original_max_position_embeddings=8, partial_rotary_factor=0.25,
                rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.5],
                                     long_factor=[2.0, 7.0]))


def test_longrope_chooses_its_factors_per_sequence(tmp_path):
    """Each sequence turns with the factors of its own length, as transformers turns it alone:
    rows of 12, 9 and 5 real tokens padded right or left to one batch, and packed rows
    holding a 12-token and a 5-token document; a short row beside a long one keeps its short
    factors (transformers would give every row of a batch its longest row's)."""
    from mlora.packing import pack_examples
    from test_packing import random_examples

    path = make_tiny_model(tmp_path, "phi3", **LONGROPE)
    ours, ref = load_model(path, "cpu", torch.float32), _hf(path)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, ours.args.vocab_size, (B, S), generator=gen)
    lengths = [12, 9, 5]
    with torch.no_grad():
        alone = [ref(input_ids=ids[r:r + 1, :n]).logits[0] for r, n in enumerate(lengths)]  # [n, V]
        right = torch.zeros(B, S, dtype=torch.long)
        left = torch.zeros(B, S, dtype=torch.long)
        for r, n in enumerate(lengths):
            right[r, :n] = 1
            left[r, S - n:] = 1
        out_right = ours(ids, right)
        left_ids = torch.stack([torch.cat([ids[r, n:], ids[r, :n]]) for r, n in enumerate(lengths)])  # real at the end
        out_left = ours(left_ids, left)
        for r, n in enumerate(lengths):
            assert (out_right[r, :n] - alone[r]).abs().max().item() < TOL
            assert (out_left[r, S - n:] - alone[r]).abs().max().item() < TOL  # positions shifted by the pads: rounding
        examples = random_examples(2, 1, lo=12, hi=12, vocab=ours.args.vocab_size)
        examples += random_examples(2, 2, lo=5, hi=5, vocab=ours.args.vocab_size)
        packed = pack_examples(examples, 17, 0)
        out = ours(packed.input_ids, None, position_ids=packed.position_ids,
                   document_ids=packed.document_ids)
        checked = 0
        for row in range(out.shape[0]):
            starts = (packed.position_ids[row] == 0).nonzero().flatten().tolist()
            for start in starts:
                match = [ex for ex in examples
                         if packed.input_ids[row, start:start + len(ex.input_ids)].tolist() == ex.input_ids]
                if not match:
                    continue  # padding
                n = len(match[0].input_ids)
                want = ref(input_ids=torch.tensor(match[0].input_ids)[None]).logits[0]
                assert (out[row, start:start + n] - want).abs().max().item() < TOL
                checked += 1
        assert checked == 4 and out.shape[0] == 2  # a long and a short document in each row


def test_older_rope_scaling_form(tmp_path):
    """A transformers-4 config.json: `rope_theta` + `rope_scaling` instead of `rope_parameters`."""
    path = make_tiny_model(tmp_path, "llama")
    cfg_file = path / "config.json"
    raw = json.loads(cfg_file.read_text())
    raw.pop("rope_parameters", None)
    raw.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0})
    cfg_file.write_text(json.dumps(raw))
    _, args = read_model_config(path)
    assert args.rope == llama.RopeArgs("linear", 500000.0, factor=4.0)
    assert llama.args_from_hf_config(raw) == args  # the plain-dict form reads the same
    _compare(path)


def test_sliding_windows_per_family(tmp_path):
    q = make_tiny_model(tmp_path / "q", "qwen2", num_hidden_layers=3, use_sliding_window=True,
                        sliding_window=4, max_window_layers=1)
    assert read_model_config(q)[1].sliding_window == [None, 4, 4]
    q_off = make_tiny_model(tmp_path / "q_off", "qwen2", sliding_window=4)  # use_sliding_window False
    assert read_model_config(q_off)[1].sliding_window == [None, None]
    m = make_tiny_model(tmp_path / "m", "mistral", sliding_window=5)
    assert read_model_config(m)[1].sliding_window == [5, 5]
    # Ministral: by layer_types, else every layer sliding (a window given) or full
    base = dict(model_type="ministral", vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    assert llama.args_from_hf_config(dict(base, sliding_window=6)).sliding_window == [6, 6]
    assert llama.args_from_hf_config(dict(base, sliding_window=None)).sliding_window == [None, None]
    assert llama.args_from_hf_config(base).sliding_window == [4096, 4096]  # MinistralConfig's default window
    # (transformers reads a mistral config.json that has layer_types as ministral)
    m = make_tiny_model(tmp_path / "m2", "mistral", sliding_window=5,
                        layer_types=["full_attention", "sliding_attention"])
    assert read_model_config(m)[1].sliding_window == [None, 5]


def test_qwen_sliding_layer_types_without_use_sliding_window_are_refused(tmp_path):
    """Qwen2Config/Qwen3Config keep sliding layer_types when use_sliding_window is false (the
    window nulled) and their models fail on it; mlora ran every layer with full attention."""
    import transformers

    sizes = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, sliding_window=4,
                 layer_types=["full_attention", "sliding_attention"])
    for config_class in (transformers.Qwen2Config, transformers.Qwen3Config):
        cfg = config_class(**sizes, use_sliding_window=False)
        assert cfg.layer_types == sizes["layer_types"] and cfg.sliding_window is None  # (not resolved by transformers)
        for form in (cfg, cfg.to_dict(), json.loads(cfg.to_json_string())):
            with pytest.raises(UserError) as err:
                llama.args_from_hf_config(form)
            assert str(err.value) == (f"{cfg.model_type} config layer_types lists sliding_attention layers but "
                                      "use_sliding_window is false")
        assert llama.args_from_hf_config(config_class(**sizes, use_sliding_window=True)).sliding_window == [None, 4]
        no_window = config_class(**dict(sizes, sliding_window=None), use_sliding_window=True)
        with pytest.raises(UserError, match="sliding_window is not set"):
            llama.args_from_hf_config(no_window)


def test_qwen_moe_sliding_layer_types_without_use_sliding_window_are_refused():
    """Qwen2MoeConfig and Qwen3MoeConfig, too, keep sliding layer_types when use_sliding_window is
    false (the window 0 or null), and their models fail on it as the cache or the mask is built;
    mlora ran every layer with full attention. Refused as Qwen2's and Qwen3's are."""
    import transformers

    sizes = dict(vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                 shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 num_experts=4, num_experts_per_tok=2, sliding_window=4,
                 layer_types=["sliding_attention", "full_attention"])
    for config_class, model_class, window in ((transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, 0),
                                              (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, None)):
        cfg = config_class(**sizes, use_sliding_window=False)
        assert cfg.layer_types == sizes["layer_types"] and cfg.sliding_window == window
        with pytest.raises((RuntimeError, TypeError)):  # (the premise: transformers' own model cannot run it)
            model_class(cfg).eval()(torch.tensor([list(range(8))]))
        for form in (cfg, cfg.to_dict(), json.loads(cfg.to_json_string())):
            with pytest.raises(UserError) as err:
                llama.args_from_hf_config(form)
            assert str(err.value) == (f"{cfg.model_type} config layer_types lists sliding_attention layers but "
                                      "use_sliding_window is false")
        full = config_class(**dict(sizes, layer_types=["full_attention"] * 2), use_sliding_window=False)
        assert llama.args_from_hf_config(full).sliding_window == [None, None]


def test_mistral3_and_ministral3_configs(tmp_path):
    """Mistral 3's image-text config: its language model's family (mistral or ministral3) and the
    outer tie flag; Ministral 3's query scale from its rope_parameters; refusals in one line."""
    text = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16)
    rope = dict(rope_type="yarn", rope_theta=1e6, factor=16.0, original_max_position_embeddings=16384,
                llama_4_scaling_beta=0.1)
    m3 = llama.args_from_hf_config(dict(model_type="mistral3", text_config=dict(text, model_type="ministral3",
                                                                                 rope_parameters=rope)))
    assert (m3.model_type, m3.query_scale_beta, m3.query_scale_period, m3.tie_word_embeddings) == (
        "mistral3", 0.1, 16384, True)  # (Mistral3Config ties by default, whatever text_config says)
    small = llama.args_from_hf_config(dict(model_type="mistral3", tie_word_embeddings=False, text_config=text))
    assert (small.query_scale_beta, small.tie_word_embeddings) == (0.0, False)  # text_config: mistral by default
    with pytest.raises(UserError, match="mistral3 config text_config model_type 'llama' is not supported"):
        llama.args_from_hf_config(dict(model_type="mistral3", text_config=dict(text, model_type="llama")))
    with pytest.raises(UserError, match="ministral3 config rope_parameters needs llama_4_scaling_beta"):
        llama.args_from_hf_config(dict(text, model_type="ministral3", rope_parameters=dict(rope_type="default",
                                                                                          rope_theta=1e6)))
    # Mistral Small 3.x's config.json (transformers 4's) has no tie_word_embeddings, and a head
    # of its own in the checkpoint: untied, as transformers keeps it
    path = make_tiny_model(tmp_path / "m3", "mistral3", tie_word_embeddings=False)
    config = json.loads((path / "config.json").read_text())
    config.pop("tie_word_embeddings")
    config["text_config"].pop("tie_word_embeddings", None)
    (path / "config.json").write_text(json.dumps(config))
    assert not read_model_config(path)[1].tie_word_embeddings
    ids = torch.randint(3, 400, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _assert_close_on_real(load_model(path, "cpu", torch.float32)(ids), _hf(path)(input_ids=ids).logits, None)
    del config["text_config"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="a mistral3 config needs its text_config"):
        read_model_config(path)


# gemma: scaled embedding, a RoPE per layer type; chatglm: its own tensor names
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3", "chatglm", "gemma3", "mixtral", "gpt_oss",
                                    "deepseek_v3", "ministral3", "qwen3_5", "gemma4", "gemma4_moe"])
def test_stage_split_equals_whole(tmp_path, family):
    overrides = {"tie_word_embeddings": False} if family != "llama" else {}
    if family == "gemma4_moe":  # (the image-text model with Gemma 4 26B-A4B's experts)
        family, overrides = "gemma4", dict(overrides, **GEMMA4_MOE)
    if family == "qwen3_5":  # (two layers: linear attention, then softmax attention)
        overrides.update(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    path = make_tiny_model(tmp_path, family, **overrides)
    whole = load_model(path, "cpu", torch.float32)
    first = load_model(path, "cpu", torch.float32, parts=["embed", "layer.0"])
    second = load_model(path, "cpu", torch.float32, parts=["layer.1", "norm", "head"])
    ids = torch.randint(3, 400, (B, S))
    mask = _masks()["mixed"]
    with torch.no_grad():
        hidden = first(ids, mask)
        assert hidden.shape == (B, S, 64)
        assert torch.equal(second(hidden, mask), whole(ids, mask))
    assert list(second.state_dict()) == [k for k in whole.state_dict() if "layers.0." not in k
                                         and "embed_tokens" not in k]


def test_dynamic_rope_generation_turns_a_left_padded_row_as_alone(tmp_path):
    """Dynamic NTK RoPE grows its base with the sequence, and generation's cached keys keep the
    rotation they were made with: past max_position_embeddings (8) a token's angle to its keys
    is no longer relative, so the positions and the length that pick the frequencies must be
    the row's own. A 5-token prompt left-padded beside a 9-token one, then 5 tokens one at a
    time through the KV cache, gives the logits of transformers' generate of that prompt alone
    (turned by the batch's columns and length, they were off by 0.08 here, by 2 and more in
    generations of 20 tokens)."""
    family, overrides = CASES["rope_dynamic"]
    path = make_tiny_model(tmp_path, family, **overrides)
    ours, ref = load_model(path, "cpu", torch.float32), _hf(path)
    gen = torch.Generator().manual_seed(4)
    prompt, other = torch.randint(3, 400, (1, 5), generator=gen), torch.randint(3, 400, (1, 14), generator=gen)
    with torch.no_grad():
        alone = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=2)
        want = torch.cat(alone.logits)  # [5, V]: the prompt's last position, then 4 steps (10 > 8 tokens)
        seq = alone.sequences  # [1, 10]
        ids = torch.cat([torch.cat([torch.full((1, 4), 2), seq], dim=1), other], dim=0)  # [2, 14]
        mask = torch.ones(2, 14, dtype=torch.bool)
        mask[0, :4] = False
        cache = llama.KVCache()
        got = [ours(ids[:, :9], mask[:, :9], cache=cache, last_only=True)]
        got += [ours(ids[:, t:t + 1], mask[:, :t + 1], cache=cache) for t in range(9, 13)]
    assert (torch.cat(got, dim=1)[0] - want).abs().max() < TOL


def test_ministral3_scales_queries_by_their_position_ids(tmp_path):
    """Ministral 3's query scale follows the RoPE positions given (packed rows restart them, a
    left-padded prompt may start them late): logits equal transformers' with the same
    position_ids, past the original context (8) and back below it."""
    path = make_tiny_model(tmp_path, "ministral3")
    ours, ref = load_model(path, "cpu", torch.float32), _hf(path)
    positions = torch.tensor([list(range(30, 30 + S)), list(range(6)) + list(range(6)), list(range(S))])
    ids = torch.randint(3, 400, (B, S), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ours(ids, position_ids=positions)
        _assert_close_on_real(out, ref(input_ids=ids, position_ids=positions).logits, None)
        assert (out - ours(ids)).abs().max() > 1e-3  # (the positions do change the logits)
        # a row left-padded by 9 (as a batch with a longer row pads it) equals the row alone,
        # its queries scaled by their own positions (as transformers' generate counts them)
        padded = torch.cat([torch.full((1, 9), 2), ids[:1]], dim=1)
        mask = torch.cat([torch.zeros(1, 9, dtype=torch.bool), torch.ones(1, S, dtype=torch.bool)], dim=1)
        alone = ours(ids[:1])
        assert (ours(padded, mask)[:, 9:] - alone).abs().max() < TOL
        cache = llama.KVCache()  # and so does generation's KV cache, step by step
        steps = [ours(padded[:, :12], mask[:, :12], cache=cache)] + [
            ours(padded[:, t:t + 1], mask[:, :t + 1], cache=cache) for t in range(12, 9 + S)]
        assert (torch.cat(steps, dim=1)[:, 9:] - alone).abs().max() < TOL


def test_qwen3_next_configs():
    """Qwen3-Next's config.json reads as transformers' Qwen3NextConfig reads it: its class's
    defaults for the keys a config.json leaves out (Qwen3-Next-80B-A3B's shape), the sparse
    layers by mlp_only_layers and decoder_sparse_step, renormalized weights by norm_topk_prob,
    the fused linear-attention projections; values transformers would fail on or mlora cannot
    build are one line naming the key."""
    import transformers

    from mlora.memory import linear_projection_shapes

    assert llama.args_from_hf_config(dict(model_type="qwen3_next")) == llama.args_from_hf_config(
        transformers.Qwen3NextConfig())
    released = llama.args_from_hf_config(dict(model_type="qwen3_next"))
    assert (released.num_experts, released.num_experts_per_tok, released.moe_intermediate_size,
            released.shared_expert_intermediate_size, released.norm_topk_prob, released.rotary_dim,
            released.tie_word_embeddings) == (512, 10, 512, 512, True, 64, False)
    assert released.layer_kinds == ["linear", "linear", "linear", "attention"] * 12 and all(released.moe_layers)
    assert linear_projection_shapes(released) == {"in_proj_qkvz": (2048, 2 * 2048 + 2 * 4096),
                                                  "in_proj_ba": (2048, 64), "out_proj": (4096, 2048)}
    tiny = dict(model_type="qwen3_next", vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=False, partial_rotary_factor=0.5)
    args = llama.args_from_hf_config(tiny)
    assert args == llama.args_from_hf_config(transformers.Qwen3NextConfig(**{k: v for k, v in tiny.items()
                                                                             if k != "model_type"}))
    assert (args.moe_layers, args.norm_topk_prob, args.rotary_dim, args.linear_fused_projections) == (
        [False, True, False, False], False, 8, True)
    for change, message in [(dict(decoder_sparse_step=0), "qwen3_next config decoder_sparse_step must be a positive"),
                            (dict(num_experts=0), "qwen3_next config num_experts must be a positive"),
                            (dict(layer_types=["linear_attention"] * 3), "qwen3_next config layer_types must list"),
                            (dict(linear_num_value_heads=3), r"qwen3_next config linear_num_value_heads \(3\) is not"),
                            (dict(linear_conv_kernel_dim=1),
                             "qwen3_next config linear_conv_kernel_dim must be at least")]:
        with pytest.raises(UserError, match=message):
            llama.args_from_hf_config(dict(tiny, **change))


def test_qwen3_5_configs_and_checkpoints(tmp_path, capsys):
    """Qwen3.5's layer kinds (by layer_types, else every 4th layer softmax attention), its
    linear attention's sizes and the image-text config's head (untied unless it says so);
    one-line refusals; the vision tower and the multi-token-prediction layer of a checkpoint
    are left unread without a warning."""
    from safetensors.torch import load_file, save_file

    from mlora.models.naming import naming_for

    text = dict(model_type="qwen3_5_text", vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=8,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4)
    args = llama.args_from_hf_config(text)
    assert args.layer_kinds == ["linear", "linear", "linear", "attention"] * 2 and args.attn_output_gate
    assert (args.rotary_dim, args.gemma_norms, args.embed_scale, args.qk_norm) == (4, True, False, True)
    wrapped = llama.args_from_hf_config(dict(model_type="qwen3_5", text_config=text))
    assert wrapped.model_type == "qwen3_5" and not wrapped.tie_word_embeddings
    # (the head is tied by text_config's flag, as transformers' causal LM of the checkpoint is)
    assert not llama.args_from_hf_config(dict(model_type="qwen3_5", text_config=text, tie_word_embeddings=True)
                                         ).tie_word_embeddings
    assert llama.args_from_hf_config(dict(model_type="qwen3_5", text_config=dict(text, tie_word_embeddings=True),
                                          tie_word_embeddings=False)).tie_word_embeddings
    for change, message in [(dict(layer_types=["linear_attention"] * 7), "qwen3_5 config layer_types must list"),
                            (dict(layer_types=["sliding_attention"] * 8), "qwen3_5 config layer_types must list"),
                            (dict(linear_num_value_heads=3), r"linear_num_value_heads \(3\) is not a multiple"),
                            (dict(linear_conv_kernel_dim=0), "linear_conv_kernel_dim must be a positive integer"),
                            (dict(linear_conv_kernel_dim=1), "linear_conv_kernel_dim must be at least 2")]:
        with pytest.raises(UserError, match=message):
            llama.args_from_hf_config(dict(text, **change))
    path = make_tiny_model(tmp_path / "q", "qwen3_5")
    tensors = load_file(path / "model.safetensors")
    assert any(name.startswith("model.visual.") for name in tensors)
    tensors["mtp.fc.weight"] = torch.zeros(4, 4)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    load_model(path, "cpu", torch.float32)
    assert "unused" not in capsys.readouterr().err
    # an adapter named as the image-text model names its modules reads as the text model's
    assert naming_for("qwen3_5").from_module("model.language_model.layers.3.linear_attn.out_proj") == (
        "model.layers.3.linear_attn.out_proj")
    # a tied one whose config.json says so in text_config only: tied, as transformers' causal LM is
    tied = make_tiny_model(tmp_path / "tied", "qwen3_5", tie_word_embeddings=True)
    config = json.loads((tied / "config.json").read_text())
    config.pop("tie_word_embeddings")
    (tied / "config.json").write_text(json.dumps(config))
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")
    assert read_model_config(tied)[1].tie_word_embeddings
    # and whatever the outer flag says: the logits are AutoModelForCausalLM's (which ties it too;
    # mlora refused the head as missing)
    config["tie_word_embeddings"] = False
    (tied / "config.json").write_text(json.dumps(config))
    ids = torch.randint(3, 400, (B, S), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _assert_close_on_real(load_model(tied, "cpu", torch.float32)(ids), _hf(tied)(input_ids=ids).logits, None)
    # untied by text_config while the outer flag ties: the head is missing (transformers would draw one)
    config["tie_word_embeddings"], config["text_config"]["tie_word_embeddings"] = True, False
    (tied / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="'lm_head.weight' is missing"):
        load_model(tied, "cpu", torch.float32)


def test_gemma4_configs():
    """Gemma 4's layer kinds (every 6th full by default, the last always), the full layers' head
    size and K/V heads in either config form (transformers 5.24's per_layer_config, the
    releases' global keys), their RoPEs, 26B-A4B's experts, E2B/E4B's per-layer inputs and KV
    sharing; missing or impossible expert counts and KV sharing refused in one line."""
    import transformers

    text = dict(model_type="gemma4_text", vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                hidden_size_per_layer_input=0, sliding_window=4)
    args = llama.args_from_hf_config(text)
    assert args.layer_kinds == ["attention"] * 5 + ["global_attention"] * 2  # (layer 6 is the last)
    assert args.sliding_window == [4] * 5 + [None] * 2 and args.head_dim_of(6) == 32 and args.kv_heads_of(6) == 2
    assert (args.rope.type, args.rope.partial, args.rope.dim, args.local_rope.dim) == ("proportional", 0.25, 32, 16)
    assert (args.attn_scale, args.v_norm, args.layer_scalar, args.embed_scale, args.gemma_norms) == (
        1.0, True, True, True, False)
    released = dict(text, attention_k_eq_v=True, num_global_key_value_heads=1, num_hidden_layers=12)
    config = transformers.Gemma4TextConfig(**{k: v for k, v in released.items() if k != "model_type"})
    assert "05" in config.to_dict()["per_layer_config"]  # (12 layers: keys zero-padded)
    for form in (released, config, json.loads(config.to_json_string())):  # (the last: per_layer_config)
        args = llama.args_from_hf_config(form)
        assert (args.global_head_dim, args.global_num_kv_heads, args.values_from_keys(11)) == (32, 1, True)
    wrapped = llama.args_from_hf_config(dict(model_type="gemma4", text_config=text))
    assert wrapped.model_type == "gemma4" and wrapped.tie_word_embeddings
    for change, message in [
            (dict(enable_moe_block=True), "gemma4_text config num_experts must be a positive integer, got None"),
            (dict(GEMMA4_MOE, top_k_experts=None), "gemma4_text config top_k_experts must be a positive integer"),
            (dict(GEMMA4_MOE, moe_intermediate_size=0), "gemma4_text config moe_intermediate_size must be a positive"),
            (dict(GEMMA4_MOE, top_k_experts=5), r"gemma4_text config top_k_experts \(5\) exceeds num_experts \(4\)"),
            (dict(hidden_size_per_layer_input=8, vocab_size_per_layer_input=399),
             r"vocab_size_per_layer_input \(399\) is smaller than vocab_size \(400\)"),
            (dict(num_kv_shared_layers=7), r"num_kv_shared_layers must be in 0\.\.6 .*got 7"),
            (dict(num_kv_shared_layers=3), r"num_kv_shared_layers \(3\) leaves no earlier full_attention layer"),
            (dict(use_bidirectional_attention="all"), "use_bidirectional_attention is not supported"),
            (dict(layer_types=["sliding_attention"] * 6), "gemma4_text config layer_types must list")]:
        with pytest.raises(UserError, match=message):
            llama.args_from_hf_config(dict(text, **change))
    bidirectional = llama.args_from_hf_config(dict(text, use_bidirectional_attention="vision"))
    assert bidirectional.layer_kinds[-1] == "global_attention"
    # 26B-A4B's experts beside every layer's dense MLP: read alike from a config.json and the config
    # class (whose dense form ignores the MoE keys); moe_layers all False (each layer's mlp is the dense one)
    moe = llama.args_from_hf_config(dict(text, **GEMMA4_MOE))
    assert moe == llama.args_from_hf_config(transformers.Gemma4TextConfig(
        **{k: v for k, v in dict(text, **GEMMA4_MOE).items() if k != "model_type"}))
    assert (moe.moe_beside_mlp, moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size, moe.is_moe) == (
        True, 4, 2, 48, False)
    assert not llama.args_from_hf_config(dict(text, num_experts=4, top_k_experts=2)).moe_beside_mlp
    # E2B/E4B: per-layer inputs; the last 3 layers (sliding 4 and 5, full 6: the last is always full)
    # attend to the keys and values of the last earlier layer of their kind (2, 3); their MLPs double-wide
    small = llama.args_from_hf_config(dict(text, hidden_size_per_layer_input=8, num_kv_shared_layers=3,
                                           use_double_wide_mlp=True, layer_types=["sliding_attention"] * 3
                                           + ["full_attention"] + ["sliding_attention"] * 3))
    assert (small.per_layer_input_size, small.per_layer_vocab_size) == (8, 262144)  # (Gemma4TextConfig's default)
    assert [small.kv_source(i) for i in range(7)] == [None] * 4 + [2, 2, 3]
    assert [small.mlp_size_of(i) for i in range(7)] == [96] * 4 + [192] * 3


def test_gemma4_kv_sharing_gradients_match_transformers(tmp_path):
    """Gemma 4 E2B/E4B: the gradients reach a source layer's k/v projections through the layers
    sharing its keys and values too (autograd through the shared keys), and the per-layer
    inputs' projection and gates: the weights' gradients equal transformers' (mixed padding)."""
    path = make_tiny_model(tmp_path, "gemma4_text", **GEMMA4_E2B)
    ours, ref = load_model(path, "cpu", torch.float32), _hf(path)
    names = ["model.layers.1.self_attn.k_proj.weight", "model.layers.2.self_attn.v_proj.weight",
             "model.per_layer_model_projection.weight", "model.layers.3.per_layer_input_gate.weight",
             "model.layers.4.mlp.up_proj.weight"]
    ids = torch.randint(3, ours.args.vocab_size, (B, S), generator=torch.Generator().manual_seed(2))
    mask = _masks()["mixed"]
    weights = torch.randn(B, S, ours.args.vocab_size, generator=torch.Generator().manual_seed(3))
    grads = []
    for model, run in ((ours, lambda: ours(ids, mask)), (ref, lambda: ref(input_ids=ids, attention_mask=mask).logits)):
        params = dict(model.named_parameters())
        for name in names:
            params[name].requires_grad_(True)
        ((run() * weights)[mask.bool()]).sum().backward()
        grads.append([params[name].grad for name in names])
    for name, a, b in zip(names, *grads):
        assert (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item()), name


def test_gemma4_kv_shared_layers_unused_tensors_are_no_warning(tmp_path, capsys):
    """A Gemma 4 checkpoint may store k/v projections and norms for its KV-shared layers, which
    transformers ignores: so does mlora, without a warning (another unused tensor still gets one)."""
    from safetensors.torch import load_file, save_file

    path = make_tiny_model(tmp_path, "gemma4", **GEMMA4_E2B)
    tensors = load_file(path / "model.safetensors")
    for m in ("k_proj", "v_proj", "k_norm", "v_norm"):
        tensors[f"model.language_model.layers.3.self_attn.{m}.weight"] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    load_model(path, "cpu", torch.float32)
    assert capsys.readouterr().err == ""
    tensors["model.language_model.layers.2.self_attn.k_proj.bias"] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    load_model(path, "cpu", torch.float32)
    assert "leaves tensor 'model.language_model.layers.2.self_attn.k_proj.bias'" in capsys.readouterr().err


def test_stage_split_tied_head_only(tmp_path):
    path = make_tiny_model(tmp_path, "llama", tie_word_embeddings=True)
    whole = load_model(path, "cpu", torch.float32)
    assert whole.lm_head.weight is whole.model.embed_tokens.weight
    stages = [load_model(path, "cpu", torch.float32, parts=p)
              for p in (["embed", "layer.0"], ["layer.1", "norm"], ["head"])]
    ids = torch.randint(3, 400, (B, S))
    mask = _masks()["right"]
    with torch.no_grad():
        h = ids
        for stage in stages:
            h = stage(h, mask)
        assert torch.equal(h, whole(ids, mask))


def test_module_sequence_and_tensor_names(tmp_path):
    path = make_tiny_model(tmp_path, "qwen2", tie_word_embeddings=True)
    _, args = read_model_config(path)
    assert llama.module_sequence(args) == ["embed", "layer.0", "layer.1", "norm", "head"]
    names = llama.tensor_names(args)
    assert names.count("model.embed_tokens.weight") == 1 and "lm_head.weight" not in names
    assert "model.layers.1.self_attn.k_proj.bias" in names and "model.layers.1.self_attn.o_proj.bias" not in names
    assert llama.tensor_names(args, ["head"]) == ["model.embed_tokens.weight"]
    with pytest.raises(ValueError):
        llama.CausalLM(args, ["embed", "layer.1"])  # not contiguous
    with pytest.raises(ValueError):
        llama.CausalLM(args, ["layer.7"])


def test_hf_names_and_plain_linears(tmp_path):
    path = make_tiny_model(tmp_path, "llama", attention_bias=True)
    ours = load_model(path, "cpu", torch.float32)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert set(ours.state_dict()) == set(f.keys())
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert type(getattr(ours.model.layers["0"].self_attn, name)) is torch.nn.Linear
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert type(getattr(ours.model.layers["1"].mlp, name)) is torch.nn.Linear


def test_config_errors():
    base = dict(model_type="llama", vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    assert llama.args_from_hf_config(base).head_dim == 16
    with pytest.raises(UserError, match="rope type 'mystery' is not supported"):
        llama.args_from_hf_config(dict(base, rope_parameters=dict(rope_type="mystery", factor=2.0, rope_theta=1e4)))
    # OLMo 3: a transformers-4 config.json's rope_theta goes to the full layers only, as Olmo3Config does
    import transformers

    olmo3 = dict(base, model_type="olmo3", sliding_window=4, rope_theta=1e4)
    assert llama.args_from_hf_config(olmo3) == llama.args_from_hf_config(transformers.Olmo3Config(**olmo3))
    olmo3_args = llama.args_from_hf_config(olmo3)
    assert (olmo3_args.rope.theta, olmo3_args.local_rope.theta) == (1e4, 5e5)
    yarn = llama.args_from_hf_config(dict(base, max_position_embeddings=4096,  # factor from the two lengths
                                          rope_parameters=dict(rope_type="yarn", rope_theta=1e4,
                                                               original_max_position_embeddings=1024)))
    assert (yarn.rope.factor, yarn.rope.attention_factor) == (4.0, pytest.approx(0.1 * math.log(4.0) + 1))
    with pytest.raises(UserError, match="gelu"):
        llama.args_from_hf_config(dict(base, hidden_act="gelu"))
    with pytest.raises(UserError, match="factor"):
        llama.args_from_hf_config(dict(base, rope_scaling=dict(type="linear")))
    with pytest.raises(UserError, match="gpt2.*llama"):
        family_for("gpt2")
    assert SUPPORTED == {"llama", "mistral", "ministral", "ministral3", "mistral3", "qwen2", "qwen3", "gemma",
                         "gemma2", "gemma3_text", "gemma3", "phi3", "smollm3", "glm", "glm4", "chatglm", "baichuan",
                         "granite", "olmo2", "olmo3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss",
                         "glm4_moe", "deepseek_v2", "deepseek_v3", "mistral4", "qwen3_5_text", "qwen3_5",
                         "qwen3_5_moe_text", "qwen3_5_moe", "gemma4_text", "gemma4", "qwen3_next", "llama4_text",
                         "llama4"}
    with pytest.raises(UserError, match="hidden_act 'relu'"):
        llama.args_from_hf_config(dict(base, model_type="gemma", hidden_act="relu"))
    assert llama.args_from_hf_config(dict(base, model_type="gemma", hidden_act="gelu")).hidden_act == "gelu_tanh"
    gemma = dict(base, model_type="gemma3_text", sliding_window=4)
    with pytest.raises(UserError, match="soft-capping is not supported for gemma3_text"):
        llama.args_from_hf_config(dict(gemma, attn_logit_softcapping=50.0))
    with pytest.raises(UserError, match="soft-capping is not supported for gemma3_text"):
        llama.args_from_hf_config(dict(gemma, final_logit_softcapping=30.0))
    gemma2 = llama.args_from_hf_config(dict(gemma, model_type="gemma2", num_hidden_layers=4, attn_logit_softcapping=50,
                                            final_logit_softcapping=30))
    assert gemma2.sliding_window == [4, None, 4, None] and gemma2.local_rope is None
    assert (gemma2.attn_softcap, gemma2.final_softcap, gemma2.norm_layout, gemma2.qk_norm) == (50.0, 30.0, "sandwich",
                                                                                                 False)
    with pytest.raises(UserError, match="use_bidirectional_attention"):
        llama.args_from_hf_config(dict(gemma, use_bidirectional_attention=True))
    with pytest.raises(UserError, match="hidden_activation 'gelu'"):
        llama.args_from_hf_config(dict(gemma, hidden_activation="gelu"))
    with pytest.raises(UserError, match="sliding_window is not set"):
        llama.args_from_hf_config(dict(gemma, sliding_window=None))
    with pytest.raises(UserError, match=r"layer_types \['chunked_attention'\] are not supported"):
        llama.args_from_hf_config(dict(gemma, layer_types=["chunked_attention", "full_attention"]))
    with pytest.raises(UserError, match="sliding_window is not set"):
        llama.args_from_hf_config(dict(base, model_type="smollm3", layer_types=["full_attention", "sliding_attention"]))
    with pytest.raises(UserError, match="layer_types has 1 entry but"):
        llama.args_from_hf_config(dict(base, model_type="qwen3", layer_types=["full_attention"]))
    # A transformers-4 config.json: rope_theta / rope_scaling for the full layers and
    # rope_local_base_freq for the sliding ones; every 6th layer full by default.
    old = llama.args_from_hf_config(dict(gemma, num_hidden_layers=7, rope_theta=5e5, rope_local_base_freq=2e4,
                                         rope_scaling=dict(rope_type="linear", factor=8.0)))
    assert old.sliding_window == [4, 4, 4, 4, 4, None, 4]
    assert old.rope == llama.RopeArgs("linear", 5e5, factor=8.0) and old.local_rope == llama.RopeArgs("default", 2e4)
    assert all(family_for(t) is llama for t in SUPPORTED)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text", "olmo2", "mixtral", "qwen3_moe", "glm4_moe",
                                    "gemma4_text", "gemma4_moe", "gemma4_e2b", "llama4_text"])
def test_rounds_as_transformers_in_bf16(tmp_path, family):
    """Gemma's bf16 roundings: sqrt(H) cast to the dtype (H = 72: not exact in bf16) and the
    norms' (1 + w) applied before the cast; OLMo 2's norms multiply by their weight before the
    cast; Mixtral weighs its experts' outputs in fp32, Qwen3-MoE in bf16. In bf16, mlora's
    logits equal transformers' (fp32 cannot tell either rounding apart; each one done LLaMA's
    way is off by about 0.05 here)."""
    extra = (dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"])
             if family in ("gemma3_text", "gemma4_text", "gemma4_moe") else dict(no_rope_layers=[1, 0, 0])
             if family == "llama4_text" else {})
    if family == "gemma4_moe":  # (its router's weights in fp32, each expert's output weighed so, summed once)
        family, extra = "gemma4_text", dict(extra, **GEMMA4_MOE)
    if family == "gemma4_e2b":  # (and the per-layer table's sqrt(8), cast to the dtype as the main one's)
        family, extra = "gemma4_text", dict(GEMMA4_E2B)
    extra.setdefault("num_hidden_layers", 3)
    path = make_tiny_model(tmp_path, family, hidden_size=72, **extra)
    ours = load_model(path, "cpu", torch.bfloat16)
    ref = load_reference(path, torch.bfloat16)
    ids = torch.randint(3, ours.args.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    # (Llama 4: RoPE in fp32, its query scale in fp32 then cast, its router's sigmoid in fp32; right
    # padding: transformers' query scale counts a left-padded row's columns)
    mask = _masks()["right" if family == "llama4_text" else "mixed"]
    with torch.no_grad():
        diff = (ours(ids, mask).float() - ref(input_ids=ids, attention_mask=mask).logits.float()).abs()
    assert diff[mask.bool()].max().item() < 0.01


# chatglm, baichuan: no config class in transformers; gemma3: its text_config is gemma3_text
@pytest.mark.parametrize("model_type", sorted(SUPPORTED - {"chatglm", "baichuan", "gemma3"}))
def test_a_config_json_without_defaults_reads_as_its_config_class(model_type):
    """A config.json leaves out values equal to its class's defaults, which differ by family
    (Gemma ties its head and has head_dim 256, Qwen3 head_dim 128): read as a plain dict, it
    gives the arguments the config object gives."""
    import transformers

    # (DeepseekV2Config has no default top k; Gemma4TextConfig's defaults are E2B's per-layer inputs)
    extra = {"deepseek_v2": {"num_experts_per_tok": 6}, "gemma4_text": {"hidden_size_per_layer_input": 0},
             "gemma4": {"text_config": {"hidden_size_per_layer_input": 0}}}.get(model_type, {})
    config = transformers.AutoConfig.for_model(model_type, **extra)
    # e.g. gemma-3-1b's config.json has neither of the first two
    dropped = ("tie_word_embeddings", "head_dim", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping")
    plain = {k: v for k, v in config.to_diff_dict().items() if k not in dropped}
    assert llama.args_from_hf_config(dict(plain, model_type=model_type)) == llama.args_from_hf_config(config)


def test_bf16_runs_close_to_fp32(tiny_llama):
    ids = torch.randint(3, 400, (2, 8))
    mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
    with torch.no_grad():
        ref = load_model(tiny_llama, "cpu", torch.float32)(ids, mask)
        out = load_model(tiny_llama, "cpu", torch.bfloat16)(ids, mask)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref)[mask.bool()].abs().max() < 0.1


CHATGLM = dict(model_type="chatglm", num_layers=2, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
               num_attention_heads=4, multi_query_attention=True, multi_query_group_num=2, padded_vocab_size=400,
               layernorm_epsilon=1e-5, rmsnorm=True, post_layer_norm=True, add_bias_linear=False, add_qkv_bias=True,
               apply_residual_connection_post_layernorm=False, seq_length=1024, rope_ratio=50,
               rope_ratio_scales="base")


def test_chatglm_and_baichuan_configs():
    """ChatGLM2/3 and Baichuan config.json keys (only their remote code reads them) as mlora
    reads them, and the variants it refuses in one line rather than compute something else."""
    args = llama.args_from_hf_config(CHATGLM)
    assert (args.num_layers, args.intermediate_size, args.num_kv_heads, args.head_dim, args.vocab_size) == (
        2, 96, 2, 16, 400)
    assert (args.rope.theta, args.rope.interleaved, args.rotary_dim, args.max_position_embeddings) == (
        5e5, True, 8, 1024)
    assert ((args.attention_bias, args.o_proj_bias, args.mlp_bias, args.tie_word_embeddings)
            == (True, False, False, False))
    assert (args.fused_qkv, args.fused_gate_up) == (True, True)
    biased = llama.args_from_hf_config(dict(CHATGLM, add_bias_linear=True))
    assert (biased.attention_bias, biased.o_proj_bias, biased.mlp_bias) == (True, True, True)
    # ChatGLM2-6b-32k divides the positions by rope_ratio: linear scaling of the base 10000
    positions = llama.args_from_hf_config(dict(CHATGLM, rope_ratio=16, rope_ratio_scales="positions"))
    assert positions.rope == llama.RopeArgs("linear", 1e4, factor=16.0, interleaved=True)
    with pytest.raises(UserError, match='rope_ratio is 16.*"rope_ratio_scales"'):  # which one, unknown
        llama.args_from_hf_config({k: v for k, v in dict(CHATGLM, rope_ratio=16).items() if k != "rope_ratio_scales"})
    assert llama.args_from_hf_config(dict(CHATGLM, rope_ratio=1, rope_ratio_scales=None)).rope.theta == 1e4
    # keys a config.json leaves out take ChatGLMConfig's defaults (one K/V group, 128 per head)
    sparse = llama.args_from_hf_config({k: v for k, v in CHATGLM.items() if k not in ("multi_query_group_num",
                                                                                      "kv_channels")})
    assert (sparse.num_kv_heads, sparse.head_dim) == (1, 128)
    chatglm1 = dict(model_type="chatglm", num_layers=28, hidden_size=4096, inner_hidden_size=16384,
                    num_attention_heads=32, vocab_size=130528, position_encoding_2d=True)
    with pytest.raises(UserError, match="first ChatGLM"):
        llama.args_from_hf_config(chatglm1)
    for key, value, match in (("rmsnorm", False, "LayerNorm"), ("post_layer_norm", False, "final norm"),
                              ("apply_residual_connection_post_layernorm", True, "after the norm"),
                              ("multi_query_attention", False, "per head"),  # [q k v] per head, not [Q K V]
                              ("pre_seq_len", 128, "P-tuning"), ("quantization_bit", 4, "quantized checkpoints"),
                              ("vision_config", {"hidden_size": 8}, "GLM-4V"),
                              ("num_layers", 0, "num_layers must be a positive integer, got 0"),
                              ("padded_vocab_size", [400], "padded_vocab_size must be a positive integer"),
                              ("multi_query_group_num", 0, "multi_query_group_num must be"),
                              ("rope_ratio", 0, "rope_ratio must be a positive number, got 0"),
                              ("layernorm_epsilon", "1e-5", "layernorm_epsilon must be a positive number")):
        with pytest.raises(UserError, match=match):
            llama.args_from_hf_config(dict(CHATGLM, **{key: value}))

    baichuan = dict(model_type="baichuan", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, vocab_size=64000, model_max_length=4096, rms_norm_eps=1e-6,
                    position_embedding="rope")
    args = llama.args_from_hf_config(baichuan)
    assert (args.fused_qkv, args.fused_gate_up, args.num_kv_heads, args.normalized_head) == (True, False, 4, False)
    assert args.max_position_embeddings == 4096 and not args.rope.interleaved
    baichuan2 = llama.args_from_hf_config(dict(baichuan, vocab_size=125696))  # its head normalized, RoPE in fp32
    assert baichuan2.normalized_head and baichuan2.rope_fp32
    assert not llama.args_from_hf_config(dict(baichuan, position_embedding="alibi", vocab_size=125696)).rope_fp32
    assert not llama.args_from_hf_config(dict(baichuan, rope_fp32=True)).rope_fp32  # Baichuan 1
    assert not llama.args_from_hf_config(dict(baichuan, vocab_size=125696, normalized_head=False)).normalized_head
    # as vLLM decides: hidden_size 4096 (the 7B models) RoPE, the others (13B: 5120) ALiBi, in
    # which no layer turns q and k
    by_size = {k: v for k, v in baichuan.items() if k != "position_embedding"}
    for config in (dict(by_size, hidden_size=5120, num_attention_heads=40), by_size,
                   dict(baichuan, position_embedding="alibi")):
        alibi = llama.args_from_hf_config(config)
        assert alibi.alibi and alibi.rope_layers == [False, False]
    for config in (dict(by_size, hidden_size=4096), dict(baichuan, hidden_size=5120, position_embedding="rope")):
        rope = llama.args_from_hf_config(config)
        assert not rope.alibi and rope.rope_layers == [True, True]
    # Baichuan's code fixes the RoPE base, head_dim and K/V heads, whatever its config says
    fixed = llama.args_from_hf_config(dict(baichuan, rope_theta=5e5, head_dim=8, num_key_value_heads=2,
                                           rope_scaling=dict(type="linear", factor=2.0)))
    assert (fixed.rope, fixed.head_dim, fixed.num_kv_heads) == (llama.RopeArgs(), 16, 4)
    for key, value, match in (("z_loss_weight", 0.1, "z-loss"), ("vocab_size", None, "vocab_size must be"),
                              ("num_attention_heads", 0, "num_attention_heads must be")):
        with pytest.raises(UserError, match=match):
            llama.args_from_hf_config(dict(baichuan, **{key: value}))
    assert llama.args_from_hf_config(dict(baichuan, z_loss_weight=0)).vocab_size == 64000
    with pytest.raises(UserError, match="position_embedding 'nope'"):
        llama.args_from_hf_config(dict(baichuan, position_embedding="nope"))
    assert not llama.args_from_hf_config(dict(CHATGLM, alibi=True)).alibi  # only Baichuan's reader sets it


def test_checkpoint_names_of_chatglm_and_baichuan(tmp_path):
    """A stage of a ChatGLM checkpoint reads its own tensors under ChatGLM's names; the
    translation goes both ways and leaves LLaMA-named checkpoints alone."""
    from mlora.models.naming import Naming, naming_for

    path = make_tiny_model(tmp_path / "glm", "chatglm")
    stage = load_model(path, "cpu", torch.float32, parts=["layer.1", "norm", "head"])
    assert stage.loaded_tensor_names == sorted([
        "transformer.encoder.final_layernorm.weight", "transformer.output_layer.weight",
        *(f"transformer.encoder.layers.1.{n}" for n in (
            "input_layernorm.weight", "post_attention_layernorm.weight", "self_attention.query_key_value.weight",
            "self_attention.query_key_value.bias", "self_attention.dense.weight", "mlp.dense_h_to_4h.weight",
            "mlp.dense_4h_to_h.weight"))])
    chatglm, baichuan = naming_for("chatglm"), naming_for("baichuan")
    for name in llama.tensor_names(stage.args):
        assert chatglm.from_checkpoint(chatglm.to_checkpoint(name)) == name
    assert chatglm.to_checkpoint("model.layers.10.mlp.down_proj") == "transformer.encoder.layers.10.mlp.dense_4h_to_h"
    assert (baichuan.to_checkpoint("model.layers.3.self_attn.qkv_proj.weight")
            == "model.layers.3.self_attn.W_pack.weight")
    assert baichuan.to_checkpoint("model.layers.3.self_attn.o_proj.weight") == "model.layers.3.self_attn.o_proj.weight"
    assert (chatglm.leaf("qkv_proj"), chatglm.leaf("o_proj"), baichuan.leaf("qkv_proj"), baichuan.leaf("o_proj")) == (
        "query_key_value", "dense", "W_pack", "o_proj")
    assert naming_for("llama") == Naming() and Naming().to_checkpoint("lm_head.weight") == "lm_head.weight"
    (path / "model.safetensors").rename(tmp_path / "elsewhere")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "elsewhere")
    del tensors["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(UserError, match="'transformer.encoder.layers.0.mlp.dense_4h_to_h.weight' is missing"):
        load_model(path, "cpu", torch.float32)


def test_alibi_slopes_and_bias():
    """ALiBi's slopes are Bloom's (transformers' build_alibi_tensor), for any head count
    (Baichuan 13B has 40); the bias is slope * (k - q) where a key is visible and -inf elsewhere,
    laid out with rows padded to 16 elements so SDPA's memory-efficient kernel takes it as it is
    (not a padded copy per layer)."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    from mlora.models.alibi import alibi_bias, alibi_slopes

    for heads in (1, 2, 5, 6, 8, 12, 40, 64):
        bloom = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1]  # slope * position 1
        assert torch.tensor(alibi_slopes(heads)) == pytest.approx(bloom, rel=1e-6), heads
    bias = alibi_bias(2, None, 0, 3, torch.device("cpu"), torch.float32)  # [1, 2, 3, 3]
    s = alibi_slopes(2)
    inf = float("-inf")
    assert bias.tolist() == [[[[0.0, inf, inf], [-s[0], 0.0, inf], [-2 * s[0], -s[0], 0.0]],
                              [[0.0, inf, inf], [-s[1], 0.0, inf], [-2 * s[1], -s[1], 0.0]]]]
    assert bias.stride(-2) % 16 == 0
    # two new queries after three cached keys, the first key hidden (left padding)
    allowed = torch.tensor([[False, True, True, True, False], [False, True, True, True, True]])[None, None]
    cached = alibi_bias(2, allowed, 3, 2, torch.device("cpu"), torch.bfloat16)  # [1, 2, 2, 5]
    assert cached.dtype == torch.bfloat16 and cached.shape == (1, 2, 2, 5)
    assert cached[0, 1, 1].tolist() == [inf, *(torch.tensor([-3.0, -2.0, -1.0, 0.0]) * s[1]).bfloat16().tolist()]


def test_mistral_small_4_release_layout_loads(tmp_path, capsys):
    """Mistral Small 4's release: a Mistral 3 image-text checkpoint whose tensors are named as
    transformers 5 holds them (`model.language_model.*`, `lm_head`), experts stacked, loads to the
    model of the `language_model.model.*` checkpoint and gives transformers' logits."""
    from conftest import load_reference
    from test_moe import _stacked_checkpoint

    base = make_tiny_model(tmp_path / "m", "mistral3", text_family="mistral4")
    native = _stacked_checkpoint(base, tmp_path / "native")
    capsys.readouterr()
    ours = load_model(native, "cpu", torch.float32)
    assert "unused" not in capsys.readouterr().err
    assert any(n.startswith("model.language_model.layers.") and n.endswith(".mlp.experts.gate_up_proj")
               for n in ours.loaded_tensor_names)
    state = load_model(base, "cpu", torch.float32).state_dict()
    assert all(torch.equal(t, state[n]) for n, t in ours.state_dict().items())
    ids = torch.randint(3, ours.args.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, S, dtype=torch.bool)
    with torch.no_grad():
        _assert_close_on_real(ours(ids, mask), load_reference(native)(input_ids=ids, attention_mask=mask).logits, mask)


def test_llama4_configs():
    """Llama 4's config.json reads as Llama4TextConfig does (its defaults: every 4th layer NoPE,
    the RoPE layers chunked, every layer sparse; layer_types as listed; no chunks without
    attention_chunk_size), and a bad key is one line naming it."""
    base = dict(model_type="llama4_text", vocab_size=400, hidden_size=64, intermediate_size=48,
                intermediate_size_mlp=96, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, num_local_experts=4)
    args = llama.args_from_hf_config(base)
    assert args.rope_layers == [True, True, True, False] * 2 and args.moe_layers == [True] * 8
    assert args.attention_chunk == [8192, 8192, 8192, None] * 2 and args.qk_l2_norm and args.rope.interleaved
    assert (args.intermediate_size, args.moe_intermediate_size, args.shared_expert_intermediate_size) == (96, 48, 48)
    assert (args.query_scale_beta, args.query_scale_period, args.rope.theta, args.num_experts_per_tok) == (
        0.1, 8192, 500_000.0, 1)
    assert [args.query_scaled(i) for i in range(4)] == [False, False, False, True]
    maverick = llama.args_from_hf_config(dict(base, interleave_moe_layer_step=2, attention_chunk_size=None,
                                              use_qk_norm=False, attn_temperature_tuning=False))
    assert maverick.moe_layers == [False, True] * 4 and maverick.attention_chunk == [None] * 8
    assert not maverick.qk_l2_norm and not any(maverick.query_scaled(i) for i in range(8))
    # (attn_scale 0, which transformers takes: every scale 1, as without tuning)
    assert not any(llama.args_from_hf_config(dict(base, attn_scale=0.0)).query_scaled(i) for i in range(8))
    listed = llama.args_from_hf_config(dict(base, moe_layers=[0, 5], no_rope_layers=[0, 1] * 4,
                                            layer_types=["full_attention"] * 7 + ["chunked_attention"]))
    assert listed.moe_layers == [i in (0, 5) for i in range(8)] and listed.rope_layers == [False, True] * 4
    assert listed.attention_chunk == [None] * 7 + [8192]
    image_text = llama.args_from_hf_config(dict(model_type="llama4", text_config=base))
    assert image_text.model_type == "llama4" and not image_text.tie_word_embeddings
    # (its head is its language_model's, a Llama4ForCausalLM of text_config, tied by that config's flag alone)
    assert not llama.args_from_hf_config(dict(model_type="llama4", tie_word_embeddings=True,
                                              text_config=base)).tie_word_embeddings
    assert llama.args_from_hf_config(dict(model_type="llama4", tie_word_embeddings=False,
                                          text_config=dict(base, tie_word_embeddings=True))).tie_word_embeddings
    for bad, message in [(dict(no_rope_layers=[1, 0]), r"no_rope_layers must hold a 0 or 1 for every layer \(8 "
                                                       r"layers\)"),
                         (dict(no_rope_layers=[2] * 8), "no_rope_layers must hold"),
                         (dict(layer_types=["sliding_attention"] * 8), "layer_types must list full_attention or "
                                                                      "chunked_attention"),
                         (dict(attention_chunk_size=0), "attention_chunk_size must be a positive integer"),
                         (dict(layer_types=["chunked_attention"] * 8, attention_chunk_size=None),
                          "attention_chunk_size must be a positive integer"),
                         (dict(floor_scale=0), "llama4_text config floor_scale"),
                         (dict(attn_scale=-1.0), "llama4_text config attn_scale"),
                         (dict(interleave_moe_layer_step=0), "interleave_moe_layer_step"),
                         (dict(moe_layers=[8]), "moe_layers must list layer indices below 8"),
                         (dict(num_experts_per_tok=5), r"num_experts_per_tok \(5\) exceeds"),
                         (dict(intermediate_size=0), "llama4_text config intermediate_size"),
                         (dict(intermediate_size_mlp=None), "llama4_text config intermediate_size_mlp"),
                         (dict(hidden_act="gelu"), "hidden_act 'gelu'")]:
        with pytest.raises(UserError, match=message):
            llama.args_from_hf_config(dict(base, **bad))
    with pytest.raises(UserError, match="text_config model_type 'llama' is not supported"):
        llama.args_from_hf_config(dict(model_type="llama4", text_config=dict(base, model_type="llama")))


def test_llama4_image_text_head_is_tied_by_its_text_config(tmp_path):
    """Llama4ForConditionalGeneration's head is its language model's, which ties by text_config's
    tie_word_embeddings, not the outer one: an outer true over a text_config false keeps the
    stored head (transformers' logits), not the embedding."""
    path = make_tiny_model(tmp_path / "m", "llama4")
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"], config["text_config"]["tie_word_embeddings"] = True, False
    (path / "config.json").write_text(json.dumps(config))
    ours = load_model(path, "cpu", torch.float32)
    assert not ours.args.tie_word_embeddings
    ids = torch.randint(3, ours.args.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _assert_close_on_real(ours(ids), _hf(path)(input_ids=ids).logits, None)


def test_a_tied_config_over_a_different_stored_head_keeps_the_head(tmp_path, capsys):
    """config.json says tie_word_embeddings, but the checkpoint stores a head that differs from
    its embedding: transformers 5 keeps both untied (with a warning), so mlora does too and says
    so on stderr, instead of silently dropping the stored head. A stored head equal to the
    embedding (a tied model saved with both) stays tied."""
    path = make_tiny_model(tmp_path / "m", "llama")
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(config))
    ours = load_model(path, "cpu", torch.float32)
    assert not ours.args.tie_word_embeddings
    assert "stores a different lm_head.weight: kept untied" in capsys.readouterr().err
    ids = torch.randint(3, ours.args.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _assert_close_on_real(ours(ids), _hf(path)(input_ids=ids).logits, None)

    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert load_model(path, "cpu", torch.float32).args.tie_word_embeddings
    assert "kept untied" not in capsys.readouterr().err


def test_llama4_query_scale_is_transformers_formula_bit_for_bit():
    """Llama 4's NoPE layers' query scale, log1p(floor((position + 1) / floor_scale)) * attn_scale + 1
    in fp32 as Llama4TextAttention computes it: log(1 + x) is one ulp off log1p(x) for some x, which
    survives the scale's rounding (floor values 178, 401, ...: positions past 1.4M at floor_scale 8192)."""
    args = llama.args_from_hf_config(dict(model_type="llama4_text", vocab_size=400, hidden_size=64,
                                          intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          num_local_experts=4, floor_scale=1, attn_scale=0.1))
    model = llama.CausalLM(args)
    positions = torch.arange(2000)
    expected = torch.log1p(torch.floor((positions.float() + 1.0) / 1)) * 0.1 + 1.0
    assert torch.equal(model.query_scale(torch.zeros(1, 2000, 64), 0, None, None)[:, 0], expected)
    assert torch.equal(model.query_scale(torch.zeros(1, 1000, 64), 1000, None, None)[:, 0], expected[1000:])


@pytest.mark.parametrize("key", ["no_rope_layer_interval", "interleave_moe_layer_step"])
def test_llama4_zero_intervals_are_one_line_naming_the_key(tmp_path, key):
    """Llama4TextConfig takes a modulo by no_rope_layer_interval (even beside a listed no_rope_layers)
    and a range step of interleave_moe_layer_step (without moe_layers): a 0 fails there with an error
    that names no key; mlora names it first."""
    from mlora.loader import read_model_config

    config = dict(model_type="llama4_text", vocab_size=400, hidden_size=64, intermediate_size=48,
                  intermediate_size_mlp=96, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, num_local_experts=4, no_rope_layers=[1] * 8, **{key: 0})
    for raw in (config, dict(model_type="llama4", text_config=config)):
        (tmp_path / "config.json").write_text(json.dumps(raw))
        with pytest.raises(UserError, match=f"{key} must be an integer >= 1, got 0"):
            read_model_config(tmp_path)
