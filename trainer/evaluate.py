"""lm-eval on an exported model, offline: the local tasks in `evals/` plus any task lm-eval has offline;
results saved in the job directory and printed as a table. And the trainer's own held-out loss on the
same text, computed with the same windows, so the two can be compared number for number.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from rich.console import Console
from rich.table import Table

from trainer.config import AnvilConfig
from trainer.data.tools import iter_texts
from trainer.jobdir import REPO_ROOT

LOCAL_TASKS = ("anvil_heldout", "anvil_mc")


class EvalError(Exception):
    """An evaluation that cannot run; the message says what to set."""


def heldout_texts(cfg: AnvilConfig) -> list[str]:
    if cfg.eval.heldout is None:
        raise EvalError("eval.heldout is not set: give a Parquet dataset of held-out text for anvil_heldout "
                        "(the demo's is data/demo/val), or leave anvil_heldout out of eval.tasks")
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


def write_tasks(cfg: AnvilConfig, folder: Path, tasks: list[str]) -> None:
    """Task YAMLs (and the held-out jsonl) for the local tasks asked for: lm-eval wants absolute data paths."""
    folder.mkdir(parents=True, exist_ok=True)
    if "anvil_heldout" in tasks:
        data = folder / "heldout.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in heldout_texts(cfg)))
        spec = {"task": "anvil_heldout", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
                "doc_to_target": "{{text}}",
                "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]}
        (folder / "anvil_heldout.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    if "anvil_mc" in tasks:
        spec = {"task": "anvil_mc", "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(REPO_ROOT / "evals" / "anvil_mc.jsonl")}},
                "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
                "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
        (folder / "anvil_mc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def backend(cfg: AnvilConfig) -> str:
    if cfg.eval.backend != "auto":
        return cfg.eval.backend
    if torch.cuda.is_available():
        try:
            import vllm  # noqa: F401

            return "vllm"
        except ImportError:
            pass
    return "hf"


def run_lm_eval(cfg: AnvilConfig, model_dir: Path, out_dir: Path, tasks: list[str] | None = None) -> dict:
    """Evaluate the exported folder; returns {task: {metric: value}} and writes the full results JSON."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("lm-eval is not installed: pip install -e '.[eval]'") from None
    tasks = list(tasks or cfg.eval.tasks)
    task_dir = out_dir / "tasks"
    write_tasks(cfg, task_dir, [t for t in tasks if t in LOCAL_TASKS])
    kind = backend(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The window the model was trained on: lm-eval's rolling windows then match the trainer's packing.
    args = {"pretrained": str(model_dir), "max_length": cfg.data.seq_len, "dtype": "float32" if device == "cpu"
            else "bfloat16"}
    if kind == "hf":
        args["device"] = device
    results = lm_eval.simple_evaluate(model=kind, model_args=args, tasks=tasks, batch_size=cfg.eval.batch_size,
                                      task_manager=TaskManager(include_path=str(task_dir)), log_samples=False)
    if results is None:
        raise EvalError("lm-eval returned no results")
    summary = {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, int | float) and "stderr"
                      not in k} for task, metrics in results["results"].items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"model": str(model_dir), "backend": kind,
                                                      "results": summary}, indent=2, default=str) + "\n")
    return summary


def print_results(summary: dict, title: str) -> None:
    table = Table(title=title)
    for column in ("task", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for task, metrics in summary.items():
        for metric, value in metrics.items():
            table.add_row(task, metric, f"{value:.4f}")
    Console(width=120).print(table)


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
