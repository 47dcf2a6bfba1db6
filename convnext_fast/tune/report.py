"""STUDY_DIR/report.html: one self-contained page (CSS and SVG inline, no network, opens from disk).

The optimization history, each parameter against top-1, the parameter importances (with the number of trials
they rest on), the learning curves of all trials (pruned ones visibly cut), the rank agreement of stage 1 and
stage 2 for the finalists (Spearman), and the winner against the default, each with a second-seed rerun so that
a difference below the seed-to-seed noise is called a tie.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

from convnext_fast.run_files import atomic_write_text
from convnext_fast.tune import study as st
from convnext_fast.tune.charts import PALETTE, Series, chart
from convnext_fast.runs import read_run
from convnext_fast.tune.space import fmt


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (ties get their average rank). A dozen lines rather than scipy, which is a
    test-only dependency here."""
    if len(a) < 3 or len(a) != len(b):
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return None if va == 0 or vb == 0 else cov / math.sqrt(va * vb)


def importances(study: Any, names: list[str]) -> tuple[dict[str, float], int, str | None]:
    """PED-ANOVA importances (Optuna's default) over the completed stage-1 trials: (importances, trials, why not)."""
    optuna = st.optuna()
    done = [t for t in st.trials(study, stage=st.STAGE1, states=("COMPLETE",))
            if all(n in t.params for n in names)]
    varied = [n for n in names if len({t.params[n] for t in done}) > 1]
    if len(done) < 3 or not varied:
        return {}, len(done), f"{len(done)} completed stage-1 trial(s): too few to tell"
    tmp = optuna.create_study(direction="maximize")
    tmp.add_trials(done)
    try:
        with warnings.catch_warnings():  # "quantiles select the same trials": few trials; the page says how many
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(tmp, params=varied), len(done), None
    except (ValueError, RuntimeError) as e:
        return {}, len(done), f"not computable from {len(done)} trials ({e})"


def comparison(study: Any) -> dict | None:
    """Winner vs default at full fidelity, each with its second seed: the noise and the verdict."""
    s2 = {t.user_attrs.get("source"): t for t in st.trials(study, stage=st.STAGE2, states=("COMPLETE",))}
    s3 = {t.user_attrs.get("source"): t for t in st.trials(study, stage=st.RERUN, states=("COMPLETE",))}
    w = st.winner(study)
    d = next((t for t in s2.values() if t.user_attrs.get("default")), None)
    if w is None or d is None:
        return None
    runs = {"winner": w, "default": d}
    out: dict[str, Any] = {"winner": w.number, "default": d.number, "same": w is d}
    noise = []
    for key, t in runs.items():
        again = s3.get(t.user_attrs.get("source"))
        seeds = [t.value] + ([again.value] if again is not None else [])
        out[key] = {"trial": t.number, "seeds": seeds, "mean": sum(seeds) / len(seeds)}
        if len(seeds) == 2:
            noise.append(abs(seeds[0] - seeds[1]))
    out["noise"] = max(noise) if noise else None
    diff = out["winner"]["mean"] - out["default"]["mean"]
    out["diff"] = diff
    if out["same"]:
        out["verdict"] = "The default recipe won: the search found nothing better."
    elif out["noise"] is None:
        out["verdict"] = f"winner - default = {diff:+.2f} points (no second seed yet: noise unknown)"
    elif abs(diff) <= out["noise"]:
        out["verdict"] = (f"A tie: winner - default = {diff:+.2f} points, within the seed-to-seed noise of "
                          f"{out['noise']:.2f} points.")
    else:
        out["verdict"] = (f"winner - default = {diff:+.2f} points, beyond the seed-to-seed noise of "
                          f"{out['noise']:.2f} points.")
    return out


def rank_agreement(study: Any) -> dict:
    """Spearman of the finalists' stage-1 scores against their stage-2 scores."""
    s1 = {t.number: t.value for t in st.trials(study, stage=st.STAGE1, states=("COMPLETE",))}
    pairs = [(s1[t.user_attrs["source"]], t.value, t.user_attrs["source"])
             for t in st.trials(study, stage=st.STAGE2, states=("COMPLETE",)) if t.user_attrs.get("source") in s1]
    rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
    return {"pairs": pairs, "rho": rho}


def _curves(table: list[dict]) -> tuple[str, str]:
    stage1, stage2 = [], []
    for i, r in enumerate(sorted(table, key=lambda r: r["trial"])):
        if not r["run_dir"]:
            continue
        try:
            curve = read_run(r["run_dir"]).curve
        except ValueError:  # a trial that failed before its run directory was written: nothing to draw
            continue
        stopped = r["state"] != "complete"
        s = Series([(float(e), v) for e, v in curve], f"trial {r['trial']} ({r['state']})",
                   colour="#cf222e" if r["default"] else PALETTE[i % len(PALETTE)], dashed=stopped, cut=stopped,
                   width=2.5 if r["default"] else 1.5, markers=len(curve) < 8)
        (stage1 if r["stage"] == "1" else stage2).append(s)
    kw = dict(xlabel="epoch", ylabel="val top-1 %", integer_x=True, width=620)
    return (chart(stage1, title="Stage 1: every trial (dashed + cross = pruned or stopped)", **kw),
            chart(stage2, title="Stage 2: finalists at full fidelity and second seeds", **kw))


def _history(study: Any) -> str:
    done = sorted(st.trials(study, stage=st.STAGE1, states=("COMPLETE",)), key=lambda t: t.number)
    best, pts = -math.inf, []
    for t in done:
        best = max(best, t.value)
        pts.append((float(t.number), best))
    return chart([Series([(float(t.number), t.value) for t in done], "completed trial", markers=True),
                  Series(pts, "best so far", colour="#1a7f37", width=2)],
                 title="Optimization history (stage 1, completed trials)", xlabel="trial", ylabel="best val top-1 %",
                 integer_x=True, scatter=False)


def _param_charts(study: Any, names: list[str]) -> list[str]:
    done = st.trials(study, stage=st.STAGE1, states=("COMPLETE",))
    out = []
    for n in names:
        pts = [(float(t.params[n]), t.value) for t in done if n in t.params]
        dist = next((t.distributions[n] for t in done if n in t.distributions), None)
        log = bool(getattr(dist, "log", False))
        out.append(chart([Series(pts, n, colour="#8250df")], title=f"{n} vs top-1", xlabel=n + (" (log)" if log else ""),
                         ylabel="val top-1 %", xlog=log, scatter=True, width=380, height=240))
    return out


def build_report(study: Any, study_dir: Path, table: list[dict], names: list[str]) -> Path:
    import jinja2
    from markupsafe import Markup

    from convnext_fast import __version__
    from convnext_fast.error_report.page import _asset

    env = jinja2.Environment(loader=jinja2.PackageLoader("convnext_fast.tune", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v: "–" if v is None else f"{v:.2f}"
    env.filters["param"] = lambda v, n: fmt(n, v)
    imp, n_imp, why = importances(study, names)
    curves1, curves2 = _curves(table)
    states: dict[str, int] = {}
    for r in table:
        states[r["state"]] = states.get(r["state"], 0) + 1
    plan = study.user_attrs.get("plan", {})
    page = env.get_template("report.html.j2").render(
        title=f"Tune report: {study_dir.name}", study_dir=str(study_dir), table=table, names=names, states=states,
        plan=plan, history=Markup(_history(study)), params=[Markup(c) for c in _param_charts(study, names)],
        importances=sorted(imp.items(), key=lambda kv: -kv[1]), n_importance=n_imp, importance_note=why,
        curves1=Markup(curves1), curves2=Markup(curves2), agreement=rank_agreement(study),
        comparison=comparison(study), version=__version__,
        built=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), css=Markup(_asset("report.css")))
    return atomic_write_text(study_dir / "report.html", page)
