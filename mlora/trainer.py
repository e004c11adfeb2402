"""The single-stage training loop: fused batch -> forward -> per-adapter loss -> one backward
-> every adapter whose optimizer step is complete clips, steps and logs."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from mlora.adapter import Adapter, save_checkpoint_dir
from mlora.batching import adapter_stream, fuse, round_robin, total_steps
from mlora.config import adapter_seed
from mlora.evaluate import evaluate_adapter
from mlora.loss import token_loss_sums
from mlora.metrics import MetricsLog
from mlora.session import Session


@dataclass
class StepAccumulator:
    """What one adapter has seen since its last optimizer step."""

    loss: float = 0.0  # sum of (CE sum / step label tokens) over the step's micro-batches
    label_tokens: int = 0
    input_tokens: int = 0


@dataclass
class AdapterProgress:
    adapter: Adapter
    total_steps: int
    bar: tqdm
    step: StepAccumulator = field(default_factory=StepAccumulator)
    tokens_seen: int = 0
    started: float = field(default_factory=time.perf_counter)
    last_loss: float | None = None


def train(session: Session, progress: bool = True) -> dict[str, dict]:
    """Train every adapter of the session's config; returns {name: summary}."""
    cfg = session.cfg
    model = session.model
    assert model is not None, "load the base model first"
    out = Path(cfg.output_dir)
    if cfg.train_strategy != "trivial":
        print(f"mlora: train_strategy '{cfg.train_strategy}' is not implemented yet; using "
              f"'trivial' (each adapter's result is the same, only the batching differs)",
              file=sys.stderr)

    runs: dict[str, AdapterProgress] = {}
    streams = {}
    for position, a in enumerate(cfg.lora):
        train_rows = session.data[a.name].train
        steps = total_steps(len(train_rows), a)
        adapter = Adapter(a, session.wrappers, cfg.seed, session.device, steps)
        bar = tqdm(total=steps, desc=a.name, position=position, leave=True, disable=not progress,
                   dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
        runs[a.name] = AdapterProgress(adapter, steps, bar)
        streams[a.name] = adapter_stream(train_rows, a, adapter_seed(cfg.seed, a.name))

    metrics = MetricsLog(out / "metrics.jsonl")
    started = time.perf_counter()
    model.train()  # the base has no dropout; this turns on the adapters' LoRA dropout
    try:
        for parts in round_robin(streams, cfg.train_lora_candidate_num, cfg.train_lora_simultaneously_num):
            batch = fuse(parts, session.pad_id).to(session.device)
            session.layout.rows = batch.rows
            logits = model(batch.input_ids, batch.attention_mask)  # [B, S, V]
            sums = token_loss_sums(logits, batch.labels, batch.rows)
            total = sum(sums[p.adapter][0] / max(1, p.step_label_tokens) for p in parts)
            total.backward()
            del logits, total
            for part in parts:
                run = runs[part.adapter]
                ce_sum, count = sums[part.adapter]
                run.step.loss += ce_sum.item() / max(1, part.step_label_tokens)
                run.step.label_tokens += count
                run.step.input_tokens += sum(len(ex.input_ids) for ex in part.examples)
                if part.last_in_step:
                    _finish_step(session, run, part.epoch, metrics, started)
        session.layout.rows = []
    finally:
        metrics.close()
        for run in runs.values():
            run.bar.close()

    summary = {}
    for name, run in runs.items():
        final_dir = run.adapter.save(out / name, str(session.base_dir.resolve()))
        summary[name] = {"steps": run.adapter.steps_done, "loss": run.last_loss, "output": str(final_dir)}
    return summary


def _finish_step(session: Session, run: AdapterProgress, epoch: int, metrics: MetricsLog,
                 started: float) -> None:
    adapter = run.adapter
    lr, grad_norm = adapter.step()
    step = adapter.steps_done
    run.tokens_seen += run.step.input_tokens
    run.last_loss = run.step.loss
    elapsed = time.perf_counter() - run.started
    metrics.write({"adapter": adapter.name, "step": step, "epoch": epoch, "loss": run.step.loss,
                   "lr": lr, "grad_norm": grad_norm, "tokens": run.step.label_tokens,
                   "input_tokens": run.step.input_tokens, "time": time.perf_counter() - started})
    run.bar.update(1)
    run.bar.set_postfix(loss=f"{run.step.loss:.4f}", tok_s=f"{run.tokens_seen / max(elapsed, 1e-9):.0f}",
                        refresh=False)
    run.step = StepAccumulator()

    cfg = adapter.cfg
    out = Path(session.cfg.output_dir)
    if cfg.eval_step and (step % cfg.eval_step == 0 or step == run.total_steps):
        loss, tokens = evaluate_adapter(session, cfg.name, session.data[cfg.name].test)
        session.model.train()
        metrics.write({"adapter": adapter.name, "step": step, "eval_loss": loss, "eval_tokens": tokens,
                       "time": time.perf_counter() - started})
        run.bar.write(f"[{adapter.name}] step {step}: eval loss {loss:.4f} over {tokens} tokens")
    if session.cfg.save_step and step % session.cfg.save_step == 0:
        save_checkpoint_dir(out / adapter.name / f"checkpoint-{step}", adapter.peft_state_dict(),
                            adapter.peft_config(str(session.base_dir.resolve())))
