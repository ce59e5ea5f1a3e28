"""muP shown to work, and shown to catch a broken rule: the coordinate check on the trainer's own model (muP flat,
SP growing: the negative control), each muP rule broken on purpose and caught, and the same numbers from 2 FSDP
ranks as from one process."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.train_helpers import free_port, trainer_env
from trainer.core.config import ModelConfig
from trainer.core.jobdir import JobDir
from trainer.launch.sweep.state import PointRecord, SweepState
from trainer.research import coordcheck, lr_transfer
from trainer.research.coordcheck import CoordSpec, measure
from trainer.research.lr_transfer import TransferSpec, analyse, optimum
from trainer.train import model, optim
from trainer.train.distributed import process_group

SPEC = CoordSpec(widths=(64, 128, 256, 512), steps=4, seeds=2)
QUICK = CoordSpec(widths=(64, 128, 256), steps=3, seeds=1)
"""For the mutations: two octaves, three steps, one seed: each broken rule is caught by a wide margin."""


@pytest.fixture(scope="module", autouse=True)
def group() -> None:
    process_group()


def worst(result, modules: str = "") -> float:
    return max(abs(s) for m, by in result.slopes.items() if modules in m for t, s in by.items()
               if int(t) >= 2 and math.isfinite(s))


def test_coordinate_check_passes_for_mup_and_fails_for_sp() -> None:
    mup, sp = measure(SPEC, mup=True), measure(SPEC, mup=False)
    assert mup.as_expected and mup.failures == [], mup.failures
    assert worst(mup) < coordcheck.BOUND
    # The negative control: SP breaks the bound on the output logits and on the attention logits.
    assert sp.as_expected  # as a control: it shows the growth
    broke = {f.split(" at step ")[0] for f in sp.failures}
    assert "logits" in broke and any(m.endswith("attn_logits") for m in broke), sp.failures
    assert worst(sp, "logits") >= 0.5 and worst(sp, "mlp") >= 1.0


@pytest.fixture(scope="module")
def intact() -> dict[str, coordcheck.CoordResult]:
    """The quick check with every rule intact, for both ways of growing the width (the mutations' baseline)."""
    return {grow: measure(CoordSpec(QUICK.widths, QUICK.steps, QUICK.seeds, grow=grow), mup=True)
            for grow in ("heads", "head_dim")}


def test_zero_inits_and_the_attention_rule_with_a_growing_head_size(intact) -> None:
    """Width grown through the head size: muP's 1/head-dim rule (with a zero query) keeps the logits flat."""
    assert intact["head_dim"].as_expected, intact["head_dim"].failures
    assert intact["heads"].as_expected, intact["heads"].failures


def _broken_plan(role_change):
    real = model.param_plan

    def plan(cfg):
        return {name: role_change(cfg, entry) if entry.role == "hidden" else entry for name, entry in real(cfg).items()}
    return plan


MUTATIONS = {
    "readout multiplier 1/m forgotten": ("logits", lambda mp: mp.setattr(
        ModelConfig, "output_mult", property(lambda self: self.mup.output_alpha if self.mup.enabled else 1.0))),
    "hidden learning rate 1/m forgotten": ("layers", lambda mp: mp.setattr(optim, "param_plan", _broken_plan(
        lambda cfg, e: model.ParamPlan(e.role, e.init_std, 1.0, e.wd_mult)))),
    "hidden init 1/sqrt(m) forgotten": ("layers", lambda mp: mp.setattr(model, "param_plan", _broken_plan(
        lambda cfg, e: model.ParamPlan(e.role, cfg.init_std if e.init_std else e.init_std, e.lr_mult, e.wd_mult)))),
    "attention scale 1/sqrt(head dim) while the head size grows": ("attn_logits", lambda mp: mp.setattr(
        ModelConfig, "attn_mult", property(lambda self: self.mup.attn_alpha if self.mup.enabled else 1.0))),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_a_broken_mup_rule_is_caught(name: str, intact, monkeypatch: pytest.MonkeyPatch) -> None:
    where, breaks = MUTATIONS[name]
    grow = "head_dim" if "head size" in name else "heads"
    spec = CoordSpec(widths=QUICK.widths, steps=QUICK.steps, seeds=QUICK.seeds, grow=grow)
    assert intact[grow].as_expected  # the rule intact: flat
    breaks(monkeypatch)
    result = measure(spec, mup=True)
    assert not result.as_expected, f"{name} went unnoticed"
    assert any(where in failure for failure in result.failures), result.failures


MOE = ["model.moe.experts=4", "model.moe.top_k=2", "model.moe.shared_experts=1", "model.moe.shared_expert_gate=true"]
"""Routed experts beside a gated shared one (Qwen2-MoE's)."""
MOE_SPEC = CoordSpec(widths=(64, 128, 256, 512), steps=10, seeds=2, lr=1e-3)


def test_a_mixture_of_experts_passes_the_coordinate_check_and_a_forgotten_router_rule_is_caught(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Experts (routed and shared) are hidden weights, the router and the shared expert's gate output-like (their
    logits × 1/m): under muP the mixture's output and the router's learned logits stay flat with width; under SP, or
    with the 1/m forgotten, they grow."""
    mup, sp = measure(MOE_SPEC, mup=True, extra=MOE), measure(MOE_SPEC, mup=False, extra=MOE)
    print("muP", worst(mup, "router_update"), worst(mup, "mlp"), "SP", worst(sp, "router_update"), worst(sp, "mlp"))
    assert any("router_update" in m for m in mup.slopes)
    assert mup.as_expected, mup.failures
    assert worst(sp, "router_update") >= 0.7 and worst(sp, "mlp") >= 1.0
    monkeypatch.setattr(ModelConfig, "router_mult", property(lambda self: 1.0))
    broken = measure(MOE_SPEC, mup=True, extra=MOE)
    assert not broken.as_expected and worst(broken, "router_update") >= 0.7, broken.failures


def test_fsdp_on_two_ranks_gives_the_same_coordinates(tmp_path: Path) -> None:
    """The plan is layout-independent: 2 FSDP ranks (each half the batch) record what one process records."""
    args = ["--widths", *map(str, QUICK.widths), "--steps", str(QUICK.steps), "--seeds", "1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), str(REPO_ROOT / "plots" / "coord_check.py"), *args, "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=trainer_env(), cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "muP: PASS" in done.stdout and "SP, the negative control: breaks the bound, as it must" in done.stdout
    two = {r["parametrization"]: r for r in json.loads((tmp_path / "coord_check.json").read_text())["results"]}
    one = measure(QUICK, mup=True)
    for module, by_step in one.l1.items():
        for step, by_width in by_step.items():
            for width, value in by_width.items():
                assert two["muP"]["l1"][module][step][width] == pytest.approx(value, rel=1e-4, abs=1e-7), (
                    module, step, width)


def _grid_state(tmp_path: Path, loss, spec) -> SweepState:
    """A finished width × learning-rate sweep whose final losses are `loss(mup, width, log2_lr)` (None: diverged)."""
    state = SweepState("grid", "grid.yaml", "local")
    for mup in (True, False):
        for width in spec.widths:
            for k in spec.log2_lrs:
                name = f"{mup}-{width}-{k}"
                job = JobDir(tmp_path / name)
                job.path.mkdir(parents=True)
                value = loss(mup, width, k)
                steps = range(5, spec.steps + 1, 5) if value is not None else range(5, 20, 5)
                job.metrics.write_text("".join(json.dumps({"step": s, "loss": value if value is not None else 9.0})
                                               + "\n" for s in steps))
                state.points[name] = PointRecord(name, str(job.path), {"model.mup.enabled": mup, "model.dim": width,
                                                                         "optim.lr": 2.0 ** k})
    return state


def test_transfer_fit_and_verdict_can_fail(tmp_path: Path) -> None:
    assert optimum([-10, -9, -8], [3.0, 2.0, 3.0]) == (pytest.approx(-9.0), 2.0)
    assert optimum([-10, -9, -8], [2.5, 2.0, 3.5])[0] == pytest.approx(-9.25)  # the parabola's vertex
    assert optimum([-10, -9, -8], [1.0, 2.0, 3.0]) == (-10.0, 1.0)  # at the edge of the grid: the grid point
    spec = TransferSpec(widths=(64, 128, 256), log2_lrs=tuple(range(-12, -5)), steps=40, seeds=1)

    def good(mup, width, k):
        centre = -9.0 if mup else -9.0 - math.log2(width / 64)  # SP's optimum moves an octave per doubling
        return 3.0 + 0.05 * (k - centre) ** 2 - 0.01 * math.log2(width)

    verdict = analyse(_grid_state(tmp_path / "good", good, spec), spec)
    assert verdict.passed, verdict.checks
    assert [c.log2_opt for c in verdict.curves["muP"]] == pytest.approx([-9.0, -9.0, -9.0])

    def drifting(mup, width, k):  # a broken muP: its optimum moves like SP's
        return good(False, width, k)

    verdict = analyse(_grid_state(tmp_path / "drift", drifting, spec), spec)
    assert not verdict.checks["muP optimum moves <= 0.5 octave"]

    def narrowing(mup, width, k):  # muP's optimum stays, but wider is worse
        return good(mup, width, k) + (0.05 * math.log2(width / 64) if mup else 0.0)

    verdict = analyse(_grid_state(tmp_path / "worse", narrowing, spec), spec)
    assert verdict.checks["muP optimum moves <= 0.5 octave"]
    assert not verdict.checks["muP best loss does not worsen with width (beyond the noise between seeds)"]

    def powerless(mup, width, k):  # SP does not move either: the run shows nothing
        return good(True, width, k)

    verdict = analyse(_grid_state(tmp_path / "flat", powerless, spec), spec)
    assert not verdict.checks["SP optimum or instability edge moves >= 1.0 octave (the control)"]

    def diverging(mup, width, k):  # SP's optimum stays, its divergence edge moves left with width
        return None if not mup and k >= -7 - math.log2(width / 64) else good(True, width, k)

    verdict = analyse(_grid_state(tmp_path / "edge", diverging, spec), spec)
    assert verdict.checks["SP optimum or instability edge moves >= 1.0 octave (the control)"]
    assert [c.edge for c in verdict.curves["SP"]] == [-7.0, -8.0, -9.0]
    assert [c.edge for c in verdict.curves["muP"]] == [None, None, None]  # a gentle bowl: no cliff in the grid


def _coord_result(name: str, growth: float, mup: bool) -> coordcheck.CoordResult:
    """A judged coordinate check without training: every module's size grows as width**(growth · step / 3), the
    logits start at exactly 0 (a zero readout)."""
    spec = CoordSpec(widths=(64, 128, 256), steps=3, seeds=1)
    result = coordcheck.CoordResult(name, coordcheck.asdict(spec))
    for i, module in enumerate(("embedding", "layers.0.attn_logits", "layers.0.mlp", "logits")):
        result.l1[module], result.slopes[module] = {}, {}
        for step in range(1, spec.steps + 1):
            zero = module == "logits" and step == 1
            values = [0.0 if zero else 0.01 * (i + 1) * (w / 64) ** (growth * step / 3) for w in spec.widths]
            result.l1[module][str(step)] = dict(zip(map(str, spec.widths), values, strict=True))
            result.slopes[module][str(step)] = coordcheck.slope(spec.widths, values)
    return coordcheck.judge(result, mup)


def test_the_coordinate_check_figure_states_the_experiment_and_its_verdict(tmp_path: Path) -> None:
    """The figure reads without the README: a title naming the experiment and each verdict with its numbers, a
    shared y label, a legend naming every activation; the verdict in the title changes when the data fails."""
    results = [_coord_result("muP", 0.0, True), _coord_result("SP", 1.0, False)]
    fig = coordcheck.build_figure(results, [1, 2, 3])
    title = fig._suptitle.get_text()
    assert "muP coordinate check" in title and "standard parametrization" in title
    assert "muP: PASS ✓ flat" in title and f"under {coordcheck.BOUND} per octave" in title
    assert "SP, the negative control: PASS ✓ grows" in title and "largest +1.00 per octave" in title
    assert "mean |activation|" in fig._supylabel.get_text()
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[-1] == "output logits  [logits]"
    assert "block 0 attention logits (q·k)  [layers.0.attn_logits]" in labels
    assert min(t.get_fontsize() for t in legend.get_texts()) >= 9
    titles = [ax.get_title() for ax in fig.axes]
    assert "muP, step 1: max |slope| 0.00\n(0 at every width, not drawn: logits)" in titles
    assert all("max |slope|" in t for t in titles) and all(ax.get_xlabel() for ax in fig.axes[-3:])
    # A muP that grows, an SP that stays flat: the title says both failed.
    title = coordcheck.build_figure([_coord_result("muP", 1.0, True), _coord_result("SP", 0.0, False)])._suptitle
    assert "muP: FAIL ✗ not flat" in title.get_text() and "SP, the negative control: FAIL ✗" in title.get_text()
    # Redrawn from the saved verdict, as plots/coord_check.py --replot does, without training.
    saved = tmp_path / "coord_check.json"
    saved.write_text(json.dumps({"results": [coordcheck.asdict(r) for r in results]}))
    assert coordcheck.main(["--replot", str(saved)]) == 0 and (tmp_path / "coord_check.png").stat().st_size > 10_000


def _bowl(mup: bool, width: int, k: int) -> float:
    """The final loss of a transfer grid: muP's optimum at 2^-9 for every width, SP's an octave lower per doubling."""
    centre = -9.0 if mup else -9.0 - math.log2(width / 64)
    return 3.0 + 0.05 * (k - centre) ** 2 - 0.01 * math.log2(width)


def test_the_transfer_figure_explains_its_marks_and_states_the_verdict(tmp_path: Path) -> None:
    """Every mark has a legend entry (colours are widths, the star the optimum, the dashed line the instability
    edge) and the title states the verdict with its numbers; a grid where muP drifts says FAIL."""
    spec = TransferSpec(widths=(64, 128, 256), log2_lrs=tuple(range(-12, -5)), steps=40, seeds=1)
    verdict = analyse(_grid_state(tmp_path / "good", _bowl, spec), spec)
    fig = lr_transfer.build_figure(verdict)
    title = fig._suptitle.get_text()
    assert "Learning-rate transfer" in title and "PASS: the optimum transfers across widths under muP" in title
    assert "muP optimum shift 0.00 octave; SP optimum shift 2.00" in title
    assert "✓ muP optimum moves <= 0.5 octave" in title
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[:3] == ["width 64", "width 128", "width 256"]
    assert labels[3].startswith("optimum") and labels[4].startswith("instability edge")
    assert legend.legend_handles[3].get_marker() == "*" and legend.legend_handles[4].get_linestyle() == "--"
    assert len(labels) == 5  # no diverged point: no mark for one
    assert "loss" in fig.axes[0].get_ylabel() and all("learning rate" in ax.get_xlabel() for ax in fig.axes)

    def drifting(mup, width, k):  # muP's optimum moves like SP's; SP's largest learning rate diverges
        return None if not mup and k == spec.log2_lrs[-1] else _bowl(False, width, k)

    fig = lr_transfer.build_figure(analyse(_grid_state(tmp_path / "drift", drifting, spec), spec))
    title = fig._suptitle.get_text()
    assert title.splitlines()[1].startswith("FAIL: muP optimum shift 2.00") and "✗ muP optimum moves" in title
    assert fig.legends[0].get_texts()[-1].get_text().startswith("diverged or unfinished")
    # Redrawn from the saved verdict, as plots/lr_transfer.py --replot does, without the grid's runs.
    saved = tmp_path / "lr_transfer.json"
    saved.write_text(verdict.to_json())
    assert lr_transfer.replot(saved, tmp_path / "lr_transfer.png").stat().st_size > 10_000
