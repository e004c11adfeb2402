"""Rotary position embeddings: the inverse frequencies of every supported RoPE type,
computed exactly as transformers computes them, their cos/sin tables, and the rotation."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mlora.device import upload
from mlora.models.args import RopeArgs


def rope_inv_freq(rope: RopeArgs, head_dim: int, seq_len: int) -> Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, computed exactly as transformers does."""
    theta = rope.theta
    if rope.type == "longrope":
        ext = rope.long_factor if seq_len > rope.original_max_position_embeddings else rope.short_factor
        shape = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (torch.tensor(ext, dtype=torch.float32) * theta ** shape)
    if rope.type == "yarn":
        return _yarn_inv_freq(rope, head_dim)
    if rope.type == "proportional":
        # Gemma 4's full layers: the first `partial` of the frequencies a whole head would have
        # (the exponent divides by the whole head size), zero for the rest (cos 1, sin 0)
        turned = int(rope.partial * head_dim // 2)
        inv_freq = 1.0 / (theta ** (torch.arange(0, 2 * turned, 2, dtype=torch.int64).float() / head_dim))
        return torch.cat([inv_freq, torch.zeros(head_dim // 2 - turned)]) / rope.factor
    if rope.type == "dynamic" and seq_len > rope.original_max_position_embeddings:
        # NTK-aware: stretch the base as the sequence outgrows the trained context.
        scale = rope.factor * seq_len / rope.original_max_position_embeddings - (rope.factor - 1)
        theta = theta * scale ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.type == "linear":
        # Position interpolation: pos / factor, folded into the frequencies like HF does.
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the
        # band in between blended smoothly.
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def _yarn_inv_freq(rope: RopeArgs, dim: int) -> Tensor:
    """YaRN's frequencies: those that turn fewer than beta_slow times over the original context
    are interpolated (divided by factor), those that turn more than beta_fast times are kept, a
    linear ramp in between."""
    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)  # [D/2]
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolated = 1 - ramp  # 1: keep the frequency, 0: interpolate it
    return (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolated) + (1.0 / pos_freqs) * extrapolated


def rope_cos_sin(rope: RopeArgs, head_dim: int, seq_len: int, device: torch.device,
                 dtype: torch.dtype, freq_len: int | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin [S, head_dim] for positions 0..S-1; fp32 math, then cast (cheap, so no cache).
    freq_len: the length the frequencies are chosen for (dynamic, longrope), else seq_len."""
    inv_freq = upload(rope_inv_freq(rope, head_dim, seq_len if freq_len is None else freq_len), device)  # [D/2]
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]  # [S, D/2]
    emb = _angles(freqs, rope)  # [S, D]
    return _scaled(emb.cos(), rope, dtype), _scaled(emb.sin(), rope, dtype)


def _angles(freqs: Tensor, rope: RopeArgs) -> Tensor:
    """[..., D/2] angles laid out for the rotation: once per half ([f0..f(D/2-1), f0..], LLaMA's
    rotate_half) or per adjacent pair ([f0, f0, f1, f1, ...], GLM's)."""
    if rope.interleaved:
        return freqs.repeat_interleave(2, dim=-1)
    return torch.cat((freqs, freqs), dim=-1)


def _scaled(table: Tensor, rope: RopeArgs, dtype: torch.dtype) -> Tensor:
    """LongRoPE and YaRN scale cos and sin (attention_factor) in fp32 before the cast; the other
    types leave them."""
    return (table if rope.attention_factor == 1.0 else table * rope.attention_factor).to(dtype)


def rope_cos_sin_at(rope: RopeArgs, head_dim: int, position_ids: Tensor,
                    dtype: torch.dtype, freq_len: int | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, S, head_dim] for arbitrary per-token positions (packed rows, where each
    sequence restarts at 0). The same fp32 products as `rope_cos_sin`, so a token at position
    p gets bit-identical values whichever row it sits in."""
    seq_len = position_ids.shape[-1]
    if freq_len is not None:
        seq_len = freq_len
    elif rope.type == "dynamic":
        # Dynamic NTK depends on the length; HF takes max(position) + 1, which for packed rows
        # is the longest sequence, as the padded unpacked batch would have. Only this type
        # pays for the host sync (LongRoPE chooses per sequence, in longrope_cos_sin).
        seq_len = int(position_ids.max()) + 1
    inv_freq = upload(rope_inv_freq(rope, head_dim, seq_len), position_ids.device)  # [D/2]
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, S, D/2]
    emb = _angles(freqs, rope)[:, None]  # [B, 1, S, D]: broadcasts over heads
    return _scaled(emb.cos(), rope, dtype), _scaled(emb.sin(), rope, dtype)


def dynamic_cos_sin_per_row(rope: RopeArgs, head_dim: int, attention_mask: Tensor, S: int,
                            device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Dynamic NTK's cos, sin [B, 1, S, R] for the last S tokens of rows with attention_mask
    [B, T] (the cached tokens' columns included; left padding before a row's first real token):
    each row at its own positions (counted from its first real token) with the frequencies of
    its own length (its real tokens so far), as transformers turns that row alone, step by step
    (max(position_ids) + 1). The same fp32 products as `rope_cos_sin`."""
    am = attention_mask.to(torch.int64)
    pos = (am.cumsum(-1) - 1).clamp(min=0)[:, -S:]  # [B, S] (pads: 0)
    inv_freq = torch.stack([rope_inv_freq(rope, head_dim, n) for n in am.sum(-1).tolist()])  # [B, D/2]
    freqs = upload(pos, device).to(torch.float32)[..., None] * upload(inv_freq, device)[:, None, :]  # [B, S, D/2]
    emb = _angles(freqs, rope)[:, None]  # [B, 1, S, D]
    return _scaled(emb.cos(), rope, dtype), _scaled(emb.sin(), rope, dtype)


def sequence_lengths(attention_mask: Tensor | None, position_ids: Tensor | None, document_ids: Tensor | None,
                     B: int, T: int) -> Tensor:
    """How long the sequence of each new token is, [B, S] or [B, 1] int64: a padded row's real
    tokens (the cached ones included), a packed row's document. LongRoPE picks its factors by
    this length per sequence, so a row's rotation never depends on the rows beside it (HF
    picks by the batch's longest row; for one sequence alone both agree)."""
    if position_ids is None:
        if attention_mask is None:
            return torch.full((B, 1), T, dtype=torch.int64)
        return attention_mask.to(torch.int64).sum(-1, keepdim=True)  # [B, 1]
    if document_ids is None:  # one sequence per row
        return position_ids.amax(-1, keepdim=True).to(torch.int64) + 1
    ids = document_ids
    change = torch.ones_like(ids, dtype=torch.bool)
    change[:, 1:] = ids[:, 1:] != ids[:, :-1]  # documents are contiguous runs of one id
    segment = change.to(torch.int64).cumsum(-1) - 1  # [B, S]: 0, 1, ... per row
    counts = torch.zeros(segment.shape, dtype=torch.int64, device=segment.device)
    counts.scatter_add_(1, segment, torch.ones_like(segment))
    return counts.gather(1, segment)  # [B, S]


def longrope_cos_sin(rope: RopeArgs, head_dim: int, lengths: Tensor, past: int, S: int,
                     position_ids: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, S, R] of LongRoPE: each token turns with the long factors when its
    sequence (lengths [B, S] or [B, 1]) is longer than original_max_position_embeddings, with
    the short ones otherwise. position_ids [B, S] or None (past..past+S-1 in every row)."""
    tables = []
    for seq_len in (0, rope.original_max_position_embeddings + 1):  # short, then long factors
        if position_ids is None:
            cos, sin = rope_cos_sin(rope, head_dim, past + S, lengths.device, dtype, freq_len=seq_len)
            tables.append((cos[past:][None, None], sin[past:][None, None]))  # [1, 1, S, R]
        else:
            tables.append(rope_cos_sin_at(rope, head_dim, position_ids, dtype, freq_len=seq_len))  # [B, 1, S, R]
    (cos_s, sin_s), (cos_l, sin_l) = tables
    long = (lengths > rope.original_max_position_embeddings)[:, None, :, None]  # [B, 1, S or 1, 1]
    return torch.where(long, cos_l, cos_s), torch.where(long, sin_l, sin_s)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x: Tensor) -> Tensor:
    """GLM's rotation: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    # x [B, heads, S, D]; cos/sin [S, R] (shared positions) or [B, 1, S, R] (per-token
    # positions), broadcast over batch and/or heads. R < D (partial rotary): the first R dims
    # turn, the rest pass through. interleaved (GLM): dims 2i and 2i+1 turn together by
    # frequency i (the tables are laid out f0, f0, f1, f1, ..., see _angles).
    rot = cos.shape[-1]
    rotate = rotate_pairs if interleaved else rotate_half
    if rot == x.shape[-1]:
        return x * cos + rotate(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1)
