"""convnext_fast: fast from-scratch ConvNeXt training on image folders.

DALI pipelines decode and augment on the GPU (the same graph runs on the CPU without one) and feed a
channels-last, compiled, AMP timm ConvNeXt loop. See README.md.
"""

__version__ = "0.1.0"
