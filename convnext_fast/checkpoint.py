"""Checkpoints and exported weights: atomic writes, ``weights_only`` loads, exact-resume RNG state.

A checkpoint (``checkpoints/last.pt``, ``best.pt``) is a dict of tensors and plain Python types only, so it loads
with ``torch.load(weights_only=True)`` (no arbitrary code runs when a file from elsewhere is opened)::

    {"format": 1, "meta": {...}, "engine": Engine.state_dict(), "loop": {epoch, batch_in_epoch, ...},
     "rng": rng_state()}

``meta`` describes the model so ``eval`` can rebuild it without the run directory: model name, number of classes,
class names, image size, crop_pct, and the resolved config. ``model.safetensors`` holds plain module names
(no ``_orig_mod.``/``module.`` prefix) with the same description in its string metadata.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 1
META_KEYS = ("model_name", "num_classes", "classes", "img_size", "crop_pct")
# Read from an export when present (inference uses ImageNet's otherwise, as training's loaders do); not written yet.
OPTIONAL_META_KEYS = ("mean", "std")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Writes:
    """A file object that remembers the OSError its ``write`` raised: ``torch.save`` turns a failed write (a full
    disk) into an opaque "unexpected pos" RuntimeError, and the caller should see ENOSPC and the path."""

    def __init__(self, fh) -> None:
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.fh.flush()


def _write_error(err: OSError, path: Path) -> OSError:
    return OSError(err.errno, err.strerror or str(err), str(path))


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file beside ``path``, fsync, then ``os.replace``: a crash (``kill -9`` included)
    leaves the old file. A failed write (ENOSPC) is an OSError naming ``path``; the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            writes = _Writes(fh)
            try:
                torch.save(obj, writes)
                fh.flush()
                os.fsync(fh.fileno())
            except (OSError, RuntimeError) as e:
                err = writes.error or (e if isinstance(e, OSError) else None)
                if err is None:
                    raise
                raise _write_error(err, path) from None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a missing or foreign file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, or pickled objects that weights_only refuses
        raise ValueError(f"{path}: not a readable convnext-fast checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "engine" not in ckpt:
        raise ValueError(f"{path}: not a convnext-fast checkpoint (format {FORMAT})")
    return ckpt


# --- RNG state: every generator the loop draws from, as tensors and plain types ----------------------------------

def rng_state() -> dict[str, Any]:
    """Python, numpy (global), torch CPU and CUDA generator states."""
    key, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": key, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` output (CUDA states only when the device count matches)."""
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def gather_rng_states() -> list:
    """Every rank's :func:`rng_state`, indexed by rank (a collective under DDP: every rank must call it)."""
    from convnext_fast.distributed import all_gather_object

    return all_gather_object(rng_state())


def atomic_link(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """``dst`` := ``src`` atomically, as a hard link (no second write of the same bytes; a later atomic
    replacement of ``src`` leaves ``dst`` alone), or as a copy where links are not supported."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:  # rename() between two links of one file does nothing and leaves `tmp`
        tmp.unlink(missing_ok=True)
    _fsync_dir(dst.parent)
    return dst


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# --- exported weights --------------------------------------------------------------------------------------------

def export_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``state_dict`` (plain names) to ``path`` atomically, with ``meta`` as JSON strings in the header."""
    path = Path(path)
    bad = [k for k in state_dict if k.startswith(("_orig_mod.", "module."))]
    assert not bad, f"wrapped module names in an export: {bad[:3]}"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    from safetensors.torch import save

    # Serialized in memory (the size of the weights) and written here, so a full disk is an OSError naming the path.
    data = save(tensors, metadata={k: json.dumps(v) for k, v in meta.items()})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            try:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            except OSError as e:
                raise _write_error(e, path) from None
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and model description from a checkpoint ``.pt`` or a ``.safetensors`` export.

    A checkpoint gives its EMA weights when it has them (what the run selects and exports), else the model's.
    For a ``.safetensors`` file without ``classes`` in its metadata, ``classes.json`` beside it is read.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                raw_meta = fh.metadata() or {}
                weights = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        meta = {k: json.loads(v) for k, v in raw_meta.items() if k in META_KEYS + OPTIONAL_META_KEYS}
        classes_json = path.with_name("classes.json")
        if "classes" not in meta and classes_json.is_file():
            meta["classes"] = json.loads(classes_json.read_text())
    else:
        ckpt = load_checkpoint(path)
        engine = ckpt["engine"]
        weights = engine["ema"] if engine.get("ema") is not None else engine["model"]
        meta = dict(ckpt["meta"])
    missing = [k for k in ("model_name", "classes", "img_size") if k not in meta]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} recorded with the weights (and no classes.json beside it)")
    return weights, meta


# --- the data a checkpoint was trained on ------------------------------------------------------------------------

def data_fingerprint(index, bad: set[str] | frozenset = frozenset()) -> dict[str, Any]:
    """What identifies a sample list for an exact resume: classes, images per class, a hash of (class, relative
    path) in order, and each file's size (-1 for files in `bad`, which a loader replaces: their size may change)."""
    import hashlib

    h = hashlib.sha256()
    sizes = []
    for path, target in index.samples:
        h.update(f"{target}\t{os.path.relpath(path, index.root)}\n".encode())
        try:
            sizes.append(-1 if path in bad else os.path.getsize(path))
        except OSError:
            sizes.append(-1)
    counts = np.bincount(np.asarray(index.targets, np.int64), minlength=len(index.classes))
    return {"classes": list(index.classes), "counts": [int(c) for c in counts], "paths_sha256": h.hexdigest(),
            "sizes": torch.tensor(sizes, dtype=torch.int64)}


def fingerprint_changes(saved: dict[str, Any], now: dict[str, Any], paths: list[str], limit: int = 5) -> list[str]:
    """How the sample list `now` (of files `paths`) differs from `saved`, one phrase per change; [] if it does not."""
    if saved["classes"] != now["classes"]:
        gone = sorted(set(saved["classes"]) - set(now["classes"]))
        new = sorted(set(now["classes"]) - set(saved["classes"]))
        return [f"classes changed (removed: {gone[:limit]}, added: {new[:limit]})"]
    changes = [f"class {c!r}: {a} -> {b} images ({b - a:+d})"
               for c, a, b in zip(now["classes"], saved["counts"], now["counts"]) if a != b]
    if not changes and saved["paths_sha256"] != now["paths_sha256"]:
        changes.append("the same number of images per class, but files were renamed, moved or replaced")
    if not changes:
        a, b = saved["sizes"], now["sizes"]
        differ = ((a != b) & (a >= 0) & (b >= 0)).nonzero().flatten().tolist()
        if differ:
            named = ", ".join(paths[i] for i in differ[:limit])
            changes.append(f"{len(differ)} file(s) changed size (e.g. {named})")
    return changes
