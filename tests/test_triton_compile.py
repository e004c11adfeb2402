"""The triton LoRA kernel's Triton kernels compile for the H200 (sm_90, bf16) with mlora's
launch settings, without spilling registers, on this machine without a GPU
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
    # Two calls (a fused batch, a solo run) x four kernels, none spilling (exit 1 otherwise);
    # the three GEMM kernels on Hopper's wgmma.
    compiled = [line for line in run.stdout.splitlines() if line.startswith("ok ")]
    assert len(compiled) == 8, run.stdout
    assert all("wgmma" in line for line in compiled if "mask_kernel" not in line), run.stdout
    # lora_triton.unavailable turns the kernel away on devices whose blocks have less shared
    # memory than SHARED_BYTES: it must cover what every kernel needs.
    from mlora import lora_triton

    shared = [int(re.search(r"shared=(\d+)", line).group(1)) for line in compiled]
    assert max(shared) <= lora_triton.SHARED_BYTES, run.stdout
