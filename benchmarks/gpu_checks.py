"""Correctness checks that need a CUDA device (run by benchmarks/gpu_session.sh on a lent GPU).

CI has no GPU, so the CPU test suite covers the same code paths with the CPU kernels; this
script checks what only CUDA runs: the grouped LoRA kernel (torch._grouped_mm in bf16), and
fused-vs-solo training with CUDA's dropout RNG. Prints one JSON line per check and exits
non-zero if any fails (checks marked "informational" do not count).

    python benchmarks/gpu_checks.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlora.lora as lora_module  # noqa: E402
from mlora.adapter import Adapter  # noqa: E402
from mlora.config import AdapterConfig  # noqa: E402
from mlora.device import upload  # noqa: E402
from mlora.lora import TARGET_MODULES, AdapterRows, BatchLayout, inject_lora  # noqa: E402
from mlora.loss import head_loss_sums  # noqa: E402
from mlora.memory import _first_line  # noqa: E402
from mlora.models.llama import CausalLM, args_from_hf_config  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def tiny_model(device, dtype, layers=2):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256)
    torch.manual_seed(0)
    model = CausalLM(args_from_hf_config(cfg)).to(device=device, dtype=dtype).requires_grad_(False)
    layout = BatchLayout()
    return model, layout, inject_lora(model, layout)


def lora_grads(device, dtype, kernel, names, rows_of, ids, dropout, seed=0, step_tokens=None, scale=1.0):
    """One fused forward/backward of adapters `names` (rows given by rows_of); returns
    {adapter: flat gradient} and the per-adapter losses. step_tokens: each CE sum's normaliser
    (default its own count); scale: a loss scale, divided out of the gradients."""
    model, layout, wrappers = tiny_model(device, dtype)
    adapters = []
    for n in names:
        cfg = AdapterConfig(name=n, data="<check>", r=16, alpha=32, dropout=dropout,
                            target_modules=list(TARGET_MODULES), batch_size=1, micro_batch_size=1)
        a = Adapter(cfg, wrappers, seed=seed, device=device)
        with torch.no_grad():  # B = 0 would hide errors in the B path
            for p in a.parameters():
                if p.shape[1] == 16:
                    p.normal_(0, 0.02, generator=torch.Generator(device=device).manual_seed(hash(n) % 1000))
        adapters.append(a)
    rows = []
    start = 0
    for n in names:
        rows.append(AdapterRows(n, start, start + rows_of[n]))
        start += rows_of[n]
    layout.rows = rows
    model.train()
    previous, lora_module.kernel = lora_module.kernel, kernel
    try:
        hidden = model(ids, head=False)
        sums = head_loss_sums(model, hidden, ids, rows)
        total = sum(ce / (step_tokens or count) for ce, count in sums.values())
        (total * scale).backward()
    finally:
        lora_module.kernel = previous
    grads = {a.name: torch.cat([p.grad.flatten() for p in a.parameters()]) / scale for a in adapters}
    losses = {n: (ce / count).item() for n, (ce, count) in sums.items()}
    return grads, losses


def check_fused_vs_solo(device, dtype, kernel, tol, solo_kernel="loop"):
    """Four adapters fused with `kernel` against each adapter alone with `solo_kernel`."""
    names = ["a", "b", "c", "d"]
    rows_of = {n: 2 for n in names}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (8, 128), generator=g).to(device)
    fused, fused_loss = lora_grads(device, dtype, kernel, names, rows_of, ids, dropout=0.1)
    worst = 0.0
    for i, n in enumerate(names):
        solo, solo_loss = lora_grads(device, dtype, solo_kernel, [n], {n: 2}, ids[2 * i:2 * i + 2], dropout=0.1)
        worst = max(worst, rel_err(fused[n], solo[n]), abs(fused_loss[n] - solo_loss[n]) / abs(solo_loss[n]))
    return {"check": f"fused({kernel}) vs solo({solo_kernel}) grads+loss, {dtype}", "max_rel_err": worst,
            "tolerance": tol, "ok": worst <= tol}


def check_grouped_experts(device, dtype=torch.bfloat16, tol=3e-2) -> dict:
    """A small Mixtral (8 experts, 2 per token) with two adapters on attention and the experts
    (ranks 8 and 16) and a row of none: the experts as grouped GEMMs (models/moe.grouped_experts,
    the default) against one expert at a time, logits and every LoRA gradient; and that the
    grouped path ran (torch._grouped_mm on CUDA bf16: Hopper and up)."""
    import warnings

    from transformers import MixtralConfig

    from mlora.models import moe

    cfg = MixtralConfig(hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=1024, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=256)
    ids = torch.randint(0, 1024, (5, 64), generator=torch.Generator().manual_seed(3)).to(device)

    def run(grouped: bool, caught: list | None = None):
        """caught: record the host waits of the forward + backward there (CUDA)."""
        torch.manual_seed(0)
        model = CausalLM(args_from_hf_config(cfg)).to(device=device, dtype=dtype).requires_grad_(False)
        layout = BatchLayout()
        wrappers = inject_lora(model, layout)
        adapters = []
        for i, r in enumerate((8, 16)):
            a = Adapter(AdapterConfig(name=f"e{i}", data="<check>", r=r, alpha=2 * r, dropout=0.0,
                                      target_modules=list(TARGET_MODULES), batch_size=1, micro_batch_size=1),
                        wrappers, seed=i, device=device)
            with torch.no_grad():
                for p in a.parameters():
                    p.normal_(0, 0.05, generator=torch.Generator(device=device).manual_seed(i))
            adapters.append(a)
        layout.rows = [AdapterRows("e0", 0, 2), AdapterRows("e1", 3, 5)]  # (row 2: no adapter)
        model.train()
        calls = []
        real, moe.GROUPED_EXPERTS = moe.grouped_experts, grouped
        moe.grouped_experts = lambda *a: calls.append(1) or real(*a)
        weights = torch.linspace(-1, 1, cfg.vocab_size, device=device)
        if caught is not None:
            model(ids).float().sum().backward()  # (once before: first-use uploads and stacking)
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=caught is not None) as seen:
                warnings.simplefilter("always")
                logits = model(ids)
                (logits.float() * weights).sum().backward()
        finally:
            moe.grouped_experts, moe.GROUPED_EXPERTS = real, True
            if caught is not None:
                torch.cuda.set_sync_debug_mode(0)
                caught += seen
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                           for a in adapters for p in a.parameters()])
        return logits, grads, len(calls)

    logits, grads, calls = run(True)
    ref_logits, ref_grads, ref_calls = run(False)
    err = max(rel_err(logits, ref_logits), rel_err(grads, ref_grads))
    out = {"check": f"grouped experts vs one at a time, logits + LoRA grads, {dtype}", "max_rel_err": err,
           "tolerance": tol, "grouped_layers": calls, "ok": err <= tol and calls == 2 and ref_calls == 0}
    if device.type == "cuda":  # (informational) host waits of a grouped forward + backward
        caught = []
        run(True, caught)
        out["synchronisations"] = _synchronisations(caught)
    return out


def check_fp16_loss_scale(device, step_tokens=10**5, tol=1e-2) -> dict:
    """fp16 LoRA gradients under the loss scale an adapter starts at (loss_scale.py) against
    fp32's, at a step of 10^5 label tokens, `auto`'s kernel (triton on the H200: its fp16
    kernels compiled here), dropout 0.1; unscaled fp16's error beside it."""
    from mlora.loss_scale import LossScale

    names = ["a", "b"]
    rows_of = {n: 2 for n in names}
    ids = torch.randint(0, 1024, (4, 128), generator=torch.Generator().manual_seed(3)).to(device)
    run = dict(kernel="auto", names=names, rows_of=rows_of, ids=ids, dropout=0.1, step_tokens=step_tokens)
    ref, _ = lora_grads(device, torch.float32, **run)
    scale = LossScale().for_step(step_tokens)
    scaled, _ = lora_grads(device, torch.float16, scale=scale, **run)
    plain, _ = lora_grads(device, torch.float16, **run)
    worst = max(rel_err(scaled[n], ref[n]) for n in names)
    return {"check": f"fp16 LoRA gradients with the loss scale ({scale:g}) vs fp32, {step_tokens} step tokens, "
                     f"kernel auto ({lora_module.auto_kernel(device)})",
            "max_rel_err": worst, "unscaled_max_rel_err": max(rel_err(plain[n], ref[n]) for n in names),
            "tolerance": tol, "ok": worst <= tol}


def guarded(name: str, fn, *args) -> list[dict]:
    """fn(*args) -> a result or a list of them; an exception (a Triton compile error, say) is a
    failed check with its first line, not the end of the session."""
    try:
        out = fn(*args)
        return out if isinstance(out, list) else [out]
    except Exception as err:  # noqa: BLE001 - report anything, keep checking
        first = _first_line(err)[:300]
        return [{"check": name, "ok": False, "error": f"{type(err).__name__}: {first}"}]


def check_strided_draws(device) -> dict:
    """draw_keep_mask draws an adapter's mask straight into its tokens' slice of a longer
    batch (lora_fused.DropoutRows): fused equals solo only if a bernoulli into a strided slice
    draws what it draws into a contiguous tensor of that shape, as on the CPU."""
    g = torch.Generator(device=device).manual_seed(0)
    alone = torch.empty(16, 300, 2048, dtype=torch.bool, device=device).bernoulli_(0.95, generator=g)
    g = torch.Generator(device=device).manual_seed(0)
    batch = torch.ones(16, 512, 2048, dtype=torch.bool, device=device)
    batch[:, 212:].bernoulli_(0.95, generator=g)  # a left-padded adapter's tokens
    return {"check": "bernoulli into a strided slice draws as into a contiguous tensor",
            "ok": torch.equal(alone, batch[:, 212:]) and bool(batch[:, :212].all())}


def _delta_after_steps(device, dtype, names, step_kernel) -> tuple[float, list[Adapter]]:
    """Adapters `names` (2 rows each) stepped twice with fused AdamW through `step_kernel`, then
    the relative error of the fused kernel's LoRA delta against the loop kernel's (which reads
    the weights directly). The deltas, not the logits: stale casts (B = 0 at the first step)
    would give no delta at all."""
    model, layout, wrappers = tiny_model(device, dtype)
    adapters = []
    for name in names:
        cfg = AdapterConfig(name=name, data="<check>", r=16, alpha=32, dropout=0.0, target_modules=list(TARGET_MODULES),
                            lr=0.01, batch_size=1, micro_batch_size=1)
        adapters.append(Adapter(cfg, wrappers, seed=len(adapters), device=device, total_steps=10))
    ids = torch.randint(0, 1024, (2 * len(names), 64), generator=torch.Generator().manual_seed(3)).to(device)
    rows = [AdapterRows(name, 2 * i, 2 * i + 2) for i, name in enumerate(names)]
    previous = lora_module.kernel
    try:
        lora_module.kernel = step_kernel
        layout.rows = rows
        model.train()
        for _ in range(2):
            model(ids).float().logsumexp(-1).mean().backward()
            for a in adapters:
                a.step_on_device()
        model.eval()
        out = {}
        for kernel in ("fused", "loop", "base"):
            layout.rows = [] if kernel == "base" else rows
            lora_module.kernel = "loop" if kernel == "base" else kernel
            with torch.no_grad():
                out[kernel] = model(ids).float()
    finally:
        lora_module.kernel = previous
    return rel_err(out["fused"] - out["base"], out["loop"] - out["base"]), adapters


def check_steps_reach_the_fused_kernel(device) -> list[dict]:
    """Adapter's optimizer step moves the weights' version counters, so the fused kernel's
    weight casts follow the steps: after two steps of fused AdamW, the fused kernel's logits
    equal the loop kernel's (which reads the weights directly). Also recorded: whether CUDA's
    fused AdamW moves them itself (it does not on the CPU; mlora does not rely on it)."""
    p = torch.nn.Parameter(torch.ones(4, device=device))
    p.grad = torch.ones_like(p)
    before = p._version
    torch.optim.AdamW([p], lr=0.1, fused=True).step()
    own = {"check": "torch's fused AdamW moves the version counter itself", "moves": p._version != before,
           "informational": True, "ok": True}
    err, _ = _delta_after_steps(device, torch.float32, ["a"], lora_module.kernel)
    return [own, {"check": "after Adapter steps the fused kernel runs on the stepped weights "
                           "(LoRA delta vs loop, fp32)",
                  "max_rel_err": err, "tolerance": 1e-4, "ok": err <= 1e-4}]


def check_bf16_casts_follow_steps(device) -> dict:
    """bf16: the fused kernel's weights are views of one cast per adapter (flat_params.cast_of),
    made again after each step: after two steps of each of two adapters, every weight's view
    equals its own cast, and the fused kernel's LoRA delta equals the loop kernel's."""
    from mlora.flat_params import cast_of

    err, adapters = _delta_after_steps(device, torch.bfloat16, ["a", "b"], "fused")
    views_ok = all(torch.equal(cast_of(p, torch.bfloat16), p.detach().bfloat16())
                   for a in adapters for p in a.parameters())
    return {"check": "bf16: after Adapter steps the fused kernel's casts are the stepped weights' "
                     "(views; delta vs loop)",
            "views_equal_own_casts": views_ok, "max_rel_err": err, "tolerance": 3e-2, "ok": views_ok and err <= 3e-2}


def check_fp32_weight_gradients(device) -> dict:
    """The fused op's weight gradients come out of the GEMM in fp32 (lora_fused._mm_fp32:
    torch.mm(out_dtype=float32) on CUDA, where the CPU casts a bf16 product after it): against
    the fp32 product of the same bf16 inputs."""
    from mlora import lora_fused

    g = torch.Generator(device=device).manual_seed(0)
    n = 8192 if device.type == "cuda" else 512  # (the CPU: a dry run)
    a = torch.randn(2048, n, device=device, generator=g).bfloat16()
    b = torch.randn(n, 64, device=device, generator=g).bfloat16()
    got = lora_fused._mm_fp32(a, b)
    want = a.float() @ b.float()
    err = rel_err(got, want)
    fp32_gemm = device.type == "cuda" and lora_fused._writes_fp32(device, torch.bfloat16)
    got = got.float()  # (bf16 where the GEMM cannot write fp32: the caller casts)
    # fp32 out: only the accumulation order differs; a bf16 product would be ~1e-3 off
    tol = 1e-5 if fp32_gemm else 1e-2
    return {"check": "weight gradients as fp32 GEMM outputs", "gemm_writes_fp32": fp32_gemm, "dtype": str(got.dtype),
            "max_rel_err": err, "tolerance": tol, "ok": err <= tol}


def check_cross_entropy_kernel(device) -> dict:
    """loss_kernels' kernel on the device (compiled on CUDA: the CPU runs it interpreted): a
    chunk of TinyLlama's head, bf16 logits [512, 32000] with ignored targets, its loss and
    gradient against torch's log_softmax + nll_loss and their fp32 gradient rounded to bf16,
    and which kernel loss.py picks there ("auto")."""
    from mlora import loss
    from mlora.data import IGNORE_INDEX
    from mlora.loss_kernels import cross_entropy_grad_

    g = torch.Generator(device=device).manual_seed(0)
    rows = 512 if device.type == "cuda" else 16  # (the CPU: a dry run through the interpreter)
    logits = (4 * torch.randn(rows, 32000, device=device, generator=g)).bfloat16()
    targets = torch.randint(0, 32000, (rows,), device=device, generator=g)
    targets[::7] = IGNORE_INDEX
    exact = logits.float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(exact, targets, ignore_index=IGNORE_INDEX, reduction="none")
    ref.sum().backward()
    grad = logits.clone()
    got = cross_entropy_grad_(grad, targets, IGNORE_INDEX)
    loss_err = (got - ref.detach()).abs().max().item()
    # one bf16 ulp of the largest entry, at most (the same value computed another way)
    grad_err = ((grad.float() - exact.grad.bfloat16().float()).abs().max() / exact.grad.abs().max()).item()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_loss import head_only

    fused = loss._fused_cross_entropy(head_only(32000, 64, device, torch.bfloat16), logits)
    expected = device.type == "cuda" and lora_module.auto_kernel(device) == "triton"  # (Hopper and on)
    return {"check": "cross-entropy kernel (loss_kernels.py)", "loss_max_abs_err": loss_err,
            "grad_max_rel_err": grad_err, "auto_uses_it": fused,
            "ok": loss_err <= 1e-4 and grad_err <= 2**-7 and fused == expected}


def check_seeds_on_the_host(device) -> list[dict]:
    """The triton kernel's dropout seeds (lora_triton.draw_seed): drawn on the host from a CUDA
    generator's state with no device op, the same again after its state is restored, and
    new seeds compile no new variant of the kernel (Triton would type a small seed as i32)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mlora import lora_triton
    from mlora.lora_fused import DropoutRows

    why = lora_triton.unavailable(device)
    if why:
        return [{"check": "triton kernel available", "ok": False, "error": why}]

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in (*args, out) if isinstance(t, torch.Tensor)]
            if any(t.device.type != "cpu" for t in tensors):  # (a CPU generator's draw is host work)
                self.ops.append(str(func))
            return out

    per = 512 if device.type == "cuda" else 32  # tokens per adapter (the CPU: a dry run through the interpreter)
    gens = [torch.Generator(device=device).manual_seed(i) for i in range(4)]
    rows = [DropoutRows(i * per, (i + 1) * per, 0.05, g, per, per, 0) for i, g in enumerate(gens)]
    lora_triton.draw(rows, 4 * per, device)  # (the per-layout tables: made once)
    states = [g.get_state() for g in gens]
    with Ops() as ops:
        plan = lora_triton.draw(rows, 4 * per, device)
    for g, state in zip(gens, states):
        g.set_state(state)
    again = lora_triton.draw(rows, 4 * per, device)
    out = [{"check": "triton seeds: no device op, redrawn after a restore", "device_ops": ops.ops,
            "ok": not ops.ops and again.seeds == plan.seeds and len(set(plan.seeds)) == 4}]
    x = torch.randn(4 * per, 256, device=device).bfloat16()
    a_all = torch.randn(64, 256, device=device).bfloat16()
    factor = torch.ones(64, device=device)
    kernel = lora_triton._kernels().down_kernel

    def variants() -> int | None:
        caches = getattr(kernel, "device_caches", None)
        if caches is None:
            return None
        return sum(len(entry[0]) for entry in caches.values())

    lora_triton.down(x, a_all, factor, lora_triton.draw(rows, 4 * per, device))
    first = variants()
    for small in (0, 1, 16, 2**31 + 5):  # values Triton would otherwise type or specialise apart
        plan = lora_triton.draw(rows, 4 * per, device)
        plan.seeds = (small, *plan.seeds[1:])
        lora_triton.down(x, a_all, factor, plan)
    out.append({"check": "triton seeds: new seeds compile no new kernel variant", "variants_first": first,
                "variants_after": variants(), "informational": first is None,
                "ok": first is None or variants() == first})
    return out


def _synchronisations(caught: list) -> list[str]:
    """The synchronising operations among warnings caught under set_sync_debug_mode("warn").
    Not its first warning, that the mode is a prototype ("... does not yet detect all
    synchronizing operations"), which the first run of this check counted as one."""
    return [str(w.message).splitlines()[0][:120] for w in caught
            if "called a synchronizing CUDA operation" in str(w.message)]


def check_one_read_per_step(device) -> dict:
    """A fused training step as the trainer takes it (bench_throughput's: forward, loss,
    backward, every adapter's clip and AdamW step) synchronises with the host once, at its
    one read of the losses and norms: counted by torch.cuda.set_sync_debug_mode."""
    import warnings

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_throughput as bt

    bench = bt.MloraBench("tiny", bt.Settings(seq=64), device, torch.bfloat16)
    step, adapters = bench.fused_step(4, 2, 0.05)
    step()
    torch.cuda.synchronize(device)

    # The token rows wait on the host, as the trainer's batches do, and go to the device the
    # trainer's way (FusedBatch.to: through pinned memory; a plain copy would synchronise).
    host_ids = {seq: bt.batch(8, seq, bench.cfg.vocab_size, torch.device("cpu"), seed=seq) for seq in (40, 48, 56, 64)}

    def train_step(seq: int, mask: torch.Tensor | None = None):
        # Forward, loss, backward and every adapter's step, then the one read.
        ids = upload(host_ids[seq], device)
        rows = [AdapterRows(a.name, 2 * i, 2 * i + 2) for i, a in enumerate(adapters)]
        bench.layout.rows = rows
        sums = head_loss_sums(bench.model, bench.model(ids, mask, head=False), ids, rows,
                              {r.name: 2 * (seq - 1) for r in rows})
        sum(ce / count for ce, count in sums.values()).backward()
        norms = [a.step_on_device(~torch.isfinite(sums[a.name][0]))[1] for a in adapters]
        torch.stack([ce for ce, _ in sums.values()] + norms).tolist()

    # Left-padded rows need an attention mask, which the model checks on the host's copy and
    # uploads without waiting (a plain copy to the GPU synchronises).
    left_padded = torch.ones(8, 64, dtype=torch.bool)
    left_padded[::2, :5] = False

    counts = {}
    for label, steps in (("same layout", [step] * 3),
                         # Another row length each time: a new batch layout, new row owners and factors.
                         ("a new layout each step", [lambda s=s: train_step(s) for s in (40, 48, 56)]),
                         ("left-padded rows", [lambda: train_step(64, left_padded)] * 2)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for fn in steps:
                    fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = _synchronisations(caught)
        counts[label] = {"per_step": len(syncs) / len(steps), "first": syncs[:3]}
    return {"check": "host-device synchronisations per fused training step (4 adapters)", **counts,
            "ok": all(c["per_step"] == 1 for c in counts.values())}


def check_stage_timer_waits_for_nothing(device) -> dict:
    """The pipeline's StageTimer times a stage's compute with CUDA events, read only when the
    busy time is asked for: timing it does not synchronise (sync_debug_mode counts), and the
    time it reports is the device's (within the host's wall time around it)."""
    import warnings

    from mlora.pipeline.worker import StageTimer

    x = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    timer = StageTimer()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(300):  # past the 256 events at which it folds finished ones
                with timer.measure(device):
                    y = x @ x
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = _synchronisations(caught)
    busy = timer.busy
    wall = time.perf_counter() - t0
    del y
    return {"check": "pipeline StageTimer: no synchronisation while timing", "syncs": len(syncs),
            "first": syncs[:3], "busy_s": busy, "wall_s": wall, "ok": not syncs and 0 < busy <= wall}


def check_triton_kernels(device) -> list[dict]:
    """The triton LoRA kernel's three Triton kernels against torch with their keep-mask
    written out, at TinyLlama's q/k/v group shape with 4 adapters of r = 16 (C = 192), and the
    drop rate of the mask."""
    from mlora import lora_triton
    from mlora.lora_fused import DropoutRows

    why = lora_triton.unavailable(device)
    if why:
        return [{"check": "triton kernel available", "ok": False, "error": why}]
    out = []
    n, k, c = (4096, 2048, 192) if device.type == "cuda" else (256, 128, 48)  # the CPU: a dry run, interpreted
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, k, device=device, generator=g).to(dtype)
        a = (torch.randn(c, k, device=device, generator=g) * 0.02).to(dtype)
        factor = torch.rand(n, c, device=device, generator=g)
        dh = torch.randn(n, c, device=device, generator=g).to(dtype)
        drops = [DropoutRows(i * n // 4, (i + 1) * n // 4, 0.05 * (i + 1),
                             torch.Generator(device=device).manual_seed(i))
                 for i in range(4)]
        plan = lora_triton.draw(drops, n, device)
        keep = lora_triton.keep_mask(plan, n, k)
        xm = x.float() * keep
        h, bits = lora_triton.down(x, a, factor, plan)  # and the mask it applied, as bits
        errs = {"down": rel_err(h, (xm @ a.float().t()) * factor),
                "bits": float(not torch.equal(lora_triton.unpack(bits, k), keep)),  # 0: the drawn mask
                "up_masked": rel_err(lora_triton.up_masked(dh, a, bits), (dh.float() @ a.float()) * keep),
                "grad_a": rel_err(lora_triton.grad_a(dh, x, bits), dh.float().t() @ xm)}
        rates = [1 - keep[d.start:d.end].float().mean().item() for d in drops]
        counts = [(d.end - d.start) * k for d in drops]
        rate_ok = all(abs(r - d.p) < 5 * (d.p * (1 - d.p) / m) ** 0.5 for r, d, m in zip(rates, drops, counts))
        out.append({"check": f"triton kernels vs torch with the written mask, {dtype}", "rel_err": errs,
                    "drop_rates": rates, "tolerance": tol, "ok": max(errs.values()) <= tol and rate_ok})
    return out


def device_ms(fn, device, steps: int) -> float:
    """Milliseconds of one call of fn: on CUDA the mean of `steps` after 3 warm-up calls, by
    CUDA events; elsewhere (dry runs) one call's wall time."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def time_group(device, kernel: str, n_tokens=16384, steps=20) -> float:
    """Milliseconds of one forward + backward of TinyLlama's q/k/v input group with 4
    adapters (r = 16, dropout 0.05) in bf16 under `kernel` ("base": the three frozen GEMMs
    alone, no adapter)."""
    from mlora.lora import InputGroup, LoraLinear, LoraWeights

    layout = BatchLayout([AdapterRows(f"a{i}", i * n_tokens // 2048, (i + 1) * n_tokens // 2048) for i in range(4)])
    group = InputGroup()
    members = []
    for out_f in (2048, 256, 256):
        base = torch.nn.Linear(2048, out_f, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
        lin = LoraLinear(base, layout, group)
        for i in range(4 if kernel != "base" else 0):
            w = LoraWeights(2048, out_f, 16, 32, 0.05, False, i, device=device)
            w.generator = torch.Generator(device=device).manual_seed(i)
            lin.adapters[f"a{i}"] = w
        members.append(lin.train())
    x = torch.randn(n_tokens // 512, 512, 2048, device=device, dtype=torch.bfloat16, requires_grad=True)
    previous, lora_module.kernel = lora_module.kernel, kernel if kernel != "base" else "auto"
    try:
        def step():
            ys = [m(x) for m in members]
            torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
        return device_ms(step, device, steps)
    finally:
        lora_module.kernel = previous


def check_group_timing(device) -> dict:
    """Informational: the q/k/v group step under fused, triton and dense, and the frozen base
    GEMMs alone (what the LoRA side adds is the difference)."""
    ms = {k: time_group(device, k) for k in ("base", "fused", "triton", "dense")}
    return {"check": "q/k/v group fwd+bwd ms (TinyLlama shape, 16384 tokens, 4 adapters)", "ms": ms,
            "informational": True, "ok": True}


# The backward kernels' bf16 tiles before 2026-11-29's enlargement (their SASS issued 0.87 and
# 0.50 instructions per element at C = 192, the new 0.38 and 0.32; benchmarks/RESULTS.md):
# timed side by side, so that the device says whether the larger tiles are faster there too.
# Their tiles of C followed C as the current ones do (grad_a's: 64 at down_proj's C = 64, not 256).
def previous_tiles(C: int) -> dict:
    from mlora.lora_triton import _pow2

    return {"up_masked": dict(BM=64, BK=128, BC=_pow2(C, 16, 64), num_warps=8),
            "grad_a": dict(BC=_pow2(C, 16, 256), BK=64, BT=64, num_warps=8)}


def check_triton_tiles(device, steps=20) -> dict:
    """Informational: milliseconds of up_masked and grad_a with their current tiles and the
    previous ones, bf16, at TinyLlama's q/k/v (K 2048, C 192) and down_proj (K 5632, C 64)
    inputs, 16384 tokens."""
    from mlora import lora_triton
    from mlora.lora_fused import DropoutRows

    cuda = device.type == "cuda"  # else a dry run through Triton's interpreter, tiny shapes
    ms = lambda fn: device_ms(fn, device, steps)  # noqa: E731

    out, n = {}, 16384 if cuda else 160
    for name, k, c in ((("q/k/v", 2048, 192), ("down_proj", 5632, 64)) if cuda else (("q/k/v", 272, 48),)):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, k, device=device, generator=g, dtype=torch.bfloat16)
        a = torch.randn(c, k, device=device, generator=g, dtype=torch.bfloat16)
        dh = torch.randn(n, c, device=device, generator=g, dtype=torch.bfloat16)
        drops = [DropoutRows(i * n // 4, (i + 1) * n // 4, 0.05, torch.Generator(device=device).manual_seed(i))
                 for i in range(4)]
        plan = lora_triton.draw(drops, n, device)
        _, bits = lora_triton.down(x, a, torch.ones(c, device=device), plan)
        previous = previous_tiles(c)
        out[name] = {
            "up_masked": {"now": ms(lambda: lora_triton.up_masked(dh, a, bits)),
                          "previous": ms(lambda: lora_triton.up_masked(dh, a, bits, config=previous["up_masked"]))},
            "grad_a": {"now": ms(lambda: lora_triton.grad_a(dh, x, bits)),
                       "previous": ms(lambda: lora_triton.grad_a(dh, x, bits, config=previous["grad_a"]))},
            "down": ms(lambda: lora_triton.down(x, a, torch.ones(c, device=device), plan))}
    return {"check": "triton kernels' ms, current vs previous tiles (bf16, 16384 tokens)", "ms": out,
            "informational": True, "ok": True}


def check_no_kernel_fallbacks() -> dict:
    """No kernel `auto` chose failed during the checks (kernel_fallback.py): one that did left
    its work to torch's ops, so the checks of auto's path passed on those, not on it."""
    from mlora import kernel_fallback

    failed = kernel_fallback.failures()
    return {"check": "no auto kernel fell back to torch's ops", "failures": failed, "ok": not failed}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda", help="cpu runs the same checks (a dry run)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":  # the dry run: the triton kernel through Triton's interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results: list[dict] = []

    def check(name: str, fn, *fn_args) -> None:
        # Printed and saved after every check: the session's time limit may cut the rest.
        found = guarded(name, fn, *fn_args)
        results.extend(found)
        for r in found:
            print(json.dumps(r), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))

    def grouped_runs_grouped_mm() -> dict:
        # The grouped kernel really runs on CUDA bf16 (else its benchmark row measures the loop).
        calls = []
        real = lora_module._GROUPED_MM
        lora_module._GROUPED_MM = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
        try:
            check_fused_vs_solo(device, torch.bfloat16, "grouped", 1.0)
        finally:
            lora_module._GROUPED_MM = real
        return {"check": "kernel=grouped runs torch._grouped_mm on CUDA bf16", "grouped_calls": len(calls),
                "ok": len(calls) > 0}

    # The default kernel's checks first, the triton kernel's (new, and compiled here for the
    # first time: a fault in it could leave the device unusable) and the timings last.
    check("strided draws", check_strided_draws, device)
    check("steps reach the fused kernel", check_steps_reach_the_fused_kernel, device)
    check("bf16 casts follow steps", check_bf16_casts_follow_steps, device)
    check("fp32 weight gradients", check_fp32_weight_gradients, device)
    check("cross-entropy kernel", check_cross_entropy_kernel, device)
    if device.type == "cuda":
        check("one read per step", check_one_read_per_step, device)
        check("stage timer", check_stage_timer_waits_for_nothing, device)
    # Each kernel's fused run against solo runs of the loop kernel. fp32 is strict; in bf16
    # different batch sizes pick different GEMM tilings, so rounding differs (looser tolerance).
    # The grouped kernel runs only in bf16 on CUDA (fp32 falls back to the loop).
    # The fused kernel (the default) draws its dropout masks as bool: its solo reference is a
    # solo fused run, and then a solo loop run (float masks): CUDA's bool draws must equal its
    # float draws, as on the CPU.
    check("fused vs solo fused, fp32", check_fused_vs_solo, device, torch.float32, "fused", 1e-4, "fused")
    check("fused vs solo fused, bf16", check_fused_vs_solo, device, torch.bfloat16, "fused", 3e-2, "fused")
    # Not only informational: auto runs batches of more than 8 adapters grouped (masks drawn in
    # the activation dtype) and smaller ones, solo runs included, fused (bool masks).
    for kernel in ("fused", "dense", "loop"):
        check(f"{kernel} vs solo loop, fp32", check_fused_vs_solo, device, torch.float32, kernel, 1e-4)
    for kernel in ("dense", "grouped", "loop"):
        check(f"{kernel} vs solo loop, bf16", check_fused_vs_solo, device, torch.bfloat16, kernel, 3e-2)
    check("grouped runs grouped_mm", grouped_runs_grouped_mm)
    check("grouped experts", check_grouped_experts, device)
    check("triton kernels", check_triton_kernels, device)
    check("seeds on the host", check_seeds_on_the_host, device)
    check("fp16 loss scale", check_fp16_loss_scale, device)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        check(f"fused(triton) vs solo(triton), {dtype}", check_fused_vs_solo, device, dtype, "triton", tol, "triton")
    if device.type == "cuda":
        check("group timing", check_group_timing, device)
        check("triton tiles", check_triton_tiles, device)
    check("kernel fallbacks", check_no_kernel_fallbacks)
    return 0 if all(r["ok"] for r in results if not r.get("informational")) else 1


if __name__ == "__main__":
    sys.exit(main())
