#!/usr/bin/env bash
# Launch `scaletrain train CONFIG` (or SCALETRAIN_COMMAND=hpo: the config's search) with `accelerate launch`.
#
#   ACCELERATE_CONFIG=configs/accelerate/fsdp.yaml launch/accelerate.sh CONFIG [--field value ...]
#
# The accelerate config picks the process layout. If it enables FSDP or
# DeepSpeed and CONFIG says `strategy: auto`, scaletrain picks the matching
# strategy (fsdp, zero1/2/3 with the same offload); an explicit, different
# strategy in CONFIG is an error rather than a silent choice.
# NPROC overrides the config's num_processes, MASTER_PORT its port.
set -euo pipefail

command=${SCALETRAIN_COMMAND:-train}
case $command in train|hpo) ;; *) echo "SCALETRAIN_COMMAND=$command: use train or hpo" >&2; exit 2 ;; esac

config=${1:?usage: launch/accelerate.sh CONFIG [--field value ...]}
shift
python=${PYTHON:-python}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
accelerate_config=${ACCELERATE_CONFIG:-$here/configs/accelerate/ddp.yaml}
extra=()
if [[ -n ${NPROC:-} ]]; then
    extra+=(--num_processes "$NPROC")
fi
if [[ -n ${MASTER_PORT:-} ]]; then
    extra+=(--main_process_port "$MASTER_PORT")
fi
if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    # CPU hosts: without this, accelerate silently starts a single process
    export ACCELERATE_USE_CPU=1
fi
exec "$python" -m accelerate.commands.launch --config_file "$accelerate_config" "${extra[@]}" \
    -m scaletrain "$command" "$config" "$@"
