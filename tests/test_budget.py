"""`train --time-limit` and its building blocks (`convnext_fast.budget`): a duration is parsed strictly, the
epoch count is fixed once from measured throughput and recorded, too short a limit is refused with the estimate
before anything is written, a resumed run keeps the count without measuring again, and the deadline sink stops a
run whose measurement was wrong at an epoch boundary."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convnext_fast import budget
from convnext_fast.budget import (DeadlineSink, EpochTimes, fit_to_epochs, parse_duration, plan_epochs,
                                  schedule_seconds)
from convnext_fast.cli import main
from convnext_fast.config import build_config


@pytest.mark.parametrize("text, seconds", [("8h", 28800), ("90m", 5400), ("45s", 45), ("1h30m", 5400),
                                           ("3600", 3600), ("1.5h", 5400), ("2d", 172800), (" 1h 5s ", 3605),
                                           ("0.5", 0.5), (120, 120)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "8x", "h", "30m1h", "1h1h", "-5m", "0", "0s", "inf", "nan", "5 m s"])
def test_parse_duration_errors_name_the_flag_and_value(text):
    with pytest.raises(ValueError) as e:
        parse_duration(text, "--time-limit")
    msg = str(e.value)
    assert msg.startswith("--time-limit: ") and repr(text) in msg and "\n" not in msg


def test_config_time_limit_is_typed_and_checked(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[run]\ntime_limit = "1h30m"\n')
    assert build_config(config_file=toml).run.time_limit == "1h30m"
    toml.write_text("[run]\ntime_limit = 600\n")
    assert build_config(config_file=toml).run.time_limit == 600.0
    toml.write_text('[run]\ntime_limit = "soon"\n')
    with pytest.raises(ValueError, match="run.time_limit.*'soon'"):
        build_config(config_file=toml)
    assert build_config().run.time_limit is None


def _cfg(**run):
    return build_config(flags={"data": {"img_size": 64, "progressive": 32, "res_step": 16},
                               "model": {"name": "convnext_atto"}, "optim": {"warmup_epochs": 4.0},
                               "run": {"epochs": 40, **run}})


def test_plan_is_the_largest_count_whose_whole_progressive_schedule_fits():
    cfg = _cfg()
    assert cfg.resolution_schedule().sizes == [32, 48, 64]
    times = EpochTimes({32: 1.0, 48: 2.0, 64: 4.0}, overhead_s=3.0)
    for seconds in (10.0, 37.0, 55.0):
        n = plan_epochs(cfg, seconds, times)
        assert n < 40 and schedule_seconds(cfg, n, times) <= seconds < schedule_seconds(cfg, n + 1, times)
    # The ramp is laid over the chosen count: the last epochs are at the final size whatever N.
    n = plan_epochs(cfg, 37.0, times)
    per_epoch = fit_to_epochs(cfg, n).resolution_schedule().per_epoch
    assert len(per_epoch) == n and per_epoch[-1] == 64 and per_epoch[0] == 32
    assert schedule_seconds(cfg, n, times) == pytest.approx(3.0 + sum(times[s] for s in per_epoch))
    # run.epochs is the most the limit may pick.
    assert plan_epochs(cfg, 1e9, times) == 40


def test_too_short_is_refused_with_the_estimate():
    times = EpochTimes({32: 50.0, 48: 55.0, 64: 60.0}, overhead_s=5.0, record={"eval_s": 3.0})
    with pytest.raises(ValueError, match=r"--time-limit 30s is too short: one epoch takes ~65 s here \(measured "
                                         r"per epoch 32px 50.0s.*evaluation 3.0s"):
        plan_epochs(_cfg(), 30.0, times, limit_text="30s")


def test_fit_to_epochs_scales_warmup_and_an_explicit_ramp():
    cfg = build_config(flags={"data": {"img_size": 64, "progressive": 32, "ramp": (20, 30)},
                              "optim": {"warmup_epochs": 4.0}, "run": {"epochs": 40}})
    fitted = fit_to_epochs(cfg, 10)
    assert fitted.run.epochs == 10 and fitted.optim.warmup_epochs == pytest.approx(1.0)
    assert fitted.data.ramp == (5, 8)
    # Fewer epochs than the warmup: still a proportional share, so the cosine has a run to decay over.
    assert fit_to_epochs(cfg, 2).optim.warmup_epochs == pytest.approx(0.2)
    assert fit_to_epochs(cfg, 40).optim.warmup_epochs == 4.0


def test_deadline_sink_stops_when_the_next_epoch_would_overrun():
    now = [0.0]
    sink = DeadlineSink(100.0, {32: 10.0, 64: 40.0}, [32, 32, 64, 64], started_at=0.0, clock=lambda: now[0],
                        finish_s=5.0)
    now[0] = 12.0
    assert sink.epoch({"epoch": 1, "epoch_time_s": 11.0}) is False  # 12 + 11 + 5 (kept for the end) <= 100
    now[0] = 50.0  # epoch 2 took far longer than measured: epoch 3 (64 px, 4x) predicted at 4 x 38 s
    assert sink.epoch({"epoch": 2, "epoch_time_s": 38.0}) is True
    assert sink.stop_reason.startswith("time limit 1m40s: epoch 3 would end at")
    assert sink.epoch({"epoch": 4, "epoch_time_s": 1.0}) is False  # the last epoch: nothing left to stop


def test_deadline_sink_does_not_count_a_sizes_compile_as_its_epoch_time():
    sink = DeadlineSink(1000.0, {32: 10.0, 64: 40.0}, [32] * 3 + [64] * 3, started_at=0.0, clock=lambda: 0.0)
    sink.epoch({"epoch": 1, "epoch_time_s": 50.0})  # the first epoch compiles
    assert sink.predict(32) == 50.0  # nothing steadier seen yet
    sink.epoch({"epoch": 2, "epoch_time_s": 10.0})
    sink.epoch({"epoch": 3, "epoch_time_s": 12.0})
    assert sink.predict(32) == 11.0 and sink.predict(64) == pytest.approx(44.0)  # 11 s x the measured 4x
    sink.epoch({"epoch": 4, "epoch_time_s": 90.0})  # the first 64 px epoch compiles again
    assert sink.predict(64) == pytest.approx(44.0)
    sink.epoch({"epoch": 5, "epoch_time_s": 41.0})
    assert sink.predict(64) == 41.0


# ------------------------------------------------------------------------------------------------------------
# Through the CLI
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for c, name in enumerate(("red", "green")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 90, (36, 36, 3))
                px[..., c] += 150
                Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.jpg")
    return root


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(data), "--out", str(out), "--loader", "torchvision", "--workers", "0", "--img-size", "32",
            "--batch-size", "8", "--model", "convnext_atto", "--device", "cpu", "--log-every", "1", *extra]


def test_time_limit_fixes_and_records_the_epoch_count(data, tmp_path, capsys):
    out, limit = tmp_path / "run", 600.0
    t0 = time.monotonic()
    assert main(_args(data, out, "--epochs", "3", "--time-limit", "10m")) == 0
    wall = time.monotonic() - t0
    printed = capsys.readouterr().out
    assert "time limit 10m: measured per epoch 32px" in printed and "time limit: 3 epochs" in printed
    config = json.loads((out / "config.json").read_text())
    plan = config["budget"]
    assert plan["time_limit"] == "10m" and plan["limit_s"] == limit and plan["epochs"] == 3
    assert config["run"]["epochs"] == 3 and plan["per_epoch"] == [32, 32, 32]
    assert set(plan["epoch_seconds"]) == {"32"} and plan["epoch_seconds"]["32"] > 0
    assert plan["measurement"]["sizes"][0]["steps_per_epoch"] == 2 and plan["estimated_s"] <= limit
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 3 and summary["stopped_by"] is None
    assert wall <= limit * 1.5 + 60


def test_too_short_a_limit_is_refused_before_the_run_directory_exists(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(data, out, "--time-limit", "soon")) == 2
    assert "run.time_limit: expected a duration such as 8h" in capsys.readouterr().err and not out.exists()
    assert main(_args(data, out, "--time-limit", "0.2s")) == 2
    err = capsys.readouterr().err.strip()
    assert "--time-limit 0.2s is too short: one epoch takes ~" in err and "measured per epoch 32px" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_resume_keeps_the_planned_count_without_measuring_again(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    # A measurement that says 100 s per epoch: 350 s fit three epochs of the ten --epochs allows.
    monkeypatch.setattr(budget, "measure_epoch_seconds",
                        lambda cfg, **kw: EpochTimes({32: 100.0}, 1.0, {"eval_s": 1.0, "fake": True}))
    original = DeadlineSink.epoch

    def sigterm_after_epoch_1(self, row):
        if row["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # a pre-empted job, at the epoch boundary
        return original(self, row)

    monkeypatch.setattr(DeadlineSink, "epoch", sigterm_after_epoch_1)
    assert main(_args(data, out, "--epochs", "10", "--time-limit", "350s")) == 128 + signal.SIGTERM
    plan = json.loads((out / "config.json").read_text())["budget"]
    assert plan["epochs"] == 3 and plan["warmup_epochs"] == pytest.approx(5.0 * 3 / 10)
    monkeypatch.setattr(DeadlineSink, "epoch", original)

    def must_not_measure(cfg, **kw):
        raise AssertionError("--resume measured again")
    monkeypatch.setattr(budget, "measure_epoch_seconds", must_not_measure)
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 0
    assert "keeping the planned 3 epochs" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["budget"] == plan and config["run"]["epochs"] == 3
    assert config["optim"]["warmup_epochs"] == pytest.approx(1.5)
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 3


def test_the_deadline_stops_a_run_whose_measurement_was_wrong(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    # A measurement far too optimistic: 1 ms per epoch lets a 2 s limit plan all 8 epochs; the real epochs (plus
    # the set-up before them) overrun it, and the sink stops the run at an epoch boundary.
    monkeypatch.setattr(budget, "measure_epoch_seconds", lambda cfg, **kw: EpochTimes({32: 0.001}))
    monkeypatch.setattr(budget, "FINISH_S", 0.0)  # no time kept for the end: a 2 s limit can plan
    original = DeadlineSink.epoch

    def slow(self, row):  # every epoch takes >= 0.6 s of the limit however fast this machine: at most 4 fit
        time.sleep(0.6)
        return original(self, row)

    monkeypatch.setattr(DeadlineSink, "epoch", slow)
    assert main(_args(data, out, "--epochs", "8", "--time-limit", "2s")) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    plan = json.loads((out / "config.json").read_text())["budget"]
    assert plan["epochs"] == 8
    assert summary["stopped_by"].startswith("time limit 2.0s: epoch ") and 1 <= summary["epochs_run"] <= 4
    assert f"stopping at the end of epoch {summary['epochs_run']} of 8: time limit" in printed
    monkeypatch.setattr(DeadlineSink, "epoch", original)
    # --time-limit off: the resumed run finishes the planned schedule past the deadline, and keeps the record.
    assert main(["train", "--resume", str(out), "--time-limit", "off"]) == 0
    assert "time limit off: continuing the planned 8 epochs" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 8 and summary["stopped_by"] is None
    assert json.loads((out / "config.json").read_text())["budget"] == plan
