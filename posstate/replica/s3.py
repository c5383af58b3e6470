"""The S3 client (AWS S3, Cloudflare R2, Backblaze B2, MinIO, ...) over boto3, imported when first used.

Credentials and region come from boto3's usual chain (environment, profile, instance role), never from
posstate's files. A PUT is atomic in S3 (an object is listed only once complete); each one is checked after
upload against the MD5 of what was sent (the ETag of a single-part upload), or, when the service's ETag is
not an MD5 (SSE-KMS), by a HEAD of its size and the SHA-256 kept in its metadata.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from typing import Any

from posstate.core.errors import ConfigError, ReplicaError
from posstate.replica import client as _client
from posstate.replica.client import ObjectInfo, ObjectMissing, PreconditionFailed, md5_hex, scrub

_LEASE_MAX = 64 * 1024  # a lease record is a few hundred bytes; more is a damaged (or hostile) one


def _boto3() -> Any:
    try:
        import boto3  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(
            "an s3:// replica needs boto3, which is not installed; install it with `pip install posstate[s3]`"
        ) from None
    return boto3


_Objects = list[ObjectInfo]


class S3Client:
    """A :class:`~posstate.replica.client.ReplicaClient` for ``s3://bucket/prefix``."""

    def __init__(
        self, url: str, *, endpoint_url: str | None = None, connect_timeout: float = 5.0, read_timeout: float = 20.0
    ) -> None:
        rest = url[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        self._url = url
        self._bucket = bucket
        self._prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        boto3 = _boto3()
        from botocore.config import Config  # type: ignore[import-untyped]

        cfg = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": 2, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._s3 = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=cfg)
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        self._errors: tuple[type[BaseException], ...] = (BotoCoreError, ClientError)
        self._client_error = ClientError

    @property
    def url(self) -> str:
        return self._url

    def _fail(self, exc: BaseException, key: str | None, what: str) -> ReplicaError:
        code = ""
        if isinstance(exc, self._client_error):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return ObjectMissing(self._url, f"{what}: no such object", key=key)
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return PreconditionFailed(self._url, f"{what}: the object changed (conditional write refused)", key=key)
        # The message names the operation and the service's code; boto's own text can hold the endpoint URL,
        # whose user:password (if any: AWS_ENDPOINT_URL is not checked by posstate) is masked.
        return ReplicaError(self._url, f"{what} failed ({code or type(exc).__name__}: {scrub(str(exc))})", key=key)

    def put(self, key: str, data: bytes) -> None:
        sha = hashlib.sha256(data).hexdigest()
        md5 = md5_hex(data)
        try:
            resp = self._s3.put_object(
                Bucket=self._bucket,
                Key=self._prefix + key,
                Body=data,
                Metadata={"sha256": sha},
                ContentMD5=base64.b64encode(bytes.fromhex(md5)).decode(),  # the service refuses a damaged body
            )
        except self._errors as exc:
            raise self._fail(exc, key, "upload") from exc
        if str(resp.get("ETag", "")).strip('"') == md5:
            return
        # Not the MD5 sent: SSE-KMS and SSE-C ETags are 32 hex digits that are not an MD5, multipart-style ones
        # end in -N. The service checked Content-MD5; check that the object it lists is the one sent.
        try:
            head = self._s3.head_object(Bucket=self._bucket, Key=self._prefix + key)
        except self._errors as exc:
            raise self._fail(exc, key, "check after upload") from exc
        if head.get("ContentLength") != len(data) or head.get("Metadata", {}).get("sha256") != sha:
            raise ReplicaError(self._url, "upload arrived damaged (size or SHA-256 differs)", key=key)

    def get(self, key: str) -> bytes:
        try:
            resp = self._s3.get_object(Bucket=self._bucket, Key=self._prefix + key)
            size = int(resp.get("ContentLength") or 0)
            if size > _client.MAX_OBJECT_BYTES:
                resp["Body"].close()
                raise ReplicaError(self._url, f"download: {size} bytes, more than posstate ever writes", key=key)
            data = bytes(resp["Body"].read(_client.MAX_OBJECT_BYTES + 1))
            resp["Body"].close()
        except self._errors as exc:
            raise self._fail(exc, key, "download") from exc
        if len(data) > _client.MAX_OBJECT_BYTES:
            raise ReplicaError(self._url, "download: more bytes than posstate ever writes", key=key)
        return data

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        out: _Objects = []
        try:
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=self._prefix + prefix)
            for page in pages:
                for obj in page.get("Contents", ()):
                    out.append(ObjectInfo(str(obj["Key"])[len(self._prefix) :], int(obj["Size"]), obj.get("LastModified")))
                if len(out) > _client.MAX_LISTED:
                    raise ReplicaError(
                        self._url,
                        f"list: more than {_client.MAX_LISTED} objects (not all posstate's)",
                        next_step="remove the objects posstate did not write (`posstate replica verify` names them)",
                    )
        except self._errors as exc:
            raise self._fail(exc, None, "list") from exc
        return sorted(out, key=lambda o: o.key)

    def delete(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._prefix + k} for k in keys[i : i + 1000]]
            try:
                self._s3.delete_objects(Bucket=self._bucket, Delete={"Objects": batch, "Quiet": True})
            except self._errors as exc:
                raise self._fail(exc, None, "delete") from exc

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            resp = self._s3.get_object(Bucket=self._bucket, Key=self._prefix + key)
            data = bytes(resp["Body"].read(_LEASE_MAX))  # more is cut, so it parses as damaged
            resp["Body"].close()
            return data, str(resp["ETag"])
        except self._errors as exc:
            err = self._fail(exc, key, "read")
            if isinstance(err, ObjectMissing):
                return None
            raise err from exc

    def put_if(self, key: str, data: bytes, *, etag: str | None) -> str:
        cond: dict[str, str] = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            resp = self._s3.put_object(Bucket=self._bucket, Key=self._prefix + key, Body=data, **cond)
        except self._errors as exc:
            raise self._fail(exc, key, "conditional write") from exc
        return str(resp["ETag"])
