"""Everything a command needs, checked before any work starts: the config, the device, the
base model, the tokenizer and every adapter's data. Every mistake a user can make surfaces
here as a UserError, before the output directory is touched."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mlora.batching import check_evaluable
from mlora.config import (EXPERT_TARGET_MODULES, MLORA_MODULE_NAMES, NATIVE_MODULE_NAMES, TrainConfig, load_config,
                          projection_of)
from mlora.chat_template import template_named, unmarked_end_of_turn, with_chat_template
from mlora.data import Example, encode_rows, load_rows, load_template, unread_columns, unread_keys_note
from mlora.device import dtype_note, resolve_device, resolve_dtype
from mlora.errors import UserError
from mlora.loader import load_model, read_model_config, weight_index
from mlora.models.args import REMOTE_CODE_FAMILIES
from mlora.lora import MLP_MODULES, BatchLayout, LoraLinear, check_kernel, inject_lora
from mlora.loss import check_cross_entropy
from mlora.loss_scale import needs_loss_scaling
from mlora.models.naming import Naming, naming_for


@dataclass
class AdapterData:
    train: list[Example]
    test: list[Example]  # test_data, or the training rows when the adapter has none


@dataclass
class Session:
    cfg: TrainConfig
    base_dir: Path
    device: torch.device
    dtype: torch.dtype
    tokenizer: object
    data: dict[str, AdapterData]
    quant: object | None = None  # mlora.quant.QuantConfig for a 4-/8-bit base
    model: torch.nn.Module | None = None
    layout: BatchLayout = field(default_factory=BatchLayout)
    wrappers: dict[str, LoraLinear] = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    @property
    def loss_scaling(self) -> bool:
        """The backward runs in fp16 somewhere: the adapters scale their losses (loss_scale.py)."""
        return needs_loss_scaling(self.dtype, self.quant)

    @property
    def naming(self) -> Naming:
        """The base checkpoint's names (ChatGLM's, Baichuan's and Gemma 3 image-text's differ from mlora's)."""
        return naming_for(self.model.args.model_type) if self.model is not None else Naming()

    def load_base(self) -> None:
        """Load the frozen base onto the device and wrap its target projections."""
        self.model = load_model(self.base_dir, self.device, self.dtype, quant=self.quant)
        self.wrappers = inject_lora(self.model, self.layout)


def resolve_targets(cfg: TrainConfig, model_args) -> TrainConfig:
    """Every adapter's target_modules as mlora names the projections, checked against the base:
    LLaMA-style models have q/k/v/o_proj and gate/up/down_proj, Phi-3 qkv_proj, o_proj,
    gate_up_proj and down_proj, GLM q/k/v/o_proj, gate_up_proj and down_proj, DeepSeek-V2/V3 q_proj or
    q_a_proj and q_b_proj, kv_a_proj_with_mqa, kv_b_proj and o_proj (an adapter would otherwise
    train nothing on a name the model lacks). ChatGLM's and Baichuan's own names
    (query_key_value, W_pack, dense, ...) are taken on those models only; m-LoRA's (w1_proj, w1,
    ...) on any, and its errors name them as written."""
    from mlora.memory import projection_shapes

    naming = naming_for(model_args.model_type)

    def named(m: str) -> str:  # ChatGLM's and Baichuan's own name, then mlora's
        return m if naming.leaf(m) == m else f"{naming.leaf(m)} ({m})"

    has = list(projection_shapes(model_args))
    resolved = []
    for a in cfg.lora:
        foreign = [m for m in a.target_modules if m in NATIVE_MODULE_NAMES and naming.leaf(NATIVE_MODULE_NAMES[m]) != m]
        missing = foreign or [m for m in a.target_modules
                              if m not in NATIVE_MODULE_NAMES and projection_of(m) not in has]
        if missing:
            default = " (q_proj, v_proj is the default: set target_modules)" if a.target_modules == [
                "q_proj", "v_proj"] else ""
            if model_args.experts_named:  # (Gemma 4 26B-A4B, Llama 4: PEFT sees their experts as parameters)
                mlps = "dense MLP's" if model_args.moe_beside_mlp else "dense MLPs' and shared expert's"
                default += (f"; gate_proj, up_proj, down_proj are its {mlps}, "
                            f"{', '.join(EXPERT_TARGET_MODULES)} its experts'")
            raise UserError(f"adapter {a.name!r}: target_modules {', '.join(missing)} not in this "
                            f"{model_args.model_type} model (its projections: {', '.join(map(named, has))}){default}")
        mine = {projection_of(m) for m in a.target_modules}
        resolved.append(replace(a, target_modules=[m for m in has if m in mine]))
        if model_args.experts_named:
            _check_named_expert_targets(resolved[-1], model_args.model_type)
        if model_args.is_moe:
            # an m-LoRA name (w1_proj) as the user wrote it, not as mlora or the model names it
            written = {projection_of(m): m for m in a.target_modules if m in MLORA_MODULE_NAMES}
            _check_expert_targets(resolved[-1], model_args.model_type, lambda m: written.get(m) or named(m))
    return replace(cfg, lora=resolved)


def without_dropout(cfg: TrainConfig) -> TrainConfig:
    """cfg with every adapter's dropout 0, for the commands that only run trained adapters (eval,
    generate): LoRA dropout applies in training only, so its rate changes nothing they compute.
    resolve_targets refuses dropout on an MoE model's experts because PEFT could not load what
    training would save; that rule is training's, and refused an adapter already trained (by
    PEFT on per-expert modules, say) whose config kept a rate (the default is 0.05)."""
    return replace(cfg, lora=[replace(a, dropout=0.0) for a in cfg.lora])


def note_partial_targets(cfg: TrainConfig, model_args) -> None:
    """Say on stderr which adapters have LoRA on some of the base's layers only, because their
    target_modules are in some layers only (Qwen3.5's q/k/v/o_proj in its softmax-attention
    layers, a quarter of them; its in_proj_* in the linear-attention ones; an MoE model's MLP
    targets in its sparse layers, not its dense ones; Llama 4's experts.gate_up_proj and
    experts.down_proj likewise; Gemma 4's k/v_proj not in its KV-shared layers): as with PEFT,
    which a user of the default q_proj, v_proj may not expect."""
    from mlora.memory import projection_shapes

    # Per layer: its kind of mixer, on an MoE model whether its MLP is sparse (a dense layer's
    # MLP takes no LoRA there: lora.inject_lora; but Llama 4's), whether it has experts named by
    # config.EXPERT_TARGET_MODULES (Llama 4's sparse layers), whether it shares another's keys
    # and values (Gemma 4's KV-shared layers have no k/v_proj)
    every = [True] * model_args.num_layers
    layers = list(zip(model_args.layer_kinds,
                      model_args.moe_layers if model_args.is_moe and model_args.mlp_lora_on_experts else every,
                      model_args.moe_layers if model_args.is_moe and model_args.experts_named else every,
                      [model_args.kv_source(i) is not None for i in range(model_args.num_layers)]))
    offers = {(kind, lora_mlp, experts, shared): [m for m in projection_shapes(model_args, kind, shared,
                                                                               named_experts=experts)
                                                  if lora_mlp or m not in MLP_MODULES]
              for kind, lora_mlp, experts, shared in set(layers)}
    for a in cfg.lora:
        untouched = [layer for layer, names in offers.items() if not set(a.target_modules) & set(names)]
        if not untouched:
            continue
        reached = sum(layer not in untouched for layer in layers)
        others = dict.fromkeys(m for layer in untouched for m in offers[layer])
        print(f"mlora: note: adapter {a.name!r}: its target_modules are in {reached} of this {model_args.model_type} "
              f"model's {len(layers)} layers only; LoRA goes there (the other layers' LoRA targets: "
              f"{', '.join(others)})", file=sys.stderr)


def _check_named_expert_targets(a, model_type: str) -> None:
    """Gemma 4 26B-A4B's and Llama 4's experts take one LoRA per stacked parameter in PEFT
    (target_parameters: ParamWrapper), which refuses dropout; one LoRA on each expert's whole
    gate_up_proj, so rsLoRA scales it as mlora does (alpha / sqrt(r))."""
    on_experts = [m for m in a.target_modules if m in EXPERT_TARGET_MODULES]
    if on_experts and a.dropout:
        raise UserError(f"adapter {a.name!r}: dropout must be 0 when target_modules include "
                        f"{', '.join(on_experts)} on this {model_type} model (PEFT cannot load dropout on experts)")


def _check_expert_targets(a, model_type: str, named) -> None:
    """An adapter on the experts of an MoE model must be one PEFT can load on transformers 5,
    which stacks each layer's experts (gate and up fused) into parameters: PEFT turns the
    per-expert gate and up LoRAs into one of twice the rank and alpha (so both or neither, and
    no rsLoRA on them: its alpha / sqrt(r) would change) and refuses dropout on parameters.
    named: a projection's name in the errors (as the user wrote it, or as the model names it)."""
    on_experts = [m for m in a.target_modules if m in MLP_MODULES]
    if not on_experts:
        return
    if model_type in ("llama4_text", "llama4"):  # (its dense MLPs and shared expert take them: lora.inject_lora)
        return
    if model_type in ("qwen2_moe", "qwen3_5_moe_text", "qwen3_5_moe", "qwen3_next", "mistral4"):
        # PEFT converts Qwen3-MoE's and OLMoE's per-expert adapters to transformers 5's stacked
        # experts, but not Qwen2-MoE's, Qwen3.5-MoE's or Qwen3-Next's (transformers converts its
        # checkpoints as Qwen2-MoE's), nor Mistral Small 4's (transformers has no conversion for
        # it: its checkpoints are stacked): it would drop the experts' LoRA (and put the rest on
        # the shared expert, which mlora would not have trained)
        raise UserError(f"adapter {a.name!r}: on this {model_type} model target the attention projections only "
                        f"(not {', '.join(map(named, on_experts))}): PEFT does not load LoRA on its experts")
    pair = {"gate_proj", "up_proj"}
    if pair & set(on_experts) and not pair <= set(on_experts):
        raise UserError(f"adapter {a.name!r}: on this {model_type} model target {named('gate_proj')} and "
                        f"{named('up_proj')} together or neither (PEFT fuses the experts' two into one LoRA)")
    if a.dropout:
        raise UserError(f"adapter {a.name!r}: dropout must be 0 when target_modules include the experts' "
                        f"{', '.join(map(named, on_experts))} on this {model_type} model (PEFT cannot load "
                        f"dropout on experts)")
    if a.use_rslora and pair <= set(on_experts):
        raise UserError(f"adapter {a.name!r}: use_rslora does not go with the experts' {named('gate_proj')} and "
                        f"{named('up_proj')} on this {model_type} model (PEFT fuses them into one LoRA of twice "
                        "the rank and alpha, which rsLoRA scales otherwise)")


# Dropout inside the base model, which transformers applies in training mode and mlora does
# not (the base is frozen; released models set 0). ChatGLM's hidden_dropout is its own code's.
# (Phi-3's embd_pdrop is not here: transformers' Phi3Model reads no such rate, so neither
# drops out after the embedding.)
BASE_DROPOUTS = ("attention_dropout", "resid_pdrop", "hidden_dropout")


def warn_unapplied_dropout(hf_config) -> None:
    """Say which of the base config's training-time settings mlora does not apply: dropout, and
    an MoE router's balancing loss."""
    # An image-text checkpoint (Gemma 3, Mistral 3, Qwen3.5, Llama 4, ...) keeps its language
    # model's settings in text_config, which the outer config does not answer for
    text = getattr(hf_config, "text_config", None)
    configs = [hf_config] if text is None else [hf_config, text]

    def setting(key):
        return next((v for v in (getattr(c, key, None) for c in configs) if v is not None), None)

    rates = {k: setting(k) for k in BASE_DROPOUTS}
    set_ = {k: v for k, v in rates.items() if isinstance(v, (int, float)) and v > 0}
    if set_:
        listed = ", ".join(f"{k}={v}" for k, v in set_.items())
        print(f"mlora: warning: the base model's {listed} is not applied (mlora runs the frozen base "
              "without dropout; transformers + PEFT would drop out in training)", file=sys.stderr)
    if setting("output_router_logits") is True:
        print("mlora: warning: the base model's output_router_logits is set, but mlora trains on the language "
              "modelling loss only (transformers + PEFT would add the router's balancing loss)", file=sys.stderr)


# The files a Hugging Face tokenizer is loaded from (one of them at least)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(base_dir: Path, trust_remote_code: bool = False, model_type: str | None = None):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    quiet = model_type in REMOTE_CODE_FAMILIES
    if quiet:
        # AutoTokenizer reads config.json too and warns that no transformers class has its
        # model_type (mlora has one; the tokenizer does not depend on it)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types for a missing/broken tokenizer
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise UserError(f"base_model {base_dir}: its tokenizer is code shipped with the model; pass "
                            "--trust_remote_code to run it") from None
        if not any((base_dir / name).is_file() for name in TOKENIZER_FILES):
            # (transformers' first line then was "Couldn't instantiate the backend tokenizer from one of:")
            raise UserError(f"base_model {base_dir}: no tokenizer in it "
                            f"(none of {', '.join(TOKENIZER_FILES)})") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"base_model {base_dir}: cannot load its tokenizer ({first})") from None
    finally:
        if quiet:
            hf_logging.set_verbosity(verbosity)


def encode_file(path: str, tokenizer, prompt: str, cutoff_len: int, train_on_inputs: bool,
                noted: set[tuple] | None = None) -> list[Example]:
    """The file's rows, encoded. Before encoding, a note on stderr names the keys that no row
    shape reads (a misspelt "inptu" drops every row's input); once per file and chat template
    (adapters sharing the file may render its messages through templates that read other keys),
    and a note said already for the file is not said again: `noted` holds the (file, template)
    pairs worked out and the (file, note) pairs told (None: tell nothing)."""
    rows = load_rows(path)
    real, template = os.path.realpath(path), repr(getattr(tokenizer, "chat_template", None))
    if noted is not None and (real, "template", template) not in noted:
        noted.add((real, "template", template))
        note = unread_keys_note(rows, tokenizer, unread_columns(path))
        if note and (real, "note", note) not in noted:
            noted.add((real, "note", note))
            print(f"mlora: note: {path}: {note}", file=sys.stderr)
    return encode_rows(rows, tokenizer, load_template(prompt), cutoff_len, train_on_inputs, source=str(path))


def note_unmarked_end_of_turn(name: str, tokenizer) -> None:
    """A note where the adapter's chat template marks its answers with {% generation %} but not
    the token that ends them (chat_template.unmarked_end_of_turn): the adapter would never learn
    to end a turn, and generation, which stops there, would run on."""
    token = unmarked_end_of_turn(tokenizer)
    if token is not None:
        named = template_named(tokenizer)  # (an adapter's own names its adapter; the tokenizer's does not)
        named = f"the tokenizer's chat template (adapter {name!r} trains through it)" if named == "the chat template" \
            else named
        print(f"mlora: note: {named} marks the answers with "
              f"{{% generation %}} but not the {token} that ends them, so the adapter never learns to end "
              f"its turn; put {token} inside the block (before {{% endgeneration %}})", file=sys.stderr)


def open_session(base_model: str | os.PathLike, config_path: str | os.PathLike, *,
                 output_dir: str | None = None, device: str | None = None,
                 dtype: str | None = None, seed: int | None = None, quant=None,
                 load_base: bool = True, trust_remote_code: bool = False,
                 reads: str = "train", data_notes: bool = True, weights: bool = True) -> Session:
    """Everything a command needs, checked before work starts. reads: the command, by the data
    it reads (config.READS): "train" every adapter's rows; "eval" its test rows only (the
    training rows where it has no test_data, which stand in for them; session.data's train
    is empty otherwise); "generate" none (session.data stays empty). trust_remote_code: the
    base's tokenizer may run code shipped with it (ChatGLM, Baichuan). data_notes: tell the
    keys of the data files that nothing reads (a pipeline's ranks read the same files: rank 0
    tells). weights: check that the base's weights are there (their index; `mlora train
    --dry_run` plans without them, from config.json and the tokenizer)."""
    check_kernel()
    check_cross_entropy()
    cfg = load_config(config_path, reads=reads)
    if output_dir is not None:
        if not str(output_dir).strip():
            raise UserError("--output_dir is empty (give a directory, or leave it out to use the config's)")
        cfg = replace(cfg, output_dir=str(output_dir))
    # "~/runs" as the config's input paths take it (config.py expands them), not a directory
    # named "~" made in the working directory (the shell expands a bare ~ only, not "--x=~/y")
    cfg = replace(cfg, output_dir=os.path.expanduser(cfg.output_dir))
    if seed is not None:
        cfg = replace(cfg, seed=seed)
    torch_device = resolve_device(device)
    check_kernel(torch_device)
    check_cross_entropy(torch_device)
    torch_dtype = resolve_dtype(torch_device, dtype)
    notes = [dtype_note(torch_device, torch_dtype)]
    compute = getattr(quant, "compute_dtype", None)  # a 4-bit base's matmul dtype, when it is not the run's
    if compute is not None and compute != torch_dtype:
        notes.append(dtype_note(torch_device, compute, flag="--compute_dtype"))
    for note in filter(None, notes):
        print(f"mlora: note: {note}", file=sys.stderr)
    if not str(base_model).strip():  # (Path("") is ".": "no config.json in base model directory '.'" puzzled)
        raise UserError("--base_model is empty (give the base model's directory)")
    base_dir = Path(base_model)
    hf_config, model_args = read_model_config(base_dir)  # config.json present and of a supported family
    if reads != "train":
        cfg = without_dropout(cfg)
    cfg = resolve_targets(cfg, model_args)
    note_partial_targets(cfg, model_args)
    warn_unapplied_dropout(hf_config)
    if weights:
        weight_index(base_dir)  # weights present
    tokenizer = load_tokenizer(base_dir, trust_remote_code, model_args.model_type)
    if tokenizer.eos_token_id is None:
        raise UserError(f"base_model {base_dir}: the tokenizer has no EOS token")
    vocab = model_args.vocab_size
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    if pad >= vocab:
        raise UserError(f"base_model {base_dir}: the tokenizer's padding token id {pad} is outside the "
                        f"model's vocab_size {vocab} (is the tokenizer the model's?)")
    data = {}
    noted = set() if data_notes else None  # adapters may share a file: one note for it
    for a in cfg.lora if reads != "generate" else ():
        # (eval with test_data: the training rows, maybe millions, are not read at all)
        own = with_chat_template(tokenizer, a.chat_template, (a.name,))  # (its chat rows render through its own)
        if reads == "train" and data_notes and not a.train_on_inputs:
            note_unmarked_end_of_turn(a.name, own)
        train = (encode_file(a.data, own, a.prompt, cfg.cutoff_len, a.train_on_inputs, noted)
                 if reads == "train" or not a.test_data else [])
        test = (encode_file(a.test_data, own, a.prompt, cfg.cutoff_len, a.train_on_inputs, noted)
                if a.test_data else train)
        for path, examples in ((a.data, train), (a.test_data, test)) if test is not train else ((a.data, train),):
            # Before anything is written: an id past the embedding would fail mid-run.
            largest = max((max(ex.input_ids, default=0) for ex in examples), default=0)
            if largest >= vocab:
                raise UserError(f"adapter {a.name!r}: {path} tokenizes to id {largest}, outside the model's "
                                f"vocab_size {vocab} (is the tokenizer in {base_dir} the model's?)")
        if reads == "train":
            check_evaluable(test, a, cfg.cutoff_len)
        data[a.name] = AdapterData(train, test)
    if quant is not None:
        from mlora.quant import check_available

        check_available(quant, torch_device)  # before the data and the weights are read
    session = Session(cfg, base_dir, torch_device, torch_dtype, tokenizer, data, quant)
    if load_base:
        session.load_base()
    return session
