"""Test-only fault injection (tests/test_faults.py): a process with this folder on PYTHONPATH and FAULT_NAN_STEPS set
(e.g. `8,9`) reports each listed step's loss to the trainer's step guard as NaN, the first time that step is trained.
It is not part of Anvil: no config, flag or variable of Anvil's switches it on."""

import os

_STEPS = {int(s) for s in os.environ.get("FAULT_NAN_STEPS", "").split(",") if s.strip()}

if _STEPS:
    import importlib.abc
    import importlib.machinery
    import sys

    def _inject(guard_class: type) -> None:
        real = guard_class.problem

        def problem(self, step: int, loss: float, grad_norm: float):
            if step in _STEPS:
                _STEPS.discard(step)
                loss = float("nan")
            return real(self, step, loss, grad_norm)

        guard_class.problem = problem

    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "trainer.train.guard":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                _inject(module.StepGuard)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Hook())
