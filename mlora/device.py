"""Turn the user's `device` / `dtype` settings into torch objects, or a one-line UserError;
and put small host tensors on a device without waiting for it (`upload`)."""

from __future__ import annotations

import contextlib

import torch

from mlora.errors import UserError
from mlora.plural import counted

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
            raise UserError(f"device {spec!r} is not available (only {counted(count, 'CUDA device')}: "
                            f"cuda:0..cuda:{count - 1})")
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
    """Whether the GPU `device` has bf16 matrix math: on CUDA compute capability 8.0 and up
    (Ampere on); on ROCm the architectures with bf16 matrix or dot instructions (CDNA from
    MI100, RDNA from RDNA 3). On older GPUs (V100, T4, MI50/MI60, RDNA 2) bf16 is emulated,
    many times slower than fp16. torch.cuda.is_bf16_supported asks about the current device,
    not a pipeline rank's, and says yes to every ROCm GPU."""
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip:
        arch = str(getattr(props, "gcnArchName", "") or "").split(":")[0]
        # An architecture torch does not name is taken as recent (as torch takes every one).
        return not arch or arch.startswith(_ROCM_BF16_ARCHS)
    return props.major >= 8


# gfx908 MI100, gfx90a MI200, gfx94x MI300, gfx95x MI350; gfx11xx RDNA 3, gfx12xx RDNA 4.
_ROCM_BF16_ARCHS = ("gfx908", "gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")


def gpu_label(device: torch.device) -> str:
    """The GPU's name and its generation as the vendor numbers it, for a note: "Tesla T4
    (compute capability 7.5)", "AMD Instinct MI60 (gfx906)"."""
    name = torch.cuda.get_device_name(device)
    if torch.version.hip:
        arch = str(getattr(torch.cuda.get_device_properties(device), "gcnArchName", "") or "").split(":")[0]
        return f"{name} ({arch})" if arch else name
    major, minor = torch.cuda.get_device_capability(device)
    return f"{name} (compute capability {major}.{minor})"


def dtype_note(device: torch.device, dtype: torch.dtype, flag: str = "--dtype") -> str | None:
    """A one-line note when `dtype` computes slowly on `device`, else None. `flag`: the option
    that chose it (--dtype, or --compute_dtype for a 4-bit base's matmuls)."""
    if dtype == torch.float16 and device.type == "cpu":
        return ("fp16 on the CPU is slow (most CPUs have no fp16 matrix math: the demo's training took 27x its "
                "fp32 time on this project's machine); fp32 or bf16 train faster there")
    if dtype == torch.bfloat16 and device.type == "cuda" and not native_bf16(device):
        which = "MI100 on and RDNA 3 on have" if torch.version.hip else "8.0 and up have"
        return (f"{gpu_label(device)} has no bf16 matrix math ({which}), and torch emulates it slowly; "
                f"fp16 ({flag} fp16, its loss scaled) trains faster there")
    return None


_NO_SWITCH = contextlib.nullcontext()


def current_on(device: torch.device):
    """A context making `device` CUDA's current device (a no-op elsewhere): Triton launches on
    the current one, and a pipeline rank runs on cuda:N without making it current. Where it is
    current already, none is entered: every Triton launch of a step asks (a few hundred
    times), and a torch.cuda.device's entry and exit cost host time that a read of the
    current index mostly does not."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NO_SWITCH
    return torch.cuda.device(device)


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
