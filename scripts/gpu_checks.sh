#!/usr/bin/env bash
# All of cryoavg's GPU measurements (#7, docs/scaleout.md) in one command, for a machine
# with a CUDA GPU and cryoavg importable (installed, or PYTHONPATH=<checkout>).
#
#   scripts/gpu_checks.sh OUTDIR [STEP ...]
#
# STEP is any of: info tests estep splat tutorial case (default: all, in that order).
# Each step writes its JSON / log into OUTDIR and a failed step does not stop the others;
# the exit status is the number of failed steps. Environment:
#   PYTHON   interpreter (default python3)
#   DEVICE   torch device (default cuda; "cpu" runs the same plumbing on a CPU)
#   QUICK=1  tiny sizes (500 particles, 5 iterations) to check the script itself
#   CASE_DIR the public 70S case (default bench_out/ribosome70S; made by ../shared/bench)
set -u
out=${1:?usage: scripts/gpu_checks.sh OUTDIR [info tests estep splat tutorial case]}
shift
steps=${*:-info tests estep splat tutorial case}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
cd "$(dirname "$0")/.."
mkdir -p "$out"
failed=0

step() {  # step NAME COMMAND...: run it, log to OUTDIR/NAME.log, count a failure
    local name=$1
    shift
    local start=$SECONDS
    if "$@" >"$out/$name.log" 2>&1; then
        echo "$name: ok ($((SECONDS - start)) s)"
    else
        echo "$name: FAILED ($((SECONDS - start)) s, see $out/$name.log)"
        failed=$((failed + 1))
    fi
}

if [ "${QUICK:-0}" = 1 ]; then
    tutorial_size=(--particles 500 --iterations 5)
    case_size=(--iterations 3)
else
    tutorial_size=()
    case_size=()
fi
runs=$out/runs
for s in $steps; do
    case $s in
    info)
        step info "$py" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); [print(torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]"
        ;;
    tests)  # the tests marked gpu (CUDA TF32 / bf16 paths of the E-step), skipped on a CPU
        step tests_gpu "$py" -m pytest -q -p no:cacheprovider -m gpu tests
        ;;
    estep)  # E-step rate vs matmul and the reduced precisions' agreement with fp32
        step estep_k20 "$py" scripts/benchmark_class2d.py estep --device "$device" \
            --precision fp32 tf32 bf16 --out "$out/estep_k20.json"
        step estep_k100 "$py" scripts/benchmark_class2d.py estep --device "$device" \
            --classes 100 --precision fp32 tf32 bf16 --out "$out/estep_k100.json"
        ;;
    splat)  # sparse-product insertion vs per-row insertion (calibrates DENSE_SPLAT_FILL)
        step splat_k20 "$py" scripts/benchmark_class2d.py splat --device "$device" \
            --out "$out/splat_k20.json"
        step splat_k100 "$py" scripts/benchmark_class2d.py splat --device "$device" \
            --classes 100 --out "$out/splat_k100.json"
        ;;
    tutorial)  # the 10k-particle, K = 100, 100-iteration VDAM job, fp32 then bf16
        rm -rf "$runs/tutorial_fp32" "$runs/tutorial_bf16"
        step tutorial_fp32 "$py" scripts/benchmark_class2d.py tutorial --device "$device" \
            "${tutorial_size[@]}" --data-dir "$runs/tutorial_sim" \
            --run-dir "$runs/tutorial_fp32" --out "$out/tutorial_fp32.json"
        step tutorial_bf16 "$py" scripts/benchmark_class2d.py tutorial --device "$device" \
            "${tutorial_size[@]}" --data-dir "$runs/tutorial_sim" \
            --run-dir "$runs/tutorial_bf16" --out "$out/tutorial_bf16.json" \
            --override estep_precision=bf16
        ;;
    case)  # the public 70S case: quality against RELION's figures, on the device
        rm -rf "$runs/case_vdam"
        step case_vdam "$py" scripts/benchmark_class2d.py case --device "$device" \
            "${case_size[@]}" --case-dir "${CASE_DIR:-bench_out/ribosome70S}" \
            --run-dir "$runs/case_vdam" --out "$out/case_vdam.json"
        ;;
    *)
        echo "unknown step: $s" >&2
        failed=$((failed + 1))
        ;;
    esac
done
exit "$failed"
