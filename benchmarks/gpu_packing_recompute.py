"""Device check for packing + recompute: exactness on CUDA, then memory/time on a mid-size model.

Run once on the lent H200 on 2026-11-28 (figures in benchmarks/RESULTS.md):
    python3 benchmarks/gpu_packing_recompute.py cuda        (or: cpu small, a smoke run)
"""
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from mlora.adapter import Adapter, layer_generators
from mlora.batching import MicroBatch, fuse
from mlora.config import AdapterConfig
from mlora.data import IGNORE_INDEX, Example
from mlora.lora import BatchLayout, check_kernel, inject_lora
from mlora.loss import fused_loss_sums
from mlora.models.llama import CausalLM, ModelArgs
from mlora.packing import pack_examples

DEV = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
check_kernel(DEV)  # MLORA_LORA_KERNEL: a one-line error now, not an ImportError mid-step
SMALL = len(sys.argv) > 2 and sys.argv[2] == "small"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def exs(n, seed, lo, hi, vocab):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        L = rng.randint(lo, hi)
        ids = [rng.randrange(3, vocab) for _ in range(L)]
        p = rng.randint(0, L // 2)
        out.append(Example(ids, [IGNORE_INDEX] * p + ids[p:]))
    return out


def build(args, dtype, n_adapters, r, dropout, seed=0):
    torch.manual_seed(seed)
    model = CausalLM(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model = model.to(DEV, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    layout = BatchLayout()
    wrappers = inject_lora(model, layout)
    adapters = {}
    for k in range(n_adapters):
        cfg = AdapterConfig(name=f"a{k}", data="", r=r, alpha=2 * r, dropout=dropout, target_modules=ALL)
        a = Adapter(cfg, wrappers, 5, DEV)
        g = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for w in a.weights.values():
                w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=g) * 0.05)
        adapters[cfg.name] = a
    model.rng_generators = layer_generators(adapters.values())
    return model, layout, adapters


def step(model, layout, adapters, parts, pack_len):
    batch = fuse(parts, 2, pack_len=pack_len).to(DEV)
    sums = fused_loss_sums(model, layout, batch)
    losses = {p.adapter: sums[p.adapter][0] / p.step_label_tokens for p in parts}
    sum(losses.values()).backward()
    grads = {}
    for name, a in adapters.items():
        for n, p in a.named_parameters():
            grads[f"{name}.{n}"] = p.grad.clone()
            p.grad = None
    return {k: v.item() for k, v in losses.items()}, grads, tuple(batch.input_ids.shape)


def parts_for(adapters, seed, n, lo, hi, vocab):
    parts = []
    for k, name in enumerate(adapters):
        e = exs(n, seed * 100 + k, lo, hi, vocab)
        parts.append(MicroBatch(name, e, 0, 0, sum(x.num_label_tokens for x in e), True, "right"))
    return parts


def maxdiff(g1, g2):
    return max((g1[k] - g2[k]).abs().max().item() / max(g2[k].abs().max().item(), 1e-12) for k in g2)


def exactness():
    print("== exactness on", DEV)
    for window in (None, 8):
        args = ModelArgs("mistral", 500, 128, 256, 2, 4, 2, 32, sliding_window=[window, window])
        for dtype in (torch.float32, torch.bfloat16):
            model, layout, adapters = build(args, dtype, 3, 4, 0.0)
            model.train()
            parts = parts_for(adapters, 1, 6, 3, 30, 500)
            l0, g0, s0 = step(model, layout, adapters, parts, None)
            l1, g1, s1 = step(model, layout, adapters, parts, 64)
            dl = max(abs(l0[k] - l1[k]) for k in l0)
            print(f"packing window={window} {dtype}: shapes {s0}->{s1} loss diff {dl:.2e} "
                  f"grad rel diff {maxdiff(g1, g0):.2e}")
            # logits: packed rows vs each alone
            model.eval()
            e = exs(9, 3, 2, 30, 500)
            pk = pack_examples(e, 64, 2)
            layout.rows = []
            with torch.no_grad():
                out = model(pk.input_ids.to(DEV), position_ids=pk.position_ids.to(DEV),
                            document_ids=pk.document_ids.to(DEV))
                worst = 0.0
                for r, row in enumerate(pk.bins):
                    c = 0
                    for i in row:
                        n = len(e[i])
                        alone = model(torch.tensor([e[i].input_ids], device=DEV))[0]
                        worst = max(worst, (out[r, c:c + n] - alone).abs().max().item())
                        c += n
            print(f"   packed-vs-alone logits max abs diff {worst:.2e}")
    # recompute with dropout, 3 steps, fp32 and bf16
    args = ModelArgs("llama", 500, 128, 256, 3, 4, 2, 32)
    for dtype in (torch.float32, torch.bfloat16):
        for pack_len in (None, 64):
            res = {}
            for recompute in (False, True):
                model, layout, adapters = build(args, dtype, 3, 4, 0.1)
                model.recompute = recompute
                model.train()
                hist = [step(model, layout, adapters, parts_for(adapters, s, 5, 3, 30, 500), pack_len)
                        for s in range(3)]
                res[recompute] = (hist, [g.get_state() for a in adapters.values()
                                         for g in a.dropout_generators.values()])
            d = max(maxdiff(h1[1], h0[1]) for h0, h1 in zip(res[False][0], res[True][0]))
            dl = max(abs(h1[0][k] - h0[0][k]) for h0, h1 in zip(res[False][0], res[True][0]) for k in h0[0])
            same_gen = all(torch.equal(a, b) for a, b in zip(res[False][1], res[True][1]))
            print(f"recompute {dtype} pack_len={pack_len}: loss diff {dl:.2e} grad rel diff {d:.2e} "
                  f"generators equal {same_gen}")


def perf():
    print("== memory / time on", DEV)
    if SMALL:
        args = ModelArgs("llama", 1000, 128, 256, 2, 4, 2, 32)
        n_ad, rows, lo, hi, cutoff = 2, 4, 8, 60, 64
    else:
        # ~1.1B-ish shape: hidden 2048, 16 layers, GQA 32/8, vocab 32000
        args = ModelArgs("llama", 32000, 2048, 5632, 16, 32, 8, 64)
        n_ad, rows, lo, hi, cutoff = 4, 16, 32, 512, 1024
    model, layout, adapters = build(args, torch.bfloat16, n_ad, 16, 0.05)
    model.train()
    parts = parts_for(adapters, 7, rows, lo, hi, args.vocab_size)
    useful = sum(len(x.input_ids) for p in parts for x in p.examples)
    for pack_len in (None, cutoff):
        for recompute in (False, True):
            model.recompute = recompute
            step(model, layout, adapters, parts, pack_len)  # warm-up
            if DEV.type == "cuda":
                torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if DEV.type == "cuda" else 0
            t = time.perf_counter()
            n = 3
            for _ in range(n):
                _, _, shape = step(model, layout, adapters, parts, pack_len)
            if DEV.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / n
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if DEV.type == "cuda" else 0
            print(f"packing={pack_len is not None} recompute={recompute}: batch {shape} "
                  f"({useful} real tokens, {useful / (shape[0] * shape[1]):.0%} of positions) "
                  f"step {dt * 1000:.0f} ms, {useful / dt:.0f} tok/s, peak above weights {peak:.2f} GiB")


if __name__ == "__main__":
    exactness()
    perf()
