"""Servers a scenario owns, so that stopping, freezing or proxying them disturbs no other test: an embedded
PostgreSQL in a temp dir, a Tansu broker advertising a proxy's address, and proxies in front of them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests.conftest import create_database
from tests.faults.proxy import PgWire, Proxy
from worker import devstack
from worker.migrate import migrate

PG_CTL_TIMEOUT = 120  # seconds


@dataclass
class OwnPostgres:
    """An embedded PostgreSQL server of one scenario, with the controls the faults need."""

    server: devstack.EmbeddedPostgres
    root: Path

    @property
    def socket_dir(self) -> str:
        return parse_qs(urlsplit(self.server.url()).query)["host"][0]

    @property
    def socket_path(self) -> str:
        return f"{self.socket_dir}/.s.PGSQL.5432"

    @property
    def system_user(self) -> str | None:
        user = getattr(self.server.server, "system_user", None)
        return str(user) if user else None

    def url(self, database: str = "postgres") -> str:
        return self.server.url(database)

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [str(self.server.bin_dir / "pg_ctl"), "-D", str(self.server.data_dir), *args],
            check=True,
            capture_output=True,
            timeout=PG_CTL_TIMEOUT,
            user=self.system_user,
        )

    def stop_immediate(self) -> None:
        """``pg_ctl stop -m immediate``: every backend dies at once, no checkpoint (crash recovery on start)."""
        self._pg_ctl("stop", "-m", "immediate", "-w")

    def start(self) -> None:
        self._pg_ctl(
            "start", "-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.server.data_dir / "log")
        )

    def pids(self) -> list[int]:
        """The postmaster and every process it forked (backends, checkpointer, walwriter, ...)."""
        # postmaster.pid, not the pid cached at first start: the server may have been restarted since.
        postmaster = int((self.server.data_dir / "postmaster.pid").read_text().split()[0])
        found = [postmaster]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == postmaster:
                    found.append(int(entry.name))
        return found

    def freeze(self) -> list[int]:
        frozen = self.pids()
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        return frozen

    @staticmethod
    def thaw(pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    async def database(self) -> str:
        """A fresh, migrated database on this server (superuser URL)."""
        name = f"cw_fault_{uuid.uuid4().hex[:10]}"
        url = await create_database(self.url(), name)
        await migrate(url)
        return url

    async def unix_connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(self.socket_path)


@contextlib.asynccontextmanager
async def own_postgres() -> AsyncIterator[OwnPostgres]:
    root = Path(tempfile.mkdtemp(prefix="cw-fpg-"))
    server = await asyncio.to_thread(devstack.start_postgres, root / "pg", stop_at_exit=True)
    own = OwnPostgres(server, root)
    try:
        yield own
    finally:
        with contextlib.suppress(Exception):
            own.thaw(own.pids())
        with contextlib.suppress(Exception):
            await asyncio.to_thread(own._pg_ctl, "stop", "-m", "immediate", "-w")
        devstack.remove_tree(root)


@contextlib.asynccontextmanager
async def pg_proxy(pg: OwnPostgres) -> AsyncIterator[PgWire]:
    """A TCP listener in front of the server's unix socket (the worker's DSN points at it)."""
    proxy = PgWire(pg.unix_connection)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


def via(proxy: Proxy, database_url: str) -> str:
    """The same database, reached over TCP through the proxy."""
    database = urlsplit(database_url).path
    return f"postgresql://postgres@127.0.0.1:{proxy.port}{database}"


@dataclass
class ProxiedBroker:
    process: subprocess.Popen[bytes]
    proxy: Proxy
    port: int  # where the broker itself listens

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"


def _start_tansu(port: int, advertised: str, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [
                devstack.broker_binary(),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{port}",
                "--advertised-listener-url",
                advertised,
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


@contextlib.asynccontextmanager
async def proxied_broker(log_path: Path) -> AsyncIterator[ProxiedBroker]:
    """A Tansu broker whose advertised listener is the proxy: every client, after bootstrap too, goes
    through the proxy (Tansu hands out its advertised address in metadata)."""
    port = devstack.free_port()

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", port)

    proxy = Proxy(connect)
    await proxy.start()
    advertised = f"tcp://127.0.0.1:{proxy.port}"
    process = _start_tansu(port, advertised, log_path)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                assert process.poll() is None, "the broker exited at start"
                assert time.monotonic() < deadline, "the broker did not listen in time"
                await asyncio.sleep(0.05)
        yield ProxiedBroker(process, proxy, port)
    finally:
        await proxy.stop()
        if process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(process.wait, 10)
        if process.poll() is None:
            process.kill()
            await asyncio.to_thread(process.wait, 10)
