"""Training throughput on one device: mlora with 1/2/4/8 fused adapters vs transformers + PEFT
(one adapter at a time) vs the frozen base alone (forward + backward, no LoRA: the bound).

All in ONE run on one device, random-initialised weights of a named shape built directly on
the device (speed does not depend on the values), bf16 (fp32 on the CPU; --dtype chooses),
sequence 512, LoRA r=16, alpha=32, dropout 0.05 on all seven projections, AdamW. Every adapter
gets the same rows per step, so "N adapters fused" processes N times the tokens of "one adapter"
per step. In fp16 mlora scales each adapter's loss as its trainer does (loss_scale.py); PEFT's
side runs unscaled (its speed is the same: the scale is one multiply and one divide a step).

    python benchmarks/bench_throughput.py                  # GPU: tinyllama-1.1b and llama2-7b
    python benchmarks/bench_throughput.py --dtype fp16     # the same in fp16
    python benchmarks/bench_throughput.py --tiny           # CPU, seconds: the CI smoke test

Writes JSON (every run, then the summary ratios) and, when matplotlib is installed, a PNG.
Useful TFLOP/s = 4 x matmul parameters x tokens/s (LoRA training: forward 2N, activation
gradients 2N; the frozen base gets no weight gradients). See benchmarks/THROUGHPUT.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlora.lora as lora_module  # noqa: E402
from mlora import kernel_fallback  # noqa: E402
from mlora.adapter import Adapter  # noqa: E402
from mlora.batching import trained_positions  # noqa: E402
from mlora.config import AdapterConfig  # noqa: E402
from mlora.device import resolve_dtype  # noqa: E402
from mlora.lora import TARGET_MODULES, AdapterRows, BatchLayout, clear_lora_caches, inject_lora  # noqa: E402
from mlora.loss import head_loss_sums  # noqa: E402
from mlora.loss_scale import needs_loss_scaling  # noqa: E402
from mlora.memory import _first_line  # noqa: E402
from mlora.models.llama import CausalLM, args_from_hf_config  # noqa: E402
from mlora.trainer import _scaled_loss  # noqa: E402

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "tiny": (64, 176, 2, 4, 2, 512),
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 32000),
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
}
# Rows of 512 tokens per adapter per step: 8 fills an H200 well for 1.1B; 7B gets 4 so that
# 8 fused adapters (32 rows) still fit next to the weights.
DEFAULT_ROWS = {"tiny": 2, "tinyllama-1.1b": 8, "llama2-7b": 4}


@dataclass
class Settings:
    seq: int
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    lr: float = 1e-4
    warmup: int = 2
    steps: int = 5


def hf_config(shape: str, seq: int):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                       max_position_embeddings=max(2048, seq), tie_word_embeddings=False,
                       use_cache=False)  # transformers would otherwise grow a KV cache in every training forward


def matmul_params(shape: str) -> int:
    """Parameters that do matmul work per token: every layer's projections and the head."""
    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    head_dim = hidden // heads
    attn = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    return layers * (attn + 3 * hidden * inter) + hidden * vocab


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(step, tokens_per_step: int, s: Settings, device: torch.device) -> dict:
    """Warm up, then time `s.steps` steps; peak memory over warm-up and timed steps."""
    free_memory(device)
    for _ in range(s.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(s.steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"tokens_per_step": tokens_per_step, "seconds": seconds,
            "tokens_per_s": tokens_per_step * s.steps / seconds, "peak_gib": peak}


def batch(rows: int, seq: int, vocab: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, seq), generator=g).to(device)  # [rows, S]


def every_token_a_target(layout_rows: list[AdapterRows], seq: int, device: torch.device):
    """(label counts, trained positions) of rows whose every token is a target (the ids are
    the labels), found on the host and uploaded once, as the trainer's FusedBatch.to gives
    them: the head runs on each row's tokens but its last."""
    rows = max(r.end for r in layout_rows)
    positions = trained_positions(torch.zeros(rows, seq, dtype=torch.long), layout_rows)
    return {r.name: (r.end - r.start) * (seq - 1) for r in layout_rows}, positions.to(device)


# ----------------------------------------------------------------------------- mlora


class MloraBench:
    """mlora's own model with adapters fused, stepping exactly as the trainer does: one forward
    over the fused batch, per-adapter token loss, one backward, each adapter clips and steps."""

    config_of = staticmethod(hf_config)  # (shape, seq) -> the transformers config of the shape

    def __init__(self, shape: str, s: Settings, device: torch.device, dtype: torch.dtype):
        self.shape, self.s, self.device, self.dtype = shape, s, device, dtype
        self.cfg = self.config_of(shape, s.seq)
        with torch.device(device):
            self.model = CausalLM(args_from_hf_config(self.cfg)).to(dtype)
        self.model.requires_grad_(False)
        self.layout = BatchLayout()
        self.wrappers = inject_lora(self.model, self.layout)

    def adapters(self, n: int, rows: int, dropout: float) -> list[Adapter]:
        out = []
        for i in range(n):
            cfg = AdapterConfig(name=f"a{i}", data="<bench>", r=self.s.r, alpha=self.s.alpha, dropout=dropout,
                                target_modules=list(TARGET_MODULES), batch_size=rows, micro_batch_size=rows,
                                lr=self.s.lr, max_grad_norm=1.0)
            out.append(Adapter(cfg, self.wrappers, seed=i, device=self.device, total_steps=1000,
                               loss_scaling=needs_loss_scaling(self.dtype, None)))
        return out

    def detach(self, adapters: list[Adapter]) -> None:
        # Adapter.detach_from drops what the input groups keep of them (their plans and weight
        # casts, which hold each adapter's whole buffer): a frozen-base run next would carry
        # them in its peak. Then the batch-layout caches go too.
        for a in adapters:
            a.detach_from(self.wrappers)
        clear_lora_caches(self.wrappers)

    def fused_step(self, n: int, rows: int, dropout: float):
        """n new adapters of `rows` rows each, and one training step of all of them fused, as
        the trainer takes it: the label counts come from the host, every adapter's clipping
        and optimizer step is queued without a read (Adapter.step_on_device), and the losses
        and gradient norms are read back once, at the end."""
        adapters = self.adapters(n, rows, dropout)
        ids = batch(n * rows, self.s.seq, self.cfg.vocab_size, self.device, seed=n)
        layout_rows = [AdapterRows(a.name, i * rows, (i + 1) * rows) for i, a in enumerate(adapters)]
        counts, targets = every_token_a_target(layout_rows, self.s.seq, self.device)
        self.model.train()

        def step():
            self.layout.rows = layout_rows
            hidden = self.model(ids, head=False)  # [n*rows, S, H]
            sums = head_loss_sums(self.model, hidden, ids, layout_rows, counts, targets)
            # (times each adapter's loss scale under fp16, as the trainer's; 1, and no multiply, else)
            total = sum(_scaled_loss(*sums[a.name], a.loss_scale_for(sums[a.name][1])) for a in adapters)
            total.backward()
            norms = [a.step_on_device(~torch.isfinite(sums[a.name][0]))[1] for a in adapters]
            read = torch.stack([ce for ce, _ in sums.values()] + norms).tolist()  # the trainer's one read
            if adapters[0].loss_scale is not None:  # the scale moves on as in the trainer (_finish_step)
                for a, norm in zip(adapters, read[len(sums):]):
                    a.update_loss_scale(math.isfinite(norm))

        return step, adapters

    def run(self, n: int, rows: int, dropout: float | None = None, kernel: str = "auto") -> dict:
        dropout = self.s.dropout if dropout is None else dropout
        step, adapters = self.fused_step(n, rows, dropout)
        previous, lora_module.kernel = lora_module.kernel, kernel
        try:
            result = measure(step, n * rows * self.s.seq, self.s, self.device)
            result["estimated_peak_gib"] = self.estimate(n * rows, [(self.s.r, TARGET_MODULES, dropout)] * n)
            result["lora_params"] = sum(p.numel() for p in adapters[0].parameters())  # one adapter's
            return result
        finally:
            lora_module.kernel = previous
            self.layout.rows = []
            self.detach(adapters)

    def estimate(self, rows: int, lora: list) -> float:
        """mlora.memory's prediction of this run's peak (GiB), to validate it against the
        measured one."""
        from mlora.memory import LoraShape, estimate_peak_bytes

        shapes = [LoraShape(r, tuple(t), p) for r, t, p in lora]
        args = args_from_hf_config(self.cfg)
        return estimate_peak_bytes(args, rows=rows, seq_len=self.s.seq, dtype=self.dtype, lora=shapes,
                                   device=self.device).total / 2**30

    def frozen_step(self, rows: int, seed: int):
        """Forward + backward through every layer with no LoRA (the embedding output requires
        grad), reading nothing back: the bound LoRA cannot beat. Returns (step, undo): undo
        removes the hook that makes the embedding output require grad."""
        ids = batch(rows, self.s.seq, self.cfg.vocab_size, self.device, seed=seed)
        hook = self.model.model.embed_tokens.register_forward_hook(lambda m, i, out: out.requires_grad_())
        one = [AdapterRows("base", 0, rows)]
        counts, targets = every_token_a_target(one, self.s.seq, self.device)

        def step():
            ce, count = head_loss_sums(self.model, self.model(ids, head=False), ids, one, counts, targets)["base"]
            (ce / count).backward()

        return step, hook.remove

    def run_frozen(self, rows: int) -> dict:
        """The frozen base's step (frozen_step), measured."""
        step, undo = self.frozen_step(rows, seed=rows)
        try:
            result = measure(step, rows * self.s.seq, self.s, self.device)
            result["estimated_peak_gib"] = self.estimate(rows, [])
            return result
        finally:
            undo()


# ----------------------------------------------------------------------------- transformers + PEFT


class HFBench:
    config_of = staticmethod(hf_config)
    peft_targets = list(TARGET_MODULES)  # PEFT's target_modules: the names of the base's own modules

    @staticmethod
    def model_of(cfg):
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(cfg)

    def __init__(self, shape: str, s: Settings, device: torch.device, dtype: torch.dtype):
        self.shape, self.s, self.device = shape, s, device
        self.cfg = self.config_of(shape, s.seq)
        self.cfg._attn_implementation = "sdpa"
        with torch.device(device):
            self.model = self.model_of(self.cfg).to(dtype)
        self.model.requires_grad_(False)

    def run_peft(self, rows: int) -> dict:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=self.s.r, lora_alpha=self.s.alpha, lora_dropout=self.s.dropout,
                            target_modules=list(self.peft_targets), task_type="CAUSAL_LM")
        peft_model = get_peft_model(self.model, config)
        peft_model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        # Fused, as transformers' Trainer defaults to with torch >= 2.8 ("adamw_torch_fused").
        optimizer = torch.optim.AdamW(params, lr=self.s.lr, fused=True)
        ids = batch(rows, self.s.seq, self.cfg.vocab_size, self.device, seed=rows)

        def step():
            loss = peft_model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            result = measure(step, rows * self.s.seq, self.s, self.device)
            result["lora_params"] = sum(p.numel() for p in params)
            return result
        finally:
            self.model = peft_model.unload()  # the plain base again, for the next run
            # (not `del`: step() closes over them)
            optimizer = params = peft_model = None

    def run_frozen(self, rows: int) -> dict:
        ids = batch(rows, self.s.seq, self.cfg.vocab_size, self.device, seed=rows)
        self.model.train()
        embed = self.model.get_input_embeddings()
        hook = embed.register_forward_hook(lambda m, i, out: out.requires_grad_())

        def step():
            self.model(input_ids=ids, labels=ids).loss.backward()

        try:
            return measure(step, rows * self.s.seq, self.s, self.device)
        finally:
            hook.remove()


# ----------------------------------------------------------------------------- the plan


def plan(shape: str, rows: int, adapters: list[int], part: str, triton: bool = False) -> list[tuple]:
    """(side, [(system, kwargs)]) in order of importance. part "core": the 4-adapter
    comparison (main runs it for every shape before any other part, so a session cut short
    still has it); "triton": the fused and triton LoRA kernels side by side at every adapter
    count, when triton can run here (auto runs triton on Hopper and fused elsewhere; which is
    faster may depend on the batch: the 2026-11-30 run saw triton ahead at 4 and 8 adapters but
    1-2 adapters slower than fused had been the day before); "extras": the other
    adapter counts, the memory comparison's partner and the ablations. `role` says what a run
    is for: the adapter sweep, the memory comparison (one adapter with all the rows), or an
    ablation that shows where the time goes."""
    core_n = 4 if 4 in adapters else adapters[-1]
    if part == "core":
        mlora = [("mlora-base", dict(rows=core_n * rows)), ("mlora", dict(n=core_n, rows=rows, role="sweep")),
                 ("mlora", dict(n=1, rows=core_n * rows, role="memory"))]
        return [("mlora", mlora), ("hf", [("peft", dict(rows=rows)), ("hf-base", dict(rows=core_n * rows))])]
    if part == "triton":
        kernels = [("mlora", dict(n=n, rows=rows, kernel=kernel, role="ablation"))
                   for n in [core_n, *(n for n in adapters if n != core_n)] for kernel in ("triton", "fused")]
        return [("mlora", kernels)] if triton else []
    mlora = []
    for n in adapters:
        if n != core_n:
            mlora += [("mlora", dict(n=n, rows=rows, role="sweep")), ("mlora-base", dict(rows=n * rows))]
    # Where the time goes: the other LoRA kernels (auto is fused); no dropout.
    mlora += [("mlora", dict(n=core_n, rows=rows, kernel="dense", role="ablation")),
              ("mlora", dict(n=core_n, rows=rows, kernel="grouped", role="ablation")),
              ("mlora", dict(n=core_n, rows=rows, kernel="loop", role="ablation")),
              ("mlora", dict(n=core_n, rows=rows, dropout=0.0, role="ablation"))]
    return [("mlora", mlora), ("hf", [("peft", dict(rows=core_n * rows))])]


def run_shape(shape: str, rows: int, s: Settings, adapters: list[int], device, dtype, part: str,
              record) -> None:
    from mlora.lora_triton import unavailable

    for side, runs in plan(shape, rows, adapters, part, triton=unavailable(device) is None):
        free_memory(device)
        try:
            bench = MloraBench(shape, s, device, dtype) if side == "mlora" else HFBench(shape, s, device, dtype)
        except Exception as err:  # noqa: BLE001 - a side whose model cannot be built: its runs fail, the rest go on
            bench, built = None, _failure(err)
        for system, kwargs in runs:
            entry = {"shape": shape, "system": system, "seq": s.seq, **kwargs}
            entry.setdefault("n", 1 if system == "peft" else 0 if system.endswith("base") else None)
            if system == "mlora":
                entry.setdefault("kernel", "auto")
                entry.setdefault("dropout", s.dropout)
            try:
                if bench is None:
                    result = built
                elif system == "mlora":
                    result = bench.run(kwargs["n"], kwargs["rows"], kwargs.get("dropout"),
                                       kwargs.get("kernel", "auto"))
                elif system == "peft":
                    result = bench.run_peft(kwargs["rows"])
                else:
                    result = bench.run_frozen(kwargs["rows"])
            except Exception as err:  # noqa: BLE001 - one run's failure must not end the session
                result = _failure(err)
            entry.update(result)
            if kernel_fallback.failures() and system.startswith("mlora"):
                # an `auto` kernel that failed here ran torch's ops instead: these figures are theirs
                entry["kernel_fallbacks"] = kernel_fallback.failures()
            if "error" in result:
                broken = device_broken(device)
                if broken:
                    entry["device_error"] = broken
                    record(entry)
                    raise DeviceBroken(broken)
            if "tokens_per_s" in entry:
                entry["useful_tflops"] = 4 * matmul_params(shape) * entry["tokens_per_s"] / 1e12
            record(entry)
        del bench


def _failure(err: Exception) -> dict:
    """A failed run's (or model build's) record: its error's first line."""
    if isinstance(err, torch.OutOfMemoryError):
        return {"error": "out of memory"}
    return {"error": f"{type(err).__name__}: {_first_line(err)[:300]}"}


class DeviceBroken(RuntimeError):
    """A run left the CUDA context unusable (a fault in a kernel): nothing more can run."""


def device_broken(device: torch.device) -> str | None:
    """After a failed run: None if the device still works, else why not. A fault inside a
    kernel (an illegal address, say) poisons the process's CUDA context for good, and every
    later run would fail with the same error."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {_first_line(err)[:300]}"
    return None


def summarise(runs: list[dict]) -> list[dict]:
    """Ratios per shape and adapter count: mlora vs PEFT (one adapter at a time, same rows per
    adapter) and vs the faster frozen base (mlora's or transformers') at the same total rows."""
    out = []
    ok = [r for r in runs if "tokens_per_s" in r]
    for shape in dict.fromkeys(r["shape"] for r in ok):
        mine = [r for r in ok if r["shape"] == shape]
        fused = [r for r in mine if r.get("role") == "sweep"]
        for r in sorted(fused, key=lambda r: r["n"]):
            total_rows = r["n"] * r["rows"]
            peft = next((p for p in mine if p["system"] == "peft" and p["rows"] == r["rows"]), None)
            bases = [b for b in mine if b["system"].endswith("base") and b["rows"] == total_rows]
            bound = max(bases, key=lambda b: b["tokens_per_s"]) if bases else None
            same_rows_one = next((o for o in mine if o["system"] == "mlora" and o["n"] == 1
                                  and o["rows"] == total_rows and o.get("role") != "ablation"), None)
            row = {"shape": shape, "adapters": r["n"], "rows_per_adapter": r["rows"],
                   "mlora_tokens_per_s": r["tokens_per_s"], "mlora_useful_tflops": r.get("useful_tflops"),
                   "mlora_peak_gib": r["peak_gib"]}
            if peft:
                row.update(peft_tokens_per_s=peft["tokens_per_s"], vs_peft=r["tokens_per_s"] / peft["tokens_per_s"])
            if bound:
                row.update(base_tokens_per_s=bound["tokens_per_s"], base_system=bound["system"],
                           vs_frozen_base=r["tokens_per_s"] / bound["tokens_per_s"])
            if same_rows_one and r["peak_gib"] and same_rows_one["peak_gib"]:
                row["peak_vs_one_adapter_same_rows"] = r["peak_gib"] / same_rows_one["peak_gib"]
            out.append(row)
    return out


def ablations(runs: list[dict]) -> list[dict]:
    """Each ablation (another kernel, no dropout) beside the frozen base of the same rows."""
    out = []
    ok = [r for r in runs if "tokens_per_s" in r]
    for r in (r for r in ok if r.get("role") == "ablation"):
        bases = [b for b in ok if b["shape"] == r["shape"] and b["system"].endswith("base")
                 and b["rows"] == r["n"] * r["rows"]]
        row = {"shape": r["shape"], "adapters": r["n"], "kernel": r["kernel"], "dropout": r["dropout"],
               "tokens_per_s": r["tokens_per_s"], "peak_gib": r["peak_gib"]}
        if bases:
            row["vs_frozen_base"] = r["tokens_per_s"] / max(b["tokens_per_s"] for b in bases)
        out.append(row)
    return out


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = list(dict.fromkeys(r["shape"] for r in result["summary"]))
    fig, axes = plt.subplots(1, max(1, len(shapes)), figsize=(6 * max(1, len(shapes)), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in result["summary"] if r["shape"] == shape]
        labels = [str(r["adapters"]) for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.27 for i in x], [r["mlora_tokens_per_s"] for r in rows], 0.27, label="mlora, N fused")
        ax.bar([i for i in x], [r.get("peft_tokens_per_s", 0) for r in rows], 0.27, label="PEFT, one at a time")
        ax.bar([i + 0.27 for i in x], [r.get("base_tokens_per_s", 0) for r in rows], 0.27,
               label="frozen base (bound)")
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("adapters")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{shape}, seq {result['meta']['seq']}, r={result['meta']['r']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# Device kernels by what they do, first match of their name (lower case) wins: what the LoRA
# side adds per category is the difference of a variant's figures to the frozen base's.
KERNEL_CATEGORIES = (
    ("lora triton", ("down_kernel", "up_masked_kernel", "grad_a_kernel")),
    ("attention", ("flash", "fmha", "sdpa", "attention", "cudnn")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "wgmma", "sm90_", "splitk")),
    ("optimizer", ("adam", "sgd")),
    ("copy", ("memcpy", "memset", "copy")),
    ("norm", ("norm",)),
    ("reduce", ("reduce", "sum", "softmax", "cross_entropy", "nll")),
)


def kernel_category(name: str) -> str:
    """KERNEL_CATEGORIES' category of a device kernel's name, "elementwise" for the rest."""
    lower = name.lower()
    return next((category for category, keys in KERNEL_CATEGORIES if any(k in lower for k in keys)), "elementwise")


def profile(shape: str, rows: int, n: int, s: Settings, device, dtype, path: Path, triton: bool = True) -> dict:
    """Where a step's time goes: the frozen base at n x rows, then n fused adapters of `rows`
    (kernel auto, and triton where it runs), two profiled steps each. Writes to `path`, per
    variant, the device kernels and their time per step, the wall time per step and the
    share of it the device was busy (below 1: it waited for the host), and the top kernels
    by device time; what the LoRA side adds is the difference to the base. Returns the
    figures per variant."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from mlora.lora_triton import unavailable

    bench = MloraBench(shape, s, device, dtype)
    variants = [("frozen base", None), ("fused", "auto")]
    if triton and unavailable(device) is None:
        variants.append(("triton", "triton"))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    figures, texts = {}, []
    for label, kernel in variants:
        free_memory(device)
        previous = lora_module.kernel
        undo = None
        if kernel is None:
            step, undo = bench.frozen_step(n * rows, seed=0)
            adapters = []
        else:
            lora_module.kernel = kernel
            step, adapters = bench.fused_step(n, rows, s.dropout)
        try:
            for _ in range(2):
                step()
            sync(device)
            with torch_profile(activities=activities) as prof:
                start = time.perf_counter()
                for _ in range(2):
                    step()
                sync(device)
                wall = (time.perf_counter() - start) / 2
        except Exception as err:  # noqa: BLE001 - a Triton compile error must not end the session
            first = _first_line(err)[:300]
            figures[label] = {"error": f"{type(err).__name__}: {first}"}
            texts.append(f"== {label}: {json.dumps(figures[label])}")
            continue
        finally:
            lora_module.kernel = previous
            if undo is not None:
                undo()
            bench.layout.rows = []
            bench.detach(adapters)
        kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 2 / 1e3  # ms of kernels per step
        by_category: dict[str, float] = {}
        for e in kernels:
            category = kernel_category(e.name)
            by_category[category] = by_category.get(category, 0.0) + e.time_range.elapsed_us() / 2 / 1e3
        figures[label] = {"kernels_per_step": len(kernels) / 2, "device_ms_per_step": busy,
                          "wall_ms_per_step": wall * 1e3,
                          "device_busy": busy / (wall * 1e3) if device.type == "cuda" else None,
                          "device_ms_by_category": {k: round(v, 3) for k, v in sorted(by_category.items())}}
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures[label].items()}
        texts.append(f"== {label}: {json.dumps(shown)}\n"
                     + prof.key_averages().table(sort_by=sort, row_limit=25))
    path.write_text(f"{shape}, {n} adapters x {rows} rows x {s.seq} (frozen base: {n * rows} rows), "
                    f"2 profiled steps each\n" + "\n".join(texts))
    for label, figure in figures.items():  # the tables are in the file
        print(json.dumps({"profile": label, **{k: (round(v, 3) if isinstance(v, float) else v)
                                               for k, v in figure.items()}}), flush=True)
    return figures


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny shape (seconds)")
    p.add_argument("--shapes", default="tinyllama-1.1b,llama2-7b")
    p.add_argument("--adapters", default="1,2,4,8")
    p.add_argument("--rows", type=int, default=None, help="rows per adapter (default per shape)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 5; --tiny: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default 2; --tiny: 1)")
    p.add_argument("--no-extras", action="store_true", help="only the 4-adapter comparison")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="the base's and the activations' dtype (default: bf16 on CUDA, fp32 elsewhere)")
    p.add_argument("--out", default="benchmarks/results/throughput.json")
    p.add_argument("--profile", default=None, metavar="TXT",
                   help="instead of the benchmark: profile the first shape's frozen base and core fused step")
    p.add_argument("--no-profile", action="store_true",
                   help="on CUDA, skip the profile of the first shape's core step (run after the core part)")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    args = p.parse_args(argv)
    if args.plot_only:
        result = json.loads(Path(args.out).read_text())
        if not plot(result, Path(args.out).with_suffix(".png")):
            raise SystemExit("bench_throughput: --plot-only needs matplotlib")
        return result

    if args.tiny:
        args.shapes, args.seq, args.adapters = "tiny", 32, "1,4"
        args.device = args.device or "cpu"
    # Given ones stand, also with --tiny (the tests take the fewest steps that still step twice).
    args.steps = args.steps if args.steps is not None else 2 if args.tiny else 5
    args.warmup = args.warmup if args.warmup is not None else 1 if args.tiny else 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = (resolve_dtype(device, args.dtype) if args.dtype
             else torch.bfloat16 if device.type == "cuda" else torch.float32)
    adapters = sorted(int(n) for n in args.adapters.split(","))
    s = Settings(seq=args.seq, steps=args.steps, warmup=args.warmup)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.profile:
        shape = args.shapes.split(",")[0]
        profile(shape, args.rows or DEFAULT_ROWS[shape], 4 if 4 in adapters else adapters[-1], s, device, dtype,
                Path(args.profile))
        return {}

    import peft
    import transformers

    result = {"meta": {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                       "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                  else platform.processor() or "cpu"),
                       "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
                       "transformers": transformers.__version__, "peft": peft.__version__,
                       "seq": s.seq, "r": s.r, "alpha": s.alpha, "dropout": s.dropout, "steps": s.steps,
                       "warmup": s.warmup, "date": time.strftime("%Y-%m-%d")},
              "runs": [], "summary": []}

    def record(entry: dict) -> None:
        result["runs"].append(entry)
        result["summary"] = summarise(result["runs"])
        result["ablations"] = ablations(result["runs"])
        out.write_text(json.dumps(result, indent=1))  # after every run: a timeout keeps what ran
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in entry.items()}
        print(json.dumps(shown), flush=True)

    try:
        for part in ("core", "triton") if args.no_extras else ("core", "triton", "extras"):
            for shape in args.shapes.split(","):
                rows = args.rows or DEFAULT_ROWS[shape]
                run_shape(shape, rows, s, adapters, device, dtype, part, record)
            if part == "core":
                plot(result, out.with_suffix(".png"))  # the headline plot, in case the rest is cut short
        if device.type == "cuda" and not args.no_profile:
            # Last: where the first shape's step goes (its triton variant only if the triton
            # runs went through). It ran before the extras until 2026-11-30, when the runs bound
            # by the host that followed it (1-2 adapters, the loop kernel) came out 17-32 % slower
            # than the day before without a profile: the profiler likely leaves the host slower.
            shape = args.shapes.split(",")[0]
            triton_ok = not any(r.get("kernel") == "triton" and "error" in r for r in result["runs"])
            path = out.with_name(out.stem + "_profile.txt")
            result["profile"] = {"file": path.name, "shape": shape,
                                 **profile(shape, args.rows or DEFAULT_ROWS[shape],
                                           4 if 4 in adapters else adapters[-1], s, device, dtype, path,
                                           triton=triton_ok)}
            out.write_text(json.dumps(result, indent=1))
    except DeviceBroken as err:
        result["stopped"] = f"the device stopped working: {err}"
        out.write_text(json.dumps(result, indent=1))
        print(f"bench_throughput: stopped early, {result['stopped']}", file=sys.stderr)
    if plot(result, out.with_suffix(".png")):
        print(f"wrote {out} and {out.with_suffix('.png')}")
    else:
        print(f"wrote {out} (no PNG: matplotlib is not installed)")
    for row in result["summary"] + result["ablations"]:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
    return result


if __name__ == "__main__":
    main()
