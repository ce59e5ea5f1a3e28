"""Not a way to call this tool: it has one, named the same in usage, README and errors (trainer/core/commands.py)."""

import sys

from trainer.core.commands import command
from trainer.core.states import EXIT_REFUSED

if __name__ == "__main__":
    print(f"anvil: run it as: {command('sweep')} --help", file=sys.stderr)
    sys.exit(EXIT_REFUSED)
