"""The muP experiments behind `plots/` (research/mup.md): the coordinate check (`coordcheck.py`) and the learning-rate
transfer grid (`lr_transfer.py`). Research code on top of the product, never imported by it: it may use every side
(the model, the data tools, sweeps), and nothing under trainer.core, launch, train, data or export imports it."""
