"""What the benchmark's measurements add up to at one size: speed-ups, projected epoch times, the verdict.

Everything is computed from the records' own numbers, so the JSON is self-consistent: a speed-up is the ratio
of the two medians it names. Where two measurements ran interleaved (step-only and loops of one size), the
ratio of their windows round by round ("paired") shows whether a difference is larger than the machine's noise.
"""

from __future__ import annotations

import statistics

__all__ = ["CACHED_LOADER", "DATA_WAIT_LIMIT_PCT", "LOOPS", "LOOP_ENGINE", "summarize"]

DATA_WAIT_LIMIT_PCT = 10.0  # above this share of the loop blocked in next(loader), the loader is the limit
CACHED_LOADER = "dali-cached"  # the dali backend with the decoded-image cache (cache="auto")
# end-to-end loop -> the loader it runs on, and the engine (step) it runs
LOOPS = {"baseline": "torchvision", "fast": "dali", "fast-cached": CACHED_LOADER}
LOOP_ENGINE = {"baseline": "baseline", "fast": "fast", "fast-cached": "fast"}


def _find(records: list[dict], kind: str, name: str, size: int) -> dict | None:
    for r in records:
        if r["kind"] == kind and r["name"] == name and r["img_size"] == size and "error" not in r:
            return r
    return None


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if a is None or b is None:
        return None
    return a["samples_per_sec"] / b["samples_per_sec"]


def _paired(a: dict | None, b: dict | None) -> dict | None:
    """Round-by-round ratios of two interleaved measurements: median, min, max, and rounds where a > b."""
    if a is None or b is None:
        return None
    r = [x / y for x, y in zip(a["samples_per_sec_windows"], b["samples_per_sec_windows"])]
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "rounds": len(r),
            "rounds_ahead": sum(x > 1 for x in r)}


def summarize(records: list[dict], size: int, dataset_size: int, device_type: str) -> dict:
    """Speed-ups, projected epoch times and the verdict at one size, computed from the measured records."""
    loader = {b: _find(records, "loader", b, size) for b in ("torchvision", "dali", CACHED_LOADER)}
    step = {n: _find(records, "step", LOOP_ENGINE[n], size) for n in LOOPS}
    loop = {n: _find(records, "loop", n, size) for n in LOOPS}
    names = [n for n in LOOPS if n != "fast-cached" or loop[n] is not None]  # the cached loop is optional
    out = {
        "img_size": size,
        "loader_speedup_dali_vs_torchvision": _ratio(loader["dali"], loader["torchvision"]),
        "loader_speedup_cached_vs_uncached": _ratio(loader[CACHED_LOADER], loader["dali"]),
        "e2e_speedup_cached_vs_uncached": _ratio(loop["fast-cached"], loop["fast"]),
        "step_speedup": _ratio(step["fast"], step["baseline"]),
        "step_speedup_paired": _paired(step["fast"], step["baseline"]),
        "e2e_speedup": _ratio(loop["fast"], loop["baseline"]),
        "e2e_speedup_paired": _paired(loop["fast"], loop["baseline"]),
        "epoch_time_s": {n: (dataset_size / loop[n]["samples_per_sec"] if loop[n] else None) for n in names},
        "epoch_time_s_range": {n: ([dataset_size / loop[n]["samples_per_sec_max"],
                                    dataset_size / loop[n]["samples_per_sec_min"]] if loop[n] else None)
                               for n in names},
        "pct_of_step_ceiling": {n: (100 * _ratio(loop[n], step[n]) if loop[n] and step[n] else None)
                                for n in names},
    }
    out["limited_by"], out["verdict"] = _verdict(loader["dali"], step["fast"], loop["fast"], device_type)
    return out


def _verdict(loader: dict | None, step: dict | None, loop: dict | None, device_type: str) -> tuple[str | None, str]:
    if loop is None or step is None:
        return None, "no verdict: the fast loop was not measured (needs the dali loader)"
    pct = 100 * loop["samples_per_sec"] / step["samples_per_sec"]
    wait, step_ips = loop["data_wait_pct"], step["samples_per_sec"]
    reasons = []
    if loader is not None and loader["samples_per_sec"] < step_ips:
        reasons.append(f"loader-only {loader['samples_per_sec']:.0f} img/s < step-only {step_ips:.0f} img/s")
    if wait > DATA_WAIT_LIMIT_PCT:
        reasons.append(f"data-wait {wait:.0f}% > {DATA_WAIT_LIMIT_PCT:.0f}%")
    side = "loader" if reasons else "model"
    if side == "model":
        faster = f"loader-only {loader['samples_per_sec']:.0f} img/s >= step-only {step_ips:.0f} img/s, " \
            if loader is not None else ""
        reasons.append(f"{faster}data-wait {wait:.0f}%")
    text = (f"fast loop at {pct:.0f}% of its step-only ceiling ({loop['samples_per_sec']:.1f} of "
            f"{step_ips:.1f} img/s); limited by the {side}: {'; '.join(reasons)}")
    if pct > 100:
        text += " (above 100%: the two differ by less than the machine's noise)"
    if device_type == "cpu":
        text += " (CPU: the loader and the step share the same cores)"
    return side, text
