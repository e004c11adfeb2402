"""`mlora train --dry_run --pipeline`: the one-process dry run (mlora/dry_run.py) for a
pipeline run: its checks, and per stage whether it fits its GPU, told in seconds, before the
ranks are started. It joins no rank (the transport flags are accepted and ignored).

It opens the session and makes the checks the one-process dry run makes (no weights read,
nothing written), splits the base as every rank splits it (run.plan_stages), builds the
micro-batch streams, the segments and their plans as every rank builds them
(worker.micro_batch_streams, segments_of, segment_plans), and prices each stage with the
pipeline's own memory model (pipeline/in_flight.py): its bound on micro-batches in flight
(1F1B's P - s, lowered to what fits memory_fraction of its device's free memory, as the
ranks agree on it at start-up), and its estimated peak with the most micro-batches the plans
hold there at once, each priced at the largest micro-batch.

Without a rank it plans every stage, stage s on cuda:s when the device is a GPU (where
launch/manual.sh and torchrun on one node put rank s), a stage on a GPU this process does not
see planned as a stage off CUDA (1F1B's bound, nothing to compare). With a rank (--rank, or
torchrun's RANK) it plans that stage alone on the rank's device (--device, or torchrun's
LOCAL_RANK), each rank of a launch checking its own GPU; the other stages are then planned at
1F1B's bounds.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass

import torch

from mlora.errors import UserError
from mlora.json_line import json_line
from mlora.plural import counted


@dataclass
class StagePlan:
    rank: int
    modules: list[str]
    device: str
    free_bytes: int | None  # what this process can allocate there now (None: not CUDA, or not seen here)
    weights_bytes: int  # its slice of the base, estimated
    in_flight: int  # the most micro-batches the run's plans hold there at once
    in_flight_bound: int  # what they may hold: 1F1B's P - s, lowered to fit its memory
    peak_bytes: int  # estimated, with in_flight micro-batches of the largest shape


def dry_run_pipeline(args) -> int:
    from mlora.dry_run import check_start, meta_adapters, open_unloaded, progress_bar, run_steps, tally_batches
    from mlora.pipeline.in_flight import largest_micro_batch
    from mlora.pipeline.run import plan_stages, resolve_place
    from mlora.pipeline.worker import micro_batch_streams
    from mlora.trainer import packed_row_len

    started = time.perf_counter()
    place = resolve_place(args, rank_needed=False)
    device = args.device if place.rank is None else place.device
    if place.rank is None and device is not None and str(device).strip().startswith("cuda:"):
        raise UserError(f"--device {device}: a dry run of every stage puts stage s on cuda:s; give --device cuda, "
                        f"or plan one stage with --rank")
    # in train --pipeline's order, without what needs the other ranks
    session = open_unloaded(args, device, data_notes=place.rank in (None, 0))
    stages = plan_stages(args.base_model, place.world_size, args.balance)
    model_args = check_start(session, args.overwrite, shared_lock=True)
    adapters_on_meta = meta_adapters(session, model_args)  # (a rank does not check the disk for checkpoints)
    cfg = session.cfg
    pack_len = packed_row_len(cfg)
    train = {a.name: session.data[a.name].train for a in cfg.lora}
    # The slow part of a long run (an absurd num_epochs, a huge dataset): the streams, and
    # mostly the segments' plans, whose steps the bar counts; it shows once this has lasted
    # PROGRESS_DELAY_S, as the one-process walk's, and is gone before the plan is printed.
    with contextlib.closing(progress_bar(run_steps(cfg, train), not args.no_progress,
                                         "dry run: planning the pipeline's segments")) as bar:
        micro, streams = micro_batch_streams(cfg, session.data)
        # each micro-batch goes through the stages alone: one adapter's, no fusing, no token budget
        adapters, batches = tally_batches(cfg, train, ([part] for part in micro.values()), None, pack_len)
        shape = largest_micro_batch(micro.values(), pack_len)
        planned = plan_memory(session, model_args, stages, place.rank, streams, shape, adapters_on_meta, bar)
    print_plan(args, session, model_args, place, adapters, batches, planned, shape, time.perf_counter() - started)
    return 0


def stage_devices(session, world: int, rank: int | None) -> dict[int, tuple[torch.device, bool]]:
    """{stage: (its device, whether this process sees it)} of the stages planned: with a rank,
    that rank's (the session's); without, every stage, stage s on cuda:s when the session's
    device is a GPU, else on that device."""
    if rank is not None:
        return {rank: (session.device, True)}
    if session.device.type != "cuda":
        return {s: (session.device, True) for s in range(world)}
    return {s: (torch.device("cuda", s), s < torch.cuda.device_count()) for s in range(world)}


def resident_adapter_bytes(adapters: list, parts: list[str]) -> int:
    """The bytes of the adapters' fp32 A and B on the decoder layers of `parts`: what a rank
    holds of them when it reads its free memory (StageWorker builds them before it plans).
    adapters: every adapter on the whole base (dry_run.meta_adapters), shapes only."""
    from mlora.adapter import decoder_layer_of

    layers = {int(p.removeprefix("layer.")) for p in parts if p.startswith("layer.")}
    return sum(4 * p.numel() for a in adapters for name, p in a.named_parameters()  # (the flat fp32 buffer's)
               if int(decoder_layer_of(name).rsplit(".", 1)[-1]) in layers)


def plan_memory(session, model_args, stages: list[list[str]], rank: int | None, streams: dict,
                shape: tuple[int, int], adapters: list, bar=None) -> tuple[list[StagePlan], str | None, int]:
    """(each planned stage's StagePlan, the line saying which bounds the memory lowered (None:
    none), the number of segments), by the code the ranks run: the bounds from every stage's
    figures (in_flight.bounds_of; a stage not planned or not seen here says nothing, as a rank
    off CUDA), each segment's plan with them, and each stage's peak at the most micro-batches
    those plans hold there. adapters: every adapter, on the meta device (dry_run.meta_adapters).
    What a rank would refuse (a stage that cannot hold one micro-batch) is refused with its
    line; so are weights larger than a stage's free memory (its load would fail). bar: a
    progress bar (dry_run.progress_bar) told the steps of each segment planned."""
    from mlora import memory
    from mlora.pipeline.in_flight import bounds_of, span, stage_estimate_kwargs, stage_figures, stage_peak
    from mlora.pipeline.plan import most_in_flight
    from mlora.pipeline.worker import cut_periods, segment_plans, segments_of

    cfg = session.cfg
    rows, seq_len = shape
    devices = stage_devices(session, len(stages), rank)
    figures: list[dict] = [{"fits": None} for _ in stages]
    estimates, frees, too_heavy = {}, {}, []
    for s, (device, seen) in devices.items():
        kwargs = dict(dtype=session.dtype, quant=session.quant, device=device if seen else None)
        estimates[s] = memory.estimate_peak_bytes(model_args, rows=rows, seq_len=seq_len,
                                                  **stage_estimate_kwargs(cfg, stages[s], **kwargs))
        frees[s] = memory.device_free_bytes(device) if seen else None
        if frees[s] is None:
            continue
        if estimates[s].weights >= frees[s]:
            too_heavy.append(f"rank {s}'s slice ({span(stages[s])}) is about "
                             f"{memory.format_size(estimates[s].weights)}, more than the "
                             f"{memory.format_size(frees[s])} free on {device}")
            continue
        # (a rank reads its free memory with its slice and its adapters' A and B resident: here,
        # what is free less those)
        resident = estimates[s].weights + resident_adapter_bytes(adapters, stages[s])
        figures[s] = stage_figures(cfg, model_args, stages[s], free=frees[s] - resident, shape=shape, **kwargs)
    if too_heavy:
        dtype = str(session.dtype).removeprefix("torch.")
        raise UserError(f"base_model {session.base_dir} in {dtype}: {'; '.join(too_heavy)}; quantize it "
                        f"(--load_4bit, --load_8bit) or split it over more stages")
    bounds, note = bounds_of(figures, cfg)
    segments, _ = segments_of(streams, cut_periods(cfg))
    plans = segment_plans(cfg, counted_steps(segments, bar), len(stages), bounds)
    planned = []
    for s, (device, _) in devices.items():
        in_flight = max(most_in_flight(plan.stages[s]) for plan in plans)
        planned.append(StagePlan(s, stages[s], str(device), frees[s], estimates[s].weights, in_flight, bounds[s],
                                 stage_peak(estimates[s], in_flight)))
    return planned, note, len(segments)


def counted_steps(segments: list[dict], bar):
    """`segments` (segments_of's) as they are planned, the bar told each one's steps once it is."""
    for segment in segments:
        yield segment
        if bar is not None:
            bar.update(sum(ref.last_in_step for refs in segment.values() for ref in refs))


def print_plan(args, session, model_args, place, adapters, batches, memory_plan, shape: tuple[int, int],
               seconds: float) -> None:
    """The plan on stderr, for a person; the same figures as one JSON line on stdout: the
    one-process dry run's keys (for the micro-batches, each its own batch, and the costliest
    stage's peak) and each planned stage's."""
    from mlora.dry_run import adapter_lines, plan_record
    from mlora.memory import format_size
    from mlora.pipeline.in_flight import span
    from mlora.pipeline.plan import max_in_flight_1f1b

    cfg = session.cfg
    planned, note, segments = memory_plan
    world = place.world_size
    dtype = str(session.dtype).removeprefix("torch.")
    which = (f"every stage of a pipeline of {world}" if place.rank is None else
             f"stage {place.rank} of a pipeline of {world}")
    lines = [f"mlora: dry run of {args.config}, {which}: {model_args.model_type}, "
             f"{counted(model_args.num_layers, 'layer')}, in {dtype}; weights not read, nothing written, no rank "
             f"joined ({seconds:.1f} s)"]
    lines += adapter_lines(cfg, adapters)
    cuts = "" if segments == 1 else ", the pipeline drained between them (save_step, eval_step)"
    lines.append(f"  micro-batches: {batches.batches}, one adapter's each{', packed rows' if cfg.packing else ''}, in "
                 f"{counted(segments, 'segment')}{cuts}; padding {batches.padding_fraction:.1%} of "
                 f"{counted(batches.padded_tokens, 'token')}; each priced at the largest, {counted(shape[0], 'row')} "
                 f"of {counted(shape[1], 'token')}")
    for stage in planned:
        layers = sum(m.startswith("layer.") for m in stage.modules)
        default = max_in_flight_1f1b(world, stage.rank)
        bound = "1F1B's" if stage.in_flight_bound == default else f"lowered from 1F1B's {default} to fit"
        device = torch.device(stage.device)
        if stage.free_bytes is not None:
            memory = f"of the {format_size(stage.free_bytes)} free ({stage.peak_bytes / stage.free_bytes:.0%})"
        elif device.type == "cuda":
            memory = (f"({stage.device} is not visible to this process: plan it on its host with --rank "
                      f"{stage.rank})")
        else:
            memory = f"as a CUDA device would hold it ({device.type} has no device memory to compare with)"
        layers = f", {counted(layers, 'layer')}" if layers else ""
        lines.append(f"  stage {stage.rank} ({span(stage.modules)}{layers}) on {stage.device}: at most "
                     f"{counted(stage.in_flight, 'micro-batch')} in flight (bound "
                     f"{stage.in_flight_bound}, {bound}); estimated peak {format_size(stage.peak_bytes)} {memory}")
    if note is not None:
        lines.append(f"  {note.removeprefix('mlora: ')}")
    if place.rank is not None and world > 1:
        lines.append("  the other stages are their own ranks' to check (--rank on their hosts); planned here at "
                     "1F1B's bounds")
    print("\n".join(lines), file=sys.stderr, flush=True)
    costliest = max(planned, key=lambda stage: stage.peak_bytes)
    record = plan_record(adapters, batches, shape, (None, "none"), costliest.peak_bytes, costliest.device,
                         costliest.free_bytes)
    print(json_line({**record, "segments": segments, "stages": [asdict(stage) for stage in planned]}), flush=True)
