"""Preflight for the databases a run uses (the study's `tune.hpo.storage`, MLflow's `tracking.uri`, the Prefect
server's): the driver is installed, the host answers, the password is right, the database exists. Each problem is
one line naming the field, found in seconds, before any stage writes anything.

SQLAlchemy 2.1 maps `postgresql://` to psycopg 3 (`postgresql+psycopg2://` to psycopg2), which Optuna and MLflow
both use; Prefect's server talks to PostgreSQL through asyncpg. `pip install 'trainflow[postgres]'` brings both.
"""

from __future__ import annotations

from typing import Any

from trainflow.core.config.secrets import mask_secrets, resolve
from trainflow.core.errors import ConfigError

CONNECT_TIMEOUT_S = 5
EXTRA = {"postgresql": "pip install 'trainflow[postgres]'", "mysql": "pip install pymysql"}


def is_database(url: str) -> bool:
    """A SQLAlchemy database URL other than SQLite (which the store and tracking checks cover as files)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    return scheme.split("+", 1)[0] in ("postgresql", "postgres", "mysql", "mariadb", "mssql", "oracle")


def prefect_database_url(url: str) -> str:
    """Prefect's server speaks to PostgreSQL through asyncpg: `postgresql://` (or another driver) becomes
    `postgresql+asyncpg://`; SQLite URLs stay as they are."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.split("+", 1)[0] in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    return url


def check_database(url: str, field: str) -> None:
    """Connect once to the database at `url` (its `${VAR}` references resolved here) and disconnect.

    Raises:
        ConfigError: one line naming `field`: a missing driver (and the extra that brings it), an unreachable
            host, a refused login, a missing database; the URL in it has its password masked.
    """
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    shown = mask_secrets(url)
    try:
        parsed = make_url(resolve(url, field))
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise ConfigError(f"{field}: {shown} is not a database URL SQLAlchemy knows ({exc})") from None
    if parsed.drivername.endswith("+asyncpg"):  # Prefect's driver: check it is there, connect through psycopg
        _import_driver(dialect, field, shown)
        parsed = parsed.set(drivername="postgresql+psycopg")
        dialect = parsed.get_dialect()
    _import_driver(dialect, field, shown)
    engine = create_engine(parsed, connect_args=_timeout_args(parsed.get_backend_name()), poolclass=_null_pool())
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        raise ConfigError(f"{field}: cannot connect to {shown}: {_reason(exc)}") from None
    finally:
        engine.dispose()


def _import_driver(dialect: Any, field: str, shown: str) -> None:
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        hint = EXTRA.get(dialect.name, f"install the {dialect.driver} driver")
        if dialect.driver == "psycopg2":
            hint = "pip install psycopg2-binary, or write postgresql:// (psycopg 3: pip install 'trainflow[postgres]')"
        raise ConfigError(
            f"{field}: {shown} needs the {dialect.driver} driver, which is not installed ({exc.name or exc}); {hint}"
        ) from None


def _timeout_args(backend: str) -> dict[str, Any]:
    return {"connect_timeout": CONNECT_TIMEOUT_S} if backend in ("postgresql", "mysql", "mariadb") else {}


def _null_pool() -> Any:
    from sqlalchemy.pool import NullPool

    return NullPool


def _reason(exc: Exception) -> str:
    """The driver's own first line (`password authentication failed for user "tf"`, `database "x" does not
    exist`, `Connection refused`), without SQLAlchemy's background link."""
    original = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    text = next((line for line in lines if "FATAL" in line or "failed" in line or "refused" in line), None)
    text = text or (lines[0] if lines else type(original).__name__)
    text = text.rsplit("FATAL:", 1)[-1] if "FATAL:" in text else text.rsplit("failed: ", 1)[-1]
    return mask_secrets(text.strip())
