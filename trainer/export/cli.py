"""`convert.py`: a job's checkpoint → a Hugging Face folder (and optionally the Hub, lm-eval, a sample); or, with
`--from-hf`, a Hugging Face Llama folder → a DCP checkpoint for `checkpoint.init_from`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from trainer.core.commands import command
from trainer.core.errors import run_command
from trainer.core.jobdir import JobDir, JobDirError, step_of
from trainer.export import deps
from trainer.export.evaluation import print_results, run_lm_eval
from trainer.export.hf import export
from trainer.export.hf_import import import_hf, model_config
from trainer.export.hub import check_repo_id, model_card, require_token, upload, upload_plan
from trainer.train import checkpoint

SAMPLE_TOKENS = 40
"""New tokens `--sample` generates."""


def sample(model_dir: Path, prompt: str, new_tokens: int = SAMPLE_TOKENS) -> str:
    """What vanilla transformers makes of the export: its greedy continuation of `prompt` (deterministic, so that
    a server started on the export can be checked against it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the sample is what the user reads, not a "Loading weights" bar
    hf_logging.set_verbosity_error()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False)
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=command("convert"),
        description="Export a job's checkpoint as a Hugging Face LlamaForCausalLM folder (safetensors) that loads "
                    "with no custom code, and optionally upload it; or import a Hugging Face Llama (--from-hf).")
    parser.add_argument("source", type=Path, help="the job directory (jobs/<name>), or an HF folder with --from-hf")
    parser.add_argument("out", type=Path, help="the output folder (must not exist)")
    parser.add_argument("--step", type=int, help="the checkpoint step (default: the newest complete one)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="stored dtype (default bf16)")
    parser.add_argument("--upload", metavar="ORG/NAME", help="then upload to this Hub repository (token: HF_TOKEN)")
    parser.add_argument("--revision", help="the Hub branch to upload to (default: step-N)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--dry-run", action="store_true", help="with --upload: list what would be sent, send nothing")
    parser.add_argument("--eval", nargs="?", const="", metavar="TASKS",
                        help="then run lm-eval on the export: comma-separated tasks (default: eval.tasks of the job); "
                             "results go to jobs/<name>/eval/step-N/")
    parser.add_argument("--sample", metavar="PROMPT",
                        help=f"then print the exported model's greedy continuation of PROMPT ({SAMPLE_TOKENS} tokens)")
    parser.add_argument("--from-hf", action="store_true",
                        help="import: SOURCE is a local HF Llama folder; OUT gets step-0/ for checkpoint.init_from")
    return parser


def _import(args: argparse.Namespace) -> int:
    imported = import_hf(args.source, model_config(args.source), args.out)
    print(f"imported {args.source} -> {imported}; start a job from it with checkpoint.init_from={imported} "
          "(the job's model must have the same shape; muP settings of the job are taken into account)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`convert.py SOURCE OUT [options]`; returns the exit code."""
    return run_command(_convert, argv)


def _convert(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.from_hf:
        return _import(args)
    # Before any work: a missing package should not end the run in a traceback after a minutes-long export.
    needs: dict[str, tuple[str, ...]] = {}
    if args.eval is not None:
        needs["--eval"] = deps.EVAL
    if args.sample is not None:
        needs["--sample"] = deps.SAMPLE
    deps.require(needs)
    job = JobDir(args.source)
    if not job.config.is_file():
        raise JobDirError(f"{args.source} is not a job directory (no {job.config.name})")
    if args.upload:  # before any work: a missing token or a malformed name should not cost an export
        check_repo_id(args.upload)
        if not args.dry_run:
            require_token()
    cfg = job.read_config()
    if args.eval is not None and cfg.eval.backend == "vllm":
        deps.require({"--eval (eval.backend: vllm)": deps.VLLM})
    source, notes = checkpoint.pick(job.checkpoints, args.step)
    for note in notes:
        print(f"{note}: exporting {source.name}, the newest whole checkpoint")
    step = step_of(source)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    out = export(cfg, source, args.out, dtype, card=model_card(cfg, job, step))
    print(f"exported {source} -> {out} ({args.dtype}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    if args.upload:
        revision = args.revision or source.name
        plan = upload_plan(out, args.upload, revision, args.private)
        if args.dry_run:
            print("dry run: would upload\n" + "\n".join(plan))
        else:
            print(f"uploaded: {upload(out, args.upload, revision, args.private)}")
    if args.eval is not None:
        tasks = [t for t in args.eval.split(",") if t] or None
        summary = run_lm_eval(cfg, out, job.eval_dir(step), tasks)
        print_results(summary, f"lm-eval on {out} (step {step}); saved in {job.eval_dir(step)}")
    if args.sample is not None:
        print(f"sample (greedy, {SAMPLE_TOKENS} tokens): {args.sample}{sample(out, args.sample)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
