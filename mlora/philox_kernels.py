"""Triton kernels of the `triton` LoRA kernel: the dropout keep-mask drawn inside each kernel
from a counter-based generator (Philox 4x32, 7 rounds), so it is never written to memory.

Imported only when that kernel runs (lora_triton.py): importing triton costs a second. With
TRITON_INTERPRET=1 set before the import the kernels run on the CPU through Triton's
interpreter (the test suite does this); on CUDA they are compiled.

The mask. Element (row, k) of an adapter's tokens - row being the token's index in the
adapter's own layout (its rows padded to its own longest, as alone; lora_triton.PhiloxDropout),
so the same element gets the same draw whether the adapter trains alone or fused with others
that make the batch longer - is kept when a 16-bit draw is >= the adapter's threshold
round(p * 65536). One Philox
call gives four 32-bit words, i.e. eight 16-bit draws: columns 8w .. 8w + 7 of a row share
call w = philox(seed, w, row, 0, 0), column 8w + j taking half j % 2 of word j // 2. The seed
is drawn per call from the adapter's own generator (lora_triton.draw). Every kernel derives
a tile's mask from absolute (row, k), so tiles of any size agree; tile widths are multiples
of 8 and tiles start at multiples of 8.

Per token row the kernels read owner[row] (index of the row's adapter in the per-call tables,
-1: the row does not drop out), and that adapter's seed and its table column: first batch
row, threshold, own length and offset of its tokens in a row.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_draws(owner_ptr, seed_ptr, table_ptr, G, S, rows, ok):
    """For token rows `rows` [R] (ok: in range) of a batch of S-token rows: seed [R] int64,
    the token's index in its adapter's own layout [R] (see lora_triton.PhiloxDropout) and the
    threshold [R] int32 (0 for tokens that do not drop out: every draw keeps)."""
    owner = tl.load(owner_ptr + rows, mask=ok, other=-1)
    has = owner >= 0
    owner = tl.where(has, owner, 0)
    seed = tl.load(seed_ptr + owner, mask=has, other=0)
    first_row = tl.load(table_ptr + owner, mask=has, other=0)
    thr = tl.load(table_ptr + G + owner, mask=has, other=0)
    length = tl.load(table_ptr + 2 * G + owner, mask=has, other=1)
    offset = tl.load(table_ptr + 3 * G + owner, mask=has, other=0)
    b = rows // S
    s = rows - b * S - offset  # position among the adapter's own tokens of its row
    thr = tl.where((s >= 0) & (s < length), thr, 0)  # the padding around them keeps, as in torch's
    return seed, (b - first_row) * length + s, thr


@triton.jit
def _keep(seed, row, thr, k0, BR: tl.constexpr, BK: tl.constexpr):
    """[BR, BK] bool keep-mask of BR rows (seed, row, thr [BR] from _row_draws) at columns
    k0 .. k0 + BK - 1; k0 and BK multiples of 8 (see the module docstring)."""
    words = (k0 // 8 + tl.arange(0, BK // 8)).to(tl.uint32)  # [BK/8]
    c0 = tl.broadcast_to(words[None, :], (BR, BK // 8))
    c1 = tl.broadcast_to(row.to(tl.uint32)[:, None], (BR, BK // 8))
    zero = tl.zeros((BR, BK // 8), dtype=tl.uint32)
    # 7 rounds: the fewest that pass BigCrush (Random123); the default 10 costs ~30% more
    # integer work, and drawing the mask is what bounds these kernels.
    r0, r1, r2, r3 = tl.random.philox(seed[:, None], c0, c1, zero, zero, 7)  # [BR, BK/8] each
    lane = tl.arange(0, 8)[None, None, :]  # [1, 1, 8]: column j of the word's 8
    word = tl.where(lane < 2, r0[:, :, None],
                    tl.where(lane < 4, r1[:, :, None], tl.where(lane < 6, r2[:, :, None], r3[:, :, None])))
    bits = (word >> ((lane % 2) * 16).to(tl.uint32)) & 0xFFFF  # [BR, BK/8, 8] 16-bit draws
    bits = tl.reshape(bits.to(tl.int32), (BR, BK))
    return bits >= thr[:, None]


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b. IEEE: fp32 products (fp32 operands, not TF32; and under the interpreter,
    whose dot mishandles bf16, 16-bit operands widened first)."""
    if IEEE:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def down_kernel(x_ptr, a_ptr, f_ptr, h_ptr, owner_ptr, seed_ptr, table_ptr, G, S,
                N, K, C, stride_xm, stride_xk, stride_fm,
                BM: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """h [N, C] = ((x * keep) @ A^T) * factor: x [N, K] any strides, A [C, K] contiguous,
    factor [N, C] fp32 (stride_fm = 0 for a per-column [C]); fp32 accumulation, one rounding.
    The C tiles of one row block are neighbours on axis 0, so a second one finds x in L2."""
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rm64 = rm.to(tl.int64)  # row offsets: N * K can pass 2**31
    rc = pid_c * BC + tl.arange(0, BC)
    m_ok = rm < N
    c_ok = rc < C
    seed, row, thr = _row_draws(owner_ptr, seed_ptr, table_ptr, G, S, rm, m_ok)
    acc = tl.zeros((BM, BC), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        x = tl.where(_keep(seed, row, thr, k0, BM, BK), x, tl.zeros_like(x))
        a = tl.load(a_ptr + rc[None, :] * K + rk[:, None], mask=k_ok[:, None] & c_ok[None, :], other=0.0)  # [BK, BC]
        acc = _dot(x, a, acc, IEEE)
    f = tl.load(f_ptr + rm64[:, None] * stride_fm + rc[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
    tl.store(h_ptr + rm64[:, None] * C + rc[None, :], (acc * f).to(h_ptr.dtype.element_ty),
             mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def up_masked_kernel(dh_ptr, a_ptr, dx_ptr, owner_ptr, seed_ptr, table_ptr, G, S,
                     N, K, C, stride_dhm,
                     BM: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, IEEE: tl.constexpr):
    """dx [N, K] (contiguous) = (dh @ A) * keep: dh [N, C] (row stride stride_dhm), A [C, K]."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rm64 = rm.to(tl.int64)
    rk = pid_k * BK + tl.arange(0, BK)
    m_ok = rm < N
    k_ok = rk < K
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for c0 in range(0, C, BC):
        rc = c0 + tl.arange(0, BC)
        c_ok = rc < C
        dh = tl.load(dh_ptr + rm64[:, None] * stride_dhm + rc[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        a = tl.load(a_ptr + rc[:, None] * K + rk[None, :], mask=c_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(dh, a, acc, IEEE)
    seed, row, thr = _row_draws(owner_ptr, seed_ptr, table_ptr, G, S, rm, m_ok)
    acc = tl.where(_keep(seed, row, thr, pid_k * BK, BM, BK), acc, 0.0)
    tl.store(dx_ptr + rm64[:, None] * K + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def grad_a_kernel(dh_ptr, x_ptr, out_ptr, owner_ptr, seed_ptr, table_ptr, G, S,
                  N, K, C, stride_dhm, stride_xm, stride_xk, tokens_per_split,
                  BC: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, IEEE: tl.constexpr):
    """out[s] [C, K] fp32 = dh[T_s]^T @ (x[T_s] * keep) over split s's token rows T_s; the
    caller sums the splits (a fixed order: deterministic, unlike atomics)."""
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    rk = pid_k * BK + tl.arange(0, BK)
    rc = pid_c * BC + tl.arange(0, BC)
    k_ok = rk < K
    c_ok = rc < C
    t_begin = pid_s * tokens_per_split
    t_end = tl.minimum(N, t_begin + tokens_per_split)
    acc = tl.zeros((BC, BK), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BT):
        rt = t0 + tl.arange(0, BT)
        rt64 = rt.to(tl.int64)
        t_ok = rt < t_end
        seed, row, thr = _row_draws(owner_ptr, seed_ptr, table_ptr, G, S, rt, t_ok)
        x = tl.load(x_ptr + rt64[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0)  # [BT, BK]
        x = tl.where(_keep(seed, row, thr, pid_k * BK, BT, BK), x, tl.zeros_like(x))
        dh = tl.load(dh_ptr + rt64[:, None] * stride_dhm + rc[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _dot(tl.trans(dh), x, acc, IEEE)  # [BC, BT] @ [BT, BK]
    tl.store(out_ptr + pid_s.to(tl.int64) * C * K + rc[:, None] * K + rk[None, :], acc,
             mask=c_ok[:, None] & k_ok[None, :])


@triton.jit
def mask_kernel(out_ptr, owner_ptr, seed_ptr, table_ptr, G, S, N, K, BM: tl.constexpr, BK: tl.constexpr):
    """out [N, K] int8: the keep-mask the other kernels apply, written out (tests, references)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    m_ok = rm < N
    seed, row, thr = _row_draws(owner_ptr, seed_ptr, table_ptr, G, S, rm, m_ok)
    keep = _keep(seed, row, thr, pid_k * BK, BM, BK)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], keep.to(tl.int8),
             mask=m_ok[:, None] & (rk < K)[None, :])
