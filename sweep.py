"""Sweeps over ordinary job directories: `python sweep.py submit|status|cancel|retry|summarize|plot ...`."""

import sys

from trainer.launch.sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
