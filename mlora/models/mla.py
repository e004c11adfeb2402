"""Multi-head latent attention (MLA): DeepSeek-V2's and V3's attention (and Kimi K2's, Moonlight's,
Mistral Small 4's, which scales each query after RoPE by its position as Ministral 3 does).

Queries come from the hidden state directly (`q_proj`) or through a low-rank bottleneck
(`q_a_proj` -> RMSNorm -> `q_b_proj`). Keys and values come from one compressed latent:
`kv_a_proj_with_mqa` gives the latent [kv_lora_rank] and one RoPE key part [qk_rope_head_dim]
shared by every head; the normed latent goes through `kv_b_proj` to each head's non-rotated
key part [qk_nope_head_dim] and value [v_head_dim]. Each head's query and key are
[nope | rope], so scores need no RoPE on the nope part; values may be narrower than keys.
RoPE turns adjacent pairs when `rope_interleave` (DeepSeek-V3's released weights; DeepSeek-V2
always, as complex numbers, in place); transformers' V3 then writes the turned pairs
de-interleaved, the same reordering for queries and keys, so the scores are the same as turning
them in place, as here.

All five projections are plain nn.Linear modules under transformers' names, so LoRA, quantization
and PEFT see them like any other; q_proj / q_a_proj and kv_a_proj_with_mqa read the same input
(one LoRA input group, lora.INPUT_GROUPS).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlora.models.args import ModelArgs
from mlora.models.rope import apply_rope

if TYPE_CHECKING:
    from mlora.models.llama import KVCache

LATENT_NORM_EPS = 1e-6  # DeepseekV3RMSNorm's default: the latent norms do not take rms_norm_eps


def mla_tensor_names(args: ModelArgs, prefix: str) -> list[str]:
    """The checkpoint tensors of one MLA block; prefix is its path ('model.layers.3.self_attn.')."""
    names = []
    if args.q_lora_rank:
        names += [prefix + "q_a_proj.weight"] + ([prefix + "q_a_proj.bias"] if args.attention_bias else [])
        names += [prefix + "q_a_layernorm.weight", prefix + "q_b_proj.weight"]
    else:
        names.append(prefix + "q_proj.weight")
    names += [prefix + "kv_a_proj_with_mqa.weight"]
    names += [prefix + "kv_a_proj_with_mqa.bias"] if args.attention_bias else []
    names += [prefix + "kv_a_layernorm.weight", prefix + "kv_b_proj.weight", prefix + "o_proj.weight"]
    return names + ([prefix + "o_proj.bias"] if args.o_proj_bias else [])


class LatentAttention(nn.Module):
    def __init__(self, args: ModelArgs, make_norm):
        """make_norm(dim, eps): the family's RMSNorm (llama.RMSNorm)."""
        super().__init__()
        H, nh = args.hidden_size, args.num_heads
        self.num_heads = nh
        # (head_dim: the RoPE part)
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.head_dim, args.v_head_dim
        self.kv_rank = args.kv_lora_rank
        q_out = nh * (self.nope_dim + self.rope_dim)
        self.low_rank_q = bool(args.q_lora_rank)
        if self.low_rank_q:
            self.q_a_proj = nn.Linear(H, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = make_norm(args.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(args.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(H, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.kv_rank + self.rope_dim, bias=args.attention_bias)
        self.kv_a_layernorm = make_norm(self.kv_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_rank, nh * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(nh * self.v_dim, H, bias=args.o_proj_bias)
        self.scale = args.attn_scale  # qk_head_dim^-0.5, times YaRN's mscale^2
        self.interleaved = args.rope.interleaved

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None = None, layer_id: int = 0, q_scale: Tensor | None = None) -> Tensor:
        B, S, _ = x.shape  # x [B, S, H]
        nh = self.num_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.low_rank_q else self.q_proj(x)
        q = q.view(B, S, nh, self.nope_dim + self.rope_dim).transpose(1, 2)  # [B, nh, S, dn + dr]
        q_pass, q_rot = q.split([self.nope_dim, self.rope_dim], dim=-1)
        # [B, S, kv], [B, S, dr]
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent))  # [B, S, nh (dn + dv)]
        kv = kv.view(B, S, nh, self.nope_dim + self.v_dim).transpose(1, 2)  # [B, nh, S, dn + dv]
        k_pass, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q_rot = apply_rope(q_rot, cos, sin, self.interleaved).to(q.dtype)
        k_rot = apply_rope(k_rot[:, None], cos, sin, self.interleaved).to(q.dtype)  # [B, 1, S, dr]: every head's
        q = torch.cat([q_pass, q_rot], dim=-1)  # [B, nh, S, dn + dr]
        if q_scale is not None:  # Mistral Small 4: Ministral 3's factor on each whole query, cast first as transformers
            q = q * q_scale.to(q.dtype)
        k = torch.cat([k_pass, k_rot.expand(B, nh, S, self.rope_dim)], dim=-1)  # [B, nh, S, dn + dr]
        if cache is not None:
            k, v = cache.extend(layer_id, k, v)  # [B, nh, T, .]: the cached tokens' too
        # Values narrower than keys are padded to the keys' size with zeros: SDPA's flash and CPU
        # kernels want one head size (else it falls back to plain math, which keeps the [S, S]
        # probabilities); the padded dims' outputs are zero and dropped.
        pad = q.shape[-1] - self.v_dim
        if pad > 0:
            v = F.pad(v, (0, pad))  # [B, nh, T, dn + dr]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        y = y[..., :self.v_dim].transpose(1, 2).reshape(B, S, nh * self.v_dim)  # [B, S, nh dv]
        return self.o_proj(y)
