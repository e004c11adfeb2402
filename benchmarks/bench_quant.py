"""Training throughput and peak memory of a full-precision vs 4-bit (NF4) vs 8-bit base, with
1 and 4 LoRA adapters fused in each batch (the same rows per adapter).

    python benchmarks/bench_quant.py --tiny                 # random tiny LLaMA, CPU, seconds
    python benchmarks/bench_quant.py --model smollm2        # SmolLM2-135M-Instruct (real weights)
    python benchmarks/bench_quant.py --model DIR --device cuda

Each base runs in a fresh child process, so one base's memory never counts against another.
The step is mlora's: fuse -> forward -> per-adapter loss -> one backward -> every adapter's
optimizer step, as in mlora/trainer.py. Throughput counts every row's tokens: per second of
the median timed step, of the fastest one (`best`, the least disturbed on a shared machine),
and per CPU-second of this process (`tok/cpu-s`, all threads: the compute a token costs).
On a shared machine use `--threads 1`: with several threads, a thread descheduled by another
process stalls the others at each barrier, where they spin, and both figures suffer.

Memory, above what the child holds before loading the model (so: weights, LoRA weights,
optimizer state, activations):
- CUDA: `torch.cuda.max_memory_allocated`, reset before loading and before each adapter count;
- CPU: the resident set size (anonymous memory + mapped file pages), peak = the kernel's
  VmHWM, restarted through /proc/self/clear_refs before loading and before each adapter count
  (Linux only). RSS rather than tracemalloc, which does not see torch's allocations; file pages
  count because an fp32 base on the CPU is read zero-copy from the mapped safetensors file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

BASES = ("full", "nf4", "int8")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# A small LLaMA whose shapes still look like a real model's (GQA, 3x MLP).
TINY = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=2048, max_position_embeddings=512)


def rss_bytes() -> int:
    """Current resident set size: anonymous memory plus mapped file pages (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS count (VmHWM) from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so a phase's RSS starts from what is
    really held, not from what earlier temporaries left in malloc's free lists."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS may then overstate a little
        pass


def make_tiny_model(path: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- one base (child)

class Memory:
    """Peak memory above a baseline taken at construction (see the module docstring)."""

    def __init__(self, device):
        import torch

        self.torch, self.device, self.cuda = torch, device, device.type == "cuda"
        release_freed_memory()
        self.baseline = torch.cuda.memory_allocated(device) if self.cuda else rss_bytes()

    def reset_peak(self) -> None:
        release_freed_memory()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def peak_mb(self) -> float:
        peak = self.torch.cuda.max_memory_allocated(self.device) if self.cuda else peak_rss_bytes()
        return round((peak - self.baseline) / 2**20, 1)


def run_base(args) -> list[dict]:
    import torch

    from mlora.adapter import Adapter
    from mlora.batching import MicroBatch, fuse
    from mlora.config import AdapterConfig
    from mlora.data import Example
    from mlora.device import resolve_device, resolve_dtype
    from mlora.loader import load_model, read_model_config
    from mlora.loss import head_loss_sums
    from mlora.lora import BatchLayout, check_kernel, inject_lora
    from mlora.quant import QuantConfig, check_available, linear_weight_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    check_kernel(device)  # MLORA_LORA_KERNEL: a one-line error now, not an ImportError mid-step
    dtype = resolve_dtype(device, None)
    quant = {"full": None, "nf4": QuantConfig(4, "nf4"), "int8": QuantConfig(8)}[args.child]
    label = args.child if quant else {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    # Import everything before the baseline (transformers for the config, bitsandbytes), so
    # the growth is the model and the training, not libraries.
    read_model_config(args.model_dir)
    if quant is not None:
        check_available(quant, device)
    torch.manual_seed(0)
    memory = Memory(device)

    memory.reset_peak()
    model = load_model(args.model_dir, device, dtype, quant=quant)
    load_peak_mb = memory.peak_mb()  # loading's own high-water mark (quantization transients)
    weight_mb = round(linear_weight_bytes(model) / 2**20, 2)
    layout = BatchLayout()
    wrappers = inject_lora(model, layout)
    vocab = model.args.vocab_size
    results = []
    for n in args.adapters:
        memory.reset_peak()
        adapters = [Adapter(AdapterConfig(name=f"a{i}", data="", r=16, alpha=32, dropout=0.05,
                                          target_modules=TARGETS, lr=1e-4), wrappers, i, device, 10**6)
                    for i in range(n)]
        generator = torch.Generator().manual_seed(n)

        def step() -> None:  # mlora/trainer.py's loop body, on random full-length rows
            parts = []
            for a in adapters:
                rows = [torch.randint(3, vocab, (args.seq,), generator=generator).tolist() for _ in range(args.rows)]
                examples = [Example(ids, ids) for ids in rows]
                tokens = sum(ex.num_label_tokens for ex in examples)
                parts.append(MicroBatch(a.name, examples, 0, 0, tokens, True, "right"))
            batch = fuse(parts, 0).to(device)
            layout.rows = batch.rows
            hidden = model(batch.input_ids, batch.attention_mask, head=False)
            sums = head_loss_sums(model, hidden, batch.labels, batch.rows, batch.label_counts, batch.target_positions)
            total = sum(sums[p.adapter][0] / max(1, p.step_label_tokens) for p in parts)
            total.backward()
            for a in adapters:
                a.step()

        model.train()
        step()  # warm-up: allocator, optimizer state, lazy kernels
        if memory.cuda:
            torch.cuda.synchronize(device)
        times, cpu_times = [], []
        for _ in range(args.steps):
            started, cpu_started = time.perf_counter(), time.process_time()
            step()
            if memory.cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
        # Wall time over the median and the fastest step (on a shared machine the fastest is
        # the least disturbed), and this process's CPU time (all threads): the compute each
        # token costs.
        tokens = n * args.rows * args.seq
        results.append({"base": label, "adapters": n, "rows": n * args.rows, "seq": args.seq,
                        "tokens_per_s": round(tokens / statistics.median(times), 1),
                        "tokens_per_s_best": round(tokens / min(times), 1),
                        "tokens_per_cpu_s": round(tokens / statistics.median(cpu_times), 1),
                        "step_s": [round(t, 3) for t in times], "peak_mb": memory.peak_mb(),
                        "load_peak_mb": load_peak_mb, "weight_mb": weight_mb,
                        "loadavg_1min": round(os.getloadavg()[0], 2)})
        for a in adapters:
            a.detach_from(wrappers)
        adapters = []  # (not `del`: step() closes over it) frees them before the next peak
        layout.rows = []
    return results


# ----------------------------------------------------------------------------- driver

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tiny", action="store_true", help="a random tiny LLaMA (CPU, seconds)")
    which.add_argument("--model", help="'smollm2' (the demo model) or a safetensors model directory")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--seq", type=int, default=128, help="tokens per row (default 128)")
    p.add_argument("--rows", type=int, default=2, help="rows per adapter per batch (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (default 5)")
    p.add_argument("--adapters", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4],
                   help="adapter counts, e.g. 1,4 (default)")
    p.add_argument("--bases", type=lambda s: s.split(","), default=list(BASES),
                   help=f"comma-separated subset of {','.join(BASES)}")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); 1 keeps "
                   "a shared machine's other processes from stalling the threads' barriers")
    p.add_argument("--out", help="the JSON results file (default: bench_quant_<model>.json here)")
    p.add_argument("--child", choices=BASES, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if set(args.bases) - set(BASES):
        p.error(f"--bases: unknown {sorted(set(args.bases) - set(BASES))}; choose from {', '.join(BASES)}")

    if args.child:  # one base, in its own process; results as one JSON line on stdout
        print(json.dumps(run_base(args)))
        return 0

    with tempfile.TemporaryDirectory(prefix="mlora-bench-") as tmp:
        if args.model in (None, "smollm2") and not args.tiny:
            from mlora.demo import smollm2_base_dir

            model_dir, label = smollm2_base_dir(), "SmolLM2-135M-Instruct"
        elif args.tiny:
            model_dir, label = make_tiny_model(Path(tmp) / "tiny"), f"tiny random LLaMA {TINY}"
        else:
            model_dir, label = Path(args.model), args.model
        results = []
        for base in args.bases:
            cmd = [sys.executable, __file__, "--child", base, "--model-dir", str(model_dir),
                   "--seq", str(args.seq), "--rows", str(args.rows), "--steps", str(args.steps),
                   "--adapters", ",".join(map(str, args.adapters))]
            cmd += ["--device", args.device] if args.device else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                print(f"bench_quant: the {base} run failed", file=sys.stderr)
                return 1
            results += json.loads(proc.stdout.strip().splitlines()[-1])

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    memory = ("torch.cuda.max_memory_allocated above the child's allocation before loading"
              if device.startswith("cuda")
              else "peak RSS (VmHWM, reset per phase) above the child's RSS before loading")
    report = {"command": " ".join(["python", "benchmarks/bench_quant.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "model": label, "device": device, "torch": torch.__version__,
              "threads": args.threads or torch.get_num_threads(), "cpus": os.cpu_count(),
              "seq": args.seq, "rows_per_adapter": args.rows, "steps": args.steps, "memory": memory,
              "results": results}
    print(f"{label} on {device}, seq {args.seq}, {args.rows} rows/adapter, {args.steps} timed steps; memory: {memory}")
    print(f"{'base':6} {'adapters':>8} {'tokens/s':>9} {'best':>9} {'tok/cpu-s':>10} {'peak MiB':>9} "
          f"{'load peak':>10} {'proj MiB':>9} {'loadavg':>8}")
    for r in results:
        print(f"{r['base']:6} {r['adapters']:8d} {r['tokens_per_s']:9.1f} {r['tokens_per_s_best']:9.1f} "
              f"{r['tokens_per_cpu_s']:10.1f} {r['peak_mb']:9.1f} {r['load_peak_mb']:10.1f} "
              f"{r['weight_mb']:9.2f} {r['loadavg_1min']:8.2f}")
    out = Path(args.out or f"bench_quant_{'tiny' if args.tiny else Path(args.model or 'smollm2').name}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
