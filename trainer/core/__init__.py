"""The ground floor: the job contract every side shares; it never imports torch or another side of Anvil.

The config tree and its derived values (`config.py`), its sources and what a submit fixes in it (`layers.py`), its
cross-field checks at submit (`checks.py`), the job directory's names and markers (`jobdir.py`), exit codes and
SLURM states (`states.py`), each tool's one command name (`commands.py`); and the helpers the launch side and the
ranks both need: refusals (`errors.py`), atomic files (`files.py`), processes and signals (`processes.py`). Cluster
profiles live in `clusters/`. `trainer.launch`, `trainer.train`, `trainer.data` and `trainer.export` build on it;
a test imports every module here with torch and `trainer.launch` made unimportable.
"""
