"""Compile the `triton` LoRA kernel's Triton kernels (and the loss's, loss_kernels.py) for a GPU
target on a machine without a GPU: the check that they compile for the H200 (sm_90) before a GPU
session spends its minutes on it (CI runs it: tests/test_triton_compile.py), with the launch settings mlora uses
(lora_triton.*_config). Prints, per kernel, the shared memory, whether the dots became
Hopper's wgmma, and, where Triton's bundled ptxas is found, registers and spill stores.

    python scripts/compile_triton_kernels.py [--arch 90] [--columns 192] [--dtype bf16|fp16|fp32] [--cost]
                                             [--kernel NAME ...]

--kernel compiles only the kernels named (e.g. down_kernel; default: all of them): a check of
one kernel takes a second or two instead of the whole set's.

--cost also prints a static cost per kernel, where Triton's bundled nvdisasm is found: the
machine instructions (SASS) one tile executes, per element of the input it masks, summed over
warps ("warp-instructions per element"; the main loop's body for down and grad_a, whose loops
run 32 times and more at these shapes; for up_masked the whole kernel, its loop over C counted
as often as it runs, ceil(C / BC) times). A rough guide to whether a kernel is bound by its
instructions or by memory: reading a bf16 input at the H200's 4.8 TB/s leaves an SM about 0.22
warp-instructions per element at two instructions a cycle.

A kernel that needs more shared memory than one block of the target may have (227 KiB on
sm_90) compiles but cannot launch: that counts as a failure too.

Two calls are specialised as Triton's runtime would: a fused batch (4 adapters, 512-token rows,
everything divisible by 16) and a solo run (1 adapter, 37-token rows, C = 64); and a third, a
batch of 12 adapters, for the two kernels that draw the mask: over 8 adapters they read the
seeds from a tensor instead of scalar arguments (lora_triton.SCALAR_SEEDS).

Exit 0: every kernel compiled without spilling registers. 1: one failed or spilled (printed).
77: this Triton has no ahead-of-time compile API this script knows (nothing was checked).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: the interpreter's kernels cannot be
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SKIP = 77
LAUNCH_OPTIONS = ("num_warps", "num_stages")  # launch settings, not the kernels' constexprs
LOSS_KERNEL = "cross_entropy_grad_kernel"  # (loss_kernels.py's; the others: kernels())
# The most dynamic shared memory one block may use, in bytes, by compute capability x 10.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
POINTER = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
# The seeds are i64 whatever their values (lora_triton.SEED_TAG); seed_ptr is None up to 8
# adapters (a constexpr to Triton), an int64 tensor beyond.
TABLES = dict(owner_ptr="*i32", table_ptr="*i32", G="i32", S="i32", seed_ptr="*i64",
              **{f"seed{i}": "i64" for i in range(8)})


def kernels(dtype: str, columns: int) -> list[tuple]:
    """(name, signature {arg: type}, constexprs) of each kernel as lora_triton launches it."""
    from mlora import lora_triton

    fp32, act = dtype == "fp32", POINTER[dtype]
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    down = lora_triton.down_config(columns, fp32)
    up = lora_triton.up_masked_config(columns, fp32)
    grad = lora_triton.grad_a_config(columns, fp32)
    return [
        ("down_kernel", dict(x_ptr=act, a_ptr=act, f_ptr="*fp32", h_ptr=act, bits_ptr="*u8", **TABLES,
                             **ints("N", "K", "C", "W", "stride_xm", "stride_xk", "stride_fm")), down),
        ("up_masked_kernel", dict(dh_ptr=act, a_ptr=act, dx_ptr=act, bits_ptr="*u8",
                                  **ints("N", "K", "C", "W", "stride_dhm")), up),
        ("grad_a_kernel", dict(dh_ptr=act, x_ptr=act, out_ptr="*fp32", bits_ptr="*u8",
                               **ints("N", "K", "C", "W", "stride_dhm", "stride_xm", "stride_xk", "tokens_per_split")),
         grad),
        ("mask_kernel", dict(out_ptr="*i8", **TABLES, **ints("N", "K")), dict(lora_triton.MASK_CONFIG)),
    ]


# (description, runtime values of the integer arguments); C comes from --columns for the first.
CALLS = [("fused batch", dict(N=16384, K=2048, W=256, G=4, S=512, stride_xm=2048, stride_xk=1, tokens_per_split=3328)),
         ("solo, odd rows", dict(N=296, K=2048, W=256, G=1, S=37, stride_xm=2048, stride_xk=1, tokens_per_split=296)),
         ("many adapters", dict(N=6144, K=2048, W=256, G=12, S=512, stride_xm=2048, stride_xk=1,
                                tokens_per_split=3328))]


def ptxas_report(ptx: str, arch: int) -> tuple[str, bool]:
    """(" registers=... spill_stores=...", whether any kernel spills); ("", False) without ptxas."""
    import triton

    found = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "**", "ptxas*"), recursive=True))
    if not found:
        return "", False
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        for ptxas in found:  # Triton bundles more than one; the first that reads this PTX version
            run = subprocess.run([ptxas, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", f.name,
                                  "-o", os.devnull], capture_output=True, text=True)
            if run.returncode == 0:
                regs = re.findall(r"Used (\d+) registers", run.stderr)
                spills = re.findall(r"(\d+) bytes spill stores", run.stderr)
                report = f" registers={','.join(regs) or '?'} spill_stores={','.join(spills) or '?'}"
                return report, any(int(n) > 0 for n in spills)
        return "", False
    finally:
        os.unlink(f.name)


def sass_cost(compiled, name: str, config: dict, columns: int) -> str:
    """" sass=<warp-instructions per element>" of a compiled kernel (see the module docstring),
    or "" without nvdisasm or without a loop where one is expected."""
    import triton

    found = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "**", "nvdisasm"), recursive=True))
    if not found or "cubin" not in compiled.asm:
        return ""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        lines = subprocess.run([found[0], "-c", f.name], capture_output=True, text=True).stdout.splitlines()
    finally:
        os.unlink(f.name)
    address = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")
    instructions = [(int(m.group(1), 16), m.group(2)) for m in map(address.match, lines) if m]
    labels = {}  # label -> address of the instruction after it
    for i, line in enumerate(lines):
        label = re.match(r"\.(L_x_\d+):", line.strip())
        following = next((m for m in map(address.match, lines[i + 1:]) if m), None)
        if label and following:
            labels[label.group(1)] = int(following.group(1), 16)
    loops = [(labels[m.group(1)], at) for at, text in instructions
             for m in [re.search(r"BRA\s+(?:`\()?\.?(L_x_\d+)", text)] if m and labels.get(m.group(1), at) < at]
    warps = config.get("num_warps", 4)
    longest = max(loops, key=lambda loop: loop[1] - loop[0]) if loops else None  # the main loop
    body = sum(longest[0] <= at <= longest[1] for at, _ in instructions) if longest else 0
    if name == "up_masked_kernel":  # the whole kernel, its loop over C as often as it runs
        count = len(instructions) + (max(1, -(-columns // config["BC"])) - 1) * body
        elements = config["BM"] * config["BK"]
    else:
        if not loops:
            return ""
        count = body
        elements = config["BM" if name != "grad_a_kernel" else "BT"] * config["BK"]
    return f" sass={count * warps / elements:.2f}/element"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--columns", type=int, default=192, help="C: adapters x rank x members (192: 4 x 16 x q/k/v)")
    p.add_argument("--dtype", default="bf16", choices=sorted(POINTER))
    p.add_argument("--cost", action="store_true", help="print each kernel's static instruction count per element")
    p.add_argument("--kernel", action="append", metavar="NAME",
                   help="compile only this kernel (repeatable; default: all), e.g. down_kernel")
    args = p.parse_args(argv)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        print(f"compile_triton_kernels: no ahead-of-time compile API here ({err})")
        return SKIP
    names = [name for name, _, _ in kernels(args.dtype, args.columns)] + [LOSS_KERNEL]
    unknown = sorted(set(args.kernel or ()) - set(names))
    if unknown:
        p.error(f"--kernel: unknown {', '.join(unknown)}; choose from {', '.join(names)}")
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}")
    failed = False
    for call, ints in CALLS:
        columns = 64 if call == CALLS[1][0] else args.columns
        ints = dict(ints, C=columns, stride_fm=columns, stride_dhm=columns)
        print(f"{call}: C={columns}, G={ints['G']}, S={ints['S']}")
        status = compile_call(triton, ASTSource, GPUTarget, args, columns, ints)
        if status == SKIP:
            return SKIP
        failed |= status != 0
    if args.kernel is None or LOSS_KERNEL in args.kernel:
        print("the loss's cross-entropy (loss_kernels.py)")
        status = compile_loss_kernel(triton, ASTSource, GPUTarget, args)
        if status == SKIP:
            return SKIP
        failed |= status != 0
    return 1 if failed else 0


def compile_call(triton, ASTSource, GPUTarget, args, columns: int, values: dict) -> int:
    from mlora import lora_triton, philox_kernels

    failed = False
    many = values["G"] > lora_triton.SCALAR_SEEDS
    for name, signature, config in kernels(args.dtype, columns):
        if args.kernel is not None and name not in args.kernel:
            continue
        fn = getattr(philox_kernels, name)
        if many and "MANY_SEEDS" not in fn.arg_names:
            continue  # the same kernel as for the fused batch
        constexprs = {k: v for k, v in config.items() if k not in LAUNCH_OPTIONS}
        if "IEEE" in fn.arg_names:
            constexprs["IEEE"] = args.dtype == "fp32"
        if "MANY_SEEDS" in fn.arg_names:
            constexprs["MANY_SEEDS"] = many
            if not many:
                constexprs["seed_ptr"] = None
        # Specialised as Triton's runtime does for a TinyLlama-like call: an integer equal to
        # 1 becomes a constant, pointers (torch aligns them) and integers divisible by 16 are
        # marked so; that decides vectorised loads and the registers they need. Not the
        # arguments the kernel says not to (the seeds: do_not_specialize).
        unspecialised = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
        constexprs.update({arg: 1 for arg in fn.arg_names if values.get(arg) == 1 and arg not in unspecialised})
        full = {arg: "constexpr" if arg in constexprs else signature[arg] for arg in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
                 if arg not in constexprs and arg not in unspecialised
                 and (signature[arg][:1] == "*" or values.get(arg, 1) % 16 == 0)}
        status = compile_and_report(triton, ASTSource, GPUTarget, args, fn, full, constexprs, attrs, config, columns)
        if status == SKIP:
            return SKIP
        failed |= status != 0
    return 1 if failed else 0


def compile_loss_kernel(triton, ASTSource, GPUTarget, args) -> int:
    """loss_kernels.cross_entropy_grad_kernel as loss.py launches it (TinyLlama's vocabulary)."""
    from mlora import loss_kernels

    fn = getattr(loss_kernels, LOSS_KERNEL)
    config = dict(BLOCK=loss_kernels.BLOCK, WITH_GRAD=True, num_warps=8)
    signature = dict(logits_ptr=POINTER[args.dtype], stride="i32", targets_ptr="*i64", loss_ptr="*fp32", V="i32",
                     ignore_index="i32")
    constexprs = {k: v for k, v in config.items() if k not in LAUNCH_OPTIONS}
    full = {arg: "constexpr" if arg in constexprs else signature[arg] for arg in fn.arg_names}
    # (the pointers, the row stride and V = 32,000 divisible by 16, as the runtime marks them)
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
             if arg in ("logits_ptr", "targets_ptr", "loss_ptr", "stride", "V")}
    return compile_and_report(triton, ASTSource, GPUTarget, args, fn, full, constexprs, attrs, config, 0)


def compile_and_report(triton, ASTSource, GPUTarget, args, fn, full: dict, constexprs: dict, attrs: dict,
                       config: dict, columns: int) -> int:
    """Compile one kernel for the target and print a line (ok / SPILL / FAIL, shared memory,
    the matmul instructions, registers, spills); 0 ok, 1 failed or spilled, SKIP: an unknown API."""
    name = fn.__name__
    try:
        source = ASTSource(fn, full, constexprs, attrs)
    except TypeError as err:  # another Triton's API, not our kernel
        print(f"compile_triton_kernels: unknown ASTSource API ({err})")
        return SKIP
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", args.arch, 32),
                                  options={k: v for k, v in config.items() if k in LAUNCH_OPTIONS})
    except Exception as err:  # noqa: BLE001 - report which kernel and why
        print(f"FAIL {name}: {type(err).__name__}: {str(err).strip()[:3000]}")
        return 1
    ptx = compiled.asm.get("ptx", "")
    mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "fma"
    report, spilled = ptxas_report(ptx, args.arch)
    if args.cost and name not in ("mask_kernel", LOSS_KERNEL):
        report += sass_cost(compiled, name, config, columns)
    too_big = compiled.metadata.shared > SHARED_LIMIT.get(args.arch, 1 << 30)
    if too_big:
        report += f" (more shared memory than a block may have: {SHARED_LIMIT[args.arch]})"
    spilled |= too_big
    verdict = "FAIL " if too_big else "SPILL" if spilled else "ok  "
    print(f"{verdict} {name:18s} {config} shared={compiled.metadata.shared} {mma}{report}")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
