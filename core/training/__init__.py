"""The training engine: one Trainer whose step the LR range test and HPO trials reuse."""
