"""`model.init_from`: resolve where a training's first weights come from, check they fit the model, load them.

A registered version (`models:/<name>@<alias>`, `models:/<name>/<version>`) serves a compressed variant whose
weights cannot be trained, so a warm start follows the version's `trainflow.manifest_uri` tag to its published
folder and loads the fp32 `model.pt` there. An alias is resolved to a version once, when the config is resolved
(`resolve_alias`); `warm_start_of` then hashes the weights, so the stage cache keys hold a version and a sha256,
never an alias.
"""

from __future__ import annotations

import json
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainflow.core.config import Config, ModelConfig, StoreConfig
from trainflow.core.errors import ConfigError, StoreError
from trainflow.core.models.parts import first_match
from trainflow.core.records import ReusedPreprocessing, WarmStart
from trainflow.core.storage.files import sha256_file

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

_ALIAS = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[\w-]+)")
_VERSION = re.compile(r"models:/(?P<name>[^/@]+)/(?P<version>\d+)")
MANIFEST_TAG = "trainflow.manifest_uri"


def resolve_alias(config: Config) -> Config:
    """`config` with `model.init_from: models:/<name>@<alias>` replaced by the version the alias points to now.

    Raises:
        ConfigError: no such registered model or alias (one line).
    """
    init_from = config.model.init_from
    match = _ALIAS.fullmatch(init_from or "")
    if match is None:
        return config
    client = _client(config)
    try:
        version = client.get_model_version_by_alias(match["name"], match["alias"]).version
    except Exception as exc:
        raise ConfigError(f"model.init_from: {init_from}: {_first_line(exc)}") from None
    resolved = f"models:/{match['name']}/{version}"
    log.info("model.init_from: %s is %s", init_from, resolved)
    return config.with_values({"model.init_from": resolved}, source="model.init_from")


def warm_start_of(config: Config) -> WarmStart | None:
    """The resolved `model.init_from` of `config` (None without one); looked up once per process and source.

    Raises:
        ConfigError: the source does not exist or is not a trainflow manifest / state dict (one line).
    """
    source = config.model.init_from
    if source is None:
        return None
    if _ALIAS.fullmatch(source):
        raise ConfigError(f"model.init_from: {source}: resolve the alias first (resolve_alias)")
    tracking = config.tracking.uri if _VERSION.fullmatch(source) else ""
    stamp = _stamp(source)
    return _resolve(source, tracking, config.store, stamp)


@lru_cache(maxsize=32)
def _resolve(source: str, tracking: str, store: StoreConfig, stamp: tuple[float, int] | None) -> WarmStart:
    version = _VERSION.fullmatch(source)
    if version:
        return _from_version(source, version["name"], int(version["version"]), tracking, store)
    if source.endswith(".json"):
        return _from_manifest(source, store, source)
    path = _local(source, store)
    if path.suffix not in (".pt", ".safetensors"):
        raise ConfigError(f"model.init_from: {source}: expected models:/..., a manifest.json, .pt or .safetensors")
    endpoint = store.endpoint_url if source.startswith("s3://") else None
    return WarmStart(source=source, weights_uri=source, sha256=sha256_file(path), endpoint_url=endpoint)


def _from_version(source: str, name: str, version: int, tracking: str, store: StoreConfig) -> WarmStart:
    from trainflow.core.tracking.backend import client_for, tracking_uri

    try:
        found = client_for(tracking_uri(tracking)).get_model_version(name, str(version))
    except Exception as exc:
        raise ConfigError(f"model.init_from: {source}: {_first_line(exc)}") from None
    manifest = found.tags.get(MANIFEST_TAG)
    if not manifest:
        raise ConfigError(f"model.init_from: {source} has no {MANIFEST_TAG} tag: not registered by trainflow's "
                          "publish stage, so its fp32 weights are unknown; give the model.pt path instead")  # fmt: skip
    parent = _from_manifest(manifest, store, source)
    log.info("model.init_from: %s serves a %s variant; warm-starting from the fp32 weights of its published "
             "folder (%s)", source, found.tags.get("trainflow.variant", "compressed"), parent.weights_uri)  # fmt: skip
    return parent.model_copy(update={"registered_model": name, "version": version, "run_id": found.run_id,
                                     "data_fingerprint": found.tags.get("trainflow.data_fingerprint")
                                     or parent.data_fingerprint})  # fmt: skip


def _from_manifest(uri: str, store: StoreConfig, source: str) -> WarmStart:
    path = _local(uri, store)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = {entry["path"]: entry for entry in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model.init_from: {uri}: not a readable trainflow manifest ({_first_line(exc)})") from None
    if "model.pt" not in files:
        raise ConfigError(f"model.init_from: {uri}: the manifest lists no model.pt")
    folder = uri.rsplit("/", 1)[0] if "/" in uri else "."
    weights = f"{folder}/model.pt"
    sha = sha256_file(_local(weights, store))
    if sha != files["model.pt"]["sha256"]:
        raise ConfigError(f"model.init_from: {weights}: sha256 differs from its manifest (trainflow verify {uri})")
    entry = files.get("preprocessor.pkl")
    preprocessor = ReusedPreprocessing(uri=f"{folder}/preprocessor.pkl", sha256=entry["sha256"]) if entry else None
    endpoint = store.endpoint_url if uri.startswith("s3://") else None
    return WarmStart(source=source, weights_uri=weights, sha256=sha, run_id=manifest.get("mlflow_run_id"),
                     data_fingerprint=manifest.get("data_fingerprint"), manifest_uri=uri,
                     preprocessor=preprocessor, endpoint_url=endpoint)  # fmt: skip


def reused_preprocessing(config: Config) -> ReusedPreprocessing | None:
    """The parent's fitted preprocessor that prepare_data applies: a published parent's, unless
    `data.refit_preprocessing` (text has none: bytes are its tokens)."""
    warm = warm_start_of(config)
    if warm is None or warm.preprocessor is None or config.data.refit_preprocessing:
        return None
    return warm.preprocessor


def fetch(uri: str, store: StoreConfig | None) -> Path:
    """A local copy of `uri` (an s3:// object is downloaded into the store's cache folder and re-used)."""
    from trainflow.core.config import StoreConfig as Settings

    return _local(uri, store if store is not None else Settings())


def _local(uri: str, store: StoreConfig) -> Path:
    if uri.startswith("s3://"):
        from trainflow.core.storage.store import open_store

        bucket = "/".join(uri.split("/", 3)[:3])
        try:
            return open_store(store.model_copy(update={"uri": bucket})).local_path(uri)
        except StoreError as exc:
            raise ConfigError(f"model.init_from: {exc}") from None
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.init_from: {uri}: file not found")
    return path


def _stamp(source: str) -> tuple[float, int] | None:
    """A local file's mtime and size: an edited file is hashed again (remote objects and versions are immutable)."""
    path = Path(source.removeprefix("file://")).expanduser()
    if source.startswith(("s3://", "models:")) or not path.is_file():
        return None
    stat = path.stat()
    return stat.st_mtime, stat.st_size


def read_state_dict(warm: WarmStart, store: StoreConfig | None) -> dict[str, torch.Tensor]:
    """The parent's weights as a plain state dict (a trainflow checkpoint's `model`, or the file's own dict).

    Raises:
        ConfigError: the file changed since it was resolved, or holds no state dict.
    """
    import torch

    if store is None and warm.endpoint_url is not None:  # a local run's store section named the S3 endpoint
        from trainflow.core.config import StoreConfig as Settings

        store = Settings(endpoint_url=warm.endpoint_url)
    path = fetch(warm.weights_uri, store)
    if sha256_file(path) != warm.sha256:
        raise ConfigError(f"model.init_from: {warm.weights_uri} changed since this run resolved it; run again")
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ConfigError(
                    f"model.init_from: {warm.weights_uri}: reading .safetensors needs the safetensors "
                    "package (pip install 'trainflow[finetune]')"
                ) from None
            payload: Any = load_file(path)
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"model.init_from: {warm.weights_uri}: cannot be loaded ({_first_line(exc)})") from None
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        if payload.get("adapters_of") is not None:
            raise ConfigError(f"model.init_from: {warm.weights_uri} holds LoRA adapters only; start from the published "
                              "(merged) model.pt instead")  # fmt: skip
        payload = payload["model"]
    if not isinstance(payload, dict) or not all(hasattr(v, "shape") for v in payload.values()):
        raise ConfigError(f"model.init_from: {warm.weights_uri}: not a state dict of tensors")
    return payload


def load_into(model: nn.Module, state: dict[str, torch.Tensor], reinit: list[str], source: str) -> list[str]:
    """Copy `state` into `model`; modules named in `reinit` keep their fresh init. Returns the tensors kept fresh.

    Raises:
        ConfigError: tensors missing, unexpected or of another shape outside `reinit`, listed in one line.
    """
    own = model.state_dict()
    fresh = [k for k in own if first_match(k, reinit)]
    shared = {own[k].data_ptr() for k in fresh}  # a tied weight (the GPT's lm_head and tok_emb) is fresh under both
    fresh += [k for k in own if k not in fresh and own[k].numel() and own[k].data_ptr() in shared]
    problems = []
    for key, tensor in own.items():
        if key in fresh:
            continue
        if key not in state:
            problems.append(f"{key} missing")
        elif tuple(state[key].shape) != tuple(tensor.shape):
            problems.append(f"{key} {tuple(state[key].shape)} in the source, {tuple(tensor.shape)} here")
    problems += [f"{key} not in this model" for key in state if key not in own and not first_match(key, reinit)]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ConfigError(f"model.init_from: {source}: {len(problems)} tensor(s) do not fit model.{_name(model)}: "
                          f"{shown}. Name their modules in model.reinit to start them fresh (output layer: head, "
                          "or lm_head for gpt), or match the architecture to the parent's")  # fmt: skip
    model.load_state_dict({k: state[k] for k in own if k not in fresh} | {k: own[k] for k in fresh})
    return fresh


def check_fits(config: ModelConfig, model: nn.Module, warm: WarmStart, store: StoreConfig | None) -> None:
    """The preflight's check that the parent's weights fit the model the config builds (nothing is kept)."""
    import copy

    load_into(copy.deepcopy(model), read_state_dict(warm, store), config.reinit, warm.source)


def _name(model: nn.Module) -> str:
    return type(model).__name__


def _client(config: Config) -> Any:
    from trainflow.core.tracking.backend import client_for, tracking_uri

    return client_for(tracking_uri(config.tracking.uri))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
