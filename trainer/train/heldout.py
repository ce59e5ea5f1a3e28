"""Held-out scoring: bits per byte of the model on held-out text, computed by the training model itself (on every
rank, during training: `eval.every`) with the same windows lm-eval uses on the export, so the two numbers agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.core.config import AnvilConfig
from trainer.core.errors import AnvilError
from trainer.data.tools import iter_texts


class EvalError(AnvilError):
    """An evaluation that cannot run; the message says what to set."""


def heldout_texts(cfg: AnvilConfig, task: str = "anvil_heldout") -> list[str]:
    if cfg.eval.heldout is None:
        raise EvalError(f"eval.heldout is not set: give a Parquet dataset of held-out text for {task} "
                        f"(the demo's is data/demo/val), or leave {task} out of eval.tasks")
    texts = [t for t in iter_texts(cfg.eval.heldout) if t.strip()][: cfg.eval.heldout_docs]
    if not texts:
        raise EvalError(f"eval.heldout: {cfg.eval.heldout} holds no text")
    return texts


@dataclass(frozen=True)
class HeldOut:
    """The held-out documents, tokenized as training packs them: no specials added, after one EOS."""

    texts: list[str]
    tokens: list[list[int]]
    prefix_id: int


def heldout_set(cfg: AnvilConfig) -> HeldOut:
    from tokenizers import Tokenizer

    texts = heldout_texts(cfg)
    tokenizer = Tokenizer.from_file(cfg.data.tokenizer)
    # One by one: encode_batch would start the tokenizer's thread pool in this process, and the trainer's
    # loader forks its workers later.
    tokens = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    return HeldOut(texts, tokens, tokenizer.token_to_id(cfg.data.eos_token))


@torch.no_grad()
def heldout_bits_per_byte(model: torch.nn.Module, heldout: HeldOut, seq_len: int,
                          device: torch.device | str = "cpu") -> float:
    """The trainer's held-out loss in bits per byte: each document after one EOS (as packed in training),
    scored in windows of at most `seq_len` predictions, each seeing up to `seq_len` tokens. Under FSDP or TP
    every rank must call it with the same documents (the forward passes are collectives)."""
    total_nll = torch.zeros((), device=device, dtype=torch.float64)
    for tokens in heldout.tokens:
        seq = torch.tensor([heldout.prefix_id, *tokens], device=device)
        targets = torch.tensor(tokens, device=device)
        for start in range(0, len(tokens), seq_len):
            end = min(start + seq_len, len(tokens))
            window = seq[max(0, end - seq_len):end].unsqueeze(0)
            logits = model(window)[0, -(end - start):].float()
            total_nll += F.cross_entropy(logits, targets[start:end], reduction="sum")
    total_bytes = sum(len(t.encode("utf-8")) for t in heldout.texts)
    return total_nll.item() / math.log(2) / total_bytes
