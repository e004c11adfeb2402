"""Where a fused training step's host time goes, on the device it runs on (cProfile).

At 1 and 2 adapters a TinyLlama step on the H200 is bound by the host: 1 x 8 rows took
107-130 ms where the frozen base at 8 rows takes 53-56 (THROUGHPUT.md), and bench_host.py,
on a CPU, sees only part of why (no CUDA launches, no Triton launcher). This runs
bench_throughput's step (forward, loss, backward, every adapter's step queued on the device,
one read at the end) under cProfile and splits its wall time into the final read's wait for
the device and the rest, the host's own work: where the host's work is most of the step, the
step is bound by the host, and the functions listed say by what.

    python benchmarks/profile_host.py --out DIR                 # on the GPU (gpu_session.sh 2)
    python benchmarks/profile_host.py --tiny --device cpu       # seconds (tested in CI)

Writes DIR/host_profile.json (per adapter count: wall, read wait and host ms per step) and
DIR/host_profile.txt (the top functions by own time and by cumulative time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_throughput as bt  # noqa: E402
import mlora.lora as lora_module  # noqa: E402

# What the step waits for the device in: its one read (bench_throughput.MloraBench.fused_step),
# by cProfile's exact names of the built-ins (a substring would also take dict.items, and
# torch.cuda.synchronize's Python wrapper beside the built-in it calls: counted twice).
_READS = ("<method 'tolist' of 'torch._C.TensorBase' objects>", "<method 'item' of 'torch._C.TensorBase' objects>")


def _read_wait_seconds(stats: pstats.Stats) -> float:
    return sum(cumulative for (_, _, name), (_, _, _, cumulative, _) in stats.stats.items()
               if name in _READS or "_cuda_synchronize" in name)


def profile(shape: str, n: int, rows: int, steps: int, device: torch.device, dtype: torch.dtype,
            seq: int) -> tuple[dict, str]:
    bench = bt.MloraBench(shape, bt.Settings(seq=seq), device, dtype)
    step, adapters = bench.fused_step(n, rows, bench.s.dropout)
    try:
        for _ in range(3):  # allocator, casts, Triton's compilation, cached plans
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        for _ in range(steps):
            step()
        profiler.disable()
        wall = (time.perf_counter() - start) / steps
        stats = pstats.Stats(profiler)
        wait = _read_wait_seconds(stats) / steps
        text = io.StringIO()
        for order in ("tottime", "cumulative"):
            pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(30)
        figures = {"adapters": n, "rows_per_adapter": rows, "kernel": lora_module.kernel,
                   "wall_ms_per_step": round(wall * 1e3, 2), "read_wait_ms_per_step": round(wait * 1e3, 2),
                   "host_ms_per_step": round((wall - wait) * 1e3, 2)}
        return figures, text.getvalue()
    finally:
        bench.layout.rows = []
        bench.detach(adapters)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tinyllama-1.1b", choices=[s for s in bt.SHAPES if not s.startswith("_")])
    p.add_argument("--adapters", default="1,2")
    p.add_argument("--rows", type=int, default=None, help="rows per adapter (default: the benchmark's)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny shape, short rows, 2 steps (CPU smoke run)")
    p.add_argument("--out", default=None, help="directory for host_profile.json and .txt")
    args = p.parse_args(argv)
    if args.tiny:
        args.shape, args.seq, args.steps = "tiny", 32, 2
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = args.rows or bt.DEFAULT_ROWS[args.shape]
    result = {"meta": {"shape": args.shape, "seq": args.seq, "steps": args.steps, "device": str(device),
                       "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}, "runs": []}
    texts = []
    for n in (int(a) for a in args.adapters.split(",")):
        figures, text = profile(args.shape, n, rows, args.steps, device, dtype, args.seq)
        print(json.dumps(figures), flush=True)
        result["runs"].append(figures)
        texts.append(f"== {n} adapter(s) x {rows} rows: {json.dumps(figures)}\n{text}")
        if args.out:  # after every run: a timeout keeps what ran
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "host_profile.json").write_text(json.dumps(result, indent=1))
            (out / "host_profile.txt").write_text("\n".join(texts))
    return result


if __name__ == "__main__":
    main()
