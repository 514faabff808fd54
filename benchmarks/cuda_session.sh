#!/usr/bin/env bash
# Everything a session with a CUDA GPU should run, in one command (the lent device machines are short-lived):
#   bash benchmarks/cuda_session.sh [tests|bench|ring|tune|all]      (default all)
#     tests: the GPU's share of the suite (merge kernels, CUDA-only tests, ring blocks and virtual rings on CUDA)
#     bench: `ringattn bench --device cuda` (the merge, forward and backward)
#     ring:  the ring tests on CUDA, `ringattn bench ring --virtual` on the issue-11 cases, and where the
#            virtual ring's time goes (benchmarks/ring_profile.py)
#     tune:  (not in all) issue 12: the tile and flat Triton merges (Note [triton flat merge]) at the --sweep-t
#            sizes, both forms, against the copy floor and torch.compile (benchmarks/triton_tune.py; TUNE_ARGS
#            appends options, e.g. TUNE_ARGS="--sizes 4096,65536 --flat-block 1024,2048" for a shorter run)
# Logs and JSON go to $OUT (the device tool's output folder) or ./cuda-out. Uses the machine's python3 with
# torch, triton and numba already installed, and this checkout through PYTHONPATH (nothing to install).
set -uo pipefail
OUT=${OUT:-cuda-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
stage=${1:-all}
status=0

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    python3 -c "import torch, triton, numba; print('torch', torch.__version__, 'triton', triton.__version__,
        'numba', numba.__version__, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/facts.txt"

ring_tests=(tests/ring/test_blocks.py tests/ring/test_virtual.py tests/ring/test_ring.py)

if [[ $stage == tests || $stage == all ]]; then
    timeout 420 python3 -m pytest -q -rs -p no:cacheprovider --timeout 300 -m "not distributed" \
        -k "triton or cuda or blocks or virtual" \
        tests/test_cuda.py tests/backends/test_triton_cuda.py tests/backends/test_ring_attention_update.py \
        tests/test_reference.py tests/test_contract.py tests/test_bad_inputs.py tests/test_bench.py \
        "${ring_tests[@]}" 2>&1 | tee "$OUT/tests.txt" | tail -60
    status=$((status | PIPESTATUS[0]))
fi

if [[ $stage == ring ]]; then
    timeout 240 python3 -m pytest -q -rs -p no:cacheprovider --timeout 200 -m "not distributed" \
        "${ring_tests[@]}" 2>&1 | tee "$OUT/tests-ring.txt" | tail -40
    status=$((status | PIPESTATUS[0]))
fi

if [[ $stage == ring || $stage == all ]]; then
    # Issue 11's cases: B=1, N=32, Nkv=8, D=128, bfloat16; x single = one SDPA fwd+bwd / all virtual ranks' fwd+bwd.
    common=(--virtual --device cuda --batch 1 --heads 32 --kv-heads 8 --head-dim 128 --dtype bfloat16)
    {
        timeout 120 python3 -m ringattn.bench ring "${common[@]}" --world-size 8 --seq-len 32768 --repeats 5 \
            --impls auto,flash --json "$OUT/ring-32k-w8.json"
        timeout 120 python3 -m ringattn.bench ring "${common[@]}" --world-size 8 --seq-len 131072 --repeats 3 \
            --impls auto --json "$OUT/ring-128k-w8.json"
        timeout 120 python3 -m ringattn.bench ring "${common[@]}" --world-size 4 --seq-len 32768 --repeats 5 \
            --no-causal --impls auto,flash --json "$OUT/ring-32k-w4-full.json"
        timeout 90 python3 benchmarks/ring_profile.py --seq-len 32768 --world-size 8
    } 2>&1 | tee "$OUT/bench-ring.txt"
    status=$((status | PIPESTATUS[0]))
fi

if [[ $stage == bench || $stage == all ]]; then
    # forward and backward (the default on CUDA), each with torch.compile of the naive formula: ~12 Inductor compiles
    timeout 540 python3 -m ringattn.bench --device cuda --backend auto,torch --repeats 30 --warmup 3 \
        --pass forward,backward --json "$OUT/bench-cuda.json" --no-progress 2>&1 | tee "$OUT/bench-cuda.txt"
    status=$((status | PIPESTATUS[0]))
fi
if [[ $stage == tune ]]; then
    # shellcheck disable=SC2086  # TUNE_ARGS: words on purpose
    timeout 540 python3 benchmarks/triton_tune.py --kernel tile,flat --flat-block 256,512,1024,2048 --compiled \
        --json "$OUT/tune.json" ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.txt"
    status=$((status | PIPESTATUS[0]))
fi
exit "$status"
