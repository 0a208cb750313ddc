import pytest

from farm.errors import StoreAccessDenied
from farm.settings import Settings
from farm.store import KeyMissing, LocalStore, check_writable, open_store
from tests.conftest import S3_SECRET_KEY


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    bucket = request.getfixturevalue("bucket")
    return open_store(f"s3://{bucket}/some/prefix", Settings.from_env())


def test_put_get_exists_list_delete(store):
    store.put("job-1/images/000000-1.png", b"png-bytes", "image/png")
    store.put("job-1/images/000001-2.png", b"other")
    store.put("job-10/job.json", b"{}")
    assert store.get("job-1/images/000000-1.png") == b"png-bytes"
    assert store.exists("job-1/images/000001-2.png")
    assert not store.exists("job-1/images/000002-3.png")
    assert list(store.list("job-1/images/")) == ["job-1/images/000000-1.png", "job-1/images/000001-2.png"]
    assert list(store.list("job-1")) == ["job-1/images/000000-1.png", "job-1/images/000001-2.png"]
    store.put("job-1/images/000000-1.png", b"overwritten")
    assert store.get("job-1/images/000000-1.png") == b"overwritten"
    store.delete("job-1/images/000000-1.png")
    with pytest.raises(KeyMissing):
        store.get("job-1/images/000000-1.png")


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "job/../../x", "job//x", "a\\b", "./x", ""])
def test_keys_cannot_escape_the_prefix(store, key):
    with pytest.raises(ValueError, match="unsafe store key"):
        store.put(key, b"x")


def test_s3_prefix_is_applied(bucket, s3_server):
    store = open_store(f"s3://{bucket}/team/a", Settings.from_env())
    store.put("job-1/job.json", b"{}")
    listed = s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["team/a/job-1/job.json"]


def test_wrong_secret_is_access_denied_at_the_write_check(bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY + "-wrong")
    with pytest.raises(StoreAccessDenied):
        check_writable(open_store(f"s3://{bucket}/p", Settings.from_env()))


def test_local_store_leaves_no_partial_files(tmp_path):
    store = LocalStore(tmp_path)
    store.put("a/b.bin", b"x" * 1000)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"]
