"""The launch side's planner: each job's plan composed (trainer/plan/estimate.py, torch-free), its memory measured by
`python -m trainer.plan` in a process of its own, a table printed, and the verdict submit and sweeps act on.

Memory is measured with the job's own interpreter where it runs here with torch (a login node with the job's
environment), else with this one if it has torch; where neither can, the plan says it was skipped and why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from trainer.core.checks import interpreter_problem
from trainer.core.config import AnvilConfig
from trainer.plan.alternatives import as_overrides
from trainer.plan.estimate import GIB, Plan, base_plan, with_memory

PLAN_TIMEOUT_S = 900
CHECKOUT = Path(__file__).resolve().parents[2]


def memory_wanted(cfg: AnvilConfig) -> bool:
    """Whether a plain submit measures memory: where the profile gives a device memory to fit in (GPU clusters).
    A CPU profile leaves it unset: its jobs are planned with `--plan` only (a submit stays instant)."""
    return cfg.cluster.device_memory_gib is not None


def planner_python(cfg: AnvilConfig) -> tuple[str | None, str]:
    """The interpreter that measures memory, or None and why none can."""
    c = cfg.cluster
    if c.container is None and not c.modules and interpreter_problem(c.interpreter) is None:
        return c.interpreter, ""
    if importlib.util.find_spec("torch") is not None:
        return sys.executable, ""
    where = ("runs inside its container" if c.container is not None else "comes from its modules" if c.modules
             else f"'{c.interpreter}' {interpreter_problem(c.interpreter)} here")
    return None, (f"memory not planned: the job's python {where}, and this python ({sys.executable}) has no torch; "
                  "run submit from an environment with torch (the job's own) to plan it")


def measure(cfgs: Sequence[AnvilConfig], alternatives: bool) -> list[dict]:
    """`python -m trainer.plan` on `cfgs` (one process for all: a sweep's points share its start and its traces)."""
    python, why = planner_python(cfgs[0])
    if python is None:
        return [{"skipped": why} for _ in cfgs]
    with tempfile.TemporaryDirectory(prefix="anvil-plan-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"configs": [c.model_dump(mode="json") for c in cfgs],
                                       "alternatives": alternatives}))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
        env.setdefault("OMP_NUM_THREADS", "1")
        try:
            done = subprocess.run([python, "-m", "trainer.plan", str(request), str(result)], capture_output=True,
                                  text=True, timeout=PLAN_TIMEOUT_S, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return [{"skipped": f"memory not planned: the planner did not finish ({exc})"} for _ in cfgs]
        if done.returncode != 0 or not result.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return [{"skipped": f"memory not planned: the planner failed ({last})"} for _ in cfgs]
        return json.loads(result.read_text())


def plan_jobs(cfgs: Sequence[AnvilConfig], memory: bool, alternatives: bool = True) -> list[Plan]:
    """Each config's plan; with `memory`, measured (for every config at once) and judged."""
    plans = [base_plan(cfg) for cfg in cfgs]
    if not memory:
        for plan in plans:
            plan.memory_skipped = ("memory not planned: cluster.device_memory_gib is not set (a CPU profile); "
                                   "submit.py --plan measures it")
        return plans
    for plan, cfg, found in zip(plans, cfgs, measure(cfgs, alternatives), strict=True):
        if "memory" not in found:
            plan.memory_skipped = found.get("skipped") or f"memory not planned: {found.get('error')}"
            continue
        plan.searched = "alternatives" in found
        for option in found.get("alternatives", []):
            other = AnvilConfig.model_validate(option["config"])
            plan.alternatives.append({"why": option["why"], "peak_gib": option["peak"] / GIB,
                                      "overrides": as_overrides(cfg, other)})
        with_memory(plan, cfg, found["memory"])
    return plans


def _gib(value: float | None) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    if value is None:
        return "—"
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / 2**20:.0f} MiB"


def _duration(hours: float | None) -> str:
    if hours is None:
        return "—"
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _count(value: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def plan_table(plan: Plan) -> Table:
    """One job's plan as the terminal shows it."""
    table = Table(title=f"plan of {plan.job}", show_header=False, box=None, pad_edge=False, title_justify="left")
    a = plan.assumptions
    table.add_row("layout", f"{plan.world_size} rank(s): {plan.layout}; {plan.precision}, activation checkpointing "
                            f"{plan.activation_checkpoint}, compile {'on' if plan.compile else 'off'}; micro-batch "
                            f"{plan.micro_batch_size} × {plan.accumulation} accumulated")
    active = f" ({_count(plan.active_parameters)} active)" if plan.active_parameters != plan.parameters else ""
    table.add_row("model", f"{_count(plan.parameters)} parameters{active}, {plan.flops_per_token / 1e9:.2f} GFLOP "
                           f"per token, {_count(plan.tokens_per_step)} tokens per step")
    if plan.memory is not None:
        m, r = plan.memory, plan.memory["resident"]
        at = m["at_peak"]
        limit = a.get("device_memory_gib")
        verdict = ("" if plan.fits is None else " — fits" if plan.fits else " — DOES NOT FIT")
        which = (f" (pipeline rank {m['pp_rank']} of {len(plan.pipeline['ranks'])}: the higher peak)"
                 if plan.pipeline is not None else "")
        table.add_row("memory / rank", f"parameters {_gib(r['parameters'])}, gradients {_gib(r['gradients'])}, "
                                       f"optimizer {_gib(r['optimizer'])} at rest{which}")
        table.add_row("", f"at the peak: activations {_gib(at['activations'])}, gathered {_gib(at['gathered'])}, "
                          f"temporary {_gib(at['temporary'])}; tracked peak {_gib(m['peak'])}")
        of = f" of {limit:g} GiB" if limit else " (no cluster.device_memory_gib: fit not checked)"
        table.add_row("predicted peak", f"{_gib(m['predicted_peak'])}{of}{verdict} "
                                        f"(+{a['fragmentation']:.0%} fragmentation, +{a['reserve_gib']:g} GiB runtime: "
                                        "models)")
    else:
        table.add_row("memory", plan.memory_skipped or "not planned")
    if plan.step_seconds is not None:
        table.add_row("speed", f"{plan.step_seconds:.2f} s per step, {_count(plan.tokens_per_second)} tokens/s at "
                               f"{a['mfu']:.0%} MFU of {a['peak_tflops']:g} TFLOPS per device (assumed)")
        table.add_row("cost", f"{plan.steps} steps: {_duration(plan.wall_hours)} wall, "
                              f"{plan.device_hours:,.0f} device-hours")
    else:
        table.add_row("speed", "not planned: cluster.mfu_peak_tflops is not set")
    table.add_row("checkpoint", f"{plan.checkpoint_gib:.1f} GiB, {plan.checkpoint_seconds:.0f} s to write at "
                                f"{a['checkpoint_gbps']:g} GB/s (assumed)")
    if plan.pipeline is not None:
        pipe = plan.pipeline
        stages = ", ".join(f"{a}–{b}" if a != b else f"{a}" for a, b in pipe["stages"])
        table.add_row("pipeline", f"{pipe['schedule']}, {len(pipe['stages'])} stages (layers {stages}), "
                                  f"{pipe['microbatches']} micro-batches per step; bubble {pipe['bubble']:.0%} of a "
                                  f"step: {pipe['bubble_how']}")
    if plan.all_to_all_gib:
        table.add_row("all-to-all", f"{_gib(plan.all_to_all_gib * GIB)} sent per rank and step by expert parallelism "
                                    "(routing evenly; a rank receives about as much)")
    if plan.data is not None:
        for ds in plan.data["datasets"]:
            if not ds["files"]:
                table.add_row(f"data {ds['name']}", f"no Parquet file here ({ds['path']}): its size is not planned")
                continue
            held = f"{_count(ds['tokens'])} tokens" if ds["tokens"] else "? tokens (no tokenizer)"
            epochs = f"{ds['epochs']:.2f} epochs" if ds["epochs"] is not None else "? epochs"
            table.add_row(f"data {ds['name']}", f"{held} in {ds['rows']:,} documents, {ds['row_groups']:,} row "
                                                f"groups; needs {_count(ds['tokens_needed'])}: {epochs}")
    for problem in plan.problems:
        table.add_row("[bold red]problem[/]", problem)
    for option in plan.alternatives:
        table.add_row("fits with", f"{' '.join(option['overrides'])}  ({_gib(option['peak_gib'] * GIB)}: "
                                   f"{option['why']})")
    return table


def print_plans(out: Console, plans: Sequence[Plan]) -> None:
    for plan in plans:
        out.print(plan_table(plan))


def plans_table(title: str, names: Sequence[str], plans: Sequence[Plan]) -> Table:
    """Many plans (a sweep's points), a row each."""
    table = Table(title=title, title_justify="left")
    for column in ("point", "layout", "micro-batch", "AC", "peak / device", "fits", "s/step", "tokens/s",
                   "device-hours", "epochs"):
        table.add_column(column)
    for name, plan in zip(names, plans, strict=True):
        peak = plan.memory["predicted_peak"] if plan.memory else None
        limit = plan.assumptions.get("device_memory_gib")
        epochs = [ds["epochs"] for ds in (plan.data or {}).get("datasets", []) if ds["epochs"] is not None]
        table.add_row(name, plan.layout, f"{plan.micro_batch_size} × {plan.accumulation}", plan.activation_checkpoint,
                      _gib(peak) + (f" / {limit:g} GiB" if limit else ""),
                      "?" if plan.fits is None else "yes" if plan.fits else "[bold red]no[/]",
                      "—" if plan.step_seconds is None else f"{plan.step_seconds:.2f}",
                      "—" if plan.tokens_per_second is None else _count(plan.tokens_per_second),
                      "—" if plan.device_hours is None else f"{plan.device_hours:,.0f}",
                      f"{max(epochs):.2f}" if epochs else "—")
    skipped = {plan.memory_skipped for plan in plans if plan.memory_skipped}
    if skipped:
        table.caption = "; ".join(sorted(skipped))
    return table
