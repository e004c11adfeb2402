#!/usr/bin/env bash
# One prepared session on a lent GPU (see /work/.library/device/README.md), in two parts that
# each fit one device call (at most 10 minutes):
#   OUT=/some/dir bash benchmarks/gpu_session.sh 1   # CUDA-only checks, then the throughput
#                                                    # benchmark (most important figures first,
#                                                    # then a profile of the first shape's frozen
#                                                    # base, fused and triton steps, then the
#                                                    # extras; its JSON is rewritten after every
#                                                    # run, so a timeout keeps what ran)
#   OUT=/some/dir bash benchmarks/gpu_session.sh 2   # the batch strategies on the GPU, then a
#                                                    # profile of the fused 4-adapter step
# Part 1 alone answers the throughput issue's targets; run part 2 if device time is left.
set -u
PART=${1:-1}
OUT=${OUT:-/tmp/mlora-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
if [ "$PART" = 1 ]; then
  timeout 180 python3 benchmarks/gpu_checks.py --out "$OUT/gpu_checks.json" 2>&1 | grep -v Warning
  timeout "${BENCH_TIMEOUT:-340}" python3 benchmarks/bench_throughput.py --out "$OUT/throughput.json" 2>&1 | grep -v -i warn
else
  timeout 200 python3 benchmarks/bench_strategies.py --quick --device cuda --out "$OUT/strategies_gpu.json" 2>&1 | grep -v -i warn | tail -30
  timeout 90 python3 benchmarks/bench_throughput.py --shapes tinyllama-1.1b --profile "$OUT/profile.txt" > /dev/null 2>&1
  head -c 4000 "$OUT/profile.txt"
fi
