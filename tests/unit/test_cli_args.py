"""The command line refuses a bad count before it connects to anything: one line, exit 2, no traceback."""

from __future__ import annotations

import pytest

from worker.cli import EXIT_USAGE, main


@pytest.mark.parametrize("value", ["0", "-1", "ten"])
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
