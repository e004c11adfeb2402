"""`mlora train --pipeline`, `mlora eval --pipeline` and `mlora generate --pipeline`: work out
this rank's place (flags or torchrun's environment), its stage, connect to the other ranks,
check they all run the same job, then train (or evaluate the saved adapters, or complete
prompts with them)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mlora import checkpoint
from mlora.errors import PipelineError, UserError
from mlora.loader import load_model, read_model_config
from mlora.lora import inject_lora
from mlora.pipeline.balance import module_costs, split_by_balance, split_by_cost
from mlora.plural import counted


@dataclass
class RankPlace:
    rank: int | None  # None: none given, where resolve_place lets it be
    world_size: int
    device: str | None
    master_addr: str
    master_port: int


def resolve_place(args, rank_needed: bool = True) -> RankPlace:
    """Rank, world size, device and rendezvous from the flags, else from torchrun's env.
    rank_needed False: a rank may be missing (`mlora train --dry_run --pipeline` then plans every stage)."""
    env = os.environ
    rank = args.rank if args.rank is not None else _env_int("RANK")
    if args.balance:
        world = len(args.balance)
        if args.world_size is not None and args.world_size != world:
            raise UserError(f"--world_size {args.world_size} but --balance has {counted(world, 'entry')}")
    else:
        world = args.world_size if args.world_size is not None else _env_int("WORLD_SIZE")
    if world is None:
        raise UserError("--pipeline needs the world size: give --balance, --world_size, or start under torchrun")
    if world < 1:
        raise UserError(f"--world_size must be at least 1, got {world}")
    if rank is None and rank_needed:
        raise UserError("--pipeline needs --rank (or torchrun's RANK)")
    if rank is not None and not 0 <= rank < world:
        raise UserError(f"--rank {rank} is outside the world of {counted(world, 'rank')} (0..{world - 1})")
    device = args.device
    if device is None and "LOCAL_RANK" in env:
        device = f"cuda:{int(env['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
    addr = args.master_addr or env.get("MASTER_ADDR", "127.0.0.1")
    if args.master_port is not None:
        port = args.master_port
    elif "TORCHELASTIC_RUN_ID" in env and "MASTER_PORT" in env:
        # Under torchrun, MASTER_PORT is the elastic agent's own store; ours takes the next port.
        port = _env_int("MASTER_PORT") + 1
    else:
        port = _env_int("MASTER_PORT") if "MASTER_PORT" in env else 29500
    if not 1 <= port <= 65535:
        raise UserError(f"rendezvous port {port} (from MASTER_PORT) is not a TCP port (1..65535)")
    return RankPlace(rank, world, device, addr, port)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def plan_stages(base_model: str, world_size: int, balance: list[int] | None) -> list[list[str]]:
    from mlora.models import family_for

    cfg, margs = read_model_config(base_model)
    small_gemma4 = [key for key, on in (("hidden_size_per_layer_input", margs.per_layer_input_size),
                                        ("num_kv_shared_layers", margs.kv_shared_layers)) if on]
    if small_gemma4 and world_size > 1:  # (every stage would need the first's per-layer inputs or keys)
        raise UserError(f"--pipeline: this Gemma 4 model's {' and '.join(small_gemma4)} (E2B/E4B) are not split "
                        "into stages; run it in one process, without --pipeline")
    modules = family_for(cfg.model_type).module_sequence(margs)
    if balance:
        return split_by_balance(modules, margs.num_layers, balance)
    # a sparse layer: k experts per token, a shared expert, and the router (E outputs: E / 3 of a width)
    sparse = (margs.num_experts_per_tok * margs.moe_intermediate_size + margs.shared_expert_intermediate_size
              + margs.num_experts // 3)
    from mlora.lora import MLP_MODULES
    from mlora.memory import projection_shapes

    # a layer's attention parameters (latent attention's too, whose head_dim is only a RoPE part;
    # Qwen3.5's layers have softmax or linear attention)
    mixers = {kind: sum(i * o for m, (i, o) in projection_shapes(margs, kind, named_experts=False).items()
                        if m not in MLP_MODULES)
              for kind in set(margs.layer_kinds)}
    widths = {i: sparse for i, moe in enumerate(margs.moe_layers) if moe}
    if margs.moe_beside_mlp:  # Gemma 4 26B-A4B: every layer's dense MLP and the experts beside it
        widths = {i: margs.intermediate_size + sparse for i in range(margs.num_layers)}
    costs = module_costs(modules, margs.hidden_size, margs.intermediate_size, margs.vocab_size,
                         margs.num_heads, margs.num_kv_heads, margs.head_dim, widths, None,
                         {i: mixers[kind] for i, kind in enumerate(margs.layer_kinds)})
    return split_by_cost(modules, costs, world_size)


def resume_state(transport, output_dir: str, tag: str, run_print: dict) -> dict | None:
    """The newest checkpoint every rank holds a part of (ranks agree through `exchange`), each
    rank's part loaded `failing_together`; None when every rank had finished."""
    mine = {"finished": checkpoint.is_finished(output_dir, tag),
            "available": [it for it, _ in checkpoint.list_checkpoints(output_dir, tag)],
            "tags": sorted(checkpoint.checkpoint_tags(output_dir))}
    everyone = transport.exchange(mine)
    if all(e["finished"] for e in everyone):
        return None
    common = set.intersection(*(set(e["available"]) for e in everyone))
    if not common:
        raise UserError(f"nothing to resume: no checkpoint that every rank holds in "
                        f"{checkpoint.checkpoint_root(output_dir)} (checkpoints are written every save_step)"
                        f"{missing_parts_note([set(e['tags']) for e in everyone])}")
    iteration = max(common)
    path = dict(checkpoint.list_checkpoints(output_dir, tag))[iteration]
    # (a rank whose part is damaged or from another run fails alone: the others must learn why,
    # not load their stage and find it gone)
    with failing_together(transport):
        state = checkpoint.load_checkpoint(path, run_print)
    return state


def missing_parts_note(tags_of_ranks: list[set[str]]) -> str:
    """Why the ranks (tags_of_ranks: what each finds in its output_dir) hold no checkpoint in
    common, where they hold some: ranks without a part (another world size wrote them, or a
    host's output_dir lacks them), or only one process's checkpoints; "" when none is found."""
    world = len(tags_of_ranks)
    found = set().union(*tags_of_ranks)
    written = checkpoint.tag_ranks(found)
    lacking = [rank for rank, tags in enumerate(tags_of_ranks) if f"rank{rank}" not in tags]
    if written and lacking:
        return (f"; it holds parts of {checkpoint.ranks_phrase(written)} but none of "
                f"{checkpoint.ranks_phrase(lacking)} of these {world}: resume with the ranks and --balance of the "
                f"run that wrote them, each rank finding its parts in its output_dir")
    return checkpoint.other_kind_note(found, pipeline=True)


def refuse_unfinished_runs(transport, output_dir: str, overwrite: bool) -> None:
    """A fresh start (no --resume) deletes every rank's checkpoints: refused on every rank, as
    in one process, when any rank holds an unfinished run's, unless it was --overwrite."""
    with failing_together(transport):
        newest = None if overwrite else checkpoint.unfinished_run(output_dir)
        if newest is not None:
            raise checkpoint.refuse_to_clear(newest, pipeline=True)


def train_pipeline(args) -> int:
    from mlora.batching import check_trainable
    from mlora.cli import (best_note, early_stop_note, prepare_output_dir, quant_config, remove_if_still_empty,
                           written_dirs)
    from mlora.memory import is_out_of_memory
    from mlora.output_lock import output_dir_lock
    from mlora.pipeline.worker import check_same_everywhere, fingerprint
    from mlora.session import open_session
    from mlora.trainer import Interrupted, SignalFlag, remove_earlier_snapshots

    place = resolve_place(args)
    created, lock, device = [], contextlib.ExitStack(), None
    with StartupError() as early:
        session = open_session(args.base_model, args.config, output_dir=args.output_dir,
                               device=place.device, dtype=args.dtype, seed=args.seed,
                               quant=quant_config(args), load_base=False,
                               trust_remote_code=args.trust_remote_code, data_notes=place.rank == 0)
        device = session.device
        stages = plan_stages(args.base_model, place.world_size, args.balance)
        for a in session.cfg.lora:  # before the output directory is touched (the worker checks too)
            check_trainable(session.data[a.name].train, a, session.cfg.cutoff_len)
        created = (prepare_output_dir(session.cfg.output_dir, [a.name for a in session.cfg.lora],
                                      written_dirs(session))
                   if place.rank in (0, place.world_size - 1) else [])
        # The ranks that prepared the output directory keep a one-process run out of it (and are
        # kept out of one's) while they run.
        if place.rank in (0, place.world_size - 1):
            lock.enter_context(output_dir_lock(session.cfg.output_dir, shared=True))
    try:
        transport = join_peers(args, place, device, early.error)
    except BaseException:  # no run started: leave no empty output directory behind
        lock.close()
        remove_if_still_empty(created)
        raise
    tag = f"rank{place.rank}"
    run_print = {**checkpoint.run_fingerprint(session), "stages": stages,
                 "save_step": session.cfg.save_step}
    try:
        # --resume too: a rank resuming beside one starting afresh would exchange out of step
        check_same_everywhere(transport, {**fingerprint(session, stages, args.transport), "--resume": args.resume})
        if not args.resume:
            refuse_unfinished_runs(transport, session.cfg.output_dir, args.overwrite)
            checkpoint.clear(session.cfg.output_dir)
            if place.rank == 0:  # (the rank that writes the adapters)
                remove_earlier_snapshots(session.cfg.output_dir, [a.name for a in session.cfg.lora])
            state = None
        else:
            state = resume_state(transport, session.cfg.output_dir, tag, run_print)
            if state is None:
                print(f"mlora: rank {place.rank}: nothing to resume: the run in {session.cfg.output_dir} "
                      f"already finished")
                return 0
        # Without save_step there is no drained cut to stop at: signals keep their default.
        with SignalFlag() if session.cfg.save_step else contextlib.nullcontext() as signals:
            worker = start_stage(session, stages[place.rank], transport, progress=not args.no_progress,
                                 fingerprint=run_print, signals=signals)
            if state is not None:
                worker.restore(state)
                print(f"mlora: rank {place.rank}: resumed at segment {state['iteration']}", file=sys.stderr)
            try:
                result = worker.run()
            except Interrupted as stop:
                print(f"mlora: rank {place.rank}: stopped by {signal.Signals(stop.signum).name} at a "
                      f"checkpoint ({stop.path}); resume by starting every rank again with --resume",
                      file=sys.stderr)
                return 128 + stop.signum
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                # A single row that does not fit even alone (stage_rows splits the rest), or
                # running out outside a stage's forward and backward: one line here, the others
                # see this rank leave (exit 3).
                raise UserError(f"rank {place.rank}: out of device memory training on its stage; lower "
                                f"micro_batch_size or cutoff_len, lower memory_fraction (fewer micro-batches in "
                                f"flight), set \"recompute\": true, or split the model over more stages") from None
    except BaseException:
        # Whatever stopped this rank (ranks of different jobs, another rank's unfinished run,
        # nothing to resume, a load that failed here or elsewhere, a lost rank, Ctrl-C): an
        # output_dir it created and nothing has written to goes again (only empty directories).
        remove_if_still_empty(created)
        raise
    finally:
        transport.close()
        lock.close()
    if place.rank == 0:
        for a in session.cfg.lora:
            saved = os.path.join(session.cfg.output_dir, a.name)
            best = best_note(result["best"].get(a.name), saved) if a.save_best else ""
            print(f"{a.name}: saved to {saved}{best}{early_stop_note(result['early_stopped'].get(a.name))}")
    if place.rank == place.world_size - 1:
        for line in last_loss_lines([a.name for a in session.cfg.lora], result["losses"]):
            print(line)
    return 0


def last_loss_lines(names: list[str], losses: dict[str, float]) -> list[str]:
    """The last stage's summary: each adapter's loss of its last step that had a token to learn,
    "n/a" for one that took none (max_steps ending on steps whose rows were all cut by
    cutoff_len, or an adapter stopped before its first step), as one process says it."""
    return [f"{name}: last loss {'n/a' if losses.get(name) is None else format(losses[name], '.4f')}"
            for name in names]


class StartupError:
    """Around a rank's own start-up, before it connects (the config, data, tokenizer, output
    directory): a UserError inside is kept, not raised, for `join_peers` to report once the
    rank has joined the others. Raised at once, the rank would exit and leave the others
    waiting out --connect_timeout for a rank that never comes, to learn only that it did not
    join (the data or a flag may be wrong on one host only)."""

    error: UserError | None = None

    def __enter__(self) -> "StartupError":
        return self

    def __exit__(self, kind, err, traceback) -> bool:
        if isinstance(err, UserError):
            self.error = err
            return True
        return False


# How long a rank whose start-up failed waits for the others to connect, to tell them why: they
# usually started with it and are seconds away; past this it gives its own line without them
# (they then wait out --connect_timeout, as for a rank that never comes).
REPORT_WAIT_S = 60.0


def join_peers(args, place: RankPlace, device: torch.device | None, early: UserError | None):
    """Connect to the other ranks, then tell them whether this rank's start-up failed (`early`,
    from `StartupError`): one failure fails every rank at once, each with one line (the
    failing rank its own, the others its line naming it: `failing_together`). A failed rank
    says on stderr that it waits (at most REPORT_WAIT_S), and gives its own line whatever
    becomes of the connection. device: the session's, or None when it failed before having one
    (then the flag's, or the CPU where the device itself was the culprit: only the start-up
    message is still exchanged)."""
    from mlora.device import resolve_device
    from mlora.pipeline.transport import connect

    if device is None:
        try:
            device = resolve_device(place.device)
        except UserError:
            device = torch.device("cpu")
    wait = args.connect_timeout
    if early is not None:
        wait = min(wait, REPORT_WAIT_S)
        # (the reason now, not only after the wait: a rank started alone by hand waits it out)
        print(f"mlora: note: rank {place.rank} cannot start ({early}); it waits up to {wait:g} s for the other "
              f"ranks to connect, to tell them", file=sys.stderr)
    try:
        transport = connect(args.transport, place.rank, place.world_size, place.master_addr, place.master_port,
                            device, peer_timeout=args.peer_timeout, connect_timeout=wait)
    except PipelineError:
        if early is not None:  # no one to tell: this rank's own reason, not theirs
            raise early from None
        raise
    try:
        with failing_together(transport):
            if early is not None:
                raise early
    except BaseException:
        transport.close()
        raise
    return transport


@contextlib.contextmanager
def failing_together(transport):
    """Around a start-up step that may fail on some ranks only (loading weights or an adapter,
    reading a checkpoint part, finding an unfinished run to keep): a UserError
    inside, on any rank, fails every rank, each with one line (the failing rank its own, the
    others the first failing rank's, naming it): a rank that went on alone would send its
    batches to a rank that has given up, and learn only that it closed its connection. A
    collective: every rank passes through it once, failed or not. Anything else (an
    interrupt, a bug) skips the exchange and leaves the rank, which the others see as lost
    (but for a rank refused meanwhile, which says its own line)."""
    error = None
    try:
        yield
    except UserError as err:
        error = err
    try:
        errors = transport.exchange(None if error is None else str(error))
    except PipelineError:  # another rank lost meanwhile: this rank's own reason, if it has one
        if error is not None:
            raise error from None
        raise
    if error is not None:
        raise error
    failed = next(((rank, e) for rank, e in enumerate(errors) if e is not None), None)
    if failed is not None:
        raise UserError(f"rank {failed[0]}: {failed[1]}")


def load_slice(session, parts: list[str]) -> None:
    """This rank's slice of the base (`parts`; read and quantized alone), with LoRA wrappers."""
    session.model = load_model(session.base_dir, session.device, session.dtype, parts=parts, quant=session.quant)
    session.wrappers = inject_lora(session.model, session.layout)


def start_stage(session, parts: list[str], transport, **worker_options):
    """`mlora train --pipeline`'s stage: this rank's slice of the base (`parts`) with its
    adapters (their init_from tensors of its layers), loaded as `failing_together`, then
    planned with the other ranks. worker_options: StageWorker's."""
    from mlora.pipeline.worker import StageWorker

    with failing_together(transport):
        load_slice(session, parts)
        worker = StageWorker(session, transport, **worker_options)
    worker.plan()
    return worker


def saved_adapters(cfg) -> dict[str, str]:
    """{name: a digest of its files} for each adapter of `cfg` with weights saved in
    output_dir/<name>: the adapters `mlora eval` loads (the others are evaluated on the bare
    base). Every rank loads its part from its own output_dir, so the ranks compare these."""
    from mlora.adapter import adapter_files_digest, has_saved_weights

    return {a.name: adapter_files_digest(Path(cfg.output_dir) / a.name) for a in cfg.lora
            if has_saved_weights(Path(cfg.output_dir) / a.name)}


def check_same_adapters(transport, cfg, saved: dict[str, str]) -> None:
    """Every rank must hold the same saved adapters (or their absence): each loads its slice of
    them, and a mix of two trainings' slices would evaluate to a loss of neither."""
    everyone = transport.exchange(saved)
    for rank, theirs in enumerate(everyone):
        for a in cfg.lora:
            if theirs.get(a.name) == everyone[0].get(a.name):
                continue
            if a.name in theirs and a.name in everyone[0]:
                what = f"other saved weights of adapter '{a.name}' than rank 0"
            else:
                what = (f"{'saved weights' if a.name in theirs else 'no saved weights'} of adapter '{a.name}' "
                        f"in its output_dir, rank 0 {'has' if a.name in everyone[0] else 'has none'}")
            raise PipelineError(f"rank {rank} has {what}; every rank loads its part of each adapter from its "
                                f"own output_dir/<adapter>: give every rank the same files (pipeline training "
                                f"writes them on rank 0's host only)")


def load_stage(session, parts: list[str], transport, names: list[str], adapters: dict,
               check_ranks: bool = False) -> None:
    """This rank's slice of the base (`parts`) and of each adapter in `names`, loaded from its
    own output_dir/<name> with the checks one process makes, into `adapters` ({name: Adapter};
    the caller detaches them, those loaded before a failure too). A load that fails on any
    rank fails every rank (`failing_together`). check_ranks: refuse every adapter of the
    config that training refuses (`mlora eval`)."""
    from dataclasses import replace

    from mlora.adapter import Adapter, check_rank

    cfg = session.cfg
    by_name = {a.name: a for a in cfg.lora}
    with failing_together(transport):
        # Of each adapter, too, only the tensors of this rank's decoder layers, with the checks
        # one process makes.
        load_slice(session, parts)
        if check_ranks:
            for a in cfg.lora:
                check_rank(a, session.wrappers)
        layers = {f"model.layers.{i}" for i in session.model.layer_ids}
        every_layer = {f"model.layers.{i}" for i in range(session.model.args.num_layers)}
        for name in names:
            adapters[name] = Adapter(replace(by_name[name], init_from=None), session.wrappers, cfg.seed,
                                     session.device, stage_layers=layers, naming=session.naming,
                                     model_layers=every_layer)
            adapters[name].load_peft(Path(cfg.output_dir) / name, label="adapter")


def eval_pipeline(args) -> int:
    """`mlora eval --pipeline`: every rank loads its slice of the base and of each saved
    adapter; each adapter's test rows run forward through the stages test_batch_size rows at a
    time (E messages, as eval_step in pipeline training); the last rank computes the losses and
    rank 0 prints the lines one-process `mlora eval` prints, once every rank has finished (the
    other ranks print nothing). A load that fails on one rank (a mismatched adapter, weights
    that do not fit) fails every rank, each with one line. A test chunk that runs out of
    device memory on a stage runs there in halves, as in one process (StageLink.eval_forward:
    no other rank needs to know); a single row that does not fit is one line naming the rank."""
    from tqdm import tqdm

    from mlora.cli import note_unsaved_adapters, quant_config
    from mlora.evaluate import eval_line
    from mlora.memory import is_out_of_memory
    from mlora.pipeline.worker import StageLink, check_same_everywhere, fingerprint
    from mlora.session import open_session

    place = resolve_place(args)
    device = None
    with StartupError() as early:
        session = open_session(args.base_model, args.config, output_dir=args.output_dir,
                               device=place.device, dtype=args.dtype, quant=quant_config(args), load_base=False,
                               trust_remote_code=args.trust_remote_code, reads="eval", data_notes=place.rank == 0)
        device = session.device
        stages = plan_stages(args.base_model, place.world_size, args.balance)
        cfg = session.cfg
        out = Path(cfg.output_dir)
        saved = saved_adapters(cfg)
        if place.rank == 0:
            note_unsaved_adapters(out, [a.name for a in cfg.lora])
    transport = join_peers(args, place, device, early.error)
    adapters = {}
    try:
        check_same_everywhere(transport, fingerprint(session, stages, args.transport, evaluating=True))
        check_same_adapters(transport, cfg, saved)
        load_stage(session, stages[place.rank], transport, [a.name for a in cfg.lora if a.name in saved], adapters,
                   check_ranks=True)
        link = StageLink(session, transport)
        session.model.eval()
        sums = []
        try:
            with torch.no_grad():
                for a in cfg.lora:
                    # A bar on rank 0's terminal only, as one process shows it.
                    bar = tqdm(total=len(session.data[a.name].test), desc=f"eval {a.name}", unit="row",
                               disable=None if place.rank == 0 and not args.no_progress else True,
                               leave=False, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
                    try:
                        sums.append(link.test_sums(a, bar))
                    finally:
                        bar.close()
        except Exception as err:  # outside the forward that runs in halves (receiving a chunk, say)
            if not is_out_of_memory(err):
                raise
            raise UserError(f"rank {place.rank}: out of device memory evaluating the test data of its stage; lower "
                            f"test_batch_size or cutoff_len, or split the model over more stages") from None
        finally:
            session.layout.rows = []
        # The last rank's sums reach rank 0; the exchange also tells every rank all finished.
        everyone = transport.exchange(sums if link.last else None)
    finally:
        transport.close()
        for adapter in adapters.values():
            adapter.detach_from(session.wrappers)
    if place.rank == 0:
        for a, (total, count) in zip(cfg.lora, everyone[-1]):
            loss = total / count if count else float("nan")
            print(eval_line(a.name, loss, count, str(out / a.name) if a.name in saved else "base"), flush=True)
    return 0


def generate_pipeline(args) -> int:
    """`mlora generate --pipeline`: rank 0 alone reads the prompts and sends them to the others
    (shared_prompts); every rank loads its slice of the base and of each chosen
    adapter (as `mlora eval --pipeline` does, with its checks and error exchange) and keeps a
    KV cache for its own layers. The left-padded prompts go forward through the stages once;
    then at each step the last stage picks every row's next token (mlora.generate.Decoding, the
    code one process runs: greedy or sampled, the repetition penalty, the stop tokens), and an
    exchange gives every rank the tokens, so each keeps the same rows, mask and done flags and
    all stop together when every row is done; rank 0 feeds the next column and prints the
    lines one-process `mlora generate` prints (the other ranks print nothing). The lines run
    --batch_size at a time, as in one process, each batch printed as it ends. A batch that
    runs out of device memory on any rank runs again in halves, as in one process: the ranks
    agree on it at the step where it happened (StageLink.generate_forward passes the word on
    to the last stage, whose answer every rank gets in the step's exchange), so every rank
    raises the same RankOutOfMemory and generate_in_batches halves alike everywhere; rank 0
    notes it, naming the rank. A single line that does not fit is one line naming that rank
    (exit 2 there, 3 on the others). Running out where the ranks cannot agree (receiving the
    previous stage's hidden states) ends the run with one line, exit 2 there and 3 elsewhere."""
    from mlora.cli import check_saved, generate_job, note_base_sampling, print_generated, quant_config
    from mlora.generate import Decoding, NonFiniteScores, longrope_switch, stop_token_ids
    from mlora.generate_batches import RankOutOfMemory, generate_in_batches
    from mlora.lora import clear_lora_caches
    from mlora.memory import is_out_of_memory
    from mlora.models.llama import KVCache
    from mlora.pipeline import shared_prompts
    from mlora.pipeline.worker import StageLink, check_same_everywhere, digest, fingerprint
    from mlora.session import open_session

    place = resolve_place(args)
    device = None
    prompts = None
    with StartupError() as early:
        session = open_session(args.base_model, args.config, output_dir=args.output_dir, device=place.device,
                               dtype=args.dtype, quant=quant_config(args), load_base=False, reads="generate",
                               trust_remote_code=args.trust_remote_code)
        device = session.device
        if place.rank == 0:  # (alone: see shared_prompts)
            prompts = shared_prompts.read_on_rank_0(args)
            note_base_sampling(args, session.base_dir)
        stages = plan_stages(args.base_model, place.world_size, args.balance)
        cfg = session.cfg
        stop = stop_token_ids(session.base_dir, session.tokenizer)
    transport = join_peers(args, place, device, early.error)
    adapters = {}
    try:
        asked, file_rows = shared_prompts.share(transport, prompts, args)
        with failing_together(transport):  # (a prompt row refused, on every rank or by one rank's own template)
            job = generate_job(asked, session, notes=place.rank == 0, file_rows=file_rows)
            saved = {name: d for name, d in saved_adapters(cfg).items() if name in job.names}
        # The ranks must run the same rows the same way: every rank keeps the bookkeeping.
        request = {"requests": job.requests, "max_new_tokens": args.max_new_tokens, "sampling": repr(job.sampling),
                   "repetition_penalty": args.repetition_penalty, "stop": sorted(stop), "batch_size": args.batch_size,
                   "adapter_stop": {name: sorted(ids) for name, ids in sorted(job.adapter_stop.items())}}
        check_same_everywhere(transport, {**fingerprint(session, stages, args.transport),
                                          "generation request": digest(request)})
        check_same_adapters(transport, cfg, saved)
        # (the same on every rank once the digests agree)
        check_saved(job.names, Path(cfg.output_dir), [a.name for a in cfg.lora])
        load_stage(session, stages[place.rank], transport, job.names, adapters)
        link = StageLink(session, transport)
        session.model.eval()

        def run_batch(lines: range) -> None:
            requests, request_ids = job.requests_of(lines)
            state = Decoding(requests, session.pad_id, stop, job.sampling, args.repetition_penalty,
                             longrope_switch(session.model.args), request_ids, job.adapter_stop)
            try:
                with torch.no_grad():
                    session.layout.rows = state.rows
                    cache = KVCache()
                    x = state.ids  # [B, T]: the prompts first, then one column a step (or all again: LongRoPE)
                    for step in range(args.max_new_tokens):
                        # The last stage's choice (or the rank that ran out of memory) reaches
                        # every rank, which keeps the same rows (or gives the batch up with the others).
                        answer = transport.exchange(link.generate_forward(x, state.mask, cache, step, state.pick))[-1]
                        if "ran_out" in answer:
                            raise RankOutOfMemory(answer["ran_out"], here=answer["ran_out"] == place.rank)
                        state.record(answer["tokens"])
                        if state.finished(step, args.max_new_tokens):
                            break
                        column, rerun = state.advance()
                        if rerun:  # a row grew past LongRoPE's switch: every stage runs all again
                            cache = KVCache()
                        x = state.fed if rerun else column
            except NonFiniteScores as err:  # (the last rank's: named as one process names it)
                raise job.named(err) from None
            except RankOutOfMemory:
                clear_lora_caches(session.wrappers)  # a rerun in halves must not keep this attempt's inputs
                raise
            except Exception as err:  # where the ranks cannot agree on it (see generate_forward): the end
                if not is_out_of_memory(err):
                    raise
                raise UserError(f"rank {place.rank}: out of device memory generating on its stage; give a smaller "
                                f"--batch_size or fewer --max_new_tokens, or split the model over more "
                                f"stages") from None
            finally:
                session.layout.rows = []
            if place.rank == 0:
                print_generated(args, session, job, state.result(), lines)

        generate_in_batches(len(job.rows), args.batch_size, run_batch,
                            progress=place.rank == 0 and not args.no_progress, notes=place.rank == 0)
    finally:
        transport.close()
        for adapter in adapters.values():
            adapter.detach_from(session.wrappers)
    return 0
