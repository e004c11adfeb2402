"""The head and its cross-entropy alone, forward + backward to the hidden states: loss.py's
chunked head (on CUDA with loss_kernels' cross-entropy kernel, and with torch's ops) against the
whole-logits loss (the head on every token at once, the logits upcast to fp32, as transformers
and mlora before 2026-11-30 compute it). Peak memory and time per call,
for heads of named models' shapes (random weights built on the device, bf16 on CUDA).

    python benchmarks/bench_loss.py                     # on CUDA: 16 K tokens per shape
    python benchmarks/bench_loss.py --quick             # CPU, seconds, in chunks of 64 tokens (tested in CI)

Peak memory is torch.cuda.max_memory_allocated above what was allocated before the call on
CUDA; on the CPU every allocation is tracked (LiveBytes). The estimate is mlora.memory's for
the chunked head (what it keeps for the backward plus one chunk). Figures: THROUGHPUT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlora import kernel_fallback, memory  # noqa: E402
from mlora.data import IGNORE_INDEX  # noqa: E402
from mlora import loss  # noqa: E402
from mlora.models.llama import CausalLM, ModelArgs  # noqa: E402

# name: (vocabulary, hidden size)
HEADS = {
    "tinyllama-1.1b": (32000, 2048),
    "llama3-8b": (128256, 4096),
    "qwen2-7b": (152064, 3584),
    "tiny": (4096, 64),
}


class LiveBytes(TorchDispatchMode):
    """The most bytes of new storages alive at once among those made under the mode (CPU
    stand-in for max_memory_allocated; tests/test_memory.py has its twin)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs = WeakIdKeyDictionary()

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                storage = t.untyped_storage()
                if storage not in self.refs:
                    n = storage.nbytes()
                    self.refs[storage] = weakref.ref(storage, lambda _, n=n: self._freed(n))
                    self.live += n
                    self.peak = max(self.peak, self.live)
        return out


def whole_logits(model: CausalLM, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference: per-token CE [N] of the whole [N, V] logits, upcast."""
    return F.cross_entropy(model.logits(h).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def measure(loss_of, model: CausalLM, h: torch.Tensor, targets: torch.Tensor, repeats: int) -> dict:
    """Peak bytes beyond the inputs and best ms of one forward + backward of loss_of."""

    def call():
        x = h.detach().requires_grad_()
        loss_of(model, x, targets).sum().backward()
        return x.grad

    call()  # warm-up
    if h.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with LiveBytes() as tracked:
            call()
        peak = tracked.peak
    best = float("inf")
    for _ in range(repeats):
        if h.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if h.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return {"peak_mib": round(peak / 2**20, 1), "ms": round(best * 1e3, 2)}


def head_only(vocab: int, hidden: int, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """A frozen CausalLM of only a plain head (the final norm and lm_head), random, built on the device."""
    args = ModelArgs("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, num_layers=0,
                     num_heads=1, num_kv_heads=1, head_dim=hidden)
    with torch.device(device):
        return CausalLM(args, parts=["norm", "head"]).to(dtype).requires_grad_(False)


def run(name: str, tokens: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    vocab, hidden = HEADS[name]
    model = head_only(vocab, hidden, device, dtype)
    args = model.args
    with torch.device(device):
        h = torch.randn(tokens, hidden, dtype=dtype)
        targets = torch.randint(0, vocab, (tokens,))
    everyone = torch.arange(tokens, device=device)  # the trained positions: every token here

    def chunked_as_trained(model: CausalLM, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """loss.py as the trainer runs it: the trained positions gathered, then the chunks."""
        return loss.chunked_head_cross_entropy(model, x.index_select(0, everyone), targets.index_select(0, everyone))

    chunked = measure(chunked_as_trained, model, h, targets, repeats)  # (on CUDA: loss_kernels' kernel)
    previous, loss.cross_entropy = loss.cross_entropy, "torch"
    try:
        chunked_torch_ops = measure(chunked_as_trained, model, h, targets, repeats)
    finally:
        loss.cross_entropy = previous
    whole = measure(whole_logits, model, h, targets, repeats)
    e = torch.finfo(dtype).bits // 8
    kept, chunk = memory._head_bytes(args, e, tokens)
    estimate = kept + chunk - tokens * hidden * e  # (the final norm's output, h, is made before the measuring)
    return {"head": name, "tokens": tokens, "vocab": vocab, "hidden": hidden, "dtype": str(dtype).split(".")[-1],
            "cross_entropy_kernel": loss._fused_cross_entropy(model, h),
            "chunked": chunked, "chunked_torch_ops": chunked_torch_ops, "whole_logits": whole,
            "estimate_chunked_mib": round(estimate / 2**20, 1),
            "peak_ratio": round(chunked["peak_mib"] / whole["peak_mib"], 3),
            "time_ratio": round(chunked["ms"] / whole["ms"], 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the tiny head on the CPU in chunks of 64 tokens, in seconds")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--heads", default="tinyllama-1.1b,llama3-8b,qwen2-7b")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    opts = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not opts.quick
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    heads, tokens = (["tiny"], 640) if opts.quick else (opts.heads.split(","), opts.tokens)
    previous = loss.CHUNK_LOGITS_BYTES
    if opts.quick:  # ten chunks, as a large vocabulary has them
        loss.CHUNK_LOGITS_BYTES = 64 * HEADS["tiny"][0] * 4
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "chunk_logits_mib": (64 * HEADS["tiny"][0] * 4 if opts.quick else previous) / 2**20, "results": []}
    try:
        for name in heads:
            try:
                result = run(name, tokens, device, dtype, repeats=3 if opts.quick else 5)
            except Exception as err:  # noqa: BLE001 - one head's failure must not cost the others'
                result = {"head": name, "error": f"{type(err).__name__}: {memory._first_line(err)[:300]}"}
            if kernel_fallback.failures():  # `auto`'s kernel failed here: torch's ops ran in its place
                result["kernel_fallbacks"] = kernel_fallback.failures()
            report["results"].append(result)
            print(json.dumps(result), flush=True)
            if opts.out:  # after every head: a time limit keeps what ran
                Path(opts.out).write_text(json.dumps(report, indent=1) + "\n")
    finally:
        loss.CHUNK_LOGITS_BYTES = previous
    return report


if __name__ == "__main__":
    main()
