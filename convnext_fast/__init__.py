"""convnext_fast: fast from-scratch ConvNeXt training on image folders.

DALI pipelines decode and augment on the GPU (the same graph runs on the CPU without one) and feed a
channels-last, compiled, AMP timm ConvNeXt loop. See README.md.

Library entry point: ``convnext_fast.train(cfg, report=callback)`` (`convnext_fast.loop.train`), imported on first
use so that ``import convnext_fast`` stays light. ``callback(row)`` gets each epoch's metrics row; returning True
stops the run at that epoch boundary and ``train`` returns the summary with ``stopped_by`` (resumable).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "train":
        from convnext_fast.loop import train
        return train
    raise AttributeError(f"module 'convnext_fast' has no attribute {name!r}")
