"""Where outputs live: an S3-compatible bucket or a local folder, behind one small interface.

Keys are relative to the store's prefix and always use '/'. A key can never reach
outside the prefix: absolute keys, '..' and empty parts are refused, in both stores.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Protocol
from urllib.parse import urlparse

from farm.errors import FarmError, StoreAccessDenied, StoreUnavailable
from farm.settings import Settings


class KeyMissing(FarmError, KeyError):
    """No object at this key."""


class Store(Protocol):
    url: str

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        """A local file's bytes at `key`, streamed from disk (a large shard never sits in memory)."""
        ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[str]: ...

    def delete(self, key: str) -> None: ...


def check_key(key: str) -> str:
    parts = key.split("/")
    if key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe store key {key[:120]!r}")
    return key


class LocalStore:
    """A folder laid out exactly as the bucket would be. Writes are atomic (rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyMissing(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        base = self.root / prefix.rstrip("/") if prefix else self.root
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith(".tmp-"):
                yield path.relative_to(self.root).as_posix()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Store:
    """An S3-compatible bucket through boto3. The client is made once per store object."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            # Standard retry mode retries throttling and 5xx with backoff itself;
            # farm's own retries sit above it, for longer outages.
            config = Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5, read_timeout=30)
            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        with _s3_errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        # upload_file sends large files in parts, read from disk as they go.
        with _s3_errors(key):
            self.client.upload_file(str(path), self.bucket, self._key(key), ExtraArgs={"ContentType": content_type})

    def get(self, key: str) -> bytes:
        with _s3_errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            with _s3_errors(key):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except KeyMissing:
            return False

    def list(self, prefix: str) -> Iterator[str]:
        full = self._key(prefix.rstrip("/")) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        skip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        with _s3_errors(prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    yield obj["Key"][skip:]

    def delete(self, key: str) -> None:
        with _s3_errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def presigned_url(self, key: str, expires: int) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires
        )


class _s3_errors:
    """Map botocore's errors onto farm's: missing key, access denied (permanent), unavailable (retriable)."""

    _DENIED = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken"}
    _MISSING = {"NoSuchKey", "404", "NotFound"}

    def __init__(self, key: str):
        self.key = key

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            return False
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in self._MISSING:
                raise KeyMissing(self.key) from None
            if code in self._DENIED or code == "403":
                raise StoreAccessDenied(f"the store refused access ({code}); check the S3 credentials") from None
            if code == "NoSuchBucket":
                raise StoreAccessDenied(f"no such bucket ({code})") from None
            raise StoreUnavailable(f"the store answered {code} for {self.key}") from exc
        from boto3.exceptions import S3UploadFailedError

        if isinstance(exc, S3UploadFailedError):
            # upload_file wraps the ClientError in text only.
            if any(code in str(exc) for code in self._DENIED | {"NoSuchBucket"}):
                raise StoreAccessDenied(f"the store refused the upload of {self.key}: {exc}") from None
            raise StoreUnavailable(f"the upload of {self.key} failed: {exc}") from exc
        if isinstance(exc, NoCredentialsError):
            raise StoreAccessDenied("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
        if isinstance(exc, BotoCoreError):
            raise StoreUnavailable(f"the store did not answer: {exc}") from exc
        return False


def open_store(url: str, settings: Settings | None = None) -> Store:
    """A store from its URL: `s3://bucket/prefix`, or a local folder (path or file:// URL)."""
    settings = settings or Settings.from_env()
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"store URL {url!r} names no bucket (s3://bucket/prefix)")
        return S3Store(parsed.netloc, parsed.path, endpoint_url=settings.s3_endpoint_url)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ValueError(f"store URL {url!r}: use s3://bucket/prefix or a local path")
    return LocalStore(url)


def check_writable(store: Store) -> None:
    """Write and remove a probe object, so bad credentials fail at submission, not on a worker."""
    key = ".farm-write-check"
    store.put(key, b"ok", "text/plain")
    store.delete(key)
