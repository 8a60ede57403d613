"""Configuration: environment variables, every problem at once, secrets redacted."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from worker.config import Settings, load_settings, redact_url
from worker.errors import ConfigError
from worker.faults import Faults
from worker.kafka import consumer


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=60,
        check=False,
    )


def test_defaults_match_the_documented_names(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("COST_WORKER_"):
            monkeypatch.delenv(key)
    settings = load_settings()
    assert settings.kafka_group_id == "cost-ingestion-worker"
    assert settings.topic_provider_buckets == "cost.provider-buckets"
    assert settings.topic_api_usage == "usage.api-events"
    assert settings.topic_budget_alerts == "cost.budget-alerts"
    assert settings.topic_dead_letter == "cost.dead-letter"
    assert settings.kafka_producer_idempotence is True


def test_reads_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COST_WORKER_DATABASE_URL", "postgresql://u:pw@db:5432/x")
    monkeypatch.setenv("COST_WORKER_KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("COST_WORKER_BATCH_MAX_RECORDS", "1234")
    monkeypatch.setenv("COST_WORKER_LOG_LEVEL", "debug")
    settings = load_settings(require=("database_url", "kafka_bootstrap_servers"))
    assert settings.batch_max_records == 1234
    assert settings.log_level == "DEBUG"
    assert settings.dsn() == "postgresql://u:pw@db:5432/x"


def test_every_problem_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COST_WORKER_BATCH_MAX_RECORDS", "zero")
    monkeypatch.setenv("COST_WORKER_METRICS_PORT", "99999")
    monkeypatch.setenv("COST_WORKER_LOG_FORMAT", "xml")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    text = "\n".join(caught.value.problems)
    assert "COST_WORKER_BATCH_MAX_RECORDS" in text
    assert "COST_WORKER_METRICS_PORT" in text
    assert "COST_WORKER_LOG_FORMAT" in text
    assert len(caught.value.problems) == 3


def test_the_previous_keys_of_a_rotation_are_checked_like_the_current_ones(tmp_path: Path) -> None:
    settings = Settings(
        notify_secrets_key=base64.b64encode(bytes(32)).decode(),
        notify_previous_secrets_key="not-32-bytes",
        collect_key_encryption_key_file=tmp_path / "kek",
        collect_previous_key_encryption_key_file=tmp_path / "old-kek",
    )
    (tmp_path / "kek").write_bytes(bytes(32))
    assert settings.problems() == [
        "COST_WORKER_COLLECT_PREVIOUS_KEY_ENCRYPTION_KEY_FILE: no such file",
        "COST_WORKER_NOTIFY_PREVIOUS_SECRETS_KEY: must be base64 of 32 bytes",
    ]
    assert "not-32-bytes" in settings.secrets()  # redacted from every log line, as the current key is


def test_cross_field_problems_are_all_listed() -> None:
    settings = Settings(
        database_url="mysql://x@y/z",
        kafka_bootstrap_servers="nohostport",
        kafka_security_protocol="SASL_SSL",
        database_pool_min=5,
        database_pool_max=2,
        topic_api_usage="same",
        topic_provider_buckets="same",
    )
    problems = settings.problems(require=("database_url",))
    joined = "\n".join(problems)
    for expected in (
        "postgresql:// URL",
        "not host:port",
        "COST_WORKER_KAFKA_SASL_MECHANISM: required",
        "COST_WORKER_KAFKA_SASL_USERNAME: required",
        "COST_WORKER_KAFKA_SASL_PASSWORD: required",
        "COST_WORKER_DATABASE_POOL_MIN",
        "distinct",
    ):
        assert expected in joined, expected


def test_redaction_hides_passwords() -> None:
    assert redact_url("postgresql://app:s3cret@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert redact_url("postgresql://db/x") == "postgresql://db/x"
    settings = Settings(
        database_url="postgresql://app:s3cret@db/x",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="svc",
        kafka_sasl_password="hunter2",
    )
    shown = "\n".join(f"{k}={v}" for k, v in settings.redacted().items())
    assert "s3cret" not in shown
    assert "hunter2" not in shown
    assert "COST_WORKER_KAFKA_SASL_USERNAME=svc" in shown
    assert sorted(settings.secrets()) == ["hunter2", "s3cret"]


def test_check_config_prints_redacted_configuration() -> None:
    result = run_cli(
        "check-config",
        env={
            "COST_WORKER_DATABASE_URL": "postgresql://app:topsecretpw@db/x",
            "COST_WORKER_KAFKA_BOOTSTRAP_SERVERS": "k:9092",
            "COST_WORKER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "COST_WORKER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "COST_WORKER_KAFKA_SASL_USERNAME": "svc",
            "COST_WORKER_KAFKA_SASL_PASSWORD": "saslsecretpw",
        },
    )
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
    assert "postgresql://app:***@db/x" in result.stdout
    assert "topsecretpw" not in result.stdout + result.stderr
    assert "saslsecretpw" not in result.stdout + result.stderr


def test_check_config_reports_all_problems_without_traceback() -> None:
    result = run_cli(
        "check-config",
        env={
            "COST_WORKER_DATABASE_URL": "postgresql://app:leakme@db/x",
            "COST_WORKER_BATCH_MAX_WAIT": "-1",
            "COST_WORKER_KAFKA_SECURITY_PROTOCOL": "CARRIER_PIGEON",
        },
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert all(line.startswith("cost-worker: config error: ") for line in lines)
    assert "Traceback" not in result.stderr
    assert "leakme" not in result.stderr + result.stdout


def test_wrong_flag_is_one_line_and_nonzero() -> None:
    result = run_cli("run", "--no-such-flag")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "unrecognized arguments: --no-such-flag" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_required_setting_is_named() -> None:
    result = run_cli("migrate")
    assert result.returncode == 2
    assert result.stderr.strip() == "cost-worker: config error: COST_WORKER_DATABASE_URL: required"


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["migrate"],
        ["run"],
        ["dev"],
        ["check-config"],
        ["quarantine", "list"],
        ["quarantine", "replay"],
        ["budgets", "status"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    assert "usage: cost-worker" in result.stdout
    assert len(result.stdout.splitlines()) > 3


def test_unknown_fault_point_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fault points are read from their own (test-only) variable when the worker starts, not from the settings.
    monkeypatch.setenv("COST_WORKER_FAULT_POINTS", "before_db_commit,nowhere")
    with pytest.raises(ConfigError, match="unknown fault point 'nowhere'"):
        Faults.from_env()
    load_settings()  # not an operator setting: the settings do not know it


def test_field_errors_and_cross_field_problems_are_reported_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COST_WORKER_BATCH_MAX_WAIT", "soon")
    monkeypatch.setenv("COST_WORKER_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")  # needs mechanism, user, password
    monkeypatch.setenv("COST_WORKER_DATABASE_URL", "mysql://x@y/z")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    text = "\n".join(caught.value.problems)
    assert "COST_WORKER_BATCH_MAX_WAIT" in text
    assert "COST_WORKER_KAFKA_SASL_MECHANISM: required" in text
    assert "postgresql:// URL" in text


# --- secrets as files (issue 16): what the Kubernetes manifests mount --------------------------------------


def secret_files(directory: Path) -> Path:
    """A Secret volume's shape: one file per variable, values ending in a newline, symlinked via ..data."""
    data = directory / "..2026_12_01"
    data.mkdir(parents=True)
    (data / "COST_WORKER_DATABASE_URL").write_text("postgresql://app:filesecretpw@db:5432/x\n")
    (data / "COST_WORKER_KAFKA_SASL_USERNAME").write_text("svc\n")
    (data / "COST_WORKER_KAFKA_SASL_PASSWORD").write_text("saslfilepw\n")
    (directory / "..data").symlink_to(data.name)
    for name in ("COST_WORKER_DATABASE_URL", "COST_WORKER_KAFKA_SASL_USERNAME", "COST_WORKER_KAFKA_SASL_PASSWORD"):
        (directory / name).symlink_to(f"..data/{name}")
    return directory


def test_settings_are_read_from_secret_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COST_WORKER_SECRETS_DIR", str(secret_files(tmp_path / "secrets")))
    monkeypatch.setenv("COST_WORKER_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("COST_WORKER_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("COST_WORKER_KAFKA_BOOTSTRAP_SERVERS", "k:9092")
    settings = load_settings()
    assert settings.dsn() == "postgresql://app:filesecretpw@db:5432/x"
    assert settings.kafka_sasl_username == "svc"
    assert settings.kafka_options()["sasl_plain_password"] == "saslfilepw"
    assert set(settings.secrets()) == {"filesecretpw", "saslfilepw"}  # redacted from logs like env secrets
    # A variable set in the environment wins over the file.
    monkeypatch.setenv("COST_WORKER_KAFKA_SASL_USERNAME", "from-env")
    assert load_settings().kafka_sasl_username == "from-env"


def test_a_missing_secrets_dir_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COST_WORKER_SECRETS_DIR", str(tmp_path / "absent"))
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert raised.value.problems == [f"COST_WORKER_SECRETS_DIR: no such directory: {tmp_path / 'absent'}"]


def test_check_config_with_secret_files_shows_them_redacted(tmp_path: Path) -> None:
    result = run_cli(
        "check-config",
        env={
            "COST_WORKER_SECRETS_DIR": str(secret_files(tmp_path / "secrets")),
            "COST_WORKER_KAFKA_BOOTSTRAP_SERVERS": "k:9092",
        },
    )
    assert result.returncode == 0, result.stderr
    assert "postgresql://app:***@db:5432/x" in result.stdout
    assert "filesecretpw" not in result.stdout + result.stderr


# --- URLs: secrets anywhere in them stay hidden; a URL asyncpg or aiohttp would trip on is a config error ---------


def test_a_password_in_the_query_string_is_redacted_and_masked_in_logs() -> None:
    from worker.logs import Redactor  # noqa: PLC0415

    url = "postgresql://u@h/db?sslmode=disable&password=hunter2secret&sslpassword=keypass%2Fword&sslkey=/k.pem"
    assert redact_url(url) == "postgresql://u@h/db?sslmode=disable&password=***&sslpassword=***&sslkey=/k.pem"
    settings = Settings(database_url=url)
    assert {"hunter2secret", "keypass%2Fword", "keypass/word"} <= set(settings.secrets())
    logged = Redactor(settings.secrets()).scrub(f"connecting to {url} with keypass/word")
    assert "hunter2secret" not in logged
    assert "keypass" not in logged
    result = run_cli("check-config", env={"COST_WORKER_DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert "COST_WORKER_DATABASE_URL" in result.stdout
    assert "hunter2secret" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://cost:Zm9v/YmFy+cXV4@db.internal:5432/costs",  # '/' in the password: host "cost", port "Zm9v"
        "postgresql://cost:4711/YmFy@db.internal:5432/costs",  # '/' after digits: a valid port, a path with '@'
        "postgresql://cost:Zm9v?YmFy@db.internal/costs",
        "postgresql://cost:Zm9v#YmFy@db.internal/costs",
        "postgresql://cost:Zm9v@YmFy@db.internal/costs",  # asyncpg splits at the first '@', urllib at the last
    ],
)
def test_an_unencoded_character_in_the_password_is_a_config_error_that_does_not_echo_it(url: str) -> None:
    for command in (["check-config"], ["keys", "list"]):
        result = run_cli(*command, env={"COST_WORKER_DATABASE_URL": url})
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.startswith("cost-worker: config error: COST_WORKER_DATABASE_URL: "), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert "percent-encode" in result.stderr
        assert "internal error" not in result.stderr
        for fragment in ("Zm9v", "YmFy", "4711"):
            assert fragment not in result.stdout + result.stderr, (command, fragment)


def test_unparseable_urls_and_bad_ports_are_config_errors_reported_with_the_others() -> None:
    result = run_cli(
        "check-config",
        env={
            "COST_WORKER_DATABASE_URL": "postgresql://u:pw@[::1/db",
            "COST_WORKER_COLLECT_OPENAI_BASE_URL": "https://[::1",
            "COST_WORKER_COLLECT_ANTHROPIC_BASE_URL": "https://proxy.example:99999/",
            "COST_WORKER_KAFKA_BOOTSTRAP_SERVERS": "k1:9092,k2:70000",
            "COST_WORKER_BATCH_MAX_WAIT": "-1",
        },
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("cost-worker: config error: ") for line in lines), lines
    named = [line.split(": ")[2] for line in lines]
    assert sorted(named) == sorted(
        [
            "COST_WORKER_BATCH_MAX_WAIT",
            "COST_WORKER_DATABASE_URL",
            "COST_WORKER_COLLECT_OPENAI_BASE_URL",
            "COST_WORKER_COLLECT_ANTHROPIC_BASE_URL",
            "COST_WORKER_KAFKA_BOOTSTRAP_SERVERS",
        ]
    ), lines
    assert "1 to 65535" in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@db:99999/x",
        "postgresql://u:pw@db:0/x",
        "postgresql://u:pw@db1:5432,db2:65536/x",
        "postgresql://u:pw@[::1]:99999/x",
        "postgresql://u:pw@db/x?port=99999",
        "postgresql://u:pw@/x?host=db1:5432,db2:99999",
    ],
)
def test_the_database_port_must_be_1_to_65535(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(database_url=url)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("COST_WORKER_DATABASE_URL: ")
    assert "1 to 65535" in caught.value.problems[0]


def test_the_url_checks_accept_what_asyncpg_and_aiohttp_accept() -> None:
    from worker.config import base_url_problems, database_url_problems  # noqa: PLC0415

    for url in (
        "postgresql://u:pw@db1:5432,db2:5433/x",  # asyncpg's list of hosts
        "postgresql://u:pw@[::1]:5432/x",
        "postgresql:///x",  # the local socket
        "postgresql://u:p%2Fw%40x@db:65535/x?sslmode=require&user=me@corp",  # encoded; '@' in the query is data
        "postgresql://u@/x?host=/var/run/postgresql",  # a socket directory
    ):
        assert database_url_problems(url) == [], url
        assert load_settings(database_url=url).dsn() == url
    for url in ("https://api.openai.com", "http://[::1]:8080/v1", "https://user:pw@proxy.example:1/"):
        assert base_url_problems(url) == [], url


def test_base_url_credentials_are_redacted_the_user_only_one_and_the_query_token_too() -> None:
    result = run_cli(
        "check-config",
        env={
            "COST_WORKER_COLLECT_OPENAI_BASE_URL": "https://sk-proxytoken@proxy.example/",
            "COST_WORKER_COLLECT_ANTHROPIC_BASE_URL": "https://proxy.example/anthropic?token=tok-9f8e7d&region=eu",
        },
    )
    assert result.returncode == 0, result.stderr
    assert "https://***@proxy.example/" in result.stdout
    assert "https://proxy.example/anthropic?token=***&region=eu" in result.stdout
    assert "sk-proxytoken" not in result.stdout + result.stderr
    assert "tok-9f8e7d" not in result.stdout + result.stderr
    settings = Settings(
        collect_openai_base_url="https://sk-proxytoken@proxy.example/",
        collect_anthropic_base_url="https://proxy.example/anthropic?token=tok-9f8e7d",
    )
    assert {"sk-proxytoken", "tok-9f8e7d"} <= set(settings.secrets())


def test_check_config_notes_which_commands_need_each_missing_setting() -> None:
    # `migrate` needs the database only: the note used to say it also needed the brokers.
    result = run_cli("check-config", env={"COST_WORKER_DATABASE_URL": "postgresql://app@db/x"})
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert "note: COST_WORKER_KAFKA_BOOTSTRAP_SERVERS is not set: needed by `run`, `collect` and `notify run`" in notes
    assert not any("DATABASE_URL" in note for note in notes), notes
    assert not any("migrate" in note for note in notes), notes
    # `keys rotate` with a key on standard input seals it too: without the file it stops with "no key-encryption key".
    kek = next(note for note in notes if "COLLECT_KEY_ENCRYPTION_KEY_FILE" in note)
    assert "`keys rotate`" in kek, kek

    nothing = run_cli("check-config")
    assert nothing.returncode == 0, nothing.stderr
    assert (
        "note: COST_WORKER_DATABASE_URL is not set: needed by every command but `check-config`, `dev` and "
        "`prices show`" in nothing.stdout.splitlines()
    )


# --- the metrics port: a start failure is one fatal line naming the setting, not an internal error -------------

SERVICE_ENV = {
    "COST_WORKER_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",  # never reached: the HTTP server is first
    "COST_WORKER_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
    "COST_WORKER_NOTIFY_SECRETS_KEY": "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=",
    "COST_WORKER_LOG_LEVEL": "ERROR",
}


@pytest.mark.parametrize("command", [["run"], ["collect", "--once"], ["notify", "run"]])
def test_a_metrics_port_in_use_is_a_fatal_error_naming_the_setting(command: list[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**SERVICE_ENV, "COST_WORKER_METRICS_HOST": "127.0.0.1", "COST_WORKER_METRICS_PORT": str(port)}
        result = run_cli(*command, env=env)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cost-worker: error: cannot serve /metrics"), result.stderr
    assert "COST_WORKER_METRICS_PORT" in last
    assert "internal error" not in result.stderr
    assert "Traceback" not in result.stderr


def test_a_metrics_host_that_is_not_ours_is_a_fatal_error_naming_the_setting() -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: binding fails locally, nothing is contacted.
    result = run_cli("run", env={**SERVICE_ENV, "COST_WORKER_METRICS_HOST": "192.0.2.1"})
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cost-worker: error: cannot serve /metrics"), result.stderr
    assert "COST_WORKER_METRICS_HOST" in last
    assert "internal error" not in result.stderr


async def test_a_metrics_host_that_does_not_resolve_is_a_fatal_error_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.errors import FatalError  # noqa: PLC0415
    from worker.http import Health, HealthServer  # noqa: PLC0415

    def no_such_host(*args: object, **kwargs: object) -> list[object]:  # no resolver is asked
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    server = HealthServer(Health(ready_max_retrying=1.0), "not.a.host.invalid", 0)
    with pytest.raises(FatalError, match=r"COST_WORKER_METRICS_HOST 'not\.a\.host\.invalid' does not resolve"):
        await server.start()
    await server.stop()


async def test_the_input_consumer_never_reads_an_aborted_transaction_unless_told_to() -> None:
    """Spend a transactional producer withdrew (aborted) must not count: the group consumer reads committed
    messages only, by default. (The development broker has no transactions, so what the broker then skips is
    Kafka's part; this pins that the worker asks for it.)"""
    chosen = Settings(kafka_bootstrap_servers="127.0.0.1:1", kafka_isolation_level="read_uncommitted")
    for settings, level in (
        (Settings(kafka_bootstrap_servers="127.0.0.1:1"), "read_committed"),
        (chosen, chosen.kafka_isolation_level),
    ):
        client = consumer(settings)
        try:
            assert client._isolation_level == level
        finally:
            await client.stop()
    with pytest.raises(ConfigError, match="KAFKA_ISOLATION_LEVEL"):
        load_settings(kafka_isolation_level="committed")
