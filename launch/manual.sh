#!/usr/bin/env bash
# The manual way, as in m-LoRA's README: one process per GPU, each told its rank, device and
# balance. Every rank gets the same --config, --base_model and --balance (checked at start-up),
# and on GPUs of different generations the same --dtype (its default follows each GPU).
# This example: a 32-layer model (35 modules: embedding, 32 layers, norm, head) on 4 GPUs.
#
#   BASE=/models/llama-2-7b CONFIG=config/example.json launch/manual.sh
#
# COMMAND=eval evaluates the adapters saved in output_dir the same way (`mlora eval --pipeline`;
# rank 0 prints the JSON lines, the other ranks nothing); COMMAND=generate completes prompts
# with them (`mlora generate --pipeline`, e.g. --prompt "..." --base; rank 0 prints the JSON
# lines). Arguments go to mlora, e.g. --output_dir.
#
# On several hosts, start each rank on its host with --master_addr set to rank 0's address.
# PYTHON is the interpreter that has mlora installed: by default the python3 on PATH when it has
# mlora and torch (an activated environment mlora was installed into), else this checkout's
# .venv/bin/python (what `make setup` makes) when there is one, else python3.
set -euo pipefail
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/python.sh"  # PY
BASE=${BASE:?set BASE to the base model directory}
CONFIG=${CONFIG:?set CONFIG to the training config}
BALANCE=${BALANCE:-"9 9 9 8"}
TRANSPORT=${TRANSPORT:-torch}          # torch (NCCL between GPUs) or zmq
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
COMMAND=${COMMAND:-train}              # train, eval or generate
case "$COMMAND" in train|eval|generate) ;; *) echo "launch/manual.sh: COMMAND must be train, eval or generate, not $COMMAND" >&2; exit 2 ;; esac
read -r -a balance <<< "$BALANCE"
pids=()
for rank in "${!balance[@]}"; do
    device=${DEVICE_PREFIX:-cuda:}$rank
    [ "${DEVICE_PREFIX:-cuda:}" = "cpu" ] && device=cpu
    "$PY" -m mlora "$COMMAND" --pipeline --rank "$rank" --device "$device" --balance "${balance[@]}" \
        --transport "$TRANSPORT" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        --base_model "$BASE" --config "$CONFIG" "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
