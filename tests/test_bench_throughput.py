"""benchmarks/bench_throughput.py: its --tiny CPU mode runs every system of the real
benchmark end to end, and its summary ratios are the right quotients."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# --tiny's own 1 warm-up + 2 timed steps per run, cut to the fewest that still take a second
# step on stepped weights (most of the time here is Triton's interpreter).
FEWEST_STEPS = ["--steps", "1", "--warmup", "1"]


def _load():
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "benchmarks" / "bench_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _triton_unavailable():
    import torch

    from mlora.lora_triton import unavailable

    return unavailable(torch.device("cpu"))


def test_tiny_mode_runs_every_system(tmp_path):
    bench = _load()
    out = tmp_path / "throughput.json"
    result = bench.main(["--tiny", *FEWEST_STEPS, "--out", str(out)])
    assert (result["meta"]["steps"], result["meta"]["warmup"]) == (1, 1)  # (they stand with --tiny)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    runs = result["runs"]
    assert {r["system"] for r in runs} == {"mlora", "mlora-base", "peft", "hf-base"}
    assert all(r["tokens_per_s"] > 0 for r in runs)
    mlora = [r for r in runs if r["system"] == "mlora"]
    assert {r["n"] for r in mlora if r["role"] == "sweep"} == {1, 4}
    kernels = {r["kernel"] for r in mlora if r["role"] == "ablation"}
    assert kernels >= {"dense", "grouped", "loop"}
    if importlib.util.find_spec("triton") and not _triton_unavailable():  # interpreted here (conftest)
        assert "triton" in kernels and any(a["kernel"] == "triton" for a in result["ablations"])
        # the two kernels side by side at every adapter count
        assert {(a["adapters"], a["kernel"]) for a in result["ablations"]} >= {
            (n, k) for n in (1, 4) for k in ("fused", "triton")}
    assert any(r["role"] == "memory" and r["n"] == 1 and r["rows"] == 4 * 2 for r in mlora)
    assert all(r["estimated_peak_gib"] > 0 for r in runs if r["system"].startswith("mlora"))
    # Tokens per step: every fused adapter brings the same rows.
    four = next(r for r in mlora if r["n"] == 4 and r["role"] == "sweep")
    assert four["tokens_per_step"] == 4 * 2 * result["meta"]["seq"]
    assert [row["adapters"] for row in result["summary"]] == [1, 4]
    pytest.importorskip("matplotlib")
    assert out.with_suffix(".png").stat().st_size > 1000


def test_a_failed_run_is_recorded_and_a_broken_device_ends_the_run_cleanly(tmp_path, monkeypatch):
    """The GPU session runs the benchmark once: a run that fails (a first Triton compile, a
    GPU-only error) is recorded with its first line and the rest goes on; a failure that
    leaves the device unusable (a kernel fault poisons the CUDA context) ends the run with
    what ran saved, the JSON saying why it stopped. (The core part only, to stay quick.)"""
    bench = _load()
    real_run, real_plan = bench.MloraBench.run, bench.plan

    def failing(self, n, rows, dropout, kernel):
        if n == 1:  # the core's memory run: one adapter with all the rows
            raise RuntimeError("first line of the failure\nand more")
        return real_run(self, n, rows, dropout, kernel)

    monkeypatch.setattr(bench.MloraBench, "run", failing)
    monkeypatch.setattr(bench, "plan", lambda *a, **k: [] if a[3] == "triton" else real_plan(*a, **k))
    out = tmp_path / "throughput.json"
    args = ["--tiny", *FEWEST_STEPS, "--no-extras", "--no-profile", "--out", str(out)]
    result = bench.main(args)
    memory = next(r for r in result["runs"] if r.get("role") == "memory")
    assert memory["error"] == "RuntimeError: first line of the failure"
    assert [r["system"] for r in result["runs"]][-2:] == ["peft", "hf-base"]  # went on
    assert all("tokens_per_s" in r for r in result["runs"] if r is not memory) and "stopped" not in result

    monkeypatch.setattr(bench, "device_broken", lambda device: "AcceleratorError: illegal memory access")
    result = bench.main(args)
    assert result["runs"][-1]["role"] == "memory" and result["runs"][-1]["device_error"]
    assert "illegal memory access" in result["stopped"]
    assert json.loads(out.read_text())["stopped"] == result["stopped"]
    assert [r["system"] for r in result["runs"]] == ["mlora-base", "mlora", "mlora"]  # what ran before it


def test_summary_ratios_use_the_faster_bound_and_same_rows():
    bench = _load()
    runs = [
        {"shape": "s", "system": "mlora", "n": 4, "rows": 8, "role": "sweep", "tokens_per_s": 60.0, "peak_gib": 11.0},
        {"shape": "s", "system": "mlora", "n": 1, "rows": 32, "role": "memory", "tokens_per_s": 61.0, "peak_gib": 10.0},
        {"shape": "s", "system": "mlora", "n": 4, "rows": 8, "role": "ablation", "kernel": "triton", "dropout": 0.05,
         "tokens_per_s": 1.0, "peak_gib": 1.0},
        {"shape": "s", "system": "peft", "n": 1, "rows": 8, "tokens_per_s": 30.0, "peak_gib": 5.0},
        {"shape": "s", "system": "peft", "n": 1, "rows": 32, "tokens_per_s": 40.0, "peak_gib": 9.0},
        {"shape": "s", "system": "mlora-base", "n": 0, "rows": 32, "tokens_per_s": 70.0, "peak_gib": 7.0},
        {"shape": "s", "system": "hf-base", "n": 0, "rows": 32, "tokens_per_s": 80.0, "peak_gib": 7.0},
        {"shape": "s", "system": "hf-base", "n": 0, "rows": 8, "tokens_per_s": 99.0, "peak_gib": 7.0},
    ]
    [row] = bench.summarise(runs)
    assert row["adapters"] == 4
    assert row["vs_peft"] == pytest.approx(60 / 30)  # PEFT with the same rows per adapter
    assert row["base_system"] == "hf-base" and row["vs_frozen_base"] == pytest.approx(60 / 80)
    assert row["peak_vs_one_adapter_same_rows"] == pytest.approx(11 / 10)
    [ablation] = bench.ablations(runs)
    assert ablation["kernel"] == "triton" and ablation["vs_frozen_base"] == pytest.approx(1 / 80)


def test_count_ops_ranks_the_kernels():
    """benchmarks/count_ops.py: per layer, the fused kernel dispatches fewer ops (launches on a
    GPU) than dense, and the loop far more; fused keeps fewer bytes for the backward than
    dense (a bool dropout mask, no column mask), triton fewer still. Counts, not timings:
    deterministic."""
    _load()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import count_ops

    triton = not _triton_unavailable()
    result = count_ops.main(["--shape", "tiny", "--layers", "1", "--rows", "2", "--seq", "16",
                             "--kernels", "fused,dense,loop" + (",triton" if triton else "")])
    fused, dense, loop = result["fused"], result["dense"], result["loop"]
    assert 0 < fused["ops"] < dense["ops"] < loop["ops"]
    assert 0 < fused["saved_bytes"] < dense["saved_bytes"]
    if triton:  # its Triton launches counted as ops (interpreted), and no mask or copy kept
        assert 0 < result["triton"]["ops"] < fused["ops"]
        assert 0 < result["triton"]["saved_bytes"] < fused["saved_bytes"]


def test_profile_compares_the_frozen_base_with_the_fused_step(tmp_path):
    """The profile (run on CUDA between the core part and the extras) writes the frozen base's
    step and the fused step (and triton's where it runs) side by side, with their figures."""
    import torch

    bench = _load()
    path = tmp_path / "profile.txt"
    figures = bench.profile("tiny", 2, 2, bench.Settings(seq=16, steps=1, warmup=1), torch.device("cpu"),
                            torch.float32, path)
    expected = {"frozen base", "fused"} | (set() if _triton_unavailable() else {"triton"})
    assert set(figures) == expected
    assert all(f["wall_ms_per_step"] > 0 and f["device_busy"] is None for f in figures.values())
    text = path.read_text()
    assert all(f"== {label}:" in text for label in expected)
    assert all(f["device_ms_by_category"] == {} for f in figures.values())  # no device kernels on the CPU


def test_profile_sorts_device_kernels_by_what_they_do():
    """The profile's per-category device time (where the LoRA side's time goes, next to the
    frozen base): names as the H200's profile reported them."""
    bench = _load()
    names = {"nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "matmul",
             "down_kernel": "lora triton", "grad_a_kernel": "lora triton", "up_masked_kernel": "lora triton",
             "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wg": "attention",
             "void at::native::(anonymous namespace)::fused_adam_kernel": "optimizer",
             "Memcpy DtoD (Device -> Device)": "copy",
             "void at::native::vectorized_elementwise_kernel<8, at::native::BinaryFunctor>": "elementwise",
             "void at::native::reduce_kernel<512, 1>": "reduce",
             "void at::native::(anonymous namespace)::rms_norm_kernel": "norm"}
    assert {name: bench.kernel_category(name) for name in names} == names


def test_host_benchmark_quick_mode(tmp_path):
    """benchmarks/bench_host.py: host time of a step on TinyLlama's depth at a tiny width."""
    spec = importlib.util.spec_from_file_location("bench_host", ROOT / "benchmarks" / "bench_host.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "host.json"
    result = module.main(["--quick", "--kernels", "auto", "--out", str(out)])
    (run,) = result["runs"]
    assert run["layers"] == 22 and json.loads(out.read_text())["runs"] == [run]
    assert all(run[k] > 0 for k in ("fwd_bwd_ms_1_adapters", "fwd_bwd_ms_4_adapters", "fwd_bwd_ms_frozen_base",
                                    "optimizer_steps_ms_4_adapters"))
    assert all(v > 0 for v in result["batching"].values()) and set(result["batching"]) == {
        "batch_ms_4x8x512", "batch_ms_4x8x512_packed"}


def test_stage_grads_guard_benchmark_runs():
    """benchmarks/bench_stage_grads_guard.py: the pipeline backward's OOM guard, timed (tiny)."""
    spec = importlib.util.spec_from_file_location("bench_stage_grads_guard",
                                                  ROOT / "benchmarks" / "bench_stage_grads_guard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (row,) = module.main(["--shape", "tiny", "--layers", "1", "--r", "4", "--seq", "8", "--repeats", "1"])
    assert row["lora_tensors"] == 14 and row["lora_values"] == 4 * (64 * 6 + 176) + 4 * (64 * 3 + 32 * 2 + 176 * 2)
    assert all(row[k] > 0 for k in ("backward_unguarded_ms", "backward_guarded_ms", "guard_alone_ms",
                                    "foreach_add_alone_ms"))


def test_a_side_whose_model_fails_to_build_fails_its_runs_only(tmp_path, monkeypatch):
    """transformers' model failing to build (an API of another release, say) fails PEFT's and
    its frozen base's runs, recorded, and mlora's run as before; an `auto` kernel that fell back
    to torch's ops (kernel_fallback.py) is said beside mlora's figures."""
    from mlora import kernel_fallback

    bench = _load()
    real_plan = bench.plan

    def no_model(self, *args):
        raise TypeError("LlamaForCausalLM.__init__() got an unexpected keyword argument\nmore")

    monkeypatch.setattr(bench.HFBench, "__init__", no_model)
    monkeypatch.setattr(bench, "plan", lambda *a, **k: [] if a[3] == "triton" else real_plan(*a, **k))
    monkeypatch.setattr(kernel_fallback, "_failures", {"cross-entropy": "RuntimeError: PassManager::run failed"})
    out = tmp_path / "throughput.json"
    result = bench.main(["--tiny", *FEWEST_STEPS, "--no-extras", "--no-profile", "--out", str(out)])
    hf = [r for r in result["runs"] if r["system"] in ("peft", "hf-base")]
    assert len(hf) == 2 and all(r["error"] == "TypeError: LlamaForCausalLM.__init__() got an unexpected keyword "
                                              "argument" for r in hf)
    mine = [r for r in result["runs"] if r["system"].startswith("mlora")]
    assert len(mine) == 3 and all(r["tokens_per_s"] > 0 for r in mine)
    assert all(r["kernel_fallbacks"] == {"cross-entropy": "RuntimeError: PassManager::run failed"} for r in mine)
    assert json.loads(out.read_text())["runs"] == result["runs"]


def test_moe_benchmark_runs_every_system(tmp_path):
    """benchmarks/bench_moe.py on its smallest shape for one warm-up and one timed step: mlora (1 and 4 adapters on
    the experts; 4 with the experts one at a time), PEFT on transformers' stacked experts, both
    frozen bases; the ratios are the quotients of the rates."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_moe", ROOT / "benchmarks" / "bench_moe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "moe.json"
    result = bench.main(["--cpu", "--shapes", "tiny-mixtral", *FEWEST_STEPS, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    (shape,) = result["results"]
    rates = shape["tokens_per_s"]
    assert set(rates) == {"mlora_1", "mlora_4", "mlora_4_per_expert", "mlora_frozen", "mlora_frozen_4", "peft_1",
                          "hf_frozen"} and min(rates.values()) > 0
    assert shape["mlora_4_over_peft"] == pytest.approx(rates["mlora_4"] / rates["peft_1"])
    assert shape["mlora_4_over_frozen"] == pytest.approx(rates["mlora_4"] / rates["mlora_frozen_4"])
    assert shape["grouped_over_per_expert"] == pytest.approx(rates["mlora_4"] / rates["mlora_4_per_expert"])
    import mlora.models.moe

    assert mlora.models.moe.GROUPED_EXPERTS  # (set back)
    # PEFT trains the LoRA of one mlora adapter, the experts' too (and its fused gate/up B's
    # off-diagonal blocks)
    assert shape["runs"]["peft_1"]["lora_params_matched"] and shape["runs"]["mlora_1"]["lora_params"] > 0


def test_moe_benchmark_records_a_failed_run_and_goes_on(tmp_path, monkeypatch):
    """bench_moe.py on a GPU session: mlora's grouped experts failing (a torch without the
    grouped GEMM's case, say) and transformers' model failing to build are recorded with their
    errors' first lines; the other runs are measured, the ratios of those that ran given, and
    the JSON is written as it goes. (Stand-ins for the benchmarks' sides: no model is run.)"""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_moe", ROOT / "benchmarks" / "bench_moe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import mlora.models.moe as moe

    class Mine:
        def __init__(self, *args):
            pass

        def run(self, n, rows):
            if n == 4 and moe.GROUPED_EXPERTS:
                raise RuntimeError("strides should be multiple of 16 bytes\nmore")
            return {"tokens_per_s": 100.0 * n, "lora_params": 7}

        def run_frozen(self, rows):
            return {"tokens_per_s": 1000.0 * rows}

    def no_model(*args):
        raise TypeError("MixtralForCausalLM: no such argument")

    written = []
    monkeypatch.setattr(bench, "MoeMlora", Mine)
    monkeypatch.setattr(bench, "MoeHF", no_model)
    out = tmp_path / "moe.json"
    real_write = type(out).write_text
    monkeypatch.setattr(type(out), "write_text", lambda self, text: written.append(text) or real_write(self, text))
    result = bench.run(["tiny-mixtral"], torch.device("cpu"), torch.float32, seq=16, rows=2, steps=1, out=out)
    (shape,) = result["results"]
    runs = shape["runs"]
    assert runs["mlora_4"] == {"error": "RuntimeError: strides should be multiple of 16 bytes"}
    assert runs["peft_1"] == runs["hf_frozen"] == {"error": "TypeError: MixtralForCausalLM: no such argument"}
    assert shape["tokens_per_s"] == {"mlora_1": 100.0, "mlora_frozen": 2000.0, "mlora_frozen_4": 8000.0,
                                     "mlora_4_per_expert": 400.0}
    assert not any(k.endswith(("_over_peft", "_over_frozen", "_over_per_expert")) for k in shape)
    assert moe.GROUPED_EXPERTS  # (set back)
    assert len(written) == 7 and json.loads(out.read_text()) == json.loads(json.dumps(result))  # after every run


def test_gpu_checks_count_synchronising_operations_only():
    """gpu_checks.py counts the synchronisations torch.cuda.set_sync_debug_mode reports; the
    mode's own first warning (that it is a prototype and "does not yet detect all
    synchronizing operations") is not one (its first H200 run counted it: 1.33 per step)."""
    import warnings

    module = _gpu_checks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all "
                      "synchronizing operations (Triggered internally at CUDAFunctions.cpp:162.)")
        warnings.warn("called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.cpp:162.)")
    assert module._synchronisations(caught) == ["called a synchronizing CUDA operation (Triggered internally at "
                                                "CUDAFunctions.cpp:162.)"]


def test_gpu_checks_triton_kernel_check_runs_on_the_cpu():
    """gpu_checks.py's check of the triton kernels against torch, as a dry run on the CPU
    (interpreted, small shapes): it calls the kernels as lora_triton defines them now (it once
    lagged behind a change of their API, which only the next GPU session would have seen)."""
    import torch

    if _triton_unavailable():
        pytest.skip(_triton_unavailable())
    module = _gpu_checks()
    results = module.check_triton_kernels(torch.device("cpu"))
    assert len(results) == 2 and all(r["ok"] for r in results), results
    assert all(r["rel_err"]["bits"] == 0.0 for r in results)


def test_gpu_checks_tile_timing_runs_on_the_cpu():
    """gpu_checks.py's timing of the triton backward kernels with their current and previous
    tiles, as a dry run on the CPU (interpreted, one small shape): the previous tiles it passes
    still launch, and it reports every timing."""
    import torch

    if _triton_unavailable():
        pytest.skip(_triton_unavailable())
    module = _gpu_checks()
    result = module.check_triton_tiles(torch.device("cpu"))
    timings = result["ms"]["q/k/v"]
    assert set(timings) == {"up_masked", "grad_a", "down"}
    assert all(t > 0 for kernel in ("up_masked", "grad_a") for t in timings[kernel].values())
    # the previous tiles as lora_triton chose them before, per C (down_proj's C = 64: grad_a's BC 64)
    assert [module.previous_tiles(c)["grad_a"]["BC"] for c in (64, 192)] == [64, 256]
    assert [module.previous_tiles(c)["up_masked"]["BC"] for c in (48, 192)] == [64, 64]


def test_gpu_checks_grouped_experts_check_runs_on_the_cpu():
    """gpu_checks.py's check of the grouped experts against one expert at a time, as a dry run
    on the CPU in bf16 and fp32 (the GPU session runs it in bf16 on CUDA)."""
    module = _gpu_checks()
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float32, 1e-5)):
        result = module.check_grouped_experts(torch.device("cpu"), dtype, tol)
        assert result["ok"] and result["grouped_layers"] == 2, result


def test_gpu_checks_fp16_loss_scale_check_runs_on_the_cpu():
    """gpu_checks.py's fp16 loss-scale check, as a dry run on the CPU (auto is fused there):
    it passes with the scale, and it would fail without (the unscaled error it reports)."""
    result = _gpu_checks().check_fp16_loss_scale(torch.device("cpu"))
    assert result["ok"] and result["unscaled_max_rel_err"] > 10 * result["tolerance"], result


def test_gpu_checks_fail_where_an_auto_kernel_fell_back(monkeypatch):
    """gpu_checks.py's last check fails where a kernel auto chose failed during the checks
    (kernel_fallback.py): the checks of auto's path then passed on torch's ops, not on it."""
    from mlora import kernel_fallback

    module = _gpu_checks()
    monkeypatch.setattr(kernel_fallback, "_failures", {})
    assert module.check_no_kernel_fallbacks()["ok"]
    monkeypatch.setattr(kernel_fallback, "_failures", {"triton": "CompilationError: at 12:4"})
    result = module.check_no_kernel_fallbacks()
    assert not result["ok"] and result["failures"] == {"triton": "CompilationError: at 12:4"}


def _gpu_checks():
    """benchmarks/gpu_checks.py as a module (a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "benchmarks" / "gpu_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_checks_of_the_flat_weights_and_host_seeds_run_on_the_cpu():
    """gpu_checks.py's checks of this session's changes (bf16 casts that follow the steps, fp32
    weight gradients, seeds drawn on the host), as a dry run on the CPU: they call mlora as it
    is now and pass there."""
    module = _gpu_checks()
    cpu = torch.device("cpu")
    for result in (module.check_bf16_casts_follow_steps(cpu), module.check_fp32_weight_gradients(cpu)):
        assert result["ok"], result
    assert module.check_fp32_weight_gradients(cpu)["gemm_writes_fp32"] is False  # (no such CPU GEMM)
    if _triton_unavailable():
        pytest.skip(_triton_unavailable())
    results = module.check_seeds_on_the_host(cpu)
    assert len(results) == 2 and all(r["ok"] for r in results), results
    result = module.check_cross_entropy_kernel(cpu)  # (interpreted; "auto" keeps torch's ops here)
    assert result["ok"] and not result["auto_uses_it"], result


def test_profile_host_splits_the_step_into_host_work_and_the_read(tmp_path):
    """benchmarks/profile_host.py (gpu_session.sh 2 runs it on the GPU) as a CPU smoke run:
    per adapter count, the step's wall time is the final read's wait plus the host's own work,
    and the profile names mlora's functions."""
    spec = importlib.util.spec_from_file_location("profile_host", Path(__file__).resolve().parents[1] / "benchmarks"
                                                  / "profile_host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--tiny", "--device", "cpu", "--adapters", "1,2", "--out", str(tmp_path)])
    assert [r["adapters"] for r in result["runs"]] == [1, 2]
    for r in result["runs"]:
        assert r["wall_ms_per_step"] > 0 and r["host_ms_per_step"] > 0
        assert r["host_ms_per_step"] + r["read_wait_ms_per_step"] == pytest.approx(r["wall_ms_per_step"], abs=0.02)
    assert json.loads((tmp_path / "host_profile.json").read_text())["runs"] == result["runs"]
    assert "lora_fused.py" in (tmp_path / "host_profile.txt").read_text()


def test_loss_benchmark_quick_mode(tmp_path):
    """benchmarks/bench_loss.py on the CPU: the chunked head (ten chunks) peaks well below the
    whole logits, and the memory model's estimate of it covers the tracked peak."""
    spec = importlib.util.spec_from_file_location("bench_loss", ROOT / "benchmarks" / "bench_loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "loss.json"
    report = module.main(["--quick", "--out", str(out)])
    (r,) = report["results"]
    assert json.loads(out.read_text())["results"] == [r]
    assert r["chunked"]["peak_mib"] < 0.35 * r["whole_logits"]["peak_mib"]
    assert r["chunked"]["peak_mib"] <= r["estimate_chunked_mib"] <= 1.05 * r["chunked"]["peak_mib"]
    assert r["chunked"]["ms"] > 0 and r["whole_logits"]["ms"] > 0


def test_loss_benchmark_records_a_failed_head_and_goes_on(tmp_path, monkeypatch):
    """A head whose run fails (its first Triton compile, say) is recorded with its error's
    first line, the next is measured, and the JSON is written after each."""
    spec = importlib.util.spec_from_file_location("bench_loss", ROOT / "benchmarks" / "bench_loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    real_run, written = module.run, []

    def first_fails(name, *args, **kwargs):
        if not written:
            raise RuntimeError("PassManager::run failed\nmore")
        return real_run(name, *args, **kwargs)

    monkeypatch.setattr(module, "run", first_fails)
    out = tmp_path / "loss.json"
    real_write = type(out).write_text
    monkeypatch.setattr(type(out), "write_text", lambda self, text: written.append(text) or real_write(self, text))
    report = module.main(["--heads", "tiny,tiny", "--tokens", "128", "--out", str(out)])
    failed, ran = report["results"]
    assert failed == {"head": "tiny", "error": "RuntimeError: PassManager::run failed"}
    assert ran["head"] == "tiny" and ran["chunked"]["ms"] > 0
    assert len(written) == 2 and json.loads(out.read_text())["results"] == report["results"]


def test_tiny_mode_takes_a_dtype(tmp_path, monkeypatch):
    """--dtype fp16 (bf16 on CUDA and fp32 elsewhere by default): every system builds its model
    in it, the JSON's meta says it, and mlora's adapters scale their losses as the trainer does
    in fp16 (their scale moves on after each step). The core part only, without Triton's
    interpreted runs or the collections before each run, to stay quick."""
    bench = _load()
    built = []
    real_init, real_plan = bench.MloraBench.__init__, bench.plan
    monkeypatch.setattr(bench.MloraBench, "__init__", lambda self, *a: real_init(self, *a) or built.append(self))
    monkeypatch.setattr(bench, "plan", lambda *a, **k: [] if a[3] == "triton" else real_plan(*a, **k))
    monkeypatch.setattr(bench, "free_memory", lambda device: None)  # (a full gc.collect before each run)
    steps = []
    monkeypatch.setattr(bench.Adapter, "update_loss_scale",
                        lambda self, finite: steps.append(self.loss_scale is not None) or False)
    out = tmp_path / "throughput.json"
    result = bench.main(["--tiny", *FEWEST_STEPS, "--no-extras", "--no-profile", "--dtype", "fp16",
                         "--out", str(out)])
    assert result["meta"]["dtype"] == "float16" and json.loads(out.read_text())["meta"]["dtype"] == "float16"
    assert {r["system"] for r in result["runs"]} == {"mlora", "mlora-base", "peft", "hf-base"}
    assert all(r["tokens_per_s"] > 0 and "error" not in r for r in result["runs"])
    assert built and all(b.model.model.embed_tokens.weight.dtype == torch.float16 for b in built)
    assert steps and all(steps)  # (1 + 4 adapters, warm-up and timed steps)
