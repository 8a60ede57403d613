"""The PostgreSQL driver boundary: which connection failures stop the worker and which are retried."""

from __future__ import annotations

import asyncpg
import pytest

from worker.errors import DatabaseUnavailable, FatalError
from worker.store import translate


async def _connect_error(dsn: str) -> BaseException:
    with pytest.raises(Exception) as caught:
        await asyncpg.connect(dsn, timeout=3)
    return caught.value


async def test_a_missing_ca_file_is_a_configuration_error() -> None:
    exc = await _connect_error("postgresql://u@127.0.0.1:1/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.crt")
    assert isinstance(exc, FileNotFoundError)
    assert isinstance(translate(exc), FatalError)


async def test_a_missing_unix_socket_is_an_outage(tmp_path: object) -> None:
    """PostgreSQL stopped: its socket file is gone, and connecting raises FileNotFoundError too."""
    exc = await _connect_error(f"postgresql://u@/db?host={tmp_path}/no-server-here")
    assert isinstance(exc, FileNotFoundError)
    assert isinstance(translate(exc), DatabaseUnavailable)
