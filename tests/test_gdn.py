"""Qwen3.5's Gated DeltaNet (models/gdn.py) against transformers' Qwen3_5GatedDeltaNet.

One tiny layer (hidden 64, 2 key heads and 4 value heads of 16, a 4-tap conv) with every
parameter drawn at random, copied into mlora's module by name: the outputs in fp32 and bf16,
over several 64-token chunks, left and right padding, packed rows (each document as if alone,
where transformers lets the state run on), cached decoding, and the gradients of the input,
of every parameter and of the four input projections' outputs.
"""

from __future__ import annotations

import pytest
import torch

from mlora.models.args import ModelArgs
from mlora.models.gdn import GatedDeltaNet, LinearMixerInputs, linear_tensor_names
from mlora.models.llama import KVCache

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet  # noqa: E402

H, HK, HV, DK, DV, K = 64, 2, 4, 16, 16, 4
PROJECTIONS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")


def _args() -> ModelArgs:
    return ModelArgs(model_type="qwen3_5_text", vocab_size=128, hidden_size=H, intermediate_size=96, num_layers=1,
                     num_heads=4, num_kv_heads=2, head_dim=16, layer_kinds=["linear"], linear_num_key_heads=HK,
                     linear_num_value_heads=HV, linear_key_head_dim=DK, linear_value_head_dim=DV,
                     linear_conv_kernel=K)


def _pair(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.nn.Module, GatedDeltaNet]:
    """transformers' layer with random parameters, and mlora's with the same ones."""
    config = transformers.Qwen3_5TextConfig(
        vocab_size=128, hidden_size=H, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=HK, linear_num_value_heads=HV,
        linear_key_head_dim=DK, linear_value_head_dim=DV, linear_conv_kernel_dim=K, layer_types=["linear_attention"])
    ref = Qwen3_5GatedDeltaNet(config, 0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name == "A_log":  # decays exp(g) from about 0.2 to 0.95 per token
                p.copy_(torch.rand(p.shape, generator=gen) * 2 - 2.5)
            elif name == "dt_bias":
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name == "norm.weight":
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name == "conv1d.weight":
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:  # the projections
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    ours = GatedDeltaNet(_args())
    ours.load_state_dict(ref.state_dict())
    return ref.to(dtype), ours.to(dtype)


def _x(B: int, S: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, S, H, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_names_and_shapes():
    ref, ours = _pair()
    assert sorted(linear_tensor_names(_args(), "p.")) == sorted("p." + n for n in ours.state_dict())
    assert {n: t.shape for n, t in ours.state_dict().items()} == {n: t.shape for n, t in ref.state_dict().items()}


@pytest.mark.parametrize("S", [1, 5, 64, 70, 130])
def test_fp32_matches_transformers(S):
    ref, ours = _pair()
    x = _x(2, S)
    with torch.no_grad():
        assert _max_diff(ours(x, None), ref(x)) < 1e-5
        # an all-ones pad mask and a packing of one document per row change nothing
        inputs = LinearMixerInputs(torch.ones(2, S, dtype=torch.bool), torch.zeros(2, S, dtype=torch.long))
        assert inputs.segments is None
        assert _max_diff(ours(x, inputs), ref(x)) < 1e-5


def test_bf16_matches_transformers():
    ref, ours = _pair()
    x = _x(2, 130)
    with torch.no_grad():
        exact = ref(x)  # fp32
        ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
        theirs, mine = ref(x.bfloat16()), ours(x.bfloat16(), None)
    assert mine.dtype == torch.bfloat16
    assert _max_diff(mine, theirs) <= 1e-2  # the same ops in the same dtypes (measured: 0)
    # no further from fp32 than transformers' own bf16
    assert _max_diff(mine, exact) <= 1.5 * _max_diff(theirs, exact) + 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_leaves_real_tokens_alone(side):
    ref, ours = _pair()
    S, n = 70, 61  # row 1 has n real tokens
    x = _x(2, S)
    mask = torch.ones(2, S, dtype=torch.bool)
    real = slice(S - n, S) if side == "left" else slice(0, n)
    mask[1] = False
    mask[1, real] = True
    with torch.no_grad():
        out = ours(x, LinearMixerInputs(mask, None))
        alone = ours(x[1:, real], None)
        theirs = ref(x, attention_mask=mask.long())
    assert _max_diff(out[1, real], alone[0]) < 1e-5
    assert _max_diff(out[mask], theirs[mask]) < 1e-5


def _packed():
    """Row 0: documents of 30, 70 and 5 tokens, then 9 pads; row 1: one of 114; row 2: 3 pads
    then documents of 64 and 47 (ids not in row order)."""
    S = 114
    ids = torch.full((3, S), -1, dtype=torch.long)
    ids[0, :30], ids[0, 30:100], ids[0, 100:105] = 0, 1, 2
    ids[1] = 0
    ids[2, 3:67], ids[2, 67:] = 5, 4
    docs = [(0, 0, 30), (0, 30, 100), (0, 100, 105), (1, 0, 114), (2, 3, 67), (2, 67, 114)]
    return ids, ids != -1, docs


def test_packed_documents_run_alone():
    _, ours = _pair()
    ids, mask, docs = _packed()
    x = _x(3, ids.shape[1]).requires_grad_()
    assert LinearMixerInputs(mask, ids).segments is not None
    out = ours(x, LinearMixerInputs(mask, ids))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)) * mask[:, :, None]
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    assert out[~mask].abs().max() == 0  # pads read as zeros and give zeros

    xs = x.detach().clone().requires_grad_()
    total = 0
    for row, start, end in docs:
        alone = ours(xs[row:row + 1, start:end], None)
        # (documents start inside chunks here, so fp32 rounds otherwise: 2e-6; leaking state: 0.1 and more)
        assert _max_diff(out[row, start:end], alone[0]) < 1e-5
        total = total + (alone * w[row:row + 1, start:end]).sum()
    total.backward()
    assert _max_diff(x.grad, xs.grad) < 1e-5
    for n, p in ours.named_parameters():
        assert _max_diff(grads[n], p.grad) < 1e-5 * max(1.0, p.grad.abs().max().item()), n


def _capture_projection_outputs(module: torch.nn.Module) -> list[torch.Tensor]:
    """The four input projections' outputs of the next forward, kept with their gradients."""
    outs = []

    def keep(_, __, out):
        out.retain_grad()
        outs.append(out)

    for name in PROJECTIONS:
        getattr(module, name).register_forward_hook(keep)
    return outs


def _left_padded_batch(S: int = 130):
    """Two rows of S tokens, the second left-padded by 9: (mask [2, S], x [2, S, H], w: random
    weights of the output, zero on the padding)."""
    mask = torch.ones(2, S, dtype=torch.bool)
    mask[1, :9] = False
    w = torch.randn(2, S, H, generator=torch.Generator().manual_seed(3)) * mask[:, :, None]
    return mask, _x(2, S), w


def test_gradients_match_transformers():
    ref, ours = _pair()
    mask, x, w = _left_padded_batch()
    results = []
    for module, call in ((ref, lambda x: ref(x, attention_mask=mask.long())),
                         (ours, lambda x: ours(x, LinearMixerInputs(mask, None)))):
        outs = _capture_projection_outputs(module)
        xg = x.clone().requires_grad_()
        (call(xg) * w).sum().backward()
        results.append((xg.grad, [o.grad for o in outs], {n: p.grad for n, p in module.named_parameters()}))
    (x_ref, outs_ref, params_ref), (x_ours, outs_ours, params_ours) = results
    assert _max_diff(x_ours, x_ref) < 1e-5
    for a, b in zip(outs_ours, outs_ref):
        assert _max_diff(a, b) < 1e-5
    for n, g in params_ref.items():
        assert _max_diff(params_ours[n], g) < 1e-5 * max(1.0, g.abs().max().item()), n


def test_cached_decoding_matches_the_whole_sequence():
    _, ours = _pair()
    S, pad = 75, 6  # 75 = a 67-token prompt, 5 steps of one token, then one of 2, then one of 1
    x = _x(2, S)
    mask = torch.ones(2, S, dtype=torch.bool)
    mask[1, :pad] = False  # a left-padded prompt
    with torch.no_grad():
        whole = ours(x, LinearMixerInputs(mask, None))
        cache = KVCache()
        steps = [67, 1, 1, 1, 1, 1, 2, 1]
        outs, at = [], 0
        for n in steps:
            outs.append(ours(x[:, at:at + n], LinearMixerInputs(mask[:, at:at + n], None), cache, layer_id=3))
            at += n
            cache.length = at  # (the model's doing)
            conv_state, state = cache.states[3]
            assert conv_state.shape == (2, 2 * HK * DK + HV * DV, K - 1) and state.shape == (2, HV, DK, DV)
            assert state.dtype == torch.float32
    assert at == S
    assert _max_diff(torch.cat(outs, dim=1)[mask], whole[mask]) < 1e-5


def test_cached_decoding_bf16_matches_transformers():
    """A prompt, then two steps of one token, against transformers' own cache."""
    ref, ours = _pair()
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    config = transformers.Qwen3_5TextConfig(
        vocab_size=128, hidden_size=H, num_hidden_layers=1, linear_num_key_heads=HK, linear_num_value_heads=HV,
        linear_key_head_dim=DK, linear_value_head_dim=DV, linear_conv_kernel_dim=K, layer_types=["linear_attention"])
    hf_cache = transformers.DynamicCache(config=config)
    x = _x(2, 12, torch.bfloat16)
    cache = KVCache()
    with torch.no_grad():
        for at, n in ((0, 10), (10, 1), (11, 1)):
            # (by position: transformers 5.17 names it cache_params, 5.24 cache; a wrong name
            # would vanish into **kwargs and run without the cache)
            theirs = ref(x[:, at:at + n], hf_cache)
            mine = ours(x[:, at:at + n], None, cache)
            assert _max_diff(mine, theirs) == 0
        assert cache.states[0][0].dtype == torch.bfloat16


def _next_pair() -> tuple[torch.nn.Module, GatedDeltaNet, ModelArgs]:
    """transformers' Qwen3NextGatedDeltaNet (fused in_proj_qkvz, in_proj_ba) with random
    parameters, mlora's with the same ones, and mlora's args."""
    from dataclasses import replace

    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    config = transformers.Qwen3NextConfig(
        vocab_size=128, hidden_size=H, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=HK, linear_num_value_heads=HV,
        linear_key_head_dim=DK, linear_value_head_dim=DV, linear_conv_kernel_dim=K, layer_types=["linear_attention"])
    ref = Qwen3NextGatedDeltaNet(config, 0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            scale = {"A_log": None, "dt_bias": 1.0, "norm.weight": 0.3,
                     "conv1d.weight": 0.5}.get(name, p.shape[-1] ** -0.5)
            p.copy_(torch.rand(p.shape, generator=gen) * 2 - 2.5 if scale is None
                    else (name == "norm.weight") + scale * torch.randn(p.shape, generator=gen))
    args = replace(_args(), model_type="qwen3_next", linear_fused_projections=True)
    ours = GatedDeltaNet(args)
    ours.load_state_dict(ref.state_dict())
    return ref, ours, args


def test_qwen3_next_fused_projections_match_transformers():
    """Qwen3-Next's layer: the same tensors, and from its fused projections (laid out per key
    head) the outputs of transformers' Qwen3NextGatedDeltaNet in fp32 (padded, over chunks) and
    bf16, and the gradients of the input and of every parameter."""
    ref, ours, args = _next_pair()
    assert sorted(linear_tensor_names(args, "p.")) == sorted("p." + n for n in ours.state_dict())
    assert {n: t.shape for n, t in ours.state_dict().items()} == {n: t.shape for n, t in ref.state_dict().items()}
    mask, x, w = _left_padded_batch()
    results = []
    for module, call in ((ref, lambda x: ref(x, attention_mask=mask.long())),
                         (ours, lambda x: ours(x, LinearMixerInputs(mask, None)))):
        xg = x.clone().requires_grad_()
        out = call(xg)
        (out * w).sum().backward()
        results.append((out.detach() * mask[:, :, None], xg.grad, {n: p.grad for n, p in module.named_parameters()}))
    (out_ref, x_ref, params_ref), (out_ours, x_ours, params_ours) = results
    assert _max_diff(out_ours, out_ref) < 1e-5 and _max_diff(x_ours, x_ref) < 1e-5
    for n, g in params_ref.items():
        assert _max_diff(params_ours[n], g) < 1e-5 * max(1.0, g.abs().max().item()), n
    with torch.no_grad():
        ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
        assert _max_diff(ours(x.bfloat16(), None), ref(x.bfloat16())) <= 1e-2  # (the same ops in the same dtypes)
