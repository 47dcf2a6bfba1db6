"""A whole run's step time under a resolution schedule, projected from the measured per-size step throughput.

`project_schedule` sums, over the schedule's epochs, ``dataset_size / img_per_sec(size of the epoch)`` for the
fast step (step-only records), against the same run at the final size every epoch; and the same ratio in
training FLOPs (3 x forward, counted per size). A size the benchmark did not measure gets its throughput from the
measured neighbours, linear in pixels per image (the step's time grows with the pixels once the loader keeps up):
such sizes are marked "interpolated" (or "extrapolated" outside the measured range).
"""
from __future__ import annotations

from convnext_fast.schedule import ResolutionSchedule


def step_rates(records: list[dict], name: str = "fast") -> dict[int, float]:
    """Measured step-only img/s per size of the step called ``name``."""
    return {r["img_size"]: r["samples_per_sec"] for r in records
            if r.get("kind") == "step" and r.get("name") == name and "error" not in r}


def rate_at(rates: dict[int, float], size: int) -> tuple[float, str]:
    """(img/s at ``size``, how it was obtained): measured, else seconds per image linear in pixels between the
    nearest measured sizes (beyond them: proportional to pixels from the nearest one)."""
    if size in rates:
        return rates[size], "measured"
    if not rates:
        raise ValueError("no step-only measurement to project from")
    known = sorted(rates)
    below = [s for s in known if s < size]
    above = [s for s in known if s > size]
    if below and above:
        a, b = below[-1], above[0]
        ta, tb = 1 / rates[a], 1 / rates[b]
        t = ta + (tb - ta) * (size ** 2 - a ** 2) / (b ** 2 - a ** 2)
        return 1 / t, "interpolated"
    near = below[-1] if below else above[0]
    return rates[near] * (near / size) ** 2, "extrapolated"


def project_schedule(records: list[dict], schedule: ResolutionSchedule, dataset_size: int, model: str,
                     num_classes: int, name: str = "fast") -> dict:
    """The schedule's projected step time and FLOPs against the fixed final size (see the module docstring)."""
    from convnext_fast.benchmark.env import forward_flops  # torch + timm: only when projecting

    rates = step_rates(records, name)
    per_size, flops = [], {}
    for size in sorted(set(schedule.sizes) | {schedule.img_size}):
        rate, source = rate_at(rates, size)
        flops[size] = 3 * forward_flops(model, num_classes, size)
        per_size.append({"img_size": size, "img_per_sec": rate, "source": source,
                         "epochs": len(schedule.epochs_at(size)), "train_flops_per_img": flops[size]})
    rate = {p["img_size"]: p["img_per_sec"] for p in per_size}
    final, epochs = schedule.img_size, schedule.epochs
    progressive_s = sum(dataset_size / rate[s] for s in schedule.per_epoch)
    fixed_s = epochs * dataset_size / rate[final]
    flops_ratio = sum(flops[s] for s in schedule.per_epoch) / (epochs * flops[final])
    return {"step": name, "schedule": schedule.to_dict(), "describe": schedule.describe(),
            "dataset_size": dataset_size, "per_size": per_size, "fixed_s": fixed_s, "progressive_s": progressive_s,
            "time_ratio": progressive_s / fixed_s, "flops_ratio": flops_ratio}


def projection_lines(p: dict) -> list[str]:
    """Markdown/terminal lines for a projection (empty list when there is none)."""
    if not p:
        return []
    sizes = ", ".join(f"{s['img_size']}px {s['img_per_sec']:.1f} img/s x {s['epochs']} ep"
                      + ("" if s["source"] == "measured" else f" ({s['source']})") for s in p["per_size"])
    return [f"Schedule {p['describe']}, {p['schedule']['epochs']} epochs of {p['dataset_size']} images, "
            f"{p['step']} step: {p['progressive_s'] / 3600:.2f} h vs {p['fixed_s'] / 3600:.2f} h fixed at "
            f"{p['schedule']['img_size']}px = {p['time_ratio']:.2f}x the step time, "
            f"{p['flops_ratio']:.2f}x the training FLOPs",
            f"Per size: {sizes}"]
