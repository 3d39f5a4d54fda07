"""data.source image_folder and text_folder: decoded once and cached under a content fingerprint, split (images
stratified, texts by file), bad files named before any stage or skipped and counted."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import tiny_raw
from tests.core.folder_support import digit_picture, png_bytes, write_digits, write_texts
from tests.test_cli import listing, trainflow
from trainflow.core.config import Config, config_from_dict
from trainflow.core.data import images as images_module
from trainflow.core.data.prepared import load_splits
from trainflow.core.errors import DataError
from trainflow.core.preflight import preflight
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import PrepareDataResult
from trainflow.core.serving.trainflow_images import square_image
from trainflow.core.storage.store import LocalStore


def image_config(tmp_path: Path, **data: object) -> Config:
    raw = tiny_raw()
    raw["model"] = {"name": "cnn", "channels": [4, 8]}
    raw["data"] = {"source": "image_folder", "image_size": 16, "color": "gray", **data}
    raw["store"] = {"uri": str(tmp_path / "store")}
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return config_from_dict(raw)


def prepared(cfg: Config, tmp_path: Path) -> PrepareDataResult:
    return prepare_data(cfg.data, cfg.seed, LocalStore(tmp_path / "store"))


def test_an_image_folder_is_decoded_once_split_by_class_and_normalised(tmp_path: Path) -> None:
    root = write_digits(tmp_path / "digits", per_class=12, size=16)
    cfg = image_config(tmp_path, path=str(root))
    result = prepared(cfg, tmp_path)
    assert result.spec.class_names == ["0", "1", "2"] and result.spec.input_shape == (1, 16, 16)
    assert (result.n_train, result.n_val, result.n_test) == (24, 6, 6)
    splits = load_splits(LocalStore(tmp_path / "store"), result)
    train = splits.x["train"]
    assert train.dtype == np.float32 and abs(float(train.mean())) < 1e-4 and abs(float(train.std()) - 1) < 1e-3
    assert np.bincount(splits.y["test"]).tolist() == [2, 2, 2]  # stratified
    cache = list((tmp_path / "store" / "images").iterdir())
    assert len(cache) == 1 and np.load(cache[0] / "pixels.00000.npy").dtype == np.uint8  # pixel shards in the store

    images_module._DECODED.clear()  # a new process: the store's decoded copy is read, no file decoded again
    decoded = []
    original = images_module._decode_one
    images_module._decode_one = lambda *a: decoded.append(a) or original(*a)  # type: ignore[assignment]
    try:
        again = prepared(cfg, tmp_path)
    finally:
        images_module._decode_one = original  # type: ignore[assignment]
    assert decoded == [] and again.fingerprint == result.fingerprint


@pytest.mark.parametrize("change", ["edited", "added", "removed"])
def test_a_changed_added_or_removed_file_changes_the_fingerprint(tmp_path: Path, change: str) -> None:
    root = write_digits(tmp_path / "digits", per_class=6, size=16)
    cfg = image_config(tmp_path, path=str(root))
    before = prepared(cfg, tmp_path).fingerprint
    target = root / "1" / "000.png"
    if change == "edited":  # replaced as editors save: a new file renamed over the old one
        picture = Image.open(target).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        picture.save(root / "1" / "tmp.png")
        os.replace(root / "1" / "tmp.png", target)
    elif change == "added":
        Image.open(target).save(root / "2" / "new.png")
    else:
        target.unlink()
    time.sleep(0.01)
    assert prepared(cfg, tmp_path).fingerprint != before


def test_an_index_file_labels_images_by_relative_path(tmp_path: Path) -> None:
    root = write_digits(tmp_path / "pool", per_class=6, size=16)
    rows = [
        {"path": f"pool/{p.parent.name}/{p.name}", "label": f"digit{p.parent.name}"}
        for p in sorted(root.rglob("*.png"))
    ]
    (tmp_path / "index.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with open(tmp_path / "index.csv", "w") as f:
        f.write("path,label\n" + "".join(f"{r['path']},{r['label']}\n" for r in rows))
    fingerprints = []
    for name in ("index.csv", "index.jsonl"):
        result = prepared(image_config(tmp_path, index=str(tmp_path / name)), tmp_path)
        assert result.spec.class_names == ["digit0", "digit1", "digit2"]
        assert result.n_train + result.n_val + result.n_test == 18
        fingerprints.append(result.fingerprint)
    assert len(set(fingerprints)) == 2  # same images, other settings (the index path) in the fingerprint


def bad_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A digits folder with one bad file of each kind; what each is called in the message."""
    root = write_digits(tmp_path / "digits", per_class=6, size=16)
    good = (root / "0" / "000.png").read_bytes()
    (root / "0" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "1" / "notes.txt").write_text("not an image")
    (root / "2" / "fake.png").write_bytes(b"GIF89a this is not a png")
    (root / "3").mkdir()
    return root, {
        "truncated.png": "not a readable image",
        "notes.txt": "not an image (PNG or JPEG expected)",
        "fake.png": "not a readable image",
        "3": "empty class folder",
    }


def test_bad_files_stop_the_preflight_naming_the_file_and_nothing_is_written(tmp_path: Path) -> None:
    root, _ = bad_folder(tmp_path)
    cfg = image_config(tmp_path, path=str(root))
    with pytest.raises(DataError) as caught:
        preflight(cfg)
    message = str(caught.value)
    assert "\n" not in message and "data.skip_bad_files: true" in message and "more bad file(s)" in message
    assert message.startswith(str(root / "3")) and "empty class folder" in message
    assert not (tmp_path / "store" / "images").exists()  # no decoded cache of a bad folder

    for bad, why in ((root / "0" / "truncated.png", "not a readable image"),
                     (root / "2" / "fake.png", "not a readable image")):  # fmt: skip
        single = write_digits(tmp_path / f"one-{bad.name}", per_class=6, size=16)
        (single / bad.parent.name / bad.name).write_bytes(bad.read_bytes())
        with pytest.raises(DataError, match=f"^{single / bad.parent.name / bad.name}: {why}"):
            preflight(image_config(tmp_path, path=str(single)))

    labelled = tmp_path / "index.csv"
    labelled.write_text("path,label\ndigits/0/000.png,0\ndigits/1/000.png,7\n")
    with pytest.raises(DataError, match=r"000\.png: label '7' is not among the classes \(0, 1\)"):
        preflight(image_config(tmp_path, index=str(labelled), classes=["0", "1"]))


def test_skipped_bad_files_are_counted_in_the_record(tmp_path: Path) -> None:
    root, kinds = bad_folder(tmp_path)
    result = prepared(image_config(tmp_path, path=str(root), skip_bad_files=True), tmp_path)
    assert result.spec.class_names == ["0", "1", "2"]  # the empty class is left out
    assert result.n_train + result.n_val + result.n_test == 18
    assert sorted(Path(s.split(": ", 1)[0]).name for s in result.skipped_files) == sorted(kinds)
    for line in result.skipped_files:
        name = Path(line.split(": ", 1)[0]).name
        assert kinds[name] in line


def test_images_of_any_size_are_brought_to_the_square_the_same_way() -> None:
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 6:34] = 255  # white beyond the centre square of a wide image: the centre crop is all white
    square = square_image(wide, 10, "rgb")
    assert square.shape == (3, 10, 10) and square.min() == 255
    assert square_image(wide.astype(np.float32) / 255, 10, "rgb").tolist() == square.tolist()  # floats in 0-1
    gray = square_image(wide, 10, "gray")
    assert gray.shape == (1, 10, 10)
    exact = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert (square_image(exact, 8, "gray")[0] == exact).all()  # already at the size: unchanged
    with pytest.raises(ValueError, match="not a readable image"):
        square_image(b"\x89PNG\r\n\x1a\n broken", 8, "gray")
    picture = digit_picture(np.eye(8) * 16, 24, rgb=True)
    assert square_image(picture, 12, "rgb").shape == (3, 12, 12)


def text_config(tmp_path: Path, **data: object) -> Config:
    raw = tiny_raw()
    raw["model"] = {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16}
    raw["data"] = {"source": "text_folder", "path": str(tmp_path / "texts"), "seq_len": 16, **data}
    raw["store"] = {"uri": str(tmp_path / "store")}
    return config_from_dict(raw)


def test_a_text_folder_is_split_by_file(tmp_path: Path) -> None:
    names = write_texts(tmp_path / "texts", n=6)
    (tmp_path / "texts" / "skipped.md").write_text("not matched by the glob")
    (tmp_path / "texts" / "empty.txt").write_text("")
    cfg = text_config(tmp_path, val_fraction=0.15, test_fraction=0.15, separator="\n\x00\n")
    result = prepared(cfg, tmp_path)
    splits = load_splits(LocalStore(tmp_path / "store"), result)
    texts = {s: splits.x[s].tobytes() for s in ("train", "val", "test")}
    owner = {}
    for name in names:
        content = (tmp_path / "texts" / name).read_bytes()
        holders = [s for s, data in texts.items() if content in data.split(b"\n\x00\n")]
        assert len(holders) == 1, f"{name} is in {holders}"
        owner[name] = holders[0]
    assert set(owner.values()) == {"train", "val", "test"}
    assert b"not matched" not in b"".join(texts.values())
    assert result.n_train == (len(texts["train"]) - 1) // 16
    other = text_config(tmp_path)
    reseeded = prepare_data(other.data, 1, LocalStore(tmp_path / "store"))
    assert reseeded.fingerprint != result.fingerprint  # a seeded deal


def test_a_text_file_that_is_not_utf8_is_named_or_skipped(tmp_path: Path) -> None:
    write_texts(tmp_path / "texts", n=5)
    (tmp_path / "texts" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8 text \(byte 3\); .*skip_bad_files"):
        preflight(text_config(tmp_path))
    result = prepared(text_config(tmp_path, skip_bad_files=True), tmp_path)
    assert len(result.skipped_files) == 1 and "latin1.txt: not UTF-8" in result.skipped_files[0]


def test_the_served_image_model_takes_images_of_any_size_and_encoded_bytes(tmp_path: Path) -> None:
    from tests.core.serving_support import assert_classes, image_case, open_tracking
    from trainflow.core.serving.trainflow_images import normalized

    case, tracking = image_case(tmp_path), open_tracking(tmp_path)
    served = tracking.load(tracking.log(case, case.export(".onnx"), "digit-images"))
    pre = case.pre
    assert pre["kind"] == "image_file" and pre["class_names"] == ["0", "1", "2"]
    raw = pd.read_pickle(case.store.local_path(case.data.raw_test_uri))
    pictures = raw["features"]  # uint8 (N, H, W, C) at the training size, as the champion is scored on them
    expected = case.proba(normalized(pictures.transpose(0, 3, 1, 2), pre["pixel_mean"], pre["pixel_std"]))
    assert_classes(served.predict(pictures), expected, case.data.spec.class_names)
    np.testing.assert_allclose(expected, case.proba(case.x_test()), atol=1e-6)  # the prepared inputs, exactly

    bigger = [Image.fromarray(p).resize((36, 24), Image.Resampling.BILINEAR) for p in pictures]  # other sizes
    arrays = [np.asarray(b) for b in bigger]
    encoded = [png_bytes(b) for b in bigger]
    by_rule = np.stack([square_image(a, 12, "rgb") for a in arrays])
    want = case.proba(normalized(by_rule, pre["pixel_mean"], pre["pixel_std"]))
    assert_classes(served.predict(arrays), want, case.data.spec.class_names)
    assert_classes(served.predict(encoded), want, case.data.spec.class_names)
    assert_classes(served.predict(pd.DataFrame({"image": encoded})), want, case.data.spec.class_names)
    with pytest.raises(ValueError, match="image 1: not a readable image"):
        served.predict([encoded[0], b"not a picture"])
    requirements = Path(tracking.download(tracking.log(case, case.export(".onnx"), "again"), tmp_path / "dl"))
    assert "pillow==" in (requirements / "requirements.txt").read_text()


def test_a_folder_is_listed_once_for_the_preflight_the_cache_key_and_the_stage(tmp_path: Path) -> None:
    from trainflow.core.data import folders
    from trainflow.core.data.sources import data_version

    root = write_digits(tmp_path / "digits", per_class=6, size=16)
    cfg = image_config(tmp_path, path=str(root))
    scans = []
    original = folders._list_class_folders
    folders._list_class_folders = lambda *a: scans.append(a) or original(*a)  # type: ignore[assignment]
    try:
        preflight(cfg)
        version = data_version(cfg.data, cfg.store)
        prepared(cfg, tmp_path)
        assert len(scans) == 1
        Image.open(root / "0" / "000.png").save(root / "0" / "extra.png")  # the folder changed: listed again
        assert data_version(cfg.data, cfg.store) != version and len(scans) == 2
    finally:
        folders._list_class_folders = original  # type: ignore[assignment]


def test_a_warm_start_keeps_the_parents_pixel_normalisation(tmp_path: Path) -> None:
    from trainflow.core.records import ReusedPreprocessing
    from trainflow.core.storage.files import sha256_file

    parent_root = write_digits(tmp_path / "parent", per_class=6, size=16)
    parent = prepared(image_config(tmp_path, path=str(parent_root)), tmp_path)
    store = LocalStore(tmp_path / "store")
    path = store.local_path(parent.preprocessor_uri)
    reused = ReusedPreprocessing(uri=str(path), sha256=sha256_file(path))
    child_root = write_digits(tmp_path / "child", per_class=9, size=16, rgb=False)
    cfg = image_config(tmp_path, path=str(child_root))
    child = prepare_data(cfg.data, cfg.seed, store, preprocessing=reused)
    fresh = prepared(cfg, tmp_path)
    assert child.spec.pixel_mean == parent.spec.pixel_mean != fresh.spec.pixel_mean
    assert child.fingerprint != fresh.fingerprint
    rgb = image_config(tmp_path, path=str(child_root), color="rgb")
    with pytest.raises(DataError, match=r"not for 16px rgb images; set data\.refit_preprocessing: true"):
        prepare_data(rgb.data, rgb.seed, store, preprocessing=reused)


@pytest.mark.slow
def test_a_bad_image_in_a_folder_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    root = write_digits(tmp_path / "pictures", per_class=6, size=12)
    good = (root / "1" / "002.png").read_bytes()
    (root / "1" / "002.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "config.yaml").write_text(
        "data: {source: image_folder, path: pictures, image_size: 12, color: gray}\nmodel: {name: cnn}\n"
    )
    before = listing(tmp_path)
    result = trainflow(tmp_path, "run", "config.yaml")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert re.fullmatch(r"error: pictures/1/002\.png: not a readable image \(.*\); fix or remove it, or set "
                        r"data\.skip_bad_files: true", result.stderr.strip()), result.stderr  # fmt: skip
    assert listing(tmp_path) == before


def test_a_text_folder_is_read_once_for_the_preflight_and_the_stage(tmp_path: Path) -> None:
    from trainflow.core.data import text_files

    write_texts(tmp_path / "texts", n=5)
    cfg = text_config(tmp_path)
    reads = []
    original = text_files._read
    text_files._read = lambda *a: reads.append(a) or original(*a)  # type: ignore[assignment]
    try:
        preflight(cfg)
        prepared(cfg, tmp_path)
        assert len(reads) == 1
    finally:
        text_files._read = original  # type: ignore[assignment]
