"""Config of the data section: where the data comes from, how it is split and loaded."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from trainflow.core.config.base import Section
from trainflow.core.data.spec import IMAGE_SHAPES, Task


class LoaderConfig(Section):
    num_workers: int = Field(
        0,
        ge=0,
        description="DataLoader worker processes; 0 loads batches in the main process, fastest for in-memory data.",
    )
    pin_memory: bool = Field(
        False, description="Page-lock host batches so host-to-GPU copies can overlap compute; no effect on CPU."
    )
    persistent_workers: bool = Field(False, description="Keep workers alive between epochs (needs num_workers > 0).")
    prefetch_factor: int | None = Field(
        None, ge=1, description="Batches each worker loads ahead (needs num_workers > 0); null = torch's default of 2."
    )

    @model_validator(mode="after")
    def _workers_needed(self) -> LoaderConfig:
        if self.num_workers == 0 and self.persistent_workers:
            raise ValueError("persistent_workers=true needs num_workers > 0")
        if self.num_workers == 0 and self.prefetch_factor is not None:
            raise ValueError("prefetch_factor needs num_workers > 0")
        return self


class _DataCommon(Section):
    val_fraction: float = Field(
        0.15, gt=0, lt=1, description="Share of the data held out for validation (early stopping, model selection)."
    )
    test_fraction: float = Field(
        0.15, gt=0, lt=1, description="Share of the data held out for the final evaluation only."
    )
    loader: LoaderConfig = Field(default_factory=LoaderConfig, description="torch DataLoader settings.")
    in_memory_max_mb: float = Field(
        1024,
        ge=0,
        description="Prepared splits whose model-ready arrays are larger than this are written as memory-mapped shards that every stage reads lazily (data larger than memory); smaller ones are read whole into memory, the fastest. 0 = always shards.",
    )
    shard_mb: float = Field(
        64, gt=0, description="Size of one shard file of a sharded split (and of the decoded-image cache)."
    )
    refit_preprocessing: bool = Field(
        False,
        description="With model.init_from naming a published model: fit the scaling and encoding on this data instead of re-using the parent's (whose weights learned the parent's scaling).",
    )

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> _DataCommon:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} must be < 0.9")
        return self


def _check_s3_path(value: str | None) -> str | None:
    """An s3:// data path must name an object (valid bucket and key); local paths pass unchanged."""
    if value is not None and value.startswith("s3://"):
        from trainflow.core.storage.s3_data import data_uri_problem

        problem = data_uri_problem(value)
        if problem:
            raise ValueError(problem)
    return value


class SklearnDataConfig(_DataCommon):
    source: Literal["sklearn"] = Field("sklearn", description="A dataset bundled with scikit-learn (no download).")
    name: Literal["digits", "wine", "breast_cancer", "iris"] = Field(
        "digits", description="Which bundled dataset; digits is 8x8 images, the others tabular."
    )
    scale: Literal["standard", "none"] = Field(
        "standard", description="Standardise features with statistics fitted on the training split only."
    )


class TableDataConfig(_DataCommon):
    source: Literal["csv", "parquet"] = Field(description="A local table file with one row per sample.")
    path: str = Field(
        description="Path of the .csv or .parquet file, or s3://bucket/key (fetched with the store section's S3 settings, cached by ETag)."
    )
    target: str = Field(description="Column holding the class label; every other column is a feature.")
    _s3_path = field_validator("path")(_check_s3_path)
    scale: Literal["standard", "none"] = Field(
        "standard",
        description="Standardise numeric columns with statistics fitted on the training split only; categorical columns are one-hot encoded, NaNs imputed.",
    )


class TextDataConfig(_DataCommon):
    source: Literal["text"] = Field(
        description="A UTF-8 text file, modelled as a sequence of bytes (vocabulary of 256)."
    )
    path: str | None = Field(
        None,
        description="Path of the text file, or s3://bucket/key; null = the Python standard library's pydoc_data.topics text (466 KB).",
    )
    seq_len: int = Field(64, ge=2, description="Context length in bytes of each training window.")
    _s3_path = field_validator("path")(_check_s3_path)


class ImageFolderDataConfig(_DataCommon):
    source: Literal["image_folder"] = Field(
        description="Images (PNG, JPEG) in a folder, one sub-folder per class, or listed in an index file; decoded once with Pillow into uint8 arrays cached in the store."
    )
    path: str | None = Field(
        None,
        description="Folder with one sub-folder per class (its name is the class); files of other kinds are bad files.",
    )
    index: str | None = Field(
        None,
        description="Instead of path: a .csv or .jsonl file with columns path,label (paths relative to the index file).",
    )
    image_size: int = Field(
        32,
        ge=4,
        le=1024,
        description="Side of the square every image is brought to: the shorter side resized to it (bilinear, antialiased), then the centre cropped square. Served images of any size go the same way.",
    )
    classes: list[str] | None = Field(
        None,
        min_length=2,
        description="The class names in order; a file labelled otherwise is a bad file. null = the sub-folder names (or the index's labels), numbers in numeric order.",
    )
    color: Literal["rgb", "gray"] = Field("rgb", description="rgb = 3 channels; gray = 1 channel (Pillow's L mode).")
    skip_bad_files: bool = Field(
        False,
        description="false = a bad file (unreadable, truncated, not an image, a label not among the classes) stops the preflight naming it; true = skip it, counted in the record and the report.",
    )

    @model_validator(mode="after")
    def _one_location(self) -> ImageFolderDataConfig:
        if (self.path is None) == (self.index is None):
            raise ValueError("give exactly one of path (a folder of class sub-folders) and index (a CSV/JSONL file)")
        for value in (self.path, self.index):
            if value is not None and value.startswith("s3://"):
                raise ValueError("an image folder must be local (s3:// folders are not supported yet)")
        return self


class TextFolderDataConfig(_DataCommon):
    source: Literal["text_folder"] = Field(
        description="UTF-8 text files under a folder, modelled as bytes; split by file, so no file is in two splits."
    )
    path: str = Field(description="Folder holding the text files.")
    glob: str = Field("**/*.txt", description="Which files under path are read (pathlib glob, relative to path).")
    separator: str = Field("\n\n", description="Joins the files of a split, taken in sorted path order.")
    seq_len: int = Field(64, ge=2, description="Context length in bytes of each training window.")
    skip_bad_files: bool = Field(
        False,
        description="false = a file that is not UTF-8 or cannot be read stops the preflight naming it; true = skip it, counted in the record and the report.",
    )


class SyntheticDataConfig(_DataCommon):
    source: Literal["synthetic"] = Field(
        description="A generated classification problem (scikit-learn make_classification), sized for scale tests."
    )
    n_samples: int = Field(2000, ge=20, description="Number of samples to generate.")
    n_features: int = Field(20, ge=2, description="Number of features; a quarter of them (at least 2) carry signal.")
    n_classes: int = Field(2, ge=2, description="Number of classes.")
    class_sep: float = Field(1.0, gt=0, description="Distance between class clusters; smaller is harder.")
    scale: Literal["standard", "none"] = Field(
        "standard", description="Standardise features with statistics fitted on the training split only."
    )


def _data_source(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("source", "sklearn"))
    return getattr(value, "source", "sklearn")


DataConfig = Annotated[
    Annotated[SklearnDataConfig, Tag("sklearn")]
    | Annotated[TableDataConfig, Tag("csv")]
    | Annotated[TableDataConfig, Tag("parquet")]
    | Annotated[TextDataConfig, Tag("text")]
    | Annotated[SyntheticDataConfig, Tag("synthetic")]
    | Annotated[ImageFolderDataConfig, Tag("image_folder")]
    | Annotated[TextFolderDataConfig, Tag("text_folder")],
    Discriminator(_data_source),
]


def planned_task(cfg: DataConfig) -> Task:
    """The task `cfg`'s data will be prepared for (known before any data is read)."""
    return "language_modeling" if isinstance(cfg, TextDataConfig | TextFolderDataConfig) else "classification"


def planned_rank(cfg: DataConfig) -> int:
    """Dimensions of one prepared sample: 3 for images (C, H, W), 1 for table rows and text windows."""
    if isinstance(cfg, SklearnDataConfig) and cfg.name in IMAGE_SHAPES:
        return len(IMAGE_SHAPES[cfg.name])
    if isinstance(cfg, ImageFolderDataConfig):
        return 3
    return 1
