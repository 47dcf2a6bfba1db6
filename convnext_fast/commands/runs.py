"""`convnext-fast runs list [DIR ...]` and `convnext-fast runs compare RUN RUN [...] [--html FILE]`.

Thin: the records, the comparison and the page come from `convnext_fast.runs`.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from convnext_fast.runs.tables import SORT_KEYS

    sub = parser.add_subparsers(dest="runs_command", metavar="list|compare", required=True)
    ls = sub.add_parser("list", help="one row per run directory: started, data, model, sizes, epochs, best top-1, "
                                     "wall time, state",
                        description="One row per run directory found at or under DIR (3 levels deep: the trials of a "
                                    "tune study are runs too). States: running, finished, stopped early, "
                                    "interrupted, failed.")
    ls.add_argument("dirs", nargs="*", default=["runs"], metavar="DIR", help="run directories or folders of runs "
                                                                            "(default: runs)")
    ls.add_argument("--sort", default="started", metavar="COLUMN", help=f"{' | '.join(SORT_KEYS)} (default: started)")
    ls.add_argument("--reverse", action="store_true", help="sort descending (e.g. --sort top1 --reverse: best first)")
    ls.add_argument("--json", action="store_true", help="print the records as JSON instead of a table")
    cmp = sub.add_parser("compare", help="what differs between runs: config keys, metrics, per-class recall, curves",
                         description="The configuration keys that differ, the best and final metrics, the per-class "
                                     "recall with the largest changes first; --html adds the curves of all runs "
                                     "overlaid (by epoch and by wall time) in one self-contained page.")
    cmp.add_argument("runs", nargs="+", metavar="RUN", help="run directories (a folder of runs adds all of them)")
    cmp.add_argument("--html", default=None, metavar="FILE", help="also write the comparison page to FILE")
    cmp.add_argument("--classes", type=int, default=15, metavar="N",
                     help="per-class rows printed in the terminal (the page has all; default: 15)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from convnext_fast.runs import compare_runs, scan_runs
    from convnext_fast.runs.tables import print_comparison, runs_table, sort_runs

    console = Console(width=None if sys.stdout.isatty() else 200)  # piped: long lines, not a squeezed 80 columns
    if args.runs_command == "list":
        runs = sort_runs(scan_runs(args.dirs), args.sort, args.reverse)
        if args.json:
            print(json.dumps([r.to_dict() for r in runs], indent=2))
        elif not runs:
            print(f"no run directories under {', '.join(args.dirs)}", file=sys.stderr)
        else:
            console.print(runs_table(runs))
        return 0
    comparison = compare_runs(scan_runs(args.runs))
    print_comparison(console, comparison, top_classes=args.classes)
    if args.html:
        from convnext_fast.runs.page import write_compare_page

        print(f"page: {write_compare_page(comparison, args.html)}")
    return 0
