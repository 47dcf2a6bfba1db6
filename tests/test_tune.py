"""`convnext-fast tune` through its CLI (a subprocess, as a user runs it: the workers are processes of their own)
on tiny images: a study completes with pruned trials, the default is trial 0, best.toml reproduces its trial,
kill -9 then --resume, two workers share one journal, a crashing trial, the refusals, the report in a browser.
The PostgreSQL test is in test_tune_postgres.py."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

optuna = pytest.importorskip("optuna", reason="the tune extra is not installed (pip install -e .[tune])")

from convnext_fast import cli  # noqa: E402

BASE = ["--model", "convnext_atto", "--img-size", "32", "--batch-size", "8", "--loader", "torchvision",
        "--loader-workers", "0", "--device", "cpu", "--warmup-epochs", "0", "--lr", "2e-3", "--epochs", "2",
        "--randaugment", "off"]


def make_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, name in enumerate(("red", "green", "blue")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 110, (36, 36, 3))
                px[..., c] += 120
                Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("tune_data"))


def space_file(tmp: Path, text: str) -> Path:
    p = tmp / "space.toml"
    p.write_text(text)
    return p


def tune(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convnext_fast.cli", "tune", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def load(study_dir: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    storage = JournalStorage(JournalFileBackend(str(study_dir / "journal.log")))
    return optuna.load_study(study_name="convnext-fast", storage=storage)


def user_trials(study) -> list:
    return [t for t in study.get_trials() if not t.user_attrs.get("stray")]


@pytest.fixture(scope="module")
def study_dir(data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("study")
    # lr from 1e-6 (learns nothing in two epochs: pruned at the first rung) to 1e-2
    space = space_file(tmp, "lr = [1e-6, 1e-2]\n")
    out = tmp / "study"
    r = tune(data, "--out", out, "--trials", 5, "--trial-epochs", 2, "--finalists", 2, "--space", space, *BASE)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_study_completes_with_pruned_trials_and_the_default_first(study_dir):
    out, r = study_dir
    assert r.stdout.index("tune plan") < r.stdout.index("epoch 1/")  # the plan comes before any trial
    assert "stage 1: 5 trials x 2 epochs at 32 px" in r.stdout and "reserved" in r.stdout
    study = load(out)
    trials = user_trials(study)
    t0 = study.trials[0]
    assert t0.user_attrs["default"] and t0.params["lr"] == pytest.approx(2e-3) and t0.params["smoothing"] == 0.1
    assert json.loads((out / "trials" / "0000" / "config.json").read_text())["optim"]["lr"] == 2e-3
    stage1 = [t for t in trials if t.user_attrs["stage"] == 1]
    assert len(stage1) == 5 and {t.state.name for t in stage1} >= {"COMPLETE", "PRUNED"}
    pruned = [t for t in stage1 if t.state.name == "PRUNED"]
    for t in pruned:  # cut at the first rung; its record kept, its weights dropped (disk)
        rows = [json.loads(x) for x in (Path(t.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) < 2 and t.user_attrs["stopped_by"] == "pruned"
    for t in stage1:
        assert not (Path(t.user_attrs["run_dir"]) / "checkpoints").exists()
    stage2 = [t for t in trials if t.user_attrs["stage"] == 2]
    assert len(stage2) == 2 and all(t.state.name == "COMPLETE" for t in stage2)
    assert any(t.user_attrs["default"] for t in stage2)  # the default always reaches full fidelity
    finalist = max((t for t in stage1 if t.state.name == "COMPLETE" and not t.user_attrs.get("default")),
                   key=lambda t: t.value)
    assert {t.user_attrs["source"] for t in stage2} == {0, finalist.number}
    reruns = [t for t in trials if t.user_attrs["stage"] == 3]
    assert {t.user_attrs["seed"] for t in reruns} == {1} and any(t.user_attrs["default"] for t in reruns)
    for t in stage2 + reruns:  # full fidelity: the base's epochs
        assert json.loads((Path(t.user_attrs["run_dir"]) / "summary.json").read_text())["epochs_run"] == 2
    with open(out / "leaderboard.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(int(r["trial"]) for r in rows) == sorted(t.number for t in trials)
    assert {r["state"] for r in rows} >= {"complete", "pruned"}
    assert "tune leaderboard" in r.stdout and "best recipe:" in r.stdout


def test_best_toml_reproduces_the_winning_trial(study_dir, tmp_path):
    out, _ = study_dir
    study = load(out)
    winner = max((t for t in user_trials(study) if t.user_attrs["stage"] == 2 and t.state.name == "COMPLETE"),
                 key=lambda t: t.value)
    assert f"trial {winner.number}" in (out / "best.toml").read_text()
    rerun = tmp_path / "again"
    assert cli.main(["train", "--config", str(out / "best.toml"), "--out", str(rerun)]) == 0
    again = json.loads((rerun / "summary.json").read_text())
    assert again["best_top1"] == winner.value
    trial_rows = (Path(winner.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    rows = (rerun / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["val_top1"] for x in rows] == [json.loads(x)["val_top1"] for x in trial_rows]


def test_report_in_a_browser(study_dir):
    from test_report_browser import _browser

    out, _ = study_dir
    html = (out / "report.html").read_text()
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    driver = _browser()
    try:
        driver.get((out / "report.html").as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        js = driver.execute_script
        # history, the 5 searched parameters (RandAugment is off in BASE: frozen), two curve charts
        assert js("return document.querySelectorAll('svg.chart').length") == 1 + 5 + 2
        # pruned trials: dashed curves ending in a cross
        assert js("return document.querySelectorAll('#curves polyline[stroke-dasharray], #curves path.cut').length") >= 1
        assert js("return document.querySelectorAll('#leaderboard tbody tr').length") == len(user_trials(load(out)))
        assert "resting on" in js("return document.querySelector('#importance h2').textContent")
        verdict = js("return document.getElementById('verdict-text').textContent")
        assert "noise" in verdict or "default recipe won" in verdict
        assert js("return document.getElementById('spearman') !== null")
    finally:
        driver.quit()


def test_kill_9_mid_trial_then_resume(data, tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "convnext_fast.cli", "tune", str(data), "--out", str(out), "--trials", "2",
           "--trial-epochs", "3", "--finalists", "1", *BASE]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = out / "trials" / "0001" / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.2)
        assert metrics.exists(), "trial 1 never started"
        busy = tune(data, "--out", out, "--trials", 2, *BASE)  # a second tune into a busy study refuses
        assert busy.returncode == 2 and "in use by another tune process" in busy.stderr
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session: tune and its worker, mid-trial
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    r = tune("--resume", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "left unfinished by the previous process" in r.stdout
    study = load(out)
    t1 = study.trials[1]
    assert t1.state.name == "FAIL" and "died" in t1.user_attrs["error"]
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == 1)
    assert retry.state.name in ("COMPLETE", "PRUNED") and retry.user_attrs["run_dir"] == t1.user_attrs["run_dir"]
    assert retry.user_attrs.get("resumed") and retry.params == t1.params
    epochs = [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()]
    assert epochs == list(range(1, len(epochs) + 1))  # continued from its checkpoint, no epoch twice
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    assert (out / "report.html").exists() and (out / "best.toml").exists()


def test_two_workers_share_one_journal_without_duplicates(data, tmp_path):
    out = tmp_path / "study"
    r = tune(data, "--out", out, "--trials", 4, "--trial-epochs", 2, "--finalists", 1, "--workers", 2, *BASE)
    assert r.returncode == 0, r.stderr[-3000:]
    study = load(out)
    trials = user_trials(study)
    assert len([t for t in trials if t.user_attrs["stage"] == 1]) == 4
    dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(dirs) == len(set(dirs))  # every trial its own run directory, none run twice
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers took trials
    jobs = [t.user_attrs["job"] for t in trials if "job" in t.user_attrs]
    assert len(jobs) == len(set(jobs))  # each enqueued job once (the phase claim)
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]


def test_a_crashing_trial_is_recorded_and_the_study_goes_on(data, tmp_path):
    out = tmp_path / "study"
    space = space_file(tmp_path, "lr = [1e25, 1e30]\n")  # a non-finite loss in the first epoch
    r = tune(data, "--out", out, "--trials", 2, "--trial-epochs", 2, "--finalists", 2, "--space", space, *BASE)
    assert r.returncode == 0, r.stderr[-3000:]
    study = load(out)
    failed = study.trials[1]
    assert failed.state.name == "FAIL" and "non-finite loss" in failed.user_attrs["error"]
    assert study.trials[0].state.name == "COMPLETE"  # the default, then stage 2 with the only survivor
    assert [t.user_attrs["source"] for t in user_trials(study) if t.user_attrs["stage"] == 2] == [0]
    with open(out / "leaderboard.csv") as fh:
        assert any("non-finite loss" in row["note"] for row in csv.DictReader(fh))


@pytest.mark.parametrize("args, message", [
    (["--time-limit", "1s"], "--time-limit 1s is too short: stage 2"),
    (["--trials", "2", "--space", "{unknown}"], "unknown parameter 'momentum'"),
    (["--trials", "2", "--space", "{empty}"], "lr range [0.01, 0.001] is empty"),
    (["--trials", "2", "--workers", "2", "--storage", "sqlite:///x.db"], "SQLite does not take concurrent writers"),
])
def test_refusals_are_one_line_before_any_trial(data, tmp_path, capsys, args, message):
    files = {"{unknown}": space_file(tmp_path, "momentum = [0.8, 0.9]\n")}
    (tmp_path / "e.toml").write_text("lr = [1e-2, 1e-3]\n")
    files["{empty}"] = tmp_path / "e.toml"
    args = [str(files.get(a, a)) for a in args]
    code = cli.main(["tune", str(data), "--out", str(tmp_path / "s"), *args, *BASE])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s" / "trials").exists()
    if "too short" in message:
        assert "one stage-1 trial ~" in err and "measured throughput" in err


def test_the_time_limit_stops_a_running_trial_at_an_epoch_boundary(data, tmp_path):
    """The trial's per-epoch reporter (what each tune trial runs with) past the deadline: the run stops after the
    epoch it is in, resumable, and the trial records why."""
    import convnext_fast
    from convnext_fast.commands.train import flag_overrides
    from convnext_fast.config import build_config
    from convnext_fast.tune.worker import Reporter

    args = cli.build_parser("train").parse_args(["train", str(data), "--model", "convnext_atto", "--img-size", "32",
                                                 "--batch-size", "8", "--loader", "torchvision", "--workers", "0",
                                                 "--device", "cpu", "--epochs", "3", "--out", str(tmp_path / "run")])
    cfg = build_config(flags=flag_overrides(args))
    trial = optuna.create_study(direction="maximize").ask()
    reporter = Reporter(trial, prune=False, deadline=time.time() - 1, epochs=3)
    summary = convnext_fast.train(cfg, sinks=[reporter], tty=False)
    assert summary["stopped_by"] == "time limit" and summary["epochs_run"] == 1
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert list(trial.storage.get_trial(trial._trial_id).intermediate_values) == [1]
