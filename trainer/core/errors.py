"""The one base of Anvil's refusals, and the one place a command line turns them into an exit code.

A refusal is input a person must fix (a config, a file, a checkpoint, a name); its message says what to do.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from trainer.core.states import EXIT_REFUSED


class AnvilError(Exception):
    """Bad input, named: the message says which field, file or step, and what was expected."""


def run_command(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a command line's body on `argv` (None: sys.argv); an AnvilError becomes its message on stderr and
    EXIT_REFUSED. Every command's `main` is this around its body."""
    try:
        return main(argv)
    except AnvilError as exc:
        from rich.console import Console  # red on a terminal, plain text otherwise

        # No markup and no wrapping: messages quote user input verbatim and are read by scripts too.
        Console(stderr=True, highlight=False).print(str(exc), style="red", markup=False, soft_wrap=True)
        return EXIT_REFUSED

