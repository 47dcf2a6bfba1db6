"""Procedural demo dataset: a small image folder that a ConvNeXt learns in minutes on a CPU.

Each class is a pair of colours, e.g. ``red_blue``: every image shows two objects, one in each colour of its
class, on a textured, desaturated background. Each colour appears in six of the 21 classes, so the model must
find both colours; the objects' shapes (circle, star, cross, ...), sizes, positions and rotations are random
nuisances, with hue/brightness jitter, grey distractor strokes, blur and noise on top.

Why colour pairs and not shapes: a from-scratch ConvNeXt-atto on two CPU cores gets ~1.3k optimizer steps
(batch 32, 48 px) in the demo's five minutes, and in that budget it learns colour but not shape or texture
(measured at 48-64 px: three shapes stayed near 60% and three fill patterns near 50%, chance 33%, while a
small BatchNorm CNN learned the patterns in a few epochs). Colour pairs keep the task learnable in budget yet
not trivial: about 17% after the first epoch, above 90% after about seven.

Nothing is downloaded. Output is byte-for-byte reproducible: every image draws from its own RNG seeded by
``(seed, split, class, index)``, JPEGs are written with a fixed quality and no metadata, and the file names
are fixed. ``python -m convnext_fast demo-data OUT`` writes ``OUT/train/<class>/*.jpg`` and
``OUT/val/<class>/*.jpg`` (plus ``OUT/demo.json`` describing the parameters).
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Bump when the drawing changes, so cached datasets built by an older generator are not reused.
GENERATOR_VERSION = 2
JPEG_QUALITY = 90
# Hue centres about 50 degrees apart; the per-image jitter (+-8 degrees) keeps neighbours apart.
COLOURS = {"red": 0.0, "yellow": 55.0, "green": 110.0, "teal": 165.0, "blue": 220.0, "purple": 270.0,
           "pink": 320.0}
PAIRS = tuple(itertools.combinations(COLOURS, 2))  # the classes: 21 unordered pairs of distinct colours
SHAPES = ("circle", "ring", "crescent", "square", "triangle", "star", "cross")  # nuisance, not the class
MAX_CLASSES = len(PAIRS)
DEFAULT_NUM_CLASSES = 21
DEFAULT_TRAIN_PER_CLASS = 200
DEFAULT_VAL_PER_CLASS = 30
DEFAULT_SIZE = 128
_SPLITS = {"train": 0, "val": 1}
_SUPERSAMPLE = 2  # masks are drawn at 2x and downsampled, for anti-aliased edges


def class_names(num_classes: int = DEFAULT_NUM_CLASSES) -> list[str]:
    """The first ``num_classes`` class names: ``red_yellow``, ``red_green``, ..., ``purple_pink``."""
    _check_range("num_classes", num_classes, 2, MAX_CLASSES)
    return [f"{a}_{b}" for a, b in PAIRS[:num_classes]]


def _check_range(name: str, value: int, lo: int, hi: int | None = None) -> None:
    if not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"demo dataset: {name} must be an integer {bound}, got {value!r}")


def _shape_mask(shape: str, rng: np.random.Generator, canvas: int, r: float, cx: float, cy: float) -> Image.Image:
    """An 'L' mask (255 inside) of one shape of radius ``r`` centred at (cx, cy), randomly rotated."""
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    theta = rng.uniform(0, 2 * np.pi)

    def poly(radii: np.ndarray, angles: np.ndarray) -> list[tuple[float, float]]:
        a = angles + theta
        return list(zip((cx + radii * np.cos(a)).tolist(), (cy + radii * np.sin(a)).tolist()))

    def ellipse(x: float, y: float, rad: float, fill: int) -> None:
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fill)

    if shape == "circle":
        ellipse(cx, cy, r, 255)
    elif shape == "ring":
        ellipse(cx, cy, r, 255)
        ellipse(cx, cy, r * rng.uniform(0.45, 0.62), 0)
    elif shape == "crescent":
        ellipse(cx, cy, r, 255)
        off = r * rng.uniform(0.45, 0.6)
        ellipse(cx + off * np.cos(theta), cy + off * np.sin(theta), r * 0.9, 0)
    elif shape in ("square", "triangle"):
        n = 4 if shape == "square" else 3
        draw.polygon(poly(np.full(n, r), np.arange(n) * 2 * np.pi / n), fill=255)
    elif shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.5))
        draw.polygon(poly(radii, np.arange(10) * np.pi / 5), fill=255)
    elif shape == "cross":
        w = rng.uniform(0.28, 0.38)  # half-width of the arms relative to r
        pts = np.array([(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
                        (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)])
        draw.polygon(poly(r * np.hypot(pts[:, 0], pts[:, 1]), np.arctan2(pts[:, 1], pts[:, 0])), fill=255)
    else:  # pragma: no cover - SHAPES is closed
        raise AssertionError(shape)
    return mask


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A [size, size] field in about [-1, 1] that varies smoothly over ``cells`` cells."""
    coarse = Image.fromarray(rng.integers(0, 256, (cells, cells), dtype=np.uint8), mode="L")
    return np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0


def _rgb(hue_deg: float, sat: float, val: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue_deg % 360) / 360.0, sat, val), dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Desaturated base colour + linear gradient + blotchy texture, float32 [size, size, 3]."""
    base = _rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.25), rng.uniform(0.25, 0.9))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(0, 80)
    texture = _smooth_noise(rng, size, int(rng.integers(4, 17)))[..., None] * rng.uniform(5, 35)
    return base + grad + texture


def _placements(rng: np.random.Generator, canvas: int) -> list[tuple[float, float, float]]:
    """(radius, cx, cy) of the two objects: inside the central area, overlapping at most a little."""
    for _ in range(20):
        out = []
        for _ in range(2):
            r = canvas * rng.uniform(0.12, 0.24)
            # Centres in the middle 60%: an eval center crop or a moderate random crop keeps both objects.
            cx, cy = rng.uniform(0.2 * canvas, 0.8 * canvas, size=2)
            out.append((r, cx, cy))
        (r1, x1, y1), (r2, x2, y2) = out
        if np.hypot(x1 - x2, y1 - y2) > 0.8 * (r1 + r2):
            return out
    return out  # rare: accept an overlap (the top object still shows its colour)


def _draw_image(hues: tuple[float, float], rng: np.random.Generator, size: int) -> Image.Image:
    img = _background(rng, size)
    canvas = size * _SUPERSAMPLE
    # Distractors: grey strokes (no hue, so they never look like another class's colour).
    strokes = Image.new("L", (canvas, canvas), 0)
    sdraw = ImageDraw.Draw(strokes)
    for _ in range(int(rng.integers(0, 4))):
        x0, y0, x1, y1 = rng.uniform(0, canvas, size=4).tolist()
        sdraw.line([x0, y0, x1, y1], fill=255, width=int(rng.integers(2, 3 * _SUPERSAMPLE + 1)))
    smask = np.asarray(strokes.resize((size, size), Image.BOX), dtype=np.float32)[..., None] / 255.0
    img = img * (1 - smask) + smask * rng.uniform(20, 235)

    order = rng.permutation(2)  # which colour is drawn on top when the objects overlap
    for (r, cx, cy), hue in zip(_placements(rng, canvas), (hues[order[0]], hues[order[1]])):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        mask = np.asarray(_shape_mask(shape, rng, canvas, r, cx, cy).resize((size, size), Image.BOX),
                          dtype=np.float32)[..., None] / 255.0
        colour = _rgb(hue + rng.uniform(-8, 8), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
        shading = 1.0 + 0.15 * _smooth_noise(rng, size, int(rng.integers(2, 6)))[..., None]
        img = img * (1 - mask) + mask * colour * shading

    img = img + rng.normal(0.0, rng.uniform(2, 14), size=img.shape).astype(np.float32)
    out = Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), mode="RGB")
    blur = rng.uniform(0, 1.2)
    return out.filter(ImageFilter.GaussianBlur(blur)) if blur > 0.3 else out


def _write_split(root: Path, split: str, names: list[str], per_class: int, size: int, seed: int) -> None:
    for k, name in enumerate(names):
        hues = (COLOURS[PAIRS[k][0]], COLOURS[PAIRS[k][1]])
        cls_dir = root / split / name
        cls_dir.mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, _SPLITS[split], k, i])
            img = _draw_image(hues, rng, size)
            # Fixed quality, no EXIF/ICC, no optimize pass: the bytes depend only on the pixels.
            img.save(cls_dir / f"{name}_{i:04d}.jpg", format="JPEG", quality=JPEG_QUALITY)


def _params(num_classes: int, train_per_class: int, val_per_class: int, size: int, seed: int) -> dict:
    _check_range("num_classes", num_classes, 2, MAX_CLASSES)
    _check_range("train_per_class", train_per_class, 1)
    _check_range("val_per_class", val_per_class, 1)
    _check_range("size", size, 16, 4096)
    _check_range("seed", seed, 0)
    return {"generator_version": GENERATOR_VERSION, "num_classes": num_classes,
            "train_per_class": train_per_class, "val_per_class": val_per_class, "size": size, "seed": seed}


def _build_into(tmp: Path, params: dict) -> None:
    names = class_names(params["num_classes"])
    for split in ("train", "val"):
        _write_split(tmp, split, names, params[f"{split}_per_class"], params["size"], params["seed"])
    (tmp / "demo.json").write_text(json.dumps({**params, "classes": names}, indent=2) + "\n")


def make_demo_dataset(out: str | os.PathLike, *, num_classes: int = DEFAULT_NUM_CLASSES,
                      train_per_class: int = DEFAULT_TRAIN_PER_CLASS,
                      val_per_class: int = DEFAULT_VAL_PER_CLASS, size: int = DEFAULT_SIZE,
                      seed: int = 0) -> Path:
    """Write the demo dataset to ``out`` (``out/train/<class>/*.jpg``, ``out/val/...``) and return ``out``.

    ``out`` must not exist or be an empty directory (ValueError otherwise). The files are built in a
    temporary sibling directory and renamed into place, so ``out`` appears complete or not at all.
    """
    params = _params(num_classes, train_per_class, val_per_class, size, seed)
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output path {out} already exists and is not an empty directory; "
                         "remove it or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _build_into(tmp, params)
        os.replace(tmp, out)  # atomic; replaces an empty directory on POSIX
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_cache_dir() -> Path:
    """``$CONVNEXT_FAST_CACHE`` if set, else ``~/.cache/convnext_fast``."""
    env = os.environ.get("CONVNEXT_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "convnext_fast"


def ensure_demo_dataset(cache_dir: str | os.PathLike | None = None, *,
                        num_classes: int = DEFAULT_NUM_CLASSES,
                        train_per_class: int = DEFAULT_TRAIN_PER_CLASS,
                        val_per_class: int = DEFAULT_VAL_PER_CLASS, size: int = DEFAULT_SIZE,
                        seed: int = 0) -> Path:
    """Return ``<cache_dir>/demo-<hash of the parameters>``, building it on first use.

    A dataset only becomes visible under its final name once it is complete (atomic rename), so an
    interrupted build is rebuilt next time rather than reused. Concurrent callers may both build; the
    first rename wins and the loser's copy (identical bytes) is discarded.
    """
    params = _params(num_classes, train_per_class, val_per_class, size, seed)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    final = base.absolute() / f"demo-{digest}"
    if (final / "demo.json").is_file():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".demo-{digest}.tmp-", dir=base))
    try:
        _build_into(tmp, params)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "demo.json").is_file():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``convnext-fast demo-data``."""
    parser.add_argument("out", type=Path, help="output folder (must not exist, or be empty)")
    parser.add_argument("--num-classes", type=int, default=DEFAULT_NUM_CLASSES,
                        help=f"number of classes, 2..{MAX_CLASSES} (default {DEFAULT_NUM_CLASSES})")
    parser.add_argument("--train-per-class", type=int, default=DEFAULT_TRAIN_PER_CLASS,
                        help=f"training images per class (default {DEFAULT_TRAIN_PER_CLASS})")
    parser.add_argument("--val-per-class", type=int, default=DEFAULT_VAL_PER_CLASS,
                        help=f"validation images per class (default {DEFAULT_VAL_PER_CLASS})")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"image side in pixels (default {DEFAULT_SIZE})")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")


def run(args: argparse.Namespace) -> int:
    """Write the dataset and print where it went; ValueError on bad arguments or an occupied path."""
    out = make_demo_dataset(args.out, num_classes=args.num_classes, train_per_class=args.train_per_class,
                            val_per_class=args.val_per_class, size=args.size, seed=args.seed)
    n_train, n_val = args.num_classes * args.train_per_class, args.num_classes * args.val_per_class
    print(f"wrote {n_train} train + {n_val} val images in {args.num_classes} classes to {out}")
    return 0
