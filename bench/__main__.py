"""`make bench`: run every benchmark several rounds, print and write docs/benchmarks.md."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.env import Stack
from bench.report import write_report
from bench.runner import Bench, Settings


def _loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text(encoding="ascii").split()[:3])


def main() -> int:
    """Parse options, run, report."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "3")))
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument(
        "--only",
        choices=["pipeline", "idle", "scale", "storm", "cluster"],
        action="append",
        help="run only these parts (repeatable); default: all (scale includes the storm; "
        "storm alone has no steady rate to compare with)",
    )
    parser.add_argument("--quick", action="store_true", help="short rounds (a smoke run)")
    parser.add_argument(
        "--fetch-path",
        action="store_true",
        help="hosts announce every change by its hash and the store fetches it: the agent's "
        "default (inline state is its opt-in, which the bench measures otherwise)",
    )
    args = parser.parse_args()
    parts = tuple(args.only or ("pipeline", "idle", "scale", "cluster"))
    settings = Settings(
        rounds=args.rounds, quick=args.quick, parts=parts, inline=not args.fetch_path
    )
    work = Path(tempfile.mkdtemp(prefix="keeper-bench-"))
    began = time.monotonic()
    print(f"bench: work dir {work}", flush=True)
    try:
        with Stack.running(work / "stack") as stack:
            versions = stack.versions()
            versions["load_start"] = _loadavg()
            print(f"bench: {versions}", flush=True)
            bench = Bench(stack, work, settings)
            if args.fetch_path:
                bench.notes.append("--fetch-path: every change hash-only, each version fetched.")
            asyncio.run(bench.run_all())
        elapsed = time.monotonic() - began
        versions["load_end"] = _loadavg()
        text = write_report(args.output, bench, versions, settings, elapsed)
        print(text, flush=True)
        print(f"bench: wrote {args.output} in {elapsed:.0f} s", flush=True)
    finally:
        if args.keep:
            print(f"bench: kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
