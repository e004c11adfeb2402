"""The `mlora` command: train | eval | generate | demo. Thin: parse, then call.

A UserError becomes one line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from mlora.errors import PipelineError, UserError
from mlora.plural import counted


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base_model", required=True,
                   help="directory of the frozen base (config.json, tokenizer, *.safetensors)")
    p.add_argument("--config", required=True, help="the JSON training config")
    p.add_argument("--output_dir", help="overrides the config's output_dir")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", help="base dtype: fp32, bf16 or fp16 (default: bf16 on CUDA of compute capability 8.0+, "
                   "fp16 on older GPUs, fp32 on CPU)")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="run the tokenizer code that --base_model ships (ChatGLM's and Baichuan's tokenizers "
                        "need it; mlora runs its own model code, never the checkpoint's)")
    q = p.add_argument_group("quantized base (QLoRA, through bitsandbytes)")
    q.add_argument("--load_4bit", action="store_true", help="4-bit base projections")
    q.add_argument("--load_8bit", action="store_true", help="8-bit base projections")
    q.add_argument("--quant_type", choices=["nf4", "fp4"], help="4-bit data type (default nf4)")
    q.add_argument("--double_quant", action="store_true", help="4-bit: quantize the scales too")
    q.add_argument("--compute_dtype", help="4-bit matmul dtype: fp32, bf16 or fp16 (default: --dtype)")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _checked(parse, ok, what: str):
    """An argparse type: `parse` the text, then require ok(value) ("must be {what}")."""
    def convert(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return convert


_port = _checked(_int, lambda v: 1 <= v <= 65535, "a TCP port (1..65535)")
_seed = _checked(_int, lambda v: 0 <= v < 2**63, "a seed in 0..2**63-1")
_positive_int = _checked(_int, lambda v: v >= 1, "at least 1")
_non_negative_float = _checked(_float, lambda v: v >= 0, ">= 0")
_probability = _checked(_float, lambda v: 0 < v <= 1, "in (0, 1]")
_non_negative_int = _checked(_int, lambda v: v >= 0, ">= 0")
_penalty = _checked(_float, lambda v: v > 0, "more than 0")
_positive_seconds = _checked(_float, lambda v: v > 0, "more than 0 seconds")


def _add_pipeline(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline parallelism (one process per stage)")
    g.add_argument("--pipeline", action="store_true", help="run as one rank of a pipeline")
    g.add_argument("--rank", type=int, help="this process's rank (default: torchrun's RANK)")
    g.add_argument("--balance", type=int, nargs="+", metavar="N",
                   help="modules per rank: embedding, decoder layers, norm, head (or decoder layers only)")
    g.add_argument("--world_size", type=int, help="number of ranks when --balance is not given")
    g.add_argument("--transport", choices=["torch", "zmq"], default="torch",
                   help="torch.distributed point-to-point (default) or ZeroMQ")
    g.add_argument("--master_addr", help="rendezvous host (default: MASTER_ADDR or 127.0.0.1)")
    g.add_argument("--master_port", type=_port, help="rendezvous port (default: MASTER_PORT or 29500)")
    g.add_argument("--peer_timeout", type=_positive_seconds, default=30.0,
                   help="seconds without a sign of life before a rank counts as lost (default 30)")
    g.add_argument("--connect_timeout", type=_positive_seconds, default=300.0,
                   help="seconds to wait for every rank to join (default 300)")


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a missing or mistyped flag, a port out of range) end in one line
    and exit code 2, as every other bad input does: argparse printed its whole usage first, a
    dozen lines of flags above the line that names the culprit; the line points to --help instead.
    The commands' parsers are _CommandParser."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _CommandParser(_Parser):
    """A command's parser: it refuses the flags it does not know itself, so that the line points
    to `mlora <command> --help`, which lists them (argparse hands them up to the top parser,
    whose --help lists only the commands)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mlora", description="Fine-tune many LoRA adapters at once on one frozen base model.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    p = sub.add_parser("train", help="train every adapter of a config in fused batches")
    _add_common(p)
    p.add_argument("--seed", type=_seed, help="overrides the config's seed")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in output_dir (exactly where it stopped)")
    start.add_argument("--overwrite", action="store_true",
                       help="start afresh in an output_dir that holds an unfinished run, deleting its checkpoints "
                            "(and, as any fresh start, each adapter's best and checkpoint-<step> directories) "
                            "(without it, such a start is refused: --resume may have been forgotten)")
    p.add_argument("--dry_run", action="store_true",
                   help="check everything and tell what the run would do, in seconds: each adapter's rows, "
                        "tokens and steps, the fused batches, their padding, the token budget and the estimated "
                        "peak memory; reads config.json, the tokenizer, the data and init_from adapters, not the "
                        "base's weights, and writes nothing (the plan on stderr, one JSON line on stdout; not with "
                        "--resume). With --pipeline: each stage's modules and estimated peak against its GPU, every "
                        "stage (stage s on cuda:s) or, with --rank, that rank's alone; it joins no rank")
    _add_pipeline(p)

    p = sub.add_parser("eval", help="evaluate every adapter of a config; one JSON line per adapter")
    _add_common(p)
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    _add_pipeline(p)

    p = sub.add_parser("generate", help="complete prompts with every trained adapter of a config, in fused batches")
    _add_common(p)
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt (repeat for several); every adapter completes every prompt")
    p.add_argument("--prompt_file", help="a data file (JSON, JSONL or Parquet, rows of any shape but text): each "
                                         "row's prompt, rendered as training rendered it, after the --prompt ones; "
                                         "its lines also give the row's expected answer as \"reference\"; a row "
                                         "with an \"adapter\" key is completed by that adapter only")
    p.add_argument("--format", choices=["alpaca", "chat", "text"], default="alpaca",
                   help="how a prompt is rendered, as training rendered rows: alpaca (the adapter's "
                        "prompt template; default), chat (a user turn, through the adapter's chat_template, else the "
                        "tokenizer's chat template), text (as is)")
    p.add_argument("--adapters", help="comma-separated adapter names (default: every adapter of the config)")
    p.add_argument("--base", action="store_true", help="also complete each prompt with the bare base model")
    p.add_argument("--max_new_tokens", type=_positive_int, default=64, help="tokens to add at most (default 64)")
    p.add_argument("--temperature", type=_non_negative_float, default=None,
                   help="0 (default): greedy; above 0: sample from softmax(logits / temperature)")
    p.add_argument("--top_p", type=_probability,
                   help="when sampling: only from the most likely tokens that make up this probability (default 1)")
    p.add_argument("--top_k", type=_non_negative_int,
                   help="when sampling: only from the k most likely tokens (default 0: all)")
    p.add_argument("--repetition_penalty", type=_penalty, default=1.0,
                   help="above 1: the tokens a row has seen (its prompt and output) get less likely, greedy or "
                        "sampled (a positive logit divided by it, a negative one multiplied; default 1: off)")
    p.add_argument("--seed", type=_seed, help="when sampling: the draws' seed (default 0)")
    p.add_argument("--batch_size", type=_positive_int, default=16,
                   help="output lines generated together in one fused batch (default 16); a line is one prompt "
                        "through one adapter: one row of the batch, two with --base. Lines print in order as "
                        "each batch ends; a batch that runs out of device memory runs again in halves")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    _add_pipeline(p)

    p = sub.add_parser("demo", help="train 3 adapters on 3 toy tasks on the embedded SmolLM2-135M-Instruct")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--output_dir", help="where the demo writes (default: a temporary directory)")
    p.add_argument("--short", action="store_true", help="a few steps only (used by CI)")
    return parser


def quant_config(args):
    """The QuantConfig the flags ask for, or None for a full-precision base."""
    if args.load_4bit and args.load_8bit:
        raise UserError("--load_4bit and --load_8bit exclude each other")
    if not args.load_4bit and (args.quant_type or args.double_quant or args.compute_dtype):
        raise UserError("--quant_type, --double_quant and --compute_dtype apply to --load_4bit only")
    if not (args.load_4bit or args.load_8bit):
        return None
    from mlora.device import resolve_device, resolve_dtype
    from mlora.quant import QuantConfig

    compute = None
    if args.compute_dtype:
        compute = resolve_dtype(resolve_device(args.device), args.compute_dtype)
    if args.load_8bit:
        return QuantConfig(bits=8)
    return QuantConfig(bits=4, quant_type=args.quant_type or "nf4", double_quant=args.double_quant,
                       compute_dtype=compute)


def cmd_train(args) -> int:
    if args.dry_run:
        from mlora.dry_run import dry_run

        return dry_run(args)
    if args.pipeline:
        from mlora.pipeline.run import train_pipeline

        return train_pipeline(args)
    from mlora import checkpoint
    from mlora.batching import check_trainable
    from mlora.output_lock import output_dir_lock
    from mlora.session import open_session
    from mlora.strategies import unused_budget_note
    from mlora.trainer import Interrupted, train

    session = open_session(args.base_model, args.config, output_dir=args.output_dir, device=args.device,
                           dtype=args.dtype, seed=args.seed, quant=quant_config(args),
                           trust_remote_code=args.trust_remote_code, load_base=False)
    out = session.cfg.output_dir
    for a in session.cfg.lora:  # before the output directory is touched (the trainer checks too)
        check_trainable(session.data[a.name].train, a, session.cfg.cutoff_len)
    if args.resume:
        if checkpoint.is_finished(out):
            print(f"mlora: nothing to resume: the run in {out} already finished")
            return 0
        if not checkpoint.list_checkpoints(out):
            raise UserError(f"nothing to resume: no checkpoint in {checkpoint.checkpoint_root(out)}"
                            f"{checkpoint.other_kind_note(checkpoint.checkpoint_tags(out), pipeline=False)}")
    # (once it is sure to train: a --resume of a finished run trains nothing, and one with
    # nothing to resume is refused)
    if note := unused_budget_note(session.cfg.train_strategy, session.cfg.max_tokens_per_batch):
        print(note, file=sys.stderr)
    # before the (long) load: a bad output_dir fails at once
    created = prepare_output_dir(out, [a.name for a in session.cfg.lora], written_dirs(session))
    with output_dir_lock(out):
        # (under the lock: a run still writing there is the lock's one line, not this one)
        if not (args.resume or args.overwrite) and (newest := checkpoint.unfinished_run(out)) is not None:
            raise checkpoint.refuse_to_clear(newest, pipeline=False)
        try:
            session.load_base()
        except BaseException:  # weights that do not fit config.json, or Ctrl-C: leave nothing behind
            remove_if_still_empty(created)
            raise
        try:
            summary = train(session, progress=not args.no_progress, resume=args.resume)
        except UserError:  # refused before writing (an init_from that does not fit, ...): nothing left behind
            remove_if_still_empty(created)
            raise
        except Interrupted as stop:
            print(f"mlora: stopped by {signal_name(stop.signum)}; checkpoint written to {stop.path}\n"
                  f"mlora: resume with: {resume_command(args, out)}", file=sys.stderr)
            return 128 + stop.signum
    for a in session.cfg.lora:
        s = summary[a.name]
        loss = "n/a" if s["loss"] is None else f"{s['loss']:.4f}"
        extra = (" (stopped after a non-finite loss or gradient)" if s["stopped"]
                 else early_stop_note(s["early_stopped"]))
        best = best_note(s["best"], s["output"]) if a.save_best else ""
        print(f"{a.name}: {counted(s['steps'], 'step')}, last loss {loss}, saved to {s['output']}{best}{extra}")
    return 0


def early_stop_note(step: int | None) -> str:
    """What an adapter's last line adds when early stopping took it out after `step`."""
    return "" if step is None else f" (stopped early after step {step}: its eval loss stopped improving)"


def best_note(best: tuple[float, int] | None, output: str) -> str:
    """What an adapter's last line adds under save_best: its best (eval loss, step), and where."""
    from mlora.adapter import BEST_DIR

    if best is None:
        return ", no finite eval loss (no best saved)"
    return f", best eval loss {best[0]:.4f} at step {best[1]} saved to {os.path.join(output, BEST_DIR)}"


def resume_command(args, out: str) -> str:
    """The command that resumes this run, to paste into a shell: every flag the run depends on
    (--trust_remote_code too: without it the tokenizer of a ChatGLM or Baichuan base will not
    load), each argument quoted (a path with a space stays one argument)."""
    argv = ["mlora", "train", "--base_model", args.base_model, "--config", args.config, "--output_dir", out]
    for flag in ("device", "dtype", "seed", "quant_type", "compute_dtype"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    for flag in ("load_4bit", "load_8bit", "double_quant", "trust_remote_code", "no_progress"):
        if getattr(args, flag):
            argv.append(f"--{flag}")
    return shlex.join([*argv, "--resume"])


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def cmd_eval(args) -> int:
    if args.pipeline:  # each rank holds a slice of the base; rank 0 prints the lines
        from mlora.pipeline.run import eval_pipeline

        return eval_pipeline(args)
    from mlora.adapter import Adapter, check_rank, has_saved_weights
    from mlora.evaluate import eval_line, evaluate_adapter
    from mlora.session import open_session

    session = open_session(args.base_model, args.config, output_dir=args.output_dir, device=args.device,
                           dtype=args.dtype, quant=quant_config(args), trust_remote_code=args.trust_remote_code,
                           reads="eval")
    for cfg in session.cfg.lora:
        # An adapter that training refuses, refused here too (before any line is printed): even
        # with nothing saved, whose line would be the base's, for a config that can never train.
        check_rank(cfg, session.wrappers)
    out = Path(session.cfg.output_dir)
    if out.exists() and not out.is_dir():  # (each adapter was evaluated as the bare base, exit 0)
        raise UserError(f"output_dir {out} is not a directory (eval reads the adapters saved in it)")
    note_unsaved_adapters(out, [a.name for a in session.cfg.lora])
    # Every saved adapter is loaded (and so checked: its r, alpha, tensors) before the first
    # line is printed: a later adapter's mismatch used to end the command with exit 2 after
    # the earlier adapters' lines, a partial result. Each row goes to its own adapter only.
    adapters = {}
    try:
        for cfg in session.cfg.lora:
            if has_saved_weights(out / cfg.name):
                adapters[cfg.name] = Adapter(replace(cfg, init_from=None), session.wrappers, session.cfg.seed,
                                             session.device, naming=session.naming)
                adapters[cfg.name].load_peft(out / cfg.name, label="adapter")
        for cfg in session.cfg.lora:
            loss, tokens = evaluate_adapter(session, cfg.name, session.data[cfg.name].test,
                                            progress=not args.no_progress)
            print(eval_line(cfg.name, loss, tokens, str(out / cfg.name) if cfg.name in adapters else "base"),
                  flush=True)
    finally:
        for adapter in adapters.values():
            adapter.detach_from(session.wrappers)
    return 0


def note_unsaved_adapters(out: Path, names: list[str]) -> None:
    """eval evaluates an adapter with nothing saved on the bare base (its line says "weights":
    "base"); a note says so up front: of the whole output_dir when it is missing (likely a
    typo), else of each such adapter, naming the adapters saved there that the config does
    not (one renamed since it was trained is no longer evaluated with its weights)."""
    from mlora.adapter import has_saved_weights

    if not out.exists():
        print(f"mlora: note: output_dir {out} does not exist: every adapter is evaluated on the bare base",
              file=sys.stderr)
        return
    unsaved = [name for name in names if not has_saved_weights(out / name)]
    if unsaved:
        which = (f"adapter {unsaved[0]!r} has" if len(unsaved) == 1
                 else f"adapters {', '.join(map(repr, unsaved))} have")
        print(f"mlora: note: {which} nothing saved in {out}: evaluated on the bare base{saved_elsewhere(out, names)}",
              file=sys.stderr)


def saved_elsewhere(out: Path, names: Iterable[str]) -> str:
    """The end of a line naming the adapters saved in `out` that the config (`names`) does not
    name, renamed or removed since they were trained, or saying that `out` is itself one
    adapter's directory (--output_dir out/a for out: the line said only that nothing was saved
    in it); "" when there are none."""
    from mlora.adapter import has_saved_weights

    if has_saved_weights(out):
        return (f"; {out} is itself a saved adapter's directory: --output_dir takes the one holding the adapters' "
                f"directories ({out.parent}?)")
    named = set(names)
    try:
        others = sorted(d.name for d in out.iterdir() if d.name not in named and has_saved_weights(d))
    except OSError:  # (an unreadable output_dir: the line goes without it)
        return ""
    if not others:
        return ""
    return f"; {out} holds saved adapters the config does not name: {', '.join(map(repr, others))} (renamed?)"


def cmd_generate(args) -> int:
    """Each prompt through each chosen adapter (and with --base the bare base), --batch_size
    lines in one fused batch: one JSON line per (prompt, adapter), in the order given, printed
    as each batch ends."""
    from mlora.adapter import Adapter
    from mlora.generate import NonFiniteScores, greedy_generate
    from mlora.generate_batches import generate_in_batches
    from mlora.lora import clear_lora_caches
    from mlora.session import open_session

    check_sampling_flags(args)
    if args.pipeline:  # each rank holds a slice of the base and keeps its own KV cache; rank 0 prints
        from mlora.pipeline.run import generate_pipeline

        return generate_pipeline(args)
    session = open_session(args.base_model, args.config, output_dir=args.output_dir, device=args.device,
                           dtype=args.dtype, quant=quant_config(args), trust_remote_code=args.trust_remote_code,
                           load_base=False, reads="generate")
    job = generate_job(args, session)
    note_base_sampling(args, session.base_dir)
    out = Path(session.cfg.output_dir)
    check_saved(job.names, out, [a.name for a in session.cfg.lora])
    session.load_base()
    by_name = {a.name: a for a in session.cfg.lora}
    for name in job.names:
        adapter = Adapter(replace(by_name[name], init_from=None), session.wrappers, session.cfg.seed, session.device,
                          naming=session.naming)
        adapter.load_peft(out / name, label="adapter")

    def run_batch(lines: range) -> None:
        requests, request_ids = job.requests_of(lines)
        try:
            outputs = greedy_generate(session, requests, max_new_tokens=args.max_new_tokens, sampling=job.sampling,
                                      repetition_penalty=args.repetition_penalty, request_ids=request_ids,
                                      adapter_stop=job.adapter_stop)
        except NonFiniteScores as err:
            raise job.named(err) from None
        except BaseException:
            clear_lora_caches(session.wrappers)  # a retry in halves must not keep this attempt's inputs
            raise
        print_generated(args, session, job, outputs, lines)

    generate_in_batches(len(job.rows), args.batch_size, run_batch, progress=not args.no_progress)
    return 0


def check_sampling_flags(args) -> None:
    given = [f"--{flag}" for flag in ("top_p", "top_k", "seed") if getattr(args, flag) is not None]
    if given and not args.temperature:  # greedy would ignore them without a word
        raise UserError(f"{', '.join(given)}: these apply when sampling (--temperature above 0); without it "
                        "generation is greedy")


def note_base_sampling(args, base_dir: Path) -> None:
    """Without --temperature, a note when the base's generation_config.json samples: transformers'
    generate would take its settings as defaults, mlora stays greedy (deterministic) unless told."""
    from mlora.generate import base_sampling

    settings = base_sampling(base_dir) if args.temperature is None else None
    if settings is not None:
        flags = " ".join(f"--{key} {value}" for key, value in settings.items())
        print(f"mlora: note: the base's {base_dir / 'generation_config.json'} samples by default, which transformers' "
              f"generate follows; mlora generates greedily unless given --temperature (to sample as it would: "
              f"{flags})", file=sys.stderr)


@dataclass
class GenerateJob:
    names: list[str]  # the chosen adapters
    rows: list[tuple[str, str, list[int], str | None]]  # (adapter, prompt, prompt token ids, reference)
    requests: list[tuple[str | None, list[int]]]  # greedy_generate's prompts (the bare base's after --base)
    sampling: object  # mlora.generate.Sampling, or None: greedy
    base: bool  # --base: each line's prompt runs through the bare base too
    adapter_stop: dict[str, set[int]]  # the tokens that also end an adapter's rows (adapter_stop_ids)

    def requests_of(self, lines: range) -> tuple[list[tuple[str | None, list[int]]], list[int]]:
        """The requests of the lines `lines` (one batch), with their numbers in `requests`: each
        line's row, then with --base each line's bare base row (print_generated's order)."""
        numbers = list(lines) + ([len(self.rows) + i for i in lines] if self.base else [])
        return [self.requests[i] for i in numbers], numbers

    def named(self, err):
        """A NonFiniteScores `err` named by its output line (from 1) and that line's prompt, as a
        user knows it, instead of its number in the request."""
        from mlora.generate import NonFiniteScores

        line = err.request_id % len(self.rows)  # (--base: the bare base's requests follow the lines')
        prompt = self.rows[line][1]
        where = f"output line {line + 1} (prompt {prompt[:40] + '...' if len(prompt) > 40 else prompt!r})"
        return NonFiniteScores(err.request_id, err.name, err.token, where)


def templates_of(adapter) -> tuple[str, str | None]:
    """What renders an adapter's prompts: its prompt template and its chat template (None: the tokenizer's)."""
    return adapter.prompt, adapter.chat_template


def generate_job(args, session, notes: bool = True, file_rows=None) -> GenerateJob:
    """What `mlora generate` runs, from its flags (one process and --pipeline alike): the
    chosen adapters, every prompt rendered as its adapter was trained, and the sampling.
    notes=False leaves out the note of lines past the model's positions (a pipeline's ranks
    but rank 0). file_rows: --prompt_file's rows, read already (by a pipeline's rank 0)."""
    from mlora.chat_template import with_chat_template
    from mlora.data import Rows, load_rows, load_template, null_keys_error, prompt_tokens, row_place, row_prompt
    from mlora.generate import Sampling, adapter_stop_ids
    from mlora.loader import read_model_config

    by_name = {a.name: a for a in session.cfg.lora}
    names = chosen_adapters(args.adapters, list(by_name), args.config)
    if not args.prompt and not args.prompt_file:
        raise UserError("nothing to complete: give --prompt TEXT (repeat for several) or --prompt_file FILE")
    if file_rows is None:
        file_rows = load_rows(args.prompt_file) if args.prompt_file else Rows()
    row_adapters = rows_own_adapters(args, file_rows, names, list(by_name))
    model_args = read_model_config(session.base_dir)[1]
    vocab = model_args.vocab_size

    def check_vocab(ids: list[int], what: str) -> None:  # an id past the embedding would be an index error mid-run
        if ids and max(ids) >= vocab:
            raise UserError(f"{what} tokenizes to id {max(ids)}, outside the model's vocab_size {vocab} "
                            f"(is the tokenizer in {session.base_dir} the model's?)")

    def rendered(spec: tuple[str, str | None],
                 completers: set[str]) -> list[tuple[str, list[int], str | None] | None]:
        """Every prompt that one of `completers` completes, through the templates `spec` they share
        (the prompt template and the chat template, None: the tokenizer's; they render it once);
        None in the place of a file row that names another adapter: these templates never render
        it, and a row they could not render (one they render empty) must not end the command."""
        template = load_template(spec[0])
        tokenizer = with_chat_template(session.tokenizer, spec[1], sorted(completers))
        out = []
        for text in args.prompt:
            ids = prompt_tokens(text, args.format, tokenizer, template)
            check_vocab(ids, f"--prompt {text!r}")
            out.append((text, ids, None))
        for i, row in enumerate(file_rows):  # (load_rows gives objects only)
            if row_adapters[i] is not None and row_adapters[i] not in completers:
                out.append(None)
                continue
            where = f"--prompt_file {row_place(args.prompt_file, i, file_rows.lines)}"
            if i in file_rows.nulls and (said := null_keys_error(row, file_rows.nulls[i], answered=False)):
                raise UserError(f"{where}: {said}")
            try:
                asked = row_prompt(row, tokenizer, template)  # (one that renders empty is refused)
            except UserError as err:
                raise UserError(f"{where}: {err}") from None
            check_vocab(asked.ids, f"{where}: its prompt")
            out.append((asked.shown, asked.ids, asked.reference))
        return out

    by_template: dict[tuple[str, str | None], list[tuple[str, list[int], str | None] | None]] = {}
    rows = []  # (adapter, prompt, prompt token ids, reference), every prompt rendered as its adapter was trained
    # (the --prompt ones first, then the file's; a file row naming its adapter completes through that one only)
    owners = [None] * len(args.prompt) + row_adapters
    wanted = set(owners)  # (None: a line every chosen adapter completes)
    names = [name for name in names if None in wanted or name in wanted]
    for name in names:
        spec = templates_of(by_name[name])
        if spec not in by_template:
            by_template[spec] = rendered(spec, {n for n in names if templates_of(by_name[n]) == spec})
        rows += [(name, *prompt) for prompt, owner in zip(by_template[spec], owners) if owner in (None, name)]
    requests = [(name, ids) for name, _, ids, _ in rows] + ([(None, ids) for _, _, ids, _ in rows] if args.base else [])
    sampling = (Sampling(args.temperature, 1.0 if args.top_p is None else args.top_p, args.seed or 0,
                         top_k=args.top_k or 0) if args.temperature else None)
    if notes:
        note_past_positions(rows, args.max_new_tokens, model_args.max_position_embeddings)
    return GenerateJob(names, rows, requests, sampling, args.base, adapter_stop_ids(session, names))


def rows_own_adapters(args, file_rows, names: list[str], configured: list[str]) -> list[str | None]:
    """Each --prompt_file row's own adapter (its "adapter" key), None for a row without one (every
    chosen adapter, `names`, completes it). A name that is not one of the config's adapters
    (`configured`), or not among --adapters when given, is refused before any model loads."""
    import json

    from mlora.data import ADAPTER_KEY, row_place

    owners = []
    for i, row in enumerate(file_rows):
        owner = row.get(ADAPTER_KEY)
        if owner is not None:
            where = f"--prompt_file {row_place(args.prompt_file, i, file_rows.lines)}"
            if not isinstance(owner, str):
                raise UserError(f"{where}: its \"adapter\" is {json.dumps(owner, default=str)}, "
                                "not the name of an adapter")
            if owner not in configured:
                raise UserError(f"{where}: its adapter {owner!r} is not an adapter of {args.config} (its adapters: "
                                f"{', '.join(configured)})")
            if owner not in names:
                raise UserError(f"{where}: its adapter {owner!r} is not among --adapters {args.adapters}")
        owners.append(owner)
    return owners


def chosen_adapters(flag: str | None, configured: list[str], config: str) -> list[str]:
    """The adapters `--adapters` (`flag`: comma-separated names) chooses among the config's
    (`configured`), in its order; all of them without the flag. A name given twice is refused:
    it was dropped without a word, and whether its adapter should run twice was a guess."""
    if flag is None:
        return configured
    names = [n.strip() for n in flag.split(",") if n.strip()]
    unknown = [n for n in names if n not in configured]
    if unknown or not names:
        raise UserError(f"--adapters: {unknown[0] if unknown else flag!r} is not an adapter of "
                        f"{config} (its adapters: {', '.join(configured)})")
    repeated = next((n for i, n in enumerate(names) if n in names[:i]), None)  # (the first named again)
    if repeated is not None:
        raise UserError(f"--adapters: {repeated!r} is named twice (each chosen adapter completes every prompt once)")
    return names


def note_past_positions(rows: list[tuple[str, str, list[int], str | None]], max_new_tokens: int,
                        positions: int) -> None:
    """A note on stderr when lines may run past the model's max_position_embeddings: they run
    on (as in transformers' generate, which warns so too), at positions the model may never
    have seen. rows: GenerateJob.rows."""
    lengths = [len(ids) for _, _, ids, _ in rows]
    past = [i for i, n in enumerate(lengths) if n + max_new_tokens > positions]
    if not past:
        return
    longest = max(past, key=lambda i: lengths[i])
    print(f"mlora: note: {len(past)} of {counted(len(rows), 'line')} may run past the model's max_position_embeddings "
          f"({positions}) with --max_new_tokens {max_new_tokens} (the longest prompt, of output line {longest + 1}, "
          f"is {counted(lengths[longest], 'token')}); {'it runs' if len(past) == 1 else 'they run'} on, but the "
          f"model may not do well there", file=sys.stderr)


def check_saved(names: Iterable[str], out: Path, configured: list[str]) -> None:
    """generate's chosen adapters (`names`) each have weights saved in `out`; the adapters of the
    config are `configured`."""
    from mlora.adapter import has_saved_weights

    for name in names:
        if not has_saved_weights(out / name):
            elsewhere = saved_elsewhere(out, configured) if out.is_dir() else ""
            raise UserError(f"adapter {name!r}: nothing saved in {out / name} (train it first, or point "
                            f"--output_dir at where it was saved){elsewhere}")


def print_generated(args, session, job: GenerateJob, outputs: list[list[int]], lines: range) -> None:
    """One JSON line per (prompt, adapter) of `lines`, in the order given; with --base the base's
    output beside. outputs: the new tokens of job.requests_of(lines)."""
    from tqdm import tqdm

    from mlora.json_line import json_line

    decode = session.tokenizer.decode
    printed = []
    for k, i in enumerate(lines):
        name, text, _, reference = job.rows[i]
        line = {"adapter": name, "prompt": text, "output": decode(outputs[k], skip_special_tokens=True)}
        if reference is not None:  # (a --prompt_file row's expected answer)
            line["reference"] = reference
        if args.base:
            line["base_output"] = decode(outputs[len(lines) + k], skip_special_tokens=True)
        printed.append(json_line(line))
    # On a terminal the progress bar (stderr) stands where the lines go: cleared before them
    # (they were glued after it) and drawn again below them. stdout itself gets the lines only,
    # the batch's in one write: Ctrl-C (handled between Python's steps) cannot stop it between
    # two of its lines, nor between a line and its newline (print writes them apart).
    with tqdm.external_write_mode(file=sys.stdout):
        sys.stdout.write("".join(f"{line}\n" for line in printed))
        sys.stdout.flush()


def cmd_demo(args) -> int:
    from mlora.demo import run_demo

    return run_demo(device=args.device, output_dir=args.output_dir, short=args.short)


def written_dirs(session) -> list[tuple[str, str]]:
    """The directories a training run writes inside its adapters' own, for `prepare_output_dir`:
    save_best's <name>/best, and the checkpoint-<step> of steps it will save that are there already."""
    from mlora.batching import total_steps
    from mlora.adapter import BEST_DIR, checkpoint_dir_step

    out, save_step = Path(session.cfg.output_dir), session.cfg.save_step
    dirs = []
    for a in session.cfg.lora:
        if a.save_best:
            dirs.append((f"{a.name}/{BEST_DIR}", f"the best weights of {a.name!r} (save_best)"))
        if save_step and (out / a.name).is_dir():
            last = total_steps(len(session.data[a.name].train), a)
            for entry in sorted((out / a.name).iterdir()):
                step = checkpoint_dir_step(entry.name)
                if step is not None and step % save_step == 0 and step <= last:
                    dirs.append((f"{a.name}/{entry.name}", f"a save_step checkpoint of {a.name!r}"))
    return dirs


def prepare_output_dir(path: str, adapters: Iterable[str] = (), dirs: Iterable[tuple[str, str]] = ()) -> list[Path]:
    """Create the output directory, or fail with one line before any training starts; so too
    when something of another kind sits where mlora will write (`adapters`: their names; `dirs`:
    (path inside output_dir, what) of further directories, `written_dirs`), which used to fail
    only when the run saved there, its training lost with a traceback. Returns the directories
    it created, deepest first (for `remove_if_still_empty`)."""
    p = check_output_dir(path, adapters, dirs)
    try:
        created = [d for d in (p, *p.parents) if not d.exists()]
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"output_dir {p}: cannot create it ({err.strerror})") from None
    except ValueError as err:  # a NUL, or half a surrogate pair from a JSON escape: no file system names it
        raise _invalid_path(p, err) from None
    if not os.access(p, os.W_OK):
        raise UserError(f"output_dir {p} is not writable")
    return created


def _invalid_path(p: Path, err: ValueError) -> UserError:
    return UserError(f"output_dir {str(p)!r} is not a valid path ({err})")


def check_creatable(path: str) -> None:
    """What `prepare_output_dir` would find creating the output directory, found without
    creating it (for `mlora train --dry_run`): the same lines, the reasons as the OS gives them."""
    p = Path(path)
    try:
        os.lstat(p)
    except ValueError as err:
        raise _invalid_path(p, err) from None
    except OSError:
        pass
    if p.is_dir():
        if not os.access(p, os.W_OK):
            raise UserError(f"output_dir {p} is not writable")
        return
    existing = next(d for d in p.absolute().parents if os.path.lexists(d))  # (the root exists)
    if not existing.is_dir():
        raise UserError(f"output_dir {p}: cannot create it ({os.strerror(errno.ENOTDIR)})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {p}: cannot create it ({os.strerror(errno.EACCES)})")


def check_output_dir(path: str, adapters: Iterable[str] = (), dirs: Iterable[tuple[str, str]] = ()) -> Path:
    """`prepare_output_dir`'s refusals of what is there already (see it), which need nothing
    written: `mlora train --dry_run` runs them too."""
    from mlora.adapter import CONFIG_NAME, WEIGHTS_NAME, is_checkpoint_dir, not_checkpoint_files
    from mlora.checkpoint import DIRNAME

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"output_dir {p} exists and is not a directory")
    if os.path.lexists(p) and not p.exists():  # (mkdir said "File exists")
        raise UserError(f"output_dir {p} is a symbolic link to nothing; remove it or choose another output_dir")
    if p.is_dir():
        places = [(p / "metrics.jsonl", False, "its metrics log"), (p / DIRNAME, True, "its resumable checkpoints")]
        for name in adapters:
            places += [(p / name, True, f"adapter {name!r}"),
                       (p / name / WEIGHTS_NAME, False, f"the weights of {name!r}"),
                       (p / name / CONFIG_NAME, False, f"the PEFT config of {name!r}")]
        places += [(p / inside, True, what) for inside, what in dirs]
        for place, is_dir, what in places:
            wanted = "a directory" if is_dir else "a file"
            # (a link to nothing, or a FIFO, passed exists() or is_dir(): mlora then failed writing there)
            found = (None if not os.path.lexists(place) else "a symbolic link to nothing" if not place.exists()
                     else "a directory" if place.is_dir() else "a file" if place.is_file()
                     else "neither a file nor a directory")
            if found not in (None, wanted):
                raise UserError(f"output_dir {p}: {place} is {found}, but mlora writes {what} there ({wanted}); "
                                f"move it away or choose another output_dir")
        for inside, what in dirs:
            # Replaced whole when saved (atomic.write_dir_atomically): only one mlora wrote, or an
            # empty one (a link to a directory made rmtree fail mid-run, a traceback)
            place = p / inside
            if place.is_dir() and not is_checkpoint_dir(place):
                held = ("is a symbolic link" if place.is_symlink() else
                        f"holds files mlora did not write ({', '.join(not_checkpoint_files(place)[:3])})")
                raise UserError(f"output_dir {p}: {place} {held}, but mlora replaces it with {what}; move it away "
                                "or choose another output_dir")
    return p


def remove_if_still_empty(created: list[Path]) -> None:
    """Undo `prepare_output_dir` after a start that failed before writing anything."""
    for d in created:
        try:
            d.rmdir()  # only an empty directory; stop at the first that is not
        except FileNotFoundError:  # (pipeline ranks sharing a host undo the same directories)
            continue
        except OSError:
            return


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
    except UserError as err:
        code = _fail(f"mlora: error: {err}", 2)
    except PipelineError as err:
        code = _fail(f"mlora: pipeline error: {err}", 3)
    except KeyboardInterrupt:
        code = _fail("mlora: interrupted", 130)
    except BrokenPipeError:
        # The reader of our output left (`mlora eval ... | head -1`): stop quietly, as Unix
        # tools do, and keep Python's exit-time flush of stdout from failing again.
        _silence(sys.stdout)
        return 141  # 128 + SIGPIPE
    except OSError as err:  # (after BrokenPipeError, an OSError too)
        if err.errno == errno.ENAMETOOLONG:
            # A path of the config or the flags with a name longer than the file system takes:
            # pathlib's exists() and is_dir() raise it wherever such a path is first looked at.
            code = _fail(f"mlora: error: {err.filename}: {err.strerror} (a file system takes names of at most "
                         "255 bytes)", 2)
        elif err.errno not in _DISK_ERRORS:
            raise
        else:
            # A full disk or quota mid-run: outputs are written whole or not at all (atomic.py), so
            # the last checkpoint is intact and the run resumes from it; the traceback said nothing more.
            where = f"{err.filename}: " if err.filename else ""
            code = _fail(f"mlora: error: {where}{err.strerror}; free space, then run again (a train run continues "
                         "from its last checkpoint with --resume)", 2)
    # Flushed here, not at exit: a reader that left then costs the exit code nothing (Python's
    # failing exit-time flush would make it 120).
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence(sys.stdout)
        return code or 141
    return code


_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # the disk, not mlora: one line


def _fail(message: str, code: int) -> int:
    """The one-line message on stderr, unless stderr's reader has left too (`2>&1 | head`)."""
    try:
        print(message, file=sys.stderr)
    except BrokenPipeError:
        _silence(sys.stderr)
    return code


def _silence(stream) -> None:
    """Point a stream whose reader left at /dev/null, so Python's exit-time flush of it does
    not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stream without a descriptor (a test's capture)
        pass


if __name__ == "__main__":
    raise SystemExit(main())
