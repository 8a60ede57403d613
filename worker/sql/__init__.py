"""The worker's SQL, loaded from named blocks in ``queries.sql`` (and ``collect.sql``, the collector's;
``retention.sql``, partitions and retention).

A block starts with ``-- name: <query_name>``; the comment lines after it document the query, and the
rest up to the next block is the statement. ``worker.store`` executes them (``worker.collect.store`` and
``worker.retention`` their own files' blocks), its ``errors`` module translating every driver error.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

_BLOCK = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """Split a queries file into ``{name: statement}``; names must be unique."""
    parts = _BLOCK.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        statement = "\n".join(line for line in body.strip().splitlines() if not line.startswith("--")).strip()
        if not statement:
            raise ValueError(f"query {name!r} is empty")
        queries[name] = statement
    return queries


QUERY_FILES = ("queries.sql", "collect.sql", "retention.sql")


@cache
def queries() -> dict[str, str]:
    merged: dict[str, str] = {}
    for name in QUERY_FILES:
        found = parse(files(__package__).joinpath(name).read_text(encoding="utf-8"))
        if merged.keys() & found.keys():
            raise ValueError(f"{name} redefines {sorted(merged.keys() & found.keys())}")
        merged.update(found)
    return merged


def query(name: str) -> str:
    return queries()[name]
