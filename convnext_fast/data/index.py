"""Image-folder index and preflight: the file list and classes every backend reads, checked before any training.

The index reproduces `torchvision.datasets.ImageFolder` exactly (same extensions, same class sort, same sample
order), so a model trained here and a user's torchvision code agree on what label 7 means. Preflight catches the
bad files that would otherwise crash a run hours in: cheap checks (size, magic bytes, JPEG end marker, a parsed
header: `headers.py`) always run; a full decode check runs on request (`verify_images=True`) and is remembered per
file (`verified.py`), so a later run decodes only what changed.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively as ImageFolder does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_LISTED = 20

# Leading bytes of the formats above. The format is judged by content (a PNG named .jpg still decodes), so a file
# passes if it starts like any known image format.
_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"P1", "pnm"), (b"P2", "pnm"), (b"P3", "pnm"), (b"P4", "pnm"), (b"P5", "pnm"), (b"P6", "pnm"),
)


class DatasetError(ValueError):
    """A problem with the user's data (layout, bad files). The message names the offending paths."""


def format_paths(problems: Sequence[str], limit: int = MAX_LISTED) -> str:
    """`limit` entries, one per line, then how many more were left out."""
    lines = [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more ({len(problems)} in all)")
    return "\n".join(lines)


@dataclass(frozen=True)
class ImageIndex:
    """The samples of an image folder, in `ImageFolder` order, with its classes."""

    root: Path
    classes: list[str]
    class_to_idx: dict[str, int]
    samples: list[tuple[str, int]]  # (absolute path, class index)
    skipped: list[str] = field(default_factory=list)  # bad files excluded by skip_bad=True

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, positions: Sequence[int] | np.ndarray) -> "ImageIndex":
        """The samples at `positions` (in that order); classes unchanged."""
        samples = [self.samples[int(i)] for i in positions]
        return ImageIndex(self.root, list(self.classes), dict(self.class_to_idx), samples, list(self.skipped))


def find_classes(root: Path) -> tuple[list[str], dict[str, int]]:
    """Class folders exactly as `torchvision.datasets.folder.find_classes`: sorted names of sub-directories."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    return classes, {name: i for i, name in enumerate(classes)}


def _list_samples(root: Path, class_to_idx: dict[str, int]) -> tuple[list[tuple[str, int]], list[str]]:
    """ImageFolder's `make_dataset` walk; also returns the class folders that hold no image file."""
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for target_class in sorted(class_to_idx):
        class_index = class_to_idx[target_class]
        target_dir = os.path.join(root, target_class)
        before = len(samples)
        for dirpath, _, fnames in sorted(os.walk(target_dir, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.abspath(os.path.join(dirpath, fname)), class_index))
        if len(samples) == before:
            empty.append(target_dir)
    return samples, empty


def cheap_check(path: str) -> str | None:
    """None if the file looks like a whole image, else why not. Reads at most 1 KiB from each end."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "zero-byte file"
        with open(path, "rb") as f:
            head = f.read(16)
            kind = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
            if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                kind = "webp"
            if kind is None:
                return f"not an image (starts with {head[:8]!r})"
            if kind == "jpeg":
                # Entropy-coded data can't contain FF D9 (FF is byte-stuffed), so a JPEG whose tail lacks the
                # end-of-image marker was cut short. Looking 1 KiB back tolerates trailing padding.
                f.seek(max(0, size - 1024))
                if b"\xff\xd9" not in f.read():
                    return "truncated JPEG (no end-of-image marker)"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return None


def decode_check(path: str) -> str | None:
    """None if PIL decodes the whole file, else the decoder's complaint."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.width < 1 or im.height < 1:
                return "image has zero size"
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return f"cannot decode ({type(e).__name__}: {e})"
    return None


def _check_all(check, paths: list[str]) -> dict[str, str]:
    workers = min(16, (os.cpu_count() or 1) * 4)  # I/O bound; PIL's header parse and decode release the GIL
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(check, paths, chunksize=256))
    return {p: r for p, r in zip(paths, reasons) if r is not None}


def _find_bad(root: Path, paths: list[str], verify_images: bool) -> dict[str, str]:
    """Bad files and why. Every file: size, magic bytes, end marker and a parsed header. With `verify_images`, a
    full decode of the files the verification record does not already hold unchanged."""
    from convnext_fast.data.headers import header_check

    bad = _check_all(lambda p: cheap_check(p) or header_check(p), paths)
    if not verify_images:
        return bad
    from convnext_fast.data.verified import VerificationRecord

    record = VerificationRecord(root)
    todo, keys = record.unchanged([p for p in paths if p not in bad])
    bad.update(_check_all(decode_check, todo))
    record.update([p for p in paths if p not in bad], keys)
    return bad


def scan_folder(root: str | os.PathLike, *, skip_bad: bool = False, verify_images: bool = False,
                keep_bad: bool = False, allow_empty: bool = False) -> ImageIndex:
    """Index `root` (one sub-folder per class) and preflight it.

    Raises DatasetError for: a missing root, no class folders, a single class, empty class folders, and bad
    files (zero bytes, not an image, truncated, a header that does not parse; undecodable with `verify_images`).
    With `skip_bad`, bad files are excluded and listed in `ImageIndex.skipped` instead; with `keep_bad` too, they
    stay in `samples` (listed in `skipped`) for a loader that replaces them (positions independent of which
    files are bad: the trainer's exact resume). `allow_empty` (as ImageFolder's) keeps empty class folders as
    classes without images (evaluation: a class may have no validation images).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory (expected one sub-folder per class)")
    classes, class_to_idx = find_classes(root)
    if not classes:
        raise DatasetError(f"{root}: no class folders found (expected {root}/<class>/<image>.jpg)")
    samples, empty = _list_samples(root, class_to_idx)
    if empty and not allow_empty:
        raise DatasetError(
            f"{root}: {len(empty)} class folder(s) hold no image file ({', '.join(IMG_EXTENSIONS)}):\n"
            + format_paths(empty)
        )
    bad = _find_bad(root, [p for p, _ in samples], verify_images)
    skipped: list[str] = []
    if bad:
        listed = [f"{p}: {why}" for p, why in bad.items()]
        if not skip_bad:
            raise DatasetError(
                f"{root}: {len(bad)} bad image file(s) (pass --skip-bad-files to leave them out):\n"
                + format_paths(listed)
            )
        skipped = sorted(bad)
        counts = Counter(t for p, t in samples if p not in bad)
        had = Counter(t for _, t in samples)  # an allowed empty class folder was not emptied by skipping
        emptied = [str(root / c) for c, i in class_to_idx.items() if counts[i] == 0 and had[i] > 0]
        if emptied:
            raise DatasetError(f"{root}: no good image left in class folder(s) after skipping bad files:\n"
                               + format_paths(emptied))
        if not keep_bad:
            samples = [s for s in samples if s[0] not in bad]
    if len(classes) < 2:
        raise DatasetError(f"{root}: only one class folder ({classes[0]!r}); a classifier needs at least two")
    return ImageIndex(root.resolve(), classes, class_to_idx, samples, skipped)


def stratified_split(index: ImageIndex, val_fraction: float, seed: int = 0) -> tuple[ImageIndex, ImageIndex]:
    """Split into (train, val) keeping each class's share; seeded; every class keeps >= 1 train and val sample."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-split must be between 0 and 1 (exclusive), got {val_fraction}")
    rng = np.random.default_rng(seed)
    targets = np.asarray(index.targets)
    train_pos, val_pos = [], []
    for c in range(index.num_classes):
        pos = np.flatnonzero(targets == c)
        if len(pos) < 2:
            raise DatasetError(f"class {index.classes[c]!r} has {len(pos)} image(s); --val-split needs >= 2 per class")
        pos = rng.permutation(pos)
        n_val = min(len(pos) - 1, max(1, round(val_fraction * len(pos))))
        val_pos.append(pos[:n_val])
        train_pos.append(pos[n_val:])
    return index.subset(np.sort(np.concatenate(train_pos))), index.subset(np.sort(np.concatenate(val_pos)))


def epoch_indices(n: int, *, train: bool, batch_size: int, seed: int = 0, epoch: int = 0, shard_id: int = 0,
                  num_shards: int = 1) -> np.ndarray:
    """Positions into the index for this shard and epoch: a pure function of its arguments.

    train: one global permutation from (seed, epoch), dealt round-robin to shards; each shard keeps the same
    number of samples, a multiple of `batch_size`, so every rank runs the same number of steps (static shapes,
    no rank waiting at the end of an epoch). The few samples dropped change with the epoch.
    eval: no shuffle; contiguous blocks, every sample exactly once across shards (shards may differ by one).
    """
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if not train:
        return np.array_split(np.arange(n, dtype=np.int64), num_shards)[shard_id]
    per_shard = (n // num_shards) // batch_size * batch_size
    if per_shard == 0:
        raise DatasetError(
            f"{n} training images are too few for batch size {batch_size} on {num_shards} shard(s): "
            f"need at least {batch_size * num_shards}; lower --batch-size"
        )
    perm = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)
    return perm[shard_id::num_shards][:per_shard]
