"""Resumable checkpoints: one snapshot of the whole run at one fused-batch iteration.

Layout: `<output_dir>/checkpoints/iter-<N>/` with `state.pt` (every adapter's weights,
gradients accumulated so far, optimizer and schedule position, dropout RNG state, step
tallies) and `manifest.json` (iteration, what the run was started with, and the SHA-256 of
state.pt). A directory is written under a temporary name and renamed when complete, and the
previous one is deleted only afterwards, so a crash at any moment leaves a good checkpoint.
When training ends, `checkpoints/FINISHED.json` records that there is nothing to resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import asdict
from pathlib import Path

import torch

from mlora.atomic import remove_dir_aside, write_dir_atomically, write_file_atomically
from mlora.batching import LENGTH_GROUPING
from mlora.device import dtype_flag
from mlora.errors import INTEGER_TOO_LONG, UserError
from mlora.plural import counted

FORMAT = 1
DIRNAME = "checkpoints"
FINISHED = "FINISHED.json"
_ITER = re.compile(r"^iter-(\d+)(?:-(rank\d+))?$")


RESUMABLE_WITH_OTHER = ("save_best", "early_stopping_patience", "early_stopping_threshold")
# Where an adapter's files are: not part of the fingerprint, what they hold is (the training rows'
# and test rows' digests): a project moved, or data mounted elsewhere on the node a requeued job
# lands on, resumes. (The templates shape the rows' tokens and labels; init_from only the first step
# reads. chat_template absent, a checkpoint written before the key existed resumes.)
FILE_PLACES = ("data", "test_data", "prompt", "chat_template", "init_from")


def run_fingerprint(session) -> dict:
    """What a checkpoint must agree with to be resumed: adapters, their configs, the global
    settings that shape the batches, the base model and the data."""
    cfg = session.cfg
    # (save_best neither: it only chooses what else is saved; so it may be turned on or off when
    # resuming, turned on its tally starting at the next eval (a checkpoint written with it off
    # holds none), and older checkpoints, written before the key existed, still match. The
    # early-stopping keys neither, for the same reasons: a resume replays the stops its
    # checkpoint records, and they decide from the next eval on)
    adapters = {a.name: {k: v for k, v in asdict(a).items() if k not in (*RESUMABLE_WITH_OTHER, *FILE_PLACES)}
                for a in cfg.lora}
    # Not part of it: where and how often to save, and what changes memory but not results:
    # recompute (bit-identical, tested) and memory_fraction (its budget is saved in every
    # checkpoint and replayed), so a run that ran out of memory can resume with either changed.
    ignored = ("lora", "output_dir", "save_step", "save_total_limit", "recompute", "memory_fraction",
               *RESUMABLE_WITH_OTHER)  # (the adapters' defaults, in their settings above)
    globals_ = {k: v for k, v in asdict(cfg).items() if k not in ignored}
    base_cfg = (Path(session.base_dir) / "config.json").read_bytes()
    data = {name: _digest([ex.input_ids for ex in d.train]) for name, d in session.data.items()}
    # Which of those tokens the loss learns: the same tokens, other labels, when the prompt/answer
    # split moved (the rows' prompt and completion, the template's prompt). A digest beside the
    # rows', not in it, so that a checkpoint written before it existed still resumes.
    labels = {name: _digest([ex.labels for ex in d.train]) for name, d in session.data.items()}
    # (the rows its evals, best and early stops are measured on; None: it is not evaluated mid-run,
    # no eval_step or no test_data, so its test rows are not read in training: a test file edited
    # for a later `mlora eval` leaves the run as it was, as the pipeline's start-up check has it)
    test_data = {a.name: _digest([[ex.input_ids, ex.labels] for ex in session.data[a.name].test])
                 if a.eval_step and a.test_data is not None else None for a in cfg.lora}
    run = {"adapters": adapters, "globals": globals_,
           "base_model": hashlib.sha256(base_cfg).hexdigest()[:16], "dtype": str(session.dtype),
           "quantization": str(session.quant), "data": data, "labels": labels, "test_data": test_data}
    if any(a.group_by_length for a in cfg.lora):  # (absent otherwise: such runs resume as they did)
        run["length_grouping"] = LENGTH_GROUPING
    return run


def _digest(rows: list) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / DIRNAME


def list_checkpoints(output_dir, tag: str = "") -> list[tuple[int, Path]]:
    """(iteration, directory) of the complete checkpoints, oldest first. A pipeline rank's
    part carries the tag `rank<N>`."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(_ITER.match(p.name).group(1)), p) for p in root.iterdir() if _tag_of(p.name) == tag and p.is_dir()]
    return sorted(found)


def checkpoint_tags(output_dir) -> set[str]:
    """The tags of the checkpoints output_dir holds: "" for one process's, "rank<N>" for each
    pipeline rank's parts."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return set()
    return {tag for p in root.iterdir() if (tag := _tag_of(p.name)) is not None and p.is_dir()}


def tag_ranks(tags) -> list[int]:
    """The pipeline ranks among checkpoint tags, in order."""
    return sorted(int(tag[len("rank"):]) for tag in tags if tag)


def ranks_phrase(ranks: list[int]) -> str:
    """'rank 2', 'ranks 0, 1'."""
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def other_kind_note(tags: set[str], pipeline: bool) -> str:
    """What a resume finds of the other kind (one process's checkpoints for a pipeline, a
    pipeline's parts for one process), and how to resume that; "" when none. Each kind looks
    only for its own, and would otherwise say there is nothing to resume."""
    ranks = tag_ranks(tags)
    if not pipeline and ranks:
        return (f"; it holds a pipeline's checkpoints (parts of {ranks_phrase(ranks)}): "
                f"resume them with --pipeline --resume on every rank")
    if pipeline and "" in tags:
        return "; it holds one process's checkpoints: resume them with --resume, without --pipeline"
    return ""


def _name(iteration: int, tag: str) -> str:
    return f"iter-{iteration:08d}" + (f"-{tag}" if tag else "")


def write_checkpoint(output_dir, iteration: int, state: dict, fingerprint: dict,
                     keep: int | None, tag: str = "") -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    manifest = {"format": FORMAT, "iteration": iteration, "fingerprint": fingerprint,
                "files": {"state.pt": {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}}}

    def fill(tmp: Path) -> None:
        (tmp / "state.pt").write_bytes(payload)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))

    # A killed writer's temporaries of this run's checkpoints (this rank's, with its tag) go
    # first; and the old checkpoints are renamed aside before they are deleted: deleted in
    # place, one cut short was left under its own name, for a resume to find.
    target = write_dir_atomically(checkpoint_root(output_dir) / _name(iteration, tag), fill,
                                  clean=lambda name: _tag_of(name) == tag)
    if keep is not None:
        for _, old in list_checkpoints(output_dir, tag)[:-keep]:
            remove_dir_aside(old)
    return target


def _tag_of(name: str) -> str | None:
    """The tag ("" for one process, "rank<N>" for a pipeline rank) of a checkpoint's name, or None."""
    match = _ITER.match(name)
    return (match.group(2) or "") if match else None


def _finished_name(tag: str) -> str:
    return FINISHED if not tag else f"FINISHED-{tag}.json"


def mark_finished(output_dir, fingerprint: dict, tag: str = "") -> None:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    write_file_atomically(root / _finished_name(tag),
                          lambda tmp: Path(tmp).write_text(json.dumps({"fingerprint": fingerprint}, default=str)))


def clear(output_dir) -> None:
    """A fresh run: no checkpoint of an earlier run in the same directory may be resumed, one
    process's or any pipeline rank's (a run of the other kind, or of more ranks, would be
    refused by `unfinished_run` at every later start)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return
    for path in root.iterdir():
        if _ITER.match(path.name) and path.is_dir():
            try:
                remove_dir_aside(path)
            except FileNotFoundError:  # (pipeline ranks sharing the directory clear it together)
                pass
        elif path.name == FINISHED or (path.name.startswith("FINISHED-rank") and path.suffix == ".json"):
            path.unlink(missing_ok=True)


def is_finished(output_dir, tag: str = "") -> bool:
    return (checkpoint_root(output_dir) / _finished_name(tag)).is_file()


def unfinished_run(output_dir) -> Path | None:
    """The newest checkpoint of a run in output_dir that did not finish (one process's, or a
    pipeline rank's part), or None: what a fresh start would delete (`clear`), which is hours
    of work when --resume was only forgotten."""
    root = checkpoint_root(output_dir)
    tags = sorted({t for p in root.iterdir() if (t := _tag_of(p.name)) is not None}) if root.is_dir() else []
    for tag in tags:
        found = list_checkpoints(output_dir, tag)
        if found and not is_finished(output_dir, tag):
            return found[-1][1]
    return None


def refuse_to_clear(newest: Path, pipeline: bool) -> UserError:
    """The one line for a fresh start over an unfinished run (`unfinished_run`); pipeline: the
    start is a pipeline rank's. The run to continue may be of the other kind: --resume alone
    would then find nothing to resume."""
    how = "--resume"
    if _tag_of(newest.name) and not pipeline:
        how = "--pipeline --resume on every rank"
    elif not _tag_of(newest.name) and pipeline:
        how = "--resume, without --pipeline"
    return UserError(f"output_dir {newest.parent.parent} holds an unfinished run (newest checkpoint: {newest.name}); "
                     f"continue it with {how}, or start over with --overwrite (deletes its checkpoints and "
                     f"each adapter's best and checkpoint-<step>)")


def load_checkpoint(path: Path, fingerprint: dict) -> dict:
    """Verify and read one checkpoint; any corruption or mismatch is a one-line UserError."""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"checkpoint {path}: unreadable manifest.json ({err})") from None
    except ValueError:  # (after those two, ValueErrors too) Python's cap on an integer's digits
        raise UserError(f"checkpoint {path}: manifest.json holds {INTEGER_TOO_LONG}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise UserError(f"checkpoint {path}: unknown format {found!r}")
    files = manifest.get("files")
    expected = files.get("state.pt") if isinstance(files, dict) else None
    if not isinstance(expected, dict):
        raise UserError(f"checkpoint {path}: manifest.json does not describe state.pt")
    saved_print = manifest.get("fingerprint")
    if (not isinstance(saved_print, dict) or not isinstance(saved_print.get("adapters"), dict)
            or not isinstance(manifest.get("iteration"), int)):
        raise UserError(f"checkpoint {path}: manifest.json lacks the run's fingerprint or iteration")
    try:
        payload = (path / "state.pt").read_bytes()
    except OSError as err:
        raise UserError(f"checkpoint {path}: cannot read state.pt ({err.strerror})") from None
    if len(payload) != expected.get("bytes") or hashlib.sha256(payload).hexdigest() != expected.get("sha256"):
        raise UserError(f"checkpoint {path}: state.pt is corrupt or truncated "
                        f"({counted(len(payload), 'byte')}, checksum mismatch)")
    try:
        difference = describe_difference(json.loads(json.dumps(saved_print, default=str)),
                                         json.loads(json.dumps(fingerprint, default=str)))
    except (KeyError, AttributeError, TypeError):  # a fingerprint of the wrong shape
        raise UserError(f"checkpoint {path}: manifest.json's fingerprint is damaged") from None
    if difference:
        raise UserError(f"checkpoint {path} does not match this run: {difference}")
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    if state.get("iteration") != manifest["iteration"]:
        raise UserError(f"checkpoint {path}: manifest and state disagree on the iteration")
    return state


def describe_difference(saved: dict, current: dict) -> str | None:
    """The first thing that differs, in words a user can act on."""
    saved_names, current_names = list(saved["adapters"]), list(current["adapters"])
    if saved_names != current_names:
        return f"the checkpoint has adapters {saved_names}, the config has {current_names}"
    for name in saved_names:
        for key, value in current["adapters"][name].items():
            if saved["adapters"][name].get(key) != value:
                return (f"adapter '{name}': '{key}' was {saved['adapters'][name].get(key)!r}, "
                        f"now {value!r}")
    for key, value in current["globals"].items():
        if saved["globals"].get(key) != value:
            return f"'{key}' was {saved['globals'].get(key)!r}, now {value!r}"
    if saved["base_model"] != current["base_model"]:
        return "the base model's config.json differs"
    if saved.get("dtype") != current.get("dtype"):
        flag = dtype_flag(saved.get("dtype"))
        # (the default dtype follows the GPU: a checkpoint of another GPU generation's default)
        fix = f" (resume it with --dtype {flag})" if flag else ""
        return f"dtype was {saved.get('dtype')}, now {current.get('dtype')}{fix}"
    if saved.get("quantization") != current.get("quantization"):
        return quantization_difference(saved.get("quantization"), current.get("quantization"))
    for name, digest in current["data"].items():
        if saved["data"].get(name) != digest:
            return f"adapter '{name}': its training data differs"
    # (a checkpoint of an older mlora holds no digest of them: not compared then. train_on_inputs,
    # which changes them too, is the adapter's setting, compared above)
    for name, digest in current["labels"].items() if "labels" in saved else ():
        if saved["labels"].get(name) != digest:
            return (f"adapter '{name}': its training rows' labels differ: the same tokens, others learnt "
                    f"(its prompt template, or where its rows split prompt from answer, changed)")
    # (a checkpoint of an older mlora holds no digest of them: not compared then; nor an adapter
    # not evaluated mid-run, whose checkpoint may hold one: mlora digested its test rows too once)
    for name, digest in current["test_data"].items() if "test_data" in saved else ():
        if digest is not None and saved["test_data"].get(name) != digest:
            return f"adapter '{name}': its test data differs"
    if saved.get("length_grouping") != current.get("length_grouping"):  # (the adapters' settings agree)
        return (f"group_by_length orders rows in {current.get('length_grouping')}, where the mlora that wrote the "
                f"checkpoint ordered them in {saved.get('length_grouping') or 'windows of 50 micro-batches'}: the "
                f"resumed epoch would train other rows (finish the run with that mlora, or start over with "
                f"--overwrite)")
    known = {"adapters", "globals", "base_model", "dtype", "quantization", "data", "labels", "test_data",
             "length_grouping"}
    for key in sorted(set(current) - known):  # e.g. a pipeline's stages and save_step
        if saved.get(key) != current[key]:
            return f"{key} was {saved.get(key)!r}, now {current[key]!r}"
    return None


def quantization_difference(saved: str | None, current: str | None) -> str:
    """How the base's quantization differs from the checkpoint's, as the flags that set it (the
    fingerprint records str(QuantConfig), whose fields are not what a user types, and whose
    quant_type of an 8-bit base means nothing)."""
    from mlora.quant import flags_of_recorded

    was, now = flags_of_recorded(saved), flags_of_recorded(current)
    if was is None or now is None:  # (a fingerprint of another shape: as recorded)
        return f"quantization was {saved}, now {current}"
    fix = f"resume it with {was}" if was else "resume it without --load_4bit or --load_8bit"
    return (f"the base was {f'quantized with {was}' if was else 'not quantized'}, now "
            f"{f'with {now}' if now else 'not quantized'} ({fix})")


def latest_loadable(output_dir, fingerprint: dict, tag: str = "") -> dict:
    """The state of the newest checkpoint; a damaged newest one is an error, not skipped,
    so a user never silently loses progress they expected."""
    found = list_checkpoints(output_dir, tag)
    if not found:
        raise UserError(f"nothing to resume: no checkpoint in {checkpoint_root(output_dir)} "
                        f"(checkpoints are written every save_step and on SIGINT/SIGTERM)"
                        f"{other_kind_note(checkpoint_tags(output_dir), pipeline=bool(tag))}")
    return load_checkpoint(found[-1][1], fingerprint)
