"""trainflow's core library: every algorithm of the pipeline, free of any orchestrator.

One module per stage, in pipeline order: prepare_data, lr_range_test, hpo_search, train, evaluate,
publish; their records (the DAG's contracts) in records.py; errors.py and preflight.py beside them.
Subpackages hold what the stages build on: config, data, models, training, tuning, storage.
"""
