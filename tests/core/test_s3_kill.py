"""SIGKILL during uploads to the S3 store, then a re-run: it completes, no partial object was ever visible,
and the files already uploaded are not sent again (PUTs counted on the re-run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tests.s3_server import new_bucket, s3_client, s3_endpoint  # noqa: F401
from trainflow.core.config import StoreConfig
from trainflow.core.storage.files import sha256_file
from trainflow.core.storage.s3 import S3Store
from trainflow.core.storage.store import open_store

REPO = Path(__file__).resolve().parents[2]
FILES, MiB = 6, 1 << 20

UPLOADER = """
import sys
from pathlib import Path
from trainflow.core.config import StoreConfig
from trainflow.core.storage.store import open_store

endpoint, bucket, cache, folder = sys.argv[1:]
store = open_store(StoreConfig(uri=f"s3://{bucket}/runs", endpoint_url=endpoint, cache_dir=cache,
                               multipart_threshold_mb=5))
for path in sorted(Path(folder).glob("part-*.bin")):
    store.put_file(path, f"upload/{path.name}")
"""


def _store(endpoint: str, bucket: str, cache: Path) -> S3Store:
    store = open_store(
        StoreConfig(uri=f"s3://{bucket}/runs", endpoint_url=endpoint, cache_dir=str(cache), multipart_threshold_mb=5)
    )
    assert isinstance(store, S3Store)
    return store


def test_a_run_killed_mid_upload_completes_on_rerun_without_sending_finished_files_again(
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    bucket = new_bucket(s3_endpoint, "kill-mid-upload")
    folder = tmp_path / "files"
    folder.mkdir()
    for i in range(FILES):  # 7 MiB each: every file is a multipart upload of two parts
        (folder / f"part-{i}.bin").write_bytes(os.urandom(7 * MiB))
    client = s3_client(s3_endpoint)

    def uploaded() -> list[str]:
        listed = client.list_objects_v2(Bucket=bucket, Prefix="runs/upload/").get("Contents", [])
        return sorted(o["Key"].rsplit("/", 1)[1] for o in listed)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, s3_endpoint, bucket, str(tmp_path / "cache-1"), str(folder)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    try:
        while len(uploaded()) < 2:  # two files done: the third is on its way
            assert process.poll() is None, process.stderr.read().decode()[-2000:] if process.stderr else ""
            assert time.monotonic() < deadline, "the uploader made no progress"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    done_before = uploaded()
    assert 2 <= len(done_before) < FILES, f"killed too late to be mid-upload: {done_before}"
    for name in done_before:  # whatever is visible is complete: the multipart upload of the next one is not
        head = client.head_object(Bucket=bucket, Key=f"runs/upload/{name}")
        assert head["ContentLength"] == 7 * MiB

    store = _store(s3_endpoint, bucket, tmp_path / "cache-2")  # a fresh process and cache, as on a re-run
    calls: Counter[str] = Counter()
    store.client.meta.events.register("before-call.s3.*", lambda model, **_: calls.update([model.name]))
    for path in sorted(folder.glob("part-*.bin")):
        store.put_file(path, f"upload/{path.name}")

    assert uploaded() == sorted(p.name for p in folder.glob("part-*.bin"))
    assert calls["CreateMultipartUpload"] == FILES - len(done_before), calls  # only the unfinished ones
    assert calls["PutObject"] == 0, calls
    for path in folder.glob("part-*.bin"):
        local = store.local_path(store.uri_for(f"upload/{path.name}"))
        assert sha256_file(local) == sha256_file(path)
