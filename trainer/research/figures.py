"""What the research scripts share on their command lines: redrawing a figure from its saved verdict."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def add_replot(parser: argparse.ArgumentParser, saved: str) -> None:
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help=f"only redraw the figure (next to JSON) from a saved verdict ({saved}); no training")


def replotted(args: argparse.Namespace, replot: Callable[[Path, Path], Path]) -> bool:
    """With --replot: redraw the figure next to the saved verdict, say where, and True (nothing else to do)."""
    if not args.replot:
        return False
    print(f"wrote {replot(args.replot, args.replot.with_suffix('.png'))}")
    return True
