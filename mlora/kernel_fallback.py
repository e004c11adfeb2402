"""mlora's Triton kernels that `auto` chose and that failed on this machine: each failure is
recorded, said once on stderr, and the kernel is not chosen again; torch's ops do its work.

Why. On CUDA devices of compute capability 9.0 and up `auto` runs the `triton` LoRA kernel
(lora_triton.py) and the head's cross-entropy kernel (loss_kernels.py), compiled at their first
call by whatever Triton the machine has. They are checked against Triton 3.6 and 3.9
(scripts/compile_triton_kernels.py, and the interpreter in the tests), not against every
release: one that cannot compile or launch them would end every training step with its error,
where torch's ops compute the same (more slowly, keeping more memory). A kernel named
explicitly (MLORA_LORA_KERNEL=triton, MLORA_CROSS_ENTROPY=triton) raises its error instead:
whoever names it wants it, and a benchmark row labelled with it must measure it.

Running out of memory is not a failure of the kernel: it is raised as it is, for the trainer's
retry with a smaller batch (memory.py).
"""

from __future__ import annotations

import sys


# The kernels, by the name their environment variable gives them.
LORA = "triton"  # MLORA_LORA_KERNEL=triton
CROSS_ENTROPY = "cross-entropy"  # MLORA_CROSS_ENTROPY=triton
# kernel -> (the variable that chooses it, the value that chooses torch's ops)
_SETTING = {LORA: ("MLORA_LORA_KERNEL", "fused"), CROSS_ENTROPY: ("MLORA_CROSS_ENTROPY", "torch")}

# kernel -> "<exception type>: <its first line>", for the kernels that failed in this process
_failures: dict[str, str] = {}


def record(kernel: str, err: BaseException, chosen_by_auto: bool) -> None:
    """`kernel` raised `err`: if `auto` chose it, remember it (failure() says so from now on)
    and say so once. A kernel named explicitly, or an out-of-memory error, raises `err` again."""
    from mlora.memory import is_out_of_memory  # (here: memory imports the kernels that call record)

    if not chosen_by_auto or is_out_of_memory(err):
        raise err
    if kernel in _failures:
        return
    text = str(err).strip()
    reason = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")[:300]
    _failures[kernel] = reason
    variable, torch_ops = _SETTING[kernel]
    print(f"mlora: the {kernel} kernel failed here ({reason}); torch's ops do its work from now on "
          f"({variable}={torch_ops} chooses them, {variable}=triton raises the error)", file=sys.stderr, flush=True)


def failure(kernel: str) -> str | None:
    """Why `kernel` failed in this process (record), or None if it has not."""
    return _failures.get(kernel)


def failures() -> dict[str, str]:
    """Every kernel that failed in this process and why (benchmarks record it beside their figures)."""
    return dict(_failures)


def forget() -> None:
    """Forget the failures (tests)."""
    _failures.clear()
