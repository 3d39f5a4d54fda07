"""What the loop accumulates between two logging points, kept on the device until it is logged: the
steps' losses and gradient norms, deferred non-finite flags, samples and targets, and the loader wait."""

from __future__ import annotations

import time

import torch

from trainflow.core.data.loaders import Batch
from trainflow.core.training.distributed import Rank, all_reduce_sum
from trainflow.core.training.state import StepOutput
from trainflow.core.training.steps import DataWait, peak_memory_mb


class LogWindow:
    """Steps since the last log; `metrics` reads the device once and starts the next window."""

    def __init__(self, samples_seen: int) -> None:
        self.data_wait = DataWait()
        self.reset(samples_seen)

    def reset(self, samples_seen: int, now: float | None = None) -> None:
        self.losses: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.finite: list[torch.Tensor] = []  # deferred non-finite checks (fused optimizer)
        self.targets, self.samples_at_start = 0, samples_seen
        self.started = time.perf_counter() if now is None else now
        self.excluded_seconds = 0.0  # validation inside the window: not training time
        self.data_wait.seconds = 0.0

    def add(self, out: StepOutput, micro_batches: list[Batch]) -> None:
        """One optimizer step's output and the micro-batches it trained on."""
        self.losses.append(out.loss)
        self.norms.append(out.grad_norm)
        self.targets += sum(y.numel() for _, y in micro_batches)
        if not isinstance(out.finite, bool):
            self.finite.append(out.finite)

    def deferred_finite(self) -> list[bool]:
        """The deferred flags not read yet, oldest first (one host sync for all of them)."""
        flags, self.finite = self.finite, []
        return torch.stack(flags).tolist() if flags else []

    def metrics(
        self, samples_seen: int, lm: bool, rank: Rank, device: torch.device, lr: float, mfu_factor: float | None
    ) -> dict[str, float]:
        """Training metrics of the window, averaged (loss) and summed (throughput) over ranks.

        `mfu_factor`: model FLOPs per token / the device's peak FLOP/s, when both are known (MFU)."""
        now = time.perf_counter()
        seconds = max(now - self.started - self.excluded_seconds, 1e-9)
        processed = self.targets if lm else samples_seen - self.samples_at_start
        loss, processed_all = torch.stack(self.losses).mean(), float(processed)  # >= 1 step since the last
        if rank.distributed:
            totals = all_reduce_sum(torch.stack([loss.float(), torch.tensor(float(processed), device=loss.device)]))
            loss, processed_all = totals[0] / rank.world_size, totals[1].item()
        per_s = processed_all / seconds
        metrics = {
            "train/loss": loss.item(),
            "train/grad_norm": torch.stack(self.norms).mean().item(),
            "lr": lr,
            "train/tokens_per_s" if lm else "train/samples_per_s": per_s,
            "train/peak_memory_mb": peak_memory_mb(device),
            "train/data_wait_fraction": min(1.0, self.data_wait.seconds / seconds),
        }
        if lm and mfu_factor is not None:
            metrics["train/mfu"] = per_s / rank.world_size * mfu_factor
        self.reset(samples_seen, now)
        return metrics
