"""The PostgreSQL driver boundary: which connection failures stop the worker and which are retried."""

from __future__ import annotations

import asyncpg
import pytest

from worker.errors import DatabaseUnavailable, FatalError
from worker.store import translate
from worker.store.errors import translated


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


async def test_a_broken_connection_state_is_an_outage_at_the_boundary() -> None:
    """asyncpg raises InternalClientError ("cannot switch to state ...") on a connection the server terminated in
    the middle of an operation; it is not an InterfaceError, and the boundary must still let it out translated."""

    @translated
    async def statement() -> None:
        raise asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress")

    with pytest.raises(DatabaseUnavailable) as caught:
        await statement()
    assert isinstance(caught.value.__cause__, asyncpg.InternalClientError)
