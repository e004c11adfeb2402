#!/usr/bin/env bash
# One prepared session on a lent GPU (see /work/.library/device/README.md): CUDA-only checks
# first, then the throughput benchmark (most important figures first; its JSON is rewritten
# after every run, so a timeout keeps what ran), then a profile of the fused step.
#   OUT=/some/dir bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/mlora-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 benchmarks/gpu_checks.py --out "$OUT/gpu_checks.json" 2>&1 | grep -v Warning
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench_throughput.py --out "$OUT/throughput.json" 2>&1 | grep -v -i warn
timeout 60 python3 benchmarks/bench_throughput.py --shapes tinyllama-1.1b --profile "$OUT/profile.txt" > /dev/null 2>&1
head -c 4000 "$OUT/profile.txt"
