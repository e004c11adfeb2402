"""Gated DeltaNet: the linear attention of Qwen3.5's "linear_attention" layers.

The same math, in the same order and dtypes, as transformers' `Qwen3_5GatedDeltaNet` on its
torch path (no FLA or causal-conv1d kernels). Per token, from the layer's normed input x:

    qkv = conv(in_proj_qkv(x))  a causal depthwise conv of K taps over the sequence, then SiLU;
                                split into q, k [Hk, Dk] and v [Hv, Dv] per token
    beta = sigmoid(in_proj_b(x))                                     [Hv] the write strength
    g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias)               [Hv] the log decay (<= 0)
    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T   state [Hv, Dk, Dv]
    o_t = S_t^T q_t                  q, k L2-normed, q scaled by Dk^-0.5, repeated to Hv heads
    out = out_proj(rmsnorm(o) * w * silu(in_proj_z(x)))              per head of Dv

Training and prefill compute the recurrence by chunks of 64 tokens (a few matmuls per chunk
and one sequential step per chunk); a cached decode step of one token runs it directly.

Packed rows (several documents in one row): transformers' torch path lets the conv and the
state run on across documents. Here each document starts afresh, exactly as if it were run
alone: after the projections (which LoRA applies per row, so they see the batch as it is) the
conv and the recurrence run on the documents gathered into a batch of their own, and their
outputs are scattered back.

The projections are plain nn.Linear modules under transformers' names (the LoRA code swaps
them out by name; in_proj_qkv/z/b/a read the same input, lora.INPUT_GROUPS); the conv weight,
dt_bias, A_log and the norm's weight are plain parameters, also under transformers' names.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlora.models.args import ModelArgs

if TYPE_CHECKING:
    from mlora.models.llama import KVCache

CHUNK_SIZE = 64  # tokens per chunk of the chunked recurrence (transformers' and FLA's)
L2NORM_EPS = 1e-6  # of the q and k L2 norms (FLA's), not rms_norm_eps


def linear_tensor_names(args: ModelArgs, prefix: str) -> list[str]:
    """The checkpoint tensors of one Gated DeltaNet; prefix is its path ('model.layers.0.linear_attn.')."""
    return [prefix + name for name in ("in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight",
                                       "in_proj_a.weight", "conv1d.weight", "dt_bias", "A_log",
                                       "norm.weight", "out_proj.weight")]


# ----------------------------------------------------------------------------- packed rows


@dataclass(frozen=True)
class DocumentLayout:
    """Where the real tokens of packed rows sit in a batch of one document per row, each
    right-padded with zeros to the longest document."""

    tokens: Tensor  # [N] long: the real tokens' flat indices (row * S + column), document by document
    slots: Tensor  # [N] long: their flat indices (document * max_len + position) in the documents' batch
    num_docs: int
    max_len: int

    def gather(self, x: Tensor) -> Tensor:
        """x [B, S, *] -> [num_docs, max_len, *], zeros past each document's end."""
        flat = x.flatten(0, 1)  # [B S, *]
        out = flat.new_zeros((self.num_docs * self.max_len, *flat.shape[1:]))
        out = out.index_copy(0, self.slots, flat.index_select(0, self.tokens))
        return out.unflatten(0, (self.num_docs, self.max_len))

    def scatter(self, y: Tensor, B: int, S: int) -> Tensor:
        """y [num_docs, max_len, *] -> [B, S, *], zeros on padding."""
        flat = y.flatten(0, 1)  # [num_docs max_len, *]
        out = flat.new_zeros((B * S, *flat.shape[1:]))
        return out.index_copy(0, self.tokens, flat.index_select(0, self.slots)).unflatten(0, (B, S))


def document_layout(document_ids: Tensor, pad_mask: Tensor | None) -> DocumentLayout | None:
    """The documents of packed rows: document_ids [B, S] (a token belongs to the document of its
    id within its row), pad_mask [B, S] (False: padding, left out). None when each row is one
    whole document, so the rows can run as they are."""
    B, S = document_ids.shape
    device = document_ids.device
    ids = document_ids.long()
    lo, hi = torch.aminmax(ids)
    rows = torch.arange(B, device=device)[:, None]  # [B, 1]
    key = (rows * (hi - lo + 1) + (ids - lo)).flatten()  # [B S]: one value per (row, document)
    tokens = torch.arange(B * S, device=device)  # [B S]
    if pad_mask is not None:
        real = pad_mask.to(device=device, dtype=torch.bool).flatten()
        tokens, key = tokens[real], key[real]  # [N]
    if tokens.numel() == 0:
        return None
    # A stable sort keeps each document's tokens in their order along the row.
    key, order = torch.sort(key, stable=True)
    tokens = tokens[order]
    counts = torch.unique_consecutive(key, return_counts=True)[1]  # [num_docs]: each document's length
    num_docs, max_len = counts.numel(), int(counts.max())
    if num_docs == B and max_len == S and tokens.numel() == B * S:
        return None
    starts = torch.cumsum(counts, 0) - counts  # [num_docs]
    doc = torch.repeat_interleave(torch.arange(num_docs, device=device), counts)  # [N]
    position = torch.arange(tokens.numel(), device=device) - starts[doc]  # [N]
    return DocumentLayout(tokens, doc * max_len + position, num_docs, max_len)


@dataclass(frozen=True)
class LinearMixerInputs:
    """What a linear-attention layer needs of the batch besides its hidden states."""

    pad_mask: Tensor | None  # [B, S] bool, True = real token; None = every token real
    # [B, S] int: packed rows, a token belongs to the document of its id (pads carry an id of
    # their own); None = each row is one sequence
    document_ids: Tensor | None

    @cached_property
    def documents(self) -> DocumentLayout | None:
        """The documents' layout, worked out once for all the layers of one forward (it needs a
        few host syncs); None without packing or when each row is one document."""
        if self.document_ids is None:
            return None
        return document_layout(self.document_ids, self.pad_mask)


# ----------------------------------------------------------------------------- the recurrence


def l2norm(x: Tensor, eps: float = L2NORM_EPS) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (FLA's and transformers' form)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _heads_first_fp32(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> tuple[Tensor, ...]:
    """q, k [B, S, Hk, Dk], v [B, S, Hv, Dv], g, beta [B, S, Hv] -> each [B, Hv, S, .] in fp32,
    q and k L2-normed; each key head serves Hv / Hk consecutive value heads."""
    rep = v.shape[2] // k.shape[2]
    if rep != 1:
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    q, k, v, beta, g = (x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
                        for x in (q, k, v, beta, g))
    return l2norm(q), l2norm(k), v, g, beta


def chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                           initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The gated delta rule by chunks (transformers' torch_chunk_gated_delta_rule).

    q, k [B, S, Hk, Dk], v [B, S, Hv, Dv], g (log decay) and beta [B, S, Hv], initial_state
    [B, Hv, Dk, Dv] fp32 or None (zeros) -> (output [B, S, Hv, Dv] in q's dtype, final state fp32).

    Within a chunk, the deltas' dependence on each other is one unit-lower-triangular system
    (the UT transform), solved for all of them at once; only the state is carried from chunk
    to chunk, in a Python loop of S / 64 steps."""
    dtype = q.dtype
    B, S, _, Dk = k.shape
    Hv, Dv = v.shape[-2:]
    C = CHUNK_SIZE
    q, k, v, g, beta = _heads_first_fp32(q, k, v, g, beta)  # [B, Hv, S, .]
    q = q * Dk ** -0.5
    pad = (C - S % C) % C  # the last chunk is padded with zeros (q = k = 0: no effect on the state)
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    n = (S + pad) // C
    v_beta = v * beta.unsqueeze(-1)
    k_beta = k * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = (x.reshape(B, Hv, n, C, x.shape[-1]) for x in (q, k, k_beta, v_beta))  # [B, Hv, n, C, .]
    g = g.reshape(B, Hv, n, C)
    upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    cum = g.cumsum(dim=3)  # [B, Hv, n, C]: the log decay from the chunk's start to each position
    # decay[..., i, j] = exp(cum_i - cum_j): from position j to i (j <= i); -inf above the
    # diagonal before the exp, so no positive exponent overflows
    decay = (cum.unsqueeze(4) - cum.unsqueeze(3)).masked_fill(upper, float("-inf")).exp()  # [B, Hv, n, C, C]
    system = (k_beta @ k.transpose(-1, -2)) * decay
    intra = (q @ k.transpose(-1, -2)) * decay  # [B, Hv, n, C, C]: the attention within each chunk
    decayed_k_beta = k_beta * cum.exp().unsqueeze(-1)
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)  # [B, Hv, n, C, Dv]
    k_cumdecay = torch.linalg.solve_triangular(system, decayed_k_beta, upper=False,
                                               unitriangular=True)  # [B, Hv, n, C, Dk]
    if initial_state is None:
        state = new_values.new_zeros(B, Hv, Dk, Dv)
    else:
        state = initial_state.to(new_values)
    # The decays applied once for all chunks: queries read the state decayed to their position,
    # keys write into the state decayed to the chunk's end
    q = q * cum.exp().unsqueeze(-1)
    k = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()[..., None, None]  # [B, Hv, n, 1, 1]
    out = []
    for i in range(n):
        v_new = new_values[:, :, i] - k_cumdecay[:, :, i] @ state  # [B, Hv, C, Dv]: what the state does not yet predict
        out.append(q[:, :, i] @ state + intra[:, :, i] @ v_new)  # [B, Hv, C, Dv]
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    y = torch.stack(out, dim=2).reshape(B, Hv, n * C, Dv)[:, :, :S]  # [B, Hv, S, Dv]
    return y.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format), state


def recurrent_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                               initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The gated delta rule token by token (transformers' torch_recurrent_gated_delta_rule, its
    cached decode step): the same arguments and results as chunk_gated_delta_rule."""
    dtype = q.dtype
    B, S, _, Dk = k.shape
    Hv, Dv = v.shape[-2:]
    q, k, v, g, beta = _heads_first_fp32(q, k, v, g, beta)  # [B, Hv, S, .]
    q = q / Dk ** 0.5  # (a division here, a product in the chunked form: as transformers)
    state = v.new_zeros(B, Hv, Dk, Dv) if initial_state is None else initial_state.to(v)
    out = []
    for t in range(S):
        state = state * g[:, :, t].exp()[..., None, None]
        predicted = (state * k[:, :, t].unsqueeze(-1)).sum(dim=-2)  # [B, Hv, Dv]
        delta = (v[:, :, t] - predicted) * beta[:, :, t].unsqueeze(-1)
        state = state + k[:, :, t].unsqueeze(-1) * delta.unsqueeze(-2)
        out.append((state * q[:, :, t].unsqueeze(-1)).sum(dim=-2))  # [B, Hv, Dv]
    y = torch.stack(out, dim=2)  # [B, Hv, S, Dv]
    return y.transpose(1, 2).contiguous().to(dtype), state


# ----------------------------------------------------------------------------- the module


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output, gated: (w * norm(x)) * silu(gate) (Qwen3_5RMSNormGated).
    Its weight multiplies as is (not 1 + w, unlike Qwen3.5's other norms)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.to(x.dtype)  # cast back before the weight, then the gate in fp32
        return (h * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        H = args.hidden_size
        self.num_k_heads, self.num_v_heads = args.linear_num_key_heads, args.linear_num_value_heads
        self.k_dim, self.v_dim = args.linear_key_head_dim, args.linear_value_head_dim
        key_dim, value_dim = self.num_k_heads * self.k_dim, self.num_v_heads * self.v_dim
        self.splits = (key_dim, key_dim, value_dim)
        self.conv_dim = 2 * key_dim + value_dim
        self.kernel = args.linear_conv_kernel
        self.in_proj_qkv = nn.Linear(H, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(H, value_dim, bias=False)
        self.in_proj_b = nn.Linear(H, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(H, self.num_v_heads, bias=False)
        # Depthwise causal conv over the sequence; only its weight [conv_dim, 1, K] is used
        # (F.conv1d in forward: the padding depends on a cached state)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim,
                                padding=self.kernel - 1, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))  # (the checkpoint's; A = 1 until loaded)
        self.norm = GatedRMSNorm(self.v_dim, args.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, H, bias=False)

    def forward(self, x: Tensor, inputs: LinearMixerInputs | None, cache: KVCache | None = None,
                layer_id: int = 0) -> Tensor:
        """x [B, S, H] (the layer's normed input) -> [B, S, H].

        With a cache, x holds the S tokens after the cache's ones (none on the first call),
        inputs.pad_mask covers those S only, and the layer's conv and recurrent states in
        cache.states are read and replaced; packed rows (document_ids) take no cache."""
        B, S, _ = x.shape
        pad_mask = None if inputs is None else inputs.pad_mask
        if pad_mask is not None:
            # Padding reads as zeros: no bias anywhere, so pads write nothing into the state
            # and left padding leaves the real tokens as they are alone
            x = x * pad_mask.to(device=x.device, dtype=x.dtype)[:, :, None]
        # The four projections on the same x object, in the batch's rows (LoRA input group)
        qkv = self.in_proj_qkv(x)  # [B, S, 2 Hk Dk + Hv Dv]
        z = self.in_proj_z(x)  # [B, S, Hv Dv]
        b = self.in_proj_b(x)  # [B, S, Hv]
        a = self.in_proj_a(x)  # [B, S, Hv]
        beta = b.sigmoid()  # in the dtype
        # fp32: in fp16, exp(A_log) could overflow
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # [B, S, Hv] fp32
        if cache is not None:
            if inputs is not None and inputs.document_ids is not None:
                raise ValueError("a cache takes no packed rows (document_ids)")
            states = cache.states.get(layer_id)
            y, conv_state, state = self.mix(qkv, beta, g, *(states or (None, None)))
            cache.states[layer_id] = (conv_state, state)
        else:
            docs = None if inputs is None else inputs.documents
            if docs is None:
                y = self.mix(qkv, beta, g)[0]
            else:  # each document alone, from zero states
                y = docs.scatter(self.mix(docs.gather(qkv), docs.gather(beta), docs.gather(g))[0], B, S)
        y = self.norm(y, z.reshape(B, S, self.num_v_heads, self.v_dim))  # [B, S, Hv, Dv]
        return self.out_proj(y.reshape(B, S, -1))

    def mix(self, qkv: Tensor, beta: Tensor, g: Tensor, conv_state: Tensor | None = None,
            state: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The conv and the recurrence of rows that each continue from (conv_state, state)
        ([B, conv_dim, K - 1] in qkv's dtype: the last K - 1 inputs of the conv; [B, Hv, Dk, Dv]
        fp32), or start afresh when None.

        qkv [B, S, conv_dim], beta [B, S, Hv], g [B, S, Hv] fp32 -> (output [B, S, Hv, Dv] in
        qkv's dtype, the conv state and the state after the S tokens)."""
        B, S, _ = qkv.shape
        w = self.conv1d.weight  # [conv_dim, 1, K]
        h = qkv.transpose(1, 2)  # [B, conv_dim, S]
        keep = self.kernel - 1
        past = h.new_zeros(B, self.conv_dim, keep) if conv_state is None else conv_state
        new_conv_state = torch.cat([past, h[:, :, -keep:]], dim=-1)[:, :, -keep:]  # [B, conv_dim, K - 1]
        # In the weight's dtype, SiLU, then cast (transformers' causal_conv1d_fn / _update)
        if conv_state is None:
            h = F.conv1d(h.to(w.dtype), w, padding=keep, groups=self.conv_dim)[:, :, :S]
        else:
            h = F.conv1d(torch.cat([conv_state, h], dim=-1).to(w.dtype), w, groups=self.conv_dim)  # [B, conv_dim, S]
        h = F.silu(h).to(qkv.dtype).transpose(1, 2)  # [B, S, conv_dim]
        q, k, v = h.split(self.splits, dim=-1)
        q = q.reshape(B, S, self.num_k_heads, self.k_dim)  # [B, S, Hk, Dk]
        k = k.reshape(B, S, self.num_k_heads, self.k_dim)
        v = v.reshape(B, S, self.num_v_heads, self.v_dim)  # [B, S, Hv, Dv]
        rule = recurrent_gated_delta_rule if state is not None and S == 1 else chunk_gated_delta_rule
        y, state = rule(q, k, v, g, beta, state)
        return y, new_conv_state, state
