"""Optimizer groups from the muP plan, and the learning-rate schedules."""

from __future__ import annotations

import pytest

from trainer.core.config import ModelConfig, MupConfig, OptimConfig
from trainer.train.model import Transformer
from trainer.train.optim import build_optimizer, build_scheduler, lr_factor


def test_groups_carry_the_mup_multipliers() -> None:
    cfg = ModelConfig(dim=128, n_layers=2, n_heads=4, vocab_size=64, mup=MupConfig(enabled=True, base_dim=32))
    model = Transformer(cfg, 16)
    optimizer = build_optimizer(model, cfg, OptimConfig(lr=1e-2, weight_decay=0.1))
    by_mult = {round(g["lr_mult"], 6): g for g in optimizer.param_groups}
    assert by_mult[0.25]["lr"] == pytest.approx(2.5e-3) and by_mult[0.25]["weight_decay"] == pytest.approx(0.4)
    assert by_mult[1.0]["lr"] == pytest.approx(1e-2)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    norms = [g for g in optimizer.param_groups if g["weight_decay"] == 0.0]
    assert len(norms) == 1 and len(norms[0]["params"]) == 2 * 2 + 1  # two per block, plus the final norm


def factors(optim: OptimConfig, total: int = 100) -> list[float]:
    return [lr_factor(step, total, optim) for step in range(total)]


def test_schedules() -> None:
    cosine = factors(OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1))
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == 1.0 and cosine[10] == 1.0
    assert cosine[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(cosine[10:-1], cosine[11:], strict=True))
    wsd = factors(OptimConfig(warmup_steps=10, schedule="wsd", decay_steps=20, decay_shape="linear", min_lr_ratio=0))
    assert wsd[50] == 1.0 and wsd[79] == 1.0 and wsd[90] == pytest.approx(0.5) and wsd[99] == pytest.approx(0.05)
    sqrt = factors(OptimConfig(warmup_steps=0, schedule="wsd", decay_steps=20, min_lr_ratio=0))
    assert sqrt[85] == pytest.approx(1 - (5 / 20) ** 0.5)
    assert set(factors(OptimConfig(warmup_steps=0, schedule="constant"))) == {1.0}


def test_scheduler_scales_every_group() -> None:
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=64, mup=MupConfig(enabled=True, base_dim=32))
    optimizer = build_optimizer(Transformer(cfg, 8), cfg, OptimConfig(lr=1.0, warmup_steps=4))
    scheduler = build_scheduler(optimizer, 10, OptimConfig(lr=1.0, warmup_steps=4))
    assert sorted(g["lr"] for g in optimizer.param_groups) == [0.125, 0.25, 0.25]
    optimizer.step()
    scheduler.step()
    assert sorted(g["lr"] for g in optimizer.param_groups) == [0.25, 0.5, 0.5]
