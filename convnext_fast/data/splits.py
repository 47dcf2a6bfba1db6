"""Where training and validation images come from: DATA/train + DATA/val, a seeded stratified split of one
class-folder tree, or the built-in demo dataset. Takes the data section of the config only."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from convnext_fast.data.index import ImageIndex, scan_folder, stratified_split
from convnext_fast.distributed import print0

if TYPE_CHECKING:
    from convnext_fast.config import DataConfig


def resolve_train_val(d: DataConfig, *, seed: int, keep_bad_train: bool = False) -> tuple[ImageIndex, ImageIndex]:
    """(train, val) image indexes: DATA/train + DATA/val, or DATA split with --val-split (seeded), or the demo
    dataset when DATA is None. Preflight runs on both; user errors are ValueErrors naming DATA or the flag.
    keep_bad_train (with --skip-bad-files): the train index keeps its bad files in place (listed in `skipped`)
    for a loader that replaces them, so its positions do not depend on which files are bad; val drops them."""
    path = d.path
    if path is None:
        from convnext_fast.data.demo import default_cache_dir, ensure_demo_dataset

        print0(f"no DATA given: the demo dataset (built once, cached under {default_cache_dir()})", flush=True)
        path = str(ensure_demo_dataset())
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"DATA {root}: no such directory")
    if (root / "train").is_dir():
        if d.val_split is not None:
            raise ValueError(f"DATA {root} has train/ (and val/); --val-split applies to a folder of classes only")
        if not (root / "val").is_dir():
            raise ValueError(f"DATA {root} has train/ but no val/ folder (or pass the class folders with --val-split)")
        train_index = _scan(root / "train", d, keep_bad_train)
        val_index = _scan(root / "val", d)
        if val_index.classes != train_index.classes:
            only_train = sorted(set(train_index.classes) - set(val_index.classes))
            only_val = sorted(set(val_index.classes) - set(train_index.classes))
            raise ValueError(f"DATA {root}: train/ and val/ have different classes (only in train: {only_train[:5]}, "
                             f"only in val: {only_val[:5]})")
        return train_index, val_index
    if d.val_split is None:
        if not any(p.is_dir() for p in root.iterdir()):
            scan_folder(root)  # raises its "no class folders" DatasetError
        raise ValueError(f"DATA {root} has no train/ and val/ folders; pass --val-split FRACTION to hold out part "
                         f"of each class folder for validation")
    train_index, val_index = stratified_split(_scan(root, d, keep_bad_train), d.val_split, seed=seed)
    bad = set(val_index.skipped)
    return train_index, val_index.subset([i for i, (p, _) in enumerate(val_index.samples) if p not in bad])


def _scan(folder: Path, d: DataConfig, keep_bad: bool = False) -> ImageIndex:
    """Index + preflight of one class-folder tree; says how many bad files --skip-bad-files left out."""
    index = scan_folder(folder, skip_bad=d.skip_bad, verify_images=d.verify_images, keep_bad=keep_bad)
    if index.skipped:
        print0(f"{folder}: skipped {len(index.skipped)} bad image file(s) (--skip-bad-files), e.g. "
               f"{index.skipped[0]}", flush=True)
    return index
