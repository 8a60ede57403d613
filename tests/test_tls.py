"""The documented production URL (`?sslmode=verify-full`) against a PostgreSQL with TLS on: a throwaway server
(initdb, ssl=on) with a CA and a server certificate made here. Migrate and a batch through the worker work with
the CA named by PGSSLROOTCERT (as deploy/ mounts it) or sslrootcert=; without the CA the worker stops at once
with one clear line instead of retrying forever."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from tests.factories import api_event, dumps, make_org
from tests.kafka_helpers import create_topics, produce, run_worker_until, worker_env
from worker import devstack
from worker.config import Settings, load_settings
from worker.errors import ConfigError, FatalError
from worker.migrate import migrate
from worker.store import APPLICATION_NAME, connect

SERVER_USER = "postgres"  # initdb and postgres refuse to run as root: the Debian package's account


def server_binaries() -> Path | None:
    """A PostgreSQL built with SSL: the machine's own (PostgreSQL 15 on the CI machines; the embedded
    wheel's build has no SSL support)."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        candidates.insert(0, Path(bindir) / "initdb")
    return next((c.parent for c in candidates if c.is_file()), None)


DOCUMENTED = "?sslmode=verify-full"  # deploy/README.md "Secrets"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_certificates(directory: Path) -> None:
    """ca.crt, and server.crt/server.key for localhost and 127.0.0.1, signed by it."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("cost-worker test CA"))
        .issuer_name(_name("cost-worker test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / "server.key").chmod(0o600)


@dataclass(frozen=True)
class TlsServer:
    ca: Path
    port: int

    def url(self, database: str = "postgres", *, query: str = DOCUMENTED) -> str:
        return f"postgresql://postgres@localhost:{self.port}/{database}{query}"


@pytest.fixture(scope="module")
def tls_server() -> Iterator[TlsServer]:
    bin_dir = server_binaries()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries with SSL support (apt-get install postgresql)")
    # Not under pytest's tmp_path: that is private to root, and the server runs as another user.
    root = Path(tempfile.mkdtemp(prefix="cw-tls-"))
    root.chmod(0o755)
    data, certs = root / "data", root / "certs"
    certs.mkdir()
    make_certificates(certs)
    user: str | None = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        user = SERVER_USER
        entry = pwd.getpwnam(user)
        for path in (root, certs, *certs.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=utf8"],
        check=True,
        capture_output=True,
        user=user,
        timeout=120,
    )
    port = devstack.free_port()
    options = (
        f"-c ssl=on -c ssl_cert_file={certs / 'server.crt'} -c ssl_key_file={certs / 'server.key'} "
        f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    )
    log = root / "server.log"
    started = subprocess.run(
        [str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(log), "-o", options, "start"],
        capture_output=True,
        user=user,
        timeout=60,
        check=False,
    )
    assert started.returncode == 0, started.stderr + (log.read_bytes() if log.exists() else b"")
    try:
        yield TlsServer(ca=certs / "ca.crt", port=port)
    finally:
        subprocess.run(
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            user=user,
            timeout=60,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ca_from_environment(tls_server: TlsServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """What the Deployment does: the CA bundle mounted as a file, PGSSLROOTCERT naming it."""
    monkeypatch.setenv("PGSSLROOTCERT", str(tls_server.ca))
    return tls_server.ca


async def test_the_documented_url_migrates_and_the_worker_writes_a_batch_over_verified_tls(
    tls_server: TlsServer, ca_from_environment: Path, settings: Settings
) -> None:
    admin = tls_server.url()
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute("CREATE DATABASE cw_tls")
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
    finally:
        await conn.close()
    url = tls_server.url("cw_tls")
    assert url.endswith(DOCUMENTED)
    assert (await migrate(url)).applied

    tls = settings.model_copy(update={"database_url": SecretStr(url)})
    load_settings(database_url=url)  # the configuration check accepts it: the CA exists
    await create_topics(tls)
    conn = await connect(url)
    try:
        org = await make_org(conn)
        await produce(tls, tls.topic_api_usage, [dumps(api_event(org)) for _ in range(5)])

        worker_connections: list[tuple[bool, int]] = []

        async def landed() -> bool:
            # While the worker runs: its connections (pool and outbox) are encrypted and verified.
            row = await conn.fetchrow(
                "SELECT coalesce(bool_and(s.ssl), false) AS ssl, count(*) AS n FROM pg_stat_ssl s "
                "JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1 AND a.pid <> pg_backend_pid()",
                APPLICATION_NAME,
            )
            assert row is not None
            worker_connections.append((row["ssl"], row["n"]))
            return bool(await conn.fetchval("SELECT count(*) FROM api_usage") == 5)

        assert await run_worker_until(tls, landed) == 0
        ssl, connections = worker_connections[-1]
        assert connections >= 1
        assert ssl, "a worker connection without TLS"
    finally:
        await conn.close()


async def test_sslrootcert_in_the_url_works_too(tls_server: TlsServer) -> None:
    url = tls_server.url(query=f"{DOCUMENTED}&sslrootcert={quote(str(tls_server.ca))}")
    conn = await connect(url)
    try:
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
    finally:
        await conn.close()


async def test_a_certificate_from_another_ca_is_refused(tls_server: TlsServer, tmp_path: Path) -> None:
    make_certificates(tmp_path)  # a different CA
    url = tls_server.url(query=f"{DOCUMENTED}&sslrootcert={quote(str(tmp_path / 'ca.crt'))}")
    with pytest.raises(Exception, match="certificate verify failed"):
        await connect(url)


def test_a_missing_ca_is_one_clear_line_from_the_configuration_check(
    tls_server: TlsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGSSLROOTCERT", "/etc/cost-worker/ca/postgresql-ca.crt")
    with pytest.raises(ConfigError) as raised:
        load_settings(database_url=tls_server.url())
    (line,) = raised.value.problems
    assert line == (
        "COST_WORKER_DATABASE_URL: sslmode=verify-full needs the CA certificate of the PostgreSQL server, but "
        "/etc/cost-worker/ca/postgresql-ca.crt does not exist: mount the CA bundle and name it with sslrootcert= "
        'in the URL or PGSSLROOTCERT (deploy/README.md "TLS")'
    )


def test_cost_worker_run_without_the_ca_exits_with_that_line(tls_server: TlsServer, settings: Settings) -> None:
    env = worker_env(settings, COST_WORKER_DATABASE_URL=tls_server.url(), HOME="/nonexistent")
    env.pop("PGSSLROOTCERT", None)
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert "sslmode=verify-full needs the CA certificate" in errors[0]
    assert "/nonexistent/.postgresql/root.crt does not exist" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr


async def test_the_driver_boundary_also_stops_instead_of_retrying(tls_server: TlsServer) -> None:
    """Past the configuration check (a file deleted later): fatal with the driver's words, never a retry loop."""
    url = tls_server.url(query=f"{DOCUMENTED}&sslrootcert=/nonexistent/ca.crt")
    with pytest.raises(FatalError, match=r"database connection settings: .*No such file"):
        await connect(url)
