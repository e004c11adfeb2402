"""Would extending the frozen base's GEMMs by the LoRA columns beat the separate B passes?

The triton/fused kernels add the LoRA B product through memory: forward writes
delta = h @ B^T (one full-width tensor per projection) and the base GEMM reads it back as its
addend; backward reads every output gradient once more for dh = dy @ B. Both passes could go:

    forward   out       = [x | h] @ [W | B]^T      (K grows by C = adapters x rank)
    backward  [dx | dh] = dy @ [W | B]             (N grows by C)

with the frozen weight stored as [W | B] (B's columns refreshed from the fp32 adapters each
step) and x written into a buffer that has room for h beside it. This script times only the
GEMMs, per projection of a named shape, both ways, so the plumbing is built only if cuBLAS
makes the wider GEMMs cheaper than the passes they replace. It does not change mlora.

    python benchmarks/bench_kext.py [--out kext.json]        # CUDA: tinyllama-1.1b, llama2-7b
    python benchmarks/bench_kext.py --tiny                   # CPU smoke run (checks the math)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import DEFAULT_ROWS, SHAPES  # noqa: E402  (the shapes it benchmarks)

SEQ = 512


def tokens_of(shape: str) -> int:
    """Tokens of bench_throughput's 4-adapter step of `shape` (the tiny one: a few dozen)."""
    return 96 if shape == "tiny" else 4 * DEFAULT_ROWS[shape] * SEQ


def projections(shape: str) -> dict[str, tuple[int, int]]:
    """{name: (in, out)} of one decoder layer's seven LoRA targets."""
    hidden, inter, _, heads, kv_heads, _ = SHAPES[shape]
    kv = hidden // heads * kv_heads
    return {"q": (hidden, hidden), "k": (hidden, kv), "v": (hidden, kv), "o": (hidden, hidden),
            "gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}


def timed(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of fn() over reps runs (CUDA events on a GPU, wall clock on CPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def one_projection(tokens: int, k: int, n: int, c: int, device, dtype, reps: int) -> dict:
    """Times of the base GEMMs alone, today's passes and the K-extended GEMMs for one target."""
    g = torch.Generator(device=device).manual_seed(0)
    xh = torch.randn(tokens, k + c, device=device, dtype=dtype, generator=g)  # [T, K + C]: x | h
    wb = torch.randn(n, k + c, device=device, dtype=dtype, generator=g) / k ** 0.5  # [N, K + C]: W | B
    dy = torch.randn(tokens, n, device=device, dtype=dtype, generator=g)  # [T, N]
    x, h = xh[:, :k], xh[:, k:]  # views: x's rows are K + C apart
    w, b = wb[:, :k], wb[:, k:]
    w_plain, x_plain, h_plain, b_plain = w.contiguous(), x.contiguous(), h.contiguous(), b.contiguous()
    out = torch.empty(tokens, n, device=device, dtype=dtype)
    dxh = torch.zeros(tokens, k + c, device=device, dtype=dtype)  # [T, K + C]: dx | dh
    dx = torch.zeros(tokens, k, device=device, dtype=dtype)

    # The math first: the extended GEMMs equal today's two passes (up to rounding).
    today = torch.addmm(torch.mm(h_plain, b_plain.t()), x_plain, w_plain.t())
    extended = torch.mm(xh, wb.t())
    scale = today.float().abs().max().clamp_min(1e-6)
    err = ((today.float() - extended.float()).abs().max() / scale).item()

    def fwd_base():
        torch.mm(x_plain, w_plain.t(), out=out)

    def fwd_today():  # delta written, read back as the base GEMM's addend
        torch.addmm(torch.mm(h_plain, b_plain.t()), x_plain, w_plain.t(), out=out)

    def fwd_ext():
        torch.mm(xh, wb.t(), out=out)

    def bwd_base():
        dx.addmm_(dy, w_plain)

    def bwd_today():  # dh from its own pass over dy, then dy @ W accumulated into dx
        torch.mm(dy, b_plain)
        dx.addmm_(dy, w_plain)

    def bwd_ext():  # one pass over dy gives dx (accumulated) and dh beside it
        dxh.addmm_(dy, wb)

    def bwd_ext_strided_w():  # the frozen base's own dx GEMM reading W as a view of [W | B]
        dx.addmm_(dy, w)

    times = {name: timed(fn, device, reps) for name, fn in [
        ("fwd_base", fwd_base), ("fwd_today", fwd_today), ("fwd_ext", fwd_ext),
        ("bwd_base", bwd_base), ("bwd_today", bwd_today), ("bwd_ext", bwd_ext),
        ("bwd_base_strided_w", bwd_ext_strided_w)]}
    return {"in": k, "out": n, "C": c, "max_rel_err": err, **{f"{k_}_ms": v for k_, v in times.items()}}


def run(shape: str, cs: list[int], device, dtype, reps: int) -> list[dict]:
    layers, tokens = SHAPES[shape][2], tokens_of(shape)
    results = []
    for c in cs:
        per = {name: one_projection(tokens, k, n, c, device, dtype, reps)
               for name, (k, n) in projections(shape).items()}
        keys = [k for k in next(iter(per.values())) if k.endswith("_ms")]
        layer = {k: sum(p[k] for p in per.values()) for k in keys}
        entry = {"shape": shape, "tokens": tokens, "C": c, "layers": layers,
                 "per_projection": per,
                 "layer_ms": layer,
                 # what a step would save, all seven targets (o's and v's x would need a copy
                 # into a wider buffer, so the forward saving of q, k, gate, up, down alone is
                 # the realistic one; both are given)
                 "step_saving_ms_fwd_all": layers * (layer["fwd_today_ms"] - layer["fwd_ext_ms"]),
                 "step_saving_ms_fwd_qk_mlp": layers * sum(
                     per[p]["fwd_today_ms"] - per[p]["fwd_ext_ms"] for p in ("q", "k", "gate", "up", "down")),
                 "step_saving_ms_bwd": layers * (layer["bwd_today_ms"] - layer["bwd_ext_ms"]),
                 "max_rel_err": max(p["max_rel_err"] for p in per.values())}
        print(json.dumps({k: v for k, v in entry.items() if k != "per_projection"}), flush=True)
        results.append(entry)
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny shape")
    p.add_argument("--shapes", default="tinyllama-1.1b,llama2-7b")
    p.add_argument("--columns", default="16,64,128", help="C = adapters x rank values to try")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.tiny:
        device, dtype, shapes, reps = torch.device("cpu"), torch.float32, ["tiny"], 2
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_kext.py: no CUDA device (use --tiny for the CPU smoke run)")
        device, dtype, shapes, reps = torch.device("cuda"), torch.bfloat16, a.shapes.split(","), a.reps
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype), "runs": []}
    for shape in shapes:
        if shape not in SHAPES:
            sys.exit(f"bench_kext.py: unknown shape {shape!r} (known: {', '.join(SHAPES)})")
        result["runs"] += run(shape, [int(c) for c in a.columns.split(",")], device, dtype, reps)
        if a.out:
            a.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
