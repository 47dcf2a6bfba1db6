"""Config: precedence (defaults < preset < file < flags), strictness, lr scaling, CLI flag parsing."""
import json

import pytest

from convnext_fast.cli import build_parser
from convnext_fast.commands.train import resolve_config
from convnext_fast.config import PRESETS, TrainConfig, build_config, field_doc


def parse(*argv):
    return build_parser(only="train").parse_args(["train", *argv])


def write(tmp_path, text, name="cfg.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_valid_and_documented():
    import dataclasses

    cfg = TrainConfig()
    for section in ("data", "model", "optim", "recipe", "speed", "run"):
        for f in dataclasses.fields(getattr(cfg, section)):
            assert field_doc(section, f.name).strip(), f"{section}.{f.name} has no doc"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_precedence_defaults_preset_file_flags(tmp_path):
    toml = write(tmp_path, 'preset = "seed-recipe"\n[data]\nimg_size = 160\nbatch_size = 64\n[optim]\nlr = 1e-3\n')
    cfg = build_config(config_file=toml, flags={"data": {"batch_size": 32}})
    assert cfg.model.name == "convnext_tiny" and cfg.recipe.focal_gamma == 2.0  # preset (named by the file)
    assert cfg.data.img_size == 160 and cfg.optim.lr == 1e-3  # file over preset
    assert cfg.data.batch_size == 32  # flag over file
    assert cfg.data.reprob == PRESETS["seed-recipe"]["data"]["reprob"]
    assert cfg.optim.min_lr == TrainConfig().optim.min_lr == 1e-6  # untouched default

    args = parse("DATA", "--config", str(toml), "--preset", "demo", "--img-size", "48", "--no-model-ema")
    cfg, resume = resolve_config(args)
    assert not resume and cfg.data.path == "DATA"
    assert cfg.model.name == "convnext_atto"  # --preset beats the file's preset
    assert cfg.data.img_size == 48 and cfg.data.batch_size == 64 and cfg.recipe.model_ema is False


def test_no_data_means_demo_preset():
    cfg, _ = resolve_config(parse())
    assert cfg.data.path is None
    assert cfg == build_config(preset="demo")
    cfg, _ = resolve_config(parse("some/dir"))
    assert cfg.model.name == TrainConfig().model.name  # with DATA: plain defaults, no preset


@pytest.mark.parametrize("text, needle", [
    ("[optim]\nlrr = 0.1\n", "optim.'lrr'"),
    ("[optimizer]\nlr = 0.1\n", "'optimizer'"),
    ("[data]\nbatch_size = 'big'\n", "data.batch_size"),
    ("[data]\nbatch_size = 2.5\n", "data.batch_size"),
    ("[data]\nloader = 'ffcv'\n", "data.loader"),
    ("[recipe]\nsmoothing = 1.5\n", "recipe.smoothing"),
    ("[speed]\namp = 'fp8'\n", "speed.amp"),
    ("[data]\nrandaugment = [2]\n", "data.randaugment"),
    ("[run]\nepochs = true\n", "run.epochs"),
    ("[data\n", "invalid TOML"),
])
def test_bad_file_values_name_the_key(tmp_path, text, needle):
    toml = write(tmp_path, text)
    with pytest.raises(ValueError) as info:
        build_config(config_file=toml)
    assert needle in str(info.value) and str(toml) in str(info.value)


def test_bad_flags_and_presets():
    with pytest.raises(ValueError, match="--lr: expected a number"):
        resolve_config(parse("D", "--lr", "abc"))
    with pytest.raises(ValueError, match="data.batch_size must be >= 1"):
        resolve_config(parse("D", "--batch-size", "0"))
    with pytest.raises(ValueError, match="--randaugment"):
        resolve_config(parse("D", "--randaugment", "2x9"))
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        resolve_config(parse("D", "--preset", "fast"))
    with pytest.raises(ValueError, match="--config: file not found"):
        resolve_config(parse("D", "--config", "/nonexistent.toml"))
    with pytest.raises(ValueError, match="even"):
        resolve_config(parse("D", "--mixup", "0.8", "--batch-size", "7"))


def test_flag_parsing():
    cfg, _ = resolve_config(parse("D", "--randaugment", "off", "--patience", "off", "--no-compile", "--amp", "bf16",
                                  "--randaugment", "3,12", "--val-split", "0.2", "--tta"))
    assert cfg.data.randaugment == (3, 12) and cfg.run.patience is None and cfg.speed.compile is False
    assert cfg.speed.amp == "bf16" and cfg.data.val_split == 0.2 and cfg.recipe.tta is True
    cfg, _ = resolve_config(parse("D", "--randaugment", "off", "--patience", "7", "--preset", "demo", "--lr", "auto"))
    assert cfg.data.randaugment is None and cfg.run.patience == 7 and cfg.optim.lr is None


def test_lr_scaling_documented_formula():
    cfg = build_config(preset="seed-recipe")
    assert cfg.optim.lr is None and cfg.optim.weight_decay == 0.05
    assert cfg.optim.resolved_lr(256) == pytest.approx(4e-3 * 256 / 4096) == pytest.approx(2.5e-4)
    assert cfg.optim.resolved_lr(4096) == pytest.approx(4e-3)
    cfg = build_config(preset="seed-recipe", flags={"optim": {"lr": 1e-3}})
    assert cfg.optim.resolved_lr(256) == 1e-3  # an explicit lr is never rescaled


def test_seed_recipe_preset_matches_the_issue():
    cfg = build_config(preset="seed-recipe")
    assert (cfg.model.name, cfg.data.img_size, cfg.data.batch_size, cfg.run.epochs) == ("convnext_tiny", 192, 256, 150)
    assert cfg.optim.warmup_epochs == 5 and cfg.recipe.smoothing == 0.05 and cfg.recipe.focal_gamma == 2
    assert (cfg.recipe.mixup, cfg.recipe.cutmix) == (0.8, 1.0) and cfg.data.randaugment is not None
    assert cfg.data.hflip > 0 and cfg.data.reprob > 0 and cfg.model.drop_path == 0.1
    assert cfg.recipe.model_ema and cfg.recipe.tta and cfg.run.patience is not None


def test_resume_uses_saved_config(tmp_path):
    saved = build_config(preset="demo", flags={"run": {"epochs": 3}}).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**saved, "resolved": {"lr": 1.0}}))
    cfg, resume = resolve_config(parse("--resume", str(tmp_path), "--epochs", "5"))
    assert resume and cfg.run.out == str(tmp_path) and cfg.run.epochs == 5 and cfg.model.name == "convnext_atto"
    with pytest.raises(ValueError, match="--resume"):
        resolve_config(parse("--resume", str(tmp_path), "--preset", "demo"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_config(parse("--resume", str(tmp_path / "nope")))
