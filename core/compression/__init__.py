"""Compression techniques: pruning, quantization, distillation; no Prefect."""
