"""The launch side, which never imports torch (it starts in a fraction of a second on a login node, and a test runs
it with torch made unimportable): the config tree and its derived values (`config.py`), its sources (`layers.py`)
and cross-field checks (`checks.py`), the job directory (`jobdir.py`), the batch script (`render.py`, `templates/`),
the executors (`executor.py`: `slurm.py`, `local.py`), the `submit.py` command line (`submit.py`) and the config
reference (`docs.py`)."""
