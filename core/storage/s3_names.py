"""Names in an S3 store without talking to S3: bucket rules, `s3://bucket/prefix` URIs and the keys
under the prefix. Pure functions, shared by the config validator and `core.storage.s3` (no boto3 here).
"""

from __future__ import annotations

import re

SCHEME = "s3://"
MAX_KEY_BYTES = 1024  # S3's limit on a whole object key
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]*[a-z0-9]")
_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def bucket_problem(name: str) -> str | None:
    """Why `name` is not a valid S3 general-purpose bucket name, or None."""
    if not 3 <= len(name) <= 63:
        return f"bucket name '{name}' must be 3 to 63 characters long"
    if not _BUCKET.fullmatch(name):
        return (
            f"bucket name '{name}' may hold only lowercase letters, digits, dots and hyphens, "
            "and must begin and end with a letter or digit"
        )
    if ".." in name:
        return f"bucket name '{name}' must not hold two dots in a row"
    if _IPV4.fullmatch(name):
        return f"bucket name '{name}' must not look like an IP address"
    if name.startswith(_RESERVED_PREFIXES) or name.endswith(_RESERVED_SUFFIXES):
        return f"bucket name '{name}' uses a prefix or suffix that AWS reserves"
    return None


def key_problem(key: str) -> str | None:
    """Why `key` cannot name an object under a store's prefix, or None.

    Keys are relative POSIX paths: no absolute path, backslash, empty, `.` or `..` segment, or control
    character, so no key can leave the prefix or name the same object two ways."""
    if not key:
        return "empty key"
    if key.startswith("/"):
        return "absolute keys are not allowed"
    if "\\" in key:
        return "backslashes are not allowed"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "control characters are not allowed"
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            return f"'{segment}' segments are not allowed" if segment else "empty segments ('//' or a trailing '/')"
    if len(key.encode()) > MAX_KEY_BYTES:
        return f"longer than S3's {MAX_KEY_BYTES} bytes"
    return None


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket[/prefix]` -> (bucket, prefix without its trailing slash; '' when none).

    Raises:
        ValueError: not an s3:// URI, a bad bucket name or a prefix that is no valid key.
    """
    if not uri.startswith(SCHEME):
        raise ValueError(f"'{uri}' is not an s3:// URI")
    bucket, _, prefix = uri[len(SCHEME) :].partition("/")
    prefix = prefix.rstrip("/")
    problem = bucket_problem(bucket) or (
        f"prefix '{prefix}': {key_problem(prefix)}" if prefix and key_problem(prefix) else None
    )
    if problem:
        raise ValueError(f"'{uri}': {problem}")
    return bucket, prefix
