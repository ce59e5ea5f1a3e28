"""`python -m trainer.train jobs/<name>`: one rank of the job (slurm.sh starts it on every rank)."""

import signal
import sys

from trainer.core.processes import die_with_parent, record_stop_signals

record_stop_signals()  # before the heavy imports: a stop signal during start-up is noted, not fatal
# The launcher (torchrun, or srun's step daemon) gone means the step is over: nothing may keep training.
die_with_parent(signal.SIGKILL)

from trainer.train.rank import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
