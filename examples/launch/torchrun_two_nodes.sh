#!/usr/bin/env bash
# GRPO on two machines with plain torchrun (through `tune run`): run this script on both,
# with the same HEAD address (the first machine's, reachable from the second) and config.
#
#   HEAD=10.0.0.1 examples/launch/torchrun_two_nodes.sh tune_configs/qwen2_5_7b_temporal_clue_full.yaml
#
# Both machines need the checkout and .venv at the same path, the model directory, and one
# shared output_dir (rank 0 writes checkpoints; every rank reads them back on resume).
# NPROC: ranks per machine (default: its GPUs). NNODES: machines (default 2).
set -euo pipefail
CONFIG=${1:?usage: HEAD=<address> examples/launch/torchrun_two_nodes.sh <config.yaml> [key=value ...]}
shift
: "${HEAD:?set HEAD to the address of the first machine}"
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "$NPROC" -eq 0 ]; then NPROC=1; fi  # no GPU: one CPU rank per machine (gloo)

cd "$(dirname "$0")/../.."
source .venv/bin/activate
exec tune run \
  --nnodes "${NNODES:-2}" \
  --nproc_per_node "$NPROC" \
  --rdzv_id "${RDZV_ID:-packrl}" \
  --rdzv_backend c10d \
  --rdzv_endpoint "$HEAD:${PORT:-29500}" \
  recipes/grpo.py --config "$CONFIG" "$@"
