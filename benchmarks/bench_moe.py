"""Training steps on a mixture-of-experts base: mlora (1 and 4 adapters fused, LoRA on
attention and every expert) vs transformers + PEFT (one adapter, on transformers 5's stacked
experts) vs the frozen base alone (forward + backward, no LoRA); and mlora's 4 adapters with
the experts run one at a time (MLORA_GROUPED_EXPERTS=0) against grouped (the default).

Random weights of a named shape, built directly on the device; LoRA r=16, alpha=32, dropout 0
(PEFT allows none on experts) on q/k/v/o and the experts' gate/up/down; AdamW. Every adapter
gets the same rows per step. The steps are bench_throughput.py's (the trainer's per-adapter
loss, clipping and optimizer step).

    python benchmarks/bench_moe.py --cpu          # the two small shapes on the CPU (about a minute)
    python benchmarks/bench_moe.py                # GPU: olmoe-1b-7b and mixtral-small shapes

Prints and writes JSON (--out, after every run: a time limit keeps what ran; a run that fails is
recorded with its error and the others go on). Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_throughput import HFBench, MloraBench, Settings, _failure, free_memory  # noqa: E402

from mlora.adapter import Adapter  # noqa: E402
from mlora.config import AdapterConfig  # noqa: E402
from mlora.lora import TARGET_MODULES  # noqa: E402
from mlora.models import moe  # noqa: E402
from mlora.models.llama import args_from_hf_config  # noqa: E402
from mlora.models.naming import naming_for  # noqa: E402

SHAPES = {
    # name: (config class, its arguments)
    "tiny-mixtral": ("MixtralConfig", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                            num_attention_heads=8, num_key_value_heads=4, vocab_size=512,
                                            num_local_experts=8, num_experts_per_tok=2)),
    "tiny-qwen3-moe": ("Qwen3MoeConfig", dict(hidden_size=256, moe_intermediate_size=128, intermediate_size=512,
                                               num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                               head_dim=32, vocab_size=512, num_experts=64, num_experts_per_tok=8,
                                               norm_topk_prob=True)),
    "olmoe-1b-7b": ("OlmoeConfig", dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                                         num_attention_heads=16, num_key_value_heads=16, vocab_size=50304,
                                         num_experts=64, num_experts_per_tok=8)),
    "mixtral-small": ("MixtralConfig", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                             num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                             num_local_experts=8, num_experts_per_tok=2)),
}


def moe_config(shape: str, seq: int):
    import transformers

    cls, kwargs = SHAPES[shape]
    return getattr(transformers, cls)(**kwargs, max_position_embeddings=max(2048, seq), tie_word_embeddings=False,
                                      use_cache=False)


class MoeMlora(MloraBench):
    config_of = staticmethod(moe_config)

    def adapters(self, n: int, rows: int, dropout: float) -> list[Adapter]:
        out = []
        for i in range(n):
            cfg = AdapterConfig(name=f"a{i}", data="<bench>", r=self.s.r, alpha=self.s.alpha, dropout=0.0,
                                target_modules=list(TARGET_MODULES), batch_size=rows, micro_batch_size=rows,
                                lr=self.s.lr, max_grad_norm=1.0)
            out.append(Adapter(cfg, self.wrappers, seed=i, device=self.device, total_steps=1000))
        return out


class MoeHF(HFBench):
    config_of = staticmethod(moe_config)

    def __init__(self, shape: str, s: Settings, device: torch.device, dtype: torch.dtype):
        super().__init__(shape, s, device, dtype)
        # the projections by the model's own names (Mixtral's experts: w1, w3, w2), as the
        # adapters mlora saves name them; PEFT converts them to the stacked experts
        self.peft_targets = naming_for(self.cfg.model_type).peft_target_modules(list(TARGET_MODULES))

    @staticmethod
    def model_of(cfg):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(cfg)


def run(shapes: list[str], device: torch.device, dtype: torch.dtype, seq: int, rows: int, steps: int,
        warmup: int = 2, out: Path | None = None) -> dict:
    """Every shape's runs and ratios; written to `out` (if given) after every run, so a session's
    time limit keeps what ran. A run that fails (or a side whose model cannot be built) is
    recorded with its error's first line and the rest go on; ratios need both their runs."""
    s = Settings(seq=seq, dropout=0.0, steps=steps, warmup=warmup)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": str(dtype), "seq": seq,
              "rows_per_adapter": rows, "results": []}
    for shape in shapes:
        runs: dict[str, dict] = {}
        entry = {"shape": shape, "runs": runs}
        report["results"].append(entry)

        def measure_each(build, plan: dict) -> None:
            try:
                bench = build(shape, s, device, dtype)
            except Exception as err:  # noqa: BLE001 - its runs fail, the other side's still run
                bench, built = None, _failure(err)
            for name, how in plan.items():
                try:
                    runs[name] = built if bench is None else how(bench)
                except Exception as err:  # noqa: BLE001 - one run's failure must not end the benchmark
                    runs[name] = _failure(err)
                entry.update(_ratios(shape, seq, s.r, runs))
                if out is not None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(report, indent=1))
            del bench
            free_memory(device)

        measure_each(MoeMlora, {
            "mlora_1": lambda b: b.run(1, rows), "mlora_4": lambda b: b.run(4, rows),
            "mlora_frozen": lambda b: b.run_frozen(rows),
            "mlora_frozen_4": lambda b: b.run_frozen(4 * rows),  # (the bound of 4 adapters' rows)
            "mlora_4_per_expert": lambda b: _per_expert(lambda: b.run(4, rows))})
        measure_each(MoeHF, {"peft_1": lambda b: b.run_peft(rows), "hf_frozen": lambda b: b.run_frozen(rows)})
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in entry.items()
                          if k != "runs"}), flush=True)
    return report


def _per_expert(run):
    """run() with the experts one at a time, as before they ran grouped."""
    grouped = moe.GROUPED_EXPERTS
    moe.GROUPED_EXPERTS = False
    try:
        return run()
    finally:
        moe.GROUPED_EXPERTS = grouped


# ratio: (numerator run, denominator run)
RATIOS = {"mlora_1_over_peft": ("mlora_1", "peft_1"), "mlora_4_over_peft": ("mlora_4", "peft_1"),
          "mlora_4_over_frozen": ("mlora_4", "mlora_frozen_4"),
          "grouped_over_per_expert": ("mlora_4", "mlora_4_per_expert")}


def _ratios(shape: str, seq: int, r: int, runs: dict[str, dict]) -> dict:
    """The runs' tokens/s, the ratios of those that ran, and (once PEFT's and mlora's one
    adapter ran) whether both train the same LoRA: PEFT fuses each expert's gate and up LoRAs
    into one of rank 2r whose B is a full [2I, 2r] (mlora's two [I, r] and the off-diagonal blocks)."""
    tps = {k: v["tokens_per_s"] for k, v in runs.items() if "tokens_per_s" in v}
    out = {"tokens_per_s": tps}
    out.update({name: tps[a] / tps[b] for name, (a, b) in RATIOS.items() if a in tps and b in tps})
    if "peft_1" in tps and "mlora_1" in tps:
        args = args_from_hf_config(moe_config(shape, seq))
        extra = sum(args.moe_layers) * args.num_experts * 2 * args.moe_intermediate_size * r
        runs["peft_1"]["lora_params_matched"] = runs["peft_1"]["lora_params"] == runs["mlora_1"]["lora_params"] + extra
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="the small shapes on the CPU, fp32")
    p.add_argument("--shapes", nargs="*", help=f"of {', '.join(SHAPES)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    a = p.parse_args(argv)
    if a.cpu or not torch.cuda.is_available():
        return run(a.shapes or ["tiny-mixtral", "tiny-qwen3-moe"], torch.device("cpu"), torch.float32,
                   seq=128, rows=4, steps=a.steps or 5, warmup=a.warmup, out=a.out)
    return run(a.shapes or ["olmoe-1b-7b", "mixtral-small"], torch.device("cuda"), torch.bfloat16,
               seq=512, rows=8, steps=a.steps or 5, warmup=a.warmup, out=a.out)


if __name__ == "__main__":
    main()
