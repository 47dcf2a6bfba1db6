"""Faults around a training run, through the CLI: a changed sample list on --resume, kill -9 at many points of a
checkpoint save, a full disk during a save, two runs into one --out, a stale lock, and a file that goes bad
mid-run with --skip-bad-files. Tiny runs: convnext_atto at 32 px, 2 classes x 8 images, batch 8."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convnext_fast import checkpoint as ckpt_io
from convnext_fast.checkpoint import load_checkpoint, load_weights
from convnext_fast.cli import main
from convnext_fast.run_files import read_jsonl

FLAGS = ["--loader", "torchvision", "--workers", "0", "--model", "convnext_atto", "--img-size", "32",
         "--batch-size", "8", "--device", "cpu", "--log-every", "1", "--lr", "2e-3", "--warmup-epochs", "0",
         "--mixup", "0", "--cutmix", "0", "--no-model-ema", "--no-tta", "--randaugment", "off"]
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for c, name in enumerate(("red", "blue")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 90, (36, 36, 3))
                px[..., 2 * c] += 150
                Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def one_epoch(data, tmp_path_factory) -> Path:
    """A finished 1-epoch run (2 steps); tests copy it and resume it to more epochs."""
    out = tmp_path_factory.mktemp("runs") / "base"
    assert main(["train", str(data), "--out", str(out), *FLAGS, "--epochs", "1"]) == 0
    return out


def _copy(run: Path, data: Path, tmp_path: Path) -> tuple[Path, Path]:
    new_data, new_run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data, new_data)
    shutil.copytree(run, new_run)
    cfg = json.loads((new_run / "config.json").read_text())
    cfg["data"]["path"] = str(new_data)
    (new_run / "config.json").write_text(json.dumps(cfg))
    return new_data, new_run


def test_jpeg_with_garbled_tables_is_named_by_the_preflight(data, tmp_path, capsys):
    """The issue's file: valid start and end markers, a segment length past the end ("Truncated File Read" at the
    first batch before). Now the preflight names it and --skip-bad-files really skips it."""
    root = tmp_path / "data"
    shutil.copytree(data, root)
    victim = root / "train" / "red" / "3.jpg"
    raw = victim.read_bytes()
    victim.write_bytes(raw[:4] + (0xFFF0).to_bytes(2, "big") + raw[6:])
    out = tmp_path / "run"
    assert main(["train", str(root), "--out", str(out), *FLAGS, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{victim}: corrupt JPEG header" in err and "--skip-bad-files" in err
    assert not out.exists()
    assert main(["train", str(root), "--out", str(out), *FLAGS, "--epochs", "1", "--skip-bad-files"]) == 0
    assert (out / "bad_files.txt").read_text().startswith(f"{victim}\t")


def test_resume_on_changed_images_refuses_naming_the_change(one_epoch, data, tmp_path, capsys):
    new_data, run = _copy(one_epoch, data, tmp_path)
    shutil.copy(new_data / "train" / "red" / "0.jpg", new_data / "train" / "red" / "new.jpg")
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "class 'red': 8 -> 9 images (+1)" in err and "--allow-data-change" in err and len(err.splitlines()) == 1
    (new_data / "train" / "red" / "new.jpg").unlink()
    with open(new_data / "train" / "blue" / "3.jpg", "ab") as f:  # same names, one file rewritten
        f.write(b"\0" * 7)
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "1 file(s) changed size" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--epochs", "2", "--allow-data-change"]) == 0
    assert "no longer an exact resume" in capsys.readouterr().out
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]


# A driver process forks savers that write the trainer's end-of-epoch files in a loop (run_guard.save_epoch, the
# function the loop calls) and SIGKILLs each after a different delay, spread over two save cycles; after each kill
# the run directory must hold loadable files, and the resume's repair must finish a cut save.
KILL_DRIVER = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    from types import SimpleNamespace
    from convnext_fast import checkpoint as ckpt_io, run_guard
    from convnext_fast.distributed import DistInfo
    from convnext_fast.run_files import RunReporter, read_jsonl
    from convnext_fast.runs.per_class import read_per_class
    from convnext_fast.loop import LoopState
    import torch

    run, kills = Path(sys.argv[1]), int(sys.argv[2])
    ck = ckpt_io.load_checkpoint(run / "checkpoints" / "last.pt")
    weights = ck["engine"]["model"]
    engine = SimpleNamespace(state_dict=lambda: ck["engine"], ema=None, model=SimpleNamespace(state_dict=lambda: weights))
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    meta = {**ck["meta"], "data": ck["data"]}
    state = LoopState(**ck["loop"])
    reporter = RunReporter(run, ck["meta"]["classes"])
    row = state.rows[-1]

    def cycle():
        run_guard.save_epoch(run, engine, state, meta, dist, reporter, row, improved=True)

    start = time.perf_counter(); cycle(); period = time.perf_counter() - start
    mid_write = done = 0
    # At least `kills` kills spread over two save periods, and more (up to 6x) until 3 landed inside a write: on
    # a loaded machine a save's duration varies, so a fixed number of kills can miss the writes by chance.
    for k in range(6 * kills):
        if k >= kills and mid_write >= 3:
            break
        pid = os.fork()
        if pid == 0:
            while True:
                cycle()
        time.sleep(2 * period * ((k % kills) + 0.5) / kills)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        done += 1
        mid_write += any(run.rglob(".*.tmp*"))
        assert ckpt_io.load_checkpoint(run / "checkpoints" / "last.pt")["loop"]["epoch"] == state.epoch
        ckpt_io.load_checkpoint(run / "checkpoints" / "best.pt")
        ckpt_io.load_weights(run / "model.safetensors")
        read_jsonl(run / "metrics.jsonl")
        run_guard.repair_after_kill(run, state, engine.model, meta)
        # best.pt is last.pt: the same file, or (a kill between last.pt's rename and the link; every cycle here
        # saves the same state) a file holding the same epoch, which the repair rightly leaves alone
        best, last = run / "checkpoints" / "best.pt", run / "checkpoints" / "last.pt"
        assert os.path.samefile(best, last) or \
            ckpt_io.load_checkpoint(best)["loop"] == ckpt_io.load_checkpoint(last)["loop"]
        assert read_per_class(run)["epoch"] == state.epoch  # per_class.json, the save's last write: whole after any kill
        assert not any(run.rglob(".*.tmp*"))
    print(json.dumps({"kills": done, "mid_write": mid_write, "period_s": period}))
""")


def test_kill_9_at_any_point_of_a_save_leaves_a_resumable_run(one_epoch, data, tmp_path):
    _, run = _copy(one_epoch, data, tmp_path)
    proc = subprocess.run([sys.executable, "-c", KILL_DRIVER, str(run), "10"], capture_output=True, text=True,
                          timeout=180, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["mid_write"] >= 3, report  # many kills landed inside a write, not between saves
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("target", ["last.pt", "model.safetensors"])
def test_full_disk_during_a_save_is_one_line_and_keeps_the_last_good_files(one_epoch, data, tmp_path, monkeypatch,
                                                                            capsys, target):
    _, run = _copy(one_epoch, data, tmp_path)
    before = {name: (run / name).read_bytes() for name in ("checkpoints/last.pt", "model.safetensors")}
    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        if "w" in mode and Path(path).name.startswith(f".{target}.tmp"):
            def write(_data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            fh.write = write
        return fh

    monkeypatch.setattr(ckpt_io, "open", full_disk_open, raising=False)
    import convnext_fast.loop as T

    real_evaluate = T.evaluate

    def improving(*args, **kwargs):  # epoch 2 must improve, so that its save also writes model.safetensors
        results = real_evaluate(*args, **kwargs)
        results["model"]["top1"] = 101.0
        return results

    monkeypatch.setattr(T, "evaluate", improving)
    code = main(["train", "--resume", str(run), "--epochs", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    written = run / "checkpoints" / "last.pt" if target == "last.pt" else run / "model.safetensors"
    assert f"cannot write {written}: No space left on device" in err
    assert "intact" in err and f"--resume {run}" in err
    assert not list(run.rglob(".*.tmp*"))  # no half-written temp file fills the disk further
    load_weights(run / "model.safetensors")
    if target == "last.pt":
        assert (run / "checkpoints" / "last.pt").read_bytes() == before["checkpoints/last.pt"]
        assert (run / "model.safetensors").read_bytes() == before["model.safetensors"]
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0  # after freeing space: continue
    assert load_checkpoint(run / "checkpoints" / "last.pt")["loop"]["epoch"] == 2


def test_two_runs_into_one_out_exactly_one_proceeds_and_a_killed_lock_is_stale(data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "convnext_fast", "train", str(data), "--out", str(out), *FLAGS, "--epochs", "1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "in use by another run" in loser or "already holds a run" in loser, loser
    assert len(read_jsonl(out / "metrics.jsonl")) == 1

    # A run killed with -9 leaves .lock behind; the kernel released its lock, so --resume proceeds.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from convnext_fast.runlock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)",
                               str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout.readline().strip() == "locked"
    assert main(["train", "--resume", str(out)]) == 2  # held: refused
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (out / ".lock").exists()
    assert main(["train", "--resume", str(out)]) == 0  # (the run is finished: the resume only re-reports it)


def test_file_going_bad_mid_run_with_skip_bad_files(one_epoch, data, tmp_path, monkeypatch, capsys):
    """Without the flag: a one-line error naming the file and the flag. With it: listed in bad_files.txt, left out,
    the run goes on; a resume reads the list (the same choice)."""
    new_data, run = _copy(one_epoch, data, tmp_path)
    victim = new_data / "train" / "blue" / "5.jpg"
    raw = victim.read_bytes()
    victim.write_bytes(raw[:4] + (0xFFF0).to_bytes(2, "big") + raw[6:])  # a header that no longer parses
    # The preflight would find it: to reach run time, the file goes bad right after the preflight.
    import convnext_fast.loop as T

    real = T.resolve_train_val

    def resolve_then_corrupt(*args, **kwargs):
        victim.write_bytes(raw)
        out = real(*args, **kwargs)
        victim.write_bytes(raw[:4] + (0xFFF0).to_bytes(2, "big") + raw[6:])
        return out

    monkeypatch.setattr(T, "resolve_train_val", resolve_then_corrupt)
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(victim) in err and "--skip-bad-files" in err and len(err.splitlines()) == 1
    assert main(["train", "--resume", str(run), "--epochs", "3", "--skip-bad-files"]) == 0
    assert f"left out bad image {victim}" in capsys.readouterr().err
    assert (run / "bad_files.txt").read_text().splitlines() == [f"{victim}\tOSError: Truncated File Read"]
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
