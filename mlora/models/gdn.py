"""Gated DeltaNet: the linear attention of Qwen3.5's and Qwen3-Next's "linear_attention" layers.

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
alone, in the row as it is (no document padded to another's length): the conv's taps read only
their own document's tokens, and the chunked recurrence masks the pairs of tokens of different
documents and the state carried into or out of a chunk where a document starts in it.

The projections are plain nn.Linear modules under transformers' names (the LoRA code swaps
them out by name; in_proj_qkv/z/b/a read the same input, lora.INPUT_GROUPS); the conv weight,
dt_bias, A_log and the norm's weight are plain parameters, also under transformers' names.

Qwen3-Next (`Qwen3NextGatedDeltaNet`) computes the same, but from two fused projections:
in_proj_qkvz gives, per key head h, [q_h | k_h | v_h | z_h] (v_h, z_h: the Hv / Hk value heads
that key head serves), and in_proj_ba, per key head, [b_h | a_h]. `fused_split` reorders them
into Qwen3.5's layout (q of every head, then k, then v: the conv's channels; z, b, a per value
head) exactly as transformers' fix_query_key_value_ordering does; the rest is shared. A LoRA on
in_proj_qkvz is one LoRA on the fused projection, as PEFT puts it on transformers' model.
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
    projections = (("in_proj_qkvz.weight", "in_proj_ba.weight") if args.linear_fused_projections
                   else ("in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight"))
    return [prefix + name for name in (*projections, "conv1d.weight", "dt_bias", "A_log", "norm.weight",
                                       "out_proj.weight")]


# ----------------------------------------------------------------------------- packed rows


@dataclass(frozen=True)
class LinearMixerInputs:
    """What a linear-attention layer needs of the batch besides its hidden states."""

    pad_mask: Tensor | None  # [B, S] bool, True = real token; None = every token real
    # [B, S] int: packed rows, a token belongs to the document of its id (pads carry an id of
    # their own); None = each row is one sequence
    document_ids: Tensor | None

    @cached_property
    def segments(self) -> Tensor | None:
        """document_ids [B, S] int64 where some row holds several documents, else None (the
        rows run as they are). Worked out once for all the layers of one forward (a host sync)."""
        if self.document_ids is None:
            return None
        ids = self.document_ids.long()
        return ids if bool((ids[:, 1:] != ids[:, :-1]).any()) else None


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
                           initial_state: Tensor | None = None,
                           segments: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The gated delta rule by chunks (transformers' torch_chunk_gated_delta_rule).

    q, k [B, S, Hk, Dk], v [B, S, Hv, Dv], g (log decay) and beta [B, S, Hv], initial_state
    [B, Hv, Dk, Dv] fp32 or None (zeros) -> (output [B, S, Hv, Dv] in q's dtype, final state fp32).

    Within a chunk, the deltas' dependence on each other is one unit-lower-triangular system
    (the UT transform), solved for all of them at once; only the state is carried from chunk
    to chunk, in a Python loop of S / 64 steps.

    segments [B, S] int64 (packed rows: each token's document, documents contiguous) or None:
    each document starts from a zero state, exactly as if it ran alone. Within a chunk the
    pairs of tokens of different documents are masked out of the decays (the UT system becomes
    block diagonal, one block per document); a token reads the state carried in only if it
    continues the previous chunk's last document, and the state carried out holds only the
    chunk's last document. No token is padded beyond the chunks' own rounding up."""
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
    hidden = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)  # [C, C]: j after i
    cum = g.cumsum(dim=3)  # [B, Hv, n, C]: the log decay from the chunk's start to each position
    reads_state = writes_state = None  # (every token continues the one sequence of its row)
    if segments is not None:
        # (the rounding-up tokens: the last document's, as zeros they change nothing)
        seg = torch.cat([segments, segments[:, -1:].expand(B, pad)], dim=1).view(B, 1, n, C)  # [B, 1, n, C]
        hidden = hidden | (seg.unsqueeze(4) != seg.unsqueeze(3))  # [B, 1, n, C, C]: or another document
        # the document running into each chunk: the previous chunk's last token's (the first
        # chunk's state is the initial one)
        before = torch.cat([seg[:, :, :1, :1], seg[:, :, :-1, -1:]], dim=2)  # [B, 1, n, 1]
        reads_state = (seg == before).to(cum.dtype)  # [B, 1, n, C]
        writes_state = (seg == seg[..., -1:]).to(cum.dtype)  # [B, 1, n, C]: the chunk's last document
    # decay[..., i, j] = exp(cum_i - cum_j): from position j to i (j <= i, the same document);
    # -inf before the exp, so no positive exponent overflows
    decay = (cum.unsqueeze(4) - cum.unsqueeze(3)).masked_fill(hidden, float("-inf")).exp()  # [B, Hv, n, C, C]
    system = (k_beta @ k.transpose(-1, -2)) * decay
    intra = (q @ k.transpose(-1, -2)) * decay  # [B, Hv, n, C, C]: the attention within each chunk
    to_here = cum.exp() if reads_state is None else cum.exp() * reads_state  # [B, Hv, n, C]
    decayed_k_beta = k_beta * to_here.unsqueeze(-1)
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)  # [B, Hv, n, C, Dv]
    k_cumdecay = torch.linalg.solve_triangular(system, decayed_k_beta, upper=False,
                                               unitriangular=True)  # [B, Hv, n, C, Dk]
    if initial_state is None:
        state = new_values.new_zeros(B, Hv, Dk, Dv)
    else:
        state = initial_state.to(new_values)
    # The decays applied once for all chunks: queries read the state decayed to their position,
    # keys write into the state decayed to the chunk's end
    to_end = (cum[..., -1:] - cum).exp()  # [B, Hv, n, C]
    chunk_decay = cum[..., -1].exp()  # [B, Hv, n]
    if segments is not None:  # (a document that starts in a chunk reads nothing of the state carried in)
        to_end, chunk_decay = to_end * writes_state, chunk_decay * reads_state[..., -1]
    q = q * to_here.unsqueeze(-1)
    k = k * to_end.unsqueeze(-1)
    chunk_decay = chunk_decay[..., None, None]  # [B, Hv, n, 1, 1]
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
        self.fused = args.linear_fused_projections
        if self.fused:  # Qwen3-Next: [q_h | k_h | v_h | z_h] and [b_h | a_h] per key head h
            self.in_proj_qkvz = nn.Linear(H, self.conv_dim + value_dim, bias=False)
            self.in_proj_ba = nn.Linear(H, 2 * self.num_v_heads, bias=False)
        else:
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
        # The projections on the same x object, in the batch's rows (LoRA input group)
        if self.fused:
            qkv, z, b, a = self.fused_split(self.in_proj_qkvz(x), self.in_proj_ba(x))
        else:
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
        else:  # (packed rows: each document alone, from zero states)
            y = self.mix(qkv, beta, g, segments=None if inputs is None else inputs.segments, conv_out=False)[0]
        y = self.norm(y, z.reshape(B, S, self.num_v_heads, self.v_dim))  # [B, S, Hv, Dv]
        return self.out_proj(y.reshape(B, S, -1))

    def fused_split(self, qkvz: Tensor, ba: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Qwen3-Next's fused outputs qkvz [B, S, Hk (2 Dk + 2 r Dv)] and ba [B, S, Hk 2 r]
        (r = Hv / Hk; laid out per key head) -> Qwen3.5's qkv [B, S, 2 Hk Dk + Hv Dv] (every
        head's q, then k, then v), z [B, S, Hv Dv], b and a [B, S, Hv] (transformers'
        fix_query_key_value_ordering, then its concatenation of q, k and v)."""
        B, S, _ = qkvz.shape
        Hk, Dk, Dv = self.num_k_heads, self.k_dim, self.v_dim
        r = self.num_v_heads // Hk
        q, k, v, z = qkvz.view(B, S, Hk, 2 * Dk + 2 * r * Dv).split([Dk, Dk, r * Dv, r * Dv], dim=3)
        b, a = ba.view(B, S, Hk, 2 * r).split([r, r], dim=3)
        qkv = torch.cat([q.reshape(B, S, -1), k.reshape(B, S, -1), v.reshape(B, S, -1)], dim=-1)
        return qkv, z.reshape(B, S, -1), b.reshape(B, S, -1), a.reshape(B, S, -1)

    def mix(self, qkv: Tensor, beta: Tensor, g: Tensor, conv_state: Tensor | None = None,
            state: Tensor | None = None, segments: Tensor | None = None,
            conv_out: bool = True) -> tuple[Tensor, Tensor | None, Tensor]:
        """The conv and the recurrence of rows that each continue from (conv_state, state)
        ([B, conv_dim, K - 1] in qkv's dtype: the last K - 1 inputs of the conv; [B, Hv, Dk, Dv]
        fp32), or start afresh when None; segments [B, S] (packed rows' documents): each starts
        afresh.

        qkv [B, S, conv_dim], beta [B, S, Hv], g [B, S, Hv] fp32 -> (output [B, S, Hv, Dv] in
        qkv's dtype, the conv state and the state after the S tokens). conv_out=False: no conv
        state (None), where nothing carries it on (training: a copy per layer saved)."""
        B, S, _ = qkv.shape
        w = self.conv1d.weight  # [conv_dim, 1, K]
        h = qkv.transpose(1, 2)  # [B, conv_dim, S]
        keep = self.kernel - 1
        new_conv_state = None
        if conv_out:
            past = h.new_zeros(B, self.conv_dim, keep) if conv_state is None else conv_state
            new_conv_state = torch.cat([past, h[:, :, -keep:]], dim=-1)[:, :, -keep:]  # [B, conv_dim, K - 1]
        # In the weight's dtype, SiLU, then cast (transformers' causal_conv1d_fn / _update)
        if segments is not None:
            h = _conv_within_documents(h, w, segments)
        elif conv_state is None:
            h = F.conv1d(h.to(w.dtype), w, padding=keep, groups=self.conv_dim)[:, :, :S]
        else:
            h = F.conv1d(torch.cat([conv_state, h], dim=-1).to(w.dtype), w, groups=self.conv_dim)  # [B, conv_dim, S]
        h = F.silu(h).to(qkv.dtype).transpose(1, 2)  # [B, S, conv_dim]
        q, k, v = h.split(self.splits, dim=-1)
        q = q.reshape(B, S, self.num_k_heads, self.k_dim)  # [B, S, Hk, Dk]
        k = k.reshape(B, S, self.num_k_heads, self.k_dim)
        v = v.reshape(B, S, self.num_v_heads, self.v_dim)  # [B, S, Hv, Dv]
        rule = recurrent_gated_delta_rule if state is not None and S == 1 else chunk_gated_delta_rule
        y, state = rule(q, k, v, g, beta, state) if segments is None else rule(q, k, v, g, beta, segments=segments)
        return y, new_conv_state, state


def _conv_within_documents(h: Tensor, w: Tensor, segments: Tensor) -> Tensor:
    """The causal depthwise conv of packed rows, each tap reading only its own document's
    tokens (zeros before a document's start, as if it ran alone): h [B, C, S], w [C, 1, K],
    segments [B, S] -> [B, C, S] in w's dtype. The taps are summed in fp32 and rounded once, as
    F.conv1d accumulates."""
    K, S = w.shape[-1], h.shape[-1]
    out = None
    for tap in range(K):
        shift = K - 1 - tap  # the tap reads the token `shift` before
        x = F.pad(h, (shift, 0))[..., :S].float()  # [B, C, S]
        same = (F.pad(segments, (shift, 0), value=-1)[:, :S] == segments) & (torch.arange(S, device=h.device) >= shift)
        # (masked first, then weighted: autograd keeps only the bool mask and the weight)
        term = (x * same[:, None, :]) * w[:, 0, tap].float()[:, None]  # [B, C, S]
        out = term if out is None else out + term
    return out.to(w.dtype)
