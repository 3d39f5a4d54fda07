"""Model FLOPs utilisation (MFU): the training FLOPs a GPT does per token against the GPU's peak.

MFU (PaLM, Chowdhery et al. 2022, appendix B) counts only the model's own matmul FLOPs (no recomputation,
no optimizer), so it compares across implementations: the share of the hardware's dense bf16 tensor-core
peak that a training loop turns into model progress.
"""

from __future__ import annotations

import os

import torch
from torch import nn

PEAK_TFLOPS_ENV = "TRAINFLOW_PEAK_TFLOPS"
"""Environment variable: the peak TFLOP/s of this machine's accelerator, for GPUs the table lacks."""

# Dense (no 2:4 sparsity) bf16 tensor-core peak TFLOP/s, keyed by a substring of torch.cuda.get_device_name().
# Matched in order, first hit wins: a key must come before every key it is a substring of ("H100 PCIe" before
# "H100", "A100" before "A10", "L40S" before "L40" before "L4"); a test holds the table to that.
# Datasheets list the sparse figure too: the dense one is half of it. None: no bf16 tensor cores.
PEAK_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    ("GH200", 989.0),  # GH200 datasheet: 1,979 sparse (its GPU is an H100/H200 SXM)
    ("H200 NVL", 835.0),  # H200 datasheet, NVL column: 1,671 sparse
    ("H200", 989.0),  # H200 datasheet, SXM column: 1,979 sparse
    ("H100 NVL", 835.0),  # H100 datasheet, NVL column: 1,671 sparse (per GPU)
    ("H100 PCIe", 756.0),  # H100 datasheet, PCIe column: 1,513 sparse
    ("H100", 989.0),  # H100 datasheet, SXM column: 1,979 sparse (the SXM reports as "H100 80GB HBM3")
    ("A100", 312.0),  # A100 datasheet: 312 dense / 624 sparse, SXM and PCIe alike
    # AWS's A10G has no public NVIDIA datasheet; 70 dense is the figure quoted from NVIDIA's A10G spec for
    # AWS G5 (e.g. Baseten's "A10 vs A10G" comparison): fewer tensor FLOPs than the A10, same memory.
    ("A10G", 70.0),
    ("A10", 125.0),  # A10 datasheet: 125 dense / 250 sparse
    ("L40S", 362.0),  # L40S datasheet: 362.05 dense / 733 sparse
    ("L40", 181.0),  # L40 datasheet: 181.05 dense / 362.1 sparse
    ("L4", 121.0),  # L4 datasheet: 242 sparse
    # Ada whitepaper, RTX 4090: bf16 with fp32 accumulate (what PyTorch's bf16 matmuls use) 165.2 dense; the
    # 330 figure is fp16 with fp16 accumulate, which GeForce cards run at twice the fp32-accumulate rate.
    ("RTX 4090", 165.0),
    ("V100", None),  # Volta: fp16 tensor cores only
    ("T4", None),  # Turing: fp16 tensor cores only
)


def peak_flops_for_name(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU called `name` (as CUDA reports it); None if unknown or without bf16."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return None if tflops is None else tflops * 1e12
    return None


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of `device`: `TRAINFLOW_PEAK_TFLOPS` if set, else the table's figure for a CUDA GPU.

    None on CPU (MFU means tensor-core utilisation), and on an accelerator the table does not know.
    """
    if device.type == "cpu":
        return None
    override = os.environ.get(PEAK_TFLOPS_ENV)
    if override:
        try:
            tflops = float(override)
        except ValueError:
            raise ValueError(f"{PEAK_TFLOPS_ENV}={override!r} is not a number of TFLOP/s (e.g. 989)") from None
        if tflops <= 0:
            raise ValueError(f"{PEAK_TFLOPS_ENV}={override!r} must be positive")
        return tflops * 1e12
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def gpt_flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int, n_params_embedding: int = 0) -> float:
    """Training FLOPs (forward and backward) per token of a GPT: `6 * N + 12 * L * H * Q * T`.

    N = n_params - n_params_embedding (pass the position embedding's size: a lookup, no matmul; a token
    embedding tied to the output head is a matmul there and stays in N), L layers, H * Q = n_embd (heads x
    head size), T = seq_len. 6N: 2 FLOPs per weight per token forward, 4 backward; 12LHQT: the attention
    score and value matmuls, causal masking not discounted. PaLM (Chowdhery et al. 2022) appendix B, as
    nanoGPT's `estimate_mfu`.
    """
    n = n_params - n_params_embedding
    return 6.0 * n + 12.0 * n_layer * n_embd * seq_len


def model_flops_per_token(model: nn.Module, seq_len: int) -> float | None:
    """`gpt_flops_per_token` for our GPT (`core.models.gpt.GPT`, also inside torch.compile or DDP) at
    `seq_len`; None for any other model: MFU is reported for the GPT only."""
    from trainflow.core.models.gpt import GPT

    inner = _unwrap(model)
    if not isinstance(inner, GPT):
        return None
    n_params = sum(p.numel() for p in inner.parameters())  # tied weights counted once
    return gpt_flops_per_token(
        n_params,
        n_layer=len(inner.blocks),
        n_embd=inner.tok_emb.embedding_dim,
        seq_len=seq_len,
        n_params_embedding=inner.pos_emb.weight.numel(),
    )


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s as a fraction of `peak` FLOP/s (0.45 = 45%)."""
    return tokens_per_s * flops_per_token / peak


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under torch.compile's OptimizedModule and DDP/FSDP-style `.module` wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def mfu_factor(flops_per_token: float | None, device: torch.device) -> float | None:
    """FLOPs per token / the device's peak FLOP/s, when both are known: tokens/s per device x this = MFU."""
    peak = peak_flops(device) if flops_per_token is not None else None
    return flops_per_token / peak if flops_per_token is not None and peak else None
