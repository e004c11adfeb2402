"""Load and validate the JSON training config; m-LoRA's configs load too.

Every mistake becomes one `UserError` line that names the file, the adapter and the key, so a
user can fix the config without reading a traceback. After parsing, nothing a consumer reads
is left as "use the global value" or "same as batch_size": those Nones are filled in here.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn

from mlora.errors import INTEGER_TOO_LONG, UserError
from mlora.lr_schedule import NOT_A_FUNCTION_OF_THE_STEP, POLYNOMIAL_LR_END, SAME_AS, SCHEDULES, WSD_SHAPES
from mlora.pipe_read import read_without_waiting

# Canonical order of the projections a LoRA may target; target_modules comes out in this order.
# LLaMA-style models have q/k/v/o and gate/up/down; Phi-3 fuses q/k/v into qkv_proj and gate/up
# into gate_up_proj. Which of them a base model has is checked against the model (session.py).
# (q_a_proj ... kv_b_proj: DeepSeek-V2/V3's latent attention; in_proj_qkv ... out_proj: Qwen3.5's linear
# attention, in_proj_qkvz and in_proj_ba Qwen3-Next's fused input projections of it)
# Gemma 4 26B-A4B's routed experts run beside its dense MLP, whose gate_proj, up_proj and
# down_proj the MLP names target there (as in PEFT, to which the experts are parameters), and
# Llama 4's MLP names target its dense MLPs and shared expert: their experts are targeted by
# these, PEFT's target_parameters for them (ModelArgs.experts_named, lora.target_name).
EXPERT_TARGET_MODULES = ("experts.gate_up_proj", "experts.down_proj")
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                  "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "in_proj_qkvz", "in_proj_ba",
                  "out_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj", *EXPERT_TARGET_MODULES)
# ChatGLM's and Baichuan's own names of the same projections (what PEFT users of those
# models write); valid only on those models (session.resolve_targets), and an adapter saved for
# them uses these names again (models/naming.py).
NATIVE_MODULE_NAMES = {"query_key_value": "qkv_proj", "W_pack": "qkv_proj", "dense": "o_proj",
                       "dense_h_to_4h": "gate_up_proj", "dense_4h_to_h": "down_proj"}
# m-LoRA names the MLP projections after the LLaMA paper's w1/w2/w3. Kept as written, like the
# names above, until session.resolve_targets, so that its errors name what the user wrote.
MLORA_MODULE_NAMES = {
    "w1_proj": "gate_proj", "w1": "gate_proj",
    "w2_proj": "down_proj", "w2": "down_proj",
    "w3_proj": "up_proj", "w3": "up_proj",
}
BUILTIN_PROMPTS = ("alpaca",)
OPTIMIZERS = ("adamw", "sgd")
NAN_POLICIES = ("skip", "stop")
LR_SCHEDULERS = (*SCHEDULES, *SAME_AS)  # (lr_schedule.py)
EXPAND_SIDES = ("right", "left")
TRAIN_STRATEGIES = ("trivial", "fast-fit", "optimal-fit")
MLORA_STRATEGY_NAMES = {"none": "trivial", "optim": "optimal-fit"}


def projection_of(name: str) -> str:
    """mlora's name of the projection a target_modules entry names (query_key_value, w1: qkv_proj, gate_proj)."""
    return MLORA_MODULE_NAMES.get(name) or NATIVE_MODULE_NAMES.get(name, name)


@dataclass
class AdapterConfig:
    """One LoRA adapter and how to train it (one entry of the config's `lora` list)."""

    name: str
    data: str  # absolute path
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    batch_size: int = 16
    micro_batch_size: int | None = None  # filled with batch_size by parse_config
    test_batch_size: int = 16
    num_epochs: int = 1
    max_steps: int | None = None  # optimizer steps; None = run all epochs
    test_data: str | None = None  # absolute path
    prompt: str = "alpaca"  # a builtin name or an absolute path to a template file
    # An absolute path to a Jinja chat template that replaces the tokenizer's for this adapter's
    # rows, or the Jinja itself (chat_template.is_inline)
    chat_template: str | None = None
    group_by_length: bool | None = None  # filled from TrainConfig by parse_config
    expand_side: str = "right"
    train_on_inputs: bool = False
    optim: str = "adamw"
    lr: float = 3e-4
    momentum: float = 0.0
    weight_decay: float = 0.0
    # LoRA+ (Hayou et al. 2024): every lora_B steps at lr times this, every lora_A at lr; None = plain LoRA
    loraplus_lr_ratio: float | None = None
    lr_scheduler: str = "constant"
    # transformers' scheduler kwargs, as given (absent ones take transformers' defaults); None = none given
    lr_scheduler_kwargs: dict[str, Any] | None = None
    warmup_steps: int = 0
    warmup_ratio: float | None = None  # the warmup as a share of the total steps (then warmup_steps is 0)
    max_grad_norm: float | None = 1.0  # None = no clipping
    eval_step: int | None = None  # filled from TrainConfig by parse_config; 0 = never
    save_best: bool = False  # keep the weights of the lowest eval loss in <output_dir>/<name>/best
    # Stop the adapter after this many evaluations in a row without improving on its lowest eval
    # loss by more than early_stopping_threshold (HF's EarlyStoppingCallback); None = off.
    # (absent from an adapter's entry, both are filled from TrainConfig by parse_config)
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0
    init_from: str | None = None  # absolute path of a saved adapter directory
    on_nan: str = "skip"  # a non-finite loss or gradient: skip that step, or stop the adapter


@dataclass
class TrainConfig:
    """The whole run: global settings plus the adapters trained together."""

    lora: list[AdapterConfig]
    cutoff_len: int = 256
    save_step: int = 0  # 0 = save only at the end
    seed: int = 42
    output_dir: str = "output"
    group_by_length: bool = False
    eval_step: int = 0  # 0 = never
    early_stopping_patience: int | None = None  # the adapters' default (None = no early stopping)
    early_stopping_threshold: float = 0.0  # the adapters' default
    train_lora_candidate_num: int | None = None  # filled with len(lora) by parse_config
    train_lora_simultaneously_num: int | None = None  # filled with len(lora) by parse_config
    train_strategy: str = "trivial"
    save_total_limit: int | None = None  # resumable checkpoints kept (None = all)
    max_tokens_per_batch: int | None = None  # padded-token budget of one fused batch (fast-fit, optimal-fit)
    packing: bool = False  # pack several sequences of one adapter into each row (up to cutoff_len)
    recompute: bool = False  # activation checkpointing of every decoder layer while training
    # Share of the free device memory (CUDA) a fused batch may use: sizes the automatic token
    # budget of fast-fit / optimal-fit when max_tokens_per_batch is null (memory.plan_token_budget).
    memory_fraction: float = 0.9


def adapter_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one adapter, from the global seed and the adapter's name only.

    Python's hash() is salted per process, so this uses a fixed digest; leaving the other
    adapters out of the input means adding or removing one never changes another's init or
    data order.
    """
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def load_config(path: str | os.PathLike, reads: str = "train") -> TrainConfig:
    """Read and validate a JSON config file; relative paths inside may be relative to it.
    reads: which of its files the command reads, and so must exist (READS)."""
    source = os.fspath(path)
    if not source:  # (Path("") is ".": "is a directory" would puzzle)
        raise UserError("the config file's path is empty")
    try:
        # utf-8-sig: editors on Windows like to write a BOM.
        text = read_without_waiting(source).decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{source}: config file not found") from None
    except IsADirectoryError:
        raise UserError(f"{source}: is a directory, not a config file") from None
    except UnicodeDecodeError:
        raise UserError(f"{source}: config file is not UTF-8 text") from None
    except OSError as err:
        raise UserError(f"{source}: cannot read config file: {err.strerror}") from None
    except ValueError:  # (after UnicodeDecodeError, one too) a NUL in the path
        raise UserError(f"{source!r} is not a valid path") from None
    if not text.strip():  # (json's "Expecting value: line 1 column 1" said less)
        raise UserError(f"{source}: the config file is empty")

    def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # json keeps the last of two equal keys without a word; that is always a mistake here.
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise UserError(f"{source}: key {key!r} appears twice in the same JSON object")
            obj[key] = value
        return obj

    try:
        obj = json.loads(text, object_pairs_hook=reject_duplicate_keys)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{source}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    except RecursionError:  # json's decoder recurses per level: ~1000 nested brackets end the stack
        raise UserError(f"{source}: JSON nested too deeply to read") from None
    except ValueError:  # (after JSONDecodeError, one too) Python's cap on an integer's digits
        raise UserError(f"{source}: {INTEGER_TOO_LONG}") from None
    return parse_config(obj, source, Path(os.path.abspath(path)).parent, reads)


# The commands, by the adapters' files they read: training its data, test_data and init_from;
# eval the test_data, else the data (it evaluates the training rows then); generate none of
# them (a trained adapter's prompts still go through its template). A file a command does not
# read may be gone (data moved away after training) and is taken as given.
READS = ("train", "eval", "generate")


def parse_config(obj: Any, source: str = "config", base_dir: Path | None = None,
                 reads: str = "train") -> TrainConfig:
    """Validate an already-decoded config; `source` prefixes every message, `base_dir` is
    where relative paths are looked up when they are not found from the working directory;
    reads: the command (READS)."""
    if reads not in READS:
        raise ValueError(f"reads must be one of {', '.join(READS)}, got {reads!r}")
    if not isinstance(obj, dict):
        raise UserError(f"{source}: the top level must be a JSON object, got {_describe(obj)}")
    top = _Reader(obj, source, _GLOBAL_KEYS, {"early_stop_test_step": "eval_step"})
    top.integer("cutoff_len", _POSITIVE)
    top.integer("save_step", _NON_NEGATIVE)
    top.integer("seed", _SEED_RANGE)
    top.string("output_dir")
    if not top.values.get("output_dir", "x").strip():  # (it made a directory named "   "; --output_dir refuses one)
        top.fail("'output_dir' is blank: give a directory")
    top.boolean("group_by_length")
    top.integer("eval_step", _NON_NEGATIVE)
    top.integer("early_stopping_patience", _POSITIVE, nullable=True)
    top.number("early_stopping_threshold", _NON_NEGATIVE)
    top.integer("train_lora_candidate_num", _POSITIVE, nullable=True)
    top.integer("train_lora_simultaneously_num", _POSITIVE, nullable=True)
    top.choice("train_strategy", TRAIN_STRATEGIES, MLORA_STRATEGY_NAMES)
    top.integer("save_total_limit", _POSITIVE, nullable=True)
    top.integer("max_tokens_per_batch", _POSITIVE, nullable=True)
    top.boolean("packing")
    top.boolean("recompute")
    top.number("memory_fraction", _FRACTION)

    entries = top.require("lora")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        top.fail(f"'lora' must be a list of objects, one per adapter, got {_describe(entries)}")
    if not entries:
        top.fail("'lora' must list at least one adapter")
    adapters = [
        _parse_adapter(entry, f"{source}: lora[{i}]", base_dir, reads) for i, entry in enumerate(entries)
    ]
    first_index: dict[str, int] = {}  # by the name as a case-insensitive file system sees it
    for i, adapter in enumerate(adapters):
        j = first_index.setdefault(_as_file_systems_compare(adapter.name), i)
        if j != i and adapters[j].name == adapter.name:
            top.fail(f"duplicate adapter name {adapter.name!r} (lora[{j}] and lora[{i}])")
        if j != i:  # macOS's and Windows' file systems would save both into one directory
            top.fail(f"adapter names {adapters[j].name!r} (lora[{j}]) and {adapter.name!r} (lora[{i}]) differ only in "
                     f"case or Unicode form: on a case-insensitive file system they name one directory")

    config = TrainConfig(lora=adapters, **top.values)
    for i, adapter in enumerate(adapters):
        if adapter.group_by_length is None:
            adapter.group_by_length = config.group_by_length
        if adapter.eval_step is None:
            # A global eval_step skips adapters without test_data (evaluating their training
            # rows, which `mlora eval` falls back to, would log them as an eval_loss mid-run).
            adapter.eval_step = config.eval_step if adapter.test_data else 0
        # (after the global eval_step is filled in: it counts for save_best too)
        missing = "test_data" if adapter.test_data is None else "eval_step" if not adapter.eval_step else None
        if adapter.save_best and missing:
            raise UserError(f"{source}: lora[{i}] (name {adapter.name!r}): 'save_best' is true but no "
                            f"'{missing}' is given (the best weights are those of the lowest eval loss)")
        if adapter.early_stopping_threshold is _INHERIT:
            adapter.early_stopping_threshold = config.early_stopping_threshold
        if adapter.early_stopping_patience is _INHERIT:
            # As the global eval_step: it applies to the adapters that are evaluated.
            adapter.early_stopping_patience = None if missing else config.early_stopping_patience
        if adapter.early_stopping_patience is not None and missing:
            raise UserError(f"{source}: lora[{i}] (name {adapter.name!r}): 'early_stopping_patience' is "
                            f"{adapter.early_stopping_patience} but no '{missing}' is given (it counts "
                            f"evaluations without improvement of the eval loss)")
    if config.early_stopping_patience is not None and not any(a.eval_step for a in adapters):
        top.fail(f"'early_stopping_patience' is {config.early_stopping_patience} but no adapter is evaluated "
                 f"(give 'eval_step' and the adapters' 'test_data')")
    candidate_given = config.train_lora_candidate_num is not None
    if not candidate_given:
        config.train_lora_candidate_num = len(adapters)
    simultaneously = config.train_lora_simultaneously_num
    if simultaneously is not None and candidate_given and simultaneously > config.train_lora_candidate_num:
        top.fail(f"train_lora_simultaneously_num ({simultaneously}) is more than train_lora_candidate_num "
                 f"({config.train_lora_candidate_num}): a fused batch holds only active adapters")
    # A fused batch holds active adapters only, so candidate_num bounds it (a larger value
    # without a candidate_num is a harmless cap, as in m-LoRA's configs).
    config.train_lora_simultaneously_num = min(simultaneously or len(adapters), config.train_lora_candidate_num)
    return config


def _parse_adapter(obj: dict, where: str, base_dir: Path | None, reads: str = "train") -> AdapterConfig:
    name = obj.get("name")
    if isinstance(name, str) and name:
        where = f"{where} (name {name!r})"
    a = _Reader(obj, where, _ADAPTER_KEYS, {"lora_alpha": "alpha", "lora_dropout": "dropout"})

    for key in _UNSUPPORTED_KEYS:
        value = a.obj.get(key)
        # `is False`, not `== False`: a use_dora of 0 still asks for the feature.
        if not (value is None or value is False):
            a.fail(f"{key} is not supported by mlora")

    name = a.require("name")
    if not isinstance(name, str):
        a.fail(f"'name' must be a string, got {_describe(name)}")
    if not _is_directory_name(name):
        a.fail(
            f"'name' must be usable as a directory name (non-empty, no '/', '\\' or ',', no leading "
            f"dot or whitespace at either end, no control characters, at most 255 bytes), got {name!r}"
        )
    if _as_file_systems_compare(name) in RESERVED_NAMES:  # ("Checkpoints" is "checkpoints" on macOS)
        a.fail(f"'name' {name!r} is taken by mlora's own output in output_dir (adapters cannot be "
               f"named {' or '.join(repr(n) for n in RESERVED_NAMES)})")
    a.values["name"] = name

    a.require("data")
    a.path("data", base_dir, kind="file",
           must_exist=reads == "train" or (reads == "eval" and obj.get("test_data") is None))
    a.path("test_data", base_dir, kind="file", nullable=True, must_exist=reads != "generate")
    a.path("init_from", base_dir, kind="adapter", nullable=True, must_exist=reads == "train")
    a.string("prompt")
    if a.values.get("prompt", BUILTIN_PROMPTS[0]) not in BUILTIN_PROMPTS:
        a.path("prompt", base_dir, kind="prompt")
    _read_chat_template(a, base_dir)

    a.integer("r", _POSITIVE)
    a.number("alpha", _POSITIVE)
    a.number("dropout", _UNIT)
    a.boolean("use_rslora")
    if "target_modules" in a.obj:
        a.values["target_modules"] = _target_modules(a, a.obj["target_modules"])

    a.integer("batch_size", _POSITIVE)
    a.integer("micro_batch_size", _POSITIVE, nullable=True)
    a.integer("test_batch_size", _POSITIVE)
    a.integer("num_epochs", _POSITIVE)
    a.integer("max_steps", _POSITIVE, nullable=True)
    a.boolean("group_by_length", nullable=True)
    a.choice("expand_side", EXPAND_SIDES)
    a.boolean("train_on_inputs")

    a.choice("optim", OPTIMIZERS)
    a.number("lr", _POSITIVE)
    a.number("momentum", _UNIT)
    a.number("weight_decay", _NON_NEGATIVE)
    a.number("loraplus_lr_ratio", _POSITIVE, nullable=True)
    _read_schedule(a)
    a.number("max_grad_norm", _Bound(">= 0 (0 or null disables clipping)", lambda v: v >= 0), nullable=True)
    if a.values.get("max_grad_norm") == 0:
        a.values["max_grad_norm"] = None
    a.integer("eval_step", _NON_NEGATIVE, nullable=True)
    a.boolean("save_best")
    a.choice("on_nan", NAN_POLICIES)
    a.integer("early_stopping_patience", _POSITIVE, nullable=True)
    a.number("early_stopping_threshold", _NON_NEGATIVE)

    # (an absent patience takes the global one; an explicit null turns it off for this adapter)
    adapter = AdapterConfig(**{"early_stopping_patience": _INHERIT, "early_stopping_threshold": _INHERIT, **a.values})
    if adapter.micro_batch_size is None:
        adapter.micro_batch_size = adapter.batch_size
    if adapter.batch_size % adapter.micro_batch_size:
        a.fail(
            f"'batch_size' ({adapter.batch_size}) must be a multiple of "
            f"'micro_batch_size' ({adapter.micro_batch_size})"
        )
    # Asked for explicitly on this adapter, evaluation without test data is surely a slip;
    # a global eval_step simply skips adapters that have none.
    if adapter.eval_step and adapter.test_data is None:
        a.fail(f"'eval_step' is {adapter.eval_step} but no 'test_data' is given")
    # Each step scales the weights by 1 - lr * weight_decay (AdamW; SGD's decay does too): at 1 or
    # more they flip sign and grow, and a product like 1e300 makes them inf in one step, which
    # was saved as the trained adapter (every later step skipped as non-finite).
    # (LoRA+ steps lora_B at lr * loraplus_lr_ratio: its weights' factor when that is the larger rate)
    ratio = adapter.loraplus_lr_ratio
    if ratio is not None and ratio > 1 and adapter.lr * ratio * adapter.weight_decay >= 1:
        a.fail(f"'weight_decay' ({adapter.weight_decay:g}) times 'lr' ({adapter.lr:g}) times 'loraplus_lr_ratio' "
               f"({ratio:g}) must be below 1: each step scales every lora_B by "
               f"1 - lr * loraplus_lr_ratio * weight_decay")
    if adapter.lr * adapter.weight_decay >= 1:
        a.fail(f"'weight_decay' ({adapter.weight_decay:g}) times 'lr' ({adapter.lr:g}) must be below 1: each step "
               f"scales the weights by 1 - lr * weight_decay")
    if adapter.momentum and adapter.optim != "sgd":
        a.fail(f"'momentum' is {adapter.momentum} but optim is {adapter.optim!r}; momentum applies to 'sgd' only")
    return adapter


def _target_modules(a: _Reader, value: Any) -> list[str]:
    """PEFT's list of names or m-LoRA's {name: bool}; returns the names as written, each once, in
    the canonical order of the projections they name."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        names = value
    elif isinstance(value, dict):
        for key, on in value.items():
            if not isinstance(on, bool):
                a.fail(f"'target_modules' entry {key!r} must be true or false, got {_describe(on)}")
        names = [key for key, on in value.items() if on]
        # Typos hide even behind false: check every key, not only the selected ones.
        for key in value:
            _check_module(a, key)
    else:
        a.fail(
            "'target_modules' must be a list of module names or an object of name: true/false, "
            f"got {_describe(value)}"
        )
    chosen = {_check_module(a, n) for n in names}
    if not chosen:
        a.fail(f"'target_modules' selects no modules; choose from {', '.join(TARGET_MODULES)}")
    # ChatGLM's / Baichuan's own names and m-LoRA's stay as written (the base model decides
    # whether the former are its names: session.resolve_targets), in the place of the projection they name
    return sorted(chosen, key=lambda m: (TARGET_MODULES.index(projection_of(m)), m))


def _check_module(a: _Reader, name: str) -> str:
    if name in TARGET_MODULES or name in MLORA_MODULE_NAMES or name in NATIVE_MODULE_NAMES:
        return name
    known = [*TARGET_MODULES, *MLORA_MODULE_NAMES, *NATIVE_MODULE_NAMES]
    a.fail(
        f"unknown module {name!r} in 'target_modules'{_hint(name, known)}"
        f" (valid: {', '.join(TARGET_MODULES)}; on ChatGLM and Baichuan also {', '.join(NATIVE_MODULE_NAMES)})"
    )


# What mlora itself writes into output_dir next to the adapters' directories.
RESERVED_NAMES = ("metrics.jsonl", "checkpoints")


def _as_file_systems_compare(name: str) -> str:
    """A name as case-insensitive file systems compare names (macOS's, which also takes a
    composed and a decomposed "é" for one, and Windows'): casefolded, in one Unicode form."""
    return unicodedata.normalize("NFC", name).casefold()


def _is_directory_name(name: str) -> bool:
    return (
        name != ""
        and not name.startswith(".")
        # "a " trained, but `generate --adapters` strips what it is given and could never pick
        # it; " " made a directory no listing shows
        and name == name.strip()
        and "/" not in name
        and "\\" not in name
        and "," not in name  # `generate --adapters a,b` splits on commas: such a name could not be picked
        and all(ch.isprintable() for ch in name)
        and len(name.encode("utf-8", "surrogatepass")) <= 255  # a file name's limit on common file systems
    )


@dataclass(frozen=True)
class _Bound:
    """A range check and how to say it in a message ("'r' must be > 0, got 0")."""

    text: str
    ok: Callable[[float], bool]


_POSITIVE = _Bound("> 0", lambda v: v > 0)
_NON_NEGATIVE = _Bound(">= 0", lambda v: v >= 0)
_UNIT = _Bound("in [0, 1)", lambda v: 0 <= v < 1)
_FRACTION = _Bound("in (0, 1]", lambda v: 0 < v <= 1)
# numpy and torch both take seeds in this range.
_SEED_RANGE = _Bound("in [0, 2**63)", lambda v: 0 <= v < 2**63)

_MISSING = object()
_INHERIT = object()  # an adapter's early-stopping key it does not give, until parse_config fills in the global one


class _Reader:
    """Reads one JSON object into dataclass keyword arguments, checking types and ranges.

    Only keys present in the JSON land in `values`, so the dataclass defaults stay the one
    place that says what an absent key means.
    """

    def __init__(self, obj: dict, where: str, keys: Iterable[str], aliases: dict[str, str]):
        self.where = where
        self.values: dict[str, Any] = {}
        valid = [*keys, *aliases]
        for key in obj:
            if key not in valid:
                self.fail(f"unknown key {key!r}{_hint(key, valid)}")
        # Work on a copy with aliases renamed, so the caller's object is left as it was.
        self.obj = dict(obj)
        for alias, key in aliases.items():
            if alias in self.obj:
                if key in self.obj:
                    self.fail(f"{key!r} and its alias {alias!r} are both given; keep one")
                self.obj[key] = self.obj.pop(alias)

    def fail(self, message: str) -> NoReturn:
        raise UserError(f"{self.where}: {message}")

    def require(self, key: str) -> Any:
        if key not in self.obj:
            self.fail(f"missing required key {key!r}")
        return self.obj[key]

    def integer(self, key: str, bound: _Bound, *, nullable: bool = False) -> None:
        # bool is a subclass of int in Python but not a number in JSON.
        self._read(key, "an integer", lambda v: type(v) is int, bound, nullable)

    def number(self, key: str, bound: _Bound, *, nullable: bool = False) -> None:
        def is_number(v: Any) -> bool:
            return type(v) in (int, float) and math.isfinite(v)

        self._read(key, "a number", is_number, bound, nullable)
        if self.values.get(key) is not None:
            self.values[key] = float(self.values[key])

    def boolean(self, key: str, *, nullable: bool = False) -> None:
        self._read(key, "true or false", lambda v: isinstance(v, bool), None, nullable)

    def string(self, key: str) -> None:
        self._read(key, "a non-empty string", lambda v: isinstance(v, str) and v != "", None, False)

    def choice(self, key: str, choices: tuple[str, ...], aliases: dict[str, str] | None = None) -> None:
        """A string from `choices`; `aliases` (m-LoRA's spellings) are stored as their canonical name."""
        aliases = aliases or {}
        self.string(key)
        value = self.values.get(key)
        if value is None or value in choices:
            return
        if value in aliases:
            self.values[key] = aliases[value]
            return
        listed = ", ".join(choices)
        if aliases:
            listed += " (or m-LoRA's " + ", ".join(f"{k!r} = {v!r}" for k, v in aliases.items()) + ")"
        hint = _hint(value.lower(), [*choices, *aliases])
        self.fail(f"{key!r} must be one of {listed}, got {value!r}{hint}")

    def path(self, key: str, base_dir: Path | None, *, kind: str, nullable: bool = False,
             must_exist: bool = True) -> None:
        """An existing file ("file", "prompt", "chat template") or saved adapter directory ("adapter"), stored
        absolute; relative paths are tried from the working directory, then from base_dir.
        must_exist False: a path the command will not read may be missing (kept as given,
        made absolute as the first place looked)."""
        self._read(key, "a non-empty string (a path)", lambda v: isinstance(v, str) and v != "", None,
                   nullable)
        value = self.values.get(key)
        if value is None:
            return
        given = Path(value).expanduser()
        # (the config's own directory once, when mlora runs in it: "looked in /x and /x" read as a slip)
        places = list(dict.fromkeys([Path.cwd()] + ([Path(base_dir)] if base_dir is not None else [])))
        candidates = [given] if given.is_absolute() else [place / given for place in places]
        found = next((c for c in candidates if c.exists()), None)
        if found is None and not must_exist:
            self.values[key] = os.path.abspath(candidates[0])
            return
        if found is None:
            looked = "" if given.is_absolute() else " (looked in " + " and ".join(str(p) for p in places) + ")"
            what = {"file": "file", "prompt": "template file", "chat template": "chat template file",
                    "adapter": "adapter directory"}[kind]
            extra = {"prompt": f"; builtin templates: {', '.join(BUILTIN_PROMPTS)}",
                     # (see _read_chat_template: the value is neither a file nor Jinja text)
                     "chat template": "; nor is it the Jinja text of a template, which holds {{ or {%"}.get(kind, "")
            self.fail(f"{key!r}: {what} {value!r} not found{looked}{extra}")
        if kind == "adapter":
            if not found.is_dir():
                self.fail(f"{key!r}: {str(found)!r} is not a directory (expected a saved adapter)")
            if not (found / "adapter_config.json").is_file():
                self.fail(f"{key!r}: {str(found)!r} has no adapter_config.json, so it is not a saved adapter")
        elif not found.is_file():
            self.fail(f"{key!r}: {str(found)!r} is not a file")
        # abspath, not resolve(): keep the user's symlinks as they wrote them.
        self.values[key] = os.path.abspath(found)

    def _read(self, key: str, what: str, accepts: Callable[[Any], bool], bound: _Bound | None,
              nullable: bool) -> None:
        value = self.obj.get(key, _MISSING)
        if value is _MISSING:
            return
        if value is None and nullable:
            self.values[key] = None
            return
        if not accepts(value):
            self.fail(f"{key!r} must be {what}, got {_describe(value)}")
        if bound is not None and not bound.ok(value):
            self.fail(f"{key!r} must be {bound.text}, got {value!r}")
        self.values[key] = value


_UNSUPPORTED_KEYS = ("use_dora",)
_ADAPTER_KEYS = [f.name for f in fields(AdapterConfig)] + list(_UNSUPPORTED_KEYS)
_GLOBAL_KEYS = [f.name for f in fields(TrainConfig)]


def _read_chat_template(a: _Reader, base_dir: Path | None) -> None:
    """chat_template: a Jinja file's path (found as the other files'), or the Jinja itself as
    tokenizer_config.json holds it (chat_template.is_inline: it holds {{ or {%), checked before
    anything loads, as every command renders chat rows through it."""
    from mlora.chat_template import inline_chat_template, is_inline, read_chat_template

    value = a.obj.get("chat_template")
    if isinstance(value, str) and is_inline(value):
        # (a file named so would be read as Jinja without a word: refused, naming it, instead)
        places = [Path.cwd()] + ([Path(base_dir)] if base_dir is not None else [])
        named = next((p / value for p in places if _exists(p / value)), None)
        if named is not None:
            a.fail(f"'chat_template': {value!r} is the name of the file {named} but holds Jinja's {{{{ or "
                   f"{{%, which make it the template's text; rename the file")
        try:
            a.values["chat_template"] = inline_chat_template(value)
        except UserError as err:
            a.fail(f"'chat_template': {err}")
        return
    a.path("chat_template", base_dir, kind="chat template", nullable=True)
    if a.values.get("chat_template") is not None:
        try:
            read_chat_template(a.values["chat_template"])
        except UserError as err:
            a.fail(f"'chat_template': {err}")


def _exists(path: Path) -> bool:
    try:
        return path.expanduser().exists()
    except (OSError, ValueError):  # (a name too long for the file system, a NUL in it: no such file)
        return False


def _read_schedule(a: _Reader) -> None:
    """lr_scheduler, its lr_scheduler_kwargs and the warmup, as transformers' TrainingArguments
    names them (lr_scheduler_type's names, lr_scheduler_kwargs, warmup_steps, warmup_ratio)."""
    kind = a.obj.get("lr_scheduler")
    if isinstance(kind, str) and kind in NOT_A_FUNCTION_OF_THE_STEP:
        a.fail(f"'lr_scheduler' {kind!r} is not supported: {NOT_A_FUNCTION_OF_THE_STEP[kind]}, and mlora's "
               f"schedules are functions of the step (choose from {', '.join(LR_SCHEDULERS)})")
    a.choice("lr_scheduler", LR_SCHEDULERS)
    if "lr_scheduler" in a.values:  # (constant_with_warmup is stored as constant: one schedule, one name)
        a.values["lr_scheduler"] = SAME_AS.get(a.values["lr_scheduler"], a.values["lr_scheduler"])
    kind = a.values.get("lr_scheduler", AdapterConfig.lr_scheduler)
    kwargs = _scheduler_kwargs(a, kind)
    if kwargs:
        a.values["lr_scheduler_kwargs"] = kwargs

    # A ratio: transformers 4's warmup_ratio, or transformers 5's warmup_steps below 1 (which
    # replaced it); ceil(ratio x total steps) either way. (transformers 4 let a warmup_steps above
    # 0 win over a warmup_ratio; both at once is refused here)
    if "warmup_steps" in a.obj and "warmup_ratio" in a.obj:
        a.fail("'warmup_steps' and 'warmup_ratio' are both given; keep one")
    steps = a.obj.get("warmup_steps")
    if type(steps) is float and 0 <= steps < 1:
        a.values["warmup_ratio"] = steps
    else:
        a._read("warmup_steps", "an integer, or a fraction in [0, 1) of the total steps",
                lambda v: type(v) is int, _NON_NEGATIVE, False)
    a.number("warmup_ratio", _CLOSED_UNIT, nullable=True)


def _scheduler_kwargs(a: _Reader, kind: str) -> dict[str, Any]:
    """The lr_scheduler_kwargs given for schedule `kind`, checked against the arguments of its
    transformers function (names, types, ranges, and what they need of one another)."""
    given = a.obj.get("lr_scheduler_kwargs")
    if given is None:  # (what some schedules need is still checked below)
        given = {}
    if not isinstance(given, dict):
        a.fail(f"'lr_scheduler_kwargs' must be an object of the schedule's arguments, got {_describe(given)}")
    takes = _SCHEDULER_KWARGS[kind]
    for key in given:
        if key not in takes:
            a.fail(f"'lr_scheduler_kwargs': lr_scheduler {kind!r} takes no {key!r}{_hint(key, takes)} "
                   f"({'it takes ' + ', '.join(takes) if takes else 'it takes none'})")
    r = _Reader(given, f"{a.where}: 'lr_scheduler_kwargs'", takes, {})
    for key, read in takes.items():
        read(r, key)
    kwargs, lr = r.values, a.values.get("lr", AdapterConfig.lr)
    lr_end = kwargs.get("lr_end", POLYNOMIAL_LR_END)
    if kind == "polynomial" and not lr_end < lr:
        r.fail(f"'lr_end' ({lr_end:g}{'' if 'lr_end' in kwargs else ', the default'}) must be below 'lr' ({lr:g}): "
               f"polynomial decays from lr to lr_end")
    if "min_lr" in takes:
        given_min = [key for key in ("min_lr", "min_lr_rate") if kwargs.get(key) is not None]
        if len(given_min) != 1:
            r.fail(f"lr_scheduler {kind!r} needs one of 'min_lr' (the lr it decays to) and 'min_lr_rate' (that "
                   f"lr over 'lr'), got {' and '.join(repr(k) for k in given_min) or 'neither'}")
        if (kwargs.get("min_lr") or 0) > lr:
            r.fail(f"'min_lr' ({kwargs['min_lr']:g}) must be at most 'lr' ({lr:g})")
    if kind == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
        r.fail("lr_scheduler 'warmup_stable_decay' needs 'num_decay_steps' (how many steps its decay takes)")
    return kwargs


def _number_kwarg(bound: _Bound, nullable: bool = False) -> Callable[[_Reader, str], None]:
    return lambda r, key: r.number(key, bound, nullable=nullable)


def _integer_kwarg(bound: _Bound, nullable: bool = False) -> Callable[[_Reader, str], None]:
    return lambda r, key: r.integer(key, bound, nullable=nullable)


def _choice_kwarg(choices: tuple[str, ...]) -> Callable[[_Reader, str], None]:
    return lambda r, key: r.choice(key, choices)


_CLOSED_UNIT = _Bound("in [0, 1]", lambda v: 0 <= v <= 1)
# Each schedule's lr_scheduler_kwargs: the arguments of its transformers function that
# get_scheduler leaves to them, how each is read (nullable where transformers' default is None),
# and the range where the schedule means what its name says (transformers checks little).
_MIN_LR_KWARGS = {"num_cycles": _number_kwarg(_POSITIVE), "min_lr": _number_kwarg(_NON_NEGATIVE, nullable=True),
                  "min_lr_rate": _number_kwarg(_CLOSED_UNIT, nullable=True)}
_SCHEDULER_KWARGS: dict[str, dict[str, Callable[[_Reader, str], None]]] = {
    "constant": {},
    "linear": {},
    "cosine": {"num_cycles": _number_kwarg(_POSITIVE)},
    "cosine_with_restarts": {"num_cycles": _integer_kwarg(_POSITIVE)},
    "polynomial": {"lr_end": _number_kwarg(_NON_NEGATIVE), "power": _number_kwarg(_POSITIVE)},
    "inverse_sqrt": {"timescale": _integer_kwarg(_POSITIVE, nullable=True)},
    "cosine_with_min_lr": _MIN_LR_KWARGS,
    "cosine_warmup_with_min_lr": {**_MIN_LR_KWARGS, "warmup_lr_rate": _number_kwarg(_CLOSED_UNIT, nullable=True)},
    "warmup_stable_decay": {"num_decay_steps": _integer_kwarg(_NON_NEGATIVE),
                            "num_stable_steps": _integer_kwarg(_NON_NEGATIVE, nullable=True),
                            "warmup_type": _choice_kwarg(WSD_SHAPES), "decay_type": _choice_kwarg(WSD_SHAPES),
                            "min_lr_ratio": _number_kwarg(_CLOSED_UNIT), "num_cycles": _number_kwarg(_POSITIVE)},
}


def _hint(word: Any, valid: Iterable[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(valid), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _describe(value: Any) -> str:
    """A short one-line rendering for messages, like "str '8'" or "null"."""
    if value is None:
        return "null"
    kind = {dict: "object", list: "list"}.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"
