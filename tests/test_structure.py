"""The architecture as the code holds it: arrows that point down only, and a Trainer that stays slim."""

from __future__ import annotations

import ast

from tests.conftest import REPO_ROOT


def imported(package: str) -> dict[str, set[str]]:
    """{module file: every module it imports, at the top or inside a function} for a package of this checkout."""
    found = {}
    for path in sorted((REPO_ROOT / package.replace(".", "/")).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
        found[str(path.relative_to(REPO_ROOT))] = names
    return found


def reaching(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path} imports {name}" for path, names in imported(package).items() for name in sorted(names)
            if name.startswith(forbidden)]


def test_the_arrows_point_down() -> None:
    """Training, data and export build on the ground floor, never on the launch side; no product module imports the
    research code. Controls: the research code does import the launch side (its sweeps), and plots/ imports it."""
    for package in ("trainer.train", "trainer.data", "trainer.export"):
        assert reaching(package, ("trainer.launch",)) == [], package
    for package in ("trainer.core", "trainer.launch", "trainer.train", "trainer.data", "trainer.export"):
        assert reaching(package, ("trainer.research",)) == [], package
    assert reaching("trainer.research", ("trainer.launch",)) and reaching("plots", ("trainer.research",))


def test_the_planner_measures_with_torch_and_plans_without() -> None:
    """trainer/plan: only the memory tracer (and the process that runs it) imports torch and the trainer; what the
    launch side imports of it (the estimate, the corpus, the alternatives) imports neither, and the launch side never
    imports the tracer. Control: the tracer does import the trainer."""
    found = imported("trainer.plan")
    measuring = {"trainer/plan/memory.py", "trainer/plan/__main__.py"}
    for path, names in found.items():
        if path not in measuring:
            assert not any(n == "torch" or n.startswith(("torch.", "trainer.train")) for n in names), path
    assert reaching("trainer.launch", ("trainer.plan.memory", "trainer.plan.__main__")) == []
    assert any(n.startswith("trainer.train") for n in found["trainer/plan/memory.py"])


LOOP_LINES, RUN_LINES = 300, 50
"""The Trainer's budget: `loop.py` at most 300 lines, `Trainer.run` at most 50 (what grows goes to its own part)."""


def over_budget(source: str) -> list[str]:
    problems = []
    if len(source.splitlines()) > LOOP_LINES:
        problems.append(f"{len(source.splitlines())} lines")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "run" and node.end_lineno - node.lineno >= RUN_LINES:
            problems.append(f"run() has {node.end_lineno - node.lineno + 1} lines")
    return problems


def test_the_trainer_stays_slim() -> None:
    """Control: a run() of 60 lines, and a file of 301, are over."""
    assert over_budget((REPO_ROOT / "trainer" / "train" / "loop.py").read_text()) == []
    long_run = "class T:\n    def run(self):\n" + "        x = 1\n" * 59
    assert over_budget(long_run) == ["run() has 60 lines"]
    assert over_budget("x = 1\n" * 301) == ["301 lines"]


def model_changes(source: str) -> list[str]:
    """Where code changes the model after building it: an attribute set on `self.model` (or a module reached through
    it), or a walk over its modules (which is how such changes are made)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AugAssign | ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and ast.unparse(target).startswith("self.model."):
                found.append(f"line {node.lineno}: {ast.unparse(target)} =")
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("self.model.modules", "self.model.apply"):
            found.append(f"line {node.lineno}: {ast.unparse(node.func)}()")
    return found


def test_nothing_changes_the_model_after_build_model() -> None:
    """Every change to the model happens in build_model's fixed order. Control: what the Trainer did before (the
    experts' fallback and Liger's loss set after build_model) is found."""
    assert model_changes((REPO_ROOT / "trainer" / "train" / "loop.py").read_text()) == []
    before = ("class T:\n    def __init__(self):\n        for module in self.model.modules():\n"
              "            module.grouped_mm = False\n        self.model.fused_loss = None\n")
    assert sorted(model_changes(before)) == ["line 3: self.model.modules()", "line 5: self.model.fused_loss ="]
