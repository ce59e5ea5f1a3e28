"""lm-eval (transformers backend, offline) on an exported model: the local tasks run, and the held-out bits per
byte lm-eval reports equal the trainer's own held-out loss on the same text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from tests.test_export import trained_step, trainer_model
from trainer.core.jobdir import JobDir
from trainer.export.cloze import cloze_items
from trainer.export.evaluation import run_lm_eval
from trainer.export.hf import export
from trainer.train.heldout import EvalError, heldout_bits_per_byte, heldout_set, heldout_texts

pytestmark = pytest.mark.xdist_group("trained-exports")  # shares test_export.py's trained jobs


def test_lm_eval_bits_per_byte_equal_the_trainers_heldout_loss(tmp_path: Path, corpus: Path, capfd) -> None:
    job, step = trained_step(tmp_path, corpus, "src", f"eval.heldout={corpus / 'val'}", "eval.heldout_docs=12",
                             "train.steps=6", "checkpoint.interval=6", "eval.every=3")
    cfg = JobDir(job).read_config()
    out = export(cfg, step, tmp_path / "hf")
    capfd.readouterr()
    summary = run_lm_eval(cfg, out, job / "eval" / "step-6")
    assert (job / "eval" / "step-6" / "results.json").is_file()
    # lm-eval's progress bars and notices go to its log, not the terminal; no choice is cut to the model's window,
    # and no metric is left to lm-eval's defaults.
    printed = capfd.readouterr()
    assert printed.out == printed.err == "", printed
    log = (job / "eval" / "step-6" / "lm-eval.log").read_text()
    assert "Running loglikelihood requests" in log
    assert "Combined length of context" not in log and "default aggregation" not in log.lower(), log[-3000:]
    tokenizer = Tokenizer.from_file(cfg.data.tokenizer)
    cloze = [json.loads(line) for line in (job / "eval" / "step-6" / "tasks" / "cloze.jsonl").read_text().splitlines()]
    longest = max(len(tokenizer.encode(item["context"] + choice).ids) for item in cloze for choice in item["choices"])
    assert longest <= cfg.data.seq_len
    uncut = cloze_items(heldout_texts(cfg, "anvil_cloze"))  # the control: contexts of up to 3,000 characters
    assert max(len(tokenizer.encode(item.context).ids) for item in uncut) > cfg.data.seq_len
    assert 0.0 <= summary["anvil_mc"]["acc"] <= 1.0
    results = json.loads((job / "eval" / "step-6" / "results.json").read_text())
    items = (job / "eval" / "step-6" / "tasks" / "cloze.jsonl").read_text().splitlines()
    assert len(items) >= 50 and results["n-samples"]["anvil_cloze"]["effective"] == len(items)
    assert 0.0 <= summary["anvil_cloze"]["acc"] <= 1.0

    ours = heldout_bits_per_byte(trainer_model(job, step), heldout_set(cfg), cfg.data.seq_len)
    theirs = summary["anvil_heldout"]["bits_per_byte"]
    assert abs(ours - theirs) <= 1e-4 * ours, (ours, theirs)
    # The same number, computed during training by the 2 FSDP ranks (eval.every) and logged.
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    during = {r["step"]: r["heldout_bits_per_byte"] for r in rows if "heldout_bits_per_byte" in r}
    assert sorted(during) == [3, 6] and abs(during[6] - ours) <= 1e-5 * ours, (during, ours)


def test_heldout_task_without_heldout_data_is_named(tmp_path: Path, corpus: Path) -> None:
    job, step = trained_step(tmp_path, corpus, "src", "train.steps=2")
    with pytest.raises(EvalError, match="eval.heldout is not set"):
        run_lm_eval(JobDir(job).read_config(), tmp_path / "unused", tmp_path / "eval")
