"""The README's configuration reference is generated from the config model and must match it."""

from tests.conftest import REPO_ROOT
from trainer.launch.docs import END, START, reference


def test_readme_reference_is_current() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    current = readme[readme.index(START):readme.index(END) + len(END)]
    assert current == reference(), "README is stale: python -m trainer.launch.docs --write README.md"


def test_every_field_is_documented() -> None:
    undocumented = [line for line in reference().splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert undocumented == []
