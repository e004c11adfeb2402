#!/usr/bin/env bash
# Pipeline training under torchrun: one process per GPU; rank and device come from torchrun's
# environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
#
# One node, 4 GPUs:
#   launch/torchrun.sh --nproc 4 --balance "10 9 9 7" --base_model /models/llama-2-7b --config config/example.json
# Two nodes, 2 GPUs each (run on both nodes, NODE_RANK 0 and 1; HOST is node 0's address):
#   launch/torchrun.sh --nproc 2 --nnodes 2 --node_rank NODE_RANK --rdzv_endpoint HOST:29400 \
#       --balance "9 9 9 8" --base_model /models/llama-2-7b --config config/example.json
# Anything after `--` goes to mlora (e.g. -- --transport zmq --output_dir out).
# --command eval evaluates the adapters saved in output_dir the same way (`mlora eval --pipeline`;
# rank 0 prints the JSON lines, the other ranks nothing); --command generate completes prompts
# with them (`mlora generate --pipeline`: -- --prompt "..." --base); the default is --command train.
# PYTHON is the interpreter that has mlora installed: by default the python3 on PATH when it has
# mlora and torch (an activated environment mlora was installed into), else this checkout's
# .venv/bin/python (what `make setup` makes) when there is one, else python3. TORCHRUN is the
# torchrun command (default: $PYTHON -m torch.distributed.run).
set -euo pipefail
command=train; nproc=1; nnodes=1; node_rank=0; rdzv_endpoint=""; balance=""; base_model=""; config=""
while [ $# -gt 0 ]; do
    case "$1" in
        --command|--nproc|--nnodes|--node_rank|--rdzv_endpoint|--balance|--base_model|--config)
            # (set -u would otherwise end a value-less last option with bash's "unbound variable")
            [ $# -ge 2 ] || { echo "launch/torchrun.sh: $1 needs a value" >&2; exit 2; } ;;
    esac
    case "$1" in
        --command) command=$2; shift 2 ;;
        --nproc) nproc=$2; shift 2 ;;
        --nnodes) nnodes=$2; shift 2 ;;
        --node_rank) node_rank=$2; shift 2 ;;
        --rdzv_endpoint) rdzv_endpoint=$2; shift 2 ;;
        --balance) balance=$2; shift 2 ;;
        --base_model) base_model=$2; shift 2 ;;
        --config) config=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "launch/torchrun.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ -n "$base_model" ] && [ -n "$config" ] || { echo "launch/torchrun.sh: --base_model and --config are required" >&2; exit 2; }
case "$command" in train|eval|generate) ;; *) echo "launch/torchrun.sh: --command must be train, eval or generate, not $command" >&2; exit 2 ;; esac
# (torchrun's forms: a node count or an elastic MIN:MAX; anything else was bash's "integer
# expression expected", and the run went on as one standalone node)
[[ "$nnodes" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || { echo "launch/torchrun.sh: --nnodes must be a number of nodes (or MIN:MAX), not $nnodes" >&2; exit 2; }
[[ "$node_rank" =~ ^[0-9]+$ ]] || { echo "launch/torchrun.sh: --node_rank must be a whole number, not $node_rank" >&2; exit 2; }
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/python.sh"  # PY
read -r -a torchrun <<< "${TORCHRUN:-$PY -m torch.distributed.run}"
rdzv=(--standalone)
if [ "$nnodes" != 1 ]; then
    [ -n "$rdzv_endpoint" ] || { echo "launch/torchrun.sh: --nnodes > 1 needs --rdzv_endpoint HOST:PORT" >&2; exit 2; }
    rdzv=(--nnodes "$nnodes" --node_rank "$node_rank" --rdzv_backend c10d --rdzv_endpoint "$rdzv_endpoint" --rdzv_id "mlora-${MLORA_RUN_ID:-job}")
fi
balance_args=()
[ -n "$balance" ] && balance_args=(--balance $balance)
exec "${torchrun[@]}" "${rdzv[@]}" --nproc_per_node "$nproc" -m mlora "$command" --pipeline \
    --base_model "$base_model" --config "$config" "${balance_args[@]}" "$@"
