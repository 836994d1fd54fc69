#!/usr/bin/env bash
# Launch `scaletrain train CONFIG` (or SCALETRAIN_COMMAND=hpo: the config's search) with torchrun.
#
#   launch/torchrun.sh CONFIG [--field value ...]
#
# One node: NPROC ranks (default: one per GPU, or 2 CPU ranks without GPUs).
# Several nodes: run this on every node with NNODES and MASTER_ADDR (a node all
# of them reach) set; ranks rendezvous there. Under SLURM use slurm.sbatch.
# MAX_RESTARTS=N: torchrun restarts the workers up to N times after a failure,
# and training resumes from the newest committed checkpoint (resume_from_checkpoint
# auto); a search continues from its storage.
set -euo pipefail

command=${SCALETRAIN_COMMAND:-train}
case $command in train|hpo) ;; *) echo "SCALETRAIN_COMMAND=$command: use train or hpo" >&2; exit 2 ;; esac

config=${1:?usage: launch/torchrun.sh CONFIG [--field value ...]}
shift
python=${PYTHON:-python}
nproc=${NPROC:-$("$python" -c 'import torch; print(torch.cuda.device_count() or 2)')}
nnodes=${NNODES:-1}
# each rank gets its share of this node's cores (torchrun would pick 1 thread and print a banner about it)
cores=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}
restarts=${MAX_RESTARTS:-0}
resume=()
if [[ $restarts != 0 && $command == train ]]; then
    resume=(--resume_from_checkpoint auto)  # before "$@": an explicit choice there wins
fi

if [[ $nnodes == 1 ]]; then
    rendezvous=(--standalone)
else
    rendezvous=(--rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR for multi-node runs}:${MASTER_PORT:-29500}"
                --rdzv_id "${RUN_ID:-scaletrain}")
fi
exec "$python" -m torch.distributed.run --nnodes "$nnodes" --nproc_per_node "$nproc" "${rendezvous[@]}" \
    --max-restarts "$restarts" -m scaletrain "$command" "$config" "${resume[@]}" "$@"
