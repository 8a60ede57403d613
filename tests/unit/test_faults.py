"""Fault points without servers: named by an enum, read from their own variable, fired on the n-th hit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from worker.errors import ConfigError
from worker.faults import ENV, FaultPoint, Faults


def test_points_are_parsed_and_unknown_ones_refused() -> None:
    Faults("before_db_commit@3, after_db_commit")
    assert Faults.from_env({}) is not None
    with pytest.raises(ConfigError, match="unknown fault point 'before_db_comit'"):
        Faults.from_env({ENV: "before_db_comit"})
    with pytest.raises(ConfigError, match="unknown fault point 'after_db_commit@x'"):
        Faults("after_db_commit@x")


def test_a_point_not_named_or_not_yet_due_does_nothing() -> None:
    faults = Faults("before_db_commit@3")
    faults.hit(FaultPoint.AFTER_DB_COMMIT)
    faults.hit(FaultPoint.BEFORE_DB_COMMIT)
    faults.hit(FaultPoint.BEFORE_DB_COMMIT)  # the third would kill this process


def test_the_nth_hit_kills_the_process() -> None:
    code = (
        "from worker.faults import Faults, FaultPoint\n"
        "faults = Faults.from_env()\n"
        "for n in range(3):\n"
        "    print(n, flush=True)\n"
        "    faults.hit(FaultPoint.BEFORE_OUTBOX_PUBLISH)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={ENV: "before_outbox_publish@2"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == -9
    assert result.stdout.split() == ["0", "1"]
    assert "SIGKILL at before_outbox_publish" in result.stderr
