"""H200 check of mlora.memory: measured peak (torch.cuda.max_memory_allocated) of the trainer's
forward + loss + backward vs estimate_peak_bytes, plus a real OOM split-and-retry.

Run once on the lent H200 on 2026-11-28 (figures in benchmarks/RESULTS.md and the H200_MEASURED
table of tests/test_memory.py):  python3 benchmarks/gpu_memory_check.py cuda   (cpu: a smoke run)
"""
import gc, json, os, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from mlora.models.llama import ModelArgs, CausalLM
from mlora.lora import inject_lora, BatchLayout, LoraWeights, AdapterRows, TARGET_MODULES, check_kernel
from mlora.loss import head_loss_sums
from mlora.memory import (estimate_peak_bytes, LoraShape, GiB, run_splitting_on_oom, choose_token_budget,
                          device_free_bytes, UnsplittableOOM)

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
check_kernel(dev)  # MLORA_LORA_KERNEL: a one-line error now, not an ImportError mid-step
SMOKE = dev.type == "cpu"
dt = torch.bfloat16
SHAPES = {
    "tinyllama": ModelArgs("llama", 32000, 2048, 5632, 22, 32, 4, 64),
    "llama2-7b": ModelArgs("llama", 32000, 4096, 11008, 32, 32, 32, 128),
}
if SMOKE:
    SHAPES = {k: ModelArgs("llama", 400, 64, 96, 2, 4, 2, 16) for k in SHAPES}
results = []

def build(args):
    with torch.device("meta"):
        m = CausalLM(args)
    m = m.to(dt).to_empty(device=dev).requires_grad_(False)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0, 0.02)
    layout = BatchLayout()
    wrappers = inject_lora(m, layout)
    return m, layout, wrappers

def attach(wrappers, m, n, r, p, targets):
    gens = []
    for a in range(n):
        g = torch.Generator(device=dev).manual_seed(a)
        gens.append(g)
        for path, w in wrappers.items():
            if path.rsplit(".", 1)[-1] in targets:
                lw = LoraWeights(w.in_features, w.out_features, r, 2 * r, p, False, a, dev)
                lw.generator = g
                w.adapters[f"a{a}"] = lw
    m.rng_generators = gens

def detach(wrappers):
    for w in wrappers.values():
        w.adapters.clear()

def lora_params(wrappers):
    return [t for w in wrappers.values() for lw in w.adapters.values() for t in (lw.lora_A, lw.lora_B)]

def step(m, layout, n, rows, S, V, left_pad=False):
    ids = torch.randint(0, V, (rows, S), device=dev)
    am = torch.ones(rows, S, dtype=torch.long, device=dev)
    if left_pad:
        am[::2, :S // 8] = 0
    labels = ids.clone()
    per = rows // n
    layout.rows = [AdapterRows(f"a{a}", a * per, (a + 1) * per if a < n - 1 else rows) for a in range(n)]
    hidden = m(ids, am, head=False)  # [rows, S, H]
    sums = head_loss_sums(m, hidden, labels, layout.rows)
    total = sum(s / max(1, c) for s, c in sums.values())
    fwd = torch.cuda.memory_allocated(dev) if not SMOKE else 0
    total.backward()
    del hidden, total, sums
    return fwd

def case(name, args, m, layout, wrappers, rows, S, n, p, recompute, targets=TARGET_MODULES, left_pad=False):
    detach(wrappers)
    attach(wrappers, m, n, 16, p, targets)
    m.recompute = recompute
    m.train()
    params = lora_params(wrappers)
    gc.collect()
    if not SMOKE:
        torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) if not SMOKE else 0
    fwd = 0
    t = time.time()
    for it in range(2):  # the second iteration starts with the gradients allocated
        fwd = max(fwd, step(m, layout, n, rows, S, args.vocab_size, left_pad) - base)
    if not SMOKE:
        torch.cuda.synchronize()
    secs = time.time() - t
    peak = torch.cuda.max_memory_allocated(dev) if not SMOKE else 0
    lora = [LoraShape(16, tuple(targets), p)] * n
    est = estimate_peak_bytes(args, rows=rows, seq_len=S, dtype=dt, lora=lora, recompute=recompute,
                              explicit_mask=True if left_pad else None, device=dev)  # (what auto runs there)
    moments = sum(t.numel() * 4 * 2 for t in params)  # no optimizer step here
    est_no_moments = est.total - moments
    r = dict(name=name, rows=rows, S=S, adapters=n, dropout=p, recompute=recompute, left_pad=left_pad,
             targets=len(targets), measured_peak_gib=round(peak / GiB, 3),
             est_total_gib=round(est.total / GiB, 3), est_no_moments_gib=round(est_no_moments / GiB, 3),
             ratio=round(est_no_moments / peak, 3) if peak else None,
             measured_fwd_gib=round(fwd / GiB, 3),
             est_fwd_gib=round((est.activations + moments // 2) / GiB, 3),  # (the head's kept gradient included)
             weights_plus_lora_gib=round(base / GiB, 3), est=est.gib(), phase=est.peak_phase, secs=round(secs, 2))
    print(json.dumps(r), flush=True)
    results.append(r)
    for q in params:
        q.grad = None
    detach(wrappers)

def oom_check():
    free0 = torch.cuda.memory_allocated(dev)
    chunk = 40 * GiB
    seen = []
    def run_part(items):
        torch.empty(len(items) * chunk, dtype=torch.uint8, device=dev)  # 8 -> 320 GiB: OOM
        return items
    def on_split(left, right):
        seen.append((len(left), len(right), torch.cuda.memory_allocated(dev) - free0))
    out = run_splitting_on_oom(run_part, list(range(8)), on_split=on_split)
    ok = [i for part in out for i in part] == list(range(8))
    try:
        run_splitting_on_oom(lambda it: torch.empty(400 * GiB, dtype=torch.uint8, device=dev), [0])
        single = "no error"
    except UnsplittableOOM as e:
        single = str(e)[:160]
    r = dict(name="oom", covered=ok, chunks=[len(p) for p in out], splits=seen, single=single,
             leaked_after=torch.cuda.memory_allocated(dev) - free0)
    print(json.dumps(r), flush=True)
    results.append(r)

if not SMOKE:
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    oom_check()
S = 512 if not SMOKE else 32
for name in ("tinyllama", "llama2-7b"):
    args = SHAPES[name]
    m, layout, wrappers = build(args)
    rows_list = (32, 8) if name == "tinyllama" else (8, 16)
    for rows in rows_list:
        for n in (1, 4):
            for rc in (False, True):
                case(name, args, m, layout, wrappers, rows, S, n, 0.05, rc)
    case(name, args, m, layout, wrappers, rows_list[0], S, 1, 0.0, False)
    case(name, args, m, layout, wrappers, rows_list[0], S, 2, 0.0, False, targets=("q_proj", "v_proj"))
    case(name, args, m, layout, wrappers, rows_list[0], S, 1, 0.05, False, left_pad=True)
    if not SMOKE and name == "tinyllama":
        free = device_free_bytes(dev)
        lora = [LoraShape(16, TARGET_MODULES, 0.05)] * 4
        tokens = choose_token_budget(args, free_bytes=free, seq_len=S, dtype=dt, lora=lora, fraction=0.9, device=dev)
        r = dict(name="budget", free_gib=round(free / GiB, 2), tokens=tokens, rows=tokens // S)
        print(json.dumps(r), flush=True); results.append(r)
        case(name, args, m, layout, wrappers, min(tokens // S, 160), S, 4, 0.05, False)
    del m, layout, wrappers
    gc.collect()
    if not SMOKE:
        torch.cuda.empty_cache()
out = os.environ.get("OUT")
if out:
    json.dump(results, open(os.path.join(out, "memcheck.json"), "w"), indent=1)
