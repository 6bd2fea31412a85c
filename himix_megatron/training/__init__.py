"""Training: flags (config.py), data glue (data.py), stages and optimizer (optimizer.py), the loop
(trainer.py), validation (evaluate.py) and metrics (metrics.py)."""
