"""The factory that picks a :class:`~posstate.replica.client.ReplicaClient` for a URL (boto3 only for s3://)."""

from __future__ import annotations

from posstate.core.errors import ConfigError
from posstate.replica.client import ReplicaClient


def open_client(url: str, *, endpoint_url: str | None = None) -> ReplicaClient:
    """The client for *url* (``s3://bucket/prefix`` or ``file:///path``); boto3 is imported only for s3://."""
    if url.startswith("file://"):
        from posstate.replica.file import FileClient

        return FileClient(url)
    if url.startswith("s3://"):
        from posstate.replica.client import has_userinfo
        from posstate.replica.s3 import S3Client

        if endpoint_url is not None and has_userinfo(endpoint_url):
            raise ConfigError("the S3 endpoint URL must not hold credentials; boto3 reads them from its usual chain")

        return S3Client(url, endpoint_url=endpoint_url)
    raise ConfigError(f"replica_url {url!r}: only s3://BUCKET/PREFIX and file:///PATH are supported")
