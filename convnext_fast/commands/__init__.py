"""Sub-commands of the `convnext-fast` CLI: each module exposes `add_arguments(parser)` and `run(args) -> int`."""
