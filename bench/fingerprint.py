"""Input hashing throughput of the job fingerprint vs reading the same file with `cat` (the disk's limit).

Writes a file of --mb megabytes of random bytes, then times `cat file > /dev/null` and
`slurm_adapter.fingerprint.hash_inputs([file])` over it, --repeat times each, interleaved,
and keeps the best of each (the least disturbed by the rest of the machine).
"""

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from harness import emit

from slurm_adapter.fingerprint import hash_inputs


def best_of(repeat: int, action) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=512, help="file size in MB (default 512)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="--mb 64 --repeat 2 (for CI)")
    args = parser.parse_args()
    if args.quick:
        args.mb, args.repeat = 64, 2

    with tempfile.TemporaryDirectory(prefix="emg-bench-") as directory:
        path = Path(directory) / "reads.bin"
        with open(path, "wb") as out:
            for _ in range(args.mb):
                out.write(os.urandom(1024 * 1024))

        def cat() -> None:
            with open(os.devnull, "wb") as devnull:
                subprocess.run(["cat", str(path)], stdout=devnull, check=True)

        cat_s = best_of(args.repeat, cat)
        hash_s = best_of(args.repeat, lambda: hash_inputs([path]))

    emit(
        "fingerprint",
        mb=args.mb,
        hash_mb_s=round(args.mb / hash_s, 1),
        cat_mb_s=round(args.mb / cat_s, 1),
        ratio=round(cat_s / hash_s, 3),
    )


if __name__ == "__main__":
    main()
