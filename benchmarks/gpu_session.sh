#!/usr/bin/env bash
# One prepared session on a lent GPU (see /work/.library/device/README.md), in two parts that
# each fit one device call (at most 10 minutes):
#   OUT=/some/dir bash benchmarks/gpu_session.sh 1   # CUDA-only checks, then the throughput
#                                                    # benchmark (most important figures first,
#                                                    # then fused and triton side by side, the
#                                                    # extras, and last a profile of the first
#                                                    # shape's frozen base and 4-adapter step; its
#                                                    # JSON is rewritten after every run, so a
#                                                    # timeout keeps what ran)
#   OUT=/some/dir bash benchmarks/gpu_session.sh 2   # the chunked head against the whole logits
#                                                    # (bench_loss.py), the MoE benchmark (bench_moe.py), the
#                                                    # host's time at 1-2 adapters (profile_host.py),
#                                                    # a profile of llama2-7b's 4-adapter step,
#                                                    # then the batch strategies on the GPU
# Part 1 alone answers the throughput issue's targets (run it with the device call's
# timeout_s at 600); run part 2 if device time is left.
set -u
PART=${1:-1}
OUT=${OUT:-/tmp/mlora-gpu}
mkdir -p "$OUT"
# (transformers' logged warnings off: its "[transformers] ..." lines cannot be told from its errors)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
T0=$SECONDS
# Everything printed also goes to $OUT/session.log: the device tool returns only the output's
# last 12,000 characters, and a traceback early in the session would scroll out of them. Python's
# warning messages are left out (drop_warnings.py); every other line is kept, tracebacks whole.
log() { python3 -u benchmarks/drop_warnings.py | tee -a "$OUT/session.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt" | log
if [ "$PART" = 1 ]; then
  # The checks take about a minute; the benchmark gets what is left of one device call
  # (BUDGET seconds, default 560 of its 600), and records the library versions itself.
  # (bench_kext.py, measured on 2026-11-30, is not rerun: RESULTS.md)
  timeout 150 python3 benchmarks/gpu_checks.py --out "$OUT/gpu_checks.json" 2>&1 | log
  LEFT=$(( ${BUDGET:-560} - (SECONDS - T0) ))
  [ "$LEFT" -gt 60 ] || LEFT=60  # (timeout 0 would mean no limit at all)
  timeout "$LEFT" python3 benchmarks/bench_throughput.py --out "$OUT/throughput.json" 2>&1 | log
else
  # The head a chunk at a time against the whole logits (after 2026-11-30): peak and time
  timeout 60 python3 benchmarks/bench_loss.py --out "$OUT/loss_gpu.json" 2>&1 | log
  # Mixture-of-experts bases: the grouped experts (after 2026-11-30) against the experts
  # one at a time and PEFT on transformers' grouped experts
  timeout 165 python3 benchmarks/bench_moe.py --out "$OUT/moe_gpu.json" 2>&1 | log
  # Where the host's time goes at 1 and 2 adapters (TinyLlama), where the step is bound by it
  timeout 80 python3 benchmarks/profile_host.py --out "$OUT" 2>&1 | log
  # Part 1 profiled the first shape (tinyllama-1.1b); this profiles llama2-7b's step.
  timeout 120 python3 benchmarks/bench_throughput.py --shapes llama2-7b --profile "$OUT/profile_7b.txt" 2>&1 | log
  timeout 150 python3 benchmarks/bench_strategies.py --quick --device cuda --out "$OUT/strategies_gpu.json" 2>&1 | log | tail -30
fi
