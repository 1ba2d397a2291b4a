"""Object storage: every data location is a URI, ``s3://bucket/prefix`` or a local path.

This is the one module that knows boto3 (listing, upload, small objects) and pyarrow's
filesystems (Parquet, and the video bytes Ray Data reads). Any S3-compatible endpoint works
(AWS, MinIO, Ceph, the embedded loopback server): the endpoint comes from ``--endpoint-url`` or
``AWS_ENDPOINT_URL``; credentials from boto3's standard chain (pyarrow uses the same chain).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

CONNECT_TIMEOUT_S = 3.0
# A GET that fails for a transient reason (503, throttling, a dropped connection) is tried this
# many times in all, with the SDKs' standard exponential backoff, before the video counts as failed.
MAX_ATTEMPTS = 5
_UMASK = os.umask(0o022)  # read once: the mode new local files get
os.umask(_UMASK)


class StorageError(RuntimeError):
    """Object storage could not be reached or refused a request; the message names the endpoint."""


class LocationError(ValueError):
    """A URI or stored key sonoray cannot use (unsupported scheme, no bucket, a ``..`` part)."""


@dataclass(frozen=True)
class StorageConfig:
    """Where S3 requests go. ``endpoint_url=None`` means AWS (or whatever boto3 resolves)."""

    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls, endpoint_url: str | None = None) -> "StorageConfig":
        return cls(
            endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
            region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None,
        )

    @property
    def endpoint_label(self) -> str:
        return self.endpoint_url or "the default AWS S3 endpoint"


@dataclass(frozen=True)
class Location:
    """A parsed data location: ``scheme`` is "s3" or "file"; ``bucket`` is empty for files."""

    scheme: str
    bucket: str
    key: str  # prefix inside the bucket, or the absolute local path

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}".rstrip("/") if self.is_s3 else self.key

    @property
    def fs_path(self) -> str:
        """The path pyarrow filesystems use: ``bucket/key`` for S3, the local path for files."""
        return f"{self.bucket}/{self.key}".rstrip("/") if self.is_s3 else self.key

    def join(self, *parts: str) -> "Location":
        """The location ``parts`` below this one; a ``..`` part (a stored key that would climb
        out, e.g. a tampered manifest) raises ValueError naming it."""
        tail = "/".join(p.strip("/") for p in parts if p)
        if ".." in tail.split("/"):
            raise LocationError(f"{self.uri}: refusing to join {tail!r}: it has a '..' part")
        if self.is_s3:
            key = f"{self.key.rstrip('/')}/{tail}".strip("/") if self.key else tail
            return Location("s3", self.bucket, key)
        return Location("file", self.bucket, str(Path(self.key, *[p for p in tail.split("/") if p])))


def parse_uri(uri: str) -> Location:
    """``s3://bucket/prefix`` -> S3 location; anything else -> an absolute local path."""
    text = str(uri).strip()
    if text.startswith("s3://"):
        parsed = urlparse(text)
        if not parsed.netloc:
            raise LocationError(f"{uri!r}: an S3 URI needs a bucket (s3://bucket/prefix)")
        return Location("s3", parsed.netloc, parsed.path.strip("/"))
    if "://" in text and not text.startswith("file://"):
        raise LocationError(f"{uri!r}: unsupported scheme (use s3://bucket/prefix or a local path)")
    return Location("file", "", str(Path(text.removeprefix("file://")).expanduser().resolve()))


# The reachability check every job makes first: an endpoint that accepts connections and never
# answers fails it within CHECK_ATTEMPTS x (CONNECT_TIMEOUT_S + CHECK_READ_TIMEOUT_S) plus one
# backoff (<= 15 s), where the transfer client would wait MAX_ATTEMPTS x 60 s.
CHECK_READ_TIMEOUT_S = 3.0
CHECK_ATTEMPTS = 2


@lru_cache(maxsize=8)
def _boto3_client(config: StorageConfig, read_timeout: float = 60, attempts: int = MAX_ATTEMPTS):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=config.endpoint_url,
        region_name=config.region,
        config=Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=read_timeout,
            retries={"max_attempts": attempts, "mode": "standard"},
        ),
    )


@lru_cache(maxsize=8)
def _s3_filesystem(config: StorageConfig) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": config.region or "us-east-1",
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": 60,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
    }
    if config.endpoint_url:
        # pyarrow ignores AWS_ENDPOINT_URL: the endpoint must be passed explicitly.
        parsed = urlparse(config.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


class Storage:
    """Reads and writes at URIs, local or S3, with errors that name the endpoint."""

    def __init__(self, config: StorageConfig | None = None) -> None:
        self.config = config or StorageConfig.from_env()

    # -- filesystem handles -------------------------------------------------------------
    def filesystem(self, location: Location) -> pafs.FileSystem:
        return _s3_filesystem(self.config) if location.is_s3 else pafs.LocalFileSystem()

    def client(self):
        return _boto3_client(self.config)

    def _wrap(self, err: Exception, what: str) -> StorageError:
        return StorageError(f"{what}: S3 endpoint {self.config.endpoint_label} failed: {err}")

    # -- buckets and reachability -------------------------------------------------------
    def check(self, location: Location, create_bucket: bool = False) -> None:
        """Fail within seconds, naming the endpoint, when it cannot be reached; optionally
        create the bucket."""
        if not location.is_s3:
            return
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

        client = _boto3_client(self.config, CHECK_READ_TIMEOUT_S, CHECK_ATTEMPTS)
        try:
            client.head_bucket(Bucket=location.bucket)
        except EndpointConnectionError as err:
            raise StorageError(
                f"cannot reach the S3 endpoint {self.config.endpoint_label}: {err}"
            ) from err
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound") and create_bucket:
                try:
                    client.create_bucket(Bucket=location.bucket)
                except (ClientError, BotoCoreError) as create_err:
                    raise self._wrap(create_err, f"creating bucket {location.bucket!r}") from create_err
            elif code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(
                    f"bucket {location.bucket!r} does not exist at {self.config.endpoint_label}"
                ) from err
            else:
                raise self._wrap(err, f"bucket {location.bucket!r}") from err
        except BotoCoreError as err:
            raise StorageError(
                f"cannot reach the S3 endpoint {self.config.endpoint_label}: {err}"
            ) from err

    # -- objects ------------------------------------------------------------------------
    def stored_sha256(self, location: Location) -> str | None:
        """The sha256 recorded for an object (S3 metadata) or computed (local file); None if
        the object does not exist."""
        if location.is_s3:
            head = self._head(location)
            return None if head is None else head.get("Metadata", {}).get("sha256") or ""
        path = Path(location.key)
        return file_sha256(path) if path.is_file() else None

    def size_of(self, location: Location) -> int | None:
        """An object's size in bytes (one HEAD request on S3, a stat locally); None when there
        is no object."""
        if location.is_s3:
            head = self._head(location)
            return None if head is None else int(head.get("ContentLength", 0))
        try:
            return os.stat(location.key).st_size
        except FileNotFoundError:
            return None

    def _head(self, location: Location) -> dict | None:
        """An S3 object's HEAD response, or None when there is no object."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client().head_object(Bucket=location.bucket, Key=location.key)
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._wrap(err, location.uri) from err
        except BotoCoreError as err:
            raise self._wrap(err, location.uri) from err

    def upload_file(self, source: Path, location: Location, sha256: str) -> None:
        if location.is_s3:
            try:
                self.client().upload_file(
                    str(source), location.bucket, location.key, ExtraArgs={"Metadata": {"sha256": sha256}}
                )
            except Exception as err:  # boto3 raises S3UploadFailedError, ClientError, ...
                raise self._wrap(err, f"uploading {source} to {location.uri}") from err
            return
        with open(source, "rb") as handle:
            atomic_write_local(Path(location.key), lambda out: shutil.copyfileobj(handle, out, 1 << 20))

    def read_bytes(self, location: Location) -> bytes:
        fs = self.filesystem(location)
        try:
            with fs.open_input_stream(location.fs_path) as handle:
                return handle.read()
        except OSError as err:
            raise self._wrap(err, location.uri) if location.is_s3 else err

    def download_hashed(self, location: Location, target: Path, chunk: int = 1 << 20) -> str:
        """Copy an object to the local file ``target`` in ``chunk``-sized reads, hashing as it
        streams (never the whole object in memory); returns its sha256."""
        digest = hashlib.sha256()
        fs = self.filesystem(location)
        try:
            with fs.open_input_stream(location.fs_path) as handle, open(target, "wb") as out:
                while block := handle.read(chunk):
                    digest.update(block)
                    out.write(block)
        except OSError as err:
            raise self._wrap(err, location.uri) if location.is_s3 else err
        return digest.hexdigest()

    def write_bytes(self, location: Location, data: bytes) -> None:
        """Write ``data`` whole or not at all: a reader sees the old object or the new one.

        Local: a unique temporary file beside the target, fsynced, then renamed over it (the
        temporary file is removed on error). S3: one PUT of the complete object."""
        if not location.is_s3:
            atomic_write_local(Path(location.key), lambda handle: handle.write(data))
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client().put_object(Bucket=location.bucket, Key=location.key, Body=data)
        except (BotoCoreError, ClientError, OSError) as err:
            raise self._wrap(err, f"writing {location.uri}") from err

    def create_exclusive(self, location: Location, data: bytes) -> bool:
        """Create the object only if it does not exist; False when it already does.

        Local: ``O_CREAT | O_EXCL``. S3: a conditional PUT (``If-None-Match: *``), which AWS,
        MinIO and moto answer with 412 when the key exists."""
        if not location.is_s3:
            path = Path(location.key)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return True
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client().put_object(Bucket=location.bucket, Key=location.key, Body=data, IfNoneMatch="*")
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise self._wrap(err, f"creating {location.uri}") from err
        except (BotoCoreError, OSError) as err:
            raise self._wrap(err, f"creating {location.uri}") from err
        return True

    def delete(self, location: Location) -> None:
        """Remove the object or file; absent already is fine."""
        if not location.is_s3:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(location.key)
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client().delete_object(Bucket=location.bucket, Key=location.key)
        except (BotoCoreError, ClientError, OSError) as err:
            raise self._wrap(err, f"deleting {location.uri}") from err

    def version(self, location: Location) -> str | None:
        """A token that changes whenever the object's content is replaced (S3: its ETag; local: size,
        modification time in ns and inode), or None when there is no object. One HEAD request,
        no body: what a reader checks before trusting a copy it kept from an earlier read."""
        if location.is_s3:
            head = self._head(location)
            return None if head is None else f"etag:{head.get('ETag', '')}:{head.get('ContentLength', '')}"
        try:
            stat = os.stat(location.key)
        except FileNotFoundError:
            return None
        return f"file:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"

    def exists(self, location: Location) -> bool:
        info = self.filesystem(location).get_file_info(location.fs_path)
        return info.type != pafs.FileType.NotFound

    def list_files(self, location: Location) -> list[str]:
        """Paths (relative to ``location``) of every file below it."""
        fs = self.filesystem(location)
        selector = pafs.FileSelector(location.fs_path, recursive=True, allow_not_found=True)
        base = location.fs_path.rstrip("/") + "/"
        return sorted(
            info.path[len(base):] for info in fs.get_file_info(selector) if info.type == pafs.FileType.File
        )

    def write_parquet(self, table: pa.Table, location: Location) -> None:
        sink = io.BytesIO()
        pq.write_table(table, sink)
        self.write_bytes(location, sink.getvalue())

    def read_parquet(self, location: Location) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(location)))

    def list_sizes(self, location: Location) -> list[tuple[str, int]]:
        """``(path relative to location, size in bytes)`` of every file below it."""
        fs = self.filesystem(location)
        selector = pafs.FileSelector(location.fs_path, recursive=True, allow_not_found=True)
        base = location.fs_path.rstrip("/") + "/"
        return sorted((info.path[len(base):], int(info.size or 0)) for info in fs.get_file_info(selector)
                      if info.type == pafs.FileType.File)


def atomic_write_local(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Create or replace the file ``target`` atomically: ``write(handle)`` fills a unique
    temporary file in the same folder, which is flushed, fsynced and renamed over ``target``;
    on any error the temporary file is removed and ``target`` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from the group
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
