"""Anvil: SLURM-native LLM pretraining.

Three sides, split along the torch boundary:
- `trainer.launch` (no torch: it runs on login nodes): the config tree, the job directory, the batch script,
  the executors (SLURM, local) and the command lines that drive them;
- `trainer.train` (torch, on every rank): the model, its parallelisms, the loop, checkpoints, metrics;
- `trainer.export` (torch, one process): Hugging Face export and import, Hub upload, lm-eval.
`trainer.data` feeds the trainer (Parquet, tokenizers, the stateful loader) and holds the data tools.
"""
