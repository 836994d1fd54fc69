#!/usr/bin/env bash
# Launch `scaletrain train CONFIG` (or SCALETRAIN_COMMAND=hpo: the config's search) with the deepspeed launcher.
#
#   launch/deepspeed.sh CONFIG [--field value ...]
#
# One node: NPROC ranks (default: one per GPU, or 2 CPU ranks without GPUs).
# Several nodes: HOSTFILE=path/to/hostfile (DeepSpeed's "host slots=N" format;
# the launcher reaches the other hosts over ssh).
# CONFIG should set strategy zero1|zero2|zero3; the launcher itself only starts processes.
set -euo pipefail

command=${SCALETRAIN_COMMAND:-train}
case $command in train|hpo) ;; *) echo "SCALETRAIN_COMMAND=$command: use train or hpo" >&2; exit 2 ;; esac

config=${1:?usage: launch/deepspeed.sh CONFIG [--field value ...]}
shift
python=${PYTHON:-python}
nproc=${NPROC:-$("$python" -c 'import torch; print(torch.cuda.device_count() or 2)')}
hosts=()
if [[ -n ${HOSTFILE:-} ]]; then
    hosts=(--hostfile "$HOSTFILE")
fi
exec "$python" -m deepspeed.launcher.runner "${hosts[@]}" --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" \
    --no_local_rank --module scaletrain "$command" "$config" "$@"
