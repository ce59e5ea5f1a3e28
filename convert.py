"""`python convert.py jobs/<name> OUT [--step N] [--dtype bf16|fp32] [--upload ORG/NAME ...]` (or `--from-hf`)."""

import sys

from trainer.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
