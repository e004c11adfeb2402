"""The single-stage training loop: fused batch -> forward -> per-adapter loss -> one backward
-> every adapter whose optimizer step is complete clips, steps and logs.

It can stop and resume exactly: a resumable checkpoint (see checkpoint.py) holds every
adapter's state at one fused-batch iteration, and because the batch stream is a pure function
of the config, data and seed, a resumed run replays the stream up to that iteration without
computing anything and goes on as if it had never stopped.

Memory: on CUDA, fast-fit and optimal-fit get a token budget from the memory model when the
config sets none (memory.plan_token_budget; it is saved in the checkpoints, so a resumed run
replays the same batches whatever memory is free then). And a fused batch that still runs out
of device memory is split in halves and retried (memory.run_splitting_on_oom), down to single
examples; see `_train_on`.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from tqdm import tqdm

from mlora import checkpoint
from mlora.adapter import (BEST_DIR, Adapter, checkpoint_dir_step, is_checkpoint_dir, layer_generators,
                           save_checkpoint_dir)
from mlora.atomic import remove_dir_aside
from mlora.batching import (MicroBatch, adapter_stream, check_trainable, fuse, prepare_examples, start_notes,
                            total_steps)
from mlora.config import adapter_seed
from mlora.data import Example
from mlora.early_stopping import Patience, stops_early
from mlora.errors import UserError
from mlora.evaluate import evaluate_adapter
from mlora.lora import clear_lora_caches
from mlora.loss import fused_loss_sums
from mlora.memory import (UnsplittableOOM, device_free_bytes, generators_restored_on_error, grads_restored_on_error,
                          plan_token_budget, run_splitting_on_oom)
from mlora.metrics import MetricsLog
from mlora.plural import counted
from mlora.session import Session
from mlora.strategies import fused_batches


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written after the current step."""

    def __init__(self, signum: int, path: Path):
        super().__init__(f"{signal.Signals(signum).name}: checkpoint written to {path}")
        self.signum = signum
        self.path = path


@dataclass
class StepAccumulator:
    """What one adapter has seen since its last optimizer step."""

    loss: float = 0.0  # sum of (CE sum / step label tokens) over the step's micro-batches
    label_tokens: int = 0
    input_tokens: int = 0
    # The adapters whose non-finite activations reached this step's gradients in a batch that
    # could not run again without them (one split for memory: Trainer._taint).
    tainted_by: list[str] = field(default_factory=list)


@dataclass
class AdapterProgress:
    adapter: Adapter
    total_steps: int
    bar: tqdm
    step: StepAccumulator = field(default_factory=StepAccumulator)
    tokens_seen: int = 0
    busy_seconds: float = 0.0
    last_loss: float | None = None
    stopped_at: int | None = None  # iteration at which on_nan=stop (or early stopping) took it out
    skipped_steps: int = 0
    best: tuple[float, int] | None = None  # (eval loss, step) of the lowest finite eval loss so far
    patience: Patience = field(default_factory=Patience)  # early stopping's tally
    early_stopped: int | None = None  # the step after which early stopping took it out


class SignalFlag:
    """Remembers SIGINT/SIGTERM instead of dying mid-step (main thread only)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, session: Session, progress: bool = True, resume: bool = False):
        self.session = session
        self.cfg = session.cfg
        self.out = Path(self.cfg.output_dir)
        self.resume = resume
        self.fingerprint = checkpoint.run_fingerprint(session)
        # Before the adapters take any device memory: the plan counts their state itself.
        self.max_tokens = self._plan_budget()
        self.runs: dict[str, AdapterProgress] = {}
        for a in self.cfg.lora:
            check_trainable(session.data[a.name].train, a, self.cfg.cutoff_len)
            prepare_examples(session.data[a.name].train)
        for position, a in enumerate(self.cfg.lora):
            train = session.data[a.name].train
            steps = total_steps(len(train), a)
            for note in start_notes(a, train, self.cfg.cutoff_len):
                print(note, file=sys.stderr)
            adapter = Adapter(a, session.wrappers, self.cfg.seed, session.device, steps, naming=session.naming,
                              loss_scaling=session.loss_scaling)
            bar = tqdm(total=steps, desc=a.name, position=position, leave=True, disable=not progress,
                       dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
            self.runs[a.name] = AdapterProgress(adapter, steps, bar)
        check_disk_space(self.out, [r.adapter for r in self.runs.values()])
        self.pack_len = packed_row_len(self.cfg)
        if session.model is not None:
            # Recomputing a layer must replay the LoRA dropout masks its first forward drew,
            # and those come from the adapters' own generators, not torch's global RNG.
            session.model.recompute = self.cfg.recompute
            session.model.rng_generators = layer_generators(r.adapter for r in self.runs.values())
        self.iteration = 0
        self.elapsed_before = 0.0
        self.started = time.perf_counter()
        self.stopped: set[str] = set()
        self.reran_for: set[tuple[str, ...]] = set()  # culprits whose NaN made others run again (said once)

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def _plan_budget(self) -> int | None:
        """The fused batches' token budget: the config's, or on CUDA for fast-fit/optimal-fit
        the one the memory model picks (memory.plan_token_budget), said on stderr."""
        session = self.session
        free = device_free_bytes(session.device) if session.model is not None else None
        if free is None:
            return self.cfg.max_tokens_per_batch
        plan = plan_token_budget(self.cfg, session.model.args, free_bytes=free, dtype=session.dtype,
                                 quant=session.quant, device=session.device)
        if plan.note:
            print(plan.note, file=sys.stderr)
        return plan.max_tokens

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict[str, dict]:
        cfg, session = self.cfg, self.session
        state = checkpoint.latest_loadable(self.out, self.fingerprint) if self.resume else None
        if state is not None:
            # Replay the batches exactly as they ran: with the budget they ran with (a
            # checkpoint from before budgets were saved ran with the configured one).
            saved = state.get("max_tokens_per_batch", cfg.max_tokens_per_batch)
            if saved != self.max_tokens:
                budget = "no token budget" if saved is None else f"token budget {saved}"
                print(f"mlora: {budget} (as the run being resumed)", file=sys.stderr)
            self.max_tokens = saved
        batches = training_batches(cfg, {a.name: session.data[a.name].train for a in cfg.lora}, self.max_tokens,
                                   self.stopped)
        if state is not None:
            metrics_bytes = self._restore(batches, state)
            self.metrics = MetricsLog(self.out / "metrics.jsonl", truncate_to=metrics_bytes)
        else:
            checkpoint.clear(self.out)
            remove_earlier_snapshots(self.out, [a.name for a in cfg.lora])
            self.metrics = MetricsLog(self.out / "metrics.jsonl", truncate_to=0)
        session.model.train()  # the base has no dropout; this turns on the adapters' LoRA dropout
        try:
            with SignalFlag() as flag:
                for parts in batches:
                    self.iteration += 1
                    save_due = self._train_on(parts)
                    if flag.signum is not None:
                        raise Interrupted(flag.signum, self._write_checkpoint())
                    if save_due:
                        self._write_checkpoint()
            session.layout.rows = []
            summary = {}
            for name, run in self.runs.items():
                final_dir = run.adapter.save(self.out / name, str(session.base_dir.resolve()))
                summary[name] = {"steps": run.adapter.steps_done, "loss": run.last_loss,
                                 "output": str(final_dir),
                                 "stopped": run.stopped_at is not None and run.early_stopped is None,
                                 "early_stopped": run.early_stopped,
                                 "skipped_steps": run.skipped_steps, "best": run.best}
            checkpoint.mark_finished(self.out, self.fingerprint)
            return summary
        finally:
            session.layout.rows = []
            self.metrics.close()
            for run in self.runs.values():
                run.bar.close()

    def _train_on(self, parts) -> bool:
        """One fused batch; returns whether a save_step boundary was crossed.

        Forward + loss + backward run through `run_splitting_on_oom` over the batch's examples:
        when the device runs out of memory, the batch is split in halves (across adapters, and
        within one adapter's micro-batch down to single examples) and each half runs on its own.
        That leaves the gradients as they would be (each adapter's CE sum is divided by its whole
        step's label-token count, so halves add up like micro-batches do), and a failed attempt
        leaves none behind (`grads_restored_on_error`), nor any dropout draw: the adapters'
        generators are rewound (`generators_restored_on_error`), so halves that keep each
        adapter's micro-batch whole draw the masks of the unsplit batch and train exactly as it
        would (with dropout too, up to summation order); a micro-batch cut into pieces draws
        over its pieces' layouts, a statistically equal run. The bookkeeping below sees whole
        micro-batches, split or not."""
        t0 = time.perf_counter()
        items = [(i, ex) for i, part in enumerate(parts) for ex in part.examples]
        params = [p for part in parts for p in self.runs[part.adapter].adapter.parameters()]
        generators = [g for part in parts for g in self.runs[part.adapter].adapter.dropout_generators.values()]
        # For a rerun of the adapters a NaN of another one reached (see _nan_victims): their
        # generators' states and gradients from before this batch. Kept gradients cost one
        # more copy of the accumulated ones from the end of the backward to the read; a batch
        # split for memory keeps none (its halves would hold three copies at their peaks),
        # and then no rerun is possible: the victims skip this step (_taint).
        states = [g.get_state() for g in generators]
        kept: list[dict | None] = [{}]

        def split(left, right) -> None:
            kept[0] = None
            self._report_split(left, right)

        try:
            chunks = run_splitting_on_oom(
                lambda chunk: self._forward_backward(parts, chunk, params, generators, kept[0]),
                items, on_split=split)
        except UnsplittableOOM as err:
            raise self._unsplittable(parts, err) from None
        before = kept[0]
        # Everything below is queued without reading anything back from the device, then read
        # in ONE go: a read waits for the device, and after it the device idles until the host
        # queues more (on a GPU, once per read; a step used to read three times per adapter).
        ce_of = {i: [sums[i][0] for sums in chunks if i in sums] for i in range(len(parts))}  # device scalars
        counts = [sum(sums[i][1] for sums in chunks if i in sums) for i in range(len(parts))]
        # A step none of whose rows has a token to learn takes no update (_finish_step), nor
        # runs again for a NaN (_nan_victims); its gradient is read only to tell where one came
        # from (below).
        unlearnable = {i for i, part in enumerate(parts) if not part.step_label_tokens}
        # The squared gradient norms of the adapters that step now (device scalars or None).
        sqs = {i: self.runs[part.adapter].adapter.grad_sq() for i, part in enumerate(parts)
               if part.last_in_step and i not in unlearnable}
        # Under fp16 loss scaling, those of the adapters still accumulating too: an overflow on
        # one adapter's rows can reach the others' gradients as a NaN (see _nan_victims), mid-step
        # as well, and must be caught while this batch can still run again without it.
        watched = {i: self.runs[part.adapter].adapter.grad_sq() for i, part in enumerate(parts)
                   if not part.last_in_step and i not in unlearnable
                   and self.runs[part.adapter].adapter.loss_scale is not None}
        watched = {i: sq for i, sq in watched.items() if sq is not None}
        issued = {}  # part index -> lr of the step queued on the device
        for i, part in enumerate(parts):
            run = self.runs[part.adapter]
            if (part.last_in_step and i not in unlearnable and run.adapter.steps_on_device
                    and math.isfinite(run.step.loss)):
                # The step's loss is non-finite if any micro-batch's is: the earlier ones are
                # known here, this one only on the device, which skips the update itself then.
                bad = ~torch.isfinite(torch.stack(ce_of[i])).all()
                issued[i], _ = run.adapter.step_on_device(bad, sqs[i])
        reads = [t.float() for i in range(len(parts)) for t in ce_of[i]]
        reads += [sq.float() for sq in sqs.values() if sq is not None]
        reads += [sq.float() for sq in watched.values()]
        values = iter(torch.stack(reads).tolist())
        ce_sums = [sum(next(values) for _ in ce_of[i]) for i in range(len(parts))]
        norms = {i: (math.sqrt(next(values)) if sq is not None else 0.0) for i, sq in sqs.items()}
        norms.update((i, math.sqrt(next(values))) for i in watched)
        if not all(math.isfinite(ce) for ce in ce_sums):
            # A NaN loss: whether it reached the gradients of the adapters still accumulating
            # is a second read, made only then (see _nan_victims).
            rest = {i: self.runs[p.adapter].adapter.grad_sq() for i, p in enumerate(parts)
                    if i not in sqs and i not in watched and i not in unlearnable}
        elif unlearnable and not all(math.isfinite(n) for n in norms.values()):
            # A non-finite gradient and no NaN loss: non-finite activations on rows with no token
            # to learn show in no loss (theirs is 0), only in their gradients, which the fused
            # kernels' 0 x NaN shares with the others': read them too (a second read, only then).
            rest = {i: self.runs[parts[i].adapter].adapter.grad_sq() for i in unlearnable}
        else:
            rest = {}
        rest = {i: sq for i, sq in rest.items() if sq is not None}
        if rest:
            norms.update(zip(rest, (math.sqrt(v) for v in torch.stack(list(rest.values())).tolist())))
        seconds = time.perf_counter() - t0  # the AdamW steps queued above are in it; an SGD step is not
        # A step that a NaN of another adapter tainted in an earlier batch split for memory
        # (_taint) carries that non-finite gradient into this one: running it again cannot
        # clear it (the step is skipped at its end), and two such steps made each run again.
        tainted = {i for i, part in enumerate(parts) if self.runs[part.adapter].step.tainted_by}
        culprits = self._culprits(ce_sums, norms, unlearnable)
        # (the culprits of the norms _nan_victims sees too: those leave out tainted parts only,
        # and a tainted part is never unlearnable, the only kind whose norm makes a culprit)
        victims, together = self._nan_victims(
            ce_sums, norms if before is None else {i: n for i, n in norms.items() if i not in tainted}, unlearnable,
            culprits)
        if before is None:  # split for memory: nothing to run again from
            self._taint(parts, chunks, culprits, victims if together else [])
            victims, together = [], False
        for i in victims:  # as before this batch: no step taken, the gradients and draws of before
            adapter = self.runs[parts[i].adapter].adapter
            if i in issued:
                adapter.steps_done -= 1  # the device skipped it: its gradient was not finite
            for param in adapter.parameters():
                param.grad = before.get(param)
            mine = set(adapter.dropout_generators.values())
            for g, state in zip(generators, states):
                if g in mine:
                    g.set_state(state)
        if victims:
            self._report_rerun(parts, culprits, victims)
        before = kept[0] = None  # the copies of before go now, before the rerun makes its own
        save_due = False
        for i, part in enumerate(parts):
            if i in victims:
                continue
            run = self.runs[part.adapter]
            run.step.loss += ce_sums[i] / max(1, part.step_label_tokens)
            run.step.label_tokens += counts[i]
            run.step.input_tokens += sum(len(ex.input_ids) for ex in part.examples)
            run.busy_seconds += seconds
            if part.last_in_step:
                learned = i not in unlearnable
                save_due |= self._finish_step(run, part.epoch, norms[i] if learned else None, issued.get(i),
                                              learned=learned)
        for rerun in ([[parts[i] for i in victims]] if together else [[parts[i]] for i in victims]):
            save_due |= self._train_on(rerun)
        return save_due

    @staticmethod
    def _culprits(ce_sums: list[float], norms: dict[int, float], unlearnable: set[int]) -> set[int]:
        """The parts of a fused batch with non-finite activations on their rows: a non-finite
        loss, or, for a step with no token to learn (`unlearnable`), whose loss is 0 whatever
        its rows hold, a non-finite gradient (`norms`: read for it only when another gradient
        is non-finite and no loss is; such a gradient is no fault of its own to clear, as its
        step takes no update)."""
        return ({i for i, ce in enumerate(ce_sums) if not math.isfinite(ce)}
                | {i for i in unlearnable if not math.isfinite(norms.get(i, 0.0))})

    @staticmethod
    def _nan_victims(ce_sums: list[float], norms: dict[int, float], unlearnable: set[int] = frozenset(),
                     culprits: set[int] | None = None) -> tuple[list[int], bool]:
        """The parts of a fused batch whose non-finite gradient may be another adapter's NaN,
        and whether to rerun them together. The fused (and dense) kernels reduce each
        adapter's weight gradients over every row of the batch, its zeros included, and
        0 x NaN is NaN: non-finite activations on one adapter's rows (a non-finite loss) make
        the others' gradients NaN too. So when an adapter's loss is non-finite, the others
        whose gradient is non-finite run again without it; when no loss is but several
        gradients are, each of those runs again alone. Their steps were not taken (the device
        skipped them), so a rerun trains them exactly as if the culprit had not been there.
        `unlearnable`: parts whose step has no token to learn, culprits by their gradient
        (_culprits); they never run again (their step takes no update). `culprits`: _culprits's,
        where the caller has them already."""
        if culprits is None:
            culprits = Trainer._culprits(ce_sums, norms, unlearnable)
        suspects = [i for i, norm in norms.items() if not math.isfinite(norm) and i not in culprits]
        if culprits and suspects:
            return suspects, True
        if len(suspects) >= 2:
            return suspects, False
        return [], False

    def _taint(self, parts, chunks: list[dict], culprits: set[int], victims: list[int]) -> None:
        """In a batch split for memory, which keeps no gradients to run again from: mark the
        step of each of `victims` (_nan_victims's, who have a culprit) as tainted by the
        culprits it shared a piece (`chunks`' keys) with. Its step is then skipped as no fault
        of its own (_finish_step): on_nan is not consulted and an fp16 loss scale does not back
        off. A victim that shared no piece with a culprit (_culprits) has a non-finite gradient
        of its own."""
        for i in victims:
            names = {parts[c].adapter for c in culprits for sums in chunks if i in sums and c in sums}
            step = self.runs[parts[i].adapter].step
            step.tainted_by = sorted(names.union(step.tainted_by))

    def _forward_backward(self, parts, chunk, params, generators, before) -> dict[int, tuple[torch.Tensor, int]]:
        """Forward, loss and backward of the examples `chunk` ((part index, example) pairs) of
        the fused batch `parts`; returns {part index: (CE sum, label tokens)} of its pieces.
        All or nothing: if it raises, the LoRA gradients and the dropout generators are as
        they were before."""
        session = self.session
        pieces: dict[int, list] = {}
        for i, ex in chunk:
            pieces.setdefault(i, []).append(ex)
        # Each piece is its adapter's micro-batch cut down to the chunk's examples; it keeps the
        # whole step's label-token count, the loss normaliser.
        micro = [parts[i] if len(exs) == len(parts[i].examples) else replace(parts[i], examples=exs)
                 for i, exs in pieces.items()]
        # Each adapter's fp16 loss scale (1 without), asked for before grads_restored_on_error sets
        # the gradients aside: an older checkpoint's unscaled ones get it then (Adapter.loss_scale_for).
        scales = {p.adapter: self.runs[p.adapter].adapter.loss_scale_for(p.step_label_tokens) for p in micro}
        with grads_restored_on_error(params, before), generators_restored_on_error(generators):
            try:
                batch = fuse(micro, session.pad_id, pack_len=self.pack_len).to(session.device)
                # Packing leaves the loss as it is: the same label tokens are targets (a packed
                # sequence's first token never is, nor is it unpacked), so the CE sum and the
                # step's token count, the normaliser, are those of the unpacked batch.
                sums = fused_loss_sums(session.model, session.layout, batch)
                total = sum(_scaled_loss(sums[p.adapter][0], p.step_label_tokens, scales[p.adapter]) for p in micro)
                total.backward()
            except BaseException:
                # The input groups may still hold this attempt's inputs: a retry must not.
                clear_lora_caches(session.wrappers)
                raise
        return {i: (sums[p.adapter][0].detach(), sums[p.adapter][1]) for i, p in zip(pieces, micro)}

    def _report_rerun(self, parts, culprits: set[int], victims: list[int]) -> None:
        """Say once per culprit (_culprits) that its NaN made others run again (every batch it
        shares does, for as long as it trains: on_nan "stop" takes it out)."""
        culprits = tuple(parts[i].adapter for i in sorted(culprits))
        if culprits in self.reran_for:
            return
        self.reran_for.add(culprits)
        others = ", ".join(repr(parts[i].adapter) for i in victims)
        if culprits:
            cause = (f"non-finite activations of {', '.join(repr(n) for n in culprits)} "
                     f"reached the gradients of {others}")
        else:
            cause = f"the gradients of {others} came out non-finite together"
        tqdm.write(f"mlora: {cause} in a fused batch; they ran again, apart (each such batch will; "
                   "on_nan: stop takes a culprit out)", file=sys.stderr)

    def _report_split(self, left, right) -> None:
        unit = "sequences" if self.pack_len else "rows"
        tqdm.write(f"mlora: out of memory on a batch of {len(left) + len(right)} {unit}; retrying in halves",
                   file=sys.stderr)

    def _unsplittable(self, parts, err: UnsplittableOOM) -> UserError:
        """The one-line error for a single example that does not fit even alone."""
        (i, ex), = err.items
        cause = err.__cause__ if err.__cause__ is not None else err
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if len(detail) > 160:
            detail = detail[:157] + "..."
        fixes = "lower cutoff_len" if self.cfg.recompute else "set \"recompute\": true, lower cutoff_len"
        return UserError(f"out of device memory on a single example of adapter {parts[i].adapter!r} "
                         f"({counted(len(ex.input_ids), 'token')}, cutoff_len {self.cfg.cutoff_len}), even after "
                         f"splitting its fused batch down to it; {fixes}, train fewer or smaller adapters (their state "
                         f"stays on the device), or free device memory ({detail})")

    def _finish_step(self, run: AdapterProgress, epoch: int, norm: float | None, stepped_lr: float | None = None,
                     learned: bool = True) -> bool:
        """Log (and, unless `stepped_lr`, take) the adapter's optimizer step; `norm` is its
        gradient norm (None where it has none). stepped_lr: the LR of a step already queued by
        step_on_device, which the device skipped if the step turns out non-finite here. learned
        False: no row of the step has a token to learn (no loss, no gradient: both are logged
        null); see below."""
        adapter, session = run.adapter, self.session
        loss = run.step.loss if learned else None
        stepped = stepped_lr is not None
        lr = stepped_lr if stepped else adapter.current_lr()
        record = {"adapter": adapter.name, "step": adapter.steps_done + (0 if stepped else 1),
                  "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": run.step.label_tokens,
                  "input_tokens": run.step.input_tokens, "time": self.elapsed}
        if not learned:
            # Its gradient is zero, yet an optimizer step would still move the weights (AdamW's
            # momentum and weight decay) and its state: it leaves both alone, as torch's
            # optimizers leave a parameter without a gradient. It still counts (step numbers,
            # the LR schedule and a resume stay the plan's), logged with no loss (null), and
            # the loss scale stays as it is; evaluation and save_step go on as after any step.
            adapter.skip_step()
        elif not (math.isfinite(loss) and math.isfinite(norm)):
            if math.isfinite(loss) and run.step.tainted_by:
                return self._tainted(run, record, counted=stepped)
            if math.isfinite(loss) and adapter.update_loss_scale(False):
                return self._overflow(run, record, counted=stepped)
            return self._non_finite(run, record, counted=stepped)
        else:
            if not stepped:
                adapter.step(grad_norm=norm)
            adapter.update_loss_scale(True)  # (after the step: it unscales by the scale of its backward)
            run.last_loss = loss
        step = adapter.steps_done
        run.tokens_seen += run.step.input_tokens
        self.metrics.write(record)
        run.bar.update(1)
        run.bar.set_postfix(loss="n/a" if loss is None else f"{loss:.4f}",
                            tok_s=f"{run.tokens_seen / max(run.busy_seconds, 1e-9):.0f}", refresh=False)
        run.step = StepAccumulator()

        cfg = adapter.cfg
        if cfg.eval_step and (step % cfg.eval_step == 0 or step == run.total_steps):
            eval_loss, tokens = evaluate_adapter(session, cfg.name, session.data[cfg.name].test)
            session.model.train()
            record = {"adapter": adapter.name, "step": step, "eval_loss": eval_loss, "eval_tokens": tokens,
                      "time": self.elapsed}
            # (tallied only under save_best: a tally a resume turning save_best on found in the
            # checkpoint would name a best whose weights were never written)
            if cfg.save_best and improves(run.best, eval_loss):
                run.best = (eval_loss, step)
                save_checkpoint_dir(self.out / adapter.name / BEST_DIR, adapter.peft_state_dict(),
                                    adapter.peft_config(str(session.base_dir.resolve())))
                record["best"] = True
            early = stops_early(cfg.early_stopping_patience, run.patience, eval_loss, cfg.early_stopping_threshold,
                                step, run.total_steps)
            if early:
                record["early_stopped"] = True
            self.metrics.write(record)
            run.bar.write(f"[{adapter.name}] step {step}: eval loss {eval_loss:.4f} over {counted(tokens, 'token')}")
            if early:
                self._stop_early(run, step)
        if self.cfg.save_step and step % self.cfg.save_step == 0:
            save_checkpoint_dir(self.out / adapter.name / f"checkpoint-{step}", adapter.peft_state_dict(),
                                adapter.peft_config(str(session.base_dir.resolve())))
            return True
        return False

    def _stop_early(self, run: AdapterProgress, step: int) -> None:
        """Early stopping takes the adapter out after `step`, as on_nan "stop" does: the next
        fused batches leave it out and its slot goes to the next queued adapter; it is saved
        at the end as it is now."""
        run.stopped_at = self.iteration
        run.early_stopped = step
        self.stopped.add(run.adapter.name)
        run.bar.write(f"[{run.adapter.name}] step {step}: stopped early (no eval loss improvement in "
                      f"{counted(run.patience.waited, 'evaluation')})")
        # (its bar stays part-filled while the others train on: it says why, not a stall)
        run.bar.set_description_str(f"{run.adapter.name} (stopped early)")

    def _non_finite(self, run: AdapterProgress, record: dict, counted: bool = False) -> bool:
        """A NaN/inf loss or gradient: skip the step or stop the adapter (its `on_nan`); the
        other adapters never see it (they share no parameter and no row with it; a NaN that
        reaches their gradients through a fused kernel sends them round again: _nan_victims). counted:
        step_on_device already dropped the gradients and counted the step (the device
        skipped the update)."""
        adapter = run.adapter
        policy = adapter.cfg.on_nan
        reason = "non-finite loss" if not math.isfinite(record["loss"]) else "non-finite gradient"
        if not counted:
            adapter.optimizer_zero_grad()
        if policy == "stop":
            run.stopped_at = self.iteration
            self.stopped.add(adapter.name)
            run.bar.set_description_str(f"{adapter.name} (stopped: {reason})")
            adapter.steps_done += 0 if counted else 1
        else:
            if not counted:
                adapter.skip_step()
            run.skipped_steps += 1
        self.metrics.write({**record, "skipped": True, "reason": reason, "action": policy})
        run.bar.write(f"[{adapter.name}] step {record['step']}: {reason}; "
                      + ("adapter stopped (on_nan: stop)" if policy == "stop" else "step skipped"))
        run.bar.update(1)
        run.step = StepAccumulator()
        return False

    def _overflow(self, run: AdapterProgress, record: dict, counted: bool) -> bool:
        """An fp16 gradient overflow (a finite loss, a non-finite gradient under loss scaling):
        the step is skipped and the loss scale has halved (loss_scale.py); on_nan is not
        consulted. counted: as for _non_finite."""
        adapter = run.adapter
        if not counted:
            adapter.skip_step()
        run.skipped_steps += 1
        scale = adapter.loss_scale.per_token
        self.metrics.write({**record, "skipped": True, "reason": "fp16 gradient overflow", "loss_scale": scale})
        run.bar.write(f"[{adapter.name}] step {record['step']}: fp16 gradient overflow; step skipped, "
                      f"loss scale now {scale:g} per token")
        run.bar.update(1)
        run.step = StepAccumulator()
        return False

    def _tainted(self, run: AdapterProgress, record: dict, counted: bool) -> bool:
        """A step whose gradient another adapter's NaN reached where it could not run again
        (_taint): skipped, whatever on_nan says, and an fp16 loss scale stays as it was.
        counted: as for _non_finite."""
        adapter, culprits = run.adapter, run.step.tainted_by
        if not counted:
            adapter.skip_step()
        run.skipped_steps += 1
        self.metrics.write({**record, "skipped": True, "reason": "non-finite values of another adapter",
                            "culprits": culprits, "action": "skip"})
        run.bar.write(f"[{adapter.name}] step {record['step']}: non-finite activations of "
                      f"{', '.join(map(repr, culprits))} reached its gradient in a batch split for memory; "
                      "step skipped")
        run.bar.update(1)
        run.step = StepAccumulator()
        return False

    # ------------------------------------------------------------------ checkpoints
    def _write_checkpoint(self) -> Path:
        state = {"iteration": self.iteration, "elapsed": self.elapsed,
                 "metrics_bytes": self.metrics.tell(), "max_tokens_per_batch": self.max_tokens,
                 "adapters": {}}
        for name, run in self.runs.items():
            state["adapters"][name] = {
                **run.adapter.state_for_checkpoint(),
                "step": asdict(run.step), "tokens_seen": run.tokens_seen, "busy_seconds": run.busy_seconds,
                "last_loss": run.last_loss, "stopped_at": run.stopped_at, "skipped_steps": run.skipped_steps,
                "best": None if run.best is None else list(run.best),
                "patience": run.patience.state(), "early_stopped": run.early_stopped,
            }
        return checkpoint.write_checkpoint(self.out, self.iteration, state, self.fingerprint,
                                           self.cfg.save_total_limit)

    def _restore(self, batches, state: dict) -> int:
        target = state["iteration"]
        stops = {}
        for name, saved in state["adapters"].items():
            run = self.runs[name]
            run.adapter.restore_from_checkpoint(saved)
            run.step = StepAccumulator(**saved["step"])
            run.tokens_seen, run.busy_seconds = saved["tokens_seen"], saved["busy_seconds"]
            run.last_loss, run.skipped_steps = saved["last_loss"], saved["skipped_steps"]
            run.stopped_at = saved["stopped_at"]
            # (a checkpoint from before save_best, or written with it off, has none: the evals
            # after it start the tally)
            run.best = tuple(saved["best"]) if saved.get("best") is not None else None
            run.patience = Patience.from_state(saved.get("patience"))
            run.early_stopped = saved.get("early_stopped")
            run.bar.update(run.adapter.steps_done)
            if run.stopped_at is not None:
                stops.setdefault(run.stopped_at, []).append(name)
        # Replay the batch stream up to the checkpoint: no compute, only the bookkeeping that
        # decides later batches (which adapters were stopped, and when).
        while self.iteration < target:
            next(batches)
            self.iteration += 1
            self.stopped.update(stops.get(self.iteration, []))
        self.elapsed_before = state["elapsed"]
        self.started = time.perf_counter()
        print(f"mlora: resumed from iteration {target} of {self.out}", file=sys.stderr)
        return state["metrics_bytes"]


def packed_row_len(cfg) -> int | None:
    """The length of a packed row: cutoff_len (every example is truncated to it already); None
    without packing."""
    return cfg.cutoff_len if cfg.packing else None


def training_batches(cfg, train: dict[str, Sequence[Example]], max_tokens: int | None,
                     stopped: set[str] | None = None) -> Iterator[list[MicroBatch]]:
    """The run's stream of fused batches: every adapter's micro-batches (its rows `train[name]`,
    its seed), fused by the config's strategy under the token budget `max_tokens`. The trainer
    trains on it and `mlora train --dry_run` counts it: one stream, so the plan cannot drift."""
    streams = {a.name: adapter_stream(train[a.name], a, adapter_seed(cfg.seed, a.name)) for a in cfg.lora}
    return fused_batches(cfg.train_strategy, streams, cfg.train_lora_candidate_num, cfg.train_lora_simultaneously_num,
                         max_tokens, stopped, pack_len=packed_row_len(cfg))


def remove_earlier_snapshots(out: Path, names: Iterable[str]) -> None:
    """A fresh run (not --resume): each adapter's <name>/best and <name>/checkpoint-<step> left
    by an earlier run in `out` go, as its resumable checkpoints do (checkpoint.clear): a run
    that saves no best of its own (save_best off, or no finite eval loss), or fewer or other
    steps, left the earlier run's there, where they passed for this run's. Only a directory
    mlora could have written (adapter.is_checkpoint_dir); anything else under those names is
    left as it is, said on stderr."""
    for name in names:
        adapter_dir = Path(out) / name
        if not adapter_dir.is_dir():
            continue
        for entry in sorted(adapter_dir.iterdir()):
            if entry.name == BEST_DIR:
                what = "an earlier run's best weights"
            elif checkpoint_dir_step(entry.name) is not None:
                what = "an earlier run's save_step checkpoint"
            else:
                continue
            if is_checkpoint_dir(entry):
                remove_dir_aside(entry)
            else:
                print(f"mlora: note: {entry} is not an adapter directory mlora wrote ({what}); left as it is",
                      file=sys.stderr)


def improves(best: tuple[float, int] | None, eval_loss: float | None) -> bool:
    """Whether an eval loss is finite and lower than the best (eval loss, step) so far; an
    equal one is not (the earlier weights stay)."""
    return eval_loss is not None and math.isfinite(eval_loss) and (best is None or eval_loss < best[0])


def _scaled_loss(ce_sum: torch.Tensor, step_tokens: int, scale: float) -> torch.Tensor:
    """A micro-batch's share of its adapter's step loss (CE sum / the step's label tokens),
    times the adapter's fp16 loss scale (loss_scale.py; 1: none)."""
    loss = ce_sum / max(1, step_tokens)
    return loss if scale == 1.0 else loss * scale


def check_disk_space(out: Path, adapters: list[Adapter]) -> None:
    """Fail before training, not at the first checkpoint, when the disk cannot hold one."""
    lora_bytes = sum(p.numel() * 4 for a in adapters for p in a.parameters())
    # A checkpoint holds weights, gradients and up to two optimizer moments; the previous one
    # stays until the new one is complete; plus the PEFT directories.
    need = lora_bytes * 4 * 2 + lora_bytes * 2
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        raise UserError(f"output_dir {out}: only {free / 2**20:.1f} MiB free, but checkpoints of "
                        f"these adapters need about {need / 2**20:.1f} MiB")


def train(session: Session, progress: bool = True, resume: bool = False) -> dict[str, dict]:
    """Train every adapter of the session's config; returns {name: summary}. Without `resume`
    it deletes the checkpoints in output_dir first, unasked: `mlora train` refuses that over an
    unfinished run's (checkpoint.unfinished_run) unless --overwrite; a caller that wants the same
    guard checks it before."""
    return Trainer(session, progress=progress, resume=resume).run()
