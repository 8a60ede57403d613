"""The command line refuses a bad count before it connects to anything: one line, exit 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from worker import app
from worker.cli import EXIT_FAILURE, EXIT_USAGE, main
from worker.config import Settings


@pytest.mark.parametrize("value", ["0", "-1", "ten", "100000000000000000000"])
@pytest.mark.parametrize("action", ["list", "replay"])
def test_quarantine_limit_must_be_a_positive_whole_number(
    action: str, value: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database that does not exist: reaching it would be a different error than the one asserted.
    monkeypatch.setenv("COST_WORKER_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(SystemExit) as exited:
        main(["quarantine", action, "--limit", value])
    assert exited.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "argument --limit:" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_exit_when_idle_must_be_finite_seconds_above_zero(
    value: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `nan` compared false with every idle time, so the worker never exited; refused before any connection.
    monkeypatch.setenv("COST_WORKER_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("COST_WORKER_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")

    def started(settings: Settings, *, exit_when_idle: float | None = None) -> int:
        raise AssertionError(f"the worker was started with --exit-when-idle {exit_when_idle}")

    monkeypatch.setattr(app, "run", started)
    with pytest.raises(SystemExit) as exited:
        main(["run", "--exit-when-idle", value])
    assert exited.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "argument --exit-when-idle:" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["budgets", "status", "--organization", "acme"], "--organization: not a uuid: 'acme'"),
        (["budgets", "rebuild-spend", "--organization", "acme"], "--organization: not a uuid: 'acme'"),
        (["quarantine", "list", "--reason", "nonsense"], "--reason: unknown reason 'nonsense'"),
        (["notify", "status", "--organization", "acme"], "--organization: not a uuid: 'acme'"),
        (["notify", "destinations", "list", "--organization", "acme"], "--organization: not a uuid: 'acme'"),
        (["rates", "list", "--base", "dollar"], "--base: not a currency code: 'dollar'"),
        (["prices", "unpriced", "--since", "yesterday"], "--since: not a date or a time with zone: 'yesterday'"),
        (["retention", "--months", "-1"], "--months: must be 0 (keep everything) or more, not -1"),
    ],
)
def test_a_bad_argument_value_is_a_usage_error_not_a_config_error(
    argv: list[str], problem: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The settings are fine (the database is never reached): the problem is the argument, and the message says so.
    monkeypatch.setenv("COST_WORKER_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"cost-worker: usage error: {problem}"), err
    assert "config error" not in err


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--months", "30000"), ("--quarantine-days", "800000"), ("--deliveries-days", "800000")],
)
def test_retention_refuses_an_age_beyond_the_calendar_before_it_connects(
    flag: str, value: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `--months 30000` reached `date(-474, ...)` (ValueError) and `--quarantine-days 800000` `now - 800000 days`
    # (OverflowError): "internal error" after connecting, instead of a usage error naming the flag.
    monkeypatch.setenv("COST_WORKER_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    assert main(["retention", flag, value]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"cost-worker: usage error: {flag}: ")
    assert "internal error" not in err


@pytest.mark.parametrize("name", ["QUARANTINE_RETENTION_DAYS", "NOTIFY_RETENTION_DAYS"])
def test_a_retention_age_beyond_the_calendar_is_a_config_error(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # check-config said OK to 800000 days, and the worker's periodic retention run then raised OverflowError
    # (not a CostWorkerError): the background task ended and the worker stopped, at every start.
    monkeypatch.setenv("COST_WORKER_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv(f"COST_WORKER_{name}", "800000")
    assert main(["check-config"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"COST_WORKER_{name}" in err
    assert err.startswith("cost-worker: config error: ")


@pytest.mark.parametrize(
    "argv",
    [
        ["budgets", "status", "--foo"],
        ["quarantine", "list", "--status", "x"],
        ["quarantine", "list", "--limit", "0"],
        ["prices"],
        [],
    ],
)
def test_a_wrong_flag_is_one_usage_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # README: "A wrong flag or a bad argument value prints one `usage error:` line per problem". argparse's own
    # refusals said "cost-worker: error: ...", the form of a runtime failure (exit 1), though they exit 2.
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("cost-worker"), err
    assert ": usage error: " in err, err
    assert "--help)" in err


def test_a_reader_that_goes_away_is_no_error() -> None:
    # `cost-worker quarantine list | head -3` printed "internal error: BrokenPipeError" (exit 1), or Python's
    # "Exception ignored ... BrokenPipeError" at exit (exit 120): the reader closing the pipe is no bug to report.
    env = {"PATH": os.environ.get("PATH", ""), "COST_WORKER_LOG_LEVEL": "INFO"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "prices", "show", "gpt-4o"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()  # before the command writes anything
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == EXIT_FAILURE
    assert err == ""
