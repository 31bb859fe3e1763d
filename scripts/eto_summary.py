"""Rebuild the summary of an ETO run folder (summary.json, summary.md, summary.png) and print its Markdown table.

    python -m scripts.eto_summary outputs/demo

The pipeline writes the same summary at the end of every run; scripts/pipeline/summary.py says what it holds
(reward and success per stage with 95% bootstrap intervals, paired differences, pair counts, costs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scripts.pipeline.summary import write_summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run folder (<save_path>/<exp_name>)")
    args = p.parse_args(argv)
    print(write_summary(args.run_dir)["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
