"""Checkpoints: atomic save, weights_only load, RNG round trip, safetensors export with plain names."""
import json
import random

import numpy as np
import pytest
import torch

from convnext_fast import checkpoint as ck


class Evil:
    pass


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    state = ck.rng_state()
    expected = _draws()
    path = ck.atomic_save({"format": ck.FORMAT, "engine": {}, "meta": {}, "rng": [state]}, tmp_path / "c.pt")
    _draws()  # move every generator on
    ck.set_rng_state(ck.load_checkpoint(path)["rng"][0])
    assert _draws() == expected


def test_atomic_save_leaves_no_temp_and_replaces(tmp_path):
    p = tmp_path / "sub" / "last.pt"
    ck.atomic_save({"format": ck.FORMAT, "engine": {"x": torch.ones(2)}}, p)
    ck.atomic_save({"format": ck.FORMAT, "engine": {"x": torch.zeros(2)}}, p)
    assert sorted(x.name for x in p.parent.iterdir()) == ["last.pt"]
    assert ck.load_checkpoint(p)["engine"]["x"].tolist() == [0.0, 0.0]


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        ck.load_checkpoint(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        ck.load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a convnext-fast checkpoint"):
        ck.load_checkpoint(foreign)
    evil = tmp_path / "evil.pt"  # weights_only refuses arbitrary (pickled) objects
    torch.save({"format": ck.FORMAT, "engine": Evil()}, evil)
    with pytest.raises(ValueError, match="evil.pt"):
        ck.load_checkpoint(evil)


def test_safetensors_export_and_load(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    model.to(memory_format=torch.channels_last)
    meta = {"model_name": "toy", "num_classes": 2, "classes": ["a", "b"], "img_size": 8, "crop_pct": 0.875}
    path = ck.export_safetensors(model.state_dict(), tmp_path / "model.safetensors", meta)
    weights, got = ck.load_weights(path)
    assert got == meta
    assert set(weights) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v)
    with pytest.raises(AssertionError):
        ck.export_safetensors({"_orig_mod.w": torch.ones(1)}, tmp_path / "x.safetensors", meta)

    # classes from classes.json when the metadata lacks them
    meta2 = {k: v for k, v in meta.items() if k != "classes"}
    path2 = ck.export_safetensors(model.state_dict(), tmp_path / "m2.safetensors", meta2)
    with pytest.raises(ValueError, match="classes"):
        ck.load_weights(path2)
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b"]))
    assert ck.load_weights(path2)[1]["classes"] == ["a", "b"]
