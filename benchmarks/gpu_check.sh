#!/usr/bin/env bash
# One command for a machine with a GPU: the GPU tests, the benchmark and the cache benchmark, everything written
# under ONE results folder, benchmarks/results/gpucheck-<gpu name>-<UTC date-time>/:
#   pytest-gpu.log/.xml   `pytest -m gpu` (sync-debug checks of the loader + step, GPU pipeline, compiled step, ...)
#   bench.{json,md,png}   `convnext-fast benchmark`: ConvNeXt-Tiny at 128/176/192 px, batch 256, ablations at 176,
#                         loader-only records with main_thread_ms_per_batch, loops with the seed recipe's augmentation
#   cache-*.{json,md}     benchmarks/cache_bench.py: DALI with --cache host/device against no cache, 176 px
#   summary.txt           one line per step: ok / FAILED, seconds; the machine (nvidia-smi) at the top
# Sized for <= 8 minutes on an H200 (a planning estimate, not a measured time: no GPU was lent when it was
# written): ~2-3 min of tests, ~4 min of benchmark of which about 5 cold torch.compile builds (fast step at each
# size, the fp32 and NCHW ablations; the other ablations reuse inductor's cache), ~1 min of cache benchmark.
#
# DALI on the GPU machine: pip install nvidia-dali-cuda130 (or -cuda120: it must match torch.version.cuda; see
# README). Extra arguments go to the benchmark (e.g. DATA). Overrides (environment): PY, DEVICE (cuda), MODEL,
# SIZES, ABLATION_SIZES, BATCH, BENCH_ARGS (e.g. "--quick"), CACHE_ARGS, OUT; DRY_RUN=1 prints the commands only.
# A CPU smoke run of the plumbing (the gpu tests skip there):
#   DEVICE=cpu MODEL=convnext_atto SIZES=32,48 ABLATION_SIZES=none BATCH=8 BENCH_ARGS="--steps 1 --repeats 1
#   --warmup 1" CACHE_ARGS="--sizes 32 --batch-size 8 --repeats 1 --caches host" benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-convnext_tiny}
SIZES=${SIZES:-128,176,192}
ABLATION_SIZES=${ABLATION_SIZES:-176}
BATCH=${BATCH:-256}
BENCH_ARGS=${BENCH_ARGS:---steps 20 --loader-steps 8 --warmup 5 --repeats 3}
CACHE_ARGS=${CACHE_ARGS:---sizes 176 --batch-size 256 --repeats 2 --randaugment on --caches host,device}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

if [ "$DEVICE" = cpu ]; then
    machine="cpu-$(nproc)core"
else
    if ! command -v nvidia-smi >/dev/null; then
        echo "gpu_check.sh: no nvidia-smi: this command needs a GPU machine (DEVICE=cpu for a smoke run)" >&2
        exit 2
    fi
    machine="$(nvidia-smi --id=0 --query-gpu=name --format=csv,noheader | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' \
        | sed 's/-$//')"
fi
OUT=${OUT:-benchmarks/results/gpucheck-${machine}-$(date -u +%Y-%m-%d-%H%M%S)}

run_step() {  # run_step NAME CMD...: log to $OUT/NAME.log, one line in summary.txt; a failure does not stop the rest
    local name=$1 start rc
    shift
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%s: %s\n' "$name" "$*"
        return 0
    fi
    echo "== $name: $*"
    start=$(date +%s)
    set +e
    "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    set -e
    if [ $rc -eq 0 ]; then status=ok; else status="FAILED (exit $rc, see $name.log)"; failed=1; fi
    echo "$name: $status, $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
}

failed=0
if [ "${DRY_RUN:-0}" != 1 ]; then
    mkdir -p "$OUT"
    {
        echo "gpu_check.sh $(date -u +%FT%TZ) git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
        if [ "$DEVICE" != cpu ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
        echo "cpu: $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"
    } >"$OUT/summary.txt"
    cat "$OUT/summary.txt"
fi
t0=$(date +%s)
run_step pytest-gpu "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml "$OUT/pytest-gpu.xml" tests
# shellcheck disable=SC2086  # BENCH_ARGS / CACHE_ARGS are word lists on purpose
run_step bench "$PY" -m convnext_fast benchmark --device "$DEVICE" --model "$MODEL" --sizes "$SIZES" \
    --ablation-sizes "$ABLATION_SIZES" --batch-size "$BATCH" $BENCH_ARGS --dataset-size 70000 \
    --json "$OUT/bench.json" --markdown "$OUT/bench.md" --plot "$OUT/bench.png" "$@"
# shellcheck disable=SC2086
run_step cache "$PY" benchmarks/cache_bench.py --device "$DEVICE" $CACHE_ARGS --out-dir "$OUT"
if [ "${DRY_RUN:-0}" != 1 ]; then
    echo "total: $(( $(date +%s) - t0 )) s; results in $OUT" | tee -a "$OUT/summary.txt"
fi
exit $failed
