"""A decoder-only transformer (GPT-2 layout, Radford et al. 2019) with modern options.

Pre-norm blocks with LayerNorm or RMSNorm, GELU or SwiGLU feed-forward (Shazeer 2020), causal
attention through `F.scaled_dot_product_attention` (flash/memory-efficient kernels where the
device has them), tied input/output embeddings, optional activation checkpointing per block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainflow.core.config import GPTConfig


def _norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd)
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True  # type: ignore[assignment]  # scaled init, see GPT._init_weights
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        # SwiGLU's three matrices at 8/3 width match GELU's two at 4x in parameters (LLaMA, Touvron et al. 2023).
        hidden = 64 * math.ceil(8 * cfg.n_embd / 3 / 64) if self.swiglu else 4 * cfg.n_embd
        self.up = nn.Linear(cfg.n_embd, (2 if self.swiglu else 1) * hidden, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.down.residual = True  # type: ignore[assignment]
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, value = self.up(x).chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(self.up(x))
        return self.dropout(self.down(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1, self.attn = _norm(cfg), CausalSelfAttention(cfg)
        self.norm2, self.ff = _norm(cfg), FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, vocab_size: int, block_size: int):
        super().__init__()
        self.block_size, self.checkpointing = block_size, cfg.activation_checkpointing
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = _norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied embeddings (Press & Wolf 2017)
        self.residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = self.residual_std if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def lr_blocks(self) -> list[list[nn.Module]]:
        """Blocks from input to head for `train.finetune.layer_lr_decay`: the position embedding, each block, then
        the final norm and lm_head with the token embedding tied to it (it is the output layer too; fastai groups a
        tied encoder with its decoder the same way)."""
        return [[self.pos_emb], *([block] for block in self.blocks), [self.norm, self.lm_head, self.tok_emb]]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, T = idx.shape
        if self.block_size < T:
            raise ValueError(f"sequence of length {T} is longer than the model's block_size {self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            if self.checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.lm_head(self.norm(x))  # (B, T, vocab)
