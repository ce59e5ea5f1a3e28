"""The launch side, which never imports torch (it starts in a fraction of a second on a login node, and a test runs
it with torch made unimportable): the batch script (`render.py`, `templates/`), the executors (`executor.py`, the
interface; `slurm.py`, `local.py`; `executors.py` picks one by name), `submit.py`'s command line, job status
(`status.py`), sweeps (`sweep/`) and the config reference (`docs.py`). The job contract they write and read is in
`trainer.core`."""
