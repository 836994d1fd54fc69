#!/usr/bin/env bash
# The GPU benchmark in one command (benchmarks/gpu.py): on a GPU host whose image has torch, transformers,
# accelerate and peft but not DeepSpeed, the wheels carried in under wheels/ (e.g. `pip download --no-deps
# deepspeed==0.19.8 -d wheels/` on a machine with network) are installed first, without network.
#   benchmarks/gpu.sh                 # ~1B Llama, bf16, fsdp/ddp/zero3 x compile x checkpointing
#   benchmarks/gpu.sh --tiny          # CPU smoke run with a tiny model
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
if [[ -d $here/wheels ]] && compgen -G "$here/wheels/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --find-links "$here/wheels" "$here"/wheels/*.whl
fi
if ! "$python" -c 'import scaletrain' 2> /dev/null; then
    "$python" -m pip install -q --no-deps -e "$here"
fi
exec "$python" "$here/benchmarks/gpu.py" "$@"
