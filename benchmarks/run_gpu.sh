#!/usr/bin/env bash
# Reproduces the README's GPU table: `convnext-fast benchmark` with ConvNeXt-Tiny on the first CUDA device, the
# built-in demo dataset, at 128, 176 and 192 px (batch 128, 10 warm-up + 3 x 50 timed steps), ablations at 176 px
# (every compiled engine costs about a minute of compile; --ablation-sizes all for every size).
#
# Results: benchmarks/results/<gpu name>-<UTC date>.{json,md,png}, e.g. gpu-nvidia-h200-2026-11-29.json. Results
# are added, never edited: an existing name gets a time suffix. Extra arguments are passed on (e.g. DATA,
# --batch-size 256, --ablation-sizes none for a shorter run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
gpu=$(nvidia-smi --id=0 --query-gpu=name --format=csv,noheader | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-$//')
name="gpu-${gpu}-$(date -u +%F)"
if [ -e "benchmarks/results/$name.json" ]; then name="$name-$(date -u +%H%M%S)"; fi
out="benchmarks/results/$name"
"$PY" -m convnext_fast benchmark --device cuda --model convnext_tiny --sizes 128,176,192 --ablation-sizes 176 \
    --dataset-size 70000 \
    --json "$out.json" --markdown "$out.md" --plot "$out.png" "$@"
