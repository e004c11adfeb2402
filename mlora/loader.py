"""Load a Hugging Face checkpoint directory (config.json + safetensors) into mlora's model.

The model is built on the meta device and each weight is read once, straight onto the
target device, cast, and assigned: a stage reads only its own tensors and no weight is
ever held twice (no random init, no second copy for `load_state_dict`).

With `quant` (QLoRA), each projection weight is quantized as soon as it is read, so the
device never holds more than one projection in full precision.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from mlora.errors import INTEGER_TOO_LONG, UserError
from mlora.models import SUPPORTED, family_for, fp8, mxfp4
from mlora.models.args import GATED_DELTANET_FAMILIES, IMAGE_TEXT_FAMILIES, REMOTE_CODE_FAMILIES, TEXT_CONFIG_TIES
from mlora.models.naming import GATE_UP_STACKED, NATIVE_MARK, Naming, StackedSlice, naming_for
from mlora.plural import counted

if TYPE_CHECKING:  # transformers is slow to import; only read_model_config needs it
    from transformers import PretrainedConfig

    from mlora.models.llama import CausalLM, ModelArgs
    from mlora.quant import QuantConfig

PathLike = str | os.PathLike

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
CONVERT_HINT = "scripts/trans_to_safetensors.py"


def read_model_config(base_dir: PathLike) -> tuple[PretrainedConfig, ModelArgs]:
    """(transformers config, ModelArgs) of the checkpoint in `base_dir`."""
    base = Path(base_dir)
    if not base.is_dir():
        what = "is a file, not a directory" if base.exists() else "does not exist"
        raise UserError(f"base model directory {str(base)!r} {what}")
    config_file = base / "config.json"
    if not config_file.is_file():
        raise UserError(f"no config.json in base model directory {str(base)!r}")
    # Check the type before AutoConfig: it raises its own long error for unknown types.
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_file} is not a valid JSON config: {e}") from None
    except ValueError:  # (after those two, ValueErrors too) Python's cap on an integer's digits
        raise UserError(f"{config_file}: {INTEGER_TOO_LONG}") from None
    except OSError as e:  # not readable by this user, an I/O error
        raise UserError(f"{config_file}: cannot read it ({e.strerror})") from None
    if not isinstance(raw, dict):  # (it said "'list' object has no attribute 'get'")
        raise UserError(f"{config_file} is not a valid JSON config: expected an object, got "
                        f"{'null' if raw is None else type(raw).__name__}")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in SUPPORTED:  # (a list was unhashable: a traceback)
        raise UserError(f"model_type {model_type!r} in {config_file} is not supported "
                        f"(supported: {', '.join(sorted(SUPPORTED))})")
    _check_quantization_config(raw.get("quantization_config"), model_type, config_file)
    if model_type in IMAGE_TEXT_FAMILIES and not isinstance(raw.get("text_config"), dict):
        # (Gemma3Config would fill in a 4B model's text config, Mistral3Config a 7B one, and
        # blame the weights)
        raise UserError(f"{config_file}: a {model_type} config needs its text_config")
    _check_intervals(raw, model_type, config_file)
    if model_type in REMOTE_CODE_FAMILIES:
        # Only the model's own code (auto_map) reads this config in transformers; mlora
        # implements the model, so the plain JSON is all it needs (no remote code runs).
        if model_type == "chatglm" and "rope_ratio_scales" not in raw:
            raw["rope_ratio_scales"] = _chatglm_rope_ratio_scales(base)
        return SimpleNamespace(**raw), _args_of(raw, model_type, config_file)

    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(base))
    except Exception as e:  # strict config validation, bad values, ...
        # transformers' validation errors span lines (validator, then the cause): one line
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        raise UserError(f"cannot read {config_file}: {detail}") from None
    if cfg.model_type not in SUPPORTED:
        # e.g. transformers reads a "mistral" config.json that has `layer_types` as "ministral"
        raise UserError(f"{config_file} (model_type {model_type!r}) is read by transformers as "
                        f"{cfg.model_type!r}, which is not supported")
    return cfg, _tied_as_transformers_ties(base, raw, _args_of(cfg, cfg.model_type, config_file))


def _tied_as_transformers_ties(base: Path, raw: dict, args: ModelArgs) -> ModelArgs:
    """A config.json without tie_word_embeddings takes its class's default, tied for Gemma and
    Mistral 3; but Mistral Small 3.x's (written by transformers 4, which left the then-default
    out) hold a head of their own, which transformers then keeps untied (it ties only tensors it
    does not find). So does mlora: untied when the checkpoint stores the head. Qwen3.5's
    image-text configs: transformers' causal LM is the text model, tied by text_config's flag
    (ModelArgs has it), so that is the flag to look for; so is Llama 4's (its head is its
    language_model's, a Llama4ForCausalLM of text_config). A config that does say tied, over a
    checkpoint whose stored head differs from its embedding, is untied too: transformers 5 keeps
    both then (with a warning), where tying would silently drop the stored head."""
    flags = raw["text_config"] if args.model_type in TEXT_CONFIG_TIES else raw
    if not args.tie_word_embeddings:
        return args
    try:
        stored = weight_index(base)
    except UserError:  # (no weights yet: whoever loads them says so)
        return args
    naming = _checkpoint_naming(args, None, stored)
    head, embed = naming.to_checkpoint("lm_head.weight"), naming.to_checkpoint("model.embed_tokens.weight")
    if head not in stored:
        return args
    if "tie_word_embeddings" not in flags:
        return replace(args, tie_word_embeddings=False)
    if embed in stored and not _stored_equal(stored, head, embed):
        print(f"mlora: note: {base}: config.json ties the head to the embedding, but the checkpoint stores a "
              f"different {head}: kept untied, as transformers does", file=sys.stderr)
        return replace(args, tie_word_embeddings=False)
    return args


def _stored_equal(stored: dict[str, Path], a: str, b: str) -> bool:
    """Whether checkpoint tensors a and b hold the same values (read only for this rare check)."""
    from safetensors import safe_open

    tensors = []
    for name in (a, b):
        with safe_open(str(stored[name]), framework="pt") as f:
            tensors.append(f.get_tensor(name))
    return tensors[0].shape == tensors[1].shape and torch.equal(tensors[0], tensors[1])


def _check_intervals(raw: dict, model_type: str, config_file: Path) -> None:
    """Config keys transformers' config classes divide by or step by, which fail on a 0 with an
    error naming no key: Qwen3.5's full_attention_interval (every how many layers one is full
    attention, when layer_types is left out); Llama 4's no_rope_layer_interval (always:
    Llama4TextConfig builds its default NoPE list even when no_rope_layers is given) and
    interleave_moe_layer_step (when moe_layers is left out)."""
    if model_type not in ("qwen3_5", "qwen3_5_moe", *GATED_DELTANET_FAMILIES, "llama4_text", "llama4"):
        return
    text = raw["text_config"] if model_type in IMAGE_TEXT_FAMILIES else raw
    if model_type in ("llama4_text", "llama4"):
        keys = ["no_rope_layer_interval"] + (["interleave_moe_layer_step"] if text.get("moe_layers") is None else [])
    else:
        keys = ["full_attention_interval"]
    for key in keys:
        value = text.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{config_file}: {key} must be an integer >= 1, got {value!r}")


def _check_quantization_config(qc, model_type: str, config_file: Path) -> None:
    """A checkpoint stored quantized is read only in the formats mlora dequantizes at load: GPT-OSS's
    MXFP4 experts (models/mxfp4.py) and FP8, block-scaled (DeepSeek-V3's) or per-tensor (Mistral
    Small 4's, Ministral 3's; models/fp8.py)."""
    if qc is None:
        return
    if not isinstance(qc, dict):
        raise UserError(f"{config_file}: quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "mxfp4" and model_type == "gpt_oss":
        return
    if method == "fp8":
        if _fp8_scheme(qc) is None:
            raise UserError(f"{config_file}: quantization_config weight_block_size must be two positive integers "
                            f"(block-scaled FP8) or null (per-tensor FP8), got {qc['weight_block_size']!r}")
        return
    raise UserError(f"{config_file}: a checkpoint stored with quantization_config quant_method {method!r} is not "
                    "supported (mlora reads full-precision, GPT-OSS's MXFP4 and FP8 weights; "
                    "load the full-precision model and quantize with --load_4bit / --load_8bit)")


def _fp8_scheme(qc) -> tuple[int, int] | str | None:
    """An FP8 quantization_config's scales: its weight_block_size, e.g. (128, 128) (transformers'
    FineGrainedFP8Config default when the key is absent), or fp8.PER_TENSOR when it is null; None
    for no FP8 quantization_config (or a weight_block_size of neither form)."""
    if not isinstance(qc, dict) or qc.get("quant_method") != "fp8":
        return None
    block = qc.get("weight_block_size", (128, 128))
    if block is None:
        return fp8.PER_TENSOR
    if (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        return tuple(block)
    return None


def _args_of(cfg, model_type: str, config_file: Path) -> ModelArgs:
    """The ModelArgs of a config (object or plain dict); a value of the wrong kind is one line."""
    try:
        return family_for(model_type).args_from_hf_config(cfg)
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
        raise UserError(f"cannot read {config_file}: {type(e).__name__}: {e}") from None


def _chatglm_rope_ratio_scales(base: Path) -> str | None:
    """How the ChatGLM model code beside the config applies rope_ratio (models/args.py,
    ROPE_RATIO_SCALES), read from its text, which is never run: ChatGLM2 divides the positions
    by it, ChatGLM3 and GLM-4 multiply the base. None: no such file, or neither pattern."""
    code = base / "modeling_chatglm.py"
    if not code.is_file():
        return None
    text = code.read_text(errors="replace")
    positions = re.search(r"/\s*self\.rope_ratio\b", text) is not None
    base_scaled = re.search(r"\*\s*self\.rope_ratio\b|\bself\.rope_ratio\s*\*", text) is not None
    if positions == base_scaled:  # neither, or both (merged versions): not guessed
        return None
    return "positions" if positions else "base"


def _weights_source(base: Path) -> Path:
    """The file that says where each tensor is: the single safetensors file or the index."""
    if (base / SAFE_SINGLE).is_file():  # transformers' own preference when both exist
        return base / SAFE_SINGLE
    if (base / SAFE_INDEX).is_file():
        return base / SAFE_INDEX
    if list(base.glob("pytorch_model*.bin")) or (base / "pytorch_model.bin.index.json").is_file():
        raise UserError(f"{base} has only PyTorch .bin weights; convert them to safetensors with {CONVERT_HINT}")
    raise UserError(f"no {SAFE_SINGLE} or {SAFE_INDEX} in base model directory {str(base)!r}")


def weight_index(base_dir: PathLike) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    base = Path(base_dir)
    source = _weights_source(base)
    if source.name == SAFE_SINGLE:
        try:
            with safe_open(str(source), framework="pt") as f:  # reads the header only
                return {name: source for name in f.keys()}
        except Exception as e:
            raise UserError(f"cannot read {source}: {e}") from None
    try:
        weight_map = json.loads(source.read_text())["weight_map"]
    # (JSONDecodeError, UnicodeDecodeError, an integer past Python's digits)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{source} is not a valid safetensors index ({e})") from None
    except OSError as e:  # not readable by this user, an I/O error
        raise UserError(f"{source}: cannot read it ({e.strerror})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise UserError(f"{source} is not a valid safetensors index (weight_map must map names to files)")
    outside = next((f for f in weight_map.values() if Path(f).name != f or f in ("", ".", "..")), None)
    if outside is not None:  # shards are files of the model directory, as transformers writes them
        raise UserError(f"{source}: shard {outside!r} is not a file name inside {base}")
    index = {name: base / file for name, file in weight_map.items()}
    for file in sorted(set(index.values())):
        if not file.is_file():
            raise UserError(f"shard {file.name} listed in {source} is missing")
    return index


def load_model(base_dir: PathLike, device: torch.device | str, dtype: torch.dtype,
               parts: Sequence[str] | None = None, quant: QuantConfig | None = None) -> CausalLM:
    """Build the CausalLM (or the stage `parts`) of `base_dir` on `device` in `dtype`, frozen.

    With `quant`, the stage's seven projections become bitsandbytes 4-bit / 8-bit layers
    (quantized from their `dtype` weights); everything else stays in `dtype`.
    `model.loaded_tensor_names` lists (sorted) the safetensors names that were read."""
    from safetensors import safe_open

    base = Path(base_dir)
    device = torch.device(device)
    if quant is not None:
        from mlora.quant import check_available

        check_available(quant, device)  # before any reading: a missing bitsandbytes fails fast
    cfg, args = read_model_config(base)
    family = family_for(cfg.model_type)
    index = weight_index(base)
    source = _weights_source(base)

    # mlora's names, and the checkpoint's for each (ChatGLM and Baichuan name them otherwise;
    # GPT-OSS stacks its experts, so many of mlora's tensors are slices of one of its tensors)
    naming = _checkpoint_naming(args, family, index)
    if parts is None or "embed" in parts:  # once per model (a pipeline's first stage)
        used = {part for n in family.tensor_names(args)
                for part in _sources_of(naming.to_checkpoint(n), index, naming)}
        # GLM-4.5's and DeepSeek-V3's multi-token-prediction layers after the last one: unused
        extra = {f"model.layers.{i}." for i in range(args.num_layers, args.num_layers + args.extra_layers)}
        # Gemma 4's KV-shared layers: a checkpoint may hold k/v projections and norms they never use
        # (transformers ignores them too)
        extra |= {naming.to_checkpoint(f"model.layers.{i}.self_attn.{m}.") for i in range(args.num_layers)
                  if args.kv_source(i) is not None for m in ("k_proj", "v_proj", "k_norm", "v_norm")}
        _warn_unused_tensors({t for t in index if not t.startswith(tuple(extra))} if extra else set(index), used,
                             index, base)
    stored = {name: naming.to_checkpoint(name) for name in family.tensor_names(args, parts)}
    # What each checkpoint tensor is read from: itself (a block-FP8 weight with its scales), or
    # (GPT-OSS's released checkpoints) the MXFP4 blocks and scales of a stacked expert weight
    sources = {t: _sources_of(t, index, naming) for t in dict.fromkeys(stored.values())}
    missing = [part for parts_of in sources.values() for part in parts_of if part not in index]
    if missing:
        raise UserError(f"tensor {missing[0]!r} is missing from {source}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    # Built once the checkpoint is known to hold its tensors: a num_hidden_layers of 100000 in
    # config.json (a typo, or the wrong file) took minutes to build on the meta device before
    # the missing tensors were told.
    with torch.device("meta"):
        model = family.CausalLM(args, parts)
    needed = list(stored)

    # Which module parameters each checkpoint tensor fills: the tied head reads the embedding.
    targets: dict[str, list[str]] = defaultdict(list)
    for pname, _ in model.named_parameters(remove_duplicate=False):
        tname = "model.embed_tokens.weight" if (pname == "lm_head.weight" and args.tie_word_embeddings) else pname
        targets[tname].append(pname)
    assert set(targets) == set(needed), (sorted(targets), needed)

    # Projection weights to quantize: read to the CPU, cast, then each one is moved to the
    # device and quantized there on its own, never a whole model in full precision on the GPU.
    quantized = {}
    if quant is not None:
        from mlora.quant import projections

        quantized = {f"{path}.weight": (parent, attr) for path, parent, attr, _ in projections(model)}
    # A stacked tensor is read to the CPU too: only one expert's slice at a time goes to the device.
    stacked = {name: naming.stacked_slice(name) for name in needed}

    def place(name: str, tensor: torch.Tensor, stored_name: str) -> None:
        """Cast one of mlora's tensors (read, or sliced from a stacked one) and put it in the model."""
        if not tensor.is_floating_point():  # (FP8 and MXFP4 ones are dequantized by now)
            # an int or bool tensor loaded, and failed in the first matmul: a traceback mid-run
            raise UserError(f"tensor {stored_name!r} holds {str(tensor.dtype).removeprefix('torch.')} values, but "
                            f"the model's weights are floating point (a quantization mlora does not read?)")
        if name == "lm_head.weight" and args.normalized_head:
            # Baichuan 2's NormHead: unit-length rows, in fp32 before any cast
            tensor = torch.nn.functional.normalize(tensor.float(), dim=-1)
        # GLM-4.5's and DeepSeek-V3's router stays in fp32 whatever the dtype, as in transformers
        target = torch.float32 if args.router_params_fp32 and _ROUTER.match(name) else dtype
        if tensor.is_floating_point() and tensor.dtype != target:
            tensor = tensor.to(target)
        if name in quantized:
            _assign_quantized(quantized[name], stored_name, tensor, quant, device)
            return
        if device.type == "cpu" and (quant is not None or stacked[name] is not None):
            # Own the memory: a tensor read on the CPU is a view of the mapped file (or of a
            # whole stacked tensor), and one such view keeps all of it alive, with every
            # full-precision projection page that quantization touched still counted in the
            # process's memory.
            tensor = tensor.clone()
        param = torch.nn.Parameter(tensor.to(device), requires_grad=False)
        for pname in targets[name]:
            _assign(model, pname, param, stored_name)

    by_stored: dict[str, list[str]] = defaultdict(list)  # checkpoint tensor -> mlora's names it fills
    for name in needed:
        by_stored[stored[name]].append(name)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for stored_name in by_stored:
        by_file[index[sources[stored_name][0]]].append(stored_name)
    read_device = "cpu" if quant is not None or any(stacked.values()) else str(device)
    fp8_scheme = _fp8_scheme(getattr(cfg, "quantization_config", None))  # (block: DeepSeek-V3's; per-tensor: Mistral's)
    for file, stored_names in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device=read_device) as f:
                present = set(f.keys())
                for stored_name in stored_names:
                    names = by_stored[stored_name]
                    if any(stacked[n] is not None for n in names):
                        # (Gemma 4's experts read gate_up_proj whole: its scales are per half all the same)
                        halved = stacked[names[0]].half is not None or (naming.experts_stacked and
                                                                         stored_name.endswith(".gate_up_proj"))
                        shape, expert = _read_stacked(f, present, file, sources[stored_name], index, dtype, device,
                                                      fp8_scheme, halved)
                        if shape[0] != args.num_experts:
                            raise UserError(f"tensor {stored_name!r} in {file} stacks "
                                            f"{counted(shape[0], 'expert')} but config.json implies {args.num_experts}")
                        if sources[stored_name][0] == stored_name:  # (MXFP4's: each expert is checked when placed)
                            # the whole tensor, before any slice of it: one of the wrong width would
                            # split gate_up_proj's gate rows from its up rows at the wrong row
                            want = stacked[names[0]].stacked_shape(args.num_experts,
                                                                   model.get_parameter(targets[names[0]][0]).shape)
                            if tuple(shape) != want:
                                raise UserError(f"tensor {stored_name!r} in {file} has shape {tuple(shape)} but "
                                                f"config.json implies {want}")
                        for name in names:
                            place(name, expert(stacked[name]).contiguous(), stored_name)
                        continue
                    if stored_name not in present:
                        raise UserError(f"tensor {stored_name!r} is missing from {file}")
                    tensor = f.get_tensor(stored_name)
                    if tensor.dtype in fp8.FP8_DTYPES:  # DeepSeek-V3's (block) and Mistral's (per-tensor) releases
                        tensor = _dequantize_fp8(f, file, stored_name, tensor, sources[stored_name], index, fp8_scheme)
                    for name in names:
                        place(name, tensor, stored_name)
        except UserError:
            raise
        except _QuantizeFailed as e:  # not the file's fault: keep the real error and traceback
            raise e.__cause__ from None
        except Exception as e:  # corrupt or truncated file
            raise UserError(f"cannot read {file}: {e}") from None

    model.tie_weights()
    for pname, p in model.named_parameters():
        assert not p.is_meta, f"{pname} was not loaded"
        p.requires_grad_(False)
    model.eval()  # the base has no dropout; this just keeps `training` honest
    # as the checkpoint names them (an MXFP4 weight: its blocks and scales)
    model.loaded_tensor_names = sorted({t for parts_of in sources.values() for t in parts_of})
    return model


# Tensors a checkpoint may hold that no model computes with: RoPE tables some releases saved,
# the image-text models' vision towers and projectors (mlora trains the language model; Qwen3.5's
# `model.visual`), Qwen3.5's multi-token-prediction layer (`mtp.`), a tied head's copy.
_UNUSED_OK = re.compile(r".*rotary_(emb|pos_emb)\.inv_freq$|"
                        r"^(vision_tower|vision_model|multi_modal_projector|model\.visual|mtp)\.|"
                        # (Gemma 4's, Mistral 3's)
                        r"^model\.(vision_tower|embed_vision|audio_tower|embed_audio|multi_modal_projector)\.|"
                        r".*[._]activation_scale$|"  # (per-tensor FP8's static activation scheme: run-time only)
                        r"^(language_model\.)?lm_head\.weight$")


_ROUTER = re.compile(r".*\.mlp\.gate\.(weight|e_score_correction_bias)$")


def _checkpoint_naming(args: ModelArgs, family, index: dict[str, Path]) -> Naming:
    """The checkpoint's naming: for a GATE_UP_STACKED family whose checkpoint stacks its experts as
    transformers 5 holds them (any one of them: then all are read so), the stacked one; for a mistral3
    one named as transformers 5's modules (`model.language_model.*`: Mistral Small 4's release), that.
    family None: the naming of the non-expert tensors only."""
    native = args.model_type == "mistral3" and NATIVE_MARK in index
    if args.model_type in GATE_UP_STACKED and family is not None:
        stacked = naming_for(args.model_type, experts_stacked=True, native=native)
        parts = map(stacked.stacked_slice, family.tensor_names(args))
        if any(part is not None and part.tensor in index for part in parts):
            return stacked
    return naming_for(args.model_type, native=native)


def _sources_of(tensor: str, index: dict[str, Path], naming) -> tuple[str, ...]:
    """The checkpoint tensors a tensor is read from: itself (and, a block-FP8 weight, its scales),
    or for a stacked expert weight that the checkpoint stores in MXFP4 (GPT-OSS's releases), its
    blocks and scales."""
    if tensor in index:
        return (tensor, fp8.scale_name(tensor)) if fp8.scale_name(tensor) in index else (tensor,)
    parts = (mxfp4.blocks_name(tensor), mxfp4.scales_name(tensor))
    if not naming.stacks_experts or not any(p in index for p in parts):
        return (tensor,)
    return parts  # (one of them missing: the error names it)


def _dequantize_fp8(f, file: Path, name: str, weight: torch.Tensor, parts_of: tuple[str, ...],
                    index: dict[str, Path], scheme: tuple[int, int] | str | None) -> torch.Tensor:
    """An FP8 weight read with its scales (models/fp8.py), in fp32; scheme: the config's
    weight_block_size, or fp8.PER_TENSOR."""
    if scheme is None or len(parts_of) < 2:
        raise UserError(f"tensor {name!r} in {file} is float8 but " + ("config.json has no FP8 quantization_config"
                        if scheme is None else f"{fp8.scale_name(name)!r} is missing"))
    scale = _read_other(f, file, parts_of[1], index).to(weight.device)  # (another shard's is read to the CPU)
    try:
        # One scale is per tensor whatever the config says: transformers reads the blocks from the
        # scale's shape, so a per-tensor checkpoint whose config leaves weight_block_size out (its
        # default: 128 x 128) loads there too
        if scheme == fp8.PER_TENSOR or scale.numel() == 1:
            return fp8.dequantize_per_tensor(weight, scale)
        return fp8.dequantize(weight, scale, scheme)
    except ValueError as e:
        raise UserError(f"{file}: {parts_of[1]}: {e}") from None


def _read_other(f, file: Path, name: str, index: dict[str, Path]) -> torch.Tensor:
    """A tensor that may live in another shard than the one f reads."""
    if index[name] == file:
        return f.get_tensor(name)
    from safetensors import safe_open

    try:
        with safe_open(str(index[name]), framework="pt") as g:
            return g.get_tensor(name)
    except Exception as e:
        raise UserError(f"cannot read {index[name]}: {e}") from None


def _read_stacked(f, present: set[str], file: Path, parts_of: tuple[str, ...], index: dict[str, Path],
                  dtype: torch.dtype, device: torch.device, fp8_scheme: tuple[int, int] | str | None = None,
                  halved: bool = False) -> tuple[tuple[int, ...], Callable[[StackedSlice], torch.Tensor]]:
    """A stacked expert tensor (f reads to the CPU, mapped, not copied): (its shape, its MXFP4
    blocks' if so stored, and a function giving one expert's slice in nn.Linear's layout). Stored in
    MXFP4 or per-tensor FP8, each expert is dequantized when asked for, on `device`, so that no whole
    stacked tensor is ever held in full precision (and a GPU does the work). halved: the tensor is
    gate_up_proj, whose per-tensor FP8 scales are one per expert and half."""
    if parts_of[0] not in present:
        raise UserError(f"tensor {parts_of[0]!r} is missing from {file}")
    if len(parts_of) == 1 or parts_of[1] == fp8.scale_name(parts_of[0]):
        # GPT-OSS's [E, in, out] (a weight) or [E, out] (a bias); the other families' [E, out, in]
        # (gate_up_proj: [E, 2 * I, H], gate rows then up rows)
        stacked = f.get_tensor(parts_of[0])
        if stacked.dtype in fp8.FP8_DTYPES:
            scales = _stacked_fp8_scales(f, file, parts_of, index, stacked.shape, fp8_scheme, halved)
        else:
            scales = None

        def expert(part: StackedSlice) -> torch.Tensor:
            weight = stacked[part.expert]
            if scales is not None:  # [2, 1] (gate, up) or [1, 1]: this expert's (half's) one scale
                scale = scales[part.expert]
                if part.half is not None:  # (Llama 4's [H, 2 * I]: the halves of its columns)
                    weight, scale = weight.chunk(2, dim=-1 if part.transposed else 0)[part.half], scale[part.half]
                elif scale.shape[0] == 2:  # a whole gate_up_proj (Gemma 4's experts): each half by its scale
                    halves = weight.chunk(2, dim=-1 if part.transposed else 0)
                    weight = torch.cat([fp8.dequantize_per_tensor(h.to(device), s.to(device))
                                        for h, s in zip(halves, scale)], dim=-1 if part.transposed else 0)
                    return weight.t() if part.transposed else weight
                weight = fp8.dequantize_per_tensor(weight.to(device), scale.to(device))
                return weight.t() if part.transposed else weight
            weight = weight.t() if part.transposed else weight
            return weight if part.half is None else weight.chunk(2)[part.half]

        return tuple(stacked.shape), expert
    blocks_name, scales_name = parts_of
    blocks = f.get_tensor(blocks_name)  # [E, out, in / 32, 16]
    scales = _read_other(f, file, scales_name, index)  # [E, out, in / 32]
    if blocks.shape[:-1] != scales.shape:
        raise UserError(f"{file}: {blocks_name}: MXFP4 blocks {tuple(blocks.shape)} do not match scales "
                        f"{tuple(scales.shape)}")

    def expert(part: StackedSlice) -> torch.Tensor:  # [out, in]: the weight as nn.Linear holds it
        try:
            return mxfp4.dequantize(blocks[part.expert].to(device), scales[part.expert].to(device), dtype)
        except ValueError as e:
            raise UserError(f"{file}: {blocks_name}: {e}") from None

    return tuple(blocks.shape), expert


def _stacked_fp8_scales(f, file: Path, parts_of: tuple[str, ...], index: dict[str, Path], shape: torch.Size,
                        scheme: tuple[int, int] | str | None, halved: bool) -> torch.Tensor:
    """A stacked FP8 expert tensor's per-tensor scales (on the CPU), checked whole: [E, 2, 1] for
    gate_up_proj, [E, 1, 1] otherwise. Block-scaled stacked experts are refused (fp8.py dequantizes
    those per 2D weight)."""
    name = parts_of[0]
    if scheme is None:
        raise UserError(f"tensor {name!r} in {file} is float8 but config.json has no FP8 quantization_config")
    if len(parts_of) < 2:
        raise UserError(f"tensor {name!r} in {file} is float8 but {fp8.scale_name(name)!r} is missing")
    scales = _read_other(f, file, parts_of[1], index)
    want = fp8.per_expert_scale_shape(shape[0], halved)
    if scheme != fp8.PER_TENSOR and tuple(scales.shape) != want:  # (per tensor by their shape: as transformers)
        raise UserError(f"tensor {name!r} in {file} stacks experts in FP8, which mlora reads only with per-tensor "
                        f"scales ({want}; block-scaled FP8 experts stored one tensor per expert are read)")
    if tuple(scales.shape) != want:
        raise UserError(f"tensor {parts_of[1]!r} in {index[parts_of[1]]} has shape {tuple(scales.shape)} "
                        f"but per-tensor FP8 scales of {name} {tuple(shape)} are {want}")
    return scales


def _warn_unused_tensors(stored: set[str], used: set[str], index: dict[str, Path], base: Path) -> None:
    """A checkpoint tensor this config leaves unused means config.json and the weights disagree
    (a bias the config turns off, fewer layers than the file has): say so, as transformers does.
    A tensor of no elements holds no weights to lose: transformers saves the shared experts of
    n_shared_experts 0 (DeepSeek-V2/V3, GLM-4.5, Mistral Small 4) as [0, H] and [H, 0] weights,
    which mlora does not build, and those were warned of."""
    unused = _with_elements(sorted(name for name in stored - used if not _UNUSED_OK.match(name)), index)
    if unused:
        more = f" and {len(unused) - 1} more" if len(unused) > 1 else ""
        print(f"mlora: warning: {base}: config.json leaves tensor {unused[0]!r}{more} of the checkpoint unused "
              f"(does config.json describe these weights?)", file=sys.stderr)


def _with_elements(names: list[str], index: dict[str, Path]) -> list[str]:
    """Those of `names` whose tensor holds at least one element (from the files' headers). One
    whose shape cannot be read is kept, to be warned of as before this check: a name the index
    lists but its shard lacks, or a shard whose header is damaged (the load reads neither)."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for file in dict.fromkeys(index[name] for name in names):
        try:
            with safe_open(str(file), framework="pt") as f:  # (reads the header only)
                present = set(f.keys())
                shapes |= {name: f.get_slice(name).get_shape() for name in names
                           if index[name] == file and name in present}
        except (SafetensorError, OSError):
            continue
    return [name for name in names if name not in shapes or math.prod(shapes[name])]


def _assign_quantized(slot: tuple[torch.nn.Module, str], pname: str, weight: torch.Tensor,
                      quant: QuantConfig, device: torch.device) -> None:
    """Swap the (meta) projection in `slot` for its quantized layer holding `weight`; its bias,
    if any, is still meta and is filled by `_assign` like any other tensor."""
    from mlora.quant import quantize_linear

    parent, attr = slot
    linear = getattr(parent, attr)
    if weight.shape != linear.weight.shape:
        raise UserError(f"tensor {pname!r} has shape {tuple(weight.shape)} but config.json implies "
                        f"{tuple(linear.weight.shape)}")
    try:
        layer = quantize_linear(linear, weight, quant, device)
    except UserError:
        raise
    except Exception as e:
        raise _QuantizeFailed() from e
    setattr(parent, attr, layer)


class _QuantizeFailed(Exception):
    """Carries a quantization error past the handler that blames the file for read errors."""


def _assign(model: torch.nn.Module, pname: str, param: torch.nn.Parameter, stored_name: str) -> None:
    module_name, _, attr = pname.rpartition(".")
    module = model.get_submodule(module_name)
    expected = getattr(module, attr).shape
    if param.shape != expected:
        raise UserError(f"tensor {stored_name!r} has shape {tuple(param.shape)} "
                        f"but config.json implies {tuple(expected)}")
    setattr(module, attr, param)
