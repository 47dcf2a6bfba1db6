#!/usr/bin/env bash
# Reproduces the README's CPU table: `convnext-fast benchmark` on this machine's CPU with the built-in demo dataset
# (2520 training JPEGs of 128 px, 21 classes), at 128, 176 and 192 px.
#
# ConvNeXt-Tiny trains at a few images/s on a small CPU, so this run uses convnext_atto (3.4 M params) and a batch
# of 16; the loaders do the same work whatever the model. Ablations (each speed feature flipped, including
# torch.compile and bf16 switched on) run at 176 px only, to keep the run near 15 minutes on 2 cores.
#
# Results: benchmarks/results/cpu-<cores>core-<UTC date>.{json,md,png}. Results are added, never edited: an
# existing name gets a time suffix. Extra arguments are passed on (e.g. DATA, or --sizes 128 for a short run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
name="cpu-$(nproc)core-$(date -u +%F)"
if [ -e "benchmarks/results/$name.json" ]; then name="$name-$(date -u +%H%M%S)"; fi
out="benchmarks/results/$name"
# Spinning OpenMP threads stall many-fold on a shared, oversubscribed CPU; the setting is recorded in the JSON.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
"$PY" -m convnext_fast benchmark --device cpu --model convnext_atto --sizes 128,176,192 --batch-size 16 \
    --steps 3 --loader-steps 30 --warmup 2 --repeats 7 --ablation-sizes 176 --dataset-size 70000 \
    --json "$out.json" --markdown "$out.md" --plot "$out.png" "$@"
