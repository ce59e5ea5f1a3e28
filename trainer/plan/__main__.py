"""`python -m trainer.plan REQUEST.json RESULT.json`: the memory of each config in the request, measured under fake
tensors, and for one that does not fit the planned changes that do. Run by the launch side (trainer/launch/planning.py)
in a process of its own, with the job's interpreter: the launch side never imports torch.

Request: {"configs": [config, ...], "alternatives": bool}. Result: one entry per config, {"memory": {...}} with
"alternatives": [{"why", "config", "peak"}] where asked for, or {"error": "..."}.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from pathlib import Path

from trainer.core.config import AnvilConfig
from trainer.plan.alternatives import candidates
from trainer.plan.estimate import GIB, predicted_peak

MAX_TRIED = 8
"""Alternatives traced for one config at most (each takes a trace); the first that fit are kept, cheapest first."""
KEEP = 3


def memory_key(cfg: AnvilConfig) -> str:
    """What a config's memory depends on: configs alike in these share one trace (a sweep over learning rates)."""
    t = cfg.train
    return json.dumps([cfg.model.model_dump(mode="json"), cfg.parallel.model_dump(mode="json"), cfg.world_size,
                       cfg.dp_shard, t.micro_batch_size, t.global_batch_size // (t.micro_batch_size * cfg.dp_size) > 1,
                       cfg.precision, cfg.data.seq_len, cfg.data.document_positions, cfg.cluster.device,
                       cfg.optim.grad_clip is not None], sort_keys=True)


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    warnings.filterwarnings("ignore")  # torch's warnings about fake process groups are for its own developers
    from trainer.plan.memory import plan_memory  # torch, after the request is read

    cache: dict[str, dict] = {}

    def measure(cfg: AnvilConfig) -> dict:
        key = memory_key(cfg)
        if key not in cache:
            cache[key] = plan_memory(cfg).plan_dict()
        return cache[key]

    results = []
    for data in request["configs"]:
        cfg = AnvilConfig.model_validate(data)
        try:
            memory = measure(cfg)
            entry: dict = {"memory": memory}
            limit = cfg.cluster.device_memory_gib
            if request.get("alternatives") and limit and predicted_peak(cfg, memory["peak"]) > limit * GIB:
                fitting: list[dict] = []
                for tried, (why, alternative, combined) in enumerate(candidates(cfg)):
                    if tried >= MAX_TRIED or len(fitting) >= KEEP or (combined and fitting):
                        break  # a combination is no smaller a change than a single one that fits
                    peak = predicted_peak(alternative, measure(alternative)["peak"])
                    if peak <= limit * GIB:
                        fitting.append({"why": why, "config": alternative.model_dump(mode="json"), "peak": peak})
                entry["alternatives"] = fitting
        except Exception as exc:  # a config the tracer cannot run: the plan says so instead of failing the submit
            traceback.print_exc()  # for whoever runs this by hand
            entry = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        results.append(entry)
    Path(argv[1]).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
