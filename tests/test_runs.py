"""`convnext-fast runs list` and `runs compare` on run directories made by short CPU runs: finished ones, an
interrupted one (SIGTERM), a stopped one (an epoch callback asked: tune's pruner, a time limit), a failed one (non-finite loss), a running one (its lock held) and
a killed one (what `kill -9` leaves: status "running", nobody holding the lock); the compare page in Chromium."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import convnext_fast
from convnext_fast.cli import main
from convnext_fast.config import build_config
from convnext_fast.errors import Interrupted
from convnext_fast.runlock import RunLock
from convnext_fast.runs import compare_runs, scan_runs

COLOURS = {"red": 0, "green": 1, "blue": 2, "cyan": (1, 2)}


def _folder(root: Path, classes: tuple[str, ...], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", 8), ("val", 4)):
        for name in classes:
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 140, (36, 36, 3))  # a weak colour cue: recall differs between runs
                px[..., COLOURS[name]] += 50
                Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.jpg")
    return root


FLAGS = ["--loader", "torchvision", "--workers", "0", "--img-size", "32", "--batch-size", "8", "--model",
         "convnext_atto", "--device", "cpu", "--randaugment", "off", "--log-every", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/{a, b, other-data, interrupted, stopped, failed}: six short CPU runs, made the way users make them."""
    tmp = tmp_path_factory.mktemp("runs")
    data = _folder(tmp / "data", ("red", "green", "blue"), 0)
    other = _folder(tmp / "other", ("red", "green", "cyan"), 1)
    root = tmp / "runs"
    assert main(["train", str(data), "--out", str(root / "a"), "--epochs", "2", "--lr", "1e-3", *FLAGS]) == 0
    assert main(["train", str(data), "--out", str(root / "b"), "--epochs", "2", "--lr", "3e-3", "--model-ema",
                 "--model-ema-decay", "0.5", *FLAGS]) == 0
    assert main(["train", str(other), "--out", str(root / "other-data"), "--epochs", "1", *FLAGS]) == 0
    cfg = build_config(flags={"data": {"path": str(data), "loader": "torchvision", "num_workers": 0, "img_size": 32,
                                       "batch_size": 8, "randaugment": None},
                              "model": {"name": "convnext_atto"},
                              "run": {"device": "cpu", "epochs": 3, "out": str(root / "interrupted")}})
    with pytest.raises(Interrupted):  # SIGTERM during epoch 1's save: the loop stops at the epoch's end
        convnext_fast.train(cfg, report=lambda row: os.kill(os.getpid(), signal.SIGTERM), tty=False)
    cfg.run.out = str(root / "stopped")
    summary = convnext_fast.train(cfg, report=lambda row: True, tty=False)  # the sinks' stop: after epoch 1
    assert summary["stopped_by"] == "report callback"
    # A learning rate that overflows the weights: a non-finite loss in epoch 1, the run fails before a checkpoint.
    assert main(["train", str(data), "--out", str(root / "failed"), "--epochs", "2", "--lr", "1e30", *FLAGS]) == 1
    return root


def _list_json(capsys, *args) -> list[dict]:
    capsys.readouterr()
    assert main(["runs", "list", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_list_shows_every_run_with_its_state(runs, capsys):
    listed = {r["name"]: r for r in _list_json(capsys, str(runs))}
    assert set(listed) == {"a", "b", "other-data", "interrupted", "stopped", "failed"}
    assert {n: r["state"] for n, r in listed.items()} == {
        "a": "finished", "b": "finished", "other-data": "finished", "interrupted": "interrupted",
        "stopped": "stopped", "failed": "failed"}
    a, b = listed["a"], listed["b"]
    assert (a["epochs_run"], a["epochs_planned"], a["model"], a["schedule"]) == (2, 2, "convnext_atto", "32px")
    assert a["best_top1"] == max(r["val_top1"] for r in _rows(runs / "a"))
    # EMA on: the best top-1 is the EMA's, as the run selected its weights (summary.json agrees)
    assert b["best_key"] == "ema_val_top1"
    assert b["best_top1"] == max(r["ema_val_top1"] for r in _rows(runs / "b"))
    assert b["best_top1"] == json.loads((runs / "b" / "summary.json").read_text())["best_top1"]
    assert listed["interrupted"]["epochs_run"] == 1 and "SIGTERM" in listed["interrupted"]["detail"]
    assert listed["stopped"]["epochs_run"] == 1 and "report callback; resumable" in listed["stopped"]["detail"]
    assert "non-finite loss" in listed["failed"]["detail"] and listed["failed"]["epochs_run"] == 0
    assert a["wall_time_s"] > 0 and a["started"].endswith("Z")
    # the same through a run directory itself, and the table
    assert [r["name"] for r in _list_json(capsys, str(runs / "a"))] == ["a"]
    assert main(["runs", "list", str(runs)]) == 0
    table = capsys.readouterr().out
    assert "interrupted" in table and "failed (TrainingError: non-finite loss" in table and "convnext_atto" in table


def test_list_tells_running_and_killed_runs_apart(runs, tmp_path, capsys):
    running, killed = tmp_path / "running", tmp_path / "killed"
    for d in (running, killed):
        shutil.copytree(runs / "interrupted", d)
        status = json.loads((d / "status.json").read_text())
        (d / "status.json").write_text(json.dumps({**status, "state": "running", "ended": None}))  # as at start
    with RunLock(running):  # a live process holds the run directory
        states = {r["name"]: (r["state"], r["detail"]) for r in _list_json(capsys, str(tmp_path))}
    assert states["running"][0] == "running"
    assert states["killed"][0] == "failed" and "without recording why" in states["killed"][1]
    assert "--resume" in states["killed"][1]
    # the lock was only looked at: a run can still take it
    with RunLock(running):
        pass


def test_list_sorts_by_a_column(runs, capsys):
    by_top1 = _list_json(capsys, str(runs), "--sort", "top1", "--reverse")
    values = [r["best_top1"] for r in by_top1 if r["best_top1"] is not None]
    assert values == sorted(values, reverse=True) and by_top1[-1]["name"] == "failed"  # no top-1: last
    assert [r["name"] for r in _list_json(capsys, str(runs), "--sort", "name")] == sorted(
        ["a", "b", "other-data", "interrupted", "stopped", "failed"])
    assert main(["runs", "list", str(runs), "--sort", "colour"]) == 2
    assert "--sort: unknown column 'colour'" in capsys.readouterr().err


def test_compare_shows_what_differs(runs, capsys):
    cmp = compare_runs(scan_runs([runs / "a", runs / "b"]))
    diff = dict(cmp.config_diff)
    assert diff["optim.lr"] == ["0.001", "0.003"] and diff["recipe.model_ema"] == ["False", "True"]
    assert "run.out" not in diff and "data.path" not in diff and "model.name" not in diff  # only what differs
    metrics = {label: values for label, values, _ in cmp.metrics}
    assert metrics["final val top-1 %"] == [f"{_rows(runs / n)[-1]['val_top1']:.2f}" for n in "ab"]
    # per-class recall of each run's best epoch, largest change first
    per_class = [json.loads((runs / n / "per_class.json").read_text()) for n in "ab"]
    assert per_class[0]["classes"] == ["blue", "green", "red"] and per_class[1]["weights"] == "ema"
    changes = [row.change for row in cmp.classes]
    assert sorted(changes, key=abs, reverse=True) == changes
    assert {row.name: row.recall for row in cmp.classes} == {
        c: [pc["recall"][i] for pc in per_class] for i, c in enumerate(per_class[0]["classes"])}
    assert cmp.notes == []  # same data, same classes
    assert main(["runs", "compare", str(runs / "a"), str(runs / "b")]) == 0
    out = capsys.readouterr().out
    assert "optim.lr" in out and "0.003" in out and "Per-class recall" in out and "run.out" not in out


def test_compare_says_plainly_when_classes_or_data_differ(runs):
    cmp = compare_runs(scan_runs([runs / "a", runs / "other-data", runs / "interrupted"]))
    assert any("different data" in n for n in cmp.notes)
    assert any("different classes" in n and "2 classes they share" in n and "cyan" in n for n in cmp.notes)
    assert {r.name for r in cmp.classes} == {"green", "red"}
    spreads = [r.change for r in cmp.classes]
    assert spreads == sorted(spreads, reverse=True)
    assert cmp.change_label.startswith("spread")


def test_compare_needs_two_runs_and_real_directories(runs, tmp_path, capsys):
    assert main(["runs", "compare", str(runs / "a")]) == 2
    assert "at least two runs" in capsys.readouterr().err
    assert main(["runs", "compare", str(runs / "a"), str(tmp_path / "nope")]) == 2
    assert "nope: no such directory" in capsys.readouterr().err


def _browser():
    # The error report's browser test's driver (system Chromium; skips without it, fails in CI); pytest puts tests/
    # on sys.path (no __init__.py), so this is the module it already imported.
    from test_report_browser import _browser as browser

    return browser()


def test_compare_page_in_the_browser(runs, tmp_path, capsys):
    page = tmp_path / "page" / "compare.html"
    assert main(["runs", "compare", str(runs / "a"), str(runs / "b"), str(runs / "other-data"), str(runs / "failed"),
                 "--html", str(page)]) == 0
    assert str(page) in capsys.readouterr().out
    html = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)  # nothing fetched from elsewhere
    driver = _browser()
    try:
        driver.get(page.as_uri())
        svgs = driver.execute_script(
            "return [...document.querySelectorAll('figure.curve svg')].map(s => [s.getBoundingClientRect().width, "
            "s.querySelectorAll('path').length])")
        legend = driver.execute_script("return [...document.querySelectorAll('figure.curve svg text')]"
                                       ".map(t => t.textContent).join('|')")
        notes = driver.execute_script("return [...document.querySelectorAll('.note-line')].map(n => n.textContent)")
        rows = "return [...document.querySelectorAll('#class-table tbody tr')].filter(r => r.offsetParent).length"
        n_rows = driver.execute_script(rows)
        driver.find_element("id", "class-filter").send_keys("gre")
        filtered = driver.execute_script(rows)
        config_keys = driver.execute_script("return [...document.querySelectorAll('#config-table td code')]"
                                            ".map(c => c.textContent)")
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("L")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
    assert len(svgs) == 8 and all(w > 200 and n > 5 for w, n in svgs), svgs  # 4 curves x (by epoch, by wall time)
    assert "a train_loss" in legend and "other-data val_loss" in legend
    assert any("different classes" in n for n in notes) and any("No per-class recall saved for failed" in n
                                                                for n in notes)
    assert n_rows == 2 and filtered == 1  # the classes all three measured runs share: green, red
    assert "optim.lr" in config_keys and "run.out" not in config_keys
    assert not errors, errors
    px = np.asarray(shot)
    assert px.std() > 10 and len(np.unique(px)) > 50  # not a blank page
