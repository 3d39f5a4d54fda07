"""A trainflow model served on raw inputs through MLflow's pyfunc: raw rows -> the fitted preprocessing
-> the model (ONNX Runtime or a torch program) -> softmax -> a DataFrame.

Standalone on purpose: numpy, pandas and mlflow here, scikit-learn through the unpickled preprocessor,
onnxruntime or torch when the model loads; never trainflow's `core`, so a served model needs neither
trainflow nor its source. MLflow puts this file on sys.path (`code_paths`), hence the unique name.

Inputs, raw as the data came in:
- table: a DataFrame with the original feature columns (any order, extra ones ignored; NaN is imputed and
  an unseen category encodes as all zeros, as in training), a dict or a list of dicts;
- image (bundled digits): pixels (N, H, W), (N, C, H, W) or (N, C*H*W), or a DataFrame of the raw pixel columns;
- image_file (an image folder): images of any size, encoded (PNG/JPEG bytes) or as pixels (N, H, W, C) or a list
  of (H, W[, C]) arrays, resized as in training (`trainflow_images.square_image`: shorter side, centre square);
- text: strings (DataFrame column `text`, else its first column; a list; one string).
Outputs: a classifier gives `label` and `proba_<class>` per class. The byte-level GPT gives the top
next-byte candidates after the prompt (`top<k>_byte`, `top<k>_char`, `top<k>_proba`) and a continuation of
`max_new_bytes` bytes (params: greedy at `temperature` 0, else sampled with numpy's generator from `seed`).

Text padding: a prompt is cut to its last `seq_len` bytes (the block size) and the batch is right-padded
with spaces to the longest prompt, or to the fixed length an ONNX export demands; the logits are read at
each prompt's last real byte. The model is causal, so bytes after that position cannot change them
(exact, unlike left padding, which would move the prompt to other positions).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

SERVING_FORMAT = "trainflow-serving/1"
PAD_BYTE = 0x20  # right padding of text prompts (never read: see the module docstring)
TEXT_PARAMS: dict[str, Any] = {"max_new_bytes": 32, "temperature": 0.0, "seed": 0}


class RawInputModel(mlflow.pyfunc.PythonModel):
    """Artifacts: `meta` (JSON, see `log_serving_model`), `model` (.onnx, .pt2 or .ts, picked by suffix)
    and, for tables and images, `preprocessor` (the pickle prepare_data wrote)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.meta: dict[str, Any] = json.loads(Path(context.artifacts["meta"]).read_text(encoding="utf-8"))
        if self.meta.get("format") != SERVING_FORMAT:
            raise ValueError(f"meta format {self.meta.get('format')!r}, expected {SERVING_FORMAT!r}")
        self.preprocessor: dict[str, Any] | None = None
        if "preprocessor" in context.artifacts:
            with open(context.artifacts["preprocessor"], "rb") as f:
                self.preprocessor = pickle.load(f)  # our own artifact, shipped inside the model
        self.runner = ModelRunner(Path(context.artifacts["model"]), int(self.meta.get("intra_op_threads") or 0))

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext | None, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        """Raw inputs in, one output row per input (for images also an array; for text strings).

        Raises:
            ValueError: a needed column is missing (named), a value cannot be read, a text is empty.
        """
        if self.meta["input_kind"] == "text":
            return self._generate(_texts(model_input), {**TEXT_PARAMS, **(params or {})})
        if self.meta["input_kind"] == "image_file":
            logits = self.runner(self._pictures(model_input))
            return _class_frame(logits, self.meta["class_names"])
        logits = self.runner(self._features(model_input))
        return _class_frame(logits, self.meta["class_names"])

    # ---------------------------------------------------------------------------------- tables, images
    def _features(self, model_input: Any) -> np.ndarray:
        """The model's float32 input: raw rows through the fitted transformer, reshaped for images."""
        pre = self.preprocessor
        assert pre is not None, "a table or image model ships its preprocessor"
        frame = _raw_frame(model_input, pre["columns"])
        for column in pre["numeric"]:
            try:
                frame[column] = pd.to_numeric(frame[column], errors="raise").astype(np.float64)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"column '{column}' must be numeric ({exc})") from None
        for column in pre["categorical"]:  # training's rule: values as strings (True -> 'True'), NaN missing
            frame[column] = frame[column].map(lambda v: np.nan if pd.isna(v) else str(v)).astype(object)
        x = np.ascontiguousarray(pre["transformer"].transform(frame), dtype=np.float32)
        shape = pre.get("image_shape")
        return x.reshape(-1, *shape) if shape else x

    def _pictures(self, model_input: Any) -> np.ndarray:
        """Images of any size (encoded bytes, or pixel arrays) brought to the training square and normalised."""
        from trainflow_images import normalized, square_image

        pre = self.preprocessor
        assert pre is not None, "an image model ships its preprocessor"
        images = _images(model_input, pre["color"])
        pixels = []
        for i, image in enumerate(images):
            try:
                pixels.append(square_image(image, int(pre["image_size"]), pre["color"]))
            except ValueError as exc:
                raise ValueError(f"image {i}: {exc}") from None
        return normalized(np.stack(pixels), pre["pixel_mean"], pre["pixel_std"])

    # ------------------------------------------------------------------------------------------- text
    def _generate(self, texts: list[str], params: dict[str, Any]) -> pd.DataFrame:
        max_new, temperature = int(params["max_new_bytes"]), float(params["temperature"])
        if max_new < 0 or temperature < 0:
            raise ValueError(f"max_new_bytes ({max_new}) and temperature ({temperature}) must not be negative")
        prompts = [t.encode("utf-8") for t in texts]
        if not all(prompts):
            raise ValueError("an empty text: the model needs at least one byte of context")
        rng = np.random.default_rng(int(params["seed"]))
        logits = self._next_logits(prompts)
        proba = _softmax(logits)
        top = np.argsort(-proba, axis=1, kind="stable")[:, : int(self.meta.get("top_k", 5))]
        generated = [bytearray() for _ in prompts]
        for step in range(max_new):
            if step:
                logits = self._next_logits([p + bytes(g) for p, g in zip(prompts, generated, strict=True)])
            for row, out in zip(logits, generated, strict=True):
                out.append(_pick(row, temperature, rng))
        frame = pd.DataFrame({"continuation": [bytes(g).decode("utf-8", errors="replace") for g in generated]})
        rows = np.arange(len(prompts))
        for k in range(top.shape[1]):
            frame[f"top{k + 1}_byte"] = top[:, k].astype(np.int64)
            frame[f"top{k + 1}_char"] = [bytes([b]).decode("utf-8", errors="replace") for b in top[:, k]]
            frame[f"top{k + 1}_proba"] = proba[rows, top[:, k]]
        return frame

    def _next_logits(self, prompts: list[bytes]) -> np.ndarray:
        """(B, vocab) logits after each prompt's last byte; prompts right-padded (see the module docstring)."""
        fixed = self.meta.get("fixed_length") or self.runner.fixed_length
        limit = int(fixed or self.meta["seq_len"])
        tails = [p[-limit:] for p in prompts]
        ids = np.full((len(tails), fixed or max(map(len, tails))), PAD_BYTE, dtype=np.int64)
        for i, tail in enumerate(tails):
            ids[i, : len(tail)] = np.frombuffer(tail, dtype=np.uint8)
        logits = self.runner(ids)  # (B, T, vocab)
        return logits[np.arange(len(tails)), [len(t) - 1 for t in tails]].astype(np.float64)


class ModelRunner:
    """One model file as `runner(array) -> array`: .onnx in ONNX Runtime (CPU), .pt2 a torch.export
    program, .ts TorchScript. `fixed_length` is the sequence length an ONNX text model demands, if any."""

    def __init__(self, path: Path, intra_op_threads: int = 0) -> None:
        self.fixed_length: int | None = None
        self._call: Callable[[np.ndarray], np.ndarray]
        if path.suffix == ".onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if intra_op_threads:
                options.intra_op_num_threads = intra_op_threads
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            first = session.get_inputs()[0]
            if len(first.shape) == 2 and isinstance(first.shape[1], int) and "int" in first.type:
                self.fixed_length = first.shape[1]
            self._call = lambda x: session.run(None, {first.name: x})[0]
        elif path.suffix in (".pt2", ".ts"):
            import torch

            if intra_op_threads:
                torch.set_num_threads(intra_op_threads)
            module = torch.export.load(str(path)).module() if path.suffix == ".pt2" else torch.jit.load(str(path))

            def call(x: np.ndarray) -> np.ndarray:
                with torch.inference_mode():
                    return module(torch.from_numpy(x)).float().numpy()

            self._call = call
        else:
            raise ValueError(f"{path.name}: unknown model format (expected .onnx, .pt2 or .ts)")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._call(x))


def _raw_frame(model_input: Any, columns: list[str]) -> pd.DataFrame:
    """The raw columns in training order from a DataFrame, dict(s) or array; a ValueError names missing ones."""
    data = model_input
    if isinstance(data, dict):
        data = pd.DataFrame([data]) if all(np.ndim(v) == 0 for v in data.values()) else pd.DataFrame(data)
    elif isinstance(data, list) and data and isinstance(data[0], dict):
        data = pd.DataFrame(data)
    if isinstance(data, pd.DataFrame):
        data = data.rename(columns=str)
        missing = [c for c in columns if c not in data.columns]
        if missing:
            shown = ", ".join(missing[:20]) + (f" (and {len(missing) - 20} more)" if len(missing) > 20 else "")
            raise ValueError(f"missing input column(s): {shown}; the model needs {len(columns)}: {columns[:5]}...")
        return data[columns].reset_index(drop=True)
    array = np.asarray(data)
    if array.size == len(columns):
        array = array.reshape(1, -1)  # one row (or one image)
    if array.ndim < 2 or array.size != len(array) * len(columns):
        raise ValueError(f"expected {len(columns)} values per row, got an array of shape {array.shape}")
    return pd.DataFrame(array.reshape(len(array), -1), columns=columns)


def _images(model_input: Any, color: str) -> list[Any]:
    """One entry per image from: encoded bytes; a list of bytes or pixel arrays (sizes may differ); an array
    (N, H, W, C), or (N, H, W) for a gray model, or one (H, W[, C]) image; a DataFrame of one such column
    (`image`, else its first)."""
    if isinstance(model_input, pd.DataFrame):
        column = model_input["image"] if "image" in model_input.columns else model_input.iloc[:, 0]
        return list(column)
    if isinstance(model_input, bytes | bytearray):
        return [model_input]
    if isinstance(model_input, list | tuple):
        return list(model_input)
    array = np.asarray(model_input)
    if array.ndim == 4 or (array.ndim == 3 and color == "gray" and array.shape[-1] not in (1, 3, 4)):
        return list(array)
    if array.ndim in (2, 3):
        return [array]
    raise ValueError(f"expected images (N, H, W, C), (H, W, C), encoded bytes or a list of them; got {array.shape}")


def _texts(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        values: list[Any] = [model_input]
    elif isinstance(model_input, pd.DataFrame):
        values = (model_input["text"] if "text" in model_input.columns else model_input.iloc[:, 0]).tolist()
    elif isinstance(model_input, dict) and "text" in model_input:
        values = [model_input["text"]] if isinstance(model_input["text"], str) else list(model_input["text"])
    else:
        values = np.asarray(model_input, dtype=object).ravel().tolist()
    bad = [type(v).__name__ for v in values if not isinstance(v, str)]
    if bad:
        raise ValueError(f"text input must be strings, got {bad[0]}")
    return values


def _class_frame(logits: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    proba = _softmax(logits.astype(np.float64))
    frame = pd.DataFrame({"label": np.asarray(class_names, dtype=object)[proba.argmax(axis=1)]})
    for i, name in enumerate(class_names):
        frame[f"proba_{name}"] = proba[:, i]
    return frame


def _pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    p = _softmax(logits / temperature)
    return int(rng.choice(len(p), p=p))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)
