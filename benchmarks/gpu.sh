#!/usr/bin/env bash
# The GPU benchmark in one command (benchmarks/gpu.py): on a GPU host whose image has torch, transformers,
# accelerate and peft but not DeepSpeed, the wheels carried in under wheels/ (e.g. `pip download --no-deps
# deepspeed==0.19.8 -d wheels/` on a machine with network) are installed first, without network.
# Where torch sees a CUDA device, the GPU-only tests (`make test-gpu`: pytest -m gpu) run first; a failure
# stops the script, as numbers from a stack that fails them would mean little. SKIP_GPU_TESTS=1 skips them.
#   benchmarks/gpu.sh                 # ~1B Llama, bf16, fsdp/ddp/zero3 x compile x checkpointing, fsdp+float8
#                                     # (carry the torchao wheel in wheels/ if the image lacks it); on a host
#                                     # with 4+ GPUs also flat FSDP vs HSDP 2x2 vs tp2 x FSDP2 on 4 GPUs
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
if [[ ${SKIP_GPU_TESTS:-0} == 1 ]]; then
    echo "SKIP_GPU_TESTS=1: the GPU tests (make test-gpu) are not run"
elif ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device: the GPU tests (make test-gpu) are skipped"
elif ! "$python" -c 'import pytest' 2> /dev/null; then
    echo "pytest is not installed for $python: the GPU tests (make test-gpu) are not run (carry its wheel in" \
        "wheels/)" >&2
else
    # only the files holding gpu tests: the others import packages (optuna, ray, ...) a GPU image may lack
    mapfile -t gpu_tests < <(grep -l "pytest.mark.gpu" "$here"/tests/test_*.py)
    (cd "$here" && GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} "$python" -m pytest -q -m gpu "${gpu_tests[@]}")
fi
exec "$python" "$here/benchmarks/gpu.py" "$@"
