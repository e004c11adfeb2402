"""Triton kernels of the `triton` LoRA kernel: the dropout keep-mask drawn inside the
forward's kernel from a counter-based generator (Philox 4x32, 7 rounds) and kept as bits.

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
(62 bits) is drawn per call from the adapter's own generator on the host (lora_triton.draw)
and reaches the kernels as a scalar argument: up to 8 adapters a call, as seed0 .. seed7, each
row picking its adapter's by a select chain on its owner (per row, not per element; seed_ptr
is None); more, as a [G] int64 tensor at seed_ptr (MANY_SEEDS). Every kernel derives
a tile's mask from absolute (row, k), so tiles of any size agree; tile widths are multiples
of 8 and tiles start at multiples of 8.

The forward draws each element once: `down` writes the mask it applied as bits, 8 columns
to a byte (bit j of byte w of a row: column 8w + j, the columns of one Philox call), and the
backward's kernels read those bits instead of drawing again: drawing is integer work (7
Philox rounds per 8 draws) that bounded the kernels, and the bits cost 1/16 of a bf16
activation to keep.

Per token row the kernels read owner[row] (index of the row's adapter in the per-call tables,
-1: the row does not drop out), and that adapter's seed and its table column: first batch
row, threshold, own length and offset of its tokens in a row.

The seed arguments are `do_not_specialize` and arrive with bit 62 set (lora_triton.SEED_TAG),
cleared here: Triton types an integer argument by its value (i32 below 2**31, i64 above) and
would otherwise specialise on it (== 1, divisible by 16), so seeds drawn anew each call would
compile new variants; tagged, every seed is an i64 of one signature.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mlora.lora_triton import SEED_TAG


# The kernels' seed arguments, by name: Triton must not specialise on their values (above).
SEED_ARGS = [f"seed{i}" for i in range(8)]
SEED_BITS = tl.constexpr(SEED_TAG - 1)  # a seed's bits, without its tag


@triton.jit
def _row_seeds(owner, has, seed_ptr, seed0, seed1, seed2, seed3, seed4, seed5, seed6, seed7,
               MANY_SEEDS: tl.constexpr):
    """The seed [R] int64 of rows whose adapters are `owner` [R] (has: a row with one): the
    scalars seed0 .. seed7 selected by owner, or seed_ptr[owner] (MANY_SEEDS: over 8 adapters)."""
    if MANY_SEEDS:
        seed = tl.load(seed_ptr + owner, mask=has, other=0)
    else:
        seed = tl.where(owner == 7, seed7, 0)
        seed = tl.where(owner == 6, seed6, seed)
        seed = tl.where(owner == 5, seed5, seed)
        seed = tl.where(owner == 4, seed4, seed)
        seed = tl.where(owner == 3, seed3, seed)
        seed = tl.where(owner == 2, seed2, seed)
        seed = tl.where(owner == 1, seed1, seed)
        seed = tl.where(owner == 0, seed0, seed)
    return seed & SEED_BITS


@triton.jit
def _row_draws(owner_ptr, table_ptr, G, S, seed_ptr, seed0, seed1, seed2, seed3, seed4, seed5, seed6, seed7,
               rows, ok, MANY_SEEDS: tl.constexpr):
    """For token rows `rows` [R] (ok: in range) of a batch of S-token rows: seed [R] int64,
    the token's index in its adapter's own layout [R] (see lora_triton.PhiloxDropout) and the
    threshold [R] int32 (0 for tokens that do not drop out: every draw keeps)."""
    owner = tl.load(owner_ptr + rows, mask=ok, other=-1)
    has = owner >= 0
    owner = tl.where(has, owner, 0)
    seed = _row_seeds(owner, has, seed_ptr, seed0, seed1, seed2, seed3, seed4, seed5, seed6, seed7, MANY_SEEDS)
    first_row = tl.load(table_ptr + owner, mask=has, other=0)
    thr = tl.load(table_ptr + G + owner, mask=has, other=0)
    length = tl.load(table_ptr + 2 * G + owner, mask=has, other=1)
    offset = tl.load(table_ptr + 3 * G + owner, mask=has, other=0)
    b = rows // S
    s = rows - b * S - offset  # position among the adapter's own tokens of its row
    thr = tl.where((s >= 0) & (s < length), thr, 0)  # the padding around them keeps, as in torch's
    return seed, (b - first_row) * length + s, thr


@triton.jit
def _keep_bytes(seed, row, thr, k0, BR: tl.constexpr, BK: tl.constexpr):
    """The keep-mask of BR rows (seed, row, thr [BR] from _row_draws) at columns k0 .. k0 +
    BK - 1 (k0 and BK multiples of 8; see the module docstring) as [BR, BK/8] int32 bytes: bit
    j of byte w keeps column k0 + 8w + j. Built on the draws' own [BR, BK/8] shape, so packing
    costs no reshape (a reshape-and-sum of the [BR, BK] mask spilled registers)."""
    words = (k0 // 8 + tl.arange(0, BK // 8)).to(tl.uint32)  # [BK/8]
    c0 = tl.broadcast_to(words[None, :], (BR, BK // 8))
    c1 = tl.broadcast_to(row.to(tl.uint32)[:, None], (BR, BK // 8))
    zero = tl.zeros((BR, BK // 8), dtype=tl.uint32)
    # 7 rounds: the fewest that pass BigCrush (Random123); the default 10 costs ~30% more
    # integer work, and drawing the mask is what bounds the forward's kernel.
    r0, r1, r2, r3 = tl.random.philox(seed[:, None], c0, c1, zero, zero, 7)  # [BR, BK/8] each
    t = thr.to(tl.uint32)[:, None]  # a draw >= t keeps
    byte = ((r0 & 0xFFFF) >= t).to(tl.int32) | (((r0 >> 16) >= t).to(tl.int32) << 1)
    byte |= (((r1 & 0xFFFF) >= t).to(tl.int32) << 2) | (((r1 >> 16) >= t).to(tl.int32) << 3)
    byte |= (((r2 & 0xFFFF) >= t).to(tl.int32) << 4) | (((r2 >> 16) >= t).to(tl.int32) << 5)
    byte |= (((r3 & 0xFFFF) >= t).to(tl.int32) << 6) | (((r3 >> 16) >= t).to(tl.int32) << 7)
    return byte


@triton.jit
def _unpack(byte, BR: tl.constexpr, BK: tl.constexpr):
    """[BR, BK/8] bytes (int32) -> the [BR, BK] bool keep-mask they hold."""
    lane = tl.arange(0, 8)[None, None, :]  # [1, 1, 8]: column j of the byte's 8
    return tl.reshape((byte[:, :, None] >> lane) & 1, (BR, BK)) != 0


@triton.jit
def _load_keep(bits_ptr, W, rows64, rows_ok, k0, BR: tl.constexpr, BK: tl.constexpr):
    """The [BR, BK] bool keep-mask at columns k0 .. k0 + BK - 1 (k0, BK multiples of 8) of
    token rows `rows64` [BR], from the bytes `down` wrote (W a row)."""
    w = k0 // 8 + tl.arange(0, BK // 8)  # [BK/8]
    byte = tl.load(bits_ptr + rows64[:, None] * W + w[None, :], mask=rows_ok[:, None] & (w < W)[None, :], other=0)
    return _unpack(byte.to(tl.int32), BR, BK)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b. IEEE: fp32 products (fp32 operands, not TF32; and under the interpreter,
    whose dot mishandles bf16, 16-bit operands widened first)."""
    if IEEE:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit(do_not_specialize=SEED_ARGS)
def down_kernel(x_ptr, a_ptr, f_ptr, h_ptr, bits_ptr, owner_ptr, table_ptr, G, S, seed_ptr,
                seed0, seed1, seed2, seed3, seed4, seed5, seed6, seed7,
                N, K, C, W, stride_xm, stride_xk, stride_fm,
                BM: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
                TRANS: tl.constexpr, MANY_SEEDS: tl.constexpr):
    """h [N, C] = ((x * keep) @ A^T) * factor: x [N, K] any strides, A [C, K] contiguous,
    factor [N, C] fp32 (stride_fm = 0 for a per-column [C]); fp32 accumulation, one rounding.
    Computed transposed, h^T = A @ (x * keep)^T: the masked x is then the dot's second operand,
    which the tensor cores read from shared memory where it is stored anyway, instead of the
    first, which took a round trip through shared memory into registers (5 % fewer instructions
    with Triton 3.6, 20 % with 3.9: scripts/compile_triton_kernels.py --cost). TRANS: that
    form, for tiles of C of 64 and more (lora_triton.down_config); a narrower tile is the dot's
    M, under Hopper's wgmma minimum of 64, and would fall back to mma.sync: there h = x @ A^T.
    The C tiles of one row block are neighbours on axis 0, so a second one finds x in L2.
    bits [N, W] uint8 (W = ceil(K / 8)) gets the keep-mask, from the first C tile."""
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rm64 = rm.to(tl.int64)  # row offsets: N * K can pass 2**31
    rc = pid_c * BC + tl.arange(0, BC)
    m_ok = rm < N
    c_ok = rc < C
    seed, row, thr = _row_draws(owner_ptr, table_ptr, G, S, seed_ptr, seed0, seed1, seed2, seed3, seed4, seed5,
                                seed6, seed7, rm, m_ok, MANY_SEEDS)
    bytes_ = tl.where(pid_c == 0, W, 0)  # of the mask this program writes: the first C tile's
    if TRANS:
        acc = tl.zeros((BC, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BC), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        byte = _keep_bytes(seed, row, thr, k0, BM, BK)  # [BM, BK/8]
        w = k0 // 8 + tl.arange(0, BK // 8)
        tl.store(bits_ptr + rm64[:, None] * W + w[None, :], byte.to(tl.uint8),
                 mask=m_ok[:, None] & (w < bytes_)[None, :])
        x = tl.where(_unpack(byte, BM, BK), x, tl.zeros_like(x))
        if TRANS:
            a = tl.load(a_ptr + rc[:, None] * K + rk[None, :], mask=c_ok[:, None] & k_ok[None, :],
                        other=0.0)  # [BC, BK]
            acc = _dot(a, tl.trans(x), acc, IEEE)  # [BC, BM]
        else:
            a = tl.load(a_ptr + rc[None, :] * K + rk[:, None], mask=k_ok[:, None] & c_ok[None, :],
                        other=0.0)  # [BK, BC]
            acc = _dot(x, a, acc, IEEE)  # [BM, BC]
    if TRANS:
        f = tl.load(f_ptr + rm64[None, :] * stride_fm + rc[:, None], mask=m_ok[None, :] & c_ok[:, None], other=0.0)
        tl.store(h_ptr + rm64[None, :] * C + rc[:, None], (acc * f).to(h_ptr.dtype.element_ty),
                 mask=m_ok[None, :] & c_ok[:, None])
    else:
        f = tl.load(f_ptr + rm64[:, None] * stride_fm + rc[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        tl.store(h_ptr + rm64[:, None] * C + rc[None, :], (acc * f).to(h_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def up_masked_kernel(dh_ptr, a_ptr, dx_ptr, bits_ptr, N, K, C, W, stride_dhm,
                     BM: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, IEEE: tl.constexpr):
    """dx [N, K] (contiguous) = (dh @ A) * keep: dh [N, C] (row stride stride_dhm), A [C, K],
    keep from the bits [N, W] (uint8) down wrote."""
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
    acc = tl.where(_load_keep(bits_ptr, W, rm64, m_ok, pid_k * BK, BM, BK), acc, 0.0)
    tl.store(dx_ptr + rm64[:, None] * K + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def grad_a_kernel(dh_ptr, x_ptr, out_ptr, bits_ptr, N, K, C, W, stride_dhm, stride_xm, stride_xk,
                  tokens_per_split,
                  BC: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, IEEE: tl.constexpr):
    """out[s] [C, K] fp32 = dh[T_s]^T @ (x[T_s] * keep) over split s's token rows T_s; the
    caller sums the splits (a fixed order: deterministic, unlike atomics). keep from the bits
    [N, W] (uint8) down wrote."""
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
        x = tl.load(x_ptr + rt64[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0)  # [BT, BK]
        x = tl.where(_load_keep(bits_ptr, W, rt64, t_ok, pid_k * BK, BT, BK), x, tl.zeros_like(x))
        dh = tl.load(dh_ptr + rt64[:, None] * stride_dhm + rc[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _dot(tl.trans(dh), x, acc, IEEE)  # [BC, BT] @ [BT, BK]
    tl.store(out_ptr + pid_s.to(tl.int64) * C * K + rc[:, None] * K + rk[None, :], acc,
             mask=c_ok[:, None] & k_ok[None, :])


@triton.jit(do_not_specialize=SEED_ARGS)
def mask_kernel(out_ptr, owner_ptr, table_ptr, G, S, seed_ptr, seed0, seed1, seed2, seed3, seed4, seed5, seed6,
                seed7, N, K, BM: tl.constexpr, BK: tl.constexpr, MANY_SEEDS: tl.constexpr):
    """out [N, K] int8: the keep-mask the other kernels apply, written out (tests, references)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    m_ok = rm < N
    seed, row, thr = _row_draws(owner_ptr, table_ptr, G, S, seed_ptr, seed0, seed1, seed2, seed3, seed4, seed5,
                                seed6, seed7, rm, m_ok, MANY_SEEDS)
    keep = _unpack(_keep_bytes(seed, row, thr, pid_k * BK, BM, BK), BM, BK)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], keep.to(tl.int8),
             mask=m_ok[:, None] & (rk < K)[None, :])
