"""The optional packages `convert.py`'s options need, checked before any work (an export takes minutes, a missing
package should not cost one), and the install line that fits how Anvil was installed."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence

from trainer.core import commands
from trainer.core.errors import AnvilError

EVAL = ("lm-eval", "transformers", "accelerate")
"""`--eval`: lm-eval and its transformers backend (pyproject.toml's `eval` extra)."""
SAMPLE = ("transformers",)
"""`--sample`: vanilla transformers generates from the export."""
VLLM = ("vllm",)
"""`--eval` with `eval.backend: vllm`."""

EXTRA = {"lm-eval": "eval", "transformers": "eval", "accelerate": "eval", "vllm": "vllm"}
"""Distribution → the extra of Anvil that installs it (pyproject.toml [project.optional-dependencies])."""
MODULE = {"lm-eval": "lm_eval"}
"""Distribution → its import name, where the two differ."""


class MissingDependency(AnvilError):
    """An option needs a package this environment lacks."""


def install_line(*extras: str) -> str:
    """How to add Anvil's `extras` here: the editable install of a checkout (the README's), or the package of an
    installed wheel (a checkout's `.[eval]` means nothing there)."""
    names = ",".join(extras)
    return f"pip install -e '.[{names}]'" if commands.IN_CHECKOUT else f"pip install 'anvil[{names}]'"


def installed(distribution: str) -> bool:
    """Whether `distribution` can be found, without importing it (transformers or lm-eval take seconds)."""
    return importlib.util.find_spec(MODULE.get(distribution, distribution)) is not None


def _listed(names: Sequence[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def require(needs: Mapping[str, Sequence[str]]) -> None:
    """Refuse in one line, naming each option, what it lacks and the install line, if any distribution that
    `needs` ({option: distributions}) names is missing."""
    missing = {option: [d for d in dists if not installed(d)] for option, dists in needs.items()}
    missing = {option: dists for option, dists in missing.items() if dists}
    if not missing:
        return
    names = {d for dists in missing.values() for d in dists}
    extras = sorted({EXTRA[d] for d in names})
    said = ", ".join(f"{option} needs {_listed(dists)}" for option, dists in missing.items())
    raise MissingDependency(f"{said}, which {'is' if len(names) == 1 else 'are'} not installed: "
                            f"{install_line(*extras)}")
