"""A pipeline's stages from the config alone: which layers each stage holds, which rank holds which stages, and the
bubble its schedule leaves. torch-free: submit checks and prints these, the planner uses them, the trainer builds
its stages from them, so they cannot disagree.
"""

from __future__ import annotations

from trainer.core.config import PP_SCHEDULES, AnvilConfig
from trainer.core.costs import num_params


def layer_costs(cfg: AnvilConfig) -> tuple[float, float, float]:
    """Training FLOPs per token of one block, of the embedding (its lookup and gradient scatter) and of the final
    norm and head, as `costs.flops_per_token` counts them."""
    m = cfg.model
    per_block = (num_params(m, embeddings=False) - m.dim) / m.n_layers
    attention = 6 * m.n_heads * m.head_dim * cfg.data.seq_len  # causal: half of the two matmuls' 12
    return 6 * per_block + attention, 2 * m.dim, 6 * m.vocab_size * m.dim + 6 * m.dim


def stage_layers(cfg: AnvilConfig) -> list[range]:
    """The layers of each stage, in order: `parallel.pp_split` where given, else contiguous runs that make the most
    expensive stage as cheap as can be (the embedding counted with the first, the head with the last)."""
    stages, layers = cfg.pp_stages, cfg.model.n_layers
    if layers < stages:  # refused at submit (`checks.pipeline_problems`)
        raise ValueError(f"{layers} layers cannot fill {stages} pipeline stages")
    if cfg.parallel.pp_split is not None:
        bounds = [0, *cfg.parallel.pp_split, layers]
        return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
    block, first, last = layer_costs(cfg)

    def cost(stage: int, start: int, end: int) -> float:
        return (end - start) * block + (first if stage == 0 else 0) + (last if stage == stages - 1 else 0)

    # best[s][i]: the cheapest largest-stage cost of layers[:i] in s + 1 stages, and where the last one begins.
    inf = float("inf")
    best = [[(inf, 0)] * (layers + 1) for _ in range(stages)]
    for i in range(1, layers + 1):
        best[0][i] = (cost(0, 0, i), 0)
    for s in range(1, stages):
        for i in range(s + 1, layers + 1):
            best[s][i] = min((max(best[s - 1][j][0], cost(s, j, i)), j) for j in range(s, i))
    bounds, end = [], layers
    for s in range(stages - 1, -1, -1):
        start = best[s][end][1]
        bounds.append(range(start, end))
        end = start
    return bounds[::-1]


def rank_stages(cfg: AnvilConfig, pp_rank: int) -> list[int]:
    """The stages rank `pp_rank` of a pipeline holds: one; several looped round the ranks (r, r + pp, ...); or two
    in a V (r and 2·pp − 1 − r), as the schedule expects."""
    p = cfg.parallel
    kind = PP_SCHEDULES[p.pp_schedule]
    if kind == "v":
        return [pp_rank, 2 * p.pp - 1 - pp_rank]
    return [pp_rank + k * p.pp for k in range(p.pp_stages_per_rank)]


def bubble(cfg: AnvilConfig) -> tuple[float, str]:
    """The share of a step a pipeline rank idles, and how it is known: (p − 1) / (v·m + p − 1) for p ranks, v stages
    each and m micro-batches (GPipe, 1F1B, the looped schedules); the zero-bubble schedules fill part of it with
    weight gradients, so theirs is at most that."""
    p, v, m = cfg.parallel.pp, cfg.parallel.pp_stages_per_rank, cfg.accumulation
    fraction = (p - 1) / (v * m + p - 1)
    if "zero-bubble" in cfg.parallel.pp_schedule or cfg.parallel.pp_schedule == "dualpipev":
        return fraction, "at most (weight gradients fill part of it)"
    return fraction, "(p − 1) / (v·m + p − 1)"
