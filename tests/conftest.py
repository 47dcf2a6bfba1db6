import os

# Before torch loads OpenMP (see convnext_fast/cli.py): spinning OpenMP threads starve the loaders' threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# --verify-images records (convnext_fast/data/verified.py) go to a fresh folder, not the user's cache.
if "CONVNEXT_FAST_VERIFY_DIR" not in os.environ:
    import tempfile

    os.environ["CONVNEXT_FAST_VERIFY_DIR"] = tempfile.mkdtemp(prefix="convnext_fast_verified_")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# Tests are CPU-only and small; two cores are shared by torch and the loaders.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def colour_folder(root: Path, classes=("red", "green"), n_train: int = 8, n_val: int = 3, size: int = 36,
                  seed: int = 0) -> Path:
    """root/{train,val}/<class>/<i>.jpg: noise with one colour channel raised per class (learnable in an epoch)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 90, (size, size, 3))
                px[..., c % 3] += 150
                Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.jpg")
    return root


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory) -> Path:
    """One small two-class folder shared by the tests that only read it (train, val: 8 and 3 per class)."""
    return colour_folder(tmp_path_factory.mktemp("colour_data"))
