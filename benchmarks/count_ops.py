"""Ops dispatched and activations saved by one fused training step, per LoRA kernel: the
device-independent part of "what does the LoRA side cost" (runs on CPU, in seconds).

Every op that reaches torch's dispatcher (views and bare allocations excluded: they launch
nothing) is one kernel launch on a GPU, and so
is each Triton kernel launch of the triton kernel (run here through Triton's interpreter; on
a GPU its A gradient splits the tokens over more programs at benchmark sizes and adds one sum
per group), so the count is the launch count a GPU would see, minus the optimizer (left out: on CUDA AdamW
is one fused launch per adapter). The triton kernel's dropout seeds are not counted either: on
a GPU they come from the CUDA generators' state on the host (lora_triton.draw_seed), while the
CPU generators here draw each with a CPU op. Saved bytes are what autograd keeps for the backward
(saved-tensor hooks; parameters excluded), the activations part of the memory model.

    python benchmarks/count_ops.py                     # tinyllama-1.1b layout, 2 layers
    python benchmarks/count_ops.py --shape tiny --rows 2 --seq 32

Reported per decoder layer, after subtracting the frozen base (no LoRA, input requiring
grad): the LoRA side's own ops and saved bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

# The triton kernel's Triton kernels run here through Triton's interpreter (before their import).
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_throughput as bt  # noqa: E402
import mlora.lora as lora_module  # noqa: E402
from mlora.lora import AdapterRows  # noqa: E402
from mlora.loss import head_loss_sums  # noqa: E402


# Allocations without a fill: the caching allocator's, no kernel launch.
_ALLOCATIONS = {"aten::empty", "aten::empty_like", "aten::empty_strided"}


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func._schema.name not in _ALLOCATIONS:
            self.ops += 1
        return func(*args, **(kwargs or {}))


class _CountedLaunches:
    """Stands in for mlora.philox_kernels: each Triton kernel launch counts as one op (what a
    GPU sees), and the interpreter's own tensor copies behind it are not counted."""

    def __init__(self, kernels, count: _CountOps):
        self._kernels, self._count = kernels, count

    def __getattr__(self, name):
        kernel = getattr(self._kernels, name)
        count = self._count

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    count.ops += 1
                    with _disable_current_modes():
                        return kernel[grid](*args, **kwargs)
                return launch

        return Launcher()


@contextlib.contextmanager
def _counting_triton(count: _CountOps):
    if importlib.util.find_spec("triton") is None:
        yield
        return
    from mlora import lora_triton

    real, real_seed = lora_triton._kernels, lora_triton.draw_seed

    def uncounted_seed(g):  # host work on a GPU (see the module docstring)
        with _disable_current_modes():
            return real_seed(g)

    lora_triton._kernels = lambda: _CountedLaunches(real(), count)
    lora_triton.draw_seed = uncounted_seed
    try:
        yield
    finally:
        lora_triton._kernels, lora_triton.draw_seed = real, real_seed


def _step_cost(model, ids, rows, params: set[int]) -> dict:
    """Ops of forward + loss + backward, and bytes saved for the backward."""
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with _CountOps() as count, _counting_triton(count):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = model(ids, head=False)
        sums = head_loss_sums(model, hidden, ids, rows)
        sum(ce / max(1, n) for ce, n in sums.values()).backward()
    return {"ops": count.ops, "saved_bytes": sum(saved.values())}


def measure(shape: str, layers: int, adapters: int, rows: int, seq: int, dropout: float,
            kernels: list[str], accumulate: bool = False) -> dict:
    """accumulate: the step measured is a later micro-batch of the same optimizer step (the
    weights unchanged since the previous forward), not the first after a weight update."""
    hidden, inter, _, heads, kv, vocab = bt.SHAPES[shape]
    bt.SHAPES["_count"] = (hidden, inter, layers, heads, kv, vocab)
    bench = bt.MloraBench("_count", bt.Settings(seq=seq), torch.device("cpu"), torch.bfloat16)
    model = bench.model
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = bt.batch(adapters * rows, seq, vocab, torch.device("cpu"), seed=0)

    embed = model.model.embed_tokens
    hook = embed.register_forward_hook(lambda m, i, out: out.requires_grad_())
    base = _step_cost(model, ids, [AdapterRows("base", 0, adapters * rows)], params)
    hook.remove()

    out = {"shape": shape, "layers": layers, "adapters": adapters, "rows": rows, "seq": seq,
           "dropout": dropout, "accumulate": accumulate,
           "frozen_base_per_layer": {k: v / layers for k, v in base.items()}}
    objs = bench.adapters(adapters, rows, dropout)
    params |= {p.untyped_storage().data_ptr() for a in objs for p in a.parameters()}
    layout = [AdapterRows(a.name, i * rows, (i + 1) * rows) for i, a in enumerate(objs)]
    model.train()
    previous = lora_module.kernel
    try:
        for kernel in kernels:
            lora_module.kernel = kernel
            bench.layout.rows = layout
            for _ in range(2):  # the first step builds the cached constants (row owners, factors)
                cost = _step_cost(model, ids, layout, params)
                with torch.no_grad():
                    for a in objs:
                        for p in a.parameters():
                            p.grad = None  # as after an optimizer step: no grad to add to
                            if not accumulate:
                                p.add_(0.0)  # ...and new weights (an in-place update), to cast again
            out[kernel] = {k: (cost[k] - base[k]) / layers for k in cost}
    finally:
        lora_module.kernel = previous
        bench.layout.rows = []
    return out


def _triton_runs() -> bool:
    from mlora.lora_triton import unavailable

    return unavailable(torch.device("cpu")) is None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tinyllama-1.1b", choices=[s for s in bt.SHAPES if not s.startswith("_")])
    p.add_argument("--layers", type=int, default=2, help="decoder layers to build (costs are per layer)")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rows", type=int, default=1, help="rows per adapter")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--kernels", default="fused,triton,dense,grouped,loop" if _triton_runs()
                   else "fused,dense,grouped,loop", help="triton needs the triton package (run interpreted here)")
    p.add_argument("--accumulate", action="store_true",
                   help="measure a later micro-batch of one optimizer step (weights unchanged)")
    args = p.parse_args(argv)
    result = measure(args.shape, args.layers, args.adapters, args.rows, args.seq, args.dropout,
                     args.kernels.split(","), args.accumulate)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
