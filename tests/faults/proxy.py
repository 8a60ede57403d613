"""A small asyncio TCP proxy for fault injection: pause, black-hole and reset connections, and (for the
PostgreSQL wire protocol) hold a chosen statement or cut the connection right around COMMIT.

The worker connects through it; the test flips its state:
- ``blackhole()``: nothing moves any more in either direction and new connections hang (a network
  partition: bytes are held, like packets a peer keeps retransmitting); ``restore(reset=True)`` drops every
  connection (as a partition that lasted past the TCP timeouts would) and forwards again.
- ``reset()``: abort every open connection now.
- ``PgWire`` inspects client -> server PostgreSQL messages: ``hold(marker)`` stops a connection just before a
  statement whose text contains ``marker`` reaches the server; ``cut_commit(when, marker)`` drops the
  connection right before or right after forwarding a COMMIT of a transaction that ran such a statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

SSL_REQUEST = 80877103
GSS_REQUEST = 80877104
CHUNK = 65_536


@dataclass(eq=False)
class Link:
    """One proxied connection."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    mute_server: bool = False  # drop server -> client bytes (the client never hears the answer)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # PostgreSQL protocol state (client -> server)
    started: bool = False
    buffer: bytes = b""
    statements: dict[str, str] = field(default_factory=dict)  # prepared statement name -> text
    in_marked_tx: bool = False

    def abort(self) -> None:
        for writer in (self.client, self.server):
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()


class Proxy:
    def __init__(self, connect: Connect, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.connect = connect
        self.host = host
        self.port = port
        self.links: set[Link] = set()
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        self.flowing.set()
        self.reset()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    # -- the faults -------------------------------------------------------------------------------------

    def blackhole(self) -> None:
        self.flowing.clear()

    def restore(self, *, reset: bool = True) -> None:
        if reset:
            self.reset()
        self.flowing.set()

    def reset(self) -> None:
        for link in list(self.links):
            link.abort()

    # -- plumbing ---------------------------------------------------------------------------------------

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await self.flowing.wait()  # a black hole: the connection is accepted, then nothing happens
        try:
            server_reader, server_writer = await self.connect()
        except OSError:
            client_writer.transport.abort()
            return
        link = Link(client_writer, server_writer)
        self.links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, client_reader, server_writer, upstream=True)),
            asyncio.create_task(self._pump(link, server_reader, client_writer, upstream=False)),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            link.abort()
            self.links.discard(link)

    async def _pump(
        self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        try:
            while True:
                await self.flowing.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                await self.flowing.wait()
                if upstream:
                    await self.forward_upstream(link, data)
                elif not link.mute_server:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            link.abort()

    async def forward_upstream(self, link: Link, data: bytes) -> None:
        link.server.write(data)
        await link.server.drain()


Moment = Literal["before", "after"]


class PgWire(Proxy):
    """A proxy that understands enough of the PostgreSQL frontend protocol to act around statements."""

    def __init__(self, connect: Connect, **kwargs: object) -> None:
        super().__init__(connect, **kwargs)  # type: ignore[arg-type]
        self.hold_marker: str | None = None
        self.held = asyncio.Event()  # set when a connection is being held
        self.released = asyncio.Event()
        self.released.set()
        self.cut_marker: str | None = None
        self.cut_when: Moment = "after"
        self.cuts_armed = 0
        self.cuts_done: list[Moment] = []
        self.commits_seen = 0

    def hold(self, marker: str) -> None:
        """Stop the next connection that sends a statement containing ``marker``, before the server sees it."""
        self.hold_marker = marker
        self.held.clear()
        self.released.clear()

    def release(self) -> None:
        self.hold_marker = None
        self.released.set()

    def cut_commit(self, when: Moment, marker: str, *, times: int = 1) -> None:
        """Drop the connection right ``before`` or ``after`` forwarding the COMMIT of the next transaction
        that ran a statement containing ``marker``."""
        self.cut_when = when
        self.cut_marker = marker
        self.cuts_armed = times

    async def forward_upstream(self, link: Link, data: bytes) -> None:
        link.buffer += data
        while True:
            message, link.buffer = _split(link, link.buffer)
            if message is None:
                return
            await self._message(link, message)

    async def _message(self, link: Link, message: bytes) -> None:
        kind = message[:1]
        if kind == b"\0":  # SSLRequest / StartupMessage: no type byte on the wire
            link.server.write(message[1:])
            await link.server.drain()
            return
        if kind == b"P":  # Parse: statement name, query text
            name, rest = _cstring(message, 5)
            query, _ = _cstring(message, rest)
            link.statements[name] = query
            if self._marked(query):
                await self._maybe_hold(link)
                link.in_marked_tx = True
        elif kind == b"B":  # Bind: portal name, statement name
            _, rest = _cstring(message, 5)
            statement, _ = _cstring(message, rest)
            if self._marked(link.statements.get(statement, "")):
                await self._maybe_hold(link)
                link.in_marked_tx = True
        elif kind == b"Q":  # a simple query: BEGIN; / COMMIT; / anything else
            query, _ = _cstring(message, 5)
            verb = query.strip().upper()
            if self._marked(query):
                await self._maybe_hold(link)
                link.in_marked_tx = True
            if verb.startswith(("COMMIT", "ROLLBACK", "BEGIN")):
                was_marked = link.in_marked_tx
                link.in_marked_tx = False
                if verb.startswith("COMMIT"):
                    self.commits_seen += 1
                    if was_marked and self.cuts_armed > 0:
                        self.cuts_armed -= 1
                        await self._cut(link, message)
                        return
        link.server.write(message)
        await link.server.drain()

    def _marked(self, query: str) -> bool:
        markers = [m for m in (self.hold_marker, self.cut_marker) if m]
        return any(m in query for m in markers)

    async def _maybe_hold(self, link: Link) -> None:
        if self.hold_marker is None or self.released.is_set():
            return
        self.held.set()
        await self.released.wait()

    async def _cut(self, link: Link, commit: bytes) -> None:
        self.cuts_done.append(self.cut_when)
        if self.cut_when == "after":
            link.mute_server = True  # the server commits; the client never hears that it did
            link.server.write(commit)
            await link.server.drain()
            await asyncio.sleep(0.5)
        link.abort()
        raise ConnectionResetError("cut around COMMIT")


def _split(link: Link, buffer: bytes) -> tuple[bytes | None, bytes]:
    """One complete frontend message off the front of ``buffer`` (startup messages have no type byte)."""
    if not link.started:
        if len(buffer) < 8:
            return None, buffer
        (length,) = struct.unpack("!I", buffer[:4])
        if len(buffer) < length:
            return None, buffer
        (code,) = struct.unpack("!I", buffer[4:8])
        if code not in (SSL_REQUEST, GSS_REQUEST):
            link.started = True
        return b"\0" + buffer[:length], buffer[length:]  # a NUL type byte marks "untyped" for _message
    if len(buffer) < 5:
        return None, buffer
    (length,) = struct.unpack("!I", buffer[1:5])
    if len(buffer) < 1 + length:
        return None, buffer
    return buffer[: 1 + length], buffer[1 + length :]


def _cstring(message: bytes, start: int) -> tuple[str, int]:
    end = message.index(b"\0", start)
    return message[start:end].decode("utf-8", "replace"), end + 1
