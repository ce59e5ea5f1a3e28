"""`python -m trainer.train jobs/<name>`: one rank of the job (slurm.sh starts it on every rank)."""

import sys

from trainer.train.loop import main

sys.exit(main(sys.argv[1:]))
