"""Outputs of `convnext-fast benchmark`: rich tables, JSON, markdown and a PNG plot of one result document.

Everything here renders what `run_benchmark` measured; nothing is computed that the JSON does not hold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from convnext_fast.benchmark.projection import projection_lines
from convnext_fast.run_files import atomic_write_text

__all__ = ["render_tables", "to_markdown", "write_json", "write_markdown", "write_plot"]

_KIND_ORDER = {"loader": 0, "step": 1, "loop": 2}


def _num(v, spec: str = ".1f", unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def _spread(r: dict) -> str:
    return f"{r['samples_per_sec']:.1f} [{r['samples_per_sec_min']:.1f}-{r['samples_per_sec_max']:.1f}]"


def _what(r: dict) -> str:
    if r["kind"] == "loader":
        return f"loader-only: {r['name']}"
    if r["kind"] == "step":
        return f"step-only: {r['name']}"
    return f"end-to-end: {r['name']} loop ({r['loader']})"


def _rows(doc: dict) -> list[list[str]]:
    rows = []
    records = sorted(doc["results"], key=lambda r: (r["img_size"], _KIND_ORDER[r["kind"]]))
    for r in records:
        if "error" in r:
            rows.append([str(r["img_size"]), _what(r), f"not measured: {r['error']}", "", "", "", "", "", ""])
            continue
        rows.append([str(r["img_size"]), _what(r), _spread(r), _num(r["step_time_ms"]),
                     _num(r.get("data_wait_pct"), ".1f", "%"), _num(r.get("main_thread_ms_per_batch"), ".2f"),
                     _num(r.get("compile_s"), ".1f", " s"),
                     _num(r.get("peak_mem_mib"), ".0f"), _num(r.get("mfu_pct"), ".1f", "%")])
    return rows


_HEADERS = ["size", "measurement", "img/s median [min-max]", "ms/batch", "data-wait", "main-thread ms/batch",
            "compile", "peak MiB", "MFU"]


def _summary_rows(doc: dict) -> list[list[str]]:
    def x(v):
        return _num(v, ".2f", "x")

    def paired(v, p):
        if v is None or p is None:
            return x(v)
        return f"{x(v)} (rounds {p['min']:.2f}-{p['max']:.2f}, ahead {p['rounds_ahead']}/{p['rounds']})"

    rows = []
    for s in doc["summary"]:
        ep = s["epoch_time_s"]
        rows.append([str(s["img_size"]), x(s["loader_speedup_dali_vs_torchvision"]),
                     x(s.get("loader_speedup_cached_vs_uncached")),
                     paired(s["step_speedup"], s.get("step_speedup_paired")),
                     paired(s["e2e_speedup"], s.get("e2e_speedup_paired")), _minutes(ep["baseline"]),
                     _minutes(ep["fast"]), _minutes(ep.get("fast-cached")),
                     _num(s["pct_of_step_ceiling"]["fast"], ".0f", "%"),
                     s["limited_by"] or "-"])
    return rows


_SUMMARY_HEADERS = ["size", "loader dali/torchvision", "loader cached/uncached", "step fast/baseline",
                    "loop fast/baseline", "epoch baseline", "epoch fast", "epoch fast (cached)",
                    "fast loop % of step", "limited by"]


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _machine(doc: dict) -> str:
    env = doc["environment"]
    if env["gpu"]:
        g = env["gpu"]
        return f"{g['name']} (driver {g['driver']}, CUDA {g['cuda_runtime']})"
    c = env["cpu"]
    return f"{c['model']} CPU, {c['cores_usable']} cores"


def render_tables(doc: dict, console) -> None:
    """Print the measurements and the summary as rich tables, then the verdicts."""
    from rich.table import Table

    cfg = doc["config"]
    table = Table(title=f"{doc['model']} ({doc['param_count']} M params), batch {cfg['batch_size']}, "
                        f"{_machine(doc)}")
    for h in _HEADERS:
        table.add_column(h, justify="left" if h == "measurement" else "right")
    for row in _rows(doc):
        table.add_row(*row)
    console.print(table)
    summary = Table(title=f"Speed-ups; projected epoch of {cfg['dataset_size']} images")
    for h in _SUMMARY_HEADERS:
        summary.add_column(h, justify="right")
    for row in _summary_rows(doc):
        summary.add_row(*row)
    console.print(summary)
    for s in doc["summary"]:
        console.print(f"[bold]{s['img_size']}px[/bold]: {s['verdict']}")
    for line in projection_lines(doc.get("projection")):
        console.print(line, markup=False)


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(doc: dict) -> str:
    """The result document as markdown: provenance, measurements, speed-ups, verdicts, notes."""
    env, cfg = doc["environment"], doc["config"]
    v = env["versions"]
    git = env["git"]
    commit = f"{git['commit'][:12]}{' (dirty)' if git['dirty'] else ''}" if git["commit"] else "unknown"
    flops = ", ".join(f"{f['img_size']}px {f['fwd_flops_per_img'] / 1e9:.3f}" for f in doc["flops"]["per_size"])
    parts = [
        f"# convnext-fast benchmark: {doc['model']} on {_machine(doc)}",
        "",
        f"- date (UTC): {env['date_utc']}",
        f"- command: `{env['command'] or env['argv']}`",
        f"- machine: GPU {_gpu_text(env)}; CPU {env['cpu']['model']}, {env['cpu']['cores_usable']} usable cores, "
        f"{env['cpu']['memory_gib']} GiB; load average at start {env['cpu']['load_avg_1m']}; "
        f"thread settings {env['env'] or 'default'}",
        f"- versions: torch {v['torch']}, torchvision {v['torchvision']}, timm {v['timm']}, "
        f"DALI {v['nvidia_dali']}, Python {env['python']}; git {commit}",
        f"- model: {doc['model']}, {doc['param_count']} M params; forward GFLOPs/image: {flops}; "
        f"peak: {doc['peak_tflops'] or 'unknown'} TFLOP/s ({doc['peak_tflops_source']})",
        f"- data: {cfg['data']} ({cfg['num_images']} images, {cfg['num_classes']} classes); batch "
        f"{cfg['batch_size']}, {cfg['repeats']} x {cfg['steps']} timed steps after {cfg['warmup']} warm-up; "
        f"{cfg['workers']} loader workers",
        "",
        "## Measurements",
        "",
        _md_table(_HEADERS, _rows(doc)),
        "",
        f"## Speed-ups and projected epoch time ({cfg['dataset_size']} images)",
        "",
        _md_table(_SUMMARY_HEADERS, _summary_rows(doc)),
        "",
        *[f"- **{s['img_size']}px**: {s['verdict']}" for s in doc["summary"]],
        "",
        *(["## Progressive resolution: projected step time of a whole run", ""]
          + [f"- {line}" for line in projection_lines(doc["projection"])] + [""] if doc.get("projection") else []),
        "## Notes",
        "",
        *[f"- {n}" for n in doc["notes"]],
        "",
    ]
    return "\n".join(parts)


def _gpu_text(env: dict) -> str:
    g = env["gpu"]
    if not g:
        return "none"
    return f"{g['count']} x {g['name']} ({g['memory_gib']} GiB, driver {g['driver']}, CUDA {g['cuda_runtime']})"


def _atomic_write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text)


def write_json(doc: dict, path: str | os.PathLike) -> Path:
    return _atomic_write(Path(path), json.dumps(doc, indent=2) + "\n")


def write_markdown(doc: dict, path: str | os.PathLike) -> Path:
    return _atomic_write(Path(path), to_markdown(doc))


def write_plot(doc: dict, path: str | os.PathLike) -> Path:
    """PNG: img/s against resolution (loops solid, step-only dashed, loaders dotted) and projected epoch time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s["img_size"] for s in doc["summary"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"loop": "-", "step": "--", "loader": ":"}
    colours = {"baseline": "tab:red", "fast": "tab:blue", "torchvision": "tab:orange", "dali": "tab:green",
               "fast-cached": "tab:purple", "dali-cached": "tab:olive"}
    for kind, name in (("loop", "baseline"), ("loop", "fast"), ("loop", "fast-cached"), ("step", "baseline"),
                       ("step", "fast"), ("loader", "torchvision"), ("loader", "dali"), ("loader", "dali-cached")):
        pts = [(r["img_size"], r) for r in doc["results"]
               if r["kind"] == kind and r["name"] == name and "error" not in r]
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ys = [p[1]["samples_per_sec"] for p in pts]
        err = [[y - p[1]["samples_per_sec_min"] for y, p in zip(ys, pts)],
               [p[1]["samples_per_sec_max"] - y for y, p in zip(ys, pts)]]
        ax.errorbar(xs, ys, yerr=err, linestyle=styles[kind], marker="o", color=colours[name], capsize=3,
                    label=f"{_what(pts[0][1]).split(' (')[0]}")
    ax.set_xlabel("image size (px)")
    ax.set_ylabel("images / s (median, min-max)")
    ax.set_xticks(sizes)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{doc['model']} on {_machine(doc)}", fontsize=9)
    loops = [n for n in ("baseline", "fast", "fast-cached") if any(s["epoch_time_s"].get(n) for s in doc["summary"])]
    width = 0.8 / max(1, len(loops))
    for i, name in enumerate(loops):
        vals = [(s["epoch_time_s"].get(name) or 0) / 60 for s in doc["summary"]]
        ax2.bar([k + (i - (len(loops) - 1) / 2) * width for k in range(len(sizes))], vals, width, color=colours[name],
                label=f"{name} loop")
    ax2.set_xticks(range(len(sizes)), [str(s) for s in sizes])
    ax2.set_xlabel("image size (px)")
    ax2.set_ylabel(f"projected epoch time, {doc['config']['dataset_size']} images (min)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
