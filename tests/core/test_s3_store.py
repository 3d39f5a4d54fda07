"""The S3 artifact store against moto's server over real HTTP on loopback: round trips, sha256 metadata,
idempotent uploads, multipart, faults on the wire, the verified cache, key escapes, the preflight
check and the config section."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import tiny_raw
from tests.s3_server import FaultProxy, fault_proxy, new_bucket, s3_client, s3_endpoint  # noqa: F401
from trainflow.core.config import StoreConfig, config_from_dict, load_config
from trainflow.core.errors import ConfigError, StoreError
from trainflow.core.storage import s3 as s3_module
from trainflow.core.storage.s3 import S3Store
from trainflow.core.storage.store import LocalStore, open_store, resolved

MiB = 1 << 20


def _store(endpoint: str, bucket: str, cache: Path, **settings: Any) -> S3Store:
    store = open_store(
        StoreConfig(uri=f"s3://{bucket}/runs/x", endpoint_url=endpoint, cache_dir=str(cache), **settings)
    )
    assert isinstance(store, S3Store)
    return store


def _calls(store: S3Store) -> Counter[str]:
    """Every S3 operation the store's client sends from now on (a botocore event hook)."""
    seen: Counter[str] = Counter()
    store.client.meta.events.register("before-call.s3.*", lambda model, **_: seen.update([model.name]))
    return seen


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_BUCKETS = itertools.count()


@pytest.fixture
def bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:  # noqa: F811
    """A fresh bucket per test, named after it."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())
    return new_bucket(s3_endpoint, f"t{next(_BUCKETS)}-{slug}"[:60].rstrip("-"))


@pytest.fixture
def store(s3_endpoint: str, bucket: str, tmp_path: Path) -> S3Store:  # noqa: F811
    return _store(s3_endpoint, bucket, tmp_path / "cache")


def test_round_trip_with_sha256_metadata_and_sizes(store: S3Store, tmp_path: Path, s3_endpoint: str) -> None:  # noqa: F811
    src = tmp_path / "weights.bin"
    src.write_bytes(os.urandom(3000))
    uri_file = store.put_file(src, "stage/a/weights.bin")
    uri_bytes = store.put_bytes(b'{"ok": true}', "stage/a/record.json")
    assert (uri_file, uri_bytes) == (f"{store.uri}/stage/a/weights.bin", f"{store.uri}/stage/a/record.json")
    assert store.uri_for("stage/a/weights.bin") == uri_file
    assert store.exists(uri_file) and store.exists(uri_bytes) and not store.exists(f"{store.uri}/stage/a/none")

    listed = s3_client(s3_endpoint).list_objects_v2(Bucket=store.bucket, Prefix="runs/x/")["Contents"]
    assert {o["Key"]: o["Size"] for o in listed} == {
        "runs/x/stage/a/weights.bin": 3000,
        "runs/x/stage/a/record.json": 12,
    }
    for key, data in [
        ("runs/x/stage/a/weights.bin", src.read_bytes()),
        ("runs/x/stage/a/record.json", b'{"ok": true}'),
    ]:
        head = s3_client(s3_endpoint).head_object(Bucket=store.bucket, Key=key)
        assert head["Metadata"] == {"sha256": _sha(data)}

    fresh = _store(s3_endpoint, store.bucket, tmp_path / "other-cache")  # nothing cached: downloads
    assert fresh.local_path(uri_file).read_bytes() == src.read_bytes()
    assert fresh.local_path(uri_bytes).read_bytes() == b'{"ok": true}'
    assert fresh.local_path(uri_file) == tmp_path / "other-cache" / "s3" / store.bucket / "runs/x/stage/a/weights.bin"
    workdir = store.workdir("stage/b")
    assert workdir.is_dir() and workdir == store.cache_root / "stage/b"


def test_same_content_is_not_uploaded_again_and_changed_content_is(
    store: S3Store,
    tmp_path: Path,
    s3_endpoint: str,  # noqa: F811
) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"one" * 1000)
    calls = _calls(store)
    store.put_file(src, "k/f.bin")
    store.put_bytes(b"two", "k/g.txt")
    assert calls["PutObject"] == 2
    store.put_file(src, "k/f.bin")
    store.put_bytes(b"two", "k/g.txt")
    assert calls["PutObject"] == 2 and calls["HeadObject"] >= 4, "a HEAD found the same sha256 and size"
    src.write_bytes(b"ONE" * 1000)  # same size, new content
    store.put_file(src, "k/f.bin")
    assert calls["PutObject"] == 3
    assert (
        _store(s3_endpoint, store.bucket, tmp_path / "c2").local_path(store.uri_for("k/f.bin")).read_bytes()
        == b"ONE" * 1000
    )


def test_a_file_above_the_threshold_goes_up_in_parts_and_verifies(
    store: S3Store,
    tmp_path: Path,
    s3_endpoint: str,  # noqa: F811
) -> None:
    multipart = _store(s3_endpoint, store.bucket, tmp_path / "c", multipart_threshold_mb=5)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MiB))
    calls = _calls(multipart)
    uri = multipart.put_file(src, "big/model.pt")
    assert calls["CreateMultipartUpload"] == 1 and calls["UploadPart"] == 3 and calls["CompleteMultipartUpload"] == 1
    assert calls["PutObject"] == 0
    fresh = _store(s3_endpoint, store.bucket, tmp_path / "c2", multipart_threshold_mb=5)
    assert _sha(fresh.local_path(uri).read_bytes()) == _sha(src.read_bytes())
    multipart.put_file(src, "big/model.pt")
    assert calls["CreateMultipartUpload"] == 1, "unchanged: not uploaded again"


def test_a_failed_multipart_upload_is_aborted_and_leaves_nothing(
    store: S3Store,
    tmp_path: Path,
    s3_endpoint: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from botocore.exceptions import ConnectionClosedError

    monkeypatch.setattr(s3_module, "BACKOFF_S", 0.01)
    multipart = _store(s3_endpoint, store.bucket, tmp_path / "c", multipart_threshold_mb=5)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * MiB))
    calls = _calls(multipart)
    failures = {"left": 1}

    def break_second_part(params: dict[str, Any], **_: Any) -> None:
        if params.get("PartNumber") == 2 and failures["left"]:
            failures["left"] -= 1
            raise ConnectionClosedError(endpoint_url=s3_endpoint)

    multipart.client.meta.events.register("provide-client-params.s3.UploadPart", break_second_part)
    uri = multipart.put_file(src, "big/a.pt")  # the first try fails, is aborted; the second completes
    assert calls["CreateMultipartUpload"] == 2 and calls["AbortMultipartUpload"] >= 1
    assert multipart.local_path(uri).read_bytes() == src.read_bytes()

    failures["left"] = 99  # every try fails: an error, and nothing under the key
    with pytest.raises(StoreError, match=r"big/b\.pt: upload of .* failed: ConnectionClosedError"):
        multipart.put_file(src, "big/b.pt")
    client = s3_client(s3_endpoint)
    assert "Contents" not in client.list_objects_v2(Bucket=store.bucket, Prefix="runs/x/big/b.pt")
    assert client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


@pytest.mark.slow
def test_uploads_through_a_faulty_network_complete_verify_and_never_show_partial_objects(
    fault_proxy: FaultProxy,  # noqa: F811
    s3_endpoint: str,  # noqa: F811
    bucket: str,
    tmp_path: Path,
) -> None:
    settings = {"multipart_threshold_mb": 5, "max_attempts": 10, "read_timeout_s": 1.0, "connect_timeout_s": 1.0}
    store = _store(fault_proxy.endpoint, bucket, tmp_path / "c", **settings)
    files = {"big-1.bin": os.urandom(12 * MiB), "big-2.bin": os.urandom(11 * MiB)}
    files |= {f"small-{i}.json": os.urandom(200 + i) for i in range(4)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    client = s3_client(s3_endpoint)  # straight to the server: what any reader would see meanwhile
    partial: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/x/").get("Contents", []):
                name = o["Key"].rsplit("/", 1)[1]
                if o["Size"] != len(files[name]):
                    partial.append(f"{name}: {o['Size']} bytes")
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        uris = {name: store.put_file(tmp_path / name, f"f/{name}") for name in files}
    finally:
        done.set()
        watcher.join()
    assert partial == []
    assert fault_proxy.stats["reset"] + fault_proxy.stats["stall"] > 0, fault_proxy.stats
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    reader = _store(fault_proxy.endpoint, bucket, tmp_path / "fresh", **settings)  # downloads through faults too
    for name, uri in uris.items():
        assert _sha(reader.local_path(uri).read_bytes()) == _sha(files[name])
        head = client.head_object(Bucket=bucket, Key=f"runs/x/f/{name}")
        assert head["Metadata"]["sha256"] == _sha(files[name]) and head["ContentLength"] == len(files[name])


def test_a_damaged_cached_copy_is_downloaded_again(store: S3Store) -> None:
    uri = store.put_bytes(b"0123456789" * 100, "d/data.npz")
    path = store.local_path(uri)
    calls = _calls(store)
    path.write_bytes(b"X" + path.read_bytes()[1:])  # same size, other content
    assert store.local_path(uri).read_bytes() == b"0123456789" * 100
    assert calls["GetObject"] >= 1
    path.write_bytes(b"short")
    assert store.local_path(uri).read_bytes() == b"0123456789" * 100
    before = calls["GetObject"]
    store.local_path(uri)
    assert calls["GetObject"] == before, "a good cached copy is used as is"


def test_a_missing_object_is_a_store_error_naming_it(store: S3Store) -> None:
    uri = store.uri_for("nothing/here.pt")
    with pytest.raises(StoreError, match=f"^{uri}: no such object in the store$"):
        store.local_path(uri)
    with pytest.raises(StoreError, match="not an artifact URI of the store"):
        store.local_path("s3://another-bucket/runs/x/a.pt")


@pytest.mark.parametrize(
    "key", ["../escape", "a/../../b", "/etc/passwd", "a\\b", "a//b", "a/", "", "./a", "a/\x00b", "a/\nb", "a/\x7f"]
)
def test_keys_cannot_escape_the_prefix(store: S3Store, key: str, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x")
    for attempt in (
        lambda: store.put_file(src, key),
        lambda: store.put_bytes(b"x", key),
        lambda: store.workdir(key),
        lambda: store.uri_for(key),
        lambda: store.exists(f"{store.uri}/{key}"),
        lambda: store.local_path(f"{store.uri}/{key}"),
    ):
        with pytest.raises(StoreError, match=r"not a valid artifact key|not an artifact URI"):
            attempt()
    assert not (tmp_path / "cache").exists() or not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_an_s3_store_and_its_settings_pickle_without_a_client(store: S3Store) -> None:
    import pickle

    store.put_bytes(b"x", "p/x")  # the client exists now
    copy = pickle.loads(pickle.dumps(store))
    assert copy.uri == store.uri and copy.cache_root == store.cache_root and copy._client is None
    assert copy.exists(store.uri_for("p/x"))


def test_an_hpo_search_with_a_spawned_worker_runs_on_an_s3_store(store: S3Store, s3_endpoint: str) -> None:  # noqa: F811
    """The worker process gets the store pickled, opens its own client and reads the data through its cache;
    the Optuna study is SQLite in the cache folder (local to this machine)."""
    from tests.core.hpo_support import search, search_config

    cfg = search_config({"space": {"model.dropout": {"type": "float", "low": 0.0, "high": 0.5}}, "n_trials": 2,
                         "parallelism": 2})  # fmt: skip
    result = search(cfg, store, None)  # type: ignore[arg-type]
    assert result.n_complete == 2
    assert result.storage == f"sqlite:///{store.cache_root / 'hpo' / 'optuna.db'}"
    assert store.exists(result.plot_uri) and result.plot_uri.startswith(f"s3://{store.bucket}/runs/x/")


# ------------------------------------------------------------------------------- check_writable
@pytest.fixture
def iam_user(s3_endpoint: str) -> dict[str, str]:  # noqa: F811
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_endpoint)
    name = f"user-{time.monotonic_ns()}"
    iam.create_user(UserName=name)
    return iam.create_access_key(UserName=name)["AccessKey"]  # type: ignore[no-any-return]


def _check(store: S3Store) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        store.check_writable()
    return str(caught.value), time.monotonic() - started


@pytest.mark.parametrize(
    "case", ["no_credentials", "unknown_key", "wrong_secret", "denied", "unreachable", "no_bucket"]
)
def test_check_writable_names_the_store_and_the_cause_in_one_line_in_seconds(
    case: str,
    bucket: str,
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    import moto.settings

    from tests.s3_server import free_port, isolate_aws_env

    endpoint, target, secret = s3_endpoint, bucket, "testing"
    if case == "no_credentials":
        isolate_aws_env(monkeypatch, credentials=None)
    elif case in ("unknown_key", "wrong_secret", "denied"):
        user = request.getfixturevalue("iam_user")
        key_id, secret = {"unknown_key": ("AKIAUNKNOWN000000000", "s3cr3t-unknown"),
                          "wrong_secret": (user["AccessKeyId"], "s3cr3t-wrong"),
                          "denied": (user["AccessKeyId"], user["SecretAccessKey"])}[case]  # fmt: skip
        isolate_aws_env(monkeypatch, {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret})
        monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    elif case == "unreachable":
        endpoint = f"http://127.0.0.1:{free_port()}"
    else:
        target = f"missing-{bucket}"[:63]
    store = _store(endpoint, target, tmp_path / "cache")
    message, seconds = _check(store)
    expected = {
        "no_credentials": "no AWS credentials found (NoCredentialsError)",
        "unknown_key": f"the access key id is not known to {endpoint} (InvalidAccessKeyId)",
        "wrong_secret": "the secret access key does not match the access key id (SignatureDoesNotMatch)",
        "denied": f"access denied (ListObjectsV2): the credentials lack permission on bucket '{target}' (AccessDenied)",
        "unreachable": f"cannot connect to {endpoint} (EndpointConnectionError)",
        "no_bucket": f"bucket '{target}' does not exist at {endpoint} (NoSuchBucket)",
    }[case]
    assert message.startswith(f"store.uri s3://{target}/runs/x: {expected}")
    assert "\n" not in message and secret not in message
    assert seconds < 5
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    isolate_aws_env(monkeypatch)
    assert "Contents" not in s3_client(s3_endpoint).list_objects_v2(Bucket=bucket), "wrote nothing"
    assert not (tmp_path / "cache").exists(), "created nothing locally"


def test_check_writable_passes_on_a_good_store_and_writes_nothing(store: S3Store, s3_endpoint: str) -> None:  # noqa: F811
    store.check_writable()
    assert "Contents" not in s3_client(s3_endpoint).list_objects_v2(Bucket=store.bucket)
    assert not store.cache_root.exists()


# ---------------------------------------------------------------------------------------- config
def test_an_s3_store_validates_with_its_fields() -> None:
    store = {"uri": "s3://my-bucket.v2/team/runs/", "endpoint_url": "http://127.0.0.1:9000/", "region": "eu-west-1",
             "multipart_threshold_mb": 8, "max_concurrency": 8, "retry_mode": "adaptive", "max_attempts": 3,
             "sse": "aws:kms", "sse_kms_key_id": "alias/trainflow", "storage_class": "STANDARD_IA"}  # fmt: skip
    config = config_from_dict(tiny_raw(store=store))
    assert config.store.uri == "s3://my-bucket.v2/team/runs" and config.store.endpoint_url == "http://127.0.0.1:9000"
    assert isinstance(open_store(config.store), S3Store)


def test_the_default_store_stays_a_local_folder(in_tmp: Path) -> None:
    config = config_from_dict(tiny_raw())
    assert config.store.uri == "./artifacts" and config.store.cache_dir == "./.trainflow-cache"
    store = open_store(config.store)
    assert isinstance(store, LocalStore) and store.root == in_tmp / "artifacts"
    assert resolved(config.store).uri == (in_tmp / "artifacts").as_uri()


def test_the_cache_folder_is_taken_from_the_working_folder_and_made_absolute(in_tmp: Path) -> None:
    settings = resolved(StoreConfig(uri="s3://bucket/p"))
    assert settings.cache_dir == str(in_tmp / ".trainflow-cache")
    store = open_store(settings)
    assert isinstance(store, S3Store) and store.cache_root == in_tmp / ".trainflow-cache" / "s3" / "bucket" / "p"
    assert not (in_tmp / ".trainflow-cache").exists(), "opening a store creates nothing"


@pytest.mark.parametrize(
    ("store", "problem"),
    [
        ({"uri": "s3://My_Bucket/x"}, "store.uri: 's3://My_Bucket/x': bucket name 'My_Bucket' may hold only lowercase "
         "letters, digits, dots and hyphens, and must begin and end with a letter or digit"),
        ({"uri": "s3://ab"}, "store.uri: 's3://ab': bucket name 'ab' must be 3 to 63 characters long"),
        ({"uri": "s3://a..b"}, "store.uri: 's3://a..b': bucket name 'a..b' must not hold two dots in a row"),
        ({"uri": "s3://192.168.1.1"}, "store.uri: 's3://192.168.1.1': bucket name '192.168.1.1' must not look like an "
         "IP address"),
        ({"uri": "s3://bucket/a/../b"}, "store.uri: 's3://bucket/a/../b': prefix 'a/../b': '..' segments are "
         "not allowed"),
        ({"uri": "s3://bucket", "sse_kms_key_id": "k"}, "store: sse_kms_key_id is set but sse is None; set sse: "
         "aws:kms or drop the key id"),
        ({"uri": "s3://bucket", "sse": "AES256", "sse_kms_key_id": "k"}, "store: sse_kms_key_id is set but sse is "
         "'AES256'; set sse: aws:kms or drop the key id"),
        ({"endpoint_url": "http://key:secret@host"}, "store.endpoint_url: must not carry credentials; boto3's "
         "credential chain supplies them"),
        ({"multipart_threshold_mb": 1}, "store.multipart_threshold_mb: 1 must be >= 5"),
    ],
)  # fmt: skip
def test_bad_store_settings_are_one_line_config_errors(in_tmp: Path, store: dict[str, Any], problem: str) -> None:
    (in_tmp / "config.yaml").write_text(yaml.safe_dump(tiny_raw(store=store)))
    with pytest.raises(ConfigError) as caught:
        load_config("config.yaml")
    assert caught.value.problems == [f"config.yaml: {problem}"]
