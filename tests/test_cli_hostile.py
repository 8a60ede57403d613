"""The command line against hostile and boundary input, run as a user runs it (the real CLI in a subprocess):
one line on stderr, exit 2 for a bad argument or input file, 1 for an operational failure, never a traceback,
and nothing written that the output does not own up to."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
from pydantic import SecretStr

from tests.factories import make_org
from tests.feeding import Feeder
from tests.kafka_helpers import worker_env
from tests.test_partitions import partitions
from tests.test_retention import CURRENT, history
from worker.config import Settings
from worker.files import MAX_INPUT_FILE_BYTES
from worker.partitions import add_months

COLLECTOR = "cost_worker_collector"  # the role `keys` runs as (README)
KEY = base64.b64encode(b"k" * 32).decode()


def cli(
    settings: Settings, *args: str, stdin: str = "", stdout: int | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=worker_env(settings, **extra),
        input=stdin,
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        check=False,
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


async def test_an_input_file_larger_than_any_real_one_is_refused_before_it_is_read_whole(
    settings: Settings, tmp_path: Path
) -> None:
    """`prices import /dev/zero` (or a multi-gigabyte file named by mistake) read the whole file into memory: a
    MemoryError shown as an internal error, exit 1, after eating the machine's memory. Now: exit 2, one line."""
    sparse = tmp_path / "huge.csv"
    with sparse.open("wb") as out:
        out.truncate(MAX_INPUT_FILE_BYTES + 1)  # sparse: costs no disk
    for args in (("prices", "import"), ("rates", "import"), ("rates", "import", "--format", "pairs")):
        for path in (str(sparse), "/dev/zero"):
            done = await asyncio.to_thread(cli, settings, *args[:2], path, *args[2:])
            assert done.returncode == 2, (args, path, done.stderr)
            line = one_line(done)
            assert "config error" in line
            assert f"larger than {MAX_INPUT_FILE_BYTES // 2**20} MiB" in line


async def test_a_csv_field_longer_than_the_csv_module_reads_is_an_input_error(
    settings: Settings, tmp_path: Path
) -> None:
    """A field over 131072 characters (the csv module's limit) was `internal error: Error: field larger than field
    limit (131072)`, exit 1, as if the worker had a bug."""
    overrides = "provider,model,token_type,price_per_million,effective_from\nopenai,{long},x,1,2026-01-01\n"
    cases = {
        ("prices", "import"): overrides,
        ("rates", "import", "--format", "pairs"): "date,base,quote,rate\n2026-01-01,USD,EUR,{long}\n",
        ("rates", "import"): "Date,USD,{long}\n27 November 2026,1.05,1\n",
    }
    for args, text in cases.items():
        path = tmp_path / "long.csv"
        path.write_text(text.replace("{long}", '"' + "9" * 200_000 + '"'), encoding="utf-8")
        done = await asyncio.to_thread(cli, settings, *args[:2], str(path), *args[2:])
        assert done.returncode == 2, (args, done.stderr)
        assert "config error" in done.stderr
        assert "Traceback" not in done.stderr
        assert "internal error" not in done.stderr


async def test_quotes_that_do_not_close_or_hold_a_line_break_are_refused(
    db: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    """`rates import` of a line with an unclosed quote was `internal error: ValueError: zip() argument 2 is shorter
    than argument 1` (exit 1); `prices import` of a quoted model name holding a line break ("gpt<LF>4o") stored an
    override for `gpt4o`, a model the file does not name, and said `imported 1 overrides`."""
    path = tmp_path / "quote.csv"
    path.write_text('date,base,quote,rate\n2026-01-01,USD,EUR,"1\n2026-01-02,USD,EUR,1\n', encoding="utf-8")
    done = await asyncio.to_thread(cli, settings, "rates", "import", str(path), "--format", "pairs")
    assert done.returncode == 2, done.stderr
    assert "config error: line 2: not CSV" in one_line(done)
    assert await db.fetchval("SELECT count(*) FROM exchange_rates") == 0

    path.write_text(
        'provider,model,token_type,price_per_million,effective_from\nopenai,"gpt\n4o",input_tokens,1,2026-01-01\n',
        encoding="utf-8",
    )
    done = await asyncio.to_thread(cli, settings, "prices", "import", str(path))
    assert done.returncode == 2, done.stdout
    assert "model must be 1 to 255 printable characters" in one_line(done)
    assert await db.fetchval("SELECT count(*) FROM model_prices") == 0


async def test_an_empty_organization_is_a_usage_error_not_every_organization(settings: Settings) -> None:
    """`notify status --organization ''` (an unset shell variable) listed every organization's destinations."""
    done = await asyncio.to_thread(cli, settings, "notify", "status", "--organization", "")
    assert done.returncode == 2, done.stdout
    assert "--organization: not a uuid: ''" in one_line(done)
    assert done.stdout == ""


async def test_budgets_commands_name_an_unknown_organization(db: asyncpg.Connection, settings: Settings) -> None:
    """`budgets rebuild-spend --organization <a mistyped id>` printed `rebuilt <id>` and exit 0; `budgets status`
    said `no active budgets`. Nothing was rebuilt or looked at: the id names no organization."""
    unknown = uuid.uuid4()
    for action in ("rebuild-spend", "status"):
        done = await asyncio.to_thread(cli, settings, "budgets", action, "--organization", str(unknown))
        assert done.returncode == 1, (action, done.stdout)
        assert one_line(done) == f"cost-worker: error: no organization {unknown}"
        assert "rebuilt" not in done.stdout
    org = await make_org(db)
    done = await asyncio.to_thread(cli, settings, "budgets", "rebuild-spend", "--organization", str(org.id))
    assert done.returncode == 0, done.stderr
    assert f"rebuilt {org.id}" in done.stdout


async def test_names_and_accounts_with_control_characters_are_refused(
    db: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    """A provider account id with a line break or a control character (or 5000 characters) was stored: `keys list`
    then printed a broken table, the collector polled an account that cannot exist, and the long one was a
    `database refused` error (exit 1). A destination name with a line break broke `notify destinations list`."""
    org = await make_org(db)
    kek = tmp_path / "kek"
    kek.write_bytes(os.urandom(32))
    key = "sk-admin-" + "a" * 40 + "\n"
    for account in ("a\nb", "acc\x01", "a b", "x" * 5000):
        done = await asyncio.to_thread(
            cli,
            settings,
            *("keys", "add", "--organization", str(org.id), "--provider", "openai", "--account", account),
            stdin=key,
            COST_WORKER_COLLECT_KEY_ENCRYPTION_KEY_FILE=str(kek),
            COST_WORKER_DATABASE_ROLE=COLLECTOR,
        )
        assert done.returncode == 2, (account[:20], done.stdout, done.stderr)
        assert "usage error: --account:" in one_line(done)
    name_done = await asyncio.to_thread(
        cli,
        settings,
        *("keys", "add", "--organization", str(org.id), "--provider", "openai", "--account", "org-ok"),
        *("--name", "line\nbreak"),
        stdin=key,
        COST_WORKER_COLLECT_KEY_ENCRYPTION_KEY_FILE=str(kek),
        COST_WORKER_DATABASE_ROLE=COLLECTOR,
    )
    assert name_done.returncode == 2, name_done.stdout
    assert "usage error: --name:" in one_line(name_done)
    assert await db.fetchval("SELECT count(*) FROM organization_api_keys") == 0

    done = await asyncio.to_thread(
        cli,
        settings,
        *("notify", "destinations", "add", "--organization", str(org.id), "--name", "two\nlines"),
        *("--url", "http://127.0.0.1:9/hook"),
        COST_WORKER_NOTIFY_SECRETS_KEY=KEY,
        COST_WORKER_NOTIFY_ALLOW_HTTP="true",
        COST_WORKER_NOTIFY_ALLOWED_NETWORKS="127.0.0.0/8",
    )
    assert done.returncode == 2, done.stdout
    assert "usage error: --name:" in one_line(done)
    assert await db.fetchval("SELECT count(*) FROM notify_destinations") == 0


async def test_a_secret_file_that_cannot_be_read_is_an_input_error_naming_the_file(
    db: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    """`keys add --secret-file` naming a missing file or a directory was exit 1, `cannot read the admin key file of
    openai account x`, without the file or why: it is the command's input, as a key on standard input is (exit 2)."""
    org = await make_org(db)
    for path, why in ((tmp_path / "missing", "No such file"), (tmp_path, "Is a directory")):
        done = await asyncio.to_thread(
            cli,
            settings,
            *("keys", "add", "--organization", str(org.id), "--provider", "openai", "--account", "org-x"),
            *("--secret-file", str(path)),
            COST_WORKER_DATABASE_ROLE=COLLECTOR,
        )
        assert done.returncode == 2, done.stderr
        line = one_line(done)
        assert "config error: --secret-file" in line
        assert str(path) in line
        assert why in line
    assert await db.fetchval("SELECT count(*) FROM organization_api_keys") == 0


async def test_a_database_without_migrations_is_one_line_that_says_to_migrate(
    empty_database_url: str, settings: Settings
) -> None:
    """Every admin command against an unmigrated database said `relation "quarantine" does not exist` (or, for
    `retention`, that and a second `HINT:` line): neither names the cause."""
    bare = settings.model_copy(update={"database_url": SecretStr(empty_database_url)})
    for args in (("quarantine", "list"), ("retention",), ("prices", "overrides"), ("budgets", "status")):
        done = await asyncio.to_thread(cli, bare, *args)
        assert done.returncode == 1, (args, done.stdout)
        line = one_line(done)
        assert "run `cost-worker migrate`" in line, line


async def test_a_signing_secret_that_cannot_be_shown_is_not_kept(db: asyncpg.Connection, settings: Settings) -> None:
    """`notify destinations add` committed the destination, then printed its signing secret, which no command shows
    again: with standard output closed the print failed and the command exited 1 with nothing on stderr, leaving a
    webhook destination whose secret nobody has (its receiver can verify nothing). Now nothing is kept, and said."""
    org = await make_org(db)
    read_end, write_end = os.pipe()
    os.close(read_end)  # a reader that went away
    try:
        done = await asyncio.to_thread(
            cli,
            settings,
            *("notify", "destinations", "add", "--organization", str(org.id), "--name", "hook"),
            *("--url", "http://127.0.0.1:9/hook"),
            stdout=write_end,
            COST_WORKER_NOTIFY_SECRETS_KEY=KEY,
            COST_WORKER_NOTIFY_ALLOW_HTTP="true",
            COST_WORKER_NOTIFY_ALLOWED_NETWORKS="127.0.0.0/8",
        )
    finally:
        os.close(write_end)
    assert done.returncode == 1
    assert "not added" in one_line(done)
    assert await db.fetchval("SELECT count(*) FROM notify_destinations") == 0


async def test_retention_that_fails_half_way_says_what_it_had_done(
    db: asyncpg.Connection, feeder: Feeder, settings: Settings
) -> None:
    """`retention --execute` that failed on its third partition (here: a view an analyst made on it) said only the
    database's error: the two partitions already dropped, and the retention boundary already moved, went unsaid."""
    months = [add_months(CURRENT, -k) for k in range(7, 0, -1)]
    await history(db, feeder, months)
    doomed = [f"api_usage_y{m.year}m{m.month:02d}" for m in months[:4]]
    await db.execute(f"CREATE VIEW analyst_view AS SELECT * FROM {doomed[2]}")
    done = await asyncio.to_thread(cli, settings, "retention", "--months", "3", "--execute")
    assert done.returncode == 1, done.stdout
    line = one_line(done)
    assert "DependentObjectsStillExist" in line
    assert f"done before the failure: dropped {doomed[0]}, {doomed[1]}" in line, line
    assert f"kept from {add_months(CURRENT, -3)}" in line
    assert not {doomed[0], doomed[1]} & set(await partitions(db))


async def test_text_from_outside_is_shown_with_its_control_characters_escaped(
    db: asyncpg.Connection, settings: Settings
) -> None:
    """A webhook receiver's response body is kept as the delivery's last error and `notify status` printed it raw:
    a receiver answering `HTTP 500` with terminal escape sequences (clear the screen, retitle the window, a line
    break that forges a row) had them run in the operator's terminal. Every table cell now shows them escaped."""
    org = await make_org(db)
    destination = uuid.uuid4()
    await db.execute(
        "INSERT INTO notify_destinations (id, organization_id, name, kind, url_origin, url_sealed, secret_sealed) "
        "VALUES ($1, $2, 'hook', 'webhook', 'https://example.com', '\\x00', '\\x00')",
        destination,
        org.id,
    )
    hostile = "HTTP 500: \x1b]0;owned\x07\x1b[2Jfake\nrow"
    await db.execute(
        "INSERT INTO notify_deliveries (organization_id, destination_id, webhook_id, event_type, payload, status, "
        "attempts, last_error) VALUES ($1, $2, 'w1', 'budget.threshold_crossed', '{}', 'failed', 3, $3)",
        org.id,
        destination,
        hostile,
    )
    done = await asyncio.to_thread(cli, settings, "notify", "status", "--organization", str(org.id))
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout
    assert "\x07" not in done.stdout
    assert "HTTP 500: \\x1b]0;owned\\x07\\x1b[2Jfake\\nrow"[:60] in done.stdout
    assert len(done.stdout.splitlines()) == 4  # header, rule, one row, backlog


async def test_a_rates_source_label_with_a_line_break_or_5000_characters_is_refused(
    db: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    """`rates import --source` stored any text as the rates' source: 5000 characters (one `rates list` row 5,000
    columns wide) or a line break that forged a row of the listing."""
    path = tmp_path / "rates.csv"
    path.write_text("date,base,quote,rate\n2026-01-01,USD,EUR,0.9\n", encoding="utf-8")
    for source in ("a\nb", "s" * 5000):
        done = await asyncio.to_thread(
            cli, settings, "rates", "import", str(path), "--format", "pairs", "--source", source
        )
        assert done.returncode == 2, done.stdout
        assert "usage error: --source:" in one_line(done)
    assert await db.fetchval("SELECT count(*) FROM exchange_rates") == 0


def test_a_state_directory_that_cannot_be_one_is_a_usage_error(tmp_path: Path) -> None:
    """`dev --state-dir` naming a file was `internal error: FileExistsError` (exit 1); an empty one (an unset shell
    variable) put the embedded PostgreSQL and the broker's log into the current directory (here: a git checkout)."""
    a_file = tmp_path / "file"
    a_file.write_text("x", encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith("COST_WORKER_")}
    for state_dir, why in ((str(a_file), "File exists"), ("", "must not be empty"), ("/proc/none/x", "No such file")):
        done = subprocess.run(
            [sys.executable, "-m", "worker", "dev", "--once", "--state-dir", state_dir],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, (state_dir, done.stdout, done.stderr)
        line = one_line(done)
        assert "usage error:" in line
        assert "--state-dir" in line
        assert why in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_check_config_names_a_misspelt_setting(tmp_path: Path) -> None:
    """A misspelt variable (COST_WORKER_DATABASE_STATEMENT_TIMOUT=5) was ignored without a word: `check-config` said
    `configuration OK` and the worker ran with the default 30 s. It still runs (a note, not an error), but says so."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("COST_WORKER_")}
    env |= {
        "COST_WORKER_DATABASE_URL": "postgresql://u@h/db",
        "COST_WORKER_DATABASE_STATEMENT_TIMOUT": "5",
        "COST_WORKER_TEST_DATABASE_URL": "postgresql://u@h/t",  # the test suite's own: not a setting, not noted
    }
    done = subprocess.run(
        [sys.executable, "-m", "worker", "check-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "note: COST_WORKER_DATABASE_STATEMENT_TIMOUT is not a setting and is ignored "
        "(did you mean COST_WORKER_DATABASE_STATEMENT_TIMEOUT?)"
    ) in done.stdout
    assert "COST_WORKER_TEST_DATABASE_URL" not in done.stdout


def test_check_config_names_a_misspelt_file_in_the_secrets_directory(tmp_path: Path) -> None:
    """Settings also come from COST_WORKER_SECRETS_DIR (one file per variable, a Secret volume): a file named
    COST_WORKER_DATABSE_URL there was ignored without a word, although README says check-config names each
    COST_WORKER_ name that is no setting. Kubernetes' own entries (`..data`, `..2026_...`) are not noted."""
    secrets = tmp_path / "secrets"
    data = secrets / "..2026_12_03"
    data.mkdir(parents=True)
    (data / "COST_WORKER_DATABSE_URL").write_text("postgresql://u:filepw@h/db\n")
    (data / "COST_WORKER_LOG_LEVEL").write_text("INFO\n")
    (secrets / "..data").symlink_to(data.name)
    for name in ("COST_WORKER_DATABSE_URL", "COST_WORKER_LOG_LEVEL"):
        (secrets / name).symlink_to(f"..data/{name}")
    env = {key: value for key, value in os.environ.items() if not key.startswith("COST_WORKER_")}
    env |= {"COST_WORKER_SECRETS_DIR": str(secrets)}
    done = subprocess.run(
        [sys.executable, "-m", "worker", "check-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stdout.splitlines() if "is not a setting" in line]
    assert notes == [
        f"note: {secrets / 'COST_WORKER_DATABSE_URL'} is not a setting and is ignored "
        "(did you mean COST_WORKER_DATABASE_URL?)"
    ], done.stdout
    assert "filepw" not in done.stdout
