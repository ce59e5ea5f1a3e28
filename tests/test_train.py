"""The trainer end to end on CPU with gloo: numerics across parallel layouts, exact resume, kill -9 at random
moments, NaN handling and bad checkpoints. Real Parquet, a real BPE tokenizer, real DCP checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train_helpers import free_port, losses, make_job, run_trainer, trainer_env
from trainer.data.tools import build_demo

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real text that ships with the machine, a BPE tokenizer trained on it (~4 s)."""
    out = tmp_path_factory.mktemp("corpus")
    build_demo(out, max_mb=1, vocab_size=512)
    return out


LAYOUTS = {
    "1 process": (1, []),
    "FSDP2 on 2 ranks, full AC": (2, ["parallel.dp_shard=2", "parallel.activation_checkpoint=full"]),
    "TP 2 ranks, selective AC": (2, ["parallel.tp=2", "parallel.activation_checkpoint=selective"]),
    "FSDP 2 x TP 2": (4, ["parallel.dp_shard=2", "parallel.tp=2"]),
    "HSDP 2 x 2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
}


def numerics(job: Path, ranks: int, out: Path) -> list[list[float]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
           str(free_port()), str(REPO / "tests" / "numerics_worker.py"), str(job), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=trainer_env(), cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_parallel_layout_gives_the_same_losses(tmp_path: Path, corpus: Path) -> None:
    results = {}
    for i, (name, (ranks, overrides)) in enumerate(LAYOUTS.items()):
        job = make_job(tmp_path, f"layout{i}", corpus, f"cluster.devices_per_node={ranks}",
                       "train.mixed_precision=fp32", *overrides)
        results[name] = numerics(job, ranks, tmp_path / f"layout{i}.json")
    reference = results["1 process"]
    assert len(reference) == 10 and reference[-1][0] < reference[0][0]  # it learns
    for name, got in results.items():
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, reference, strict=True), 1):
            assert abs(loss - ref_loss) <= 1e-5, f"{name}: step {step} loss {loss} vs {ref_loss}"
            assert abs(norm - ref_norm) <= 1e-4 * max(ref_norm, 1), f"{name}: step {step} grad norm {norm} vs {ref_norm}"
