"""The `triton` LoRA kernel's dropout side: the fused op (lora_fused.py) with the keep-mask
drawn inside a Triton kernel instead of by torch.

Why. With dropout, the fused op spends per input group [N, in] and step: a bool mask written
and read three times, a dropped-out copy of the input written and read (kept for the
backward), and a separate masking pass over the input gradient - about 11 bytes per input
value of memory traffic, next to the 2 it needs to read the input once (benchmarks/
THROUGHPUT.md). Here (philox_kernels.py):
    down:      h  = ((x * keep) @ A^T) * factor    reads x once, draws the mask, writes it as bits
    up_masked: dx = (dh @ A) * keep                 the LoRA part of the input gradient
    grad_a:    dA = dh^T @ (x * keep)               reads the saved x, not a copy
The op keeps x itself for the backward (often kept anyway: SDPA keeps o_proj's input) and
the mask as bits (1/16 of x in bf16). `down` draws every element once from a counter-based
generator; the backward's kernels read the bits. (A first version drew the mask again in
each backward kernel, keeping nothing: three draws of every element a step, integer work
that bounds these kernels rather than their memory traffic. One draw and two reads of bits
issue about a third fewer instructions per element: scripts/compile_triton_kernels.py --cost,
benchmarks/RESULTS.md.)

What changes for the user: the masks are other draws than torch's bernoulli (same
distribution; the rate is rounded to a multiple of 1/65536, 0.05 -> 0.0500031, while the
1/(1-p) rescaling keeps p: a bias of 3e-6). Each adapter still draws from its own generator
(one 62-bit seed per input group and step), so an adapter's masks do not depend on the other
adapters of its batch, and a resumed or recomputed step redraws the same ones.

The seeds are drawn on the host and passed to the kernel as scalar arguments (`draw_seed`):
drawing each on the device, one small launch per adapter, made 352 of a TinyLlama step's
~4,200 launches at 4 adapters (22 layers x 4 input groups x 4), host time and gaps on the
device where the host is the bottleneck already. A CUDA generator's next seed is mixed from
its seed and Philox offset, which it then advances: host reads and writes of its state (no
sync), which get_state/set_state save and restore with the rest, so recompute, OOM retries
and checkpoints replay them as they replay torch's draws.

Runs on CUDA (compiled) and, for the tests, on the CPU under Triton's interpreter
(TRITON_INTERPRET=1 before the first use).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch

from mlora.device import current_on, upload

if TYPE_CHECKING:  # lora_fused imports this module
    from mlora.lora_fused import DropoutRows

# A kept draw is >= round(p * 2**16) (philox_kernels.py).
DRAW_LEVELS = 1 << 16

# Seeds are 62-bit. Passed with bit 62 set, every seed is an i64 kernel argument of one Triton
# signature (philox_kernels.py clears it): Triton types integers by value, so a seed under 2**31
# would otherwise compile an i32 variant of the kernel.
SEED_TAG = 1 << 62
# Seeds passed as scalar arguments (philox_kernels' seed0 .. seed7); a call with more adapters
# passes them as a tensor.
SCALAR_SEEDS = 8
# A CUDA generator's Philox offset moves in multiples of 4 (set_offset refuses others).
OFFSET_STEP = 4


# Triton's interpreter before 3.9 fails on these kernels' loops with numpy 2 (compiled, 3.6 works).
INTERPRETER_MIN_TRITON = (3, 9)


# Shared memory per block the kernels' largest tiles need (bf16 grad_a at C >= 256: 146 KiB;
# scripts/compile_triton_kernels.py prints each kernel's, and its test holds them under this).
# Hopper and data-centre Blackwell let a block have 227 KiB; consumer Blackwell (compute
# capability 12.x, the RTX 50 series) only 99 KiB: the kernels cannot launch there.
SHARED_BYTES = 150 * 1024


def unavailable(device: torch.device | None = None) -> str | None:
    """Why the triton kernel cannot run on `device` (None: any device), or None if it can."""
    if importlib.util.find_spec("triton") is None:
        return "it needs the triton package (pip install triton; CUDA builds of torch bring it)"
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        # bytes. ROCm builds lack the opt-in figure: their block's whole LDS is
        # shared_memory_per_block (64 KiB on MI200/MI300), as torch's own Triton heuristics read it
        shared = getattr(props, "shared_memory_per_block_optin", None)
        if shared is None:
            shared = getattr(props, "shared_memory_per_block", None)
        if shared is not None and shared < SHARED_BYTES:
            return (f"its kernels need {SHARED_BYTES // 1024} KiB of shared memory per block and {props.name} "
                    f"offers {shared // 1024} KiB")
    if device is not None and device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return f"it runs on CUDA devices, not {device.type} (TRITON_INTERPRET=1 runs it on the CPU, slowly)"
        version = importlib.metadata.version("triton")
        if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < INTERPRETER_MIN_TRITON:
            return f"Triton's interpreter needs triton >= 3.9 to run it on the {device.type}, not {version}"
    return None


@functools.cache
def _kernels():
    from mlora import philox_kernels

    return philox_kernels


def threshold(p: float) -> int:
    """The 16-bit draw below which an element drops out, for dropout rate p."""
    return min(DRAW_LEVELS - 1, round(p * DRAW_LEVELS))


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    """splitmix64 (Steele, Lea and Flood 2014): a bijection of 64-bit integers that maps
    neighbouring inputs to unrelated-looking outputs."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def offset_seed(g) -> int:
    """The next 62-bit seed of a generator with a Philox offset (CUDA's; anything with
    initial_seed, get_offset and set_offset): mixed from its seed and offset, which then moves
    on by OFFSET_STEP. Its state (seed, offset) decides the seed, so a restored state redraws
    it; neighbouring offsets, and generators of neighbouring seeds (an adapter's layers), give
    unrelated seeds (splitmix64 of both; its top 62 bits kept)."""
    offset = g.get_offset()
    g.set_offset(offset + OFFSET_STEP)
    return _splitmix64(_splitmix64(g.initial_seed()) ^ offset) >> 2


def draw_seed(g: torch.Generator) -> int:
    """This call's 62-bit seed from an adapter's generator, on the host."""
    if g.device.type == "cuda":  # no device op: host reads and writes of its state
        return offset_seed(g)
    # A CPU generator (the tests) draws what the seed's launch drew before seeds moved to the
    # host, so masks are those of earlier versions; a CPU op, host work on a GPU machine, no
    # sync. Another device's generator (no known offset): drawn there and read back, a sync.
    seed = torch.empty((), dtype=torch.int64, device=g.device).random_(0, 1 << 62, generator=g)
    return int(seed.item())


@dataclass
class PhiloxDropout:
    """Where the kernels find each token's draw. owner [N] int32: the token's adapter (an
    index into the tables) or -1, no dropout; table [4, G] int32: per adapter its first batch
    row, threshold, own row length and the offset of its tokens in a batch row; seeds: G
    host ints of 62 bits, this call's; seed_table [G] int64 on the device (tagged, SEED_TAG):
    the seeds for more than SCALAR_SEEDS adapters, None for fewer (the kernels take them as
    scalars). seq: the batch's row length. A token at (batch row b, position s) of adapter g
    draws at index (b - first_row[g]) * length[g] + (s - offset[g]): its index in the adapter's
    own layout, the same whether it trains alone or in a longer batch."""

    owner: torch.Tensor
    table: torch.Tensor
    seeds: tuple[int, ...]
    seq: int
    seed_table: torch.Tensor | None = None
    # Where the seeds came from, for undraw: the generators, and each one's state before its
    # seed (None for a CUDA generator: its seed moved its offset by OFFSET_STEP)
    generators: tuple[torch.Generator, ...] = ()
    states_before: tuple[torch.Tensor | None, ...] = ()

    def __post_init__(self):
        assert len(self.seeds) == self.table.shape[1], "one seed per adapter"
        assert all(0 <= s < SEED_TAG for s in self.seeds), "62-bit seeds"
        if len(self.seeds) > SCALAR_SEEDS and self.seed_table is None:  # one upload, not one per adapter
            self.seed_table = upload(torch.tensor([s | SEED_TAG for s in self.seeds], dtype=torch.int64),
                                     self.owner.device)

    @property
    def many_seeds(self) -> bool:
        """The kernels' MANY_SEEDS: they read the seeds from seed_table."""
        return self.seed_table is not None

    def args(self) -> tuple:
        """The kernels' arguments owner_ptr, table_ptr, G, S, seed_ptr, seed0 .. seed7 (unused
        scalars: SEED_TAG, a seed of 0)."""
        scalars = (SEED_TAG,) * SCALAR_SEEDS
        if not self.many_seeds:
            scalars = tuple(s | SEED_TAG for s in self.seeds) + scalars[len(self.seeds):]
        return self.owner, self.table, self.table.shape[1], self.seq, self.seed_table, *scalars

    def undraw(self) -> None:
        """Put the generators back where they were before this plan's seeds: a call whose
        kernel failed then draws torch's mask from where the fused kernel would have drawn it
        (lora_fused._fall_back), as its recomputation does."""
        _put_back(self.generators, self.states_before)


@functools.lru_cache(maxsize=16)
def _tables(ranges: tuple, seq: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """owner [N] and table [4, G] for dropout ranges ((start, end, p, length, offset), ...) in
    tokens: the same for every layer of a batch layout, so made once (a host-to-device copy
    each)."""
    from mlora.lora_fused import row_owner  # (lora_fused imports this module)

    owner = row_owner(tuple((start // seq, end // seq) for start, end, *_ in ranges), seq, n, device)
    table = torch.tensor([[start // seq for start, *_ in ranges],
                          [threshold(p) for _, _, p, _, _ in ranges],
                          [length for *_, length, _ in ranges],
                          [offset for *_, offset in ranges]], dtype=torch.int32)  # [4, G]
    return owner, upload(table, device)


def tables(dropout: list[DropoutRows], n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(owner, table, seq) of `draw`'s plans for these dropout ranges over token rows [0, n):
    the same for every call of one batch layout (the fused op keeps them on its spec, so a
    call does not work them out again)."""
    seq = dropout[0].seq or 1
    assert all((d.seq or 1) == seq for d in dropout), "one batch, one row length"
    ranges = tuple((d.start, d.end, d.p, d.length or seq, d.offset) for d in dropout)
    return *_tables(ranges, seq, n, device), seq


def draw(dropout: list[DropoutRows], n: int, device: torch.device,
         layout: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> PhiloxDropout:
    """This call's draw plan for token rows [0, n): one seed from each adapter's generator,
    drawn on the host (draw_seed). DropoutRows without a row length (seq 0) are taken as rows
    of one token: a token's index is then its offset from the range's start. layout: `tables`
    of the same arguments, where the caller kept them."""
    owner, table, seq = layout or tables(dropout, n, device)
    generators = tuple(d.generator for d in dropout)
    seeds, states = [], []
    try:
        for g in generators:
            seed, state = _seed_and_state(g)
            seeds.append(seed)
            states.append(state)
    except BaseException:  # (a CUDA generator without get_offset) the generators as before
        _put_back(generators[:len(seeds)], tuple(states))
        raise
    return PhiloxDropout(owner, table, tuple(seeds), seq, generators=generators, states_before=tuple(states))


def _seed_and_state(g: torch.Generator) -> tuple[int, torch.Tensor | None]:
    """draw_seed(g), and g's state before it where undoing it needs that: a CPU generator's seed
    is a draw (the tests' case); a CUDA generator's, an offset step (None)."""
    if g.device.type == "cuda":
        return offset_seed(g), None
    state = g.get_state()
    return draw_seed(g), state


def _put_back(generators: tuple[torch.Generator, ...], states: tuple[torch.Tensor | None, ...]) -> None:
    """Undo one draw_seed of each of `generators`; `states`: each one's state before it, None
    for a CUDA generator (draw_seed moved its offset by OFFSET_STEP). Last first, so a
    generator listed twice ends at its first state."""
    for g, state in reversed(list(zip(generators, states))):
        if state is None:
            g.set_offset(g.get_offset() - OFFSET_STEP)
        else:
            g.set_state(state)


def clear_caches() -> None:
    """Forget the per-layout tables (lora.clear_lora_caches, e.g. before an OOM retry)."""
    _tables.cache_clear()


def _pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, 1 << max(0, (n - 1).bit_length())))


# Launch settings per kernel, for C columns of h and 16- or 32-bit operands: the constexprs
# and num_warps (scripts/compile_triton_kernels.py compiles exactly these for a GPU target).
# Register counts from ptxas (sm_90, triton 3.6): 8 warps keep the widest tiles on wgmma
# without spilling; fp32 operands (FMA, not tensor cores) need narrower tiles.


def down_config(C: int, fp32: bool) -> dict:
    # The whole C in one tile where it fits: x is read (and its mask drawn) once per tile of C.
    BC = _pow2(C, 16, 128 if fp32 else 256)
    # Computed transposed where the tile of C is wgmma's M of 64 or more, in 16 bits only: fp32
    # operands (FMA) spill registers in that form (philox_kernels.down_kernel)
    return dict(BM=64, BC=BC, BK=32 if fp32 else 64, num_warps=8 if BC >= 128 else 4,
                TRANS=not fp32 and BC >= 64)


def up_masked_config(C: int, fp32: bool) -> dict:
    # Large output tiles: the epilogue (the bits unpacked into the accumulator's layout, the
    # masking, the store's layout change) is a fixed cost per tile, most of this kernel's
    # instructions at 64 x 128 (0.87 per element at C = 192, 0.38 at 128 x 256; RESULTS.md).
    if fp32:
        return dict(BM=64, BK=128, BC=_pow2(C, 16, 64), num_warps=8)
    return dict(BM=128, BK=256, BC=_pow2(C, 16, 64), num_warps=8)


def grad_a_config(C: int, fp32: bool) -> dict:
    # The whole C in one tile where it fits (x read and masked once per tile of C); 128 columns
    # of x a tile, so that each [BT, C] tile of dh loaded serves twice as many (0.50 -> 0.32
    # instructions per element at C = 192).
    if fp32:
        return dict(BC=_pow2(C, 16, 128), BK=64, BT=16, num_warps=8)
    return dict(BC=_pow2(C, 16, 256), BK=128, BT=64, num_warps=8)


MASK_CONFIG = dict(BM=32, BK=64)


def down(x2d: torch.Tensor, a_all: torch.Tensor, factor: torch.Tensor,
         plan: PhiloxDropout) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, bits): h [N, C] = ((x2d * keep) @ a_all^T) * factor, in x2d's dtype (factor [C] or
    [N, C] fp32), and the keep-mask it applied, bits [N, ceil(K / 8)] uint8 (philox_kernels.py;
    `unpack` writes them out), for up_masked and grad_a."""
    N, K = x2d.shape
    C = a_all.shape[0]
    a_all = a_all.contiguous()
    factor = factor.contiguous()
    config, grid, W = _down_launch(N, K, C, x2d.dtype == torch.float32)
    h = torch.empty(N, C, dtype=x2d.dtype, device=x2d.device)
    bits = torch.empty(N, W, dtype=torch.uint8, device=x2d.device)
    with current_on(x2d.device):
        _kernels().down_kernel[grid](x2d, a_all, factor, h, bits, *plan.args(), N, K, C, W,
                                     x2d.stride(0), x2d.stride(1), factor.stride(0) if factor.dim() == 2 else 0,
                                     IEEE=_ieee(x2d), MANY_SEEDS=plan.many_seeds, **config)
    return h, bits


def unpack(bits: torch.Tensor, k: int) -> torch.Tensor:
    """The bool [N, k] keep-mask packed in bits [N, ceil(k / 8)] uint8 (tests, references)."""
    lanes = (bits[:, :, None] >> torch.arange(8, dtype=torch.uint8, device=bits.device)) & 1  # [N, W, 8]
    return lanes.reshape(bits.shape[0], -1)[:, :k].bool()


def up_masked(dh: torch.Tensor, a_all: torch.Tensor, bits: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """dx [N, K] = (dh @ a_all) * keep, in dh's dtype; dh [N, C], a_all [C, K], keep from
    `down`'s bits. config: launch settings other than up_masked_config's (benchmarks)."""
    N, C = dh.shape
    K = a_all.shape[1]
    a_all = a_all.contiguous()
    if dh.stride(1) != 1:
        dh = dh.contiguous()
    dx = torch.empty(N, K, dtype=dh.dtype, device=dh.device)
    config, grid = _up_masked_launch(N, K, C, dh.dtype == torch.float32, _frozen(config))
    with current_on(dh.device):
        _kernels().up_masked_kernel[grid](dh, a_all, dx, bits, N, K, C, bits.shape[1], dh.stride(0),
                                          IEEE=_ieee(dh), **config)
    return dx


def grad_a(dh: torch.Tensor, x2d: torch.Tensor, bits: torch.Tensor, splits: int | None = None,
           config: dict | None = None) -> torch.Tensor:
    """dA [C, K] fp32 = dh^T @ (x2d * keep), keep from `down`'s bits. The token dimension is split over `splits`
    programs per output tile (default: enough to fill the GPU) and the partial sums added.
    config: launch settings other than grad_a_config's (benchmarks)."""
    N, C = dh.shape
    K = x2d.shape[1]
    if N == 0:
        return torch.zeros(C, K, dtype=torch.float32, device=dh.device)
    if dh.stride(1) != 1:
        dh = dh.contiguous()
    config, grid, per_split = _grad_a_launch(N, K, C, dh.dtype == torch.float32, x2d.device, splits, _frozen(config))
    splits = grid[2]
    partial = torch.empty(splits, C, K, dtype=torch.float32, device=dh.device)
    with current_on(dh.device):
        _kernels().grad_a_kernel[grid](dh, x2d, partial, bits, N, K, C, bits.shape[1], dh.stride(0),
                                       x2d.stride(0), x2d.stride(1), per_split, IEEE=_ieee(dh), **config)
    return partial[0] if splits == 1 else partial.sum(0)


# Each kernel's launch settings and grid for its shapes, worked out once per shape, not per
# call: every layer of a step launches the same few (host time, which sets the pace of a
# small model's step on a GPU). `config` as a frozenset of its items (benchmarks' own), or None.


def _frozen(config: dict | None) -> frozenset | None:
    return frozenset(config.items()) if config else None


@functools.lru_cache(maxsize=64)
def _down_launch(N: int, K: int, C: int, fp32: bool) -> tuple[dict, tuple, int]:
    """(config, grid, W): W the bytes of one token's mask bits."""
    config = down_config(C, fp32)
    return config, (_cdiv(C, config["BC"]), _cdiv(N, config["BM"])), _cdiv(K, 8)


@functools.lru_cache(maxsize=64)
def _up_masked_launch(N: int, K: int, C: int, fp32: bool, config: frozenset | None) -> tuple[dict, tuple]:
    config = dict(config) if config is not None else up_masked_config(C, fp32)
    return config, (_cdiv(N, config["BM"]), _cdiv(K, config["BK"]))


@functools.lru_cache(maxsize=64)
def _grad_a_launch(N: int, K: int, C: int, fp32: bool, device: torch.device, splits: int | None,
                   config: frozenset | None) -> tuple[dict, tuple, int]:
    """(config, grid, tokens per split): the token dimension split over `splits` programs per
    output tile (None: enough to fill the GPU)."""
    config = dict(config) if config is not None else grad_a_config(C, fp32)
    BC, BK, BT = config["BC"], config["BK"], config["BT"]
    tiles = _cdiv(K, BK) * _cdiv(C, BC)
    if splits is None:
        programs = 2 * _multiprocessors(device)
        splits = max(1, min(_cdiv(N, 4 * BT), _cdiv(programs, tiles)))
    per_split = _cdiv(_cdiv(N, splits), BT) * BT
    return config, (_cdiv(K, BK), _cdiv(C, BC), _cdiv(N, per_split)), per_split


def keep_mask(plan: PhiloxDropout, n: int, k: int) -> torch.Tensor:
    """The bool [n, k] keep-mask `down` draws under `plan`, written out (tests, references)."""
    out = torch.empty(n, k, dtype=torch.int8, device=plan.owner.device)
    grid = (_cdiv(n, MASK_CONFIG["BM"]), _cdiv(k, MASK_CONFIG["BK"]))
    with current_on(out.device):
        _kernels().mask_kernel[grid](out, *plan.args(), n, k, MANY_SEEDS=plan.many_seeds, **MASK_CONFIG)
    return out.bool()


def _ieee(t: torch.Tensor) -> bool:
    """fp32 products in the dots: for fp32 operands, and under the interpreter (CPU)."""
    return t.dtype == torch.float32 or t.device.type != "cuda"


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
