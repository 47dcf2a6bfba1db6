"""`convnext-fast benchmark`: how much faster than the baseline, and where the time goes.

  run.py      the measurements (loader-only, step-only, ablations, end-to-end loops) and the result document
  timing.py   honest timing: meters, interleaved rounds, peak memory
  env.py      provenance (machine, versions, commit) and FLOPs / MFU
  summary.py  paired round-by-round ratios and the bottleneck verdict
  report.py   table, JSON, markdown and plot of a result document
"""
