"""How many micro-batches each pipeline stage may hold in flight (forwarded, not yet
backwarded), by the memory model, and what a stage then holds at its peak.

A training rank reads its device's free memory once its slice is loaded, computes its
`stage_figures`, and every rank gets everyone's to take the same `bounds_of` (worker.py's
in_flight_bounds). `mlora train --dry_run --pipeline` computes them for every stage without
loading anything (pipeline/dry_run.py): the same functions, so the plan cannot drift from the
run.
"""

from __future__ import annotations

from collections.abc import Iterable

from mlora import memory
from mlora.batching import MicroBatch
from mlora.errors import UserError
from mlora.packing import packed_shape
from mlora.pipeline.plan import max_in_flight_1f1b
from mlora.plural import counted


def largest_micro_batch(micro_batches: Iterable[MicroBatch], pack_len: int | None) -> tuple[int, int]:
    """(rows, seq_len) that bound every micro-batch's shape as rank 0 fuses it: the most rows
    of any and the longest (padded) row of any; packed, as packed into rows of pack_len tokens."""
    rows = seq_len = 0
    for part in micro_batches:
        if pack_len is None:
            shape = len(part.examples), max(len(ex.input_ids) for ex in part.examples)
        else:
            shape = packed_shape(part.examples, pack_len)
        rows, seq_len = max(rows, shape[0]), max(seq_len, shape[1])
    return rows, seq_len


def stage_estimate_kwargs(cfg, parts: list[str], *, dtype, quant, device) -> dict:
    """`memory.estimate_peak_bytes`' arguments (but the shape) for a micro-batch on the stage
    holding `parts`: the run's (memory.run_estimate_kwargs), but each micro-batch is one
    adapter's. device: the stage's (None: one this process does not see; the LoRA kernel is
    then counted as fused, an overestimate where `auto` would run triton)."""
    return {**memory.run_estimate_kwargs(cfg, dtype=dtype, quant=quant, parts=parts, device=device),
            "active_adapters": 1}


def stage_figures(cfg, model_args, parts: list[str], *, free: int, shape: tuple[int, int], dtype, quant,
                  device) -> dict:
    """One stage's figures for `bounds_of` (msgpack-able: they travel between ranks): how many
    micro-batches of `shape` (largest_micro_batch) fit memory_fraction of `free`, the bytes its
    device can still allocate beside its weights."""
    rows, seq_len = shape
    fit = memory.micro_batches_in_flight(model_args, free_bytes=free, rows=rows, seq_len=seq_len,
                                         fraction=cfg.memory_fraction,
                                         **stage_estimate_kwargs(cfg, parts, dtype=dtype, quant=quant, device=device))
    return {"fits": fit.fits, "need": fit.need(1), "per": fit.per_micro_batch, "free": free,
            "rows": rows, "seq_len": seq_len, "parts": span(parts)}


def span(parts: list[str]) -> str:
    """A stage's modules as the ranks name them in their messages: embed..layer.7."""
    return parts[0] if len(parts) == 1 else f"{parts[0]}..{parts[-1]}"


def bounds_of(everyone: list[dict], cfg) -> tuple[list[int], str | None]:
    """Each stage's bound on micro-batches in flight for `build_plan`, from every stage's
    figures (`stage_figures`; {"fits": None} where the device does not say: not CUDA): 1F1B's
    P - s, lowered to what fits. Returns the bounds and the line that says which it lowered
    (None when none). A UserError naming every stage that cannot hold even one micro-batch."""
    fraction = cfg.memory_fraction
    short = [(rank, e) for rank, e in enumerate(everyone) if e["fits"] == 0]
    if short:
        where = "; ".join(f"rank {rank} ({e['parts']}) needs about {memory.format_size(e['need'])} beyond its "
                          f"weights, more than memory_fraction {fraction} of its {memory.format_size(e['free'])} free"
                          for rank, e in short)
        fixes = "lower micro_batch_size or cutoff_len, " + ("" if cfg.recompute else "set \"recompute\": true, ")
        e = short[0][1]
        raise UserError(f"not even one micro-batch of {counted(e['rows'], 'row')} x {counted(e['seq_len'], 'token')} "
                        f"is estimated to fit: {where}; {fixes}or split the model over more stages")
    bounds, lowered = [], []
    for stage, e in enumerate(everyone):
        default = max_in_flight_1f1b(len(everyone), stage)
        bounds.append(default if e["fits"] is None else min(default, e["fits"]))
        if bounds[-1] < default:
            lowered.append(f"stage {stage}: {bounds[-1]} (1F1B: {default}; {memory.format_size(e['per'])} each, "
                           f"{memory.format_size(e['free'])} free)")
    note = None
    if lowered:
        note = (f"mlora: micro-batches in flight per stage lowered to fit {fraction:.0%} of free memory: "
                + ", ".join(lowered))
    return bounds, note


def stage_peak(estimate: memory.MemoryEstimate, in_flight: int) -> int:
    """A stage's peak with `in_flight` micro-batches in flight, by the memory model of
    `memory.InFlightFit`: each keeps its activations, the rest of a step is there once
    (weights + InFlightFit.need(in_flight)). estimate: one micro-batch's of the largest shape."""
    return estimate.total + (in_flight - 1) * estimate.activations
