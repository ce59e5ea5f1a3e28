"""What the research scripts share: the options of a study run as a sweep (where, on what text, where its figure
goes), the corpus they train on, writing a figure, and redrawing one from its saved verdict."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.core.jobdir import CODE_DIR

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CORPUS = CODE_DIR / "data" / "lr-transfer"
"""The text the studies train on: the learning-rate transfer study's (a 4 MB demo corpus, vocabulary 512), so that
a later study runs at the learning rate that one found."""


def add_sweep_options(parser: argparse.ArgumentParser, wait: str) -> None:
    """--cluster, --executor, --wait (what `wait` says), --corpus, --out and config overrides for every run."""
    parser.add_argument("--cluster", default="local", help="cluster profile for the runs (default: local)")
    parser.add_argument("--executor", choices=("auto", "local", "slurm"), default="local")
    parser.add_argument("--wait", action="store_true", help=wait)
    parser.add_argument("--corpus", type=Path, default=CORPUS,
                        help="the text to train on (default: the learning-rate transfer study's; built from this "
                        "machine's text if missing)")
    parser.add_argument("--out", type=Path, default=CODE_DIR / "plots", help="where the figure and its verdict go")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (e.g. cluster.account=...)")


def ensure_corpus(path: Path, vocab_size: int = 512) -> Path:
    """The corpus at `path` (resolved), built from this machine's text first if it is not there."""
    if not (path / "tokenizer.json").is_file():
        from trainer.data.tools import build_demo

        build_demo(path, max_mb=4, vocab_size=vocab_size)
    return path.resolve()


def save(fig: Figure, out: Path) -> Path:
    """Write a figure as PNG and free it."""
    import matplotlib.pyplot as plt

    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def add_replot(parser: argparse.ArgumentParser, saved: str) -> None:
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help=f"only redraw the figure (next to JSON) from a saved verdict ({saved}); no training")


def replotted(args: argparse.Namespace, replot: Callable[[Path, Path], Path]) -> bool:
    """With --replot: redraw the figure next to the saved verdict, say where, and True (nothing else to do)."""
    if not args.replot:
        return False
    print(f"wrote {replot(args.replot, args.replot.with_suffix('.png'))}")
    return True
