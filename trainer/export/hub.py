"""The model card of an export, and its upload to the Hugging Face Hub: one repository per job, one revision
(branch) per checkpoint step. The token comes only from the environment (`HF_TOKEN`), never from a file of
the job; `--dry-run` lists what would be sent and touches no network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import HfApi

from trainer.core.config import AnvilConfig
from trainer.core.costs import num_params
from trainer.core.errors import AnvilError
from trainer.core.jobdir import JobDir

TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class HubError(AnvilError):
    """An upload that cannot start; the message says what to set."""


def training_summary(job: JobDir, step: int) -> dict:
    """What the job's metrics say about the run up to `step` (empty if they were not kept)."""
    path = job.metrics
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("step", 0) <= step and "loss" in r]
    if not rows:
        return {}
    last = rows[-1]
    return {"step": last["step"], "tokens_seen": last.get("tokens_seen"), "loss": last.get("loss"),
            "first_logged_loss": rows[0].get("loss")}


def model_card(cfg: AnvilConfig, job: JobDir, step: int) -> str:
    summary = training_summary(job, step)
    m = cfg.model
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [anvil, llama]", "---", "",
        f"# {cfg.job.name} (step {step})", "",
        f"A Llama-architecture model ({num_params(m) / 1e6:.1f}M parameters: {m.n_layers} layers, width {m.dim}, "
        f"{m.n_heads} heads, {m.kv_heads} key/value heads, vocabulary {m.vocab_size}) trained with "
        f"Anvil and exported from its checkpoint at step {step}. It loads in `transformers` with no custom code"
        + (" (muP's multipliers are folded into the weights)." if m.mup.enabled else "."), "",
    ]
    if summary:
        lines += ["## Training", "", f"- steps: {summary['step']} of {cfg.train.steps} planned",
                  f"- tokens seen: {summary['tokens_seen']:,}" if summary.get("tokens_seen") else "- tokens seen: ?",
                  f"- training loss at the last logged step: {summary['loss']:.4f} "
                  f"(first logged: {summary['first_logged_loss']:.4f})", ""]
    shown = cfg.model_dump(mode="json", include={"model", "optim", "train", "data", "parallel"})
    lines += ["## Configuration", "", "```json", json.dumps(shown, indent=2), "```", ""]
    return "\n".join(lines)


def require_token() -> str:
    token = next((os.environ[v] for v in TOKEN_VARIABLES if os.environ.get(v)), None)
    if token is None:
        raise HubError("no Hugging Face token: export HF_TOKEN=... in this shell (it is read from the environment "
                       "only, never stored), or use --dry-run to see what would be sent")
    return token


def check_repo_id(repo_id: str) -> None:
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"--upload: '{repo_id}' is not ORG/NAME")


def upload_plan(folder: Path, repo_id: str, revision: str, private: bool) -> list[str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    lines = [f"repository {repo_id} ({'private' if private else 'public'}), revision (branch) {revision}",
             f"{len(files)} files, {total / 2**20:.1f} MiB:"]
    lines += [f"  {p.relative_to(folder)}  {p.stat().st_size:,} bytes" for p in files]
    return lines


def upload(folder: Path, repo_id: str, revision: str, private: bool = False) -> str:
    """Create the repository and the revision if needed, then send the folder as one commit; returns its URL."""
    check_repo_id(repo_id)
    api = HfApi(token=require_token())
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision, repo_type="model",
                               commit_message=f"Anvil export: {folder.name} at {revision}")
    return str(getattr(commit, "commit_url", commit))
