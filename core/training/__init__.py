"""The training engine: one Trainer (`trainer.py`, its state types in `state.py`) built from config by
`builder.py`, with callbacks, checkpointing, optimizer and schedule, precision, seeding and metrics
beside it. The LR range test and HPO trials reuse its step."""
