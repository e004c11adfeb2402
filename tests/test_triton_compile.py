"""The triton LoRA kernel's Triton kernels, and the loss's, compile for the H200 (sm_90, bf16)
with mlora's launch settings, without spilling registers, on this machine without a GPU
(scripts/compile_triton_kernels.py): a kernel that the interpreter runs but the compiler
rejects would otherwise first fail on the GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_triton_kernels.py"), "--arch", "90",
                          "--columns", "192", "--dtype", "bf16"], capture_output=True, text=True, env=env,
                         timeout=600)
    if run.returncode == 77:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    # Two calls (a fused batch, a solo run) x four kernels, and the two that draw the mask for
    # over 8 adapters (seeds from a tensor), and the loss's cross-entropy kernel, none spilling
    # (exit 1 otherwise); the three GEMM kernels on Hopper's wgmma.
    compiled = [line for line in run.stdout.splitlines() if line.startswith("ok ")]
    assert len(compiled) == 11 and "cross_entropy_grad_kernel" in compiled[-1], run.stdout
    assert all("wgmma" in line for line in compiled if "mask_kernel" not in line and "cross_entropy" not in line), \
        run.stdout
    # lora_triton.unavailable turns the kernel away on devices whose blocks have less shared
    # memory than SHARED_BYTES: it must cover what every kernel needs.
    from mlora import lora_triton

    shared = [int(re.search(r"shared=(\d+)", line).group(1)) for line in compiled]
    assert max(shared) <= lora_triton.SHARED_BYTES, run.stdout


@pytest.mark.parametrize("dtype,columns", [("fp32", 192), ("bf16", 16)], ids=["fp32", "bf16 C=16"])
def test_down_compiles_without_spills_and_on_wgmma_for_narrow_c(dtype, columns):
    """down's transposed form (h^T = A @ (x * keep)^T) makes C the dot's M: fp32 operands spill
    registers in it (580 and 724 spill stores at C = 192 and 64), and a tile of C under 64 falls
    off Hopper's wgmma onto mma.sync; both keep h = (x * keep) @ A^T (down_config's TRANS)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_triton_kernels.py"), "--arch", "90",
                          "--columns", str(columns), "--dtype", dtype, "--kernel", "down_kernel"],
                         capture_output=True, text=True, env=env, timeout=600)
    if run.returncode == 77:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    down = [line for line in run.stdout.splitlines() if "down_kernel" in line]
    assert len(down) == 3 and all(line.startswith("ok ") for line in down), run.stdout
    # (--kernel: down alone was compiled, a second instead of the whole set's several)
    assert [line for line in run.stdout.splitlines() if line.startswith(("ok ", "SPILL", "FAIL"))] == down, run.stdout
    assert dtype == "fp32" or all("wgmma" in line for line in down), run.stdout
