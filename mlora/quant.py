"""QLoRA: the frozen base's projections in 4-bit (NF4/FP4) or 8-bit through bitsandbytes.

(On a mixture-of-experts model every expert's projections too, the router excepted:
transformers 5 stacks the experts into 3D parameters that bitsandbytes does not quantize, so
there its base keeps them in full precision and the bit-for-bit claim below does not hold.)

Only the seven projections (q, k, v, o, gate, up, down) are quantized; the embedding, the
norms and the head stay in full precision, as in QLoRA and transformers' `load_in_4bit`.
(transformers quantizes every other nn.Linear too: routers such as Llama 4's and Gemma 4's
`router.proj`, Gemma 4 E2B/E4B's per-layer input projections. mlora keeps those few in full
precision, so on such models the bit-for-bit claim below covers the seven projections only.)
The quantized layers are bitsandbytes' own `Linear4bit` / `Linear8bitLt`, built with the same
calls transformers makes, so a base quantized here holds bit-for-bit the weights of
`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` and a saved adapter means
the same thing on both. `LoraLinear` wraps them like any linear: the base matmul (and so the
dequantization) runs once per fused batch for every adapter's rows, and the LoRA weights stay
fp32 beside it. The base is frozen: autograd passes only the activation gradient through.

This is the only module that imports bitsandbytes, and only when a quantized base is asked for.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from mlora.device import dtype_flag
from mlora.errors import UserError
from mlora.lora import ALL_TARGET_MODULES, LoraLinear

INSTALL_HINT = "pip install bitsandbytes"
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCKSIZE_4BIT = 64  # bitsandbytes' and transformers' default


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize the base's projections; invalid settings raise a UserError."""

    bits: int  # 4 or 8
    quant_type: str = "nf4"  # 4-bit: nf4 | fp4
    double_quant: bool = False  # 4-bit: quantize the absmax scales too (~0.4 bit/param less)
    compute_dtype: torch.dtype | None = None  # 4-bit matmul dtype; None -> the model dtype

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise UserError(f"quantization bits must be 4 or 8, got {self.bits!r}")
        if self.bits == 4 and self.quant_type not in QUANT_TYPES:
            raise UserError(f"4-bit quant_type must be one of {', '.join(QUANT_TYPES)}, got {self.quant_type!r}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise UserError(f"quantization compute dtype must be fp32, bf16 or fp16, got {self.compute_dtype}")
        # 8-bit layers have neither option (they compute in the activation dtype); saying so
        # beats silently ignoring a flag the user typed.
        if self.bits == 8 and self.double_quant:
            raise UserError("double quantization applies to 4-bit bases only")
        if self.bits == 8 and self.compute_dtype is not None:
            raise UserError("a compute dtype applies to 4-bit bases only (8-bit computes in the model dtype)")


# str(QuantConfig), as a checkpoint's fingerprint records it (checkpoint.run_fingerprint)
_RECORDED = re.compile(r"QuantConfig\(bits=(?P<bits>\d+), quant_type='(?P<type>\w+)', "
                       r"double_quant=(?P<double>True|False), compute_dtype=(?P<compute>[\w.]+)\)")


def flags_of_recorded(recorded: str | None) -> str | None:
    """The command-line flags that quantize a base as `recorded` (str of a QuantConfig, or "None"
    for a full-precision base: "" then) says, e.g. "--load_4bit --quant_type fp4 --double_quant";
    None for a text that is neither."""
    if recorded == "None":
        return ""
    found = _RECORDED.fullmatch(recorded or "")
    if found is None:
        return None
    if found["bits"] == "8":
        return "--load_8bit"
    flags = ["--load_4bit"]
    if found["type"] != "nf4":
        flags += ["--quant_type", found["type"]]
    if found["double"] == "True":
        flags.append("--double_quant")
    if found["compute"] != "None":
        compute = dtype_flag(found["compute"])
        if compute is None:
            return None
        flags += ["--compute_dtype", compute]
    return " ".join(flags)


class _QuietBnb(logging.Filter):
    """Drops two bitsandbytes log lines that say nothing to an mlora user:
    - on import, on AVX512-BF16 CPUs: it cannot fetch a Hub kernel for packed 4-bit inference,
      a path mlora turns off (see `_linear4bit`);
    - an 8-bit layer in eval mode with fp32/bf16 activations: "inputs will be cast to float16",
      once per layer per forward (int8 quantization of the activations always goes through
      fp16; that is LLM.int8() itself, not a problem to report hundreds of times)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return "kernels-community" not in msg and "cast from" not in msg


_QUIET = _QuietBnb()


def _bnb():
    """Import bitsandbytes, or a one-line UserError that says how to install it."""
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logger = logging.getLogger(name)  # the very logger bitsandbytes creates on import
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)
    try:
        import bitsandbytes
    except Exception as err:  # ImportError, or OSError/RuntimeError from a broken native library
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"a quantized base model needs bitsandbytes, which cannot be imported "
                        f"({reason}); install it with: {INSTALL_HINT}") from None
    return bitsandbytes


def check_available(cfg: QuantConfig, device: torch.device | str) -> None:
    """UserError (one line) unless bitsandbytes can run a `cfg.bits`-bit base on `device`."""
    bnb = _bnb()
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"a {cfg.bits}-bit base model runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

        if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
            raise UserError(f"bitsandbytes {bnb.__version__} has no CUDA library for this torch "
                            f"(CUDA {torch.version.cuda}); reinstall it with: pip install -U bitsandbytes")


@functools.cache
def _layer_classes() -> tuple[type, type]:
    """bitsandbytes' Linear4bit and Linear8bitLt, fed 2-D rows.

    For a 3-D input, bitsandbytes' autograd Functions may return a view made inside the
    Function (the int8 matmul CUDA trains with reshapes its result; the 4-bit one gives
    F.linear's view when there is a bias), and autograd forbids in-place changes to such a
    view: `LoraLinear` adding each adapter's delta into the base output would fail. Reshaping
    out here instead makes it an ordinary view. (Built on first use: bitsandbytes is imported
    only when a quantized base is asked for.)"""
    bnb = _bnb()

    class Linear4bit(bnb.nn.Linear4bit):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _on_rows(super().forward, x)

    class Linear8bitLt(bnb.nn.Linear8bitLt):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _on_rows(super().forward, x)

    return Linear4bit, Linear8bitLt


def _on_rows(forward, x: torch.Tensor) -> torch.Tensor:
    if x.dim() <= 2:
        return forward(x)
    rows = forward(x.reshape(-1, x.shape[-1]))  # [N, out]
    return rows.view(*x.shape[:-1], rows.shape[-1])  # [..., out]


def _linear4bit(bnb, linear: nn.Linear, weight: torch.Tensor, cfg: QuantConfig,
                device: torch.device) -> nn.Module:
    compute_dtype = cfg.compute_dtype or weight.dtype
    linear4bit, _ = _layer_classes()
    q = linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   compute_dtype=compute_dtype, compress_statistics=cfg.double_quant,
                   quant_type=cfg.quant_type, device="meta")
    # What `Params4bit.to(device)` does (and so transformers): quantize on the target device.
    packed, state = bnb.functional.quantize_4bit(
        weight.to(device), blocksize=BLOCKSIZE_4BIT, compress_statistics=cfg.double_quant,
        quant_type=cfg.quant_type, quant_storage=torch.uint8)
    q.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE_4BIT,
                                 compress_statistics=cfg.double_quant, quant_type=cfg.quant_type,
                                 quant_storage=torch.uint8, module=q, bnb_quantized=True)
    q.quant_state = state
    # On AVX512-BF16 CPUs, the first eval-mode forward without grad repacks the weight in place
    # for a bf16 inference kernel, and from then on the layer runs that kernel, which has no
    # backward: training after an in-training eval (`eval_step`) would silently get no
    # activation gradient through it. Keep the one trainable format.
    q.support_avx512bf16_for_cpu = False
    return q


def _linear8bit(bnb, linear: nn.Linear, weight: torch.Tensor, device: torch.device) -> nn.Module:
    # threshold 0.0: no LLM.int8() outlier decomposition. It acts on the activations, and only
    # in bitsandbytes' int8 matmul (CUDA, and eval mode on CPU); CPU training dequantizes the
    # weight and runs a plain matmul, where a threshold changes nothing. transformers defaults
    # to 6.0, but on SmolLM2-135M it did not help (eval loss on chat answers 1.3587 at 6.0 vs
    # 1.3545 at 0.0, full precision 1.3200) and it adds a second, fp16 matmul for the outlier columns.
    _, linear8bit = _layer_classes()
    q = linear8bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   has_fp16_weights=False, threshold=0.0, device="meta")
    # What `Int8Params.to(device)` does: row-wise absmax int8 of the fp16 weight, on the device.
    # (Int8Params.to only quantizes a CPU tensor, so call the kernel for a weight already there.)
    CB, SCB, _ = bnb.functional.int8_vectorwise_quant(weight.to(device=device, dtype=torch.float16))
    q.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
    return q


def quantize_linear(linear: nn.Linear, weight: torch.Tensor, cfg: QuantConfig,
                    device: torch.device | str) -> nn.Module:
    """The bitsandbytes layer for `linear` holding `weight` (full precision, any device)
    quantized on `device`. The bias is `linear.bias` moved to `device` (it may still be on the
    meta device; the loader fills it afterwards)."""
    bnb = _bnb()
    device = torch.device(device)
    if weight.shape != (linear.out_features, linear.in_features):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit {linear}")
    with torch.no_grad():
        if cfg.bits == 4:
            q = _linear4bit(bnb, linear, weight, cfg, device)
        else:
            q = _linear8bit(bnb, linear, weight, device)
    if linear.bias is not None:
        bias = linear.bias if linear.bias.is_meta else linear.bias.detach().to(device)
        q.bias = nn.Parameter(bias, requires_grad=False)
    q.requires_grad_(False)
    return q


def projections(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(path, parent, attribute, layer) of every target projection; a LoraLinear's base is
    looked through, so this works before and after `inject_lora`."""
    found = []
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if leaf not in ALL_TARGET_MODULES:
            continue
        if isinstance(module, LoraLinear):
            found.append((path, module, "base", module.base))
        else:
            parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
            found.append((path, parent, leaf, module))
    return found


def quantize_model(model: nn.Module, cfg: QuantConfig, device: torch.device | str) -> int:
    """Replace the projections of a loaded (full-precision) model or stage by quantized layers
    on `device`, one at a time, each full-precision weight freed as its layer is replaced (the
    loader does better: it quantizes each weight as it is read). Returns
    `linear_weight_bytes(model)` afterwards."""
    check_available(cfg, device)
    # Keep (parent, attribute) only: a list of the layers themselves would hold every
    # full-precision weight alive until the end.
    slots = [(parent, attr) for _, parent, attr, _ in projections(model)]
    for parent, attr in slots:
        layer = getattr(parent, attr)
        if type(layer) is nn.Linear:  # already-quantized layers stay as they are
            setattr(parent, attr, quantize_linear(layer, layer.weight, cfg, device))
        del layer
    return linear_weight_bytes(model)


def _tensors(layer: nn.Module) -> list[torch.Tensor]:
    """Every tensor a projection keeps: weight, bias and bitsandbytes' quantization state."""
    tensors = [t for t in (*layer.parameters(), *layer.buffers())]
    state4 = getattr(layer.weight, "quant_state", None)  # Linear4bit
    while state4 is not None:  # double quantization nests a second state for the absmax
        tensors += [state4.absmax, state4.code, getattr(state4, "offset", None)]
        state4 = getattr(state4, "state2", None)
    for holder in (layer.weight, getattr(layer, "state", None)):  # Linear8bitLt: weight, then state
        tensors += [getattr(holder, "CB", None), getattr(holder, "SCB", None)]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the target projections of `model` (weights, biases and any quantization
    state: absmax / scales / code books), each tensor counted once (an 8-bit layer's weight and
    its `CB` are the same memory)."""
    seen, total = set(), 0
    for _, _, _, layer in projections(model):
        for t in _tensors(layer):
            if t.is_meta:
                continue
            key = (t.device, t.data_ptr(), t.numel(), t.dtype)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
