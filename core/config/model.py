"""Config of the model section: the zoo's networks by name, or a factory of your own."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from trainflow.core.config.base import Section
from trainflow.core.config.finetune import PATTERNS, LoraConfig


class _ModelCommon(Section):
    """What every model of the zoo and every factory model takes: where its first weights come from, LoRA."""

    init_from: str | None = Field(
        None,
        description="Start from trained weights instead of a random init: models:/<name>@<alias> or models:/<name>/<version> (the registered version's published fp32 model.pt, not its served variant), a published manifest.json (local path or s3://), or a .pt / .safetensors state dict. An alias is resolved to a version once, when the config is resolved, so a moved alias re-runs training. Matching tensors load; see reinit.",
    )
    reinit: list[str] = Field(
        [],
        description=f"Modules that start fresh (seeded init) instead of loading from init_from: a head for a new number of classes. Any other tensor whose shape differs from the parent's is an error listing them, in the preflight (table data: when the first stage builds the model, its width being known once prepared). A weight tied to a fresh one (the GPT's tok_emb to lm_head) starts fresh too. {PATTERNS}",
    )
    lora: LoraConfig | None = Field(
        None,
        description="Train low-rank adapters (peft, `pip install 'trainflow[finetune]'`) instead of the weights: only adapters and modules_to_save train; compress and publish get the merged model, which serves without peft.",
    )

    @field_validator("init_from")
    @classmethod
    def _known_source(cls, value: str | None) -> str | None:
        if value is None or value.startswith("s3://") or not value.startswith("models:"):
            return value
        if not re.fullmatch(r"models:/[^/@]+(@[\w-]+|/\d+)", value):
            raise ValueError(f"'{value}' is not models:/<name>@<alias> or models:/<name>/<version>")
        return value


class MLPConfig(_ModelCommon):
    name: Literal["mlp"] = Field("mlp", description="Multi-layer perceptron for tabular features.")
    hidden_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        [128, 128], min_length=1, description="Width of each hidden layer."
    )
    activation: Literal["relu", "gelu", "silu"] = Field("gelu", description="Non-linearity between layers.")
    norm: Literal["none", "layernorm", "batchnorm"] = Field(
        "layernorm", description="Normalisation after each hidden linear layer."
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout probability after each hidden layer.")


class CNNConfig(_ModelCommon):
    name: Literal["cnn"] = Field("cnn", description="Small ResNet-style convolutional network for images.")
    channels: list[Annotated[int, Field(ge=1)]] = Field(
        [32, 64],
        min_length=1,
        description="Channels of each residual stage; every stage after the first halves the spatial size.",
    )
    blocks_per_stage: int = Field(1, ge=1, description="Residual blocks (two 3x3 convolutions each) per stage.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the classifier head.")


class GPTConfig(_ModelCommon):
    name: Literal["gpt"] = Field("gpt", description="Decoder-only transformer for language modelling.")
    n_layer: int = Field(4, ge=1, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads per block; must divide n_embd.")
    n_embd: int = Field(128, ge=8, description="Embedding (residual stream) width.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on embeddings, attention and MLP outputs.")
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="Pre-norm type in each block.")
    mlp: Literal["gelu", "swiglu"] = Field(
        "gelu", description="Feed-forward type: GELU (4x width) or SwiGLU (8/3x width, as LLaMA)."
    )
    bias: bool = Field(False, description="Bias terms in linear layers and norms.")
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in backward: less memory, about a third more compute."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        return self


class FactoryModelConfig(_ModelCommon):
    name: Literal["factory"] = Field("factory", description="A model built by your own function.")
    factory: str = Field(
        description="'package.module:function' called as function(spec, **params) where spec describes the data: task, input_shape (one sample), n_classes (the classes, or the vocabulary of a language model), class_names, seq_len. Its module's code is part of the training's cache key: edit it and training runs again."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to the factory.")

    @field_validator("factory")
    @classmethod
    def _dotted_path(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            raise ValueError(f"'{value}' is not of the form 'package.module:function'")
        return value


def _model_name(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("name", "factory" if "factory" in value else "cnn"))
    return getattr(value, "name", "cnn")


ModelConfig = Annotated[
    Annotated[MLPConfig, Tag("mlp")]
    | Annotated[CNNConfig, Tag("cnn")]
    | Annotated[GPTConfig, Tag("gpt")]
    | Annotated[FactoryModelConfig, Tag("factory")],
    Discriminator(_model_name),
]
