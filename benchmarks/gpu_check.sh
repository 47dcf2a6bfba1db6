#!/usr/bin/env bash
# The GPU check in stages, one command each, most valuable first, each inside its own time box (STAGE_BUDGET,
# default 500 s: under the GPU machine's 10-minute call with room for its start-up):
#   step       (a) `pytest -m gpu` on the GPU test files that do not use DALI: the compiled step, its sync-debug
#                  check, device Mixup/losses/metrics/fused AdamW (needs no DALI: the first call can run it while
#                  DALI's parts are still arriving)
#   tests      (a) DALI (installed from .device-dali/ parts first when it is missing: benchmarks/stage_dali.py),
#                  the DALI smoke test (which JPEG backend decoded, DALI's memory pool), then `pytest -m gpu` on
#                  the GPU test files that use DALI: the GPU graph against the CPU graph per op, the sync-debug
#                  tests of loader + step, the compiled training run (test_benchmark.py's GPU test is left to
#                  stage bench: it would be a second benchmark)
#   bench      (b) `convnext-fast benchmark` at the seed's final size: ConvNeXt-Tiny, 176 px, batch 256, loaders
#                  dali + torchvision: loader only, step only, fast and baseline loops, the verdict (one compile)
#   sizes      (c) 128 and 192 px with the progressive projection 128 -> 192 (two compiles)
#   ablations  (c) the six ablations at 176 px, step only (synthetic batches; four compiles)
#   cache      (c) benchmarks/cache_bench.py: DALI with --cache host/device against no cache, 176 px
# Usage: benchmarks/gpu_check.sh STAGE [STAGE...] [-- extra benchmark args, e.g. DATA]
# Every stage writes into WORK (default .gpu-check/, git-ignored, kept between calls while the machine stays up)
# and after each step refreshes OUT/gpu-check.tar.gz (all of WORK so far) and OUT/summary.txt: a stage cut off
# still returns what finished. OUT: $OUT when set (the GPU machine's return folder), else
# benchmarks/results/gpucheck-<gpu>-<date>. Two files in OUT, whatever the stages.
# Python: .venv/bin/python when there is one, else python3 with PYTHONPATH=. (no install needed). Unbuffered.
# DEVICE=cpu runs every stage's command on this CPU on a tiny model (convnext_atto, 32/48 px, batch 8, few
# steps): the rehearsal of the plumbing; the GPU tests skip there. DRY_RUN=1 prints the commands only.
# Overrides (environment): PY, DEVICE, MODEL, SIZE, BATCH, BENCH_ARGS, STAGE_BUDGET (seconds per stage),
# TOTAL_BUDGET (seconds for the whole command, several stages in one call: each stage gets what is left), WORK, OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

stages=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do stages+=("$1"); shift; done
[ "${1:-}" = -- ] && shift
extra=("$@")
all_stages="step tests bench sizes ablations cache"
if [ ${#stages[@]} -eq 0 ]; then
    echo "usage: benchmarks/gpu_check.sh STAGE [STAGE...] [-- benchmark args]; stages, most valuable first:" \
         "$all_stages (or all)" >&2
    exit 2
fi
[ "${stages[*]}" = all ] && read -r -a stages <<<"$all_stages"
for s in "${stages[@]}"; do
    case " $all_stages " in *" $s "*) ;; *) echo "gpu_check.sh: unknown stage '$s' (one of: $all_stages, all)" >&2
                                          exit 2 ;; esac
done

DEVICE=${DEVICE:-cuda}
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
site=$(pwd)/.device-dali/site  # where stage_dali.py installs DALI when the environment refuses (PEP 668)
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$site" ] && export PYTHONPATH="$site:$PYTHONPATH"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
if [ "$DEVICE" = cpu ]; then  # the rehearsal: the same commands, sized for seconds on a CPU
    machine="cpu-$(nproc)core"
    MODEL=${MODEL:-convnext_atto}; SIZE=${SIZE:-32}; SIZES2=${SIZES2:-32,48}; BATCH=${BATCH:-8}
    # --quick: no 'with_compile' ablation (inductor's CPU build takes minutes); explicit flags win over its sizes
    BENCH_ARGS=${BENCH_ARGS:---quick --steps 2 --loader-steps 2 --warmup 1 --repeats 1 --workers 2}
    CACHE_ARGS=${CACHE_ARGS:---sizes 32 --batch-size 8 --repeats 1 --workers 2 --caches host}
    STAGE_BUDGET=${STAGE_BUDGET:-300}
else
    if ! command -v nvidia-smi >/dev/null; then
        echo "gpu_check.sh: no nvidia-smi: this command needs a GPU machine (DEVICE=cpu for a rehearsal)" >&2
        exit 2
    fi
    machine="$(nvidia-smi --id=0 --query-gpu=name --format=csv,noheader | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' \
        | sed 's/-$//')"
    MODEL=${MODEL:-convnext_tiny}; SIZE=${SIZE:-176}; SIZES2=${SIZES2:-128,192}; BATCH=${BATCH:-256}
    BENCH_ARGS=${BENCH_ARGS:---steps 20 --loader-steps 40 --warmup 5 --repeats 3}
    CACHE_ARGS=${CACHE_ARGS:---sizes 176 --batch-size 256 --repeats 2 --randaugment on --caches host,device}
    STAGE_BUDGET=${STAGE_BUDGET:-500}
fi
WORK=${WORK:-.gpu-check}
OUT=${OUT:-benchmarks/results/gpucheck-${machine}-$(date -u +%Y-%m-%d-%H%M%S)}
# shellcheck disable=SC1091  # written by stage tests when DALI's pool needs DALI_USE_VMM=0
[ -f "$WORK/dali.env" ] && . "$WORK/dali.env"
dry=${DRY_RUN:-0}

refresh() {  # one archive of everything so far + the summary: what comes back even if the call is cut off next
    tar -czf "$OUT/.gpu-check.tar.gz.tmp" -C "$WORK" . && mv "$OUT/.gpu-check.tar.gz.tmp" "$OUT/gpu-check.tar.gz"
    cp "$WORK/summary.txt" "$OUT/summary.txt"
}

run_step() {  # run_step NAME SECONDS CMD...: inside the stage's time box; log WORK/NAME.log; one summary line
    local name=$1 limit=$2 start rc left status
    shift 2
    if [ "$dry" = 1 ]; then printf '%s: %s\n' "$name" "$*"; return 0; fi
    left=$(( deadline - $(date +%s) ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        echo "$name: skipped (the stage's time box is spent)" | tee -a "$WORK/summary.txt"
        refresh; failed=1; return 0
    fi
    echo "== $name (time box ${limit} s): $*"
    start=$(date +%s)
    set +e
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    set -e
    case $rc in
        0) status=ok ;;
        124|137) status="CUT OFF at its ${limit} s time box (see $name.log)"; failed=1 ;;
        *) status="FAILED (exit $rc, see $name.log)"; failed=1 ;;
    esac
    echo "$name: $status, $(( $(date +%s) - start )) s" | tee -a "$WORK/summary.txt"
    tail -n 5 "$WORK/$name.log" | sed 's/^/    /'
    refresh
}

bench() {  # bench NAME SECONDS ARGS...: convnext-fast benchmark, its JSON/markdown/plot under WORK
    local name=$1 limit=$2
    shift 2
    # shellcheck disable=SC2086  # BENCH_ARGS is a word list on purpose
    run_step "$name" "$limit" "$PY" -u -m convnext_fast benchmark "${extra[@]}" --device "$DEVICE" --model "$MODEL" \
        --batch-size "$BATCH" $BENCH_ARGS --dataset-size 70000 "$@" \
        --json "$WORK/$name.json" --markdown "$WORK/$name.md" --plot "$WORK/$name.png"
}

stage_tests() {
    if ! "$PY" -c "import nvidia.dali" 2>/dev/null; then
        if compgen -G ".device-dali/part*/manifest.json" >/dev/null; then
            run_step dali-install 240 "$PY" -u benchmarks/stage_dali.py install --device "$DEVICE" \
                --json "$WORK/dali-smoke.json"
            [ -d "$site" ] && export PYTHONPATH="$site:$PYTHONPATH"
        else
            echo "dali: not installed and no .device-dali/ parts here: the GPU tests that need DALI skip" \
                | { if [ "$dry" = 1 ]; then cat; else tee -a "$WORK/summary.txt"; fi; }
        fi
    else
        run_step dali-smoke 120 "$PY" -u benchmarks/dali_smoke.py --device "$DEVICE" --json "$WORK/dali-smoke.json"
    fi
    # DALI's memory pool worked only with DALI_USE_VMM=0 (the smoke test's retry): so for everything after it,
    # in this call and the next ones (WORK stays while the machine does).
    if [ "$dry" != 1 ] && grep -q '"memory_pool": "works only with DALI_USE_VMM=0"' "$WORK/dali-smoke.json" 2>/dev/null
    then
        echo "export DALI_USE_VMM=0" >"$WORK/dali.env"
        export DALI_USE_VMM=0
        echo "dali: the memory pool needs DALI_USE_VMM=0: set for the rest of the check" | tee -a "$WORK/summary.txt"
    fi
    gpu_tests pytest-gpu-dali dali
}

gpu_tests() {  # gpu_tests NAME dali|nodali: pytest -m gpu on the test files with GPU tests that do / don't use DALI
    local name=$1 want=$2 files=() f
    # Not test_benchmark.py: its GPU test is a whole --quick benchmark (stage bench measures the real one).
    for f in $(grep -l "mark.gpu" tests/test_*.py | grep -v "tests/test_benchmark.py"); do
        if grep -qi dali "$f"; then [ "$want" = dali ] && files+=("$f"); else [ "$want" = nodali ] && files+=("$f"); fi
    done
    run_step "$name" 420 "$PY" -u -m pytest -m gpu -v -rs -p no:cacheprovider --durations=15 \
        --junitxml "$WORK/$name.xml" "${files[@]}"
}

stage_step() { gpu_tests pytest-gpu-step nodali; }

stage_bench() { bench bench "$STAGE_BUDGET" --sizes "$SIZE" --loaders dali,torchvision --ablation-sizes none; }
stage_sizes() { bench sizes "$STAGE_BUDGET" --sizes "$SIZES2" --loaders dali,torchvision --ablation-sizes none \
                    --progressive "${SIZES2%%,*}"; }
stage_ablations() { bench ablations "$STAGE_BUDGET" --sizes "$SIZE" --loaders synthetic --ablation-sizes "$SIZE"; }
stage_cache() {
    # shellcheck disable=SC2086
    run_step cache "$STAGE_BUDGET" "$PY" -u benchmarks/cache_bench.py --device "$DEVICE" $CACHE_ARGS \
        --out-dir "$WORK/cache"
}

failed=0
if [ "$dry" != 1 ]; then
    mkdir -p "$WORK" "$OUT"
    {
        echo "gpu_check.sh ${stages[*]} $(date -u +%FT%TZ) git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
        [ "$DEVICE" != cpu ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        echo "cpu: $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg); python: $PY" \
             "$(timeout 60 "$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)' 2>&1 \
             | tail -1)"
    } >>"$WORK/summary.txt"
fi
end_all=$(( $(date +%s) + ${TOTAL_BUDGET:-999999} ))
for s in "${stages[@]}"; do
    deadline=$(( $(date +%s) + STAGE_BUDGET ))
    [ "$deadline" -gt "$end_all" ] && deadline=$end_all
    t0=$(date +%s)
    [ "$dry" = 1 ] || echo "stage $s: start, time box ${STAGE_BUDGET} s" | tee -a "$WORK/summary.txt"
    "stage_$s"
    if [ "$dry" != 1 ]; then
        echo "stage $s: done in $(( $(date +%s) - t0 )) s" | tee -a "$WORK/summary.txt"
        refresh
    fi
done
[ "$dry" = 1 ] || echo "results: $OUT/gpu-check.tar.gz ($(ls "$OUT" | wc -l) files in $OUT)"
exit $failed
