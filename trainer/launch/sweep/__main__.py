"""Not a way to call this tool: it has one, named the same in usage, README and errors (trainer/launch/commands.py)."""

import sys

from trainer.errors import EXIT_REFUSED
from trainer.launch.commands import command

if __name__ == "__main__":
    print(f"anvil: run it as: {command('sweep')} --help", file=sys.stderr)
    sys.exit(EXIT_REFUSED)
