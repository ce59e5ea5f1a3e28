"""Anvil: SLURM-native LLM pretraining.

Split along the torch boundary, on one ground floor:
- `trainer.core` (no torch): the job contract every side shares: the config tree, the job directory, exit codes and
  SLURM states, and the process, file and refusal helpers;
- `trainer.launch` (no torch: it runs on login nodes): the batch script, the executors (SLURM, local), status,
  sweeps and the command lines that drive them;
- `trainer.train` (torch, on every rank): the model, its parallelisms, the loop, checkpoints, metrics;
- `trainer.data` feeds the trainer (Parquet, tokenizers, the stateful loader) and holds the data tools;
- `trainer.export` (torch, one process): Hugging Face export and import, Hub upload, lm-eval.
`trainer.research` holds the muP experiments behind `plots/`; the product never imports it.
"""
