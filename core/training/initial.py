"""The model a training starts from: built at its seeded init, the parent's weights loaded (`model.init_from`),
LoRA adapters added (`model.lora`). The Trainer's builder and every reader of trained weights build it here."""

from __future__ import annotations

import logging

from torch import nn

from trainflow.core.config import StoreConfig
from trainflow.core.models import build_model
from trainflow.core.models.lora import apply_lora
from trainflow.core.models.warm_start import load_into, read_state_dict
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.training.spec import TrainingSpec

log = logging.getLogger(__name__)


def initial_model(spec: TrainingSpec, store: ArtifactStore | None = None) -> nn.Module:
    """`spec`'s model before its first step, on CPU (call after seeding: fresh layers and adapters draw from it).

    Raises:
        ConfigError: the parent's tensors do not fit (listed), or a LoRA pattern names no module.
    """
    model = build_model(spec.model, spec.data.spec)
    warm = spec.warm_start
    if warm is not None:
        state = read_state_dict(warm, store_settings(store))
        fresh = load_into(model, state, spec.model.reinit, warm.source)
        kept = f"; fresh: {', '.join(fresh)}" if fresh else ""
        log.info("model.init_from: loaded %d tensors of %s (%s)%s", len(state) - len(fresh), warm.source,
                 warm.weights_uri, kept)  # fmt: skip
    if spec.model.lora is not None:
        model = apply_lora(model, spec.model.lora)
    return model


def store_settings(store: ArtifactStore | None) -> StoreConfig | None:
    """The S3 settings of an S3 store (to fetch a parent's weights from a bucket), else None."""
    return getattr(store, "settings", None)
