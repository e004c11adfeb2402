"""Reading PEFT's pickled adapter weights (adapter_model.bin: save_pretrained with
safe_serialization=False, as many older adapters on the Hub are saved) without running what a
pickle may hold: torch.load with weights_only=True, which rebuilds tensors and plain containers
only, then a check that the file held what PEFT writes there, a flat {name: tensor}."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from mlora.errors import UserError


def read_pickled_weights(path: Path) -> dict[str, torch.Tensor]:
    """{tensor name: tensor} of a PEFT adapter_model.bin, on the CPU; anything else in it (an
    object weights_only refuses, a nested dict, a number), or a file torch cannot read, is a
    UserError naming `path`."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # (weights_only's refusal: a class it would have to import, ...)
        raise UserError(f"{path}: not a file of tensors alone ({_refusal_reason(err)}): mlora reads pickled "
                        f"weights with torch.load(weights_only=True), which unpickles no other objects") from None
    except Exception as err:  # a truncated or damaged file: EOFError, a zip reader's RuntimeError...
        raise UserError(f"{path}: cannot read ({_first_line(err)})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: holds a {type(loaded).__name__}, not PEFT's dict of tensor names to tensors")
    for name, value in loaded.items():
        if not isinstance(name, str):
            raise UserError(f"{path}: holds the key {name!r}, not a tensor name (a string)")
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: {name!r} holds a {type(value).__name__}, not a tensor "
                            f"(PEFT saves a flat dict of tensor names to tensors)")
        # (what cannot be copied into a LoRA weight; a nested tensor's layout may be strided too)
        kind = ("a meta tensor (no values)" if value.is_meta else "a nested tensor" if value.is_nested
                else "a quantized tensor" if value.is_quantized
                else f"a {value.layout} tensor" if value.layout != torch.strided else None)
        if kind is not None:
            raise UserError(f"{path}: tensor {name} is {kind}, not a dense tensor of values")
    # (a Parameter, as a state dict saved whole may hold, read as its plain tensor)
    return {name: value.detach() for name, value in loaded.items()}


def _refusal_reason(err: Exception) -> str:
    """The line of weights_only's long message that says what it refused ("Unsupported global:
    GLOBAL __main__.Foo was not an allowed global by default"), without its advice to retry
    with weights_only=False, which mlora never does."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    tail = text[text.index(marker) + len(marker):] if marker in text else text
    line = next((ln.strip() for ln in tail.splitlines() if ln.strip()), "")
    return line.split(". ")[0].rstrip(".") or "refused by weights_only"


def _first_line(err: Exception) -> str:
    line = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    return line or ("it ends too early" if isinstance(err, EOFError) else type(err).__name__)
