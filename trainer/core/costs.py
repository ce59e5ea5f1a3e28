"""What a model costs, from its config alone: parameters (all, or the ones a token uses) and training FLOPs per token.

One count for everything that reports it — the log's first line and MFU (trainer/train/metrics.py), the planner
(trainer/plan), scaling studies — so a FLOP means the same everywhere. No torch: the launch side plans with it.
"""

from __future__ import annotations

from trainer.core.config import ModelConfig


def num_params(cfg: ModelConfig, embeddings: bool = True, active: bool = False) -> int:
    """Parameters of the model; with `active`, only those a token uses (k experts of each mixture, its router, and
    its shared expert and gate)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    norms = 2 * cfg.dim + (2 * cfg.head_dim if cfg.qk_norm else 0)
    moe = cfg.moe
    if moe.experts:
        experts = moe.top_k if active else moe.experts
        ffn = (experts * 3 * cfg.dim * cfg.expert_hidden + cfg.dim * moe.experts + 3 * cfg.dim * cfg.shared_hidden
               + (cfg.dim if moe.shared_expert_gate else 0))
    else:
        ffn = 3 * cfg.dim * cfg.ffn_hidden
    per_layer = cfg.dim * (2 * q + 2 * kv) + ffn + norms
    emb = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layers * per_layer + cfg.dim + (emb if embeddings else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs (forward and backward, no recomputation) per token: 6 × the weights a token multiplies (the
    readout included, the embedding lookup not; with experts: k of them, and the router) plus attention's two
    matmuls per layer. `causal`: the half of the score matrix a causal kernel computes (what MFU counts); False:
    the whole square, as PaLM's formula and torch's FLOP counter count it."""
    dense = num_params(cfg, embeddings=False, active=True) + cfg.vocab_size * cfg.dim
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return 6 * dense + (attention / 2 if causal else attention)
