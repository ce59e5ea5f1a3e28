"""lm-eval on an exported model, offline: the local tasks shipped in `evals/` plus any task lm-eval has offline;
results saved in the job directory and printed as a table. `anvil_heldout` scores the same text with the same
windows as the trainer's own held-out loss (`trainer.train.heldout`), so the two compare number for number.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import sys
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

from trainer.core.config import AnvilConfig
from trainer.export.cloze import cloze_items
from trainer.export.deps import install_line
from trainer.train.heldout import EvalError, heldout_texts

LOCAL_TASKS = ("anvil_heldout", "anvil_cloze", "anvil_mc")
EVALS_DIR = Path(str(importlib.resources.files("trainer.export") / "evals"))
"""The local tasks' data (package data: found through the package, in a checkout and in an installed wheel)."""


NOTES = {
    ("anvil_heldout", "bits_per_byte"): "held-out text; lower is better (the trainer logs the same)",
    ("anvil_cloze", "acc"): "a document's next line among 4 (chance 0.25): needs the context",
    ("anvil_mc", "acc"): "Python keywords, answered by word frequency: the path works",
}
"""One line on each metric of the local tasks, printed beside it."""


def _metric(name: str, aggregation: str, better: str) -> dict:
    """A metric with its aggregation and direction stated (left out, lm-eval warns that it picks defaults)."""
    return {"metric": name, "aggregation": aggregation, "higher_is_better": better == "higher"}


def _fits_window(cfg: AnvilConfig):
    """Whether a text fits the model's window as lm-eval encodes it (the tokenizer the export ships)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(cfg.data.tokenizer))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids) <= cfg.data.seq_len


def write_tasks(cfg: AnvilConfig, folder: Path, tasks: list[str]) -> None:
    """Task YAMLs (and the held-out jsonl) for the local tasks asked for: lm-eval wants absolute data paths."""
    folder.mkdir(parents=True, exist_ok=True)
    if "anvil_heldout" in tasks:
        data = folder / "heldout.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in heldout_texts(cfg, "anvil_heldout")))
        spec = {"task": "anvil_heldout", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
                "doc_to_target": "{{text}}",
                "metric_list": [_metric("bits_per_byte", "bits_per_byte", better="lower")]}
        (folder / "anvil_heldout.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    if "anvil_cloze" in tasks:
        data = folder / "cloze.jsonl"
        items = cloze_items(heldout_texts(cfg, "anvil_cloze"), fits=_fits_window(cfg))
        if not items:
            raise EvalError(f"eval.heldout: {cfg.eval.heldout} has no lines anvil_cloze can ask about (it needs "
                            "documents of several lines); leave anvil_cloze out of eval.tasks")
        data.write_text("".join(json.dumps(item.as_record()) + "\n" for item in items))
        # The fields themselves (not templates), and no delimiter: the context ends with the answer's indentation.
        spec = {"task": "anvil_cloze", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "context",
                "doc_to_choice": "choices", "doc_to_target": "answer", "target_delimiter": "",
                "metric_list": [_metric("acc", "mean", better="higher")]}
        (folder / "anvil_cloze.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    if "anvil_mc" in tasks:
        spec = {"task": "anvil_mc", "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(EVALS_DIR / "anvil_mc.jsonl")}},
                "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
                "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                "metric_list": [_metric("acc", "mean", better="higher")]}
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
    except ImportError as exc:  # convert.py checked it is installed (deps.require): here when it does not import
        raise EvalError(f"lm-eval cannot be imported ({exc}): {install_line('eval')}") from None
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
    out_dir.mkdir(parents=True, exist_ok=True)
    with _output_to(out_dir / LOG):
        results = lm_eval.simple_evaluate(model=kind, model_args=args, tasks=tasks, batch_size=cfg.eval.batch_size,
                                          task_manager=TaskManager(include_path=str(task_dir)), log_samples=False)
    if results is None:
        raise EvalError("lm-eval returned no results")
    summary = {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, int | float) and "stderr"
                      not in k} for task, metrics in results["results"].items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"model": str(model_dir), "backend": kind,
                                                      "results": summary, "n-samples": results.get("n-samples", {})},
                                                     indent=2, default=str) + "\n")
    return summary


LOG = "lm-eval.log"
"""lm-eval's own output (progress bars, notices, warnings), kept in the evaluation's folder."""


@contextlib.contextmanager
def _output_to(log: Path):
    """This process's stdout and stderr, file descriptors included (progress bars, logging, C libraries), go to `log`
    for the duration; if the block fails, the log's tail is shown with the error."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log, "a", buffering=1, errors="replace") as out:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):  # where sys.std* are not fds
                    yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    except Exception as exc:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        raise EvalError(f"lm-eval failed ({type(exc).__name__}: {exc}); the end of its output ({log}):\n"
                        + "\n".join(tail)) from exc
    finally:
        for fd in saved:
            os.close(fd)


def print_results(summary: dict, title: str) -> None:
    table = Table(title=title)
    for column in ("task", "metric", "value", "what it measures"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for task, metrics in summary.items():
        for metric, value in metrics.items():
            if metric != "sample_len":  # how many documents or items: results.json has it
                table.add_row(task, metric, f"{value:.4f}", NOTES.get((task, metric), "lm-eval's"))
    Console(width=120).print(table)
