"""`python convert.py jobs/<name> OUT [--step N] [--dtype bf16|fp32]`: a checkpoint as a Hugging Face model."""

import sys

from trainer.export import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
