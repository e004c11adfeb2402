"""Host time of a training step: what the CPU spends to dispatch one forward + backward (and
the adapters' optimizer steps) when the math itself costs next to nothing.

TinyLlama-1.1B's 22 decoder layers at a tiny width (hidden 64) and a handful of tokens, so the
time measured is dispatch and Python, the part that does not shrink on a faster GPU: on a GPU
the host must queue a step's kernels faster than the GPU runs them, or the GPU waits (the
profile in bench_throughput.py says how busy it was). One thread, best of several repeats.

    python benchmarks/bench_host.py                 # writes benchmarks/results/host.json
    python benchmarks/bench_host.py --quick         # seconds (tested in CI)

Figures: benchmarks/THROUGHPUT.md ("Host time").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_throughput as bt  # noqa: E402
import mlora.lora as lora_module  # noqa: E402
from mlora.lora import AdapterRows  # noqa: E402
from mlora.loss import head_loss_sums  # noqa: E402

# TinyLlama's depth and head layout at a width where the math is negligible.
bt.SHAPES.setdefault("host", (64, 176, 22, 4, 2, 512))
SEQ = 8


def best_ms(fn, steps: int, repeats: int) -> float:
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - start) / steps)
    return best * 1e3


def measure(steps: int, repeats: int, kernel: str = "auto", dtype: torch.dtype = torch.float32) -> dict:
    """dtype: the activations' (bf16 adds what a GPU run does besides: the weights' casts)."""
    torch.set_num_threads(1)
    bench = bt.MloraBench("host", bt.Settings(seq=SEQ, dropout=0.05), torch.device("cpu"), dtype)
    vocab = bench.cfg.vocab_size
    out = {"kernel": kernel, "layers": bt.SHAPES["host"][2], "tokens_per_row": SEQ, "dtype": str(dtype).split(".")[-1]}
    previous, lora_module.kernel = lora_module.kernel, kernel
    try:
        for n in (1, 4):
            adapters = bench.adapters(n, 1, 0.05)
            ids = bt.batch(n, SEQ, vocab, torch.device("cpu"), seed=n)
            rows = [AdapterRows(a.name, i, i + 1) for i, a in enumerate(adapters)]
            counts, targets = bt.every_token_a_target(rows, SEQ, torch.device("cpu"))
            bench.model.train()

            def forward_backward():
                bench.layout.rows = rows
                sums = head_loss_sums(bench.model, bench.model(ids, head=False), ids, rows, counts, targets)
                sum(ce / count for ce, count in sums.values()).backward()

            def optimizer_steps():
                for a in adapters:
                    for p in a.parameters():
                        p.grad = torch.zeros_like(p)
                for a in adapters:
                    a.step_on_device()

            def train_step():  # what the benchmark's every step is: weights cast again after the last
                forward_backward()
                for a in adapters:
                    a.step_on_device()

            # fwd_bwd: later micro-batches of one step (the weights' casts kept, the gradients
            # accumulated); optimizer_steps: the steps alone (on gradients set to zeros, which
            # is part of the time); train_step: forward, backward and the adapters' steps.
            out[f"fwd_bwd_ms_{n}_adapters"] = best_ms(forward_backward, steps, repeats)
            out[f"optimizer_steps_ms_{n}_adapters"] = best_ms(optimizer_steps, steps, repeats)
            out[f"train_step_ms_{n}_adapters"] = best_ms(train_step, steps, repeats)
            bench.layout.rows = []
            bench.detach(adapters)
        frozen, undo = bench.frozen_step(4, seed=0)
        try:
            out["fwd_bwd_ms_frozen_base"] = best_ms(frozen, steps, repeats)
        finally:
            undo()
    finally:
        lora_module.kernel = previous
    return out


def measure_batching(steps: int, repeats: int) -> dict:
    """Host time to build one fused batch as the trainer does (fuse, then the copy to the
    device; here the CPU): 4 adapters x 8 examples of 256..512 tokens, one adapter left-padded,
    and the same packed into rows of 512. On a GPU this is time the device waits after the
    step's one read, before the next step's first kernel."""
    import random

    from mlora.batching import MicroBatch, fuse
    from mlora.data import Example

    rng = random.Random(0)
    parts = []
    for a in range(4):
        examples = []
        for _ in range(8):
            n = rng.randrange(256, 513)
            ids = [rng.randrange(32000) for _ in range(n)]
            examples.append(Example(ids, [-100] * (n // 2) + ids[n // 2:]))
        parts.append(MicroBatch(f"a{a}", examples, 0, 0, sum(ex.num_label_tokens for ex in examples), True,
                                "left" if a == 1 else "right"))
    cpu = torch.device("cpu")
    return {"batch_ms_4x8x512": best_ms(lambda: fuse(parts, 0).to(cpu), steps, repeats),
            "batch_ms_4x8x512_packed": best_ms(lambda: fuse(parts, 0, pack_len=512).to(cpu), steps, repeats)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps, for CI")
    p.add_argument("--kernels", default="auto,dense")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="activation dtype (a GPU run's is bfloat16: it adds the weights' casts)")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/host.json; none with --quick)")
    args = p.parse_args(argv)
    steps, repeats = (2, 1) if args.quick else (30, 5)
    result = {"meta": {"torch": torch.__version__, "threads": 1, "steps": steps, "repeats": repeats,
                       "date": time.strftime("%Y-%m-%d")},
              "runs": [measure(steps, repeats, kernel, getattr(torch, args.dtype))
                       for kernel in args.kernels.split(",")],
              "batching": measure_batching(steps, repeats)}
    print(json.dumps({k: round(v, 2) for k, v in result["batching"].items()}))
    for run in result["runs"]:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in run.items()}))
    out = args.out or (None if args.quick else str(Path(__file__).resolve().parent / "results" / "host.json"))
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
