"""A scaling study: `python plots/scaling.py [--quick] [--widths ...] [--budgets STEPS ...] [--executor local|slurm]
[--wait]`: one WSD run per model size (muP, the transferred learning rate) with a cooldown branch at every shorter
budget, a law L(N, D) fitted to the final held-out losses, the largest size predicted, then run and judged; writes
plots/<name>.png and .json (scaling, or scaling-quick) and exits 1 if a held-out run falls outside its interval.
Interrupted, it goes on where it stopped. `python plots/scaling.py --replot plots/scaling.json` only redraws."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, when run as a script

from trainer.research.scaling import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
