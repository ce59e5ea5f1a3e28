"""The batch script's launcher (`python -m trainer.train.torchrun`): a failed rank ends the job's error log with the
rank's own message and one line, never torchrun's traceback, and its exit code reaches the script."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert "failed (exitcode" not in done.stderr  # torchrun's own line for it: one report is enough
    # Control: torchrun itself buries the same message under its traceback and exits 1.
    plain = launch("torch.distributed.run", "-m", "trainer.train", str(job))
    assert plain.returncode == 1 and "Traceback" in plain.stderr and "ChildFailedError" in plain.stderr
    assert "failed (exitcode: 2)" in plain.stderr


def test_a_ranks_exit_code_reaches_the_batch_script(tmp_path: Path) -> None:
    rank = tmp_path / "rank.py"
    rank.write_text("import sys\nsys.exit(75)\n")  # the trainer's code for "preempted, checkpoint saved"
    done = launch("trainer.train.torchrun", str(rank))
    assert done.returncode == 75 and done.stderr == "", done.stderr[-2000:]  # stopped as asked: nothing to report
    assert exit_code(-signal.SIGKILL) == 128 + signal.SIGKILL  # killed by a signal: as a shell reports it
    assert exit_code(3) == 3


RANK = """
import signal, sys, time

def stop(signum, frame):
    print("checkpointing after", signal.Signals(signum).name, flush=True)
    time.sleep(2)  # a checkpoint takes a while
    sys.exit(75)

for sig in (signal.SIGTERM, signal.SIGUSR2):
    signal.signal(sig, stop)
print("up", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2], ids=lambda s: s.name)
def test_a_signal_to_the_launcher_reaches_the_ranks_which_checkpoint_and_decide(tmp_path: Path, sig) -> None:
    """scancel sends TERM to every process of a step, `scancel --signal=USR2` USR2: the launcher passes them on and
    waits for the ranks' own exit (75: checkpoint saved), however long the checkpoint takes."""
    rank = tmp_path / "rank.py"
    rank.write_text(RANK)

    def signalled(launcher: str) -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen(command(launcher, str(rank)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=trainer_env(), start_new_session=True)
        assert proc.stdout.readline() == "up\n"
        proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        finally:
            subprocess.run(["pkill", "-9", "-f", str(rank)], check=False)  # a rank the launcher left behind
        out, err = proc.communicate(timeout=60)
        return proc, out + err

    proc, said = signalled("trainer.train.torchrun")
    assert proc.returncode == 75 and f"checkpointing after {sig.name}" in said and "Traceback" not in said, said
    # Control: torchrun itself dies of USR2 (its rank never hears of it) and ends TERM in a traceback.
    proc, said = signalled("torch.distributed.run")
    assert proc.returncode != 75 and ("Traceback" in said or proc.returncode == -sig), said
