import os

# Before torch loads OpenMP (see convnext_fast/cli.py): spinning OpenMP threads starve the loaders' threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# --verify-images records (convnext_fast/data/verified.py) go to a fresh folder, not the user's cache.
if "CONVNEXT_FAST_VERIFY_DIR" not in os.environ:
    import tempfile

    os.environ["CONVNEXT_FAST_VERIFY_DIR"] = tempfile.mkdtemp(prefix="convnext_fast_verified_")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests are CPU-only and small; two cores are shared by torch and the loaders.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
