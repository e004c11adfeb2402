"""The triton LoRA kernel's Triton kernels compile for the H200 (sm_90, bf16) with mlora's
launch settings, on this machine without a GPU (scripts/compile_triton_kernels.py): a kernel
that the interpreter runs but the compiler rejects would otherwise first fail on the GPU."""

from __future__ import annotations

import os
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
    compiled = [line for line in run.stdout.splitlines() if line.startswith("ok ")]
    assert len(compiled) == 4 and all("wgmma" in line for line in compiled[:3]), run.stdout
