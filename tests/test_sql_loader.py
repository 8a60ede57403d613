"""The named-query loader."""

from __future__ import annotations

import pytest

from worker.sql import parse, queries


def test_parses_named_blocks_and_strips_comments() -> None:
    text = "-- header\n\n-- name: first\n-- what it does\nSELECT 1;\n\n-- name: second\nSELECT\n  2;\n"
    assert parse(text) == {"first": "SELECT 1;", "second": "SELECT\n  2;"}


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="defined twice"):
        parse("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")


def test_empty_block_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        parse("-- name: a\n-- only a comment\n")


def test_the_shipped_file_loads() -> None:
    loaded = queries()
    assert "migration_lock" in loaded
    assert all(statement.strip() for statement in loaded.values())
