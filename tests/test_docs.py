"""The README's configuration reference is generated from the config model and must match it."""

import re

from tests.conftest import REPO_ROOT
from trainer.launch.docs import END, START, reference


def test_readme_reference_is_current() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    current = readme[readme.index(START):readme.index(END) + len(END)]
    assert current == reference(), "README is stale: python -m trainer.launch.docs --write README.md"


def test_every_field_is_documented() -> None:
    undocumented = [line for line in reference().splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert undocumented == []


def quick_start_mismatches(readme: str, overrides: list[str]) -> list[str]:
    """The Quick start's numbers that follow from configs/demo.yaml (+ overrides) and do not match it."""
    from trainer.core.costs import num_params
    from trainer.core.layers import load_config

    quick = readme[readme.index("## Quick start"):readme.index("## Submitting")]
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", overrides, environ={})
    said = re.search(r"a ([\d.]+)M-parameter Llama trains (\d+) steps of ([\d,]+) tokens", quick)
    if said is None:
        return ["the sentence on the demo's model and steps is gone"]
    expected = {
        "parameters (M)": (said[1], f"{num_params(cfg.model) / 1e6:.1f}"),
        "steps": (said[2], str(cfg.train.steps)),
        "tokens per step": (said[3], f"{cfg.train.global_batch_size * cfg.data.seq_len:,}"),
        "checkpoint interval": (re.search(r"checkpointing every (\d+) steps", quick)[1], str(cfg.checkpoint.interval)),
        "held-out interval": (re.search(r"held-out text every (\d+) steps", quick)[1], str(cfg.eval.every)),
    }
    last = re.findall(r"eval/step-(\d+)/", quick) + re.findall(r"→ [\d.]+ at step (\d+)", quick)
    if len(last) < 2:
        return ["the last step's eval folder or final loss is no longer quoted"]
    expected |= {f"last step ({i})": (m, str(cfg.train.steps)) for i, m in enumerate(last)}
    return [f"{what}: README says {said}, the demo config gives {real}" for what, (said, real) in expected.items()
            if said != real]


def test_the_quick_starts_numbers_are_the_demo_configs() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert quick_start_mismatches(readme, []) == []
    changed = quick_start_mismatches(readme, ["train.steps=151", "model.dim=96"])  # the control: a changed demo
    assert any(m.startswith("steps:") for m in changed) and any(m.startswith("parameters") for m in changed), changed
