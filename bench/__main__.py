"""``python -m bench``: run the benchmark (``run``) or profile the worker draining a backlog (``profile``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from bench import config

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benchmark and write bench/results/")
    run.add_argument("--scale", help="tiny, full, or a factor of the full sizes (default: $BENCH_SCALE or full)")
    run.add_argument("--out", type=Path, default=RESULTS, help="results directory (default: bench/results)")
    run.add_argument(
        "--phases",
        help="comma-separated subset of " + ",".join(config.PHASES[1:]) + " (prepare always runs)",
    )
    run.add_argument("--keep-logs", type=Path, help="keep the worker logs in this directory")
    profile = sub.add_parser("profile", help="profile the worker draining a backlog (py-spy)")
    profile.add_argument("--events", type=int, default=200_000)
    profile.add_argument("--lines", type=int, default=100_000)
    profile.add_argument("--out", type=Path, default=RESULTS / "profile")
    args = parser.parse_args(argv)

    if args.command == "run":
        from bench import runner  # noqa: PLC0415

        phases = config.PHASES
        if args.phases:
            phases = ("prepare", *[p.strip() for p in args.phases.split(",") if p.strip()])
            unknown = set(phases) - set(config.PHASES)
            if unknown:
                parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
        cfg = config.from_scale(args.scale, phases=phases)
        results = asyncio.run(runner.run(cfg, args.out, keep_logs=args.keep_logs))
        print((args.out / "latest.md").read_text(encoding="utf-8"))
        for kind, path in results["files"].items():
            print(f"{kind}: {path}", file=sys.stderr)
        return 1 if results.get("errors") else 0

    from bench import profiling  # noqa: PLC0415

    return asyncio.run(profiling.main(events=args.events, lines=args.lines, out=args.out))


if __name__ == "__main__":
    sys.exit(main())
