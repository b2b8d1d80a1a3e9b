"""The command line both examples' `demos` modules share: write the SFT demonstrations or the
held-out split as JSONL (`python -m examples.<name>.demos demos|eval [--n] [--seed] [--out]`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

Rows = list[dict[str, Any]]


def write_split(
    argv: list[str] | None,
    description: str,
    demonstrations: Callable[[int, int], Rows],
    eval_rows: Callable[[int, int], Rows],
    eval_seed: int,
    eval_n: int,
) -> None:
    """Parse `argv` and write the chosen split: 2000 demonstrations of seed 1, or `eval_n`
    held-out rows of `eval_seed`, unless --n / --seed say otherwise."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("what", choices=["demos", "eval"])
    parser.add_argument("--n", type=int, default=None, help=f"rows (default: 2000 demos, {eval_n} eval)")
    parser.add_argument("--seed", type=int, default=None, help=f"default: 1 for demos, {eval_seed} for eval")
    parser.add_argument("--out", type=Path, default=None, help="default: stdout")
    args = parser.parse_args(argv)
    if args.what == "demos":
        rows = demonstrations(2000 if args.n is None else args.n, 1 if args.seed is None else args.seed)
    else:
        rows = eval_rows(eval_n if args.n is None else args.n, eval_seed if args.seed is None else args.seed)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
