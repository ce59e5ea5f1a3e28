"""`convert.py`: a job's checkpoint → a Hugging Face folder (and optionally the Hub); or, with `--from-hf`,
a Hugging Face Llama folder → a DCP checkpoint for `checkpoint.init_from`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from trainer import checkpoint
from trainer.evaluate import EvalError, print_results, run_lm_eval
from trainer.export import ExportError, export
from trainer.hub import HubError, check_repo_id, model_card, require_token, upload, upload_plan


def choose_step(job: Path, step: int | None) -> Path:
    root = job / "checkpoints"
    complete = [s for s, _, done in checkpoint.list_steps(root) if done]
    listing = ", ".join(f"step-{s}" for s in complete) or "none"
    if step is None:
        if not complete:
            raise ExportError(f"{root} holds no complete checkpoint yet: train the job first")
        return checkpoint.step_path(root, complete[-1])
    path = checkpoint.step_path(root, step)
    if not path.is_dir():
        raise ExportError(f"{path} does not exist; complete checkpoints: {listing}")
    if step not in complete:
        raise ExportError(f"{path} is incomplete (interrupted while saving); complete checkpoints: {listing}")
    return path


def sample(model_dir: Path, prompt: str, new_tokens: int = 40) -> str:
    """What vanilla transformers makes of the export: proof that it loads and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False)
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(0)
    output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=True, top_p=0.95, temperature=0.8,
                            pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert.py",
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
    parser.add_argument("--sample", metavar="PROMPT", help="then print a sample the exported model generates")
    parser.add_argument("--from-hf", action="store_true",
                        help="import: SOURCE is a local HF Llama folder; OUT gets step-0/ for checkpoint.init_from")
    return parser


def _import(args: argparse.Namespace) -> int:
    from trainer.hf_import import import_hf, model_config

    step_dir = import_hf(args.source, model_config(args.source), args.out)
    print(f"imported {args.source} -> {step_dir}; start a job from it with checkpoint.init_from={step_dir} "
          "(the job's model must have the same shape; muP settings of the job are taken into account)")
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.from_hf:
            return _import(args)
        if not (args.source / "config.json").is_file():
            raise ExportError(f"{args.source} is not a job directory (no config.json)")
        if args.upload:  # before any work: a missing token or a malformed name should not cost an export
            check_repo_id(args.upload)
            if not args.dry_run:
                require_token()
        from trainer.train import load_job_config

        cfg = load_job_config(args.source)
        step_dir = choose_step(args.source, args.step)
        step = int(step_dir.name.removeprefix("step-"))
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        out = export(cfg, step_dir, args.out, dtype, card=model_card(cfg, args.source, step))
        print(f"exported {step_dir} -> {out} ({args.dtype}); load it with "
              f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
        if args.upload:
            revision = args.revision or f"step-{step}"
            plan = upload_plan(out, args.upload, revision, args.private)
            if args.dry_run:
                print("dry run: would upload\n" + "\n".join(plan))
            else:
                print(f"uploaded: {upload(out, args.upload, revision, args.private)}")
        if args.eval is not None:
            tasks = [t for t in args.eval.split(",") if t] or None
            summary = run_lm_eval(cfg, out, args.source / "eval" / f"step-{step}", tasks)
            print_results(summary, f"lm-eval on {out} (step {step}); saved in {args.source / 'eval' / f'step-{step}'}")
        if args.sample is not None:
            print(f"sample: {sample(out, args.sample)}")
    except (ExportError, HubError, EvalError) as exc:
        print(f"convert.py: {exc}", file=sys.stderr)
        return 2
    return 0
