"""trainflow's core library: every algorithm of the pipeline, free of any orchestrator."""
