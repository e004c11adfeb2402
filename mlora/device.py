"""Turn the user's `device` / `dtype` settings into torch objects, or a one-line UserError;
and put small host tensors on a device without waiting for it (`upload`)."""

from __future__ import annotations

import contextlib

import torch

from mlora.errors import UserError

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_device(spec: str | None) -> torch.device:
    """None -> the first GPU if there is one, else the CPU. CUDA devices come back with an
    index ("cuda" -> cuda:0) so they compare equal to `tensor.device`."""
    if spec is None:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(str(spec).strip())
    except (RuntimeError, ValueError):
        raise UserError(f"device {spec!r} is not available (not a device name; use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} is not available (this torch sees no CUDA GPU)")
        count = torch.cuda.device_count()
        index = 0 if dev.index is None else dev.index
        if index >= count:
            raise UserError(f"device {spec!r} is not available (only {count} CUDA device(s): cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"device {spec!r} is not available (no Apple MPS backend here)")
        return torch.device("mps")
    raise UserError(f"device {spec!r} is not available (mlora runs on cpu, cuda, cuda:N or mps)")


def resolve_dtype(device: torch.device, name: str | None) -> torch.dtype:
    """None -> bf16 on CUDA GPUs with bf16 matrix math (native_bf16), fp16 on older ones (its
    loss scaled: loss_scale.py), fp32 elsewhere; else one of fp32/float32, bf16/bfloat16,
    fp16/float16."""
    if name is None:
        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if native_bf16(device) else torch.float16
    dtype = _DTYPES.get(str(name).strip().lower())
    if dtype is None:
        raise UserError(f"dtype {name!r} is not supported (use one of {', '.join(_DTYPES)})")
    return dtype


def native_bf16(device: torch.device) -> bool:
    """Whether the CUDA `device` has bf16 matrix math: compute capability 8.0 and up (Ampere
    on), or ROCm. On older GPUs (V100, T4) torch emulates bf16, many times slower than fp16.
    (torch.cuda.is_bf16_supported asks about the current device, not a pipeline rank's.)"""
    return bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8


def dtype_note(device: torch.device, dtype: torch.dtype) -> str | None:
    """A one-line note when `dtype` computes slowly on `device`, else None."""
    if dtype == torch.float16 and device.type == "cpu":
        return ("fp16 on the CPU is slow (most CPUs have no fp16 matrix math: the demo's training took 27x its "
                "fp32 time on this project's machine); fp32 or bf16 train faster there")
    if dtype == torch.bfloat16 and device.type == "cuda" and not native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no bf16 matrix math "
                "(8.0 and up have), and torch emulates it slowly; fp16 (--dtype fp16, its loss scaled) trains "
                "faster there")
    return None


def current_on(device: torch.device):
    """A context making `device` CUDA's current device (a no-op elsewhere): Triton launches on
    the current one, and a pipeline rank runs on cuda:N without making it current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def dtype_flag(name: str) -> str | None:
    """The --dtype that selects a dtype named as str(torch.dtype) names it ("torch.bfloat16" ->
    "bf16"), None for another."""
    return next((flag for flag, dtype in _DTYPES.items() if str(dtype) == name), None)


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device`, copied without waiting: a plain copy from pageable
    memory to a GPU synchronises with it (the host waits until everything queued has run),
    so the copy goes through pinned memory, which the caching allocator keeps until the copy
    is done. For layout constants (row owners, column scales, made once per batch layout),
    RoPE frequencies (once per forward) and the dropout seeds of over 8 adapters (lora_triton)."""
    if device.type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
