"""How the user calls each Anvil tool here, the same in usage lines, hints and errors: the entry scripts of a
checkout (`python submit.py`), or the installed commands (`anvil-submit`) where Anvil runs without its checkout."""

from __future__ import annotations

import sys
from typing import Literal, NoReturn

from trainer.core.jobdir import CODE_DIR
from trainer.core.states import EXIT_REFUSED

Tool = Literal["submit", "sweep", "convert"]

IN_CHECKOUT = (CODE_DIR / "pyproject.toml").is_file() and (CODE_DIR / "submit.py").is_file()
"""Anvil runs from its checkout (editable install or none), where the README's commands are the entry scripts."""


def command(tool: Tool) -> str:
    """`python submit.py` in a checkout, `anvil-submit` otherwise."""
    return f"python {tool}.py" if IN_CHECKOUT else f"anvil-{tool}"


def point_to(tool: Tool) -> NoReturn:
    """`python -m` of a tool's package: not a way to call it; say the one way, and exit as a refusal."""
    print(f"anvil: run it as: {command(tool)} --help", file=sys.stderr)
    sys.exit(EXIT_REFUSED)
