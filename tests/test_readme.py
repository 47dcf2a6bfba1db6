"""The README's drop-in example runs as written (on a small generated folder)."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_dropin_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("nvidia.dali")
    blocks = [b for b in _python_blocks() if "build_loader" in b]
    assert len(blocks) == 1, "expected one drop-in example in README.md"
    code = blocks[0]
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        folder = tmp_path / "demo-data" / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(24):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    # It trained: two epochs of 72 // 32 = 2 steps each, and the loss is a finite number.
    assert np.isfinite(namespace["loss"].item())
    assert len(namespace["loader"].classes) == 3

