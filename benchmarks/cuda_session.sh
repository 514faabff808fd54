#!/usr/bin/env bash
# Everything a session with a CUDA GPU should run, in one command (the lent device machines are short-lived):
#   bash benchmarks/cuda_session.sh [tests|bench|all]      (default all)
# Logs and JSON go to $OUT (the device tool's output folder) or ./cuda-out. Uses the machine's python3 with
# torch, triton and numba already installed, and this checkout through PYTHONPATH (nothing to install).
set -uo pipefail
OUT=${OUT:-cuda-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
stage=${1:-all}
status=0

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    python3 -c "import torch, triton, numba; print('torch', torch.__version__, 'triton', triton.__version__,
        'numba', numba.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/facts.txt"

if [[ $stage == tests || $stage == all ]]; then
    # The GPU's share of the suite: CUDA-only tests, the Triton kernels compiled (not interpreted), the shared
    # property tests for the triton backend, ring blocks and ring attention on CUDA, the CUDA bench path.
    timeout 480 python3 -m pytest -q -rs -p no:cacheprovider --timeout 300 -k "triton or cuda or blocks" \
        tests/test_cuda.py tests/backends/test_triton_cuda.py tests/backends/test_ring_attention_update.py \
        tests/test_reference.py tests/test_contract.py tests/ring/test_blocks.py tests/ring/test_ring.py \
        tests/test_bench.py 2>&1 | tee "$OUT/tests.txt" | tail -60
    status=$((status | PIPESTATUS[0]))
fi

if [[ $stage == bench || $stage == all ]]; then
    timeout 300 python3 -m ringattn.bench --device cuda --backend auto,torch --repeats 30 --warmup 3 \
        --json "$OUT/bench-cuda.json" --no-progress 2>&1 | tee "$OUT/bench-cuda.txt"
    status=$((status | PIPESTATUS[0]))
fi
exit "$status"
