"""End to end: `convnext-fast train` on a tiny image folder, the run directory, eval on it, exact resume after
SIGTERM (at an epoch boundary and mid-epoch), non-finite loss, early stopping, and CLI errors.

Runs go through `convnext_fast.cli.main` in-process (one subprocess checks the real entry point). Every run is
tiny: convnext_atto at 32 px, 3 classes x 8 training images, batch 8 -> 3 steps per epoch.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnext_fast.checkpoint import load_checkpoint, load_weights
from convnext_fast.cli import main
from convnext_fast.config import TrainConfig
from convnext_fast.engine import Engine

# The full recipe (Mixup/CutMix, focal loss, drop path, EMA, TTA) so resume covers every RNG and state.
FLAGS = ["--loader", "torchvision", "--workers", "0", "--model", "convnext_atto", "--img-size", "32",
         "--batch-size", "8", "--device", "cpu", "--log-every", "2", "--lr", "2e-3", "--warmup-epochs", "1",
         "--mixup", "0.8", "--cutmix", "1.0", "--focal-gamma", "2", "--drop-path", "0.1", "--model-ema",
         "--model-ema-decay", "0.9", "--tta", "--randaugment", "2,9", "--epochs", "2"]
COMPARED = ("epoch", "step", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "ema_val_loss", "ema_val_top1",
            "ema_val_top5")
RUN_FILES = [".lock", "checkpoints/best.pt", "checkpoints/last.pt", "classes.json", "config.json", "metrics.jsonl",
             "model.safetensors", "per_class.json", "plots/accuracy.png", "plots/confusion_matrix.png",
             "plots/loss.png", "plots/lr.png", "plots/per_class_accuracy.png", "status.json", "summary.json"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """train/ and val/ with 3 colour-coded classes (learnable), 40x40 JPEGs."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for c, name in enumerate(("red", "green", "blue")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 90, (40, 40, 3))
                px[..., c] += 150
                Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.jpg")
    return root


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def same_rows(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert {k: ra.get(k) for k in COMPARED} == {k: rb.get(k) for k in COMPARED}


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a)[0], load_weights(b)[0]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """The reference: 2 epochs without interruption."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert main(["train", str(data), "--out", str(out), *FLAGS]) == 0
    return out


def test_run_directory_has_every_file(straight, data):
    assert sorted(str(p.relative_to(straight)) for p in straight.rglob("*") if p.is_file()) == RUN_FILES
    metrics = rows(straight)
    assert [r["epoch"] for r in metrics] == [1, 2]
    for r in metrics:
        for key in ("step", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "ema_val_top1", "img_per_sec",
                    "epoch_time_s", "data_wait_pct"):
            assert isinstance(r[key], (int, float)), key
        assert 0 <= r["val_top1"] <= 100 and r["img_per_sec"] > 0
    assert metrics[-1]["step"] == 6
    saved = json.loads((straight / "config.json").read_text())
    assert saved["resolved"]["steps_per_epoch"] == 3 and saved["resolved"]["world_size"] == 1
    saved.pop("resolved")
    assert TrainConfig.from_dict(saved).model.name == "convnext_atto"
    assert json.loads((straight / "classes.json").read_text()) == ["blue", "green", "red"]
    summary = json.loads((straight / "summary.json").read_text())
    best = max(r["ema_val_top1"] for r in metrics)  # EMA on: the EMA's accuracy selects and is exported
    assert summary["best_top1"] == best and metrics[summary["best_epoch"] - 1]["ema_val_top1"] == best
    assert summary["epochs_run"] == 2 and summary["wall_time_s"] > 0 and summary["img_per_sec"] > 0
    ckpt = load_checkpoint(straight / "checkpoints" / "last.pt")
    assert ckpt["loop"]["epoch"] == 2 and ckpt["engine"]["step"] == 6
    weights, meta = load_weights(straight / "model.safetensors")
    assert meta["model_name"] == "convnext_atto" and meta["img_size"] == 32
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in weights)
    best_ckpt = load_checkpoint(straight / "checkpoints" / "best.pt")
    for k, v in weights.items():  # model.safetensors == the best checkpoint's EMA weights
        assert torch.equal(v, best_ckpt["engine"]["ema"][k]), k


def test_eval_reproduces_the_runs_best_accuracy(straight, data, tmp_path, capsys):
    summary = json.loads((straight / "summary.json").read_text())
    for weights in ("model.safetensors", "checkpoints/best.pt"):
        out = tmp_path / "eval.json"
        rc = main(["eval", str(straight / weights), str(data), "--tta", "--json", str(out), "--loader", "torchvision",
                   "--workers", "0", "--batch-size", "16", "--device", "cpu"])
        assert rc == 0
        result = json.loads(out.read_text())
        assert result["count"] == 9 and result["top1"] == pytest.approx(summary["best_top1"])
        assert len(result["confusion"]) == 3 and len(result["per_class_acc"]) == 3
    shown = capsys.readouterr().out
    assert "top-1" in shown and "Confusion matrix" in shown and "green" in shown


def test_eval_class_mismatch_is_a_clear_error(straight, tmp_path, capsys):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "x.jpg")
    assert main(["eval", str(straight / "model.safetensors"), str(tmp_path), "--loader", "torchvision",
                 "--workers", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "class mismatch" in err and "cat" in err and len(err.splitlines()) == 1


def _sigterm_after(monkeypatch, at_step: int) -> None:
    """Deliver a real SIGTERM to this process right after optimizer step `at_step`."""
    original = Engine.train_step

    def step(self, images, labels):
        loss = original(self, images, labels)
        if self.step == at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(Engine, "train_step", step)


@pytest.mark.parametrize("stop_at", [3, 2], ids=["epoch-boundary", "mid-epoch"])
def test_sigterm_then_resume_equals_straight_run(straight, data, tmp_path, monkeypatch, capsys, stop_at):
    out = tmp_path / "run"
    _sigterm_after(monkeypatch, stop_at)
    assert main(["train", str(data), "--out", str(out), *FLAGS]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "checkpoint saved" in err and f"--resume {out}" in err
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["engine"]["step"] == stop_at
    assert ckpt["loop"]["batch_in_epoch"] == (0 if stop_at == 3 else stop_at)
    assert len(rows(out)) == (1 if stop_at == 3 else 0)
    monkeypatch.undo()
    assert main(["train", "--resume", str(out)]) == 0
    same_rows(rows(out), rows(straight))
    same_weights(out / "checkpoints" / "last.pt", straight / "checkpoints" / "last.pt")
    same_weights(out / "model.safetensors", straight / "model.safetensors")


# Progressive resolution 32 -> 48 -> 64 over 3 epochs (ramp 1:3, step 16), evaluated at 48.
PROGRESSIVE = [*FLAGS, "--img-size", "64", "--progressive", "32", "--ramp", "1:3", "--res-step", "16", "--epochs", "3",
               "--eval-img-size", "48"]


def test_progressive_run_records_sizes_and_resumes_exactly_mid_ramp(data, tmp_path, monkeypatch, capsys):
    straight = tmp_path / "straight"
    assert main(["train", str(data), "--out", str(straight), *PROGRESSIVE]) == 0
    shown = capsys.readouterr().out
    assert "resolution: train 32px epoch 1 | 48px epoch 2 | 64px epoch 3" in shown and "eval 48px" in shown
    assert "training size 32 -> 48 px" in shown
    metrics = rows(straight)
    assert [(r["img_size"], r["eval_img_size"]) for r in metrics] == [(32, 48), (48, 48), (64, 48)]
    saved = json.loads((straight / "config.json").read_text())
    assert saved["resolved"]["schedule"]["per_epoch"] == [32, 48, 64] and saved["data"]["progressive"] == 32
    assert load_weights(straight / "model.safetensors")[1]["img_size"] == 48  # eval's default: the run's eval size

    out = tmp_path / "run"
    _sigterm_after(monkeypatch, 4)  # epoch 2 (48 px), after its first batch: inside the ramp
    assert main(["train", str(data), "--out", str(out), *PROGRESSIVE]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoints" / "last.pt")["meta"]["schedule"]["per_epoch"] == [32, 48, 64]
    capsys.readouterr()
    # A schedule that would relabel the epochs already trained (epoch 2 at 64 px with --res-step 32) is refused.
    assert main(["train", "--resume", str(out), "--res-step", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "epoch 2 was trained at 48 px" in err and len(err.splitlines()) == 1
    assert main(["train", "--resume", str(out)]) == 0
    same_rows(rows(out), metrics)
    assert [r["img_size"] for r in rows(out)] == [32, 48, 64]
    same_weights(out / "checkpoints" / "last.pt", straight / "checkpoints" / "last.pt")


@pytest.mark.parametrize("during", ["evaluation", "first-step"])
def test_stop_during_evaluation_or_the_first_compile_resumes_exactly(straight, data, tmp_path, monkeypatch, capsys,
                                                                     during):
    """SIGTERM while evaluating (the flag is read after the epoch's save) or during the first step (where
    torch.compile compiles; the CPU tests run the eager step, the stop path after it is the same code)."""
    import convnext_fast.loop as T

    out = tmp_path / "run"
    if during == "evaluation":
        real_evaluate = T.evaluate

        def evaluate(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return real_evaluate(*args, **kwargs)

        monkeypatch.setattr(T, "evaluate", evaluate)
    else:
        original = Engine.train_step

        def slow_first_step(self, images, labels):  # a compile that takes a while and is interrupted
            if self.step == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, images, labels)

        monkeypatch.setattr(Engine, "train_step", slow_first_step)
    assert main(["train", str(data), "--out", str(out), *FLAGS]) == 128 + signal.SIGTERM
    assert "checkpoint saved" in capsys.readouterr().err
    loop = load_checkpoint(out / "checkpoints" / "last.pt")["loop"]
    assert (loop["epoch"], loop["batch_in_epoch"]) == ((1, 0) if during == "evaluation" else (0, 1))
    monkeypatch.undo()
    assert main(["train", "--resume", str(out)]) == 0
    same_rows(rows(out), rows(straight))
    same_weights(out / "model.safetensors", straight / "model.safetensors")


def test_non_finite_loss_stops_naming_the_step(data, tmp_path, monkeypatch, capsys):
    original = Engine.train_step

    def step(self, images, labels):
        loss = original(self, images, labels)
        return loss * float("nan") if self.step == 5 else loss

    monkeypatch.setattr(Engine, "train_step", step)
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), *FLAGS, "--no-model-ema", "--no-tta"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 5 (epoch 2)" in err and "last.pt" in err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["engine"]["step"] == 3  # the last good one is kept
    assert len(rows(out)) == 1


def test_early_stopping_and_val_split_with_dali(data, tmp_path):
    """Class folders + --val-split, on the DALI (CPU) loader; a negligible lr cannot improve top-1, so patience 1
    stops after epoch 2."""
    flat = data / "train"
    out = tmp_path / "run"
    assert main(["train", str(flat), "--val-split", "0.25", "--out", str(out), *FLAGS, "--epochs", "4",
                 "--patience", "1", "--lr", "1e-9", "--min-lr", "0", "--no-model-ema", "--no-tta", "--mixup", "0",
                 "--cutmix", "0", "--loader", "dali", "--workers", "1"]) == 0
    assert [r["epoch"] for r in rows(out)] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] and summary["epochs_run"] == 2 and summary["best_epoch"] == 1
    saved = json.loads((out / "config.json").read_text())["resolved"]
    assert (saved["num_train"], saved["num_val"]) == (18, 6)  # 2 of each class's 8 images held out
    assert main(["train", "--resume", str(out)]) == 0  # resuming a finished, early-stopped run does nothing
    assert len(rows(out)) == 2


def test_user_errors_are_one_line(data, straight, tmp_path, capsys):
    cases = [
        ([str(tmp_path / "missing")], "no such directory"),
        ([str(tmp_path)], "no class folders"),
        ([str(data / "train")], "--val-split"),
        ([str(data), "--lr", "fast"], "--lr: expected a number"),
        ([str(data), "--model", "convnext_huge_typo"], "unknown timm model"),
        ([str(data), "--out", str(straight)], "already holds a run"),
    ]
    for argv, needle in cases:
        assert main(["train", *argv, "--device", "cpu", "--loader", "torchvision"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)


def test_entry_point_rejects_unknown_flag():
    proc = subprocess.run([sys.executable, "-m", "convnext_fast", "train", "--bogus"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "--bogus" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.gpu
def test_gpu_defaults_compile_once_and_resume(data, tmp_path):
    """On CUDA the defaults are the fast path (DALI on the GPU, torch.compile, bf16, fused AdamW): two epochs with
    recompiles forbidden, then a resumed third epoch."""
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI, which is not installed here")
    import torch._dynamo

    torch._dynamo.reset()
    out = tmp_path / "run"
    flags = ["--loader", "dali", "--model", "convnext_atto", "--img-size", "32", "--batch-size", "8",
             "--mixup", "0.8", "--cutmix", "1.0", "--model-ema", "--tta", "--log-every", "2"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert main(["train", str(data), "--out", str(out), "--epochs", "2", *flags]) == 0
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert resolved["speed"]["compile"] and resolved["speed"]["amp"] == "bf16" and resolved["speed"]["fused_adamw"]
    assert main(["train", "--resume", str(out), "--epochs", "3"]) == 0
    assert [r["epoch"] for r in rows(out)] == [1, 2, 3]
    assert all(math.isfinite(r["train_loss"]) for r in rows(out))
    assert not any(k.startswith("_orig_mod") for k in load_weights(out / "model.safetensors")[0])


def test_bad_files_stop_before_training_unless_skipped(data, tmp_path, capsys):
    """A corrupt file is named before any work; --skip-bad-files trains without it and says how many it left out;
    --verify-images catches a file that only a full decode shows is broken."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data, root)
    (root / "train" / "red" / "zz_not_an_image.jpg").write_text("not a jpeg")
    out = tmp_path / "run"
    fast = ["--epochs", "1", "--no-model-ema", "--no-tta", "--mixup", "0", "--cutmix", "0"]
    assert main(["train", str(root), "--out", str(out), *FLAGS, *fast]) == 2
    err = capsys.readouterr().err
    assert "zz_not_an_image.jpg" in err and "--skip-bad-files" in err
    assert not out.exists()  # nothing written: the preflight runs before any work
    assert main(["train", str(root), "--out", str(out), *FLAGS, *fast, "--skip-bad-files"]) == 0
    assert "skipped 1 bad image file(s)" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["resolved"]["num_train"] == 24

    # A file whose header parses but whose pixels do not decode (a PNG with a zeroed IDAT): only decoding finds it.
    victim = root / "val" / "blue" / "0.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(victim, "PNG")
    raw = bytearray(victim.read_bytes())
    raw[raw.index(b"IDAT") + 6:raw.index(b"IDAT") + 200] = bytes(194)
    victim.write_bytes(bytes(raw))
    (root / "train" / "red" / "zz_not_an_image.jpg").unlink()
    from convnext_fast.data.headers import header_check
    from convnext_fast.data.index import cheap_check

    assert cheap_check(str(victim)) is None and header_check(str(victim)) is None  # the preflight passes it
    out2 = tmp_path / "run2"
    assert main(["train", str(root), "--out", str(out2), *FLAGS, *fast, "--verify-images"]) == 2
    err = capsys.readouterr().err
    assert "0.jpg" in err and "cannot decode" in err
    assert not out2.exists()  # caught by the preflight, before any work
