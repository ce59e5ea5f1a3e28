"""Not a way to call this tool: it has one, named the same in usage, README and errors (trainer/core/commands.py)."""

from trainer.core.commands import point_to

if __name__ == "__main__":
    point_to("convert")
