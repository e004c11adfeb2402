"""What the pipeline's out-of-memory guard on a stage's backward costs per micro-batch.

Each pipeline stage runs every micro-batch's backward under memory.grads_restored_on_error
(mlora/pipeline/stage_rows.py): the adapter's gradients accumulated so far are set aside, the
backward writes fresh ones, and at the end one foreach add sums them in. Without it the fused
LoRA op adds each group's gradients into the accumulated ones itself (lora_fused._accumulate),
so the arithmetic is the same; what the guard adds is its host work and that the sums run at
the end in one launch instead of one per group.

A middle stage of TinyLlama-1.1B's width (hidden 2048, intermediate 5632, 32/4 heads) with
--layers decoder layers, one adapter (a pipeline micro-batch carries one) of rank --r on all
seven projections, dropout 0.05, fp32 on the CPU. Per repeat, one forward and then its backward
from a random output gradient, guarded and unguarded in turn, gradients already accumulated (a
micro-batch after the first of a step, the case with an add). Also the guard alone: its enter
and exit around a block that only writes fresh gradients, and the foreach add alone, which the
unguarded backward makes too. Best of the repeats (a shared CPU's timings are noisy).

    .venv/bin/python benchmarks/bench_stage_grads_guard.py --out benchmarks/results/stage_grads_guard.json

Figures: benchmarks/PIPELINE.md ("The backward's out-of-memory guard").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlora import memory  # noqa: E402
from mlora.adapter import Adapter  # noqa: E402
from mlora.config import AdapterConfig  # noqa: E402
from mlora.lora import AdapterRows, BatchLayout, inject_lora  # noqa: E402
from mlora.models.llama import CausalLM, ModelArgs  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: (hidden, intermediate, heads, kv heads); "tiny" only checks that the script runs (its test)
SHAPES = {"tinyllama": (2048, 5632, 32, 4), "tiny": (64, 176, 4, 2)}


def stage(shape: str, layers: int, r: int):
    hidden, inter, heads, kv = SHAPES[shape]
    args = ModelArgs("llama", vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads)
    torch.manual_seed(0)
    model = CausalLM(args, parts=[f"layer.{i}" for i in range(layers)]).requires_grad_(False)
    for p in model.parameters():  # (random frozen weights of a plausible scale)
        p.normal_(0, 0.02)
    layout = BatchLayout()
    wrappers = inject_lora(model, layout)
    cfg = AdapterConfig(name="a", data="<bench>", r=r, alpha=2 * r, dropout=0.05, target_modules=TARGETS)
    adapter = Adapter(cfg, wrappers, seed=0, device=torch.device("cpu"))
    with torch.no_grad():  # B = 0 would make A's gradients 0
        for w in adapter.weights.values():
            w.lora_B.normal_(0, 0.01)
    model.train()
    return model, layout, adapter


def measure(shape: str, layers: int, r: int, rows: int, seq: int, repeats: int) -> dict:
    model, layout, adapter = stage(shape, layers, r)
    params = list(adapter.parameters())
    g = torch.Generator().manual_seed(1)
    hidden = SHAPES[shape][0]
    grad = torch.randn(rows, seq, hidden, generator=g)

    def backward(guarded: bool) -> float:
        layout.rows = [AdapterRows("a", 0, rows)]
        x = torch.randn(rows, seq, hidden, generator=g).requires_grad_(True)
        out = model(x, head=False)
        start = time.perf_counter()
        if guarded:
            with memory.grads_restored_on_error(params + [x]):
                out.backward(grad)
        else:
            out.backward(grad)
        return time.perf_counter() - start

    backward(False)  # warm-up, and gradients accumulated from here on
    times = {True: [], False: []}
    for i in range(repeats):
        for guarded in ((True, False) if i % 2 else (False, True)):
            times[guarded].append(backward(guarded))

    fresh = [torch.randn_like(p) for p in params]  # what a backward writes

    def guard_alone() -> float:
        start = time.perf_counter()
        with memory.grads_restored_on_error(params):
            for p, f in zip(params, fresh):
                p.grad = f
        return time.perf_counter() - start

    def add_alone() -> float:  # the sum itself, which an unguarded backward makes in the op
        start = time.perf_counter()
        torch._foreach_add_([p.grad for p in params], fresh)
        return time.perf_counter() - start

    guard = [guard_alone() for _ in range(20 * repeats)]
    add = [add_alone() for _ in range(20 * repeats)]
    ms = lambda xs: round(min(xs) * 1e3, 3)  # noqa: E731
    return {"shape": shape, "layers": layers, "r": r, "rows": rows, "seq": seq, "repeats": repeats,
            "lora_tensors": len(params), "lora_values": sum(p.numel() for p in params),
            "threads": torch.get_num_threads(),
            "backward_unguarded_ms": ms(times[False]), "backward_guarded_ms": ms(times[True]),
            "guard_alone_ms": ms(guard), "foreach_add_alone_ms": ms(add)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--r", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path)
    a = parser.parse_args(argv)
    results = [measure(a.shape, a.layers, r, a.rows, a.seq, a.repeats) for r in a.r]
    for row in results:
        print(json.dumps(row))
    if a.out:
        a.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
