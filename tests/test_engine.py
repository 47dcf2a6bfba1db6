"""Engine: the train step (fast and baseline settings), eval forward with TTA, state round trip, compile."""
import dataclasses
import io

import pytest
import torch

from convnext_fast.config import RecipeConfig
from convnext_fast.engine import BASELINE_SPEED, FAST_SPEED, build_engine

RECIPE = RecipeConfig(mixup=0.8, cutmix=1.0, smoothing=0.1, focal_gamma=2.0, model_ema=True, model_ema_decay=0.9)
CPU_FAST = dataclasses.replace(FAST_SPEED, compile=False, amp="off", fused_adamw=False)


def batch(n=4, size=32, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, classes, (n,), generator=g)


def engine(speed, recipe=RECIPE, seed=0):
    return build_engine("convnext_atto", 3, device="cpu", speed=speed, recipe=recipe, lr=1e-3, seed=seed)


@pytest.mark.parametrize("speed", [CPU_FAST, BASELINE_SPEED], ids=["fast-cpu", "baseline"])
def test_train_step_trains_model_and_ema(speed):
    eng = engine(speed)
    start = {k: v.clone() for k, v in eng.model.state_dict().items()}
    for seed in range(2):
        images, labels = batch(seed=seed)
        loss = eng.train_step(images, labels)
        assert loss.ndim == 0 and loss.device.type == "cpu" and not loss.requires_grad
        assert torch.isfinite(loss)
    assert eng.step == 2
    now = eng.model.state_dict()
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in now)
    assert not torch.equal(now["head.fc.weight"], start["head.fc.weight"])
    ema = eng.ema.module.state_dict()
    # EMA with warmup: after 2 steps it sits strictly between the start and the current weights
    assert not torch.equal(ema["head.fc.weight"], now["head.fc.weight"])
    assert not torch.equal(ema["head.fc.weight"], start["head.fc.weight"])
    assert eng.model.stem[0].weight.is_contiguous(memory_format=torch.channels_last) == speed.channels_last


def test_same_seed_same_initial_weights_and_no_mixup_targets_are_hard():
    a, b = engine(CPU_FAST, seed=3), engine(CPU_FAST, seed=3)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    plain = engine(CPU_FAST, recipe=RecipeConfig(smoothing=0.0))
    assert plain.mixup is None and plain.ema is None


@pytest.mark.parametrize("foreach", [True, False])
def test_ema_follows_the_warmup_formula(foreach):
    """ema_t = d_t * ema_(t-1) + (1 - d_t) * w_t with timm's warmup d_t = min(decay, 1 - (1 + t - 1)^(-2/3)),
    d_1 = 0 (the first update copies the weights); foreach and per-tensor updates agree."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    speed = dataclasses.replace(CPU_FAST, ema=foreach, channels_last=False)
    eng = build_engine("tiny", 3, device="cpu", speed=speed, model=model, lr=0.1,
                       recipe=RecipeConfig(smoothing=0.0, model_ema=True, model_ema_decay=0.5))
    expected = None
    for t in range(1, 6):
        eng.train_step(*batch(size=4, seed=t))
        w = model[1].weight.detach().clone()
        d = 0.0 if t == 1 else min(0.5, 1 - (1 + (t - 1)) ** (-2 / 3))
        expected = w if expected is None else d * expected + (1 - d) * w
        assert torch.allclose(eng.ema.module[1].weight, expected, atol=1e-6), t
    assert not torch.allclose(expected, model[1].weight)  # the decay > 0 steps really averaged


def test_eval_logits_tta_is_mean_of_image_and_mirror():
    eng = engine(CPU_FAST)
    images, _ = batch()
    eng.model.train()
    with torch.no_grad():
        eng.model.eval()
        ref = (eng.model(images) + eng.model(images.flip(3))) / 2
        eng.model.train()
    out = eng.eval_logits(images, tta=True)
    assert eng.model.training  # mode restored
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(eng.eval_logits(images), ref, atol=1e-5)
    assert eng.eval_logits(images, use_ema=True).shape == (4, 3)


def test_state_dict_round_trip_continues_identically():
    a = engine(CPU_FAST)
    a.train_step(*batch(seed=0))
    buf = io.BytesIO()  # through bytes, as a checkpoint does (a live state_dict aliases a's optimizer tensors)
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = engine(CPU_FAST)  # same seed (Mixup draws depend on it), weights perturbed: the load must overwrite them
    with torch.no_grad():
        for p in b.model.parameters():
            p.add_(1.0)
    b.load_state_dict(state)
    images, labels = batch(seed=1)
    torch.manual_seed(5)
    la = a.train_step(images.clone(), labels)
    torch.manual_seed(5)
    lb = b.train_step(images.clone(), labels)
    assert torch.equal(la, lb)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.gpu
def test_fast_step_never_syncs_on_cuda():
    eng = build_engine("convnext_atto", 3, device="cuda", speed=FAST_SPEED, recipe=RECIPE, lr=1e-3)
    images, labels = (t.cuda() for t in batch(n=8))
    for _ in range(3):  # compile and warm up first
        eng.train_step(images.clone(), labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss = eng.train_step(images.clone(), labels)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_compiled_step_one_static_graph_per_size_and_saves_plain_names():
    """The suite's one torch.compile test on CPU: one static graph per image size (a progressive schedule's
    sizes), never a dynamic one, no recompile on returning to a size; the raw module is checkpointed.

    A tiny conv net instead of ConvNeXt keeps inductor's C++ codegen to seconds on a 2-core CI machine (atto
    takes minutes); the engine code path is the same.
    """
    import torch._dynamo
    from torch import nn

    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3)).to(memory_format=torch.channels_last)
    speed = dataclasses.replace(CPU_FAST, compile=True)
    eng = build_engine("tiny", 3, device="cpu", speed=speed, recipe=RecipeConfig(mixup=0.8, smoothing=0.1),
                       lr=1e-3, model=model, num_sizes=2)
    assert eng.train_module is not eng.model and hasattr(eng.train_module, "_orig_mod")
    before = eng.model[0].weight.detach().clone()
    losses = [eng.train_step(*batch(seed=s, size=32)) for s in range(2)]
    assert eng.compiled_graphs == 1
    losses += [eng.train_step(*batch(seed=s, size=48)) for s in range(2)]
    assert eng.compiled_graphs == 2  # the second size: one more graph
    with torch._dynamo.config.patch(error_on_recompile=True):  # both sizes are cached now
        losses += [eng.train_step(*batch(seed=9, size=32)), eng.train_step(*batch(seed=9, size=48))]
    assert eng.compiled_graphs == 2
    # Static, not dynamic: a third size compiles a third graph (automatic dynamic shapes would have made the
    # second graph dynamic and reused it here).
    eng.train_step(*batch(size=40))
    assert eng.compiled_graphs == 3
    assert all(torch.isfinite(x) for x in losses)
    assert not torch.equal(eng.model[0].weight, before)  # the compiled module trains the raw one's parameters
    assert list(eng.state_dict()["model"]) == list(model.state_dict())  # plain names, no _orig_mod.
    assert eng.eval_logits(batch(n=3)[0]).shape == (3, 3)  # eval: raw module, any batch size
    assert build_engine("tiny", 3, device="cpu", speed=CPU_FAST, model=model).compiled_graphs is None  # eager
