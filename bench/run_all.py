"""Runs every benchmark once, one after the other, and prints their JSON lines at the end.

    .venv/bin/python bench/run_all.py            # full sizes (what `make bench` runs)
    .venv/bin/python bench/run_all.py --quick    # small sizes, a few minutes (what CI runs)

Each benchmark's own output streams through; the last lines are each one's result, in order.
Exits non-zero if any benchmark failed or printed no result, after running the rest.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = (
    "fingerprint",
    "slurm_query",
    "rest_query",
    "reconcile_scale",
    "event_latency",
    "resume_latency",
    "resume_storm",
    "waiting_cost",
    "db_health_check",
)


def run(name: str, quick: bool) -> dict | None:
    argv = [sys.executable, str(BENCH_DIR / f"{name}.py"), *(["--quick"] if quick else [])]
    print(f"=== {name}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=BENCH_DIR.parent, stdout=subprocess.PIPE, text=True)
    last = ""
    for line in process.stdout:
        sys.stderr.write(line)
        if line.strip():
            last = line.strip()
    process.wait()
    print(f"=== {name}: exit {process.returncode} after {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    try:
        result = json.loads(last)
    except ValueError:
        return None
    return result if process.returncode == 0 and result.get("bench") == name else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="each benchmark at its small CI size")
    parser.add_argument("names", nargs="*", default=BENCHMARKS, help=f"which to run (default all: {BENCHMARKS})")
    args = parser.parse_args()
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks: {sorted(unknown)}")

    results = {name: run(name, args.quick) for name in args.names}
    for result in results.values():
        if result is not None:
            print(json.dumps(result))
    failed = [name for name, result in results.items() if result is None]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
