"""DCP checkpoints: completion marker, retention, skipping interrupted saves, loader state, bad checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.core import jobdir
from trainer.core.config import ModelConfig
from trainer.train import checkpoint
from trainer.train.model import Transformer


def model(dim: int = 64, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(dim=dim, n_layers=1, n_heads=4, vocab_size=64), 16)
    m.init_weights(seed)
    return m


def test_save_load_round_trip_with_loader_states(tmp_path: Path) -> None:
    a, b = model(seed=1), model(seed=2)
    loader_states = {0: {"workers": {"0": {"sources": {"web": {"shards": {"3": [0, 1, 2, 3, 4]}}}}}}, 1: {"x": 1}}
    checkpoint.save(tmp_path, 10, {"model": a.state_dict(), "step": 10}, loader_states, keep=3)
    assert (tmp_path / "step-10" / jobdir.COMPLETE).is_file()
    state = {"model": b.state_dict(), "step": 0}
    loaded = checkpoint.load(tmp_path, 10, state)
    b.load_state_dict(state["model"])
    assert state["step"] == 10 and loaded == [loader_states[0], loader_states[1]]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_retention_and_interrupted_saves(tmp_path: Path) -> None:
    m = model()
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, step, {"model": m.state_dict()}, {}, keep=2)
    assert [s for s, _, _ in jobdir.list_steps(tmp_path)] == [30, 40]
    # A save killed midway: the directory exists, the marker does not.
    checkpoint.save(tmp_path, 50, {"model": m.state_dict()}, {}, keep=2)
    (tmp_path / "step-50" / jobdir.COMPLETE).unlink()
    assert jobdir.latest_complete(tmp_path) == 40
    # Reported as skipped when the trainer resumes (tests/test_train.py checks the message in its log).
    assert jobdir.interrupted_saves(tmp_path) == [tmp_path / "step-50"]
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.load(tmp_path, 50, {"model": m.state_dict()})
    checkpoint.save(tmp_path, 50, {"model": m.state_dict()}, {}, keep=2)  # the same step again, after a restart
    assert [(s, c) for s, _, c in jobdir.list_steps(tmp_path)] == [(40, True), (50, True)]
    assert jobdir.latest_complete(tmp_path / "nothing") is None
    # Pinned steps (checkpoint.keep_steps: forks of other jobs) outlive `keep`; control: unpinned, they go.
    for step in (60, 70):
        checkpoint.save(tmp_path, step, {"model": m.state_dict()}, {}, keep=1, pinned=[20, 40])
    assert [s for s, _, _ in jobdir.list_steps(tmp_path)] == [40, 70]
    checkpoint.save(tmp_path, 80, {"model": m.state_dict()}, {}, keep=1)
    assert [s for s, _, _ in jobdir.list_steps(tmp_path)] == [80]


def test_checkpoint_of_another_model_is_refused_clearly(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, 1, {"model": model(dim=64).state_dict()}, {}, keep=1)
    with pytest.raises(checkpoint.CheckpointError, match="different model or config"):
        checkpoint.load(tmp_path, 1, {"model": model(dim=128).state_dict()})


def test_corrupt_checkpoint_is_refused_clearly(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, 1, {"model": model().state_dict()}, {}, keep=1)
    for data in (tmp_path / "step-1").glob("*.distcp"):
        data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="cannot be loaded"):
        checkpoint.load(tmp_path, 1, {"model": model().state_dict()})


def test_damage_is_named_and_retention_never_drops_the_newest_whole_step(tmp_path: Path) -> None:
    m = model()
    for step in (1, 2):
        checkpoint.save(tmp_path, step, {"model": m.state_dict()}, {}, keep=3)
    newest = tmp_path / "step-2"
    assert checkpoint.damage(newest) is None
    shard = next(newest.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])
    assert checkpoint.damage(newest) == f"{shard.name} is cut short ({len(data) - 1:,} of {len(data):,} bytes)"
    shard.unlink()
    assert checkpoint.damage(newest) == f"{shard.name} is missing"
    (newest / ".metadata").write_bytes(b"not a pickle")
    assert checkpoint.damage(newest) == "its metadata file .metadata cannot be read (UnpicklingError)"
    (newest / ".metadata").unlink()
    assert checkpoint.damage(newest) == "its metadata file .metadata is missing"
    found = checkpoint.newest_loadable(tmp_path)
    assert found.step == 1 and [p for p, _ in found.damaged] == [newest]
    checkpoint.prune(tmp_path, keep=1)  # the kept newest is damaged: the newest whole one stays too
    assert [s for s, _, _ in jobdir.list_steps(tmp_path)] == [1, 2]
    assert checkpoint.pick(tmp_path) == (tmp_path / "step-1", ["step-2 is damaged (its metadata file .metadata is "
                                                               "missing)"])
    with pytest.raises(checkpoint.CheckpointError, match=r"step-2 is damaged \(its metadata file"):
        checkpoint.pick(tmp_path, 2)
    assert jobdir.set_aside(newest) == tmp_path / "step-2.damaged"
    checkpoint.save(tmp_path, 2, {"model": m.state_dict()}, {}, keep=3)
    assert jobdir.set_aside(newest) == tmp_path / "step-2.damaged-2"
    assert [s for s, _, _ in jobdir.list_steps(tmp_path)] == [1]


def test_a_checkpoints_metadata_at_scale_covers_every_tensor_once() -> None:
    """DCP's own save planning for 16 ranks in one process (benchmarks/checkpoint_scale.py measures 4,096): every
    weight and moment is tiled by the ranks' chunks exactly once, one data file per rank; with 2 HSDP replicas the
    duplicates are dropped (8 chunks per tensor). Control: a rank's plan lost leaves its rows missing."""
    from benchmarks.checkpoint_scale import coverage_problems, global_metadata, parameter_shapes, save_plans
    from trainer.core.layers import load_config

    shapes = parameter_shapes(load_config(None, ["job.name=x", "model.flavor=debug"], environ={}).model)
    plans, metadata = global_metadata(save_plans(shapes, 16))
    assert coverage_problems(metadata, shapes) == []
    assert sum(1 for plan in plans if plan.items) == 16
    assert len(metadata.state_dict_metadata["model.tok_embeddings.weight"].chunks) == 16
    _, replicated = global_metadata(save_plans(shapes, 16, replicate=2))
    assert coverage_problems(replicated, shapes) == []
    assert len(replicated.state_dict_metadata["model.tok_embeddings.weight"].chunks) == 8
    plans = save_plans(shapes, 16)
    plans[3].items[:] = [item for item in plans[3].items if item.type.name != "SHARD"]
    _, lost = global_metadata(plans)
    assert any("missing" in problem for problem in coverage_problems(lost, shapes))


@pytest.mark.parametrize("flat", [True, False], ids=["flattened", "as written before pipelines"])
def test_an_optimizer_saved_flattened_or_not_restores_its_moments(tmp_path: Path, flat: bool) -> None:
    """Checkpoints hold the optimizer under each parameter's name (`checkpoint.FLAT`: pipeline stages on different
    ranks hold different parameters); those written before hold it by group index, and still restore: the format is
    read from the checkpoint. Control: read as the other format, the load fails and says so."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from trainer.core.config import OptimConfig
    from trainer.train.optim import build_optimizer

    def fresh(seed: int) -> tuple[Transformer, torch.optim.Optimizer]:
        m = model(seed=seed)
        return m, build_optimizer(m, m.cfg, OptimConfig())

    trained, optimizer = fresh(1)
    trained(torch.randint(0, 64, (2, 16))).square().mean().backward()
    optimizer.step()
    step = jobdir.step_dir(tmp_path, 1)
    model_state, optim_state = get_state_dict(trained, optimizer,
                                              options=StateDictOptions(flatten_optimizer_state_dict=flat))
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(step), no_dist=True)
    jobdir.mark_complete(step, {"step": 1})
    assert checkpoint.optimizer_flat(step) is flat

    restored, into = fresh(2)
    parts = checkpoint.Parts(restored, into, None, None, print, lambda *_: None)
    checkpoint.load_parts(tmp_path, 1, {"model", "optimizer"}, parts)
    for (name, param), theirs in zip(restored.named_parameters(), trained.parameters(), strict=True):
        assert torch.equal(param, theirs), name
        assert torch.equal(into.state[param]["exp_avg_sq"], optimizer.state[theirs]["exp_avg_sq"]), name
    assert [g["lr_mult"] for g in into.param_groups] == [g["lr_mult"] for g in optimizer.param_groups]

    other, wrong = fresh(3)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(checkpoint.CheckpointError, match="Missing key"):
        patch.setattr(checkpoint, "optimizer_flat", lambda path: not flat)
        checkpoint.load_parts(tmp_path, 1, {"model", "optimizer"}, checkpoint.Parts(other, wrong, None, None, print,
                                                                                    lambda *_: None))
