#!/usr/bin/env bash
# Issue 3's GPU checks in one call of a short GPU lease, inside a time budget:
#   bash bench/gpu_session.sh OUT_DIR [BUDGET_SECONDS]     (repo root, on the GPU machine; default 520 s)
# 1. timings alone on the GPU (autotuned), bench.gpu_check's sections $TIMINGS (default: the goal shape's
#    providers, the fused FFN's regimes by T, the one-read-of-x bandwidth, moe_lora's regimes);
# 2. with PROFILE=1, bench.gpu_profile: the kernels of one fwd+bwd step, per case (where the time goes);
#    with MILORA=1, the milora bench suite at llama2-7b in bf16 (issue 4's decode-step goals), up to a third
#    of the time left;
# 3. $CHECKS (default "parity races configs") for each of $DTYPES (default "bf16 fp16 fp32"), in parallel
#    processes: parity and races with one pinned tile per kernel (there the cost is compiling, which the
#    processes spread over the CPUs), configs (every autotune config forced in turn) without the pin;
# 4. one merged gpu_check report (JSON + markdown) in OUT_DIR, the profile's and the whole log beside it.
# Every step runs under `timeout`, and gpu_check writes its JSON after each section (the timings after each
# provider), so a step cut short keeps what it measured. Needs no install: moelora.kernels is linked to
# kernels/ (the layout pip's package-dir mapping gives), so no C++ build is spent on the GPU's time.
set -uo pipefail
out=${1:?usage: bash bench/gpu_session.sh OUT_DIR [BUDGET_SECONDS]}
budget=${2:-520}
timings=${TIMINGS-ffn,crossover,bandwidth,regimes}
checks=${CHECKS-parity races configs}
dtypes=${DTYPES-bf16 fp16 fp32}
mkdir -p "$out"
parts=$(mktemp -d)
[ -e moelora/kernels ] || ln -s ../kernels moelora/kernels
export PYTHONUNBUFFERED=1
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

    if [ -n "$timings" ]; then
        echo "== timings $timings (up to $(($(left) / 2)) s)"
        timeout $(($(left) / 2)) python3 -m bench.gpu_check --only "$timings" --out "$parts" --tag timings
        echo "== timings: exit $? at $((SECONDS - start)) s"
    fi

    if [ "${PROFILE:-0}" = 1 ]; then
        echo "== profile (up to $(($(left) / 2)) s)"
        timeout $(($(left) / 2)) python3 -m bench.gpu_profile --out "$out"
        echo "== profile: exit $? at $((SECONDS - start)) s"
    fi

    if [ "${MILORA:-0}" = 1 ]; then
        echo "== milora suite (up to $(($(left) / 3)) s)"
        timeout $(($(left) / 3)) python3 -m bench --suite milora --preset llama2-7b --dtype bf16 --out "$out"
        echo "== milora: exit $? at $((SECONDS - start)) s"
    fi
    limit=$(($(left) - 25))
    echo "== $checks for $dtypes (up to $limit s)"
    for dt in $dtypes; do
        for section in $checks; do
            pin=1
            [ "$section" = configs ] && pin=0
            MOELORA_TRITON_PIN_CONFIG=$pin timeout "$limit" python3 -m bench.gpu_check --only "$section" --dtypes "$dt" \
                --out "$parts" --tag "$section-$dt" >"$parts/$section-$dt.log" 2>&1 &
        done
    done
    wait
    for log in "$parts"/*.log; do
        [ -e "$log" ] && echo "-- $(basename "$log")" && tail -n 3 "$log"
    done
    echo "== checks: done at $((SECONDS - start)) s"

    python3 -m bench.gpu_check --merge "$parts"/*.json --out "$out"
    echo "== merged: exit $? at $((SECONDS - start)) s"
} 2>&1 | tee "$out/gpu-session.log"
