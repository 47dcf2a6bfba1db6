"""`--device cuda:N`: honoured in a single process, refused (one line, exit 2) where it conflicts with torchrun's
LOCAL_RANK. No GPU here: torch.cuda is faked with 2 devices, and set_device records what the process would use."""

from __future__ import annotations

import pytest
import torch

from convnext_fast import distributed
from convnext_fast.cli import main


@pytest.fixture
def two_gpus(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: chosen.append(torch.device(dev)))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    yield chosen
    distributed.destroy_distributed()


def _torchrun(monkeypatch, local_rank: int) -> None:
    """What torchrun sets for a one-process-per-GPU job (world size 1: no process group is joined)."""
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", "1")


@pytest.mark.parametrize("flag,expected", [("cuda:1", "cuda:1"), ("cuda:0", "cuda:0"), ("cuda", "cuda:0")])
def test_single_process_uses_the_device_given(two_gpus, flag, expected):
    info = distributed.init_distributed(flag)
    assert info.device == torch.device(expected) and two_gpus == [torch.device(expected)]


def test_single_process_index_past_the_gpus_is_refused(two_gpus):
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 GPU\(s\)"):
        distributed.init_distributed("cuda:2")
    assert two_gpus == []


def test_torchrun_local_rank_decides_and_a_conflicting_index_is_refused(two_gpus, monkeypatch):
    _torchrun(monkeypatch, 1)
    assert distributed.init_distributed("cuda").device == torch.device("cuda:1")
    assert distributed.init_distributed("cuda:1").device == torch.device("cuda:1")  # agrees: fine
    with pytest.raises(ValueError, match="--device cuda:0 conflicts with torchrun's LOCAL_RANK=1"):
        distributed.init_distributed("cuda:0")


def test_cli_refuses_the_conflict_in_one_line_before_any_work(two_gpus, monkeypatch, tmp_path, capsys):
    _torchrun(monkeypatch, 0)
    (tmp_path / "data").mkdir()  # never read: the device is settled first
    code = main(["train", str(tmp_path / "data"), "--device", "cuda:1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--device cuda:1 conflicts with torchrun's LOCAL_RANK=0" in err
    assert not (tmp_path / "run").exists() and two_gpus == []
