"""Batch strategies (trivial | fast-fit | optimal-fit) on an alpaca-like spread of lengths.

Every adapter gets its own log-normal distribution of token lengths (clipped to [16, 512]) and
its own micro_batch_size. Two measurements:

1. padding, over one whole epoch of every adapter (no model: `fused_batches` + `padding_stats`):
   padding fraction, fused batches, largest batch and batches over the token budget;
2. real training on the CPU with a tiny random LLaMA saved as safetensors, through mlora's
   Trainer (fuse -> forward -> per-adapter loss -> backward -> optimizer steps), each adapter
   for --steps optimizer steps: useful (non-pad) tokens per second of the training loop, and
   per CPU-second (all threads; less disturbed by other processes on a shared machine).
   The trainer still calls batching.round_robin, so the strategy goes in through a stand-in
   for it, as tests/test_strategies.py does; the adapters must come out the same whatever the
   strategy, and the benchmark checks that they do.

    .venv/bin/python benchmarks/bench_strategies.py --quick --out /tmp/bench_strategies.json
    python benchmarks/bench_strategies.py --quick --device cuda --model tinyllama-4l   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import mlora.trainer  # noqa: E402
from mlora.batching import adapter_stream  # noqa: E402
from mlora.config import AdapterConfig, TrainConfig, adapter_seed  # noqa: E402
from mlora.data import IGNORE_INDEX, Example  # noqa: E402
from mlora.session import AdapterData, Session  # noqa: E402
from mlora.strategies import STRATEGIES, fused_batches, padding_stats  # noqa: E402

# name: (median tokens, log-normal sigma, micro_batch_size). Medians and spreads after the
# kinds of instruction data people fine-tune on: terse Q&A up to long-form summaries.
PROFILES = {
    "brief": (48, 0.45, 8),
    "alpaca": (120, 0.6, 4),
    "dolly": (160, 0.75, 4),
    "chat": (220, 0.7, 2),
    "code": (200, 0.9, 4),
    "summarize": (380, 0.35, 2),
    "math": (90, 0.5, 8),
    "mixed": (140, 1.0, 2),
}
MIN_LEN, MAX_LEN = 16, 512
# A small LLaMA (GQA, 2.7x MLP) that trains in seconds on a CPU; on a GPU, four layers of
# TinyLlama-1.1B's shape (bf16), where padding costs real GEMM time.
_COMMON = dict(max_position_embeddings=MAX_LEN, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=2)
MODELS = {
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, **_COMMON),
    "tinyllama-4l": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, **_COMMON),
}


def make_rows(median: int, sigma: float, n: int, seed: int, vocab: int) -> list[Example]:
    """Rows whose first ~40% (the prompt) is not trained, as with train_on_inputs false."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = min(MAX_LEN, max(MIN_LEN, round(rng.lognormvariate(math.log(median), sigma))))
        ids = [1] + [rng.randrange(3, vocab) for _ in range(length - 1)]
        prompt = max(1, int(length * rng.uniform(0.2, 0.6)))
        rows.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return rows


def adapter_configs(names: list[str], steps: int | None) -> list[AdapterConfig]:
    # SGD, not AdamW: Adam divides by the root of tiny second moments, which blows fp32
    # rounding (the padded length changes how sums are blocked) up to ~1e-4 relative within a
    # few steps and would blur the check that every strategy trains the same adapters.
    return [AdapterConfig(name=n, data="", r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"],
                          batch_size=2 * PROFILES[n][2], micro_batch_size=PROFILES[n][2], num_epochs=1,
                          max_steps=steps, group_by_length=False, eval_step=0, optim="sgd", lr=1e-2)
            for n in names]


def streams(cfgs: list[AdapterConfig], data: dict[str, list[Example]], seed: int):
    return {c.name: adapter_stream(data[c.name], c, adapter_seed(seed, c.name)) for c in cfgs}


def padding_rows(cfgs, data, settings, seed) -> list[dict]:
    out = []
    for cand, sim, budget in settings:
        # Each strategy, then fast-fit with packing (`packing: true`, rows of up to 512 tokens:
        # an adapter's micro-batch becomes fewer, fuller rows).
        for strategy, pack_len in [(s, None) for s in STRATEGIES] + [("fast-fit", 512)]:
            t0 = time.perf_counter()
            batches = fused_batches(strategy, streams(cfgs, data, seed), cand, sim, budget, pack_len=pack_len)
            stats = padding_stats(batches, budget, pack_len=pack_len)
            label = strategy if pack_len is None else f"{strategy} + packing"
            out.append({"strategy": label, "candidate_num": cand, "simultaneously_num": sim,
                        "max_tokens": budget, "pick_seconds": time.perf_counter() - t0, **stats})
    return out


def make_base(path: Path, model_cfg: dict) -> Path:
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model_cfg)).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def train(base: Path, cfgs, data, seed, strategy, cand, sim, budget, out: Path,
          device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> dict:
    """One training run through mlora's Trainer; the batch stream is timed around each yield,
    so the time counted is the training loop's (picking + training), not the set-up or saves.
    On CUDA the clock waits for the device at each batch boundary."""
    cfg = TrainConfig(lora=cfgs, seed=seed, output_dir=str(out), train_lora_candidate_num=cand,
                      train_lora_simultaneously_num=sim)
    tokenizer = SimpleNamespace(pad_token_id=2, eos_token_id=2)
    session = Session(cfg, base, device, dtype, tokenizer,
                      {n: AdapterData(rows, rows) for n, rows in data.items()})
    session.load_base()
    clock = {"wall": 0.0, "cpu": 0.0, "pick": 0.0}
    batches = []

    def timed(stream_dict, candidate_num, simultaneously_num, stopped=None):
        it = fused_batches(strategy, stream_dict, candidate_num, simultaneously_num, budget, stopped)
        while True:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the previous batch's work belongs to the clock
            w0, c0 = time.perf_counter(), time.process_time()
            parts = next(it, None)
            clock["pick"] += time.perf_counter() - w0
            if parts is not None:
                batches.append(parts)
                yield parts  # the trainer trains on it before asking for the next one
            clock["wall"] += time.perf_counter() - w0
            clock["cpu"] += time.process_time() - c0
            if parts is None:
                return

    def timed_fused(_strategy, stream_dict, candidate_num, simultaneously_num, _max_tokens=None, stopped=None,
                    pack_len=None):
        return timed(stream_dict, candidate_num, simultaneously_num, stopped)

    # The trainer calls round_robin today; fused_batches once it is wired in: replace both.
    stand_ins = {"round_robin": timed, "fused_batches": timed_fused}
    saved = {name: getattr(mlora.trainer, name) for name in stand_ins if hasattr(mlora.trainer, name)}
    for name in saved:
        setattr(mlora.trainer, name, stand_ins[name])
    try:
        mlora.trainer.Trainer(session, progress=False).run()
    finally:
        for name, value in saved.items():
            setattr(mlora.trainer, name, value)
    stats = padding_stats(batches, budget)
    return {"strategy": strategy, "candidate_num": cand, "simultaneously_num": sim, "max_tokens": budget,
            "batches": stats["batches"], "useful_tokens": stats["useful_tokens"],
            "padded_tokens": stats["padded_tokens"], "padding_fraction": stats["padding_fraction"],
            "seconds": clock["wall"], "cpu_seconds": clock["cpu"], "pick_seconds": clock["pick"],
            "tokens_per_s": stats["useful_tokens"] / clock["wall"],
            "tokens_per_cpu_s": stats["useful_tokens"] / clock["cpu"]}


def rel_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).norm().item() / max(b[k].norm().item(), 1e-12) for k in a)


def markdown(padding: list[dict], training: list[dict]) -> str:
    lines = ["| candidate / simultaneously / max_tokens | strategy | fused batches | padding | the head on | "
             "largest batch | over budget |",
             "|---|---|---|---|---|---|---|"]
    for r in padding:
        budget = "none" if r["max_tokens"] is None else r["max_tokens"]
        lines.append(f"| {r['candidate_num']} / {r['simultaneously_num']} / {budget} | {r['strategy']} | "
                     f"{r['batches']} | {100 * r['padding_fraction']:.1f}% | {100 * r['head_fraction']:.1f}% | "
                     f"{r['max_batch_tokens']} | {r['over_budget']} |")
    lines += ["", "| strategy | fused batches | padding | useful tokens | loop s | useful tok/s | useful tok/cpu-s "
                  "| picking s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in training:
        lines.append(f"| {r['strategy']} | {r['batches']} | {100 * r['padding_fraction']:.1f}% | "
                     f"{r['useful_tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_cpu_s']:.0f} | {r['pick_seconds']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 adapters, fewer rows and steps (< 60 s)")
    parser.add_argument("--max_tokens", type=int, default=4096, help="token budget of a fused batch")
    # One thread by default: on a shared machine several threads mostly wait on each other
    # (a [16, 128] forward took 20x longer with 2 threads than with 1 under load 2.4/core).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--model", choices=list(MODELS), default=None,
                        help="model shape (default: tiny on the CPU, tinyllama-4l on CUDA)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model_cfg = MODELS[args.model or ("tinyllama-4l" if device.type == "cuda" else "tiny")]
    # bf16 on CUDA (as one trains there); fp32 on the CPU. The strategies only reorder rows
    # into batches, so the adapters must agree up to the dtype's rounding of other batch shapes.
    dtype, tolerance = (torch.bfloat16, 3e-2) if device.type == "cuda" else (torch.float32, 1e-5)

    names = list(PROFILES)[:6] if args.quick else list(PROFILES)
    rows, steps = (300, 2) if args.quick else (1000, 8)
    seed = 0
    data = {n: make_rows(PROFILES[n][0], PROFILES[n][1], rows, seed=i, vocab=model_cfg["vocab_size"])
            for i, n in enumerate(names)}
    n = len(names)
    budget = args.max_tokens
    # The budget alone; the budget with fewer adapters per batch; no budget, half of them per batch.
    settings = [(n, n, budget), (n, n // 2, budget), (n, n // 2, None)]
    t0 = time.perf_counter()
    padding = padding_rows(adapter_configs(names, None), data, settings, seed)
    for r in padding:
        print(f"padding {r['candidate_num']}/{r['simultaneously_num']}/{r['max_tokens']} {r['strategy']:>11}: "
              f"{100 * r['padding_fraction']:5.1f}% over {r['batches']} batches, the head on "
              f"{100 * r['head_fraction']:.1f}% of the tokens", flush=True)

    training, weights = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        base = make_base(Path(tmp) / "base", model_cfg)
        cfgs = adapter_configs(names, steps)
        # Warm-up (not counted): the first forward/backward pays for allocator and kernel set-up.
        train(base, adapter_configs(names[:1], 1), data, seed, "trivial", 1, 1, None, Path(tmp) / "warm", device, dtype)
        for strategy in STRATEGIES:
            out = Path(tmp) / strategy
            r = train(base, cfgs, data, seed, strategy, n, n, budget, out, device, dtype)
            training.append(r)
            weights[strategy] = {name: load_file(out / name / "adapter_model.safetensors") for name in names}
            print(f"train {strategy:>11}: {r['batches']} batches, {100 * r['padding_fraction']:.1f}% padding, "
                  f"{r['tokens_per_s']:.0f} useful tok/s, {r['tokens_per_cpu_s']:.0f} tok/cpu-s", flush=True)
    same = max(rel_diff(weights[s][name], weights["trivial"][name]) for s in STRATEGIES for name in names)
    print(f"max relative difference of any adapter's weights across strategies: {same:.2e}")
    assert same <= tolerance, "the strategies trained different adapters"
    table = markdown(padding, training)
    print(table)
    result = {"command": " ".join(sys.argv), "quick": args.quick, "adapters": {n: PROFILES[n] for n in names},
              "rows_per_adapter": rows, "steps": steps, "threads": torch.get_num_threads(), "model": model_cfg,
              "device": str(device), "dtype": str(dtype),
              "padding": padding, "training": training, "max_weight_rel_diff": same,
              "seconds": time.perf_counter() - t0}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
