"""Credentials in a config: referenced, hidden, masked, and resolved only where a connection is made.

A config names a secret as `${ENV_VAR}` inside a value (`postgresql://tf:${PG_PASSWORD}@db/optuna`); that
reference is what is hashed, logged, stored and passed as a Prefect parameter. A password typed literally into
a URL (YAML, `--set`, MLFLOW_TRACKING_URI) still works: `hide_passwords` moves it into this process's
environment under a name made from the URL without it (`TRAINFLOW_SECRET_<hash>`) and leaves that reference in
its place, so every later copy (config hash, cache keys, run name, flow parameters) holds the reference and a
rotated password keeps the same hash. Child processes inherit the environment; a process on another machine
hides its own copy of the same URL under the same name. `resolve` puts values back, at the connection only.
`mask_secrets` is the last line for text that did not come through a config (a URL from a server's answer).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from typing import Any

from trainflow.core.errors import ConfigError

REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
HIDDEN_PREFIX = "TRAINFLOW_SECRET_"
# scheme://user:password@host: the password is what lies between the user's colon and the @
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@]*:)(?P<password>[^\s/@]+)@(?P<host>[^\s/?#]*)"
)
# The fields whose values are resolved where their connection is made; a reference elsewhere is a mistake. A data
# path is a local file or an s3:// object (boto3's chain holds the credentials), never a URL with a password: one
# typed there is hidden like any other, and the path is then not one a source can read.
RESOLVED_FIELDS = ("tracking.uri", "tracking.artifact_location", "tune.hpo.storage", "store.endpoint_url")


def mask_secrets(text: str) -> str:
    """Every password a URL in `text` carries, replaced by `***`: `postgresql://tf:pw@host/db` ->
    `postgresql://tf:***@host/db`, and so is the reference `hide_passwords` left for one. A user's own `${VAR}`
    reference is kept (it is no secret, and says where the password comes from). Other text is unchanged."""

    def masked(match: re.Match[str]) -> str:
        reference = REFERENCE.fullmatch(match["password"])
        password = match["password"] if reference and not reference[1].startswith(HIDDEN_PREFIX) else "***"
        return f"{match['head']}{password}@{match['host']}"

    return _URL_PASSWORD.sub(masked, text)


def carries_password(text: str) -> bool:
    """A URL in `text` has a password (literal or referenced)."""
    return _URL_PASSWORD.search(text) is not None


def hide_passwords(text: str) -> str:
    """`text` with every literal URL password moved into this process's environment and replaced by its
    reference: `postgresql://tf:pw@h/db` -> `postgresql://tf:${TRAINFLOW_SECRET_1A2B3C4D5E}@h/db`. The name
    hashes the URL's scheme, user and host, not the password: the same server gets the same name everywhere."""

    def hidden(match: re.Match[str]) -> str:
        password = match["password"]
        if REFERENCE.fullmatch(password):
            return match[0]
        digest = hashlib.sha256(f"{match['head']}@{match['host']}".encode()).hexdigest()[:10].upper()
        name = HIDDEN_PREFIX + digest
        os.environ[name] = password
        return f"{match['head']}${{{name}}}@{match['host']}"

    return _URL_PASSWORD.sub(hidden, text)


def hide_in(raw: Any) -> Any:
    """`hide_passwords` on every string of a parsed config mapping (nested dicts and lists), a copy."""
    if isinstance(raw, str):
        return hide_passwords(raw)
    if isinstance(raw, dict):
        return {key: hide_in(value) for key, value in raw.items()}
    if isinstance(raw, list):
        return [hide_in(value) for value in raw]
    return raw


def resolve(value: str, field: str) -> str:
    """`value` with every `${VAR}` replaced by the variable's value: call it where the connection is made, and
    never store, log or hash what it returns.

    Raises:
        ConfigError: a referenced variable is not set, naming `field` and the variable.
    """

    def value_of(match: re.Match[str]) -> str:
        found = os.environ.get(match[1])
        if found is None:
            raise ConfigError(f"{field}: ${{{match[1]}}} is not set in the environment{_hidden_hint(match[1])}")
        return found

    return REFERENCE.sub(value_of, value)


def resolve_optional(value: str | None, field: str) -> str | None:
    return None if value is None else resolve(value, field)


def reference_problems(dumped: dict[str, Any]) -> list[str]:
    """Preflight: every `${VAR}` in a config (its JSON dump) names a set variable, in a field that resolves it."""
    problems = []
    for field, value in _strings(dumped):
        for name in REFERENCE.findall(value):
            if field not in RESOLVED_FIELDS and name.startswith(HIDDEN_PREFIX):
                problems.append(f"{field}: carries a password, but no connection is made with this value; remove it")
            elif field not in RESOLVED_FIELDS:
                problems.append(f"{field}: ${{{name}}}: references are resolved only in {', '.join(RESOLVED_FIELDS)}")
            elif name not in os.environ:
                problems.append(f"{field}: ${{{name}}} is not set in the environment{_hidden_hint(name)}")
    return problems


def _hidden_hint(name: str) -> str:
    if not name.startswith(HIDDEN_PREFIX):
        return ""
    return " (a password given literally to another run was stored as this reference; give the URL with it again)"


def _strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value, path)
