"""Progressive resolution: which training image size each epoch uses (the one place that computes a size).

A :class:`ResolutionSchedule` is built once from the config (``--img-size``, ``--progressive``, ``--ramp``,
``--res-step``, ``--epochs``) and validated then; the loaders read ``size(epoch)`` in ``set_epoch`` and the loop
reads it for logging and for how many graphs ``torch.compile`` makes. It is a pure function of the config, so
every DDP rank and every resumed session agrees on it.

The shape is FFCV's ``get_resolution`` (its ImageNet recipes): the start size until the ramp starts, a linear
interpolation rounded to a multiple of ``res_step`` during the ramp, the final size from the ramp's end on::

    epochs 1..START          -> start size (--progressive)
    START < epoch < END      -> interp(epoch, [START, END], [start, final]) rounded to res_step
    epochs END..E            -> final size (--img-size)

Epochs in ``--ramp`` count like metrics.jsonl's ``epoch`` (1-based); ``size(e)`` takes the 0-based index that
``set_epoch`` gets. Default ramp: FFCV's rn50 88-epoch proportions (start_ramp 65, end_ramp 76, 0-based), i.e.
``START = floor(3/4 E)``, ``END = floor(7/8 E)``: 66:77 of 88, 112:131 of 150, 6:7 of 8.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MAX_SIZES = 8  # distinct sizes per run: one compiled graph each (dynamo's default recompile limit is 8)
DEFAULT_RES_STEP = 32  # FFCV's rounding; also ConvNeXt's total stride (a whole number of final feature cells)


def default_ramp(epochs: int) -> tuple[int, int]:
    """FFCV's proportions (ramp 65 -> 76 of 88 epochs, 0-based) in 1-based epochs: 3/4 and 7/8 of the run."""
    return (3 * epochs) // 4, (7 * epochs) // 8


@dataclass(frozen=True)
class ResolutionSchedule:
    """Training image size per epoch. ``start_size=None`` is a fixed size (today's behaviour).

    Raises ValueError (naming the flag and value) for a start size above the final one, a ramp outside
    ``0 <= START <= END <= epochs``, a ``res_step`` below 1 or one that leaves more than 8 distinct sizes.
    """

    img_size: int
    epochs: int
    start_size: int | None = None
    ramp: tuple[int, int] | None = None  # None: default_ramp(epochs)
    res_step: int = DEFAULT_RES_STEP

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.res_step < 1:
            raise ValueError(f"--res-step must be >= 1, got {self.res_step}")
        if self.start_size is None:
            if self.ramp is not None:
                raise ValueError(f"--ramp {self.ramp[0]}:{self.ramp[1]} needs --progressive START_PX")
            return
        if not 8 <= self.start_size <= self.img_size:
            raise ValueError(f"--progressive {self.start_size}: the start size must be between 8 and --img-size "
                             f"{self.img_size}")
        start, end = self.resolved_ramp
        if not 0 <= start <= end <= self.epochs:
            raise ValueError(f"--ramp {start}:{end}: needs 0 <= START <= END <= --epochs {self.epochs}")
        sizes = self.sizes
        if len(sizes) > MAX_SIZES:
            raise ValueError(f"--res-step {self.res_step} leaves {len(sizes)} distinct sizes "
                             f"({', '.join(map(str, sizes))}); at most {MAX_SIZES} (one compiled graph each): "
                             f"use a larger --res-step")

    @property
    def progressive(self) -> bool:
        return self.start_size is not None and self.start_size != self.img_size

    @property
    def resolved_ramp(self) -> tuple[int, int]:
        return self.ramp if self.ramp is not None else default_ramp(self.epochs)

    def size(self, epoch: int) -> int:
        """The training size of 0-based epoch ``epoch`` (epochs past the run keep the final size)."""
        if not self.progressive:
            return self.img_size
        lo, hi = self.start_size, self.img_size
        start, end = self.resolved_ramp
        e = int(epoch) + 1  # the ramp counts epochs as metrics.jsonl does
        if e <= start:
            return lo
        if e >= end:
            return hi
        value = lo + (hi - lo) * (e - start) / (end - start)
        rounded = int(math.floor(value / self.res_step + 0.5)) * self.res_step  # half up (np.round: half to even)
        return min(hi, max(lo, rounded))

    @property
    def per_epoch(self) -> list[int]:
        return [self.size(e) for e in range(self.epochs)]

    @property
    def sizes(self) -> list[int]:
        """The distinct sizes in the order the run meets them (the ramp never shrinks)."""
        out: list[int] = []
        for s in self.per_epoch:
            if s not in out:
                out.append(s)
        return out

    def epochs_at(self, size: int) -> list[int]:
        """The 1-based epochs trained at ``size``."""
        return [e + 1 for e, s in enumerate(self.per_epoch) if s == size]

    def segments(self) -> list[tuple[int, int, int]]:
        """(size, first epoch, last epoch), 1-based, one per run of equal sizes."""
        out: list[tuple[int, int, int]] = []
        for e, s in enumerate(self.per_epoch, start=1):
            if out and out[-1][0] == s:
                out[-1] = (s, out[-1][1], e)
            else:
                out.append((s, e, e))
        return out

    def describe(self) -> str:
        """One line for the run header, e.g. ``128px epochs 1-112 | 160px 113-121 | 192px 122-150``."""
        if not self.progressive:
            return f"{self.img_size}px (fixed)"
        start, end = self.resolved_ramp
        parts = [f"{s}px epochs {a}-{b}" if a != b else f"{s}px epoch {a}" for s, a, b in self.segments()]
        return " | ".join(parts) + f" (ramp {start}:{end}, step {self.res_step})"

    def recompile_warning(self, graphs: int | None, epoch: int) -> str | None:
        """A warning when torch.compile made more graphs than the distinct sizes of epochs 0..``epoch``."""
        expected = len(set(self.per_epoch[:epoch + 1]))
        if graphs is None or graphs <= expected:
            return None
        return (f"warning: torch.compile made {graphs} graphs for {expected} training size(s) by epoch {epoch + 1}: "
                f"it recompiled (TORCH_LOGS=recompiles shows why)")

    def to_dict(self) -> dict:
        """What config.json and the checkpoint meta record: the inputs and the resolved per-epoch sizes."""
        return {"img_size": self.img_size, "start_size": self.start_size, "epochs": self.epochs,
                "ramp": list(self.resolved_ramp) if self.start_size is not None else None,
                "res_step": self.res_step, "sizes": self.sizes, "per_epoch": self.per_epoch}


def parse_ramp(flag: str, text: str) -> tuple[int, int] | None:
    """``START:END`` (1-based epochs) from the command line; ``auto`` = the default ramp (None)."""
    if text.lower() in ("auto", "none", "default"):
        return None
    try:
        start, end = (int(p) for p in text.split(":"))
    except ValueError:
        raise ValueError(f"{flag}: expected START:END epochs (e.g. 66:77) or auto, got {text!r}") from None
    return (start, end)


def check_model_sizes(schedule: ResolutionSchedule, model_name: str, flag: str = "--progressive") -> None:
    """Every size must reach the model's last stage with at least one cell: >= its total stride.

    ConvNeXt: stem stride 4 and three 2x downsamplings, so 32 px. The stride is read from timm's
    ``feature_info`` of a model built on the meta device (no memory, no weights).
    """
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(model_name, pretrained=False, num_classes=2)
    except Exception:  # a model that cannot be built on the meta device: its own forward will say what it needs
        return
    info = getattr(model, "feature_info", None)
    stride = int(info[-1]["reduction"]) if info else 1
    smallest = min(schedule.sizes)
    if smallest < stride:
        raise ValueError(f"{flag} {smallest}: {model_name} needs sizes >= {stride} px (its total stride)")


def check_resume(saved: dict | None, schedule: ResolutionSchedule, epochs_started: int, where: str) -> None:
    """A resumed run must have trained its past epochs at the sizes this schedule gives them.

    ``saved`` is the checkpoint's ``schedule`` record (None: saved before schedules were recorded, a fixed
    size). A different future (e.g. more --epochs move the ramp) is allowed; a different past is refused.
    """
    past = saved["per_epoch"][:epochs_started] if saved else [schedule.img_size] * epochs_started
    now = [schedule.size(e) for e in range(epochs_started)]
    if past != now:
        first = next(e for e, (a, b) in enumerate(zip(past, now)) if a != b)
        raise ValueError(f"--resume {where}: epoch {first + 1} was trained at {past[first]} px but this config's "
                         f"resolution schedule gives {now[first]} px ({schedule.describe()}); resume with the "
                         f"saved --img-size/--progressive/--ramp/--res-step/--epochs")
