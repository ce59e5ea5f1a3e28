"""The muP coordinate check: `python plots/coord_check.py [--widths ...] [--steps N] [--seeds N]
[--grow heads|head_dim] [--override KEY=VALUE ...] [--out DIR]` (also under torchrun: FSDP over the ranks). Writes
plots/coord_check.png and .json (or into --out); exits 1 if a verdict fails. `python plots/coord_check.py --replot
plots/coord_check.json` only redraws the figure from the saved verdict."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, when run as a script

from trainer.research.coordcheck import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
