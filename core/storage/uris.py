"""URIs fit to print: records, reports and logs never show a password a database URL carries."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def without_password(uri: str) -> str:
    """`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`; other URIs unchanged."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
