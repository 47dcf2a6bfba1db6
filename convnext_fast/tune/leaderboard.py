"""What the user reads in the terminal and next to the report: the leaderboard (table + leaderboard.csv) and
best.toml, the winner's full config, such that ``convnext-fast train --config best.toml`` trains it again."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from convnext_fast.config import TrainConfig, build_config
from convnext_fast.run_files import atomic_write_text
from convnext_fast.tune import study as st
from convnext_fast.tune.plan import fmt_duration
from convnext_fast.tune.space import fmt

STAGE_NAMES = {st.STAGE1: "1", st.STAGE2: "2", st.RERUN: "2 (seed 2)"}


def rows(study: Any) -> list[dict]:
    """One dict per trial (stray ones left out), best first within each stage, finalists first."""
    out = []
    for t in st.trials(study):
        ua = t.user_attrs
        best = ua.get("best_top1", t.value)
        out.append({
            "trial": t.number, "stage": STAGE_NAMES[st.trial_stage(t)], "state": _state(t),
            "default": bool(ua.get("default")), "params": dict(t.params),
            "best_top1": None if best is None or not math.isfinite(best) else float(best),
            "epochs": ua.get("epochs_run"), "time_s": ua.get("wall_s"), "run_dir": ua.get("run_dir"),
            "note": ua.get("error") or ("retry of trial %d" % t.system_attrs["failed_trial"]
                                        if st.is_retry(t) else "") or "",
            "source": ua.get("source"), "seed": ua.get("seed"),
        })
    order = {"2": 0, "2 (seed 2)": 1, "1": 2}
    out.sort(key=lambda r: (order[r["stage"]], -(r["best_top1"] if r["best_top1"] is not None else -1), r["trial"]))
    return out


def _state(t: Any) -> str:
    name = t.state.name.lower()
    if name == "pruned" and t.user_attrs.get("stopped_by") == "time limit":
        return "stopped (time limit)"
    return {"complete": "complete", "pruned": "pruned", "fail": "failed", "running": "running",
            "waiting": "waiting"}[name]


def write_csv(path: Path, table: list[dict], param_names: list[str]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "stage", "state", "default", *param_names, "best_top1", "epochs", "time_s", "run_dir",
                "note"])
    for r in table:
        w.writerow([r["trial"], r["stage"], r["state"], int(r["default"]),
                    *[r["params"].get(p, "") for p in param_names],
                    "" if r["best_top1"] is None else f"{r['best_top1']:.4f}", r["epochs"] or "",
                    r["time_s"] or "", r["run_dir"] or "", r["note"]])
    return atomic_write_text(path, buf.getvalue())


def terminal_table(table: list[dict], param_names: list[str], title: str, limit: int = 20):
    from rich.table import Table

    t = Table(title=title)
    for col in ("trial", "stage", "state", *param_names, "top-1 %", "epochs", "time"):
        t.add_column(col, justify="left" if col in ("stage", "state") else "right")
    for r in table[:limit]:
        t.add_row(f"{r['trial']}{'*' if r['default'] else ''}", r["stage"], r["state"],
                  *[fmt(p, r["params"][p]) if p in r["params"] else "" for p in param_names],
                  "-" if r["best_top1"] is None else f"{r['best_top1']:.2f}", str(r["epochs"] or "-"),
                  fmt_duration(r["time_s"]))
    if len(table) > limit:
        t.caption = f"(* = the default recipe; {len(table) - limit} more rows in leaderboard.csv)"
    else:
        t.caption = "* = the default recipe"
    return t


def write_best_toml(path: Path, run_dir: Path, preset: str | None, note: str) -> Path:
    """``run_dir``'s config as TOML for ``train --config`` (its run directory left to --out). Keys equal to what
    the preset (or the defaults) give are left out; TOML has no null, so a None differing from them is refused."""
    saved = json.loads((run_dir / "config.json").read_text())
    saved.pop("resolved", None)
    saved.pop("budget", None)
    saved["run"]["out"] = None
    cfg = TrainConfig.from_dict(saved, source=str(run_dir / "config.json"))
    ref = build_config(preset=preset).to_dict()
    lines = [f"# {note}", f"# reproduce: convnext-fast train --config {path.name} --out RUN_DIR", ""]
    if preset:
        lines += [f'preset = "{preset}"', ""]
    for section, values in cfg.to_dict().items():
        body = []
        for key, value in values.items():
            if value == ref[section][key]:
                continue
            if value is None and (section, key) in _NONE_AS:
                value = _NONE_AS[section, key]
            if value is None:
                raise ValueError(f"best.toml: {section}.{key} is None but the preset/defaults say "
                                 f"{ref[section][key]!r}, and TOML cannot write None")
            body.append(f"{key} = {_toml(value)}")
        if body:
            lines += [f"[{section}]", *body, ""]
    text = "\n".join(lines)
    _check_roundtrip(text, cfg, path)
    return atomic_write_text(path, text)


# TOML has no null: None spelt as a value that behaves the same (RandAugment with 0 ops applies nothing and
# draws nothing, in both loaders).
_NONE_AS = {("data", "randaugment"): (0, 0)}


def _check_roundtrip(text: str, cfg: TrainConfig, path: Path) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "best.toml"
        p.write_text(text)
        again = build_config(config_file=p)
    if again.data.randaugment == (0, 0) and cfg.data.randaugment is None:
        again.data.randaugment = None
    if again.to_dict() != cfg.to_dict():  # pragma: no cover - a writer bug must not hand out a wrong recipe
        raise AssertionError(f"{path}: written config does not read back to the trial's config")


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")
