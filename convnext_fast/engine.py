"""The training step and the evaluation forward pass, with every speed feature switchable.

``build_engine`` returns an :class:`Engine` that the train loop, the eval command and the benchmark all use.
The benchmark times ``train_step`` on synthetic tensors with the baseline settings (``BASELINE_SPEED``: eager,
fp32, NCHW, foreach AdamW, timm's Mixup as timm's train.py calls it, per-tensor EMA) against the fast ones
(``FAST_SPEED``: ``torch.compile``, bf16 autocast, channels-last, fused AdamW,
:class:`~convnext_fast.mixup.DeviceMixup`, foreach EMA) and each ablation (one field flipped).

Contract of ``train_step``: it never waits for the device (no ``.item()``, no ``.cpu()``, no data-dependent
shapes), so the host queues step after step while the GPU works; it returns the loss as a device tensor that the
caller accumulates and reads once every N steps.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.utils import ModelEmaV3
from torch import nn

from convnext_fast.config import OptimConfig, RecipeConfig, SpeedConfig
from convnext_fast.evaluate import predict
from convnext_fast.losses import build_loss
from convnext_fast.mixup import DeviceMixup
from convnext_fast.model import create_model
from convnext_fast.optim import build_optimizer

__all__ = ["Engine", "SpeedConfig", "build_engine", "BASELINE_SPEED", "FAST_SPEED"]

# The user's slow loop today, and every speed feature on; the benchmark's two end points.
BASELINE_SPEED = SpeedConfig(compile=False, amp="off", channels_last=False, fused_adamw=False, device_mixup=False,
                             ema=False)
FAST_SPEED = SpeedConfig(compile=True, amp="bf16", channels_last=True, fused_adamw=True, device_mixup=True, ema=True)

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


class _TimmMixup:
    """timm's ``Mixup`` as timm's train.py uses it (lambda from numpy's global RNG), for the baseline step.

    timm asserts when both alphas are 0; then only the smoothed one-hot targets are built, as timm's loop does
    with ``LabelSmoothingCrossEntropy``.
    """

    def __init__(self, num_classes: int, recipe: RecipeConfig) -> None:
        self.num_classes, self.smoothing = num_classes, recipe.smoothing
        self.mixup = None
        if recipe.mixup > 0 or recipe.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mixup_prob,
                               switch_prob=recipe.mixup_switch_prob, mode="batch",
                               label_smoothing=recipe.smoothing, num_classes=num_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixup is not None:
            return self.mixup(images, labels)
        return images, mixup_target(labels, self.num_classes, 1.0, self.smoothing)

    def state_dict(self) -> dict[str, Any]:
        return {}  # numpy's global RNG is saved by the checkpoint with the other global generators

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class Engine:
    """Model, optimizer, loss, Mixup and EMA wired into one step. Built by :func:`build_engine`.

    ``model`` is the raw module (what checkpoints store); ``train_module`` the DDP-wrapped and/or compiled one
    that ``train_step`` calls. ``step`` counts optimizer steps (a host int, for the EMA warmup).
    """

    model: nn.Module
    train_module: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    mixup: Any  # DeviceMixup | _TimmMixup | None (None: hard labels, no smoothing)
    ema: ModelEmaV3 | None
    scaler: torch.amp.GradScaler | None
    speed: SpeedConfig
    device: torch.device
    num_classes: int
    step: int = 0
    graphs_before: int | None = None  # dynamo's graph count when the module was compiled; None = eager

    @property
    def compiled_graphs(self) -> int | None:
        """Graphs torch.compile made for this engine so far (one per distinct input shape); None when eager.

        Read from dynamo's process-wide ``unique_graphs`` counter (host-side, no sync); the train module is the
        only compiled code in a training process.
        """
        if self.graphs_before is None:
            return None
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"] - self.graphs_before

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return _AMP_DTYPES[self.speed.amp]

    def autocast(self):
        """Autocast context for forward passes (a no-op context with amp off)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch; returns the batch loss (detached, on the device, no host sync).

        Mixup mixes ``images`` in place. Set the learning rate before calling (``WarmupCosine.step``).
        """
        fmt = torch.channels_last if self.speed.channels_last else torch.contiguous_format
        images = images.contiguous(memory_format=fmt)  # no copy when the loader already gives this layout
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        with self.autocast():
            logits = self.train_module(images)
        loss = self.loss_fn(logits, targets)  # float32 math inside the loss, also under autocast
        if self.scaler is not None:
            # fp16: GradScaler. With fused AdamW the inf check runs inside the kernel; with foreach AdamW
            # GradScaler.step reads found_inf on the host (one sync per step, the price of fp16 without fusion).
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)  # decay computed from a host int: no sync
        return loss.detach()

    def eval_logits(self, images: torch.Tensor, tta: bool = False, use_ema: bool = False) -> torch.Tensor:
        """Float32 logits [B, C] in eval mode; ``tta`` averages the logits of the image and its mirror.

        Runs the raw module eagerly: the compiled graph is specialised to train mode and the static training
        batch, and eval's last partial batch would otherwise trigger a recompile.
        """
        if use_ema and self.ema is None:
            raise ValueError("use_ema=True but the engine has no EMA (--model-ema is off)")
        model = self.ema.module if use_ema else self.model
        return predict(model, images, tta=tta, amp_dtype=self.amp_dtype, channels_last=self.speed.channels_last)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs from the engine (tensors and plain types only)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "mixup": self.mixup.state_dict() if self.mixup is not None else None,
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError("the checkpoint has no EMA weights but --model-ema is on")
            self.ema.module.load_state_dict(state["ema"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.mixup is not None and state.get("mixup"):
            self.mixup.load_state_dict(state["mixup"])
        self.step = int(state["step"])


def build_engine(model_name: str, num_classes: int, *, device: torch.device | str, speed: SpeedConfig,
                 recipe: RecipeConfig | None = None, optim: OptimConfig | None = None, lr: float | None = None,
                 drop_path: float = 0.0, seed: int = 0, rank: int = 0, world_size: int = 1,
                 model: nn.Module | None = None, num_sizes: int = 1) -> Engine:
    """Create model, optimizer, loss, Mixup and EMA for ``num_classes`` on ``device``.

    ``speed`` fields left ``None`` are resolved for the device (compile, bf16 and fused AdamW on CUDA). ``lr``
    is the optimizer's initial lr (the train loop sets it every step; default ``optim.resolved_lr(4096)``).
    With ``world_size > 1`` the training module is wrapped in DDP (the process group must exist). ``seed`` fixes
    the initial weights (identical on every rank); ``rank`` offsets the Mixup draws so ranks mix differently.
    Usable with synthetic tensors and no dataset. ``num_sizes``: distinct training image sizes (a progressive
    schedule's); the compiled module gets one static graph per size.
    """
    recipe = recipe or RecipeConfig()
    optim = optim or OptimConfig()
    device = torch.device(device)
    speed = speed.resolve(device.type)
    if model is None:
        # Same initial weights on every rank, whatever each rank's RNG did before; forked so that the caller's
        # per-rank streams survive (else every rank would draw the same drop-path masks).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            model = create_model(model_name, num_classes, drop_path=drop_path, device=device,
                                 channels_last=speed.channels_last)
    train_module: nn.Module = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_module = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    graphs_before = None
    if speed.compile:
        # Compile the (DDP-wrapped) module, checkpoint the raw one. Static training shapes: one graph per size.
        # dynamic=False: by default dynamo's second shape would compile a dynamic-shape graph (slower kernels);
        # the recompile limit must admit one static graph per size.
        from torch._dynamo import config as dynamo_config
        from torch._dynamo.utils import counters

        limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
        setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), num_sizes + 1))
        graphs_before = counters["stats"]["unique_graphs"]
        train_module = torch.compile(train_module, dynamic=False)
    optimizer = build_optimizer(model, lr=lr if lr is not None else optim.resolved_lr(4096),
                                weight_decay=optim.weight_decay, betas=optim.betas, eps=optim.eps,
                                fused=speed.fused_adamw)
    mixup: Any = None
    if recipe.mixup > 0 or recipe.cutmix > 0 or recipe.smoothing > 0:
        if speed.device_mixup:
            mixup = DeviceMixup(num_classes, mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix,
                                prob=recipe.mixup_prob, switch_prob=recipe.mixup_switch_prob,
                                smoothing=recipe.smoothing, seed=[seed, rank])
        else:
            mixup = _TimmMixup(num_classes, recipe)
    ema = None
    if recipe.model_ema:
        # device=None: the EMA lives beside the model (an equal device spelt differently, "cuda" vs "cuda:0",
        # would make timm fall back to per-tensor updates).
        ema = ModelEmaV3(model, decay=recipe.model_ema_decay, use_warmup=True, foreach=speed.ema)
    scaler = torch.amp.GradScaler(device.type) if speed.amp == "fp16" else None
    return Engine(model=model, train_module=train_module, optimizer=optimizer, loss_fn=build_loss(recipe.focal_gamma),
                  mixup=mixup, ema=ema, scaler=scaler, speed=speed, device=device, num_classes=num_classes,
                  graphs_before=graphs_before)
