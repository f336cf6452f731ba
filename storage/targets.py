"""What a target names: a SQLite path, a PostgreSQL URL or an in-memory store; and how messages show it.

Plain string tests: choosing a store never imports its driver (SQLite users never load psycopg).
"""

from __future__ import annotations

import re
import urllib.parse

#: URL schemes that select PostgreSQL.
SCHEMES = ("postgresql://", "postgres://")
#: The URL scheme that selects the in-memory store (``memory://NAME``).
MEMORY_SCHEME = "memory://"


def is_postgres_url(target: object) -> bool:
    """Whether ``target`` names a PostgreSQL database (``postgresql://...``) rather than a SQLite file."""
    return isinstance(target, str) and target.startswith(SCHEMES)


def is_memory_url(target: object) -> bool:
    """Whether ``target`` names an in-memory store (``memory://NAME``)."""
    return isinstance(target, str) and target.startswith(MEMORY_SCHEME)


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs.

    Handles ``postgresql://user:secret@host/db`` (also ``?password=...``) and key=value
    connection strings (``host=h password=secret``).
    """
    if "://" not in url:
        return re.sub(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", url)
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hosts}" if colon else f"{user}@{hosts}"
    query = urllib.parse.urlencode(
        [(k, "***" if k.lower() == "password" else v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)],
        safe="*",
    )
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))

