"""Text fit to print: records, reports, logs and MLflow never show a password that a URL carries."""

from __future__ import annotations

import re

# scheme://user:password@host...: the password is what lies between the user's colon and the @
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@]*:)[^\s/@]+@")


def mask_secrets(text: str) -> str:
    """Every password a URL in `text` carries, replaced by `***`: `postgresql://tf:pw@host/db` ->
    `postgresql://tf:***@host/db`. Text without one is returned unchanged."""
    return _URL_PASSWORD.sub(lambda match: f"{match['head']}***@", text)
