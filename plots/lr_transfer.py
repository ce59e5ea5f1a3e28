"""muP learning-rate transfer: `python plots/lr_transfer.py [--widths ...] [--lrs LOG2 ...] [--steps N]
[--cluster PROFILE] [--executor local|slurm] [--wait]`: the width × learning-rate grid for muP and SP as one sweep
(interrupted, it goes on where it stopped), then plots/lr_transfer.png and .json; exits 1 if the verdict fails.
`python plots/lr_transfer.py --replot plots/lr_transfer.json` only redraws the figure from the saved verdict."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, when run as a script

from trainer.research.lr_transfer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
