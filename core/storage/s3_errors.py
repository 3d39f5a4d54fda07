"""What went wrong talking to S3, in one line a user can act on, and whether trying again can help.

Messages name the bucket, the endpoint and the cause (an error code, a timeout); never a credential,
a signature or a request's headers.
"""

from __future__ import annotations

from typing import Any

_NOT_RETRYABLE_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "NoSuchBucket",
    "NoSuchKey",
    "PermanentRedirect",
    "AuthorizationHeaderMalformed",
    "InvalidRequest",
    "InvalidArgument",
    "KMS.NotFoundException",
    "KMS.DisabledException",
}
_RETRYABLE_CODES = {  # 4xx answers that a fresh try can fix
    "RequestTimeout",
    "SlowDown",
    "Throttling",
    "BadDigest",
    "InvalidDigest",
    "XAmzContentSHA256Mismatch",
    "IncompleteBody",
    "RequestTimeTooSkewed",
}


def _client_error(exc: BaseException) -> Any:
    """The botocore ClientError behind `exc` (boto3 wraps an upload's in S3UploadFailedError), or None."""
    from botocore.exceptions import ClientError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ClientError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def is_unreachable(exc: BaseException) -> bool:
    """The endpoint could not be connected to or did not answer in time."""
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

    return isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError)


def is_retryable(exc: BaseException) -> bool:
    """Whether a whole transfer that failed with `exc` may succeed when tried again: connection faults,
    timeouts, 5xx, throttling and checksum mismatches may; credentials, permissions and a missing bucket not."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError,
        NoCredentialsError,
        NoRegionError,
        ParamValidationError,
        PartialCredentialsError,
    )

    error = _client_error(exc)
    if error is not None:
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _NOT_RETRYABLE_CODES:
            return False
        return not status or status >= 500 or status in (408, 429) or code in _RETRYABLE_CODES
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | NoRegionError | ParamValidationError):
        return False
    return isinstance(exc, BotoCoreError | RetriesExceededError | S3UploadFailedError | OSError)


def describe(exc: BaseException, bucket: str, endpoint: str) -> str:
    """One line: what failed, for a store in `bucket` at `endpoint` (no credentials, no request details)."""
    from botocore.exceptions import (
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return (
            f"no AWS credentials found ({type(exc).__name__}); boto3 looks in AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws, then an instance or container role"
        )
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        return f"cannot connect to {endpoint} ({type(exc).__name__})"
    if isinstance(exc, ReadTimeoutError):
        return f"{endpoint} did not answer in time ({type(exc).__name__})"
    error = _client_error(exc)
    if error is None:
        return f"{type(exc).__name__}: {_first_line(str(exc))}"
    code = str(error.response.get("Error", {}).get("Code", "")) or "?"
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    op = error.operation_name
    known = {
        "NoSuchBucket": f"bucket '{bucket}' does not exist at {endpoint}",
        "InvalidAccessKeyId": f"the access key id is not known to {endpoint}",
        "SignatureDoesNotMatch": "the secret access key does not match the access key id",
        "ExpiredToken": "the session token has expired",
        "AccessDenied": f"access denied ({op}): the credentials lack permission on bucket '{bucket}'",
        "PermanentRedirect": f"bucket '{bucket}' is in another region; set store.region",
    }
    if code == "404" and op == "HeadBucket":
        code = "NoSuchBucket"
    cause = known.get(code) or _first_line(str(error.response.get("Error", {}).get("Message", ""))) or f"HTTP {status}"
    return f"{cause} ({code})"


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]
