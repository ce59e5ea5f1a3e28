"""Validate a config, create jobs/<name>/ and submit it: `python submit.py config.yaml [key=value ...]`."""

import sys

from trainer.launch.submit import main

if __name__ == "__main__":
    sys.exit(main())
