"""One storage test suite, run on both backends: a local directory and S3 over HTTP (moto's server)."""

from __future__ import annotations

import io
import os
import uuid

import boto3
import httpx
import pytest

from pipelines.errors import ObjectMissing, StemsError
from stems.settings import Settings
from stems.storage import LocalStorage, S3Storage, StorageError


def s3_settings(url: str, **kw) -> Settings:
    bucket = f"b{uuid.uuid4().hex[:10]}"
    boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
    ).create_bucket(Bucket=bucket)
    return Settings(
        storage="s3",
        s3_endpoint_url=url,
        s3_bucket=bucket,
        s3_prefix="pre/fix",
        s3_access_key_id="t",
        s3_secret_access_key="t",
        **kw,
    )


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, s3_url):
    if request.param == "local":
        return LocalStorage(tmp_path / "objects")
    return S3Storage(s3_settings(s3_url))


def test_put_get_round_trip(storage, tmp_path):
    src = tmp_path / "src.bin"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(payload)
    storage.put_file("users/u/a/original", src)
    dst = tmp_path / "dst.bin"
    storage.get_file("users/u/a/original", dst)
    assert dst.read_bytes() == payload
    assert storage.size("users/u/a/original") == len(payload)


def test_put_stream_counts_bytes(storage):
    n = storage.put_stream("k/stream", io.BytesIO(b"x" * 5000))
    assert n == 5000 and storage.size("k/stream") == 5000


def test_ranges(storage):
    storage.put_stream("k/r", io.BytesIO(bytes(range(256)) * 100))
    assert b"".join(storage.iter_range("k/r", 10, 19)) == bytes(range(10, 20))
    assert b"".join(storage.iter_range("k/r", 25590)) == bytes(range(246, 256))
    assert len(b"".join(storage.iter_range("k/r", block=1000))) == 25600


def test_missing_objects(storage, tmp_path):
    assert storage.size("nope/x") is None
    with pytest.raises(ObjectMissing):
        storage.get_file("nope/x", tmp_path / "x")
    with pytest.raises(ObjectMissing):
        b"".join(storage.iter_range("nope/x"))


def test_list_and_delete_prefix(storage):
    for k in ("users/u/jobs/j1/a.wav", "users/u/jobs/j1/b.wav", "users/u/jobs/j2/c.wav"):
        storage.put_stream(k, io.BytesIO(b"1"))
    assert storage.list("users/u/jobs/j1/") == ["users/u/jobs/j1/a.wav", "users/u/jobs/j1/b.wav"]
    assert storage.delete_prefix("users/u/jobs/j1/") == 2
    assert storage.list("users/u/jobs/") == ["users/u/jobs/j2/c.wav"]
    storage.delete("users/u/jobs/j2/c.wav")
    assert storage.size("users/u/jobs/j2/c.wav") is None


def test_ping_and_no_presign_by_default(storage):
    storage.ping()
    assert storage.presigned_url("k", "a.wav") is None


def test_local_keys_cannot_escape_root(tmp_path):
    with pytest.raises(StemsError):
        LocalStorage(tmp_path / "o").put_stream("../../etc/x", io.BytesIO(b"1"))


def test_s3_presigned_url_downloads(s3_url):
    s = S3Storage(s3_settings(s3_url, s3_presign_downloads=True))
    s.put_stream("a/b.wav", io.BytesIO(b"hello"))
    url = s.presigned_url("a/b.wav", "b.wav")
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == b"hello"


def test_s3_prefix_is_applied(s3_url):
    settings = s3_settings(s3_url)
    S3Storage(settings).put_stream("x/y", io.BytesIO(b"1"))
    raw = boto3.client(
        "s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
    )
    assert [o["Key"] for o in raw.list_objects_v2(Bucket=settings.s3_bucket)["Contents"]] == ["pre/fix/x/y"]


def test_s3_delete_prefix_raises_when_storage_refuses_keys(s3_url):
    """DeleteObjects answers 200 even when it refuses keys (a policy, an object lock): those stay, so
    delete_prefix must raise (its caller tries again later) instead of reporting them deleted."""
    from tests.faulty_s3 import FaultyS3

    proxy = FaultyS3(s3_url)
    try:
        s = S3Storage(s3_settings(s3_url).model_copy(update={"s3_endpoint_url": proxy.url}))
        for k in ("users/u/jobs/j1/a.wav", "users/u/jobs/j1/b.wav"):
            s.put_stream(k, io.BytesIO(b"1"))
        proxy.fail(1, "deny-delete")
        with pytest.raises(StorageError) as refused:
            s.delete_prefix("users/u/jobs/j1/")
        assert "refused to delete 2 of 2 objects" in refused.value.line()  # the operator's detail, for the log
        assert proxy.failed == 1 and s.list("users/u/jobs/j1/") == ["users/u/jobs/j1/a.wav", "users/u/jobs/j1/b.wav"]
        assert s.delete_prefix("users/u/jobs/j1/") == 2 and s.list("users/u/") == []
    finally:
        proxy.close()


def test_local_put_file_that_fails_half_way_leaves_no_part(tmp_path):
    storage = LocalStorage(tmp_path / "objects")
    # reading /proc/self/mem from offset 0 fails with EIO: a copy that fails after the part file exists (the
    # source still exists, so storage takes the blame: StorageUnavailable)
    with pytest.raises((OSError, StorageError)):
        storage.put_file("users/u/jobs/j1/a.wav", "/proc/self/mem")
    assert [p.name for p in (tmp_path / "objects").rglob("*") if p.is_file()] == []


def test_local_delete_prefix_removes_parts_a_killed_writer_left(tmp_path):
    storage = LocalStorage(tmp_path / "objects")
    storage.put_stream("users/u/jobs/j1/a.wav", io.BytesIO(b"1"))
    part = tmp_path / "objects" / "users/u/jobs/j1/att/.b.wav.0123.part"  # its writer was SIGKILLed mid-copy
    part.parent.mkdir(parents=True)
    part.write_bytes(b"half")
    assert storage.list("users/u/jobs/j1/") == ["users/u/jobs/j1/a.wav"]  # a part is never an object ...
    assert storage.delete_prefix("users/u/jobs/j1/") == 1
    assert [p for p in (tmp_path / "objects").rglob("*") if p.is_file()] == []  # ... but goes with its prefix
