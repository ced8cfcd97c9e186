"""Training: the optimisation step, EMA, checkpoints, monitoring, the output folder and the Trainer."""
