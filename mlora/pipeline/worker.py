"""One pipeline rank: it holds a stage (a contiguous run of the base's modules), follows its
list of the shared plan, and exchanges activations forward and gradients backward.

What travels, and why it keeps the semantics of single-process training exactly:

- Forward messages (rank r -> r+1) carry the micro-batch's metadata (id, adapter, step, the
  adapter's label-token total for the whole optimizer step and this micro-batch's, counted on
  rank 0's host; the attention mask's runs of real tokens, when there is a mask), the
  activation and the labels (for the last stage).
- Nothing is read back from a device per micro-batch: each rank reads once per optimizer step
  of an adapter (its part of the gradient norm, with the step's loss on the last stage), and
  the busy time is taken from CUDA events at the end (StageTimer). A read waits for
  everything queued, and the GPU then idles until the host queues more.
- Backward messages (r+1 -> r) carry the activation gradient. With the last micro-batch of an
  adapter's step they also carry the running sum of the squares of that adapter's gradient on
  ranks r+1..P-1, so rank 0 ends up with the adapter's whole gradient norm for clipping.
- A micro-batch whose forward or backward runs out of device memory on a stage runs there
  again in halves of its rows (stage_rows.py): what the rank sends on is what it sends
  unsplit, so no other rank learns of it.
- Rank 0 steps its part at once; it sends the global norm forward with the adapter's next
  micro-batch (which by the plan's rule enters only after that step's backward has finished on
  rank 0), and every later rank applies its pending step before running that micro-batch. So
  no stage ever runs a micro-batch on stale weights, and every rank clips by the same norm.
- The run is cut into segments (after every multiple of save_step or of an eval_step,
  `cut_periods`); after
  each the pipeline drains, so all ranks hold the same state: checkpoints are written there,
  and adapters due for `eval_step` run their test data forward (E messages) there.
- Snapshots for `save_step` checkpoints (and save_best's new bests) ride back to rank 0 on
  backward messages; rank 0 writes a checkpoint directory once all ranks' parts have arrived.
  At the end an END message carries
  the last norms (and each rank's busy/bubble figures) forward, then a GATHER message carries
  every rank's final adapter parts back to rank 0, which writes ordinary PEFT directories.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import bisect
import contextlib
import hashlib
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from mlora import checkpoint, memory
from mlora.adapter import (BEST_DIR, Adapter, adapter_files_digest, layer_generators, save_checkpoint_dir,
                           save_peft)
from mlora.batching import (MicroBatch, adapter_stream, check_trainable, fuse, prepare_examples, start_notes,
                            total_steps, trained_positions)
from mlora.config import adapter_seed
from mlora.device import upload
from mlora.early_stopping import Patience, stops_early
from mlora.errors import PipelineError, UserError
from mlora.lora import AdapterRows, clear_lora_caches
from mlora.loss import head_loss_sums
from mlora.metrics import MetricsLog
from mlora.pipeline.in_flight import bounds_of, largest_micro_batch, stage_figures
from mlora.pipeline.plan import MicroBatchRef, Plan, build_plan
from mlora.pipeline.stage_rows import Piece, StageInputs, StageRows
from mlora.plural import counted
from mlora.session import Session
from mlora.trainer import Interrupted, improves

if TYPE_CHECKING:
    from mlora.pipeline.transport import Transport


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(session: Session, stages: list[list[str]], transport_kind: str,
                evaluating: bool = False) -> dict[str, str]:
    """What every rank must agree on; compared with rank 0's at start-up. evaluating: for
    `mlora eval --pipeline`, whose data is every adapter's test rows (no training rows)."""
    cfg = asdict(session.cfg)
    cfg.pop("output_dir", None)  # each host may write elsewhere
    # Nor where an adapter's files are (hosts may keep them elsewhere): what they hold is
    # compared, the rows below (the template shapes their tokens), init_from's files here.
    for adapter in cfg["lora"]:
        for key in checkpoint.FILE_PLACES:
            place = adapter.pop(key, None)
            if key == "init_from" and place is not None:
                adapter[key] = adapter_files_digest(place)
    # The rows with their labels: the same tokens split otherwise into prompt and answer (a
    # template or data file edited on one host) learn other tokens
    if evaluating:  # every rank walks every adapter's test rows chunk by chunk
        data = {"test": {name: _rows(d.test) for name, d in session.data.items()}}
    else:
        data = {name: _rows(d.train) for name, d in session.data.items()}
        # The test rows of adapters evaluated mid-run: every rank walks them chunk by chunk.
        evaluated = {a.name for a in session.cfg.lora if a.eval_step and a.test_data}
        data["test"] = {name: _rows(d.test) for name, d in session.data.items() if name in evaluated}
    model_cfg = (Path(session.base_dir) / "config.json").read_text()
    return {"config": digest(cfg), "balance": digest(stages), "data": digest(data),
            "base model": digest(model_cfg), "dtype": str(session.dtype), "quantization": str(session.quant),
            "transport": transport_kind}


def _rows(examples) -> list:
    return [[ex.input_ids, ex.labels] for ex in examples]


def check_same_everywhere(transport: Transport, mine: dict[str, str]) -> None:
    everyone = transport.exchange(mine)
    for rank, theirs in enumerate(everyone):
        for key in mine:
            if theirs.get(key) != everyone[0].get(key):
                fix = ("start every rank with --resume, or none" if key == "--resume" else
                       "pass every rank the same --dtype (its default follows each rank's GPU: bf16 from compute "
                       "capability 8.0, fp16 below)" if key == "dtype" else
                       "start every rank with the same --format, --adapters, --base, --max_new_tokens, "
                       "--batch_size and sampling flags (rank 0's prompts are every rank's, each rendering them "
                       "through its own prompt templates and tokenizer)" if key == "generation request" else
                       "start every rank with the same --config, --balance and --base_model")
                raise PipelineError(f"rank {rank} was started with a different {key} than rank 0; {fix}")


def stage_memory(session: Session, micro_batches: list[MicroBatch], pack_len: int | None) -> dict:
    """This rank's figures for `in_flight_bounds` (in_flight.stage_figures), its device's free
    memory read now that its weights and adapters are resident; fits None when the device does
    not say (not CUDA)."""
    free = memory.device_free_bytes(session.device)
    if free is None or not micro_batches:
        return {"fits": None}
    return stage_figures(session.cfg, session.model.args, session.model.parts, free=free,
                         shape=largest_micro_batch(micro_batches, pack_len), dtype=session.dtype,
                         quant=session.quant, device=session.device)


def in_flight_bounds(session: Session, transport: Transport, micro_batches: list[MicroBatch],
                     pack_len: int | None) -> list[int]:
    """Each stage's bound on micro-batches in flight for `build_plan` (in_flight.bounds_of: 1F1B's
    P - s, lowered to what fits the stage's device by the memory model). A collective: every
    rank calls it and gets the same list (or the same UserError, when some stage cannot hold
    even one micro-batch). Rank 0 says on stderr which bounds it lowered."""
    bounds, note = bounds_of(transport.exchange(stage_memory(session, micro_batches, pack_len)), session.cfg)
    if note is not None and transport.rank == 0:
        print(note, file=sys.stderr)
    return bounds


@dataclass
class StepTally:
    """The last stage's running totals for one adapter's current optimizer step. The loss is
    summed on the device (one scalar per micro-batch) and read with the step's gradient norm:
    reading it per micro-batch would wait for the device each time."""

    loss: float = 0.0
    losses: list[torch.Tensor] = field(default_factory=list)  # device scalars, not yet read
    label_tokens: int = 0
    input_tokens: int = 0
    epoch: int = 0


@dataclass
class StageTimer:
    """How long this stage computed. On CUDA the compute is timed on the device, between two
    events per forward or backward that are read when the figures are asked for: timing it on
    the host would wait for the device after each of them, and the GPU would then idle until
    the host queued more (twice per micro-batch)."""

    started: float = field(default_factory=time.perf_counter)
    _seconds: float = 0.0  # measured so far (host clock, or device events already read)
    _events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    @contextlib.contextmanager
    def measure(self, device: torch.device):
        """Adds the time of the enclosed compute to `busy`."""
        if device.type != "cuda":
            t0 = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - t0
            return
        # On this rank's device's stream: the current device may be another GPU (nothing sets
        # it), and a bare record() would time that one's idle stream.
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield
        end.record(stream)
        self._events.append((start, end))
        if len(self._events) >= 256:  # fold the finished ones, so a long run keeps few events
            self._fold(wait=False)

    def _fold(self, wait: bool) -> None:
        pending = []
        for start, end in self._events:
            if wait or (pending == [] and end.query()):  # in order: the first unfinished stops it
                if wait:
                    end.synchronize()
                self._seconds += start.elapsed_time(end) / 1e3
            else:
                pending.append((start, end))
        self._events = pending

    @property
    def busy(self) -> float:
        """Seconds of compute so far (waits for the device to finish what was timed)."""
        self._fold(wait=True)
        return self._seconds


def mask_runs(mask: torch.Tensor | None) -> list[list[int]] | None:
    """A batch's host attention mask [B, S] as each row's [first, end) of real tokens: what
    travels to the later ranks instead of the mask (a fused row is one run of real tokens)."""
    if mask is None:
        return None
    mask = mask.to(torch.bool)
    first = mask.int().argmax(dim=1)  # [B]; 0 for a row without real tokens
    runs = torch.stack([first, first + mask.sum(dim=1)], dim=1).tolist()  # [B, 2]
    if not torch.equal(mask_from_runs(runs, mask.shape[1]), mask):
        raise AssertionError("a fused row's real tokens are not one run")
    return runs


def mask_from_runs(runs: list[list[int]] | None, seq_len: int) -> torch.Tensor | None:
    """The host attention mask [B, S] that `mask_runs` described."""
    if runs is None:
        return None
    mask = torch.zeros(len(runs), seq_len, dtype=torch.bool)
    for row, (begin, end) in zip(mask, runs):
        row[begin:end] = True
    return mask


def position_runs(positions: torch.Tensor) -> list[list[int]]:
    """Ascending flat positions [M] as their runs [first, end) of consecutive values: what
    travels to the last rank instead of the positions (a row's response is one run)."""
    if positions.numel() == 0:
        return []
    breaks = (positions[1:] != positions[:-1] + 1).nonzero().squeeze(1) + 1  # where a new run starts
    starts = torch.cat([torch.zeros(1, dtype=torch.long), breaks])
    ends = torch.cat([breaks, torch.tensor([positions.numel()])])
    return torch.stack([positions[starts], positions[ends - 1] + 1], dim=1).tolist()


def positions_from_runs(runs: list[list[int]]) -> torch.Tensor:
    """The positions [M] long that `position_runs` described (in a few ops, however many runs:
    packed rows have one per sequence)."""
    bounds = torch.tensor(runs, dtype=torch.long).view(-1, 2)  # [runs, 2]
    lengths = bounds[:, 1] - bounds[:, 0]
    before = torch.cumsum(lengths, 0) - lengths  # positions of the earlier runs
    total = sum(end - begin for begin, end in runs)
    return torch.arange(total) + torch.repeat_interleave(bounds[:, 0] - before, lengths, output_size=total)


def cut_periods(cfg) -> list[int]:
    """Every how many optimizer steps the run is cut (drained): save_step (a consistent
    checkpoint) and each adapter's eval_step (its weights the same on every rank while its
    test data runs through)."""
    return sorted({cfg.save_step, *(a.eval_step or 0 for a in cfg.lora)} - {0})


def micro_batch_streams(cfg, data) -> tuple[dict[int, MicroBatch], dict[str, list[MicroBatchRef]]]:
    """Every adapter's micro-batches in training order (batching.adapter_stream), numbered
    across adapters: {id: micro-batch} and each adapter's stream for `build_plan`. Every rank
    builds the same (and so does `mlora train --dry_run --pipeline`)."""
    micro: dict[int, MicroBatch] = {}
    streams: dict[str, list[MicroBatchRef]] = {}
    for a in cfg.lora:
        streams[a.name] = []
        for part in adapter_stream(data[a.name].train, a, adapter_seed(cfg.seed, a.name)):
            streams[a.name].append(MicroBatchRef(len(micro), a.name, part.step, part.last_in_step))
            micro[len(micro)] = part
    return micro, streams


def segment_plans(cfg, segments: Iterable[dict[str, list[MicroBatchRef]]], world: int,
                  max_in_flight: list[int]) -> list[Plan]:
    """Each segment's (segments_of) plan over `world` stages, with the stages' bounds on
    micro-batches in flight (in_flight_bounds) and the config's train_lora_candidate_num."""
    return [build_plan(world, seg, max_in_flight=max_in_flight, candidate_num=cfg.train_lora_candidate_num)
            for seg in segments]


def segments_of(streams: dict[str, list[MicroBatchRef]], periods: list[int]) -> tuple[list[dict], list[int]]:
    """Split the run after every step count that is a multiple of one of `periods`
    (cut_periods). Returns the segments ({adapter: its micro-batches there}) and, for each but
    the last, the step count at its end (the cut). The pipeline drains at each cut, so every
    rank holds the same logical state there."""
    last = max((refs[-1].step + 1 for refs in streams.values() if refs), default=0)
    cuts = [k for k in range(1, last) if any(k % m == 0 for m in periods)]
    segments = [{} for _ in range(len(cuts) + 1)]
    for name, refs in streams.items():
        for r in refs:
            j = bisect.bisect_left(cuts, r.step + 1)  # the first cut at or after its step's end
            segments[j].setdefault(name, []).append(r)
    kept = [j for j, seg in enumerate(segments) if seg]
    return [segments[j] for j in kept], [cuts[j] for j in kept[:-1]]


class StageLink:
    """A stage and its neighbours: what training (StageWorker) and `mlora eval --pipeline`
    (`evaluate_stage`) share to run test chunks forward through the stages (E messages), and
    the forward of `mlora generate --pipeline` (G messages, generate_forward)."""

    def __init__(self, session: Session, transport: Transport):
        self.session = session
        self.transport = transport
        self.rank, self.world = transport.rank, transport.world_size
        self.first, self.last = self.rank == 0, self.rank == self.world - 1
        self.device = session.device

    def first_stage_batch(self, part: MicroBatch, pack_len: int | None = None):
        """Rank 0: `part` fused and on the device (no wait), its host attention mask, and the
        header fields every stage needs: rows, label tokens (counted on this host, so the last
        stage reads no count back) and the mask as runs of real tokens."""
        host = fuse([part], self.session.pad_id, pack_len=pack_len)
        host.target_positions = trained_positions(host.labels, host.rows)
        # The mask stays here; the positions are not uploaded: the last stage rebuilds them from
        # the header's runs (positions_from_runs), rank 0 too when it is the last.
        batch = host.to(self.device, with_positions=False)
        fields = {"rows": batch.input_ids.shape[0], "label_tokens": batch.label_counts[part.adapter],
                  "mask_runs": mask_runs(host.attention_mask), "target_runs": position_runs(host.target_positions)}
        return batch, host.attention_mask, fields

    def receive_batch(self, kind: str, mb: int | None):
        """Ranks > 0: the previous stage's message of `kind`, its tensors, and the attention mask
        rebuilt on this host from its runs, where the model checks it without reading anything
        back from the device."""
        header, tensors = self.transport.recv(self.rank - 1)
        self.expect(header, kind, mb)
        return header, tensors, mask_from_runs(header["mask_runs"], tensors[0].shape[1])

    def expect(self, header: dict, kind: str, mb: int | None) -> None:
        if header.get("kind") != kind or (mb is not None and header.get("mb") != mb):
            raise PipelineError(f"rank {self.rank}: expected {kind} of micro-batch {mb}, got "
                                f"{header.get('kind')} of {header.get('mb')} (ranks disagree on the plan)")

    def test_sums(self, cfg, bar=None) -> tuple[float, int]:
        """The adapter's test data through this stage, test_batch_size rows at a time, as
        `mlora eval` runs them in one process (each chunk padded alone, on its expand_side).
        Every rank calls it together (the model in eval mode, under no_grad); the last rank
        gets the CE sum over all label tokens and their number, the others (0.0, 0). `bar`: a
        progress bar, advanced by each chunk's rows."""
        examples = self.session.data[cfg.name].test
        total, count = 0.0, 0
        for start in range(0, len(examples), cfg.test_batch_size):
            chunk = examples[start:start + cfg.test_batch_size]
            ce_sum, tokens = self.eval_forward(cfg, chunk)
            total += ce_sum
            count += tokens
            if bar is not None:
                bar.update(len(chunk))
        return total, count

    def eval_forward(self, cfg, chunk) -> tuple[float, int]:
        """One test chunk through this stage; on the last stage its CE sum and label tokens.

        A chunk that runs out of device memory here runs again in halves of its rows (halves of
        halves...: memory.run_splitting_on_oom, as one process's evaluate_adapter splits it),
        each row through this stage's layers as in the whole chunk (rows do not mix; the
        halves keep the chunk's padding). The next stage gets the message the whole chunk
        makes, and the last stage sums the halves' CE sums: no other rank needs to learn of
        it, nor could: no answer travels back up. A single row that does not fit is one line
        naming this rank (the other ranks see it leave)."""
        if self.first:
            batch, mask, fields = self.first_stage_batch(MicroBatch(cfg.name, list(chunk), 0, 0, 0, True,
                                                                    cfg.expand_side))
            header = {"kind": "E", "adapter": cfg.name, **fields}
            x, labels = batch.input_ids, batch.labels
        else:
            header, (x, labels), mask = self.receive_batch("E", None)
            if header.get("adapter") != cfg.name:
                raise PipelineError(f"rank {self.rank}: expected test data of adapter '{cfg.name}', got "
                                    f"'{header.get('adapter')}' (ranks disagree on the test data)")
        S = mask.shape[1]
        # [M] the flat positions b * S + t the loss reads (batching.trained_positions), on the host
        positions = positions_from_runs(header["target_runs"]) if self.last else None

        def run_rows(rows: list[int]):
            """Rows `rows` (consecutive) through this stage: [b, S, H], or on the last stage
            their (CE sum, label tokens)."""
            begin, end = rows[0], rows[-1] + 1
            self.session.layout.rows = [AdapterRows(cfg.name, 0, end - begin)]
            try:
                out = self.session.model(x[begin:end], mask[begin:end], head=False)  # [b, S, H]
                if not self.last:
                    return out
                mine = positions[(positions >= begin * S) & (positions < end * S)] - begin * S  # [m]
                ce_sum, tokens = head_loss_sums(self.session.model, out, labels[begin:end], self.session.layout.rows,
                                                {cfg.name: mine.numel()}, upload(mine, self.device))[cfg.name]
                return ce_sum.item(), tokens  # summed on the host in float64, as `mlora eval` does
            except BaseException:
                clear_lora_caches(self.session.wrappers)  # a rerun in halves must not keep this attempt's inputs
                raise

        try:
            parts = memory.run_splitting_on_oom(run_rows, range(header["rows"]))
        except memory.UnsplittableOOM as err:
            row = err.items[0]
            raise UserError(f"rank {self.rank}: evaluating adapter {cfg.name!r}: out of device memory on a single "
                            f"row ({counted(int(mask[row].sum()), 'token')}) on its stage; lower cutoff_len, free "
                            f"device memory there, or split the model over more stages") from None
        if not self.last:
            self.transport.send(self.rank + 1, header, [parts[0] if len(parts) == 1 else torch.cat(parts), labels])
            return 0.0, 0
        return sum(ce_sum for ce_sum, _ in parts), sum(tokens for _, tokens in parts)

    def generate_forward(self, x: torch.Tensor, mask: torch.Tensor, cache, step: int,
                         pick: Callable[[torch.Tensor], list[int]]) -> dict | None:
        """`mlora generate --pipeline`: one forward of generation through this stage, its layers'
        keys and values kept in `cache`. x: rank 0's token ids [B, S] (on the host); the other
        ranks receive the previous stage's hidden states. mask [B, cache.length + S]: every
        rank keeps its own (mlora.generate.Decoding). The last stage returns what every rank
        must learn of the step: {"tokens": pick(the logits of the last position [B, V])}, or
        {"ran_out": R} when rank R ran out of device memory in it; the others return None.

        A stage that runs out in its forward (or in its send, whose copy for NCCL is made before
        anything leaves) sends the next stage a marker naming it instead of hidden states, and a
        stage that receives a marker runs nothing and passes it on: every stage sends and
        receives one message per step as always, so the last stage's answer tells every rank at
        this step, and none waits for what will not come. Running out while receiving is not
        caught here (NCCL would hold a tensor no one takes, out of step with the next one): it
        ends the run, as a real error does."""
        ran_out, received = None, None
        if not self.first:
            header, received = self.transport.recv(self.rank - 1)
            self.expect(header, "G", step)
            ran_out = header.get("ran_out")
        if ran_out is None:
            try:
                out = self.session.model(x.to(self.device) if self.first else received[0], mask, cache=cache,
                                         last_only=self.last)  # [B, 1, V] on the last stage, else [B, S, H]
                if self.last:
                    return {"tokens": pick(out[:, -1])}
                self.transport.send(self.rank + 1, {"kind": "G", "mb": step}, [out])
                return None
            except Exception as err:
                if not memory.is_out_of_memory(err):
                    raise
                ran_out = self.rank
        # (outside the handler: the error's traceback, which holds this attempt's tensors, is gone)
        received = None
        if self.last:
            return {"ran_out": ran_out}
        self.transport.send(self.rank + 1, {"kind": "G", "mb": step, "ran_out": ran_out})
        return None


class StageWorker(StageLink):
    def __init__(self, session: Session, transport: Transport, progress: bool = True,
                 fingerprint: dict | None = None, signals=None):
        cfg = session.cfg
        super().__init__(session, transport)
        # Packed rows hold up to cutoff_len tokens, as in the single-process trainer.
        self.pack_len = cfg.cutoff_len if cfg.packing else None
        self.out = Path(cfg.output_dir)
        self.base_name = str(Path(session.base_dir).resolve())

        self.adapters: dict[str, Adapter] = {}
        for a in cfg.lora:
            rows = session.data[a.name].train
            check_trainable(rows, a, cfg.cutoff_len)
            if self.first:  # the rank that builds the batches (and tells)
                prepare_examples(rows)
                for note in start_notes(a, rows, cfg.cutoff_len):
                    print(note, file=sys.stderr)
            # (model_layers: an init_from tensor of a layer no stage holds is refused, as one
            # process refuses it, not skipped by every stage as another's)
            self.adapters[a.name] = Adapter(a, session.wrappers, cfg.seed, self.device, total_steps(len(rows), a),
                                            stage_layers={f"model.layers.{i}" for i in session.model.layer_ids},
                                            naming=session.naming, loss_scaling=session.loss_scaling,
                                            model_layers={f"model.layers.{i}"
                                                          for i in range(session.model.args.num_layers)})
        self.micro, self.streams = micro_batch_streams(cfg, session.data)
        # (adapter, step) of the steps none of whose rows has a token to learn: every rank
        # leaves them without an update (apply_step), as one process does (trainer._finish_step).
        self.unlearnable = {(part.adapter, part.step) for part in self.micro.values() if not part.step_label_tokens}
        # recompute: each stage checkpoints its own layers; the recomputation (in a micro-batch's
        # backward, after other micro-batches ran forward) replays the dropout masks from the
        # adapters' generators as they were at that micro-batch's forward.
        session.model.recompute = cfg.recompute
        session.model.rng_generators = layer_generators(self.adapters.values())
        self.progress = progress
        self.max_in_flight: list[int] = []
        self.segments, self.cuts, self.plans = [], [], []
        self.next_segment = 0
        self.fingerprint = fingerprint or {}
        # SIGINT/SIGTERM (trainer.SignalFlag): a signalled rank's request travels to rank 0 on
        # backward messages; rank 0 announces the stop in the next FLUSH, so every rank stops
        # and checkpoints at the same drained cut (needs save_step > 0 to have cuts).
        self.signals = signals
        self.stop_from_later: int | None = None
        self.late_signal_noted = False

        # micro-batch -> what its forward read and made on this stage, until its backward
        self.inflight: dict[int, tuple[StageInputs, list[Piece]]] = {}
        self.stage_rows = StageRows(session, self.rank, self.last, lambda name: self.adapters[name].parameters(),
                                    lambda name: self.adapters[name].dropout_generators.values())
        self.pending_step: dict[str, int] = {}  # ranks > 0: steps waiting for the global norm
        self.frozen: set[str] = set()  # adapters stopped by on_nan: "stop"
        self.stepped: dict[str, int] = {}  # adapter -> steps_done after the last step it took
        # rank 0: (step, gradient norm, whether its loss was finite) of finished steps
        self.norm_to_send: dict[str, tuple[int, float, bool]] = {}
        self.tally = {name: StepTally() for name in self.adapters}
        self.outbox: list[tuple[str, str, int, dict[str, torch.Tensor]]] = []  # (adapter, tag, rank, tensors)
        self.collected: dict[tuple[str, str], dict[int, dict[str, torch.Tensor]]] = {}
        self.timer = StageTimer()
        self.metrics = None
        self.bars = {}
        self.last_loss: dict[str, float] = {}
        self.best: dict[str, tuple[float, int]] = {}  # adapter -> (eval loss, step) of its lowest finite one
        self.patience = {name: Patience() for name in self.adapters}  # early stopping's tallies
        self.early_stopped: dict[str, int] = {}  # adapter -> the step after which early stopping took it out
        self.run_started = 0.0  # (set by plan: the run's clock starts once it is planned)
        self.elapsed_before = 0.0
        self.metrics_bytes = 0  # where metrics.jsonl starts over (0: a fresh run)

    def plan(self) -> None:
        """The collective half of setting up, apart from the constructor's local half (this
        rank's adapters, whose init_from may fail on this rank alone: run.start_stage lets every
        rank learn that first). Every rank calls it once, before `restore` and `run`."""
        cfg = self.session.cfg
        # Before any plan: memory-aware admission, the same bounds on every rank.
        self.max_in_flight = in_flight_bounds(self.session, self.transport, list(self.micro.values()),
                                              self.pack_len)
        self.plans = []
        self.replan()
        if self.last:  # (only now: a start that fails leaves no bar behind)
            for i, a in enumerate(cfg.lora):
                self.bars[a.name] = tqdm(total=self.adapters[a.name].total_steps, desc=a.name, position=i,
                                         disable=not self.progress, dynamic_ncols=True, mininterval=0.5,
                                         file=sys.stderr)
        self.run_started = time.perf_counter()

    def replan(self) -> None:
        """(Re)build the segments and the plans of those not run yet (from next_segment on),
        leaving out the micro-batches of the steps after an adapter stopped early: its slot
        goes to the next adapter (train_lora_candidate_num), as in one process. Every rank
        does it at the same cut with the same early stops, so all keep one plan. The segments
        already run keep their places: only later steps leave."""
        cfg = self.session.cfg
        streams = {name: [r for r in refs if name not in self.early_stopped or r.step < self.early_stopped[name]]
                   for name, refs in self.streams.items()}
        self.segments, self.cuts = segments_of(streams, cut_periods(cfg))
        self.plans = self.plans[:self.next_segment] + segment_plans(cfg, self.segments[self.next_segment:], self.world,
                                                                    self.max_in_flight)

    # ------------------------------------------------------------------ the plan
    def run(self) -> dict:
        try:
            if self.last:
                self.metrics = MetricsLog(self.out / "metrics.jsonl", truncate_to=self.metrics_bytes)
            self.session.model.train()  # the base has no dropout; this turns on LoRA dropout
            self.timer = StageTimer()
            # Whether the last segment still waits for its evaluation: not when an early stop at
            # its cut left no segment after it (then it was evaluated there, maybe before a resume).
            last_unevaluated = False
            while self.next_segment < len(self.plans):
                for action in self.plans[self.next_segment].stages[self.rank]:
                    self.note_late_signal()
                    if action.op == "F":
                        self.forward(action.mb)
                    else:
                        self.backward(action.mb)
                self.next_segment += 1
                last_unevaluated = self.next_segment == len(self.plans)
                if not last_unevaluated:
                    header = self.flush_norms("FLUSH")
                    cut = self.cuts[self.next_segment - 1]
                    stopped = len(self.early_stopped)
                    self.evaluate(self.segments[self.next_segment - 1])
                    if len(self.early_stopped) > stopped:
                        self.replan()
                    save_step = self.session.cfg.save_step
                    at_save = save_step and cut % save_step == 0
                    # Resumable state at save_step cuts, and at any cut a signal stops the run at.
                    path = self.write_checkpoint() if at_save or header["stop"] is not None else None
                    if header["stop"] is not None and path is not None:
                        # Every rank got the same FLUSH: all stop at this one drained cut.
                        raise Interrupted(header["stop"], path)
            self.session.layout.rows = []
            stats = self.finish_steps()
            if last_unevaluated:
                self.evaluate(self.segments[-1])  # END applied the last steps
            self.gather_and_save()
            checkpoint.mark_finished(self.out, self.fingerprint, tag=f"rank{self.rank}")
            return {**stats, "best": dict(self.best), "early_stopped": dict(self.early_stopped)}
        finally:
            if self.metrics is not None:
                self.metrics.close()
            for bar in self.bars.values():
                bar.close()

    def forward(self, mb: int) -> None:
        if self.first:
            part = self.micro[mb]
            batch, mask, fields = self.first_stage_batch(part, self.pack_len)
            header = {"kind": "F", "mb": mb, "adapter": part.adapter, "step": part.step,
                      "epoch": part.epoch, "step_tokens": part.step_label_tokens, **fields,
                      "input_tokens": sum(len(ex.input_ids) for ex in part.examples),
                      "packed": batch.position_ids is not None,
                      "norm": self.norm_to_send.pop(part.adapter, None)}
            x, labels = batch.input_ids, batch.labels
            positions, documents = batch.position_ids, batch.document_ids
        else:
            header, tensors, mask = self.receive_batch("F", mb)
            x = tensors[0].requires_grad_(True)
            labels = tensors[1]
            positions, documents = tensors[2:] if header["packed"] else (None, None)
            if header["norm"] is not None:
                self.apply_step(header["adapter"], *header["norm"])
        adapter = header["adapter"]
        # Every rank: this step's fp16 loss scale (the last stage multiplies the loss by it, and
        # every rank divides it out of its part of the gradient at the step).
        scale = self.adapters[adapter].loss_scale_for(header["step_tokens"])
        inputs = StageInputs(adapter, x, mask, labels, positions, documents,
                             positions_from_runs(header["target_runs"]) if self.last else None,
                             header["step_tokens"], scale)
        with self.timer.measure(self.device):
            pieces = self.stage_rows.forward(inputs, mb)  # (in halves of its rows if the device ran out)
        if self.last:
            tally = self.tally[adapter]
            tally.losses.extend(piece.loss.detach() for piece in pieces)  # read with the step's norm (backward)
            tally.label_tokens += header["label_tokens"]  # counted on rank 0's host
            tally.input_tokens += header["input_tokens"]
            tally.epoch = header["epoch"]
        else:
            out = pieces[0].out if len(pieces) == 1 else torch.cat([piece.out for piece in pieces])  # [B, S, H]
            self.transport.send(self.rank + 1, header,
                                [out.detach(), labels] + ([positions, documents] if positions is not None else []))
        self.inflight[mb] = (inputs, pieces)

    def backward(self, mb: int) -> None:
        inputs, pieces = self.inflight.pop(mb)
        # (Other micro-batches ran forward since: with recompute, this one's layers run again
        # during its backward, each piece under its own row layout: StageRows.backward.)
        adapter, step, last_in_step = self.mb_info(mb)
        norm_sq_above, loss_ok = 0.0, True
        if self.last:
            with self.timer.measure(self.device):
                self.stage_rows.backward(inputs, pieces, None, mb)
        else:
            header, tensors = self.transport.recv(self.rank + 1)
            self.expect(header, "B", mb)
            self.take_parts(header, tensors[1:])
            norm_sq_above = header["norm_sq"] or 0.0
            loss_ok = header["loss_ok"]
            if header.get("stop") is not None:  # a later rank was signalled: pass it on to rank 0
                self.stop_from_later = header["stop"]
            with self.timer.measure(self.device):
                self.stage_rows.backward(inputs, pieces, tensors[0], mb)
        norm_sq = None
        if last_in_step:
            sq, finite_loss = self.read_step_figures(adapter)
            norm_sq, loss_ok = sq + norm_sq_above, loss_ok and finite_loss
        if not self.first:
            header = {"kind": "B", "mb": mb, "norm_sq": norm_sq, "loss_ok": loss_ok, "stop": self.stop_requested()}
            extra = self.pack_parts(header)
            self.transport.send(self.rank - 1, header, [inputs.x.grad] + extra)
            if last_in_step:
                self.pending_step[adapter] = step
        elif last_in_step:
            norm = math.sqrt(norm_sq)
            self.pending_step[adapter] = step
            self.apply_step(adapter, step, norm, loss_ok)
            if not self.last:
                self.norm_to_send[adapter] = (step, norm, loss_ok)

    def read_step_figures(self, adapter: str) -> tuple[float, bool]:
        """At the end of an adapter's step on this rank: the square of its gradient norm here
        and, on the last stage, the step's loss, read back in one go: the only read of a
        micro-batch's work, once per optimizer step (a read waits for everything queued).
        Returns the square and whether the loss is finite (known on the last stage only: True
        elsewhere), which every rank needs to tell an fp16 overflow from a non-finite loss
        (apply_step)."""
        sq = self.adapters[adapter].grad_sq()
        reads = [torch.zeros((), device=self.device) if sq is None else sq]
        tally = self.tally[adapter] if self.last else None
        if tally is not None and tally.losses:
            reads.append(torch.stack(tally.losses).double().sum())
        values = torch.stack([t.double() for t in reads]).tolist()  # float64, as Python sums floats
        if tally is None:
            return values[0], True
        tally.loss += sum(values[1:])
        tally.losses = []
        return values[0], math.isfinite(tally.loss)

    # ------------------------------------------------------------------ eval_step
    def evaluate(self, segment: dict[str, list[MicroBatchRef]]) -> None:
        """At a drained cut, every rank together: the test data of each adapter whose step count
        reached a multiple of its eval_step (or its last step) in `segment` runs forward
        through all stages, as `mlora eval` runs it in one process (no dropout, test_batch_size
        rows at a time, padded alone); the last rank logs eval_loss and eval_tokens, the
        records one process writes. Every rank decides the same: its steps_done are the
        others' after the flush."""
        def is_due(cfg) -> bool:
            # As one process: after a step the adapter took (not a skipped one, not once stopped).
            done = self.adapters[cfg.name].steps_done
            return (bool(cfg.eval_step) and bool(segment.get(cfg.name)) and self.stepped.get(cfg.name) == done
                    and (done % cfg.eval_step == 0 or done == self.adapters[cfg.name].total_steps))

        due = [a for a in self.session.cfg.lora if is_due(a)]
        if not due:
            return
        model = self.session.model
        model.eval()
        try:
            with torch.no_grad():
                for cfg in due:
                    total, count = self.test_sums(cfg)
                    loss = total / count if self.last and count else None
                    if cfg.save_best or cfg.early_stopping_patience is not None:
                        # Only the last rank has the loss: every rank learns it (the same collective
                        # at the same cut), keeps the same best and so agrees on saving it, and
                        # the same early-stopping tally and so agrees on stopping the adapter.
                        loss = self.transport.exchange(loss)[-1]
                    saving = cfg.save_best and improves(self.best.get(cfg.name), loss)
                    if saving:  # each rank's part travels to rank 0 as a checkpoint's does
                        self.best[cfg.name] = (loss, self.adapters[cfg.name].steps_done)
                        tag = f"best-{self.adapters[cfg.name].steps_done}"
                        self.outbox.append((cfg.name, tag, self.rank, self.adapters[cfg.name].peft_state_dict()))
                        if self.first:
                            self.collect(self.outbox.pop())
                    done = self.adapters[cfg.name].steps_done
                    early = stops_early(cfg.early_stopping_patience, self.patience[cfg.name], loss,
                                        cfg.early_stopping_threshold, done, self.adapters[cfg.name].total_steps)
                    if early:
                        self.early_stopped[cfg.name] = done
                    if self.last:
                        self.log_eval(cfg.name, loss, count, best=saving, early_stopped=early)
        finally:
            model.train()
            self.session.layout.rows = []

    def log_eval(self, name: str, loss: float | None, tokens: int, best: bool = False,
                 early_stopped: bool = False) -> None:
        step = self.adapters[name].steps_done
        record = {"adapter": name, "step": step, "eval_loss": loss, "eval_tokens": tokens,
                  "time": self.elapsed_before + time.perf_counter() - self.run_started}
        if best:  # (its weights reach <name>/best once every rank's part is at rank 0)
            record["best"] = True
        if early_stopped:
            record["early_stopped"] = True
        self.metrics.write(record)
        shown = "n/a" if loss is None else f"{loss:.4f}"
        self.bars[name].write(f"[{name}] step {step}: eval loss {shown} over {counted(tokens, 'token')}")
        if early_stopped:
            self.bars[name].write(f"[{name}] step {step}: stopped early (no eval loss improvement in "
                                  f"{counted(self.patience[name].waited, 'evaluation')})")
            self.bars[name].set_description_str(f"{name} (stopped early)")  # (as in one process)

    def mb_info(self, mb: int) -> tuple[str, int, bool]:
        part = self.micro[mb]
        return part.adapter, part.step, part.last_in_step

    # ------------------------------------------------------------------ optimizer steps
    def apply_step(self, name: str, step: int, norm: float, loss_ok: bool) -> None:
        """The adapter's step, with its global gradient norm and whether its loss was finite."""
        assert self.pending_step.pop(name, None) == step, (name, step)
        adapter = self.adapters[name]
        # Every rank gets the same global norm and loss verdict, so a non-finite step is skipped
        # on every rank, and every rank's fp16 loss scale moves alike. A non-finite gradient
        # under a finite loss is an overflow a loss scale backs off from, skipping the step
        # without on_nan (as in one process). on_nan "stop" freezes the adapter from then on
        # (its micro-batches still flow: the shared plan does not change mid-run).
        finite = math.isfinite(norm)
        learned = (name, step) not in self.unlearnable
        if name not in self.frozen and learned and loss_ok and not finite and adapter.update_loss_scale(False):
            lr = adapter.current_lr()
            adapter.skip_step()
            if self.last:
                self.log_step(name, lr, norm, skipped=True, reason="fp16 gradient overflow")
            return
        if name in self.frozen or (learned and not (finite and loss_ok)):
            first_time = name not in self.frozen
            if adapter.cfg.on_nan == "stop":
                self.frozen.add(name)
            lr = adapter.current_lr()
            adapter.skip_step()
            if self.last:
                if first_time:  # a frozen adapter's later steps are not logged, as in one process
                    self.log_step(name, lr, norm, skipped=True,
                                  reason="non-finite gradient" if loss_ok else "non-finite loss")
                else:
                    self.tally[name] = StepTally()
                    self.bars[name].update(1)
            return
        if learned:
            lr, _ = adapter.step(grad_norm=norm)
            adapter.update_loss_scale(True)  # (after the step: it unscales by the scale of its backward)
        else:  # no update, no loss scale change; counted, evaluated and saved as a step (_finish_step)
            lr = adapter.current_lr()
            adapter.skip_step()
        done = adapter.steps_done
        self.stepped[name] = done  # a step taken (or one with nothing to learn), not skipped: eval_step may evaluate it
        save_step = self.session.cfg.save_step
        if save_step and done % save_step == 0:
            self.outbox.append((name, f"checkpoint-{done}", self.rank, adapter.peft_state_dict()))
            if self.first:
                self.collect(self.outbox.pop())
        if self.last:
            self.log_step(name, lr, norm, learned=learned)

    def log_step(self, name: str, lr: float, norm: float, skipped: bool = False, reason: str = "",
                 learned: bool = True) -> None:
        """The last stage's metrics line for one optimizer step (the same keys as one process;
        learned False: a step with no token to learn, its loss and gradient norm null)."""
        tally = self.tally[name]
        loss = tally.loss if learned else None
        record = {"adapter": name, "step": self.adapters[name].steps_done, "epoch": tally.epoch,
                  "loss": loss, "lr": lr, "grad_norm": norm if learned else None, "tokens": tally.label_tokens,
                  "input_tokens": tally.input_tokens,
                  "time": self.elapsed_before + time.perf_counter() - self.run_started}
        if skipped and reason == "fp16 gradient overflow":
            record.update(skipped=True, reason=reason, loss_scale=self.adapters[name].loss_scale.per_token)
            self.bars[name].write(f"[{name}] step {record['step']}: {reason}; step skipped, "
                                  f"loss scale now {record['loss_scale']:g} per token")
        elif skipped:
            record.update(skipped=True, reason=reason, action=self.adapters[name].cfg.on_nan)
        elif learned:
            self.last_loss[name] = tally.loss
        self.metrics.write(record)
        bar = self.bars[name]
        bar.update(1)
        bar.set_postfix(loss="n/a" if loss is None else f"{loss:.4f}", refresh=False)
        self.tally[name] = StepTally()

    def flush_norms(self, kind: str, stats: dict | None = None) -> dict:
        """The norms of steps still pending travel forward (with END also each rank's
        busy/bubble figures); afterwards no rank has a pending step: the pipeline is drained."""
        if self.first:
            header = {"kind": kind, "norms": {a: list(v) for a, v in self.norm_to_send.items()},
                      "stats": [], "stop": self.stop_requested()}
            self.norm_to_send = {}
        else:
            header, _ = self.transport.recv(self.rank - 1)
            self.expect(header, kind, None)
            for name, (step, norm, loss_ok) in header["norms"].items():
                self.apply_step(name, step, norm, loss_ok)
        if stats is not None:
            header["stats"].append(stats)
        assert not self.pending_step, self.pending_step
        if not self.last:
            self.transport.send(self.rank + 1, header)
        return header

    def finish_steps(self) -> dict:
        """END: the last steps' norms travel forward; each rank adds its busy/bubble figures."""
        busy = self.timer.busy  # first: it waits for the device
        wall = time.perf_counter() - self.timer.started
        mine = {"rank": self.rank, "busy_fraction": busy / wall if wall else 0.0,
                "bubble_fraction": 1.0 - busy / wall if wall else 0.0, "seconds": wall}
        header = self.flush_norms("END", mine)
        if self.last:
            for stat in header["stats"]:
                self.metrics.write({"kind": "pipeline_stage", **stat})
        print(f"mlora: rank {self.rank}: busy {mine['busy_fraction']:.1%}, bubble "
              f"{mine['bubble_fraction']:.1%} of {wall:.1f} s", file=sys.stderr)
        return {"stats": header["stats"], "losses": self.last_loss}

    # ------------------------------------------------------------------ adapter parts
    def pack_parts(self, header: dict) -> list[torch.Tensor]:
        """Move the outbox into a backward message: metadata in the header, tensors appended."""
        metas, tensors = [], []
        for name, tag, rank, part in self.outbox:
            keys = sorted(part)
            metas.append({"adapter": name, "tag": tag, "rank": rank, "names": keys})
            tensors.extend(part[k] for k in keys)
        header["parts"] = metas
        self.outbox = []
        return tensors

    def take_parts(self, header: dict, tensors: list[torch.Tensor]) -> None:
        """Parts that arrived from later ranks: rank 0 keeps them, others pass them on."""
        offset = 0
        for meta in header.get("parts", []):
            names = meta["names"]
            part = {n: t.detach().cpu() for n, t in zip(names, tensors[offset:offset + len(names)])}
            offset += len(names)
            item = (meta["adapter"], meta["tag"], meta["rank"], part)
            if self.first:
                self.collect(item)
            else:
                self.outbox.append(item)

    def collect(self, item) -> None:
        name, tag, rank, part = item
        parts = self.collected.setdefault((name, tag), {})
        parts[rank] = part
        if len(parts) == self.world and tag.startswith(("checkpoint-", "best-")):
            # (parts travel in order from each rank: an earlier best is complete before a later one)
            merged = {k: v for p in parts.values() for k, v in p.items()}
            adapter = self.adapters[name]
            target = tag if tag.startswith("checkpoint-") else BEST_DIR
            save_checkpoint_dir(self.out / name / target, merged, adapter.peft_config(self.base_name))
            del self.collected[(name, tag)]

    def gather_and_save(self) -> None:
        """GATHER: every rank's final parts travel back to rank 0, which writes the adapters."""
        for name, adapter in self.adapters.items():
            self.outbox.append((name, "final", self.rank, adapter.peft_state_dict()))
        if not self.last:
            header, tensors = self.transport.recv(self.rank + 1)
            self.expect(header, "GATHER", None)
            self.take_parts(header, tensors)
        if not self.first:
            header = {"kind": "GATHER"}
            extra = self.pack_parts(header)
            self.transport.send(self.rank - 1, header, extra)
            return
        for item in self.outbox:
            self.collect(item)
        self.outbox = []
        for name, adapter in self.adapters.items():
            parts = self.collected.pop((name, "final"))
            assert len(parts) == self.world, (name, sorted(parts))
            merged = {k: v for p in parts.values() for k, v in p.items()}
            save_peft(self.out / name, merged, adapter.peft_config(self.base_name))
        assert not self.collected, sorted(self.collected)

    # ------------------------------------------------------------------ resumable checkpoints
    def stop_requested(self) -> int | None:
        """The signal that asks this rank, or a later one, to stop at the next drained cut."""
        if self.signals is not None and self.signals.signum is not None:
            return self.signals.signum
        return self.stop_from_later

    def note_late_signal(self) -> None:
        """A signal on this rank once no drained cut is left to stop at (the run's last segment):
        said once, so that the run training on to its end does not look deaf to it."""
        if self.late_signal_noted or self.signals is None or self.signals.signum is None:
            return
        if self.next_segment < len(self.plans) - 1:
            return  # (the run stops at the next cut)
        self.late_signal_noted = True
        print(f"mlora: rank {self.rank}: {signal.Signals(self.signals.signum).name} after the last checkpoint cut: "
              f"the run trains to its end and saves; a second one stops this rank now (the others then stop too; "
              f"--resume starts again at the last checkpoint)", file=sys.stderr, flush=True)

    def write_checkpoint(self) -> Path | None:
        """At a drained cut: this rank's part of the run, under the segment number."""
        if not self.session.cfg.save_step:
            return None
        state = {"iteration": self.next_segment,
                 "elapsed": self.elapsed_before + time.perf_counter() - self.run_started,
                 "metrics_bytes": self.metrics.tell() if self.metrics else 0,
                 "adapters": {n: a.state_for_checkpoint() for n, a in self.adapters.items()},
                 "last_loss": dict(self.last_loss), "frozen": sorted(self.frozen),
                 "best": {n: list(b) for n, b in self.best.items()},
                 "patience": {n: p.state() for n, p in self.patience.items()},
                 "early_stopped": dict(self.early_stopped),
                 "outbox": [[n, tag, r, part] for n, tag, r, part in self.outbox],
                 "collected": [[n, tag, r, part] for (n, tag), parts in self.collected.items()
                               for r, part in parts.items()]}
        # One part more than save_total_limit: a rank killed before it wrote this cut's part, beside
        # one that wrote it and dropped its oldest, must still share a cut with it to resume from
        # (ranks are at most one cut apart: none passes the next cut before every rank wrote this one).
        limit = self.session.cfg.save_total_limit
        return checkpoint.write_checkpoint(self.out, self.next_segment, state, self.fingerprint,
                                           None if limit is None else limit + 1, tag=f"rank{self.rank}")

    def restore(self, state: dict) -> None:
        self.next_segment = state["iteration"]
        for name, saved in state["adapters"].items():
            self.adapters[name].restore_from_checkpoint(saved)
            if self.last:
                self.bars[name].update(self.adapters[name].steps_done)
        self.last_loss = dict(state["last_loss"])
        self.frozen = set(state["frozen"])
        # (a checkpoint from before save_best, or written with it off, has none: the evals
        # after it start the tally)
        self.best = {n: tuple(b) for n, b in state.get("best", {}).items()}
        # (as best: a checkpoint from before early stopping, or written with it off, has no tally)
        self.patience.update((n, Patience.from_state(p)) for n, p in state.get("patience", {}).items())
        self.early_stopped = dict(state.get("early_stopped", {}))
        if self.early_stopped:  # the segments left are those the run had left at this cut
            self.replan()
        self.outbox = [tuple(item) for item in state["outbox"]]
        for name, tag, rank, part in state["collected"]:
            self.collected.setdefault((name, tag), {})[rank] = part
        self.elapsed_before = state["elapsed"]
        self.metrics_bytes = state["metrics_bytes"]
