"""Config of starting from a model that already knows something: where its weights come from (`model.init_from`,
`model.reinit`), parameter-efficient fine-tuning (`model.lora`) and the fine-tuning schedule (`train.finetune`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from trainflow.core.config.base import Section

PATTERNS = (
    "Module-name patterns (fnmatch: `blocks.0`, `blocks.*`, `head`); a pattern also matches a name's trailing part, "
    "so `head` reaches `net.head` of the MLP. Output layers: `head` (mlp, cnn), `lm_head` (gpt, tied to `tok_emb`)."
)


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="Rank of each low-rank update B @ A.")
    alpha: float = Field(16.0, gt=0, description="Scale of the update: alpha / r (Hu et al. 2021).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        min_length=1,
        description="Linear, Conv1d, Conv2d or Embedding modules that get adapters, by name or trailing name: the GPT's `qkv`, `proj`, `up`, `down`; the MLP's hidden Linear layers (`net.1`, then every 4th with a norm, every 3rd without) and `net.head`; the CNN's `conv1`, `conv2`, `head.3`; any of a factory model's.",
    )
    modules_to_save: list[str] = Field(
        [],
        description="Modules trained in full beside the adapters (a re-initialised head). Everything else stays frozen.",
    )


class UnfreezeStep(Section):
    epoch: int = Field(ge=1, description="Epoch (0-based) from whose start these patterns train.")
    patterns: list[str] = Field(min_length=1, description=f"Frozen modules to unfreeze. {PATTERNS}")


class FinetuneConfig(Section):
    freeze: list[str] = Field(
        [], description=f"Modules frozen from the start (no gradient, no update, no weight decay). {PATTERNS}"
    )
    unfreeze_at_epoch: Annotated[int, Field(ge=1)] | list[UnfreezeStep] | None = Field(
        None,
        description="When frozen modules start training: an epoch (all of them), or a list of {epoch, patterns} for gradual unfreezing; null = frozen throughout. The optimizer holds every parameter from the start, so a resumed run continues with the same groups and schedule.",
    )
    batchnorm: Literal["train", "frozen"] = Field(
        "train",
        description="BatchNorm layers inside frozen modules: train = their scale and shift train and their statistics follow the new data (fastai's train_bn); frozen = eval mode and no update while their module is frozen.",
    )
    layer_lr_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Discriminative learning rates (ULMFiT, fastai): the head block trains at optim.lr, each block below at this factor once more (0.5: lr, lr/2, lr/4 ...). Blocks from input to head: mlp = each hidden layer, then head; cnn = stem, each residual block, head; gpt = the position embedding, each transformer block, then the final norm with lm_head and the token embedding tied to it; a factory model = its lr_blocks() if it has one, else its top-level children. Combines with weight decay by splitting every block into decay and no-decay groups.",
    )
    lr_multipliers: dict[str, Annotated[float, Field(gt=0)]] = Field(
        {},
        description=f"Factor on optim.lr per module pattern (the first pattern that matches counts); others at 1. Not with layer_lr_decay. {PATTERNS}",
    )

    @field_validator("unfreeze_at_epoch")
    @classmethod
    def _ascending(cls, value: int | list[UnfreezeStep] | None) -> int | list[UnfreezeStep] | None:
        if isinstance(value, list) and [s.epoch for s in value] != sorted({s.epoch for s in value}):
            raise ValueError("epochs must be distinct and ascending")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        if self.unfreeze_at_epoch is not None and not self.freeze:
            raise ValueError("unfreeze_at_epoch needs freeze: nothing is frozen to unfreeze")
        if self.layer_lr_decay is not None and self.lr_multipliers:
            raise ValueError("give layer_lr_decay or lr_multipliers, not both")
        return self

    @property
    def active(self) -> bool:
        return bool(self.freeze or self.layer_lr_decay is not None or self.lr_multipliers)

    def unfreeze_steps(self) -> list[UnfreezeStep]:
        """The schedule as a list: an epoch number unfreezes every frozen pattern."""
        if self.unfreeze_at_epoch is None:
            return []
        if isinstance(self.unfreeze_at_epoch, int):
            return [UnfreezeStep(epoch=self.unfreeze_at_epoch, patterns=self.freeze)]
        return list(self.unfreeze_at_epoch)

    def frozen_at(self, epoch: int) -> tuple[list[str], list[str]]:
        """(patterns frozen, patterns unfrozen again) at the start of `epoch`: a pure function of the epoch, so a
        resumed run is in the phase an uninterrupted one would be in."""
        thawed = [p for s in self.unfreeze_steps() if s.epoch <= epoch for p in s.patterns]
        return list(self.freeze), thawed
