"""The batch script's launcher (`python -m trainer.train.torchrun`): a failed rank ends the job's error log with the
rank's own message and one line, never torchrun's traceback, and its exit code reaches the script."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.train_helpers import trainer_env
from trainer.train.torchrun import exit_code


def command(launcher: str, *target: str) -> list[str]:
    return [sys.executable, "-m", launcher, "--standalone", "--nproc-per-node=1", *target]


def launch(launcher: str, *target: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(launcher, *target), capture_output=True, text=True, timeout=300, env=trainer_env())


def test_a_refused_config_ends_in_the_trainers_message_not_a_traceback(tmp_path: Path) -> None:
    job = tmp_path / "edited"
    job.mkdir()
    (job / "config.json").write_text("{ broken")  # edited by hand after submission
    done = launch("trainer.train.torchrun", "-m", "trainer.train", str(job))
    assert done.returncode == 2, done.stderr[-2000:]  # the trainer's own code for a refusal, not torchrun's 1
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-2000:]
    assert f"anvil: {job / 'config.json'} is not a valid Anvil config" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].endswith("exited with code 2 (its own output is above)")
    # Control: torchrun itself buries the same message under its traceback and exits 1.
    plain = launch("torch.distributed.run", "-m", "trainer.train", str(job))
    assert plain.returncode == 1 and "Traceback" in plain.stderr and "ChildFailedError" in plain.stderr


def test_a_ranks_exit_code_reaches_the_batch_script(tmp_path: Path) -> None:
    rank = tmp_path / "rank.py"
    rank.write_text("import sys\nsys.exit(75)\n")  # the trainer's code for "preempted, checkpoint saved"
    done = launch("trainer.train.torchrun", str(rank))
    assert done.returncode == 75 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert exit_code(-signal.SIGKILL) == 128 + signal.SIGKILL  # killed by a signal: as a shell reports it
    assert exit_code(3) == 3


def test_a_cancelled_launcher_says_so_in_one_line(tmp_path: Path) -> None:
    rank = tmp_path / "rank.py"
    rank.write_text("import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *_: sys.exit(75))\n"
                    "print('up', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen(command("trainer.train.torchrun", str(rank)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=trainer_env())
    assert proc.stdout.readline() == "up\n"
    proc.send_signal(signal.SIGTERM)  # what scancel sends every process of the step
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert err.rstrip().splitlines()[-1] == "anvil: torchrun stopped by SIGTERM; its ranks got the signal too"
