#!/usr/bin/env bash
# The manual way, as in m-LoRA's README: one process per GPU, each told its rank, device and
# balance. Every rank gets the same --config, --base_model and --balance (checked at start-up),
# and on GPUs of different generations the same --dtype (its default follows each GPU).
#
#   BASE=/models/llama-2-7b CONFIG=config/example.json launch/manual.sh   # one rank per GPU
#   NUM_RANKS=2 BASE=... CONFIG=... launch/manual.sh                     # on the first 2 GPUs
#   BALANCE="9 9 9 8" BASE=... CONFIG=... launch/manual.sh               # a split of your own
#
# Without BALANCE, mlora splits the layers itself (the split that minimises the most expensive
# stage) over NUM_RANKS ranks (default: one per GPU nvidia-smi lists, or CUDA_VISIBLE_DEVICES leaves
# visible when set: rank N runs on cuda:N, which counts only those). BALANCE gives each rank's
# modules as --balance counts them, e.g. "9 9 9 8" for a 32-layer model (35 modules: embedding,
# 32 layers, norm, head) on 4 GPUs; its entries are the ranks (NUM_RANKS, if set, must agree).
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
BALANCE=${BALANCE:-}
NUM_RANKS=${NUM_RANKS:-}
TRANSPORT=${TRANSPORT:-torch}          # torch (NCCL between GPUs) or zmq
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
COMMAND=${COMMAND:-train}              # train, eval or generate
case "$COMMAND" in train|eval|generate) ;; *) echo "launch/manual.sh: COMMAND must be train, eval or generate, not $COMMAND" >&2; exit 2 ;; esac
read -r -a balance <<< "$BALANCE"
if [ -n "$NUM_RANKS" ]; then
    [[ "$NUM_RANKS" =~ ^[1-9][0-9]*$ ]] || { echo "launch/manual.sh: NUM_RANKS must be a positive whole number, not $NUM_RANKS" >&2; exit 2; }
    if [ "${#balance[@]}" -gt 0 ] && [ "${#balance[@]}" -ne "$NUM_RANKS" ]; then
        echo "launch/manual.sh: BALANCE \"$BALANCE\" has ${#balance[@]} entries, one per rank, but NUM_RANKS is $NUM_RANKS" >&2; exit 2
    fi
elif [ "${#balance[@]}" -gt 0 ]; then
    NUM_RANKS=${#balance[@]}
elif [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then  # one rank per GPU it leaves visible (cuda:N counts those)
    IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
    NUM_RANKS=${#visible[@]}
    [ "$NUM_RANKS" -gt 0 ] || { echo "launch/manual.sh: CUDA_VISIBLE_DEVICES leaves no GPU; set NUM_RANKS to the number of ranks, or BALANCE" >&2; exit 2; }
else  # one rank per GPU
    NUM_RANKS=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
    [ "$NUM_RANKS" -gt 0 ] || { echo "launch/manual.sh: no GPU found (nvidia-smi --list-gpus); set NUM_RANKS to the number of ranks, or BALANCE" >&2; exit 2; }
fi
# (without BALANCE every rank gets --world_size, and mlora computes the same split on each)
split_args=(--world_size "$NUM_RANKS")
[ "${#balance[@]}" -gt 0 ] && split_args=(--balance "${balance[@]}")
pids=()
for (( rank = 0; rank < NUM_RANKS; rank++ )); do
    device=${DEVICE_PREFIX:-cuda:}$rank
    [ "${DEVICE_PREFIX:-cuda:}" = "cpu" ] && device=cpu
    # (a script's background command ignores SIGINT: Ctrl-C would end this script and leave the
    # ranks training. Each rank takes it back, as one mlora in the foreground has it)
    ( trap - INT; exec "$PY" -m mlora "$COMMAND" --pipeline --rank "$rank" --device "$device" "${split_args[@]}" \
        --transport "$TRANSPORT" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        --base_model "$BASE" --config "$CONFIG" "$@" ) &
    pids+=($!)
done
# Ctrl-C reaches every rank (they are in this script's process group); the script itself waits
# on for them to stop (with save_step, each writes its part of a checkpoint first) rather than
# give the prompt back while they still write, and exits with their status.
trap '' INT
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
