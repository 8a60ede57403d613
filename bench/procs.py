"""Process figures from /proc (Linux): resident memory, its high-water mark, CPU time of a process tree."""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), or None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds user+system) of a live process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS


def cpu_seconds(pid: int) -> float | None:
    stat = _stat(pid)
    return stat[1] if stat else None


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds of ``root`` and its direct children (PostgreSQL: postmaster, backends, helpers)."""
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = _stat(pid)
        if stat is not None and (pid == root or stat[0] == root):
            found[pid] = stat[1]
    return found


def tree_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the tree used between two snapshots (processes that ended in between are not counted)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())
