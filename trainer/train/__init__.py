"""The training core (torch, on every rank): the plain-PyTorch model, the parallelisms applied to it in a fixed
order, the optimizer and schedule, the loop, checkpoints, metrics, preemption, Liger kernels and held-out scoring.
`python -m trainer.train jobs/<name>` is what the batch script runs."""
