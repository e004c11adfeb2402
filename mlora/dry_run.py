"""`mlora train --dry_run`: what a training run would do, told in seconds, before any GPU hour
is spent on it.

It opens the session as `mlora train` does (config, data, templates, config.json, tokenizer)
but reads none of the weights, runs `mlora train`'s checks of the output directory without
creating it, and the trainer's of its adapters on a base built on the meta device, walks the
very stream of fused batches the trainer would train on (trainer.training_batches, every
epoch: building it is bookkeeping over token counts, no tensor math), and prices the costliest
batch with the memory model (memory.estimate_peak_bytes) against the memory free on the
device. The plan goes to stderr, one JSON line to stdout (as `mlora eval` prints its results).
A walk that lasts (an absurd num_epochs, a huge dataset) shows a progress bar on stderr
meanwhile (not with --no_progress); one of a second or so shows none.

With --pipeline, pipeline/dry_run.py plans the pipeline run instead, from the session and the
checks here: per stage its modules and its peak against its GPU's free memory.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mlora.errors import UserError
from mlora.json_line import json_line
from mlora.plural import counted

# A walk shorter than this prints no bar (most plans take a second: their output stays the plan);
# a longer one, an absurd num_epochs or a huge dataset, shows its progress until it ends.
PROGRESS_DELAY_S = 2.0

@dataclass
class AdapterPlan:
    name: str
    rows: int  # training rows, after encoding
    trained_tokens: int  # label tokens the loss learns, summed over every step of the run
    epochs: int  # epochs the run reaches (max_steps may end it early)
    micro_batches: int
    steps: int  # optimizer steps
    rows_without_labels: int  # rows with no token to learn within cutoff_len (trained on, teaching nothing)


@dataclass
class BatchPlan:
    batches: int  # fused batches, the trainer's iterations
    useful_tokens: int
    padded_tokens: int
    padding_fraction: float
    over_budget: int  # batches above the token budget (a lone micro-batch larger than it)
    shapes: set[tuple[int, int]]  # every (rows, seq_len) a batch has


def dry_run(args) -> int:
    from mlora.memory import device_free_bytes
    from mlora.trainer import check_disk_space

    if args.resume:
        raise UserError("--dry_run plans a run from its start; leave out --resume")
    if args.pipeline:  # (its ranks schedule micro-batches of one adapter each, in segments of their own)
        from mlora.pipeline.dry_run import dry_run_pipeline

        return dry_run_pipeline(args)
    started = time.perf_counter()
    session = open_unloaded(args, args.device)
    model_args = check_start(session, args.overwrite)
    # then, in the trainer's order (trainer.Trainer), its budget and its adapters
    # what this process can allocate now (CUDA; None elsewhere), as the trainer measures it once
    # the weights are loaded; not the device's total, which other processes may be using
    device_bytes = device_free_bytes(session.device)
    budget, source, why = token_budget(session, model_args, device_bytes)
    check_disk_space(Path(session.cfg.output_dir), meta_adapters(session, model_args))
    adapters, batches = walk_batches(session, budget, progress=not args.no_progress)
    largest, peak = costliest_shape(session, model_args, batches.shapes)
    print_plan(args, session, model_args, adapters, batches, (budget, source, why), (largest, peak), device_bytes,
               time.perf_counter() - started)
    return 0


def open_unloaded(args, device: str | None, data_notes: bool = True):
    """The session `mlora train` opens (config, data, templates, config.json, tokenizer), on
    `device`, without the base's weights: none are read, nor is their index checked."""
    from mlora.cli import quant_config
    from mlora.session import open_session

    return open_session(args.base_model, args.config, output_dir=args.output_dir, device=device, dtype=args.dtype,
                        seed=args.seed, quant=quant_config(args), trust_remote_code=args.trust_remote_code,
                        load_base=False, weights=False, data_notes=data_notes)


def check_start(session, overwrite: bool, shared_lock: bool = False):
    """mlora train's checks before it loads the base, in its order, none of them writing: every
    adapter has a token to learn, the output directory could be made, no run writes there now
    (the lock's line; shared_lock: as a pipeline rank takes it) and none left checkpoints a fresh
    start would delete (unless `overwrite`). Returns the base's ModelArgs."""
    from mlora import checkpoint
    from mlora.batching import check_trainable
    from mlora.cli import check_creatable, check_output_dir, written_dirs
    from mlora.loader import read_model_config
    from mlora.output_lock import output_dir_lock

    cfg, out = session.cfg, session.cfg.output_dir
    model_args = read_model_config(session.base_dir)[1]
    for a in cfg.lora:
        check_trainable(session.data[a.name].train, a, cfg.cutoff_len)
    check_output_dir(out, [a.name for a in cfg.lora], written_dirs(session))
    check_creatable(out)
    if Path(out).is_dir():
        with output_dir_lock(out, shared=shared_lock):  # a run writing there now: the lock's one line, as train's
            if not overwrite and (newest := checkpoint.unfinished_run(out)) is not None:
                raise checkpoint.refuse_to_clear(newest, pipeline=shared_lock)
    return model_args


def meta_adapters(session, model_args) -> list:
    """The trainer's refusals of its adapters (trainer.Trainer and a pipeline's StageWorker build
    them once the base is loaded): each adapter built as the trainer builds it, but on wrappers
    of a base built on the meta device and with its weights there too (shapes, no memory, no
    values): an r larger than a target projection, an init_from whose r, alpha, tensors or
    shapes do not fit (its files read, the base's weights not). Returns them (the trainer then
    checks the disk has room for their checkpoints)."""
    from mlora.adapter import Adapter
    from mlora.batching import total_steps
    from mlora.lora import BatchLayout, inject_lora
    from mlora.models import family_for
    from mlora.models.naming import naming_for

    cfg = session.cfg
    with torch.device("meta"):
        model = family_for(model_args.model_type).CausalLM(model_args)
    wrappers = inject_lora(model, BatchLayout())
    meta = torch.device("meta")
    return [Adapter(a, wrappers, cfg.seed, meta, total_steps(len(session.data[a.name].train), a),
                    naming=naming_for(model_args.model_type)) for a in cfg.lora]


def token_budget(session, model_args, device_bytes: int | None) -> tuple[int | None, str, str]:
    """(the fused batches' token budget, its source: "max_tokens_per_batch", "memory_fraction" or
    "none", why), as Trainer._plan_budget picks it; but the free memory is the device's free
    memory now (device_bytes, memory.device_free_bytes) less the estimated weights (nothing is
    loaded to measure it; the run measures it after its load)."""
    from mlora.memory import FITTED_STRATEGIES, estimate_peak_bytes, format_size, plan_token_budget, run_estimate_kwargs

    cfg = session.cfg
    free = weights = None
    if device_bytes is not None:
        kwargs = run_estimate_kwargs(cfg, dtype=session.dtype, quant=session.quant, device=session.device)
        weights = estimate_peak_bytes(model_args, rows=0, seq_len=0, **kwargs).weights
        if weights >= device_bytes:  # (the run would fail loading them)
            raise UserError(f"base_model {session.base_dir}: its weights (about {format_size(weights)} in "
                            f"{str(session.dtype).removeprefix('torch.')}) do not fit the {format_size(device_bytes)} "
                            f"free on {session.device}; quantize them (--load_4bit, --load_8bit) or split the base "
                            f"across GPUs (--pipeline)")
        free = device_bytes - weights
    plan = plan_token_budget(cfg, model_args, free_bytes=free, dtype=session.dtype, quant=session.quant,
                             device=session.device)
    if plan.note:
        print(plan.note, file=sys.stderr)
    if cfg.train_strategy not in FITTED_STRATEGIES:
        unused = ("" if cfg.max_tokens_per_batch is None
                  else f"; its max_tokens_per_batch {cfg.max_tokens_per_batch} is not used")
        return None, "none", f"train_strategy trivial fuses without one{unused}"
    if cfg.max_tokens_per_batch is not None:
        return plan.max_tokens, "max_tokens_per_batch", "the config's max_tokens_per_batch"
    if plan.max_tokens is not None:
        return plan.max_tokens, "memory_fraction", (f"automatic: memory_fraction {cfg.memory_fraction} of the "
                                                    f"{format_size(free)} left beside {format_size(weights)} "
                                                    f"of weights")
    return None, "none", f"automatic on CUDA only: set max_tokens_per_batch to bound batches on {session.device.type}"


def walk_batches(session, budget: int | None, progress: bool = True) -> tuple[list[AdapterPlan], BatchPlan]:
    """Every fused batch of the run, from trainer.training_batches as the trainer draws them
    (no adapter stops: on_nan stop is a run's own event), tallied per adapter and overall;
    progress: a bar on stderr while a long walk lasts."""
    from mlora.trainer import packed_row_len, training_batches

    cfg = session.cfg
    train = {a.name: session.data[a.name].train for a in cfg.lora}
    batches = with_progress_bar(training_batches(cfg, train, budget, stopped=set()), run_steps(cfg, train), progress)
    return tally_batches(cfg, train, batches, budget, packed_row_len(cfg))


def run_steps(cfg, train: dict[str, list]) -> int:
    """The optimizer steps of every adapter of the run on `train`'s rows (all of them: in a
    plan no adapter stops early): a progress bar's total."""
    from mlora.batching import total_steps

    return sum(total_steps(len(train[a.name]), a) for a in cfg.lora)


def progress_bar(steps: int, progress: bool, desc: str):
    """A bar on stderr of `steps` optimizer steps, shown once it has lasted PROGRESS_DELAY_S
    (never without `progress`); closed, it is gone, so the plan follows on stderr as it would
    without it. The one-process walk and the pipeline's plan (pipeline/dry_run.py) show it."""
    from tqdm import tqdm

    return tqdm(total=steps, desc=desc, unit="step", leave=False, disable=not progress, delay=PROGRESS_DELAY_S,
                mininterval=0.5, dynamic_ncols=True, file=sys.stderr)


def with_progress_bar(batches, steps: int, progress: bool):
    """`batches` (fused batches) as they come, with a progress_bar of the optimizer steps they
    complete (`steps` in all)."""
    bar = progress_bar(steps, progress, "dry run: walking the fused batches")
    try:
        for parts in batches:
            yield parts
            bar.update(sum(part.last_in_step for part in parts))
    finally:
        bar.close()


def tally_batches(cfg, train: dict[str, list], batches, budget: int | None,
                  pack_len: int | None) -> tuple[list[AdapterPlan], BatchPlan]:
    """`batches` (each a list of micro-batches fused into one) tallied per adapter (of `train`'s
    rows) and overall, as fused with rows of pack_len tokens (None: unpacked)."""
    from mlora.batching import rows_without_labels
    from mlora.strategies import batch_shape, padding_stats

    tally = {a.name: {"micro_batches": 0, "steps": 0, "trained_tokens": 0, "epochs": set()} for a in cfg.lora}
    shapes: set[tuple[int, int]] = set()

    def counted(batches):
        for parts in batches:
            for part in parts:
                t = tally[part.adapter]
                t["micro_batches"] += 1
                t["steps"] += part.last_in_step
                t["trained_tokens"] += part.label_tokens
                t["epochs"].add(part.epoch)
            shapes.add(batch_shape(parts, pack_len))
            yield parts

    stats = padding_stats(counted(batches), budget, pack_len)
    adapters = [AdapterPlan(a.name, len(train[a.name]), tally[a.name]["trained_tokens"], len(tally[a.name]["epochs"]),
                            tally[a.name]["micro_batches"], tally[a.name]["steps"], rows_without_labels(train[a.name]))
                for a in cfg.lora]
    return adapters, BatchPlan(stats["batches"], stats["useful_tokens"], stats["padded_tokens"],
                               stats["padding_fraction"], stats["over_budget"], shapes)


def costliest_shape(session, model_args, shapes: set[tuple[int, int]]) -> tuple[tuple[int, int], int]:
    """((rows, seq_len), bytes): the batch shape of the highest memory.estimate_peak_bytes of one
    training step for this run (its adapters, recompute, dtype, quantization, device). Its
    terms grow with rows and with seq_len but not alike, so every shape is priced (few: rows x
    lengths up to cutoff_len)."""
    from mlora.memory import estimate_peak_bytes, run_estimate_kwargs

    kwargs = run_estimate_kwargs(session.cfg, dtype=session.dtype, quant=session.quant, device=session.device)
    peaks = {(rows, seq_len): estimate_peak_bytes(model_args, rows=rows, seq_len=seq_len, **kwargs).total
             for rows, seq_len in shapes}
    largest = max(peaks, key=lambda shape: (peaks[shape], shape))
    return largest, peaks[largest]


def print_plan(args, session, model_args, adapters: list[AdapterPlan], batches: BatchPlan,
               budget_plan: tuple[int | None, str, str], costliest: tuple[tuple[int, int], int],
               device_bytes: int | None, seconds: float) -> None:
    """The plan on stderr, for a person; the same figures as one JSON line on stdout."""
    from mlora.memory import format_size

    cfg = session.cfg
    budget, source, why = budget_plan
    dtype = str(session.dtype).removeprefix("torch.")
    lines = [f"mlora: dry run of {args.config}: {model_args.model_type}, {counted(model_args.num_layers, 'layer')}, on "
             f"{session.device} in {dtype}; weights not read, nothing written ({seconds:.1f} s)"]
    lines += adapter_lines(cfg, adapters)
    lines.append(f"  fused batches: {batches.batches} ({cfg.train_strategy}, up to "
                 f"{counted(cfg.train_lora_simultaneously_num, 'adapter')} "
                 f"each{', packed rows' if cfg.packing else ''}); "
                 f"padding {batches.padding_fraction:.1%} of {counted(batches.padded_tokens, 'token')}")
    over = (f"; {counted(batches.over_budget, 'batch')} above it (micro-batches larger than it run alone)"
            if batches.over_budget else "")
    lines.append(f"  token budget: {'none' if budget is None else budget} ({why}){over}")
    (rows, seq_len), peak = costliest
    if device_bytes is None:
        memory = f"as a CUDA device would hold it ({session.device.type} has no device memory to compare with)"
    else:
        memory = f"of the {format_size(device_bytes)} free on {session.device} ({peak / device_bytes:.0%})"
        if peak > device_bytes:
            memory += ": it would not fit; a batch that runs out of memory is split and retried"
    lines.append(f"  estimated peak memory: {format_size(peak)} for the largest batch ({counted(rows, 'row')} of "
                 f"{counted(seq_len, 'token')}) {memory}")
    print("\n".join(lines), file=sys.stderr, flush=True)
    print(json_line(plan_record(adapters, batches, (rows, seq_len), (budget, source), peak, str(session.device),
                                device_bytes)), flush=True)


def adapter_lines(cfg, adapters: list[AdapterPlan]) -> list[str]:
    """The plan's table of adapters, what it says of their rows without a token to learn and
    of their early stopping."""
    from mlora.batching import unlearnable_rows_note
    from mlora.early_stopping import never_stops_note

    width = max(len("adapter"), *(len(a.name) for a in adapters))
    lines = [f"  {'adapter':<{width}}  {'rows':>7}  {'trained tokens':>14}  {'epochs':>6}  {'micro-batches':>13}  "
             f"{'steps':>7}"]
    for a in adapters:
        lines.append(f"  {a.name:<{width}}  {a.rows:>7}  {a.trained_tokens:>14}  {a.epochs:>6}  {a.micro_batches:>13}  "
                     f"{a.steps:>7}")
    for a, plan in zip(cfg.lora, adapters):  # (the notes training prints)
        if (note := unlearnable_rows_note(a, plan.rows_without_labels, plan.rows, cfg.cutoff_len)) is not None:
            lines.append(f"  {note.removeprefix('mlora: ')}")
    steps = {a.name: a.steps for a in adapters}
    stopping = []  # the adapters early stopping may stop; those it cannot are noted
    for a in (a for a in cfg.lora if a.early_stopping_patience is not None):
        note = never_stops_note(a, steps[a.name])
        if note is None:
            stopping.append(a.name)
        else:
            lines.append(f"  {note.removeprefix('mlora: ')}")
    if stopping:  # (a plan evaluates nothing: it cannot know when an eval loss stops improving)
        lines.append(f"  note: early stopping may stop {', '.join(stopping)} before the steps planned here (their "
                     f"slots then go to queued adapters sooner)")
    return lines


def plan_record(adapters: list[AdapterPlan], batches: BatchPlan, largest: tuple[int, int],
                budget: tuple[int | None, str], peak: int, device: str | None, free: int | None) -> dict:
    """The plan's JSON line (a pipeline's adds its stages to it)."""
    return {"dry_run": True, "adapters": [asdict(a) for a in adapters],
            **{k: v for k, v in asdict(batches).items() if k != "shapes"},
            "largest_batch": {"rows": largest[0], "seq_len": largest[1]}, "token_budget": budget[0],
            "budget_source": budget[1], "peak_bytes": peak, "device": device, "free_bytes": free}
